"""Evidence a reviewer can look at: overlay pictures, before/after plots, label-free monitoring curves.

Pure NumPy + matplotlib (Agg, no pyplot state, no MLflow): figures are written as PNG files and handed to a
`Tracker` to be logged as artifacts. `api.evaluate` streams cases through a `CaseKeeper`, which keeps each
prediction on disk (compressed, temporary) and, once every case is scored, loads the images of only the best,
median and worst cases (by mean foreground Dice) for the overlays.

Overlays are slice montages through the structures: the image in grey, ground-truth contours solid and
predicted contours dashed, one colour per class.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Colour-blind-friendly, saturated (contours must stand out on a grey image).
CLASS_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
ROLES = ("best", "median", "worst")


# --------------------------------------------------------------------------------------------- case choice
def case_scores(rows: Sequence[dict], metric: str = "dice") -> dict[str, float]:
    """Mean of `metric` over foreground classes per case (NaN-aware), in the rows' case order."""
    values: dict[str, list[float]] = {}
    for row in rows:
        v = row.get(metric)
        values.setdefault(str(row["case"]), []).append(float(v) if isinstance(v, (int, float)) else math.nan)
    out = {}
    for case, vs in values.items():
        finite = [v for v in vs if not math.isnan(v)]
        out[case] = float(np.mean(finite)) if finite else math.nan
    return out


def pick_cases(scores: dict[str, float]) -> dict[str, list[str]]:
    """case -> roles among best / median / worst (by score; a case can hold several roles when there are few)."""
    ranked = sorted((c for c, s in scores.items() if not math.isnan(s)), key=lambda c: (-scores[c], c))
    if not ranked:
        return {}
    chosen = {"best": ranked[0], "median": ranked[len(ranked) // 2], "worst": ranked[-1]}
    out: dict[str, list[str]] = {}
    for role in ROLES:
        out.setdefault(chosen[role], []).append(role)
    return out


@dataclass
class CaseImages:
    case_id: str
    roles: list[str]
    score: float
    image: np.ndarray  # (X, Y, Z) float, original grid
    label: np.ndarray  # (X, Y, Z) canonical class ids
    prediction: np.ndarray
    spacing: tuple[float, ...]


class CaseKeeper:
    """Collects evaluated cases without holding their volumes: predictions wait on disk (compressed, temporary)."""

    def __init__(self, card: Any):
        self.card = card
        self._tmp = tempfile.TemporaryDirectory(prefix="medda-evidence-")
        self._cases: dict[str, tuple[dict, Path]] = {}

    def add(self, case: dict, prediction: np.ndarray) -> None:
        path = Path(self._tmp.name) / f"{len(self._cases):05d}.npz"
        np.savez_compressed(path, prediction=np.asarray(prediction, dtype=np.uint8))
        self._cases[str(case["id"])] = (case, path)

    def __len__(self) -> int:
        return len(self._cases)

    def __contains__(self, case_id: str) -> bool:
        return str(case_id) in self._cases

    def prediction(self, case_id: str) -> tuple[dict, np.ndarray]:
        """A kept case and its prediction (to hand a case evaluated by another process to the one that draws)."""
        case, path = self._cases[str(case_id)]
        with np.load(path) as stored:
            return case, stored["prediction"]

    def selected(self, scores: dict[str, float]) -> list[CaseImages]:
        """Load image, label and prediction of the best, median and worst cases (at most 3 volumes)."""
        from medda.data.transforms import LoadCase, load_label

        out = []
        # Chosen among every scored case; a case this keeper does not hold (evaluated by another process and not
        # handed over) is left out rather than replaced, so the choice never depends on who evaluated what.
        for case_id, roles in pick_cases(scores).items():
            if case_id not in self._cases:
                continue
            case, path = self._cases[case_id]
            image = LoadCase(["image"])({"image": case["image"]})["image"]
            label, affine = load_label(case["label"], self.card)
            with np.load(path) as stored:
                prediction = stored["prediction"]
            spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
            out.append(CaseImages(case_id, roles, scores[case_id], image[0].numpy().astype(np.float32),
                                  label, prediction, spacing))
        order = {r: i for i, r in enumerate(ROLES)}
        return sorted(out, key=lambda c: order[c.roles[0]])

    def close(self) -> None:
        self._tmp.cleanup()


# --------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The 0.5 iso-lines of a 2D binary mask as (N, 2) x/y polylines: what `ax.contour(mask, levels=[0.5])` draws,
    from the same contouring library (contourpy, matplotlib's own) without building a ContourSet per mask."""
    from contourpy import contour_generator

    return contour_generator(z=mask).lines(0.5)


def _slice_axis(spacing: Sequence[float]) -> int:
    """The through-plane axis: the one with the largest voxel size (the last one on ties)."""
    spacing = list(spacing)
    return max(range(len(spacing)), key=lambda i: (round(spacing[i], 6), i))


def montage_slices(label: np.ndarray, prediction: np.ndarray, axis: int, count: int = 8) -> list[int]:
    """Up to `count` slice indices evenly spread over the slices where either map has foreground."""
    other = tuple(i for i in range(label.ndim) if i != axis)
    present = np.flatnonzero(((label > 0) | (prediction > 0)).any(axis=other))
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, label.shape[axis] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, min(count, hi - lo + 1))})


def overlay_figure(
    case: CaseImages, class_names: Sequence[str], path: Path, max_slices: int = 8, class_scores: dict | None = None,
) -> Path:
    """Slice montage of one case: image in grey, ground truth solid, prediction dashed (one colour per class).

    Laid out by hand (fixed margins, axes-relative slice titles, one line collection per style and slice): matplotlib's
    constrained layout, axes titles and a contour set per mask were most of the drawing time on a CPU."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    axis = _slice_axis(case.spacing)
    indices = montage_slices(case.label, case.prediction, axis, max_slices)
    keep = [i for i in range(3) if i != axis]
    aspect = case.spacing[keep[1]] / case.spacing[keep[0]]
    finite = case.image[np.isfinite(case.image)]
    vmin, vmax = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    ncols = min(4, len(indices))
    nrows = math.ceil(len(indices) / ncols)
    top, bottom, panel = 0.45, 0.55, 2.6  # inches: suptitle band, legend band, one slice (with its title)
    height = panel * nrows + top + bottom
    fig = _figure(panel * ncols, height, layout=None)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - top / height, bottom=bottom / height, wspace=0.04, hspace=0.12)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    classes = range(1, len(class_names))
    for ax, index in zip(axes.flat, indices, strict=False):
        image = np.take(case.image, index, axis=axis)
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        for volume, style in ((case.label, "solid"), (case.prediction, "dashed")):
            lines, colours = [], []  # one collection per style: a per-line style list costs a lookup per line
            for k in classes:
                mask = (np.take(volume, index, axis=axis) == k).T.astype(np.float32)
                if mask.any() and not mask.all():
                    outlines = _outlines(mask)
                    lines += outlines
                    colours += [CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]] * len(outlines)
            if lines:
                ax.add_collection(LineCollection(lines, colors=colours, linestyles=style, linewidths=1.4),
                                  autolim=False)
        ax.text(0.5, 1.01, f"slice {index} (axis {axis})", transform=ax.transAxes, ha="center", va="bottom", fontsize=8)
    detail = ""
    if class_scores:
        detail = "  ·  " + ", ".join(f"{n} {v:.3f}" for n, v in class_scores.items())
    fig.suptitle(f"{' / '.join(case.roles)} case {case.case_id}: mean Dice {case.score:.3f}{detail}", fontsize=10,
                 y=1 - 0.08 / height, va="top")
    handles = [Line2D([], [], color=CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], lw=2, label=class_names[k])
               for k in classes]
    handles += [Line2D([], [], color="black", lw=1.4, ls="solid", label="ground truth"),
                Line2D([], [], color="black", lw=1.4, ls="dashed", label="prediction")]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height), ncols=min(len(handles), 6),
               fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def before_after_rows(before: Sequence[dict], after: Sequence[dict]) -> list[dict]:
    """Per case: mean Dice of the model before (source) and after adaptation, and the change, on shared cases."""
    b, a = case_scores(before), case_scores(after)
    per_class_b = {(str(r["case"]), str(r["class"])): float(r["dice"]) for r in before}
    per_class_a = {(str(r["case"]), str(r["class"])): float(r["dice"]) for r in after}
    classes = list(dict.fromkeys(str(r["class"]) for r in after))
    rows = []
    for case in [c for c in a if c in b]:
        row = {"case": case, "dice_before": b[case], "dice_after": a[case], "delta": a[case] - b[case]}
        for name in classes:
            if (case, name) in per_class_b and (case, name) in per_class_a:
                row[f"delta/{name}"] = per_class_a[(case, name)] - per_class_b[(case, name)]
        rows.append(row)
    return rows


def before_after_figure(rows: Sequence[dict], path: Path, before_name: str = "source", after_name: str = "adapted") -> Path:
    """Slope chart (each case: Dice before -> after) and the per-case change, sorted."""
    fig = _figure(10, 4.2)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    up, down = "#1a9850", "#d73027"
    for row in rows:
        colour = up if row["delta"] >= 0 else down
        left.plot([0, 1], [row["dice_before"], row["dice_after"]], color=colour, marker="o", lw=1.2, alpha=0.8)
    if rows:
        mb = float(np.nanmean([r["dice_before"] for r in rows]))
        ma = float(np.nanmean([r["dice_after"] for r in rows]))
        left.plot([0, 1], [mb, ma], color="black", lw=3, marker="s", label=f"mean {mb:.3f} -> {ma:.3f}")
        left.legend(loc="lower center", fontsize=8)
    left.set_xticks([0, 1], [before_name, after_name])
    left.set_xlim(-0.3, 1.3)
    left.set_ylim(0, 1)
    left.set_ylabel("mean foreground Dice per case")
    ordered = sorted(rows, key=lambda r: r["delta"])
    right.bar(range(len(ordered)), [r["delta"] for r in ordered],
              color=[up if r["delta"] >= 0 else down for r in ordered])
    right.set_xticks(range(len(ordered)), [r["case"] for r in ordered], rotation=60, ha="right", fontsize=7)
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel(f"Dice change ({after_name} - {before_name})")
    better = sum(r["delta"] > 0 for r in rows)
    fig.suptitle(f"Before/after adaptation, {len(rows)} cases: {better} better, {len(rows) - better} not better",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def monitoring_figure(
    history: Sequence[dict], path: Path, chosen_iteration: int | None = None, collapse: str = "", margin: float | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Label-free monitoring curves of an adaptation (iteration 0 = the source model)."""
    its = [h["iteration"] for h in history]
    panels = [("score", "label-free score"), ("flip_consistency", "flip consistency"), ("prior_kl", "prior KL"),
              ("entropy", "mean entropy"), ("ratio/*", "predicted class ratios"), ("bn_drift", "BN drift")]
    panels = [(k, t) for k, t in panels if k == "ratio/*" or any(k in h for h in history)]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    height = 3 * nrows + 0.4
    fig = _figure(4 * ncols, height, layout=None)  # fixed margins: constrained layout re-measures every text each draw
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.6 / height, top=1 - 0.6 / height, wspace=0.3, hspace=0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        if key == "ratio/*":
            names = sorted({k for h in history for k in h if k.startswith("ratio/") and k != "ratio/0"},
                           key=lambda k: int(k.split("/")[1]))
            for name in names:
                k = int(name.split("/")[1])
                shown = class_names[k] if class_names and k < len(class_names) else name
                ax.plot(its, [h.get(name, math.nan) for h in history], marker=".",
                        color=CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], label=shown)
            if names:
                ax.legend(fontsize=7)
        else:
            ax.plot(its, [h.get(key, math.nan) for h in history], marker="o", color="#4363d8")
            if history and key in history[0]:
                ax.axhline(history[0][key], color="grey", ls="--", lw=1, label="source model")
            if key == "score" and margin is not None and history:
                ax.axhline(history[0]["score"] + margin, color="grey", ls=":", lw=1, label="source + margin")
            ax.legend(fontsize=7)
        if chosen_iteration is not None and chosen_iteration > 0:
            ax.axvline(chosen_iteration, color="#3cb44b", lw=1.5)
        if collapse and its:
            ax.axvline(its[-1], color="#e6194b", lw=1.5, ls="-.")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    note = f"chosen iteration {chosen_iteration}" if chosen_iteration and chosen_iteration > 0 else "no adapted checkpoint chosen"
    fig.suptitle(f"Label-free monitoring (green: {note}" + (f"; red: collapse — {collapse}" if collapse else "") + ")",
                 fontsize=10, y=1 - 0.1 / height, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------- logging glue
def log_evaluation_evidence(
    tracker: Any, keeper: CaseKeeper, rows: list[dict], class_names: Sequence[str], out_dir: Path,
    meta: dict, eval_digest: str,
) -> dict[str, Any]:
    """Overlays of the best/median/worst cases and, for an adapted model, the before/after plot vs its source.

    Files go to `out_dir` and are logged under `evidence/` (plus `evaluation/before_after.csv`).
    """
    scores = case_scores(rows)
    summary: dict[str, Any] = {"cases": []}
    try:
        for case in keeper.selected(scores):
            per_class = {str(r["class"]): float(r["dice"]) for r in rows if str(r["case"]) == case.case_id}
            path = overlay_figure(case, class_names, out_dir / f"overlay_{case.roles[0]}_{case.case_id}.png",
                                  class_scores=per_class)
            tracker.log_artifact(path, "evidence")
            summary["cases"] += [{"role": role, "case": case.case_id, "dice": case.score, "file": path.name}
                                 for role in case.roles]
    except Exception as err:  # noqa: BLE001 - a picture that cannot be drawn must not lose the evaluation
        _failed(tracker, "overlays", err)
    finally:
        keeper.close()
    if summary["cases"]:
        tracker.log_json(summary["cases"], "evidence/cases.json")
        tracker.set_tags({f"evidence.{c['role']}": c["case"] for c in summary["cases"]})
    source_run = meta.get("source_run_id")
    if source_run:  # an adapted model: compare with the source model's evaluation on the same cases, if any
        try:
            found = tracker.find_evaluation(source_run, eval_digest)
            pairs = before_after_rows(found[1], rows) if found else []
            if pairs:
                path = before_after_figure(pairs, out_dir / "before_after.png")
                tracker.log_artifact(path, "evidence")
                tracker.log_table(pairs, "evaluation/before_after.csv")
                tracker.set_tags({"before.run_id": found[0]})
                summary["before_after"] = pairs
        except Exception as err:  # noqa: BLE001 - the evaluation itself is already complete
            _failed(tracker, "before/after", err)
    return summary


def log_adaptation_evidence(
    tracker: Any, history: list[dict], out_dir: Path, chosen_iteration: int | None, collapse: str = "",
    margin: float | None = None, class_names: Sequence[str] | None = None,
) -> Path | None:
    """The label-free monitoring curves of an adaptation run, as `evidence/monitoring.png`."""
    if not history:
        return None
    try:
        path = monitoring_figure(history, out_dir / "monitoring.png", chosen_iteration, collapse, margin, class_names)
    except Exception as err:  # noqa: BLE001 - a picture that cannot be drawn must not lose the adaptation
        _failed(tracker, "monitoring", err)
        return None
    tracker.log_artifact(path, "evidence")
    return path


def _failed(tracker: Any, what: str, err: BaseException) -> None:
    message = f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    warnings.warn(f"medda: evidence not drawn ({message})", stacklevel=3)
    tracker.set_tags({"evidence.error": message})
