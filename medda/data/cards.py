"""Data cards: one YAML per dataset/site saying what the data is and how to read it.

A card records provenance, modality, voxel spacing (or "unknown"), orientation, the intensity normalisation
recipe, the label map (the dataset's own codes -> canonical class ids and names), per-class voxel ratios
measured from labelled data (`medda card stats`), and named splits. Its digest identifies the data in every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from medda.config import Strict, validate
from medda.errors import MeddaError


class LabelEntry(Strict):
    code: int = Field(description="Value stored in this dataset's label files.")
    id: int = Field(ge=0, description="Canonical class id the model predicts.")
    name: str


class IntensityRecipe(Strict):
    method: Literal["zscore", "percentile", "none"] = Field(
        "zscore", description="zscore: per-volume mean/std inside the body; percentile: clip to [lower, upper] "
        "percentiles then scale to [0, 1]; none: as stored."
    )
    lower_percentile: float = Field(0.5, ge=0, le=100)
    upper_percentile: float = Field(99.5, ge=0, le=100)
    nonzero: bool = Field(False, description="zscore: statistics over voxels != 0 only.")


class ClassStats(Strict):
    """Class proportions measured on labelled data after the card's preprocessing."""

    measured_by: str = Field(description="The command that measured them (reproducibility).")
    cases: int = Field(ge=1)
    volume: dict[str, float] = Field(description="Mean per-volume voxel ratio per class name (3D patches/volumes).")
    slice: dict[str, float] = Field(
        description="Mean per-slice pixel ratio per class name over the slices that contain the class (2D slices)."
    )
    slice_presence: dict[str, float] = Field(
        default_factory=dict, description="Fraction of slices where each class is present."
    )


class SplitRef(Strict):
    file: str | None = Field(None, description="Text file of case ids/prefixes, relative to the dataset folder.")
    ids: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> SplitRef:
        if (self.file is None) == (self.ids is None):
            raise ValueError("a split needs exactly one of 'file' or 'ids'")
        return self


class DataCard(Strict):
    name: str
    site: str
    description: str = ""
    anatomy: str
    modality: str
    sequence: str = ""
    provenance: str = Field(description="Where the files came from (repository/commit, conversion).")
    licence: str
    citation: str = ""
    spacing: list[float] | Literal["unknown"] = Field(
        description="Voxel size in mm (x, y, z) or 'unknown' (distances are then reported in voxels)."
    )
    orientation: str = Field(
        "RAS",
        description="Axis codes volumes are reoriented to, or 'native' to keep the stored voxel grid. Use 'native' "
        "for oblique 2D stacks (e.g. cardiac short-axis cine): reorienting them to the nearest world axes can move "
        "the slice axis to a different array axis from one case to the next.",
    )
    inplane_rot90: int = Field(
        0, ge=0, le=3,
        description="Quarter turns (numpy rot90 direction) of voxel axes 0 -> 1 applied after orientation, to put a "
        "site's in-plane axes in the convention another site's model was trained with (check with labels first).",
    )
    intensity: IntensityRecipe = Field(default_factory=IntensityRecipe)
    labels: list[LabelEntry] = Field(description="Background (id 0) and at least one structure.")
    class_stats: ClassStats | None = None
    splits: dict[str, SplitRef] = Field(default_factory=dict)
    synthetic: bool = False

    @field_validator("spacing")
    @classmethod
    def _spacing_is_a_voxel_size(cls, value: list[float] | str) -> list[float] | str:
        # Distances in mm (HD95, NSD) and resampling silently go wrong with a wrong-length or non-positive size.
        if isinstance(value, list) and (len(value) != 3 or not all(0 < v < float("inf") for v in value)):
            raise ValueError("expected three positive voxel sizes in mm (x, y, z) or 'unknown'")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_consistent(cls, labels: list[LabelEntry]) -> list[LabelEntry]:
        ids = sorted({e.id for e in labels})
        if len(ids) < 2:
            raise ValueError("expected a background (id 0) and at least one structure (id 1)")
        if ids != list(range(len(ids))):
            raise ValueError(f"canonical label ids must be 0..K-1 without gaps, got {ids}")
        codes = [e.code for e in labels]
        if len(codes) != len(set(codes)):
            raise ValueError("label codes must be unique")
        names: dict[int, str] = {}
        for e in labels:
            if names.setdefault(e.id, e.name) != e.name:
                raise ValueError(f"canonical id {e.id} has two names: {names[e.id]} and {e.name}")
        return labels

    # -- derived views -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len({e.id for e in self.labels})

    @property
    def class_names(self) -> list[str]:
        names = {e.id: e.name for e in self.labels}
        return [names[i] for i in range(self.num_classes)]

    @property
    def label_map(self) -> dict[int, int]:
        """Dataset code -> canonical id."""
        return {e.code: e.id for e in self.labels}

    @property
    def needs_remap(self) -> bool:
        return any(code != cid for code, cid in self.label_map.items())

    @property
    def spacing_known(self) -> bool:
        return self.spacing != "unknown"

    def digest(self) -> str:
        """Short content hash: the same card content gives the same digest wherever it lives."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def prior(self, mode: Literal["2d", "3d"]) -> list[float] | None:
        """Class ratio prior (canonical order, sums to 1) from measured stats, or None if not measured."""
        if self.class_stats is None:
            return None
        table = self.class_stats.slice if mode == "2d" else self.class_stats.volume
        values = [float(table.get(name, 0.0)) for name in self.class_names]
        total = sum(values)
        return [v / total for v in values] if total > 0 else None

    def split_ids(self, split: str, dataset_root: Path, card_path: Path | str = "card") -> list[str]:
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise MeddaError(f"{card_path}: field 'splits' has no split '{split}' (known: {known})")
        ref = self.splits[split]
        if ref.ids is not None:
            return list(ref.ids)
        path = dataset_root / ref.file
        if not path.is_file():
            raise MeddaError(f"{card_path}: split '{split}' names {path}, which does not exist")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]


def load_card(path: Path | str) -> DataCard:
    path = Path(path)
    if not path.is_file():
        raise MeddaError(f"{path}: data card not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MeddaError(f"{path}: not a text file; a data card is a YAML mapping of fields") from None
    except yaml.YAMLError as err:
        raise MeddaError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MeddaError(f"{path}: a data card is a mapping of fields")
    return validate(DataCard, raw, str(path))


def card_to_yaml(card: DataCard) -> str:
    return yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
