"""Training-step and inference time of medda's networks on this machine: float32 vs bf16 autocast, NC(D)HW vs
channels-last. This measures the defaults (`train.amp=auto`, `train.channels_last=true`) against the alternatives, bf16
included on CPUs where oneDNN only emulates it; no test times anything.

Usage (repository root):  .venv/bin/python benchmarks/step_time.py [--threads 2] [--steps 8]
Writes benchmarks/results/step_time.json and prints a Markdown table (copied into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer

from medda.config import ModelConfig
from medda.models.factory import build_model
from medda.runtime import autocast, cpu_has_bf16, machine_description, memory_format

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
# name -> (model config, spatial dims, training batch shape, inference volume, roi)
CASES = {
    "3D phantom UNet 16-128 (demo), batch 4x48x48x16": (
        ModelConfig(channels=[16, 32, 64, 128], num_res_units=1), 3, (4, 1, 48, 48, 16), (1, 1, 96, 96, 32), (48, 48, 16)),
    "3D UNet 16-256 res2, batch 2x96^3": (
        ModelConfig(channels=[16, 32, 64, 128, 256], num_res_units=2), 3, (2, 1, 96, 96, 96), (1, 1, 192, 192, 96), (96, 96, 96)),
    "2D UNet 16-256 res2 (ACDC), batch 8x256^2": (
        ModelConfig(channels=[16, 32, 64, 128, 256], num_res_units=2), 2, (8, 1, 256, 256), (16, 1, 256, 256), (256, 256)),
}


def _timed(fn, steps: int) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(cfg: ModelConfig, dims: int, batch: tuple, volume: tuple, roi: tuple, amp: torch.dtype | None,
            channels_last: bool, steps: int) -> dict:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg, dims, num_classes=4)
    fmt = memory_format(dims) if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch).to(memory_format=fmt)
    y = torch.randint(0, 4, (batch[0], *batch[2:]))

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimiser.step()

    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.5, mode="gaussian")
    image = torch.randn(volume)

    def infer() -> None:
        with torch.inference_mode(), autocast(device, amp):
            if dims == 3:
                inferer(image, lambda t: model(t.to(memory_format=fmt)))
            else:
                model(image.to(memory_format=fmt))

    model.train()
    train_s = _timed(train_step, steps)
    model.eval()
    infer_s = _timed(infer, max(2, steps // 2))
    return {"train_step_s": round(train_s, 4), "inference_s": round(infer_s, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result file (default: results/step_time.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # bf16 is timed wherever oneDNN runs it at all: natively (bf16 units, medda's default there) or emulated on an
    # AVX-512 CPU without them, where medda stays in float32 because emulation is slower (runtime.cpu_has_bf16).
    native = cpu_has_bf16()
    variants = [("float32", None, False), ("float32 + channels-last" + ("" if native else " (default)"), None, True)]
    if native or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = "bf16 + channels-last" + (" (default)" if native else " (emulated: not medda's default)")
        variants += [("bf16", torch.bfloat16, False), (bf16, torch.bfloat16, True)]
    results = {"machine": {**machine_description(), "threads": args.threads}, "cases": {}}
    lines = ["| network, input | variant | train step (s) | inference (s) |", "|---|---|---|---|"]
    for name, (cfg, dims, batch, volume, roi) in CASES.items():
        for label, amp, cl in variants:
            r = measure(cfg, dims, batch, volume, roi, amp, cl, args.steps)
            results["cases"].setdefault(name, {})[label] = r
            lines.append(f"| {name} | {label} | {r['train_step_s']:.3f} | {r['inference_s']:.3f} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
