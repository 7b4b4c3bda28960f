"""The two data sets at full resolution (in memory, uint8), their fixed splits, and the training sets built on them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from crfrnn.data import CamVid, Compose, RandomCrop, RandomHorizontalFlip, SegmentationFolder, scale_pair

from .settings import IGNORE, Settings

HOLD_SEED = 2015  # the held-apart images do not depend on the seed


@dataclass
class Split:
    """Full-resolution pairs: images uint8 (3, H, W), masks uint8 (H, W) (255 = void); sizes may differ."""

    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    names: list[str]

    def subset(self, idx: list[int]) -> "Split":
        return Split([self.images[i] for i in idx], [self.masks[i] for i in idx], [self.names[i] for i in idx])

    def __len__(self) -> int:
        return len(self.names)


def _read(ds, limit: int | None) -> Split:
    n = len(ds) if limit is None else min(limit, len(ds))
    images, masks, names = [], [], []
    for i in range(n):
        image, mask, name = ds[i]
        images.append(image.round().clamp(0, 255).to(torch.uint8))
        masks.append(mask.to(torch.uint8))
        names.append(name)
    return Split(images, masks, names)


def class_names(s: Settings) -> list[str]:
    names = [n.strip() for n in (s.root / "class_names.txt").read_text(encoding="utf-8").splitlines() if n.strip()]
    return names[:11] if s.dataset == "camvid" else names  # CamVid's 12th name is the void label


def horse_split(root: Path) -> tuple[list[str], list[str]]:
    """The fixed horse split: ids sorted, every third one (positions 2, 5, 8, ...) is val, the rest train."""
    ids = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    return [i for k, i in enumerate(ids) if k % 3 != 2], [i for k, i in enumerate(ids) if k % 3 == 2]


HORSE_SPLIT_TEXT = ("the 218 pairs sorted by id, every third one (positions 2, 5, 8, ...) in val (72 images), the "
                    "other 146 in train")
CAMVID_SPLIT_TEXT = "the SegNet split: train 367, val 101 (360x480)"


def load(s: Settings) -> tuple[Split, Split, Split, str]:
    """(train, held_apart, val, description of the split): ``s.held_apart`` train images, drawn with a fixed
    seed, are held apart (for the CRF grid search) and not trained on."""
    if s.dataset == "camvid":
        train = _read(CamVid(s.root, "train", return_name=True), s.max_train)
        val = _read(CamVid(s.root, "val", return_name=True), s.max_val)
        text = CAMVID_SPLIT_TEXT
    else:
        tr_ids, va_ids = horse_split(s.root)
        make = lambda ids: SegmentationFolder(s.root / "images", s.root / "masks", num_classes=2,  # noqa: E731
                                              ids=ids, return_name=True)
        train, val = _read(make(tr_ids), s.max_train), _read(make(va_ids), s.max_val)
        text = HORSE_SPLIT_TEXT
    order = list(range(len(train)))
    hold = set(random.Random(HOLD_SEED).sample(order, min(s.held_apart, len(order) - 1)))
    return (train.subset([i for i in order if i not in hold]), train.subset(sorted(hold)), val,
            text + f"; {len(hold)} train images held apart (seed {HOLD_SEED}) for the CRF grid search, not trained on")


class ReducedPairs(Dataset):
    """The unary network's training set: pairs rescaled by ``scale`` (image antialiased, mask nearest), then
    ``transform`` (crop / flip)."""

    def __init__(self, split: Split, scale: float, transform=None):
        self.pairs = [scale_pair(im.float(), m.long(), scale, antialias=True) for im, m in zip(split.images,
                                                                                              split.masks)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image, mask = self.pairs[i]
        return self.transform(image, mask) if self.transform else (image, mask)


def fcn_train_set(s: Settings, split: Split) -> Dataset:
    ops = ([RandomCrop(s.fcn_crop, ignore_index=IGNORE)] if s.fcn_crop else []) + [RandomHorizontalFlip(0.5)]
    return ReducedPairs(split, s.unary_scale, Compose(ops))


class FullPairs(Dataset):
    """Full-resolution pairs (float image, int64 mask), randomly flipped; with ``logits`` (one (L, H, W) tensor
    per image) the image is returned as ``[RGB, logits]`` (3 + L channels), flipped together (the CRF-only arm)."""

    def __init__(self, split: Split, logits: list[torch.Tensor] | None = None):
        self.split, self.logits = split, logits
        self.flip = RandomHorizontalFlip(0.5)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.split.images[i].float()
        if self.logits is not None:
            image = torch.cat([image, self.logits[i].float()])
        return self.flip(image, self.split.masks[i].long())


__all__ = ["Split", "load", "class_names", "fcn_train_set", "FullPairs"]
