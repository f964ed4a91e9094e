"""Card orientation for oblique 2D stacks: 'native' keeps the slice axis, `inplane_rot90` turns the plane, both invert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import toy_card_fields

from medda.config import DataConfig
from medda.data.cards import DataCard
from medda.data.transforms import inference_chain
from medda.inference import invert_to_original

CARD = toy_card_fields([1.25, 1.25, 8.0], ["LV"], name="sax")
# An oblique short-axis stack like MS-CMRSeg case01 (axis codes P, S, R): voxel axis 2 is the slice axis.
OBLIQUE = np.array(
    [[-0.785, -0.633, 4.72, 95.3], [-0.911, 0.145, -5.394, 212.2], [-0.342, 1.068, 3.531, -131.9], [0, 0, 0, 1]]
)


def _case(tmp_path: Path, nifti_writer) -> tuple[dict, np.ndarray]:
    image = np.random.default_rng(0).normal(size=(20, 16, 5)).astype(np.float32)
    return {"image": str(nifti_writer(tmp_path / "img.nii.gz", image, OBLIQUE))}, image


def _chain(card: dict):
    cfg = DataConfig(card=Path("card.yaml"), mode="2d", patch_size=[16, 16], foreground_crop=False)
    return inference_chain(DataCard.model_validate(card), cfg, with_label=False)


def test_ras_moves_the_slice_axis_native_keeps_it(tmp_path, nifti_writer):
    case, image = _case(tmp_path, nifti_writer)
    ras = _chain(dict(CARD, intensity={"method": "none"}))(dict(case))["image"]
    assert tuple(ras.shape[1:]) == (5, 20, 16)  # slices now along axis 0: 2D slicing along axis 2 is wrong
    native = _chain(dict(CARD, orientation="native", intensity={"method": "none"}))(dict(case))["image"]
    np.testing.assert_allclose(native[0].numpy(), image)


def test_inplane_rot90_and_its_inverse(tmp_path, nifti_writer):
    case, image = _case(tmp_path, nifti_writer)
    chain = _chain(dict(CARD, orientation="native", inplane_rot90=1, intensity={"method": "none"}))
    data = chain(dict(case))
    np.testing.assert_allclose(data["image"][0].numpy(), np.rot90(image, 1, axes=(0, 1)))
    back = invert_to_original(torch.as_tensor(data["image"])[None], data, chain)
    np.testing.assert_allclose(back[0].numpy(), image, atol=1e-6)
    np.testing.assert_allclose(np.asarray(back.affine), OBLIQUE, atol=1e-3)
