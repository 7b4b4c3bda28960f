"""The data sets of ``crfrnn train`` and ``crfrnn eval`` (``--dataset``, ``--root``, splits, limits)."""
from __future__ import annotations

from pathlib import Path

from ._common import UsageError, class_names_for, read_names_file

DATASETS = ("voc", "camvid", "folder")
#: A folder data set's class names, one a line.
NAMES_FILE = "class_names.txt"


def short_names(names) -> str:
    names = list(names)
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _names_file(root: Path) -> Path | None:
    """``class_names.txt`` of a folder data set: in ``root``, else in its parent (splits sharing one list)."""
    for folder in (root, root.parent):
        if (folder / NAMES_FILE).is_file():
            return folder / NAMES_FILE
    return None


def _folder_dataset(root: Path, num_classes: int | None, transform, ignore_index: int, classes_from: str):
    from crfrnn.data import SegmentationFolder

    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise UsageError(f"folder data set {root} must hold images/ and masks/")
    names_file = _names_file(root)
    names = read_names_file(names_file) if names_file is not None else None
    if names and len(names) == ignore_index + 1 and (num_classes is None or num_classes == ignore_index):
        names = names[:ignore_index]  # the last name is the void label's (CamVid's "Unlabelled" at 11)
    if names and num_classes is not None and len(names) != num_classes:
        raise UsageError(f"{classes_from} has {num_classes} classes but {names_file} lists "
                         f"{len(names)} ({short_names(names)}); they must agree")
    L = num_classes or (len(names) if names else None)
    if L is None:
        raise UsageError(f"--num-classes is needed for {root} (no class_names.txt)")
    return SegmentationFolder(root / "images", root / "masks", num_classes=L, ignore_index=ignore_index,
                              transform=transform, classes=class_names_for(L, names))


def dataset(kind: str, root, split: str | None, num_classes: int | None, transform=None, ignore_index: int = 255,
            classes_from: str = "--num-classes"):
    """(dataset, num_classes, class_names) of ``--dataset kind --root root``, split ``split``. ``num_classes`` (if
    given) must agree with the data set's classes (a folder's ``class_names.txt``); ``classes_from`` names where it
    came from in the error."""
    from crfrnn.data import CamVid, VOCSegmentation

    if kind not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {kind!r}")
    if root is None:
        raise UsageError("--root is required (the data set's folder)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    if kind == "voc":
        ds = VOCSegmentation(root, split=split, transform=transform)
    elif kind == "camvid":
        ds = CamVid(root, split=split or "train", transform=transform)
    else:
        sub = root / split if split and (root / split / "images").is_dir() else root
        ds = _folder_dataset(sub, num_classes, transform, ignore_index, classes_from)
    if num_classes is not None and num_classes != ds.num_classes:
        raise UsageError(f"{classes_from} has {num_classes} classes but the {kind} data set at {root} has "
                         f"{ds.num_classes}")
    return ds, ds.num_classes, list(ds.classes) if ds.classes else class_names_for(ds.num_classes)


def limit(ds, n: int | None):
    """The first ``n`` items of ``ds`` (all when ``n`` is None)."""
    from torch.utils.data import Subset

    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))
