"""Segmentation metrics per case and per class: Dice, HD95, ASSD and NSD, in millimetres when spacing is known.

All four metrics come from MONAI (`monai.metrics`); this module only prepares the inputs (one-hot of the
requested classes), applies one documented convention for empty masks, and tabulates the results.

Conventions for one foreground class in one case (pred = prediction mask, ref = reference mask):

=====================  ======  ===========  ===========  =====
case                   dice    hd95         assd         nsd
=====================  ======  ===========  ===========  =====
both non-empty         MONAI   MONAI        MONAI        MONAI
both empty             1.0     0.0          0.0          1.0
exactly one empty      0.0     NaN          NaN          0.0
=====================  ======  ===========  ===========  =====

A surface distance to an empty surface is undefined (MONAI returns inf or NaN, depending on the metric),
so it is reported as NaN and excluded from means by `summarise`, which counts it separately instead.
Dice and NSD are bounded overlap scores, so "nothing to find and nothing found" is a perfect 1 and
"one side missing" is a clean 0.

Distances: HD95 is MONAI's symmetric 95th-percentile Hausdorff distance (the larger of the two directed
95th percentiles); ASSD is the mean of all boundary-to-boundary distances in both directions; NSD counts
boundary voxels (MONAI ``use_subvoxels=False``) within ``nsd_tolerance_mm`` of the other boundary. All are
Euclidean and scaled by the voxel spacing, so they are in mm when spacing is given and in voxels otherwise.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)

METRICS: tuple[str, ...] = ("dice", "hd95", "assd", "nsd")
"""Metric names, in table order."""

DISTANCE_METRICS: tuple[str, ...] = ("hd95", "assd")
"""Metrics with a unit (mm or voxels); the others are unitless fractions in [0, 1]."""

_RESERVED_SUMMARY_NAMES = frozenset({"mean", "n_nan"})

Row = dict[str, Any]


def _as_label_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Integer label map -> CPU tensor without a copy where possible (MONAI's KD-tree path runs on CPU)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        a = np.asarray(x)
        if not a.dtype.isnative:  # NIfTI data may be big-endian, which torch refuses
            a = a.astype(a.dtype.newbyteorder("="))
        t = torch.as_tensor(a)
    if t.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a 2D or 3D label map without channel dim, got shape {tuple(t.shape)}"
        )
    return t


def _one_hot(labels: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """(spatial...) label map -> (1, C, spatial...) bool one-hot of only the requested classes.

    One comparison per requested class; a full K-class ``one_hot`` would allocate int64 for every label
    value present (background included) only to drop most channels again.
    """
    return torch.stack([labels == int(c) for c in class_ids])[None]


def _normalise_spacing(spacing: Sequence[float] | None, ndim: int) -> list[float] | None:
    if spacing is None:
        return None
    # Plain Python floats: MONAI's prepare_spacing rejects a mix of int and float (e.g. (1, 1, 2.5))
    # and numpy float32 scalars.
    values = [float(s) for s in spacing]
    if len(values) != ndim:
        raise ValueError(
            f"spacing {tuple(spacing)} has {len(values)} entries, expected {ndim} (one per axis)"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing {tuple(spacing)} must be finite and positive")
    return values


def _finite_or_nan(values: torch.Tensor) -> list[float]:
    """MONAI marks undefined distances with inf or NaN depending on the metric: report them all as NaN."""
    v = values.reshape(-1).double()
    return torch.where(torch.isfinite(v), v, torch.full_like(v, float("nan"))).tolist()


def dice_scores(prediction: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, class_ids: Sequence[int]) -> list[float]:
    """Dice per class only (validation during training): NaN where a class is absent from both maps.

    Absent-from-both is NaN rather than 1 here so that a validation mean is not inflated by empty classes.
    """
    pred_oh = _one_hot(_as_label_tensor(prediction, "prediction"), class_ids)
    ref_oh = _one_hot(_as_label_tensor(label, "label"), class_ids)
    return compute_dice(pred_oh, ref_oh, include_background=True, ignore_empty=True)[0].double().tolist()


def evaluate_case(
    prediction: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    spacing: Sequence[float] | None,
    nsd_tolerance_mm: float = 1.0,
) -> list[Row]:
    """Dice, HD95, ASSD and NSD for each foreground class of one case.

    Args:
        prediction: integer label map, shape (H, W) or (H, W, D), no channel dim. Labels not in
            ``class_ids`` count as background for every listed class.
        label: reference label map, same shape as ``prediction``.
        class_ids: the foreground label values to score, e.g. ``(1, 2, 3)``; background is not scored.
        class_names: one name per entry of ``class_ids``, used as the ``"class"`` column.
        spacing: voxel size in mm along each axis of the arrays, e.g. ``(1.25, 1.25, 10.0)``, or None if
            unknown, in which case distances use unit spacing and are in voxels.
        nsd_tolerance_mm: NSD boundary tolerance, in mm (in voxels when ``spacing`` is None). Must be >= 0.

    Returns:
        One row per class, in ``class_ids`` order: ``{"class_id": int, "class": str, "dice": float,
        "hd95": float, "assd": float, "nsd": float, "units": "mm" | "voxels"}``. Dice and NSD are in
        [0, 1]; HD95 and ASSD are in ``units``. Empty masks follow the module's table: both empty ->
        dice 1, hd95 0, assd 0, nsd 1; exactly one empty -> dice 0, hd95 NaN, assd NaN (a distance to a
        missing surface is undefined), nsd 0.

    Raises:
        ValueError: if the shapes differ, are not 2D/3D, ``class_names`` does not match ``class_ids``,
            ``spacing`` has the wrong length or a non-positive entry, or the tolerance is negative.
    """
    pred_t = _as_label_tensor(prediction, "prediction")
    ref_t = _as_label_tensor(label, "label")
    if pred_t.shape != ref_t.shape:
        raise ValueError(
            f"prediction shape {tuple(pred_t.shape)} differs from label shape {tuple(ref_t.shape)}"
        )
    if len(class_ids) != len(class_names):
        raise ValueError(f"{len(class_ids)} class_ids but {len(class_names)} class_names")
    if len(class_ids) == 0:
        return []
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0, got {nsd_tolerance_mm}")
    spacing_list = _normalise_spacing(spacing, pred_t.ndim)
    units = "voxels" if spacing_list is None else "mm"

    pred_oh = _one_hot(pred_t, class_ids)  # (1, C, spatial...) bool
    ref_oh = _one_hot(ref_t, class_ids)
    n = len(class_ids)
    pred_any = pred_oh.flatten(2).any(-1)[0]  # (C,)
    ref_any = ref_oh.flatten(2).any(-1)[0]

    # ignore_empty=False gives exactly our convention: both empty -> 1, one empty -> 0.
    dice = compute_dice(pred_oh, ref_oh, include_background=True, ignore_empty=False)[0].double().tolist()

    # Edge cases are set by rule rather than computed: MONAI would warn and return inf/NaN for them.
    present = list(zip(pred_any.tolist(), ref_any.tolist(), strict=True))
    hd95 = [float("nan") if p or r else 0.0 for p, r in present]
    assd = list(hd95)
    nsd = [0.0 if p or r else 1.0 for p, r in present]

    both = torch.nonzero(pred_any & ref_any).flatten()
    if both.numel() > 0:
        # include_background=True: channel 0 is the first requested foreground class, not background.
        p_sub, r_sub = pred_oh[:, both], ref_oh[:, both]
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated get_mask_edges argument internally: not actionable here.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd = compute_hausdorff_distance(
                p_sub, r_sub, include_background=True, percentile=95, spacing=spacing_list
            )
            asd = compute_average_surface_distance(
                p_sub, r_sub, include_background=True, symmetric=True, spacing=spacing_list
            )
            sd = compute_surface_dice(
                p_sub,
                r_sub,
                class_thresholds=[float(nsd_tolerance_mm)] * both.numel(),
                include_background=True,
                spacing=spacing_list,
            )
        for j, h, a, s in zip(
            both.tolist(), _finite_or_nan(hd), _finite_or_nan(asd), _finite_or_nan(sd), strict=True
        ):
            hd95[j], assd[j], nsd[j] = h, a, s

    return [
        {
            "class_id": int(class_ids[i]),
            "class": str(class_names[i]),
            "dice": float(dice[i]),
            "hd95": float(hd95[i]),
            "assd": float(assd[i]),
            "nsd": float(nsd[i]),
            "units": units,
        }
        for i in range(n)
    ]


def evaluate_cases(
    cases: Iterable[tuple[str, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, Sequence[float] | None]],
    class_ids: Sequence[int],
    class_names: Sequence[str],
    nsd_tolerance_mm: float = 1.0,
) -> list[Row]:
    """Per-case x per-class metric table.

    Args:
        cases: ``(case_id, prediction, label, spacing)`` tuples, as for `evaluate_case`; consumed lazily,
            so a generator that loads one volume at a time keeps memory flat.
        class_ids: foreground label values to score.
        class_names: one name per class id.
        nsd_tolerance_mm: NSD tolerance in mm (voxels for cases whose spacing is None).

    Returns:
        Rows of `evaluate_case` with ``"case"`` added as the first key, case-major then class order.
    """
    rows: list[Row] = []
    for case_id, prediction, label, spacing in cases:
        for row in evaluate_case(prediction, label, class_ids, class_names, spacing, nsd_tolerance_mm):
            rows.append({"case": str(case_id), **row})
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate a per-case table into per-class and over-class means.

    Args:
        rows: rows from `evaluate_cases` (or `evaluate_case`); all must share one unit.

    Returns:
        Flat dict, classes in first-appearance order, with for each metric m in ``METRICS``:

        - ``"m/<class>"``: NaN-aware mean over cases of that class (NaN if every case is NaN);
        - ``"m/mean"``: mean over classes of the per-class means (macro average; classes whose mean is
          NaN are skipped);
        - ``"m/<class>/n_nan"`` and ``"m/n_nan"``: how many case values were NaN (undefined distances),
          per class and in total; these cases are excluded from the means above.

        Plus ``"n_cases"`` (distinct case ids, or rows per class if there is no ``"case"`` column) and
        ``"units"`` (``"mm"`` or ``"voxels"``, the only non-numeric value: drop it before logging metrics).

    Raises:
        ValueError: if rows mix mm and voxels (averaging them is meaningless), or a class name is
            ``"mean"``, ``"n_nan"`` or contains ``"/"`` (the keys would collide).
    """
    if not rows:
        raise ValueError("no rows to summarise")
    units = {r["units"] for r in rows}
    if len(units) != 1:
        raise ValueError(f"rows mix units {sorted(units)}; give every case a spacing or none of them")
    classes: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        classes.setdefault(str(r["class"]), []).append(r)
    clash = sorted(n for n in classes if n in _RESERVED_SUMMARY_NAMES or "/" in n)
    if clash:
        raise ValueError(f"class name(s) {clash} collide with summary keys (reserved name or '/')")

    # Without a "case" column, the best case count is the longest per-class list.
    n_cases = len({r["case"] for r in rows}) if "case" in rows[0] else max(len(v) for v in classes.values())
    out: dict[str, Any] = {"n_cases": n_cases, "units": units.pop()}
    for m in METRICS:
        class_means = []
        n_nan_total = 0
        for name, class_rows in classes.items():
            vals = np.asarray([float(r[m]) for r in class_rows], dtype=np.float64)
            nan_mask = np.isnan(vals)
            mean = float(vals[~nan_mask].mean()) if (~nan_mask).any() else float("nan")
            out[f"{m}/{name}"] = mean
            out[f"{m}/{name}/n_nan"] = int(nan_mask.sum())
            n_nan_total += int(nan_mask.sum())
            class_means.append(mean)
        finite = [v for v in class_means if not math.isnan(v)]
        out[f"{m}/mean"] = float(np.mean(finite)) if finite else float("nan")
        out[f"{m}/n_nan"] = n_nan_total
    return out


def jaccard_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean Jaccard per class (``"jaccard/<class>"``) and over classes (``"jaccard/mean"``) from per-case Dice
    rows: for one binary structure J = D / (2 - D) exactly; NaN Dice values are skipped."""
    per_class: dict[str, list[float]] = {}
    for r in rows:
        if not math.isnan(r["dice"]):
            per_class.setdefault(str(r["class"]), []).append(r["dice"] / (2 - r["dice"]))
    out = {f"jaccard/{c}": sum(v) / len(v) for c, v in per_class.items()}
    out["jaccard/mean"] = sum(out.values()) / len(out) if out else math.nan
    return out


def _summary_classes(summary: Mapping[str, Any]) -> list[str]:
    """Class names in a summary, in insertion order, recovered from the ``"dice/<class>"`` keys."""
    names = []
    for key in summary:
        head, _, rest = key.partition("/")
        if head == METRICS[0] and rest and "/" not in rest and rest not in _RESERVED_SUMMARY_NAMES:
            names.append(rest)
    return names


def format_table(table: Mapping[str, Any] | Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """Compact aligned plain-text table for the terminal: one row per class plus a mean row.

    Args:
        table: a `summarise` dict, or rows (which are summarised first).
        digits: decimals shown for every metric.

    Returns:
        Multi-line string without a trailing newline, e.g.::

            class   dice  hd95 [mm]  assd [mm]    nsd
            RV     0.912      3.210      0.880  0.953
            mean   0.900      4.000      1.000  0.940
            NaN (one mask empty, excluded from means): hd95 1, assd 1

        The last line appears only when some distance was undefined.
    """
    summary = summarise(table) if not isinstance(table, Mapping) else table
    units = summary["units"]
    header = ["class"] + [f"{m} [{units}]" if m in DISTANCE_METRICS else m for m in METRICS]
    body = [
        [name] + [f"{float(summary[f'{m}/{name}']):.{digits}f}" for m in METRICS]
        for name in [*_summary_classes(summary), "mean"]
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    nans = [f"{m} {summary[f'{m}/n_nan']}" for m in METRICS if summary.get(f"{m}/n_nan", 0)]
    if nans:
        lines.append("NaN (one mask empty, excluded from means): " + ", ".join(nans))
    return "\n".join(lines)


def write_table_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as CSV with a header (columns in first-seen key order); NaN is written as ``nan``.

    Args:
        rows: e.g. from `evaluate_cases`.
        path: output file; its parent folder is created if missing.

    Returns:
        The path written.
    """
    path = Path(path)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
