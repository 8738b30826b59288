"""Every ops backend against the reference unfold formulation: outputs and all input gradients.

float64 comparisons use the project's parity metric (max abs diff <= 1e-6 * max abs reference).
Under bf16 autocast the reference itself is only bf16-accurate, so both are compared with the
float64 result: ERR_BF16 = 3e-2 relative (bf16 has 8 mantissa bits, ~4e-3 per rounding).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings

import pytest
import torch

import transnext
from transnext import ops
from transnext.models.geometry import local_window_tables

TOL = 1e-6
ERR_BF16 = 3e-2

BACKENDS = ["torch"]
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in ops.available_backends("cpu"):
    BACKENDS.append("triton")

AA_INPUTS = ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "temperature", "local_bias", "pool_bias",
             "learnable_tokens", "learnable_bias")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    err = (ours - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3e}, rel {rel(ours, ref):.3e}"


def aa_inputs(B, h, size, d, pool, window=3, dtype=torch.float64, seed=0, token_major=True):
    """Random inputs in the layouts the model passes (views of token-major projections)."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    N, Np, L = H * W, pool[0] * pool[1], window * window

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if token_major:
        q = rnd(B, N, h, d).transpose(1, 2)
        kv = rnd(B, N, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        q, k, v = rnd(B, h, N, d), rnd(B, h, N, d), rnd(B, h, N, d)
    count, mask = local_window_tables(size, window)
    t = dict(
        q=q, k=k, v=v, k_pool=rnd(B, h, Np, d), v_pool=rnd(B, h, Np, d),
        query_embedding=rnd(h, 1, d, scale=0.1), temperature=rnd(h, 1, 1, scale=0.3) + math.log(math.expm1(1 / 0.24)),
        local_bias=rnd(h, L, scale=0.5), pool_bias=rnd(h, N, Np, scale=0.5),
        learnable_tokens=rnd(h, d, L, scale=0.2), learnable_bias=rnd(h, 1, L, scale=0.2),
    )
    extra = dict(length_scale=torch.log(count + Np).unsqueeze(-1).to(dtype), padding_mask=mask, size=size, window=window)
    return t, extra


def run_aa(backend, t, extra, grad_out=None, attn_drop=0.0, training=False):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    out = ops.aggregated_attention(
        leaves["q"], leaves["k"], leaves["v"], leaves["k_pool"], leaves["v_pool"], leaves["query_embedding"],
        leaves["temperature"], extra["length_scale"], leaves["local_bias"], leaves["pool_bias"],
        leaves["learnable_tokens"], leaves["learnable_bias"], extra["padding_mask"], extra["size"], extra["window"],
        attn_drop, training, backend,
    )
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, [leaves[k] for k in AA_INPUTS], grad_out)
    return out, dict(zip(AA_INPUTS, grads))


CASES = [
    # (B, h, (H, W), d, pool): odd, non-square, tiny, linear-mode-like pooled grids
    (2, 2, (7, 11), 8, (3, 5)),
    (1, 3, (13, 5), 6, (2, 1)),
    (2, 1, (4, 4), 5, (2, 2)),
    (1, 2, (1, 6), 4, (1, 3)),
    (2, 2, (9, 9), 8, (7, 7)),  # fixed pool size 7 (linear mode) on a small map
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}_{c[2][0]}x{c[2][1]}_d{c[3]}_p{c[4][0]}x{c[4][1]}")
def test_aggregated_attention_float64_outputs_and_gradients(backend, case) -> None:
    B, h, size, d, pool = case
    t, extra = aa_inputs(B, h, size, d, pool)
    g = torch.randn(B, h, size[0] * size[1], d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    out, grads = run_aa(backend, t, extra, g)
    assert_close(out, ref_out, "output")
    for name in AA_INPUTS:
        assert_close(grads[name], ref_grads[name], f"grad of {name}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")
def test_triton_with_cuda_block_sizes_7x11(monkeypatch) -> None:
    """The kernels at the query block size used on CUDA (not only the interpreter's smaller one)."""
    triton_backend = importlib.import_module("transnext.ops.triton_backend")
    monkeypatch.setattr(triton_backend, "INTERPRETER_BLOCK_N", triton_backend.CUDA_BLOCK_N)
    B, h, size, d, pool = CASES[0]
    t, extra = aa_inputs(B, h, size, d, pool)
    g = torch.randn(B, h, size[0] * size[1], d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    out, grads = run_aa("triton", t, extra, g)
    assert_close(out, ref_out, "output")
    for name in AA_INPUTS:
        assert_close(grads[name], ref_grads[name], f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregated_attention_head_major_inputs_and_window_5(backend) -> None:
    """Layout independence (contiguous (B, h, N, d) inputs) and a larger window."""
    t, extra = aa_inputs(1, 2, (6, 7), 4, (2, 3), window=5, token_major=False)
    g = torch.randn(1, 2, 42, 4, dtype=torch.float64)
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    out, grads = run_aa(backend, t, extra, g)
    assert_close(out, ref_out, "output")
    for name in AA_INPUTS:
        assert_close(grads[name], ref_grads[name], f"grad of {name}")


def test_aggregated_attention_zero_query_uses_normalize_clamp() -> None:
    """A zero query/key row takes F.normalize's eps branch; gradients must match there too."""
    t, extra = aa_inputs(1, 2, (5, 6), 4, (2, 2))
    t["q"] = t["q"].clone()
    t["q"][:, :, 3] = 0
    t["k"] = t["k"].clone()
    t["k"][:, :, 7] = 0
    g = torch.randn(1, 2, 30, 4, dtype=torch.float64)
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    out, grads = run_aa("torch", t, extra, g)
    assert_close(out, ref_out, "output")
    for name in AA_INPUTS:
        assert_close(grads[name], ref_grads[name], f"grad of {name}")


def test_aggregated_attention_dropout_keeps_expectation() -> None:
    """Dropout on the attention probabilities: identity at eval, unbiased in training."""
    t, extra = aa_inputs(1, 2, (6, 6), 4, (2, 2))
    ref, _ = run_aa("reference", t, extra)
    out_eval, _ = run_aa("torch", t, extra, attn_drop=0.5, training=False)
    assert_close(out_eval, ref, "eval output")
    torch.manual_seed(0)
    outs = torch.stack([run_aa("torch", t, extra, attn_drop=0.3, training=True)[0] for _ in range(300)])
    assert not torch.allclose(outs[0], ref)
    assert rel(outs.mean(0), ref) < 0.1  # 300 samples: Monte-Carlo error ~0.03
    # Gradients flow through the saved mask: finite and of the right shape.
    _, grads = run_aa("torch", t, extra, torch.ones_like(ref), attn_drop=0.3, training=True)
    assert all(torch.isfinite(v).all() for v in grads.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregated_attention_bf16_autocast(backend) -> None:
    """Under bf16 autocast both the reference and the backend stay within ERR_BF16 of float64."""
    t64, extra64 = aa_inputs(2, 2, (7, 11), 8, (3, 5))
    g = torch.randn(2, 2, 77, 8, dtype=torch.float64)
    truth, truth_grads = run_aa("reference", t64, extra64, g)
    t32 = {k: v.float() for k, v in t64.items()}
    extra32 = dict(extra64, length_scale=extra64["length_scale"].float())
    for name in ("reference", backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = run_aa(name, t32, extra32, g.float())
        assert rel(out.double(), truth) < ERR_BF16, name
        for k in ("q", "k", "v", "v_pool", "learnable_tokens"):
            assert rel(grads[k].double(), truth_grads[k]) < ERR_BF16 * 3, (name, k)


def fa_inputs(B, h, N, d, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(s, generator=g, dtype=torch.float64) * scale

    return dict(q=rnd(B, h, N, d), k=rnd(B, h, N, d), v=rnd(B, h, N, d), query_embedding=rnd(h, 1, d, scale=0.1),
                temperature=rnd(h, 1, 1, scale=0.3) + 1.5, bias=rnd(h, N, N, scale=0.5))


def full_attention_by_backend(t: dict, g: torch.Tensor) -> dict:
    """{backend: (output, gradients of every input in t's order)} for reference and torch."""
    res = {}
    for backend in ("reference", "torch"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        out = ops.full_attention(leaves["q"], leaves["k"], leaves["v"], leaves["query_embedding"], leaves["temperature"],
                                 math.log(t["q"].shape[2]), leaves["bias"], 0.0, False, backend)
        res[backend] = (out, torch.autograd.grad(out, list(leaves.values()), g))
    return res


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_attention_matches_reference(dtype) -> None:
    t = {k: v.to(dtype) for k, v in fa_inputs(2, 3, 35, 8).items()}
    g = torch.randn(2, 3, 35, 8, dtype=dtype)
    res = full_attention_by_backend(t, g)
    tol = TOL if dtype == torch.float64 else 2e-5
    assert_close(res["torch"][0], res["reference"][0], "output", tol)
    for name, a, b in zip(t, res["torch"][1], res["reference"][1]):
        assert_close(a, b, f"grad of {name}", tol)


def test_full_attention_in_query_blocks(monkeypatch) -> None:
    """Large last-stage grids run in blocks of query rows: same outputs and gradients."""
    t = fa_inputs(2, 3, 35, 8)
    g = torch.randn(2, 3, 35, 8, dtype=torch.float64)
    with ops.policy(full_attention_block_bytes=2 * 3 * 35 * 8 * 4):  # 4 rows per block
        res = full_attention_by_backend(t, g)
    assert_close(res["torch"][0], res["reference"][0], "output")
    for name, a, b in zip(t, res["torch"][1], res["reference"][1]):
        assert_close(a, b, f"grad of {name}")


@pytest.mark.parametrize("block_rows", [None, 4])
def test_full_attention_inference_path(block_rows) -> None:
    """Without autograd the torch backend fills the bias into its logits buffer and works in place."""
    budget = {"full_attention_block_bytes": 2 * 3 * 35 * 8 * block_rows} if block_rows else {}
    t = fa_inputs(2, 3, 35, 8)
    args = (t["q"], t["k"], t["v"], t["query_embedding"], t["temperature"], math.log(35), t["bias"])
    with torch.no_grad(), ops.policy(**budget):
        ours = ops.full_attention(*args, 0.0, False, "torch")
        ref = ops.full_attention(*args, 0.0, False, "reference")
    assert_close(ours, ref, "output")


def glu_inputs(B, size, C, hid, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)

    def rnd(*s):
        return (torch.randn(s, generator=g, dtype=torch.float64) * 0.3).to(dtype)

    return [rnd(B, size[0] * size[1], C), rnd(2 * hid, C), rnd(2 * hid), rnd(hid, 1, 3, 3), rnd(hid), rnd(C, hid), rnd(C)]


@pytest.mark.parametrize("size", [(7, 11), (1, 5), (13, 5)])
def test_conv_glu_matches_plain(size) -> None:
    args = glu_inputs(2, size, 6, 10)
    g = torch.randn(2, size[0] * size[1], 6, dtype=torch.float64)
    outs = {}
    for backend in ("reference", "torch"):
        leaves = [a.clone().requires_grad_(True) for a in args]
        out = ops.conv_glu(*leaves, size, 0.0, False, backend)
        outs[backend] = (out, torch.autograd.grad(out, leaves, g))
        with torch.no_grad():  # the chunked no-grad path gives the same output
            assert_close(ops.conv_glu(*args, size, 0.0, False, backend), out.detach(), f"{backend} no-grad")
    assert_close(outs["torch"][0], outs["reference"][0], "output")
    for i, (a, b) in enumerate(zip(outs["torch"][1], outs["reference"][1])):
        assert_close(a, b, f"grad {i}")


def test_conv_glu_training_in_batch_chunks() -> None:
    """Forward and backward of the fused op in chunks of images (odd batch: last chunk of one)."""
    args = glu_inputs(5, (3, 4), 6, 10)
    g = torch.randn(5, 12, 6, dtype=torch.float64)
    outs = {}
    for backend in ("reference", "torch"):
        leaves = [a.clone().requires_grad_(True) for a in args]
        with ops.policy(min_chunk_tokens=8):
            out = ops.conv_glu(*leaves, (3, 4), 0.0, True, backend)
            outs[backend] = (out, torch.autograd.grad(out, leaves, g))
    assert_close(outs["torch"][0], outs["reference"][0], "output")
    for i, (a, b) in enumerate(zip(outs["torch"][1], outs["reference"][1])):
        assert_close(a, b, f"grad {i}")


def test_conv_glu_row_bands_equal_whole_image() -> None:
    """Inference in row bands (big images) carries halo rows for the 3x3 conv: same result."""
    common = importlib.import_module("transnext.ops._common")
    args = glu_inputs(2, (40, 9), 4, 6)
    with torch.no_grad(), ops.policy(min_chunk_tokens=8):
        assert len(common.inference_chunks(args[0], (40, 9), bands=True)) > 2
        out = ops.conv_glu(*args, (40, 9), 0.0, False, "torch")
        ref = ops.conv_glu(*args, (40, 9), 0.0, False, "reference")
    assert_close(out, ref, "banded output")


def test_sr_gelu_pool_matches_plain() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7 * 11, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 6, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    res = {}
    for backend in ("reference", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = ops.sr_gelu_pool(*leaves, (7, 11), (2, 3), backend)
        res[backend] = (out, torch.autograd.grad(out, leaves, cot))
    assert_close(res["torch"][0], res["reference"][0], "output")
    for name, a, c in zip("xwb", res["torch"][1], res["reference"][1]):
        assert_close(a, c, f"grad {name}")


def tiny_model(**kw):
    return transnext.TransNeXt(
        img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 2, 1),
        num_classes=5, **kw,
    )


@pytest.fixture
def small_chunks():
    """Inference chunks of 16 tokens: a small test input runs in several groups of images."""
    with ops.policy(min_chunk_tokens=16):
        yield


@pytest.mark.parametrize("fixed_pool_size", [None, 2])
def test_model_backends_agree_with_chunked_inference(small_chunks, fixed_pool_size) -> None:
    """Whole model, odd non-square input, batch chunked at inference: every backend equals reference."""
    torch.manual_seed(0)
    model = tiny_model(fixed_pool_size=fixed_pool_size).double().eval()
    x = torch.randn(5, 3, 75, 93, dtype=torch.float64)
    outs = {}
    for backend in ["reference", *BACKENDS]:
        ops.set_backend(model, backend)
        with torch.no_grad():
            outs[backend] = model(x)
    for backend in BACKENDS:
        assert_close(outs[backend], outs["reference"], f"{backend} logits")
        ops.set_backend(model, backend)
        with torch.inference_mode():  # inference tensors (no version counters) take the same path
            assert_close(model(x), outs["reference"], f"{backend} logits in inference mode")
            assert_close(model(x[:3]), outs["reference"][:3], f"{backend} logits, cached tables, other batch")


def test_model_training_gradients_agree_float64() -> None:
    torch.manual_seed(0)
    model = tiny_model().double().train()
    x = torch.randn(2, 3, 70, 66, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "torch"):
        ops.set_backend(model, backend)
        model.zero_grad()
        model(x).square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["reference"].items():
        assert_close(grads["torch"][n], g, f"grad of {n}")


def test_model_bf16_autocast_close_to_float64() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        truth = model.double()(x.double())
        model.float()
        for backend in ("reference", "torch"):
            ops.set_backend(model, backend)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            assert rel(out.double(), truth) < 5e-2, backend


def test_backend_resolution(monkeypatch) -> None:
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend(None, "cpu") == "torch"
    assert ops.resolve_backend("reference", "cuda") == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown attention backend"):
        ops.resolve_backend("cuda_magic", "cpu")
    assert set(ops.available_backends("cpu")) >= {"reference", "torch"}


def test_backend_choice_reaches_conv_glu_and_pooling(monkeypatch) -> None:
    """attn_backend= and set_attn_backend select the backend of every op, Conv-GLU and pooling included."""
    calls = []
    plain = importlib.import_module("transnext.ops.conv_glu")._plain
    monkeypatch.setattr(importlib.import_module("transnext.ops.conv_glu"), "_plain", lambda *a: calls.append(1) or plain(*a))
    model = tiny_model(attn_backend="reference").eval()
    assert {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")} == {"reference"}
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 5  # one plain Conv-GLU per block
    model.set_attn_backend("torch")
    assert {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")} == {"torch"}
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_fallbacks_warn_once(monkeypatch) -> None:
    dispatch = importlib.import_module("transnext.ops.dispatch")
    monkeypatch.setattr(dispatch, "triton_usable", lambda device_type: True)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="full_attention runs in the 'torch' backend instead of 'triton'"):
        assert ops.select_backend("full_attention", "triton", "cuda") == "torch"
    with pytest.warns(UserWarning, match="dropout"):
        assert ops.select_backend("aggregated_attention", "triton", "cuda", dropout=True) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same fallback again: silent
        assert ops.select_backend("full_attention", "triton", "cuda") == "torch"
        assert ops.select_backend("aggregated_attention", "triton", "cuda") == "triton"
        assert ops.select_backend("full_attention", "reference", "cpu", dropout=True, tracing=True) == "reference"


def test_functional_path_used_under_tracing() -> None:
    """Graph capture sees only standard ops (the custom Functions are bypassed) and stays exact."""
    t, extra = aa_inputs(1, 2, (5, 7), 4, (2, 2))
    torch_backend = importlib.import_module("transnext.ops.torch_backend")
    args = [t[k] for k in ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "temperature")]
    args += [extra["length_scale"], t["local_bias"], t["pool_bias"], t["learnable_tokens"], t["learnable_bias"],
             extra["padding_mask"], extra["size"], extra["window"]]
    ref = ops.aggregated_attention(*args, 0.0, False, "reference")
    functional = torch_backend.functional_aggregated_attention(
        ops.AttentionInputs(*args[:5]), ops.QueryScaling(args[5], args[6], args[7]),
        ops.WindowTerms(args[8], args[10], args[11], args[12]), args[9], ops.Geometry(args[13], args[14]))
    assert_close(functional, ref, "functional path")


def test_model_bf16_autocast_training_gradients() -> None:
    """Backward under bf16 autocast (all fused ops): gradients as close to float64 as the reference's."""
    torch.manual_seed(0)
    model = tiny_model().train()
    x = torch.randn(2, 3, 64, 64)
    model.double()
    model.zero_grad()
    model(x.double()).square().sum().backward()
    truth = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.float()
    errs = {}
    for backend in ("reference", "torch"):
        ops.set_backend(model, backend)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().sum()
        loss.backward()
        errs[backend] = {n: rel(p.grad.double(), truth[n]) for n, p in model.named_parameters() if truth[n].abs().max() > 0}
    for name in ("block1.0.mlp.fc1.weight", "block1.0.attn.q.weight", "block2.0.attn.sr.weight", "head.weight"):
        assert errs["torch"][name] < max(2 * errs["reference"][name], ERR_BF16), name


def test_token_maps_of_a_batch_of_one_stay_channels_last():
    """(1, N, C) tokens become a channels-last map view, so the depthwise and pooling convs neither
    copy them nor return a channel-first map that the gate product would then read strided."""
    conv_glu = importlib.import_module("transnext.ops.conv_glu")
    common = importlib.import_module("transnext.ops._common")
    x = torch.randn(1, 6 * 5, 16)
    m = common.tokens_to_map(x, (6, 5))  # the one helper Conv-GLU and the pooling branch use
    assert m.data_ptr() == x.data_ptr() and m.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m, x.transpose(1, 2).reshape(1, 16, 6, 5), rtol=0, atol=0)
    w = torch.randn(16, 1, 3, 3)
    out = conv_glu._dwconv(x, w, None, (6, 5))
    assert common.map_to_tokens(out).is_contiguous()
    expected = torch.nn.functional.conv2d(x.transpose(1, 2).reshape(1, 16, 6, 5).contiguous(), w, padding=1, groups=16)
    torch.testing.assert_close(out, expected)
