"""Data parallelism over torch.distributed, for the engine users already launch with.

Under ``torchrun --nproc_per_node N -m modes ...`` (or ``accelerate launch``) every rank builds
the same batches and takes every N-th one (`Ranks.share`); per-batch results (KL sums, answer
tokens, integer slot counts) are gathered and combined in global batch order
(`Ranks.gather`), so a run gives what one process gives, whatever N, even with more ranks
than batches. Errors raised on any rank reach every rank at the next gather, so no rank waits
forever. Only rank 0 writes files and shows progress (`Ranks.is_main`).
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "Ranks", "gpus_of_rank", "ranks"]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A rank failed, or the process group does not match the launcher's environment."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items with their global index: every ``world``-th, from ``rank``."""
        return [(index, item) for index, item in enumerate(items) if index % self.world == self.rank]

    def gather(self, compute: Callable[[], dict[int, T]]) -> dict[int, T]:
        """Run ``compute`` (this rank's results by global index) and return every rank's, in
        global index order; an exception on any rank is raised on all of them."""
        try:
            local: dict[int, Any] | BaseException = compute()
        except Exception as error:  # re-raised below, after every rank has heard of it
            local = error
        if not self.distributed:
            if isinstance(local, BaseException):
                raise local
            return dict(sorted(local.items()))
        gathered = _all_gather_object(_transportable(local), self.world)
        failed = [(rank, part) for rank, part in enumerate(gathered) if isinstance(part, _Failure)]
        if failed:
            if isinstance(local, BaseException):
                raise local
            rank, failure = failed[0]
            raise DistributedError(f"rank {rank} failed: {failure.message}")
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        return dict(sorted(merged.items()))

    def broadcast(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, its value (or its exception) on every rank."""
        results = self.gather(lambda: {0: make()} if self.is_main else {})
        return results[0]


@dataclass(frozen=True)
class _Failure:
    message: str


def _transportable(local: dict[int, Any] | BaseException) -> dict[int, Any] | _Failure:
    if isinstance(local, BaseException):
        return _Failure(f"{type(local).__name__}: {local}")
    return {index: _to_cpu(value) for index, value in local.items()}


# The tensors of the latest exchange. A gloo worker thread drops its references to a finished
# collective's tensors on its own time, and dropping a reference to a tensor Python created takes
# the GIL: if that happens once the interpreter is shutting down, the process aborts ("terminate
# called without an active exception", 1 run in 10 after the last gather). At exit
# `_drain_last_exchange` waits, with the GIL released, until the worker has let go of them.
_last_exchange: list[torch.Tensor] = []
_DRAIN_SECONDS = 5.0


def _drain_last_exchange() -> None:
    gc.collect()  # a collective's work or future left in a reference cycle holds its tensors too
    deadline = time.monotonic() + _DRAIN_SECONDS
    while any(t._use_count() > 1 for t in _last_exchange) and time.monotonic() < deadline:
        time.sleep(1e-3)  # releases the GIL the worker needs
    _last_exchange.clear()


def _all_gather_object(value: Any, world: int) -> list[Any]:
    """Every rank's ``value``, in rank order (`dist.all_gather_object`, whose tensors we keep;
    the values are results this program computed on its own ranks, so pickle is safe here)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload.to(padded.device)
    received = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(received, padded)
    atexit.unregister(_drain_last_exchange)  # once, and last, so it runs before `_close_group`
    atexit.register(_drain_last_exchange)
    _last_exchange[:] = [size, *sizes, padded, *received]
    return [
        pickle.loads(part[: int(n.item())].cpu().numpy().tobytes())
        for part, n in zip(received, sizes, strict=True)
    ]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def ranks() -> Ranks:
    """This process's rank and the number of ranks. Under a launcher (``WORLD_SIZE`` > 1) the
    process group is started here if nobody has (gloo on CPU, NCCL with CUDA, one GPU per local
    rank), so the commands run unchanged under torchrun; a group whose size differs from the
    launcher's is refused rather than letting each process silently do the whole job."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if not (dist.is_available() and dist.is_initialized()):
        if expected <= 1:
            return Ranks()
        if not dist.is_available():
            raise DistributedError(f"WORLD_SIZE={expected} but this PyTorch has no torch.distributed")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # a group left to the interpreter's shutdown can abort the process ("terminate called
        # without an active exception") after the work is done: close the one modes opened
        atexit.register(_close_group)
    world = dist.get_world_size()
    if world != expected and "WORLD_SIZE" in os.environ:
        raise DistributedError(
            f"the process group has {world} ranks but the launcher set WORLD_SIZE={expected}: each "
            "process would do the whole job alone; start the group with the launcher's environment"
        )
    return Ranks(dist.get_rank(), world)


def _close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gpus_of_rank(gpus: int, local_rank: int, local_world: int) -> list[int]:
    """The GPUs of one node that a rank dispatches its model over: the node's ``gpus`` split
    into ``local_world`` contiguous blocks (a rank with no whole GPU shares one, round robin).
    ``modes.load_model(path, device_map="auto", max_memory=...)`` with the other GPUs at 0
    keeps each rank on its own block."""
    if gpus < 1 or not 0 <= local_rank < local_world:
        raise ValueError(
            f"need gpus >= 1 and 0 <= local_rank < local_world, got {gpus}, {local_rank}, {local_world}"
        )
    if gpus < local_world:
        return [local_rank % gpus]
    per_rank = gpus // local_world
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))
