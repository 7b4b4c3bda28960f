"""Folder jobs of ``crfrnn refine`` / ``crfrnn segment``: a bad pair at the end leaves nothing half-done,
``--keep-going``, ``--shard K/N``, ``--workers N``, suspicious probabilities and VOC's void 255 in ``--labels``.

Inputs are crops of the real VOC sample (``../shared/data``); probabilities are made from its masks. Every
check looks at the exit status, the message and the files on disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn.demo import coarse_logits

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
VOC = ROOT.parent / "shared" / "data" / "voc2012-sample"
SIZE = 64
FAST = ["--iterations", "2", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


run = run_cli


def voc_folder(tmp_path: Path, n: int) -> tuple[Path, Path, Path, list[str]]:
    """``n`` real VOC pairs cropped to SIZE x SIZE: images/*.jpg, probs/*.npy (from the masks), masks/*.png."""
    if not (VOC / "images").is_dir():
        pytest.skip(f"VOC sample not found at {VOC}")
    images, probs, masks = tmp_path / "images", tmp_path / "probs", tmp_path / "masks"
    for d in (images, probs, masks):
        d.mkdir()
    stems = sorted(p.stem for p in (VOC / "images").glob("*.jpg"))[:n]
    for k, stem in enumerate(stems):
        photo = Image.open(VOC / "images" / f"{stem}.jpg").convert("RGB")
        x, y = (photo.width - SIZE) // 2, (photo.height - SIZE) // 2  # the middle, where the objects are
        box = (x, y, x + SIZE, y + SIZE)
        photo.crop(box).save(images / f"{stem}.jpg", quality=95)
        mask = Image.open(VOC / "masks" / f"{stem}.png").crop(box)
        mask.save(masks / f"{stem}.png")
        truth = torch.from_numpy(np.array(mask).astype(np.int64))
        np.save(probs / f"{stem}.npy", torch.softmax(coarse_logits(truth, 21, seed=k), 0).numpy())
    return images, probs, masks, stems


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scramble_pixels(path: Path) -> None:
    """Flip the bits of a PNG's compressed pixels (its IDAT chunk's data); the header stays readable."""
    data = bytearray(path.read_bytes())
    pos = 8
    while data[pos + 4 : pos + 8] != b"IDAT":
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    length = int.from_bytes(data[pos : pos + 4], "big")
    for i in range(pos + 8 + 2, pos + 8 + length):  # after the 2-byte zlib header
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


BREAKERS = {
    "nan": lambda img, npy, png: np.save(npy, np.where(np.arange(SIZE) == 7, np.nan, np.load(npy)).astype(np.float32)),
    "negative": lambda img, npy, png: np.save(npy, np.load(npy) - 0.5),
    "zero_sum": lambda img, npy, png: np.save(npy, np.where(np.arange(SIZE) == 9, 0.0, np.load(npy))),
    "truncated_jpeg": lambda img, npy, png: truncate(img),
    "corrupt_label_png": lambda img, npy, png: scramble_pixels(png),
}
REASONS = {"nan": "NaN", "negative": "negative", "zero_sum": "sum to 0", "truncated_jpeg": "truncated",
           "corrupt_label_png": "cannot read mask"}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_refine_bad_pair_at_the_end(tmp_path, capsys, kind):
    images, probs, masks, stems = voc_folder(tmp_path, 3)
    last = stems[-1]
    BREAKERS[kind](images / f"{last}.jpg", probs / f"{last}.npy", masks / f"{last}.png")
    src = ["--labels", masks, "--num-classes", 21] if kind == "corrupt_label_png" else ["--probs", probs]
    bad_file = (masks / f"{last}.png") if kind == "corrupt_label_png" else \
        (images / f"{last}.jpg") if kind == "truncated_jpeg" else (probs / f"{last}.npy")
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{stems[0]}.png").write_bytes(b"an earlier result")
    inputs, before = snapshot(tmp_path / "images"), snapshot(tmp_path)

    rc, _, err = run(["refine", images, *src, "-o", out, *FAST], capsys)
    assert rc == 2 and err.startswith("crfrnn: error:") and err.count("\n") == 1
    assert str(bad_file) in err and REASONS[kind] in err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed, no temporary folder left

    rc, text, err = run(["refine", images, *src, "-o", out, "--keep-going", *FAST], capsys)
    assert rc == 2
    skipped = [line for line in err.splitlines() if line.startswith("crfrnn: skipped")]
    assert len(skipped) == 1 and str(images / f"{last}.jpg") in skipped[0] and REASONS[kind] in skipped[0]
    assert "1 of 3 inputs failed" in err.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.png" for s in stems[:-1]]
    for s in stems[:-1]:
        labels = np.array(Image.open(out / f"{s}.png"))
        assert labels.shape == (SIZE, SIZE) and labels.max() <= 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert snapshot(tmp_path / "images") == inputs


def test_bad_pair_in_a_worker_process(tmp_path, capsys):
    """The failure travels back from the worker: same message, nothing written; --keep-going writes the rest."""
    images, probs, _, stems = voc_folder(tmp_path, 3)
    rc, _, _ = run(["refine", images, "--probs", probs, "-o", tmp_path / "good", *FAST], capsys)
    assert rc == 0
    BREAKERS["nan"](None, probs / f"{stems[-1]}.npy", None)
    before = snapshot(tmp_path)
    rc, _, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "out", "--workers", 2, *FAST], capsys)
    assert rc == 2 and err.count("\n") == 1 and str(probs / f"{stems[-1]}.npy") in err and "NaN" in err
    assert snapshot(tmp_path) == before
    rc, _, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "out", "--workers", 2, "--keep-going",
                      *FAST], capsys)
    assert rc == 2 and "crfrnn: skipped" in err and "NaN" in err
    good = snapshot(tmp_path / "good")
    del good[f"{stems[-1]}.png"]
    assert snapshot(tmp_path / "out") == good


def test_keep_going_json_lists_the_failures(tmp_path, capsys):
    images, probs, _, stems = voc_folder(tmp_path, 2)
    np.save(probs / f"{stems[1]}.npy", np.full((21, SIZE - 4, SIZE), 1 / 21, np.float32))  # caught up front
    rc, out, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "out", "--keep-going", "--json",
                        *FAST], capsys)
    assert rc == 2
    res = json.loads(out)
    assert [Path(r["output"]).name for r in res["results"]] == [f"{stems[0]}.png"]
    assert len(res["failed"]) == 1 and stems[1] in res["failed"][0]["item"] and "(60, 64)" in res["failed"][0]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{stems[0]}.png"]


def test_segment_bad_image_at_the_end(tmp_path, capsys):
    from crfrnn.models import TinyCrfRnnNet

    images, _, _, stems = voc_folder(tmp_path, 3)
    torch.manual_seed(0)
    torch.save(TinyCrfRnnNet(21).state_dict(), tmp_path / "tiny.pt")
    truncate(images / f"{stems[-1]}.jpg")
    out = tmp_path / "seg"
    before = snapshot(tmp_path)
    rc, _, err = run(["segment", images, "--weights", tmp_path / "tiny.pt", "--out", out, "--quiet"], capsys)
    assert rc == 2 and str(images / f"{stems[-1]}.jpg") in err and "truncated" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before and not out.exists()
    rc, _, err = run(["segment", images, "--weights", tmp_path / "tiny.pt", "--out", out, "--quiet",
                      "--keep-going"], capsys)
    assert rc == 2 and "1 of 3 inputs failed" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}{x}.png" for s in stems[:-1] for x in ("", "_overlay"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # shards of the good images together equal one run, byte for byte
    (images / f"{stems[-1]}.jpg").unlink()
    rc, _, _ = run(["segment", images, "--weights", tmp_path / "tiny.pt", "--out", tmp_path / "whole", "-q"], capsys)
    assert rc == 0
    for k in (1, 2):
        rc, _, _ = run(["segment", images, "--weights", tmp_path / "tiny.pt", "--out", tmp_path / "parts", "-q",
                        "--shard", f"{k}/2"], capsys)
        assert rc == 0
    assert snapshot(tmp_path / "parts") == snapshot(tmp_path / "whole") == snapshot(out)


# ------------------------------------------------------------------------------------------ suspicious inputs
def test_probabilities_that_do_not_sum_to_one(tmp_path, capsys):
    images, probs, _, stems = voc_folder(tmp_path, 1)
    image, npy = images / f"{stems[0]}.jpg", probs / f"{stems[0]}.npy"
    p = np.load(npy)
    scaled = p * 3.7
    scaled[:, 10, 20] *= 2  # the worst pixel: sums to 7.4
    np.save(tmp_path / "scaled.npy", scaled)
    rc, _, err = run(["refine", image, "--probs", tmp_path / "scaled.npy", "-o", tmp_path / "a.png", *FAST], capsys)
    assert rc == 0 and "crfrnn: warning:" in err and "(y=10, x=20) sums to 7.4" in err
    assert f"{SIZE * SIZE} of {SIZE * SIZE} pixels" in err and (tmp_path / "a.png").is_file()
    rc, _, err = run(["refine", image, "--probs", npy, "-o", tmp_path / "b.png", *FAST], capsys)
    assert rc == 0 and "warning" not in err  # a softmax sums to 1 within rounding

    zero = p.copy()
    zero[:, 3, 5] = 0
    np.save(tmp_path / "zero.npy", zero)
    rc, _, err = run(["refine", image, "--probs", tmp_path / "zero.npy", "-o", tmp_path / "c.png", *FAST], capsys)
    assert rc == 2 and "sum to 0" in err and "(y=3, x=5)" in err and not (tmp_path / "c.png").exists()
    np.save(tmp_path / "allzero.npy", np.zeros_like(p))
    rc, _, err = run(["refine", image, "--probs", tmp_path / "allzero.npy", "-o", tmp_path / "d.png", *FAST], capsys)
    assert rc == 2 and f"({SIZE * SIZE} such pixels)" in err and not (tmp_path / "d.png").exists()
    big = p.astype(np.float64)
    big[:, 0, 1] = 1e308  # finite values whose sum is not
    np.save(tmp_path / "big.npy", big)
    rc, _, err = run(["refine", image, "--probs", tmp_path / "big.npy", "-o", tmp_path / "e.png", *FAST], capsys)
    assert rc == 2 and "sum to inf" in err and "(y=0, x=1)" in err and not (tmp_path / "e.png").exists()


def test_voc_mask_255_is_void_in_labels(tmp_path, capsys):
    images, _, masks, stems = voc_folder(tmp_path, 4)
    with_void = [s for s in stems if (np.array(Image.open(masks / f"{s}.png")) == 255).any()
                 and len(np.unique(np.array(Image.open(masks / f"{s}.png")))) >= 3]
    assert with_void, "the crops hold no void pixels; the test would not test anything"
    stem = with_void[0]
    image, mask = images / f"{stem}.jpg", masks / f"{stem}.png"
    n_void = int((np.array(Image.open(mask)) == 255).sum())
    rc, out, err = run(["refine", image, "--labels", mask, "-o", tmp_path / "a.png", "--json", *FAST], capsys)
    assert rc == 0 and "value 255" in err and "void" in err and f"{n_void} pixels" in err
    res = json.loads(out)["results"][0]
    classes = int(np.array(Image.open(mask))[np.array(Image.open(mask)) != 255].max()) + 1
    assert res["num_classes"] == classes and res["void_pixels"] == n_void
    a = np.array(Image.open(tmp_path / "a.png"))
    assert a.max() < classes  # never a 256th class; void pixels get a class from the CRF
    # the same as naming 255 "unknown" explicitly (no information)
    rc, _, err = run(["refine", image, "--labels", mask, "--unknown", 255, "-o", tmp_path / "b.png", *FAST], capsys)
    assert rc == 0 and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # --ignore-index none: 255 would be a label, so 256 classes; refused unless --num-classes says so
    rc, _, err = run(["refine", image, "--labels", mask, "--ignore-index", "none", "-o", tmp_path / "c.png", *FAST],
                     capsys)
    assert rc == 2 and "256 classes" in err and "--num-classes 256" in err and not (tmp_path / "c.png").exists()
    rc, _, err = run(["refine", image, "--labels", mask, "--ignore-index", "-3", "-o", tmp_path / "c.png"], capsys)
    assert rc == 2 and "--ignore-index" in err


# ------------------------------------------------------------------------------------- shards and workers
def test_shards_together_equal_one_run_and_workers_do_not_change_outputs(tmp_path, capsys):
    images, probs, _, stems = voc_folder(tmp_path, 5)
    rc, out, _ = run(["refine", images, "--probs", probs, "-o", tmp_path / "whole", "--json", *FAST], capsys)
    assert rc == 0 and json.loads(out)["images_per_second"] > 0
    whole = snapshot(tmp_path / "whole")
    assert sorted(whole) == [f"{s}.png" for s in stems]
    seen = []
    for k in (1, 2, 3):
        rc, out, _ = run(["refine", images, "--probs", probs, "-o", tmp_path / "sharded", "--shard", f"{k}/3",
                          "--json", *FAST], capsys)
        assert rc == 0
        mine = [Path(r["output"]).name for r in json.loads(out)["results"]]
        assert mine == [f"{s}.png" for s in stems[k - 1 :: 3]]
        seen += mine
    assert sorted(seen) == sorted(whole)  # each image in exactly one shard
    assert snapshot(tmp_path / "sharded") == whole  # byte for byte
    rc, out, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "workers", "--workers", 2, *FAST],
                       capsys)
    assert rc == 0, err
    assert "images/s, 2 processes" in out
    assert snapshot(tmp_path / "workers") == whole
    rc, out, _ = run(["refine", images, "--probs", probs, "-o", tmp_path / "empty", "--shard", "7/7", *FAST], capsys)
    assert rc == 0 and "no images" in out and not (tmp_path / "empty").exists()


def test_parent_of_a_workers_job_imports_no_torch(tmp_path, capsys):
    """``--workers 2``: the parent lists, checks and hands out the images and gathers the results without
    importing torch (its import is ~1.3 s of every folder job's start); the outputs are the one-process run's."""
    import subprocess
    import sys

    images, probs, _, stems = voc_folder(tmp_path, 3)
    rc, _, _ = run(["refine", images, "--probs", probs, "-o", tmp_path / "one", *FAST], capsys)
    assert rc == 0
    code = ("import sys; from crfrnn.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    argv = ["refine", images, "--probs", probs, "-o", tmp_path / "two", "--workers", "2", "--threads", "1", *FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no torch", proc.stdout
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")


@pytest.mark.parametrize("flags, text", [
    (["--shard", "3/2"], "--shard"), (["--shard", "0/2"], "--shard"), (["--shard", "1-2"], "--shard"),
    (["--workers", "0"], "--workers"),
])
def test_folder_flag_errors_name_the_flag(tmp_path, capsys, flags, text):
    images, probs, _, _ = voc_folder(tmp_path, 1)
    rc, _, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "out", *flags], capsys)
    assert rc == 2 and text in err and repr(flags[1]) in err
    assert not (tmp_path / "out").exists()


def test_shard_of_a_single_file_is_refused(tmp_path, capsys):
    images, probs, _, stems = voc_folder(tmp_path, 1)
    rc, _, err = run(["refine", images / f"{stems[0]}.jpg", "--probs", probs / f"{stems[0]}.npy", "-o",
                      tmp_path / "a.png", "--shard", "1/2"], capsys)
    assert rc == 2 and "--shard" in err and "is a file" in err and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_flags_named_in_the_docs_exist(command):
    import argparse
    import re

    from crfrnn.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split(f"## `crfrnn {command}`", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = {o for a in sub._actions for o in a.option_strings}
    assert {"--keep-going", "--shard"} <= named <= options, sorted(named - options)


def test_refine_keeps_eight_small_sizes_and_two_large_ones(tmp_path, capsys, monkeypatch):
    """A folder job's Gaussian-term lattices: images up to SMALL_IMAGE_PIXELS go to a cache of eight sizes,
    larger ones to a cache of two (the memory a worker keeps stays bounded); each image size is built once."""
    from crfrnn.cli import refine as refine_cmd

    monkeypatch.setattr(refine_cmd, "SMALL_IMAGE_PIXELS", 32 * 32)
    refine_cmd._spatial_lattices.cache_clear()
    images, probs = tmp_path / "images", tmp_path / "probs"
    images.mkdir()
    probs.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (24, 32), (32, 32), (40, 32), (48, 32), (40, 32), (56, 32)]  # (H, W): 2 small, 3 large
    for k, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{k}.png")
        np.save(probs / f"{k}.npy", rng.dirichlet(np.ones(3), (h, w)).transpose(2, 0, 1).astype(np.float32))
    import crfrnn.densecrf.crf as crf

    builds = []
    real = crf._lattice_and_row_sums
    monkeypatch.setattr(crf, "_lattice_and_row_sums", lambda f: builds.append(tuple(f.shape)) or real(f))
    try:
        rc, _, err = run(["refine", images, "--probs", probs, "-o", tmp_path / "out", *FAST], capsys)
        assert rc == 0, err
        small, large = refine_cmd._spatial_lattices(True), refine_cmd._spatial_lattices(False)
        assert (small.size, large.size) == (8, 2)
        assert len(small) == 2  # 32x32 and 24x32, the first reused
        assert len(large) == 2  # 40x32, 48x32, 40x32 (reused), 56x32: the least recently used dropped
        spatial = [n for d, n in builds if d == 2]  # (2, H * W): positions only
        assert spatial == [32 * 32, 24 * 32, 40 * 32, 48 * 32, 56 * 32]  # each size built once
        assert len(builds) - len(spatial) == len(sizes)  # the bilateral term, every image
    finally:
        refine_cmd._spatial_lattices.cache_clear()
