"""Connected-component post-processing shared by BCP's pseudo-labels and inference (scipy, no skimage)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def largest_component(
    labels: torch.Tensor, spatial_dims: int, connectivity: int | None = None
) -> torch.Tensor:
    """Keep, per sample and per foreground class, only the largest connected component; the rest becomes 0.

    Args:
        labels: map of class ids >= 0 (B, *S) or (B, 1, *S) with len(S) == spatial_dims. In 2D each sample is
            a slice (per-slice components); in 3D components are 3D.
        connectivity: 1..spatial_dims as in skimage/scipy (1 = faces only); None = spatial_dims (full).
    Absent classes stay absent; ties between equally large components keep the first in scan order.
    """
    conn = spatial_dims if connectivity is None else connectivity
    if not 1 <= conn <= spatial_dims:
        raise ValueError(f"connectivity must lie in [1, {spatial_dims}], got {connectivity}")
    structure = ndimage.generate_binary_structure(spatial_dims, conn)
    arr = labels.detach().cpu().numpy()
    flat = arr.reshape((-1,) + arr.shape[-spatial_dims:])
    out = np.zeros_like(flat)
    for i, sample in enumerate(flat):
        # bincount, not np.unique: one counting pass instead of a hash of every voxel (labels are class ids >= 0)
        present = np.flatnonzero(np.bincount(sample.ravel())) if sample.size else np.empty(0, dtype=np.int64)
        for cls in present[present > 0]:
            comp, n = ndimage.label(sample == cls, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[i][comp == int(sizes.argmax())] = cls
    return torch.from_numpy(out.reshape(arr.shape)).to(labels.device)
