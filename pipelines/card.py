"""`medda card stats`: measure class ratios through the card's own preprocessing and (optionally) record them."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import yaml

from medda.api import Data, measure_class_ratios
from medda.config import DataConfig, DatasetRef
from medda.data.cards import card_to_yaml, load_card
from medda.data.datalist import read_cases
from medda.errors import MeddaError


def measure_card_stats(
    card_path: Path, dataset: Path, split: str | None, write: bool, echo: Callable[[str], None]
) -> dict:
    card = load_card(card_path)
    cases = [c for c in read_cases(DatasetRef(path=dataset, split=split), card, str(card_path)) if "label" in c]
    if not cases:
        raise MeddaError(f"{dataset}: no labelled cases to measure class statistics on")
    # Geometry as a 2D model would see it: full slices, native grid, body crop (the card's own recipe).
    data = Data(card, str(card_path), DataConfig(card=card_path, mode="2d", patch_size=[64, 64], cache=False))
    _, stats = measure_class_ratios(data, cases, "2d")
    where = str(dataset)
    root = os.environ.get("MEDDA_DATA_ROOT")
    if root and where.startswith(root.rstrip("/")):
        where = "$MEDDA_DATA_ROOT" + where[len(root.rstrip("/")):]
    args = [str(card_path), where] + (["--split", split] if split else [])
    stats["measured_by"] = "medda card stats " + " ".join(shlex.quote(a) for a in args)
    echo(yaml.safe_dump({"class_stats": stats}, sort_keys=False))
    if write:
        raw = card.model_dump(mode="json")
        raw["class_stats"] = stats
        card_path.write_text(card_to_yaml(type(card).model_validate(raw)))
        echo(f"wrote class_stats into {card_path} (digest now {load_card(card_path).digest()})")
    return stats
