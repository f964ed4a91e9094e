"""Several processes on PyTorch's own distributed engine (`torchrun`): who am I, wait for the others, gather.

`torchrun --nproc_per_node N -m pipelines.cli ...` (or `torchrun ... $(which medda) ...`) starts N copies of a
command with WORLD_SIZE, RANK and LOCAL_RANK in their environment. `session()` then opens one
`torch.distributed` process group (gloo for CPU tensors; with CUDA, gloo for CPU tensors and NCCL for CUDA ones)
and destroys it at exit. Without those variables, or with WORLD_SIZE=1, there is no process group at all and every
helper here is a no-op (rank 0 of 1): a single process behaves exactly as before.

What runs on several processes (README "Running on several processes (torchrun)"): `medda predict` and
`medda evaluate` split their cases round-robin over the ranks (`shard`), and rank 0 alone writes tables and logs to
MLflow; supervised `medda train` trains one DistributedDataParallel model (`medda.engine.loop`), rank 0 validating,
checkpointing and tracking. Commands that are not supported under torchrun yet refuse in one line (`refuse`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medda.errors import MeddaError
from medda.runtime import gpu_index

T = TypeVar("T")

# Collectives wait this long for a rank that is gone before failing (torchrun also stops the others at once).
TIMEOUT = datetime.timedelta(minutes=30)


def launched() -> bool:
    """Started by torchrun with more than one process (WORLD_SIZE > 1 and RANK set)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group is open in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 in a single process)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank() -> int:
    """This process's rank on its machine (its GPU index)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0: the process that tracks, writes shared files and prints."""
    return rank() == 0


def backend() -> str:
    """gloo on CPU; with CUDA, NCCL for CUDA tensors and gloo for CPU ones."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Open the process group for the block when launched by torchrun; destroy it at exit.

    Re-entrant: inside an open group (the command line opened it, a library call enters again) it does nothing.
    """
    if not launched() or active():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(gpu_index())  # the GPU `Runtime` computes on
    dist.init_process_group(backend=backend(), timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if active():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool) -> bool:
    """`flag` holds on every rank: one integer all-reduce (cheap enough for every training step); `flag` alone in a
    single process."""
    if not active():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)  # a CPU tensor: gloo, also beside NCCL
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (`obj` of the other ranks is ignored); `obj` in a single process."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[T], key: Callable[[T], Any] = lambda item: item["id"]) -> list[T]:
    """This rank's share of `items`: round-robin over the items sorted by `key` (case ids), so each item goes to
    exactly one rank and the split depends only on the items and the number of processes. The share keeps the
    items' given order (in a single process: all of `items`, as given)."""
    ordered = sorted(range(len(items)), key=lambda i: key(items[i]))
    return [items[i] for i in sorted(ordered[rank()::world_size()])]


def gather_results(work: Callable[[], T]) -> list[T]:
    """Run `work` on every rank and return every rank's result, in rank order, on every rank.

    A user error (`MeddaError`) on any rank is raised on every rank, naming the rank that failed first, so all
    processes stop cleanly together instead of waiting for one that is gone. In a single process: [work()], with
    the error raised unchanged.
    """
    if not active():
        return [work()]
    try:
        outcome: tuple[Any, str | None] = (work(), None)
    except MeddaError as err:
        outcome = (None, str(err))
    gathered = all_gather_object(outcome)
    for source, (_, message) in enumerate(gathered):
        if message is not None:
            raise MeddaError(message if source == rank() else f"(rank {source}) {message}")
    return [value for value, _ in gathered]


def refuse(command: str) -> None:
    """Refuse, in one line, a command that does not run on several processes yet (no-op in a single process)."""
    if launched():
        raise MeddaError(
            f"{command} is not supported under torchrun yet (WORLD_SIZE={world_size()}); run it as one process, "
            "without torchrun (README 'Running on several processes (torchrun)')"
        )
