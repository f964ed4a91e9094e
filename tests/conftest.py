"""Shared fixtures: a tiny two-site phantom dataset, a NIfTI writer, card paths and a temporary MLflow store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "data_cards"
PHANTOM_CARD_A = CARDS / "phantom_site_a.yaml"
PHANTOM_CARD_B = CARDS / "phantom_site_b.yaml"

# Small field of view: site A volumes are 40 x 40 x 16 voxels (1.5 x 1.5 x 3 mm), site B 48 x 48 x 12.
TINY_FOV_MM = (60.0, 60.0, 48.0)


def toy_card_fields(spacing, class_names, name: str = "toy", **extra) -> dict:
    """The fields of a minimal data card: codes = ids = 0..n (0 is background)."""
    labels = [{"code": i, "id": i, "name": n} for i, n in enumerate(["background", *class_names])]
    return {
        "name": name, "site": "nowhere", "anatomy": "heart", "modality": "MRI", "provenance": "test",
        "licence": "CC0", "spacing": list(spacing), "labels": labels, **extra,
    }


def write_nifti(path: Path | str, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    """Write `array` as NIfTI (qform and sform = `affine`, default identity); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    array = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (to check that inputs are never modified)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def blob_case(shape=(24, 24, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny image/label pair: a bright cuboid (label 1) with a brighter core (label 2) on a noisy body."""
    rng = np.random.default_rng(seed)
    image = (100 + 5 * rng.standard_normal(shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    x, y, z = (s // 4 for s in shape)
    label[x : 3 * x, y : 3 * y, z : 3 * z] = 1
    label[x + 2 : 3 * x - 2, y + 2 : 3 * y - 2, z + 1 : 3 * z - 1] = 2
    image[label == 1] += 100
    image[label == 2] += 200
    return image, label


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Sites A and B, 5 cases each (3 training, 1 validation, 1 test), tiny field of view."""
    from medda.data.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(root, sites=("A", "B"), cases_per_site=5, seed=0, fov_mm=TINY_FOV_MM)


@pytest.fixture
def nifti_writer() -> Callable[..., Path]:
    return write_nifti


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A fresh SQLite MLflow store in the test's temporary folder."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def hash_files() -> Callable[[Path], dict[str, str]]:
    return file_hashes


@pytest.fixture
def make_blob_case() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return blob_case
