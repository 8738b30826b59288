"""ONNX export at a fixed input size, with an optional onnxruntime check.

TransNeXt's size-dependent tables (position-bias coordinates, padding masks, length scales) are
constants for one input size: the export bakes them in for ``input_size`` (the batch dimension can
stay dynamic). Export a separate file per resolution.

Two exporters are supported: ``"dynamo"`` (``torch.export`` based; needs the ``onnxscript``
package) and ``"torchscript"`` (the tracing exporter, deprecated by PyTorch but dependency-free).
``"auto"`` uses dynamo when onnxscript is installed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import atomic_write

__all__ = ["ExportResult", "export_onnx", "run_onnx"]

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    input_shape: tuple[int, int, int, int]
    max_abs_diff: float | None  # onnxruntime vs PyTorch on a random input (None: not checked)


def _pick_exporter(exporter: str) -> str:
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "auto":
        return "dynamo" if has_onnxscript else "torchscript"
    if exporter == "dynamo" and not has_onnxscript:
        raise ImportError("the dynamo ONNX exporter needs onnxscript: pip install 'transnext-pytorch[onnx]'")
    return exporter


def _check_torchscript_pooling(model: nn.Module, size: tuple[int, int]) -> None:
    """The torchscript exporter handles adaptive pooling only when the pooled grid divides the map."""
    if not (hasattr(model, "stage_grids") and hasattr(model, "stage_geometry")):
        return
    for i, grid in enumerate(model.stage_grids(size)[: getattr(model, "num_stages", 4)]):
        pool = model.stage_geometry(i, grid).pool
        if pool is not None and (grid[0] % pool[0] or grid[1] % pool[1]):
            raise ValueError(
                f"the torchscript exporter cannot export input {size[0]}x{size[1]}: stage {i + 1} pools its "
                f"{grid[0]}x{grid[1]} map to {pool[0]}x{pool[1]}, which does not divide it; use exporter='dynamo' "
                "(pip install onnxscript) or an input size whose stage maps divide evenly (e.g. 224, 256, 384)"
            )


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported model in onnxruntime (CPU) on ``x``."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checking an export needs onnxruntime: pip install 'transnext-pytorch[onnx]'") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return torch.from_numpy(out)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    exporter: str = "auto",
    opset: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (eval mode, float32) to ONNX for ``input_size`` = (H, W).

    Args:
        input_size: spatial size baked into the file (default: the model's ``img_size``).
        batch_size: batch of the example input (and of the file when ``dynamic_batch`` is off).
        dynamic_batch: keep the batch dimension symbolic: the file takes any batch size. The
            example batch is then at least 2 (a size-1 example would be baked in as a constant),
            and ``check`` runs the file at two batch sizes.
        exporter: ``"auto"``, ``"dynamo"`` or ``"torchscript"``.
        check: run the file in onnxruntime and compare with PyTorch; raises if the largest
            absolute difference exceeds ``atol`` times the output scale.
    """
    exporter = _pick_exporter(exporter)
    if dynamic_batch and exporter == "torchscript":
        raise ValueError(
            "dynamic_batch needs the dynamo exporter (pip install onnxscript); the torchscript exporter cannot "
            "keep adaptive pooling static with a symbolic batch"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if input_size is None:
        input_size = tuple(getattr(model, "img_size", (224, 224)))
    H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if hasattr(model, "check_input_size"):
        model.check_input_size((H, W))
    if exporter == "torchscript":
        _check_torchscript_pooling(model, (H, W))
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise TypeError(f"export a float32 model (got {param.dtype}); call model.float() first")
    was_training = model.training
    model.eval()
    in_chans = getattr(model, "in_chans", 3)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # torch.export specialises a dimension of size 1 to the constant 1, so a dynamic batch needs an
    # example of at least 2 (the file then accepts any batch, 1 included; checked below).
    trace_batch = max(batch_size, 2) if dynamic_batch else batch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(trace_batch, in_chans, H, W, generator=gen).to(param.device)
    diffs: list[float] = []

    def write(tmp: str) -> None:
        with torch.no_grad():
            expected = model(x)  # also builds the size tables, so the export sees them as constants
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            if exporter == "torchscript":
                torch.onnx.export(
                    model, (x,), tmp, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=opset or 17,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                )
            else:
                dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
                program = torch.onnx.export(
                    model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False,
                )
                program.save(tmp, external_data=False)
        if dynamic_batch:
            _check_dynamic_batch(Path(tmp))
        if check:
            diffs.append(_compare(Path(tmp), x, expected, atol))
            if dynamic_batch:  # another batch size the file must take
                other = x[:1]
                with torch.no_grad():
                    diffs.append(_compare(Path(tmp), other, model(other), atol))

    try:
        atomic_write(path, write)  # a failed export or check leaves no file (and an earlier one intact)
    finally:
        model.train(was_training)
    return ExportResult(path, exporter, (trace_batch, in_chans, H, W), max(diffs) if diffs else None)


def _compare(path: Path, x: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    """Largest absolute difference between onnxruntime and PyTorch on ``x``; raises beyond the tolerance."""
    got = run_onnx(path, x)
    diff = (got - expected.detach().cpu().float()).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    if not diff <= atol * scale:
        raise RuntimeError(f"the ONNX export: onnxruntime output at batch {x.shape[0]} differs from PyTorch by {diff:.3e} "
                           f"(tolerance {atol * scale:.1e})")
    return diff


def _check_dynamic_batch(path: Path) -> None:
    """Raise if the exported graph's input batch dimension came out as a constant."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - the checks by onnxruntime below still run the file at two batch sizes
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    dim = graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise RuntimeError(f"the ONNX export: the exporter fixed the batch dimension to {dim.dim_value} although dynamic_batch was "
                           "asked for; export without dynamic_batch, one file per batch size")
