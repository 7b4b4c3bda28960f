"""CamVid at the working resolution (cached), the held-apart split and in-memory datasets."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from crfrnn.data import CamVid, Resize
from crfrnn.engine.runfiles import atomic_write

from .common import HOLD_SEED


class TensorPairs(Dataset):
    """In-memory (image float (3, H, W) 0..255, mask int64 (H, W)) pairs with an optional joint transform."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, names: list[str], transform=None):
        self.images, self.masks, self.names, self.transform = images, masks, names, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        image, mask = self.images[i].float(), self.masks[i].long()
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def load_split(root: Path, split: str, size: tuple[int, int], limit: int | None = None,
               cache_dir: Path | None = None):
    """CamVid ``split`` resized to ``size`` = (H, W): images uint8 (N, 3, H, W), masks uint8 (N, H, W) (void 255).

    ``root/split`` may also be any folder with ``images/`` and ``masks/`` (same layout). With ``cache_dir`` the
    resized arrays are kept in ``cache_dir/<split>_<H>x<W>_<N>.npz`` (keyed by the file names and sizes, so a
    changed folder is re-read) and loaded from there next time.
    """
    ds = CamVid(root, split, transform=Resize(size, antialias=True))
    n = len(ds) if limit is None else min(limit, len(ds))
    names = list(ds.names[:n])
    key = f"{Path(root).resolve()}|{split}|{size}|" + "|".join(
        f"{a.name}:{a.stat().st_size}:{b.stat().st_size}" for a, b in ds.pairs[:n])
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
        cache = Path(cache_dir) / f"{split}_{size[0]}x{size[1]}_{n}_{digest}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                if list(z["names"]) == names:
                    return torch.from_numpy(z["images"]), torch.from_numpy(z["masks"]), names
    images = torch.empty((n, 3, *size), dtype=torch.uint8)
    masks = torch.empty((n, *size), dtype=torch.uint8)
    for i in range(n):
        im, m = ds[i]
        images[i] = im.round().clamp(0, 255).to(torch.uint8)
        masks[i] = m.to(torch.uint8)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: np.savez(f, images=images.numpy(), masks=masks.numpy(), names=np.array(names)))
    return images, masks, names


def held_apart_split(names: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-apart indices): a fixed random ``fraction`` of ``names`` (sorted) is held apart."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    k = max(1, round(fraction * len(names)))
    hold = set(random.Random(HOLD_SEED).sample(order, k))
    return [i for i in order if i not in hold], [i for i in order if i in hold]
