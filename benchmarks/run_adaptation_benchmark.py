"""ACDC -> MS-CMRSeg bSSFP source-free adaptation benchmark (issues 2 and 3), on CPU.

Stages (each one's result is saved under benchmarks/out/state/, so an interrupted run resumes where it stopped):
1. source: train the 2D ACDC source model (configs/acdc_source_2d.yaml; best-on-validation checkpoint on the ACDC
   val split, the last one kept too) and evaluate it on the 40 ACDC test volumes and on the 35 MS-CMR volumes;
2. adapt: adapt it to MS-CMR with every method / setting in ADAPT_SETTINGS (configs/acdc_to_mscmr_adapt.yaml;
   all 35 volumes unlabelled for adaptation, the same 35 with labels for evaluation) and evaluate the checkpoint
   chosen by the label-free rule and the last one; record whether the rule's recommendation was right;
3. oracle: a 2D model trained on MS-CMR labels, 2-fold cross-validation (odd / even case numbers), each fold
   evaluated on the other half; the table reports the mean over all 35 held-out predictions;
4. fewshot: finetune_fewshot of the source model on k = 1, 2, 3 labelled MS-CMR volumes (case01..), evaluated
   on the remaining 35 - k (not source-free w.r.t. target labels).

Usage (from the repository root; data only through MEDDA_DATA_ROOT):
    MEDDA_DATA_ROOT=/path/to/data nohup .venv/bin/python benchmarks/run_adaptation_benchmark.py \
        > benchmarks/out/benchmark.log 2>&1 &
Results: benchmarks/results/acdc_to_mscmr.json (+ _per_case.json) and benchmarks/results/acdc_to_mscmr.md.
`--quick` runs a tiny smoke version into benchmarks/out/quick (results not written to benchmarks/results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_CONFIG = REPO / "configs" / "acdc_source_2d.yaml"
ADAPT_CONFIG = REPO / "configs" / "acdc_to_mscmr_adapt.yaml"

def adam(lr: float, weight_decay: float = 0.0) -> dict:
    return {"name": "adam", "lr": lr, "weight_decay": weight_decay}


# Hyperparameters come from docs/methods.md recommendations only (never chosen on MS-CMR test Dice); every
# setting run is reported. name -> (method, options, optimiser, one-line rationale).
ADAPT_SETTINGS: dict[str, tuple[str, dict, dict, str]] = {
    "none": ("none", {}, {}, "source model as is (one monitoring pass)"),
    "adabn": ("adabn", {"w_test": 1.0}, {}, "AdaBN: BN statistics re-estimated on the target (one pass)"),
    "adabn_w0.1": ("adabn", {"w_test": 0.1}, {}, "test-time BN calibration 'BN-0.1' (You et al.): 0.9 source + 0.1 target"),
    "tent_lr1e-3": ("tent", {}, adam(1e-3), "Tent reference optimiser (Adam 1e-3, CIFAR config)"),
    "tent_lr1e-4": ("tent", {}, adam(1e-4), "Tent, Adam 1e-4 (lower start recommended for segmentation)"),
    "entropy_prior_ref": (
        "entropy_prior", {"trainable": "all", "absent_classes": "predicted_tags"}, adam(1e-6, 1e-4),
        "AdaMI reference optimiser: whole network, Adam 1e-6, wd 1e-4 (BN in train mode updates its statistics)",
    ),
    "entropy_prior_bn": (
        "entropy_prior", {"trainable": "bn_affine", "absent_classes": "predicted_tags"}, adam(1e-4),
        "AdaMI loss, Tent-style (BN affine, batch statistics, as the authors' later TTA code), Adam 1e-4",
    ),
    "osuda": ("osuda", {}, adam(1e-4), "OSUDA defaults (eta0 0.1, tau 100, L1, global alpha, BN affine), Adam 1e-4"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Wall-clock and process CPU seconds (all threads) of a stage."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def git_info() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout

    diff = git("diff", "HEAD")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty_files": [
            line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        ],
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16],
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = REPO / "benchmarks" / "out" / ("quick" if args.quick else "full")
        self.state_dir = self.out / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tracking = [f"tracking.uri=sqlite:///{self.out / 'mlflow.db'}"]

    # ----------------------------------------------------------------------------------------- helpers
    def stage(self, name: str, fn):
        path = self.state_dir / f"{name}.json"
        if path.is_file():
            log(f"{name}: done before, loading {path.relative_to(REPO)}")
            return json.loads(path.read_text())
        log(f"{name}: start")
        with Clock() as clock:
            result = fn()
        result["wall_s"], result["cpu_s"] = round(clock.wall, 1), round(clock.cpu, 1)
        path.write_text(json.dumps(result, indent=1, default=str))
        log(f"{name}: done in {clock.wall:.0f} s wall, {clock.cpu:.0f} s CPU")
        return result

    def config(self, path: Path, overrides: list[str]):
        from medda.config import load_config

        quick = []
        if self.args.quick:
            quick = (
                ["data.val.limit=2", "data.test.limit=3"] if path == SOURCE_CONFIG else ["data.test.limit=4"]
            )
        return load_config(path, [*self.tracking, *quick, *overrides])

    def evaluate(self, checkpoint: str, cfg, name: str) -> dict:
        from medda import api

        cfg = cfg.model_copy(update={"output_dir": self.out / "eval" / name})
        cfg.tracking.run_name = f"bench-eval-{name}"
        with Clock() as clock:
            result = api.evaluate(Path(checkpoint), cfg)
        keep = ("dice", "hd95")
        rows = [{k: r[k] for k in ("case", "class", *keep)} for r in result.rows]
        log(
            f"  eval {name}: Dice {result.summary['dice/mean']:.4f}, HD95 {result.summary['hd95/mean']:.2f} "
            f"{result.units} ({clock.wall:.0f} s)"
        )
        return {
            "checkpoint": str(Path(checkpoint).relative_to(REPO)),
            "units": result.units,
            "summary": result.summary,
            "rows": rows,
            "eval_wall_s": round(clock.wall, 1),
        }

    # ----------------------------------------------------------------------------------------- stages
    def source(self) -> dict:
        from medda import api

        a = self.args
        cfg = self.config(
            SOURCE_CONFIG,
            [
                f"train.iterations={a.source_iterations}",
                f"train.val_every={a.source_val_every}",
                f"output_dir={self.out / 'source'}",
                "tracking.run_name=bench-source-acdc",
            ],
        )
        with Clock() as clock:
            res = api.train(cfg)
        steps = [h for h in res.loop.history if "val/score" in h]
        out = {
            "config": str(SOURCE_CONFIG.relative_to(REPO)),
            "iterations": res.loop.iterations,
            "best_iteration": res.loop.best_iteration,
            "best_val_dice": res.loop.best_score,
            "val_history": [{"iteration": h["iteration"], "val_dice": h["val/score"]} for h in steps],
            "checkpoint": str(res.checkpoint),
            "last": str(res.last),
            "train_wall_s": round(clock.wall, 1),
            "train_loop_s": round(res.loop.seconds, 1),
            "run_id": res.run_id,
        }
        log(
            f"  source: best val Dice {res.loop.best_score:.4f} at {res.loop.best_iteration}, "
            f"{res.loop.seconds / max(res.loop.iterations, 1):.2f} s/iteration incl. validation"
        )
        return out

    def eval_source(self, source: dict) -> dict:
        acdc = self.config(SOURCE_CONFIG, [])
        mscmr = self.config(ADAPT_CONFIG, [])
        return {
            "acdc_test_best": self.evaluate(source["checkpoint"], acdc, "source-best-acdc"),
            "acdc_test_last": self.evaluate(source["last"], acdc, "source-last-acdc"),
            "mscmr_best": self.evaluate(source["checkpoint"], mscmr, "source-best-mscmr"),
            "mscmr_last": self.evaluate(source["last"], mscmr, "source-last-mscmr"),
        }

    def adapt(self, name: str, source: dict, source_dice: dict[str, float], fewshot_k: int = 0) -> dict:
        from medda import api
        from medda.models.factory import read_checkpoint

        a = self.args
        if fewshot_k:
            method, options = "finetune_fewshot", {"trainable": "all"}
            optim = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0}
            rationale = (
                f"supervised fine-tuning on {fewshot_k} labelled MS-CMR volume(s), Adam 1e-4, all weights"
            )
            iterations = a.fewshot_iterations
        else:
            method, options, optim, rationale = ADAPT_SETTINGS[name]
            iterations = a.adapt_iterations
        overrides = [
            f"source_checkpoint={source['checkpoint']}",
            f"method.name={method}",
            f"method.options={json.dumps(options)}",
            f"train.iterations={iterations}",
            f"train.val_every={a.adapt_val_every}",
            f"output_dir={self.out / 'adapt' / name}",
            f"tracking.run_name=bench-adapt-{name}",
        ] + [f"optim.{k}={v}" for k, v in optim.items()]
        if fewshot_k:
            overrides += [
                f"data.train={json.dumps({'path': str(self.fewshot_list(fewshot_k)), 'split': 'training'})}",
                "data.samples_per_volume=8",
                "train.batch_size=1",
                "data.augment=true",
            ]
        cfg = self.config(ADAPT_CONFIG, overrides)
        with Clock() as clock:
            res = api.adapt(cfg)
        chosen_meta = read_checkpoint(res.adapted)["meta"]
        last_path = Path(cfg.output_dir) / "last.pt"
        out = {
            "method": method,
            "options": options,
            "optim": optim,
            "rationale": rationale,
            "iterations": iterations,
            "prior_source": res.prior_source,
            "recommended": res.recommended,
            "reason": res.reason,
            "collapse": res.collapse,
            "adapt_wall_s": round(clock.wall, 1),
            "chosen_iteration": chosen_meta.get("iteration"),
            "last_iteration": read_checkpoint(last_path)["meta"].get("iteration"),
            "chosen_tag": chosen_meta.get("tag"),
            "label_free_history": res.history,
            "run_id": res.run_id,
        }
        mscmr = self.config(ADAPT_CONFIG, [])
        out["eval_chosen"] = self.evaluate(str(res.adapted), mscmr, f"{name}-chosen")
        if Path(res.adapted).resolve() == last_path.resolve():
            out["eval_last"] = out["eval_chosen"]
        else:
            out["eval_last"] = self.evaluate(str(last_path), mscmr, f"{name}-last")
        held_out = None
        if fewshot_k:
            held_out = {f"case{i:02d}" for i in range(1, fewshot_k + 1)}
        for key in ("eval_chosen", "eval_last"):
            out[key] = restrict(out[key], held_out)
        src = source_dice["all"] if not fewshot_k else source_dice[f"without_{fewshot_k}"]
        adapted = out["eval_chosen"]["summary"]["dice/mean"]
        out["source_dice_same_cases"] = src
        out["adapted_better_than_source"] = adapted > src
        out["label_free_verdict_correct"] = res.recommended == (adapted > src)
        out["used_model_dice"] = adapted if res.recommended else src
        return out

    def fewshot_list(self, k: int) -> Path:
        root = Path(os.environ["MEDDA_DATA_ROOT"]) / "mscmr_bssfp"
        path = self.out / "datalists" / f"fewshot_{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        cases = [
            {
                "image": str(root / "images" / f"case{i:02d}.nii.gz"),
                "label": str(root / "labels" / f"case{i:02d}.nii.gz"),
            }
            for i in range(1, k + 1)
        ]
        path.write_text(json.dumps({"training": cases}, indent=1))
        return path

    def oracle_fold(self, fold: str) -> dict:
        from medda import api

        root = Path(os.environ["MEDDA_DATA_ROOT"]) / "mscmr_bssfp"
        ids = [f"case{i:02d}" for i in range(1, 36)]
        train_ids = [c for i, c in enumerate(ids, 1) if (i % 2 == 1) == (fold == "odd")]
        test_ids = [c for c in ids if c not in train_ids]
        if self.args.quick:
            test_ids = test_ids[:3]
        path = self.out / "datalists" / f"oracle_train_{fold}.json"
        path.parent.mkdir(parents=True, exist_ok=True)

        def entries(cs):
            return [
                {"image": str(root / "images" / f"{c}.nii.gz"), "label": str(root / "labels" / f"{c}.nii.gz")}
                for c in cs
            ]

        path.write_text(json.dumps({"training": entries(train_ids), "test": entries(test_ids)}, indent=1))
        cfg = self.config(
            SOURCE_CONFIG,
            [
                "data.card=data_cards/mscmr_bssfp.yaml",
                f"data.train={json.dumps({'path': str(path), 'split': 'training'})}",
                "data.val=null",
                f"data.test={json.dumps({'path': str(path), 'split': 'test'})}",
                f"train.iterations={self.args.oracle_iterations}",
                "train.select_by=last",
                f"output_dir={self.out / 'oracle' / fold}",
                f"tracking.run_name=bench-oracle-train-{fold}",
            ],
        )
        with Clock() as clock:
            res = api.train(cfg)
        ev = self.evaluate(str(res.last), cfg, f"oracle-{fold}")
        return {
            "train_cases": train_ids,
            "test_cases": test_ids,
            "iterations": res.loop.iterations,
            "train_wall_s": round(clock.wall, 1),
            "eval": ev,
            "run_id": res.run_id,
        }


def restrict(ev: dict, exclude: set[str] | None) -> dict:
    """Recompute a summary without the `exclude` cases (few-shot training volumes)."""
    if not exclude:
        return ev
    from medda import metrics

    rows = [r for r in ev["rows"] if r["case"] not in exclude]
    full = [dict(r, units=ev["units"], assd=math.nan, nsd=math.nan) for r in rows]
    summary = {
        k: v
        for k, v in metrics.summarise(full).items()
        if k.split("/")[0] in ("dice", "hd95", "n_cases", "units")
    }
    return dict(ev, rows=rows, summary=summary)


def mean_over(evals: list[dict]) -> dict:
    """Pool the per-case rows of several evaluations (the two oracle folds) into one summary."""
    from medda import metrics

    rows = [dict(r, units=e["units"], assd=math.nan, nsd=math.nan) for e in evals for r in e["rows"]]
    summary = {
        k: v
        for k, v in metrics.summarise(rows).items()
        if k.split("/")[0] in ("dice", "hd95", "n_cases", "units")
    }
    return {"units": evals[0]["units"], "summary": summary, "rows": [r for e in evals for r in e["rows"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source-iterations", type=int, default=2500)
    p.add_argument("--source-val-every", type=int, default=250)
    p.add_argument("--adapt-iterations", type=int, default=300)
    p.add_argument("--adapt-val-every", type=int, default=50)
    p.add_argument("--oracle-iterations", type=int, default=2500)
    p.add_argument("--fewshot-iterations", type=int, default=100)
    p.add_argument(
        "--settings", default=",".join(ADAPT_SETTINGS), help="comma-separated ADAPT_SETTINGS names"
    )
    p.add_argument("--skip-oracle", action="store_true")
    p.add_argument("--skip-fewshot", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny smoke run into benchmarks/out/quick")
    args = p.parse_args()
    if "MEDDA_DATA_ROOT" not in os.environ:
        print("set MEDDA_DATA_ROOT to the folder holding acdc/ and mscmr_bssfp/", file=sys.stderr)
        return 2
    if args.quick:
        args.source_iterations, args.source_val_every = 6, 3
        args.adapt_iterations, args.adapt_val_every, args.oracle_iterations, args.fewshot_iterations = (
            4,
            2,
            4,
            3,
        )
    import torch

    os.chdir(REPO)
    bench = Bench(args)
    started, cpu0 = time.perf_counter(), time.process_time()
    results: dict = {
        "benchmark": "ACDC (source, 2D) -> MS-CMRSeg bSSFP (target), source-free adaptation",
        "command": "MEDDA_DATA_ROOT=... python "
        + " ".join(["benchmarks/run_adaptation_benchmark.py", *sys.argv[1:]]),
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "note": "2 vCPU AMD EPYC shared with other jobs (contention)",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git": git_info(),
        "budgets": vars(args),
    }
    import monai

    results["versions"]["monai"] = monai.__version__
    source = bench.stage("source_train", bench.source)
    results["source"] = source
    src_eval = bench.stage("source_eval", lambda: bench.eval_source(source))
    results["source_eval"] = src_eval
    src_rows = src_eval["mscmr_best"]
    source_dice = {"all": src_rows["summary"]["dice/mean"]}
    for k in (1, 2, 3):
        source_dice[f"without_{k}"] = restrict(src_rows, {f"case{i:02d}" for i in range(1, k + 1)})[
            "summary"
        ]["dice/mean"]
    results["adapt"] = {}
    for name in [s for s in args.settings.split(",") if s]:
        results["adapt"][name] = bench.stage(
            f"adapt_{name}", lambda n=name: bench.adapt(n, source, source_dice)
        )
    if not args.skip_fewshot:
        results["fewshot"] = {
            k: bench.stage(
                f"fewshot_{k}", lambda k=k: bench.adapt(f"fewshot_k{k}", source, source_dice, fewshot_k=k)
            )
            for k in (1, 2, 3)
        }
    if not args.skip_oracle:
        folds = {f: bench.stage(f"oracle_{f}", lambda f=f: bench.oracle_fold(f)) for f in ("odd", "even")}
        results["oracle"] = {
            "folds": folds,
            "pooled": mean_over([folds["odd"]["eval"], folds["even"]["eval"]]),
        }
    results["this_invocation"] = {
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
    }
    stages = [json.loads(p.read_text()) for p in sorted(bench.state_dir.glob("*.json"))]
    results["total_stage_wall_s"] = round(sum(s.get("wall_s", 0) for s in stages), 1)
    results["total_stage_cpu_s"] = round(sum(s.get("cpu_s", 0) for s in stages), 1)
    add_paired(results)
    write_results(results, bench, args.quick)
    return 0


def write_results(results: dict, bench: Bench, quick: bool) -> None:
    dest = bench.out if quick else REPO / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    per_case: dict = {}

    def strip(node, path=""):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "rows":
                    per_case[path] = v
                    continue
                out[k] = strip(v, f"{path}/{k}" if path else k)
            return out
        if isinstance(node, list):
            return [strip(v, path) for v in node]
        if isinstance(node, str) and node.startswith(f"{REPO}/"):
            return node[len(f"{REPO}/") :]  # repository-relative paths only
        return node

    summary = strip(results)
    (dest / "acdc_to_mscmr.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (dest / "acdc_to_mscmr_per_case.json").write_text(json.dumps(per_case, default=str) + "\n")
    (dest / "acdc_to_mscmr.md").write_text(markdown_table(summary) + "\n")
    log(f"wrote {dest / 'acdc_to_mscmr.json'} and the table {dest / 'acdc_to_mscmr.md'}")


def per_case_dice(ev: dict) -> dict[str, float]:
    """Mean foreground Dice per case (over RV, Myo, LV)."""
    by_case: dict[str, list[float]] = {}
    for r in ev["rows"]:
        by_case.setdefault(r["case"], []).append(float(r["dice"]))
    return {c: sum(v) / len(v) for c, v in by_case.items()}


def paired_vs_source(ev: dict, source_ev: dict, seed: int = 0) -> dict:
    """Per-case Dice difference (model - source) on the cases both were evaluated on, with a bootstrap 95% CI."""
    import numpy as np

    a, b = per_case_dice(ev), per_case_dice(source_ev)
    cases = sorted(set(a) & set(b))
    d = np.array([a[c] - b[c] for c in cases])
    boots = np.random.default_rng(seed).choice(d, size=(10000, len(d)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    truth = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return {
        "cases": len(cases),
        "mean_dice_diff": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "truth": truth,
    }


def reading(recommended: bool, truth: str) -> str:
    """The label-free recommendation against the CI-aware truth."""
    if recommended:
        return {
            "better": "right (gain)",
            "worse": "WRONG (harm)",
            "no clear difference": "harmless (no clear gain)",
        }[truth]
    return {
        "better": "missed gain",
        "worse": "right (avoided harm)",
        "no clear difference": "right (nothing to gain)",
    }[truth]


def add_paired(results: dict) -> None:
    src = results["source_eval"]["mscmr_best"]
    entries = list(results.get("adapt", {}).values()) + list(results.get("fewshot", {}).values())
    for a in entries:
        for key in ("eval_chosen", "eval_last"):
            a[f"paired_{key}"] = paired_vs_source(a[key], src)
        a["label_free_reading"] = reading(a["recommended"], a["paired_eval_chosen"]["truth"])
    if "oracle" in results:
        results["oracle"]["paired_vs_source"] = paired_vs_source(results["oracle"]["pooled"], src)


def _fmt(summary: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    v = summary.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}"


HEAD = "| model | checkpoint | Dice mean | RV | Myo | LV | HD95 mean | RV | Myo | LV | HD95 undefined |"
SEP = "|" + "---|" * 11


def _row(label: str, checkpoint: str, summary: dict) -> str:
    dice = [_fmt(summary, f"dice/{c}", 100) for c in ("mean", "RV", "Myo", "LV")]
    hd = [_fmt(summary, f"hd95/{c}") for c in ("mean", "RV", "Myo", "LV")]
    return "| " + " | ".join([label, checkpoint, *dice, *hd, str(summary.get("hd95/n_nan", 0))]) + " |"


def _diff(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{100 * p['mean_dice_diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _chosen(a: dict) -> str:
    """Which adapted checkpoint `AdaptResult.adapted` is: the label-free best, or the last when none beat the source."""
    if a["chosen_tag"] == "best":
        return f"label-free best (it {a['chosen_iteration']})"
    return f"last (it {a['chosen_iteration']}); rule kept the source"


def _section(title: str, source_name: str, best: dict, last: dict) -> list[str]:
    """A table's title, header and the source model's best-on-val and last rows."""
    return [title, "", HEAD, SEP, _row(source_name, "best on ACDC val", best["summary"]),
            _row("source", "last", last["summary"])]


def markdown_table(r: dict) -> str:
    se = r["source_eval"]
    lines = _section(
        "**MS-CMRSeg bSSFP, all 35 volumes** (Dice in %, HD95 in mm; adaptation used the same 35 volumes, "
        "without labels)",
        "source (no adaptation)", se["mscmr_best"], se["mscmr_last"],
    )
    for name, a in r.get("adapt", {}).items():
        lines.append(_row(name, _chosen(a), a["eval_chosen"]["summary"]))
        if a["last_iteration"] != a["chosen_iteration"]:
            lines.append(_row(name, f"last (it {a['last_iteration']})", a["eval_last"]["summary"]))
    if "oracle" in r:
        lines.append(
            _row(
                "oracle: trained on MS-CMR labels, 2-fold CV",
                "last, per fold",
                r["oracle"]["pooled"]["summary"],
            )
        )
    if "fewshot" in r:
        lines += [
            "",
            "**Few-shot fine-tuning on k labelled MS-CMR volumes** (reads target labels: not source-free); "
            "evaluated on the 35 - k other volumes",
            "",
            HEAD,
            SEP,
        ]
        for k, a in r["fewshot"].items():
            lines.append(_row(f"finetune k={k}", _chosen(a), a["eval_chosen"]["summary"]))
            if a["last_iteration"] != a["chosen_iteration"]:
                lines.append(
                    _row(f"finetune k={k}", f"last (it {a['last_iteration']})", a["eval_last"]["summary"])
                )
    lines += [
        "",
        "**Label-free rule vs the truth** (ΔDice = per-case mean foreground Dice of the label-free-chosen "
        "checkpoint minus the source model's, on the same cases, in points, with a 95% bootstrap CI; "
        "'strict' is the brief's test: recommended == (adapted Dice > source Dice))",
        "",
        "| setting | chosen it | recommended | ΔDice chosen [95% CI] | wins/losses | ΔDice last | strict verdict "
        "| CI-aware reading |",
        "|" + "---|" * 8,
    ]
    entries = [(n, a) for n, a in r.get("adapt", {}).items()] + [
        (f"finetune k={k}", a) for k, a in r.get("fewshot", {}).items()
    ]
    for name, a in entries:
        p, pl = a["paired_eval_chosen"], a["paired_eval_last"]
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(a["chosen_iteration"]),
                    "yes" if a["recommended"] else "no",
                    _diff(p),
                    f"{p['wins']}/{p['losses']}",
                    _diff(pl),
                    "correct" if a["label_free_verdict_correct"] else "wrong",
                    a["label_free_reading"],
                ]
            )
            + " |"
        )
    lines += [""] + _section(
        "**ACDC test, 40 volumes** (source domain; Dice in %, HD95 in voxels: the ACDC copy's spacing is "
        "unknown)",
        "source", se["acdc_test_best"], se["acdc_test_last"],
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
