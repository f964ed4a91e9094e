"""The one inference path: sliding windows (3D) or slice-by-slice windows (2D), optional flip TTA,
bf16 autocast where the hardware has it, and predictions returned on the original image grid.

Used for validation during training, label-free monitoring during adaptation, `medda predict` and
`medda evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.transforms import Compose, Invertd
from torch import nn

from medda import components
from medda.config import DataConfig, InferenceConfig
from medda.runtime import Runtime, autocast, memory_format


@dataclass
class Predictor:
    """Runs a segmentation network over whole volumes.

    Attributes:
        model: network producing (B, K, *spatial) logits.
        data: the data config the model was trained with (mode, patch size, slice axis).
        config: window settings; `roi_size` defaults to the training patch size.
        device: compute device; `amp`: autocast dtype or None; `channels_last`: memory layout.
    """

    model: nn.Module
    data: DataConfig
    config: InferenceConfig
    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = True

    def __post_init__(self) -> None:
        roi = self.config.roi_size or list(self.data.patch_size)
        window_device = torch.device(self.config.sw_device or self.device)
        windows_per_forward = self.config.sw_batch_size or default_sw_batch_size(window_device, self.data.mode)
        common = dict(
            roi_size=roi, sw_batch_size=windows_per_forward,
            overlap=self.config.overlap, mode=self.config.blend, sw_device=window_device,
            device=self.config.out_device or self.device,
        )
        if self.data.mode == "2d":
            self.inferer = SliceInferer(spatial_dim=self.data.slice_axis, **common)
        else:
            self.inferer = SlidingWindowInferer(**common)
        self.spatial_dims = 2 if self.data.mode == "2d" else 3
        if self.channels_last:  # the weights too: otherwise every convolution reorders them for each window
            self.model.to(memory_format=memory_format(self.spatial_dims))

    @classmethod
    def on(cls, runtime: Runtime, model: nn.Module, data: DataConfig, config: InferenceConfig,
           channels_last: bool = True) -> Predictor:
        """A predictor computing on `runtime`'s device with its autocast dtype (moves `model` there)."""
        return cls(model.to(runtime.device), data, config, runtime.device, runtime.amp, channels_last)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=memory_format(self.spatial_dims))
        return self.model(x).float()

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (1, K, *spatial) for one preprocessed volume (1, C, *spatial)."""
        image = torch.as_tensor(image).float()  # plain tensor: window slicing of MetaTensors is slow
        # One autocast context for the whole volume: autocast caches its low-precision copies of the weights until
        # the context exits, so they are cast once per volume rather than once per window. Only the network's
        # operations are autocast; MONAI's blending (multiplications and sums) runs in float32 either way.
        with autocast(self.device, self.amp):
            probs = _softmax_(self.inferer(image, self._network))
            if self.config.tta_flips:
                axes = [2, 3] if self.data.mode == "2d" else [2, 3, 4]
                if self.data.mode == "2d":
                    axes = [a for a in (2, 3, 4) if a != self.data.slice_axis + 2]
                for axis in axes:
                    flipped = self.inferer(torch.flip(image, dims=[axis]), self._network)
                    probs += torch.flip(torch.softmax(flipped, dim=1), dims=[axis])
                probs /= 1 + len(axes)
        return probs


def default_sw_batch_size(device: torch.device, mode: str) -> int:
    """Windows per forward pass when the config leaves it open (BENCHMARKS.md, "Inference window settings").

    On a CPU: one 3D window per forward (batching them measured up to 1.3x slower) but four 2D slices (1.2x faster
    in bf16 on a CPU with AMX tiles, equal on an AVX-512 one). On a GPU four, which it needs to fill its cores (not
    measured here).
    """
    if device.type == "cpu" and mode == "3d":
        return 1
    return 4


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (dim 1) in place: a large volume's logits are not copied once more."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def to_label(probs: torch.Tensor, largest_component: bool = False) -> torch.Tensor:
    """(1, K, *S) probabilities -> (1, 1, *S) label map, optionally the largest component per class.

    Components are taken over the whole image (3D for a volume, also when it was predicted slice by slice).
    """
    # max().indices is argmax (the first maximum on ties) and about 9x faster on a CPU over a class dimension that is
    # not the innermost one, as it is not here (BENCHMARKS.md, "Inference speed")
    label = probs.max(dim=1, keepdim=True).indices
    if largest_component:
        label = components.largest_component(label, spatial_dims=probs.ndim - 2)
    return label


def invert_to_original(probs: torch.Tensor, preprocessed: dict, transform: Compose) -> MetaTensor:
    """Map (1, K, *S) probabilities from preprocessed space back onto the original image grid."""
    image = preprocessed["image"]
    pred = MetaTensor(probs[0].cpu(), meta=dict(image.meta))  # the meta carries the affine
    pred.applied_operations = list(image.applied_operations)
    out = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=False)({"pred": pred, "image": image})
    return out["pred"]


def label_on_original(probs: torch.Tensor, preprocessed: dict, transform: Compose,
                      largest_component: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(1, K, *S) probabilities in preprocessed space -> (uint8 label map, affine) on the original image grid.

    The argmax of the inverted probabilities, computed one class at a time (invert class k, keep where it beats the
    best so far): the inversion is linear per class, so this equals inverting all K at once, while memory holds one
    class on the original grid instead of K (a 512 x 512 x 300 volume: BENCHMARKS.md, "Inference").
    """
    best = label = affine = None
    for k in range(probs.shape[1]):
        channel = invert_to_original(probs[:, k:k + 1], preprocessed, transform)
        values = channel[0].as_tensor()
        if best is None:
            best, label, affine = values.clone(), torch.zeros(values.shape, dtype=torch.uint8), channel.affine
            continue
        better = values > best  # strict: ties keep the lower class, as argmax does
        best = torch.where(better, values, best)
        label[better] = k
    if largest_component:
        label = components.largest_component(label[None, None], spatial_dims=label.ndim)[0, 0]
    return label.numpy(), np.asarray(affine, dtype=np.float64)


@dataclass
class CasePrediction:
    case_id: str
    label: np.ndarray  # (X, Y, Z) canonical class ids on the original grid
    affine: np.ndarray  # 4x4, the original image's
    probs_preprocessed: torch.Tensor | None = None  # (1, K, *S) for monitoring, when kept


def predict_cases(
    predictor: Predictor, cases: list[dict], chain: Compose, keep_probs: bool = False, progress: bool = True
) -> Iterator[CasePrediction]:
    """Predict every case and return label maps on their original grids."""
    from tqdm.auto import tqdm

    quiet = {} if progress else {"disable": True}  # unset, `disable` follows TQDM_DISABLE and friends
    for case in tqdm(cases, desc="predict", leave=False, **quiet):
        data = chain({"id": case["id"], "image": case["image"]})
        probs = predictor.probabilities(data["image"][None])
        label, affine = label_on_original(probs, data, chain, predictor.config.largest_component)
        yield CasePrediction(case["id"], label, affine, probs if keep_probs else None)


def prediction_path(case_id: str, out_dir: Path) -> Path:
    """Where `write_prediction` puts the label map of `case_id`."""
    return Path(out_dir) / f"{case_id}.nii.gz"


def write_prediction(pred: CasePrediction, out_dir: Path, tag: str | None = None) -> Path:
    """Write a label map as NIfTI with the original image's affine (and `tag` in the header's `descrip`).

    Atomic: the file is written under a temporary name in the same folder and renamed, so a crash (or a killed
    process) leaves either no file or a complete one, never a truncated file under the case's name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = prediction_path(pred.case_id, out_dir)
    image = nib.Nifti1Image(pred.label.astype(np.uint8), pred.affine)
    image.set_data_dtype(np.uint8)
    if tag is not None:
        image.header["descrip"] = tag.encode("ascii")
    tmp = path.with_name(f".{pred.case_id}.{os.getpid()}.tmp.nii.gz")  # same suffix: nibabel picks the format by it
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(case_ids: set[str], out_dir: Path) -> None:
    """Delete what killed writers of `case_ids` left behind (`write_prediction`'s temporary files), in one listing of
    `out_dir`. Call only from the process that owns those cases in this run (`distributed.shard`), so that no live
    writer's file is touched."""
    suffix = ".tmp.nii.gz"
    for path in Path(out_dir).glob(f".*{suffix}"):
        case_id = path.name[1 : -len(suffix)].rsplit(".", 1)[0]  # .{case_id}.{pid}.tmp.nii.gz
        if case_id in case_ids:
            path.unlink(missing_ok=True)


def readable_prediction(path: Path, tag: str) -> bool:
    """Whether `path` is a complete, readable NIfTI label map written with `tag` (need not be predicted again)."""
    try:
        image = nib.load(path)
        if image.header["descrip"].item().decode("ascii", "replace") != tag:
            return False
        np.asarray(image.dataobj)  # decompresses everything: a truncated file fails here
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: predict it again
        return False
    return True
