"""JSON-lines metrics log and the training-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write

__all__ = ["MetricsLog", "plot_curves", "read_metrics"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the resumed step."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, global_step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("global_step", 0) <= global_step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: ignore it
            continue
    return out


def plot_curves(metrics_path: str | Path, png_path: str | Path, title: str = "",
                val_metrics: tuple[str, ...] = ("top1", "top5")) -> Path | None:
    """Training loss and learning rate per step; validation loss and ``val_metrics`` per evaluation.

    Evaluations come from ``epoch`` records (at epoch ends) and ``eval`` records (step-based runs).
    """
    rows = read_metrics(metrics_path)
    steps = [r for r in rows if r.get("event") == "step"]
    epochs = [r for r in rows if r.get("event") == "epoch"]
    if not steps and not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def x_of(r: dict[str, Any]) -> float:
        return r["epoch_float"] if r.get("event") == "eval" else r["epoch"] + 1

    evals = sorted((r for r in rows if r.get("event") in ("epoch", "eval")), key=lambda r: r.get("global_step", 0))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    if steps:
        ax.plot([r["epoch_float"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (steps)")
    ev = [r for r in epochs if r.get("train_loss") is not None]
    if ev:
        ax.plot([r["epoch"] + 1 for r in ev], [r["train_loss"] for r in ev], "o-", label="train (epoch mean)")
    vl = [r for r in evals if r.get("val_loss") is not None]
    if vl:
        ax.plot([x_of(r) for r in vl], [r["val_loss"] for r in vl], "s-", label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for name, style in zip(val_metrics, ("o-", "s--", "^:", "d-.")):
        va = [r for r in evals if r.get(f"val_{name}") is not None]
        if va:
            ax.plot([x_of(r) for r in va], [r[f"val_{name}"] for r in va], style, label=name)
    if any(r.get(f"val_{name}") is not None for r in evals for name in val_metrics):
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)" if set(val_metrics) <= {"top1", "top5"} else "validation metric")
    ax.grid(alpha=0.3)
    ax = axes[2]
    if steps:
        ax.plot([r["epoch_float"] for r in steps], [r["lr"] for r in steps])
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return png_path
