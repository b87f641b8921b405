"""Several processes for ``fuse`` and ``tune`` under ``torchrun``.

``fuse``: the layers are split over the ranks.

``torchrun --nproc-per-node N -m mlpfuse fuse ...`` starts N copies of the command. Each rank
plans the same layers; the planned layer at position i belongs to rank ``i % N``. Ranks other
than 0 compress their layers and send each result to rank 0 (gloo, point to point, in plan
order); rank 0 compresses its own, receives the others in plan order and is the only writer.
Every layer's k-means is seeded the same way as in one process, so the weights written are
byte-identical to a single-process run with the same seed. With GPUs, rank r runs its k-means
on ``cuda:LOCAL_RANK`` unless a device is given.

``tune``: data parallel. Every rank walks the same seeded batches and takes its share of each
(``batch[rank::N]``); the loss is normalised by the token count of the whole batch and the
gradients are summed over the ranks, so each step is the single-process step on the same batch.
Only rank 0 saves state and writes the output.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) nothing here starts a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from mlpfuse.errors import EnvironmentProblem

T = TypeVar("T")
P = TypeVar("P")


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether this process is one of several started by torchrun / accelerate launch."""
    return world()[1] > 1


def is_worker() -> bool:
    """Whether this process is a rank other than 0 (it computes but never writes)."""
    return active() and world()[0] != 0


def rank_device(device: str | None) -> str | None:
    """The k-means device of this rank: ``cuda:LOCAL_RANK`` when GPUs exist and none was chosen."""
    if active() and torch.cuda.is_available() and device in (None, "auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _group():
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo")
        except Exception as exc:  # rendezvous failures come in many types
            raise EnvironmentProblem(f"cannot join the torchrun process group: {exc}") from None
    return dist


class _Failed:
    """What a worker sends instead of a layer when computing it raised."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def gather_in_order(items: list[P], compute: Callable[[P], T]) -> Iterator[T]:
    """On rank 0: yield ``compute(item)`` for every item in order, computed here or received.

    In one process this is just ``map``. Raises what a worker raised for its item.
    """
    rank, size = world()
    if size == 1:
        for item in items:
            yield compute(item)
        return
    dist = _group()
    for i, item in enumerate(items):
        if i % size == rank:
            yield compute(item)
            continue
        box = [None]
        dist.recv_object_list(box, src=i % size)
        if isinstance(box[0], _Failed):
            raise box[0].exc
        yield box[0]
    dist.destroy_process_group()


def serve(items: list[P], compute: Callable[[P], T]) -> None:
    """On a rank > 0: compute this rank's items (position % size == rank) and send each to rank 0."""
    rank, size = world()
    dist = _group()
    try:
        for i, item in enumerate(items):
            if i % size != rank:
                continue
            try:
                result = compute(item)
            except Exception as exc:
                dist.send_object_list([_Failed(exc)], dst=0)
                raise
            dist.send_object_list([result], dst=0)
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (gloo, through the CPU), on its own device; itself in one process."""
    if world()[1] == 1:
        return tensor
    buffer = tensor.detach().cpu().clone()
    _group().all_reduce(buffer)
    return buffer.to(tensor.device)


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the parameters' gradients over the ranks in place (a missing gradient counts as zeros)."""
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = all_reduce_sum(torch.cat([g.detach().reshape(-1).float() for g in grads]))
    start = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[start:start + size].view_as(parameter).to(parameter.dtype)
        start += size


def leave() -> None:
    """Leave the process group if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
