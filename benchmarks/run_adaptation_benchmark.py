"""Source-free adaptation benchmarks on real shifts, on CPU: `--scenario acdc_to_mscmr` (ACDC -> MS-CMRSeg bSSFP,
the small site shift; issues 2 and 3) and `--scenario bssfp_to_lge` (MS-CMRSeg bSSFP -> LGE, the large sequence
shift; issue 11).

bssfp_to_lge: source = configs/mscmr_bssfp_source_2d.yaml (bSSFP cases 01-30, checkpoint chosen on 31-35); adapt on
all 30 LGE images without labels (configs/mscmr_lge_adapt.yaml); evaluate on the 5 labelled LGE images (development
checks only: the project is also judged on labelled LGE images that are not shipped); few-shot fine-tuning on k = 1..4
of the 5 labelled images, evaluated on the other 5 - k; every validated checkpoint of every method is also scored
against labels (`checkpoint_audit`) to measure the label-free rule. No oracle (too few target labels).

The stages below describe acdc_to_mscmr:

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
        [--scenario bssfp_to_lge] > benchmarks/out/benchmark.log 2>&1 &
Results: benchmarks/results/<scenario>.json (+ _per_case.json) and benchmarks/results/<scenario>.md.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scenario:
    """One source -> target benchmark: its recipes, target folder and labelled target ids for few-shot rows."""

    title: str
    source_config: Path
    adapt_config: Path
    target_folder: str  # under MEDDA_DATA_ROOT
    target_name: str
    fewshot_ids: tuple[str, ...]  # labelled target cases, in the order few-shot runs take them
    fewshot_ks: tuple[int, ...]
    oracle: bool  # 2-fold oracle trained on target labels
    out: str  # benchmarks/out/<out>


SCENARIOS = {
    "acdc_to_mscmr": Scenario(
        "ACDC (source, 2D) -> MS-CMRSeg bSSFP (target), source-free adaptation",
        REPO / "configs" / "acdc_source_2d.yaml", REPO / "configs" / "acdc_to_mscmr_adapt.yaml", "mscmr_bssfp",
        "MS-CMRSeg bSSFP, all 35 volumes", tuple(f"case{i:02d}" for i in range(1, 36)), (1, 2, 3), True, "full",
    ),
    "bssfp_to_lge": Scenario(
        "MS-CMRSeg bSSFP (source, 2D) -> MS-CMRSeg LGE (target), source-free adaptation",
        REPO / "configs" / "mscmr_bssfp_source_2d.yaml", REPO / "configs" / "mscmr_lge_adapt.yaml", "mscmr_lge",
        "MS-CMRSeg LGE, the 5 labelled images", ("subject1", "subject29", "subject36", "subject41", "subject8"),
        (1, 2, 3, 4), False, "lge",
    ),
}

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
        "entropy_prior", {"trainable": "bn_affine_batch_stats", "absent_classes": "predicted_tags"}, adam(1e-4),
        "AdaMI loss, Tent-style (BN affine, batch statistics, as the authors' later TTA code), Adam 1e-4",
    ),
    "osuda": ("osuda", {}, adam(1e-4), "OSUDA defaults (eta0 0.1, tau 100, L1, global alpha, BN affine), Adam 1e-4"),
}
# bssfp_to_lge: every method with its reference recipe (the method defaults, {} = nothing overridden), plus the
# settings of the table. Nothing here was chosen on the LGE labels.
LGE_SETTINGS: dict[str, tuple[str, dict, dict, str]] = {
    "none": ADAPT_SETTINGS["none"],
    "adabn": ADAPT_SETTINGS["adabn"],
    "tent": ("tent", {}, {}, "Tent, reference optimiser (method default: Adam 1e-3)"),
    "tent_lr1e-4": ADAPT_SETTINGS["tent_lr1e-4"],
    "entropy_prior_ref": (
        "entropy_prior", {"absent_classes": "predicted_tags"}, {},
        "AdaMI reference recipe (method default: whole network, Adam 1e-6, wd 1e-4), label-free presence tags",
    ),
    "entropy_prior_bn": ADAPT_SETTINGS["entropy_prior_bn"],
    "osuda": ("osuda", {}, {}, "OSUDA defaults (mean-normalised consistency; method default Adam 1e-4)"),
    "dpl": ("dpl", {}, {}, "DPL defaults (10 flip/noise passes, std < 0.05, prototypes; method default Adam 2e-3)"),
    "shot_im": ("shot_im", {}, {}, "SHOT-IM defaults (uniform diversity; method default SGD 1e-3, momentum 0.9)"),
    "shot_im_prior": ("shot_im", {"diversity_target": "prior"}, {}, "SHOT-IM with the measured class prior as the "
                      "diversity target"),
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
        self.sc = SCENARIOS[args.scenario]
        self.settings = LGE_SETTINGS if args.scenario == "bssfp_to_lge" else ADAPT_SETTINGS
        self.out = REPO / "benchmarks" / "out" / (f"quick_{self.sc.out}" if args.quick else self.sc.out)
        self.state_dir = self.out / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tracking = [f"tracking.uri=sqlite:///{self.out / 'mlflow.db'}"]

    # ----------------------------------------------------------------------------------------- helpers
    def stage(self, name: str, fn):
        path = self.state_dir / f"{name}.json"
        if path.is_file():
            log(f"{name}: done before, loading {path.relative_to(REPO)}")
            return json.loads(path.read_text(encoding="utf-8"))
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
                ["data.val.limit=2"] if path == self.sc.source_config
                else [] if self.sc.oracle is False else ["data.test.limit=4"]
            )
        # one thread, as the recorded runs (two jobs side by side); the recipes themselves use every usable CPU
        return load_config(path, [*self.tracking, "train.threads=1", *quick, *overrides])

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
            "checkpoint": os.path.relpath(Path(checkpoint).resolve(), REPO),
            "units": result.units,
            "summary": result.summary,
            "rows": rows,
            "eval_wall_s": round(clock.wall, 1),
        }

    # ----------------------------------------------------------------------------------------- stages
    def source(self) -> dict:
        from medda import api

        a = self.args
        if a.source_checkpoint:
            return self.given_source(Path(a.source_checkpoint))
        cfg = self.config(
            self.sc.source_config,
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
            "config": str(self.sc.source_config.relative_to(REPO)),
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

    def given_source(self, checkpoint: Path) -> dict:
        """A source model trained beforehand with the scenario's source recipe (`medda train <source config>`)."""
        from medda.models.factory import read_checkpoint

        checkpoint, last = self.with_training_prior(checkpoint), self.with_training_prior(checkpoint.parent / "last.pt")
        meta = read_checkpoint(checkpoint)["meta"]
        return {"config": str(self.sc.source_config.relative_to(REPO)), "trained_by": "medda train "
                + str(self.sc.source_config.relative_to(REPO)), "best_iteration": meta.get("iteration"),
                "iterations": read_checkpoint(last)["meta"].get("iteration") if last.is_file() else None,
                "checkpoint": str(checkpoint.resolve()), "last": str(last.resolve()), "run_id": meta.get("run_id"),
                "config_digest": meta.get("config_digest")}

    def with_training_prior(self, checkpoint: Path) -> Path:
        """`checkpoint` itself if it records its training-geometry class prior, else a copy that does.

        Checkpoints written before `medda train` recorded the prior get it measured exactly as `medda train` now
        does (the source recipe's labelled training cases, `medda.data.priors.measure_class_prior`).
        """
        from medda.config import load_config
        from medda.data.cards import load_card
        from medda.data.datalist import read_cases
        from medda.data.priors import measure_class_prior
        from medda.models.factory import load_model, save_checkpoint

        model, meta = load_model(checkpoint)
        if meta.get("class_prior"):
            return checkpoint
        cfg = load_config(self.sc.source_config, self.tracking)
        card = load_card(cfg.data.card)
        meta["class_prior"] = measure_class_prior(card, cfg.data, read_cases(cfg.data.train, card, str(cfg.data.card)),
                                                  str(cfg.data.card))
        meta["class_prior_added_by"] = "benchmarks/run_adaptation_benchmark.py (measured as medda train does)"
        copy = self.out / "source_with_prior" / checkpoint.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        log(f"  {checkpoint.name}: recorded its training-geometry class prior in {copy.relative_to(REPO)}")
        return save_checkpoint(copy, model, meta)

    def eval_source(self, source: dict) -> dict:
        target = self.config(self.sc.adapt_config, [])
        if self.args.scenario == "bssfp_to_lge":
            val = self.config(self.sc.source_config, [])
            val = val.model_copy(update={"data": val.data.model_copy(update={"test": val.data.val})})
            return {
                "source_val_best": self.evaluate(source["checkpoint"], val, "source-best-bssfp-val"),
                "target_best": self.evaluate(source["checkpoint"], target, "source-best-lge"),
                "target_best_lcc": self.evaluate(source["checkpoint"], target.model_copy(update={
                    "inference": target.inference.model_copy(update={"largest_component": True})}),
                    "source-best-lge-lcc"),
                "target_last": self.evaluate(source["last"], target, "source-last-lge"),
            }
        acdc = self.config(self.sc.source_config, [])
        mscmr = target
        return {
            "acdc_test_best": self.evaluate(source["checkpoint"], acdc, "source-best-acdc"),
            "acdc_test_last": self.evaluate(source["last"], acdc, "source-last-acdc"),
            "target_best": self.evaluate(source["checkpoint"], mscmr, "source-best-mscmr"),
            "target_last": self.evaluate(source["last"], mscmr, "source-last-mscmr"),
        }

    def adapt(self, name: str, source: dict, source_dice: dict[str, float], fewshot_k: int = 0) -> dict:
        from medda import api
        from medda.models.factory import read_checkpoint

        a = self.args
        if fewshot_k:
            method, options = "finetune_fewshot", {"trainable": "all"}
            optim = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0}
            rationale = (
                f"supervised fine-tuning on {fewshot_k} labelled target volume(s), Adam 1e-4, all weights"
            )
            iterations = a.fewshot_iterations
        else:
            method, options, optim, rationale = self.settings[name]
            iterations = a.adapt_iterations
        overrides = [
            f"source_checkpoint={source['checkpoint']}",
            f"method.name={method}",
            f"method.options={json.dumps(options)}",
            f"train.iterations={iterations}",
            f"train.val_every={a.adapt_val_every}",
            f"output_dir={self.out / 'adapt' / name}",
            f"tracking.run_name=bench-adapt-{name}",
            "train.keep_checkpoints=true",
        ] + [f"optim.{k}={v}" for k, v in optim.items()]
        if fewshot_k:
            overrides += [
                f"data.train={json.dumps({'path': str(self.fewshot_list(fewshot_k)), 'split': 'training'})}",
                "data.samples_per_volume=8",
                "train.batch_size=1",
                "data.augment=true",
                "data.test=null",  # adapt refuses a test set that overlaps the labelled cases; evaluated below
            ]
        cfg = self.config(self.sc.adapt_config, overrides)
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
        target_cfg = self.config(self.sc.adapt_config, [])
        out["eval_chosen"] = self.evaluate(str(res.adapted), target_cfg, f"{name}-chosen")
        # The same checkpoint with largest-connected-component post-processing (a fixed anatomical rule, not tuned).
        lcc_cfg = target_cfg.model_copy(update={"inference": target_cfg.inference.model_copy(
            update={"largest_component": True})})
        out["eval_chosen_lcc"] = self.evaluate(str(res.adapted), lcc_cfg, f"{name}-chosen-lcc")
        if Path(res.adapted).resolve() == last_path.resolve():
            out["eval_last"] = out["eval_chosen"]
        else:
            out["eval_last"] = self.evaluate(str(last_path), target_cfg, f"{name}-last")
        held_out = set(self.sc.fewshot_ids[:fewshot_k]) if fewshot_k else None
        out["checkpoint_audit"] = self.audit_checkpoints(Path(cfg.output_dir), Path(source["checkpoint"]),
                                                         res.history, target_cfg, name, held_out)
        for key in ("eval_chosen", "eval_chosen_lcc", "eval_last"):
            out[key] = restrict(out[key], held_out)
        src = source_dice["all"] if not fewshot_k else source_dice[f"without_{fewshot_k}"]
        adapted = out["eval_chosen"]["summary"]["dice/mean"]
        out["source_dice_same_cases"] = src
        out["adapted_better_than_source"] = adapted > src
        out["label_free_verdict_correct"] = res.recommended == (adapted > src)
        out["used_model_dice"] = adapted if res.recommended else src
        return out

    def audit_checkpoints(self, folder: Path, source: Path, history: list[dict], target_cfg, name: str,
                          held_out: set[str] | None) -> list[dict]:
        """Every validated checkpoint's label-free score next to its true Dice on the labelled target images."""
        rows = []
        for entry in history:
            it = entry["iteration"]
            path = source if it == 0 else folder / f"it{it}.pt"
            if not path.is_file():
                continue
            ev = restrict(self.evaluate(str(path), target_cfg, f"{name}-it{it}"), held_out)
            rows.append({"iteration": it, "score": entry["score"], "true_dice": ev["summary"]["dice/mean"],
                         "hd95": ev["summary"].get("hd95/mean"),
                         **{k: entry[k] for k in ("flip_consistency", "prior_kl", "entropy") if k in entry}})
        return rows

    def fewshot_list(self, k: int) -> Path:
        root = Path(os.environ["MEDDA_DATA_ROOT"]) / self.sc.target_folder
        path = self.out / "datalists" / f"fewshot_{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        cases = [
            {"image": str(root / "images" / f"{cid}.nii.gz"), "label": str(root / "labels" / f"{cid}.nii.gz")}
            for cid in self.sc.fewshot_ids[:k]
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
            self.sc.source_config,
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
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="acdc_to_mscmr")
    p.add_argument("--source-checkpoint", default=None,
                   help="a source model already trained with the scenario's source recipe (skips source training)")
    p.add_argument("--settings", default=None, help="comma-separated setting names (default: all of the scenario)")
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

    from medda.runtime import machine_description

    os.chdir(REPO)
    bench = Bench(args)
    started, cpu0 = time.perf_counter(), time.process_time()
    results: dict = {
        "benchmark": SCENARIOS[args.scenario].title,
        "scenario": args.scenario,
        "command": "MEDDA_DATA_ROOT=... python "
        + " ".join(["benchmarks/run_adaptation_benchmark.py", *sys.argv[1:]]),
        "hardware": {**machine_description(), "threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version()},  # torch's: in "hardware"
        "git": git_info(),
        "budgets": vars(args),
    }
    import monai

    results["versions"]["monai"] = monai.__version__
    source = bench.stage("source_train", bench.source)
    results["source"] = source
    src_eval = bench.stage("source_eval", lambda: bench.eval_source(source))
    results["source_eval"] = src_eval
    src_rows = src_eval["target_best"]
    source_dice = {"all": src_rows["summary"]["dice/mean"]}
    for k in bench.sc.fewshot_ks:
        source_dice[f"without_{k}"] = restrict(src_rows, set(bench.sc.fewshot_ids[:k]))["summary"]["dice/mean"]
    results["adapt"] = {}
    for name in [s for s in (args.settings or ",".join(bench.settings)).split(",") if s]:
        results["adapt"][name] = bench.stage(
            f"adapt_{name}", lambda n=name: bench.adapt(n, source, source_dice)
        )
    if not args.skip_fewshot:
        results["fewshot"] = {
            k: bench.stage(
                f"fewshot_{k}", lambda k=k: bench.adapt(f"fewshot_k{k}", source, source_dice, fewshot_k=k)
            )
            for k in bench.sc.fewshot_ks
        }
    if not args.skip_oracle and bench.sc.oracle:
        folds = {f: bench.stage(f"oracle_{f}", lambda f=f: bench.oracle_fold(f)) for f in ("odd", "even")}
        results["oracle"] = {
            "folds": folds,
            "pooled": mean_over([folds["odd"]["eval"], folds["even"]["eval"]]),
        }
    results["this_invocation"] = {
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
    }
    stages = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(bench.state_dir.glob("*.json"))]
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
    stem = results["scenario"]
    (dest / f"{stem}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (dest / f"{stem}_per_case.json").write_text(json.dumps(per_case, default=str) + "\n")
    (dest / f"{stem}.md").write_text(markdown_table(summary) + "\n")
    log(f"wrote {dest / (stem + '.json')} and the table {dest / (stem + '.md')}")


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
    src = results["source_eval"]["target_best"]
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
    if a["method"] == "finetune_fewshot":
        return f"last (it {a['chosen_iteration']}), fixed budget"
    if a["chosen_tag"] == "best":
        return f"label-free best (it {a['chosen_iteration']})"
    return f"last (it {a['chosen_iteration']}); rule kept the source"


def _section(title: str, source_name: str, best: dict, last: dict, val_name: str) -> list[str]:
    """A table's title, header and the source model's best-on-val and last rows."""
    return [title, "", HEAD, SEP, _row(source_name, f"best on {val_name}", best["summary"]),
            _row("source", "last", last["summary"])]


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def replay_rule(history: list[dict], collapse: str, cfg) -> tuple[int | None, bool]:
    """The recommendation rule of `cfg` (a SelectionConfig) re-applied to a recorded label-free history.

    Returns (chosen iteration or None, recommended). A collapsed run's last check is the collapsed one: excluded.
    """
    from medda.selection import score

    checks = history[1:-1] if collapse else history[1:]
    chosen = max(checks, key=lambda h: score(h, cfg), default=None)
    if chosen is None:
        return None, False
    return chosen["iteration"], score(chosen, cfg) - score(history[0], cfg) > cfg.margin


def audit_lines(r: dict) -> list[str]:
    """Label-free score vs true Dice for every validated checkpoint: rank correlation and the rule's choice.

    The rule is replayed with medda's current `selection` defaults on the recorded statistics, so the table shows
    what `medda adapt` recommends today even for runs recorded under an earlier default.
    """
    from medda.config import SelectionConfig

    cfg = SelectionConfig()
    lines = ["", f"**Label-free score vs true Dice, every validated checkpoint** (iteration 0 = the source model; "
             f"score = flip consistency - {cfg.kl_weight:g} x prior KL, medda's default, replayed on the recorded "
             "statistics; Spearman rank correlation within each run; 'rule' = Dice of the model the rule "
             "recommends, 'best' = the best Dice among the run's checkpoints, source included)", "",
             "| setting | checkpoints | Spearman(score, Dice) | rule: it, verdict | rule Dice | best Dice | source Dice "
             "| rule - source | best - rule |", "|" + "---|" * 9]
    pooled_s, pooled_d = [], []
    for name, a in r.get("adapt", {}).items():
        rows = a.get("checkpoint_audit") or []
        if not rows:
            continue
        from medda.selection import score

        by_it = {h["iteration"]: h for h in a["label_free_history"]}
        scores = [score(by_it[row["iteration"]], cfg) for row in rows]
        dice = [row["true_dice"] for row in rows]
        pooled_s += scores
        pooled_d += dice
        true = {row["iteration"]: row["true_dice"] for row in rows}
        source = true.get(0, math.nan)
        it, recommended = replay_rule(a["label_free_history"], a["collapse"], cfg)
        used = true.get(it, math.nan) if recommended else source
        verdict = f"{it}, {'use adapted' if recommended else 'keep source'}"
        lines.append(f"| {name} | {len(rows)} | {spearman(scores, dice):.2f} | {verdict} | {100 * used:.1f} | "
                     f"{100 * max(dice):.1f} | {100 * source:.1f} | {100 * (used - source):+.1f} | "
                     f"{100 * (max(dice) - used):.1f} |")
    lines += ["", f"Pooled over all runs' checkpoints: Spearman {spearman(pooled_s, pooled_d):.2f} "
              f"({len(pooled_s)} checkpoints)."]
    return lines


def markdown_table(r: dict) -> str:
    se = r["source_eval"]
    lge = r.get("scenario") == "bssfp_to_lge"
    title = ("**MS-CMRSeg LGE, the 5 labelled images** (Dice in %, HD95 in mm; adaptation used all 30 LGE images, "
             "without labels; development check only)" if lge else
             "**MS-CMRSeg bSSFP, all 35 volumes** (Dice in %, HD95 in mm; adaptation used the same 35 volumes, "
             "without labels)")
    lines = _section(title, "source (no adaptation)", se["target_best"], se["target_last"],
                     "bSSFP val (cases 31-35)" if lge else "ACDC val")
    if "target_best_lcc" in se:
        lines.append(_row("source + largest component", "best on bSSFP val", se["target_best_lcc"]["summary"]))
    for name, a in r.get("adapt", {}).items():
        lines.append(_row(name, _chosen(a), a["eval_chosen"]["summary"]))
        if "eval_chosen_lcc" in a:
            lines.append(_row(f"{name} + largest component", _chosen(a), a["eval_chosen_lcc"]["summary"]))
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
            "**Few-shot fine-tuning on k labelled target volumes** (reads target labels: not source-free); "
            "evaluated on the other labelled target volumes (LGE: 5 - k of them, very few)",
            "",
            HEAD,
            SEP,
        ]
        for k, a in r["fewshot"].items():
            lines.append(_row(f"finetune k={k}", _chosen(a), a["eval_chosen"]["summary"]))
            if "eval_chosen_lcc" in a:
                lines.append(_row(f"finetune k={k} + largest component", _chosen(a), a["eval_chosen_lcc"]["summary"]))
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
    lines += audit_lines(r)
    if lge:
        lines += ["", "**Source domain** (bSSFP cases 31-35, the source model's validation cases)", "", HEAD, SEP,
                  _row("source", "best on bSSFP val", se["source_val_best"]["summary"])]
    else:
        lines += [""] + _section(
            "**ACDC test, 40 volumes** (source domain; Dice in %, HD95 in voxels: the ACDC copy's spacing is "
            "unknown)",
            "source", se["acdc_test_best"], se["acdc_test_last"], "ACDC val",
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
