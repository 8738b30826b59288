"""The native CPU attention kernel against the torch kernels it replaces, case by case.

    python benchmarks/native_ab.py [--rounds 2] [--output docs/benchmarks/native_ab]

Each case runs through ``transnext benchmark`` (fresh process, same protocol as every table of
docs/performance.md) once with ``TRANSNEXT_NATIVE=0`` (torch kernels) and once with the native
kernel, alternating for ``--rounds`` rounds; the fastest median of each side is kept, so load
that drifts over the run hits both sides alike. Writes OUTPUT.json (every invocation's result)
and OUTPUT.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "800x1344 backbone infer b1 (mask_rcnn)": ["--features", "--preset", "mask_rcnn", "--sizes", "800x1344",
                                               "--batch-sizes", "1", "--modes", "infer", "--warmup", "1", "--repeats", "2"],
    "512x512 backbone train b2 (upernet)": ["--features", "--preset", "upernet", "--sizes", "512", "--batch-sizes", "2",
                                            "--modes", "train", "--warmup", "1", "--repeats", "2"],
    "224 classification infer b8": ["--sizes", "224", "--batch-sizes", "8", "--modes", "infer", "--warmup", "2",
                                     "--repeats", "5"],
    "224 classification train b8": ["--sizes", "224", "--batch-sizes", "8", "--modes", "train", "--warmup", "2",
                                     "--repeats", "3"],
}


def run(case_args: list[str], native: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "transnext.benchmark", "--variants", "transnext_tiny", "--backends", "torch",
               "--no-reference", "--threads", "2", *case_args, "--output", str(out)]
        env = dict(os.environ, TRANSNEXT_NATIVE="1" if native else "0")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["results"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", default="docs/benchmarks/native_ab")
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    args = ap.parse_args()
    record: dict[str, dict[str, list[dict]]] = {}
    for name in args.cases:
        record[name] = {"torch": [], "native": []}
        for r in range(args.rounds):
            for native in (False, True) if r % 2 == 0 else (True, False):
                res = run(CASES[name], native)
                record[name]["native" if native else "torch"].append(res)
                print(f"{name}: {'native' if native else 'torch '} {res['latency_ms']:.0f} ms, "
                      f"{res['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    lines = ["| case | torch kernels | native kernel | speed-up | peak MB torch / native |", "|---|---|---|---|---|"]
    for name, sides in record.items():
        best = {k: min(v, key=lambda x: x["latency_ms"]) for k, v in sides.items()}
        t, n = best["torch"]["latency_ms"], best["native"]["latency_ms"]
        lines.append(f"| {name} | {t / 1000:.2f} s | {n / 1000:.2f} s | {t / n:.2f}x | "
                     f"{best['torch']['peak_mb']:.0f} / {best['native']['peak_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps({"rounds": args.rounds, "cases": record}, indent=1))
    Path(args.output + ".md").write_text(
        f"`python benchmarks/native_ab.py --rounds {args.rounds}` (fastest median of each side)\n\n{table}\n")


if __name__ == "__main__":
    main()
