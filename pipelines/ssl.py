"""`medda train-ssl`: a semi-supervised run and, beside it, its supervised-only twin on the same labelled cases.

With `source_checkpoint` (semi-supervised domain adaptation) both runs start from the source model, so the twin is
the plain few-shot fine-tune of that model on the same labelled target cases, and the source model itself is
evaluated on `data.test` next to them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medda import api
from medda.config import RunConfig
from medda.engine.resume import RESUME_FILE
from medda.metrics import format_table


def run_ssl_with_twin(
    cfg: RunConfig, outputs: list[Path], echo: Callable[[str], None], evaluate: bool = True, resume: bool = False
) -> dict[str, api.TrainResult]:
    """Train `cfg.method` and a `supervised` twin (same data, model, budget, seed); evaluate both on data.test.

    `resume`: continue the twin (a finished twin returns its recorded result), then the semi-supervised run, which
    starts afresh when it never got to write a resume state (the interruption came during the twin).
    """
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
            checkpoints += [(name, "best-on-val", result.checkpoint), (name, "last", result.last)]
    for name, policy, path in checkpoints:
        folder = f"eval_{name}_{policy.replace(' ', '_')}"
        ev = api.evaluate(path, cfg.model_copy(update={"output_dir": cfg.output_dir / folder}),
                          tags={"ssl.method": name, "checkpoint.policy": policy})
        echo(f"\n{name} ({policy}, test, {ev.units}):\n{format_table(ev.rows)}")
    return results
