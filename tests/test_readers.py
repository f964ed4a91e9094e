"""SimpleITKReader / image_reader_for / load_image agree with MONAI's NibabelReader on the same volume."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from monai.transforms import Compose, LoadImage, LoadImaged, Orientationd

from medda.data.readers import (
    DicomSeriesError,
    SimpleITKReader,
    image_reader_for,
    load_image,
)

SHAPE = (5, 6, 4)  # (x, y, z) = (i, j, k), small and anisotropic
SPACING = (0.8, 0.9, 2.5)
ORIGIN_RAS = (12.5, -30.25, 41.0)
LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (an involution)


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# RAS direction matrices (columns: where i, j, k point). DICOM can only store right-handed frames (the
# slice axis is the normal of ImageOrientationPatient), so one geometry of each handedness.
GEOMETRIES = {
    # i -> Left (a flip), j -> Superior, k -> Anterior (a coronal-like permutation), rotated 10 degrees
    "flip_perm_oblique": _rot_z(10.0) @ np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    # i -> Left, j -> Anterior, k -> Superior: a single flip, left-handed (det = -1)
    "flip_left_handed": np.diag([-1.0, 1.0, 1.0]),
}


def _ras_affine(direction: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN_RAS
    return affine


def _volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 2000, size=SHAPE).astype(np.int16)  # distinct values: any axis mix-up shows


def _sitk_image(data_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """The SimpleITK image of the same physical geometry: RAS affine -> LPS direction/origin/spacing."""
    lps = LPS_FLIP @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data_xyz.T))  # SimpleITK arrays are (z, y, x)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())  # row-major
    return img


def _write_dicom_series(img: sitk.Image, folder: Path, series_uid: str, prefix: str = "slice") -> None:
    """SimpleITK's "Dicom Series From Array" example, with fixed UIDs/dates (int16, so no rescale tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    iop = (d[0], d[3], d[6], d[1], d[4], d[7])  # row and column direction cosines (LPS)
    series_tags = {
        "0008|0021": "20240101",  # series date
        "0008|0031": "120000",  # series time
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0060": "CT",
        "0020|000d": series_uid + ".0",  # study instance UID
        "0020|000e": series_uid,  # series instance UID
        "0020|0037": "\\".join(f"{v:.10g}" for v in iop),
        "0008|103e": "medda test series",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        slice_k = img[:, :, k]
        for tag, value in series_tags.items():
            slice_k.SetMetaData(tag, value)
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))  # image position
        slice_k.SetMetaData("0020|0013", str(k + 1))  # instance number
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_k)


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def written(request, tmp_path_factory) -> dict:
    """One volume, one geometry, written as NIfTI (nibabel), NRRD, MetaImage and a DICOM series."""
    geometry = request.param
    root = tmp_path_factory.mktemp(geometry)
    data, affine = _volume(), _ras_affine(GEOMETRIES[geometry])
    nii = nib.Nifti1Image(data, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    paths = {"nii": root / "vol.nii.gz", "nrrd": root / "vol.nrrd", "mha": root / "vol.mha"}
    nib.save(nii, paths["nii"])
    img = _sitk_image(data, affine)
    sitk.WriteImage(img, str(paths["nrrd"]))
    sitk.WriteImage(img, str(paths["mha"]))
    paths["dicom"] = root / "dicom"
    _write_dicom_series(img, paths["dicom"], "1.2.826.0.1.3680043.2.1125.777.1")
    return {"geometry": geometry, "data": data, "affine": affine, "paths": paths}


def _load_ras(path: Path, reader) -> MetaTensor:
    pipeline = Compose(
        [
            LoadImaged(keys="img", reader=reader, ensure_channel_first=True),
            Orientationd(keys="img", axcodes="RAS", labels=None),
        ]
    )
    return pipeline({"img": path})["img"]


def test_reference_nifti_load(written):
    ref = LoadImage(image_only=True, ensure_channel_first=True, reader=NibabelReader())(
        written["paths"]["nii"]
    )
    np.testing.assert_array_equal(ref[0].numpy(), written["data"])
    np.testing.assert_allclose(ref.affine.numpy(), written["affine"], atol=1e-5)


@pytest.mark.parametrize("fmt", ["nrrd", "mha", "dicom", "nii_sitk"])
def test_matches_nibabel(written, fmt):
    paths = written["paths"]
    nib_loader = LoadImage(image_only=True, ensure_channel_first=True, reader=image_reader_for(paths["nii"]))
    ref = nib_loader(paths["nii"])
    if fmt == "nii_sitk":  # NIfTI through SimpleITK, when asked for explicitly
        path, reader = paths["nii"], SimpleITKReader()
    else:
        path, reader = paths[fmt], image_reader_for(paths[fmt])
        assert isinstance(reader, SimpleITKReader)
    img = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(path)

    assert isinstance(img, MetaTensor)
    assert tuple(img.shape) == (1, *SHAPE)
    assert img.meta["space"] == "RAS"
    assert img.meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(img.meta["spatial_shape"], SHAPE)
    np.testing.assert_allclose(img.meta["spacing"], SPACING, atol=1e-5)

    expected, expected_affine = ref.numpy(), ref.affine.numpy()
    if fmt == "dicom" and written["geometry"] == "flip_left_handed":
        # DICOM has no left-handed frames: GDCM stacks the slices along the IOP normal, i.e. k reversed.
        expected = expected[..., ::-1]
        expected_affine = expected_affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1]], dtype=float
        )
    np.testing.assert_array_equal(img.numpy(), expected)
    np.testing.assert_allclose(img.affine.numpy(), expected_affine, atol=1e-4)
    np.testing.assert_allclose(img.meta["original_affine"], expected_affine, atol=1e-4)

    # the same physical image: reoriented to RAS, arrays and affines agree whatever the storage order
    ras_ref, ras_img = _load_ras(paths["nii"], NibabelReader()), _load_ras(path, reader)
    np.testing.assert_array_equal(ras_img.numpy(), ras_ref.numpy())
    np.testing.assert_allclose(ras_img.affine.numpy(), ras_ref.affine.numpy(), atol=1e-4)


def test_load_image_convenience(written):
    for fmt in ("nii", "nrrd"):
        img = load_image(written["paths"][fmt])
        assert tuple(img.shape) == (1, *SHAPE)
        np.testing.assert_array_equal(img[0].numpy(), written["data"])


def test_image_reader_for(tmp_path):
    assert isinstance(image_reader_for("a/b.nii"), NibabelReader)
    assert isinstance(image_reader_for("a/b.NII.GZ"), NibabelReader)
    for name in ("b.nrrd", "b.nhdr", "b.mha", "b.mhd"):
        assert isinstance(image_reader_for(f"a/{name}"), SimpleITKReader)
    assert isinstance(image_reader_for(tmp_path), SimpleITKReader)  # directory: DICOM series
    assert image_reader_for("a/b.png") is None
    assert image_reader_for("a/b.nii.txt") is None
    reader = SimpleITKReader()
    assert reader.verify_suffix(["x.mha", "y.nrrd"]) and not reader.verify_suffix(["x.mha", "y.png"])
    with pytest.raises(ValueError, match="unsupported image format"):
        load_image(tmp_path / "scan.png")


def test_vector_image_is_channel_last_then_first(tmp_path):
    rng = np.random.default_rng(1)
    comps = rng.integers(0, 100, size=(3, *SHAPE)).astype(np.float32)  # (c, x, y, z)
    img = sitk.GetImageFromArray(
        np.ascontiguousarray(np.moveaxis(comps, 0, -1).transpose(2, 1, 0, 3)), isVector=True
    )
    img.SetSpacing(SPACING)
    path = tmp_path / "vec.mha"
    sitk.WriteImage(img, str(path))

    reader = SimpleITKReader()
    data, meta = reader.get_data(reader.read(path))
    assert data.shape == (*SHAPE, 3) and meta["original_channel_dim"] == -1
    np.testing.assert_array_equal(meta["spatial_shape"], SHAPE)

    loaded = load_image(path)
    assert tuple(loaded.shape) == (3, *SHAPE)
    np.testing.assert_array_equal(loaded.numpy(), comps)


def test_dicom_folder_with_several_series_reads_the_largest(tmp_path):
    data, affine = _volume(), _ras_affine(GEOMETRIES["flip_perm_oblique"])
    img = _sitk_image(data, affine)
    _write_dicom_series(img[:, :, :2], tmp_path, "1.2.826.0.1.3680043.2.1125.777.2", prefix="small")
    _write_dicom_series(img, tmp_path, "1.2.826.0.1.3680043.2.1125.777.3", prefix="big")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        loaded = load_image(tmp_path)
    assert tuple(loaded.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(loaded[0].numpy(), data)

    chosen = SimpleITKReader(series_name="1.2.826.0.1.3680043.2.1125.777.2")
    small, _ = chosen.get_data(chosen.read(tmp_path))
    np.testing.assert_array_equal(small, data[:, :, :2])


def test_folder_without_dicom_raises_naming_it(tmp_path):
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here\n")
    with pytest.raises(ValueError, match="no DICOM series") as info:
        load_image(folder)
    assert str(folder) in str(info.value)
    assert isinstance(info.value, DicomSeriesError)
    with pytest.raises(ValueError, match="not_dicom"):
        SimpleITKReader(series_name="1.2.3").read(folder)
