"""``transnext info``: the variants with parameters, GFLOPs and published accuracy; ``--recipes``: the recipes.

Published figures come from the weights records (:data:`transnext.models.WEIGHTS`), which read
them from the recipe registry (:data:`transnext.recipes.RECIPES`); with ``--measure`` parameters
and multiply-adds are also measured on the meta device (seconds per variant, no weights
allocated). ``--recipes`` lists the training recipes of the registry with their settings and
published figures.
"""

from __future__ import annotations

import argparse
import json

ROBUSTNESS = (("imagenet_a", "IN-A"), ("imagenet_r", "IN-R"), ("imagenet_sketch", "Sketch"),
              ("imagenet_v2", "IN-V2"), ("imagenet_c_mce", "IN-C mCE"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="variants or variant.tag names to show (default: all published weights); "
                             "with --recipes: recipe names")
    parser.add_argument("--recipes", action="store_true",
                        help="list the training recipes (--preset names of train / detect train / segment train) "
                             "with their settings and published figures")
    parser.add_argument("--task", choices=("classify", "detect", "segment"), default=None,
                        help="with --recipes: only the recipes of this task")
    parser.add_argument("--measure", action="store_true",
                        help="also measure parameters and GFLOPs (multiply-adds) at each weights' resolution")
    parser.add_argument("--robustness", action="store_true", help="add the published robustness results")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table", help="output format")


def _rows(args: argparse.Namespace) -> list[dict]:
    from ..models.registry import WEIGHTS, get_weights, split_name

    if args.names:
        selected = []
        for name in args.names:
            variant, tag = split_name(name)  # ValueError with suggestions for unknown names
            selected += [get_weights(name)] if tag else [w for w in WEIGHTS.values() if w.variant == variant]
    else:
        selected = list(WEIGHTS.values())
    rows = []
    for w in {w.name: w for w in selected}.values():  # keep order, drop duplicates
        row = {
            "name": w.name, "resolution": w.img_size, "params_m": w.params_m, "gflops": w.gflops,
            "top1": w.top1, "hf_hub_id": w.hf_hub_id, "filename": w.filename, "recipe": w.recipe,
        }
        if args.robustness:
            row["robustness"] = dict(w.robustness)
        if args.measure:
            from ..integrations.flops import measure

            c = measure(w.variant, img_size=w.img_size, pretrain_size=w.pretrain_size)
            row["measured_params_m"] = round(c.params_m, 2)
            row["measured_gflops"] = round(c.gflops, 2)
        rows.append(row)
    return rows


def _table(rows: list[dict], args: argparse.Namespace, markdown: bool) -> str:
    header = ["model", "res", "params (M)", "GFLOPs", "top-1"]
    if args.measure:
        header += ["measured params (M)", "measured GFLOPs"]
    if args.robustness:
        header += [label for _, label in ROBUSTNESS]
    header.append("weights (Hugging Face hub)")
    body = []
    for r in rows:
        line = [r["name"], str(r["resolution"]), f"{r['params_m']:.1f}", f"{r['gflops']:.1f}", f"{r['top1']:.1f}"]
        if args.measure:
            line += [f"{r['measured_params_m']:.2f}", f"{r['measured_gflops']:.2f}"]
        if args.robustness:
            line += [f"{r['robustness'][k]:.1f}" if k in r["robustness"] else "-" for k, _ in ROBUSTNESS]
        line.append(r["hf_hub_id"])
        body.append(line)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _native_status() -> str:
    """The native CPU kernel's status line (built or loaded from where, at which instruction set
    level, or why not); the line says it, so the kernel's own warning is not repeated."""
    import warnings

    from ..ops import native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", native.NativeKernelWarning)
        return native.describe()


def _recipe_rows(args: argparse.Namespace) -> list[dict]:
    from ..recipes import get_recipe, head_label, list_recipes, published_text, summary

    if args.measure or args.robustness:
        raise ValueError("--measure and --robustness apply to the weights table, not to --recipes")
    names = args.names or list_recipes(args.task)
    rows = []
    for name in names:
        r = get_recipe(name, args.task, kind="recipe")  # ValueError listing the recipes for unknown names
        rows.append({
            "name": r.name, "task": r.task, "model": r.config.get("model"), "head": head_label(r),
            "published": r.published_dict(), "published_text": published_text(r), "settings": summary(r),
            "weights": list(r.weights), "notes": r.notes,
        })
    return rows


def _recipe_table(rows: list[dict]) -> str:
    from ..recipes import published_text

    header = ["recipe", "task", "head", "model", "published"]
    # each recipe's headline figures (its first dataset); --format json has them all
    shown = [published_text(r["name"], list(r["published"])[:1]) for r in rows]
    body = [[r["name"], r["task"], r["head"], str(r["model"] or "-"), text or "-"] for r, text in zip(rows, shown)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def run(args: argparse.Namespace) -> int:
    if getattr(args, "recipes", False):
        rows = _recipe_rows(args)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        elif args.format == "markdown":  # the documentation's table: one row per recipe family, with settings
            from ..recipes import markdown_tables

            if args.names:
                raise ValueError("--recipes --format markdown prints whole tasks (--task), not single recipes")
            print(markdown_tables([args.task] if args.task else ["classify", "detect", "segment"]))
        else:
            print(_recipe_table(rows))
            print("\npublished = the reference's figures (ImageNet-1K pretrained trunks; classification: top-1, "
                  "robustness in --format json); --format markdown adds the settings, json the notes.")
        return 0
    if getattr(args, "task", None):
        raise ValueError("--task applies to --recipes")
    rows = _rows(args)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, args, markdown=args.format == "markdown"))
        if args.format == "table":
            print("\nGFLOPs = multiply-adds for one image at the listed resolution; top-1 = ImageNet-1K validation.")
            print(_native_status())
    return 0
