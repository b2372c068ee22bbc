"""torch.distributed set-up for runs launched by ``torchrun`` (never a home-made launcher).

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`process_group` reads them, initializes the default process group (``gloo`` on CPU, ``nccl``
when CUDA is available, unless told otherwise), pins each rank to GPU ``LOCAL_RANK`` and tears the
group down on exit. A plain single-process run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) creates no
group, so library code asks :func:`rank_world` and works the same either way.

A student too big to replicate is sharded with FSDP2 (:func:`shard_student`, ``train.parallel: fsdp``);
its checkpoints gather full state dicts (:func:`full_model_state`, :func:`full_optimizer_state`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

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


# ----------------------------------------------------------------------------- FSDP2 students (train.parallel: fsdp)
#
# Each decoder layer is one ``fully_shard`` unit and the root (embeddings, final norm, LM head) another, so a
# rank holds 1/world of every layer's weights, gradients and AdamW moments; a layer is all-gathered just for
# its forward and its backward. FSDP2 keeps the root unsharded from its forward until its backward (the root
# is never resharded after forward): the fused KD loss (``kdcache.lm_head``) takes the head weight *after*
# the forward and so multiplies by the full (V, H) matrix, whose gradient FSDP reduce-scatters at the end of
# the backward like any other. Checkpoints hold full (gathered) state dicts: the same ``model.safetensors`` a
# DDP run writes, and the optimizer state keyed by parameter name (``torch.distributed.checkpoint.state_dict``).


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_student` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_student(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``fully_shard`` each decoder layer of a transformers causal LM, then the whole model (in place), over
    all ranks of the default group on ``dev``'s device type; the shards move to ``dev`` (the full model
    never has to fit there). Returns ``model``; build the optimizer afterwards (it must see the shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise DistributedError(
            f"train.parallel: fsdp shards a decoder's `layers` list, which {type(model).__name__} lacks; "
            "use train.parallel: ddp for this student"
        )
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{dropped name: kept name} for parameters reachable under several names (a tied LM head); the kept name
    is the first in sorted order, as ``safetensors.torch.save_model`` keeps it, so both writers agree."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: sorted(group)[0] for group in names.values() if len(group) > 1 for n in sorted(group)[1:]}


def full_model_state(model: torch.nn.Module, *, tied_once: bool = True) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s full weights as CPU tensors on rank 0 ({} on the others); ``tied_once``: a tied
    head's weight under one name, as ``safetensors.torch.save_model`` writes it (else under every name, one
    shared tensor, as transformers' ``save_pretrained(state_dict=...)`` expects: it drops tied names itself).

    A collective: every rank calls it. Holds one full copy in rank 0's host memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = _tied_aliases(model)
    if tied_once:
        return {k: v.contiguous() for k, v in full.items() if k not in aliases}
    # every name, a tied one sharing its kept name's tensor (separate copies would be written twice)
    return {k: full[aliases.get(k, k)].contiguous() for k in full}


def load_full_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full weights (as :func:`full_model_state` wrote them) into the sharded ``model``: each rank keeps
    its shards. The names must be the model's (tied aliases are filled in); raises ``KeyError`` naming the
    missing and unexpected ones, as ``load_state_dict(strict=True)`` would."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors = dict(tensors)
    for alias, kept in _tied_aliases(model).items():
        if kept in tensors:
            tensors.setdefault(alias, tensors[kept])
    want = set(model.state_dict())  # names only: the shards are not gathered
    for what, names in (("missing", want - set(tensors)), ("unexpected", set(tensors) - want)):
        if names:
            listed = sorted(names)
            raise KeyError(f"weights: {what} {', '.join(listed[:5])}{' ...' if len(listed) > 5 else ''}")
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of the sharded ``model``, gathered and keyed by parameter name, on rank 0 ({} on
    the others). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore :func:`full_optimizer_state`'s gathered state into the sharded ``model``'s optimizer (every rank
    passes the full state and keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes DTensor (FSDP) gradients: the total norm over all
    shards (a collective), returned as a plain device tensor. Without DTensors it is ``clip_grad_norm_``."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the partial norms of every rank's shards, reduced
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
