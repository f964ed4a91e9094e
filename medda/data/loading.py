"""Cases -> MONAI datasets and batch streams: the one place that turns a data card and a data config into batches.

`Data.stream` draws endless random training batches (labelled or unlabelled chains); `Data.full_pass` gives every
target slice (2D) or every grid patch (3D) exactly once, in a fixed order, for statistic estimators (AdaBN).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import SpatialPad

from medda import distributed
from medda.config import DataConfig, DatasetRef
from medda.data.cards import DataCard, load_card
from medda.data.datalist import read_cases
from medda.data.transforms import inference_chain, labeled_train_chain, unlabeled_train_chain
from medda.errors import MeddaError


@dataclass
class Data:
    card: DataCard
    card_path: str
    config: DataConfig

    @classmethod
    def load(cls, config: DataConfig) -> Data:
        return cls(load_card(config.card), str(config.card), config)

    def cases(self, ref: DatasetRef | None, role: str) -> list[dict]:
        if ref is None:
            raise MeddaError(f"config: field 'data.{role}' is required for this command")
        return read_cases(ref, self.card, self.card_path)

    def check(self, cases: list[dict], labeled: bool) -> None:
        """Read every case through the deterministic preprocessing (loading, the checks of `CheckCase`,
        normalisation) before any work starts, so that a bad volume is refused in one line before a run, a folder or
        an hour of training exists. For datasets without `cache`, which read their cases only when used; cached ones
        do this when they are built."""
        from tqdm.auto import tqdm

        chain = inference_chain(self.card, self.config, labeled, self.card_path)
        for case in tqdm(cases if labeled else unlabeled(cases), desc="checking inputs", leave=False,
                         dynamic_ncols=True, disable=len(cases) < 10):
            chain(case)

    def dataset(self, cases: list[dict], chain) -> Dataset:
        if self.config.cache:
            return CacheDataset(cases, chain, cache_rate=1.0, num_workers=0, progress=False)
        return Dataset(cases, chain)

    def stream(self, cases: list[dict], labeled: bool, batch_size: int, seed: int) -> tuple[Iterator[dict], int]:
        """An endless iterator of training batches and the number of batches in one pass."""
        if labeled:
            chain = labeled_train_chain(self.card, self.config, self.card_path)
        else:
            cases = unlabeled(cases)
            chain = unlabeled_train_chain(self.card, self.config, self.card_path)
        dataset = self.dataset(cases, chain)
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(batch_size, len(dataset))
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
            num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0,
        )

        def endless() -> Iterator[dict]:
            while True:
                yield from loader

        return endless(), len(loader)

    def full_pass(self, cases: list[dict], batch_images: int) -> tuple[Iterator[dict], int]:
        """Every slice (2D) or grid patch (3D) of every case once, in case order, as {"image": (B, 1, *patch)}.

        Images are cut to the training geometry (`tiles`). Batches hold `batch_images` images and never mix cases;
        the last batch of a case may be smaller (nothing is dropped). Under torchrun process r takes batches r, r + N,
        ... of the pass (N processes), so that each training step sees N batches of the pass together; a process
        left without one at the end takes an empty batch, which adds nothing to synchronised batch statistics.
        """
        chain = inference_chain(self.card, self.config, False, self.card_path)
        batches: list[dict] = []
        for case in unlabeled(cases):
            images = tiles(chain(case)["image"].as_tensor(), self.config)
            for start in range(0, images.shape[0], batch_images):
                batches.append({"image": images[start : start + batch_images].float()})
        if not batches:
            raise MeddaError("config: the target cases hold no image to adapt on")
        world = distributed.world_size()
        if world > 1:
            empty = {"image": batches[0]["image"][:0]}
            batches += [empty] * (-len(batches) % world)
            batches = batches[distributed.rank()::world]

        def once_then_repeat() -> Iterator[dict]:
            while True:
                yield from batches

        return once_then_repeat(), len(batches)


def tiles(volume: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """A preprocessed (C, X, Y, Z) volume cut into the training geometry: (N, C, *patch_size).

    2D: every slice along `slice_axis`; 3D: the volume. Each is zero-padded (centred) to at least the patch size, as
    training and inference pad, then covered by the fewest patch-sized windows, spread evenly and overlapping where
    the size is not a multiple of the patch (the windows of sliding-window inference), so no window adds padding.
    The same tiling measures class priors (`medda.data.priors`), the label-free monitor's predicted ratios and
    AdaBN's complete pass, so all are measured the same way.
    """
    volume = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    patch = list(data.patch_size)
    # 2D: the slices (S, C, h, w); 3D: the volume as one image
    images = torch.movedim(volume, data.slice_axis + 1, 0) if data.mode == "2d" else volume[None]
    pad = SpatialPad(patch)
    padded = [pad(image) for image in images]
    images = torch.stack([p.as_tensor() if isinstance(p, MetaTensor) else p for p in padded])
    starts = [_window_starts(size, p) for size, p in zip(images.shape[2:], patch, strict=True)]
    windows = [images[(slice(None), slice(None), *(slice(a, a + p) for a, p in zip(corner, patch, strict=True)))]
               for corner in itertools.product(*starts)]
    return torch.cat(windows).contiguous() if len(windows) > 1 else windows[0].contiguous()


def _window_starts(size: int, patch: int) -> list[int]:
    """Start offsets of the fewest `patch`-long windows covering `size` (>= patch), evenly spread."""
    count = math.ceil(size / patch)
    return sorted({round(i * (size - patch) / max(count - 1, 1)) for i in range(count)})


def unlabeled(cases: list[dict]) -> list[dict]:
    """The cases without their label paths: an unlabelled stream can never read a label."""
    return [{"id": c["id"], "image": c["image"]} for c in cases]
