"""Size-dependent tables of TransNeXt: position-bias coordinates, padding masks, length scales.

Everything here is a pure function of grid sizes, so it is computed once per size on the CPU and
cached by the caller (:class:`StageGeometry` objects are small). The rounding of the reference
implementation is reproduced on purpose: coordinates are built with float32 ops, and the
length scales of Aggregated Attention are float32 logarithms (docs/model.md section 3).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AxisTable", "CpbTable", "GeometryTables", "ResolutionPlan", "StageGeometry", "build_cpb_table", "local_window_tables",
]

Size = tuple[int, int]


@dataclass(frozen=True)
class AxisTable:
    """Relative coordinates along one axis: unique log-spaced values and the index of each pair."""

    values: Tensor  # (U,) float32, unique transformed relative coordinates
    index: Tensor  # (Q, K) int64 into ``values``


@dataclass(frozen=True)
class CpbTable:
    """Continuous-position-bias inputs for a (query grid, key grid) pair.

    The bias of query (qy, qx) and key (ky, kx) is ``MLP(rows[y.index[qy,ky], x.index[qx,kx]])``;
    the MLP is evaluated once per unique (dy, dx) combination (``coords``).
    """

    query: Size
    key: Size
    y: AxisTable
    x: AxisTable

    @property
    def coords(self) -> Tensor:
        """(Uy * Ux, 2) float32 (dy, dx) inputs of the bias MLP, row-major over (uy, ux)."""
        gy, gx = torch.meshgrid(self.y.values, self.x.values, indexing="ij")
        return torch.stack([gy, gx], dim=-1).reshape(-1, 2)


def _axis_table(query_len: int, key_len: int, pretrain_len: int) -> AxisTable:
    # float32 throughout, exactly as the reference builds its table, then cast by the caller.
    q = torch.arange(query_len, dtype=torch.float32)
    k = F.adaptive_avg_pool1d(q.unsqueeze(0), key_len).squeeze(0)
    rel = (q[:, None] - k[None, :]) / (pretrain_len - 1) * 8
    rel = torch.sign(rel) * torch.log2(torch.abs(rel) + 1.0) / torch.log2(torch.tensor(8, dtype=torch.float32))
    values, index = torch.unique(rel.reshape(-1), return_inverse=True)
    return AxisTable(values=values, index=index.reshape(query_len, key_len))


def build_cpb_table(query: Size, key: Size, pretrain: Size) -> CpbTable:
    """Coordinates of every (query, key) pair, normalised by the pretraining grid ``pretrain``."""
    if min(pretrain) < 2:
        raise ValueError(
            f"pretrain grid {pretrain} is too small: the position bias normalises by (grid - 1), "
            "so every stage needs a pretraining grid of at least 2 (pretrain_size >= 64)"
        )
    return CpbTable(
        query=tuple(query),
        key=tuple(key),
        y=_axis_table(query[0], key[0], pretrain[0]),
        x=_axis_table(query[1], key[1], pretrain[1]),
    )


def local_window_tables(size: Size, window: int) -> tuple[Tensor, Tensor]:
    """Valid-key count per pixel (N,) float32 and padding mask (N, window*window) bool.

    The window is centred on each pixel and zero-padded at the border; slots are ordered
    row-major over (dy, dx).
    """
    H, W = size
    r = window // 2
    offsets = torch.arange(window) - r
    pos_y = torch.arange(H)[:, None] + offsets[None, :]
    pos_x = torch.arange(W)[:, None] + offsets[None, :]
    valid_y = (pos_y >= 0) & (pos_y < H)
    valid_x = (pos_x >= 0) & (pos_x < W)
    valid = valid_y[:, None, :, None] & valid_x[None, :, None, :]  # (H, W, w, w)
    valid = valid.reshape(H * W, window * window)
    return valid.sum(-1).to(torch.float32), ~valid


@dataclass
class StageGeometry:
    """All size-dependent tables one stage needs for one input grid.

    ``pool`` is the pooled key grid of Aggregated Attention (``None`` for full attention).
    ``cpb`` is the table to evaluate the bias MLP on; when ``interpolate_from`` is set, the MLP
    is evaluated on that (trained) grid and resized bilinearly to ``size`` / ``pool``.
    """

    size: Size
    pool: Size | None
    window: int | None
    cpb: CpbTable
    interpolate: bool = False
    float32_full_scale: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.pool is None:
            # A Python float computed when the geometry is built (outside any compiled graph): a
            # tensor op here would be a graph break on every forward under torch.compile.
            n = float(self.num_tokens)
            full = float(torch.log(torch.tensor(n, dtype=torch.float32))) if self.float32_full_scale else math.log(n)
            self._cache["full_scale"] = full

    @property
    def num_tokens(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def key_size(self) -> Size:
        return self.pool if self.pool is not None else self.size

    @property
    def num_keys(self) -> int:
        return self.key_size[0] * self.key_size[1]

    def _local(self) -> tuple[Tensor, Tensor]:
        if "local" not in self._cache:
            self._cache["local"] = local_window_tables(self.size, self.window)
        return self._cache["local"]

    def padding_mask(self, device: torch.device) -> Tensor:
        """(N, window*window) bool, True where a window slot falls outside the image."""
        key = ("mask", device)
        if key not in self._cache:
            self._cache[key] = self._local()[1].to(device)
        return self._cache[key]

    def length_scale(self, dtype: torch.dtype, device: torch.device) -> Tensor | float:
        """ln(number of keys each query sees): (N, 1) tensor, or a float for full attention."""
        if self.pool is None:
            return self._cache["full_scale"]
        key = ("scale", dtype, device)
        if key not in self._cache:
            count = self._local()[0] + float(self.num_keys)
            self._cache[key] = torch.log(count).unsqueeze(-1).to(device=device, dtype=dtype)
        return self._cache[key]

    def bias_taps(self, dtype: torch.dtype, device: torch.device) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Per-axis taps ((index, weight) for y, then x) from the bias-MLP table to the actual grids.

        Extrapolation: one tap per (query, key) pair; interpolation: the bilinear resizing of
        the trained-grid bias to (size, key_size), up to four taps per axis (see
        :func:`transnext.models.position_bias.axis_taps`).
        """
        from .position_bias import axis_taps

        key = ("taps", dtype, device)
        if key not in self._cache:
            (H, W), (kh, kw) = self.size, self.key_size
            y = axis_taps(self.cpb.y.index, H, kh, self.interpolate, dtype)
            x = axis_taps(self.cpb.x.index, W, kw, self.interpolate, dtype)
            self._cache[key] = tuple((i.to(device), w.to(device)) for i, w in (y, x))
        return self._cache[key]

    def cpb_inputs(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(coords (U, 2), index_y (Qh, Kh), index_x (Qw, Kw)) on ``device``."""
        key = ("cpb", dtype, device)
        if key not in self._cache:
            t = self.cpb
            self._cache[key] = (
                t.coords.to(device=device, dtype=dtype),
                t.y.index.to(device),
                t.x.index.to(device),
            )
        return self._cache[key]


# ---------------------------------------------------------------------------------------------
# The resolution plan: every size rule of the model in one frozen object.

POS_BIAS_MODES = ("extrapolate", "interpolate")


def _stage_scale(stage: int) -> int:
    return 2 ** (stage + 2)


@dataclass(frozen=True)
class ResolutionPlan:
    """How a TransNeXt maps an input size to its stage grids and tables (docs/model.md section 5).

    ``img_size``: the grid of the position bias in ``interpolate`` mode (and the default input
    size); ``pretrain_size``: the size bias coordinates are normalised by; ``pos_bias``:
    ``extrapolate`` or ``interpolate``; ``fixed_pool_size``: linear mode (P x P pooled keys);
    ``sr_ratios`` / ``windows``: per stage (sr 1 = full attention). Validated on construction, so
    a plan that exists is one the model can run; :meth:`replace` builds a new validated plan.
    """

    img_size: Size
    pretrain_size: Size
    pos_bias: str
    fixed_pool_size: int | None
    sr_ratios: tuple[int, ...]
    windows: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.pos_bias not in POS_BIAS_MODES:
            raise ValueError(f"pos_bias must be one of {POS_BIAS_MODES}, got {self.pos_bias!r}")
        fixed = self.fixed_pool_size
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 1):
            raise ValueError(f"fixed_pool_size must be a positive int or None, got {fixed!r}")
        for i in range(len(self.sr_ratios)):
            grid = tuple(s // _stage_scale(i) for s in self.pretrain_size)
            if min(grid) < 2:
                raise ValueError(
                    f"pretrain_size {self.pretrain_size} gives a {grid} grid at stage {i + 1}; the position "
                    "bias needs at least 2 per axis (pretrain_size >= 64)"
                )

    def replace(self, **changes) -> ResolutionPlan:
        """A new plan with ``changes`` applied, validated like a new one."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    def stage_grids(self, size: Size) -> list[Size]:
        """Feature-map size of each stage for an input of ``size`` = (H, W) (Conv2d arithmetic)."""
        h, w = size
        grids = []
        for i in range(len(self.sr_ratios)):
            k, s = (7, 4) if i == 0 else (3, 2)
            h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
            grids.append((h, w))
        return grids

    def pool_grid(self, stage: int, grid: Size) -> Size | None:
        """Pooled key grid of a stage (None for full attention)."""
        sr = self.sr_ratios[stage]
        if sr == 1:
            return None
        if self.fixed_pool_size is not None:
            return (self.fixed_pool_size, self.fixed_pool_size)
        return (grid[0] // sr, grid[1] // sr)

    def problem(self, size: Size) -> tuple[str, bool] | None:
        """Why an input of ``size`` cannot run, and whether a larger input would: None when it can."""
        H, W = size
        for i, grid in enumerate(self.stage_grids((H, W))):
            if min(grid) < 1:
                return f"input {H}x{W} is too small: stage {i + 1} would have an empty feature map", True
            sr = self.sr_ratios[i]
            if sr == 1:
                continue
            if self.fixed_pool_size is not None:
                if self.fixed_pool_size > min(grid):
                    return (f"fixed_pool_size={self.fixed_pool_size} is larger than the stage {i + 1} feature map "
                            f"{grid[0]}x{grid[1]} (input {H}x{W}); use fixed_pool_size <= {min(grid)} or a larger input"), False
            elif min(grid) < sr:
                return (f"input {H}x{W} is too small: stage {i + 1} feature map {grid[0]}x{grid[1]} is smaller than its "
                        f"sr_ratio {sr}, so the pooled key grid would be empty"), True
        return None

    @functools.cached_property
    def min_input_size(self) -> int:
        """Smallest square input every stage accepts (computed once per plan)."""
        for s in range(1, 8193):
            if self.problem((s, s)) is None:
                return s
        raise ValueError(f"no input size up to 8192 fits {self}")

    def check(self, size: Size) -> None:
        """Raise ValueError with the reason (and the minimum size) if an input of ``size`` cannot run."""
        found = self.problem(size)
        if found is None:
            return
        message, too_small = found
        if too_small:
            m = self.min_input_size
            message += f"; the minimum input is {m}x{m}"
        raise ValueError(message)

    def build(self, stage: int, grid: Size) -> StageGeometry:
        """All tables of ``stage`` at feature-map ``grid``."""
        pool = self.pool_grid(stage, grid)
        scale = _stage_scale(stage)
        pretrain = (self.pretrain_size[0] // scale, self.pretrain_size[1] // scale)
        interpolate = self.pos_bias == "interpolate"
        if interpolate:
            query = (self.img_size[0] // scale, self.img_size[1] // scale)
            if pool is None:
                key = query
            elif self.fixed_pool_size is not None:
                key = pool
            else:
                key = (query[0] // self.sr_ratios[stage], query[1] // self.sr_ratios[stage])
            if min(key) < 1:
                raise ValueError(f"img_size {self.img_size} is too small for the interpolated bias of stage {stage + 1}")
        else:
            query, key = grid, pool if pool is not None else grid
        return StageGeometry(
            size=grid,
            pool=pool,
            window=(self.windows[stage] or 3) if pool is not None else None,
            cpb=build_cpb_table(query, key, pretrain),
            interpolate=interpolate,
            float32_full_scale=interpolate,  # the reference dense backbone rounds ln(N) to float32
        )


class GeometryTables(nn.Module):
    """The model's :class:`ResolutionPlan` and its per-size table cache, as a parameter-free module.

    Being a module lets FX symbolic tracing keep the table lookup as one call (a leaf module:
    the sizes are only known when the traced graph runs).
    """

    MAX_CACHED = 32  # (stage, grid) entries; bounded so many sizes in one process stay cheap

    def __init__(self, plan: ResolutionPlan) -> None:
        super().__init__()
        self._plan = plan
        self._cache: dict = {}

    @property
    def plan(self) -> ResolutionPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: ResolutionPlan) -> None:
        self._plan = plan
        self._cache.clear()

    @torch.compiler.disable
    def _build(self, stage: int, grid: Size) -> StageGeometry:
        return self._plan.build(stage, grid)

    @torch.compiler.disable
    def _build_stages(self, grids: list[Size]) -> None:
        if len(self._cache) + len(grids) > self.MAX_CACHED:
            self._cache.clear()
        for stage, grid in enumerate(grids):
            key = (stage, *grid)
            if key not in self._cache:
                self._cache[key] = self._plan.build(stage, grid)

    def prepare(self, image_size: Size) -> None:
        """Build the tables of every stage for an input of ``image_size`` in one call.

        The table construction is kept out of compiled graphs (``torch.compiler.disable``). Done
        per stage inside the stage loop, a cold cache would break a compiled forward's graph once
        per stage at the same code location, and the recompiled resume frames (stage inputs of
        different shapes) would turn dynamic; here a cold cache costs one break before the first
        tensor operation and a warm one none.
        """
        grids = self._plan.stage_grids(image_size)
        if any((stage, *grid) not in self._cache for stage, grid in enumerate(grids)):
            self._build_stages(grids)

    def forward(self, stage: int, H: int, W: int) -> StageGeometry:
        # Plain ints: under tracing (TorchScript-based ONNX export) sizes can arrive as 0-dim
        # tensors, which would miss the cache and trace the table construction into the graph.
        key = (stage, int(H), int(W))
        geom = self._cache.get(key)
        if geom is None:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            geom = self._cache[key] = self._build(stage, (int(H), int(W)))
        return geom

    def extra_repr(self) -> str:
        p = self._plan
        return f"pos_bias={p.pos_bias!r}, img_size={p.img_size}, pretrain_size={p.pretrain_size}, fixed_pool_size={p.fixed_pool_size}"
