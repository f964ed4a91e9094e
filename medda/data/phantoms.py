"""Synthetic multi-site 3D cardiac-like phantoms: the embedded default dataset (demo and tests).

Anatomy is defined in millimetres in a world frame centred on the field of view (FOV), then voxelised
on each site's grid, so one anatomy seed gives the same physical heart at every site while the volume
shape follows the site's voxel spacing. Structures (label values):

- 0 ``background``: air, body fat rim, textured soft tissue, lungs, a blood-bright descending aorta
  (a deliberate look-alike of the cavities, labelled background) and the thin right-ventricle wall;
- 1 ``ring``: myocardium-like closed ellipsoidal shell (random in-plane thickness 3-5.5 mm, thicker
  towards base/apex so that thick slices still close it);
- 2 ``blob``: the cavity inside the ring;
- 3 ``rv``: a second cavity next to the ring that partly wraps around it (``with_rv=False`` keeps it in
  the image but labels it background).

Per-case randomness (seeded ``np.random.Generator``): body size, heart position, size, axes and rotation
about the slice (z) axis, cavity/wall thickness, lungs, aorta. Sites (:data:`SITES`) differ only in
appearance and sampling: tissue intensities, gamma, multiplicative bias field, Gaussian or Rician noise,
blur, scanner intensity range and voxel spacing.

Label voxels are the majority class of sub-samples at most 1 mm apart, and image voxels mix the tissue
intensities of those sub-samples (partial volume), so structure volumes in mm^3 agree across grids
within ~2 % for ring and blob and ~5 % for the thin rv crescent.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from medda.errors import InputError

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_FOV_MM",
    "SITES",
    "SiteStyle",
    "case_seed",
    "generate_case",
    "grid_shape",
    "phantom_class_names",
    "write_phantom_dataset",
]

# Bump when the generated data change, so cached datasets on disk are regenerated.
GENERATOR_VERSION = 1

DEFAULT_FOV_MM: tuple[float, float, float] = (80.0, 80.0, 64.0)
CLASS_NAMES: tuple[str, ...] = ("background", "ring", "blob", "rv")

# Tissue indices of the sub-voxel map; labels derive from them (ring/blob/rv -> 1/2/3, rest -> 0).
TISSUES: tuple[str, ...] = ("air", "fat", "tissue", "lung", "vessel", "ring", "blob", "rv")
AIR, FAT, TISSUE, LUNG, VESSEL, RING, BLOB, RV = range(len(TISSUES))

_SUBVOXEL_MM = 1.0  # max sub-sample pitch for partial volume: fine enough for ~2 % volume agreement
_TEXTURE_MM = 3.0  # correlation length of the soft-tissue texture


@dataclass(frozen=True)
class SiteStyle:
    """Appearance and sampling of one scanner/site.

    Intensities are built on a unit scale (``means`` per tissue, roughly 0-1), then ``gamma``, the bias
    field and the per-case gain are applied, mapped to scanner units with ``offset + scale * v``, noise
    is added (``noise_sigma`` is in unit-scale, i.e. multiplied by ``scale``), and values are optionally
    clipped and rounded to integers (still stored as float32).
    """

    name: str
    spacing: tuple[float, float, float]  # voxel size (mm), x, y, z (z = slice axis)
    means: dict[str, float]  # unit-scale intensity per tissue in TISSUES (this is the contrast)
    texture: float = 0.08  # relative amplitude of the smooth soft-tissue texture
    gamma: float = 1.0  # v -> v**gamma on the unit scale
    bias_strength: float = 0.1  # bias field = exp(strength * g), g smooth with max |g| = 1
    noise: Literal["gaussian", "rician"] = "gaussian"
    noise_sigma: float = 0.025  # noise std on the unit scale
    blur_mm: float = 0.0  # Gaussian point-spread sigma (mm)
    scale: float = 1.0  # unit scale -> scanner units
    offset: float = 0.0
    clip: tuple[float, float] | None = None  # scanner-unit range, e.g. (0, 2000) for raw ints
    integer: bool = False  # round to integers like raw scanner data
    mean_jitter: float = 0.04  # per-case relative jitter of each tissue mean
    gain_jitter: float = 0.0  # per-case relative jitter of the global gain
    description: str = ""


SITES: dict[str, SiteStyle] = {
    # Reference site: bSSFP-like (bright blood, dark myocardium), preprocessed floats ~0-1.
    "A": SiteStyle(
        name="A",
        spacing=(1.5, 1.5, 3.0),
        means={
            "air": 0.0,
            "fat": 0.75,
            "tissue": 0.45,
            "lung": 0.06,
            "vessel": 0.85,
            "ring": 0.2,
            "blob": 0.88,
            "rv": 0.85,
        },
        texture=0.08,
        gamma=1.0,
        bias_strength=0.1,
        noise="gaussian",
        noise_sigma=0.025,
        blur_mm=0.3,
        description="bSSFP-like, floats ~0-1, mild bias, Gaussian noise, 1.5x1.5x3 mm",
    ),
    # Substantial shift: myocardium slightly brighter than surrounding tissue (partly reordered
    # contrast), weaker blood/myocardium contrast, strong bias, Rician noise, raw ints 0-2000, thicker
    # slices. Tuned so a small 3D UNet trained on A (z-scored) reaches Dice ~0.9 on A but ~0.3-0.6 on
    # B at A's spacing (lower on B's own grid); the ring brightness is the main knob (0.25 -> ~0.6-0.8).
    "B": SiteStyle(
        name="B",
        spacing=(1.25, 1.25, 4.0),
        means={
            "air": 0.0,
            "fat": 0.9,
            "tissue": 0.3,
            "lung": 0.04,
            "vessel": 0.72,
            "ring": 0.36,
            "blob": 0.78,
            "rv": 0.72,
        },
        texture=0.15,
        gamma=0.8,
        bias_strength=0.35,
        noise="rician",
        noise_sigma=0.05,
        blur_mm=0.6,
        scale=1400.0,
        clip=(0.0, 2000.0),
        integer=True,
        gain_jitter=0.15,
        description="partly reordered contrast (myocardium > tissue), ints 0-2000, strong bias, Rician noise, 1.25x1.25x4 mm",
    ),
    # Mild shift: A-like contrast, compressed by gamma, 8-bit range, moderate bias and noise.
    "C": SiteStyle(
        name="C",
        spacing=(1.6, 1.6, 3.2),
        means={
            "air": 0.0,
            "fat": 0.7,
            "tissue": 0.5,
            "lung": 0.08,
            "vessel": 0.8,
            "ring": 0.3,
            "blob": 0.82,
            "rv": 0.78,
        },
        texture=0.1,
        gamma=1.4,
        bias_strength=0.2,
        noise="gaussian",
        noise_sigma=0.035,
        blur_mm=0.5,
        scale=230.0,
        offset=10.0,
        clip=(0.0, 255.0),
        integer=True,
        gain_jitter=0.05,
        description="bSSFP-like with gamma 1.4, ints 0-255, moderate bias, 1.6x1.6x3.2 mm",
    ),
}
# Low-resolution shift: site A with a wide point spread (3 mm) and more noise, as from a fast low-resolution
# protocol. The features' statistics shift, the contrast order does not: the kind of shift BN-statistics and
# entropy-based adaptation can largely undo (the demo's "adaptable" site).
SITES["D"] = replace(SITES["A"], name="D", noise_sigma=0.08, blur_mm=3.0,
                     description="A's contrast and grid at low resolution: 3 mm point spread, 3x A's noise")


def phantom_class_names(with_rv: bool = True) -> tuple[str, ...]:
    """Canonical label names, index = label value: background, ring, blob[, rv]."""
    return CLASS_NAMES if with_rv else CLASS_NAMES[:3]


def grid_shape(spacing: Sequence[float], fov_mm: Sequence[float] = DEFAULT_FOV_MM) -> tuple[int, int, int]:
    """Voxel grid (X, Y, Z) covering ``fov_mm`` (mm) at ``spacing`` (mm): round(fov / spacing)."""
    return tuple(max(1, round(f / s)) for f, s in zip(fov_mm, spacing, strict=True))  # type: ignore[return-value]


def case_seed(seed: int, site: str, index: int, paired_anatomy: bool = False) -> int:
    """Anatomy seed of case ``index`` of ``site`` in a dataset: distinct patients per site unless paired."""
    key = [seed, index] if paired_anatomy else [seed, _site_key(site), index]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])


def _site_key(site: str) -> int:
    return zlib.crc32(site.encode())  # stable across runs, unlike hash()


def _style(site: str | SiteStyle) -> SiteStyle:
    if isinstance(site, SiteStyle):
        return site
    if site not in SITES:
        raise InputError(None, "site", f"unknown phantom site '{site}'; expected one of: {', '.join(SITES)}")
    return SITES[site]


# ----------------------------------------------------------------------------------------------------
# Anatomy (mm, world frame centred on the FOV; x, y in-plane, z along slices)


@dataclass(frozen=True)
class _Anatomy:
    body_c: tuple[float, float]
    body_ax: tuple[float, float]  # in-plane semi-axes of the body outline (mm)
    fat: float  # fat rim thickness (mm)
    lungs: tuple[tuple[float, ...], ...]  # (cx, cy, cz, ax, ay, az) each
    aorta: tuple[float, float, float]  # (cx, cy, radius), a tube along z
    lv_c: tuple[float, float, float]
    theta: float  # heart rotation about z (rad)
    lv_inner: tuple[float, float, float]  # cavity semi-axes (u, v, z) in the heart frame
    wall: tuple[float, float]  # ring thickness in-plane and along z (mm)
    rv_c: tuple[float, float, float]
    rv_axes: tuple[float, float, float]  # (u, v, z) semi-axes, rotated with the heart
    rv_wall: float


def _rot(theta: float, u: float, v: float) -> tuple[float, float]:
    c, s = np.cos(theta), np.sin(theta)
    return c * u - s * v, s * u + c * v


def _ellipse_points(cx, cy, ax, ay, theta, n=72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u, v = ax * np.cos(t), ay * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([cx + c * u - s * v, cy + s * u + c * v], axis=1)


def _sample_anatomy(rng: np.random.Generator, fov_mm: Sequence[float]) -> _Anatomy:
    """Draw one plausible anatomy; rejection keeps the heart inside the body and off the aorta."""
    hx, hy, hz = (f / 2 for f in fov_mm)
    # Heart sizes are absolute (mm) for FOVs of at least 80x80x64 mm (a larger FOV adds context); a
    # smaller FOV shrinks them proportionally so the heart still fits. The body follows the FOV.
    k = min(1.0, min(hx, hy) / 40.0)
    kz = min(1.0, hz / 32.0)
    for _ in range(500):
        body_c = tuple(rng.uniform(-2, 2, size=2) * k)
        body_ax = (hx * rng.uniform(0.82, 0.92), hy * rng.uniform(0.68, 0.80))
        fat = rng.uniform(2.0, 4.0) * k
        a = rng.uniform(7.0, 10.0) * k
        lv_inner = (a, a * rng.uniform(0.75, 1.0), rng.uniform(12.0, 17.0) * kz)
        t = rng.uniform(3.0, 5.5) * k
        wall = (t, t + rng.uniform(2.0, 4.0))  # thicker along z: a 4 mm slice must not skip the cap
        theta = np.deg2rad(rng.uniform(-35.0, 35.0))
        r1, r2 = rng.uniform(5.0, 8.0) * k, (lv_inner[1] + t) * rng.uniform(1.1, 1.5)
        rv_axes = (r1, r2, lv_inner[2] * rng.uniform(0.75, 0.95))
        # RV centre just inside the LV outer surface: subtracting the LV leaves a crescent that wraps.
        d = a + t + r1 * rng.uniform(-0.4, 0.1)
        # Put the LV+RV pair, not the LV alone, near the body centre.
        sx, sy = _rot(theta, 0.5 * d, 0.0)
        jit = rng.uniform(-4.0, 4.0, size=2) * k
        lv_c = (body_c[0] + sx + jit[0], body_c[1] + sy + jit[1], rng.uniform(-3.0, 3.0) * kz)
        ox, oy = _rot(theta, -d, 0.0)
        rv_c = (lv_c[0] + ox, lv_c[1] + oy, lv_c[2] + rng.uniform(-2.0, 2.0) * kz)
        rv_wall = rng.uniform(1.5, 2.5)
        # Descending-aorta-like tube beside the heart: bright like blood but background.
        r_ao = rng.uniform(4.0, 6.0) * k
        u0 = rng.uniform(-0.5, 0.5) * d
        v0 = -(lv_inner[1] + t + r_ao + rng.uniform(3.0, 7.0))
        px, py = _rot(theta, u0, v0)
        aorta = (lv_c[0] + px, lv_c[1] + py, r_ao)
        lungs = []
        for side in (-1.0, 1.0):
            lungs.append(
                (
                    body_c[0] + side * body_ax[0] * rng.uniform(0.5, 0.62),
                    body_c[1] + rng.uniform(-3.0, 3.0) * k,
                    rng.uniform(-4.0, 4.0),
                    body_ax[0] * rng.uniform(0.28, 0.36),
                    body_ax[1] * rng.uniform(0.5, 0.7),
                    hz * rng.uniform(1.0, 1.4),
                )
            )

        # Checks on the in-plane outlines (every structure is z-aligned, so the equator is the widest).
        heart = np.concatenate(
            [
                _ellipse_points(lv_c[0], lv_c[1], a + t, lv_inner[1] + t, theta),
                _ellipse_points(rv_c[0], rv_c[1], r1 + rv_wall, r2 + rv_wall, theta),
            ]
        )
        inner = np.array(body_ax) - fat - 1.0
        in_body = (((heart - body_c) / inner) ** 2).sum(1).max() <= 1.0
        ao_in_body = (((np.array(aorta[:2]) - body_c) / (inner - r_ao)) ** 2).sum() <= 1.0
        ao_clear = np.hypot(*(heart - aorta[:2]).T).min() >= r_ao + 2.0
        for centre, (eu, ev) in ((lv_c, (a + t, lv_inner[1] + t)), (rv_c, (r1 + rv_wall, r2 + rv_wall))):
            au, av = _rot(-theta, aorta[0] - centre[0], aorta[1] - centre[1])
            ao_clear = ao_clear and (au / eu) ** 2 + (av / ev) ** 2 > 1.0  # not inside the heart either
        z_ok = (
            abs(lv_c[2]) + lv_inner[2] + wall[1] <= hz - 2.0
            and abs(rv_c[2]) + rv_axes[2] + rv_wall <= hz - 2.0
        )
        if in_body and ao_in_body and ao_clear and z_ok:
            return _Anatomy(
                body_c, body_ax, fat, tuple(lungs), aorta, lv_c, theta, lv_inner, wall, rv_c, rv_axes, rv_wall
            )
    raise ValueError(f"could not place a phantom heart in a {tuple(fov_mm)} mm field of view; enlarge it")


def _tissue_map(an: _Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tissue index at world points given as 1D coordinate vectors (mm); later structures win."""
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    shape = (x.shape[0], y.shape[1], z.shape[2])

    def ell2(cx, cy, ax, ay):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2

    c, s = np.cos(an.theta), np.sin(an.theta)

    def heart_ell(center, axes, grow_uv=0.0, grow_z=0.0):
        # Ellipsoid in the heart frame (rotated about z by theta), semi-axes grown by a wall.
        dx, dy = x - center[0], y - center[1]
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (
            (u / (axes[0] + grow_uv)) ** 2
            + (v / (axes[1] + grow_uv)) ** 2
            + ((z - center[2]) / (axes[2] + grow_z)) ** 2
        ) <= 1.0

    t = np.zeros(shape, np.uint8)
    body = np.broadcast_to(ell2(*an.body_c, *an.body_ax) <= 1.0, shape)
    inner = np.broadcast_to(ell2(*an.body_c, *(np.array(an.body_ax) - an.fat)) <= 1.0, shape)
    t[body] = FAT
    t[inner] = TISSUE
    for cx, cy, cz, ax, ay, az in an.lungs:
        t[inner & ((ell2(cx, cy, ax, ay) + ((z - cz) / az) ** 2) <= 1.0)] = LUNG
    t[np.broadcast_to(ell2(an.aorta[0], an.aorta[1], an.aorta[2], an.aorta[2]) <= 1.0, shape)] = VESSEL
    lv_outer = heart_ell(an.lv_c, an.lv_inner, an.wall[0], an.wall[1])
    t[heart_ell(an.rv_c, an.rv_axes, an.rv_wall, an.rv_wall) & ~lv_outer] = TISSUE  # thin RV wall
    t[heart_ell(an.rv_c, an.rv_axes) & ~lv_outer] = RV
    t[lv_outer] = RING
    t[heart_ell(an.lv_c, an.lv_inner)] = BLOB
    return t


def _subsample_coords(n: int, spacing: float, origin: float) -> tuple[np.ndarray, int]:
    """Sub-sample centres (mm) of n voxels, voxel-major, with about _SUBVOXEL_MM pitch."""
    k = max(1, int(np.ceil(spacing / _SUBVOXEL_MM - 1e-6)))
    k += 1 - k % 2  # odd: no exact two-class ties in the majority vote
    offsets = ((np.arange(k) + 0.5) / k - 0.5) * spacing
    centres = origin + np.arange(n) * spacing
    return (centres[:, None] + offsets[None, :]).ravel().astype(np.float32), k


def _smooth_field(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (correlation length ~sigma_mm)."""
    f = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), [sigma_mm / s for s in spacing], mode="reflect"
    )
    return (f - f.mean()) / (f.std() + 1e-8)


def _bias_field(rng: np.random.Generator, x, y, z, hx, hy, hz, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * g), g a random quadratic with max |g| = 1."""
    u, v, w = x[:, None, None] / hx, y[None, :, None] / hy, z[None, None, :] / hz
    terms = [u, v, 0.5 * w, u * u, v * v, u * v, 0.5 * u * w, 0.5 * v * w]  # weaker along z
    g = sum(c * term for c, term in zip(rng.uniform(-1, 1, len(terms)), terms, strict=True))
    g = np.broadcast_to(g, (x.size, y.size, z.size))
    g = g - g.mean()
    return np.exp(strength * g / (np.abs(g).max() + 1e-8)).astype(np.float32)


def generate_case(
    site: str | SiteStyle,
    seed: int,
    *,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    spacing: Sequence[float] | None = None,
    with_rv: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: ``(image float32 (X,Y,Z), label uint8 (X,Y,Z), affine 4x4)``.

    ``seed`` fixes the anatomy (identical in mm at every site); the appearance (texture, bias, noise,
    intensity jitter) is seeded by ``(seed, site)``. ``fov_mm`` is the physical field of view (mm) and
    ``spacing`` (mm) overrides the site's voxel size; the shape is ``round(fov_mm / spacing)``. The
    affine is ``diag(spacing)`` with an origin that puts the FOV centre at world (0, 0, 0) mm, so all
    sites share one world frame.
    """
    style = _style(site)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(None, "seed", f"expected a non-negative integer, got {seed!r}")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else style.spacing))
    fov = tuple(float(f) for f in fov_mm)
    shape = grid_shape(spacing, fov)
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True))

    anatomy = _sample_anatomy(np.random.default_rng(seed), fov)
    rng = np.random.default_rng([int(seed), _site_key(style.name)])

    # Partial volume: tissue fractions per voxel from ~1 mm sub-samples.
    sub = [_subsample_coords(n, s, o) for n, s, o in zip(shape, spacing, origin, strict=True)]
    tmap = _tissue_map(anatomy, sub[0][0], sub[1][0], sub[2][0])
    # Count tissues per voxel in one bincount (much faster than one reduction per tissue).
    vox = [np.repeat(np.arange(n), k) for n, (_, k) in zip(shape, sub, strict=True)]
    vox_id = (vox[0][:, None, None] * shape[1] + vox[1][None, :, None]) * shape[2] + vox[2][None, None, :]
    n_t, n_sub = len(TISSUES), sub[0][1] * sub[1][1] * sub[2][1]
    counts = np.bincount((vox_id * n_t + tmap).ravel(), minlength=int(np.prod(shape)) * n_t)
    frac = (counts.reshape(*shape, n_t) / n_sub).astype(np.float32).transpose(3, 0, 1, 2)

    # Label: majority class among sub-samples (background = everything that is not heart).
    lab_frac = np.stack([frac[:RING].sum(0), frac[RING], frac[BLOB], frac[RV]])
    label = np.argmax(lab_frac, axis=0).astype(np.uint8)
    if not with_rv:
        label[label == 3] = 0

    # Image on the unit scale.
    means = np.array([style.means[name] for name in TISSUES], np.float32)
    means = means * (1.0 + rng.uniform(-style.mean_jitter, style.mean_jitter, means.size)).astype(np.float32)
    v = np.tensordot(means, frac, axes=1)
    textured = frac[FAT] + frac[TISSUE] + frac[LUNG] + 0.5 * frac[RING]  # blood pools stay homogeneous
    v *= 1.0 + style.texture * _smooth_field(rng, shape, spacing, _TEXTURE_MM) * textured
    if style.blur_mm > 0:
        v = ndimage.gaussian_filter(v, [style.blur_mm / s for s in spacing], mode="nearest")
    v = np.clip(v, 0.0, None) ** style.gamma
    centres = [o + np.arange(n, dtype=np.float32) * s for n, s, o in zip(shape, spacing, origin, strict=True)]
    v *= _bias_field(rng, *centres, *(f / 2 for f in fov), style.bias_strength)
    v *= 1.0 + rng.uniform(-style.gain_jitter, style.gain_jitter)

    # Scanner units and noise (noise is added after the bias, as in MR receive chains).
    v = style.offset + style.scale * v
    sigma = style.noise_sigma * style.scale
    if style.noise == "rician":
        v = np.sqrt((v + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    else:
        v = v + sigma * rng.standard_normal(shape)
    if style.clip is not None:
        v = np.clip(v, *style.clip)
    if style.integer:
        v = np.rint(v)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return v.astype(np.float32), label, affine


# ----------------------------------------------------------------------------------------------------
# Writer


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # Write then rename: a reader (or a concurrent writer) never sees half a file.
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _split_counts(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    total = sum(split)
    n_val = max(1, round(n * split[1] / total))
    n_test = max(1, round(n * split[2] / total))
    return n - n_val - n_test, n_val, n_test


def write_phantom_dataset(
    out_dir: Path | str,
    sites: Sequence[str] = ("A", "B"),
    cases_per_site: int = 8,
    seed: int = 0,
    *,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    with_rv: bool = True,
    paired_anatomy: bool = False,
    split: Sequence[float] = (0.6, 0.2, 0.2),
) -> Path:
    """Write phantom sites as NIfTI plus a decathlon-style datalist per site; returns ``out_dir``.

    Layout: ``out_dir/<site>/imagesTr/<site>_<NNN>.nii.gz`` (float32), ``labelsTr/`` (uint8, same
    names) and ``datalist.json`` with ``training``/``validation``/``test`` (first/middle/last cases
    in ``split`` proportions, at least one each; paths relative to the json). Each site gets its own
    patients unless ``paired_anatomy`` (case i has the same anatomy at every site). The parameters are
    stored in ``out_dir/phantom_params.json``; calling again with the same parameters (and all files
    present) writes nothing.
    """
    out_dir = Path(out_dir)
    sites = list(sites)
    for s in sites:
        _style(s)
    if cases_per_site < 3:
        raise InputError(
            None, "cases_per_site", f"expected at least 3 (train/val/test), got {cases_per_site}"
        )
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise InputError(None, "split", f"expected three non-negative fractions, got {tuple(split)}")
    n_train, n_val, n_test = _split_counts(cases_per_site, split)
    if n_train < 1:
        raise InputError(None, "cases_per_site", f"{cases_per_site} cases leave no training case")

    params = {
        "generator_version": GENERATOR_VERSION,
        "sites": sites,
        "cases_per_site": int(cases_per_site),
        "seed": int(seed),
        "fov_mm": [float(f) for f in fov_mm],
        "with_rv": bool(with_rv),
        "paired_anatomy": bool(paired_anatomy),
        "split": [float(f) for f in split],
        "styles": {s: asdict(SITES[s]) for s in sites},
    }
    params = json.loads(json.dumps(params))  # normalise tuples -> lists for the comparison
    params_path = out_dir / "phantom_params.json"
    expected = [out_dir / s / "datalist.json" for s in sites]
    for s in sites:
        names = [f"{s}_{i:03d}.nii.gz" for i in range(cases_per_site)]
        expected += [out_dir / s / sub / n for n in names for sub in ("imagesTr", "labelsTr")]
    if params_path.is_file() and all(p.is_file() for p in expected):
        try:
            if json.loads(params_path.read_text(encoding="utf-8")) == params:
                return out_dir
        except json.JSONDecodeError:
            pass
    params_path.unlink(missing_ok=True)  # mark incomplete until everything below is written

    labels = {str(i): n for i, n in enumerate(phantom_class_names(with_rv))}
    for s in sites:
        site_dir = out_dir / s
        for sub in ("imagesTr", "labelsTr"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
            for stale in (site_dir / sub).glob(f"{s}_*.nii.gz"):  # cases of an earlier, larger call
                m = re.fullmatch(rf"{re.escape(s)}_(\d+)\.nii\.gz", stale.name)
                if m and int(m.group(1)) >= cases_per_site:
                    stale.unlink()
        entries = []
        for i in range(cases_per_site):
            name = f"{s}_{i:03d}.nii.gz"
            image, label, affine = generate_case(
                s, case_seed(seed, s, i, paired_anatomy), fov_mm=fov_mm, with_rv=with_rv
            )
            _save_nifti(image, affine, site_dir / "imagesTr" / name)
            _save_nifti(label, affine, site_dir / "labelsTr" / name)
            entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        style = SITES[s]
        _write_json(
            {
                "name": f"medda_phantom_{s}",
                "description": f"Synthetic cardiac-like phantom, site {s}: {style.description}",
                "reference": "medda.data.phantoms (synthetic, generated)",
                "tensorImageSize": "3D",
                "modality": {"0": "MRI"},
                "spacing_mm": list(style.spacing),
                "labels": labels,
                "numTraining": n_train,
                "training": entries[:n_train],
                "validation": entries[n_train : n_train + n_val],
                "test": entries[n_train + n_val :],
            },
            site_dir / "datalist.json",
        )
    _write_json(params, params_path)
    return out_dir
