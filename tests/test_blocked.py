"""Blocked aggregated attention and the separable pooled-key bias against the reference, in float64.

Blocking must not change any value: outputs and every gradient (including the bias MLP's) are
compared with the reference unfold formulation on a whole tensor, with blocks of query rows that
split the grid unevenly, in both position-bias modes and in linear mode.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from test_ops import AA_INPUTS, CASES, aa_inputs, assert_close, run_aa, tiny_model
from transnext import ops
from transnext.models.geometry import StageGeometry, build_cpb_table
from transnext.models.position_bias import SeparableBias, axis_taps
from transnext.ops import native

torch_backend = importlib.import_module("transnext.ops.torch_backend")
transnext_module = importlib.import_module("transnext.models.transnext")


@pytest.mark.parametrize("block_elements", [1, 97, 1 << 20], ids=["row_by_row", "uneven", "one_block"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}_{c[2][0]}x{c[2][1]}_p{c[4][0]}x{c[4][1]}")
def test_blocked_op_matches_reference(case, block_elements) -> None:
    B, h, size, d, pool = case
    t, extra = aa_inputs(B, h, size, d, pool)
    g = torch.randn(B, h, size[0] * size[1], d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = run_aa("reference", t, extra, g)
    # Always the blocked path.
    with ops.policy(block_elements=block_elements, whole_logits_bytes=0, whole_logits_bytes_training=0):
        out, grads = run_aa("torch", t, extra, g)
    assert_close(out, ref_out, "output")
    for name in AA_INPUTS:
        assert_close(grads[name], ref_grads[name], f"grad of {name}")


def test_axis_taps_by_hand() -> None:
    index = torch.tensor([[0, 1], [2, 3]])
    idx, w = axis_taps(index, 2, 2, interpolate=False, dtype=torch.float64)
    assert idx.shape == (2, 2, 1) and torch.equal(idx[..., 0], index) and bool((w == 1).all())
    # Same size: bilinear resizing is the identity, merged into one tap of weight 1.
    idx, w = axis_taps(index, 2, 2, interpolate=True, dtype=torch.float64)
    assert idx.shape == (2, 2, 1) and torch.equal(idx[..., 0], index) and bool((w == 1).all())
    # Queries 2 -> 4 (keys unchanged): source rows (i + 0.5) / 2 - 0.5 = [0, 0.25, 0.75, 1] after clamping.
    idx, w = axis_taps(index, 4, 2, interpolate=True, dtype=torch.float64)
    dense = torch.zeros(4, 2, 4, dtype=torch.float64)
    dense.scatter_add_(-1, idx, w)
    expected = torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], dtype=torch.float64)
    for k in range(2):
        assert torch.allclose(dense[:, k, index[:, k]], expected)


GEOMETRIES = [
    # (actual grid, pooled grid, MLP grid for queries, keys, pretrain grid, interpolate)
    ((7, 11), (3, 5), (7, 11), (3, 5), (6, 6), False),
    ((13, 9), (4, 3), (8, 8), (2, 2), (8, 8), True),  # dense setting: bias resized from a trained grid
    ((10, 6), (3, 3), (5, 5), (3, 3), (4, 4), True),  # linear mode: fixed pool, query axes resized
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=["extrapolate", "interpolate", "interpolate_fixed_pool"])
def test_separable_bias_equals_whole_bias_and_its_gradient(geo) -> None:
    size, pool, query, key, pretrain, interpolate = geo
    torch.manual_seed(0)
    attn = transnext_module.AggregatedAttention(12, 3, sr_ratio=2).double()
    geom = StageGeometry(size=size, pool=pool, window=3, cpb=build_cpb_table(query, key, pretrain), interpolate=interpolate)
    weights = torch.randn(3, size[0] * size[1], pool[0] * pool[1], dtype=torch.float64)
    whole = attn._compute_position_bias(geom, torch.float64, torch.device("cpu"))
    grads_whole = torch.autograd.grad((whole * weights).sum(), attn.cpb_fc1.weight)
    table = attn._bias_table(geom, torch.float64, torch.device("cpu"))[0]
    sep = SeparableBias.from_mlp_table(table, *geom.bias_taps(torch.float64, torch.device("cpu")))
    assert sep.shape == whole.shape
    assert_close(sep.materialize(), whole, "separable bias")
    grads_sep = torch.autograd.grad((sep.materialize() * weights).sum(), attn.cpb_fc1.weight)
    assert_close(grads_sep[0], grads_whole[0], "bias MLP gradient")


@pytest.mark.parametrize("pos_bias,fixed_pool_size", [("extrapolate", None), ("interpolate", None), ("interpolate", 3)])
def test_model_with_factored_bias_and_blocks_matches_reference(request, pos_bias, fixed_pool_size) -> None:
    """Whole model: factored bias + blocked op (forced on a small input) equals the reference backend."""
    torch.manual_seed(0)
    model = tiny_model(pos_bias=pos_bias, fixed_pool_size=fixed_pool_size).double()
    x = torch.randn(2, 3, 75, 93, dtype=torch.float64)

    def run(backend):
        ops.set_backend(model, backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run("reference")
    budgets = ops.policy(aggregated_bias_bytes=0, aggregated_bias_bytes_training=0, whole_logits_bytes=0,
                         whole_logits_bytes_training=0, block_elements=300)
    budgets.__enter__()
    request.addfinalizer(lambda: budgets.__exit__(None, None, None))
    ops.set_backend(model, "torch")  # the reference formulation takes no factors: it gets the whole bias
    for grad in (False, True):  # the factors at inference and in training
        with torch.set_grad_enabled(grad):
            assert isinstance(model.block1[0].attn.position_bias(model.stage_geometry(0, (19, 24)), torch.float64,
                                                                 torch.device("cpu")), SeparableBias)
    out, grads = run("torch")
    assert_close(out, ref_out, "logits")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, f"grad of {n}")
    model.eval()
    with torch.no_grad():
        ops.set_backend(model, "reference")
        ref_eval = model(x)
        ops.set_backend(model, "torch")
        assert_close(model(x), ref_eval, "inference logits")


def test_custom_op_registration() -> None:
    """The op torch.compile sees: fake (shape) implementations and autograd registration agree with the real op."""
    t, extra = aa_inputs(1, 2, (5, 6), 4, (2, 3))
    sep = SeparableBias.from_dense(t["pool_bias"], extra["size"])
    args = (
        t["q"].contiguous().requires_grad_(), t["k"].contiguous(), t["v"].contiguous(), t["k_pool"], t["v_pool"],
        t["query_embedding"], torch.nn.functional.softplus(t["temperature"]), extra["length_scale"], t["local_bias"],
        sep.table.contiguous(), sep.y_index, sep.y_weight, t["learnable_tokens"], t["learnable_bias"],
        extra["padding_mask"], 5, 6, 3,
    )
    compiled = importlib.import_module("transnext.ops.compiled")
    for kernel in ("blocked_torch", "blocked_native"):
        if kernel == "blocked_native" and not native.supports(t["q"], 3):
            continue
        torch.library.opcheck(compiled._blocked_op, (*args, kernel, 1 << 20, 0),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    frozen = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    for kernel in ("whole", "blocked_torch"):  # the inference op runs whichever eager kernel dispatch chose
        torch.library.opcheck(compiled._attention_op, (*frozen, kernel, 1 << 20, 2048),
                              test_utils=("test_schema", "test_faketensor"))


def test_training_goes_in_blocks_past_the_training_budget(monkeypatch) -> None:
    """With gradients the blocked path (recomputing probabilities) takes over past the smaller
    training budget; inference of the same problem keeps the one-pass whole-tensor path."""
    calls = []
    dispatch = importlib.import_module("transnext.ops.dispatch")
    real = dispatch.blocked_aggregated_attention
    monkeypatch.setattr(dispatch, "blocked_aggregated_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    t, extra = aa_inputs(1, 2, (5, 6), 4, (2, 3))
    args = (t["q"], t["k"], t["v"], t["k_pool"], t["v_pool"], t["query_embedding"], t["temperature"],
            extra["length_scale"], t["local_bias"], t["pool_bias"], t["learnable_tokens"], t["learnable_bias"],
            extra["padding_mask"], extra["size"], 3)
    with ops.policy(whole_logits_bytes=1 << 30, whole_logits_bytes_training=0):
        with torch.no_grad():
            ref = ops.aggregated_attention(*args, backend="torch")
        assert calls == []
        q = t["q"].clone().requires_grad_()
        out = ops.aggregated_attention(q, *args[1:], backend="torch")
    assert calls == [1]
    assert_close(out.detach(), ref, "blocked training output")


def test_bias_mlp_matches_plain_layers(monkeypatch) -> None:
    """The chunked, recomputing bias MLP: values and every gradient equal the plain layers'."""
    gen = torch.Generator().manual_seed(3)
    coords = torch.randn(50, 2, dtype=torch.float64, generator=gen).requires_grad_()
    fc1, fc2 = torch.nn.Linear(2, 16).double(), torch.nn.Linear(16, 3).double()
    g = torch.randn(50, 3, dtype=torch.float64, generator=gen)
    params = [coords, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    ref = fc2(torch.relu(fc1(coords)))
    with ops.policy(bias_mlp_rows=7):  # uneven chunks of 50 pairs
        out = ops.bias_mlp(coords, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    assert_close(out, ref, "bias MLP output")
    for a, b, n in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), "c w1 b1 w2 b2".split()):
        assert_close(a, b, f"grad of {n}")


def test_model_trains_with_chunked_bias_mlp(monkeypatch) -> None:
    """A training step with the chunked bias MLP in every layer gives the plain layers' gradients."""
    torch.manual_seed(0)
    model = tiny_model(pos_bias="interpolate").double().train()
    x = torch.randn(2, 3, 64, 76, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads() -> dict:
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with ops.policy(bias_mlp_rows=1 << 30):
        ref = grads()
    calls = []
    real = ops.bias_mlp
    monkeypatch.setattr(ops, "bias_mlp", lambda *a: calls.append(1) or real(*a))
    with ops.policy(bias_mlp_rows=7):
        got = grads()
    assert calls, "the chunked bias MLP was not used"
    for n, g in ref.items():
        assert_close(got[n], g, f"grad of {n}")
