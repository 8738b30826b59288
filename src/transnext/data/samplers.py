"""Samplers that make every sample's augmentation a function of (seed, epoch, rank, position).

Training resumes mid-epoch bitwise: :class:`ResumableSampler` yields ``(index, sample_seed)``
pairs and can start at any position of an epoch; :class:`SeededDataset` seeds Python's
``random``, NumPy and torch from ``sample_seed`` around each item (restoring the previous
states), so an item's random crop, RandAugment ops and erasing do not depend on which worker
loaded it or on what was loaded before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["ResumableSampler", "SeededDataset", "ShardSampler", "build_train_sampler", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A well-mixed 63-bit seed (splitmix64 over the four numbers)."""
    x = 0
    for v in (seed, epoch, rank, position):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


class SeededDataset:
    """Wraps a data set; an ``(index, seed)`` key loads ``index`` under that seed."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.base[key]
        index, seed = key
        import numpy as np

        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` from a base sampler, optionally starting mid-epoch."""

    def __init__(self, base: Any, seed: int, rank: int = 0) -> None:
        self.base = base
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (reshuffles) and the number of leading samples to skip."""
        self.epoch = epoch
        self.start = start
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos, idx in enumerate(self.base):
            if pos >= self.start:
                yield int(idx), sample_seed(self.seed, self.epoch, self.rank, pos)


class _EpochSeeded:
    """Adds ``seed`` to the epoch a base sampler shuffles by (RepeatAugSampler seeds by epoch only)."""

    def __init__(self, sampler: Any, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(self.seed * 100_003 + epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)


def build_train_sampler(dataset: Any, seed: int, rank: int, world_size: int, repeated_aug: int = 1) -> ResumableSampler:
    """Shuffling sampler for one process of ``world_size`` (repeated augmentation when > 1)."""
    if repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        base: Any = _EpochSeeded(
            RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=repeated_aug), seed
        )
    else:
        base = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
    return ResumableSampler(base, seed=seed, rank=rank)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard ``rank::world_size`` in order, without padding (every sample counted once)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
