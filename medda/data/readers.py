"""Image readers: a SimpleITK-backed MONAI ``ImageReader`` and a path -> reader chooser.

MONAI's own ``ITKReader`` needs the ``itk`` package, which medda does not depend on. ``SimpleITKReader``
follows the same contract with SimpleITK instead, so that

    LoadImage(image_only=True, ensure_channel_first=True, reader=SimpleITKReader())

gives the same array (x, y, z[, c] axis order) and the same RAS ``affine`` as ``ITKReader`` would, and as
``NibabelReader`` gives for the same data stored as NIfTI.

Supported inputs: NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd), NIfTI (.nii/.nii.gz, when asked for
explicitly; ``image_reader_for`` prefers MONAI's ``NibabelReader`` for those) and DICOM series given as a
directory. A directory holding several series is read as the series with the most files (ties: the
lowest series UID), with a warning; pass ``series_name`` to choose one.

Caveat (DICOM): a DICOM series cannot store a left-handed voxel frame. GDCM sorts the slices along the
normal of ImageOrientationPatient, so a volume written from a left-handed (det(direction) < 0) image is
read back with its slice axis reversed. The physical geometry (and so the array after ``Orientation`` to
RAS) is unchanged; only the raw voxel order differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.config import PathLike
from monai.data import ImageReader, MetaTensor
from monai.data.image_reader import NibabelReader, _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImage
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medda.errors import InputError

__all__ = [
    "NIFTI_SUFFIXES",
    "SITK_SUFFIXES",
    "DicomSeriesError",
    "ImageFormatError",
    "SimpleITKReader",
    "image_reader_for",
    "load_image",
]

NIFTI_SUFFIXES: tuple[str, ...] = ("nii", "nii.gz")
# Suffixes SimpleITKReader claims (directories are claimed too: DICOM series).
SITK_SUFFIXES: tuple[str, ...] = ("nrrd", "nhdr", "mha", "mhd", *NIFTI_SUFFIXES)


class ImageFormatError(InputError, ValueError):
    """A path that no medda reader can load (a ``ValueError`` and a user-facing ``InputError``)."""


class DicomSeriesError(ImageFormatError):
    """A directory given as a DICOM series holds no (or not the requested) DICOM series."""


def _has_suffix(path: PathLike, suffixes: Sequence[str]) -> bool:
    name = Path(f"{path}").name.lower()
    return any(name.endswith(f".{s}") for s in suffixes)


class SimpleITKReader(ImageReader):
    """Load medical images with SimpleITK, following MONAI's ``ITKReader`` conventions.

    The returned array is in the same order as ``ITKReader`` (default ``reverse_indexing=False``) and
    ``NibabelReader``: spatial axes (x, y, z) = (i, j, k), then the components of a multi-component (vector)
    pixel as the last axis. SimpleITK's ``GetArrayFromImage`` gives (z, y, x[, c]); it is transposed here.

    The metadata holds ``affine`` and ``original_affine`` (RAS by default, converted from ITK's LPS
    direction/origin/spacing exactly as ``ITKReader`` does), ``space``, ``spatial_shape``, ``spacing``,
    ``original_channel_dim`` (NaN for scalar images, -1 for vector images, or ``channel_dim`` if given) and
    the image's own (non ``ITK_``) metadata strings. ``LoadImage`` adds ``filename_or_obj``.

    Args:
        channel_dim: as in ``ITKReader``: the channel dimension of the image, if it has one that is not the
            multi-component axis. None: ``original_channel_dim`` is "no_channel" (NaN) or -1.
        series_name: DICOM series UID to read from a directory. Empty: the series with the most files.
        reverse_indexing: if True, return SimpleITK's (z, y, x[, c]) order instead (metadata unchanged).
        series_meta: for DICOM series, copy the first slice's DICOM tags into the metadata.
        affine_lps_to_ras: convert the affine from ITK's LPS to RAS (default, as NibabelReader).
        pixel_type: SimpleITK pixel type id to read as (``sitk.sitkFloat32``, ...); None: the file's type.
        read_nifti: claim .nii/.nii.gz files too (False: leave them to nibabel, which honours sform/qform).
    """

    def __init__(
        self,
        channel_dim: str | int | None = None,
        series_name: str = "",
        reverse_indexing: bool = False,
        series_meta: bool = False,
        affine_lps_to_ras: bool = True,
        pixel_type: int | None = None,
        read_nifti: bool = True,
    ):
        super().__init__()
        # read_nifti=False leaves NIfTI to NibabelReader when both are registered with one LoadImage.
        self.suffixes = SITK_SUFFIXES if read_nifti else tuple(s for s in SITK_SUFFIXES if s not in NIFTI_SUFFIXES)
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_name = series_name
        self.reverse_indexing = reverse_indexing
        self.series_meta = series_meta
        self.affine_lps_to_ras = affine_lps_to_ras
        self.pixel_type = sitk.sitkUnknown if pixel_type is None else pixel_type

    # -- ImageReader API -------------------------------------------------------------------------------

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True if every name is a directory (DICOM series) or has a supported suffix."""
        return all(
            Path(f"{name}").is_dir() or _has_suffix(name, self.suffixes) for name in ensure_tuple(filename)
        )

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> Any:
        """Read one file/directory (-> ``sitk.Image``) or several (-> list, stacked as channels later).

        A directory is read as a DICOM series (see the class docstring for how one series is chosen).
        ``kwargs`` are not used (kept for MONAI's signature).
        """
        filenames: Sequence[PathLike] = ensure_tuple(data)
        images = [self._read_one(Path(f"{name}")) for name in filenames]
        return images if len(filenames) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return (array, metadata) for one ``sitk.Image`` or a list of them (stacked as ``ITKReader`` does)."""
        img_array: list[np.ndarray] = []
        compatible_meta: dict = {}
        # not ensure_tuple(img): a sitk.Image is itself iterable (over its pixels)
        for i in [img] if isinstance(img, sitk.Image) else list(img):
            data = self._get_array_data(i)
            img_array.append(data)
            header = self._get_meta_dict(i)
            header[MetaKeys.ORIGINAL_AFFINE] = self._get_affine(i, self.affine_lps_to_ras)
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPATIAL_SHAPE] = self._get_spatial_shape(i)
            if self.channel_dim is None:  # default to "no_channel" or -1
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = (
                    float("nan") if len(data.shape) == len(header[MetaKeys.SPATIAL_SHAPE]) else -1
                )
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            _copy_compatible_dict(header, compatible_meta)
        return _stack_images(img_array, compatible_meta), compatible_meta

    # -- reading -----------------------------------------------------------------------------------------

    def _read_one(self, path: Path) -> sitk.Image:
        if path.is_dir():
            return self._read_dicom_series(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return sitk.ReadImage(str(path), self.pixel_type)

    def _read_dicom_series(self, folder: Path) -> sitk.Image:
        series_ids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        if not series_ids:
            raise DicomSeriesError(folder, None, "no DICOM series found in this folder")
        files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids}
        if self.series_name:
            if self.series_name not in files:
                raise DicomSeriesError(
                    folder, None, f"no DICOM series '{self.series_name}' here; found: {', '.join(series_ids)}"
                )
            uid = self.series_name
        else:
            uid = max(series_ids, key=lambda u: len(files[u]))  # max() keeps the first (lowest UID) on ties
            if len(series_ids) > 1:
                warnings.warn(
                    f"{folder} holds {len(series_ids)} DICOM series; reading {uid} ({len(files[uid])} files), "
                    "the one with the most files. Pass series_name to choose another.",
                    stacklevel=2,
                )
        _check_slice_positions(folder, files[uid])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files[uid])
        reader.SetOutputPixelType(self.pixel_type)
        if self.series_meta:
            reader.MetaDataDictionaryArrayUpdateOn()
            reader.LoadPrivateTagsOn()
        image = reader.Execute()
        if self.series_meta:  # like ITKReader: the first slice's tags stand for the series
            for key in reader.GetMetaDataKeys(0):
                image.SetMetaData(key, reader.GetMetaData(0, key))
        return image

    # -- metadata and array ------------------------------------------------------------------------------

    @staticmethod
    def _get_meta_dict(img: sitk.Image) -> dict:
        meta = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys() if not key.startswith("ITK_")}
        meta["spacing"] = np.asarray(img.GetSpacing())
        return meta

    @staticmethod
    def _get_affine(img: sitk.Image, lps_to_ras: bool = True) -> np.ndarray:
        """The voxel (i, j, k) -> world affine, as ``ITKReader._get_affine`` builds it."""
        ndim = img.GetDimension()
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
        spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
        origin = np.asarray(img.GetOrigin(), dtype=np.float64)
        sr = min(max(ndim, 1), 3)
        affine: np.ndarray = np.eye(sr + 1)
        affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
        affine[:sr, -1] = origin[:sr]
        if lps_to_ras:
            affine = orientation_ras_lps(affine)
        return affine

    def _get_spatial_shape(self, img: sitk.Image) -> np.ndarray:
        sr = max(min(img.GetDimension(), 3), 1)
        size = list(img.GetSize())
        if isinstance(self.channel_dim, int):
            size.pop(self.channel_dim)
        return np.asarray(size[:sr])

    def _get_array_data(self, img: sitk.Image) -> np.ndarray:
        np_img = sitk.GetArrayFromImage(img)  # (..., z, y, x) plus a last component axis for vector pixels
        if self.reverse_indexing:
            return np_img
        if img.GetNumberOfComponentsPerPixel() == 1:
            return np_img.T
        return np.moveaxis(np_img.T, 0, -1)  # (c, x, y, z) -> (x, y, z, c), as ITKReader


def _check_slice_positions(folder: Path, files: Sequence[str], tolerance: float = 0.1) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal.

    A missing or unreadable slice would otherwise be read as a shorter volume with a stretched slice spacing
    (ITK only warns), and a duplicated one as a zero gap. Slices without position/orientation tags are not checked.

    Args:
        files: the series' files in GDCM's order (sorted along the slice normal).
        tolerance: largest accepted deviation of a gap from the median gap, as a fraction of it.
    """
    if len(files) < 3:
        return
    header = sitk.ImageFileReader()
    positions, orientation = [], None
    for name in files:
        header.SetFileName(name)
        header.ReadImageInformation()
        if not (header.HasMetaDataKey("0020|0032") and header.HasMetaDataKey("0020|0037")):
            return
        try:
            positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
            orientation = orientation or [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
        except ValueError:
            return
    normal = np.cross(orientation[:3], orientation[3:6])
    along = np.sort(np.asarray(positions) @ normal)  # mm along the slice normal
    gaps = np.diff(along)
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if typical <= 0 or abs(gaps[worst] - typical) > tolerance * typical:
        raise DicomSeriesError(
            folder, None, f"DICOM slices are not evenly spaced: a gap of {gaps[worst]:.3g} mm between slices "
            f"{worst + 1} and {worst + 2} of {len(files)} where the others are {typical:.3g} mm (a missing, "
            "duplicated or corrupt slice); expected a complete series",
        )


def image_reader_for(path: PathLike) -> ImageReader | None:
    """The reader to load ``path`` with: ``NibabelReader`` for NIfTI, ``SimpleITKReader`` for NRRD,
    MetaImage and DICOM-series directories, None for anything else."""
    p = Path(f"{path}").expanduser()
    if not p.is_dir() and _has_suffix(p, NIFTI_SUFFIXES):
        return NibabelReader()
    if p.is_dir() or _has_suffix(p, SITK_SUFFIXES):
        return SimpleITKReader()
    return None


def load_image(path: PathLike) -> MetaTensor:
    """Load one image as a channel-first ``MetaTensor`` (RAS affine in ``.affine``, metadata in ``.meta``)."""
    reader = image_reader_for(path)
    if reader is None:
        raise ImageFormatError(
            path,
            None,
            "unsupported image format; expected .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd or a DICOM-series folder",
        )
    loader = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)
    return loader(path, reader=reader)
