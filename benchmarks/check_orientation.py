"""Do MS-CMRSeg bSSFP volumes, after their card's preprocessing, look like ACDC slices to a 2D ACDC model?

For each dataset, through medda's own inference chain (card orientation, label map, body crop, z-score), prints
and records: preprocessed shapes, the RV-minus-LV centroid vector per volume (in-plane convention), the largest
LV area per volume in pixels (heart size), and where the slice axis ends up. Also shows what reorienting the
oblique MS-CMR stacks to RAS does (the bug the card's `orientation: native` avoids).

    MEDDA_DATA_ROOT=/path/to/data .venv/bin/python benchmarks/check_orientation.py \
        [--checkpoint benchmarks/out/full/source/best.pt]
Writes benchmarks/results/orientation_check.json. With --checkpoint (a 2D ACDC source model), also evaluates it on
the 35 MS-CMR volumes with three variants of the MS-CMR card's geometry: RAS (before the fix), native without the
quarter turn, and the card as committed (native + quarter turn).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medda.config import DataConfig, DatasetRef
from medda.data.cards import load_card
from medda.data.datalist import read_cases
from medda.data.transforms import inference_chain

REPO = Path(__file__).resolve().parents[1]


def measure(card_name: str, folder: str, step: int) -> dict:
    root = Path(os.environ["MEDDA_DATA_ROOT"])
    card_path = REPO / "data_cards" / f"{card_name}.yaml"
    card = load_card(card_path)
    cases = read_cases(DatasetRef(path=root / folder), card)[::step]
    cfg = DataConfig(card=card_path, mode="2d", patch_size=[256, 256], cache=False)
    chain = inference_chain(card, cfg, True)
    shapes, vectors, lv_area, axcodes = [], [], [], set()
    for case in cases:
        axcodes.add("".join(nib.aff2axcodes(nib.load(case["image"]).affine)))
        d = chain(case)
        label = d["label"][0].numpy().round()
        shapes.append(list(label.shape))
        vectors.append((np.argwhere(label == 1).mean(0) - np.argwhere(label == 3).mean(0)).tolist())
        lv_area.append(int(max((label[:, :, z] == 3).sum() for z in range(label.shape[2]))))
    v, s = np.array(vectors), np.array(shapes)
    return {
        "card": str(card_path.relative_to(REPO)),
        "orientation": card.orientation,
        "inplane_rot90": card.inplane_rot90,
        "stored_axis_codes": sorted(axcodes),
        "volumes": len(cases),
        "shape_min": s.min(0).tolist(),
        "shape_median": np.median(s, 0).tolist(),
        "shape_max": s.max(0).tolist(),
        "rv_minus_lv_centroid_mean": v.mean(0).round(1).tolist(),
        "rv_minus_lv_centroid_sd": v.std(0).round(1).tolist(),
        "fraction_rv_at_lower_axis1": float((v[:, 1] < 0).mean()),
        "fraction_rv_at_higher_axis0": float((v[:, 0] > 0).mean()),
        "max_lv_area_px_median": float(np.median(lv_area)),
        "max_lv_area_px_range": [min(lv_area), max(lv_area)],
    }


def ras_effect() -> dict:
    from monai.transforms import Compose, LoadImaged, Orientationd

    root = Path(os.environ["MEDDA_DATA_ROOT"]) / "mscmr_bssfp" / "images"
    load = Compose(
        [LoadImaged("image", ensure_channel_first=True, image_only=True), Orientationd("image", "RAS")]
    )
    out = {}
    for case in ("case01", "case07"):
        path = root / f"{case}.nii.gz"
        out[case] = {
            "stored_shape": list(nib.load(path).shape),
            "axis_codes": "".join(nib.aff2axcodes(nib.load(path).affine)),
            "shape_after_RAS": list(load({"image": str(path)})["image"].shape[1:]),
        }
    return out


def effect_on_model(checkpoint: Path) -> dict:
    """Dice/HD95 of `checkpoint` on MS-CMR under three card geometries (labels only used for scoring)."""
    from medda import api
    from medda.config import load_config

    card = (REPO / "data_cards" / "mscmr_bssfp.yaml").read_text(encoding="utf-8")
    variants = {
        "RAS (before the fix)": card.replace("orientation: native", "orientation: RAS").replace(
            "inplane_rot90: 1", "inplane_rot90: 0"
        ),
        "native, no quarter turn": card.replace("inplane_rot90: 1", "inplane_rot90: 0"),
        "native + quarter turn (committed card)": card,
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in variants.items():
            path = Path(tmp) / "mscmr_variant.yaml"
            path.write_text(text)
            cfg = load_config(
                REPO / "configs" / "acdc_to_mscmr_adapt.yaml",
                [f"data.card={path}", "tracking.enabled=false", f"output_dir={tmp}/eval"],
            )
            summary = api.evaluate(checkpoint, cfg).summary
            out[name] = {k: v for k, v in summary.items() if k.split("/")[0] in ("dice", "hd95", "n_cases")}
            print(name, f"Dice {summary['dice/mean']:.4f}", flush=True)
    return out


def _nan_to_none(node):
    if isinstance(node, dict):
        return {k: _nan_to_none(v) for k, v in node.items()}
    if isinstance(node, float) and node != node:
        return None
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="also evaluate this 2D ACDC model under each geometry"
    )
    args = parser.parse_args()
    result = {
        "acdc": measure("acdc", "acdc", step=5),
        "mscmr_bssfp": measure("mscmr_bssfp", "mscmr_bssfp", step=1),
        "mscmr_if_reoriented_to_RAS": ras_effect(),
    }
    if args.checkpoint:
        result["source_model_on_mscmr_by_geometry"] = {
            "checkpoint": str(args.checkpoint),
            "results": effect_on_model(args.checkpoint.resolve()),
        }
    result = _nan_to_none(result)  # strict JSON: an undefined HD95 (nothing predicted) becomes null
    print(json.dumps(result, indent=1))
    dest = REPO / "benchmarks" / "results" / "orientation_check.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
