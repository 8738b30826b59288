"""Data sets, class lists, samplers and transforms."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from train_helpers import (
    make_image_folder,
    one_thread,  # noqa: F401
    write_corrupt,
)

pytest.importorskip("timm")
pytest.importorskip("PIL")

pytestmark = pytest.mark.usefixtures("one_thread")

from transnext.data import (  # noqa: E402
    DataError,
    ImageFileDataset,
    ResumableSampler,
    SeededDataset,
    build_eval_transform,
    build_train_sampler,
    build_train_transform,
    collate_skip,
    demo_dataset,
    find_images,
    imagenet_class_names,
    imagenet_wnids,
    robustness_subset_wnids,
    scan_image_folder,
)


def test_scan_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found.*ImageFolder layout"):
        scan_image_folder(tmp_path / "nope")


def test_scan_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        scan_image_folder(tmp_path)


def test_scan_images_without_class_folders(tmp_path):
    make_image_folder(tmp_path / "x", classes=1, per_class=2, splits=("train",))
    flat = tmp_path / "flat"
    (tmp_path / "x" / "train" / "class_0").rename(flat)
    with pytest.raises(DataError, match="2 images but no class folders"):
        scan_image_folder(flat)


def test_scan_class_folder_without_images(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=2, splits=("train",))
    (tmp_path / "train" / "class_9").mkdir()
    (tmp_path / "train" / "class_9" / "notes.txt").write_text("no images here")
    with pytest.warns(UserWarning, match="1 class folder\\(s\\) without images: class_9"):
        samples, classes = scan_image_folder(tmp_path / "train")
    assert classes == ["class_0", "class_1", "class_9"]  # index reserved
    assert sorted({t for _, t in samples}) == [0, 1]
    with pytest.raises(DataError, match="without images: class_9.*strict"):
        scan_image_folder(tmp_path / "train", strict=True)


def test_scan_all_classes_empty(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no image files in any of its 2 class folders"):
        scan_image_folder(tmp_path)


def test_scan_unknown_class(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=1, splits=("val",))
    with pytest.raises(DataError, match="not known.*class_1"):
        scan_image_folder(tmp_path / "val", class_to_idx={"class_0": 0})


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_images_skipped_or_strict(tmp_path, kind):
    make_image_folder(tmp_path, classes=1, per_class=2, splits=("train",))
    bad = write_corrupt(tmp_path / "train" / "class_0" / "zz_bad.png", kind)
    samples, classes = scan_image_folder(tmp_path / "train")
    from torchvision.transforms import ToTensor

    ds = ImageFileDataset(samples, transform=ToTensor())
    idx = [p for p, _ in samples].index(str(bad))
    with pytest.warns(UserWarning, match="cannot read image .*zz_bad.png.*skipped"):
        assert ds[idx] is None
    batch = collate_skip([ds[i] for i in range(len(ds)) if i != idx] + [None])
    assert batch[2] == 1
    strict = ImageFileDataset(samples, transform=None, strict=True)
    with pytest.raises(DataError, match="zz_bad.png.*without --strict-data"):
        strict[idx]


def test_collate_all_skipped():
    assert collate_skip([None, None]) == (None, None, 2)


def test_find_images(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=2, splits=("train",))
    found = find_images([tmp_path / "train", tmp_path / "train" / "class_0" / "img_0.png"])
    assert len(found) == 5
    with pytest.raises(DataError, match="not found"):
        find_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in folder"):
        find_images([tmp_path / "empty"])


def test_seeded_dataset_reproducible_and_isolated(tmp_path):
    make_image_folder(tmp_path, classes=1, per_class=2, size=40, splits=("train",))
    samples, _ = scan_image_folder(tmp_path / "train")
    tf = build_train_transform(32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    ds = SeededDataset(ImageFileDataset(samples, tf))
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a1, _ = ds[(0, 77)]
    a2, _ = ds[(0, 77)]
    b, _ = ds[(0, 78)]
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_resumable_sampler_skips_exactly():
    ds = list(range(23))
    full = list(_sampler(ds, 0))
    part = list(_sampler(ds, 8))
    assert part == full[8:]
    assert len(_sampler(ds, 8)) == len(full) - 8
    other_epoch = _sampler(ds, 0)
    other_epoch.set_epoch(4)
    assert [i for i, _ in other_epoch] != [i for i, _ in full]


def _sampler(ds, start: int) -> ResumableSampler:
    s = build_train_sampler(ds, seed=3, rank=0, world_size=1)
    s.set_epoch(2, start=start)
    return s


def test_repeated_aug_sampler_under_ddp_shards():
    ds = list(range(12))
    shards = [build_train_sampler(ds, seed=0, rank=r, world_size=2, repeated_aug=3) for r in (0, 1)]
    for s in shards:
        s.set_epoch(0)
    got = [[i for i, _ in s] for s in shards]
    assert len(got[0]) == len(got[1]) == 6  # RASampler: len(ds) / world samples per rank and epoch
    # repeats of one image land on different ranks (each sees a different augmentation)
    assert set(got[0]) & set(got[1])


def test_demo_dataset():
    train, val, test = demo_dataset("train"), demo_dataset("val"), demo_dataset("test")
    assert train.classes == ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    # selection (val) is carved out of the 8,257 development images; the 1,459 test images stay held out
    assert (len(train), len(val), len(test)) == (7430, 827, 1459) and len(train) + len(val) == 8257
    assert np.bincount(val.labels, minlength=10).min() >= 60 and np.bincount(test.labels, minlength=10).min() > 100
    img, label = train[0]
    assert img.size == (28, 28) and img.mode == "RGB" and 0 <= label < 10
    train_h = {bytes(x.tobytes()) for x in train.images}
    val_h = {bytes(x.tobytes()) for x in val.images}
    assert not any(bytes(x.tobytes()) in train_h or bytes(x.tobytes()) in val_h for x in test.images), "test images leak"
    assert not train_h & val_h, "validation images leak into train"
    assert np.array_equal(demo_dataset("val").images, val.images)  # the split is fixed
    with pytest.raises(DataError, match="splits 'train', 'val', 'test'"):
        demo_dataset("holdout")


def test_pixel_nearest_neighbour_baseline():
    from transnext.data.demo import nearest_neighbour_top1

    train = (np.array([[[0, 0]], [[10, 10]], [[20, 0]]], np.uint8), np.array([0, 1, 2]))
    test = (np.array([[[1, 1]], [[9, 12]], [[19, 1]], [[11, 9]]], np.uint8), np.array([0, 1, 1, 2]))
    # nearest: 0, 1, 2, 1 -> two of four right
    assert nearest_neighbour_top1(train, test, chunk=3) == 50.0


def test_imagenet_class_list():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # index order == sorted WordNet ids (ImageFolder order)
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    a, r = robustness_subset_wnids("imagenet-a"), robustness_subset_wnids("imagenet-r")
    assert len(a) == len(r) == 200 and set(a) <= set(wnids) and a != r


def test_eval_transform_rule():
    from PIL import Image

    img = Image.new("RGB", (400, 300), (10, 20, 30))
    t224 = build_eval_transform(224)  # resize short side to 256, centre crop 224
    t384 = build_eval_transform(384)  # squash to 384x384
    assert tuple(t224(img).shape) == (3, 224, 224)
    assert tuple(t384(img).shape) == (3, 384, 384)
    resize = [t for t in t224.transforms if type(t).__name__ == "Resize"][0]
    assert resize.size in (256, [256])
    resize384 = [t for t in t384.transforms if type(t).__name__ == "Resize"][0]
    assert tuple(resize384.size) == (384, 384)


def test_train_transform_recipe():
    tf = build_train_transform(224)
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandomResizedCropAndInterpolation" in names and "RandAugment" in names and "RandomErasing" in names
    assert "ColorJitter" not in names  # colour jitter unused with RandAugment
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_train_transform(32, auto_augment=None, re_prob=0.0)


def test_one_source_for_constants():
    """Normalisation, the evaluation crop rule and the stochastic-depth rates live in the registry only."""
    import transnext.data.transforms as transforms
    from transnext.engine import PRESETS, TrainConfig
    from transnext.models import DROP_PATH_RATES, WEIGHTS, registry

    assert transforms.eval_crop is registry.eval_crop
    assert [registry.eval_crop(s) for s in (224, 256, 383, 384, 512)] == [
        (0.875, "center"), (0.875, "center"), (0.875, "center"), (1.0, "squash"), (1.0, "squash")]
    assert registry.eval_crop(384, 0.9) == (0.9, "center")
    for w in WEIGHTS.values():  # the published records follow the same rule
        assert (w.crop_pct, w.crop_mode) == registry.eval_crop(w.img_size)
    cfg = TrainConfig(data_dir="x")
    assert cfg.mean == transforms.IMAGENET_MEAN == registry.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert cfg.std == transforms.IMAGENET_STD == registry.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert {k: PRESETS[k]["drop_path"] for k in ("micro", "tiny", "small", "base", "micro_aaaa")} == {
        k.removeprefix("transnext_"): v for k, v in DROP_PATH_RATES.items()}
