"""The one inference path: sliding windows (3D) or slice-by-slice windows (2D), optional flip TTA,
bf16 autocast where the hardware has it, and predictions returned on the original image grid.

Used for validation during training, label-free monitoring during adaptation, `medda predict` and
`medda evaluate`.
"""

from __future__ import annotations

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
        common = dict(
            roi_size=roi, sw_batch_size=self.config.sw_batch_size, overlap=self.config.overlap,
            mode=self.config.blend, sw_device=self.config.sw_device or self.device,
            device=self.config.out_device or self.device,
        )
        if self.data.mode == "2d":
            self.inferer = SliceInferer(spatial_dim=self.data.slice_axis, **common)
        else:
            self.inferer = SlidingWindowInferer(**common)
        self.spatial_dims = 2 if self.data.mode == "2d" else 3

    @classmethod
    def on(cls, runtime: Runtime, model: nn.Module, data: DataConfig, config: InferenceConfig,
           channels_last: bool = True) -> Predictor:
        """A predictor computing on `runtime`'s device with its autocast dtype (moves `model` there)."""
        return cls(model.to(runtime.device), data, config, runtime.device, runtime.amp, channels_last)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=memory_format(self.spatial_dims))
        with autocast(self.device, self.amp):
            return self.model(x).float()

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (1, K, *spatial) for one preprocessed volume (1, C, *spatial)."""
        image = torch.as_tensor(image).float()  # plain tensor: window slicing of MetaTensors is slow
        probs = torch.softmax(self.inferer(image, self._network), dim=1)
        if self.config.tta_flips:
            axes = [2, 3] if self.data.mode == "2d" else [2, 3, 4]
            if self.data.mode == "2d":
                axes = [a for a in (2, 3, 4) if a != self.data.slice_axis + 2]
            for axis in axes:
                flipped = self.inferer(torch.flip(image, dims=[axis]), self._network)
                probs += torch.flip(torch.softmax(flipped, dim=1), dims=[axis])
            probs /= 1 + len(axes)
        return probs


def to_label(probs: torch.Tensor, largest_component: bool = False) -> torch.Tensor:
    """(1, K, *S) probabilities -> (1, 1, *S) label map, optionally the largest component per class.

    Components are taken over the whole image (3D for a volume, also when it was predicted slice by slice).
    """
    label = probs.argmax(dim=1, keepdim=True)
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
        original = invert_to_original(probs, data, chain)
        label = to_label(original[None], predictor.config.largest_component)[0, 0]
        yield CasePrediction(
            case["id"], label.numpy().astype(np.uint8), np.asarray(original.affine, dtype=np.float64),
            probs if keep_probs else None,
        )


def write_prediction(pred: CasePrediction, out_dir: Path) -> Path:
    """Write a label map as NIfTI with the original image's affine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{pred.case_id}.nii.gz"
    image = nib.Nifti1Image(pred.label.astype(np.uint8), pred.affine)
    image.set_data_dtype(np.uint8)
    nib.save(image, path)
    return path
