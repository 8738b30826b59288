"""The parent process of ``transnext benchmark``: arguments, the list of cases, one fresh process each."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .report import FLOP_CONVENTION, add_peer_ratios, add_reference_ratios, format_peer_table, format_size, format_table, plot

MODES = ("infer", "train")
_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


# ----------------------------------------------------------------------------------------- arguments
def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"800x1344"`` -> (800, 1344) (height x width)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected PX (square) or HxW with positive integers, e.g. 224 or 800x1344")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: height and width must be at least 1 pixel")
    return h, w


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument("--variants", nargs="*", default=["transnext_tiny"], metavar="NAME",
                      help="transnext variants (none: only the peers run)")
    what.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224)], metavar="SIZE",
                      help="input sizes: PX (square) or HxW, e.g. 224 800x1344")
    what.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[8], metavar="B", help="batch sizes")
    what.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                      help="infer: no-grad forward; train: forward, loss, backward, AdamW step")
    what.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                      help="attention backends (default: every backend transnext.ops.available_backends() lists for "
                           "the device); reference is added as the baseline unless --no-reference")
    what.add_argument("--no-reference", action="store_true", help="do not add the reference backend as a baseline")
    what.add_argument("--peers", nargs="+", default=[], metavar="TIMM_NAME",
                      help="timm models run through the same protocol, e.g. convnext_tiny swin_tiny_patch4_window7_224 "
                           "(built untrained; at the benchmarked size where the model has a fixed input size)")
    what.add_argument("--features", action="store_true",
                      help="backbone only: transnext's dense backbone (forward_intermediates), timm's features_only=True; "
                           "the training step back-propagates the sum of the feature maps' means")
    what.add_argument("--preset", default=None, metavar="TASK",
                      help="dense-task settings of the transnext models (transnext.dense.DENSE_PRESETS: mask_rcnn = "
                           "bias on an 800 grid, upernet = 512 grid; pretrain size 224, interpolated bias)")
    what.add_argument("--compile", action="store_true",
                      help="also run every case under torch.compile (compile time reported apart, excluded from timing)")
    what.add_argument("--fixed-pool-size", type=_positive_int, default=None, metavar="P",
                      help="transnext linear mode with a PxP pooled grid")
    how = parser.add_argument_group("how")
    how.add_argument("--device", default="cpu", help="cpu or cuda")
    how.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="fp32, or autocast to bf16/fp16 (weights stay fp32)")
    how.add_argument("--threads", type=_positive_int, default=2, help="torch intra-op threads (CPU), the same for every case")
    how.add_argument("--warmup", type=_count, default=2, help="untimed iterations per case (after the compile call)")
    how.add_argument("--repeats", type=_positive_int, default=5, help="timed iterations per case (median reported)")
    how.add_argument("--rounds", type=_positive_int, default=1,
                     help="run every case this many times, interleaved; keep the fastest")
    how.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before it is recorded as failed")
    how.add_argument("--no-matmul-rate", action="store_true", help="skip measuring the fp32 matmul rate")
    how.add_argument("--no-memory-run", action="store_true",
                     help="CPU: report the timing process's RSS peak only (no second process per case)")
    how.add_argument("--busy", type=_count, default=0, metavar="N",
                     help="also time every case with N busy-looping processes beside it (a loaded machine: data-loader "
                          "workers, CI, a shared server) and report loaded / quiet time; 0: quiet runs only")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="benchmark.json", metavar="PATH", help="JSON results ('' to skip)")
    out.add_argument("--plot", default="benchmark.png", metavar="PATH", help="PNG plot ('' to skip; needs matplotlib)")
    out.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case (JSON)


def main(argv: list[str] | None = None) -> int:
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m transnext.benchmark", description=(doc or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------- validation
def resolve_backends(requested: list[str] | None, device: str, with_reference: bool = True) -> list[str]:
    """The backends to run: the requested ones (checked), or every available one; reference first."""
    from .. import ops

    device_type = device.split(":")[0]
    available = ops.available_backends(device_type)
    if requested:
        for name in requested:
            if name not in ops.BACKENDS:
                raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(ops.BACKENDS)}")
            if name not in available:
                raise ValueError(f"backend {name!r} cannot run on {device_type} here; available: {', '.join(available)}")
    names = list(requested or available)
    if with_reference:
        names = ["reference", *names]
    return list(dict.fromkeys(names))


def check_peers(peers: list[str]) -> None:
    if not peers:
        return
    try:
        import timm
    except ImportError as e:  # a RuntimeError: the command line reports it in one line
        raise RuntimeError("--peers needs timm: pip install 'transnext-pytorch[timm]'") from e
    unknown = [p for p in peers if not timm.is_model(p)]
    if unknown:
        raise ValueError(f"unknown timm model(s): {', '.join(unknown)} (timm.list_models('*pattern*') lists the names)")


def check_preset(preset: str | None) -> None:
    if preset is None:
        return
    from ..dense import DENSE_PRESETS

    if preset not in DENSE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(DENSE_PRESETS)}")


def build_kwargs(family: str, name: str, size: tuple[int, int], features: bool, preset: str | None,
                 fixed_pool_size: int | None) -> tuple[dict[str, Any], bool]:
    """How a case's model is built (recorded in the results), and whether it accepts only its built size.

    Every model is built without stochastic depth (``drop_path_rate=0``), so a training step does
    the same work in every iteration and for every model. timm models whose pretrained config has
    a fixed input size (Swin, ViT) are built at the benchmarked size (``img_size=(H, W)``), as a
    dense-task user builds them; the others accept any size as built.
    """
    kw: dict[str, Any] = {"drop_path_rate": 0.0}
    if family == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(name)
        fixed = bool(cfg is not None and getattr(cfg, "fixed_input_size", False))
        if features:
            kw["features_only"] = True
        if fixed:
            kw["img_size"] = list(size)
        return kw, fixed
    if preset is not None:
        from ..dense import DENSE_PRESETS

        p = DENSE_PRESETS[preset]
        kw.update(img_size=[p.img_size, p.img_size], pretrain_size=[p.pretrain_size, p.pretrain_size], pos_bias=p.pos_bias)
        if features:
            kw["out_indices"] = list(p.out_indices)
    if fixed_pool_size:
        kw["fixed_pool_size"] = fixed_pool_size
    return kw, False


# ----------------------------------------------------------------------------------------- cases
def make_cases(args: argparse.Namespace, backends: list[str]) -> list[dict[str, Any]]:
    """Every (size, batch, mode, compiled) x (transnext variant x backend, then each peer), as JSON-able dicts."""
    models = [("transnext", v, be) for v in args.variants for be in backends] + [("timm", p, None) for p in args.peers]
    common = dict(device=args.device, dtype=args.dtype, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                  features=bool(args.features), preset=args.preset)
    cases = []
    for size in args.sizes:
        builds = {(f, n): build_kwargs(f, n, size, args.features, args.preset, args.fixed_pool_size) for f, n, _ in models}
        for batch in args.batch_sizes:
            for mode in args.modes:
                for compiled in ((False, True) if args.compile else (False,)):
                    for family, name, backend in models:
                        kw, fixed = builds[(family, name)]
                        cases.append(dict(
                            family=family, model=name, backend=backend, size=list(size), batch=batch, mode=mode,
                            compile=compiled, fixed_pool_size=args.fixed_pool_size if family == "transnext" else None,
                            build=kw, fixed_input=fixed, **common))
    return cases


def label(case: dict) -> str:
    pool = f" P{case['fixed_pool_size']}" if case.get("fixed_pool_size") else ""
    who = f"{case['model']} {case['backend']}" if case["family"] == "transnext" else f"{case['model']} (timm)"
    comp = " compiled" if case.get("compile") else ""
    return f"{who} {format_size(case['size'])}px{pool} B{case['batch']} {case['mode']}{comp}"


def _better(a: dict, b: dict) -> bool:
    if "error" in b:
        return "error" not in a
    return "error" not in a and a["latency_ms"] < b["latency_ms"]


def run_subprocess(job: dict, timeout: float, extra_env: dict | None = None) -> dict:
    """Run one case in a fresh interpreter; returns its JSON result or {'error': ...}."""
    env = dict(os.environ, **(extra_env or {}))
    threads = str(job.get("threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if job["family"] == "transnext":
        env["TRANSNEXT_ATTN_BACKEND"] = job["backend"]
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


# A process that keeps one core busy until it is stopped, or its parent is gone (never outlives the
# benchmark, even killed), or the deadline passes. No sleeping: a data-loader worker or a compiler
# competes for the core the whole time.
_BUSY_LOOP = """
import os, sys, time
parent, deadline = os.getppid(), time.monotonic() + float(sys.argv[1])
while os.getppid() == parent and time.monotonic() < deadline:
    for _ in range(200000):
        pass
"""


@contextlib.contextmanager
def busy_processes(n: int, limit_s: float) -> Iterator[list[subprocess.Popen]]:
    """``n`` busy-looping processes for the duration of the block (at most ``limit_s`` seconds),
    stopped and reaped when it ends, whether normally, by an error or by Ctrl-C."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(limit_s)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.2)  # under way (interpreter started) before the measured process starts
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _busy_fields(quiet: dict, loaded: dict, n: int) -> dict:
    """The loaded run's figures beside the quiet one's: ``busy_slowdown`` = loaded / quiet median time."""
    if "error" in loaded:
        return {"busy": n, "busy_error": loaded["error"]}
    out = {"busy": n, "busy_latency_ms": loaded["latency_ms"], "busy_latency_max_ms": loaded.get("latency_max_ms"),
           "busy_times_ms": loaded.get("times_ms"), "busy_minor_faults_per_step": loaded.get("minor_faults_per_step"),
           "busy_involuntary_switches_per_step": loaded.get("involuntary_switches_per_step")}
    if "error" not in quiet:
        out["busy_slowdown"] = loaded["latency_ms"] / quiet["latency_ms"]
    return out


def model_macs(job: dict) -> int | None:
    """Multiply-adds of one image through the case's model (meta device; see integrations.flops)."""
    try:
        from ..integrations.flops import measure_factory
        from .case import build_model
    except ImportError:  # pragma: no cover - optional module
        return None
    try:
        return measure_factory(lambda device: build_model(job, device), tuple(job["size"]), include_position_bias=False).macs
    except Exception:  # the case itself reports why its model cannot run; the count is only left out
        return None


# ----------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    if args.case is not None:
        from .case import run_case

        print(json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0
    if not args.variants and not args.peers:
        raise ValueError("nothing to run: give --variants and/or --peers")
    backends = resolve_backends(args.backends, args.device, with_reference=not args.no_reference)
    check_peers(args.peers)
    check_preset(args.preset)
    cases = make_cases(args, backends)
    env = environment(args)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    from .case import matmul_rate

    rates = []
    if not args.no_matmul_rate:
        log("measuring the fp32 matmul rate ...")
        rates.append(matmul_rate(args.device, args.threads))
        env["matmul_gflops"] = rates[0]
    log("counting multiply-adds ...")
    macs: dict[tuple, int | None] = {}
    for case in cases:
        key = (case["family"], case["model"], tuple(case["size"]))
        if key not in macs:
            macs[key] = model_macs(case)
    best: dict[int, dict] = {}
    for r in range(args.rounds):
        for i, case in enumerate(cases):
            log(f"[round {r + 1}/{args.rounds}] case {i + 1}/{len(cases)}: {label(case)} ...")
            res = dict(case, **run_subprocess(case, args.timeout))
            if args.busy:
                log(f"[round {r + 1}/{args.rounds}] case {i + 1}/{len(cases)}: {label(case)} beside {args.busy} busy "
                    f"process(es) ...")
                with busy_processes(args.busy, args.timeout + 30):
                    loaded = run_subprocess(case, args.timeout)
                res.update(_busy_fields(res, loaded, args.busy))
            if "error" not in res and not case["device"].startswith("cuda") and not args.no_memory_run:
                mem = run_subprocess(dict(case, phase="memory"), args.timeout, {"MALLOC_MMAP_THRESHOLD_": "262144"})
                res["peak_default_mb"] = res["peak_mb"]
                res["peak_mb"] = mem.get("peak_mb")
                res["steady_peak_mb"] = mem.get("steady_peak_mb")
                if "error" in mem:
                    res["memory_error"] = mem["error"]
            if i not in best or _better(res, best[i]):
                best[i] = res
    results = [best[i] for i in range(len(cases))]
    if rates:  # again at the end: the best of the two is the machine's rate (a busy moment only lowers it)
        rates.append(matmul_rate(args.device, args.threads))
        env["matmul_gflops"] = max(rates)
        env["matmul_gflops_runs"] = rates
    for res in results:
        res.pop("fixed_input", None)
        mac = macs.get((res["family"], res["model"], tuple(res["size"])))
        if mac:
            res["macs_per_image"] = mac
            res["flops_per_image"] = 2.0 * mac
            if res.get("images_per_s"):
                res["gflops_per_s"] = 2.0 * mac * (3 if res["mode"] == "train" else 1) * res["images_per_s"] / 1e9
                if env.get("matmul_gflops"):
                    res["matmul_fraction"] = res["gflops_per_s"] / env["matmul_gflops"]
    add_reference_ratios(results)
    add_peer_ratios(results)
    env["busy"] = args.busy
    env["load_after"] = _loadavg()
    env["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    print(format_table(results, env, markdown=args.markdown))
    peer_table = format_peer_table(results, markdown=args.markdown)
    if peer_table:
        print("\n" + peer_table)
    report = {"environment": env, "command": command_line(args), "results": results}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        log(f"wrote {args.output}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        if plot(results, args.plot):
            log(f"wrote {args.plot}")
        else:
            log("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if all("error" not in r for r in results) else 1


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (outputs left out)."""
    parts = ["transnext benchmark", "--variants", *args.variants, "--sizes", *map(format_size, args.sizes),
             "--batch-sizes", *map(str, args.batch_sizes), "--modes", *args.modes]
    if args.backends:
        parts += ["--backends", *args.backends]
    if args.no_reference:
        parts.append("--no-reference")
    if args.peers:
        parts += ["--peers", *args.peers]
    if args.features:
        parts.append("--features")
    if args.preset:
        parts += ["--preset", args.preset]
    if args.compile:
        parts.append("--compile")
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
    if args.busy:
        parts += ["--busy", str(args.busy)]
    return " ".join(parts)


def environment(args: argparse.Namespace) -> dict[str, Any]:
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
        "features": bool(args.features),
        "preset": args.preset,
        "peers": list(args.peers),
        "load_before": _loadavg(),
        "memory_measure": "CUDA allocator max_memory_allocated minus allocated after build" if args.device.startswith("cuda")
        else "peak RSS (VmHWM) minus RSS after build + one tiny no-grad forward, fresh process per case"
        + ("" if args.no_memory_run else ", two steps with MALLOC_MMAP_THRESHOLD_=262144 (default-malloc RSS peak "
           "of the timing process in peak_default_mb)"),
        "timing": f"median of {args.repeats} after {args.warmup} warm-up iterations; best of {args.rounds} round(s)"
        + (f"; each case also timed beside {args.busy} busy-looping process(es) (loaded x quiet = busy_slowdown)"
           if args.busy else "")
        + ("; compiled cases: the first (compiling) call is timed apart (compile_s); their memory counts from after it "
           "(compiler's resident memory in compile_resident_mb)" if args.compile else ""),
        "flop_convention": FLOP_CONVENTION,
    }
    if args.peers:
        try:
            import timm

            env["timm"] = timm.__version__
        except ImportError:  # pragma: no cover - checked before
            pass
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
