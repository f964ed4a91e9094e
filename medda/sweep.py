"""A method sweep: several source-free adaptations of one source model, nested under one parent run.

`medda adapt CONFIG --methods tent,adabn,entropy_prior [--evaluate]`. The parent run (`medda.command=adapt-sweep`)
holds the sweep's summary table; each method is a child run (MLflow `mlflow.parentRunId`), with exactly the
lineage of a single `medda adapt` (parent.run_id = the source model's run, data inputs, registered version).
With `--evaluate`, the source model and every adapted model are also evaluated on `data.test` (target labels
are read only there), as nested runs, so `medda compare` and the before/after plots have what they need.
The recipe's `method.options` apply to the recipe's own method only; the other methods use their defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medda import api
from medda.config import RunConfig
from medda.engine.resume import interruptible
from medda.errors import MeddaError
from medda.registry import get_method, methods_for
from medda.tracking import make_tracker


@dataclass
class SweepResult:
    run_id: str | None
    adaptations: dict[str, api.AdaptResult] = field(default_factory=dict)
    evaluations: dict[str, api.EvaluationResult] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise MeddaError("--methods: give at least one method, e.g. --methods tent,adabn")
    for m in methods:
        get_method(m)  # unknown names: one clear error listing the known ones
        if m not in methods_for("adaptation"):
            raise MeddaError(f"--methods: '{m}' is not an adaptation method ({', '.join(methods_for('adaptation'))})")
    if len(set(methods)) != len(methods):
        raise MeddaError(f"--methods: '{text}' names a method twice")
    return methods


def _method_cfg(cfg: RunConfig, method: str, out: Path) -> RunConfig:
    section = cfg.method.model_copy(update={"name": method, "options": cfg.method.options if method == cfg.method.name else {}})
    tracking = cfg.tracking.model_copy(update={"run_name": f"{cfg.tracking.run_name}-{method}" if cfg.tracking.run_name else None})
    return cfg.model_copy(deep=True, update={"method": section, "output_dir": out, "tracking": tracking})


def adapt_sweep(
    cfg: RunConfig, methods: list[str], evaluate: bool = False, echo: Callable[[str], None] = print,
) -> SweepResult:
    """Adapt `cfg.source_checkpoint` with each method (nested runs under one parent), optionally evaluating."""
    if cfg.source_checkpoint is None:
        raise MeddaError("config: field 'source_checkpoint' is required for adaptation")
    if evaluate and cfg.data.test is None:
        raise MeddaError("--evaluate needs data.test (labelled target cases) in the config")
    tracker = make_tracker(cfg.tracking)
    result = SweepResult(None)
    name = cfg.tracking.run_name or "adapt-sweep"
    tags = {"medda.command": "adapt-sweep", "sweep.methods": ",".join(methods),
            "source.checkpoint": str(cfg.source_checkpoint)}
    with interruptible(), tracker.run(name, tags=tags):
        result.run_id = tracker.run_id
        tracker.log_config(cfg.model_dump(mode="json"), cfg.digest())
        child_tags = {"sweep.run_id": tracker.run_id or ""}
        if evaluate:
            echo("evaluating the source model on data.test ...")
            base = _method_cfg(cfg, cfg.method.name, cfg.output_dir / "eval_source")
            result.evaluations["source"] = api.evaluate(Path(cfg.source_checkpoint), base,
                                                        tags={**child_tags, "sweep.role": "baseline"})
        for method in methods:
            echo(f"adapting with {method} ...")
            mcfg = _method_cfg(cfg, method, cfg.output_dir / method)
            adapted = api.adapt(mcfg, tags=child_tags)
            result.adaptations[method] = adapted
            row = {"method": method, "recommended": adapted.recommended, "collapse": adapted.collapse or "none",
                   "adapt_run": adapted.run_id or "", "reason": adapted.reason}
            if evaluate:
                ecfg = mcfg.model_copy(update={"output_dir": cfg.output_dir / method / "eval"})
                ev = api.evaluate(adapted.adapted, ecfg, tags={**child_tags, "adapt.run_id": adapted.run_id or ""})
                result.evaluations[method] = ev
                row.update({"dice": ev.summary.get("dice/mean"), "hd95": ev.summary.get("hd95/mean"),
                            "units": ev.units, "eval_run": ev.run_id or ""})
            result.rows.append(row)
        tracker.log_table(result.rows, "sweep/summary.csv")
        if evaluate:
            tracker.log_metrics({f"sweep/{r['method']}/dice": r["dice"] for r in result.rows if r.get("dice") is not None})
        recommended = [r["method"] for r in result.rows if r["recommended"]]
        tracker.set_tags({"sweep.recommended": ",".join(recommended) or "none"})
    return result


def format_sweep(result: SweepResult) -> str:
    lines = [f"{'method':<16} {'recommended':<11} {'Dice':>6}  collapse"]
    source = result.evaluations.get("source")
    if source:
        lines.append(f"{'(source model)':<16} {'':<11} {source.summary['dice/mean']:>6.3f}")
    for r in result.rows:
        dice = f"{r['dice']:>6.3f}" if r.get("dice") is not None else f"{'':>6}"
        lines.append(f"{r['method']:<16} {str(r['recommended']).lower():<11} {dice}  {r['collapse']}")
    if result.run_id:
        lines.append(f"sweep run: {result.run_id} (children are nested runs)")
    return "\n".join(lines)
