"""Synthetic multi-site phantoms: determinism, anatomy, spacing, site shift, and the NIfTI writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medda.data.phantoms import (
    DEFAULT_FOV_MM,
    SITES,
    generate_case,
    grid_shape,
    phantom_class_names,
    write_phantom_dataset,
)
from medda.errors import InputError

_SIX = ndimage.generate_binary_structure(3, 1)  # face neighbours


def _zscore(image: np.ndarray) -> np.ndarray:
    return (image - image.mean()) / image.std()


def _volumes_mm3(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    return np.array([(label == k).sum() * voxel_mm3 for k in (1, 2, 3)])


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]


def test_class_names():
    assert phantom_class_names() == ("background", "ring", "blob", "rv")
    assert phantom_class_names(with_rv=False) == ("background", "ring", "blob")
    assert {"A", "B", "C", "D"} <= set(SITES)


def test_generate_case_is_deterministic_and_seed_dependent():
    a1, l1, aff1 = generate_case("A", 3)
    a2, l2, aff2 = generate_case("A", 3)
    assert a1.dtype == np.float32 and l1.dtype == np.uint8 and aff1.shape == (4, 4)
    assert a1.shape == l1.shape and a1.ndim == 3
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(aff1, aff2)
    a3, l3, _ = generate_case("A", 4)
    assert not np.array_equal(l1, l3) and not np.array_equal(a1, a3)


@pytest.mark.parametrize("site", ["A", "B", "C", "D"])
def test_every_class_present_and_ring_encloses_blob(site):
    for seed in (0, 1):
        _, label, _ = generate_case(site, seed)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        blob = label == 2
        # The blob's 6-neighbour shell is ring only: it never touches background or rv, in-plane or
        # across slices (the ring is a closed shell, thicker along z than the thickest slice).
        shell = ndimage.binary_dilation(blob, _SIX) & ~blob
        assert shell.sum() > 0
        assert np.all(label[shell] == 1), f"{site}/{seed}: blob touches {np.unique(label[shell])}"
        # The rv sits against the ring (septum), outside it.
        rv = label == 3
        rv_shell = ndimage.binary_dilation(rv, _SIX) & ~rv
        assert (label[rv_shell] == 1).any()


def test_with_rv_false_keeps_image_and_drops_label_3():
    img, lab, _ = generate_case("A", 0)
    img2, lab2, _ = generate_case("A", 0, with_rv=False)
    np.testing.assert_array_equal(img, img2)
    assert set(np.unique(lab2).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(lab2, np.where(lab == 3, 0, lab))


@pytest.mark.parametrize("site", ["A", "B", "C", "D"])
def test_spacing_shape_and_affine(site):
    spacing = np.array(SITES[site].spacing)
    image, label, affine = generate_case(site, 0)
    assert image.shape == grid_shape(spacing, DEFAULT_FOV_MM)
    # The grid covers the FOV to within half a voxel per axis.
    assert np.all(np.abs(np.array(image.shape) * spacing - DEFAULT_FOV_MM) <= spacing / 2 + 1e-9)
    np.testing.assert_allclose(np.diag(affine)[:3], spacing)
    np.testing.assert_allclose(affine[:3, :3], np.diag(spacing))
    # The FOV centre is world (0, 0, 0) mm at every site.
    centre = affine @ np.r_[(np.array(image.shape) - 1) / 2, 1.0]
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert 48 <= image.shape[0] <= 64 and 48 <= image.shape[1] <= 64 and 16 <= image.shape[2] <= 24


def test_fov_and_spacing_are_configurable():
    image, label, affine = generate_case("A", 0, fov_mm=(96.0, 96.0, 48.0), spacing=(2.0, 2.0, 4.0))
    assert image.shape == label.shape == (48, 48, 12)
    np.testing.assert_allclose(np.diag(affine)[:3], (2.0, 2.0, 4.0))


def test_sites_share_anatomy_but_differ_in_appearance():
    for seed in (0, 1, 2):
        img_a, lab_a, aff_a = generate_case("A", seed)
        img_b, lab_b, aff_b = generate_case("B", seed)
        assert img_a.shape != img_b.shape  # different grids ...
        # ... same physical anatomy: structure volumes (mm^3) within 5 % and centroids within 1 mm.
        vol_a, vol_b = _volumes_mm3(lab_a, aff_a), _volumes_mm3(lab_b, aff_b)
        np.testing.assert_allclose(vol_b, vol_a, rtol=0.05)
        for k in (1, 2, 3):
            dist = np.linalg.norm(_centroid_mm(lab_a == k, aff_a) - _centroid_mm(lab_b == k, aff_b))
            assert dist < 1.0, f"seed {seed} class {k}: centroids {dist:.2f} mm apart"
        # Appearance after per-volume z-scoring: in A the ring sits at the volume mean (z < 0.3), in B
        # it is brighter (z > 0.5, by > 0.5 z), and the blob-ring contrast drops by > 0.7 z.
        z_a, z_b = _zscore(img_a), _zscore(img_b)
        ring_a, ring_b = z_a[lab_a == 1].mean(), z_b[lab_b == 1].mean()
        blob_a, blob_b = z_a[lab_a == 2].mean(), z_b[lab_b == 2].mean()
        assert ring_a < 0.3 and ring_b > 0.5 and ring_b - ring_a > 0.5
        assert (blob_a - ring_a) - (blob_b - ring_b) > 0.7


def test_site_d_is_site_a_at_low_resolution():
    """D keeps A's grid, anatomy and contrast order; only the point spread and the noise change (the demo's
    shift that adaptation can undo)."""
    img_a, lab_a, aff_a = generate_case("A", 0)
    img_d, lab_d, aff_d = generate_case("D", 0)
    np.testing.assert_array_equal(lab_a, lab_d)
    np.testing.assert_array_equal(aff_a, aff_d)
    z_a, z_d = _zscore(img_a), _zscore(img_d)
    order = lambda z, lab: np.argsort([z[lab == k].mean() for k in (1, 2, 3)]).tolist()  # noqa: E731
    assert order(z_a, lab_a) == order(z_d, lab_d)  # same contrast order: ring darkest
    # Blurred: the ring/blob contrast inside the structures drops; noisier: the air is rougher.
    contrast = lambda z, lab: z[lab == 2].mean() - z[lab == 1].mean()  # noqa: E731
    assert contrast(z_d, lab_d) < 0.8 * contrast(z_a, lab_a)
    air = (lab_a == 0) & (img_a < 0.05)
    assert img_d[air].std() > 2 * img_a[air].std()


def test_site_intensity_ranges():
    img_a, _, _ = generate_case("A", 0)
    img_b, _, _ = generate_case("B", 0)
    img_c, _, _ = generate_case("C", 0)
    assert img_a.min() > -0.5 and img_a.max() < 1.5  # preprocessed floats ~0-1
    assert img_b.min() >= 0 and img_b.max() <= 2000 and img_b.max() > 500  # raw ints 0-2000
    assert img_c.min() >= 0 and img_c.max() <= 255  # 8-bit ints
    for img in (img_b, img_c):
        np.testing.assert_array_equal(img, np.rint(img))


def test_unknown_site_and_bad_seed():
    with pytest.raises(InputError):
        generate_case("Z", 0)
    with pytest.raises(InputError):
        generate_case("A", -1)
    with pytest.raises(InputError):
        write_phantom_dataset("unused", sites=("A",), cases_per_site=2)


def test_write_phantom_dataset(tmp_path):
    out = write_phantom_dataset(tmp_path / "ph", sites=("A", "B"), cases_per_site=3, seed=0)
    assert out == tmp_path / "ph"
    assert (out / "phantom_params.json").is_file()
    for site in ("A", "B"):
        site_dir = out / site
        datalist = json.loads((site_dir / "datalist.json").read_text(encoding="utf-8"))
        assert datalist["labels"] == {"0": "background", "1": "ring", "2": "blob", "3": "rv"}
        assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
        entries = datalist["training"] + datalist["validation"] + datalist["test"]
        assert [e["image"] for e in entries] == [f"imagesTr/{site}_{i:03d}.nii.gz" for i in range(3)]
        for entry in entries:
            assert not entry["image"].startswith("/") and not entry["label"].startswith("/")
            assert entry["label"] == entry["image"].replace("imagesTr/", "labelsTr/")
            img = nib.load(site_dir / entry["image"])
            lab = nib.load(site_dir / entry["label"])
            assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
            assert img.shape == lab.shape == grid_shape(SITES[site].spacing)
            np.testing.assert_allclose(img.affine, lab.affine)
            np.testing.assert_allclose(img.header.get_zooms(), SITES[site].spacing)
            assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2, 3}
    # Sites hold different patients unless paired.
    a0 = np.asarray(nib.load(out / "A/labelsTr/A_000.nii.gz").dataobj)
    a1 = np.asarray(nib.load(out / "A/labelsTr/A_001.nii.gz").dataobj)
    assert not np.array_equal(a0, a1)

    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert write_phantom_dataset(out, sites=("A", "B"), cases_per_site=3, seed=0) == out
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # second call is a no-op

    # Other parameters regenerate (and drop cases beyond the new count).
    write_phantom_dataset(out, sites=("A",), cases_per_site=3, seed=1)
    assert not np.array_equal(np.asarray(nib.load(out / "A/labelsTr/A_000.nii.gz").dataobj), a0)
    assert json.loads((out / "phantom_params.json").read_text(encoding="utf-8"))["seed"] == 1
