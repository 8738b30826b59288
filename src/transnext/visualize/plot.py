"""Figures of the visualisations (matplotlib, from the optional ``visualize`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._common import require
from .attention import AttentionMaps
from .cam import CamResult
from .erf import ErfResult

__all__ = ["plot_attention", "plot_cam", "plot_erf"]

HEAT_CMAP = "inferno"
_OUTLINED: dict[str, Any] = {}  # text style readable on any background, filled in by _pyplot


def _pyplot() -> Any:
    mpl = require("matplotlib")
    mpl.use("Agg")  # files only: no display needed
    if not _OUTLINED:
        from matplotlib import patheffects

        _OUTLINED.update(color="white", path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
    return require("matplotlib.pyplot", "matplotlib")


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    from ..checkpoints import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png"))
    _pyplot().close(fig)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # an ordinary file, not the private temporary file's mode
    return path


def _rgb(image: Tensor) -> Any:
    """(3, H, W) in [0, 1] -> (H, W, 3) numpy for imshow."""
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


# ------------------------------------------------------------------------------------------- ERF
def plot_erf(results: Sequence[ErfResult], path: str | os.PathLike, dpi: int = 100) -> Path:
    """The ERF heat maps side by side, each titled with its model and area ratios."""
    plt = _pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.8, 4.0), squeeze=False, layout="constrained")
    for ax, r in zip(axes[0], results):
        im = ax.imshow(r.heat.numpy(), cmap=HEAT_CMAP, vmin=0, vmax=1)
        stage = "output" if r.stage is None else f"stage {r.stage}"
        ax.set_title(f"{r.name} ({stage})", fontsize=10)
        masses = "/".join(f"{int(round(100 * t))}" for t in r.area_ratios)
        ratios = " / ".join(f"{v:.3f}" for v in r.area_ratios.values())
        ax.set_xlabel(f"area holding {masses}% of the mass:\n{ratios}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.75, label="log10(1 + |grad|), normalised")
    H, W = results[0].heat.shape
    fig.suptitle(f"Effective receptive field (mean of {results[0].num_images} images, {H}x{W})", fontsize=11)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------------------------- attention
def _density(maps: AttentionMaps, q: int, head: int | None) -> tuple[Tensor, Tensor]:
    """(fovea, periphery) attention weight per input pixel."""
    return maps.to_image(maps.fovea_grid(q, head)), maps.to_image(maps.periphery_grid(q, head))


def _mark_query(ax: Any, maps: AttentionMaps, q: int, window: bool = True) -> None:
    y, x = maps.queries[q]
    ax.plot([x], [y], marker="+", color="cyan", markersize=10, markeredgewidth=2)
    if window:
        s, r = maps.stride, maps.window // 2
        ty, tx = (int(v) for v in maps.tokens[q])
        import matplotlib.patches as patches

        ax.add_patch(patches.Rectangle(((tx - r) * s - 0.5, (ty - r) * s - 0.5), maps.window * s, maps.window * s,
                                       fill=False, edgecolor="cyan", linewidth=1))


def _log_norm(values: Sequence[Tensor]) -> Any:
    from matplotlib.colors import LogNorm

    positive = torch.cat([v[v > 0].flatten() for v in values])
    top = float(positive.max())
    return LogNorm(vmin=max(float(positive.min()), top * 1e-4), vmax=top)


def _combined(ax: Any, image: Tensor, maps: AttentionMaps, q: int, head: int | None, title: str, norm: Any = None) -> Any:
    total = sum(_density(maps, q, head))
    ax.imshow(_rgb(image))
    im = ax.imshow(total.numpy(), cmap=HEAT_CMAP, alpha=0.65, norm=norm or _log_norm([total]))
    ax.set_title(title, fontsize=8)  # (no marker: the bright fovea is the query)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_attention(image: Tensor, maps: AttentionMaps, path: str | os.PathLike, dpi: int = 100, title: str | None = None) -> Path:
    """One query: input, fovea (zoomed window), periphery (pooled cells), both together, and per head.

    Several queries: one panel per query with both parts together (mean over heads).
    """
    plt = _pyplot()
    where = f"stage {maps.stage}, block {maps.block}, grid {maps.grid[0]}x{maps.grid[1]}, pooled {maps.pool[0]}x{maps.pool[1]}"
    head_text = title or "Aggregated attention"
    if len(maps.queries) > 1:
        n = len(maps.queries)
        cols = min(n, max(2, int(n**0.5 + 0.999)))
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        fovea = maps.fovea_mass().mean(dim=1)
        norm = _log_norm([sum(_density(maps, q, None)) for q in range(n)])  # one colour scale for all panels
        for q in range(n):
            im = _combined(axes.flat[q], image, maps, q, None, f"query {maps.queries[q]}: fovea {fovea[q]:.2f}", norm)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="attention weight per pixel (head mean)")
        fig.suptitle(f"{head_text}: {where}", fontsize=10)
        return _save(fig, path, dpi)

    h = maps.num_heads
    cols = max(4, min(h, 6))
    rows = 1 + -(-h // cols) if h > 1 else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    ax_in, ax_fovea, ax_periph, ax_both = axes[0, :4]
    for ax in axes[0, 4:]:
        ax.axis("off")
    rgb = _rgb(image)
    s, r, w = maps.stride, maps.window // 2, maps.window
    (H, W), (Hp, Wp) = maps.grid, maps.pool

    ax_in.imshow(rgb)
    _mark_query(ax_in, maps, 0)
    ax_in.set_title(f"query pixel (y, x) = {maps.queries[0]}\nwindow of {w}x{w} tokens", fontsize=9)

    # Fovea: the image around the window, the window weights (head mean) on top.
    ty, tx = (int(v) for v in maps.tokens[0])
    local = maps.local[0].mean(dim=0)
    y0, x0 = (ty - r - 1) * s, (tx - r - 1) * s
    size = (w + 2) * s
    crop = torch.zeros(3, size, size)
    iy0, ix0 = max(y0, 0), max(x0, 0)
    iy1, ix1 = min(y0 + size, image.shape[-2]), min(x0 + size, image.shape[-1])
    crop[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = image[:, iy0:iy1, ix0:ix1].float().cpu()
    ax_fovea.imshow(_rgb(crop * 0.5), extent=(-0.5, size - 0.5, size - 0.5, -0.5))  # dimmed: the weights go on top
    valid = torch.zeros(w, w, dtype=torch.bool)
    for dy in range(w):
        for dx in range(w):
            valid[dy, dx] = 0 <= ty + dy - r < H and 0 <= tx + dx - r < W
    shown = local.clone()
    shown[~valid] = float("nan")
    ax_fovea.imshow(shown.numpy(), cmap=HEAT_CMAP, alpha=0.6, vmin=0, vmax=float(local.max()),
                    extent=(s - 0.5, (w + 1) * s - 0.5, (w + 1) * s - 0.5, s - 0.5))
    for dy in range(w):
        for dx in range(w):
            label = f"{local[dy, dx]:.3f}" if valid[dy, dx] else "pad"
            ax_fovea.text((dx + 1.5) * s - 0.5, (dy + 1.5) * s - 0.5, label, ha="center", va="center", fontsize=7, **_OUTLINED)
    ax_fovea.set_xlim(-0.5, size - 0.5)
    ax_fovea.set_ylim(size - 0.5, -0.5)
    ax_fovea.set_title(f"fovea: {w}x{w} window (zoomed)\nweight {float(local.sum()):.2f}", fontsize=9)

    # Periphery: each pooled key's weight painted over its cell of the image.
    periph = maps.pooled[0].mean(dim=0)
    cells = torch.zeros(H, W)
    for i in range(Hp):
        a0, a1 = (i * H) // Hp, -((-(i + 1) * H) // Hp)
        for j in range(Wp):
            b0, b1 = (j * W) // Wp, -((-(j + 1) * W) // Wp)
            cells[a0:a1, b0:b1] = torch.maximum(cells[a0:a1, b0:b1], periph[i, j].float())
    cell_img = cells.repeat_interleave(s, 0).repeat_interleave(s, 1)[: image.shape[-2], : image.shape[-1]]
    ax_periph.imshow(rgb)
    extent = (-0.5, cell_img.shape[1] - 0.5, cell_img.shape[0] - 0.5, -0.5)
    ax_periph.imshow(cell_img.numpy(), cmap=HEAT_CMAP, alpha=0.6, vmin=0, extent=extent)
    if Hp * Wp <= 64:
        for i in range(Hp):
            for j in range(Wp):
                cy = ((i * H) // Hp + -((-(i + 1) * H) // Hp)) / 2 * s
                cx = ((j * W) // Wp + -((-(j + 1) * W) // Wp)) / 2 * s
                ax_periph.text(cx, cy, f"{periph[i, j]:.3f}", ha="center", va="center", fontsize=5.5, **_OUTLINED)
    _mark_query(ax_periph, maps, 0, window=False)
    ax_periph.set_xlim(-0.5, image.shape[-1] - 0.5)
    ax_periph.set_ylim(image.shape[-2] - 0.5, -0.5)
    ax_periph.set_title(f"periphery: {Hp}x{Wp} pooled keys\nweight {float(periph.sum()):.2f}", fontsize=9)

    im = _combined(ax_both, image, maps, 0, None, "both: weight per pixel\n(head mean, log scale)")
    fig.colorbar(im, ax=ax_both, shrink=0.8)
    if h > 1:
        fovea = maps.fovea_mass()[0]
        norm = _log_norm([sum(_density(maps, 0, k)) for k in range(h)])  # one colour scale for all heads
        for k in range(h):
            _combined(axes[1 + k // cols, k % cols], image, maps, 0, k, f"head {k}: fovea {fovea[k]:.2f}", norm)
        for ax in axes.flat[cols + h :]:
            ax.axis("off")
    fig.suptitle(f"{head_text}: {where}", fontsize=10)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------------------------------- CAM
def plot_cam(
    images: Tensor, results: Sequence[CamResult], classes: Sequence[str], path: str | os.PathLike,
    names: Sequence[str] | None = None, dpi: int = 100,
) -> Path:
    """One row per image: the image with its top-k labels, then each method's map overlaid."""
    plt = _pyplot()
    methods = list(results[0].maps)
    rows, cols = len(results), 1 + len(methods)
    # room for each row's title block (name + top-k lines), laid out by constrained layout so that
    # a title never runs into the row above
    lines = (1 if names else 0) + max(len(r.topk) for r in results)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, (2.8 + 0.16 * lines) * rows), squeeze=False,
                             constrained_layout=True)
    fig.get_layout_engine().set(h_pad=0.08, hspace=0.04)
    for i, r in enumerate(results):
        rgb = _rgb(images[i])
        top = "\n".join(f"{classes[c]} {100 * p:.1f}%" for c, p in r.topk)
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_title((f"{names[i]}\n" if names else "") + top, fontsize=7)
        for j, m in enumerate(methods):
            axes[i, 1 + j].imshow(rgb)
            axes[i, 1 + j].imshow(r.maps[m].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i, 1 + j].set_title(f"{m}: {classes[r.target]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path, dpi)
