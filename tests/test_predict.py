"""``transnext predict``: top-k labels, probabilities, JSON, folders, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from train_helpers import (
    make_image_folder,
    one_thread,  # noqa: F401
    run_cli,
    save_tiny_checkpoint,
    write_corrupt,
)

pytest.importorskip("timm")

from transnext.data import build_eval_transform, find_images, load_image  # noqa: E402
from transnext.engine import class_names_for, predict_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    model = save_tiny_checkpoint(d / "tiny.pth", num_classes=3, classes=CLASSES, seed=1)
    make_image_folder(d / "imgs", classes=2, per_class=3, splits=("a",))
    return d, model


def test_predict_json_matches_model(setup):
    d, model = setup
    r = run_cli("predict", str(d / "imgs"), "--checkpoint", str(d / "tiny.pth"), "--json", "--topk", "2", "--batch-size", "4",
                check=True)
    res = json.loads(r.stdout)
    paths = find_images([d / "imgs"])
    assert [x["path"] for x in res] == paths and len(res) == 6
    tf = build_eval_transform(32, crop_pct=1.0)
    with torch.no_grad():
        probs = model.eval()(torch.stack([tf(load_image(p)) for p in paths])).softmax(1)
    for rec, p in zip(res, probs):
        preds = rec["predictions"]
        assert len(preds) == 2 and preds[0]["prob"] >= preds[1]["prob"]
        assert preds[0]["index"] == int(p.argmax()) and preds[0]["label"] == CLASSES[preds[0]["index"]]
        assert preds[0]["prob"] == pytest.approx(float(p.max()), abs=1e-5)


def test_predict_text_single_file_and_output(setup, tmp_path):
    d, _ = setup
    img = find_images([d / "imgs"])[0]
    out = tmp_path / "p.json"
    r = run_cli("predict", img, "--checkpoint", str(d / "tiny.pth"), "--topk", "5", "--output", str(out), check=True)
    line = r.stdout.strip()
    assert line.startswith(img + ": ") and line.count("%") == 3  # top-k capped at the 3 classes
    assert all(c in line for c in CLASSES)
    assert json.loads(out.read_text())[0]["path"] == img


def test_imagenet_names_for_1000_classes():
    names = class_names_for(1000)
    assert names[0] == "tench" and len(names) == 1000
    assert class_names_for(4) == ["class_0", "class_1", "class_2", "class_3"]
    assert class_names_for(2, ["a", "b"]) == ["a", "b"]


def test_predict_1000_class_model_uses_imagenet_names(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "in1k.pth", num_classes=1000)
    make_image_folder(tmp_path / "imgs", classes=1, per_class=2, splits=("x",))
    res = predict_images(model, find_images([tmp_path / "imgs"]), build_eval_transform(32, crop_pct=1.0),
                         class_names_for(1000), topk=5, batch_size=1)
    names = set(class_names_for(1000))
    assert all(len(r["predictions"]) == 5 and {p["label"] for p in r["predictions"]} <= names for r in res)
    assert sum(p["prob"] for p in res[0]["predictions"]) <= 1.0 + 1e-6


def test_predict_corrupt_and_missing(setup, tmp_path):
    d, _ = setup
    bad = write_corrupt(tmp_path / "bad.png")
    good = find_images([d / "imgs"])[0]
    ck = str(d / "tiny.pth")
    r = run_cli("predict", good, str(bad), "--checkpoint", ck, "--json")
    assert r.returncode == 0
    res = json.loads(r.stdout)
    assert "predictions" in res[0] and "cannot read image" in res[1]["error"]
    assert "1 of 2 image(s) could not be read" in r.stderr
    r = run_cli("predict", str(bad), "--checkpoint", ck)
    assert r.returncode == 1 and "ERROR" in r.stdout
    r = run_cli("predict", good, str(bad), "--checkpoint", ck, "--strict-data")
    assert r.returncode == 1 and "bad.png" in r.stderr
    r = run_cli("predict", str(tmp_path / "nope.jpg"), "--checkpoint", ck)
    assert r.returncode == 1 and "image or folder not found" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("predict", str(tmp_path / "empty"), "--checkpoint", ck)
    assert r.returncode == 1 and "no image files in folder" in r.stderr
    r = run_cli("predict", good, "--checkpoint", ck, "--topk", "0")
    assert r.returncode == 1 and "--topk must be >= 1" in r.stderr
    r = run_cli("predict", good, "--model", "transnext_micro")
    assert r.returncode == 1 and "--pretrained" in r.stderr


def test_predict_too_small_img_size(setup):
    d, _ = setup
    img = find_images([d / "imgs"])[0]
    r = run_cli("predict", img, "--checkpoint", str(d / "tiny.pth"), "--img-size", "20")
    assert r.returncode == 1 and "too small" in r.stderr and "minimum input is 29x29" in r.stderr
