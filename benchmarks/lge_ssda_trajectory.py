"""Where does BCP from the source model drift with one labelled LGE image? (issue 12; BENCHMARKS.md, "The k = 1
drift, seen without labels").

Trains BCP [preunmixed] (or its few-shot fine-tune twin) from the bSSFP source model on k labelled LGE images for a
fixed budget (the recipe of `run_ssda_benchmark.py`, last checkpoint), keeping a checkpoint every `train.val_every` iterations
(`train.keep_checkpoints`; nothing is validated, so the run is the fixed-budget run itself). Each kept checkpoint is
then scored twice:

- with labels, on the 5 - k held-out labelled images (analysis only: no run or rule is chosen on them);
- without labels, on the 25 unlabelled LGE images the run trains on: the label-free monitor of `medda adapt`
  (entropy, flip consistency, predicted class ratios, docs/methods.md section 7) with the k labelled images' own
  marginal class ratios as its prior, exactly as `train.select_by=label_free` scores a run.

The question it answers: does any label-free statistic move with the held-out Dice when stage 2 drifts, so that a
stopping rule for k = 1 (where cross-validation is impossible) could be built on it?

    MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/lge_ssda_trajectory.py [--method supervised] --k 1 [--seed 1]
    .venv/bin/python benchmarks/lge_ssda_trajectory.py --table
    .venv/bin/python benchmarks/lge_ssda_trajectory.py --steps trajectory_bcp_k1_it1800   # one run, every checkpoint
    ... --k 1 --tag teval --option teacher_mode=eval     # a BCP variant: one option changed (BENCHMARKS.md, "What
                                                         # drives the k = 1 drift")
    ... --results benchmarks/results/lge_ssda_source3    # another source model's runs (one folder per source model)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_ssda_benchmark as ssda  # noqa: E402

RESULTS = ssda.REPO / "benchmarks" / "results" / "lge_ssda_source2"


def label_free_scorer(cfg, labelled_prior):
    """score(checkpoint) -> the label-free statistics and score of a model on the unlabelled LGE images, from the
    monitor `train.select_by=label_free` uses, with the same prior."""
    import torch

    from medda.api import PREPROCESSING_FIELDS, label_free_monitor
    from medda.data.loading import Data
    from medda.models.factory import load_model
    from medda.runtime import Runtime

    runtime = Runtime.setup(cfg)
    source, meta = load_model(cfg.source_checkpoint)
    data_cfg = cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS})
    data = Data.load(data_cfg)
    cases = data.cases(data_cfg.unlabeled, "unlabeled")
    selection = cfg.selection.model_copy(update={"cases": len(cases)})
    monitor = label_free_monitor(runtime, cfg.model_copy(update={"data": data_cfg, "selection": selection}), data,
                                 cases, torch.tensor(labelled_prior), source)

    def score(checkpoint: Path, iteration: int) -> dict:
        model, _ = load_model(checkpoint)
        monitor(model, iteration)
        return dict(monitor.state.history[-1])

    return score


def labelled_ratios(cfg) -> list[float]:
    """The marginal class ratios of the k labelled images in the training geometry (`medda.data.priors`)."""
    from medda.api import PREPROCESSING_FIELDS
    from medda.data.loading import Data
    from medda.data.priors import measure_class_prior
    from medda.models.factory import read_checkpoint

    meta = read_checkpoint(cfg.source_checkpoint)["meta"]
    data_cfg = cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS})
    data = Data.load(data_cfg)
    record = measure_class_prior(data.card, data_cfg, data.cases(data_cfg.train, "train"), str(data_cfg.card))
    return [record["marginal"][name] for name in data.card.class_names]


def label_free_choice(r: dict) -> int:
    """The iteration `train.select_by=label_free` keeps: the best monitor score (`flip consistency - KL(ratios ||
    labelled ratios)`) among the final phase's checks (BCP: after stage 1), the earliest of equal ones, as the loop
    keeps it."""
    candidates = [t for t in r["trajectory"] if t["iteration"] > (r.get("pretrain_iterations") or 0)]
    return max(candidates, key=lambda t: (_score(t), -t["iteration"]))["iteration"]


def _score(t: dict) -> float:
    return t["label_free"]["score"]


def steps(name: str, results: Path = RESULTS) -> str:
    """One trajectory, every kept checkpoint: held-out Dice (and RV Dice) against the label-free statistics."""
    r = json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
    head = ("| iteration | held-out Dice | RV Dice | flip consistency (unlabelled) | predicted RV ratio (unlabelled) | "
            "label-free score |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in r["trajectory"]:
        h, f = t["held_out"], t["label_free"]
        lines.append(f"| {t['iteration']} | {100 * h['dice']:.1f} | {100 * h['per_class']['RV']:.1f} | "
                     f"{f['flip_consistency']:.3f} | {100 * f['ratio/1']:.2f}% | {f['score']:.4f} |")
    return "\n".join(lines)


def table(results: Path = RESULTS) -> str:
    """Per trajectory: held-out Dice of the last checkpoint, of the label-free choice and (hindsight, never a rule)
    of the best checkpoint; and how the label-free score ranks the checkpoints against their held-out Dice."""
    head = ("| run | last checkpoint | label-free choice (iteration) | best in hindsight (iteration) | "
            "Spearman(score, Dice), final phase | RV ratio on unlabelled: labelled / at choice / last |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted(results.glob("trajectory_*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        by_it = {t["iteration"]: t for t in r["trajectory"]}
        last, chosen = max(by_it), label_free_choice(r)
        phase = [t for t in r["trajectory"] if t["iteration"] > (r.get("pretrain_iterations") or 0)]
        best = max(phase, key=lambda t: t["held_out"]["dice"])["iteration"]
        rho = _spearman([_score(t) for t in phase], [t["held_out"]["dice"] for t in phase])
        dice = {it: 100 * by_it[it]["held_out"]["dice"] for it in (last, chosen, best)}
        rv = [r["labelled_prior"][1], by_it[chosen]["label_free"]["ratio/1"], by_it[last]["label_free"]["ratio/1"]]
        budget = f"{r['pretrain_iterations']} + {r['iterations'] - r['pretrain_iterations']}" \
            if r.get("pretrain_iterations") else str(r["iterations"])
        tag = f" [{r['tag']}]" if r.get("tag") else ""
        name = f"k={r['k']} {r['method']}{tag} ({budget}) seed {r['seed']}"
        lines.append(f"| {name} | {dice[last]:.1f} | {dice[chosen]:.1f} ({chosen}) | {dice[best]:.1f} ({best}) | "
                     f"{rho:+.2f} | {' / '.join(f'{100 * v:.2f}%' for v in rv)} |")
    return "\n".join(lines)


def verdicts(results: Path = RESULTS, margin: float = 0.005) -> str:
    """Per k and seed, BCP against its fine-tune twin, both selected label-free: held-out Dice of each choice, and
    what the monitor's verdict (`medda train-ssl`, `selection.margin`) would have said from the unlabelled images."""
    runs = {}
    for path in results.glob("trajectory_*.json"):
        r = json.loads(path.read_text(encoding="utf-8"))
        if not r.get("tag"):  # the recipe's twins only
            runs[(r["k"], r["seed"], r["method"])] = r
    head = ("| k | seed | bcp: Dice, score | fine-tune: Dice, score | bcp - fine-tune (held-out) | "
            "the monitor prefers | right? (under 0.5 Dice apart: either answer) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, seed in sorted({(k, seed) for k, seed, _ in runs}):
        if (k, seed, "bcp") not in runs or (k, seed, "supervised") not in runs:
            continue
        chosen = {}
        for method in ("bcp", "supervised"):
            r = runs[(k, seed, method)]
            t = {t["iteration"]: t for t in r["trajectory"]}[label_free_choice(r)]
            chosen[method] = (100 * t["held_out"]["dice"], _score(t))
        (dice_b, score_b), (dice_s, score_s) = chosen["bcp"], chosen["supervised"]
        prefers = "neither" if abs(score_b - score_s) <= margin else ("bcp" if score_b > score_s else "fine-tune")
        diff = dice_b - dice_s
        right = ("abstains" if prefers == "neither" else
                 "yes" if (prefers == "bcp") == (diff > 0) or abs(diff) < 0.5 else "no")
        lines.append(f"| {k} | {seed} | {dice_b:.1f}, {score_b:.3f} | {dice_s:.1f}, {score_s:.3f} | {diff:+.1f} | "
                     f"{prefers} | {right} |")
    return "\n".join(lines)


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table of the saved trajectories and exit")
    parser.add_argument("--steps", metavar="NAME", help="print every checkpoint of one saved trajectory and exit")
    parser.add_argument("--method", choices=("bcp", "supervised"), default="bcp",
                        help="bcp [preunmixed] or its few-shot fine-tune twin (same budget, no unlabelled images)")
    parser.add_argument("--k", type=int, choices=ssda.KS, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1800)
    parser.add_argument("--pretrain", type=int, default=600)
    parser.add_argument("--tag", help="a BCP variant's name: trains into trajectory_bcp_TAG_k<k>...")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a BCP option of the variant, on top of the recipe's (repeatable; needs --tag)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where trajectories go and --table reads them (default %(default)s); one folder per "
                        "source model")
    args = parser.parse_args()
    if bool(args.option) != bool(args.tag) or (args.tag and args.method != "bcp"):
        parser.error("a BCP variant takes both --tag and --option (and --method bcp)")
    if any("=" not in item for item in args.option):
        parser.error("--option takes KEY=VALUE")
    if args.table:
        print(table(args.results) + "\n\n" + verdicts(args.results))
        return 0
    if args.steps:
        print(steps(args.steps, args.results))
        return 0

    from medda import api
    from medda.runtime import machine_description

    method = args.method + (f"_{args.tag}" if args.tag else "")
    name = f"trajectory_{method}_k{args.k}" + (f"_seed{args.seed}" if args.seed else "") + f"_it{args.iterations}"
    extra = [f"method.name={args.method}", f"train.iterations={args.iterations}", f"train.seed={args.seed}",
             "train.keep_checkpoints=true", "train.compile=true", "train.select_by=last"]  # the fixed-budget run
    if args.method == "bcp":
        options = {"pretrain_iterations": str(args.pretrain), "pretrain_loss": "unmixed"}
        options.update(item.split("=", 1) for item in args.option)
        extra.append("method.options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}")
    else:  # the twin trains on the labelled images alone; the unlabelled ones are only scored, after the run
        extra += ["data.unlabeled=null", "train.unlabeled_batch_size=null", "method.options={}"]
    cfg = ssda.config(args.k, name, extra)
    t0 = time.perf_counter()
    trained = api.train(cfg)
    train_wall = time.perf_counter() - t0
    prior = labelled_ratios(cfg)
    # scored on the recipe's unlabelled images (the twin trains without them)
    score = label_free_scorer(ssda.config(args.k, name, extra[:1]), prior)
    kept = sorted(trained.last.parent.glob("it*.pt"), key=lambda p: int(p.stem[2:]))
    trajectory = [{"iteration": 0, "label_free": score(Path(cfg.source_checkpoint), 0),
                   "held_out": _held_out(Path(cfg.source_checkpoint), cfg, "it0")}]
    for path in kept:
        it = int(path.stem[2:])
        trajectory.append({"iteration": it, "label_free": score(path, it), "held_out": _held_out(path, cfg, path.stem)})
        print(f"it {it}: held-out Dice {trajectory[-1]['held_out']['dice']:.3f}", flush=True)
    result = {
        "method": args.method, "tag": args.tag, "options": list(args.option), "k": args.k, "seed": args.seed, "iterations": args.iterations,
        "pretrain_iterations": args.pretrain if args.method == "bcp" else None,
        "trained_on": list(ssda.LABELLED[:args.k]), "evaluated_on": list(ssda.LABELLED[args.k:]),
        "labelled_prior": prior, "train_wall_min": round(train_wall / 60, 1), "run_id": trained.run_id,
        "hardware": {**machine_description(), "torch_threads": cfg.train.threads},
        "source_checkpoint": str(cfg.source_checkpoint), "trajectory": trajectory,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{name}.json"  # not lge_ssda_*: run_ssda_benchmark's tables read those
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(out)
    return 0


def _held_out(checkpoint: Path, cfg, tag: str) -> dict:
    """Mean foreground Dice (and per class) of a checkpoint on the held-out labelled images, no post-processing."""
    from collections import defaultdict

    from medda import api

    ev = api.evaluate(checkpoint, cfg.model_copy(update={"output_dir": cfg.output_dir / "trajectory" / tag}))
    per_case = defaultdict(list)
    for row in ev.rows:
        per_case[row["case"]].append(row["dice"])
    return {"dice": ev.summary["dice/mean"],
            "per_class": {k.split("/")[1]: ev.summary[k] for k in ev.summary if k.count("/") == 1
                          and k.startswith("dice/") and k not in ("dice/mean", "dice/n_nan")},
            "per_case": {case: sum(v) / len(v) for case, v in per_case.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
