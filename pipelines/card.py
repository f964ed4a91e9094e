"""`medda card stats`: measure class ratios through the card's own preprocessing and (optionally) record them."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import yaml

from medda.config import DataConfig, DatasetRef
from medda.data.cards import load_card
from medda.data.datalist import read_cases
from medda.data.priors import measure_card_stats as measure_stats
from medda.errors import MeddaError


def measure_card_stats(
    card_path: Path, dataset: Path, split: str | None, write: bool, echo: Callable[[str], None]
) -> dict:
    card = load_card(card_path)
    cases = [c for c in read_cases(DatasetRef(path=dataset, split=split), card, str(card_path)) if "label" in c]
    if not cases:
        raise MeddaError(f"{dataset}: no labelled cases to measure class statistics on")
    # Geometry as a 2D model would see it: full slices, native grid, body crop (the card's own recipe).
    data = DataConfig(card=card_path, mode="2d", patch_size=[64, 64], cache=False)
    stats = measure_stats(card, data, cases, str(card_path))
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
        type(card).model_validate(raw)  # refuse to write a card that would not load
        card_path.write_text(_with_class_stats(card_path.read_text(encoding="utf-8"), stats))
        echo(f"wrote class_stats into {card_path} (digest now {load_card(card_path).digest()})")
    return stats


def _with_class_stats(text: str, stats: dict) -> str:
    """The card's text with its top-level `class_stats` block replaced (or appended): comments and layout kept."""
    lines = text.splitlines()
    out, skipping = [], False
    for line in lines:
        top_level = bool(line) and not line[0].isspace() and not line.startswith("#")
        if top_level:
            skipping = line.startswith("class_stats:")
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    block = yaml.safe_dump({"class_stats": stats}, sort_keys=False, width=120).rstrip("\n")
    return "\n".join(out) + "\n" + block + "\n"
