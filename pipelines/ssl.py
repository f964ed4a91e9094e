"""`medda train-ssl`: a semi-supervised run and, beside it, its supervised-only twin on the same labelled cases.

With `source_checkpoint` (semi-supervised domain adaptation) both runs start from the source model, so the twin is
the plain few-shot fine-tune of that model on the same labelled target cases, and the source model itself is
evaluated on `data.test` next to them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medda import api, distributed
from medda.config import RunConfig, validate
from medda.data.loading import Data
from medda.engine.resume import RESUME_FILE
from medda.errors import MeddaError
from medda.metrics import format_table
from medda.registry import get_method, methods_for


def check_ssl_settings(cfg: RunConfig) -> None:
    """Refuse, in one line, what would fail only in the semi-supervised run, before the twin trains for hours:
    a method that is not semi-supervised, bad method options, no unlabelled cases once the labelled ones are removed.
    """
    cls = get_method(cfg.method.name)
    semi_supervised = [name for name in methods_for("training") if "unlabeled" in get_method(name).streams]
    if "unlabeled" not in cls.streams:
        raise MeddaError(f"config: field 'method.name' is '{cls.name}', but train-ssl trains a semi-supervised method "
                         f"({', '.join(semi_supervised)}) next to its supervised twin; for '{cls.name}' alone use "
                         "`medda train`")
    validate(cls.Config, cfg.method.options, f"config field 'method.options' ({cls.name})")
    if cfg.data.unlabeled is None:
        raise MeddaError(f"config: field 'data.unlabeled' is required: {cls.name} trains on unlabelled cases")
    data = Data.load(cfg.data)
    labeled = {c["id"] for c in data.cases(cfg.data.train, "train")}
    if not [c for c in data.cases(cfg.data.unlabeled, "unlabeled") if c["id"] not in labeled]:
        raise MeddaError("config: data.unlabeled has no cases left once the labelled ones (data.train) are removed")


# Below this difference in mean held-out Dice the folds of a few labelled cases do not rank two runs.
CV_RESOLUTION = 0.005


def cross_validation_verdict(results: dict[str, api.TrainResult]) -> str | None:
    """What cross-validation over the labelled cases says of the semi-supervised run against its twin, from the
    labelled cases alone (no test labels): each run's best mean held-out Dice and where it stopped. None unless both
    runs were cross-validated."""
    scores = {}
    for name, result in results.items():
        if result.cross_validation is None:
            return None
        cv = result.cross_validation
        scores[name] = (dict(cv["mean_val_dice"])[cv["iteration"]], cv["iteration"], len(cv["folds"]))
    (best, (a, _, folds)), (other, (b, _, _)) = sorted(scores.items(), key=lambda item: -item[1][0])
    listed = ", ".join(f"{name} {score:.4f} at iteration {it}" for name, (score, it, _) in scores.items())
    if a - b < CV_RESOLUTION:
        return (f"cross-validation ({folds} folds over the labelled cases): {listed}; within {CV_RESOLUTION} of "
                "each other, so the folds do not separate them")
    return f"cross-validation ({folds} folds over the labelled cases): {listed}; it prefers {best} over {other}"


def run_ssl_with_twin(
    cfg: RunConfig, outputs: list[Path], echo: Callable[[str], None], evaluate: bool = True, resume: bool = False
) -> dict[str, api.TrainResult]:
    """Train `cfg.method` and a `supervised` twin (same data, model, budget, seed); evaluate both on data.test.

    `resume`: continue the twin (a finished twin returns its recorded result), then the semi-supervised run, which
    starts afresh when it never got to write a resume state (the interruption came during the twin).
    """
    if distributed.launched() and resume:  # before the twin trains: one clear line on every rank
        distributed.refuse("medda train-ssl --resume")
    with distributed.session():  # one process group for both trainings and every evaluation
        return _run_ssl_with_twin(cfg, outputs, echo if distributed.is_main() else (lambda _: None), evaluate, resume)


def _run_ssl_with_twin(cfg: RunConfig, outputs: list[Path], echo: Callable[[str], None], evaluate: bool,
                       resume: bool) -> dict[str, api.TrainResult]:
    check_ssl_settings(cfg)
    twin_cfg = cfg.model_copy(deep=True, update={
        "method": cfg.method.model_copy(update={"name": "supervised", "options": {}}),
        "output_dir": cfg.output_dir / "supervised_twin",
    })
    ssl_cfg = cfg.model_copy(deep=True, update={"output_dir": cfg.output_dir / cfg.method.name})
    outputs.append(cfg.output_dir)
    results: dict[str, api.TrainResult] = {}
    twin = api.train(twin_cfg, tags={"ssl.role": "supervised_twin"}, resume=resume)
    results["supervised"] = twin
    resume_ssl = resume and (ssl_cfg.output_dir / RESUME_FILE).exists()
    results[cfg.method.name] = api.train(ssl_cfg, tags={"ssl.role": "ssl", "parent.run_id": twin.run_id or ""},
                                         resume=resume_ssl)
    # No such verdict from the label-free scores: they rank one run's checkpoints, not two methods (BENCHMARKS.md,
    # "The k = 1 drift, seen without labels": the fine-tune scores higher even where BCP is 3 Dice better).
    verdict = cross_validation_verdict(results)
    if verdict:
        echo(verdict)
    if not evaluate:
        return results
    if cfg.data.test is None:
        echo("no data.test: skipping the comparison")
        return results
    checkpoints: list[tuple[str, str, Path]] = []
    if cfg.source_checkpoint is not None:
        checkpoints.append(("source", "no training", Path(cfg.source_checkpoint)))
    for name, result in results.items():
        if result.checkpoint == result.last:  # one checkpoint (no data.val: the few-label rule keeps the last)
            checkpoints.append((name, result.selection, result.last))
        else:
            chosen = "best-on-val" if result.selection == "val_dice" else result.selection
            checkpoints += [(name, chosen, result.checkpoint), (name, "last", result.last)]
    for name, policy, path in checkpoints:
        folder = f"eval_{name}_{policy.replace(' ', '_')}"
        ev = api.evaluate(path, cfg.model_copy(update={"output_dir": cfg.output_dir / folder}),
                          tags={"ssl.method": name, "checkpoint.policy": policy})
        echo(f"\n{name} ({policy}, test, {ev.units}):\n{format_table(ev.rows)}")
    return results
