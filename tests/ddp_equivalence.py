"""Helper of tests/test_distributed.py (not a test module): supervised training through `run_loop` on fixed batches.

`python tests/ddp_equivalence.py OUT` trains one process on global batches of GLOBAL samples; under
`torchrun --nproc_per_node N` each process trains on its GLOBAL / N samples of the same global batches (rank r: the
r-th slice) in one DistributedDataParallel model. Rank 0 (or the single process) writes the final weights to
OUT/last.pt. Deterministic algorithms, one CPU thread, float32, instance norm (batch statistics would differ).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from medda import distributed
from medda.config import ModelConfig, OptimConfig, TrainConfig
from medda.engine.loop import run_loop
from medda.methods.base import MethodContext
from medda.methods.supervised import Supervised
from medda.models.factory import build_model

GLOBAL, ITERATIONS, PATCH = 4, 4, (16, 16, 8)


def main(out: Path) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with distributed.session():
        world, rank = distributed.world_size(), distributed.rank()
        per_rank = GLOBAL // world
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(ITERATIONS, GLOBAL, 1, *PATCH, generator=gen)
        labels = torch.randint(0, 3, (ITERATIONS, GLOBAL, 1, *PATCH), generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)

        def stream():
            for it in itertools.count():
                yield {"image": images[it % ITERATIONS, mine], "label": labels[it % ITERATIONS, mine]}

        torch.manual_seed(1)
        model = build_model(ModelConfig(channels=[8, 16], norm="instance"), 3, 3)
        method = Supervised(model, Supervised.Config(), MethodContext(3, 3, PATCH, ITERATIONS))
        train = TrainConfig(iterations=ITERATIONS, batch_size=per_rank, val_every=ITERATIONS, channels_last=False,
                            amp="off")
        optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="poly")

        def save(tag: str, iteration: int) -> Path:
            path = out / f"{tag}.pt"
            if distributed.is_main():
                torch.save(method.eval_model().state_dict(), path)
            return path

        run_loop(method, {"labeled": stream()}, train, optim, torch.device("cpu"), None, save)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
