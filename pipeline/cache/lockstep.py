"""Lockstep cache builds: a tensor-parallel teacher makes all ranks of the process group one replica.

Every rank runs every batch of every missing shard in the same order (each forward's collectives need
all ranks), rank 0 alone writes; after every batch the ranks all-reduce a failure flag
(``stop_if_a_rank_failed``), the collective a failing rank's ``any_rank_failed(True)`` meets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcache.cache.writer import CacheWriteError
from kdcache.distributed import any_rank_failed


class RankFailed(CacheWriteError):
    """Another rank of a lockstep (tensor-parallel) build failed, as agreed after a batch."""


def stop_if_a_rank_failed() -> None:
    """After each batch of a lockstep build: the collective a failing rank's ``any_rank_failed(True)`` meets."""
    if any_rank_failed(False):
        raise RankFailed("another rank failed (see its error); no manifest written — fix the cause and rerun")


def tensor_parallel(teacher: Any, world_size: int, out: Path) -> bool:
    """Whether the teacher is sharded by tensor parallelism (DTensor weights), refusing a TP group smaller
    than the world: the build runs one tensor-parallel replica over all ranks, not several side by side."""
    from torch.distributed.tensor import DTensor

    weight = next((p for p in teacher.model.parameters() if isinstance(p, DTensor)), None)
    if weight is None:
        return False
    if (tp := weight.device_mesh.size()) != world_size:
        raise CacheWriteError(
            f"{out}: the teacher is tensor-parallel over {tp} ranks of {world_size}; the cache build runs one "
            "tensor-parallel group over all ranks — launch torchrun with --nproc_per_node equal to the TP size"
        )
    return True
