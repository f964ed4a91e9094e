"""Projected wall time of a semi-supervised recipe from measured stage-1 and stage-2 steps (when a full run does not fit).

Three short runs of the recipe (tracking off, no validation, one torch thread, `--unlabeled-limit` unlabelled
cases cached) measure the set-up time, the stage-1 (copy-paste pre-training) step and the stage-2 (self-training)
step of BCP; the projection applies them to the recipe's budget or to `--pretrain/--iterations`.

Usage: MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/ssl_step_time.py configs/la_ssl_3d.yaml \
           [--steps 20] [--pretrain 2000 --iterations 17000]
"""

from __future__ import annotations

import argparse
import time

from medda import api
from medda.config import load_config


def timed_run(config: str, iterations: int, pretrain: int, unlabeled_limit: int) -> float:
    cfg = load_config(config, [
        "method.name=bcp", f"method.options={{pretrain_iterations: {pretrain}}}", f"train.iterations={iterations}",
        "train.val_every=1000000", "tracking.enabled=false", "output_dir=benchmarks/out/ssl_step_time",
        f"data.unlabeled.limit={unlabeled_limit}", "train.threads=1", "data.val=null",
    ])
    t0 = time.perf_counter()
    api.train(cfg)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--unlabeled-limit", type=int, default=4)
    parser.add_argument("--pretrain", type=int, help="stage-1 iterations to project (default: the recipe's)")
    parser.add_argument("--iterations", type=int, help="total iterations to project (default: the recipe's)")
    args = parser.parse_args()
    n = args.steps
    setup = timed_run(args.config, 2, 1, args.unlabeled_limit)  # caching + 1 + 1 steps
    stage1 = (timed_run(args.config, n + 2, n + 1, args.unlabeled_limit) - setup) / n
    stage2 = (timed_run(args.config, 2 * n + 2, n + 1, args.unlabeled_limit) - setup - n * stage1) / n
    recipe = load_config(args.config)
    total = args.iterations or recipe.train.iterations
    pretrain = args.pretrain or recipe.method.options.get("pretrain_iterations", total // 4)
    hours = (pretrain * stage1 + (total - pretrain) * stage2) / 3600
    print(f"set-up {setup:.1f} s; stage-1 step {stage1:.2f} s; stage-2 step {stage2:.2f} s (1 thread)")
    print(f"projected training time for {pretrain} + {total - pretrain} iterations: {hours:.1f} h = {hours * 60:.0f} min (no validation)")


if __name__ == "__main__":
    main()
