"""Training-step time of the real recipes, before and after a change: the same recipe, seed and batches, timed in
two checkouts (`--before`, a git revision checked out into a temporary worktree, and this working tree).

A step is everything one iteration of `medda.engine.loop.run_loop` does: drawing the batches (MONAI pipeline),
forward, loss, backward, optimiser, EMA teacher, logging. It is timed between consecutive optimiser steps, median
over `--steps` iterations after `--warmup`. Cases (each on its real data, with its recipe's own settings):
- `2d-supervised`: configs/acdc_ssl_2d.yaml's supervised twin (2 labelled ACDC volumes x 4 slices of 256 x 256).
- `2d-bcp`: the same recipe's BCP in its self-training stage (+ 2 unlabelled volumes x 4 slices, EMA teacher).
- `3d-bcp`: configs/la_ssl_3d.yaml's BCP self-training stage (2 + 2 patches of 112 x 112 x 80, 3D U-Net).
Columns: `before` and `after` (the recipe's thread and compile settings in each checkout: the 2D recipes pinned one
thread before), `after, eager` (without the recipe's `train.compile`; steps are timed after the warm-up, so the
one-off compile time is not in them: `--dice` has it in its training wall time), `after, 1 thread` (the code's own
gain at equal threads) and `after, busy neighbour` (next to one CPU-bound process, `python -c "while True: pass"`).
Unlabelled sets are cut to `--unlabeled-limit` cases (caching all 67 or 36 would only add set-up time).

Usage: MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/training.py [--before bd8a086] [--steps 20]
Writes benchmarks/results/training.json (or `--out`) and prints a Markdown table (copied into BENCHMARKS.md).
`--dice 1500` instead trains the 7-labelled ACDC supervised recipe for 1500 iterations in each checkout (its own
settings, one after the other) and writes test Dice and training wall time to benchmarks/results/training_dice.json.
`--data --steps 40` times only the data side of a 2D BCP step (a labelled and an unlabelled batch) in each checkout.
`--losses` times only BCP's per-step work outside the network in each checkout: its two mixed losses (forward and
backward, on bf16 channels-last outputs of the recipe's shapes) and its two largest-component pseudo-label passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contention import busy_neighbour  # this folder: the contention benchmark's busy process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training.json"
CASES = {
    "2d-supervised": ("configs/acdc_ssl_2d.yaml", ["method.name=supervised", "method.options={}"]),
    "2d-bcp": ("configs/acdc_ssl_2d.yaml", ["method.name=bcp", "method.options={pretrain_iterations: 2}"]),
    "3d-bcp": ("configs/la_ssl_3d.yaml", ["method.name=bcp", "method.options={pretrain_iterations: 2}"]),
}


def worker(case: str, steps: int, warmup: int, unlabeled_limit: int, threads: int | None, eager: bool) -> dict:
    """Run `case` in this process (imports whichever medda is first on sys.path) and time its iterations."""
    import torch

    from medda import api
    from medda.config import load_config
    from medda.engine import loop

    config, overrides = CASES[case]
    # BCP: 2 pre-training iterations, then self-training steps only are timed
    first = 3 + warmup if "bcp" in case else warmup
    cfg = load_config(config, [
        *overrides, f"train.iterations={first + steps + 1}", "train.val_every=1000000", "tracking.enabled=false",
        f"output_dir={tempfile.mkdtemp(prefix='medda-training-bench-')}", f"data.unlabeled.limit={unlabeled_limit}",
        "data.val=null", "train.select_by=last", *([f"train.threads={threads}"] if threads else []),
        *(["train.compile=false"] if eager else []),
    ])
    stamps: list[float] = []
    original = loop._Optimisation.step

    def stamped(self, loss, it):
        original(self, loss, it)
        stamps.append(time.perf_counter())

    loop._Optimisation.step = stamped
    api.train(cfg)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][first:first + steps]
    return {"step_s": round(statistics.median(gaps), 4), "steps": len(gaps),
            "spread_s": [round(min(gaps), 4), round(max(gaps), 4)], "torch": torch.__version__,
            "medda_from": str(Path(api.__file__).parents[1]), "threads": torch.get_num_threads()}


def data_worker(steps: int, unlabeled_limit: int) -> dict:
    """The data side of a 2D BCP step alone: one labelled and one unlabelled batch of configs/acdc_ssl_2d.yaml
    through `Data.stream` (cached preprocessing, sampling, augmentation), median over `steps` after 3 warm-up ones."""
    import torch

    from medda.config import load_config
    from medda.data.loading import Data

    torch.set_num_threads(1)
    cfg = load_config("configs/acdc_ssl_2d.yaml", [f"data.unlabeled.limit={unlabeled_limit}"])
    data = Data.load(cfg.data)
    labeled, _ = data.stream(data.cases(cfg.data.train, "train"), True, cfg.train.batch_size, 0)
    unlabeled, _ = data.stream(data.cases(cfg.data.unlabeled, "unlabeled"), False, cfg.train.unlabeled_batch_size, 0)
    times = []
    for index in range(steps + 3):
        start = time.perf_counter()
        next(labeled)
        next(unlabeled)
        if index >= 3:
            times.append(time.perf_counter() - start)
    return {"data_s": round(statistics.median(times), 4), "steps": len(times)}


LOSS_SHAPES = {  # the recipe's student output (half batch, classes, *spatial), spatial dims, Dice variant
    "2d-bcp": ((4, 4, 256, 256), 2, "pooled_squared"),
    "3d-bcp": ((1, 2, 112, 112, 80), 3, "per_sample_linear"),
}


def losses_worker(threads: int, repeats: int) -> dict:
    """BCP's loss and pseudo-label post-processing per self-training step, on random outputs and box-shaped
    pseudo-labels of each recipe's shapes: median over `repeats` after one warm-up."""
    import torch

    from medda.components import largest_component
    from medda.methods.bcp import mixed_seg_loss

    torch.set_num_threads(threads)
    out = {}
    for case, (shape, dims, variant) in LOSS_SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        layout = torch.channels_last if dims == 2 else torch.channels_last_3d
        logits = torch.randn(shape, generator=gen).to(torch.bfloat16).to(memory_format=layout)
        k, spatial = shape[1], shape[2:]
        targets = [torch.randint(0, k, (shape[0], *spatial), generator=gen) for _ in range(2)]
        mask = (torch.rand(spatial, generator=gen) > 0.5).float()
        pseudo = torch.zeros(shape[0], *spatial, dtype=torch.long)
        for c in range(1, k):  # one box per foreground class plus a stray voxel, so the LCC has work to do
            pseudo[(slice(None), *(slice(c * n // (k + 2), (c + 1) * n // (k + 2)) for n in spatial))] = c
            pseudo[(slice(None), *(n - c for n in spatial))] = c
        loss_s, lcc_s = [], []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for _ in range(2):  # L_in and L_out
                q = logits.detach().requires_grad_()
                mixed_seg_loss(q, targets[0], targets[1], mask, 1.0, 0.5, variant=variant).backward()
            middle = time.perf_counter()
            for _ in range(2):  # pseudo-labels of X_u^a and X_u^b
                largest_component(pseudo, dims)
            loss_s.append(middle - start)
            lcc_s.append(time.perf_counter() - middle)
        out[case] = {"losses_ms": round(1000 * statistics.median(loss_s[1:]), 1),
                     "lcc_ms": round(1000 * statistics.median(lcc_s[1:]), 1)}
    return {"threads": threads, **out}


def dice_worker(iterations: int) -> dict:
    """Train the 7-labelled supervised ACDC recipe for `iterations` (checkpoint chosen on the 20 val volumes) and
    evaluate it on the 40 test volumes: the result the speed-up must leave unchanged."""
    import torch

    from medda import api
    from medda.config import load_config

    out = Path(tempfile.mkdtemp(prefix="medda-training-dice-"))
    cfg = load_config("configs/acdc_ssl_2d.yaml", [
        "method.name=supervised", "method.options={}", "data.unlabeled=null", "data.train.split=labeled_7_patients",
        f"train.iterations={iterations}", "train.val_every=250", "tracking.enabled=false", f"output_dir={out}",
    ])
    t0 = time.perf_counter()
    trained = api.train(cfg)
    wall = time.perf_counter() - t0
    summary = api.evaluate(trained.checkpoint, cfg.model_copy(update={"output_dir": out / "eval"})).summary
    return {"test_dice": round(100 * summary["dice/mean"], 2), "train_wall_min": round(wall / 60, 2),
            "best_iteration": trained.loop.best_iteration, "threads": torch.get_num_threads(),
            "medda_from": str(Path(api.__file__).parents[1])}


def run_in(tree: Path, case: str, args, threads: int | None = None, neighbour: bool = False,
           eager: bool = False) -> dict:
    """`case` in a fresh interpreter importing medda from `tree`; `neighbour`: next to a busy CPU-bound process;
    `eager`: without the recipe's `train.compile`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "training.py"), "--worker", case, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--unlabeled-limit", str(args.unlabeled_limit)]
    if case == "dice":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "training.py"), "--dice-worker", str(args.dice)]
    if case == "losses":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "training.py"), "--losses-worker", str(threads or 2),
               "--steps", str(args.steps)]
    if case == "data":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "training.py"), "--data-worker", "--steps", str(args.steps),
               "--unlabeled-limit", str(args.unlabeled_limit)]
    if threads and case != "losses":
        cmd += ["--threads", str(threads)]
    if eager:
        cmd += ["--eager"]
    with busy_neighbour() if neighbour else contextlib.nullcontext():
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{case} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# column -> (checkout, threads: None = the recipe's own setting, busy neighbour, train.compile off)
SIDES = {
    "before": ("before", None, False, False),
    "after": ("after", None, False, False),
    "after, eager": ("after", None, False, True),
    "after, 1 thread": ("after", 1, False, False),
    "after, busy neighbour": ("after", None, True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="bd8a086", help="git revision to compare with (default: bd8a086)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--unlabeled-limit", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternate before/after this many times; best kept")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="result file (default benchmarks/results/training.json, with --dice training_dice.json; "
                             "another machine's run goes to its own file)")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dice", type=int, metavar="ITERATIONS",
                        help="instead of step times: train the 7-labelled ACDC supervised recipe for ITERATIONS in "
                             "both checkouts, one after the other, and compare test Dice and training wall time")
    parser.add_argument("--dice-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", action="store_true",
                        help="instead of step times: time only the data side of a 2D BCP step in both checkouts")
    parser.add_argument("--data-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--losses", action="store_true",
                        help="instead of step times: time only BCP's losses and pseudo-label LCC in both checkouts")
    parser.add_argument("--losses-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_worker:
        print(json.dumps(data_worker(args.steps, args.unlabeled_limit)))
        return
    if args.losses_worker:
        print(json.dumps(losses_worker(args.losses_worker, args.steps)))
        return
    if args.dice_worker:
        print(json.dumps(dice_worker(args.dice_worker)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.unlabeled_limit, args.threads, args.eager)))
        return

    from medda.runtime import machine_description

    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"before": before, "after": ROOT}
            if args.data:
                print(json.dumps({side: run_in(tree, "data", args) for side, tree in trees.items()}))
                return
            if args.losses:  # alternate the checkouts, at 1 and 2 threads; the faster of two runs is kept
                runs = [(side, threads, run_in(tree, "losses", args, threads)) for threads in (1, 2) for _ in range(2)
                        for side, tree in trees.items()]
                best = {f"{side}, {threads} thread{'s' if threads > 1 else ''}": {
                    case: {key: min(r[case][key] for s, t, r in runs if s == side and t == threads)
                           for key in ("losses_ms", "lcc_ms")} for case in LOSS_SHAPES}
                    for side in trees for threads in (1, 2)}
                path = RESULTS.with_name("training_losses.json")
                path.write_text(json.dumps({"before": args.before, "repeats": args.steps, "best": best,
                                            "runs": [[s, t, r] for s, t, r in runs]}, indent=2) + "\n",
                                encoding="utf-8")
                print("| case | checkout, threads | two mixed losses, fwd + bwd (ms) | two LCC passes (ms) |")
                print("|---|---|---|---|")
                for case in LOSS_SHAPES:
                    for column, cases in best.items():
                        print(f"| {case} | {column} | {cases[case]['losses_ms']} | {cases[case]['lcc_ms']} |")
                return
            if args.dice:
                dice = {side: run_in(tree, "dice", args) for side, tree in trees.items()}
                path = RESULTS.with_name("training_dice.json") if args.out == RESULTS else args.out
                path.write_text(json.dumps({"before": args.before, "iterations": args.dice, **dice}, indent=2) + "\n",
                                encoding="utf-8")
                print(json.dumps(dice, indent=2))
                return
            rows = {}
            for case in args.cases:
                runs: dict[str, list[dict]] = {side: [] for side in SIDES}
                for _ in range(args.rounds):  # alternate, so that a noisy minute hits every side
                    for side, (tree, threads, neighbour, eager) in SIDES.items():
                        runs[side].append(run_in(trees[tree], case, args, threads, neighbour, eager))
                best = {side: min(r["step_s"] for r in rs) for side, rs in runs.items()}
                rows[case] = {**best, "threads": {side: rs[0]["threads"] for side, rs in runs.items()},
                              "speed-up": round(best["before"] / best["after"], 2), "runs": runs}
                print(f"{case}: " + ", ".join(f"{side} {t:.3f} s" for side, t in best.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    result = {
        "before": args.before, "after": "working tree", "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "unlabeled_limit": args.unlabeled_limit, "threads": 1,
        "hardware": machine_description(),
    }
    # `--cases` reruns some cases: the others' rows stay when they were measured with the same settings
    earlier = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    same = all(earlier.get(key) == value for key, value in result.items())
    rows = {**(earlier.get("cases", {}) if same else {}), **rows}
    result["cases"] = {case: rows[case] for case in CASES if case in rows}
    rows = result["cases"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n| case | " + " | ".join(f"{side} (s/step)" for side in SIDES) + " | speed-up |")
    print("|---" * (len(SIDES) + 2) + "|")
    for case, row in rows.items():
        cells = " | ".join(f"{row[side]:.3f} ({row['threads'][side]} thr.)" for side in SIDES)
        print(f"| {case} | {cells} | {row['speed-up']:.2f}x |")

if __name__ == "__main__":
    main()
