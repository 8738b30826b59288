"""Speed and memory of the ops backends, side by side, from one invocation.

``transnext benchmark`` (or ``python -m transnext.benchmark``) runs every combination of
variants x sizes x batch sizes x modes x backends. Each case runs in a **fresh subprocess**, so
its peak memory is its own:

* CPU: peak resident set size (``VmHWM``; ``ru_maxrss`` where it cannot be reset) minus the RSS
  after building the model and one tiny no-grad forward that loads the compute kernels. For
  training this includes gradients and optimizer state, which are the same for every backend.
  glibc's default malloc keeps freed blocks of up to 32 MiB resident and adapts that limit as
  the program runs, so its RSS peak drifts between runs and iterations. The headline figure
  (``peak_mb``) therefore comes from a second fresh process per case that runs two steps with
  ``MALLOC_MMAP_THRESHOLD_=262144`` (every block from 256 KiB up is returned to the system when
  freed), which tracks what the step actually holds; the RSS peak of the timing process under
  the default allocator is reported too (``peak_default_mb``). The first step also builds the
  size-dependent tables (position bias of a new input size, optimizer state); the peak of the
  second step alone is ``steady_peak_mb``.
* CUDA: allocator statistics, ``torch.cuda.max_memory_allocated()`` minus the memory allocated
  after building.

A case runs ``warmup`` untimed iterations, then ``repeats`` timed ones; the median is reported.
``inference`` is a no-grad forward; ``train`` is forward, cross-entropy loss, backward and an
AdamW step. Achieved GFLOP/s counts the model's matrix-product and convolution FLOPs (two per
multiply-add, local window in matrix form, the same count for every backend; a training step
counts three forward passes) and is compared with the fp32 matrix-multiply rate measured in the
same invocation and thread count. The ``reference`` backend selects the reference formulation
throughout (unfold attention, plain Conv-GLU and pooling branch): every ratio is against it,
measured in the same run. ``--rounds`` repeats the whole set interleaved and keeps each case's
fastest round (useful on a busy machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("infer", "train")


# ----------------------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", default=["transnext_tiny"], metavar="NAME", help="model variants")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224], metavar="PX", help="square input sizes")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8], metavar="B", help="batch sizes")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help="attention backends (default: reference, torch, and triton on CUDA); "
                             "reference is always added as the baseline")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="inference and/or training step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32, or autocast to bf16/fp16 (weights stay fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--fixed-pool-size", type=int, default=None, metavar="P", help="linear mode with a PxP pooled grid")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per case")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per case (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times, interleaved; keep the fastest")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before it is recorded as failed")
    parser.add_argument("--no-matmul-rate", action="store_true", help="skip measuring the fp32 matmul rate")
    parser.add_argument("--no-memory-run", action="store_true",
                        help="CPU: report the timing process's RSS peak only (no second process per case)")
    parser.add_argument("--output", default="benchmark.json", metavar="PATH", help="JSON results ('' to skip)")
    parser.add_argument("--plot", default="benchmark.png", metavar="PATH", help="PNG plot ('' to skip; needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case (JSON)


def run(args: argparse.Namespace) -> int:
    if args.case is not None:
        print(json.dumps(_run_case(json.loads(args.case))), flush=True)
        return 0
    backends = list(dict.fromkeys(["reference", *(args.backends or _default_backends(args.device))]))
    cases = [
        dict(variant=v, size=s, batch=b, mode=m, backend=be, device=args.device, dtype=args.dtype,
             threads=args.threads, fixed_pool_size=args.fixed_pool_size, warmup=args.warmup, repeats=args.repeats)
        for v in args.variants for s in args.sizes for b in args.batch_sizes for m in args.modes for be in backends
    ]
    env = _environment(args)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rates = []
    if not args.no_matmul_rate:
        log("measuring the fp32 matmul rate ...")
        rates.append(_matmul_rate({"device": args.device, "threads": args.threads})["gflops"])
        env["matmul_gflops"] = rates[0]
    flops = {(v, s): _model_flops(v, s, args.fixed_pool_size) for v in args.variants for s in args.sizes}
    best: dict[int, dict] = {}
    for r in range(args.rounds):
        for i, case in enumerate(cases):
            log(f"[round {r + 1}/{args.rounds}] case {i + 1}/{len(cases)}: {_label(case)} ...")
            res = dict(case, **_subprocess(case, args.timeout))
            if "error" not in res and not case["device"].startswith("cuda") and not args.no_memory_run:
                mem = _subprocess(dict(case, phase="memory"), args.timeout, {"MALLOC_MMAP_THRESHOLD_": "262144"})
                res["peak_default_mb"] = res["peak_mb"]
                res["peak_mb"] = mem.get("peak_mb")
                res["steady_peak_mb"] = mem.get("steady_peak_mb")
                if "error" in mem:
                    res["memory_error"] = mem["error"]
            if i not in best or _better(res, best[i]):
                best[i] = res
    results = [best[i] for i in range(len(cases))]
    if rates:  # again at the end: the best of the two is the machine's rate (a busy moment only lowers it)
        rates.append(_matmul_rate({"device": args.device, "threads": args.threads})["gflops"])
        env["matmul_gflops"] = max(rates)
        env["matmul_gflops_runs"] = rates
    for res in results:
        fl = flops.get((res["variant"], res["size"]))
        if fl and res.get("images_per_s"):
            res["flops_per_image"] = fl
            res["gflops_per_s"] = fl * (3 if res["mode"] == "train" else 1) * res["images_per_s"] / 1e9
            if env.get("matmul_gflops"):
                res["matmul_fraction"] = res["gflops_per_s"] / env["matmul_gflops"]
    _add_ratios(results)
    env["load_after"] = _loadavg()
    env["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    print(format_table(results, env, markdown=args.markdown))
    report = {"environment": env, "command": command_line(args), "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
        log(f"wrote {args.output}")
    if args.plot:
        if plot(results, args.plot):
            log(f"wrote {args.plot}")
        else:
            log("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transnext.benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------- runner
def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (outputs left out)."""
    parts = ["transnext benchmark", "--variants", *args.variants, "--sizes", *map(str, args.sizes),
             "--batch-sizes", *map(str, args.batch_sizes), "--modes", *args.modes]
    if args.backends:
        parts += ["--backends", *args.backends]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.dtype != "fp32":
        parts += ["--dtype", args.dtype]
    if args.fixed_pool_size:
        parts += ["--fixed-pool-size", str(args.fixed_pool_size)]
    parts += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.rounds != 1:
        parts += ["--rounds", str(args.rounds)]
    if args.no_memory_run:
        parts.append("--no-memory-run")
    return " ".join(parts)


def _default_backends(device: str) -> list[str]:
    names = ["reference", "torch"]
    if device.startswith("cuda"):
        names.append("triton")
    return names


def _label(case: dict) -> str:
    pool = f" P{case['fixed_pool_size']}" if case.get("fixed_pool_size") else ""
    return f"{case['variant']} {case['size']}px{pool} B{case['batch']} {case['mode']} {case['backend']}"


def _better(a: dict, b: dict) -> bool:
    if "error" in b:
        return "error" not in a
    return "error" not in a and a["latency_ms"] < b["latency_ms"]


def _subprocess(job: dict, timeout: float, extra_env: dict | None = None) -> dict:
    """Run one case in a fresh interpreter; returns its JSON result or {'error': ...}."""
    env = dict(os.environ, **(extra_env or {}))
    threads = str(job.get("threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TRANSNEXT_ATTN_BACKEND=job["backend"])
    cmd = [sys.executable, "-m", "transnext.benchmark", "--case", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else " | ".join(tail)
        return {"error": reason or f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    env = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "load_before": _loadavg(),
        "memory_measure": "CUDA allocator max_memory_allocated minus allocated after build" if args.device.startswith("cuda")
        else "peak RSS (VmHWM) minus RSS after build + one tiny no-grad forward, fresh process per case"
        + ("" if args.no_memory_run else ", two steps with MALLOC_MMAP_THRESHOLD_=262144 (default-malloc RSS peak "
           "of the timing process in peak_default_mb)"),
        "timing": f"median of {args.repeats} after {args.warmup} warm-up iterations; best of {args.rounds} round(s)",
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transnext

        env["transnext"] = transnext.__version__
    except Exception:  # pragma: no cover - the package is importable when this runs
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _add_ratios(results: list[dict]) -> None:
    """Speed and memory ratios of every case against the reference case of the same config."""
    key = ("variant", "size", "batch", "mode", "device", "dtype", "fixed_pool_size")
    base = {tuple(r[k] for k in key): r for r in results if r["backend"] == "reference" and "error" not in r}
    for r in results:
        ref = base.get(tuple(r[k] for k in key))
        if ref is None or "error" in r:
            continue
        r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
        if r.get("peak_mb") is not None and ref.get("peak_mb"):
            r["memory_vs_reference"] = r["peak_mb"] / ref["peak_mb"]


# ----------------------------------------------------------------------------------------- inside a case
def _run_case(job: dict) -> dict:
    return _time_case(job)


def _model_flops(variant: str, size: int, fixed_pool_size: int | None) -> float | None:
    """Matrix-product and convolution FLOPs of one image (counted on the meta device)."""
    try:
        from .integrations.flops import measure
    except ImportError:  # pragma: no cover - optional module
        return None
    kw = {"fixed_pool_size": fixed_pool_size} if fixed_pool_size else {}
    try:
        return 2.0 * measure(variant, size, include_position_bias=False, **kw).macs
    except (ValueError, RuntimeError):  # the case itself reports why it cannot run
        return None


def _matmul_rate(job: dict) -> dict:
    import torch

    dev = torch.device(job["device"])
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(job["threads"])
    try:
        return _matmul_timed(dev)
    finally:
        torch.set_num_threads(threads)


def _matmul_timed(dev) -> dict:
    import torch

    n = 2048 if dev.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    times = []
    for i in range(10):
        _sync(dev)
        t = time.perf_counter()
        a @ b
        _sync(dev)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return {"gflops": 2 * n**3 / min(times) / 1e9}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_case(job: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import transnext
    from transnext import ops

    dev = torch.device(job["device"])
    if dev.type == "cpu":
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    kw = {"fixed_pool_size": job["fixed_pool_size"]} if job.get("fixed_pool_size") else {}
    model = transnext.create_model(job["variant"], **kw).to(dev)
    ops.set_backend(model, job["backend"])
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[job["dtype"]]
    B, S = job["batch"], job["size"]

    # Load the compute kernels with one tiny forward, so that the baseline excludes library state.
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        tiny = model.min_input_size() if hasattr(model, "min_input_size") else 64
        model.eval()(torch.zeros(1, 3, tiny, tiny, device=dev))
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = _rss_mb()
        reset = _reset_peak_rss()

    x = torch.randn(B, 3, S, S, device=dev)
    if job["mode"] == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(x)
    else:
        model.train()
        y = torch.randint(0, getattr(model, "num_classes", 1000) or 1000, (B,), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def peak_now() -> float:
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated(dev) / 2**20 - base
        return _peak_rss_mb() - base

    if job.get("phase") == "memory":
        # Step 1 includes one-time work (position-bias tables of a new size, optimizer state);
        # step 2 alone is the steady state.
        step()
        _sync(dev)
        first = peak_now()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _reset_peak_rss()
        step()
        _sync(dev)
        steady = peak_now()
        return {"peak_mb": max(first, steady), "steady_peak_mb": steady}

    for _ in range(job["warmup"]):
        step()
    _sync(dev)
    times = []
    for _ in range(max(1, job["repeats"])):
        t = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = peak_now()
    return {
        "latency_ms": med * 1e3,
        "latency_min_ms": min(times) * 1e3,
        "images_per_s": B / med,
        "peak_mb": peak,
        "peak_reset": dev.type == "cuda" or reset,
        "base_mb": base,
    }


# ----------------------------------------------------------------------------------------- output
def format_table(results: list[dict], env: dict, markdown: bool = False) -> str:
    head = ["variant", "size", "pool", "batch", "mode", "backend", "img/s", "latency ms", "peak MB",
            "GFLOP/s", "% matmul", "speed x ref", "memory x ref", "step-2 MB", "default-malloc MB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["variant"], r["size"], r.get("fixed_pool_size") or "-", r["batch"], r["mode"], r["backend"],
                         "error: " + r["error"][:60], "", "", "", "", "", "", "", ""])
            continue
        rows.append([
            r["variant"], r["size"], r.get("fixed_pool_size") or "-", r["batch"], r["mode"], r["backend"],
            f"{r['images_per_s']:.2f}", f"{r['latency_ms']:.0f}",
            f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "?",
            f"{r['gflops_per_s']:.1f}" if "gflops_per_s" in r else "",
            f"{100 * r['matmul_fraction']:.0f}%" if "matmul_fraction" in r else "",
            f"{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "",
            f"{r['memory_vs_reference']:.2f}" if "memory_vs_reference" in r else "",
            f"{r['steady_peak_mb']:.0f}" if r.get("steady_peak_mb") is not None else "",
            f"{r['peak_default_mb']:.0f}" if "peak_default_mb" in r else "",
        ])
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    rate = env.get("matmul_gflops")
    foot = [f"device {env.get('device')} ({env.get('gpu') or env.get('processor')}), {env.get('threads')} thread(s), "
            f"{env.get('dtype')}, torch {env.get('torch')}"]
    if rate:
        foot.append(f"fp32 matmul rate: {rate:.1f} GFLOP/s (2048^2 sgemm, same threads, best of before/after the cases)")
    foot.append(f"memory: {env.get('memory_measure')}; timing: {env.get('timing')}")
    if env.get("load_before") is not None:
        foot.append(f"load average before/after: {env.get('load_before')} / {env.get('load_after')}")
    sep = "\n\n" if markdown else "\n"
    return "\n".join(lines) + sep + "\n".join(foot)


def plot(results: list[dict], path: str) -> bool:
    """Throughput and peak memory per case; peak memory against pixels when several sizes ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    sizes = sorted({r["size"] for r in ok})
    ncols = 3 if len(sizes) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    configs = list(dict.fromkeys((r["variant"], r["size"], r["batch"], r["mode"]) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / max(1, len(backends))
    for j, be in enumerate(backends):
        xs, ips, mem = [], [], []
        for i, cfg in enumerate(configs):
            hit = [r for r in ok if (r["variant"], r["size"], r["batch"], r["mode"]) == cfg and r["backend"] == be]
            if hit:
                xs.append(i + j * width)
                ips.append(hit[0]["images_per_s"])
                mem.append(hit[0].get("peak_mb") or 0.0)
        axes[0].bar(xs, ips, width, label=be)
        axes[1].bar(xs, mem, width, label=be)
    labels = [f"{v.replace('transnext_', '')}\n{s}px B{b}\n{m}" for v, s, b, m in configs]
    rates = [r["images_per_s"] for r in ok if r.get("images_per_s")]
    if rates and max(rates) > 20 * min(rates):  # sizes far apart: a log scale keeps every bar readable
        axes[0].set_yscale("log")
    for ax, title in ((axes[0], "images / s (higher is better)"), (axes[1], "peak memory above model, MB")):
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(configs))], labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    if ncols == 3:
        ax = axes[2]
        for be in backends:
            for mode in MODES:
                for key, style, what in (("peak_mb", "-", "peak"), ("steady_peak_mb", "--", "step 2")):
                    pts = sorted((r["size"] ** 2 / 1e6, r[key]) for r in ok
                                 if r["backend"] == be and r["mode"] == mode and r.get(key) is not None)
                    if len(pts) > 1:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{be} {mode} ({what})")
        ax.set_xlabel("megapixels per image")
        ax.set_ylabel("peak memory above model, MB")
        ax.set_title("memory vs pixels")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
