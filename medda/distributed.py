"""Several processes on PyTorch's own distributed engine (`torchrun`): who am I, wait for the others, gather.

`torchrun --nproc_per_node N -m pipelines.cli ...` (or `torchrun ... $(which medda) ...`) starts N copies of a
command with WORLD_SIZE, RANK and LOCAL_RANK in their environment. `session()` then opens one
`torch.distributed` process group (gloo for CPU tensors; with CUDA, gloo for CPU tensors and NCCL for CUDA ones)
and destroys it at exit. Without those variables, or with WORLD_SIZE=1, there is no process group at all and every
helper here is a no-op (rank 0 of 1): a single process behaves exactly as before.

What runs on several processes (README "Running on several processes (torchrun)"): `medda predict` and
`medda evaluate` split their cases round-robin over the ranks (`shard`), and rank 0 alone writes tables and logs to
MLflow; `medda train`, `medda train-ssl` and `medda adapt` train one DistributedDataParallel model
(`medda.engine.loop`), rank 0 validating, checkpointing and tracking. Batch normalisation computes its batch statistics over the global
batch of all ranks during training steps (`sync_batch_norm`), so AdaBN, Tent, OSUDA, AdaMI and BN-normalised
training mean the same under torchrun as in one process fed the union of the ranks' batches. What is not supported
under torchrun yet (`--resume`, the adaptation sweep) refuses in one line (`refuse`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

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


# --------------------------------------------------------------------------------------------- batch statistics
# torch.nn.SyncBatchNorm refuses CPU tensors (gloo), so medda synchronises batch norm itself: the same all-reduce
# of per-channel sums, through `_SummedOverRanks`, whose backward all-reduces the gradients of the statistics, so
# gradients are those of the global batch (as SyncBatchNorm's backward).
_SYNCING = False


class _SummedOverRanks(torch.autograd.Function):
    """Sum of a tensor over every rank; the gradient of each rank's input is the sum of every rank's gradient of
    the output (each rank's loss depends on the statistics through its own output)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone()
        dist.all_reduce(summed)
        return summed


@contextlib.contextmanager
def synced_batch_statistics() -> Iterator[None]:
    """Within the block (a training step, entered by every rank), batch-norm layers converted by `sync_batch_norm`
    normalise with the statistics of the global batch. Outside it (rank 0's validation, prediction) they are plain
    batch norm, so a forward on one rank never waits for the others."""
    global _SYNCING
    before, _SYNCING = _SYNCING, active() and world_size() > 1
    try:
        yield
    finally:
        _SYNCING = before


class _SyncedBatchNorm:
    """Mixin of the synced classes below: batch norm whose batch statistics are those of every rank's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if not (_SYNCING and uses_batch_stats):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        local_count = x32.new_tensor([x.numel() / max(x.shape[1], 1)])
        sums = _SummedOverRanks.apply(torch.cat([x32.sum(dims), local_count]))  # one collective: sums and the count
        count = sums[-1].detach()
        mean = sums[:-1] / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x32 - mean.view(shape)
        var = _SummedOverRanks.apply((centred * centred).sum(dims)) / count  # two-pass: as exact as one process's
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # running variance unbiased, as torch's batch norm keeps it
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * var.detach() * count / (count - 1).clamp(min=1))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class SyncedBatchNorm1d(_SyncedBatchNorm, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_SyncedBatchNorm, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_SyncedBatchNorm, nn.BatchNorm3d):
    pass


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d, nn.BatchNorm3d: SyncedBatchNorm3d}


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm{1,2,3}d of `model` a synced one, in place (its class only: parameters, buffers,
    momentum and flags stay, and its state dict is unchanged, so checkpoints load into plain models). Under
    torchrun with more than one process only; otherwise `model` is returned untouched."""
    if active() and world_size() > 1:
        for module in model.modules():
            if type(module) in _SYNCED:
                module.__class__ = _SYNCED[type(module)]
    return model
