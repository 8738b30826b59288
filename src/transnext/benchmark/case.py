"""One benchmark case, inside its own fresh interpreter: build, warm up, time, measure memory.

A case is a JSON-able dict (see :func:`transnext.benchmark.runner.make_cases`); the parent
process starts ``python -m transnext.benchmark --case '<json>'`` and reads one JSON line back.
Nothing here is imported by the parent except :func:`build_model` (for counting multiply-adds
on the meta device) and :func:`matmul_rate`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------------------------- models
def build_model(job: dict[str, Any], device: str = "cpu"):
    """The model of a case, built exactly as the case runs it (``job["build"]`` holds the arguments).

    * ``family == "transnext"``: :func:`transnext.create_model`, or in features mode the dense
      backbone :func:`transnext.dense.create_backbone` (``task=None``: the preset's settings are
      already spelled out in ``build``), which returns the stage maps through
      ``forward_intermediates(intermediates_only=True)``.
    * ``family == "timm"``: ``timm.create_model(name, pretrained=False, **build)``
      (``features_only=True`` in features mode).
    """
    import torch

    kw = dict(job["build"])
    with torch.device(device):
        if job["family"] == "timm":
            import timm

            return timm.create_model(job["model"], pretrained=False, **kw)
        if job.get("features"):
            from ..dense import create_backbone

            return create_backbone(job["model"], task=None, **kw)
        from ..models import create_model

        return create_model(job["model"], **kw)


def _min_input_size(model) -> int:
    """Smallest square input of the TransNeXt in ``model`` (itself or the one a backbone wraps); 64 otherwise."""
    from ..models.transnext import TransNeXt

    for m in model.modules():
        if isinstance(m, TransNeXt) and hasattr(m, "min_input_size"):
            return m.min_input_size()
    return 64


# ----------------------------------------------------------------------------------------- memory probes
def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _usage() -> tuple[float, float, float]:
    """(minor page faults, involuntary context switches, CPU seconds) of this process so far
    (zeros where the platform has no getrusage)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return 0.0, 0.0, 0.0
    u = resource.getrusage(resource.RUSAGE_SELF)
    return float(u.ru_minflt), float(u.ru_nivcsw), u.ru_utime + u.ru_stime


# ----------------------------------------------------------------------------------------- matmul rate
def matmul_rate(device: str, threads: int) -> float:
    """fp32 matrix-multiply rate in GFLOP/s (2048^2 on CPU, 8192^2 on CUDA; best of 8)."""
    import torch

    dev = torch.device(device)
    saved = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        n = 2048 if dev.type == "cpu" else 8192
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        times = []
        for i in range(10):
            sync(dev)
            t = time.perf_counter()
            a @ b
            sync(dev)
            if i >= 2:
                times.append(time.perf_counter() - t)
        return 2 * n**3 / min(times) / 1e9
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------- the case
def _load_kernels(model, job: dict, dev, autocast) -> None:
    """One tiny no-grad forward, so that the memory baseline already holds the library's state.

    Models that only accept their built size (timm models with a fixed input size, built at the
    benchmarked size) get the same common operators on small tensors instead: a forward at full
    size here would leave freed blocks resident and hide part of the step's peak.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), autocast():
        if job.get("fixed_input"):
            x = torch.randn(1, 32, 16, 16, device=dev)
            w = torch.randn(32, 32, 3, 3, device=dev)
            y = F.gelu(F.conv2d(x, w, padding=1)).flatten(2).transpose(1, 2)
            y = F.layer_norm(F.linear(y, torch.randn(32, 32, device=dev)), (32,))
            q = y.reshape(1, 256, 2, 16).transpose(1, 2)
            F.scaled_dot_product_attention(q, q, q).softmax(-1)
            return
        tiny = _min_input_size(model)
        model.eval()(torch.zeros(1, 3, tiny, tiny, device=dev))


def _scalar_of(out):
    """Loss of a features-mode training step: the sum of the feature maps' means."""
    maps = out.values() if isinstance(out, dict) else out
    return sum(m.float().mean() for m in maps)


def run_case(job: dict[str, Any]) -> dict[str, Any]:
    """Time one case (or, with ``phase == "memory"``, only measure its peak memory)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    dev = torch.device(job["device"])
    if dev.type == "cpu":
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = build_model(job).to(dev)
    if job["family"] == "transnext":
        from .. import ops

        ops.set_backend(model, job["backend"])
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[job["dtype"]]

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=amp)

    B, (H, W) = job["batch"], job["size"]
    _load_kernels(model, job, dev, autocast)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = rss_mb()
        reset = reset_peak_rss()

    # Compiled cases compile the module (its forward, and the backward through AOTAutograd); the
    # loss and the optimizer step stay eager, as in a typical training loop.
    net = torch.compile(model) if job.get("compile") else model
    x = torch.randn(B, 3, H, W, device=dev)
    features = bool(job.get("features"))
    if job["mode"] == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                net(x)
    else:
        model.train()
        y = None if features else torch.randint(0, getattr(model, "num_classes", 1000) or 1000, (B,), device=dev)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = net(x)
                loss = _scalar_of(out) if features else F.cross_entropy(out, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def peak_now() -> float:
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated(dev) / 2**20 - base
        return peak_rss_mb() - base

    def reset_peak() -> None:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            reset_peak_rss()

    def memory_now() -> float:
        return torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss_mb()

    compile_s = compile_resident = None
    if job.get("compile"):
        # The first call compiles (and runs once); its time is reported on its own. What the
        # compiler leaves resident (generated code, graphs, caches) is not the step's memory: the
        # baseline moves to after the compile call, with gradients released and the optimizer
        # state (which eager cases count) left in the measured part.
        t = time.perf_counter()
        step()
        sync(dev)
        compile_s = time.perf_counter() - t
        state_mb = 0.0
        if job["mode"] == "train":
            opt.zero_grad(set_to_none=True)
            state_mb = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                           if torch.is_tensor(v)) / 2**20
        after = memory_now()
        compile_resident = after - base - state_mb
        base = after - state_mb
        reset_peak()

    if job.get("phase") == "memory":
        # Eager: step 1 includes one-time work (position-bias tables of a new size, optimizer
        # state); step 2 alone is the steady state.
        step()
        sync(dev)
        first = peak_now()
        reset_peak()
        step()
        sync(dev)
        steady = peak_now()
        return {"peak_mb": max(first, steady), "steady_peak_mb": steady}

    for _ in range(job["warmup"]):
        step()
    sync(dev)
    times = []
    # Page faults per step: a steady-state step that reuses its memory faults few pages in; one
    # whose large temporaries are unmapped when freed faults them in again every step. Involuntary
    # context switches: how often the step's threads lost their core (a busy machine).
    usage0 = _usage()
    for _ in range(max(1, job["repeats"])):
        t = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t)
    usage1 = _usage()
    steps = len(times)
    faults, switches, cpu = ((b - a) / steps for a, b in zip(usage0, usage1))
    med = statistics.median(times)
    res = {
        "latency_ms": med * 1e3,
        "latency_min_ms": min(times) * 1e3,
        "latency_max_ms": max(times) * 1e3,
        "times_ms": [round(t * 1e3, 1) for t in times],
        "minor_faults_per_step": faults,
        "involuntary_switches_per_step": switches,
        "cpu_s_per_step": cpu,
        "images_per_s": B / med,
        "peak_mb": peak_now(),
        "peak_reset": dev.type == "cuda" or reset,
        "base_mb": base,
    }
    if compile_s is not None:
        res["compile_s"] = compile_s
        res["compile_resident_mb"] = compile_resident
    return res
