"""Tests for crfrnn.data: readers on real data and on small trees, joint transforms, batching, errors."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn.data import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    VOC_CLASSES,
    CamVid,
    CenterCrop,
    Compose,
    PadTo,
    PascalContext,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    SegmentationFolder,
    SegmentationPairs,
    VOCSegmentation,
    crop_pair,
    pad_collate,
    pad_pair,
    read_ids,
    read_mask,
    reduced_val_ids,
    scale_pair,
    voc_palette,
)

from conftest import DATA

VOC_SAMPLE = DATA / "voc2012-sample"
CAMVID_ROOT = DATA / "camvid"

needs_voc = pytest.mark.skipif(not (VOC_SAMPLE / "images").is_dir(), reason="shared VOC sample not present")
needs_camvid = pytest.mark.skipif(not (CAMVID_ROOT / "train" / "images").is_dir(), reason="shared CamVid not present")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _rng_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_mask(path: Path, labels: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")  # L -> P keeps the index values (greyscale palette)
        im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def _reference_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.float32)


def _reference_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int64)


def _coord_pair(h, w):
    """Image whose channels hold the row and column of each pixel; mask = row * 1000 + col."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    image = torch.stack([rows, cols, torch.full((h, w), 7.0)])
    mask = (rows * 1000 + cols).to(torch.int64)
    return image, mask


def _assert_aligned(image, mask, ignore=255):
    """Where the mask is not padding, the image's coordinates must match the mask's."""
    real = mask != ignore
    expected = (image[0] * 1000 + image[1]).round().to(torch.int64)
    assert torch.equal(mask[real], expected[real])
    return real


def _assert_names_file(excinfo, path: Path):
    assert str(path) in str(excinfo.value), f"message does not name {path}: {excinfo.value}"


# --------------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------------


@needs_voc
def test_voc_palette_and_classes_match_the_files():
    mask_path = sorted((VOC_SAMPLE / "masks").glob("*.png"))[0]
    with Image.open(mask_path) as im:
        assert im.mode == "P"
        stored = np.array(im.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal[: len(stored)], stored)
    names = (VOC_SAMPLE / "class_names.txt").read_text().split()
    assert tuple(names) == VOC_CLASSES


@needs_camvid
def test_camvid_constants_match_the_files():
    names = (CAMVID_ROOT / "class_names.txt").read_text().split()
    assert tuple(names[:11]) == CAMVID_CLASSES and names[11] == "Unlabelled"
    assert CAMVID_PALETTE.shape == (12, 3) and CAMVID_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in CAMVID_PALETTE.tolist()}) == 12
    assert CAMVID_PALETTE[11].tolist() == [0, 0, 0]


def test_context_classes():
    assert len(PASCAL_CONTEXT_CLASSES) == 60 == len(set(PASCAL_CONTEXT_CLASSES))
    assert PASCAL_CONTEXT_CLASSES[0] == "background"


# --------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------


@needs_voc
def test_voc_sample_reader_matches_pillow_and_csv():
    with open(VOC_SAMPLE / "ids.csv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    ds = VOCSegmentation(VOC_SAMPLE, split=None, return_name=True)
    assert ds.layout == "folder" and ds.num_classes == 21
    assert sorted(ds.names) == sorted(rows)
    assert len(ds) == len(list((VOC_SAMPLE / "images").glob("*.jpg")))
    for split in ("train", "val"):
        sub = VOCSegmentation(VOC_SAMPLE, split)
        assert sorted(sub.names) == sorted(k for k, r in rows.items() if r["voc2012_official_split"] == split)
    for i in range(0, len(ds), 41):
        image, mask, name = ds[i]
        ipath, mpath = ds.pairs[i]
        assert image.dtype == torch.float32 and mask.dtype == torch.int64
        assert tuple(image.shape) == (3, int(rows[name]["height"]), int(rows[name]["width"]))
        np.testing.assert_array_equal(image.numpy(), _reference_image(ipath))
        np.testing.assert_array_equal(mask.numpy(), _reference_mask(mpath))
        values = set(mask.unique().tolist())
        assert values <= set(range(21)) | {255} and 255 in values
    ds.verify()  # every pair: header sizes agree


@needs_voc
def test_voc_sample_all_labels_in_range():
    ds = VOCSegmentation(VOC_SAMPLE, split=None)
    seen = set()
    for _, mpath in ds.pairs:  # masks only: decoding all 200 JPEGs would be slow on a shared CPU
        mask = read_mask(mpath)
        ds._check_labels(mask, mpath)
        seen |= set(mask.unique().tolist())
    assert seen == set(range(21)) | {255}


@needs_camvid
def test_camvid_shared_layout_counts_and_void():
    with open(CAMVID_ROOT / "ids.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = CamVid(CAMVID_ROOT, "train")
    val = CamVid(CAMVID_ROOT, "val", return_name=True)
    assert (len(train), len(val)) == (367, 101)
    assert train.layout == "folder" and train.num_classes == 11
    assert sorted(p[0].name for p in train.pairs) == sorted(r["name"] for r in rows if r["split"] == "train")
    voids = 0
    for ds, idx in ((train, [0, 180, 366]), (val, [0, 100])):
        for i in idx:
            item = ds[i]
            image, mask = item[0], item[1]
            raw = _reference_mask(ds.pairs[i][1])
            assert tuple(image.shape) == (3, 360, 480) and tuple(mask.shape) == (360, 480)
            np.testing.assert_array_equal(mask.numpy(), np.where(raw == 11, 255, raw))
            assert set(mask.unique().tolist()) <= set(range(11)) | {255}
            voids += int((raw == 11).sum())
    assert voids > 0


# --------------------------------------------------------------------------------------------------
# readers on small trees
# --------------------------------------------------------------------------------------------------


def _voc_tree(root: Path, ids, sizes, mask_dir="SegmentationClass", seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    for k, (name, (h, w)) in enumerate(zip(ids, sizes)):
        _write_image(root / "JPEGImages" / f"{name}.jpg", _rng_image(h, w, seed + k))
        m = rng.integers(0, 21, size=(h, w))
        m[0, :] = 255
        _write_mask(root / mask_dir / f"{name}.png", m, "P")
        masks[name] = m
    return masks


def test_voc_devkit_layout(tmp_path):
    ids = ["2007_000001", "2007_000002", "2008_000003"]
    masks = _voc_tree(tmp_path, ids, [(9, 12), (10, 7), (6, 6)])
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2008_000003\n2007_000001\n")
    (sets / "val.txt").write_text("2007_000002\n")
    ds = VOCSegmentation(tmp_path, "train")
    assert ds.layout == "devkit" and ds.names == ["2008_000003", "2007_000001"]
    for i, name in enumerate(ds.names):
        image, mask = ds[i]
        np.testing.assert_array_equal(mask.numpy(), masks[name])
        np.testing.assert_array_equal(image.numpy(), _reference_image(tmp_path / "JPEGImages" / f"{name}.jpg"))
    assert VOCSegmentation(tmp_path, "val").names == ["2007_000002"]
    assert sorted(VOCSegmentation(tmp_path, None).names) == sorted(ids)


def test_voc_sbd_aug_png_layout(tmp_path):
    ids = ["2008_000010", "2009_000020"]
    masks = _voc_tree(tmp_path, ids, [(8, 8), (5, 9)], mask_dir="SegmentationClassAug")
    # DeepLab-style list: "image mask" paths per line
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids]
    (tmp_path / "train_aug.txt").write_text("".join(lines))
    ds = VOCSegmentation(tmp_path, "train_aug", masks="SegmentationClassAug")
    assert ds.names == ids
    np.testing.assert_array_equal(ds[1][1].numpy(), masks[ids[1]])
    with pytest.raises(ValueError, match="SegmentationClassAug") as ei:
        VOCSegmentation(tmp_path, "train_aug")  # default masks folder lacks them
    _assert_names_file(ei, tmp_path / "SegmentationClass")


def test_voc_sbd_mat_layout(tmp_path):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(3)
    segs = {}
    for k, name in enumerate(["2008_000100", "2008_000200"]):
        h, w = 7 + k, 11 - k
        _write_image(tmp_path / "img" / f"{name}.jpg", _rng_image(h, w, k))
        seg = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
        (tmp_path / "cls").mkdir(exist_ok=True)
        gt = {"Segmentation": seg, "CategoriesPresent": np.unique(seg)}
        sio.savemat(tmp_path / "cls" / f"{name}.mat", {"GTcls": gt})
        segs[name] = seg
    (tmp_path / "train.txt").write_text("2008_000200\n2008_000100\n")
    ds = VOCSegmentation(tmp_path, "train")
    assert ds.layout == "sbd" and ds.names == ["2008_000200", "2008_000100"]
    for i, name in enumerate(ds.names):
        np.testing.assert_array_equal(ds[i][1].numpy(), segs[name])


def test_voc_sbd_mat_without_scipy_names_file(tmp_path, monkeypatch):
    _write_image(tmp_path / "img" / "a.jpg", _rng_image(4, 4))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.mat").write_bytes(b"MATLAB 5.0 MAT-file placeholder")
    (tmp_path / "train.txt").write_text("a\n")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="scipy") as ei:
        VOCSegmentation(tmp_path, "train")
    _assert_names_file(ei, tmp_path / "cls" / "a.mat")


def _context_tree(root: Path, values_per_id):
    sets = root / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    for k, (name, m) in enumerate(values_per_id.items()):
        _write_image(root / "JPEGImages" / f"{name}.jpg", _rng_image(*m.shape, k))
        _write_mask(root / "SegmentationClassContext" / f"{name}.png", m, "L")
    (sets / "val.txt").write_text("\n".join(values_per_id) + "\n")


def test_pascal_context_reader(tmp_path):
    m1 = np.arange(60).reshape(6, 10)
    m2 = np.full((5, 5), 255)
    m2[1:3] = 0
    _context_tree(tmp_path, {"2008_000001": m1, "2008_000002": m2})
    ds = PascalContext(tmp_path, "val")
    assert ds.num_classes == 60 and len(ds.classes) == 60
    np.testing.assert_array_equal(ds[0][1].numpy(), m1)
    np.testing.assert_array_equal(ds[1][1].numpy(), m2)
    ds59 = PascalContext(tmp_path, "val", ignore_background=True)
    assert ds59.num_classes == 59 and ds59.classes == PASCAL_CONTEXT_CLASSES[1:]
    expected = np.where(m1 == 0, 255, m1 - 1)
    np.testing.assert_array_equal(ds59[0][1].numpy(), expected)
    np.testing.assert_array_equal(ds59[1][1].numpy(), np.where(m2 == 0, 255, m2))


def test_pascal_context_label_out_of_range_names_file(tmp_path):
    bad = np.zeros((4, 4))
    bad[2, 2] = 60
    _context_tree(tmp_path, {"x": bad})
    for ds in (PascalContext(tmp_path, "val"), PascalContext(tmp_path, "val", ignore_background=True)):
        with pytest.raises(ValueError, match="60") as ei:
            ds[0]
        _assert_names_file(ei, tmp_path / "SegmentationClassContext" / "x.png")


def _segnet_tree(root: Path, split: str, n: int, shape=(6, 8), seed=0):
    rng = np.random.default_rng(seed)
    raws = {}
    for k in range(n):
        name = f"0001TP_{k:06d}.png"
        _write_image(root / split / name, _rng_image(*shape, seed + k))
        raw = rng.integers(0, 12, size=shape)
        _write_mask(root / f"{split}annot" / name, raw, "L")
        raws[name] = raw
    return raws


def test_camvid_segnet_layout(tmp_path):
    raws = _segnet_tree(tmp_path, "train", 3)
    _segnet_tree(tmp_path, "test", 2, seed=5)
    ds = CamVid(tmp_path, "train", return_name=True)
    assert ds.layout == "segnet" and len(ds) == 3 and len(CamVid(tmp_path, "test")) == 2
    for i in range(3):
        image, mask, name = ds[i]
        raw = raws[ds.pairs[i][1].name]
        np.testing.assert_array_equal(mask.numpy(), np.where(raw == 11, 255, raw))
        np.testing.assert_array_equal(image.numpy(), _reference_image(ds.pairs[i][0]))
    with pytest.raises(ValueError) as ei:
        CamVid(tmp_path, "val")
    _assert_names_file(ei, tmp_path / "val")


def test_camvid_label_12_names_file(tmp_path):
    _segnet_tree(tmp_path, "train", 1)
    mpath = tmp_path / "trainannot" / "0001TP_000000.png"
    raw = np.zeros((6, 8))
    raw[0, 0] = 12
    _write_mask(mpath, raw, "L")
    with pytest.raises(ValueError, match="12") as ei:
        CamVid(tmp_path, "train")[0]
    _assert_names_file(ei, mpath)


def test_segmentation_folder_label_maps_and_extensions(tmp_path):
    imgs, msks = tmp_path / "im", tmp_path / "gt"
    raw = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [9, 9, 0, 1]])
    for name, ext in (("a", ".bmp"), ("b", ".tif"), ("c", ".png")):
        _write_image(imgs / f"{name}{ext}", _rng_image(3, 4))
        _write_mask(msks / f"{name}.png", raw, "L")
    ds = SegmentationFolder(imgs, msks, num_classes=3, label_map={9: 255, 3: 0}, return_name=True)
    assert ds.names == ["a", "b", "c"]
    lut_expect = np.vectorize({0: 0, 1: 1, 2: 2, 3: 0, 9: 255}.get)(raw)
    for i in range(3):
        np.testing.assert_array_equal(ds[i][1].numpy(), lut_expect)
        np.testing.assert_array_equal(ds[i][0].numpy(), _reference_image(ds.pairs[i][0]))
    arr = np.full(10, 255)
    arr[[0, 1, 2, 3]] = [2, 1, 0, 255]
    ds2 = SegmentationFolder(imgs, msks, num_classes=3, label_map=arr, ids=["c"])
    np.testing.assert_array_equal(ds2[0][1].numpy(), arr[raw])
    short = SegmentationFolder(imgs, msks, num_classes=3, label_map=np.arange(5), ids=["a"])
    with pytest.raises(ValueError, match="label_map") as ei:
        short[0]
    _assert_names_file(ei, msks / "a.png")


# --------------------------------------------------------------------------------------------------
# errors name the file
# --------------------------------------------------------------------------------------------------


def _folder(tmp_path, n=2, shape=(5, 6)):
    imgs, msks = tmp_path / "images", tmp_path / "masks"
    for k in range(n):
        _write_image(imgs / f"p{k}.jpg", _rng_image(*shape, k))
        _write_mask(msks / f"p{k}.png", np.zeros(shape), "P")
    return imgs, msks


def test_corrupt_image_names_file(tmp_path):
    imgs, msks = _folder(tmp_path)
    (imgs / "p0.jpg").write_bytes(b"this is not a jpeg")
    full = (imgs / "p1.jpg").read_bytes()
    (imgs / "p1.jpg").write_bytes(full[: len(full) // 2])  # truncated
    ds = SegmentationFolder(imgs, msks, num_classes=2)
    for i in range(2):
        with pytest.raises(ValueError) as ei:
            ds[i]
        _assert_names_file(ei, imgs / f"p{i}.jpg")


def test_corrupt_or_colour_mask_names_file(tmp_path):
    imgs, msks = _folder(tmp_path)
    (msks / "p0.png").write_bytes(b"\x89PNG garbage")
    Image.fromarray(_rng_image(5, 6)).save(msks / "p1.png")  # RGB colour mask
    ds = SegmentationFolder(imgs, msks, num_classes=2)
    with pytest.raises(ValueError) as ei:
        ds[0]
    _assert_names_file(ei, msks / "p0.png")
    with pytest.raises(ValueError, match="RGB") as ei:
        ds[1]
    _assert_names_file(ei, msks / "p1.png")


def test_mask_size_mismatch_names_file(tmp_path):
    imgs, msks = _folder(tmp_path)
    _write_mask(msks / "p1.png", np.zeros((6, 5)), "P")
    ds = SegmentationFolder(imgs, msks, num_classes=2)
    ds[0]
    with pytest.raises(ValueError, match=r"\(6, 5\)") as ei:
        ds[1]
    _assert_names_file(ei, msks / "p1.png")
    with pytest.raises(ValueError) as ei:
        ds.verify()
    _assert_names_file(ei, msks / "p1.png")


def test_label_out_of_range_names_file(tmp_path):
    imgs, msks = _folder(tmp_path)
    m = np.zeros((5, 6))
    m[1, 1], m[2, 2], m[3, 3] = 2, 7, 255
    _write_mask(msks / "p1.png", m, "P")
    ds = SegmentationFolder(imgs, msks, num_classes=2)
    with pytest.raises(ValueError, match=r"2, 7") as ei:
        ds[1]
    _assert_names_file(ei, msks / "p1.png")
    assert "255" not in str(ei.value).split("ignore id")[0]
    with pytest.raises(ValueError) as ei:
        ds.verify(labels=True)
    _assert_names_file(ei, msks / "p1.png")
    assert torch.equal(SegmentationFolder(imgs, msks, num_classes=8).load(1)[1], torch.from_numpy(m.astype(np.int64)))


def test_missing_pairs_name_the_file(tmp_path):
    imgs, msks = _folder(tmp_path, n=2)
    (msks / "p1.png").unlink()
    with pytest.raises(ValueError, match="no mask") as ei:
        SegmentationFolder(imgs, msks, num_classes=2)
    _assert_names_file(ei, imgs / "p1.jpg")
    _write_mask(msks / "p1.png", np.zeros((5, 6)))
    _write_mask(msks / "extra.png", np.zeros((5, 6)))
    with pytest.raises(ValueError, match="no image") as ei:
        SegmentationFolder(imgs, msks, num_classes=2)
    _assert_names_file(ei, msks / "extra.png")
    assert len(SegmentationFolder(imgs, msks, num_classes=2, ids=["p0", "p1"])) == 2
    with pytest.raises(ValueError) as ei:
        SegmentationFolder(imgs, msks, num_classes=2, ids=["p0", "nope"])
    _assert_names_file(ei, imgs / "nope")


def test_empty_and_missing_folders_name_the_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no files") as ei:
        SegmentationFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)
    _assert_names_file(ei, tmp_path / "images")
    with pytest.raises(ValueError) as ei:
        SegmentationFolder(tmp_path / "nothere", tmp_path / "masks", num_classes=2)
    _assert_names_file(ei, tmp_path / "nothere")
    with pytest.raises(ValueError):
        SegmentationPairs([], num_classes=2)


def test_split_file_errors_name_the_file(tmp_path):
    _voc_tree(tmp_path, ["a"], [(4, 4)])
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    with pytest.raises(ValueError) as ei:
        VOCSegmentation(tmp_path, "train")
    _assert_names_file(ei, tmp_path / "JPEGImages" / "b.jpg")
    with pytest.raises(ValueError) as ei:
        VOCSegmentation(tmp_path, "nosuchsplit")
    _assert_names_file(ei, sets / "nosuchsplit.txt")
    (sets / "dup.txt").write_text("a\na\n")
    with pytest.raises(ValueError, match="twice") as ei:
        VOCSegmentation(tmp_path, "dup")
    _assert_names_file(ei, sets / "dup.txt")
    (sets / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no ids") as ei:
        VOCSegmentation(tmp_path, "empty")
    _assert_names_file(ei, sets / "empty.txt")


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationPairs([("a.jpg", "a.png")], num_classes=21, ignore_index=3)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationPairs([("a.jpg", "a.png")], num_classes=0)


# --------------------------------------------------------------------------------------------------
# id lists
# --------------------------------------------------------------------------------------------------


def test_read_ids_formats(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text(
        "# comment\n2007_000032\n\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n"
        "  2008_000001  \n"
    )
    assert read_ids(f) == ["2007_000032", "2007_000039", "2008_000001"]
    with pytest.raises(ValueError) as ei:
        read_ids(tmp_path / "missing.txt")
    _assert_names_file(ei, tmp_path / "missing.txt")


def test_reduced_val_ids(tmp_path):
    val = ["v3", "v1", "v2", "v5", "v4"]
    sbd_train = tmp_path / "train.txt"
    sbd_train.write_text("v2\nt9\n")
    out = reduced_val_ids(val, sbd_train, ["v4", "t1"])
    assert out == ["v3", "v1", "v5"]  # order of val kept
    assert out == [v for v in val if v not in {"v2", "t9", "v4", "t1"}]
    assert reduced_val_ids(val, []) == val
    assert reduced_val_ids(val, val) == []
    with pytest.raises(TypeError):
        reduced_val_ids(val, "train.txt")  # a str would iterate characters
    with pytest.raises(TypeError):
        reduced_val_ids(val)


@needs_voc
def test_reduced_val_on_sample_split():
    with open(VOC_SAMPLE / "ids.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    all_ids = [r["id"] for r in rows]
    train = [r["id"] for r in rows if r["voc2012_official_split"] == "train"]
    reduced = reduced_val_ids(all_ids, train)
    assert sorted(reduced) == sorted(VOCSegmentation(VOC_SAMPLE, "val").names)


# --------------------------------------------------------------------------------------------------
# joint transforms
# --------------------------------------------------------------------------------------------------


def test_random_crop_keeps_alignment_and_varies():
    image, mask = _coord_pair(30, 40)
    image0, mask0 = image.clone(), mask.clone()
    corners = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        ci, cm = RandomCrop((11, 17), generator=g)(image, mask)
        assert tuple(ci.shape) == (3, 11, 17) and tuple(cm.shape) == (11, 17)
        real = _assert_aligned(ci, cm)
        assert bool(real.all())
        top, left = int(ci[0, 0, 0]), int(ci[1, 0, 0])
        assert 0 <= top <= 30 - 11 and 0 <= left <= 40 - 17
        corners.add((top, left))
    assert len(corners) > 3
    assert torch.equal(image, image0) and torch.equal(mask, mask0)  # caller's tensors untouched


def test_random_crop_pads_with_ignore_and_fill():
    image, mask = _coord_pair(5, 20)
    g = torch.Generator().manual_seed(0)
    ci, cm = RandomCrop((8, 10), fill=(1.0, 2.0, 3.0), generator=g)(image, mask)
    assert tuple(cm.shape) == (8, 10)
    real = _assert_aligned(ci, cm)
    assert int(real.sum()) == 5 * 10
    assert bool((cm[5:] == 255).all()) and bool(real[:5].all())
    for c, v in enumerate((1.0, 2.0, 3.0)):
        assert bool((ci[c, 5:] == v).all())
    # pad only: a crop as large as the padded image keeps every original pixel
    pi, pm = PadTo((7, 23), ignore_index=99)(image, mask)
    assert tuple(pm.shape) == (7, 23) and int((pm != 99).sum()) == 5 * 20
    assert torch.equal(pm[:5, :20], mask) and bool((pi[:, 5:, :] == 0).all())


def test_center_crop_centres_and_pads():
    image, mask = _coord_pair(10, 12)
    ci, cm = CenterCrop((4, 6))(image, mask)
    _assert_aligned(ci, cm)
    assert (int(ci[0, 0, 0]), int(ci[1, 0, 0])) == (3, 3)
    pi, pm = CenterCrop((14, 12))(image, mask)
    assert bool((pm[:2] == 255).all()) and bool((pm[12:] == 255).all())
    assert torch.equal(pm[2:12], mask)


def test_flip_moves_mask_with_image():
    image, mask = _coord_pair(6, 9)
    fi, fm = RandomHorizontalFlip(1.0)(image, mask)
    _assert_aligned(fi, fm)
    assert torch.equal(fi[1, 0], torch.arange(8, -1, -1, dtype=torch.float32))
    si, sm = RandomHorizontalFlip(0.0)(image, mask)
    assert torch.equal(si, image) and torch.equal(sm, mask)
    g = torch.Generator().manual_seed(1)
    flip = RandomHorizontalFlip(0.5, generator=g)
    flips = sum(int(flip(image, mask)[1][0, 0] != mask[0, 0]) for _ in range(200))
    assert 60 < flips < 140


@pytest.mark.parametrize("seed", range(6))
def test_random_scale_matches_half_pixel_reference(seed):
    h, w = 23, 31
    image, mask = _coord_pair(h, w)
    g = torch.Generator().manual_seed(seed)
    si, sm = RandomScale(0.4, 2.5, generator=g)(image, mask)
    oh, ow = sm.shape
    factor = oh / h
    assert 0.4 - 0.05 <= factor <= 2.5 + 0.05 and abs(ow / w - factor) < 0.05
    assert abs(round(h * factor) - oh) <= 1
    # independent references: bilinear (align_corners=False) samples (i + 0.5) * in / out - 0.5,
    # clamped to the image; nearest-exact takes floor((i + 0.5) * in / out).
    for axis, (n_in, n_out) in enumerate(((h, oh), (w, ow))):
        i = torch.arange(n_out, dtype=torch.float64)
        src = ((i + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
        nearest = torch.floor((i + 0.5) * n_in / n_out).clamp(max=n_in - 1)
        got_img = si[axis].double()
        got_mask = (sm // 1000 if axis == 0 else sm % 1000).double()
        line_img = got_img[:, 0] if axis == 0 else got_img[0, :]
        line_mask = got_mask[:, 0] if axis == 0 else got_mask[0, :]
        torch.testing.assert_close(line_img, src, atol=1e-4, rtol=0)
        assert torch.equal(line_mask, nearest)
        assert float((line_img - line_mask).abs().max()) <= 0.5 + 1e-4
    assert bool((si[2] - 7.0).abs().max() < 1e-4)


def test_scale_and_resize_sizes():
    image, mask = _coord_pair(20, 40)
    si, sm = scale_pair(image, mask, 0.5)
    assert tuple(si.shape) == (3, 10, 20) and tuple(sm.shape) == (10, 20)
    ri, rm = Resize(10)(image, mask)
    assert tuple(rm.shape) == (10, 20)
    ri, rm = Resize((7, 9))(image, mask)
    assert tuple(ri.shape) == (3, 7, 9)
    # an identity resize changes nothing
    ii, im_ = scale_pair(image, mask, 1.0)
    assert torch.equal(ii, image) and torch.equal(im_, mask)


def test_transforms_are_reproducible_with_generator_and_global_rng():
    image, mask = _coord_pair(40, 50)

    def pipeline(gen):
        return Compose([RandomScale(0.5, 1.5, generator=gen), RandomCrop(21, generator=gen),
                        RandomHorizontalFlip(generator=gen)])  # fmt: skip

    a = pipeline(torch.Generator().manual_seed(5))(image, mask)
    b = pipeline(torch.Generator().manual_seed(5))(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(11)
    c = pipeline(None)(image, mask)
    torch.manual_seed(11)
    d = pipeline(None)(image, mask)
    assert torch.equal(c[1], d[1])
    outs = {tuple(pipeline(torch.Generator().manual_seed(s))(image, mask)[1][0, :3].tolist()) for s in range(8)}
    assert len(outs) > 1


def test_transform_input_errors():
    image, mask = _coord_pair(4, 5)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        pad_pair(image, mask[:3], 8)
    with pytest.raises(ValueError, match="window"):
        crop_pair(image, mask, 2, 0, 3, 3)
    with pytest.raises(TypeError):
        RandomHorizontalFlip(1.0)(image.numpy(), mask)
    with pytest.raises(ValueError):
        RandomScale(2.0, 1.0)


@needs_voc
def test_pipeline_on_real_voc_item():
    ds = VOCSegmentation(
        VOC_SAMPLE, split=None,
        transform=Compose([RandomScale(0.5, 1.5, generator=torch.Generator().manual_seed(0)),
                           RandomCrop(320, generator=torch.Generator().manual_seed(1)), RandomHorizontalFlip()]),
    )  # fmt: skip
    raw = set(ds.load(0)[1].unique().tolist())
    image, mask = ds[0]
    assert tuple(image.shape) == (3, 320, 320) and tuple(mask.shape) == (320, 320)
    assert set(mask.unique().tolist()) <= raw | {255}


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------


def test_pad_collate_shapes_and_valid():
    g = torch.Generator().manual_seed(0)
    sizes = [(4, 5), (6, 2), (1, 1)]
    batch = [(torch.rand(3, h, w, generator=g) * 255, torch.randint(0, 21, (h, w), generator=g)) for h, w in sizes]
    before = [(i.clone(), m.clone()) for i, m in batch]
    images, masks, valid = pad_collate(batch)
    assert tuple(images.shape) == (3, 3, 6, 5) and tuple(masks.shape) == (3, 6, 5)
    assert tuple(valid.shape) == (3, 1, 6, 5)
    assert valid.dtype == torch.bool and masks.dtype == torch.int64 and images.dtype == torch.float32
    for b, ((img, m), (h, w)) in enumerate(zip(batch, sizes)):
        assert int(valid[b].sum()) == h * w and bool(valid[b, 0, :h, :w].all())
        assert torch.equal(images[b, :, :h, :w], img) and torch.equal(masks[b, :h, :w], m)
        assert bool((images[b].masked_select(~valid[b].expand(3, -1, -1)) == 0).all())
        assert bool((masks[b][~valid[b, 0]] == 255).all())
    for (i0, m0), (i1, m1) in zip(before, batch):
        assert torch.equal(i0, i1) and torch.equal(m0, m1)
    named = [(i, m, f"n{k}") for k, (i, m) in enumerate(batch)]
    images, masks, valid, names = pad_collate(named, ignore_index=-1, multiple_of=4)
    assert tuple(images.shape) == (3, 3, 8, 8) and names == ["n0", "n1", "n2"]
    assert bool((masks[~valid[:, 0]] == -1).all())
    with pytest.raises(ValueError):
        pad_collate([])
    with pytest.raises(ValueError, match="item 1"):
        pad_collate([batch[0], (torch.zeros(1, 2, 2), torch.zeros(2, 2, dtype=torch.int64))])


@needs_camvid
def test_dataloader_with_pad_collate_on_voc_and_camvid():
    from torch.utils.data import DataLoader, Subset

    voc = VOCSegmentation(VOC_SAMPLE, split=None) if (VOC_SAMPLE / "images").is_dir() else None
    loaders = [DataLoader(Subset(CamVid(CAMVID_ROOT, "val"), [0, 1]), batch_size=2, collate_fn=pad_collate)]
    if voc is not None:
        # pick two VOC items of different size
        sizes = {}
        for i, (ip, _) in enumerate(voc.pairs):
            with Image.open(ip) as im:
                sizes.setdefault(im.size, i)
            if len(sizes) == 2:
                break
        loaders.append(DataLoader(Subset(voc, list(sizes.values())), batch_size=2, collate_fn=pad_collate))
    for loader in loaders:
        images, masks, valid = next(iter(loader))
        assert images.shape[0] == 2 and images.shape[1] == 3 and images.shape[2:] == masks.shape[1:]
        assert bool((masks[~valid[:, 0]] == 255).all())
        assert math.isclose(float(images.max()), 255.0, abs_tol=60.0)
