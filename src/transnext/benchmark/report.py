"""Ratios, tables and the plot of a benchmark run (pure functions of the result dicts)."""

from __future__ import annotations

from typing import Any

FLOP_CONVENTION = (
    "multiply-adds of one image from transnext.integrations.flops (torch FlopCounterMode on the meta device: matrix "
    "products including attention's, convolutions; element-wise work not counted; transnext's local window in matrix "
    "form and its position bias served from the inference cache); GFLOP/s = 2 x multiply-adds x images/s, a training "
    "step counted as 3 forward passes"
)

# Cases compared with each other share these settings.
_REFERENCE_KEY = ("model", "size", "batch", "mode", "device", "dtype", "fixed_pool_size", "features", "preset", "compile")
_PEER_KEY = ("size", "batch", "mode", "device", "dtype", "features", "compile")


def format_size(size) -> str:
    h, w = size
    return str(h) if h == w else f"{h}x{w}"


def _key(r: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(tuple(r.get(k)) if isinstance(r.get(k), list) else r.get(k) for k in fields)


def add_reference_ratios(results: list[dict[str, Any]]) -> None:
    """Speed and memory of every transnext case against the ``reference`` backend of the same settings."""
    base = {_key(r, _REFERENCE_KEY): r for r in results
            if r.get("family", "transnext") == "transnext" and r.get("backend") == "reference" and "error" not in r}
    for r in results:
        ref = base.get(_key(r, _REFERENCE_KEY))
        if ref is None or "error" in r or r.get("family", "transnext") != "transnext":
            continue
        r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
        if r.get("peak_mb") is not None and ref.get("peak_mb"):
            r["memory_vs_reference"] = r["peak_mb"] / ref["peak_mb"]


def add_peer_ratios(results: list[dict[str, Any]]) -> None:
    """``vs_peers[peer]`` on every transnext case: its time, peak memory, multiply-adds and GFLOP/s
    divided by the peer's, for the peer case of the same size, batch, mode, features mode and compilation.

    ``time`` > 1 means transnext is slower; ``gflops_per_s`` < 1 means it does less arithmetic per
    second (``time`` / ``macs`` is the cost per multiply-add relative to the peer). With ``--busy``,
    ``busy_slowdown`` is transnext's loaded / quiet time over the peer's (> 1: the load costs
    transnext more) and ``busy_time`` the loaded times' ratio.
    """
    peers = [r for r in results if r.get("family") == "timm" and "error" not in r]
    for r in results:
        if r.get("family", "transnext") != "transnext" or "error" in r:
            continue
        ratios = {}
        for p in peers:
            if _key(p, _PEER_KEY) != _key(r, _PEER_KEY):
                continue
            entry = {"time": r["latency_ms"] / p["latency_ms"]}
            if r.get("peak_mb") is not None and p.get("peak_mb"):
                entry["memory"] = r["peak_mb"] / p["peak_mb"]
            if r.get("macs_per_image") and p.get("macs_per_image"):
                entry["macs"] = r["macs_per_image"] / p["macs_per_image"]
            if r.get("gflops_per_s") and p.get("gflops_per_s"):
                entry["gflops_per_s"] = r["gflops_per_s"] / p["gflops_per_s"]
            if r.get("busy_slowdown") and p.get("busy_slowdown"):
                # > 1: a busy machine slows transnext down more than the peer
                entry["busy_slowdown"] = r["busy_slowdown"] / p["busy_slowdown"]
                entry["busy_time"] = r["busy_latency_ms"] / p["busy_latency_ms"]
            ratios[p["model"]] = entry
        if ratios:
            r["vs_peers"] = ratios


def _num(value, fmt: str) -> str:
    return format(value, fmt) if value is not None else ""


def _render(head: list[str], rows: list[list[Any]], markdown: bool) -> list[str]:
    rows = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]


def format_table(results: list[dict[str, Any]], env: dict[str, Any], markdown: bool = False) -> str:
    busy = any("busy" in r for r in results)
    head = ["model", "backend", "size", "pool", "batch", "mode", "compiled", "img/s", "latency ms", "peak MB", "GMACs/img",
            "GFLOP/s", "% matmul", "speed x ref", "memory x ref", "step-2 MB", "default-malloc MB", "compile s"]
    if busy:
        head += ["loaded ms", "loaded x quiet", "loaded max ms"]
    head += ["faults/step"]
    rows = []
    for r in results:
        ident = [r["model"], r.get("backend") or "timm", format_size(r["size"]), r.get("fixed_pool_size") or "-", r["batch"],
                 r["mode"], "yes" if r.get("compile") else "-"]
        if "error" in r:
            rows.append(ident + ["error: " + r["error"][:60]] + [""] * (len(head) - len(ident) - 1))
            continue
        rows.append(ident + [
            f"{r['images_per_s']:.2f}", f"{r['latency_ms']:.0f}",
            f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "?",
            f"{r['macs_per_image'] / 1e9:.2f}" if r.get("macs_per_image") else "",
            _num(r.get("gflops_per_s"), ".1f"),
            f"{100 * r['matmul_fraction']:.0f}%" if "matmul_fraction" in r else "",
            _num(r.get("speedup_vs_reference"), ".2f"),
            _num(r.get("memory_vs_reference"), ".2f"),
            _num(r.get("steady_peak_mb"), ".0f"),
            _num(r.get("peak_default_mb"), ".0f"),
            _num(r.get("compile_s"), ".1f"),
        ] + ([_num(r.get("busy_latency_ms"), ".0f"), _num(r.get("busy_slowdown"), ".2f") if "busy_error" not in r
              else "error: " + r["busy_error"][:40], _num(r.get("busy_latency_max_ms"), ".0f")] if busy else [])
            + [_num(r.get("minor_faults_per_step"), ".0f")])
    lines = _render(head, rows, markdown)
    rate = env.get("matmul_gflops")
    foot = [f"device {env.get('device')} ({env.get('gpu') or env.get('processor')}), {env.get('threads')} thread(s), "
            f"{env.get('dtype')}, torch {env.get('torch')}" + (f", timm {env['timm']}" if env.get("timm") else "")]
    if env.get("features"):
        foot.append("features mode: backbone only (transnext dense backbone, timm features_only=True)"
                    + (f"; transnext preset {env['preset']}" if env.get("preset") else ""))
    elif env.get("preset"):
        foot.append(f"transnext preset {env['preset']}")
    if rate:
        foot.append(f"fp32 matmul rate: {rate:.1f} GFLOP/s (same threads, best of before/after the cases)")
    foot.append(f"memory: {env.get('memory_measure')}; timing: {env.get('timing')}")
    if env.get("busy"):
        foot.append(f"loaded: the same case again beside {env['busy']} busy-looping process(es); loaded x quiet = median "
                    "loaded time / median quiet time")
    foot.append("faults/step: minor page faults per timed step (memory mapped afresh each step)")
    if env.get("load_before") is not None:
        foot.append(f"load average before/after: {env.get('load_before')} / {env.get('load_after')}")
    sep = "\n\n" if markdown else "\n"
    return "\n".join(lines) + sep + "\n".join(foot)


def format_peer_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    """Every transnext case against every peer of the same settings ('' when no peer ran)."""
    busy = any("busy_slowdown" in q for r in results for q in (r.get("vs_peers") or {}).values())
    head = ["model", "backend", "size", "batch", "mode", "compiled", "peer", "time x peer", "memory x peer",
            "MACs x peer", "GFLOP/s x peer"] + (["loaded time x peer", "slowdown x peer's"] if busy else [])
    rows = []
    for r in results:
        for peer, q in (r.get("vs_peers") or {}).items():
            rows.append([r["model"], r.get("backend"), format_size(r["size"]), r["batch"], r["mode"],
                         "yes" if r.get("compile") else "-", peer, _num(q.get("time"), ".2f"), _num(q.get("memory"), ".2f"),
                         _num(q.get("macs"), ".2f"), _num(q.get("gflops_per_s"), ".2f")]
                        + ([_num(q.get("busy_time"), ".2f"), _num(q.get("busy_slowdown"), ".2f")] if busy else []))
    if not rows:
        return ""
    return "\n".join(_render(head, rows, markdown))


def _series(r: dict, several_variants: bool) -> str:
    if r.get("family") == "timm":
        name = r["model"]
    else:
        name = f"{r['model'].replace('transnext_', '')} {r['backend']}" if several_variants else r["backend"]
    return name + (" compiled" if r.get("compile") else "")


def plot(results: list[dict[str, Any]], path: str) -> bool:
    """Throughput and peak memory per case; peak memory against pixels when several sizes ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    sizes = sorted({tuple(r["size"]) for r in ok})
    several = len({r["model"] for r in ok if r.get("family", "transnext") == "transnext"}) > 1
    ncols = 3 if len(sizes) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    configs = list(dict.fromkeys((tuple(r["size"]), r["batch"], r["mode"]) for r in ok))
    series = list(dict.fromkeys(_series(r, several) for r in ok))
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, ips, mem = [], [], []
        for i, cfg in enumerate(configs):
            hit = [r for r in ok if (tuple(r["size"]), r["batch"], r["mode"]) == cfg and _series(r, several) == name]
            if hit:
                xs.append(i + j * width)
                ips.append(hit[0]["images_per_s"])
                mem.append(hit[0].get("peak_mb") or 0.0)
        axes[0].bar(xs, ips, width, label=name)
        axes[1].bar(xs, mem, width, label=name)
    labels = [f"{format_size(s)}px B{b}\n{m}" for s, b, m in configs]
    rates = [r["images_per_s"] for r in ok if r.get("images_per_s")]
    if rates and max(rates) > 20 * min(rates):  # sizes far apart: a log scale keeps every bar readable
        axes[0].set_yscale("log")
    for ax, title in ((axes[0], "images / s (higher is better)"), (axes[1], "peak memory above model, MB")):
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(configs))], labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    if ncols == 3:
        ax = axes[2]
        for name in series:
            for mode in ("infer", "train"):
                for key, style, what in (("peak_mb", "-", "peak"), ("steady_peak_mb", "--", "step 2")):
                    pts = sorted((r["size"][0] * r["size"][1] / 1e6, r[key]) for r in ok
                                 if _series(r, several) == name and r["mode"] == mode and r.get(key) is not None)
                    if len(pts) > 1:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{name} {mode} ({what})")
        ax.set_xlabel("megapixels per image")
        ax.set_ylabel("peak memory above model, MB")
        ax.set_title("memory vs pixels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
