"""DINO on TransNeXt: deformable attention against its formula, the model's forward, losses and errors."""

from __future__ import annotations

import math

import pytest
import torch

from transnext.dense.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention


def _bilinear_by_hand(value_l: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of a [H, W, D] map at normalised (x, y), zeros outside (pixel centres at (i + 0.5) / size)."""
    height, width, dim = value_l.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(dim, dtype=value_l.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * value_l[yy, xx]
    return out


def _msda_by_hand(value, shapes, locations, weights) -> torch.Tensor:
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl, (hh, ww) in enumerate(shapes):
                    value_l = value[b, starts[lvl] : starts[lvl + 1], h].reshape(hh, ww, dim)
                    for p in range(points):
                        x, y = locations[b, q, h, lvl, p].tolist()
                        out[b, q, h] += weights[b, q, h, lvl, p] * _bilinear_by_hand(value_l, x, y)
    return out.reshape(batch, queries, heads * dim)


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4)], [(1, 1), (2, 9), (6, 3)]])
def test_deformable_attention_matches_per_point_formula_float64(shapes):
    torch.manual_seed(0)
    batch, heads, dim, queries, points = 2, 2, 3, 4, 3
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, dim, dtype=torch.float64)
    # Some locations fall outside [0, 1] on purpose: they must read zeros.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    got = multi_scale_deformable_attention(value, shapes, locations, weights)
    want = _msda_by_hand(value, shapes, locations, weights)
    assert got.shape == (batch, queries, heads * dim)
    assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()
    # The tensor form of the shapes gives the same result.
    got_t = multi_scale_deformable_attention(value, torch.tensor(shapes), locations, weights)
    assert torch.equal(got, got_t)


def test_deformable_attention_gradients_float64():
    torch.manual_seed(1)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    # Keep the points away from pixel-centre lines, where bilinear sampling is not differentiable.
    locations = (torch.rand(1, 3, 2, 2, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, s, w: multi_scale_deformable_attention(v, shapes, s, w), (value, locations, weights))


def test_deformable_attention_bad_inputs_are_named():
    value = torch.randn(1, 10, 2, 4)
    loc = torch.rand(1, 3, 2, 1, 2, 2)
    w = torch.rand(1, 3, 2, 1, 2)
    with pytest.raises(ValueError, match="value has 10 keys but spatial_shapes"):
        multi_scale_deformable_attention(value, [(3, 4)], loc, w)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        multi_scale_deformable_attention(value, [(2, 5)], loc, w[..., :1])
    with pytest.raises(ValueError, match="integer tensor of shape"):
        multi_scale_deformable_attention(value, torch.tensor([[2.0, 5.0]]), loc, w)
    with pytest.raises(ValueError, match="positive ints"):
        multi_scale_deformable_attention(value, [(0, 5)], loc, w)


def test_deformable_attention_module_init_residual_and_reference_boxes():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3, dropout=0.0).double()
    # Initial offsets: head k points at angle 2*pi*k/heads, scaled to the unit square, at 1..P steps.
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    assert torch.allclose(bias[1, 0, 2], torch.tensor([0.0, 3.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(bias[0, 1, 1], torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert attn.attention_weights.weight.abs().sum() == 0
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(2, 30, 16, dtype=torch.float64)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    ref2 = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    out = attn(query, value, reference_points=ref2, spatial_shapes=shapes)
    # Residual inside: with a zero output projection the query comes back.
    with torch.no_grad():
        attn.output_proj.weight.zero_()
        attn.output_proj.bias.zero_()
    assert torch.equal(attn(query, value, reference_points=ref2, spatial_shapes=shapes), query)
    assert out.shape == query.shape
    ref4 = torch.cat([ref2, torch.full_like(ref2, 0.3)], -1)
    assert attn(query, value, reference_points=ref4, spatial_shapes=shapes).shape == query.shape
    with pytest.raises(ValueError, match="last dimension must be 2"):
        attn(query, value, reference_points=ref4[..., :3], spatial_shapes=shapes)
    with pytest.raises(ValueError, match="built for 2"):
        attn(query, value, reference_points=ref2, spatial_shapes=shapes[:1])
