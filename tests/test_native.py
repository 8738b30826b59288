"""The native CPU kernel of the Aggregated Attention forward: against the reference backend in
float64 (outputs of the op and of whole models, both bias modes, grids that split the kernel's
query tiles unevenly), against the torch kernels in float32, routing, and its fallbacks."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import running_in_ci
from test_ops import aa_inputs, assert_close, run_aa, tiny_model
from transnext import ops
from transnext.models.geometry import StageGeometry, build_cpb_table
from transnext.models.position_bias import SeparableBias
from transnext.ops import native

transnext_module = importlib.import_module("transnext.models.transnext")


@pytest.fixture(autouse=True)
def _native_required(monkeypatch):
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    if not native.available(torch.float64) or not native.available(torch.float32):
        msg = f"the native kernel could not be built here: {native.build_error(torch.float64) or native.build_error()}"
        if running_in_ci():
            pytest.fail(f"{msg}; CI has a C compiler, so the native kernel must be tested there", pytrace=False)
        pytest.skip(msg)
    # The native kernel serves the blocked op; small problems take it too when the whole-tensor
    # budget is zero.
    with ops.policy(whole_logits_bytes=0):
        yield


def _count_native_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = native.aggregated_attention_forward
    monkeypatch.setattr(native, "aggregated_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# (B, h, (H, W), d, pool): W below, at and above the 4-query tile, pooled counts that are not a
# multiple of the vector length, head sizes of one, two and six vectors in float64.
CASES = [
    (2, 2, (7, 11), 8, (3, 5)),
    (1, 3, (13, 5), 4, (2, 1)),
    (1, 2, (1, 6), 24, (1, 3)),
    (2, 1, (9, 9), 8, (7, 7)),
    (1, 2, (6, 3), 16, (6, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}_{c[2][0]}x{c[2][1]}_d{c[3]}_p{c[4][0]}x{c[4][1]}")
def test_native_op_matches_reference_float64(monkeypatch, case) -> None:
    calls = _count_native_calls(monkeypatch)
    B, h, size, d, pool = case
    t, extra = aa_inputs(B, h, size, d, pool)
    ref, _ = run_aa("reference", t, extra)
    with torch.no_grad():
        out, _ = run_aa("torch", {k: v.detach() for k, v in t.items()}, extra)
    assert calls, "inference with a supported head size must run the native kernel"
    assert_close(out, ref, "native output")


GEOMETRIES = [
    # (actual grid, pooled grid, MLP grid for queries, keys, pretrain grid, interpolate)
    ((7, 11), (3, 5), (7, 11), (3, 5), (6, 6), False),
    ((13, 9), (4, 3), (8, 8), (2, 2), (8, 8), True),  # two taps per axis: the bias resized from a trained grid
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=["extrapolate", "interpolate"])
def test_native_op_with_separable_bias(monkeypatch, geo) -> None:
    """The kernel reads the bias from its factors (one or two taps per query row) as the reference
    reads the whole tensor."""
    calls = _count_native_calls(monkeypatch)
    size, pool, query, key, pretrain, interpolate = geo
    torch.manual_seed(0)
    attn = transnext_module.AggregatedAttention(12, 3, sr_ratio=2).double()
    geom = StageGeometry(size=size, pool=pool, window=3, cpb=build_cpb_table(query, key, pretrain), interpolate=interpolate)
    with torch.no_grad():
        table = attn._bias_table(geom, torch.float64, torch.device("cpu"))[0]
        sep = SeparableBias.from_mlp_table(table, *geom.bias_taps(torch.float64, torch.device("cpu")))
    t, extra = aa_inputs(2, 3, size, 4, pool)
    t["pool_bias"] = sep.materialize()
    ref, _ = run_aa("reference", t, extra)
    t["pool_bias"] = sep
    with torch.no_grad():
        out = ops.aggregated_attention(
            t["q"], t["k"], t["v"], t["k_pool"], t["v_pool"], t["query_embedding"], t["temperature"],
            extra["length_scale"], t["local_bias"], sep, t["learnable_tokens"], t["learnable_bias"],
            extra["padding_mask"], size, 3, backend="torch",
        )
    assert calls
    assert_close(out, ref, "native output, separable bias")


def test_native_float32_matches_torch_kernels(monkeypatch) -> None:
    t, extra = aa_inputs(2, 3, (11, 13), 24, (4, 5), dtype=torch.float32)
    with torch.no_grad():
        out, _ = run_aa("torch", t, extra)
        monkeypatch.setenv(native.ENV_VAR, "0")
        ref, _ = run_aa("torch", t, extra)
    assert out.dtype == torch.float32
    assert_close(out, ref, "native float32 output", tol=1e-5)


@pytest.mark.parametrize("fixed_pool_size", [None, 2])
def test_model_inference_native_equals_reference(monkeypatch, fixed_pool_size) -> None:
    """Whole model in float64 on an odd, non-square input: native kernel against the reference backend."""
    calls = _count_native_calls(monkeypatch)
    torch.manual_seed(0)
    model = tiny_model(fixed_pool_size=fixed_pool_size).double().eval()
    x = torch.randn(2, 3, 45, 71, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        model.set_attn_backend("reference")
        ref = model(x)
    assert calls
    assert_close(out, ref, "model output")


def _count_backward_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = native.aggregated_attention_backward
    monkeypatch.setattr(native, "aggregated_attention_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}_{c[2][0]}x{c[2][1]}_d{c[3]}_p{c[4][0]}x{c[4][1]}")
def test_native_backward_matches_reference_float64(monkeypatch, case) -> None:
    """With gradients the blocked op runs its forward and its backward natively: the output and
    every input gradient against the reference."""
    forward_calls = _count_native_calls(monkeypatch)
    calls = _count_backward_calls(monkeypatch)
    B, h, size, d, pool = case
    t, extra = aa_inputs(B, h, size, d, pool)
    g = torch.randn(B, h, size[0] * size[1], d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    with ops.policy(whole_logits_bytes_training=0):
        out, grads = run_aa("torch", t, extra, g)
    assert calls and forward_calls
    assert_close(out, ref_out, "output")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"grad of {name}")


@pytest.mark.parametrize("geo", GEOMETRIES, ids=["extrapolate", "interpolate"])
def test_native_backward_through_separable_bias(monkeypatch, geo) -> None:
    """Gradient into the bias MLP through the factors (one or two taps), and only the gradients
    that are wanted (keys and values frozen here)."""
    calls = _count_backward_calls(monkeypatch)
    size, pool, query, key, pretrain, interpolate = geo
    torch.manual_seed(0)
    attn = transnext_module.AggregatedAttention(12, 3, sr_ratio=2).double()
    geom = StageGeometry(size=size, pool=pool, window=3, cpb=build_cpb_table(query, key, pretrain), interpolate=interpolate)
    t, extra = aa_inputs(2, 3, size, 4, pool)
    q = t["q"].clone().requires_grad_()

    def run(backend, sep: bool):
        table = attn._bias_table(geom, torch.float64, torch.device("cpu"))[0]
        bias = SeparableBias.from_mlp_table(table, *geom.bias_taps(torch.float64, torch.device("cpu")))
        res = ops.aggregated_attention(
            q, t["k"], t["v"], t["k_pool"], t["v_pool"], t["query_embedding"], t["temperature"], extra["length_scale"],
            t["local_bias"], bias if sep else bias.materialize(), t["learnable_tokens"], t["learnable_bias"],
            extra["padding_mask"], size, 3, backend=backend)
        return torch.autograd.grad((res * res).sum(), [q, attn.cpb_fc1.weight, attn.cpb_fc2.bias])

    ref = run("reference", False)
    ours = run("torch", True)
    assert calls
    for name, a, b in zip(("q", "cpb_fc1.weight", "cpb_fc2.bias"), ours, ref):
        assert_close(a, b, f"grad of {name}")


def test_unsupported_head_size_and_switch_fall_back_to_torch(monkeypatch) -> None:
    calls = _count_native_calls(monkeypatch)
    t, extra = aa_inputs(1, 2, (5, 6), 6, (2, 3))  # 6 is not a multiple of 4 float64 lanes
    assert not native.supports(t["q"], 3)
    with torch.no_grad():
        run_aa("torch", t, extra)
    assert calls == []
    t, extra = aa_inputs(1, 2, (5, 6), 8, (2, 3))
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert not native.available(torch.float64)
    with torch.no_grad():
        out, _ = run_aa("torch", t, extra)
    assert calls == []
    ref, _ = run_aa("reference", t, extra)
    assert_close(out, ref, "torch kernels with the native kernel switched off")


def _fresh_state(monkeypatch, cache) -> None:
    for name, value in (("_libs", {}), ("_errors", {}), ("_info", {}), ("_warned", set()), ("_private_dir", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setenv("TRANSNEXT_CACHE_DIR", str(cache))


def test_failed_build_is_reported_and_falls_back(monkeypatch, tmp_path) -> None:
    """No usable compiler: available() is False with the reason (and one warning saying it), and
    the model still runs."""
    _fresh_state(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(native.NativeKernelWarning, match="no C compiler found.*TRANSNEXT_NATIVE=0"):
        assert not native.available(torch.float64)
    assert "no C compiler found" in native.build_error(torch.float64)
    with pytest.raises(RuntimeError, match="not available"):
        t, extra = aa_inputs(1, 1, (3, 3), 4, (1, 1))
        native.aggregated_attention_forward(
            t["q"], t["k_pool"], t["v_pool"], t["k"], t["v"], t["pool_bias"], torch.zeros(1, 1, 1, dtype=torch.int64),
            torch.ones(1, 1, 1), t["local_bias"], t["local_bias"], (3, 3), 3,
        )
    torch.manual_seed(0)
    model = tiny_model().double().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 40, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_build_is_cached_and_atomic(monkeypatch, tmp_path) -> None:
    """A fresh cache builds one library per element type, named by a hash, and its record (size,
    sha256, ABI) beside it; no partial files remain."""
    _fresh_state(monkeypatch, tmp_path)
    assert native.available(torch.float32)
    assert native.status()["origin"] == "built"
    files = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(files) == 2 and all(f.startswith("aggregated_attention_float_") for f in files), files
    (record,) = [f for f in files if f.endswith(".json")]
    (library,) = [f for f in files if f.endswith(".so")]
    assert json.loads((tmp_path / "native" / record).read_text())["library"] == library
    monkeypatch.setattr(native, "_libs", {})
    assert native.available(torch.float32)  # found in the cache, not rebuilt
    assert native.status()["origin"] == "cache"
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == files



@pytest.mark.parametrize("geo", GEOMETRIES, ids=["extrapolate", "interpolate"])
def test_native_bias_table_equals_torch_formulation(monkeypatch, geo) -> None:
    size, pool, query, key, pretrain, interpolate = geo
    torch.manual_seed(0)
    attn = transnext_module.AggregatedAttention(12, 3, sr_ratio=2).double()
    geom = StageGeometry(size=size, pool=pool, window=3, cpb=build_cpb_table(query, key, pretrain), interpolate=interpolate)
    taps = geom.bias_taps(torch.float64, torch.device("cpu"))
    with torch.no_grad():
        table = attn._bias_table(geom, torch.float64, torch.device("cpu"))[0]
        ours = SeparableBias.from_mlp_table(table, *taps)
        monkeypatch.setenv(native.ENV_VAR, "0")
        ref = SeparableBias.from_mlp_table(table, *taps)
    assert_close(ours.table, ref.table, "x-resolved bias table")
    with pytest.raises(ValueError, match="x taps index"):
        native.bias_table(table[:, :, :1], *taps[1])



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("uy,taps", [(1, 1), (5, 2), (8, 4), (13, 4), (17, 3)])
def test_native_bias_table_any_row_count_and_taps(dtype, uy, taps) -> None:
    """The kernel works on a vector of unique rows at a time: row counts off the vector length and
    any tap count give the gathered, weighted sum of the definition."""
    g = torch.Generator().manual_seed(uy * 10 + taps)
    h, ux, W, kw = 3, 11, 7, 5
    mlp = torch.randn(h, uy, ux, generator=g, dtype=dtype)
    ix = torch.randint(0, ux, (W, kw, taps), generator=g)
    wx = torch.rand(W, kw, taps, generator=g, dtype=dtype)
    expected = (mlp[:, :, ix] * wx).sum(-1).permute(1, 0, 2, 3)  # (uy, h, W, kw)
    assert_close(native.bias_table(mlp, ix, wx), expected, "bias table")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_pool_is_rebuilt_in_a_forked_child() -> None:
    """A forked child (data-loader workers) starts its own pool instead of queueing work for the
    parent's threads, which do not exist there."""
    native._executor(2).submit(int).result()  # the parent's pool exists and has idle threads
    pid = os.fork()
    if pid == 0:  # child: exit 0 when the pool runs work, killed by the alarm when it hangs
        signal.alarm(20)
        try:
            ok = native._executor(2).submit(int, "7").result() == 7
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


def _raw_problem(dtype: torch.dtype, B: int = 2, h: int = 3, size: tuple[int, int] = (9, 37), d: int = 8,
                 pool: tuple[int, int] = (3, 4), window: int = 3) -> tuple[list[torch.Tensor], tuple[int, int], int]:
    """Random prepared inputs of :func:`native.aggregated_attention_forward` (layouts of its
    docstring): enough work items (bands of query columns) for every thread."""
    g = torch.Generator().manual_seed(5)
    H, W = size
    r, L, P = window // 2, window * window, pool[0] * pool[1]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    y_index = torch.randint(0, 4, (H, pool[0], 1), generator=g)
    inputs = [rnd(B, h, H * W, d), rnd(B, h, P, d), rnd(B, h, P, d), rnd(B, h, H + 2 * r, W + 2 * r, d),
              rnd(B, h, H + 2 * r, W + 2 * r, d), rnd(4, h, W, pool[1]), y_index, torch.ones(H, pool[0], 1, dtype=dtype),
              rnd(h, H * W, L), rnd(B, h, H * W, L)]
    return inputs, size, window


def _all_kernels(dtype: torch.dtype, threads: int = 2) -> dict[str, torch.Tensor]:
    """Forward, backward and bias-table results of :func:`_raw_problem` with ``threads`` torch threads."""
    inputs, size, window = _raw_problem(dtype)
    g = torch.Generator().manual_seed(6)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {"out": native.aggregated_attention_forward(*inputs, size, window)}
        grads = native.aggregated_attention_backward(torch.randn(out["out"].shape, generator=g, dtype=dtype), *inputs, size,
                                                     window)
        out.update({k: v for k, v in grads.items() if v is not None})
        mlp = torch.randn(3, 13, 11, generator=g, dtype=dtype)
        out["bias_table"] = native.bias_table(mlp, torch.randint(0, 11, (7, 5, 2), generator=g),
                                              torch.rand(7, 5, 2, generator=g, dtype=dtype))
    finally:
        torch.set_num_threads(saved)
    return out


# Runs every kernel twice in a fresh process after torch's own threads have started, and reports
# the threads the process has (OS and Python) before and after, and the OpenMP runtimes mapped.
THREADS_SCRIPT = r"""
import json, os, sys, threading
import torch
sys.path.insert(0, TESTS)
from test_native import _all_kernels
from transnext import ops
from transnext.ops import native
torch.set_num_threads(2)
x = torch.randn(1 << 22)
for _ in range(3):
    x.exp().sum()  # an intra-op parallel torch op: its OpenMP team now exists
assert native.available(torch.float32)
before = len(os.listdir("/proc/self/task"))
for _ in range(2):
    _all_kernels(torch.float32)
print(json.dumps({
    "before": before, "after": len(os.listdir("/proc/self/task")), "python_threads": [t.name for t in threading.enumerate()],
    "status": native.status(torch.float32),
    "runtimes": sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line or "libomp" in line}),
}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_kernels_run_on_torchs_intra_op_threads(tmp_path) -> None:
    """Where torch's threads are an OpenMP team, the kernels run on that team: no thread of their
    own is started (the fallback pool used to start two beside torch's), and one OpenMP runtime
    (torch's) is mapped."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP here")
    env = dict(os.environ, TRANSNEXT_CACHE_DIR=str(tmp_path))
    env.pop(native.ENV_VAR, None)
    code = f"TESTS = {os.path.dirname(__file__)!r}\n" + THREADS_SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"]["threads"].startswith("torch's OpenMP threads"), res["status"]
    assert res["after"] == res["before"], res
    assert res["python_threads"] == ["MainThread"], res
    assert len(res["runtimes"]) == 1, res["runtimes"]
    assert "runs on torch's OpenMP threads" in native.describe()


def test_openmp_and_fallback_builds_give_identical_results(monkeypatch, tmp_path) -> None:
    """A build without OpenMP (torch on another parallel backend) runs the same ranges on its own
    threads: every output, the per-thread table gradients included, is bit for bit the same."""
    if "openmp" not in native.status(torch.float64).get("flags", "").lower():
        pytest.skip("the kernel is not built with OpenMP here")
    team = _all_kernels(torch.float64)
    _fresh_state(monkeypatch, tmp_path)
    monkeypatch.setattr(native, "_openmp_runtime", lambda: None)
    assert native.available(torch.float64)
    assert native.status(torch.float64)["threads"].startswith("own Python threads")
    assert "-fopenmp" not in native.status(torch.float64)["flags"]
    own = _all_kernels(torch.float64)
    assert team.keys() == own.keys()
    for name in team:
        assert torch.equal(team[name], own[name]), name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_run_in_a_forked_child_after_the_parent_used_its_threads() -> None:
    """Data-loader workers fork after the parent ran the kernels on torch's two threads and run
    with one thread (as torch's DataLoader sets them; GNU OpenMP, torch's own ops included, cannot
    start a team again in a forked child): there the kernels run on the calling thread, same results."""
    expected = _all_kernels(torch.float64)
    pid = os.fork()
    if pid == 0:  # child: exit 0 when the results agree, killed by the alarm when it hangs
        ok = False
        signal.alarm(60)
        try:
            got = _all_kernels(torch.float64, threads=1)
            ok = all(torch.allclose(got[k], expected[k], rtol=1e-12, atol=1e-12) for k in expected)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
