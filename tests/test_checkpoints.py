"""Checkpoint loading, saving and conversion: layouts, safety, strictness, errors, the hub path."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

import transnext
from conftest import fill_deterministic, seeded_randn
from hub_cache import make_offline_hub, populate_hub_cache
from transnext.checkpoints import (
    CheckpointError,
    checkpoint_filter_fn,
    convert_checkpoint,
    load_checkpoint,
    load_state_dict,
    save_state_dict,
)
from transnext.models import TransNeXt

SMALL = dict(img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
             depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_offline_hub(tmp_path, monkeypatch)


def small_model(num_classes: int = 5, fill: bool = True) -> TransNeXt:
    model = TransNeXt(num_classes=num_classes, **SMALL)
    if fill:
        fill_deterministic(model)
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "layout",
    ["bare", "model", "state_dict", "module_prefix", "training_checkpoint"],
)
def test_pth_layouts_round_trip(tmp_path: Path, layout: str) -> None:
    src = small_model()
    sd = src.state_dict()
    obj = {
        "bare": sd,
        "model": {"model": sd},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "module_prefix": {"module." + k: v for k, v in sd.items()},
        # what training scripts write: the model under 'model' plus plain metadata
        "training_checkpoint": {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 299,
                                "max_accuracy": 84.0, "args": argparse.Namespace(lr=1e-3, model="x")},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = small_model(fill=False)
    result = load_checkpoint(dst, path)
    assert result == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert_same_weights(src, dst)
    x = seeded_randn((1, 3, 64, 64), 0).float()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_safetensors_round_trip_and_conversion(tmp_path: Path) -> None:
    src = small_model()
    st = save_state_dict(src.state_dict(), tmp_path / "a.safetensors")
    pth = convert_checkpoint(st, tmp_path / "b.pth")
    st2 = convert_checkpoint(pth, tmp_path / "c.safetensors")
    for path in (st, pth, st2):
        dst = small_model(fill=False)
        load_checkpoint(dst, path)
        assert_same_weights(src, dst)
    # The .pth written is a bare state dict that plain torch.load(weights_only=True) reads.
    assert set(torch.load(pth, weights_only=True)) == set(src.state_dict())
    with pytest.raises(ValueError, match="same file"):
        convert_checkpoint(st, st)


def test_wrapped_checkpoint_converts_to_bare_safetensors(tmp_path: Path) -> None:
    src = small_model()
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, tmp_path / "w.pth")
    out = convert_checkpoint(tmp_path / "w.pth", tmp_path / "w.safetensors")
    assert set(load_state_dict(out)) == set(src.state_dict())


class _RunsCode:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    payload = _RunsCode()
    payload.marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": small_model().state_dict(), "extra": payload}, path)
    with pytest.raises(CheckpointError,
                       match=r"evil\.pth: refused to load: unpickling the file needs the Python object '\w+'.*can execute code"):
        load_checkpoint(small_model(fill=False), path)
    assert not payload.marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_error_names_the_file(tmp_path: Path, suffix: str) -> None:
    good = save_state_dict(small_model().state_dict(), tmp_path / f"good{suffix}")
    data = good.read_bytes()
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated{suffix}: not a readable .*\(truncated or corrupt\?\)"):
        load_checkpoint(small_model(fill=False), bad)


def test_garbage_empty_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match=r"garbage\.pth: not a readable PyTorch checkpoint"):
        load_state_dict(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty\.safetensors: the file is empty"):
        load_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.pth"):
        load_state_dict(tmp_path / "nowhere.pth")
    no_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "no weights"}, no_tensors)
    with pytest.raises(CheckpointError, match=r"meta\.pth: no state dict found"):
        load_state_dict(no_tensors)


def test_strict_error_lists_missing_unexpected_and_mismatched(tmp_path: Path) -> None:
    sd = small_model().state_dict()
    del sd["block1.0.attn.q.weight"], sd["norm4.bias"]
    sd["block9.0.extra.weight"] = torch.zeros(2)
    sd["block2.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model(fill=False), path)
    msg = str(info.value)
    assert "partial.pth does not fit TransNeXt" in msg
    assert "missing keys (2): block1.0.attn.q.weight, norm4.bias" in msg
    assert "unexpected keys (1): block9.0.extra.weight" in msg
    assert "shape mismatches (1): block2.0.mlp.fc1.weight (checkpoint (3, 3), model (170, 16))" in msg


def test_strict_error_is_shortened_for_another_variant(tmp_path: Path) -> None:
    other = TransNeXt(num_classes=5, **dict(SMALL, embed_dims=(16, 32, 64, 128)))
    path = save_state_dict(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match=r"classifier has shape \(5, 128\), the model's \(5, 64\)"):
        with pytest.raises(CheckpointError, match=r"another variant\?.*shape mismatches \(\d+\): .*\.\.\. \(\d+ more\)") as info:
            load_checkpoint(small_model(fill=False), path)
    assert len(str(info.value)) < 1500


def test_non_strict_loads_what_fits(tmp_path: Path) -> None:
    src = small_model()
    sd = src.state_dict()
    del sd["norm4.weight"]
    sd["head.bias"] = torch.zeros(7)  # mismatched, skipped
    sd["unused"] = torch.zeros(1)
    torch.save(sd, tmp_path / "p.pth")
    dst = small_model(fill=False)
    before = dst.norm4.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = load_checkpoint(dst, tmp_path / "p.pth", strict=False)
    assert result["missing_keys"] == ["norm4.weight"] and result["unexpected_keys"] == ["unused"]
    assert result["mismatched_keys"] == ["head.bias"]
    assert torch.equal(dst.norm4.weight, before)
    assert torch.equal(dst.block3[0].attn.q.weight, src.block3[0].attn.q.weight)


def test_other_num_classes_drops_head_with_warning(tmp_path: Path) -> None:
    src = small_model(num_classes=5)
    path = save_state_dict(src.state_dict(), tmp_path / "five.safetensors")
    dst = small_model(num_classes=3, fill=False)
    head = dst.head.weight.clone()
    with pytest.warns(UserWarning, match="checkpoint classifier has 5 classes, the model 3: the head is not loaded"):
        load_checkpoint(dst, path)
    assert torch.equal(dst.head.weight, head)
    assert_same_weights(src, dst, skip="head.")


def test_headless_model_takes_classifier_checkpoint_silently(tmp_path: Path) -> None:
    src = small_model(num_classes=5)
    path = save_state_dict(src.state_dict(), tmp_path / "cls.safetensors")
    backbone = small_model(num_classes=0, fill=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(backbone, path)
    assert torch.equal(backbone.norm4.weight, src.norm4.weight)


def test_strict_load_still_requires_a_head_the_file_lacks(tmp_path: Path) -> None:
    sd = {k: v for k, v in small_model().state_dict().items() if not k.startswith("head.")}
    path = save_state_dict(sd, tmp_path / "backbone.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): head.weight, head.bias"):
        load_checkpoint(small_model(fill=False), path)


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    sd = small_model().state_dict()
    sd["block2.0.attn.kv.weight"][0, 0] = float("nan")
    sd["norm1.bias"][1] = float("inf")
    path = save_state_dict(sd, tmp_path / "diverged.safetensors")
    dst = small_model(fill=False)
    before = dst.block1[0].attn.q.weight.clone()
    with pytest.raises(CheckpointError, match=r"diverged\.safetensors: non-finite weights \(NaN/Inf\) in 2 tensor\(s\): "
                                              r"block2\.0\.attn\.kv\.weight, norm1\.bias .*1 NaN.*Expected finite values"):
        load_checkpoint(dst, path)
    assert torch.equal(dst.block1[0].attn.q.weight, before)  # nothing was loaded


def test_filter_drops_size_tables_and_prefixes() -> None:
    model = small_model()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.relative_pos_index1"] = torch.zeros(3, dtype=torch.long)
    sd["module.relative_coords_table1"] = torch.zeros(3, 2)
    sd["module.block1.0.attn.seq_length_scale"] = torch.zeros(3, 1)
    sd["module.block1.0.attn.padding_mask"] = torch.zeros(3, 9, dtype=torch.bool)
    out = checkpoint_filter_fn({"model": sd, "epoch": 1}, model)
    assert set(out) == set(model.state_dict())


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = save_state_dict({"a": torch.ones(3)}, tmp_path / "keep.pth")
    original = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pth"]  # no temporary files left


def test_create_model_checkpoint_path_and_pretrained_from_hub_cache(tmp_path: Path, offline_hub: Path) -> None:
    # A narrow model under the transnext_micro hub file: the real hub path, quickly.
    narrow = dict(embed_dims=SMALL["embed_dims"], depths=SMALL["depths"])
    src = transnext.create_model("transnext_micro", **narrow)
    fill_deterministic(src)
    weights = transnext.get_weights("transnext_micro")
    # The published layout: the state dict under 'model'.
    populate_hub_cache(offline_hub, weights.hf_hub_id, weights.filename, {"model": src.state_dict()})
    from_hub = transnext.create_model("transnext_micro", pretrained=True, **narrow)
    assert_same_weights(src, from_hub)
    path = save_state_dict(src.state_dict(), tmp_path / "micro.safetensors")
    local = transnext.create_model("transnext_micro", checkpoint_path=path, **narrow)
    assert_same_weights(src, local)


def test_pretrained_offline_without_cache_says_what_to_do(offline_hub: Path) -> None:
    with pytest.raises(CheckpointError, match=r"could not fetch transnext_tiny_224_1k\.pth .*DaiShiResearch/transnext-tiny-224-1k"
                                              r".*pass checkpoint_path="):
        transnext.create_model("transnext_tiny", pretrained=True)
