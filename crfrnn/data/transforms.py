"""Joint (image, mask) transforms and batching of images of different sizes.

An image is float ``(C, H, W)``, a mask int64 ``(H, W)``; every transform maps the pair together."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "resize_pair",
    "scale_pair",
    "pad_pair",
    "crop_pair",
    "hflip_pair",
    "Compose",
    "Resize",
    "RandomScale",
    "RandomCrop",
    "CenterCrop",
    "PadTo",
    "RandomHorizontalFlip",
    "pad_collate",
]

def _check_pair(image, mask, fn: str) -> None:
    for name, t in (("image", image), ("mask", mask)):
        if not torch.is_tensor(t):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if image.dim() != 3:
        raise ValueError(f"{fn}: image must have shape (C, H, W), got {tuple(image.shape)}")
    if mask.dim() != 2:
        raise ValueError(f"{fn}: mask must have shape (H, W), got {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"{fn}: image (C, H, W)={tuple(image.shape)} and mask (H, W)={tuple(mask.shape)} differ in size"
        )


def _size2(size, name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or (H, W), got {size!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in (h, w)):
        raise ValueError(f"{name} must hold positive ints, got {size!r}")
    return int(h), int(w)


def resize_pair(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], *, antialias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image (C, H, W) bilinearly and mask (H, W) by nearest neighbour to ``size`` (H', W').

    Both use half-pixel centres (``align_corners=False`` / ``nearest-exact``), so output pixel
    ``j`` samples source coordinate ``(j + 0.5) * H / H' - 0.5`` in both. Integer images are
    rounded back to their dtype.
    """
    _check_pair(image, mask, "resize_pair")
    out_h, out_w = _size2(size, "size")
    work = image if image.is_floating_point() else image.to(torch.float32)
    img = F.interpolate(work[None], size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=antialias)[0]
    if not image.is_floating_point():
        info = torch.iinfo(image.dtype)
        img = img.round().clamp(info.min, info.max).to(image.dtype)
    mdtype = torch.float64 if mask.device.type != "mps" else torch.float32
    m = F.interpolate(mask[None, None].to(mdtype), size=(out_h, out_w), mode="nearest-exact")[0, 0]
    return img, m.to(mask.dtype)


def scale_pair(
    image: torch.Tensor, mask: torch.Tensor, factor: float, *, antialias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale an image (C, H, W) / mask (H, W) pair by ``factor`` (new size ``round(H * factor)``)."""
    _check_pair(image, mask, "scale_pair")
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"scale_pair: factor must be a positive finite number, got {factor}")
    h, w = image.shape[1:]
    return resize_pair(image, mask, (max(1, round(h * factor)), max(1, round(w * factor))), antialias=antialias)


def _fill_values(fill, channels: int, fn: str) -> torch.Tensor:
    values = torch.as_tensor(fill, dtype=torch.float64).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    if values.numel() != channels:
        raise ValueError(f"{fn}: fill must be a number or {channels} per-channel values, got {fill!r}")
    return values


def _pad(image, mask, top, bottom, left, right, fill, ignore_index, fn):
    c, h, w = image.shape
    if top == bottom == left == right == 0:
        return image.clone(), mask.clone()
    values = _fill_values(fill, c, fn).to(device=image.device, dtype=image.dtype)
    out = values.view(c, 1, 1).expand(c, h + top + bottom, w + left + right).clone()
    out[:, top : top + h, left : left + w] = image
    mout = torch.full((h + top + bottom, w + left + right), ignore_index, dtype=mask.dtype, device=mask.device)
    mout[top : top + h, left : left + w] = mask
    return out, mout


def pad_pair(
    image: torch.Tensor, mask: torch.Tensor, size, *, fill=0.0, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad image (C, H, W) and mask (H, W) at the bottom/right to at least ``size`` (H', W').

    The image is filled with ``fill`` (number or per-channel values, in image units, e.g. 0..255),
    the mask with ``ignore_index``. Sides already large enough are left as they are.
    """
    _check_pair(image, mask, "pad_pair")
    th, tw = _size2(size, "size")
    h, w = image.shape[1:]
    return _pad(image, mask, 0, max(0, th - h), 0, max(0, tw - w), fill, ignore_index, "pad_pair")


def crop_pair(
    image: torch.Tensor, mask: torch.Tensor, top: int, left: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the window rows ``top:top+height``, cols ``left:left+width`` from image (C, H, W) and
    mask (H, W); the window must lie inside. Returns new tensors."""
    _check_pair(image, mask, "crop_pair")
    h, w = image.shape[1:]
    if top < 0 or left < 0 or height < 1 or width < 1 or top + height > h or left + width > w:
        raise ValueError(
            f"crop_pair: window (top={top}, left={left}, height={height}, width={width}) outside (H, W)=({h}, {w})"
        )
    return (
        image[:, top : top + height, left : left + width].clone(),
        mask[top : top + height, left : left + width].clone(),
    )


def hflip_pair(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror image (C, H, W) and mask (H, W) left-right. Returns new tensors."""
    _check_pair(image, mask, "hflip_pair")
    return image.flip(-1), mask.flip(-1)


# --------------------------------------------------------------------------------------------------
# joint transforms: callables
# --------------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    if high_inclusive <= 0:
        return 0
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


class Compose:
    """Apply joint transforms in order: ``Compose([RandomScale(0.5, 2), RandomCrop(500)])``."""

    def __init__(self, transforms: Iterable[Callable]):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose: {t!r} is not callable")

    def __call__(self, image, mask):
        for t in self.transforms:
            image, mask = t(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to ``size``: an int sets the shorter side (aspect kept), ``(H, W)`` sets both."""

    def __init__(self, size, *, antialias: bool = False):
        if isinstance(size, int) and not isinstance(size, bool):
            if size < 1:
                raise ValueError(f"Resize: size must be positive, got {size}")
            self.size = size
        else:
            self.size = _size2(size, "size")
        self.antialias = antialias

    def __call__(self, image, mask):
        _check_pair(image, mask, "Resize")
        if isinstance(self.size, int):
            h, w = image.shape[1:]
            if h <= w:
                target = (self.size, max(1, round(w * self.size / h)))
            else:
                target = (max(1, round(h * self.size / w)), self.size)
        else:
            target = self.size
        return resize_pair(image, mask, target, antialias=self.antialias)

    def __repr__(self) -> str:
        return f"Resize({self.size!r})"


class RandomScale:
    """Rescale by a factor drawn uniformly from ``[min_scale, max_scale]`` (bilinear image,
    nearest mask; see :func:`resize_pair`)."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0, *, antialias: bool = False,
                 generator: torch.Generator | None = None):  # fmt: skip
        if not (0 < min_scale <= max_scale) or not math.isfinite(max_scale):
            raise ValueError(f"RandomScale: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.antialias = antialias
        self.generator = generator

    def __call__(self, image, mask):
        factor = self.min_scale + (self.max_scale - self.min_scale) * _uniform(self.generator)
        return scale_pair(image, mask, factor, antialias=self.antialias)

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Random ``size`` (H, W) window; smaller inputs are first padded at the bottom/right
    (image with ``fill``, mask with ``ignore_index``)."""

    def __init__(self, size, *, ignore_index: int = 255, fill=0.0, generator: torch.Generator | None = None):
        self.size = _size2(size, "size")
        self.ignore_index = ignore_index
        self.fill = fill
        self.generator = generator

    def __call__(self, image, mask):
        _check_pair(image, mask, "RandomCrop")
        th, tw = self.size
        h, w = image.shape[1:]
        if h < th or w < tw:
            image, mask = _pad(
                image, mask, 0, max(0, th - h), 0, max(0, tw - w), self.fill, self.ignore_index, "RandomCrop"
            )
            h, w = image.shape[1:]
        top = _randint(h - th, self.generator)
        left = _randint(w - tw, self.generator)
        return crop_pair(image, mask, top, left, th, tw)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, ignore_index={self.ignore_index})"


class CenterCrop:
    """Central ``size`` (H, W) window; smaller inputs are padded evenly on both sides first
    (image with ``fill``, mask with ``ignore_index``), so the output is always ``size``."""

    def __init__(self, size, *, ignore_index: int = 255, fill=0.0):
        self.size = _size2(size, "size")
        self.ignore_index = ignore_index
        self.fill = fill

    def __call__(self, image, mask):
        _check_pair(image, mask, "CenterCrop")
        th, tw = self.size
        h, w = image.shape[1:]
        ph, pw = max(0, th - h), max(0, tw - w)
        if ph or pw:
            top, left = ph // 2, pw // 2
            image, mask = _pad(
                image, mask, top, ph - top, left, pw - left, self.fill, self.ignore_index, "CenterCrop"
            )
            h, w = image.shape[1:]
        return crop_pair(image, mask, (h - th) // 2, (w - tw) // 2, th, tw)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class PadTo:
    """Pad at the bottom/right to at least ``size`` (H, W) (see :func:`pad_pair`)."""

    def __init__(self, size, *, ignore_index: int = 255, fill=0.0):
        self.size = _size2(size, "size")
        self.ignore_index = ignore_index
        self.fill = fill

    def __call__(self, image, mask):
        return pad_pair(image, mask, self.size, fill=self.fill, ignore_index=self.ignore_index)

    def __repr__(self) -> str:
        return f"PadTo({self.size})"


class RandomHorizontalFlip:
    """Mirror image and mask left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, image, mask):
        _check_pair(image, mask, "RandomHorizontalFlip")
        if _uniform(self.generator) < self.p:
            return hflip_pair(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------


def pad_collate(batch: Sequence[tuple], ignore_index: int = 255, *, multiple_of: int = 1):
    """Collate items of different sizes by padding at the bottom/right.

    Use with ``DataLoader(..., collate_fn=pad_collate)`` or ``functools.partial(pad_collate,
    ignore_index=...)``.

    Args:
        batch: items ``(image (C, H_i, W_i), mask (H_i, W_i))`` or ``(image, mask, name)``.
        ignore_index: fill value of padded mask pixels.
        multiple_of: round the padded H, W up to a multiple of this.

    Returns:
        ``(images (B, C, H, W), masks (B, H, W), valid (B, 1, H, W) bool)`` with H, W the largest
        sizes in the batch; images are padded with 0, masks with ``ignore_index``, ``valid`` is True
        on each item's own pixels. Items with names add a fourth element, the list of names.
    """
    if len(batch) == 0:
        raise ValueError("pad_collate: batch is empty")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"pad_collate: multiple_of must be a positive int, got {multiple_of!r}")
    arity = len(batch[0])
    if arity not in (2, 3):
        raise ValueError(f"pad_collate: items must be (image, mask) or (image, mask, name), got {arity} elements")
    for k, item in enumerate(batch):
        if len(item) != arity:
            raise ValueError(f"pad_collate: item {k} has {len(item)} elements, item 0 has {arity}")
        _check_pair(item[0], item[1], f"pad_collate (item {k})")
    img0, mask0 = batch[0][0], batch[0][1]
    for k, item in enumerate(batch):
        if item[0].shape[0] != img0.shape[0] or item[0].dtype != img0.dtype or item[0].device != img0.device:
            raise ValueError(
                f"pad_collate: item {k} image has channels/dtype/device {item[0].shape[0]}/{item[0].dtype}/"
                f"{item[0].device}, item 0 has {img0.shape[0]}/{img0.dtype}/{img0.device}"
            )
        if item[1].dtype != mask0.dtype or item[1].device != mask0.device:
            raise ValueError(
                f"pad_collate: item {k} mask has dtype/device {item[1].dtype}/{item[1].device}, "
                f"item 0 has {mask0.dtype}/{mask0.device}"
            )
    H = max(int(it[0].shape[1]) for it in batch)
    W = max(int(it[0].shape[2]) for it in batch)
    H = -(-H // multiple_of) * multiple_of
    W = -(-W // multiple_of) * multiple_of
    B, C = len(batch), img0.shape[0]
    images = torch.zeros((B, C, H, W), dtype=img0.dtype, device=img0.device)
    masks = torch.full((B, H, W), ignore_index, dtype=mask0.dtype, device=mask0.device)
    valid = torch.zeros((B, 1, H, W), dtype=torch.bool, device=img0.device)
    for b, item in enumerate(batch):
        h, w = item[0].shape[1:]
        images[b, :, :h, :w] = item[0]
        masks[b, :h, :w] = item[1]
        valid[b, :, :h, :w] = True
    if arity == 3:
        return images, masks, valid, [item[2] for item in batch]
    return images, masks, valid
