"""Class-ratio priors measured in the geometry the methods see: per training image (2D slice or 3D patch).

A prior says how much of an image each class covers. It must be measured exactly as the methods and the label-free
monitor measure predictions, or the KL terms reward over- or under-segmentation: slices body-cropped but not padded
(the card's `class_stats.slice`) cover a different area than the patch-sized, padded slices a model is trained and
adapted on. `measure_class_prior` tiles labelled volumes with `medda.data.loading.tiles` (the adaptation geometry)
and returns, per class:
- conditional: mean ratio over the images that contain the class (AdaMI's constant prior with presence tags);
- presence: fraction of images that contain the class;
- marginal: mean ratio over all images, empty ones included (= presence x conditional for the foreground).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medda.config import DataConfig
from medda.data.cards import DataCard
from medda.data.loading import tiles
from medda.data.transforms import inference_chain


def image_ratios(label_tiles: torch.Tensor, num_classes: int) -> np.ndarray:
    """(N, 1, *patch) integer label tiles -> (N, K) per-image class ratios (padding counts as background)."""
    flat = label_tiles.reshape(label_tiles.shape[0], -1).round().long()
    counts = torch.stack([(flat == k).sum(dim=1) for k in range(num_classes)], dim=1).double()
    return (counts / flat.shape[1]).numpy()


def summarise_ratios(ratios: np.ndarray, names: list[str], cases: int, geometry: str) -> dict:
    """(N, K) per-image ratios -> the prior record stored in checkpoints (see module docstring)."""
    present = ratios > 0
    presence = present.mean(axis=0)
    conditional = np.where(present, ratios, 0).sum(axis=0) / np.maximum(present.sum(axis=0), 1)
    marginal = ratios.mean(axis=0)

    def named(values: np.ndarray) -> dict[str, float]:
        return {n: round(float(v), 6) for n, v in zip(names, values, strict=True)}

    return {"geometry": geometry, "cases": cases, "images": int(ratios.shape[0]),
            "conditional": named(conditional), "presence": named(presence), "marginal": named(marginal)}


def geometry_name(data: DataConfig) -> str:
    return f"{data.mode} {'x'.join(str(s) for s in data.patch_size)}"


def measure_class_prior(card: DataCard, data: DataConfig, cases: list[dict], card_path: str = "card") -> dict:
    """The class prior of labelled `cases` in the training geometry of `data` (see module docstring)."""
    chain = inference_chain(card, data, True, card_path)
    ratios = [image_ratios(tiles(chain(case)["label"].as_tensor(), data), card.num_classes) for case in cases]
    return summarise_ratios(np.concatenate(ratios), card.class_names, len(cases), geometry_name(data))


@dataclass
class Prior:
    """The class prior a run uses, in class order, and where it came from.

    Attributes:
        conditional: expected ratio per class in an image that contains it (None: no prior known).
        presence: fraction of images containing each class (None: unknown, every class taken as present).
        source: "train" (measured on the source model's training labels, in its training geometry), "card" (the
            card's class_stats: body-cropped, unpadded slices; older checkpoints), "constant", "oracle" or "none".
    """

    conditional: list[float] | None
    presence: list[float] | None
    source: str

    @classmethod
    def from_record(cls, record: dict, names: list[str], source: str) -> Prior:
        return cls([record["conditional"][n] for n in names], [record["presence"][n] for n in names], source)

    @property
    def marginal(self) -> list[float] | None:
        """Expected ratio per class over all images, empty ones included (presence x conditional; background
        the rest): what a mean over every slice or patch of a volume measures."""
        if self.conditional is None:
            return None
        if self.presence is None:
            return list(self.conditional)
        fg = [c * p for c, p in zip(self.conditional[1:], self.presence[1:], strict=True)]
        return [1.0 - sum(fg), *fg]


def measure_card_stats(card: DataCard, data: DataConfig, cases: list[dict], card_path: str = "card") -> dict:
    """The card's `class_stats` (`medda card stats`): per-volume and per-slice (body-cropped, unpadded) ratios.

    Documentation of the data; the priors that methods and the monitor use are measured in the training geometry
    (`measure_class_prior`) and stored in the checkpoint.
    """
    chain = inference_chain(card, data, True, card_path)
    k = card.num_classes
    volume, slices, presence, n_slices = np.zeros(k), np.zeros(k), np.zeros(k), 0
    for case in cases:
        label = chain(case)["label"][0].numpy().round().astype(np.int64)
        counts = np.bincount(label.ravel(), minlength=k)[:k]
        volume += counts / counts.sum()
        for sl in np.moveaxis(label, data.slice_axis, 0):
            c = np.bincount(sl.ravel(), minlength=k)[:k]
            slices += c / c.sum()
            presence += c > 0
            n_slices += 1
    names = card.class_names
    conditional = slices / np.maximum(presence, 1)  # per-slice ratio over the slices that contain the class

    def named(values: np.ndarray, digits: int) -> dict[str, float]:
        return {n: round(float(v), digits) for n, v in zip(names, values, strict=True)}

    return {"cases": len(cases), "volume": named(volume / len(cases), 6), "slice": named(conditional, 6),
            "slice_presence": named(presence / n_slices, 4)}
