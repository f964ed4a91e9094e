"""`medda train-ssl`: a semi-supervised run and, beside it, its supervised-only twin on the same labelled cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medda import api
from medda.config import RunConfig
from medda.metrics import format_table


def run_ssl_with_twin(
    cfg: RunConfig, outputs: list[Path], echo: Callable[[str], None], evaluate: bool = True
) -> dict[str, api.TrainResult]:
    """Train `cfg.method` and a `supervised` twin (same data, model, budget, seed); evaluate both on data.test."""
    twin_cfg = cfg.model_copy(deep=True, update={
        "method": cfg.method.model_copy(update={"name": "supervised", "options": {}}),
        "output_dir": cfg.output_dir / "supervised_twin",
    })
    ssl_cfg = cfg.model_copy(deep=True, update={"output_dir": cfg.output_dir / cfg.method.name})
    outputs.append(cfg.output_dir)
    results: dict[str, api.TrainResult] = {}
    twin = api.train(twin_cfg, tags={"ssl.role": "supervised_twin"})
    results["supervised"] = twin
    results[cfg.method.name] = api.train(ssl_cfg, tags={"ssl.role": "ssl", "parent.run_id": twin.run_id or ""})
    if not evaluate:
        return results
    if cfg.data.test is None:
        echo("no data.test: skipping the comparison")
        return results
    for name, result in results.items():
        for policy, path in (("best-on-val", result.checkpoint), ("last", result.last)):
            ev = api.evaluate(path, cfg.model_copy(update={"output_dir": cfg.output_dir / f"eval_{name}_{policy}"}),
                              tags={"ssl.method": name, "checkpoint.policy": policy})
            echo(f"\n{name} ({policy}, test, {ev.units}):\n{format_table(ev.rows)}")
    return results
