"""bSSFP -> LGE with k labelled LGE images (issue 12): few-shot fine-tune, mean teacher and BCP from the source model.

Every run starts from the bSSFP source checkpoint and trains with configs/mscmr_lge_ssda.yaml on the first k of the 5
labelled LGE images (subject1, 29, 36, 41, 8: the order of the source-free benchmark's few-shot rows) and, for mean
teacher and BCP, the 25 unlabelled LGE images. `supervised` is the plain few-shot fine-tune (the twin: same data,
budget, optimiser and seed). The last checkpoint of the fixed budget is evaluated (no validation images exist to
choose another; `--cross-validate` and `--label-free` choose one by those rules instead, docs/methods.md section 8)
on the other 5 - k labelled images, which no run has seen, with and without largest-component
post-processing. Dice in %, HD95 in mm from the files' spacing. Development check only: 4, 3 or 2 images.

Usage (repository root; data only through MEDDA_DATA_ROOT; one process per run, one torch thread each):
    MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/run_ssda_benchmark.py --method bcp --k 3
Writes benchmarks/results/lge_ssda_<method>_k<k>.json; `--source` evaluates the source model on each held-out set;
`--table` prints the Markdown tables of every saved result (summary, every run, Dice per held-out image).
A variant of a method's recipe, `--tag NAME --option KEY=VALUE` (method options, e.g. `pretrain_loss=unmixed`),
trains into `..._NAME` and is listed as its own row, paired with the few-shot fine-tune of the same seed.
Another budget (`--iterations N`, N != 600) trains into `..._itN`, is labelled `method @N`, and is paired with the
few-shot fine-tune of the same budget and seed. `--results DIR` keeps a set of runs apart (e.g. runs from another
source checkpoint, `--source-checkpoint`), and `--table --results DIR` prints that set.
`--cross-validate` selects the checkpoint by cross-validation over the k labelled images (`train.select_by=
cross_validation`: leave-one-out folds, then a run on all k that stops at the folds' best iteration; k >= 2), trains
into `..._cv`, is labelled `method cv`, and is paired with the cross-validated fine-tune of the same budget.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mscmr_lge_ssda.yaml"
RESULTS = REPO / "benchmarks" / "results"
OUT = REPO / "benchmarks" / "out" / "lge_ssda"
LABELLED = ("subject1", "subject29", "subject36", "subject41", "subject8")
KS = (1, 2, 3)
DEFAULT_ITERATIONS = 600  # the first recipe's budget (the config's own is 1800, label-free)
METHODS = ("supervised", "mean_teacher", "bcp")


def datalist(k: int, held_out: bool) -> dict:
    """The first k labelled LGE images (training) or the other 5 - k (held out), as a `data.*` config entry."""
    root = Path(os.environ["MEDDA_DATA_ROOT"]) / "mscmr_lge"
    ids = LABELLED[k:] if held_out else LABELLED[:k]
    key = "test" if held_out else "training"
    path = OUT / "datalists" / f"{key}_k{k}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cases = [{"image": str(root / "images" / f"{i}.nii.gz"), "label": str(root / "labels" / f"{i}.nii.gz")}
             for i in ids]
    path.write_text(json.dumps({key: cases}, indent=1), encoding="utf-8")
    return {"path": str(path), "split": key}


def config(k: int, name: str, extra: list[str], source: Path | None = None):
    from medda.config import load_config

    extra = [*extra, f"source_checkpoint={source}"] if source else extra
    return load_config(CONFIG, [
        f"data.train={json.dumps(datalist(k, held_out=False))}", f"data.test={json.dumps(datalist(k, held_out=True))}",
        f"output_dir={OUT / name}", f"tracking.run_name=bench-ssda-{name}",
        "train.threads=1",  # as the recorded runs (two side by side); the recipe itself uses every usable CPU
        *extra,
    ])


def evaluate(checkpoint: Path, cfg, out: Path) -> dict:
    """Held-out summary (Dice, HD95 per class and mean) and per-case Dice, without and with largest component."""
    from medda import api

    result = {}
    for key, lcc in (("plain", False), ("largest_component", True)):
        inference = cfg.inference.model_copy(update={"largest_component": lcc})
        ev = api.evaluate(checkpoint, cfg.model_copy(update={"output_dir": out / key, "inference": inference}))
        result[key] = {
            "summary": {k: v for k, v in ev.summary.items() if isinstance(v, (int, float))},
            "rows": ev.rows,
            "units": ev.units,
        }
    return result


SELECTION_MARKS = {"cross_validation": " cv", "label_free": " label-free"}  # the default, "last", is unmarked


def _label(r: dict) -> str:
    """The method and, for a variant, its tag, budget and selection: `bcp [preunmixed]`, `supervised @1800 cv`."""
    budget = f" @{r['iterations']}" if r["iterations"] not in (0, DEFAULT_ITERATIONS) else ""
    selection = SELECTION_MARKS.get(r.get("checkpoint_policy"), "")
    return r["method"] + (f" [{r['tag']}]" if r.get("tag") else "") + budget + selection


def _twin_label(r: dict) -> str:
    """The few-shot fine-tune a run is paired with: the untagged supervised run of the same budget and selection."""
    return _label({"method": "supervised", "iterations": r["iterations"],
                   "checkpoint_policy": r.get("checkpoint_policy")})


def run(method: str, k: int, iterations: int, pretrain: int, seed: int, tag: str | None = None,
        option: tuple[str, ...] = (), source: Path | None = None, select_by: str = "last",
        overrides: tuple[str, ...] = ()) -> dict:
    from medda import api
    from medda.runtime import machine_description

    name = f"{method}_k{k}" + (f"_seed{seed}" if seed else "") + (f"_{tag}" if tag else "")
    name += f"_it{iterations}" if iterations != DEFAULT_ITERATIONS else ""
    name += {"cross_validation": "_cv", "label_free": "_lf"}.get(select_by, "")
    extra = [f"method.name={method}", f"train.iterations={iterations}", f"train.seed={seed}",
             f"train.select_by={select_by}"]
    options = {"pretrain_iterations": str(pretrain)} if method == "bcp" else {}
    options.update(item.split("=", 1) for item in option)
    extra.append("method.options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}")
    if method == "supervised":  # with label-free selection its unlabelled images are scored, never trained on
        extra += ["train.unlabeled_batch_size=null"] + (["data.unlabeled=null"] if select_by != "label_free" else [])
    cfg = config(k, name, [*extra, *overrides], source)
    t0 = time.perf_counter()
    trained = api.train(cfg)
    train_wall = time.perf_counter() - t0
    result = {
        "method": method, "k": k, "iterations": iterations,
        "pretrain_iterations": pretrain if method == "bcp" else None, "seed": seed,
        "tag": tag, "options": list(option), "overrides": list(overrides),
        "train_wall_min": round(train_wall / 60, 1), "checkpoint_policy": str(trained.selection),
        "trained_on": list(LABELLED[:k]), "evaluated_on": list(LABELLED[k:]),
        "hardware": {**machine_description(), "torch_threads": cfg.train.threads},
        "source_checkpoint": str(cfg.source_checkpoint), "config_digest": cfg.digest(), "run_id": trained.run_id,
        "cross_validation": trained.cross_validation,
        "label_free_iteration": trained.loop.best_iteration if trained.selection == "label_free" else None,
        "eval": evaluate(trained.checkpoint, cfg, OUT / name / "eval"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lge_ssda_{name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def source_rows(source: Path | None = None) -> None:
    """The source model, untrained on LGE, on each held-out set (the reference every row must beat)."""
    for k in KS:
        cfg = config(k, f"source_k{k}", [], source)
        result = {"method": "source", "k": k, "iterations": 0, "seed": 0, "train_wall_min": 0.0,
                  "evaluated_on": list(LABELLED[k:]),
                  "eval": evaluate(Path(cfg.source_checkpoint), cfg, OUT / f"source_k{k}" / "eval")}
        (RESULTS / f"lge_ssda_source_k{k}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


def table() -> str:
    order = {"source": 0, "supervised": 1, "mean_teacher": 2, "bcp": 3}
    found = [json.loads(p.read_text(encoding="utf-8")) for p in RESULTS.glob("lge_ssda_*.json")]
    found.sort(key=lambda r: (r["k"], r.get("seed", 0), order[r["method"]], r.get("tag") or ""))
    head = ("| k | evaluated on | method | iterations | train wall (min) | Dice | RV | Myo | LV | HD95 mm | "
            "Dice + largest component | HD95 mm + largest component |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in found:
        e, c = r["eval"]["plain"]["summary"], r["eval"]["largest_component"]["summary"]
        label = _label(r) + (" (few-shot fine-tune)" if r["method"] == "supervised" else "")
        label += f" (seed {r['seed']})" if r.get("seed") else ""
        iters = f"{r['iterations']} ({r['pretrain_iterations']} + {r['iterations'] - r['pretrain_iterations']})" \
            if r.get("pretrain_iterations") else str(r["iterations"])
        if r.get("cross_validation"):  # the final run stopped where the folds' mean held-out Dice peaked
            iters += f", stopped at {r['cross_validation']['iteration']} by {len(r['cross_validation']['folds'])}-fold cv"
        if r.get("label_free_iteration"):  # the monitor's best-scoring checkpoint of the run (its final phase)
            iters += f", checkpoint {r['label_free_iteration']} chosen label-free"
        lines.append(
            f"| {r['k']} | {len(r['evaluated_on'])} images | {label} | {iters} | {r['train_wall_min']} | "
            f"{100 * e['dice/mean']:.1f} | {100 * e['dice/RV']:.1f} | {100 * e['dice/Myo']:.1f} | "
            f"{100 * e['dice/LV']:.1f} | {e.get('hd95/mean', float('nan')):.1f} | {100 * c['dice/mean']:.1f} | "
            f"{c.get('hd95/mean', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def summary() -> str:
    """Per k and method: Dice per seed, the mean, and the paired difference from the few-shot twin (same seed)."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in RESULTS.glob("lge_ssda_*.json")]
    dice = {(r["k"], _label(r), r.get("seed", 0)): 100 * r["eval"]["plain"]["summary"]["dice/mean"] for r in found}
    head = "| k | evaluated on | method | Dice per seed | mean | vs few-shot fine-tune (paired by seed) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    budgets = {(r["k"], _label(r)): _twin_label(r) for r in found}
    variants = sorted({m for (_, m, _) in dice if m not in METHODS and m != "source"})
    for k in KS:
        for method in (*METHODS, *variants):
            seeds = sorted(s for (kk, m, s) in dice if kk == k and m == method)
            if not seeds:
                continue
            values = [dice[(k, method, s)] for s in seeds]
            twin = budgets[(k, method)]
            paired = [dice[(k, method, s)] - dice[(k, twin, s)] for s in seeds if (k, twin, s) in dice]
            delta = "" if method == twin or not paired else (
                f"{sum(paired) / len(paired):+.1f} ({', '.join(f'{d:+.1f}' for d in paired)})")
            label = f"few-shot fine-tune (supervised twin){method[len('supervised'):]}" if method == twin else method
            lines.append(f"| {k} | {5 - k} images | {label} | {' / '.join(f'{v:.1f}' for v in values)} | "
                         f"{sum(values) / len(values):.1f} | {delta} |")
    return "\n".join(lines)


def per_image() -> str:
    """Dice per held-out image (mean over RV/Myo/LV) of every run: which images decide the differences."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("lge_ssda_*.json"))]
    head = "| run | " + " | ".join(LABELLED[1:]) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(found, key=lambda r: (r["k"], _label(r), r.get("seed", 0))):
        per_case: dict[str, list[float]] = {}
        for row in r["eval"]["plain"]["rows"]:
            per_case.setdefault(row["case"], []).append(row["dice"])
        cells = [f"{100 * sum(v) / len(v):.1f}" if (v := per_case.get(i)) else "" for i in LABELLED[1:]]
        lines.append(f"| k={r['k']} {_label(r)} seed {r.get('seed', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cv_choices() -> str:
    """Per cross-validated run: each fold's held-out image and Dice, the mean curve's value at a few iterations,
    and the chosen stop (Dice in %, on the held-out *training* images, never on the evaluation images)."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("lge_ssda_*.json"))]
    found = [r for r in found if r.get("cross_validation")]
    if not found:
        return ""
    head = "| run | held out per fold | fold Dice at the chosen iteration | mean at 600 / 1200 / 1800 | chosen: iteration, mean |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(found, key=lambda r: (r["k"], _label(r), r.get("seed", 0))):
        cv = r["cross_validation"]
        mean, it = dict(cv["mean_val_dice"]), cv["iteration"]
        folds = " / ".join(f"{100 * dict(f['val_dice'])[it]:.1f}" for f in cv["folds"])
        marks = " / ".join(f"{100 * mean[m]:.1f}" if m in mean else "-" for m in (600, 1200, 1800))
        held = ", ".join("+".join(f["held_out"]) for f in cv["folds"])
        lines.append(f"| k={r['k']} {_label(r)} seed {r.get('seed', 0)} | {held} | {folds} | {marks} | "
                     f"{it}, {100 * mean[it]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--k", type=int, choices=KS)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--pretrain", type=int, default=200, help="BCP copy-paste pre-training iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", action="store_true", help="evaluate the source model on each held-out set")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the saved results")
    parser.add_argument("--tag", help="a recipe variant's name: trains into <method>_k<k>[_seedN]_TAG")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option of the variant (repeatable; needs --tag)")
    parser.add_argument("--source-checkpoint", type=Path,
                        help="another source model (default: the config's); use with --results")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where result files go (default %(default)s)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--cross-validate", action="store_const", dest="select_by", const="cross_validation",
                        default="last", help="select the checkpoint by cross-validation over the k labelled images "
                        "(k >= 2)")
    select.add_argument("--label-free", action="store_const", dest="select_by", const="label_free",
                        help="select the checkpoint with the label-free monitor on the unlabelled images")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for this run (e.g. train.compile=true; not part of the run's name)")
    args = parser.parse_args()
    RESULTS = args.results
    if args.option and not args.tag:
        parser.error("--option changes the recipe: name the variant with --tag")
    if any("=" not in item for item in args.option):
        parser.error("--option takes KEY=VALUE")
    if args.source:
        source_rows(args.source_checkpoint)
    if args.method:
        if args.k is None:
            parser.error("--method needs --k")
        r = run(args.method, args.k, args.iterations, args.pretrain, args.seed, args.tag, tuple(args.option),
                args.source_checkpoint, args.select_by, tuple(args.override))
        print(f"{_label(r)} k={args.k}: Dice {100 * r['eval']['plain']['summary']['dice/mean']:.1f} "
              f"on {', '.join(r['evaluated_on'])} ({r['train_wall_min']} min training)")
    if args.table:
        print(summary() + "\n\n" + table() + "\n\n" + per_image() + "\n\n" + cv_choices())


if __name__ == "__main__":
    main()
