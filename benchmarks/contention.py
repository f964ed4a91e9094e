"""Training-step time next to a busy neighbour: a small 2D UNet alone, then with one CPU-bound process running.

Each thread policy runs in its own Python process, because the OpenMP wait policy is read once, when torch
loads. Policies:
- `torch defaults`: no OMP_WAIT_POLICY, one thread per core (what medda did before).
- `medda (automatic)`: `import medda` first (passive OpenMP wait), then `train.threads` unset, i.e.
  `medda.runtime.apply_threads(None)`: one thread per CPU this process may use.
- `medda, threads=1`: passive wait and one thread (what the real-data benchmark recipes pin).

Network: MONAI UNet, 2D, channels 16-128, batch norm, batch 8 x 1 x 128 x 128, float32, AdamW, cross-entropy.
The neighbour is `python -c "while True: pass"`, started and killed by the benchmark. Each phase times
`--steps` steps or stops after `--budget` seconds, whichever comes first (a collapsed policy is slow).

`--demo` times the case issue 14 reported instead: the whole `medda demo --ssl` (phantoms, 3D source training,
evaluation, five adaptations per target, BCP and its twin) with medda's defaults, alone and then next to the same
busy process, each run in a fresh folder (MLflow in a SQLite file inside it) that is deleted afterwards.

Usage (repository root):  .venv/bin/python benchmarks/contention.py [--steps 10] [--budget 15] [--out FILE]
                          .venv/bin/python benchmarks/contention.py --demo [--out FILE]
Writes benchmarks/results/contention.json (contention_demo.json with --demo) unless --out says otherwise, and
prints a Markdown table (copied into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "contention.json"
DEMO_RESULTS = RESULTS.with_name("contention_demo.json")
ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"torch defaults": "torch", "medda (automatic)": "medda", "medda, threads=1": "medda1"}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


@contextlib.contextmanager
def busy_neighbour() -> Iterator[None]:
    """One CPU-bound process (`python -c "while True: pass"`) running for the duration of the block."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let the neighbour reach its core
        yield
    finally:
        neighbour.kill()
        neighbour.wait()


def without_openmp_settings() -> dict[str, str]:
    """This environment minus the OpenMP variables, so that each child starts from the policy under test."""
    return {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}


def _steps_per_phase(step, steps: int, budget: float) -> list[float]:
    step()  # warm-up (allocations, oneDNN kernel selection)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker(policy: str, steps: int, budget: float) -> dict:
    """Time `steps` training steps alone and next to a busy process, under `policy`, in this process."""
    if policy != "torch":
        import medda.runtime  # noqa: F401  (imports medda first: passive OpenMP wait before torch loads)
    import torch
    from monai.networks.nets import UNet

    if policy == "medda":
        from medda.runtime import apply_threads

        apply_threads(None)
    elif policy == "medda1":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet(2, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm="batch")
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 1, 128, 128)
    y = torch.randint(0, 4, (8, 128, 128))

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()

    alone = _steps_per_phase(step, steps, budget)
    with busy_neighbour():
        contended = _steps_per_phase(step, steps, budget)
    return {
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "alone_s": sum(alone) / len(alone), "contended_s": sum(contended) / len(contended),
        "alone_steps": len(alone), "contended_steps": len(contended),
    }


def machine() -> dict:
    from medda.runtime import machine_description, usable_cpus

    return {**machine_description(), "usable_cpus": usable_cpus(), "load_average_1min_at_start": os.getloadavg()[0]}


def save_and_describe(results: dict, out: Path) -> None:
    """Write `results` to `out` and print the machine line that goes above the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(f"\nCPU capability {m['cpu_capability']}, bf16 units {m['bf16_units']}, {m['usable_cpus']} usable of "
          f"{m['cpus']} CPUs, torch {m['torch']}, 1-min load average at start {m['load_average_1min_at_start']:.2f}\n")


def time_demo(contended: bool) -> float:
    """Wall seconds of `medda demo --ssl` in a fresh folder, optionally next to a busy process."""
    with tempfile.TemporaryDirectory(prefix="medda-demo-") as folder, (
        busy_neighbour() if contended else contextlib.nullcontext()
    ):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "demo", "--ssl", "--output", f"{folder}/out",
             "--tracking-uri", f"sqlite:///{folder}/mlflow.db"],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=without_openmp_settings(),
        )
        return time.perf_counter() - start


def demo_main(out: Path) -> None:
    results = {"machine": machine(), "command": "medda demo --ssl (defaults)"}
    results["alone_s"] = time_demo(contended=False)
    print(f"alone: {results['alone_s']:.0f} s", flush=True)
    results["contended_s"] = time_demo(contended=True)
    print(f"next to a busy process: {results['contended_s']:.0f} s", flush=True)
    save_and_describe(results, out)
    print("| run | alone (min) | with a busy neighbour (min) | ratio |")
    print("|---|---|---|---|")
    print(f"| `medda demo --ssl`, defaults | {results['alone_s'] / 60:.1f} | {results['contended_s'] / 60:.1f} "
          f"| {results['contended_s'] / results['alone_s']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase (after one warm-up)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per phase at most")
    parser.add_argument("--demo", action="store_true", help="time the whole `medda demo --ssl` instead")
    parser.add_argument("--out", type=Path, help="result file (default: benchmarks/results/contention[_demo].json)")
    parser.add_argument("--worker", choices=sorted(set(POLICIES.values())), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.budget)))
        return
    if args.demo:
        demo_main(args.out or DEMO_RESULTS)
        return

    results = {"machine": machine(), "policies": {}}
    for name, policy in POLICIES.items():
        out = subprocess.run(
            [sys.executable, __file__, "--worker", policy, "--steps", str(args.steps), "--budget", str(args.budget)],
            env=without_openmp_settings(), cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
        results["policies"][name] = json.loads(out.strip().splitlines()[-1])
        print(name, results["policies"][name], flush=True)
    save_and_describe(results, args.out or RESULTS)
    print("| policy | threads | OpenMP wait | alone (s/step) | with a busy neighbour (s/step) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results["policies"].items():
        print(f"| {name} | {r['threads']} | {r['omp_wait_policy']} | {r['alone_s']:.3f} | {r['contended_s']:.3f} "
              f"| {r['contended_s'] / r['alone_s']:.1f}x |")


if __name__ == "__main__":
    main()
