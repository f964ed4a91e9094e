"""Lineage glue for `api`: dataset contexts and model-registry entries of train/adapt runs (no MLflow here).

Registered models are named per site and task (`medda-<card name>-<foreground classes>`, see
`tracking.registered_model_name`); each train/adapt run registers its selected checkpoint as a new version,
tagged with the method, the data card digest, the config digest and, for adaptations, the source model's
registered version. Alias `candidate` moves to a new version of a source model, and to an adapted model only
when the label-free rule recommends it. `champion` is only ever set by `medda promote` (who/why recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medda.tracking import Tracker, registered_model_name

# MLflow dataset-input contexts (what `medda audit` reads back).
SOURCE_TRAIN = "source-train"  # labelled source cases of a supervised (source) training
TRAIN_LABELED = "train-labeled"  # labelled cases of a semi-supervised training
TRAIN_UNLABELED = "train-unlabeled"
VALIDATION = "val"  # checkpoint selection by Dice
TARGET_ADAPT = "target-adapt"  # unlabelled target cases of an adaptation
TARGET_LABELED = "target-labeled"  # labelled target cases (few-shot fine-tuning; not source-free)
MONITOR = "monitor"  # unlabelled target cases the label-free monitor scores (select_by=label_free), never trained on
EVALUATION = "eval"
TRAINING_CONTEXTS = (SOURCE_TRAIN, TRAIN_LABELED, TRAIN_UNLABELED, TARGET_LABELED)


def labeled_context(streams: tuple[str, ...] | list[str]) -> str:
    """`source-train` for source (supervised) training, `train-labeled` beside an unlabelled stream (SSL)."""
    return TRAIN_LABELED if "unlabeled" in streams else SOURCE_TRAIN


def register(
    tracker: Tracker, checkpoint: Path, card: Any, cfg: Any, command: str, candidate: bool = True,
    source_run_id: str | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, str] | None:
    """Register a run's selected checkpoint (already logged under `checkpoints/`) in the model registry."""
    tags: dict[str, Any] = {
        "medda.command": command, "method": cfg.method.name, "card.name": card.name, "card.site": card.site,
        "card.digest": card.digest(), "config.digest": cfg.digest(),
    }
    if source_run_id is not None:
        versions = tracker.model_versions_for_run(source_run_id)
        tags["source.run_id"] = source_run_id or "unknown"
        tags["source.model_version"] = ",".join(versions) if versions else "unregistered"
    tags.update(extra or {})
    return tracker.register_checkpoint(checkpoint, registered_model_name(card.name, card.class_names), tags, candidate)
