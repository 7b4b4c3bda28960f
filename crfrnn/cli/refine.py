"""``crfrnn refine``: dense-CRF post-processing of probabilities (.npy) or a label map (PNG), pydensecrf-style."""
from __future__ import annotations

import time
from pathlib import Path

from ._args import add_common, finite_float, nonneg_int, positive_float, positive_int
from ._common import EXIT_OK, UsageError, check_outputs, device, emit_json, list_images, need_file, palette_for, \
    progress, say

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
          "  crfrnn refine images/ --probs probs/ -o refined/ --iterations 10")


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
    add_common(r)


def run(args) -> int:
    if not 0.0 < args.gt_prob < 1.0:
        raise UsageError(f"--gt-prob must lie in (0, 1), got {args.gt_prob}")
    dev = device(args.device)
    jobs = _jobs(args)
    for img, src, _ in jobs:  # check every pair before writing anything
        _check_pair(args, img, src)
    if args.palette == "input":
        from crfrnn.data.io import _image_header

        for _, src, _ in jobs:
            if args.probs is not None or _image_header(src)[2] != "P":
                raise UsageError(f"--palette input needs palette PNG labels; {src} has none")
    check_outputs([o for _, _, o in jobs], [p for j in jobs for p in j[:2]])
    params = dict(n_iterations=args.iterations, sxy_gaussian=args.sxy_gaussian, compat_gaussian=args.compat_gaussian,
                  sxy_bilateral=args.sxy_bilateral, srgb=args.srgb, compat_bilateral=args.compat_bilateral)
    results = [_refine_one(args, img, src, out, params, dev) for img, src, out in progress(jobs, args, desc="refine")]
    emit_json(args, {"results": results, "params": params, "device": str(dev)})
    return EXIT_OK


def _jobs(args) -> list[tuple[Path, Path, Path]]:
    """(image, probs-or-labels file, output) triples; checks that the files exist and match by stem."""
    image = Path(args.image)
    source = Path(args.probs if args.probs is not None else args.labels)
    flag = "--probs" if args.probs is not None else "--labels"
    ext = ".npy" if args.probs is not None else ".png"
    if not image.exists():
        raise FileNotFoundError(f"image {image} does not exist")
    if image.is_dir():
        if not source.is_dir():
            raise UsageError(f"IMAGE {image} is a folder, so {flag} must be a folder too (got {source})")
        out_dir = Path(args.output) if args.output else Path("refined")
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {out_dir} must be a folder when IMAGE is a folder")
        jobs = []
        for img in list_images(image):
            src = source / (img.stem + ext)
            if not src.is_file():
                raise FileNotFoundError(f"{flag} folder {source} has no {img.stem}{ext} for image {img}")
            jobs.append((img, src, out_dir / f"{img.stem}.png"))
        return jobs
    need_file(source, f"{flag} file")
    out = Path(args.output) if args.output else Path(f"{image.stem}_crf.png")
    if out.is_dir():
        out = out / f"{image.stem}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: label maps are written as PNG; use a .png name")
    return [(image, source, out)]


def _check_pair(args, img: Path, src: Path) -> None:
    """The probabilities (or labels) ``src`` fit the image ``img`` (read from the headers only)."""
    import numpy as np

    from crfrnn.data.io import _image_size

    h, w = _image_size(img)
    if args.probs is None:
        lh, lw = _image_size(src)
        if (lh, lw) != (h, w):
            raise UsageError(f"labels {src} are {lh}x{lw} (H x W) but image {img} is {h}x{w}")
        return
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


def _load_probs(path: Path, logits: bool):
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
    elif (a < 0).any():
        raise UsageError(f"probabilities {path} (shape {a.shape}) hold negative values; pass --logits for raw scores")
    return np.ascontiguousarray(a, dtype=np.float32)


def _labels_to_probs(labels, path: Path, args):
    """pydensecrf's unary_from_labels as probabilities over the label values that are classes."""
    import numpy as np

    from crfrnn.densecrf.utils import unary_from_labels

    unknown = args.unknown
    known = labels[labels != unknown] if unknown is not None else labels
    if known.size == 0:
        raise UsageError(f"labels {path} hold only the unknown value {unknown}")
    L = args.num_classes if args.num_classes is not None else int(known.max()) + 1
    if int(known.max()) >= L:
        raise UsageError(f"labels {path} hold value {int(known.max())} but --num-classes is {L} "
                         f"(values must lie in [0, {L}) or be the --unknown value)")
    classes = [v for v in range(L) if v != unknown]
    if len(classes) < 2:
        raise UsageError(f"labels {path}: need at least 2 classes, found {len(classes)} (--num-classes {L})")
    lut = np.full(max(L, int(labels.max()) + 1), -1, np.int64)
    lut[classes] = np.arange(len(classes))
    if unknown is not None:
        compact = np.where(labels == unknown, 0, lut[np.where(labels == unknown, 0, labels)] + 1)
        U = unary_from_labels(compact, len(classes), args.gt_prob, zero_unsure=True)
    else:
        U = unary_from_labels(lut[labels], len(classes), args.gt_prob, zero_unsure=False)
    probs = np.exp(-U.astype(np.float64)).reshape(len(classes), *labels.shape).astype(np.float32)
    return probs, np.asarray(classes, np.int64)


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


def _refine_one(args, img: Path, src: Path, out: Path, params: dict, dev) -> dict:
    """Refine one pair and write its label PNG; returns its JSON record."""
    import numpy as np
    import torch

    from crfrnn import densecrf, viz
    from crfrnn.data import read_image, read_mask

    rgb = read_image(img).permute(1, 2, 0).to(torch.uint8)  # (H, W, 3); read_image's values are whole numbers
    input_palette = None
    if args.probs is not None:
        probs = _load_probs(src, args.logits)
        values = np.arange(probs.shape[0])
        before = probs.argmax(0)
        known = np.ones(before.shape, bool)
    else:
        labels = read_mask(src).numpy()
        input_palette = _input_palette(src)
        probs, values = _labels_to_probs(labels, src, args)
        before = labels
        known = labels != args.unknown if args.unknown is not None else np.ones(labels.shape, bool)
    t0 = time.perf_counter()
    out_idx = densecrf.refine(rgb.to(dev), torch.from_numpy(probs).to(dev), **params)
    seconds = time.perf_counter() - t0
    refined = values[out_idx.cpu().numpy()]
    pal = input_palette if (args.palette in ("auto", "input") and input_palette is not None) else \
        palette_for("voc" if args.palette in ("auto", "input") else args.palette, int(refined.max()) + 1)
    viz.save_image(viz.label_image(refined, pal), out)
    changed = float((refined[known] != before[known]).mean()) if known.any() else 0.0
    say(args, f"{img} -> {out}  ({100 * changed:.1f}% of the labelled pixels changed, {seconds:.2f} s)")
    return {"image": str(img), "source": str(src), "output": str(out), "height": int(rgb.shape[0]),
            "width": int(rgb.shape[1]), "num_classes": int(len(values)), "changed_fraction": changed,
            "seconds": seconds}
