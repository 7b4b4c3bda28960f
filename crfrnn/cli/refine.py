"""``crfrnn refine``: dense-CRF post-processing of probabilities (.npy) or a label map (PNG), pydensecrf-style."""
from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path

from ._args import add_common, finite_float, nonneg_int, positive_float, positive_int
from ._common import USER_ERRORS, UsageError, check_outputs, device, emit_json, list_images, need_file, palette_for, say
from ._folder import add_folder_flags, failure, finish, report_rate, run_items, say_skipped, staged, take_shard, warn

NAME = "refine"
HELP = "dense-CRF post-processing of probabilities or labels"
DESCRIPTION = ("Dense-CRF post-processing (Kraehenbuehl & Koltun 2011, pydensecrf's recipe): unaries "
               "-log(p) from class probabilities (.npy, shape (L, H, W)) or from a label map (PNG, index or "
               "palette) like pydensecrf's unary_from_labels, a Gaussian and a bilateral Potts term, mean "
               "field, arg max. Writes a palette PNG of labels. IMAGE may be a folder: then --probs/--labels "
               "is a folder with files of the same stems and -o a folder.")
EPILOG = ("examples:\n"
          "  crfrnn refine photo.jpg --probs photo_probs.npy -o photo_labels.png\n"
          "  crfrnn refine photo.jpg --labels coarse.png -o refined.png --gt-prob 0.7\n"
          "  crfrnn refine im1.png --labels anno1.png --unknown 2 --gt-prob 0.7   # scribbles, 2 = unlabelled\n"
          "  crfrnn refine images/ --probs probs/ -o refined/ --iterations 10\n"
          "  crfrnn refine images/ --probs probs/ -o refined/ --workers 8 --shard 2/4   # 2nd quarter, 8 processes")


def label_value_or_none(text: str) -> int | None:
    """``--ignore-index``: a label value 0..65535, or ``none``."""
    if text.lower() == "none":
        return None
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a label value 0..65535 or 'none', got {text!r}")
    return v


def add_arguments(r) -> None:
    r.add_argument("image", metavar="IMAGE", help="RGB image, or a folder of images")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--probs", metavar="P.npy", help="class probabilities (L, H, W) float (or a folder of .npy)")
    src.add_argument("--labels", metavar="COARSE.png", help="label map to refine (or a folder of .png)")
    r.add_argument("-o", "--output", metavar="OUT", help="output PNG (folder for folder input); default "
                                                         "STEM_crf.png, or refined/ for folders")
    r.add_argument("--logits", action="store_true", help="--probs hold raw scores: apply softmax over L first")
    r.add_argument("--gt-prob", type=float, default=0.5, help="--labels: probability of the given label")
    r.add_argument("--unknown", type=int, default=None, metavar="V",
                   help="--labels: value V means 'unknown' (uniform unary); --unknown 0 is pydensecrf's "
                        "zero_unsure")
    r.add_argument("--ignore-index", type=label_value_or_none, default=255, metavar="V",
                   help="--labels: value V is void (VOC's 255): no information, like --unknown; 'none' makes it "
                        "a label")
    r.add_argument("--num-classes", type=positive_int, help="L: checked against --probs; for --labels the label "
                                                           "values 0..L-1 (default: largest value + 1)")
    crf = r.add_argument_group("dense CRF (pydensecrf's defaults)")
    crf.add_argument("--iterations", type=nonneg_int, default=5, help="mean-field iterations")
    crf.add_argument("--sxy-gaussian", type=positive_float, default=3.0, help="Gaussian kernel: position std (px)")
    crf.add_argument("--compat-gaussian", type=finite_float, default=3.0, help="Gaussian kernel: Potts weight")
    crf.add_argument("--sxy-bilateral", type=positive_float, default=80.0, help="bilateral kernel: position std (px)")
    crf.add_argument("--srgb", type=positive_float, default=13.0, help="bilateral kernel: colour std (0..255)")
    crf.add_argument("--compat-bilateral", type=finite_float, default=10.0, help="bilateral kernel: Potts weight")
    r.add_argument("--palette", default="auto", choices=("auto", "input", "voc", "camvid", "distinct"),
                   help="colours of the output PNG (auto: the input label PNG's palette if it has one, else VOC)")
    add_folder_flags(r, workers=True)
    add_common(r)


def run(args) -> int:
    if not 0.0 < args.gt_prob < 1.0:
        raise UsageError(f"--gt-prob must lie in (0, 1), got {args.gt_prob}")
    # with --workers the images go to CPU processes: this one only hands them out and imports no torch
    dev = "cpu" if args.workers > 1 and args.device in ("auto", "cpu") else device(args.device)
    if args.workers > 1 and getattr(dev, "type", dev) != "cpu":
        raise UsageError(f"--workers {args.workers} spreads images over CPU processes; --device {args.device} "
                         f"is not a CPU")
    folder = Path(args.image).is_dir()
    jobs = _jobs(args)
    good, failures = _checked(args, jobs, folder)
    check_outputs([o for _, _, o in jobs], [p for j in jobs for p in j[:2]])
    params = dict(n_iterations=args.iterations, sxy_gaussian=args.sxy_gaussian, compat_gaussian=args.compat_gaussian,
                  sxy_bilateral=args.sxy_bilateral, srgb=args.srgb, compat_bilateral=args.compat_bilateral)
    workers = min(args.workers, max(len(good), 1))
    run_kw = dict(desc="refine", name=_job_name, workers=workers, threads=args.threads or 1)
    out_dir = _out_dir(args) if folder else jobs[0][2]
    with staged(out_dir) if folder else contextlib.nullcontext() as stage:
        results, failed, seconds = run_items(functools.partial(_refine_one, args, params, dev, stage), good, args,
                                             **run_kw)
    failures += failed
    _note_void(args, results)
    rate = len(results) / seconds if seconds > 0 else 0.0
    if folder:
        report_rate(args, "images", len(results), seconds, workers)
    emit_json(args, {"results": results, "failed": failures, "params": params, "device": str(dev),
                     "workers": workers, "shard": args.shard, "seconds": seconds, "images_per_second": rate})
    return finish(args, failures, len(jobs), len(results), out_dir)


def _job_name(job) -> str:
    return f"{job[0]} ({job[1]})"


def _checked(args, jobs: list, folder: bool) -> tuple[list, list]:
    """Check every pair before anything is written: (good jobs, failures). A bad pair raises unless this is a
    folder job with --keep-going, which skips (and names) it."""
    good, failures = [], []
    for job in jobs:
        try:
            _check_pair(args, *job)
        except USER_ERRORS as e:
            if not (folder and args.keep_going):
                raise
            failures.append(failure(_job_name(job), e))
            say_skipped(failures[-1])
            continue
        good.append(job)
    return good, failures


def _out_dir(args) -> Path:
    return Path(args.output) if args.output else Path("refined")


def _jobs(args) -> list[tuple[Path, Path, Path]]:
    """(image, probs-or-labels file, output) triples of this shard (the source files are checked later)."""
    image = Path(args.image)
    source = Path(args.probs if args.probs is not None else args.labels)
    flag = "--probs" if args.probs is not None else "--labels"
    ext = ".npy" if args.probs is not None else ".png"
    if not image.exists():
        raise FileNotFoundError(f"image {image} does not exist")
    if image.is_dir():
        if not source.is_dir():
            raise UsageError(f"IMAGE {image} is a folder, so {flag} must be a folder too (got {source})")
        out_dir = _out_dir(args)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {out_dir} must be a folder when IMAGE is a folder")
        images = list_images(image)
        mine = take_shard(images, args.shard)
        if not mine:
            say(args, f"--shard {args.shard[0]}/{args.shard[1]}: no images (the folder holds {len(images)})")
        return [(img, source / (img.stem + ext), out_dir / f"{img.stem}.png") for img in mine]
    if args.shard is not None:
        raise UsageError(f"--shard splits a folder of images; IMAGE {image} is a file")
    need_file(source, f"{flag} file")
    out = Path(args.output) if args.output else Path(f"{image.stem}_crf.png")
    if out.is_dir():
        out = out / f"{image.stem}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: label maps are written as PNG; use a .png name")
    return [(image, source, out)]


def _check_pair(args, img: Path, src: Path, out: Path) -> None:
    """The probabilities (or labels) ``src`` exist and fit the image ``img`` (read from the headers only)."""
    import numpy as np

    from crfrnn.data.io import _image_header, _image_size

    if not src.is_file():
        flag = "--probs" if args.probs is not None else "--labels"
        raise FileNotFoundError(f"{flag} folder {src.parent} has no {src.name} for image {img}")
    h, w = _image_size(img)
    if args.probs is None:
        lh, lw, mode = _image_header(src)
        if (lh, lw) != (h, w):
            raise UsageError(f"labels {src} are {lh}x{lw} (H x W) but image {img} is {h}x{w}")
        if args.palette == "input" and mode != "P":
            raise UsageError(f"--palette input needs palette PNG labels; {src} has none")
        return
    if args.palette == "input":
        raise UsageError(f"--palette input needs palette PNG labels; {src} has none")
    try:
        shape = np.load(src, mmap_mode="r", allow_pickle=False).shape
    except Exception as e:
        raise UsageError(f"cannot read probabilities {src} as a .npy array: {e}") from None
    if len(shape) != 3:
        raise UsageError(f"probabilities {src} must have shape (L, H, W), got {shape}")
    if tuple(shape[1:]) != (h, w):
        raise UsageError(f"probabilities {src} have (H, W) = {tuple(shape[1:])} but image {img} is "
                         f"{h}x{w} (H, W) = {(h, w)}")
    if args.num_classes is not None and shape[0] != args.num_classes:
        raise UsageError(f"probabilities {src} have L = {shape[0]} classes but --num-classes is {args.num_classes}")


#: A pixel's probabilities may sum to 1 within this much (float16 files, rounding) before a warning.
SUM_TOLERANCE = 1e-2


def _load_probs(path: Path, logits: bool):
    """-> ((L, H, W) float32 probabilities, warnings). Refuses NaN/inf, negative values and pixels summing to 0."""
    import numpy as np

    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"cannot read probabilities {path} as a .npy array: {e}") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise UsageError(f"probabilities {path} must be a float array (L, H, W), got dtype {getattr(a, 'dtype', '?')}")
    if a.ndim != 3 or a.shape[0] < 2:
        raise UsageError(f"probabilities {path} must have shape (L, H, W) with L >= 2 classes, got {a.shape}")
    if not np.isfinite(a).all():
        raise UsageError(f"probabilities {path} (shape {a.shape}) contain NaN or infinite values")
    if logits:
        a = a.astype(np.float64)
        a = np.exp(a - a.max(0, keepdims=True))
        a /= a.sum(0, keepdims=True)
        return np.ascontiguousarray(a, dtype=np.float32), []
    if (a < 0).any():
        raise UsageError(f"probabilities {path} (shape {a.shape}) hold negative values; pass --logits for raw scores")
    warnings = _check_sums(a, path)
    if a.dtype.itemsize > 4:  # values above float32's range act as 1 (the unary clips p to [1e-5, 1])
        a = np.minimum(a, np.finfo(np.float32).max)
    return np.ascontiguousarray(a, dtype=np.float32), warnings


def _check_sums(a, path: Path) -> list[str]:
    """Each pixel's probabilities should sum to 1: an error for a sum of 0 or inf, a warning naming the worst
    pixel otherwise."""
    import numpy as np

    with np.errstate(over="ignore"):
        sums = a.sum(0, dtype=np.float64)
    bad = ~np.isfinite(sums) | (sums <= 0)
    if bad.any():
        y, x = np.unravel_index(int(np.argmax(bad)), sums.shape)
        raise UsageError(f"probabilities {path} (shape {a.shape}) sum to {sums[y, x]:g} over the classes at pixel "
                         f"(y={y}, x={x}) ({int(bad.sum())} such pixels); each pixel needs a positive finite sum")
    off = np.abs(sums - 1.0)
    if off.max() <= SUM_TOLERANCE:
        return []
    y, x = np.unravel_index(int(np.argmax(off)), sums.shape)
    return [f"probabilities {path} do not sum to 1 over the L = {a.shape[0]} classes: pixel (y={y}, x={x}) sums to "
            f"{sums[y, x]:.4g} ({int((off > SUM_TOLERANCE).sum())} of {sums.size} pixels are off by more than "
            f"{SUM_TOLERANCE:g}); used as given (unaries -log p, p clipped to [1e-5, 1]); pass --logits for raw "
            f"scores"]


def _labels_to_probs(labels, path: Path, args):
    """pydensecrf's unary_from_labels as probabilities over the label values that are classes; the --unknown and
    --ignore-index values carry no information (uniform)."""
    import numpy as np

    from crfrnn.densecrf.utils import unary_from_labels

    void = [v for v in (args.unknown, args.ignore_index) if v is not None]
    no_info = np.isin(labels, void)
    known = labels[~no_info]
    if known.size == 0:
        raise UsageError(f"labels {path} hold only the values {sorted(set(void))} (--unknown / --ignore-index)")
    L = args.num_classes if args.num_classes is not None else int(known.max()) + 1
    if int(known.max()) >= L:
        raise UsageError(f"labels {path} hold value {int(known.max())} but --num-classes is {L} "
                         f"(values must lie in [0, {L}) or be the --unknown / --ignore-index value)")
    if args.num_classes is None and L > 255:
        raise UsageError(f"labels {path} hold value {L - 1}, which would make {L} classes; pass --num-classes {L} "
                         f"if you mean it (VOC's void 255 is ignored unless --ignore-index none)")
    classes = [v for v in range(L) if v not in void]
    if len(classes) < 2:
        raise UsageError(f"labels {path}: need at least 2 classes, found {len(classes)} (--num-classes {L})")
    lut = np.full(max(L, int(labels.max()) + 1), -1, np.int64)
    lut[classes] = np.arange(len(classes))
    if no_info.any():
        compact = np.where(no_info, 0, lut[np.where(no_info, 0, labels)] + 1)
        U = unary_from_labels(compact, len(classes), args.gt_prob, zero_unsure=True)
    else:
        U = unary_from_labels(lut[labels], len(classes), args.gt_prob, zero_unsure=False)
    probs = np.exp(-U.astype(np.float64)).reshape(len(classes), *labels.shape).astype(np.float32)
    return probs, np.asarray(classes, np.int64), ~no_info


def _input_palette(path: Path):
    """The (256, 3) palette of a palette PNG, else None."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode != "P" or not im.getpalette():
            return None
        pal = np.array(im.getpalette()[: 3 * 256], np.uint8)
    out = np.zeros((256, 3), np.uint8)
    out[: pal.size // 3] = pal.reshape(-1, 3)
    return out


#: Images up to this many pixels share a cache of eight sizes' Gaussian-term lattices, larger ones one of two.
#: A kept lattice (with its row sums and features) costs ~35-45 bytes a pixel (~7 MB at 500x375, ~0.5 GB at
#: 4000x3000), so a worker keeps at most ~170 MB of small ones plus two larger ones.
SMALL_IMAGE_PIXELS = 500_000


@functools.lru_cache(maxsize=None)
def _spatial_lattices(small: bool):
    """This process's Gaussian-term lattices (each worker process has its own), reused by the images of one size.
    Small images: eight sizes, as a folder's sizes come mixed (the 200 VOC sample images: 54 sizes, two of them
    56 %; with two workers 118 of the 200 Gaussian terms are found built, against 74 with room for two; ~21 ms a
    build at 500x375). Larger images: two sizes, bounding the memory kept."""
    from crfrnn.lattice import LatticeCache

    return LatticeCache(8 if small else 2)


def _refine_one(args, params: dict, dev, stage: Path | None, job) -> dict:
    """Refine one pair and write its label PNG (into ``stage`` when given); returns its JSON record (with the
    ``message`` and ``warnings`` for the terminal)."""
    import numpy as np
    import torch

    from crfrnn import densecrf, viz
    from crfrnn.data import read_image, read_mask

    img, src, out = job
    rgb = read_image(img).permute(1, 2, 0).to(torch.uint8)  # (H, W, 3); read_image's values are whole numbers
    input_palette, void_pixels = None, 0
    if args.probs is not None:
        probs, warnings = _load_probs(src, args.logits)
        values = np.arange(probs.shape[0])
        before = probs.argmax(0)
        known = np.ones(before.shape, bool)
    else:
        labels = read_mask(src).numpy()
        input_palette = _input_palette(src)
        probs, values, known = _labels_to_probs(labels, src, args)
        before, warnings = labels, []
        if args.ignore_index is not None and args.ignore_index != args.unknown:
            void_pixels = int((labels == args.ignore_index).sum())
    t0 = time.perf_counter()
    out_idx = densecrf.refine(rgb.to(dev), torch.from_numpy(probs).to(dev), **params,
                             lattice_cache=_spatial_lattices(rgb.shape[0] * rgb.shape[1] <= SMALL_IMAGE_PIXELS))
    seconds = time.perf_counter() - t0
    refined = values[out_idx.cpu().numpy()]
    pal = input_palette if (args.palette in ("auto", "input") and input_palette is not None) else \
        palette_for("voc" if args.palette in ("auto", "input") else args.palette, int(refined.max()) + 1)
    viz.save_image(viz.label_image(refined, pal), out if stage is None else stage / out.name)
    changed = float((refined[known] != before[known]).mean()) if known.any() else 0.0
    return {"image": str(img), "source": str(src), "output": str(out), "height": int(rgb.shape[0]),
            "width": int(rgb.shape[1]), "num_classes": int(len(values)), "changed_fraction": changed,
            "void_pixels": void_pixels, "seconds": seconds, "warnings": warnings,
            "message": f"{img} -> {out}  ({100 * changed:.1f}% of the labelled pixels changed, {seconds:.2f} s)"}


def _note_void(args, results: list[dict]) -> None:
    """Say once that --ignore-index pixels were treated as void (they are not a class)."""
    hit = [r for r in results if r["void_pixels"]]
    if hit:
        warn(f"value {args.ignore_index} in {len(hit)} of {len(results)} label files (first {hit[0]['source']}, "
             f"{hit[0]['void_pixels']} pixels) treated as void: no information, like --unknown "
             f"(--ignore-index {args.ignore_index}; --ignore-index none makes it a label)")
