"""Everything MLflow. The rest of medda never imports mlflow.

A run records the resolved config (params + YAML artifact), data card and datalist digests (as MLflow
dataset inputs with a context), the git commit and tree state, the medda version, metrics (batched: one
SQLite commit per call), per-case tables and checkpoints. Tracking can be switched off (`tracking.enabled=false`),
in which case a no-op tracker with the same interface is used.

Selected checkpoints become versions of registered models named per site and task (`registered_model_name`),
and `TrackingStore` reads runs, artifacts and registered models back as plain data (`medda audit`, `compare`,
`promote`), so that no other module needs MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import platform
import socket
import subprocess
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medda
from medda.config import TrackingConfig, flatten
from medda.errors import MeddaError

# MLflow announces at INFO every start/stop of its system-metrics sampler, a new SQLite store's tables and a new
# experiment; keep the console for medda's output (MLflow's warnings and errors still show).
for _logger in ("mlflow.system_metrics", "mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic"):
    logging.getLogger(_logger).setLevel(logging.WARNING)

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


# Tracking URI schemes MLflow can store runs in (SQLAlchemy dialects may carry a driver: postgresql+psycopg2).
_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
_SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def check_uri(uri: str, field: str = "tracking.uri") -> None:
    """Refuse, in one line, a tracking URI MLflow would fail on deep inside: an unknown scheme, a text file given
    as the store, or an SQLite file that is not a database or whose folder does not exist."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    expected = "expected sqlite:///FILE.db, http(s)://HOST:PORT, postgresql://USER@HOST/DB or a folder"
    if scheme and scheme not in _SCHEMES:
        raise MeddaError(f"field '{field}': unsupported scheme '{scheme}://' in {_redact({'u': uri})['u']}; {expected}")
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path.is_dir():
            raise MeddaError(f"{path}: field '{field}' names a folder; {expected}")
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as handle:
                if handle.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                    raise MeddaError(f"{path}: field '{field}' names a file that is not an SQLite database; {expected}")
        elif not path.parent.is_dir():
            raise MeddaError(f"{path.parent}: field '{field}' names a database in a folder that does not exist")
    elif scheme in ("", "file"):
        path = Path(uri[len("file://"):] if scheme else uri)
        if path.is_file():
            raise MeddaError(f"{path}: field '{field}' names a file, not a tracking store; {expected}")


@contextlib.contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a local SQLite store across processes.

    MLflow creates and migrates the tables of a new store on first connection, without a lock: two runs that
    start together on a new file crash one of them ('table ... already exists', alembic version mismatch).
    The lock is an flock on the store's folder (nothing is written); where flock is unavailable, no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl

        fd = os.open(_sqlite_path(uri).resolve().parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI to use: the configured one, or the fallback if the server is down (else refuse)."""
    check_uri(cfg.uri)
    if cfg.fallback_uri:
        check_uri(cfg.fallback_uri, "tracking.fallback_uri")
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
        with _first_use_lock(self.uri):  # creates the store's tables and the experiment on first use
            mlflow.set_experiment(cfg.experiment)
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False,
            run_id: str | None = None) -> Iterator[Tracker]:
        """An MLflow run for the block: FINISHED when it completes, KILLED on SIGINT/SIGTERM (KeyboardInterrupt,
        `medda.errors.Interrupted`), FAILED on any other exception. `run_id` continues that run (resume)."""
        base = {"medda.version": medda.__version__, "host": socket.gethostname(), "python": platform.python_version()}
        base.update(git_state())
        base.update(tags or {})
        # Inside an active run (a method sweep's parent), a run is its nested child (tag mlflow.parentRunId).
        nested = nested or self.mlflow.active_run() is not None
        if run_id is not None:
            self._check_run(run_id)
        with self.mlflow.start_run(
            run_id=run_id, run_name=name, nested=nested, tags=base, log_system_metrics=self.cfg.system_metrics
        ) as active:
            self.run_id = active.info.run_id
            try:
                yield self
            except KeyboardInterrupt:  # stopped, not broken: ended here as KILLED, so MLflow's exit leaves it so
                self.mlflow.end_run("KILLED")
                raise

    def _check_run(self, run_id: str) -> None:
        """Refuse, in one line, to continue a run that this store does not hold (resume with another tracking.uri)."""
        from mlflow.exceptions import MlflowException

        try:
            self.mlflow.MlflowClient().get_run(run_id)
        except MlflowException:
            raise MeddaError(f"MLflow run {run_id} of the resume state is not in the tracking store "
                             f"{_redact({'u': self.uri})['u']}; resume with the tracking.uri the run started with") from None

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

    def log_dataset(
        self, name: str, digest: str, source: str, context: str, tags: dict | None = None,
        cases: list[dict] | None = None,
    ) -> None:
        """Record a datalist/card as an MLflow dataset input with a context (source-train, target-adapt, eval).

        With `cases`, their ids and file paths also go to `datasets/<context>.json`, so that an audit can
        compute overlaps between the data of different runs (evaluation vs training cases).
        """
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(source=LocalArtifactDatasetSource(str(source)), name=name, digest=digest)
        self.mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in (tags or {}).items()})
        if cases is not None:
            self.log_json(case_manifest(name, digest, context, cases), f"datasets/{context}.json")

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

    # ------------------------------------------------------------------------------------- model registry
    def register_checkpoint(
        self, checkpoint: Path, name: str, tags: dict[str, Any], candidate: bool = True,
        artifact_dir: str = "checkpoints",
    ) -> dict[str, str] | None:
        """Register the run's logged checkpoint folder as a new version of registered model `name`.

        The version's source is `runs:/<run>/<artifact_dir>` (so it points back at the run), its tags say
        what it is (method, data card digest, source model version, ...), and alias `candidate` moves to it
        when `candidate`. A registry failure does not lose the run: it is tagged `registry.error` and warned.
        """
        from mlflow.exceptions import MlflowException

        client = self.mlflow.MlflowClient()
        try:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, tags={"medda.registered_by": "medda"},
                                               description="medda segmentation models for one task and site")
            mv_tags = {k: str(v) for k, v in tags.items() if v is not None}
            mv_tags.update({"run_id": self.run_id, "checkpoint.file": Path(checkpoint).name})
            version = client.create_model_version(
                name, f"runs:/{self.run_id}/{artifact_dir}", run_id=self.run_id, tags=mv_tags, await_creation_for=0,
            )
            if candidate:
                client.set_registered_model_alias(name, "candidate", version.version)
        except MlflowException as err:
            message = str(err).splitlines()[0][:300]
            self.set_tags({"registry.error": message})
            warnings.warn(f"medda: could not register {Path(checkpoint).name} as '{name}': {message}", stacklevel=2)
            return None
        self.set_tags({"registry.model": name, "registry.version": version.version,
                       "registry.alias": "candidate" if candidate else ""})
        return {"name": name, "version": str(version.version)}

    def model_versions_for_run(self, run_id: str | None) -> list[str]:
        """'name/version' of every registered version created from `run_id` (e.g. the source model's)."""
        if not run_id:
            return []
        try:
            found = self.mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
        except Exception:  # noqa: BLE001 - a store without registry simply has no versions
            return []
        return [f"{v.name}/{v.version}" for v in found]

    def find_evaluation(self, parent_run_id: str | None, eval_digest: str) -> tuple[str, list[dict]] | None:
        """The newest evaluate run of the model from `parent_run_id` on the same cases (datalist digest):
        (run id, per-case rows), or None. Used for before/after plots (source model vs adapted model)."""
        if not parent_run_id:
            return None
        store = TrackingStore(self.uri)
        for run in store.search_runs({"medda.command": "evaluate", "parent.run_id": parent_run_id}):
            if run.dataset_digest("eval") == eval_digest:
                rows = store.read_csv(run.run_id, "evaluation/per_case.csv")
                if rows:
                    return run.run_id, rows
        return None


class NullTracker(Tracker):
    """Same interface, records nothing (tracking.enabled=false)."""

    def __init__(self, cfg: TrackingConfig | None = None):  # noqa: D107 - no MLflow at all
        self.cfg = cfg
        self.run_id = None
        self.uri = ""

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, nested: bool = False,
            run_id: str | None = None) -> Iterator[Tracker]:
        yield self

    def log_config(self, config: dict[str, Any], digest: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, tags: dict | None = None,
                    cases: list[dict] | None = None) -> None: ...
    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...
    def log_json(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def register_checkpoint(self, checkpoint: Path, name: str, tags: dict[str, Any], candidate: bool = True,
                            artifact_dir: str = "checkpoints") -> dict[str, str] | None:
        return None

    def model_versions_for_run(self, run_id: str | None) -> list[str]:
        return []

    def find_evaluation(self, parent_run_id: str | None, eval_digest: str) -> tuple[str, list[dict]] | None:
        return None


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


# ------------------------------------------------------------------------------------------ lineage helpers
def case_manifest(name: str, digest: str, context: str, cases: list[dict]) -> dict[str, Any]:
    """What a run saw of a dataset: ids and resolved file paths per case (for overlap checks in audits)."""
    entries = []
    for case in cases:
        entry = {"id": str(case["id"]), "image": str(Path(case["image"]).resolve())}
        if "label" in case:
            entry["label"] = str(Path(case["label"]).resolve())
        entries.append(entry)
    return {"name": name, "digest": digest, "context": context, "cases": entries}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in text.strip().lower()).strip("_") or "x"


def registered_model_name(card_name: str, class_names: list[str]) -> str:
    """Registry name per site (data card) and task (the label set): medda-<card>-<fg1>-<fg2>-..."""
    task = "-".join(_slug(n) for n in class_names[1:]) or "seg"
    return f"medda-{_slug(card_name)}-{task}"


# ------------------------------------------------------------------------------------------ reading back
@dataclass
class RunRecord:
    """A tracked run as plain data (what audits and comparisons read; no MLflow types leak out)."""

    run_id: str
    name: str
    experiment_id: str
    experiment: str
    status: str
    start_time: int | None
    end_time: int | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    inputs: list[dict[str, Any]]
    artifact_uri: str

    @property
    def command(self) -> str:
        return self.tags.get("medda.command", "")

    @property
    def parent_run_id(self) -> str:
        """The run whose model this run used (source model of an adaptation, model of an evaluation, twin)."""
        return self.tags.get("parent.run_id", "")

    @property
    def sweep_parent_id(self) -> str:
        return self.tags.get("mlflow.parentRunId", "")

    def dataset_digest(self, context: str) -> str | None:
        for item in self.inputs:
            if item["context"] == context:
                return item["digest"]
        return None


def _is_missing(err: BaseException) -> bool:
    code = getattr(err, "error_code", "")
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or "not found" in str(err).lower() or "does not exist" in str(err).lower()


class TrackingStore:
    """Read runs, artifacts and registered models back from a tracking store (audit, compare, promote)."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        check_uri(uri, "--tracking-uri")
        if uri.startswith(("http://", "https://")) and not server_reachable(uri):
            raise MeddaError(f"tracking server {_redact({'u': uri})['u']} is unreachable (start it: `medda server`)")
        if uri.startswith("sqlite:///"):
            path = Path(uri[len("sqlite:///"):])
            if not path.is_file():
                raise MeddaError(f"{path}: no tracking database here (give --tracking-uri or set MLFLOW_TRACKING_URI)")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiments: dict[str, str] = {}

    # runs
    def _record(self, run) -> RunRecord:
        exp_id = run.info.experiment_id
        if exp_id not in self._experiments:
            try:
                self._experiments[exp_id] = self.client.get_experiment(exp_id).name
            except Exception:  # noqa: BLE001
                self._experiments[exp_id] = exp_id
        inputs = []
        for item in (run.inputs.dataset_inputs if run.inputs else []) or []:
            tags = {t.key: t.value for t in item.tags}
            inputs.append({
                "name": item.dataset.name, "digest": item.dataset.digest, "source": item.dataset.source,
                "context": tags.pop("mlflow.data.context", ""), "tags": tags,
            })
        return RunRecord(
            run.info.run_id, run.info.run_name or "", exp_id, self._experiments[exp_id], run.info.status,
            run.info.start_time, run.info.end_time, dict(run.data.tags), dict(run.data.params),
            dict(run.data.metrics), inputs, run.info.artifact_uri,
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._record(self.client.get_run(run_id))
        except MlflowException as err:
            if _is_missing(err) or "INVALID_PARAMETER_VALUE" in str(getattr(err, "error_code", "")):
                return None
            raise

    def experiment_ids(self, names: list[str] | None = None) -> list[str]:
        if names:
            ids = []
            for name in names:
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    known = ", ".join(sorted(e.name for e in self.client.search_experiments())) or "none"
                    raise MeddaError(f"experiment '{name}' not found on {self.uri} (known: {known})")
                ids.append(exp.experiment_id)
            return ids
        return [e.experiment_id for e in self.client.search_experiments()]

    def search_runs(
        self, tags: dict[str, str] | None = None, experiments: list[str] | None = None, max_results: int = 2000
    ) -> list[RunRecord]:
        """Finished or running runs whose tags equal `tags`, newest first."""
        ids = self.experiment_ids(experiments)
        if not ids:
            return []
        clauses = [f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in (tags or {}).items()]
        runs = self.client.search_runs(
            ids, " and ".join(clauses), max_results=max_results, order_by=["attributes.start_time DESC"]
        )
        return [self._record(r) for r in runs]

    # artifacts
    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        out = []
        for info in self.client.list_artifacts(run_id, path):
            out += self.list_artifacts(run_id, info.path) if info.is_dir else [info.path]
        return out

    def download(self, run_id: str, path: str, dst: Path) -> Path | None:
        from mlflow.exceptions import MlflowException

        dst.mkdir(parents=True, exist_ok=True)
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except (MlflowException, OSError):
            return None

    def read_text(self, run_id: str, path: str) -> str | None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="medda-artifact-") as tmp:
            local = self.download(run_id, path, Path(tmp))
            return local.read_text(encoding="utf-8") if local and local.is_file() else None

    def read_json(self, run_id: str, path: str) -> Any:
        text = self.read_text(run_id, path)
        return json.loads(text) if text else None

    def read_csv(self, run_id: str, path: str) -> list[dict[str, Any]]:
        text = self.read_text(run_id, path)
        if not text:
            return []
        rows = []
        for row in csv.DictReader(io.StringIO(text)):
            rows.append({k: v if k in _TEXT_COLUMNS else _number(v) for k, v in row.items()})
        return rows

    # registry
    @staticmethod
    def _version(mv) -> dict[str, Any]:
        return {
            "name": mv.name, "version": str(mv.version), "run_id": mv.run_id or "", "source": mv.source,
            "tags": dict(mv.tags or {}), "aliases": list(getattr(mv, "aliases", []) or []),
            "created": mv.creation_timestamp, "description": mv.description or "", "status": mv.status,
        }

    def model_version(self, name: str, ref: str) -> dict[str, Any]:
        """A registered version by number or alias ('3', 'champion')."""
        from mlflow.exceptions import MlflowException

        try:
            mv = (self.client.get_model_version(name, str(ref)) if str(ref).isdigit()
                  else self.client.get_model_version_by_alias(name, str(ref)))
        except MlflowException as err:
            raise MeddaError(f"registered model '{name}' has no version or alias '{ref}' on {self.uri}") from err
        return self._version(mv)

    def resolve_model_uri(self, uri: str) -> dict[str, Any]:
        """models:/<name>/<version> or models:/<name>@<alias> -> that version."""
        if not uri.startswith("models:/"):
            raise MeddaError(f"{uri}: not a model URI (expected models:/<name>/<version> or models:/<name>@<alias>)")
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, ref = rest.split("@", 1)
        elif "/" in rest:
            name, ref = rest.rsplit("/", 1)
        else:
            raise MeddaError(f"{uri}: give a version or an alias (models:/{rest}/1 or models:/{rest}@champion)")
        return self.model_version(name, ref)

    def versions_for_run(self, run_id: str) -> list[dict[str, Any]]:
        try:
            found = self.client.search_model_versions(f"run_id = '{run_id}'")
        except Exception:  # noqa: BLE001 - a store without registry simply has no versions
            return []
        # Search results carry no aliases on every store: read each version (there are few per run).
        return [self._version(self.client.get_model_version(v.name, v.version)) for v in found]

    def registered_model(self, name: str) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(name)
        except MlflowException as err:
            raise MeddaError(f"registered model '{name}' not found on {self.uri}") from err
        aliases = getattr(rm, "aliases", {}) or {}
        return {"name": rm.name, "tags": dict(rm.tags or {}), "aliases": dict(aliases), "description": rm.description or ""}

    def promote(self, name: str, version: str, alias: str, reason: str, user: str) -> dict[str, Any]:
        """Move `alias` to `version`, recording who, why and when on the version (and on the one it replaces)."""
        from datetime import datetime, timezone

        from mlflow.exceptions import MlflowException

        if not reason.strip():
            raise MeddaError("promote: --reason is required (it is recorded with the promotion)")
        target = self.model_version(name, version)
        previous = None
        with contextlib.suppress(MlflowException):
            previous = str(self.client.get_model_version_by_alias(name, alias).version)
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self.client.set_registered_model_alias(name, alias, target["version"])
        except MlflowException as err:
            raise MeddaError(f"promote: cannot set alias '{alias}': {str(err).splitlines()[0]}") from err
        history = json.loads(target["tags"].get("promotion.history", "[]") or "[]")
        history.append({"alias": alias, "by": user, "reason": reason, "at": when, "replaced": previous})
        tags = {
            f"promotion.{alias}.by": user, f"promotion.{alias}.reason": reason, f"promotion.{alias}.at": when,
            "promotion.history": json.dumps(history[-20:]),
        }
        if previous and previous != target["version"]:
            tags[f"promotion.{alias}.replaced"] = previous
            self.client.set_model_version_tag(name, previous, f"promotion.{alias}.superseded_by",
                                              f"version {target['version']} at {when} by {user}")
        for key, value in tags.items():
            self.client.set_model_version_tag(name, target["version"], key, value)
        return {"name": name, "version": target["version"], "alias": alias, "previous": previous,
                "by": user, "reason": reason, "at": when}


_TEXT_COLUMNS = ("case", "class", "units", "role")


def _number(text: str) -> Any:
    try:
        return float(text) if text != "" else text
    except ValueError:
        return text


def default_uri() -> str:
    """The tracking URI for reading commands: $MLFLOW_TRACKING_URI, else medda's default local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
