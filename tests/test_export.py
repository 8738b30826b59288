"""torch.compile and ONNX export (onnxruntime) match eager PyTorch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import fill_deterministic
from transnext.models import TransNeXt

SMALL = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 2, 1))


def small_model(**kw) -> TransNeXt:
    model = TransNeXt(img_size=64, num_classes=10, **SMALL, **kw)
    fill_deterministic(model)
    return model.eval()


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _compile_matches_eager(backend: str, **model_kw) -> float:
    torch._dynamo.reset()
    model = small_model(**model_kw)
    x = _input(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend=backend)
        out = compiled(x)
        again = compiled(x)  # cached graph, cached tables
    assert torch.equal(out, again)
    return (out - ref).abs().max().item()


def test_compile_matches_eager_aot_eager() -> None:
    assert _compile_matches_eager("aot_eager") <= 1e-5


def test_compile_single_graph() -> None:
    torch._dynamo.reset()
    model = small_model()
    x = _input(1, 3, 64, 64)
    with torch.no_grad():
        model(x)  # tables built eagerly, as in any warm model
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons[:3]]


@pytest.mark.parametrize("train", [False, True])
def test_compile_cold_tables_one_break(train: bool) -> None:
    """A fresh model (no table built yet) breaks the graph once, before the first tensor op, not
    once per stage: per-stage breaks recompiled the resume frames with dynamic shapes, which
    inductor then failed to compile (training step of transnext_tiny)."""
    torch._dynamo.reset()
    model = small_model().train(train)
    x = _input(2, 3, 64, 64)
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(model)(x)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count <= 1, reasons


def _compiled_graph_ops(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> set[str]:
    """Names of the ops in the graph torch.compile captures for ``model(x)``."""
    seen: set[str] = set()

    def backend(gm: torch.fx.GraphModule, _inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend)(x)
    return seen


def test_compile_keeps_eager_kernels() -> None:
    """Inference under the compiler runs the eager kernels as custom ops; training the blocked op."""
    model = small_model()
    x = _input(2, 3, 64, 64)
    infer = _compiled_graph_ops(model, x, grad=False)
    for op in ("aggregated_attention_inference", "conv_glu_inference", "sr_gelu_pool_inference"):
        assert any(op in t for t in infer), (op, sorted(infer))
    train = _compiled_graph_ops(model.train(), x, grad=True)
    assert any("blocked_aggregated_attention" in t for t in train), sorted(train)
    assert any("conv_glu_train" in t for t in train), sorted(train)
    assert not any("_inference" in t for t in train), sorted(train)


def test_inference_custom_ops_registration() -> None:
    """Schemas and fake (shape) implementations of the inference ops agree with the real ops."""
    from transnext.ops import compiled

    model = small_model()
    blk = model.block1[0]
    attn, mlp = blk.attn, blk.mlp
    H = W = 16
    x = _input(2, H * W, 16)
    torch.library.opcheck(compiled._pool_op, (x, attn.sr.weight.detach(), attn.sr.bias.detach(), H, W, 4, 4),
                          test_utils=("test_schema", "test_faketensor"))
    w = [t.detach() for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.dwconv.weight, mlp.dwconv.dwconv.bias,
                              mlp.fc2.weight, mlp.fc2.bias)]
    torch.library.opcheck(compiled._conv_glu_op, (x, *w, H, W), test_utils=("test_schema", "test_faketensor"))
    w = [t.requires_grad_() for t in w]
    torch.library.opcheck(compiled._conv_glu_train_op, (x.clone().requires_grad_(), *w, H, W),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, gate, value = compiled._conv_glu_train_op(x, *w, H, W)
    grad = torch.ones_like(out)
    backward_args = (grad, x, gate.detach(), value.detach(), w[0].detach(), w[2].detach(), w[3].detach(), w[4].detach(), H, W)
    torch.library.opcheck(compiled._conv_glu_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compile_interpolate_and_linear_modes() -> None:
    assert _compile_matches_eager("aot_eager", pos_bias="interpolate", fixed_pool_size=2) <= 1e-5


@pytest.mark.slow
def test_compile_training_step_matches_eager() -> None:
    torch._dynamo.reset()
    model = small_model().train()
    x = _input(2, 3, 64, 64)
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_compile_matches_eager_inductor() -> None:
    assert _compile_matches_eager("inductor") <= 1e-5


onnx_available = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
needs_onnx = pytest.mark.skipif(not onnx_available, reason="onnx and onnxruntime are not installed (extra: onnx)")
needs_onnxscript = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                      reason="the dynamo exporter needs onnxscript (extra: onnx)")


@needs_onnx
def test_onnx_torchscript_export_matches(tmp_path: Path) -> None:
    from transnext.integrations.onnx import export_onnx, run_onnx

    model = small_model()
    result = export_onnx(model, tmp_path / "m.onnx", (64, 64), batch_size=2, exporter="torchscript")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    x = _input(2, 3, 64, 64) * 2
    with torch.no_grad():
        ref = model(x)
    assert (run_onnx(result.path, x) - ref).abs().max().item() <= 1e-5
    import onnx

    onnx.checker.check_model(str(result.path))


@needs_onnx
@needs_onnxscript
def test_onnx_dynamo_export_dynamic_batch_any_size(tmp_path: Path) -> None:
    from transnext.integrations.onnx import export_onnx, run_onnx

    model = small_model(pos_bias="interpolate")
    # batch_size=1: a size-1 example used to be baked in as a constant (a batch of 2 then failed)
    result = export_onnx(model, tmp_path / "m.onnx", (64, 80), batch_size=1, dynamic_batch=True, exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_abs_diff <= 1e-5
    import onnx

    assert onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for batch in (1, 2, 3):
        x = _input(batch, 3, 64, 80)
        with torch.no_grad():
            ref = model(x)
        assert (run_onnx(result.path, x) - ref).abs().max().item() <= 1e-5, batch
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


@needs_onnx
def test_onnx_export_errors(tmp_path: Path) -> None:
    from transnext.integrations.onnx import export_onnx

    model = small_model()
    with pytest.raises(ValueError, match=r"cannot export input 64x80: stage 3 pools its 4x5 map to 2x2"):
        export_onnx(model, tmp_path / "a.onnx", (64, 80), exporter="torchscript")
    with pytest.raises(ValueError, match="dynamic_batch needs the dynamo exporter"):
        export_onnx(model, tmp_path / "b.onnx", (64, 64), dynamic_batch=True, exporter="torchscript")
    with pytest.raises(ValueError, match="too small"):
        export_onnx(model, tmp_path / "c.onnx", (16, 16), exporter="torchscript")
    with pytest.raises(TypeError, match="export a float32 model"):
        export_onnx(small_model().double(), tmp_path / "d.onnx", (64, 64), exporter="torchscript")
    assert not any(tmp_path.iterdir())


def _tiny_checkpoint(path: Path) -> tuple[Path, TransNeXt]:
    """A transnext checkpoint (model record included) of the small model above."""
    from transnext.engine.modeling import create_model_with_arch

    model = create_model_with_arch("transnext_micro", num_classes=10, img_size=64, model_kwargs=SMALL)
    fill_deterministic(model)
    torch.save({"model": model.state_dict(), "arch": model.arch, "classes": [str(i) for i in range(10)],
                "data_cfg": {"img_size": 64, "crop_pct": None, "interpolation": "bicubic"}}, path)
    return path, model.eval()


def test_export_cli_parses() -> None:
    from transnext.cli.main import build_parser

    args = build_parser().parse_args(["export", "onnx", "out.onnx", "--model", "transnext_tiny", "--pretrained",
                                      "--img-size", "256", "320", "--dynamic-batch", "--exporter", "dynamo", "--opset", "18"])
    assert (args.command, args.format, args.output, args.model, args.pretrained) == ("export", "onnx", "out.onnx", "transnext_tiny", True)
    assert args.img_size == [256, 320] and args.dynamic_batch and args.exporter == "dynamo" and args.opset == 18
    args = build_parser().parse_args(["export", "onnx", "m.onnx", "--checkpoint", "best.pth"])
    assert args.checkpoint == "best.pth" and args.img_size is None and not args.dynamic_batch and args.batch_size == 1


@needs_onnx
def test_export_cli_writes_checked_file(tmp_path: Path) -> None:
    from train_helpers import run_cli
    from transnext.integrations.onnx import run_onnx

    ckpt, model = _tiny_checkpoint(tmp_path / "best.pth")
    out = tmp_path / "model.onnx"
    r = run_cli("export", "onnx", str(out), "--checkpoint", str(ckpt), "--exporter", "torchscript", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "torchscript exporter; input 'pixel_values' 3x64x64, batch 2; onnxruntime matches PyTorch" in r.stdout, r.stdout
    x = _input(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert (run_onnx(out, x) - ref).abs().max().item() <= 1e-5
    # refusals: existing file, wrong suffix, no weights, torchscript with a dynamic batch
    r = run_cli("export", "onnx", str(out), "--checkpoint", str(ckpt))
    assert r.returncode == 1 and "exists; pass --force" in r.stderr
    r = run_cli("export", "onnx", str(tmp_path / "m.pth"), "--checkpoint", str(ckpt))
    assert r.returncode == 1 and "must end in .onnx" in r.stderr and "transnext convert" in r.stderr
    r = run_cli("export", "onnx", str(tmp_path / "a.onnx"), "--model", "transnext_micro")
    assert r.returncode == 1 and "no weights given: pass --checkpoint PATH, or --pretrained" in r.stderr
    r = run_cli("export", "onnx", str(tmp_path / "b.onnx"), "--checkpoint", str(ckpt), "--exporter", "torchscript", "--dynamic-batch")
    assert r.returncode == 1 and "--dynamic-batch needs the dynamo exporter (--exporter dynamo" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "model.onnx"]
