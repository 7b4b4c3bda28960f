"""What the training and evaluation loaders are built from: samplers, dataset wrappers and the collate function.

Training order and augmentations are reproducible and resumable: :class:`ResumableSampler` orders an epoch
by (seed, epoch) only, can start part-way into it, and hands every index a *sample seed* (a function of
seed, epoch and index) with which :class:`SeededDataset` seeds the global RNGs while that sample loads.
So random augmentations depend neither on workers, nor on ranks, nor on resumption.
"""

import random
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["Batch", "ResumableSampler", "SeededDataset", "PlainDataset", "ShardSampler", "collate"]


class Batch(NamedTuple):
    """A collated batch: ``images (B, C, H, W)``, ``masks (B, H, W)`` int64 and ``valid (B, 1, H, W)`` bool,
    True on each image's own pixels; ``valid`` is ``None`` when the images had one size (no padding)."""

    images: Tensor
    masks: Tensor
    valid: Tensor | None


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0xC4F]).generate_state(1, np.uint32)[0])


class ResumableSampler(DistributedSampler):
    """DistributedSampler (order a function of seed and epoch) that can start part-way into an epoch.

    Yields ``(dataset index, sample seed)``; the sample seed is a function of
    (seed, epoch, index) and seeds the RNGs while that sample is loaded (see :class:`SeededDataset`).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the epoch."""
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for i, idx in enumerate(super().__iter__()):
            if i >= self.start:
                yield int(idx), _sample_seed(self.seed, self.epoch, int(idx))

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` for keys ``(index, seed)`` with torch / numpy / python RNGs seeded by ``seed``
    (the caller's RNG states are restored afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = key
        py, npst = random.getstate(), np.random.get_state()
        cpu = torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            item = self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npst)
            torch.set_rng_state(cpu)
        return as_pair(item, index)


class PlainDataset(Dataset):
    """``dataset[index]`` checked and converted by :func:`as_pair`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return as_pair(self.dataset[index], index)


def as_pair(item: Any, index: int) -> tuple[Tensor, Tensor]:
    """A dataset item as ``(image (C, H, W) floating, mask (H, W) int64)``; TypeError / ValueError naming the
    item otherwise."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"dataset item {index} must be an (image, mask) pair, got {type(item).__name__}")
    image = torch.as_tensor(item[0])
    mask = torch.as_tensor(item[1])
    if image.ndim != 3 or mask.ndim != 2 or tuple(image.shape[-2:]) != tuple(mask.shape):
        raise ValueError(
            f"dataset item {index}: need image (C, H, W) and mask (H, W) of the same H, W, "
            f"got image {tuple(image.shape)} and mask {tuple(mask.shape)}"
        )
    if mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise TypeError(f"dataset item {index}: mask must hold integer labels, got dtype {mask.dtype}")
    if not image.dtype.is_floating_point:
        image = image.to(torch.float32)
    return image, mask.to(torch.int64)


def collate(batch: list[tuple[Tensor, Tensor]], ignore_index: int) -> Batch:
    """Stack ``(image, mask)`` pairs; pairs of different sizes are padded at the bottom / right
    (:func:`crfrnn.data.pad_collate`: images with 0, masks with ``ignore_index``) and ``valid`` marks
    each image's own pixels."""
    images = [b[0] for b in batch]
    masks = [b[1] for b in batch]
    if all(im.shape == images[0].shape for im in images):
        return Batch(torch.stack(images), torch.stack(masks), None)
    from crfrnn.data import pad_collate  # the engine needs crfrnn.data only for padded batches

    padded = pad_collate(list(zip(images, masks)), ignore_index=ignore_index)
    return Batch(padded[0], padded[1], padded[2])


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample exactly once over all ranks (evaluation)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
