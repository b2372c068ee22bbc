"""torch.distributed set-up for runs launched by ``torchrun`` (never a home-made launcher).

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`process_group` reads them, initializes the default process group (``gloo`` on CPU, ``nccl``
when CUDA is available, unless told otherwise), pins each rank to GPU ``LOCAL_RANK`` and tears the
group down on exit. A plain single-process run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) creates no
group, so library code asks :func:`rank_world` and works the same either way.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]


class DistributedError(ValueError):
    """The torchrun environment is inconsistent, or ranks disagree about shared state."""


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside torchrun."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun") from e
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); launch with torchrun")
    return rank, world, local


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialized default group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def group_rank_world() -> tuple[int, int] | None:
    """(rank, world_size) of the initialized default process group, else ``None``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def any_rank_failed(failed: bool) -> bool:
    """All-reduce (MAX) a failure flag over the process group: a barrier that also says if any rank failed."""
    flag = torch.tensor([int(failed)], dtype=torch.int64, device=_collective_device())  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def resolve_backend(backend: Backend, device: str = "auto") -> str:
    """``auto``: nccl when this run computes on CUDA (``device`` cuda/cuda:N, or auto with a GPU), else gloo.

    The backend follows the device the model runs on, not the machine: ``--device cpu`` on a GPU box
    syncs CPU tensors, which only gloo can.
    """
    if backend != "auto":
        return backend
    return "nccl" if computes_on_cuda(device) else "gloo"


def computes_on_cuda(device: str) -> bool:
    """Whether a run with this device name computes on a GPU (``auto``: when one is visible)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@contextmanager
def process_group(
    backend: Backend = "auto", *, device: str = "auto", timeout_s: float = 1800.0
) -> Iterator[tuple[int, int]]:
    """Initialize the default process group from the torchrun environment; yield (rank, world_size).

    With ``WORLD_SIZE`` unset or 1 nothing is initialized. ``timeout_s`` bounds every collective,
    barriers included: a cache build whose ranks finish hours apart needs a long one. When the run
    computes on CUDA (``device``), each rank is pinned to ``cuda:LOCAL_RANK``, so ``cuda`` / ``auto``
    means that GPU; an explicit ``cuda:N`` would put every rank on one GPU and is refused. A CPU run
    on a GPU box checks no GPU count and uses gloo.
    """
    rank, world, local = env_rank_world()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        yield rank_world()
        return
    name = resolve_backend(backend, device)
    if computes_on_cuda(device):
        check_device_for_ranks(device, world)
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible; lower --nproc_per_node"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=name, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d (local %d): process group up (%s)", rank, world, local, name)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def check_device_for_ranks(device: str, world: int) -> None:
    """Refuse an explicit ``cuda:N`` when several ranks run: each rank must take its own GPU."""
    if world > 1 and device.startswith("cuda:"):
        raise DistributedError(
            f"device {device!r} under torchrun with {world} ranks would put every rank on one GPU; use "
            "device cuda (or auto): each rank takes cuda:LOCAL_RANK"
        )


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree_on_finished(done: list[bool] | None, num_items: int) -> list[bool] | None:
    """Every rank's agreed view of which items are finished: an item counts only if every rank sees it.

    A rank that failed passes ``None``; then every rank gets ``None``. One collective, which is also a
    barrier: no rank returns before all have looked.
    """
    v = torch.zeros(num_items + 1, dtype=torch.int64)  # (1 + n,): [failed, -done_0, ..., -done_n-1]
    if done is None:
        v[0] = 1
    else:
        v[1:] = -torch.tensor(done, dtype=torch.int64)
    v = v.to(_collective_device())
    dist.all_reduce(v, op=dist.ReduceOp.MAX)  # MAX of -done = -(MIN of done)
    v = v.cpu()
    return None if v[0] else (v[1:] == -1).tolist()


def gather_file_digests(mine: dict[int, tuple[str, int]], num_items: int) -> dict[int, tuple[str, int]]:
    """{item: (sha256 hex, size)} of every rank's files (each item written by one rank), on every rank."""
    t = torch.zeros((num_items, 5), dtype=torch.int64)  # (n, 5): sha256 as 4 int64 words, then the size
    for i, (digest, size) in mine.items():
        t[i, :4] = torch.from_numpy(np.frombuffer(bytes.fromhex(digest), dtype="<i8").copy())
        t[i, 4] = size
    if _multi_rank():
        t = t.to(_collective_device())
        dist.all_reduce(t)  # disjoint rows: the sum is each row's one non-zero contribution
        t = t.cpu()
    return {i: (t[i, :4].numpy().astype("<i8").tobytes().hex(), int(t[i, 4])) for i in range(num_items) if t[i, 4] > 0}


def all_gather_bytes(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of an equal-length uint8 CPU tensor (a list of one without a process group)."""
    if not _multi_rank():
        return [t.clone()]
    dev = _collective_device()
    parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(dev))
    return [p.cpu() for p in parts]


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over all ranks (identity without a process group)."""
    if not _multi_rank():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())  # (n,)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def check_same_on_all_ranks(value: int, *, what: str) -> None:
    """Raise ``DistributedError`` unless every rank passes the same integer ``value``."""
    if not _multi_rank():
        return
    t = torch.tensor(
        [value, -value], dtype=torch.int64, device=_collective_device()
    )  # (2,) max of v and of -v -> max, -min
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise DistributedError(
            f"ranks disagree on {what} (between {low} and {high}); every rank must see the same "
            "files — put the output directory on storage shared by all nodes"
        )
