"""Memory the training cache holds for a recipe: every labelled and unlabelled case after the deterministic
preprocessing (what `data.cache` keeps), 4 bytes per voxel (float32 images and labels).

Usage: MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/cache_size.py configs/la_ssl_3d.yaml [...]
"""

from __future__ import annotations

import sys

from medda.config import load_config
from medda.data.loading import Data, unlabeled
from medda.data.transforms import inference_chain


def cache_bytes(recipe: str) -> tuple[int, int]:
    cfg = load_config(recipe)
    data = Data.load(cfg.data)
    total = count = 0
    for role, labeled in (("train", True), ("unlabeled", False)):
        ref = getattr(cfg.data, role)
        if ref is None:
            continue
        cases = data.cases(ref, role)
        chain = inference_chain(data.card, cfg.data, labeled, data.card_path)
        for case in cases if labeled else unlabeled(cases):
            out = chain(case)
            total += sum(out[key].numel() * 4 for key in ("image", "label") if key in out)
            count += 1
    return count, total


if __name__ == "__main__":
    for recipe in sys.argv[1:]:
        count, total = cache_bytes(recipe)
        print(f"{recipe}: {count} cases, {total / 2**20:.0f} MiB cached")
