"""MONAI chains built from a card: sample shapes, resampling, label remap, the label-free contract, z-score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_card_fields

from medda.config import DataConfig
from medda.data.cards import DataCard, load_card
from medda.data.transforms import inference_chain, labeled_train_chain, sample_shape, unlabeled_train_chain
from medda.errors import InputError

REPO = Path(__file__).resolve().parent.parent
CARD_A = load_card(REPO / "data_cards" / "phantom_site_a.yaml")

BASE_CARD = toy_card_fields([1.5, 1.5, 3.0], ["ring", "blob", "rv"])


def data_cfg(**kw) -> DataConfig:
    return DataConfig(card=Path("card.yaml"), **kw)


@pytest.fixture(scope="module")
def phantom_case(phantom_root) -> dict:
    """Site A case: 40 x 40 x 16 voxels of 1.5 x 1.5 x 3 mm (60 x 60 x 48 mm)."""
    root = phantom_root / "A"
    return {
        "id": "A_000",
        "image": str(root / "imagesTr" / "A_000.nii.gz"),
        "label": str(root / "labelsTr" / "A_000.nii.gz"),
    }


@pytest.mark.parametrize("augment", [False, True])
def test_labeled_chain_3d_shapes(phantom_case, augment):
    data = data_cfg(patch_size=[48, 32, 16], samples_per_volume=3, augment=augment)  # 48 > 40: padded
    samples = labeled_train_chain(CARD_A, data)(phantom_case)
    assert isinstance(samples, list) and len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (1, 48, 32, 16)
        assert tuple(s["label"].shape) == (1, 48, 32, 16)
        assert type(s["image"]) is torch.Tensor  # meta dropped for collation
        assert set(torch.unique(s["label"]).tolist()) <= {0, 1, 2, 3}
    # positive/negative sampling: at least one of the patches contains foreground
    assert any((s["label"] > 0).any() for s in samples)


@pytest.mark.parametrize("slice_axis", [2, 0])
def test_labeled_chain_2d_slices(phantom_case, slice_axis):
    data = data_cfg(mode="2d", patch_size=[24, 12], samples_per_volume=4, slice_axis=slice_axis)
    assert sample_shape(data) == ([24, 12, 1] if slice_axis == 2 else [1, 24, 12])
    samples = labeled_train_chain(CARD_A, data)(phantom_case)
    assert len(samples) == 4
    for s in samples:
        assert tuple(s["image"].shape) == (1, 24, 12)
        assert tuple(s["label"].shape) == (1, 24, 12)


def test_spacing_resampling_follows_physical_size(phantom_case):
    native = inference_chain(CARD_A, data_cfg(foreground_crop=False), with_label=True)(phantom_case)
    assert tuple(native["image"].shape) == (1, 40, 40, 16)
    data = data_cfg(spacing=[3.0, 2.0, 4.0], foreground_crop=False)
    out = inference_chain(CARD_A, data, with_label=True)(phantom_case)
    # 60 x 60 x 48 mm at 3 x 2 x 4 mm
    assert tuple(out["image"].shape) == (1, 20, 30, 12)
    assert tuple(out["label"].shape) == (1, 20, 30, 12)
    assert np.allclose(np.linalg.norm(out["image"].affine[:3, :3].numpy(), axis=0), [3.0, 2.0, 4.0])
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}  # nearest: no blended label values
    # the same through the training chain: patches are drawn from the resampled grid
    samples = labeled_train_chain(
        CARD_A, data_cfg(spacing=[3.0, 2.0, 4.0], patch_size=[16, 16, 8], augment=False)
    )(phantom_case)
    assert tuple(samples[0]["image"].shape) == (1, 16, 16, 8)


def test_spacing_ignored_when_card_spacing_unknown(phantom_case):
    card = DataCard.model_validate(dict(BASE_CARD, spacing="unknown"))
    out = inference_chain(card, data_cfg(spacing=[3.0, 3.0, 3.0], foreground_crop=False), with_label=True)(
        phantom_case
    )
    assert tuple(out["image"].shape) == (1, 40, 40, 16)
    assert np.allclose(np.linalg.norm(out["image"].affine[:3, :3].numpy(), axis=0), [1.5, 1.5, 3.0])


def test_label_remap_through_chains(tmp_path, nifti_writer, make_blob_case):
    image, label = make_blob_case(shape=(24, 24, 8))
    codes = np.select([label == 1, label == 2], [200, 500], 0).astype(np.int16)
    codes[0, 0, 0] = 600  # one RV voxel in a corner
    card = DataCard.model_validate(
        dict(
            BASE_CARD,
            labels=[
                {"code": 0, "id": 0, "name": "background"},
                {"code": 600, "id": 1, "name": "RV"},
                {"code": 200, "id": 2, "name": "Myo"},
                {"code": 500, "id": 3, "name": "LV"},
            ],
        )
    )
    case = {
        "image": str(nifti_writer(tmp_path / "img.nii.gz", image)),
        "label": str(nifti_writer(tmp_path / "lab.nii.gz", codes)),
    }
    out = inference_chain(card, data_cfg(foreground_crop=False), with_label=True)(case)
    expected = np.select([codes == 600, codes == 200, codes == 500], [1, 2, 3], 0)
    np.testing.assert_array_equal(out["label"][0].numpy(), expected)
    samples = labeled_train_chain(card, data_cfg(patch_size=[16, 16, 8], samples_per_volume=2))(case)
    for s in samples:
        assert set(torch.unique(s["label"]).tolist()) <= {0, 1, 2, 3}
    # the MS-CMR card itself (native orientation, quarter turn in-plane): class voxel counts follow the map
    mscmr = load_card(REPO / "data_cards" / "mscmr_bssfp.yaml")
    out = inference_chain(mscmr, data_cfg(foreground_crop=False), with_label=True)(case)
    got = np.bincount(out["label"][0].numpy().round().astype(int).ravel(), minlength=4)
    assert got.tolist() == np.bincount(expected.ravel(), minlength=4).tolist()


@pytest.mark.parametrize("bad_label", ["missing", "corrupt"])
def test_unlabeled_chain_never_reads_labels(phantom_case, tmp_path, bad_label):
    label = tmp_path / "label.nii.gz"
    if bad_label == "corrupt":
        label.write_bytes(b"this is not a NIfTI file at all")
    case = {"id": "x", "image": phantom_case["image"], "label": str(label)}
    for mode, patch in (("3d", [32, 32, 16]), ("2d", [32, 32])):
        samples = unlabeled_train_chain(CARD_A, data_cfg(mode=mode, patch_size=patch, samples_per_volume=2))(
            case
        )
        assert len(samples) == 2
        for s in samples:
            assert "label" not in s
            assert tuple(s["image"].shape) == (1, *patch)
    # the labelled chain does read it, and fails with a user error naming the file
    with pytest.raises(Exception) as err:  # noqa: B017 - MONAI wraps the transform error
        labeled_train_chain(CARD_A, data_cfg(patch_size=[32, 32, 16]))(case)
    cause = err.value
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, InputError) and str(label) in str(cause)


def test_zscore_inside_the_body_crop(tmp_path, nifti_writer):
    rng = np.random.default_rng(0)
    image = np.zeros((40, 36, 12), np.float32)
    image[8:30, 6:28, 2:10] = 500 + 80 * rng.standard_normal((22, 22, 8))  # body; air around it
    case = {"image": str(nifti_writer(tmp_path / "img.nii.gz", image))}
    card = DataCard.model_validate(BASE_CARD)
    out = inference_chain(card, data_cfg(), with_label=False)(case)["image"]
    assert out.shape[1] < 40 and out.shape[2] < 36  # cropped to the body (+ margin)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-2)
    # percentile recipe: [0, 1]
    card_p = DataCard.model_validate(dict(BASE_CARD, intensity={"method": "percentile"}))
    out_p = inference_chain(card_p, data_cfg(), with_label=False)(case)["image"]
    assert float(out_p.min()) == pytest.approx(0.0) and float(out_p.max()) == pytest.approx(1.0)
    # none: as stored
    card_n = DataCard.model_validate(dict(BASE_CARD, intensity={"method": "none"}))
    out_n = inference_chain(card_n, data_cfg(foreground_crop=False), with_label=False)(case)["image"]
    np.testing.assert_allclose(out_n[0].numpy(), image)


@pytest.mark.parametrize("mode, patch", [("3d", [32, 32, 16]), ("2d", [32, 32])])
def test_cached_streams_never_read_their_files_again(phantom_case, tmp_path, mode, patch):
    """With `data.cache`, labelled and unlabelled streams preprocess every case once: the files can vanish once the
    streams exist. (The unlabelled chain used to start with a step `CacheDataset` does not treat as a transform, so
    nothing of it was cached and every batch re-read and re-normalised its volumes.)"""
    import shutil

    from medda.data.loading import Data

    case = {"id": "c"}
    for key in ("image", "label"):
        case[key] = str(shutil.copy(phantom_case[key], tmp_path / f"{key}.nii.gz"))
    data = Data(CARD_A, "card", data_cfg(mode=mode, patch_size=patch, samples_per_volume=2, cache=True))
    labeled, _ = data.stream([case], True, 1, seed=0)
    unlabeled, _ = data.stream([case], False, 1, seed=0)
    for key in ("image", "label"):
        Path(case[key]).unlink()
    for _ in range(3):
        batch = next(labeled)
        assert tuple(batch["image"].shape) == (2, 1, *patch) and tuple(batch["label"].shape) == (2, 1, *patch)
        assert tuple(next(unlabeled)["image"].shape) == (2, 1, *patch)
