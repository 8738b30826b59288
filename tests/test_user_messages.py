"""What users are told when a checkpoint, a conversion or a download goes wrong (and that the fixes work).

Covered: pickles that would run code (refused as unsafe, never with advice to load them unsafely,
the code never runs), truncated files (reported as truncated), conversion keeping the model record
(``.pth`` -> ``.safetensors`` -> ``.pth``, each taken by ``predict``), conversion to a suffix it does
not write, published weights with the hub unreachable (fast, advice in the caller's terms),
detection / segmentation checkpoints given to the classification commands, and the step-based saves
of the long dense recipes. No test contacts anything but the loopback interface.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path

import pytest
import torch

from train_helpers import TINY_ARCH, make_image_folder, one_thread, run_cli  # noqa: F401
from transnext.checkpoints import CheckpointError, convert_checkpoint, load_state_dict, safe_torch_load, save_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

UNSAFE_ADVICE = ("weights_only=False", "will likely succeed", "weights_only` set to `False")
CLASSES = ["cat", "dog", "owl"]


class _System:
    """Unpickling this calls os.system (it touches ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Print:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _assert_refused_as_unsafe(text: str, culprit: str) -> None:
    assert "not allowed for safe loading" in text and "code or objects" in text, text
    assert re.search(culprit, text), text
    assert "truncated or corrupt" not in text, text
    for phrase in UNSAFE_ADVICE:
        assert phrase not in text, text


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A transnext training-style checkpoint of a tiny classifier (model record, classes, data settings)."""
    from transnext.engine.modeling import create_model_with_arch

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    m = create_model_with_arch("transnext_micro", num_classes=3, model_kwargs=TINY_ARCH, img_size=32, pretrain_size=64)
    path = d / "best.pth"
    torch.save({"model": m.state_dict(), "arch": m.arch, "classes": CLASSES, "task": "classification",
                "data_cfg": dict(img_size=32, crop_pct=1.0, interpolation="bicubic", mean=[0.5] * 3, std=[0.25] * 3),
                "optimizer": {}, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=1, splits=("val",)) / "val"


# ---------------------------------------------------------------------- unsafe pickles


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_code_in_pickle_is_refused_as_unsafe(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(2)}, "extra": _System(marker)}
    if layout == "zip":
        torch.save(payload, path)
    else:  # a bare pickle (protocol 4): torch's message names no global; the opcodes do
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    _assert_refused_as_unsafe(str(info.value), r"'(posix|nt|os)\.system'")
    # torch's text (with its advice) is not chained into the traceback either
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    with pytest.raises(CheckpointError, match="not allowed for safe loading"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_refuses_code_in_pickle(tmp_path: Path, images: Path, command: str, capsys) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _System(marker), "more": _Print()}, path)
    extra = ["--no-progress", "--num-workers", "0"] if command == "eval" else ["--json"]
    r = run_cli(command, str(images), "--checkpoint", str(path), "--model", "transnext_micro", *extra)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    _assert_refused_as_unsafe(r.stderr, r"'(posix|nt|os)\.system'|'print'")
    assert not marker.exists() and "pickled code ran" not in r.stdout + capsys.readouterr().out


def test_print_global_is_named(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Print()}, path)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    _assert_refused_as_unsafe(str(info.value), r"Python object 'print'")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_checkpoint_is_reported_as_truncated(tmp_path: Path, tiny_checkpoint: Path, images: Path, cut: float) -> None:
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint \(truncated or corrupt\?\)") as info:
        safe_torch_load(path)
    for phrase in (*UNSAFE_ADVICE, "not allowed for safe loading"):
        assert phrase not in str(info.value)
    r = run_cli("predict", str(images), "--checkpoint", str(path), "--json")
    assert r.returncode == 1 and "truncated or corrupt" in r.stderr and "weights_only" not in r.stderr, r.stderr


# ---------------------------------------------------------------------- convert


def _predict_json(images: Path, checkpoint: Path) -> list[dict]:
    r = run_cli("predict", str(images), "--checkpoint", str(checkpoint), "--json", "--topk", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_convert_keeps_model_record_both_ways(tmp_path: Path, tiny_checkpoint: Path, images: Path) -> None:
    from transnext.engine.modeling import checkpoint_info

    reference = _predict_json(images, tiny_checkpoint)
    assert {p["label"] for p in reference[0]["predictions"]} == set(CLASSES)
    st = tmp_path / "model.safetensors"
    r = run_cli("convert", str(tiny_checkpoint), str(st))
    assert r.returncode == 0, r.stderr
    assert "kept its arch, classes, data_cfg, task" in r.stdout
    info = checkpoint_info(st)
    original = safe_torch_load(tiny_checkpoint)
    assert info["arch"] == original["arch"] and info["classes"] == CLASSES and info["data_cfg"]["img_size"] == 32
    assert _predict_json(images, st) == reference  # same model, same classes, same transform
    back = tmp_path / "back.pth"
    convert_checkpoint(st, back)
    obj = safe_torch_load(back)
    assert obj["arch"] == original["arch"] and obj["classes"] == CLASSES and "optimizer" not in obj
    assert _predict_json(images, back) == reference
    # plain weights stay plain both ways
    plain = save_state_dict({"w": torch.ones(3)}, tmp_path / "plain.safetensors")
    convert_checkpoint(plain, tmp_path / "plain.pth")
    assert set(safe_torch_load(tmp_path / "plain.pth")) == {"w"}


@pytest.mark.parametrize("suffix", [".onnx", ".zip", ""])
def test_convert_refuses_unknown_suffix(tmp_path: Path, tiny_checkpoint: Path, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    r = run_cli("convert", str(tiny_checkpoint), str(out))
    assert r.returncode == 1 and "must be one of .pth, .pt, .bin, .safetensors" in r.stderr, r.stderr
    assert ("transnext export onnx" in r.stderr) == (suffix == ".onnx")
    with pytest.raises(ValueError, match="output suffix must be one of"):
        convert_checkpoint(tiny_checkpoint, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- published weights, hub unreachable


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty hub cache, online mode, endpoint on a closed loopback port (connection refused at once)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    return cache


def test_pretrained_unreachable_hub_fails_fast_python(unreachable_hub: Path) -> None:
    pytest.importorskip("huggingface_hub")
    import transnext

    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        transnext.create_model("transnext_micro", pretrained=True)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert elapsed < 8, f"took {elapsed:.1f} s"
    assert "not reachable at http://127.0.0.1:9" in msg and "pass checkpoint_path=" in msg and "--checkpoint" not in msg, msg


def test_pretrained_unreachable_hub_uses_cached_copy(unreachable_hub: Path) -> None:
    pytest.importorskip("huggingface_hub")
    import transnext
    from hub_cache import populate_hub_cache

    narrow = dict(embed_dims=TINY_ARCH["embed_dims"], num_heads=TINY_ARCH["num_heads"], depths=TINY_ARCH["depths"],
                  mlp_ratios=TINY_ARCH["mlp_ratios"])
    src = transnext.create_model("transnext_micro", **narrow)
    weights = transnext.get_weights("transnext_micro")
    populate_hub_cache(unreachable_hub, weights.hf_hub_id, weights.filename, {"model": src.state_dict()})
    start = time.monotonic()
    got = transnext.create_model("transnext_micro", pretrained=True, **narrow)
    assert time.monotonic() - start < 8
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), got.state_dict().values()))


@pytest.mark.parametrize("offline", [False, True])
def test_pretrained_unreachable_hub_fails_fast_cli(unreachable_hub: Path, images: Path, monkeypatch, offline: bool) -> None:
    pytest.importorskip("huggingface_hub")
    if offline:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    r = run_cli("predict", str(images), "--model", "transnext_micro", "--pretrained", "--json")
    elapsed = time.monotonic() - start
    assert r.returncode == 1 and elapsed < 8, (elapsed, r.stderr)
    assert "pass --checkpoint PATH" in r.stderr and "checkpoint_path=" not in r.stderr, r.stderr
    assert ("HF_HUB_OFFLINE" in r.stderr) == offline, r.stderr


# ---------------------------------------------------------------------- dense checkpoints in classification commands


def _dense_checkpoints(d: Path) -> dict[str, Path]:
    recorded = d / "det_best.pth"  # what 'transnext detect train' writes: model record with its task
    torch.save({"model": {"backbone.body.model.patch_embed1.proj.weight": torch.zeros(4, 3, 7, 7),
                          "rpn.head.conv.0.0.weight": torch.zeros(4, 4, 3, 3),
                          "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 8)},
                "arch": {"task": "detect", "variant": "transnext_micro", "detector": "mask_rcnn", "num_classes": 3},
                "task": "detection", "classes": ["__background__", "a", "b"]}, recorded)
    bare = save_state_dict({"backbone.model.patch_embed1.proj.weight": torch.zeros(4, 3, 7, 7),
                            "decode_head.conv_seg.weight": torch.zeros(5, 4, 1, 1)}, d / "seg.safetensors")
    mmdet = d / "mmdet_style.pth"  # reference layout: no record, keys under 'state_dict'
    torch.save({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(4, 3, 7, 7),
                               "neck.lateral_convs.0.conv.weight": torch.zeros(4, 4, 1, 1),
                               "rpn_head.rpn_conv.weight": torch.zeros(4, 4, 3, 3)}}, mmdet)
    return {"detect": recorded, "segment": bare, "mmdet": mmdet}


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("task", ["detect", "segment", "mmdet"])
def test_dense_checkpoint_names_its_command(tmp_path: Path, images: Path, command: str, task: str) -> None:
    path = _dense_checkpoints(tmp_path)[task]
    task = "detect" if task == "mmdet" else task
    kind = "detection" if task == "detect" else "segmentation"
    extra = ["--no-progress", "--num-workers", "0"] if command == "eval" else []
    for model_flag in ([], ["--model", "transnext_micro"]):
        r = run_cli(command, str(images), "--checkpoint", str(path), *model_flag, *extra)
        assert r.returncode == 1, r.stderr
        assert f"is a {kind} checkpoint" in r.stderr and f"'transnext {task} {command} --checkpoint {path}'" in r.stderr, r.stderr
        assert "pass --model" not in r.stderr and "missing keys" not in r.stderr, r.stderr
    if path.name == "det_best.pth":
        assert "(mask_rcnn on transnext_micro)" in r.stderr


# ---------------------------------------------------------------------- wording and recipes


def test_no_doubled_folder_in_messages(tmp_path: Path, tiny_checkpoint: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("eval", f"folder={empty}", "--checkpoint", str(tiny_checkpoint), "--no-progress", "--num-workers", "0")
    assert r.returncode == 1 and "is empty" in r.stderr and "folder folder" not in r.stderr, r.stderr
    src = Path(__file__).resolve().parents[1] / "src"
    assert not [p for p in src.rglob("*.py") if re.search(r"\bfolder folder\b", p.read_text())]


def test_long_dense_recipes_save_by_steps() -> None:
    from transnext.dense.config import DENSE_RECIPES

    long = {k: v for k, v in DENSE_RECIPES.items() if k.startswith(("mask_rcnn_1x_", "upernet_160k_"))}
    assert len(long) == 6
    for name, options in long.items():
        every = options.get("save_every_steps", 0)
        # a COCO 1x epoch is ~7,300 steps at batch 16, UPerNet evaluates every 16k: a save well within either
        assert 0 < every <= 2000, (name, every)


def test_train_pretrained_unreachable_hub_names_initial_checkpoint(unreachable_hub: Path, tmp_path: Path) -> None:
    """``train --pretrained`` without the hub advises the training option that takes a local file."""
    pytest.importorskip("huggingface_hub")
    r = run_cli("train", "--model", "transnext_micro", "--pretrained", "--dataset", "demo", "--epochs", "1",
                "--output", str(tmp_path / "run"), "--num-workers", "0")
    assert r.returncode != 0, r.stdout
    assert "pass --initial-checkpoint PATH" in r.stderr and "checkpoint_path=" not in r.stderr, r.stderr


def test_dense_pretrained_trunk_unreachable_hub_names_backbone_weights(unreachable_hub: Path) -> None:
    """A dense model's published trunk without the hub advises ``backbone_weights=`` / ``--backbone-weights``."""
    pytest.importorskip("huggingface_hub")
    from transnext.dense import build_trunk

    with pytest.raises(CheckpointError) as info:
        build_trunk("transnext_micro", True, preset=None)
    msg = str(info.value)
    assert "pass backbone_weights=PATH" in msg and "--backbone-weights PATH" in msg and "checkpoint_path=" not in msg, msg
