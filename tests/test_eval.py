"""Evaluation: metrics, the robustness benchmark layouts, ImageNet-C mCE, the eval command."""

from __future__ import annotations

import json
import math

import numpy as np
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

from transnext.data import build_eval_transform, imagenet_wnids, robustness_subset_wnids  # noqa: E402
from transnext.engine import ALEXNET_ERRORS, detect_benchmark, markdown_table, run_benchmark  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WNIDS = imagenet_wnids()


class CodeModel(torch.nn.Module):
    """A 1000-class 'model' that reads its answer from the image: the left half encodes the
    top-1 class k1 (logit 10), the right half a runner-up k2 (logit 5); a tiny ramp breaks ties
    towards the highest indices, so classes below 990 never enter the top-5 by accident."""

    num_classes = 1000

    def forward(self, x):
        px = x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        px = (px * 255).round().long()

        def decode(col):
            return px[:, 0, 16, col] + (px[:, 1, 16, col] // 64) * 256

        logits = torch.arange(1000.0).expand(len(x), 1000) * 1e-4
        logits = logits.clone()
        logits[torch.arange(len(x)), decode(8)] += 10
        logits[torch.arange(len(x)), decode(24)] += 5
        return logits


def code_image(path, k1: int, k2: int):
    from PIL import Image

    a = np.zeros((32, 32, 3), np.uint8)
    for sl, k in ((slice(0, 16), k1), (slice(16, 32), k2)):
        a[:, sl, 0], a[:, sl, 1] = k % 256, (k // 256) * 64
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def bench(root, kind):
    tf = build_eval_transform(32, crop_pct=1.0, mean=MEAN, std=STD)
    return run_benchmark(CodeModel(), root, kind, tf, batch_size=4, num_workers=0)


def test_folder_with_wnids_top1_top5(tmp_path):
    root = tmp_path / "val"
    for i, (folder, k1, k2) in enumerate([(0, 0, 0), (0, 5, 0), (1, 1, 1), (1, 1, 7), (2, 2, 2), (2, 9, 8)]):
        code_image(root / WNIDS[folder] / f"{i}.png", k1, k2)
    r = bench(tmp_path, "folder")  # <root>/val is used
    assert r["n"] == 6
    assert r["top1"] == pytest.approx(400 / 6) and r["top5"] == pytest.approx(500 / 6)
    assert math.isfinite(r["loss"]) and r["loss"] > 0


@pytest.mark.parametrize("kind", ["imagenet-a", "imagenet-r"])
def test_200_class_subset_restricts_logits(tmp_path, kind):
    subset = robustness_subset_wnids(kind)
    inside = [WNIDS.index(w) for w in subset[:2]]
    outside = next(i for i, w in enumerate(WNIDS) if w not in subset)
    root = tmp_path / kind
    code_image(root / subset[0] / "a.png", outside, inside[0])  # wrong over 1000 classes, right over the 200
    code_image(root / subset[1] / "b.png", inside[1], inside[1])
    assert bench(root, kind)["top1"] == 100.0
    assert bench(root, "folder")["top1"] == 50.0
    code_image(root / WNIDS[outside] / "c.png", outside, outside)
    with pytest.raises(ValueError, match=f"outside the {kind} 200-class subset"):
        bench(root, kind)


def test_imagenet_v2_numeric_folders(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for k in (2, 10, 100):  # sorted as text these would be 10, 100, 2
        code_image(root / str(k) / "x.png", k, k)
    assert detect_benchmark(root) == "imagenet-v2"
    r = bench(root, "auto")
    assert r["benchmark"] == "imagenet-v2" and r["top1"] == 100.0 and r["n"] == 3
    code_image(root / "n01440764" / "y.png", 0, 0)
    with pytest.raises(ValueError, match="named by class index"):
        bench(root, "imagenet-v2")


def test_imagenet_sketch(tmp_path):
    root = tmp_path / "imagenet-sketch"
    code_image(root / WNIDS[500] / "s.png", 500, 1)
    code_image(root / WNIDS[3] / "t.png", 4, 3)
    r = bench(root, "auto")
    assert r["benchmark"] == "imagenet-sketch" and r["top1"] == 50.0 and r["top5"] == 100.0


def test_imagenet_c_mce(tmp_path):
    root = tmp_path / "imagenet-c"
    w = WNIDS[7]
    layout = {("fog", 1): [(7, 7), (1, 1)], ("fog", 2): [(1, 1), (2, 2)], ("snow", 1): [(7, 7), (7, 7)], ("snow", 2): [(7, 7), (3, 3)]}
    for (c, s), imgs in layout.items():
        for i, (k1, k2) in enumerate(imgs):
            code_image(root / c / str(s) / w / f"{i}.png", k1, k2)
    assert detect_benchmark(root) == "imagenet-c"
    r = bench(root, "auto")
    fog, snow = r["corruptions"]["fog"], r["corruptions"]["snow"]
    assert fog["severities"]["1"]["error"] == 50 and fog["severities"]["2"]["error"] == 100
    assert fog["mean_error"] == 75 and snow["mean_error"] == 25
    ce_fog, ce_snow = 75 / ALEXNET_ERRORS["fog"], 25 / ALEXNET_ERRORS["snow"]
    assert fog["ce"] == pytest.approx(ce_fog) and snow["ce"] == pytest.approx(ce_snow)
    assert r["mce"] == pytest.approx((ce_fog + ce_snow) / 2)
    assert r["complete"] is False and len(r["missing_corruptions"]) == 13 and r["n"] == 8
    md = markdown_table([r])
    assert "| imagenet-c |" in md and "| fog | 50.00 | 100.00 | 75.00 |" in md


def test_alexnet_reference_errors():
    assert len(ALEXNET_ERRORS) == 15 and all(0.5 < v < 0.95 for v in ALEXNET_ERRORS.values())


def test_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        bench(tmp_path / "none", "folder")
    code_image(tmp_path / "imagenet-a" / "not_a_wnid" / "x.png", 0, 0)
    with pytest.raises(ValueError, match="not ImageNet WordNet ids"):
        bench(tmp_path / "imagenet-a", "imagenet-a")
    (tmp_path / "imagenet-c" / "fog").mkdir(parents=True)
    with pytest.raises(ValueError, match="no severity folders"):
        bench(tmp_path / "imagenet-c", "imagenet-c")
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench(tmp_path, "imagenet-z")


# ---------------------------------------------------------------------- the eval command
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    save_tiny_checkpoint(d / "tiny.pth", num_classes=3, classes=["class_0", "class_1", "class_2"])
    make_image_folder(d / "data", classes=3, per_class=4, splits=("val",))
    return d


def test_cli_eval_resolution_modes_and_outputs(tiny_ckpt, tmp_path):
    out = tmp_path / "res.json"
    r = run_cli("eval", str(tiny_ckpt / "data"), "--checkpoint", str(tiny_ckpt / "tiny.pth"), "--img-size", "48",
                "--pos-bias", "interpolate", "--fixed-pool-size", "1", "--output", str(out), "--no-progress", "--num-workers", "0",
                check=True)
    res = json.loads(out.read_text())
    assert (res["img_size"], res["pos_bias"], res["fixed_pool_size"]) == (48, "interpolate", 1)
    assert res["results"][0]["n"] == 12 and res["results"][0]["benchmark"] == "folder"
    assert "| folder |" in r.stdout and out.with_suffix(".md").read_text() == r.stdout
    # the numbers agree with a direct computation at that size and mode
    from transnext.engine.modeling import model_from_checkpoint

    m, _ = model_from_checkpoint(tiny_ckpt / "tiny.pth", pos_bias="interpolate", fixed_pool_size=1)
    direct = run_benchmark(m.eval(), tiny_ckpt / "data", "folder", build_eval_transform(48, crop_pct=1.0), num_workers=0,
                           classes=["class_0", "class_1", "class_2"])
    assert res["results"][0]["top1"] == pytest.approx(direct["top1"])
    assert res["results"][0]["loss"] == pytest.approx(direct["loss"], rel=1e-5)


def test_cli_eval_corrupt_images(tiny_ckpt, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_ckpt / "data", data)
    write_corrupt(data / "val" / "class_1" / "bad.jpg")
    out = tmp_path / "r.json"
    run_cli("eval", str(data), "--checkpoint", str(tiny_ckpt / "tiny.pth"), "--output", str(out), "--num-workers", "0",
            "--no-progress", check=True)
    res = json.loads(out.read_text())["results"][0]
    assert res["n"] == 12 and res["skipped"] == 1
    r = run_cli("eval", str(data), "--checkpoint", str(tiny_ckpt / "tiny.pth"), "--strict-data", "--num-workers", "0")
    assert r.returncode == 1 and "bad.jpg" in r.stderr and "Traceback" not in r.stderr


def test_cli_eval_bad_checkpoints(tiny_ckpt, tmp_path):
    data = str(tiny_ckpt / "data")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 50)
    r = run_cli("eval", data, "--checkpoint", str(tmp_path / "junk.pth"))
    assert r.returncode == 1 and "not a readable PyTorch checkpoint" in r.stderr
    r = run_cli("eval", data, "--checkpoint", str(tmp_path / "missing.pth"))
    assert r.returncode == 1 and "not found" in r.stderr
    from transnext.checkpoints import load_state_dict, save_state_dict

    save_state_dict(load_state_dict(tiny_ckpt / "tiny.pth"), tmp_path / "bare.pth")
    r = run_cli("eval", data, "--checkpoint", str(tmp_path / "bare.pth"))
    assert r.returncode == 1 and "does not record its architecture; pass --model" in r.stderr
    r = run_cli("eval", data, "--checkpoint", str(tmp_path / "bare.pth"), "--model", "transnext_micro")
    assert r.returncode == 1 and "does not fit" in r.stderr and "shape mismatches" in r.stderr
    r = run_cli("eval", data)
    assert r.returncode == 1 and "--checkpoint" in r.stderr
    r = run_cli("eval", str(tmp_path / "nowhere"), "--checkpoint", str(tiny_ckpt / "tiny.pth"))
    assert r.returncode == 1 and "evaluation folder not found" in r.stderr


# ---------------------------------------------------------------------- never silently wrong
def test_imagenet_v2_detected_from_the_layout_under_any_name(tmp_path):
    root = tmp_path / "my_v2_copy"
    for k in range(1000):
        (root / str(k)).mkdir(parents=True)
    for k in (2, 10, 100):  # as a plain folder: sorted names 0, 1, 10, 100, ... -> wrong classes
        code_image(root / str(k) / "x.png", k, k)
    with pytest.warns(UserWarning, match="without images"):
        r = bench(root, "auto")
    assert r["benchmark"] == "imagenet-v2" and r["top1"] == 100.0 and "1000 class-index folders" in r["detection"]


def test_numeric_folders_that_could_be_either_are_refused(tmp_path):
    root = tmp_path / "numbers"
    for k in (2, 10, 100):
        code_image(root / str(k) / "x.png", k, k)
    with pytest.raises(ValueError, match="3 folders named by numbers.*--benchmark imagenet-v2 or --benchmark folder"):
        bench(root, "auto")
    assert bench(root, "imagenet-v2")["top1"] == 100.0  # said explicitly, it runs
    # a model without the 1000 ImageNet classes cannot be scored on ImageNet-V2: a plain folder
    assert detect_benchmark(root, num_classes=3) == "folder"


def test_imagenet_c_with_19_corruptions_detected_from_the_layout(tmp_path):
    from transnext.engine.evaluate import IMAGENET_C_EXTRA

    root = tmp_path / "corrupted"
    names = sorted(ALEXNET_ERRORS) + list(IMAGENET_C_EXTRA)
    for i, c in enumerate(names):
        code_image(root / c / "1" / WNIDS[7] / "x.png", 7 if i % 2 else 8, 7)  # every other one right
    with pytest.warns(UserWarning, match="left out of the mCE: .*speckle_noise"):
        r = bench(root, "auto")
    assert r["benchmark"] == "imagenet-c" and len(r["corruptions"]) == 19 and r["n"] == 19
    assert "19 corruption folder(s) (19 known" in r["detection"]
    ces = [r["corruptions"][c]["mean_error"] / ALEXNET_ERRORS[c] for c in sorted(ALEXNET_ERRORS)]
    assert r["mce"] == pytest.approx(sum(ces) / 15)
    assert r["complete"] is False and r["missing_corruptions"] == [] and len(r["incomplete_corruptions"]) == 15
    md = markdown_table([r])
    assert " (incomplete) |" in md and "fewer than 5 severities for brightness" in md


@pytest.mark.parametrize("kind", ["imagenet-a", "imagenet-r"])
def test_imagenet_a_r_detected_from_their_class_sets(tmp_path, kind):
    subset = robustness_subset_wnids(kind)
    root = tmp_path / "some_benchmark"
    for w in subset:
        (root / w).mkdir(parents=True)
    outside = next(i for i, w in enumerate(WNIDS) if w not in subset)
    code_image(root / subset[0] / "a.png", outside, WNIDS.index(subset[0]))  # right only over the 200 classes
    with pytest.warns(UserWarning, match="without images"):
        r = bench(root, "auto")
    assert r["benchmark"] == kind and r["top1"] == 100.0 and "200-class set" in r["detection"]


def test_wnids_inside_a_200_class_set_are_refused(tmp_path):
    r_set = robustness_subset_wnids("imagenet-r")
    root = tmp_path / "few_classes"
    for w in r_set[:3]:
        code_image(root / w / "a.png", WNIDS.index(w), 0)
    with pytest.raises(ValueError, match="belong to the 200-class set of .*imagenet-r.*--benchmark folder"):
        bench(root, "auto")
    assert bench(root, "folder")["top1"] == 100.0


def test_relative_mce_and_incomplete_marking(tmp_path):
    from transnext.engine.evaluate import ALEXNET_CLEAN_ERROR

    root = tmp_path / "imagenet-c"
    w = WNIDS[7]
    for (c, s), imgs in {("fog", 1): [(7, 7), (1, 1)], ("fog", 2): [(1, 1), (2, 2)], ("snow", 1): [(7, 7), (7, 7)],
                         ("snow", 2): [(7, 7), (3, 3)]}.items():
        for i, (k1, k2) in enumerate(imgs):
            code_image(root / c / str(s) / w / f"{i}.png", k1, k2)
    tf = build_eval_transform(32, crop_pct=1.0, mean=MEAN, std=STD)
    r = run_benchmark(CodeModel(), root, "auto", tf, batch_size=4, num_workers=0, clean_top1=80.0)
    # fog: mean error 75, snow 25; clean error 20
    rel_fog = (75 - 20) / (100 * (ALEXNET_ERRORS["fog"] - ALEXNET_CLEAN_ERROR)) * 100
    rel_snow = (25 - 20) / (100 * (ALEXNET_ERRORS["snow"] - ALEXNET_CLEAN_ERROR)) * 100
    assert r["corruptions"]["fog"]["relative_ce"] == pytest.approx(rel_fog)
    assert r["relative_mce"] == pytest.approx((rel_fog + rel_snow) / 2) and r["clean_top1"] == 80.0
    md = markdown_table([r])
    row = next(line for line in md.splitlines() if line.startswith("| imagenet-c |"))
    assert f"| {r['mce']:.2f} (incomplete) | {r['relative_mce']:.2f} (incomplete) |" in row
    assert "13 of 15 corruptions missing" in md and "fewer than 5 severities for fog, snow" in md


def test_imagenet_c_keeps_its_own_protocol():
    from PIL import Image

    from transnext.engine.evaluate import benchmark_transform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    cfg = dict(img_size=384, crop_pct=None, interpolation="bicubic", mean=list(MEAN), std=list(STD))
    tf_c, desc_c = benchmark_transform("imagenet-c", cfg)
    tf_m, desc_m = benchmark_transform("imagenet-a", cfg)
    x = tf_c(img)
    want = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(
        STD)[:, None, None]
    torch.testing.assert_close(x, want)  # pixels untouched: no resize, the crop keeps all 224 x 224
    assert desc_c == "ImageNet-C protocol: centre crop 224, no resize"
    assert tf_m(img).shape == (3, 384, 384) and desc_m == "resize to 384x384 (bicubic)"
    assert benchmark_transform("imagenet-c", cfg, "model")[0](img).shape == (3, 384, 384)
    cfg224 = dict(cfg, img_size=224)
    assert benchmark_transform("folder", cfg224)[1] == "resize short side to 256 (bicubic), centre crop 224"


def test_cli_eval_says_what_it_detected_and_uses_the_c_protocol(tmp_path):
    ck = tmp_path / "in1k.pth"
    save_tiny_checkpoint(ck, num_classes=1000, img_size=48)
    c_root = tmp_path / "c_data"
    code_image(c_root / "fog" / "1" / WNIDS[3] / "a.png", 3, 3)
    sketch = tmp_path / "sketch"
    code_image(sketch / WNIDS[3] / "a.png", 3, 3)
    out = tmp_path / "r.json"
    r = run_cli("eval", str(c_root), str(sketch), "--checkpoint", str(ck), "--num-workers", "0", "--no-progress",
                "--clean-top1", "70", "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{c_root}: imagenet-c (from the layout: 1 corruption folder(s)" in r.stderr
    assert "transform: ImageNet-C protocol: centre crop 224, no resize" in r.stderr
    sketch_line = f"{sketch}: imagenet-sketch (from the folder name 'sketch'); transform: resize short side to 48 (bicubic), centre crop 48"
    assert sketch_line in r.stderr
    res = {x["benchmark"]: x for x in json.loads(out.read_text())["results"]}
    assert res["imagenet-c"]["transform"].startswith("ImageNet-C protocol") and res["imagenet-c"]["relative_mce"] is not None
    assert res["imagenet-sketch"]["detection"] == "from the folder name 'sketch'"
    # an ambiguous folder stops the command before anything runs, naming --benchmark
    numbers = tmp_path / "numbers"
    code_image(numbers / "5" / "a.png", 5, 5)
    r = run_cli("eval", str(numbers), "--checkpoint", str(ck), "--num-workers", "0", "--no-progress")
    assert r.returncode == 1 and "--benchmark imagenet-v2 or --benchmark folder" in r.stderr
    r = run_cli("eval", str(numbers), "--benchmark", "imagenet-v2", "--checkpoint", str(ck), "--num-workers", "0", "--no-progress")
    assert r.returncode == 0 and "imagenet-v2 (given)" in r.stderr
