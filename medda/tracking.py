"""Everything MLflow. The rest of medda never imports mlflow.

A run records the resolved config (params + YAML artifact), data card and datalist digests (as MLflow
dataset inputs with a context), the git commit and tree state, the medda version, metrics (batched: one
SQLite commit per call), per-case tables and checkpoints. Tracking can be switched off (`tracking.enabled=false`),
in which case a no-op tracker with the same interface is used.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import medda
from medda.config import TrackingConfig, flatten
from medda.errors import MeddaError

# Keys whose values must never reach tracking (credentials in URIs or options).
_SECRET_MARKERS = ("password", "secret", "token", "credential", "api_key")


def git_state(start: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the repository holding medda (or `start`), 'unknown' outside git."""
    where = str(start or Path(medda.__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def _redact(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if any(m in key.lower() for m in _SECRET_MARKERS):
            value = "***"
        elif isinstance(value, str) and "://" in value and "@" in value:
            scheme, rest = value.split("://", 1)
            value = f"{scheme}://***@{rest.split('@', 1)[1]}"  # user:password@host -> ***@host
        out[key] = value
    return out


def server_reachable(uri: str, timeout: float = 3.0) -> bool:
    """True for non-HTTP stores; for an HTTP server, whether its /health endpoint answers."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI to use: the configured one, or the fallback if the server is down (else refuse)."""
    if server_reachable(cfg.uri):
        return cfg.uri
    if cfg.fallback_uri:
        return cfg.fallback_uri
    raise MeddaError(
        f"tracking server {_redact({'u': cfg.uri})['u']} is unreachable: start it (see README 'Tracking server'), "
        "set tracking.fallback_uri=sqlite:///mlflow.db, or tracking.enabled=false"
    )


class Tracker:
    """One MLflow run (optionally nested under a parent)."""

    def __init__(self, cfg: TrackingConfig):
        import mlflow

        self.cfg = cfg
        self.mlflow = mlflow
        self.uri = resolve_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(cfg.experiment)
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Tracker]:
        base = {"medda.version": medda.__version__, "host": socket.gethostname(), "python": platform.python_version()}
        base.update(git_state())
        base.update(tags or {})
        with self.mlflow.start_run(
            run_name=name, nested=nested, tags=base, log_system_metrics=self.cfg.system_metrics or None
        ) as active:
            self.run_id = active.info.run_id
            yield self

    def log_config(self, config: dict[str, Any], digest: str) -> None:
        params = _redact(flatten(config))
        # MLflow params are strings of at most 6000 chars; long lists go to the YAML artifact anyway.
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        self.mlflow.set_tag("config.digest", digest)
        import yaml

        self.mlflow.log_text(yaml.safe_dump(_redact_nested(config), sort_keys=False), "config/resolved.yaml")

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None and v == v}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_dataset(self, name: str, digest: str, source: str, context: str, tags: dict | None = None) -> None:
        """Record a datalist/card as an MLflow dataset input with a context (source-train, target-adapt, eval)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(source=LocalArtifactDatasetSource(str(source)), name=name, digest=digest)
        self.mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in (tags or {}).items()})

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """A list of dict rows as a CSV artifact."""
        if not rows:
            return
        buffer = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        self.mlflow.log_text(buffer.getvalue(), artifact_file)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.mlflow.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)


class NullTracker(Tracker):
    """Same interface, records nothing (tracking.enabled=false)."""

    def __init__(self, cfg: TrackingConfig | None = None):  # noqa: D107 - no MLflow at all
        self.cfg = cfg
        self.run_id = None
        self.uri = ""

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Tracker]:
        yield self

    def log_config(self, config: dict[str, Any], digest: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, tags: dict | None = None) -> None: ...
    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...
    def log_json(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


def make_tracker(cfg: TrackingConfig) -> Tracker:
    if not cfg.enabled or os.environ.get("MEDDA_TRACKING") == "off":
        return NullTracker(cfg)
    return Tracker(cfg)


def _redact_nested(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: ("***" if any(m in k.lower() for m in _SECRET_MARKERS) else _redact_nested(v)) for k, v in config.items()}
    if isinstance(config, str) and "://" in config and "@" in config:
        return _redact({"v": config})["v"]
    return config
