"""Inference: sliding windows equal a full forward pass, predictions land on the input grid, flip TTA."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import toy_card_fields
from torch import nn

from medda.config import DataConfig, InferenceConfig, ModelConfig
from medda.data.cards import DataCard
from medda.data.transforms import inference_chain
from medda.inference import Predictor, default_sw_batch_size, predict_cases, to_label, write_prediction
from medda.models.factory import build_model
from medda.runtime import memory_format

CPU = torch.device("cpu")
CARD = DataCard.model_validate(toy_card_fields([1.2, 0.8, 2.5], ["bright"]))


def eval_net(spatial_dims: int, num_classes: int = 3) -> nn.Module:
    """A tiny UNet in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(channels=[8, 16, 32]), spatial_dims, num_classes)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def predictor(net, mode: str, patch, **inference) -> Predictor:
    data = DataConfig(card=Path("c.yaml"), mode=mode, patch_size=list(patch))
    return Predictor(net, data, InferenceConfig(**inference), CPU, amp=None, channels_last=False)


def test_sliding_window_equals_full_forward_3d():
    net = eval_net(3)
    x = torch.randn(1, 1, 32, 24, 16, generator=torch.Generator().manual_seed(1))
    p = predictor(
        net, "3d", [16, 16, 8], roi_size=[32, 24, 16], overlap=0.0, blend="constant", sw_batch_size=1
    )
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1)
    got = p.probabilities(x)
    assert got.shape == (1, 3, 32, 24, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # windows smaller than the volume really are stitched (a different, but same-shaped, answer)
    tiled = predictor(net, "3d", [16, 16, 8], overlap=0.0, blend="constant").probabilities(x)
    assert tiled.shape == got.shape and not torch.allclose(tiled, got, atol=1e-3)


def test_windows_per_forward_follow_the_measured_rule_and_the_config():
    """The measured rule (one 3D window but four 2D slices per forward on a CPU, four on a GPU), never overriding a
    configured value; batching windows changes the time, not the answer."""
    net = eval_net(3)
    automatic = predictor(net, "3d", [16, 16, 8])
    assert automatic.inferer.sw_batch_size == 1
    assert predictor(eval_net(2), "2d", [16, 16]).inferer.sw_batch_size == 4
    assert default_sw_batch_size(torch.device("cuda"), "3d") == 4
    batched = predictor(net, "3d", [16, 16, 8], sw_batch_size=3)
    assert batched.inferer.sw_batch_size == 3
    x = torch.randn(1, 1, 32, 24, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(batched.probabilities(x), automatic.probabilities(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("slice_axis", [2, 0])
def test_slice_inference_equals_per_slice_forward_2d(slice_axis):
    net = eval_net(2)
    x = torch.randn(1, 1, 16, 24, 8, generator=torch.Generator().manual_seed(2))
    plane = [s for a, s in enumerate(x.shape[2:]) if a != slice_axis]
    data = DataConfig(card=Path("c.yaml"), mode="2d", patch_size=plane, slice_axis=slice_axis)
    p = Predictor(
        net,
        data,
        InferenceConfig(roi_size=plane, overlap=0.0, blend="constant", sw_batch_size=3),
        CPU,
        amp=None,
        channels_last=True,
    )
    got = p.probabilities(x)
    assert got.shape == (1, 3, 16, 24, 8)
    with torch.no_grad():
        moved = torch.movedim(x, slice_axis + 2, 0)  # (S, 1, 1, H, W)
        per_slice = torch.stack([torch.softmax(net(s), dim=1) for s in moved])  # (S, 1, K, H, W)
        expected = torch.movedim(per_slice, 0, slice_axis + 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_bf16_volume_is_cast_once_and_matches_window_by_window_autocast(mode):
    """The predictor holds one autocast context per volume (the weights are cast to bf16 once, not per window) and
    puts the weights in the inference layout: neither changes a single probability against autocasting each window
    of a contiguous-weight copy, and the weights keep their values."""
    spatial_dims = 3 if mode == "3d" else 2
    net = eval_net(spatial_dims)
    reference_net = copy.deepcopy(net)
    patch = [16, 16, 8] if mode == "3d" else [16, 16]
    x = torch.randn(1, 1, 24, 20, 10, generator=torch.Generator().manual_seed(4))
    data = DataConfig(card=Path("c.yaml"), mode=mode, patch_size=patch)
    window = InferenceConfig(overlap=0.25, tta_flips=True)
    fast = Predictor(net, data, window, CPU, amp=torch.bfloat16, channels_last=True)
    weight = next(w for w in net.parameters() if w.ndim == spatial_dims + 2)
    assert weight.is_contiguous(memory_format=memory_format(spatial_dims))
    for before, after in zip(reference_net.parameters(), net.parameters(), strict=True):
        assert torch.equal(before, after)

    def per_window(batch: torch.Tensor) -> torch.Tensor:  # the earlier path: autocast entered for every window
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return reference_net(batch.contiguous(memory_format=memory_format(spatial_dims))).float()

    with torch.no_grad():
        expected = torch.softmax(fast.inferer(x, per_window), dim=1)
        for axis in [a for a in (2, 3, 4) if mode == "3d" or a != data.slice_axis + 2]:
            flipped = fast.inferer(torch.flip(x, dims=[axis]), per_window)
            expected += torch.flip(torch.softmax(flipped, dim=1), dims=[axis])
        expected /= 4 if mode == "3d" else 3
    torch.testing.assert_close(fast.probabilities(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_flip_tta_shape_and_normalisation(mode):
    net = eval_net(3 if mode == "3d" else 2, num_classes=4)
    x = torch.randn(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(3))
    patch = [16, 16, 8] if mode == "3d" else [16, 16]
    plain = predictor(net, mode, patch, overlap=0.25, tta_flips=False).probabilities(x)
    tta = predictor(net, mode, patch, overlap=0.25, tta_flips=True).probabilities(x)
    assert tta.shape == plain.shape == (1, 4, 16, 16, 8)
    torch.testing.assert_close(tta.sum(dim=1), torch.ones(1, 16, 16, 8), atol=1e-5, rtol=0)
    assert (tta >= 0).all() and not torch.allclose(tta, plain, atol=1e-4)
    assert to_label(tta).shape == (1, 1, 16, 16, 8)


def test_to_label_is_argmax_with_its_tie_rule_on_a_cropped_output():
    """The label map is torch.argmax's (the lowest class among equal maxima), also on a cropped, non-contiguous
    volume like the one the sliding window returns."""
    padded = torch.rand(1, 4, 12, 10, 6, generator=torch.Generator().manual_seed(5))
    padded[:, :, :3] = 0.25  # four-way ties: class 0
    padded[:, 2, 3:6] = padded[:, 1, 3:6] = 2.0  # two-way ties between classes 1 and 2: class 1
    probs = padded[:, :, :, :8]
    assert not probs.is_contiguous()
    label = to_label(probs)
    assert torch.equal(label, torch.argmax(probs, dim=1, keepdim=True))
    assert (label[0, 0, :3] == 0).all() and (label[0, 0, 3:6] == 1).all()


def test_to_label_largest_component_removes_3d_islands_per_class():
    """Post-processing keeps each class's largest 3D component; islands of any class go to background."""
    label = torch.zeros(1, 12, 12, 6, dtype=torch.long)
    label[0, 1:5, 1:5, 1:5] = 1  # class 1: a 4x4x4 block ...
    label[0, 9, 9, 2] = 1  # ... and a one-voxel island
    label[0, 6:8, 1:3, 0:6] = 2  # class 2 spans every slice: one component in 3D
    label[0, 10:12, 0:2, 5] = 2  # class-2 island
    probs = torch.nn.functional.one_hot(label, 3).permute(0, 4, 1, 2, 3).float()
    kept = to_label(probs, largest_component=True)[0, 0]
    expected = label[0].clone()
    expected[9, 9, 2] = 0
    expected[10:12, 0:2, 5] = 0
    assert torch.equal(kept, expected)
    assert torch.equal(to_label(probs)[0, 0], label[0])  # off by default


class Threshold(nn.Module):
    """Predicts class 1 where the (z-scored) image is above zero: a model whose answer we know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1) * 20.0


# Anisotropic voxels, x and y flipped (LPS-like storage), axes permuted, and an origin far from zero.
AFFINES = {
    "lps_flip": np.array([[-1.2, 0, 0, 40.0], [0, -0.8, 0, -25.0], [0, 0, 2.5, 12.5], [0, 0, 0, 1]]),
    "permuted": np.array([[0, -0.8, 0, 10.0], [0, 0, 2.5, -7.0], [-1.2, 0, 0, 33.0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize(("mode", "spacing"), [("3d", None), ("2d", None), ("3d", [2.0, 2.0, 3.0])])
def test_predictions_come_back_on_the_input_grid(tmp_path, nifti_writer, name, mode, spacing):
    rng = np.random.default_rng(0)
    image = (100 + 3 * rng.standard_normal((21, 30, 10))).astype(np.float32)
    image[4:12, 5:20, 2:7] += 200  # an off-centre bright block: mirroring would move it
    affine = AFFINES[name]
    path = nifti_writer(tmp_path / "case.nii.gz", image, affine)
    data = DataConfig(
        card=Path("c.yaml"),
        mode=mode,
        patch_size=[16, 16, 8] if mode == "3d" else [16, 16],
        spacing=spacing,
        foreground_crop=spacing is None,
    )
    p = Predictor(Threshold(), data, InferenceConfig(overlap=0.25), CPU, amp=None, channels_last=False)
    chain = inference_chain(CARD, data)
    with warnings.catch_warnings(record=True) as caught:  # a normal prediction prints nothing but medda's output
        warnings.simplefilter("always")
        (pred,) = predict_cases(p, [{"id": "case", "image": str(path)}], chain, progress=False)
    assert not caught, [str(w.message) for w in caught]
    out = write_prediction(pred, tmp_path / "pred")
    assert out == tmp_path / "pred" / "case.nii.gz"
    back = nib.load(out)
    assert back.shape == image.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert back.get_data_dtype() == np.uint8
    label = np.asarray(back.dataobj)
    block = np.zeros(image.shape, bool)
    block[4:12, 5:20, 2:7] = True
    if spacing is None:
        np.testing.assert_array_equal(label, block.astype(np.uint8))
    else:  # resampled there and back (bilinear): the block up to its boundary, not mirrored or shifted
        dice = 2 * (label.astype(bool) & block).sum() / (label.sum() + block.sum())
        assert dice > 0.7
        np.testing.assert_allclose(np.argwhere(label).mean(0), np.argwhere(block).mean(0), atol=1.0)


def test_in_place_softmax_equals_torch_softmax():
    from medda.inference import _softmax_

    logits = torch.randn(1, 4, 6, 5, 3) * 30  # large logits: the max is subtracted first
    expected = torch.softmax(logits, dim=1)
    out = _softmax_(logits)
    assert out.data_ptr() == logits.data_ptr()  # no copy of the volume
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("spacing", [None, [2.0, 2.0, 3.0]])
def test_label_inverted_one_class_at_a_time_equals_inverting_all(tmp_path, nifti_writer, spacing):
    """The memory-bounded path (invert class k, keep where it beats the best so far) gives the argmax of the
    inverted probabilities, with resampling and cropping to undo."""
    from medda.inference import invert_to_original, label_on_original

    rng = np.random.default_rng(1)
    image = (100 + 30 * rng.standard_normal((21, 30, 10))).astype(np.float32)
    path = nifti_writer(tmp_path / "case.nii.gz", image, AFFINES["lps_flip"])
    data = DataConfig(card=Path("c.yaml"), mode="3d", patch_size=[16, 16, 8], spacing=spacing,
                      foreground_crop=spacing is None)
    chain = inference_chain(CARD, data)
    pre = chain({"id": "case", "image": str(path)})
    probs = torch.softmax(torch.randn(1, 4, *pre["image"].shape[1:]) * 3, dim=1)
    label, affine = label_on_original(probs, pre, chain)
    full = invert_to_original(probs, pre, chain)
    assert label.dtype == np.uint8 and label.shape == image.shape
    np.testing.assert_array_equal(label, full.argmax(dim=0).numpy())
    np.testing.assert_allclose(affine, np.asarray(full.affine))
