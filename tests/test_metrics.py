"""Tests for medda.metrics: analytic geometry with anisotropic spacing, empty-mask rules, tables."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch

from medda.metrics import (
    METRICS,
    evaluate_case,
    evaluate_cases,
    format_table,
    jaccard_summary,
    summarise,
    write_table_csv,
)

torch.set_num_threads(1)

SPACING = (1.0, 1.0, 2.5)  # mm; the coarse third axis is where voxel and mm distances part ways


def _ball(radius_mm: float, shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """uint8 mask of voxels whose centre lies within radius_mm of the grid centre (distances in mm)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return (sum(g**2 for g in grids) <= radius_mm**2).astype(np.uint8)


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return out


def _one(pred, label, spacing=SPACING, tol=1.0) -> dict:
    (row,) = evaluate_case(pred, label, [1], ["fg"], spacing, nsd_tolerance_mm=tol)
    return row


# --- analytic geometry -------------------------------------------------------------------------------


R, D = 20.0, 5.0  # inner ball radius and radial gap, mm
BALL_SHAPE = (59, 59, 25)  # covers the outer ball (radius 25 mm) with a margin on every axis


@pytest.fixture(scope="module")
def balls() -> tuple[np.ndarray, np.ndarray]:
    return _ball(R, BALL_SHAPE, SPACING), _ball(R + D, BALL_SHAPE, SPACING)


def test_concentric_balls_in_mm(balls):
    inner, outer = balls
    row = _one(inner, outer)
    assert row["units"] == "mm"
    # Every point of one sphere is exactly D mm from the other. Voxelisation moves each boundary by under a
    # voxel along the normal; we allow a quarter of the coarsest voxel (0.25 * 2.5 mm = 0.625 mm).
    tol_mm = 0.25 * max(SPACING)
    assert row["hd95"] == pytest.approx(D, abs=tol_mm)
    assert row["assd"] == pytest.approx(D, abs=tol_mm)
    # Dice of nested balls = 2 V_in / (V_in + V_out) = 2 r^3 / (r^3 + (r + d)^3) = 0.677; voxel counting
    # of a 20 mm ball on this grid is accurate to well under 1 %, so 0.01 absolute.
    assert row["dice"] == pytest.approx(2 * R**3 / (R**3 + (R + D) ** 3), abs=0.01)
    # The surfaces are 5 mm apart everywhere: nothing is within a 1 mm tolerance, all is within 7.5 mm.
    assert row["nsd"] == pytest.approx(0.0, abs=1e-6)
    assert _one(inner, outer, tol=D + 2.5)["nsd"] == pytest.approx(1.0)


def test_concentric_balls_without_spacing_are_in_voxels(balls):
    inner, outer = balls
    mm = _one(inner, outer)
    vox = _one(inner, outer, spacing=None)
    assert vox["units"] == "voxels"
    assert vox["dice"] == pytest.approx(mm["dice"])  # overlap does not depend on spacing
    # Along the 2.5 mm axis the 5 mm gap is only 2 voxels, so the mean distance in voxels is much smaller.
    assert vox["assd"] < 0.8 * mm["assd"]
    # No spacing means unit spacing: same numbers as an explicit (1, 1, 1), only the unit label differs.
    unit = _one(inner, outer, spacing=(1, 1, 1))
    assert unit["units"] == "mm"
    for m in METRICS:
        assert vox[m] == pytest.approx(unit[m])


@pytest.mark.parametrize("k", [1, 2])
def test_cube_shifted_along_coarse_axis(k):
    shape = (40, 40, 12)
    ref = _box(shape, (5, 5, 3), (35, 35, 7))
    pred = _box(shape, (5, 5, 3 + k), (35, 35, 7 + k))
    row = _one(pred, ref)
    # Both end caps (900 voxels each) sit exactly k slices from the other cube's cap and no boundary voxel
    # is farther than that, so the 95th percentile is the maximum: k * 2.5 mm (float32 in MONAI).
    assert row["hd95"] == pytest.approx(k * 2.5, abs=1e-5)
    assert row["dice"] == pytest.approx((4 - k) / 4)  # overlap is (4 - k) of 4 slices
    assert _one(pred, ref, spacing=None)["hd95"] == pytest.approx(float(k), abs=1e-5)


def test_nsd_tolerance_against_shift():
    shape = (40, 40, 12)
    ref = _box(shape, (5, 5, 3), (35, 35, 7))
    pred = _box(shape, (5, 5, 4), (35, 35, 8))  # shifted by one 2.5 mm slice
    assert _one(pred, ref, tol=3.0)["nsd"] == pytest.approx(1.0)  # every boundary distance <= 2.5 mm
    tight = _one(pred, ref, tol=2.0)["nsd"]
    assert 0.0 < tight < 1.0  # the caps (2.5 mm away) fail, the shared side walls pass
    # In voxels the same shift is 1.0, so a 1-voxel tolerance accepts everything.
    assert _one(pred, ref, spacing=None, tol=1.0)["nsd"] == pytest.approx(1.0)


def test_perfect_prediction():
    label = _box((20, 20, 6), (4, 4, 1), (15, 12, 5))
    row = _one(label, label)
    assert (row["dice"], row["hd95"], row["assd"], row["nsd"]) == pytest.approx((1.0, 0.0, 0.0, 1.0))


# --- empty masks -------------------------------------------------------------------------------------


def test_empty_rules_without_monai_warnings():
    shape = (16, 16, 4)
    empty = np.zeros(shape, dtype=np.int64)
    full = _box(shape, (4, 4, 1), (10, 10, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # empty classes must be handled here, not left to MONAI's warnings
        both = _one(empty, empty)
        missed = _one(empty, full)  # under-segmentation: nothing predicted
        spurious = _one(full, empty)  # false positive on a case without the structure
    assert (both["dice"], both["hd95"], both["assd"], both["nsd"]) == (1.0, 0.0, 0.0, 1.0)
    for row in (missed, spurious):
        assert row["dice"] == 0.0
        assert row["nsd"] == 0.0
        assert math.isnan(row["hd95"]) and math.isnan(row["assd"])


# --- multi-class, 2D, validation ---------------------------------------------------------------------


def test_multiclass_rows_follow_requested_order():
    shape = (30, 30, 5)
    label = _box(shape, (2, 2, 1), (10, 10, 4), 1) + _box(shape, (15, 15, 1), (25, 25, 4), 2)
    pred = label.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    pred[0, 0, 0] = 7  # a label we do not score is ignored
    rows = evaluate_case(pred, label, [2, 1, 3], ["LV", "RV", "MYO"], SPACING)
    assert [(r["class_id"], r["class"]) for r in rows] == [(2, "LV"), (1, "RV"), (3, "MYO")]
    lv, rv, myo = rows
    assert lv["dice"] == 0.0 and math.isnan(lv["hd95"])
    assert rv["dice"] == pytest.approx(1.0) and rv["hd95"] == pytest.approx(0.0)
    assert myo["dice"] == 1.0 and myo["nsd"] == 1.0  # absent from both


def test_2d_input():
    shape = (40, 30)
    ref = _box(shape, (5, 5), (25, 20))
    pred = _box(shape, (8, 5), (28, 20))  # shifted 3 pixels along axis 0
    row = _one(pred, ref, spacing=(0.5, 2.0))
    assert row["units"] == "mm"
    assert row["hd95"] == pytest.approx(1.5, abs=1e-5)  # 3 px * 0.5 mm: the shifted edges dominate
    assert row["dice"] == pytest.approx(17 / 20)
    assert _one(pred, ref, spacing=None)["hd95"] == pytest.approx(3.0, abs=1e-5)


def test_input_validation():
    a = np.zeros((8, 8, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(a, np.zeros((8, 8, 4), dtype=np.int64), [1], ["x"], SPACING)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a, a, [1], ["x"], (1.0, 1.0))
    with pytest.raises(ValueError, match="class_names"):
        evaluate_case(a, a, [1, 2], ["x"], SPACING)
    with pytest.raises(ValueError, match="2D or 3D"):
        evaluate_case(a[None], a[None], [1], ["x"], None)


# --- tables ------------------------------------------------------------------------------------------


def _row(case, cls, dice, hd95, assd, nsd):
    return {"case": case, "class_id": 0, "class": cls, "dice": dice, "hd95": hd95, "assd": assd, "nsd": nsd,
            "units": "mm"}  # fmt: skip


HAND_ROWS = [
    _row("a", "RV", 0.8, 4.0, 1.0, 0.9),
    _row("a", "LV", 0.6, 2.0, 0.5, 0.7),
    _row("b", "RV", 0.4, float("nan"), float("nan"), 0.0),
    _row("b", "LV", 1.0, 6.0, 1.5, 0.9),
]


def test_summarise_by_hand():
    s = summarise(HAND_ROWS)
    assert s["n_cases"] == 2 and s["units"] == "mm"
    assert s["dice/RV"] == pytest.approx(0.6)
    assert s["dice/LV"] == pytest.approx(0.8)
    assert s["dice/mean"] == pytest.approx(0.7)
    assert s["hd95/RV"] == pytest.approx(4.0)  # the NaN case is left out of the mean...
    assert s["hd95/RV/n_nan"] == 1 and s["hd95/n_nan"] == 1  # ...and counted instead
    assert s["hd95/LV"] == pytest.approx(4.0)
    assert s["hd95/mean"] == pytest.approx(4.0)
    assert s["assd/mean"] == pytest.approx((1.0 + 1.0) / 2)
    assert s["nsd/RV"] == pytest.approx(0.45)
    assert s["nsd/mean"] == pytest.approx((0.45 + 0.8) / 2)
    assert s["dice/n_nan"] == 0


def test_summarise_real_cases_matches_rows():
    shape = (24, 24, 6)
    label = _box(shape, (2, 2, 1), (10, 10, 5), 1) + _box(shape, (12, 12, 1), (20, 20, 5), 2)
    shifted = np.roll(label, 1, axis=2)
    rows = evaluate_cases(
        [("p1", label, label, SPACING), ("p2", shifted, label, SPACING)], [1, 2], ["A", "B"]
    )
    assert [(r["case"], r["class"]) for r in rows] == [("p1", "A"), ("p1", "B"), ("p2", "A"), ("p2", "B")]
    s = summarise(rows)
    for m in METRICS:
        for cls in ("A", "B"):
            assert s[f"{m}/{cls}"] == pytest.approx(np.mean([r[m] for r in rows if r["class"] == cls]))
        assert s[f"{m}/mean"] == pytest.approx(np.mean([r[m] for r in rows]))
    assert s["hd95/A"] == pytest.approx(2.5 / 2)  # 0 for p1, one 2.5 mm slice for p2


def test_summarise_refuses_mixed_units():
    rows = [dict(HAND_ROWS[0]), {**HAND_ROWS[1], "units": "voxels"}]
    with pytest.raises(ValueError, match="units"):
        summarise(rows)


def test_format_table():
    text = format_table(HAND_ROWS)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "dice", "hd95", "[mm]", "assd", "[mm]", "nsd"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["RV", "LV", "mean"]
    assert lines[3].split()[1:] == ["0.700", "4.000", "1.000", "0.625"]
    assert len({len(ln) for ln in lines[:4]}) == 1  # aligned columns
    assert "hd95 1" in lines[4] and "assd 1" in lines[4]
    assert format_table(summarise(HAND_ROWS)) == text  # a summary and its rows print the same


def test_write_table_csv(tmp_path):
    path = write_table_csv(HAND_ROWS, tmp_path / "sub" / "metrics.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["case", "class_id", "class", "dice", "hd95", "assd", "nsd", "units"]
    assert len(read) == 4
    assert float(read[0]["dice"]) == 0.8
    assert math.isnan(float(read[2]["hd95"]))


def test_jaccard_summary_from_dice_rows():
    rows = [{"case": "a", "class": "LV", "dice": 0.5}, {"case": "b", "class": "LV", "dice": 1.0},
            {"case": "a", "class": "RV", "dice": float("nan")}, {"case": "b", "class": "RV", "dice": 0.0}]
    out = jaccard_summary(rows)
    assert out["jaccard/LV"] == pytest.approx((1 / 3 + 1.0) / 2)  # 0.5 / 1.5 and 1 / 1
    assert out["jaccard/RV"] == 0.0  # the NaN case is skipped
    assert out["jaccard/mean"] == pytest.approx(((1 / 3 + 1.0) / 2 + 0.0) / 2)
