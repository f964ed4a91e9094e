"""ACDC semi-supervised benchmark (issue 5): supervised-only, mean teacher and BCP with 3 or 7 labelled patients.

One process per method (run them side by side, one torch thread each, on 2 cores): train with
configs/acdc_ssl_2d.yaml (checkpoint chosen on the 20 ACDC val volumes, never on test), then evaluate the
best-on-val and the last checkpoint on the 40 test volumes (20 patients). Dice and Jaccard in %, HD95 and ASSD in
**voxels** (the spacing of this ACDC copy is unknown). Jaccard per case and class is D / (2 - D).

Usage (repository root; data only through MEDDA_DATA_ROOT):
    MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/run_ssl_benchmark.py --method bcp --labeled 3 \
        --iterations 2400 --pretrain 600
Writes benchmarks/results/acdc_ssl_<method>_<labeled>.json; `--table` prints the Markdown table of every result.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "acdc_ssl_2d.yaml"
RESULTS = REPO / "benchmarks" / "results"


def run(args: argparse.Namespace) -> dict:
    from medda import api
    from medda.config import load_config
    from medda.metrics import jaccard_summary

    split = f"labeled_{args.labeled}_patients"
    out = REPO / "benchmarks" / "out" / "ssl" / f"{args.method}_{args.labeled}"
    overrides = [
        f"method.name={args.method}", f"data.train.split={split}", f"data.unlabeled.exclude_split={split}",
        f"train.iterations={args.iterations}", f"train.val_every={args.val_every}", f"output_dir={out}",
        f"tracking.run_name=bench-ssl-{args.method}-{args.labeled}",
    ]
    if args.method == "bcp":
        overrides.append(f"method.options={{pretrain_iterations: {args.pretrain}}}")
    elif args.method == "mean_teacher":
        overrides.append("method.options={}")
    elif args.method == "supervised":
        overrides += ["method.options={}", "data.unlabeled=null"]
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    trained = api.train(cfg)
    train_wall = time.perf_counter() - t0
    result = {
        "method": args.method, "labeled_patients": args.labeled, "iterations": args.iterations,
        "pretrain_iterations": args.pretrain if args.method == "bcp" else None,
        "train_wall_min": round(train_wall / 60, 1), "selected": str(trained.selection),
        "hardware": {"cpu": platform.processor() or platform.machine(), "torch_threads": cfg.train.threads},
        "config_digest": cfg.digest(), "eval": {},
    }
    for policy, path in (("best_on_val", trained.checkpoint), ("last", trained.last)):
        ev = api.evaluate(path, cfg.model_copy(update={"output_dir": out / f"eval_{policy}"}))
        summary = {k: v for k, v in ev.summary.items() if isinstance(v, (int, float))}
        result["eval"][policy] = {**summary, **jaccard_summary(ev.rows), "units": ev.units}
    result["wall_min_total"] = round((time.perf_counter() - t0) / 60, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"acdc_ssl_{args.method}_{args.labeled}.json").write_text(json.dumps(result, indent=2))
    return result


def table() -> str:
    head = ("| labelled | method | iterations | train wall (min) | checkpoint | Dice | RV | Myo | LV | Jaccard | "
            "HD95 (vox) | ASSD (vox) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted(RESULTS.glob("acdc_ssl_*.json")):
        r = json.loads(path.read_text())
        for policy, e in r["eval"].items():
            lines.append(
                f"| {r['labeled_patients']} | {r['method']} | {r['iterations']} | {r['train_wall_min']} | {policy} | "
                f"{100 * e['dice/mean']:.1f} | {100 * e['dice/RV']:.1f} | {100 * e['dice/Myo']:.1f} | "
                f"{100 * e['dice/LV']:.1f} | {100 * e['jaccard/mean']:.1f} | {e['hd95/mean']:.1f} | {e['assd/mean']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("supervised", "mean_teacher", "bcp"))
    parser.add_argument("--labeled", type=int, choices=(3, 7), default=3)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--pretrain", type=int, default=500, help="BCP stage-1 iterations (within --iterations)")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the saved results")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if args.method is None:
        parser.error("--method is required (or --table)")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
