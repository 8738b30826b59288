"""The reference's mmseg UPerNet checkpoints load into ``upernet_transnext`` and give the reference's outputs.

The data (tests/data/reference_upernet, see its README.md) was made by mmsegmentation's
``EncoderDecoder`` with the reference TransNeXt backbone on a tiny configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transnext.checkpoints import CheckpointError, safe_torch_load, save_state_dict
from transnext.dense import load_reference_checkpoint, upernet_transnext
from transnext.dense.inference import segment_image
from transnext.dense.reference_checkpoints import convert_mmseg_upernet

pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

DATA = Path(__file__).parent / "data" / "reference_upernet"
CKPT = DATA / "upernet_mmseg.pth"
CROP, STRIDE = 40, 24
# float32, different operation order from the reference: rounding only (observed errors ~2e-6 on maps of size ~3)
RTOL, ATOL = 1e-5, 1e-5


def tiny_upernet(preset: str = "upernet", **kw) -> torch.nn.Module:
    """Our UPerNet with the settings of the reference data."""
    return upernet_transnext(
        "transnext_micro", num_classes=4, channels=12, aux_channels=8, preset=preset, img_size=128, pretrain_size=224,
        drop_path_rate=0.0, embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 2), depths=(1, 1, 2, 1),
        mlp_ratios=(4, 4, 4, 4), **kw,
    ).eval()


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "outputs.safetensors"))


@pytest.fixture(scope="module")
def raw_checkpoint() -> dict:
    return safe_torch_load(CKPT)


def _errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], list[str]]:
    errs, bad = {}, []
    for name, (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(theirs.shape)}"
        errs[name] = (ours - theirs).abs().max().item()
        if errs[name] > ATOL + RTOL * theirs.abs().max().item():
            bad.append(name)
    return errs, bad


def _fmt(errs: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in errs.items())


def test_mmseg_checkpoint_loads_strictly_and_matches_reference_per_stage(ref) -> None:
    model = tiny_upernet()
    report = load_reference_checkpoint(model, CKPT)
    assert report["kind"] == "mmseg_upernet"
    assert report["classes"] == ["a", "b", "c", "d"]
    assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == []
    x = ref["input_whole"]
    with torch.no_grad():
        feats = model.backbone(x)
        pairs = {f"stage{i + 1}": (f, ref[f"stage{i + 1}"]) for i, f in enumerate(feats)}
        pairs["decode_logits"] = (model.decode_head(feats), ref["decode_logits"])
        pairs["aux_logits"] = (model.aux_head(feats[model.aux_index]), ref["aux_logits"])
    errs, bad = _errors(pairs)
    assert not bad, f"max abs error beyond tolerance in {bad}; per stage: {_fmt(errs)}"


def test_whole_and_slide_inference_match_mmseg(ref) -> None:
    model = tiny_upernet()
    load_reference_checkpoint(model, CKPT)
    whole = segment_image(model, ref["input_whole"], mode="whole")
    slide = segment_image(model, ref["input_slide"], mode="slide", crop=CROP, stride=STRIDE)
    errs, bad = _errors({"whole_logits": (whole, ref["whole_logits"]), "slide_logits": (slide, ref["slide_logits"])})
    assert not bad, f"max abs error beyond tolerance in {bad}: {_fmt(errs)}"
    # the sliding windows really overlap and differ from one whole pass
    assert (slide - segment_image(model, ref["input_slide"], mode="whole")).abs().max() > 1e-3


def test_extrapolation_preset_matches_reference_extrapolation(ref) -> None:
    model = tiny_upernet("upernet_extrapolation")
    load_reference_checkpoint(model, CKPT)
    errs, bad = _errors({"whole_logits_extrapolation": (segment_image(model, ref["input_whole"]), ref["whole_logits_extrapolation"])})
    assert not bad, f"max abs error beyond tolerance: {_fmt(errs)}"
    # the two position-bias modes give different outputs, so each comparison checks its own mode
    assert (ref["whole_logits_extrapolation"] - ref["whole_logits"]).abs().max() > 1e-2


def test_converted_keys_are_exactly_ours(raw_checkpoint) -> None:
    converted = convert_mmseg_upernet(raw_checkpoint)
    own = tiny_upernet().state_dict()
    assert sorted(converted) == sorted(own)
    assert converted["decode_head.ppm.3.1.1.running_var"] is raw_checkpoint["state_dict"]["decode_head.psp_modules.3.1.bn.running_var"]
    assert converted["aux_head.classifier.1.weight"] is raw_checkpoint["state_dict"]["auxiliary_head.conv_seg.weight"]


def test_mmseg1_wrapper_in_memory_and_safetensors_file(raw_checkpoint, tmp_path, ref) -> None:
    sd = raw_checkpoint["state_dict"]
    wrapped = {"meta": {"dataset_meta": {"classes": ("w", "x", "y", "z")}}, "state_dict": sd, "optimizer": {"state": {}}}
    model = tiny_upernet()
    assert load_reference_checkpoint(model, wrapped)["classes"] == ["w", "x", "y", "z"]
    path = save_state_dict(sd, tmp_path / "upernet.safetensors")
    model2 = tiny_upernet()
    report = load_reference_checkpoint(model2, path)
    assert report["kind"] == "mmseg_upernet" and report["classes"] is None
    errs, bad = _errors({"whole_logits": (segment_image(model2, ref["input_whole"]), ref["whole_logits"])})
    assert not bad, _fmt(errs)


def test_mmcv1_training_checkpoint_layout_loads(raw_checkpoint, tmp_path) -> None:
    # what mmseg 0.30 training writes (mmcv 1.x save_checkpoint): metadata with a NumPy score, AdamW state
    np = pytest.importorskip("numpy")
    sd = raw_checkpoint["state_dict"]
    w = sd["decode_head.conv_seg.weight"]
    meta = {"env_info": "sys.platform: linux", "seed": 0, "exp_name": "upernet.py", "mmseg_version": "0.30.0", "config": "model = dict()",
            "CLASSES": ("a", "b", "c", "d"), "PALETTE": [[0, 0, 0]] * 4, "epoch": 1, "iter": 160000, "mmcv_version": "1.7.1",
            "time": "Mon Jan  1 00:00:00 2024", "hook_msgs": {"last_ckpt": "iter_160000.pth", "best_score": np.float64(0.5)}}
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}},
                 "param_groups": [{"lr": 6e-5, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]}
    path = tmp_path / "iter_160000.pth"
    torch.save({"meta": meta, "state_dict": sd, "optimizer": optimizer}, path)
    report = load_reference_checkpoint(tiny_upernet(), path)
    assert report["kind"] == "mmseg_upernet" and report["classes"] == ["a", "b", "c", "d"] and not report["missing_keys"]


def test_mis_shaped_key_is_named_in_both_namings_with_the_class_hint(raw_checkpoint) -> None:
    sd = dict(raw_checkpoint["state_dict"])
    sd["decode_head.conv_seg.weight"] = torch.zeros(5, 12, 1, 1)
    sd["decode_head.conv_seg.bias"] = torch.zeros(5)
    model = tiny_upernet()
    before = model.decode_head.ppm_bottleneck[0].weight.clone()
    with pytest.raises(CheckpointError) as e:
        load_reference_checkpoint(model, sd)
    msg = str(e.value)
    assert "shape mismatches (2)" in msg and "decode_head.classifier.1.weight (checkpoint (5, 12, 1, 1), model (4, 12, 1, 1))" in msg
    assert "decode_head.classifier.1.weight = decode_head.conv_seg.weight" in msg
    assert "num_classes=5" in msg
    assert torch.equal(model.decode_head.ppm_bottleneck[0].weight, before), "a refused strict load must leave the model unchanged"


def test_missing_and_unexpected_keys_are_named(raw_checkpoint) -> None:
    sd = dict(raw_checkpoint["state_dict"])
    del sd["decode_head.bottleneck.bn.running_var"]
    del sd["backbone.block3.1.attn.kv.weight"]
    sd["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_reference_checkpoint(tiny_upernet(), {"meta": {}, "state_dict": sd})
    msg = str(e.value)
    assert "missing keys (2)" in msg and "unexpected keys (1): decode_head.extra.weight" in msg
    assert "decode_head.ppm_bottleneck.1.running_var = decode_head.bottleneck.bn.running_var" in msg
    assert "backbone.model.block3.1.attn.kv.weight = backbone.block3.1.attn.kv.weight" in msg
    # non-strict: what fits is loaded, the rest reported
    report = load_reference_checkpoint(tiny_upernet(), sd, strict=False)
    assert sorted(report["missing_keys"]) == ["backbone.model.block3.1.attn.kv.weight", "decode_head.ppm_bottleneck.1.running_var"]
    assert report["unexpected_keys"] == ["decode_head.extra.weight"]


def test_without_aux_head_the_aux_keys_are_unexpected(raw_checkpoint) -> None:
    expected = r"unexpected keys \(8\): aux_head\.classifier\.1\.weight.* build the model with aux_head=True"
    with pytest.raises(CheckpointError, match=expected):
        load_reference_checkpoint(tiny_upernet(aux_head=False), raw_checkpoint)
    report = load_reference_checkpoint(tiny_upernet(aux_head=False), raw_checkpoint, strict=False)
    assert len(report["unexpected_keys"]) == 8 and report["missing_keys"] == []


def test_unrecognised_layout_and_wrong_model_are_refused(raw_checkpoint) -> None:
    classification = {k[len("backbone."):]: v for k, v in raw_checkpoint["state_dict"].items() if k.startswith("backbone.")}
    expected = r"not a recognised reference checkpoint .*classification checkpoint: pass it as backbone_weights="
    with pytest.raises(CheckpointError, match=expected):
        load_reference_checkpoint(tiny_upernet(), classification)
    with pytest.raises(CheckpointError, match=r"is an mmseg UPerNet checkpoint; it loads into a UPerNet .*not a TransNeXtBackbone"):
        load_reference_checkpoint(tiny_upernet().backbone, raw_checkpoint)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_pickle_with_code_is_refused_without_running_it(raw_checkpoint, tmp_path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": _Payload(marker)}, "state_dict": raw_checkpoint["state_dict"]}, path)
    with pytest.raises(CheckpointError, match=r"refused to load: unpickling the file needs the Python object '(posix|nt)\.mkdir'"):
        load_reference_checkpoint(tiny_upernet(), path)
    assert not marker.exists()


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="reference checkpoint not found"):
        load_reference_checkpoint(tiny_upernet(), tmp_path / "absent.pth")


@pytest.mark.parametrize("variant", ["transnext_tiny", "transnext_small", "transnext_base"])
def test_published_full_size_layouts_convert_onto_our_models(variant: str) -> None:
    # names and shapes of the reference's ADE20K segmentors (150 classes, channels 512 / 256), as mmseg builds them
    layout = json.loads((DATA / "upernet_keys.json").read_text())[variant]
    converted = convert_mmseg_upernet({k: torch.empty(shape, device="meta") for k, shape in layout.items()})
    with torch.device("meta"):
        model = upernet_transnext(variant, num_classes=150)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in converted.items()}
    assert set(theirs) == set(ours), f"not ours: {sorted(set(theirs) - set(ours))[:5]}; missing: {sorted(set(ours) - set(theirs))[:5]}"
    assert theirs == ours, [k for k in ours if theirs[k] != ours[k]][:5]
