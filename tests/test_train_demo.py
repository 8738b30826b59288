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
    assert summary["val_images"] == 1459 and summary["chance_top1"] == 10
    assert summary["val_top1"] > min_top1
    preds = summary["predictions"]
    assert len(preds) == 10 and all(len(p["predictions"]) == 3 for p in preds)
    assert len(list((out / "heldout_val").rglob("*.png"))) == 1459
    return summary


def test_demo_one_epoch(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--output", str(out), "--epochs", "1", "--no-progress", check=True)
    assert "held-out top-1" in r.stdout and "predictions on held-out images" in r.stdout
    _check_outputs(out, min_top1=35.0)  # chance: 10%


@pytest.mark.slow
def test_demo_full_preset(tmp_path):
    out = tmp_path / "demo"
    run_cli("demo", "--output", str(out), "--no-progress", check=True, subprocess_=True, timeout=1800)
    s = _check_outputs(out, min_top1=85.0)
    assert s["predicted_correctly"] >= 7
