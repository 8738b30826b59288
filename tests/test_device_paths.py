"""The code that runs on CUDA keeps every tensor on the input's device and calls no CPU-only kernel.

No GPU is needed: the models run on the ``meta`` device (shapes and dtypes, no data) with the
attention backend ``auto`` picks on CUDA where Triton is absent (``torch``), under a dispatch mode
that sees every aten call. A call that mixes devices (a tensor created without ``device=`` meeting
the activations, the error CUDA raises as "Expected all tensors to be on the same device") fails
the test with the op's name, and so does a call of the native CPU kernel with non-CPU tensors.
Tables computed on the CPU and then moved to the device (position-bias geometry) are allowed: an
op whose inputs are all on one device is fine, and explicit copies are how tensors change device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import transnext
from transnext import ops
from transnext.ops import native

DEVICE = torch.device("meta")
# The ops through which a tensor legitimately changes device.
_TRANSFERS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.to.device,
              torch.ops.aten._copy_from.default, torch.ops.aten._copy_from_and_resize.default}


class DeviceCheck(TorchDispatchMode):
    """Records every aten call whose tensor inputs lie on more than one device (0-dim CPU tensors
    aside: CUDA takes those as scalars), outside the copies that move tensors between devices."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.refused: list[str] = []  # native kernel calls with non-CPU tensors (see the fixture)
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if func not in _TRANSFERS:
            devices = {t.device for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                self.mixed.append(f"{func} on {sorted(str(d) for d in devices)}")
        return func(*args, **kwargs)


@pytest.fixture
def checked(monkeypatch):
    """A :class:`DeviceCheck` with the native kernel's entry points refusing non-CPU tensors."""
    mode = DeviceCheck()
    refused = mode.refused

    def guard(name: str):
        real = getattr(native, name)

        def call(*args, **kwargs):
            devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if devices - {"cpu"}:
                refused.append(f"native.{name} called with {sorted(devices)} tensors")
                raise RuntimeError(refused[-1])
            return real(*args, **kwargs)
        return call

    for name in ("aggregated_attention_forward", "aggregated_attention_backward", "bias_table"):
        monkeypatch.setattr(native, name, guard(name))
    return mode


def _assert_clean(mode: DeviceCheck) -> None:
    assert mode.calls > 100, "the checked code did not run under the mode"
    assert not mode.refused, mode.refused
    assert not mode.mixed, f"{len(mode.mixed)} call(s) mixing devices, first: {mode.mixed[:5]}"


def _on_device(model: nn.Module) -> nn.Module:
    ops.set_backend(model, "torch")  # what auto picks on CUDA without Triton
    return model.to(DEVICE)


def _train_step(model: nn.Module, loss_of, x: torch.Tensor) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = loss_of(model(x))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_the_checker_catches_a_tensor_created_on_the_wrong_device(checked) -> None:
    """A planted bug: a forward that adds a tensor made without ``device=`` is reported by name."""

    class Planted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.ones(x.shape[-1])

    with checked, pytest.raises(RuntimeError, match="device"):  # the meta kernel refuses it, as CUDA's does
        Planted()(torch.zeros(2, 3, device=DEVICE))
    assert checked.mixed and "aten.add.Tensor" in checked.mixed[0] and "cpu" in checked.mixed[0]


def test_the_checker_catches_the_native_kernel_on_a_device_tensor(checked) -> None:
    x = torch.zeros(3, 2, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"native.bias_table called with \[.*'meta'\] tensors"):
        native.bias_table(x, torch.zeros(1, 1, 1, dtype=torch.int64), torch.ones(1, 1, 1))


def test_classifier_inference_and_training_step_stay_on_the_device(checked) -> None:
    x = torch.randn(2, 3, 64, 80, device=DEVICE)
    y = torch.randint(0, 10, (2,), device=DEVICE)
    infer = _on_device(transnext.create_model("transnext_micro", num_classes=10)).eval()
    with checked:
        with torch.inference_mode():
            out = infer(x)
        # a fresh model: one that ran under inference_mode at this size cannot train at it (its cached tables are
        # inference tensors), a separate defect of the model, not of devices
        _train_step(_on_device(transnext.create_model("transnext_micro", num_classes=10)),
                    lambda logits: F.cross_entropy(logits, y), x)
    assert out.device == DEVICE and out.shape == (2, 10)
    _assert_clean(checked)


def test_linear_mode_and_interpolated_bias_stay_on_the_device(checked) -> None:
    model = _on_device(transnext.create_model("transnext_micro", num_classes=10, fixed_pool_size=2, img_size=96,
                                              pretrain_size=64, pos_bias="interpolate"))
    x = torch.randn(1, 3, 96, 96, device=DEVICE)
    with checked:
        _train_step(model, lambda logits: logits.float().mean(), x)
    _assert_clean(checked)


def test_upernet_training_step_stays_on_the_device(checked) -> None:
    from transnext.dense import UPerNet, create_backbone

    model = _on_device(UPerNet(create_backbone("transnext_micro", task="upernet", drop_path_rate=0.1), num_classes=4, channels=32,
                               aux_channels=16))
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    target = torch.randint(0, 4, (2, 64, 64), device=DEVICE)
    with checked:
        _train_step(model, lambda out: F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target), x)
    _assert_clean(checked)


def test_mask_rcnn_trunk_training_step_stays_on_the_device(checked) -> None:
    """The Mask R-CNN trunk (preset mask_rcnn: bias from an 800 grid, interpolated) and its FPN at
    a non-square size; the detection heads are torchvision's."""
    from transnext.dense import create_fpn_backbone

    model = _on_device(create_fpn_backbone("transnext_micro", task="mask_rcnn", out_channels=32, drop_path_rate=0.1))
    x = torch.randn(1, 3, 96, 128, device=DEVICE)
    with checked:
        _train_step(model, lambda feats: sum(f.mean() for f in feats.values()), x)
    _assert_clean(checked)
