"""Helper of tests/test_distributed.py (not a test module): a method through `run_loop` on fixed batches.

`python tests/ddp_equivalence.py OUT` runs one process on global batches of GLOBAL samples; under
`torchrun --nproc_per_node N` each process runs on its GLOBAL / N samples of the same global batches (rank r: the
r-th slice), in one DistributedDataParallel model whose batch norm is synchronised (`distributed.sync_batch_norm`),
as `medda train` and `medda adapt` run. For every mode, rank 0 (or the single process) writes the final state dict
to OUT/<mode>.pt. Deterministic algorithms, one CPU thread, float32.

Modes: `supervised` (instance norm), `supervised_bn` (batch norm), `adabn` (one pass, no gradients) and `tent`.
Under torchrun, also mean teacher and BCP (batch norm; BCP switches stage after 2 iterations), whose losses pool
over the batch (so one process is not their reference): every rank writes its student and EMA teacher to
OUT/<mode>_rank<r>.pt, which must be identical on every rank.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from medda import distributed
from medda.config import ModelConfig, OptimConfig, TrainConfig
from medda.engine.loop import run_loop
from medda.methods.adabn import AdaBN
from medda.methods.base import MethodContext
from medda.methods.bcp import BCP
from medda.methods.mean_teacher import MeanTeacher
from medda.methods.supervised import Supervised
from medda.methods.tent import Tent
from medda.models.factory import build_model

GLOBAL, ITERATIONS, PATCH = 4, 4, (16, 16, 8)
METHODS = {"supervised": (Supervised, "instance"), "supervised_bn": (Supervised, "batch"), "adabn": (AdaBN, "batch"),
           "tent": (Tent, "batch")}
TEACHER_METHODS = {"mean_teacher": (MeanTeacher, {}), "bcp": (BCP, {"pretrain_iterations": 2})}
OPTIM = {"supervised": OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="poly"),
         "tent": OptimConfig(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant")}


def start_model(mode: str) -> torch.nn.Module:
    """The model every run starts from (seeded), before any method touches it."""
    torch.manual_seed(1)
    norm = METHODS[mode][1] if mode in METHODS else "batch"
    return build_model(ModelConfig(channels=[8, 16], norm=norm), 3, 3)


def main(out: Path) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with distributed.session():
        for mode in METHODS:
            run(mode, out)
        if distributed.world_size() > 1:
            for mode in TEACHER_METHODS:
                run(mode, out)


def run(mode: str, out: Path) -> None:
    """`mode` from its start model over ITERATIONS global batches (one pass for AdaBN)."""
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = GLOBAL // world
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(ITERATIONS, GLOBAL, 1, *PATCH, generator=gen) * 2 + 0.5
    labels = torch.randint(0, 3, (ITERATIONS, GLOBAL, 1, *PATCH), generator=gen)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    cls, options = TEACHER_METHODS[mode] if mode in TEACHER_METHODS else (METHODS[mode][0], {})

    def stream(name: str):
        for it in itertools.count():
            step = it % ITERATIONS if name == "labeled" else ITERATIONS - 1 - it % ITERATIONS  # unlabelled: others
            batch = {"image": images[step, mine]}
            if name == "labeled":
                batch["label"] = labels[step, mine]
            yield batch

    model = distributed.sync_batch_norm(start_model(mode))
    method = cls(model, cls.Config(**options), MethodContext(3, 3, PATCH, ITERATIONS))
    train = TrainConfig(iterations=ITERATIONS, batch_size=per_rank, val_every=ITERATIONS, channels_last=False,
                        amp="off")

    def save(tag: str, iteration: int) -> Path:
        path = out / f"{mode}.pt"
        if tag != "last":
            return path
        if mode in TEACHER_METHODS:
            torch.save({"student": method.model.state_dict(), "teacher": method.teacher.state_dict()},
                       out / f"{mode}_rank{rank}.pt")
        elif distributed.is_main():
            torch.save(method.eval_model().state_dict(), path)
        return path

    optim = OPTIM["tent"] if mode == "tent" else OPTIM["supervised"]  # AdaBN has no parameters to optimise
    streams = {name: stream(name) for name in cls.streams}
    run_loop(method, streams, train, optim, torch.device("cpu"), None, save, one_pass_length=ITERATIONS)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
