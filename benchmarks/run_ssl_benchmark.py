"""ACDC semi-supervised benchmark (issue 5): supervised-only, mean teacher and BCP with 3 or 7 labelled patients.

One process per method (run them side by side, one torch thread each, on 2 cores): train with
configs/acdc_ssl_2d.yaml (checkpoint chosen on the 20 ACDC val volumes, never on test), then evaluate the
best-on-val and the last checkpoint on the 40 test volumes (20 patients). Dice and Jaccard in %, HD95 and ASSD in
**voxels** (the spacing of this ACDC copy is unknown). Jaccard per case and class is D / (2 - D).

Usage (repository root; data only through MEDDA_DATA_ROOT):
    MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/run_ssl_benchmark.py --method bcp --labeled 3 \
        --iterations 4000 --pretrain 1000
Writes benchmarks/results/acdc_ssl_<method>_<labeled>_<iterations>.json; `--largest-component` adds a
post-processed evaluation of each best-on-val checkpoint; `--table` prints the Markdown tables of every result.

Ablations: `--tag NAME` with `--option KEY=VALUE` (method options, e.g. `ema_decay=0.999`) and/or
`--override KEY=VALUE` (config overrides, e.g. `train.unlabeled_batch_size=4`) trains a variant under its own name
(`..._NAME`); `--table` lists each variant against the untagged run of the same method, budget and seed, and the
gain lines pair BCP runs with the untagged supervised twin of the same seed (tagged variants once they have two
seeds); a variant with `--override`s is paired with the supervised runs trained with the same overrides.

Untagged BCP runs are the paper's recipe: the script sets `method.options` to `pretrain_iterations` alone, which
replaces the config's options. The recipe the config ships (`pretrain_loss: unmixed`, stage 1 on unmixed labelled
batches) is the variant `--option pretrain_loss=unmixed --tag preunmixed`; with two seeds it gets its own gain line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "acdc_ssl_2d.yaml"
RESULTS = REPO / "benchmarks" / "results"
OUT = REPO / "benchmarks" / "out" / "ssl"  # a run `<name>` trains into OUT/<name> and writes RESULTS/acdc_ssl_<name>.json


def _evaluate(checkpoint: Path, cfg, out: Path) -> dict:
    """Test-set summary of one checkpoint: Dice/HD95/ASSD/NSD per class and mean, plus Jaccard."""
    from medda import api
    from medda.metrics import jaccard_summary

    ev = api.evaluate(checkpoint, cfg.model_copy(update={"output_dir": out}))
    summary = {k: v for k, v in ev.summary.items() if isinstance(v, (int, float))}
    return {**summary, **jaccard_summary(ev.rows), "units": ev.units}


def largest_component_eval() -> None:
    """Re-evaluate every saved best-on-val checkpoint with largest-connected-component post-processing.

    Post-processing only: the checkpoint was already chosen on validation without it, so the test set still
    selects nothing.
    """
    from medda.config import load_config

    for path in sorted(RESULTS.glob("acdc_ssl_*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        if "best_on_val_lcc" in r["eval"]:
            continue
        out = OUT / path.stem.removeprefix("acdc_ssl_")
        cfg = load_config(CONFIG, [f"output_dir={out}", "inference.largest_component=true",
                                   f"tracking.run_name=bench-ssl-{out.name}-lcc"])
        r["eval"]["best_on_val_lcc"] = _evaluate(out / "best.pt", cfg, out / "eval_best_on_val_lcc")
        path.write_text(json.dumps(r, indent=2))
        print(f"{path.name}: Dice {100 * r['eval']['best_on_val_lcc']['dice/mean']:.1f} with largest component")


def run(args: argparse.Namespace) -> dict:
    from medda import api
    from medda.config import load_config
    from medda.runtime import machine_description

    split = f"labeled_{args.labeled}_patients"
    name = f"{args.method}_{args.labeled}_{args.iterations}" + (f"_seed{args.seed}" if args.seed else "")
    name += f"_{args.tag}" if args.tag else ""
    out = OUT / name
    overrides = [
        f"method.name={args.method}", f"data.train.split={split}", f"data.unlabeled.exclude_split={split}",
        f"train.iterations={args.iterations}", f"train.val_every={args.val_every}", f"output_dir={out}",
        f"tracking.run_name=bench-ssl-{name}",
        f"train.seed={args.seed}",
        "train.threads=1",  # as the recorded runs; the recipe itself uses every usable CPU
    ]
    options = dict(item.split("=", 1) for item in args.option)
    if args.method == "bcp":
        options = {"pretrain_iterations": str(args.pretrain), **options}
    overrides.append("method.options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}")
    if args.method == "supervised":
        overrides.append("data.unlabeled=null")
    overrides += args.override
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    trained = api.train(cfg)
    train_wall = time.perf_counter() - t0
    result = {
        "method": args.method, "labeled_patients": args.labeled, "iterations": args.iterations,
        "pretrain_iterations": args.pretrain if args.method == "bcp" else None,
        "train_wall_min": round(train_wall / 60, 1), "selected": str(trained.selection),
        "best_iteration": trained.loop.best_iteration,
        "best_val_dice": trained.loop.best_score,  # recipes are compared on this, not on test
        "seed": args.seed, "tag": args.tag, "options": args.option, "overrides": args.override,
        "hardware": {**machine_description(), "torch_threads": cfg.train.threads},
        "config_digest": cfg.digest(), "eval": {},
    }
    for policy, path in (("best_on_val", trained.checkpoint), ("last", trained.last)):
        result["eval"][policy] = _evaluate(path, cfg, out / f"eval_{policy}")
    result["wall_min_total"] = round((time.perf_counter() - t0) / 60, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"acdc_ssl_{name}.json").write_text(json.dumps(result, indent=2))
    return result


def _best_is_last(r: dict) -> bool:
    return r.get("best_iteration") == r["iterations"]


def _checkpoint(r: dict, policy: str) -> str:
    if policy == "last":
        return "last"
    best = r.get("best_iteration")
    label = f"best on val (it {best})" if best else "best on val"
    label = "best on val = last" if _best_is_last(r) else label
    return label + " + largest component" if policy == "best_on_val_lcc" else label


def _iterations(r: dict) -> str:
    pre = r.get("pretrain_iterations")
    return f"{r['iterations']} ({pre} + {r['iterations'] - pre})" if pre else str(r["iterations"])


def _method(r: dict) -> str:
    return r["method"] + (f" [{r['tag']}]" if r.get("tag") else "") + (f" (seed {r['seed']})" if r.get("seed") else "")


def _key(r: dict) -> tuple:
    return r["method"], r["labeled_patients"], r["iterations"], r.get("seed", 0)


def _results() -> list[dict]:
    order = {"supervised": 0, "mean_teacher": 1, "bcp": 2}
    found = [json.loads(p.read_text(encoding="utf-8")) for p in RESULTS.glob("acdc_ssl_*.json")]
    return sorted(found, key=lambda r: (r["labeled_patients"], r["iterations"], r.get("seed", 0), order[r["method"]]))


def table() -> str:
    """Mean table (Dice per class) and, for the best-on-val checkpoints, Jaccard/HD95/ASSD per class."""
    head = ("| labelled | method | iterations | train wall (min) | checkpoint | Dice | RV | Myo | LV | Jaccard | "
            "HD95 (vox) | ASSD (vox) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    classes = ("RV", "Myo", "LV")
    per_class_head = ("| labelled | method | iterations | " + " | ".join(
        f"{m} {c}" for m in ("Jaccard", "HD95", "ASSD") for c in classes) + " |")
    per_class = [per_class_head, "|" + "---|" * (per_class_head.count("|") - 1)]
    for r in _results():
        for policy, e in r["eval"].items():
            if policy == "last" and _best_is_last(r):
                continue  # the same checkpoint as best-on-val
            lines.append(
                f"| {r['labeled_patients']} | {_method(r)} | {_iterations(r)} | {r['train_wall_min']} | "
                f"{_checkpoint(r, policy)} | {100 * e['dice/mean']:.1f} | {100 * e['dice/RV']:.1f} | "
                f"{100 * e['dice/Myo']:.1f} | {100 * e['dice/LV']:.1f} | {100 * e['jaccard/mean']:.1f} | "
                f"{e['hd95/mean']:.1f} | {e['assd/mean']:.1f} |"
            )
        e = r["eval"]["best_on_val"]
        cells = [f"{100 * e[f'jaccard/{c}']:.1f}" for c in classes]
        cells += [f"{e[f'{m}/{c}']:.1f}" for m in ("hd95", "assd") for c in classes]
        per_class.append(f"| {r['labeled_patients']} | {_method(r)} | {_iterations(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBest-on-val checkpoints, per class (Jaccard %, HD95 and ASSD in voxels):\n\n" + \
        "\n".join(per_class) + "\n\n" + "\n".join(gains()) + ablations()


def _twin_key(r: dict) -> tuple:
    return "supervised", r["labeled_patients"], r["iterations"], r.get("seed", 0), tuple(r.get("overrides", []))


def _twins() -> dict[tuple, dict]:
    """Supervised twins by `_twin_key`: the untagged runs, and the runs of a variant that changes the data or training
    settings (`--override`), whose BCP runs are compared with the twin trained with the same overrides."""
    return {_twin_key(r): r for r in _results()
            if r["method"] == "supervised" and (not r.get("tag") or r.get("overrides"))}


def ablations() -> str:
    """Each tagged variant against the untagged run of the same method, labelled patients, budget and seed."""
    base = {_key(r): r for r in _results() if not r.get("tag")}
    twins = _twins()
    rows = []
    for r in _results():
        ref = base.get(_key(r)) if r.get("tag") else None
        if ref is None:
            continue
        dice, ref_dice = (100 * x["eval"]["best_on_val"]["dice/mean"] for x in (r, ref))
        pretrain = [f"--pretrain {r['pretrain_iterations']}"] if r["pretrain_iterations"] != ref["pretrain_iterations"] else []
        change = ", ".join([*pretrain, *r.get("options", []), *r.get("overrides", [])])
        twin = twins.get(_twin_key(r)) if r["method"] != "supervised" else None  # a supervised variant is its own twin
        vs_twin = f"{dice - 100 * twin['eval']['best_on_val']['dice/mean']:+.1f}" if twin else ""
        rows.append(f"| {r['labeled_patients']} | {r['method']} | {_iterations(r)} | {r.get('seed', 0)} | {r['tag']} | "
                    f"`{change}` | {ref_dice:.1f} | {dice:.1f} | {dice - ref_dice:+.1f} | {vs_twin} | "
                    f"{r['train_wall_min']} |")
    if not rows:
        return ""
    head = ("| labelled | method | iterations | seed | variant | change | Dice, untagged run | Dice, variant | "
            "difference | variant vs supervised twin | train wall (min) |")
    return "\n\nAblations (best-on-val checkpoints):\n\n" + "\n".join([head, "|" + "---|" * 11, *rows])


def gains() -> list[str]:
    """BCP's test Dice minus its supervised twin's (same labelled patients, budget and seed; best-on-val
    checkpoints), per seed and their mean, for every budget where both ran: the untagged (reference-recipe) runs,
    then each tagged BCP variant run with two or more seeds, against the same untagged twins (or, for a variant with
    `--override`s, against the supervised runs with the same overrides)."""
    twins = _twins()
    by_budget: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for r in _results():
        _, labeled, iterations, seed = _key(r)
        twin = twins.get(_twin_key(r))
        if r["method"] == "bcp" and twin:
            gain = 100 * (r["eval"]["best_on_val"]["dice/mean"] - twin["eval"]["best_on_val"]["dice/mean"])
            by_budget.setdefault((r.get("tag") or "", labeled, iterations), []).append((seed, gain))
    lines = []
    for (tag, labeled, iterations), seeds in sorted(by_budget.items()):
        if tag and len(seeds) < 2:
            continue  # a single-seed variant's gain is a column of the ablation table
        values = [g for _, g in sorted(seeds)]
        mean = sum(values) / len(values)
        per_seed = ", ".join(f"seed {seed} {g:+.1f}" for seed, g in sorted(seeds))
        spread = f", spread {max(values) - min(values):.1f}" if len(values) > 1 else ""
        name = f"BCP [{tag}]" if tag else "BCP"
        lines.append(f"{name} gain over supervised twin ({labeled} labelled, {iterations} iterations): {mean:+.1f} "
                     f"(mean of {len(values)} seed{'s' if len(values) > 1 else ''}: {per_seed}{spread})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("supervised", "mean_teacher", "bcp"))
    parser.add_argument("--labeled", type=int, choices=(3, 7), default=3)
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--pretrain", type=int, default=1000, help="BCP stage-1 iterations (within --iterations)")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="training seed (the labelled patients stay fixed)")
    parser.add_argument("--tag", help="an ablation's name: trains into <method>_<labeled>_<iterations>[_seedN]_TAG")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option for an ablation (repeatable; needs --tag)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for an ablation (repeatable; needs --tag)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the saved results")
    parser.add_argument("--largest-component", action="store_true",
                        help="re-evaluate the saved best-on-val checkpoints with largest-component post-processing")
    args = parser.parse_args()
    if args.largest_component:
        largest_component_eval()
        return
    if args.table:
        print(table())
        return
    if args.method is None:
        parser.error("--method is required (or --table)")
    if (args.option or args.override) and not args.tag:
        parser.error("--option and --override change the recipe: name the variant with --tag")
    if any("=" not in item for item in args.option + args.override):
        parser.error("--option and --override take KEY=VALUE")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
