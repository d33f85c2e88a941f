"""Collectives for contrastive training over ``torch.distributed``, and a local launcher.

Contrastive losses want every query to see every worker's passages, so embeddings are
all-gathered *with gradients*: :func:`gather_with_grad` uses
``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients that every rank
computed for a slice and returns that sum to the slice's owner (a reduce-scatter; an all-to-all on
gloo). With each rank's loss being the mean over its own queries against all gathered passages,
averaging parameter gradients across ranks (DDP / DeepSpeed) then yields exactly the gradient of
the full-batch mean loss (the 2-worker test checks this to float32 precision).

Without an initialised process group everything degrades to the single-process case::

    >>> import torch
    >>> gather_with_grad(torch.ones(2, 3)).shape, rank(), world_size()
    (torch.Size([2, 3]), 0, 1)
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "is_distributed", "rank", "world_size", "launch_local"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, rank-major, keeping autograd.

    Every rank must pass the same shape (the batcher shards global batches evenly). Gradients
    flowing into any rank's slice of the result reach the rank that owns it. Returns ``tensor``
    unchanged when not distributed or with a single rank.
    """
    if world_size() == 1:
        return tensor
    from torch.distributed import _functional_collectives as collectives

    return collectives.wait_tensor(collectives.all_gather_single(tensor.contiguous(), 0, dist.group.WORLD))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_worker(local_rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=local_rank, world_size=world)
    try:
        fn(local_rank, world, *args)
        # A rank that tears gloo down while its peer still has collectives in flight can abort
        # ("terminate called without an active exception"); leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_local(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned CPU processes joined by gloo on 127.0.0.1.

    For tests and debugging without Ray; ``fn`` must be importable (a module-level function) and
    report results through files or queues. Raises if any process fails.
    """
    import torch.multiprocessing as mp

    mp.spawn(_local_worker, args=(fn, world, _free_port(), args), nprocs=world, join=True)
