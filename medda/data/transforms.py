"""MONAI Compose chains built from a data card and the data config.

Three chains share one deterministic preprocessing prefix (`preprocessing`):
load -> checks -> orientation -> spacing -> label remap -> body crop -> intensity normalisation.
- `labeled_train_chain`: + pad, foreground-biased patch/slice sampling, augmentations.
- `unlabeled_train_chain`: the same without ever touching a label key (source-free / SSL contract).
- `inference_chain`: preprocessing only; it is invertible, so predictions go back to the original grid.
In 2D mode, slices are sampled from volumes as (H, W, 1) crops squeezed to (H, W); inference runs the
2D network slice by slice and reassembles the volume (`medda.inference`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    Rotate90d,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
    Transform,
)

from medda.config import DataConfig
from medda.data.cards import DataCard
from medda.errors import InputError


class LoadCase(MapTransform):
    """LoadImaged (channel first) with NIfTI, NRRD/MHA and DICOM-series readers; unreadable files are user errors."""

    def __init__(self, keys: KeysCollection):
        super().__init__(keys)
        from medda.data.readers import SimpleITKReader

        self.loaders = {}
        for key in self.keys:
            loader = LoadImaged(key, ensure_channel_first=True, image_only=True)
            loader.register(SimpleITKReader(read_nifti=False))
            self.loaders[key] = loader

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.loaders:  # before loading anything: the case's paths name it
            if not d.get(key):
                where = d.get("image") or d.get("id") or "a case"
                raise InputError(where, None, f"case '{d.get('id', '?')}' has no {key} file, and this command needs "
                                 f"one for every case (expected a matching file in the dataset's {key}s folder)")
        for key, loader in self.loaders.items():
            try:
                d = loader(d)
            except InputError:
                raise  # medda's own readers already name the file and what is wrong (e.g. an incomplete series)
            except Exception as err:  # noqa: BLE001 - any reader failure means the file is not a readable image
                reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
                raise InputError(d[key], None, f"could not be read as an image ({reason})") from None
        return d


def check_volume(array: torch.Tensor, source: object, what: str) -> None:
    """Refuse anything but a non-empty single-channel 3D volume: (1, X, Y, Z) with every axis > 0."""
    if array.numel() == 0:
        raise InputError(source, None, f"{what} has no voxels (an axis of size 0); expected a 3D volume")
    spatial = tuple(array.shape[1:])
    if len(spatial) != 3 or array.shape[0] != 1:
        found = f"{array.shape[0]} channels x {spatial}" if array.shape[0] != 1 else f"{len(spatial)}D {spatial}"
        raise InputError(source, None, f"{what} is {found}; expected a single-channel 3D volume (X, Y, Z)")


def check_label_codes(label: torch.Tensor | np.ndarray, source: object, codes: set[int], card_ref: str) -> None:
    """Refuse non-integer, non-finite or unknown label values (rounding 1.4 or 2.6 would silently relabel)."""
    label = torch.as_tensor(label)
    if label.is_floating_point():
        if not torch.isfinite(label).all():
            raise InputError(source, None, "label map contains NaN or infinite values")
        fractional = label[label != label.round()]
        if fractional.numel():
            shown = sorted({round(float(v), 3) for v in fractional.unique()[:8]})
            raise InputError(source, None, f"label map holds non-integer values {shown}; expected integer "
                             f"codes from the label map of {card_ref}")
    unknown = sorted(set(torch.unique(label).long().tolist()) - codes)
    if unknown:
        raise InputError(source, None, f"label values {unknown[:8]} are not in the label map of {card_ref} "
                         f"(expected {sorted(codes)})")


class CheckCase(MapTransform):
    """Refuse NaNs, non-volumes (4D, 2D, empty axes), image/label grid mismatches and label values that are
    not integer codes of the card's label map."""

    def __init__(self, card: DataCard, card_path: str, with_label: bool):
        super().__init__(["image", "label"] if with_label else ["image"])
        self.codes = set(card.label_map)
        self.card_path = card_path
        self.with_label = with_label

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d["image"]
        source = image.meta.get("filename_or_obj", "image")
        check_volume(image, source, "image")
        if not torch.isfinite(image).all():
            raise InputError(source, None, "image contains NaN or infinite values")
        if not self.with_label:
            return d
        label = d["label"]
        lsource = label.meta.get("filename_or_obj", "label")
        check_volume(label, lsource, "label map")
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise InputError(
                lsource, None, f"label grid {tuple(label.shape[1:])} differs from its image's {tuple(image.shape[1:])}"
            )
        if not torch.allclose(label.affine.double(), image.affine.double(), atol=1e-3, rtol=1e-4):
            raise InputError(lsource, None, "label affine (orientation/spacing/origin) differs from its image's")
        check_label_codes(label, lsource, self.codes, self.card_path)
        return d


class CheckFiniteAfterNormalisation(MapTransform):
    """Refuse images whose normalised intensities are not finite (values near 3e37 overflow a z-score)."""

    def __init__(self, card: DataCard, card_path: str):
        super().__init__(["image"])
        self.method = card.intensity.method
        self.card_path = card_path

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        image = data["image"]
        if not torch.isfinite(image).all():
            source = image.meta.get("filename_or_obj", "image") if hasattr(image, "meta") else "image"
            raise InputError(source, None, f"intensities become NaN or infinite under the normalisation of "
                             f"{self.card_path} (field 'intensity.method' = {self.method}); expected intensities "
                             "within float32 range after scaling (rescale the image, e.g. to its stored units)")
        return dict(data)


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """Voxels above 10 % of the robust intensity range: the body, for cropping away empty air."""
    flat = image.reshape(-1).float()
    sample = flat[:: max(1, flat.numel() // 200_000)]
    lo, hi = sample.min(), torch.quantile(sample, 0.99)
    return image > lo + 0.1 * (hi - lo)


def _spatial_keys(with_label: bool) -> list[str]:
    return ["image", "label"] if with_label else ["image"]


def preprocessing(card: DataCard, data: DataConfig, with_label: bool, card_path: str = "card") -> list:
    """The deterministic (cacheable, invertible) prefix shared by every chain."""
    keys = _spatial_keys(with_label)
    interp = ("bilinear", "nearest") if with_label else ("bilinear",)
    chain: list = [LoadCase(keys), CheckCase(card, card_path, with_label)]
    if card.orientation.lower() != "native":
        # labels=None (the image's own space) is MONAI's default; passing it silences the deprecation warning.
        chain.append(Orientationd(keys, axcodes=card.orientation, labels=None))
    if card.inplane_rot90:
        chain.append(Rotate90d(keys, k=card.inplane_rot90, spatial_axes=(0, 1)))
    if data.spacing is not None and card.spacing_known:
        chain.append(Spacingd(keys, pixdim=data.spacing, mode=interp))
    if with_label and card.needs_remap:
        codes = sorted(card.label_map)
        chain.append(MapLabelValued("label", codes, [card.label_map[c] for c in codes]))
    if data.foreground_crop:
        chain.append(CropForegroundd(keys, source_key="image", select_fn=body_mask, margin=4, allow_smaller=True))
    recipe = card.intensity
    if recipe.method == "zscore":
        chain.append(NormalizeIntensityd("image", nonzero=recipe.nonzero, channel_wise=True))
    elif recipe.method == "percentile":
        chain.append(
            ScaleIntensityRangePercentilesd(
                "image", recipe.lower_percentile, recipe.upper_percentile, 0.0, 1.0, clip=True, channel_wise=True
            )
        )
    chain.append(CheckFiniteAfterNormalisation(card, card_path))
    return chain


def sample_shape(data: DataConfig) -> list[int]:
    """The 3D crop that yields one training sample: the patch, or a (H, W, 1) slab in 2D mode."""
    if data.mode == "3d":
        return list(data.patch_size)
    shape = list(data.patch_size)
    shape.insert(data.slice_axis, 1)
    return shape


def _sampling(data: DataConfig, with_label: bool) -> list:
    keys = _spatial_keys(with_label)
    crop = sample_shape(data)
    pad = [-1 if s == 1 else s for s in crop]  # never pad the sliced axis
    # Plain tensors from here on: the random part needs no metadata, and MONAI's per-transform metadata bookkeeping
    # on MetaTensors was a third of the data time of a training step (BENCHMARKS.md, "Training steps").
    chain: list = [SpatialPadd(keys, spatial_size=pad), EnsureTyped(keys, track_meta=False)]
    if with_label:
        chain.append(
            RandCropByPosNegLabeld(keys, "label", crop, pos=1, neg=1, num_samples=data.samples_per_volume)
        )
    else:
        chain.append(RandSpatialCropSamplesd(keys, crop, num_samples=data.samples_per_volume, random_size=False))
    if data.mode == "2d":
        chain.append(SqueezeDimd(keys, dim=data.slice_axis + 1))
    return chain


def _augmentations(data: DataConfig, with_label: bool) -> list:
    if not data.augment:
        return []
    keys = _spatial_keys(with_label)
    interp = ("bilinear", "nearest") if with_label else ("bilinear",)
    ndim = len(data.patch_size)
    inplane = (0, 1) if data.mode == "2d" else tuple(a for a in range(3) if a != data.slice_axis)
    rotate = [0.0] * (1 if ndim == 2 else 3)
    if ndim == 2:
        rotate[0] = 0.26  # about 15 degrees in-plane
    else:
        rotate[data.slice_axis] = 0.26
    chain: list = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in inplane]
    if data.patch_size[inplane[0]] == data.patch_size[inplane[1]]:
        chain.append(RandRotate90d(keys, prob=0.5, spatial_axes=inplane))
    chain += [
        RandAffined(keys, prob=0.3, rotate_range=rotate, scale_range=[0.1] * ndim, mode=interp, padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
        RandGaussianNoised("image", prob=0.2, std=0.05),
    ]
    return chain


def labeled_train_chain(card: DataCard, data: DataConfig, card_path: str = "card") -> Compose:
    keys = _spatial_keys(True)
    return Compose(
        preprocessing(card, data, True, card_path)
        + _sampling(data, True)
        + _augmentations(data, True)
        + [EnsureTyped(keys, track_meta=False)]
    )


def unlabeled_train_chain(card: DataCard, data: DataConfig, card_path: str = "card") -> Compose:
    """Never reads or creates a 'label' key, whatever the case dicts contain."""
    return Compose(
        [_DropLabel()]
        + preprocessing(card, data, False, card_path)
        + _sampling(data, False)
        + _augmentations(data, False)
        + [EnsureTyped("image", track_meta=False)]
    )


def inference_chain(card: DataCard, data: DataConfig, with_label: bool = False, card_path: str = "card") -> Compose:
    return Compose(preprocessing(card, data, with_label, card_path))


class _DropLabel(Transform):
    """Remove any label path before loading, so an unlabelled chain cannot read one by accident. A (deterministic)
    `Transform`, so that `CacheDataset` caches the preprocessing after it: it stops at the first step that is not."""

    def __call__(self, data: Mapping) -> dict:
        return {k: v for k, v in data.items() if k != "label"}


def load_label(path: str | Path, card: DataCard) -> tuple[np.ndarray, np.ndarray]:
    """A label file on its own grid as canonical ids: (array (X, Y, Z) int, affine 4x4). For evaluation."""
    d = LoadCase(["label"])({"label": str(path)})
    label = d["label"]
    # as CheckCase does for training: never score against codes the card does not define
    check_volume(label, path, "label map")
    check_label_codes(label, path, set(card.label_map), f"card '{card.name}'")
    array = label[0].numpy()
    if card.needs_remap:
        out = np.zeros(array.shape, dtype=np.int16)
        for code, cid in card.label_map.items():
            out[array == code] = cid
        array = out
    return array.astype(np.int16), label.affine.numpy()
