"""The embedded-demo job (``transnext demo``): train, evaluate, write outputs, predict."""

from __future__ import annotations

import json

import pytest

from train_helpers import run_cli

pytest.importorskip("timm")
pytest.importorskip("matplotlib")


def _check_outputs(out, min_top1: float) -> dict:
    summary = json.loads((out / "demo_summary.json").read_text())
    for name in ("best.pth", "last.pth", "metrics.jsonl", "curves.png", "config.yaml", "eval.md"):
        assert (out / name).is_file(), name
    # selection on the 827 validation images, the report on the 1,459 held-out test images
    assert summary["test_images"] == 1459 and summary["val_images"] == 827 and summary["train_images"] == 7430
    assert summary["chance_top1"] == 10 and 89 < summary["pixel_1nn_top1"] < 92
    assert summary["test_top1"] > min_top1
    preds = summary["predictions"]
    assert len(preds) == 10 and all(len(p["predictions"]) == 3 for p in preds)
    assert len(list((out / "heldout_test").rglob("*.png"))) == 1459
    return summary


def test_demo_one_epoch(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--output", str(out), "--epochs", "1", "--no-progress", check=True)
    assert "held-out test top-1" in r.stdout and "predictions on held-out images" in r.stdout
    assert "pixel 1-nearest-neighbour 90.20%, chance 10%" in r.stdout
    _check_outputs(out, min_top1=35.0)  # chance: 10%


@pytest.mark.slow
def test_demo_full_preset(tmp_path):
    out = tmp_path / "demo"
    run_cli("demo", "--output", str(out), "--no-progress", check=True, subprocess_=True, timeout=1800)
    s = _check_outputs(out, min_top1=91.0)  # above the pixel 1-NN baseline (90.2%)
    assert s["test_top1"] > s["pixel_1nn_top1"]
    assert s["predicted_correctly"] >= 7


def test_demo_training_repeats_exactly(tmp_path):
    """Two runs of the demo recipe on one machine end with the same weights and the same figures."""
    import torch

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_cli("train", "--preset", "demo", "--max-steps", "6", "--eval-every", "1", "--output", str(out), "--no-progress", check=True)
        sd = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((sd, [{k: v for k, v in m.items() if "time" not in k and not k.endswith("_s")} for m in metrics]))
    (sd_a, m_a), (sd_b, m_b) = runs
    assert m_a == m_b and any("val" in k for m in m_a for k in m)
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        if isinstance(sd_a[k], torch.Tensor):
            assert torch.equal(sd_a[k], sd_b[k]), k
