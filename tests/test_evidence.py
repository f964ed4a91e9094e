"""Evidence pictures and the case choice, without MLflow: best/median/worst, CaseKeeper, overlays, plots."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medda import evidence
from medda.data.cards import load_card

REPO = Path(__file__).resolve().parent.parent


def _rows(scores: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"case": c, "class": name, "dice": d, "hd95": 1.0, "units": "mm"}
            for c, pair in scores.items() for name, d in zip(("ring", "blob"), pair, strict=True)]


def test_case_scores_and_pick():
    rows = _rows({"a": (0.9, 0.7), "b": (0.1, math.nan), "c": (0.5, 0.5), "d": (0.6, 0.8), "e": (0.2, 0.4)})
    scores = evidence.case_scores(rows)
    assert scores == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.5, "d": 0.7, "e": 0.3})
    assert evidence.pick_cases(scores) == {"a": ["best"], "c": ["median"], "b": ["worst"]}
    assert evidence.pick_cases({"only": 0.4}) == {"only": ["best", "median", "worst"]}
    assert evidence.pick_cases({"x": math.nan}) == {}
    pairs = evidence.before_after_rows(_rows({"a": (0.5, 0.5), "b": (0.2, 0.2)}), _rows({"a": (0.7, 0.5), "z": (1, 1)}))
    assert pairs == [{"case": "a", "dice_before": 0.5, "dice_after": 0.6, "delta": pytest.approx(0.1),
                      "delta/ring": pytest.approx(0.2), "delta/blob": 0.0}]


def _colour_pixels(path: Path) -> tuple[int, float]:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    return int(((image.max(axis=2) - image.min(axis=2)) > 80).sum()), float(image.std())


def test_case_keeper_loads_only_the_chosen_cases_and_draws_them(tmp_path):
    card = load_card(REPO / "data_cards/phantom_site_a.yaml")
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    keeper = evidence.CaseKeeper(card)
    rng = np.random.default_rng(0)
    scores = {}
    for i in range(5):
        label = np.zeros((24, 24, 6), np.uint8)
        label[6:18, 6:18, 1:5] = 1
        label[9:15, 9:15, 1:5] = 2
        image = (label * 40 + rng.normal(100, 10, label.shape)).astype(np.float32)
        case = {"id": f"c{i}", "image": str(tmp_path / f"c{i}_img.nii.gz"), "label": str(tmp_path / f"c{i}_lab.nii.gz")}
        nib.save(nib.Nifti1Image(image, affine), case["image"])
        nib.save(nib.Nifti1Image(label, affine), case["label"])
        prediction = np.roll(label, i, axis=0)  # worse and worse
        keeper.add(case, prediction)
        scores[case["id"]] = 1.0 - 0.1 * i
    assert len(keeper) == 5 and len(list(Path(keeper._tmp.name).glob("*.npz"))) == 5
    chosen = keeper.selected(scores)
    assert [(c.case_id, c.roles) for c in chosen] == [("c0", ["best"]), ("c2", ["median"]), ("c4", ["worst"])]
    worst = chosen[-1]
    assert worst.image.shape == (24, 24, 6) and worst.spacing == pytest.approx((1.5, 1.5, 3.0))
    assert np.array_equal(worst.prediction, np.roll(worst.label, 4, axis=0))
    assert evidence.montage_slices(worst.label, worst.prediction, 2) == [1, 2, 3, 4]
    path = evidence.overlay_figure(worst, card.class_names, tmp_path / "overlay.png", class_scores={"ring": 0.6})
    colour, spread = _colour_pixels(path)
    assert colour > 200 and spread > 20
    keeper.close()
    assert not Path(keeper._tmp.name).exists()


def test_monitoring_and_before_after_figures(tmp_path):
    history = [{"iteration": i, "score": 0.1 + 0.01 * i, "flip_consistency": 0.2, "entropy": 1 - 0.1 * i,
                "foreground_ratio": 0.3, "ratio/0": 0.7, "ratio/1": 0.2, "ratio/2": 0.1, "prior_kl": 0.5}
               for i in (0, 5, 10)]
    path = evidence.monitoring_figure(history, tmp_path / "m.png", chosen_iteration=10, collapse="",
                                      margin=0.005, class_names=["bg", "ring", "blob"])
    assert _colour_pixels(path)[0] > 200
    rows = [{"case": "a", "dice_before": 0.4, "dice_after": 0.6, "delta": 0.2},
            {"case": "b", "dice_before": 0.5, "dice_after": 0.3, "delta": -0.2}]
    assert _colour_pixels(evidence.before_after_figure(rows, tmp_path / "ba.png"))[0] > 200
