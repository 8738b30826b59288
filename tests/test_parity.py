"""Float64 parity with the reference implementation (golden tensors in ../shared/reference)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transnext
from conftest import fill_deterministic, load_case, load_variants, reference_dir, rel_err, running_in_ci, seeded_randn
from transnext import ops
from transnext.models import TransNeXt
from transnext.models.geometry import StageGeometry, build_cpb_table
from transnext.models.transnext import AggregatedAttention, FullAttention

TOL = 1e-6
# Every backend: Triton kernels run on CPU only under the interpreter, which must be switched on
# before they are defined (test_parity_triton_backend_interpreted runs them in a fresh process).
BACKENDS = ["reference", "torch"]
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in ops.available_backends("cpu"):
    BACKENDS.append("triton")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    # Gradients that are zero in exact arithmetic (e.g. a per-head constant bias under softmax)
    # are rounding noise in the reference: the absolute floor covers them.
    err = (ours - ref).abs().max().item()
    assert err <= TOL * ref.abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3e}, rel {rel_err(ours, ref):.3e}"


def check_grads(module: torch.nn.Module, x: torch.Tensor, t: dict, prefix: str = "grad.") -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, t[prefix + name], f"grad of {name}")
    assert_close(x.grad, t["grad_input"], "grad of input")


def small_model(**kw) -> TransNeXt:
    _, meta = load_case("small_case")
    c = meta["config"]
    return TransNeXt(
        img_size=c["img_size"], embed_dims=c["embed_dims"], num_heads=c["num_heads"], mlp_ratios=c["mlp_ratios"],
        depths=c["depths"], sr_ratios=c["sr_ratios"], window_size=c["window_size"], num_classes=c["num_classes"], **kw,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_model_logits_and_gradients(backend: str) -> None:
    t, _ = load_case("small_case")
    model = small_model(attn_backend=backend).double().eval()
    model.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("sd.")})
    x = t["input"].clone().requires_grad_(True)
    logits = model(x)
    assert_close(logits, t["logits"], "logits")
    (logits * t["cotangent"]).sum().backward()
    check_grads(model, x, t)


def test_small_model_float32_matches_reference_float32_run() -> None:
    t, _ = load_case("small_case")
    model = small_model().eval()
    model.load_state_dict({k[3:]: v.float() for k, v in t.items() if k.startswith("sd.")})
    with torch.no_grad():
        logits = model(t["input"].float())
    assert rel_err(logits.double(), t["logits_f32"]) < 1e-5


def _layer_geometry(size, pool, window, pretrain=None) -> StageGeometry:
    key = pool if pool is not None else size
    return StageGeometry(size=size, pool=pool, window=window, cpb=build_cpb_table(size, key, pretrain or size))


@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregated_attention_layer(backend: str) -> None:
    t, meta = load_case("attention_case")
    c = meta["ctor"]
    H, W = c["input_resolution"]
    layer = AggregatedAttention(c["dim"], c["num_heads"], c["window_size"], c["sr_ratio"], attn_backend=backend)
    layer = layer.double().eval()
    layer.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("sd.")})
    geom = _layer_geometry((H, W), (H // c["sr_ratio"], W // c["sr_ratio"]), c["window_size"])
    # Size-dependent tables equal the reference buffers.
    assert torch.equal(geom.padding_mask(torch.device("cpu")), t["buffer.padding_mask"])
    assert_close(geom.length_scale(torch.float64, torch.device("cpu")), t["buffer.seq_length_scale"], "length scale")
    x = t["input"].clone().requires_grad_(True)
    out = layer(x, H, W, geom)
    assert_close(out, t["output"], "output")
    (out * t["cotangent"]).sum().backward()
    check_grads(layer, x, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_attention_layer(backend: str) -> None:
    t, meta = load_case("full_attention_case")
    c = meta["ctor"]
    H, W = c["input_resolution"]
    layer = FullAttention(c["dim"], c["num_heads"], attn_backend=backend).double().eval()
    layer.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("sd.")})
    geom = _layer_geometry((H, W), None, None)
    x = t["input"].clone().requires_grad_(True)
    out = layer(x, H, W, geom)
    assert_close(out, t["output"], "output")
    (out * t["cotangent"]).sum().backward()
    check_grads(layer, x, t)


@pytest.mark.parametrize("case", ["attention_case", "full_attention_case"])
def test_position_bias_equals_reference_table_gather(case: str) -> None:
    """Our separable table + gather gives the reference's unique-pair table + index exactly."""
    t, meta = load_case(case)
    c = meta["ctor"]
    H, W = c["input_resolution"]
    cls = AggregatedAttention if case == "attention_case" else FullAttention
    layer = (cls(c["dim"], c["num_heads"]) if cls is FullAttention else cls(c["dim"], c["num_heads"], 3, c["sr_ratio"]))
    layer = layer.double()
    layer.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("sd.")})
    pool = (H // c["sr_ratio"], W // c["sr_ratio"]) if "sr_ratio" in c else None
    geom = _layer_geometry((H, W), pool, 3)
    with torch.no_grad():
        ours = layer.position_bias(geom, torch.float64, torch.device("cpu"))
        table = layer.cpb_fc2(torch.relu(layer.cpb_fc1(t["relative_coords_table"])))
        ref = table.t()[:, t["relative_pos_index"]].reshape(ours.shape)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("mode", ["interp", "extrap"])
def test_dense_backbone_multiscale(mode: str) -> None:
    t, meta = load_case("multiscale_case")
    model = transnext.create_model(
        "transnext_tiny", num_classes=0, img_size=224, pretrain_size=224,
        pos_bias="interpolate" if mode == "interp" else "extrapolate",
    )
    fill_deterministic(model)  # head-less: the backbone has the same parameter names
    model = model.double().eval()
    with torch.no_grad():
        feats = model.forward_intermediates(t["input"], intermediates_only=True)
    for i, f in enumerate(feats):
        assert_close(f, t[f"{mode}.stage{i + 1}"], f"{mode} stage {i + 1}")


@pytest.mark.parametrize("name", ["transnext_micro", "transnext_tiny", "transnext_small", "transnext_base", "transnext_micro_AAAA"])
def test_state_dict_keys_shapes_and_order(name: str) -> None:
    ref = load_variants()[name]
    model = transnext.create_model(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert model.img_size == (ref["config"]["img_size"],) * 2


def test_fill_rule_reproduces_stored_small_weights() -> None:
    """Sanity check of the fill rule used for the dense case (weights not stored there)."""
    t, _ = load_case("small_case")
    model = small_model()
    fill_deterministic(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v.double(), t["sd." + k]), k


def test_extrapolate_equals_reference_model_built_at_input_size() -> None:
    """A model built for 64 and run at 96 equals a model whose img_size is 96 (classification reference
    semantics: tables for the actual grid, normalised by the pretrain grid)."""
    a = small_model().double().eval()
    b = TransNeXt(
        img_size=96, pretrain_size=64, embed_dims=a.embed_dims, num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
        depths=(1, 1, 2, 1), num_classes=10,
    ).double().eval()
    fill_deterministic(a)
    b.load_state_dict(a.state_dict())
    x = seeded_randn((1, 3, 96, 96), 3)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _run_triton_cases(selection: str, expected: int) -> None:
    reference_dir()  # no golden data: skip (fail under CI) here rather than in the child process
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "test_parity.py"), "-q", "-p", "no:cacheprovider",
           "-k", f"triton and ({selection}) and not interpreted"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"{expected} passed" in proc.stdout, proc.stdout[-2000:]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
not_nested = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already under the Triton interpreter")


@needs_triton
@not_nested
def test_parity_triton_layers_interpreted() -> None:
    """The golden layer cases with the Triton backend, its kernels interpreted on CPU."""
    _run_triton_cases("aggregated_attention_layer or full_attention_layer", 2)


@needs_triton
@not_nested
@pytest.mark.slow
def test_parity_triton_model_interpreted() -> None:
    """The golden whole-model case (logits and every gradient) with the Triton backend, interpreted."""
    _run_triton_cases("small_model_logits_and_gradients", 1)


@pytest.mark.parametrize("ci", ["true", "1", ""])
def test_missing_golden_data_fails_under_ci(ci: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import conftest

    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(conftest, "REFERENCE_DIR", tmp_path / "missing")
    assert running_in_ci() == bool(ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="golden reference data not found") as info:
        reference_dir()
    assert ("CI must provide it" in str(info.value)) == bool(ci)
