"""GPU check of the Triton backend: correctness first, then speed and memory against reference.

One short run on a CUDA machine:

1. correctness: the aggregated-attention op of every backend in float32 against the reference in
   float64 on the GPU, outputs and all input gradients, at odd sizes;
2. the whole model (forward, and forward + backward) at 224, 512 and 1024 px in fp32 and under
   bf16 autocast, for the reference, torch and triton backends: median latency (CUDA events),
   images/s and peak memory (``torch.cuda.max_memory_allocated`` above the built model).

Usage (writes JSON and a Markdown table next to ``--out``)::

    python benchmarks/gpu_triton.py --out gpu_triton.json
    TRITON_INTERPRET=1 python benchmarks/gpu_triton.py --dry-run   # logic check on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import transnext
from transnext import ops
from transnext.models.geometry import local_window_tables

BATCH = {224: 32, 512: 8, 1024: 2, 64: 2}
INPUTS = ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "temperature", "local_bias", "pool_bias",
          "learnable_tokens", "learnable_bias")


def op_inputs(B, h, size, d, pool, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    N, Np = H * W, pool[0] * pool[1]

    def rnd(*s, scale=1.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    kv = rnd(B, N, 2, h, d)
    t = dict(q=rnd(B, N, h, d).transpose(1, 2), k=kv[:, :, 0].transpose(1, 2), v=kv[:, :, 1].transpose(1, 2),
             k_pool=rnd(B, h, Np, d), v_pool=rnd(B, h, Np, d), query_embedding=rnd(h, 1, d, scale=0.1),
             temperature=rnd(h, 1, 1, scale=0.3) + math.log(math.expm1(1 / 0.24)), local_bias=rnd(h, 9, scale=0.5),
             pool_bias=rnd(h, N, Np, scale=0.5), learnable_tokens=rnd(h, d, 9, scale=0.2),
             learnable_bias=rnd(h, 1, 9, scale=0.2))
    count, mask = local_window_tables(size, 3)
    return t, torch.log(count + Np).unsqueeze(-1).to(device=device, dtype=dtype), mask.to(device)


def run_op(backend, t, scale, mask, size, grad):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    out = ops.aggregated_attention(*(leaves[k] for k in INPUTS[:7]), scale, leaves["local_bias"], leaves["pool_bias"],
                                   leaves["learnable_tokens"], leaves["learnable_bias"], mask, size, 3, 0.0, False, backend)
    grads = torch.autograd.grad(out, [leaves[k] for k in INPUTS], grad)
    return out, dict(zip(INPUTS, grads))


def check_correctness(device, backends) -> list[dict]:
    rows = []
    for case in [(2, 3, (7, 11), 24, (3, 5)), (1, 4, (13, 5), 32, (2, 1)), (2, 2, (30, 17), 24, (7, 7))]:
        B, h, size, d, pool = case
        t64, s64, mask = op_inputs(B, h, size, d, pool, device, torch.float64)
        grad64 = torch.randn(B, h, size[0] * size[1], d, dtype=torch.float64, device=device)
        ref, ref_g = run_op("reference", t64, s64, mask, size, grad64)
        for backend in backends:
            t32 = {k: v.float() for k, v in t64.items()}
            out, g = run_op(backend, t32, s64.float(), mask, size, grad64.float())
            errs = {"output": rel(out, ref)}
            errs.update({f"grad_{k}": rel(g[k], ref_g[k]) for k in INPUTS})
            rows.append({"case": f"B{B} h{h} {size[0]}x{size[1]} d{d} pool {pool[0]}x{pool[1]}", "backend": backend,
                         "max_rel_err": max(errs.values()), "errors": errs})
    return rows


def rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def time_model(variant, size, batch, dtype, backend, device, warmup, repeats, mode) -> dict:
    torch.cuda.empty_cache() if device.type == "cuda" else None
    model = transnext.create_model(variant).to(device)
    ops.set_backend(model, backend)
    amp = torch.bfloat16 if dtype == "bf16" else None
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if mode == "fwd":
                with torch.inference_mode():
                    model.eval()(x)
            else:
                model.train()
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return {"latency_ms": ms, "images_per_s": batch * 1e3 / ms, "peak_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="transnext_tiny")
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 512, 1024])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--backends", nargs="+", default=["reference", "torch", "triton"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="gpu_triton.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one repeat (checks the script itself)")
    args = p.parse_args(argv)
    if args.dry_run:
        device, args.sizes, args.warmup, args.repeats, args.variant = torch.device("cpu"), [64], 0, 1, "transnext_micro"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run for a logic check on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for every backend
        torch.backends.cudnn.allow_tf32 = False
    env = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu (dry run)", "torch": torch.__version__, "transnext": transnext.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        args.backends = [b for b in args.backends if b != "triton"]
    print(f"{env}", flush=True)

    correctness = check_correctness(device, [b for b in args.backends if b != "reference"])
    for r in correctness:
        print(f"correctness {r['backend']:<7} {r['case']:<28} max rel err {r['max_rel_err']:.2e}", flush=True)

    rows = []
    for size in args.sizes:
        batch = BATCH.get(size, 1)
        for dtype in args.dtypes:
            for mode in ("fwd", "fwd+bwd"):
                for backend in args.backends:
                    label = f"{size}px B{batch} {dtype} {mode} {backend}"
                    try:
                        res = time_model(args.variant, size, batch, dtype, backend, device, args.warmup, args.repeats, mode)
                    except torch.OutOfMemoryError:
                        res = {"error": "out of memory"}
                    except Exception as e:  # record and go on: one failure must not lose the other figures
                        res = {"error": f"{type(e).__name__}: {e}"[:200]}
                    rows.append(dict(size=size, batch=batch, dtype=dtype, mode=mode, backend=backend, **res))
                    print(label, {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
    for r in rows:
        ref = next((s for s in rows if s["backend"] == "reference" and all(s[k] == r[k] for k in ("size", "dtype", "mode"))
                    and "error" not in s), None)
        if ref and "error" not in r:
            r["speedup_vs_reference"] = ref["latency_ms"] / r["latency_ms"]
            r["memory_vs_reference"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] else float("nan")

    lines = [f"{env['device']}, {env['date']}, torch {env['torch']}, triton {env.get('triton', '-')}, "
             f"{args.variant}", "",
             "| size | batch | dtype | pass | backend | ms | img/s | peak MB | speed x ref | memory x ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['mode']} | {r['backend']} | {r['error']} |||||")
            continue
        lines.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['mode']} | {r['backend']} | {r['latency_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['peak_mb']:.0f} | {r.get('speedup_vs_reference', float('nan')):.2f} | "
                     f"{r.get('memory_vs_reference', float('nan')):.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.write_text(json.dumps({"environment": env, "correctness": correctness, "results": rows}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    worst = max((r["max_rel_err"] for r in correctness), default=0.0)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
