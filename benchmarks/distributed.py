"""Overhead of several CPU processes (torchrun, gloo) against one, on the same data and cores (issue 15).

Two commands, each run as one process with 2 threads and as `torchrun --nproc_per_node 2` with 1 thread per process:
- `medda predict` over the phantom test set (random-weight 3D U-Net of `configs/phantom_source.yaml`; the time does not
  depend on the weights): wall time of the whole command, start-up included.
- `medda train configs/phantom_source.yaml` (supervised; one process: batch 2; two processes: batch 1 each, the same
  global batch): seconds per iteration, the slope between a 10- and a 60-iteration run, so start-up, data caching
  and the final checkpoint cancel out.

Usage (repository root): .venv/bin/python benchmarks/distributed.py [--cases 12]
Prints a Markdown table; writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "distributed.json"
CARD = REPO / "data_cards" / "phantom_site_a.yaml"


def _medda(args: list[str], processes: int) -> float:
    """Wall seconds of `medda ARGS` as one process (2 threads) or under torchrun (1 thread per process)."""
    if processes == 1:
        cmd = [sys.executable, "-m", "pipelines.cli", *args, "--threads", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "pipelines.cli", *args, "--threads", "1"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="phantom cases (site A)")
    args = parser.parse_args()

    from medda.config import load_config
    from medda.data.phantoms import write_phantom_dataset
    from medda.models.factory import build_model, save_checkpoint
    from medda.runtime import machine_description

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datalist = write_phantom_dataset(tmp / "data", sites=("A",), cases_per_site=args.cases, seed=0) / "A" / \
            "datalist.json"
        recipe = load_config(REPO / "configs" / "phantom_source.yaml", [])
        model = build_model(recipe.model, 3, 4)
        checkpoint = tmp / "model.pt"
        data = recipe.data
        save_checkpoint(checkpoint, model.eval(), {
            "model": recipe.model.model_dump(mode="json"), "spatial_dims": 3, "num_classes": 4,
            "class_names": ["background", "ring", "blob", "rv"], "method": "supervised",
            "data": {"mode": data.mode, "slice_axis": data.slice_axis, "patch_size": list(data.patch_size),
                     "spacing": data.spacing, "foreground_crop": data.foreground_crop}})
        for processes in (1, 2):
            seconds = _medda(["predict", str(checkpoint), str(datalist), str(tmp / f"pred{processes}"),
                              "--card", str(CARD)], processes)
            rows.append({"command": "predict", "processes": processes, "seconds": round(seconds, 2)})
        for processes in (1, 2):
            times = {}
            for iterations in (10, 60):
                times[iterations] = _medda([
                    "train", "configs/phantom_source.yaml", f"data.card={CARD}",
                    *(f"data.{role}.path={datalist}" for role in ("train", "val", "test")),
                    f"train.iterations={iterations}", "train.val_every=1000", f"train.batch_size={2 // processes}",
                    "tracking.enabled=false", f"output_dir={tmp / f'train{processes}_{iterations}'}"], processes)
            rows.append({"command": "train", "processes": processes,
                         "seconds_per_iteration": round((times[60] - times[10]) / 50, 4),
                         "seconds_10": round(times[10], 1), "seconds_60": round(times[60], 1)})
    machine = {**machine_description(), "cases": args.cases}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"{machine}\n\n| command | processes x threads | wall (s) | s / iteration |\n|---|---|---|---|")
    for r in rows:
        layout = "1 x 2" if r["processes"] == 1 else "2 x 1 (torchrun)"
        wall = r.get("seconds", f"{r.get('seconds_10')} (10 it), {r.get('seconds_60')} (60 it)")
        print(f"| {r['command']} | {layout} | {wall} | {r.get('seconds_per_iteration', '-')} |")


if __name__ == "__main__":
    main()
