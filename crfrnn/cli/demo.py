"""``crfrnn demo``: a coarse FCN-like prediction refined by the dense CRF, on the built-in scene or ``--data``."""
from __future__ import annotations

import math
import time
from pathlib import Path

from ._args import add_common, nonneg_int, parse_size, positive_int
from ._common import (
    EXIT_OK,
    UsageError,
    check_out_dir,
    check_outputs,
    class_names_for,
    device,
    emit_json,
    finite,
    palette_for,
    progress,
    read_names_file,
    say,
)

NAME = "demo"
HELP = "refine a coarse prediction with the dense CRF (built-in or --data)"
DESCRIPTION = ("Make a coarse, FCN-like prediction from ground truth (one-hot seen at the FCN-8s stride of 8, "
               "with noise, upsampled bilinearly), refine it with dense-CRF mean field and report mean IU "
               "before and after. Without --data the scene is generated (textured shapes with exact labels); "
               "nothing is downloaded.")
EPILOG = ("examples:\n"
          "  crfrnn demo                                     # demo_out/demo.png: image|coarse|refined|truth\n"
          "  crfrnn demo --seed 3 --size 240x320 --json\n"
          "  crfrnn demo --data /work/shared/data/voc2012-sample --limit 50 --out demo_voc\n"
          "  crfrnn demo --data /work/shared/data/camvid/val --ignore-index 11")


def add_arguments(d) -> None:
    d.add_argument("--data", metavar="DIR", help="VOC-style folder with images/ and masks/ (matched by stem)")
    d.add_argument("--out", metavar="DIR", default="demo_out", help="folder for the PNGs")
    d.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N pairs of --data")
    d.add_argument("--examples", type=nonneg_int, default=4, metavar="K",
                   help="with --data, write side-by-side PNGs of the first K pairs")
    d.add_argument("--num-classes", type=positive_int, help="with --data: L (default: lines of class_names.txt, "
                                                           "else 21)")
    d.add_argument("--ignore-index", type=int, default=255, help="with --data: label that is not counted")
    d.add_argument("--palette", default="auto", choices=("auto", "voc", "camvid", "distinct"))
    d.add_argument("--seed", type=nonneg_int, default=0, help="seed of the scene and of the coarse prediction's noise")
    d.add_argument("--size", type=parse_size, default=(360, 480), metavar="HxW", help="size of the built-in scene")
    d.add_argument("--iterations", type=positive_int, help="mean-field iterations (default 5)")
    add_common(d)


def run(args) -> int:
    t_start = getattr(args, "_t0", time.perf_counter())
    dev = device(args.device)
    crf = {"num_iterations": args.iterations} if args.iterations is not None else {}
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    if args.data is None:
        return _scene(args, dev, crf, out_dir, t_start)
    return _folder(args, dev, crf, out_dir, t_start)


def _picture(image, result, mask, pal, before: float, after: float):
    """image | coarse | refined | truth, mean IU in the titles."""
    from crfrnn import viz

    return viz.side_by_side(
        [image, viz.colorize(result["coarse"], pal), viz.colorize(result["refined"], pal), viz.colorize(mask, pal)],
        ["image", f"coarse (FCN-like) {100 * before:.1f}% mIU", f"dense CRF {100 * after:.1f}% mIU",
         "ground truth"],
    )


def _scene(args, dev, crf: dict, out_dir: Path, t_start: float) -> int:
    """The built-in scene."""
    from crfrnn import demo, viz
    from crfrnn.engine.metrics import mean_iou, pixel_accuracy

    out = out_dir / "demo.png"
    check_outputs([out], [])
    h, w = args.size
    if h < 32 or w < 32:
        raise UsageError(f"--size must be at least 32x32, got {h}x{w}")
    L = len(demo.SCENE_CLASSES)
    image, mask = demo.make_scene(h, w, num_classes=L, seed=args.seed)
    r = demo.evaluate_pair(image, mask, L, seed=args.seed, device=dev, crf=crf)
    before, after = mean_iou(r["conf_coarse"]), mean_iou(r["conf_refined"])
    pal = viz.palette("voc")
    viz.save_image(_picture(image, r, mask, pal, before, after), out)
    total = time.perf_counter() - t_start
    emit_json(args, {
        "mode": "scene", "image": [h, w], "num_classes": L, "class_names": list(demo.SCENE_CLASSES),
        "seed": args.seed, "mean_iou_coarse": before, "mean_iou_refined": after,
        "pixel_accuracy_coarse": pixel_accuracy(r["conf_coarse"]),
        "pixel_accuracy_refined": pixel_accuracy(r["conf_refined"]),
        "crf_seconds": r["seconds"], "total_seconds": total, "device": str(dev), "output": str(out),
        "crf": {**demo.DEMO_CRF, **crf},
    })
    say(args, f"built-in scene {w}x{h}, {L} classes ({', '.join(demo.SCENE_CLASSES)}), seed {args.seed}")
    say(args, f"  mean IU   coarse {100 * before:5.1f}%   ->   dense CRF {100 * after:5.1f}%")
    say(args, f"  pixel acc coarse {100 * pixel_accuracy(r['conf_coarse']):5.1f}%   ->   dense CRF "
              f"{100 * pixel_accuracy(r['conf_refined']):5.1f}%")
    say(args, f"  CRF {r['seconds']:.2f} s on {dev} (includes compiling the lattice kernels if not cached), "
              f"total {total:.1f} s")
    say(args, f"  wrote {out}  (image | coarse | refined | truth)")
    return EXIT_OK


def _folder_data(args):
    """``--data DIR`` -> (root, data set, L, class names)."""
    from crfrnn.data import SegmentationFolder

    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data folder {root} does not exist")
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise UsageError(f"--data {root} must hold images/ and masks/ folders (VOC style, matched by stem)")
    names_file = next((p for p in (root / "class_names.txt", root.parent / "class_names.txt") if p.is_file()), None)
    names = read_names_file(names_file) if names_file else None
    L = args.num_classes or (len(names) if names else 21)
    if 0 <= args.ignore_index == L - 1 and args.num_classes is None:
        L -= 1  # the last listed class is the void label (CamVid's "Unlabelled" with --ignore-index 11)
    if L < 2:
        raise UsageError(f"--num-classes must be at least 2, got {L}")
    ds = SegmentationFolder(root / "images", root / "masks", num_classes=L, ignore_index=args.ignore_index)
    return root, ds, L, class_names_for(L, names)


def _folder(args, dev, crf: dict, out_dir: Path, t_start: float) -> int:
    """``--data DIR``: every pair of a folder."""
    from crfrnn import demo
    from crfrnn.engine.metrics import mean_iou, pixel_accuracy

    root, ds, L, class_names = _folder_data(args)
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    outs = [out_dir / f"{ds.names[i]}.png" for i in range(min(args.examples, n))]
    check_outputs(outs, [p for pair in ds.pairs for p in pair])
    conf_c, conf_r, per_c, per_r, crf_time = _refine_pairs(args, ds, n, L, dev, crf,
                                                           palette_for(args.palette, L, class_names), outs)
    total = time.perf_counter() - t_start
    before, after = mean_iou(conf_c), mean_iou(conf_r)
    pb = sum(per_c) / len(per_c) if per_c else float("nan")
    pa = sum(per_r) / len(per_r) if per_r else float("nan")
    pc, pr = pixel_accuracy(conf_c), pixel_accuracy(conf_r)
    emit_json(args, {
        "mode": "data", "data": str(root), "num_images": n, "num_classes": L, "ignore_index": args.ignore_index,
        "mean_iou_coarse": finite(before), "mean_iou_refined": finite(after),
        "per_image_mean_iou_coarse": finite(pb), "per_image_mean_iou_refined": finite(pa),
        "pixel_accuracy_coarse": finite(pc), "pixel_accuracy_refined": finite(pr),
        "crf_seconds": crf_time, "total_seconds": total, "device": str(dev),
        "examples": [str(p) for p in outs], "crf": {**demo.DEMO_CRF, **crf},
    })
    say(args, f"{n} image/mask pairs of {root} ({L} classes, ignore {args.ignore_index}); coarse prediction from the "
              f"ground truth at stride 8")
    say(args, "                         coarse   dense CRF")
    say(args, f"  mean IU (data set)     {100 * before:5.1f}%     {100 * after:5.1f}%")
    say(args, f"  mean IU (per image)    {100 * pb:5.1f}%     {100 * pa:5.1f}%")
    say(args, f"  pixel accuracy         {100 * pc:5.1f}%     {100 * pr:5.1f}%")
    say(args, f"  CRF {crf_time:.1f} s ({crf_time / max(n, 1):.2f} s/image) on {dev}, total {total:.1f} s")
    if outs:
        say(args, f"  wrote {len(outs)} example(s) to {out_dir}/")
    return EXIT_OK


def _refine_pairs(args, ds, n: int, L: int, dev, crf: dict, pal, outs: list[Path]):
    """Coarse prediction and CRF on the first ``n`` pairs; pictures of the first ``len(outs)``.

    Returns the data set's confusion matrices (coarse, refined), the per-image mean IUs (coarse, refined; images
    without a labelled pixel left out) and the CRF's seconds."""
    import torch

    from crfrnn import demo, viz
    from crfrnn.engine.metrics import mean_iou

    conf_c = torch.zeros(L, L, dtype=torch.int64)
    conf_r = torch.zeros(L, L, dtype=torch.int64)
    per_c, per_r, crf_time = [], [], 0.0
    for i in progress(range(n), args, desc="demo", total=n):
        image, mask = ds[i]
        r = demo.evaluate_pair(image, mask, L, seed=args.seed + i, ignore_index=args.ignore_index, device=dev, crf=crf)
        conf_c += r["conf_coarse"]
        conf_r += r["conf_refined"]
        crf_time += r["seconds"]
        bc, ac = mean_iou(r["conf_coarse"]), mean_iou(r["conf_refined"])
        if not math.isnan(bc):
            per_c.append(bc)
            per_r.append(ac)
        if i < len(outs):
            viz.save_image(_picture(image, r, mask, pal, bc, ac), outs[i])
    return conf_c, conf_r, per_c, per_r, crf_time
