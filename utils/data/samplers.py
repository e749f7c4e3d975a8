"""Distributed evaluation sampling without padding."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ShardedEvalSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(dataset_len)``.

    Across ranks every index appears exactly once: no padding and no duplicates (unlike
    ``DistributedSampler``), so summing per-rank metric numerators and denominators gives the
    exact value over the split. Shard sizes differ by at most one; a rank may get none.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
