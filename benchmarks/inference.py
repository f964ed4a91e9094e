"""medda's predict path against plain MONAI sliding-window inference with MONAI's defaults, and the peak memory of
predicting a large volume.

Both run the same checkpoint on the same preprocessed volumes (medda's inference chain, the checkpoint's geometry):
- `MONAI defaults`: `SlidingWindowInferer` (3D) or `SliceInferer` (2D) with sw_batch_size 1, overlap 0.25,
  constant blending, float32, the training patch as window. This is what a user would write by hand.
- `medda defaults`: `Predictor` with the run's `inference` settings, `train.amp=auto` (bf16 where the CPU has bf16
  units) and channels-last.
- `medda, MONAI windows`: the same `Predictor`, but with MONAI's window settings and no flip TTA. Its agreement
  with `MONAI defaults` isolates the numerical change (bf16, memory layout).

For each variant the table gives the time over all cases (after one warm-up case), the part of it spent inside the
network (each window batch's forward pass, with medda's layout change and output cast; the rest is the sliding
window itself: padding, blending, stitching, then softmax and the label map: `torch.argmax` for MONAI, medda's
`to_label` for medda), the speed-up over MONAI defaults, and the agreement with MONAI's label maps: the Dice per
foreground class between the two label maps in preprocessed space, averaged over classes and cases. Below it, the
label map alone, `torch.argmax` against `to_label` on medda's probabilities of every case. Peak RSS: a fresh process runs medda's whole predict path
(reading, preprocessing, windows, inversion to the original grid, argmax) on a synthetic volume. It reports
`resource.getrusage` maximum resident size.

Usage (repository root):
  .venv/bin/python benchmarks/inference.py --checkpoint CKPT.pt --card data_cards/acdc.yaml \\
      --images DATALIST_OR_FOLDER [--split test] [--limit 10] [--threads 1] [--rss-shape 512 512 300]
  .venv/bin/python benchmarks/inference.py --checkpoint CKPT.pt --card CARD --rss-only   # peak RSS only
  .venv/bin/python benchmarks/inference.py --quick   # self-check: random tiny model on phantoms, numbers mean nothing
  .venv/bin/python benchmarks/inference.py --sweep --checkpoint CKPT.pt --card CARD --images DATA --split train \
      --exclude-split labeled_8 --out benchmarks/results/inference_sweep_NAME.json   # window settings (not on test)
Writes --out (default benchmarks/results/inference.json; nothing with --quick) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
MONAI_WINDOWS = {"sw_batch_size": 1, "overlap": 0.25, "blend": "constant", "tta_flips": False}


def _run_config(card: Path, threads: int, device: str, inference: dict | None = None):
    from medda.config import RunConfig

    return RunConfig.model_validate({
        "data": {"card": str(card)}, "train": {"threads": threads, "device": device},
        "inference": inference or {}, "tracking": {"enabled": False},
    })


def _monai_defaults(predictor):
    """Plain MONAI inference with MONAI's defaults over the same windows as `predictor`, float32, NC(D)HW."""
    from monai.inferers import SliceInferer, SlidingWindowInferer

    roi = predictor.config.roi_size or list(predictor.data.patch_size)
    window = {"roi_size": roi, "sw_batch_size": 1, "overlap": 0.25, "mode": "constant"}
    if predictor.data.mode == "2d":
        return SliceInferer(spatial_dim=predictor.data.slice_axis, **window)
    return SlidingWindowInferer(**window)


def _setup(checkpoint: Path, card_path: Path, images: Path, split: str | None, exclude_split: str | None,
           limit: int | None, threads: int, device: str, with_labels: bool):
    """`medda predict`'s predictor for `checkpoint` and the cases, each as a preprocessed (1, 1, *spatial) float
    image plus, when `with_labels` and every case has one, its preprocessed label (1, *spatial)."""
    import torch

    from medda import api
    from medda.config import DatasetRef
    from medda.data.cards import load_card
    from medda.data.datalist import read_cases
    from medda.data.transforms import inference_chain
    from medda.runtime import Runtime

    cfg = _run_config(card_path, threads, device)
    runtime = Runtime.setup(cfg)
    predictor, data_cfg, *_ = api._predictor_for(checkpoint, cfg, runtime)  # exactly `medda predict`'s predictor
    card = load_card(card_path)
    cases = read_cases(DatasetRef(path=images, split=split, exclude_split=exclude_split), card, str(card_path))[:limit]
    labelled = with_labels and all(case.get("label") for case in cases)
    chain = inference_chain(card, data_cfg, labelled, str(card_path))
    prepared = []
    for case in cases:
        d = chain(dict(case))
        prepared.append((torch.as_tensor(d["image"][None]).float(), torch.as_tensor(d["label"]) if labelled else None))
    return cfg, runtime, predictor, data_cfg, card, prepared


def _agreement(label, reference, num_classes: int) -> float:
    """Mean Dice over the foreground classes between two label maps (1 where both have no foreground at all)."""
    import numpy as np

    from medda import metrics

    dice = metrics.dice_scores(label, reference, range(1, num_classes))
    return float(np.nanmean(dice)) if not np.isnan(dice).all() else 1.0


def _window_count(shape, predictor) -> int:
    """Windows the predictor's inferer runs over one preprocessed volume of `shape` (3D: its roi; 2D: slices)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi = list(predictor.inferer.roi_size)
    if len(roi) == 2:  # SliceInferer: a one-voxel-thick window over the slice axis
        roi.insert(predictor.data.slice_axis, 1)
    overlap = (predictor.inferer.overlap,) * 3
    roi = [min(r, n) for r, n in zip(roi, shape, strict=True)]  # smaller volumes are padded to the roi
    return len(dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, 3, overlap)))


def compare(checkpoint: Path, card_path: Path, images: Path, split: str | None, limit: int | None, threads: int,
            device: str) -> dict:
    """Time and agreement of the three variants on the cases of `images` (see the module docstring)."""
    import numpy as np
    import torch

    from medda.inference import Predictor, to_label

    cfg, runtime, medda_default, data_cfg, card, prepared = _setup(checkpoint, card_path, images, split, None, limit,
                                                                   threads, device, with_labels=False)
    medda_monai_windows = Predictor.on(runtime, medda_default.model, data_cfg,
                                       cfg.inference.model_copy(update=MONAI_WINDOWS), cfg.train.channels_last)
    monai_inferer = _monai_defaults(medda_default)
    # MONAI's side gets the model as a user loads it (default memory layout); the predictor converted its own
    model = copy.deepcopy(medda_default.model).to(memory_format=torch.contiguous_format)

    network_seconds: dict[str, float] = {}

    def clocked(name: str, network):
        """`network`, adding the time spent inside it (layout change and autocast included) to `name`'s total."""
        def call(x):
            start = time.perf_counter()
            out = network(x)
            network_seconds[name] = network_seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return call

    monai_network = clocked("MONAI defaults", model)

    @torch.no_grad()
    def monai_label(image: torch.Tensor) -> torch.Tensor:
        return torch.argmax(torch.softmax(monai_inferer(image.to(runtime.device), monai_network), dim=1), dim=1)[0]

    last_probabilities = {}

    def medda_label(name: str, predictor: Predictor):
        def label(image: torch.Tensor) -> torch.Tensor:
            last_probabilities[name] = predictor.probabilities(image)  # a reference, for the label-map timing
            return to_label(last_probabilities[name])[0, 0]
        return label

    variants = {"MONAI defaults": monai_label, "medda defaults": medda_label("medda defaults", medda_default),
                "medda, MONAI windows": medda_label("medda, MONAI windows", medda_monai_windows)}
    for name, predictor in (("medda defaults", medda_default), ("medda, MONAI windows", medda_monai_windows)):
        predictor._network = clocked(name, predictor._network)  # the inferer looks the method up on the instance
    seconds = dict.fromkeys(variants, 0.0)
    label_seconds: dict[str, float] = {}
    agreement: dict[str, list[float]] = {name: [] for name in variants}
    for index, (image, _) in enumerate(prepared):
        labels = {}
        for name, label_map in variants.items():
            if index == 0:
                label_map(image)  # warm-up: allocations, oneDNN kernel selection
                network_seconds[name] = 0.0
            start = time.perf_counter()
            labels[name] = label_map(image).cpu()
            seconds[name] += time.perf_counter() - start
        for name, label in labels.items():
            agreement[name].append(_agreement(label, labels["MONAI defaults"], card.num_classes))
        probs = last_probabilities["medda defaults"]  # the label map alone, both ways (same result)
        for name, label_map in (("torch.argmax", lambda p: torch.argmax(p, dim=1)), ("to_label", to_label)):
            start = time.perf_counter()
            label_map(probs)
            label_seconds[name] = label_seconds.get(name, 0.0) + time.perf_counter() - start
    shapes = [list(image.shape[2:]) for image, _ in prepared]
    return {
        "cases": len(prepared), "threads": torch.get_num_threads(), "amp": str(runtime.amp),
        "preprocessed_shapes": shapes,
        "windows": {"medda defaults": cfg.inference.model_dump(include={"overlap", "blend", "sw_batch_size", "tta_flips"}),
                    "MONAI defaults": MONAI_WINDOWS},
        "window_count": {"medda defaults": sum(_window_count(s, medda_default) for s in shapes),
                         "MONAI windows": sum(_window_count(s, medda_monai_windows) for s in shapes)},
        "variants": {name: {"seconds": seconds[name], "speedup_over_monai": seconds["MONAI defaults"] / seconds[name],
                            "network_seconds": network_seconds[name],
                            "agreement_dice": float(np.mean(agreement[name]))} for name in variants},
        "label_map_seconds": label_seconds,
    }


def sweep(checkpoint: Path, card_path: Path, images: Path, split: str | None, exclude_split: str | None,
          limit: int | None, threads: int, device: str, overlaps: list[float], batches: list[int],
          compiled: bool = False) -> dict:
    """medda's predictor at each window setting (overlap x sw_batch_size, Gaussian blending, medda's autocast and
    layout): time over the cases (after one warm-up case per setting), agreement with medda's default setting and,
    where the cases have labels, Dice against them on the preprocessed grid (voxels). This is the measurement behind
    the default window settings; run it on cases that are not a test set.

    `compiled`: each setting also runs through `torch.compile` with inductor's freezing (batch norm folded into the
    convolutions, weights pre-packed: the inference-only compilation), warming up on every case (one compilation per
    distinct window-batch shape) and reporting that warm-up's time."""
    import numpy as np
    import torch

    from medda.inference import Predictor, to_label

    cfg, runtime, default, data_cfg, card, prepared = _setup(checkpoint, card_path, images, split, exclude_split,
                                                             limit, threads, device, with_labels=True)
    reference = [to_label(default.probabilities(image))[0, 0] for image, _ in prepared]
    rows = []
    for overlap, batch, compiling in itertools.product(overlaps, batches, [False, True] if compiled else [False]):
        model = default.model
        if compiling:
            torch._inductor.config.freezing = True
            torch._dynamo.reset()
            model = torch.compile(default.model, dynamic=False)
        predictor = Predictor.on(runtime, model, data_cfg, cfg.inference.model_copy(
            update={"overlap": overlap, "sw_batch_size": batch}), cfg.train.channels_last)
        start = time.perf_counter()
        # warm-up: one case; compiled, every case, so that each window-batch shape is compiled before the timing
        for image, _ in prepared if compiling else prepared[:1]:
            predictor.probabilities(image)
        warmup_seconds = time.perf_counter() - start
        seconds, agreement, dice = 0.0, [], []
        for (image, truth), ref in zip(prepared, reference, strict=True):
            start = time.perf_counter()
            label = to_label(predictor.probabilities(image))[0, 0]
            seconds += time.perf_counter() - start
            agreement.append(_agreement(label, ref, card.num_classes))
            if truth is not None:
                dice.append(_agreement(label, truth[0], card.num_classes))
        shapes = [image.shape[2:] for image, _ in prepared]
        rows.append({"overlap": overlap, "sw_batch_size": batch, "compiled": compiling,
                     "warmup_seconds": warmup_seconds, "seconds": seconds,
                     "seconds_per_case": seconds / len(prepared),
                     "windows": sum(_window_count(list(s), predictor) for s in shapes),
                     "agreement_with_default": float(np.mean(agreement)),
                     "dice_vs_labels": float(np.mean(dice)) if dice else None})
    return {"cases": len(prepared), "preprocessed_shapes": [list(image.shape[2:]) for image, _ in prepared],
            "threads": torch.get_num_threads(), "amp": str(runtime.amp),
            "default": cfg.inference.model_dump(include={"overlap", "sw_batch_size", "blend"}),
            "roi_size": default.config.roi_size or list(data_cfg.patch_size), "settings": rows}


def peak_rss(checkpoint: Path, card_path: Path, shape: tuple[int, int, int], threads: int, device: str) -> dict:
    """Peak resident memory of medda's predict path on one synthetic volume of `shape` voxels (fresh process)."""
    args = json.dumps([str(checkpoint), str(card_path), list(shape), threads, device])
    out = subprocess.run([sys.executable, __file__, "--rss-worker", args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_worker(checkpoint: str, card_path: str, shape: list[int], threads: int, device: str) -> dict:
    import resource

    import nibabel as nib
    import numpy as np

    from medda import api
    from medda.data.cards import load_card
    from medda.data.transforms import inference_chain
    from medda.inference import predict_cases
    from medda.runtime import Runtime

    cfg = _run_config(Path(card_path), threads, device)
    runtime = Runtime.setup(cfg)
    predictor, data_cfg, *_ = api._predictor_for(Path(checkpoint), cfg, runtime)
    card = load_card(card_path)
    # The model's grid, so that no resampling changes the size; a card with unknown spacing (ACDC's copy): 1 mm.
    spacing = data_cfg.spacing or (card.spacing if card.spacing_known else None) or [1.0, 1.0, 1.0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.nii"  # uncompressed: gzip of 300 MB of noise is slow
        volume = np.random.default_rng(0).random(shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), path)
        del volume
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        chain = inference_chain(card, data_cfg, False, card_path)
        label = next(predict_cases(predictor, [{"id": "synthetic", "image": str(path)}], chain, progress=False)).label
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"shape": list(shape), "label_shape": list(label.shape), "seconds": seconds,
            "peak_rss_gib": peak / 2**20, "rss_before_predict_gib": before / 2**20}


def quick_inputs(tmp: Path) -> tuple[Path, Path, Path, str]:
    """A random tiny 3D model saved as a medda checkpoint, and three phantom test volumes (self-check only)."""
    import torch

    from medda.config import ModelConfig
    from medda.data.cards import load_card
    from medda.data.phantoms import write_phantom_dataset
    from medda.models.factory import build_model, save_checkpoint

    card_path = Path(__file__).resolve().parents[1] / "data_cards" / "phantom_site_a.yaml"
    card = load_card(card_path)
    write_phantom_dataset(tmp / "phantoms", sites=("A",), cases_per_site=3)
    model_cfg = ModelConfig(channels=[8, 16, 32])
    torch.manual_seed(0)
    model = build_model(model_cfg, 3, card.num_classes)
    meta = {"model": model_cfg.model_dump(mode="json"), "spatial_dims": 3, "num_classes": card.num_classes,
            "class_names": card.class_names, "method": "random (self-check)",
            "data": {"mode": "3d", "slice_axis": 2, "patch_size": [32, 32, 16], "spacing": None, "foreground_crop": True}}
    checkpoint = save_checkpoint(tmp / "random.pt", model, meta)
    return checkpoint, card_path, tmp / "phantoms" / "A" / "datalist.json", "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="medda checkpoint (.pt)")
    parser.add_argument("--card", type=Path, help="data card of the images")
    parser.add_argument("--images", type=Path, help="decathlon JSON, nnU-Net dataset or image folder")
    parser.add_argument("--split", help="datalist key or card split (default: every case)")
    parser.add_argument("--limit", type=int, help="first N cases only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--rss-shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--quick", action="store_true", help="self-check on a random tiny model; writes nothing")
    parser.add_argument("--rss-only", action="store_true", help="only the peak-RSS measurement (needs --checkpoint, "
                        "--card); prints it, writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"result JSON (default {RESULTS.name})")
    parser.add_argument("--sweep", action="store_true", help="time medda's predictor at each --overlaps x --batches "
                        "setting instead (with --exclude-split to keep training cases out); writes --out")
    parser.add_argument("--exclude-split", help="card split whose cases are left out (e.g. the labelled ones)")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--compile", action="store_true", help="--sweep: each setting also through torch.compile "
                        "(inference freezing); its warm-up runs every case once and holds the compilation")
    parser.add_argument("--skip-rss", action="store_true", help="no peak-RSS measurement after the comparison")
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(*json.loads(args.rss_worker))))
        return
    from medda.runtime import machine_description

    if args.sweep:
        with tempfile.TemporaryDirectory() as tmp:
            if args.quick:
                args.checkpoint, args.card, args.images, args.split = quick_inputs(Path(tmp))
            elif not (args.checkpoint and args.card and args.images):
                parser.error("--sweep needs --checkpoint, --card and --images (or --quick)")
            r = sweep(args.checkpoint, args.card, args.images, args.split, args.exclude_split, args.limit,
                      args.threads, args.device, args.overlaps, args.batches, args.compile)
        result = {"machine": machine_description(), "checkpoint": str(args.checkpoint), "images": str(args.images),
                  "split": args.split, "exclude_split": args.exclude_split, "sweep": r}
        if not args.quick:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        m = result["machine"]
        print(f"CPU capability {m['cpu_capability']}, bf16 units {m['bf16_units']}, AMX {m['amx']}, GPU {m['gpu']}; {r['cases']} "
              f"cases, {r['threads']} threads, autocast {r['amp']}, window {r['roi_size']}, default {r['default']}\n")
        print("| overlap | sw_batch_size | compiled | windows | seconds per case | warm-up (s) | "
              "agreement with the default | Dice vs labels (voxels) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in r["settings"]:
            dice = "-" if row["dice_vs_labels"] is None else f"{100 * row['dice_vs_labels']:.2f}"
            print(f"| {row['overlap']} | {row['sw_batch_size']} | {'yes' if row['compiled'] else 'no'} | "
                  f"{row['windows']} | {row['seconds_per_case']:.2f} | {row['warmup_seconds']:.1f} | "
                  f"{row['agreement_with_default']:.4f} | {dice} |")
        return

    if args.rss_only:
        if not (args.checkpoint and args.card):
            parser.error("--rss-only needs --checkpoint and --card")
        r = peak_rss(args.checkpoint, args.card, tuple(args.rss_shape), args.threads, args.device)
        print(f"{machine_description()}\npeak RSS of medda's predict path on a {' x '.join(map(str, r['shape']))} volume: "
              f"{r['peak_rss_gib']:.2f} GiB ({r['rss_before_predict_gib']:.2f} GiB before predicting; {r['seconds']:.1f} s)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.checkpoint, args.card, args.images, args.split = quick_inputs(Path(tmp))
            args.rss_shape = [64, 64, 30]
        elif not (args.checkpoint and args.card and args.images):
            parser.error("--checkpoint, --card and --images are required (or --quick)")
        result = {"machine": machine_description(), "checkpoint": str(args.checkpoint), "images": str(args.images),
                  "comparison": compare(args.checkpoint, args.card, args.images, args.split, args.limit, args.threads,
                                        args.device),
                  "peak_rss": None if args.skip_rss else peak_rss(args.checkpoint, args.card, tuple(args.rss_shape),
                                                                 args.threads, args.device)}
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    m, c, r = result["machine"], result["comparison"], result["peak_rss"]
    print(f"CPU capability {m['cpu_capability']}, bf16 units {m['bf16_units']}, AMX {m['amx']}, GPU {m['gpu']}, torch {m['torch']}; "
          f"{c['cases']} cases, {c['threads']} threads, medda autocast {c['amp']}; preprocessed shapes "
          f"{c['preprocessed_shapes']}; windows {c['window_count']}\n")
    print("| variant | seconds | of which in the network | speed-up over MONAI defaults | "
          "agreement with MONAI defaults (Dice) |")
    print("|---|---|---|---|---|")
    for name, v in c["variants"].items():
        print(f"| {name} | {v['seconds']:.2f} | {v['network_seconds']:.2f} | {v['speedup_over_monai']:.2f}x | "
              f"{v['agreement_dice']:.4f} |")
    print(f"\nthe label map of medda's probabilities alone, all cases: torch.argmax "
          f"{c['label_map_seconds']['torch.argmax']:.2f} s, medda's to_label {c['label_map_seconds']['to_label']:.2f} s")
    if r:
        print(f"\npeak RSS of medda's predict path on a {' x '.join(map(str, r['shape']))} volume: "
              f"{r['peak_rss_gib']:.2f} GiB ({r['rss_before_predict_gib']:.2f} GiB before predicting; "
              f"{r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
