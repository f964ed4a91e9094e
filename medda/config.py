"""Typed run configuration: YAML recipe + `key=value` overrides, validated once.

Every number a user may want to change lives here with a default and a description; every run records the
resolved config. Unknown keys are refused (`extra="forbid"`). Values may reference environment variables as
`${NAME}` (e.g. `${MEDDA_DATA_ROOT}/acdc`), so real-data paths are never hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medda.errors import MeddaError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetRef(Strict):
    """A set of cases: where they are and which of them to use."""

    path: Path = Field(description="Folder (images/ [+ labels/]), decathlon-style JSON, or nnU-Net raw dataset folder.")
    split: str | None = Field(
        None,
        description="Subset: a split named in the data card (list of case ids/prefixes) or a key of a decathlon JSON "
        "('training', 'validation', 'test'). None = every case.",
    )
    exclude_split: str | None = Field(None, description="Drop the cases of this card split (e.g. labelled patients).")
    limit: int | None = Field(None, ge=1, description="Keep the first N cases after selection (quick runs).")


class DataConfig(Strict):
    card: Path = Field(description="Data card YAML (label map, spacing, normalisation, splits, class statistics).")
    train: DatasetRef | None = Field(None, description="Labelled training cases (source training, few-shot, SSL labelled).")
    unlabeled: DatasetRef | None = Field(None, description="Unlabelled cases for SSL; labels are never read.")
    val: DatasetRef | None = Field(None, description="Validation cases for checkpoint selection (never the test set).")
    test: DatasetRef | None = Field(None, description="Evaluation cases.")
    target: DatasetRef | None = Field(None, description="Target-site cases for source-free adaptation; labels never read.")
    mode: Literal["2d", "3d"] = Field("3d", description="'2d' trains on slices of volumes (anisotropic data), '3d' on patches.")
    slice_axis: int = Field(2, ge=0, le=2, description="Spatial axis sliced in 2d mode (2 = through-plane after RAS).")
    patch_size: list[int] = Field([64, 64, 32], description="Training patch (3d: 3 ints) or slice size (2d: 2 ints), voxels.")
    spacing: list[float] | None = Field(
        None, description="Resample to this voxel size (mm). None: keep the native grid. Ignored if the card's spacing is unknown."
    )
    samples_per_volume: int = Field(2, ge=1, description="Random patches/slices drawn per loaded volume.")
    cache: bool = Field(True, description="Cache the deterministic part of the pipeline in memory.")
    num_workers: int = Field(0, ge=0, description="DataLoader workers; 0 is fastest on 2 cores with caching.")
    augment: bool = Field(True, description="Random flips, rotations, intensity scale/shift and noise for training.")
    foreground_crop: bool = Field(True, description="Crop volumes to the body (image > 0 after normalisation).")

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(s < 4 for s in v):
            raise ValueError("every patch dimension must be >= 4 voxels")
        return v

    @model_validator(mode="after")
    def _patch_matches_mode(self) -> DataConfig:
        want = 2 if self.mode == "2d" else 3
        if len(self.patch_size) != want:
            raise ValueError(f"patch_size needs {want} values in {self.mode} mode, got {self.patch_size}")
        return self


class ModelConfig(Strict):
    name: Literal["unet", "dynunet", "segresnet", "flexible_unet", "smp_unet", "smp_unetplusplus", "smp_fpn"] = Field(
        "unet", description="MONAI nets (2D/3D) or segmentation-models-pytorch nets (2D only, encoder_weights=None)."
    )
    channels: list[int] = Field([16, 32, 64, 128], description="Feature channels per level (unet/dynunet/segresnet).")
    num_res_units: int = Field(1, ge=0, description="Residual units per level (MONAI UNet).")
    norm: Literal["batch", "instance"] = Field("batch", description="Batch norm is required by AdaBN/TENT/OSUDA.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability inside the network.")
    encoder: str = Field("resnet18", description="Encoder for flexible_unet / smp_* nets (random init, no downloads).")
    in_channels: int = Field(1, ge=1, description="Image channels (modalities).")


class OptimConfig(Strict):
    name: Literal["adam", "adamw", "sgd"] = Field("adamw", description="Optimiser.")
    lr: float = Field(1e-3, gt=0, description="Base learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, description="SGD momentum (nesterov off).")
    schedule: Literal["constant", "poly", "cosine", "step"] = Field("poly", description="Per-iteration LR schedule.")
    warmup_iterations: int = Field(0, ge=0, description="Linear LR warm-up iterations.")
    step_size: int = Field(2500, ge=1, description="'step' schedule: multiply by step_gamma every step_size iterations.")
    step_gamma: float = Field(0.1, gt=0, description="'step' schedule: LR multiplier.")


class TrainConfig(Strict):
    iterations: int = Field(400, ge=1, description="Optimiser steps (the budget).")
    batch_size: int = Field(2, ge=1, description="Volumes per batch; each yields samples_per_volume patches.")
    unlabeled_batch_size: int | None = Field(None, ge=1, description="Unlabelled volumes per batch (SSL); default batch_size.")
    val_every: int = Field(100, ge=1, description="Validate and checkpoint every N iterations.")
    resume_every: int | None = Field(
        None, ge=1, description="Write the resume state (output_dir/resume.pt, for --resume) every N iterations; None: val_every."
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (x86: AVX512_BF16 or AMX), "
        "else float32; off: float32."
    )
    channels_last: bool = Field(True, description="channels_last(_3d) memory layout (faster convolutions on CPU).")
    compile: bool = Field(
        False, description="Train through torch.compile (training methods; pays after its one-off compile time, BENCHMARKS.md)."
    )
    seed: int = Field(0, description="Seed of data sampling, augmentation, initialisation and method draws.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op CPU threads; None: one per CPU this process may use (affinity, cgroup quota)."
    )
    keep_checkpoints: bool = Field(
        False, description="Keep a checkpoint as it<N>.pt every val_every iterations, validated or not (audit the "
        "label-free choice, or a fixed budget's trajectory, against labels)."
    )
    select_by: Literal["val_dice", "last", "cross_validation", "label_free"] = Field(
        "val_dice",
        description="Checkpoint policy: best validation Dice, the last one, the iteration that cross-validation over "
        "the labelled cases (data.train) chooses, or the label-free rule (adaptation, and training from a source "
        "model with unlabelled target cases).",
    )
    cv_folds: int = Field(
        5, ge=2, description="select_by=cross_validation: at most this many folds (leave-one-out with fewer labelled "
        "cases); labelled case i is held out in fold i mod cv_folds."
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads an unquoted `off` (amp: off, train.amp=off) as false


class InferenceConfig(Strict):
    roi_size: list[int] | None = Field(None, description="Sliding-window ROI; default the training patch size.")
    overlap: float = Field(0.5, ge=0, lt=1, description="Fraction of overlap between neighbouring windows.")
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="How overlapping windows are blended.")
    sw_batch_size: int | None = Field(
        None, ge=1, description="Windows per forward pass; None: on a CPU 1 in 3D and 4 in 2D (measured fastest there), 4 on a GPU."
    )
    sw_device: str | None = Field(None, description="Device for window compute (default: the run device).")
    out_device: str | None = Field("cpu", description="Device that accumulates the full-volume output.")
    tta_flips: bool = Field(False, description="Average predictions over spatial flips (test-time augmentation).")
    largest_component: bool = Field(False, description="Keep the largest connected component per class (post-processing).")


class TrackingConfig(Strict):
    enabled: bool = Field(True, description="false: record nothing (no MLflow at all).")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite file, http://127.0.0.1:5000, ...).")
    experiment: str = Field("medda", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: command-method).")
    fallback_uri: str | None = Field(
        None, description="Used when `uri` is an unreachable server; None refuses to start instead."
    )
    log_checkpoint: bool = Field(True, description="Log the selected checkpoint as a run artifact.")
    system_metrics: bool = Field(True, description="MLflow system metrics (CPU/memory every 10 s) while a run is active.")


class SelectionConfig(Strict):
    """Settings of the label-free checkpoint choice and recommendation (run config section `selection`)."""

    cases: int = Field(6, ge=1, description="Target volumes scored at every check (a fixed, label-free subset).")
    kl_weight: float = Field(
        1.0, ge=0, description="Weight of the prior KL in the label-free score (1: flip consistency and the KL to the "
        "source model's measured prior count equally; chosen on the bSSFP -> LGE development images, BENCHMARKS.md)."
    )
    margin: float = Field(0.005, ge=0, description="Score gain over the source model needed to recommend adapting.")
    vanish_fraction: float = Field(0.1, gt=0, lt=1, description="A class below this fraction of its reference ratio vanished.")
    min_entropy: float = Field(1e-3, ge=0, description="Entropy below this with rising KL counts as collapse.")


class PriorConfig(Strict):
    source: Literal["card", "constant", "oracle"] = Field(
        "card",
        description="card: the source card's measured class ratios (anatomical knowledge); constant: `values`; "
        "oracle: measured from target labels (upper-bound experiments only; recorded as such).",
    )
    values: list[float] | None = Field(None, description="Class ratios for source=constant (background first).")


class MethodSection(Strict):
    name: str = Field("supervised", description="A registered method (`medda methods`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The method's typed options.")
    prior: PriorConfig = Field(default_factory=PriorConfig)


class RunConfig(Strict):
    """One run: what data, which model, which method, how long, how to infer, where to track."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodSection = Field(default_factory=MethodSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    source_checkpoint: Path | None = Field(None, description="Source model for adaptation (its preprocessing is reused).")
    output_dir: Path = Field(Path("outputs/run"), description="Checkpoints, predictions and tables go here.")

    def digest(self) -> str:
        """Short hash of the resolved config (identifies it in MLflow)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, source: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source) for v in value]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise MeddaError(f"{source}: environment variable {m.group(1)} is not set (referenced as ${{{m.group(1)}}})")
            return os.environ[m.group(1)]

        return _ENV.sub(sub, value)
    return value


def apply_overrides(raw: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise MeddaError(f"{source}: override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MeddaError(f"{source}: override '{key}' goes inside '{part}', which is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: field '{field}' is not a known setting (check the spelling; see README 'Configuration')"
    if first["type"] == "missing":
        return f"{source}: field '{field}' is required"
    return f"{source}: field '{field}': {first['msg']} (got {first.get('input')!r})"


def validate(model: type[BaseModel], raw: dict, source: str) -> Any:
    """Validate `raw` into `model`, turning the first error into one clear sentence."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise MeddaError(_format_validation(err, source)) from None


def load_raw(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MeddaError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise MeddaError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MeddaError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: Path | str | None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Load a recipe, apply overrides and validate it into a RunConfig."""
    raw = dict(base or {})
    source = str(path) if path else "config"
    if path is not None:
        raw = _deep_merge(raw, load_raw(path))
    raw = apply_overrides(raw, overrides or [], source)
    raw = _expand_env(raw, source)
    return validate(RunConfig, raw, source)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def reference_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) of every setting, depth first: the README's configuration reference."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        nested = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and nested[0] is not DatasetRef:
            rows += reference_rows(nested[0], f"{prefix}{name}.")
            continue
        if field.is_required():
            default = "required"
        elif nested:  # an optional set of cases
            default = "—"
        else:
            value = field.get_default(call_default_factory=True)
            default = repr(str(value) if isinstance(value, Path) else value)
        rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (README 'Configuration'; a test keeps them in sync)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {d} | {text.replace('|', chr(92) + '|')} |" for k, d, text in reference_rows()]
    return "\n".join(lines)
