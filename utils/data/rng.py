"""Per-item random generators derived from numbers, never from global random state.

Every random choice of the data layer draws from ``derive_rng(seed, ...)``, so a sample depends
only on the numbers that identify it (seed, epoch, rank, index, attempt) and is the same in any
DataLoader worker, in any process, on any run.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _to_entropy(key: int | str) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))  # stable across processes, unlike hash()
    if key < 0:
        raise ValueError(f"rng keys must be non-negative, got {key}")
    return int(key)


def derive_rng(*keys: int | str) -> np.random.Generator:
    """A generator determined by ``keys`` alone (ints >= 0 or strings)."""
    return np.random.default_rng(np.random.SeedSequence([_to_entropy(key) for key in keys]))


def choose(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One element of ``options`` drawn uniformly."""
    if not options:
        raise ValueError("cannot choose from an empty sequence")
    return options[int(rng.integers(len(options)))]


def sample_without_replacement(rng: np.random.Generator, count: int, limit: int) -> list[int]:
    """``min(count, limit)`` distinct indices of ``range(limit)``, in random order."""
    return [int(i) for i in rng.choice(limit, size=min(count, limit), replace=False)]
