"""The embedded dense demos: the trunk starts from the classification demo's model, the scenes, the 11-class segmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from transnext.engine.presets import DEMO_ARCH


def _cls_checkpoint(path: Path, arch: dict | None = None, seed: int = 0) -> Path:
    """A classification checkpoint of the demo architecture, as ``transnext demo`` writes it (random weights)."""
    from transnext.models.registry import create_model

    torch.manual_seed(seed)
    model = create_model("transnext_micro", num_classes=10, img_size=32, pretrain_size=64, **(arch or DEMO_ARCH))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 19}, path)
    return path


@pytest.fixture
def fake_cls_training(monkeypatch, tmp_path: Path) -> list:
    """``transnext.engine.trainer.train`` replaced by one that writes a demo-architecture checkpoint; records its configs."""
    import transnext.engine.trainer as trainer

    calls: list = []

    def fake_train(cfg, *args, **kwargs):
        calls.append(cfg)
        _cls_checkpoint(Path(cfg.output) / "best.pth")
        (Path(cfg.output) / "last.pth").write_bytes(b"optimizer state")
        return {"best_metrics": {"top1": 97.0}}

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setenv("TRANSNEXT_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_demo_recipes_use_the_classification_demo_architecture() -> None:
    from transnext.dense.config import DENSE_RECIPES, SegmentationConfig, resolve_dense_config

    for name in ("detect_demo", "segment_demo"):
        r = DENSE_RECIPES[name]
        assert dict(r["model_kwargs"]) == DEMO_ARCH and r["model"] == "transnext_micro"
        assert (r["pos_bias"], r["pretrain_size"]) == ("extrapolate", 64)  # the position bias as the classification demo trained it
        assert r.get("backbone_weights") is None  # `train --preset` keeps its random / --backbone-weights start
    seg = resolve_dense_config(SegmentationConfig, "segment_demo")
    assert (seg.num_classes, seg.foreground_only) == (11, False)


def test_demo_backbone_trained_once_on_the_classification_training_split(fake_cls_training: list, tmp_path: Path) -> None:
    from transnext.dense.workflow import demo_backbone

    first = demo_backbone(progress=False)
    assert first.is_file() and first.parent.parent == tmp_path / "cache" / "demo_backbone"
    (cfg,) = fake_cls_training
    assert (cfg.preset, cfg.dataset, cfg.train_split, cfg.resume) == ("demo", "demo", "train", "auto")
    assert dict(cfg.model_kwargs) == DEMO_ARCH
    assert not (first.parent / "last.pth").exists()  # optimizer state dropped from the cache
    assert not list(first.parent.parent.glob("*.partial"))
    assert demo_backbone(progress=False) == first and len(fake_cls_training) == 1  # cached: no second training
    other = demo_backbone(progress=False, overrides={"epochs": 2})  # another preset: another cache entry
    assert other != first and len(fake_cls_training) == 2 and fake_cls_training[1].epochs == 2


@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_demo_trunk_gets_the_classification_weights(kind: str, fake_cls_training: list, tmp_path: Path) -> None:
    from transnext.dense.modeling import build_dense_model, dense_arch
    from transnext.dense.workflow import _demo_common

    cfg, _ = _demo_common(kind, tmp_path / "run", None, None, False, None, None)
    ck = Path(cfg.backbone_weights)
    assert ck.is_file() and len(fake_cls_training) == 1
    model = build_dense_model(dense_arch(cfg, 11, kind), backbone_weights=cfg.backbone_weights)
    trunk = (model.backbone.body if kind == "detect" else model.backbone).model.state_dict()
    ref = torch.load(ck, weights_only=True)["model"]
    params = [k for k in ref if not k.startswith("head.") and k in trunk and "relative_coords" not in k]
    assert len(params) > 50
    for k in params:
        torch.testing.assert_close(trunk[k], ref[k], msg=k)
    # a fresh trunk differs: the weights came from the checkpoint
    fresh = (build_dense_model(dense_arch(cfg, 11, kind)).backbone)
    fresh_sd = (fresh.body if kind == "detect" else fresh).model.state_dict()
    assert not torch.equal(fresh_sd["patch_embed1.proj.weight"], trunk["patch_embed1.proj.weight"])


def test_demo_trunk_load_is_strict(fake_cls_training: list, tmp_path: Path) -> None:
    from transnext.checkpoints import CheckpointError
    from transnext.dense.modeling import build_dense_model, dense_arch
    from transnext.dense.workflow import _demo_common

    other = _cls_checkpoint(tmp_path / "small.pth", dict(DEMO_ARCH, embed_dims=(24, 48, 96, 192)))
    cfg, _ = _demo_common("detect", tmp_path / "run", None, None, False, None, {"backbone_weights": str(other)})
    assert cfg.backbone_weights == str(other) and not fake_cls_training  # named weights win, nothing trained
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_dense_model(dense_arch(cfg, 11, "detect"), backbone_weights=cfg.backbone_weights)


def test_demo_backbone_weights_null_means_random_init(fake_cls_training: list, tmp_path: Path) -> None:
    from transnext.dense.workflow import _demo_common

    conf = tmp_path / "scratch.yaml"
    conf.write_text("backbone_weights: null\n")
    cfg, _ = _demo_common("segment", tmp_path / "run", None, None, False, str(conf), None)
    assert cfg.backbone_weights is None and not fake_cls_training
    cfg, _ = _demo_common("segment", tmp_path / "run", None, None, False, None, {"backbone_weights": "demo"})
    assert Path(cfg.backbone_weights).is_file() and len(fake_cls_training) == 1


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "demo_manifest.json":
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_dense_demo_scenes_deterministic_per_seed(tmp_path: Path) -> None:
    from transnext.data.dense_demo import write_dense_demo

    counts = {"train": 4, "val": 2, "test": 2}
    a = _digest(write_dense_demo(tmp_path / "a", size=64, counts=counts, seed=0))
    assert _digest(write_dense_demo(tmp_path / "b", size=64, counts=counts, seed=0)) == a
    assert _digest(write_dense_demo(tmp_path / "c", size=64, counts=counts, seed=1)) != a


def test_dense_demo_held_out_scenes_use_no_silhouette_the_trunk_saw() -> None:
    import numpy as np

    from transnext.data.demo import demo_split
    from transnext.data.dense_demo import _split_pool

    seen = {x.tobytes() for x in demo_split("train")[0]} | {x.tobytes() for x in demo_split("val")[0]}
    for split in ("val", "test"):
        pool, _ = _split_pool(split)
        assert len(pool) > 500 and not any(np.ascontiguousarray(x).tobytes() in seen for x in pool)
    val, test = ({x.tobytes() for x in _split_pool(s)[0]} for s in ("val", "test"))
    assert not val & test


def test_segment_demo_trains_eleven_classes(tmp_path: Path) -> None:
    import numpy as np

    from transnext.data.dense_demo import SEGMENT_DEMO_CLASSES, write_dense_demo
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.tasks import segmentation_dataset

    root = write_dense_demo(tmp_path / "data", size=64, counts={"train": 6, "val": 2, "test": 2})
    cfg = resolve_dense_config(SegmentationConfig, "segment_demo", None, {"data_dir": str(root), "output": str(tmp_path / "run")})
    ds = segmentation_dataset(cfg, "train", train=False)
    assert ds.num_classes == 11 and list(ds.classes) == list(SEGMENT_DEMO_CLASSES)
    values = np.unique(np.concatenate([ds.load_label(lab).ravel() for _, lab in ds.pairs]))
    assert values.min() == 0 and values.max() >= 2 and values.max() <= 10  # background and animal classes, no merging


def test_demo_with_another_trunk_starts_random(fake_cls_training: list, tmp_path: Path) -> None:
    from transnext.dense.workflow import _demo_common

    small = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2])
    cfg, _ = _demo_common("detect", tmp_path / "run", None, None, False, None, {"model_kwargs": small})
    assert cfg.backbone_weights is None and not fake_cls_training  # the demo weights would not fit: nothing trained
    cfg, _ = _demo_common("detect", tmp_path / "run", None, None, False, None, {"model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                                                                   for k, v in DEMO_ARCH.items()}})
    assert Path(cfg.backbone_weights).is_file()  # the demo architecture spelt with lists (YAML) still gets them
