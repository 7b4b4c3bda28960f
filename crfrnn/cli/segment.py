"""``crfrnn segment``: run a trained CRF-RNN / FCN-8s checkpoint on images; palette PNGs and overlays."""
from __future__ import annotations

import functools
import time
from pathlib import Path

from ._args import add_common, add_weights_flags, load_weights, positive_int
from ._common import (
    UsageError,
    check_out_dir,
    check_outputs,
    class_names_for,
    device,
    emit_json,
    list_images,
    palette_for,
)
from ._folder import add_folder_flags, finish, report_rate, run_items, staged, take_shard

NAME = "segment"
HELP = "segment images with a trained checkpoint"
DESCRIPTION = ("Run a trained network on images of any size and write, per image, a palette PNG of labels "
               "(OUT/STEM.png) and an overlay (OUT/STEM_overlay.png). --weights is a run folder (best.pt, "
               "else last.pt), one of its checkpoints, the published crfasrnn_weights.pth, or the Keras "
               "crfrnn_keras_model.h5.")
EPILOG = ("examples:\n"
          "  crfrnn segment input.jpg --weights crfasrnn_weights.pth --out seg/\n"
          "  crfrnn segment photos/ --weights runs/voc1 --out seg/ --device cuda\n"
          "  crfrnn segment input.jpg --weights crfrnn_keras_model.h5 --out seg/ --no-crf   # FCN-8s only")


def add_arguments(s) -> None:
    s.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    s.add_argument("--weights", required=True, metavar="W", help="checkpoint, run folder, .pth or .h5")
    s.add_argument("--out", default="segment_out", metavar="DIR", help="output folder")
    s.add_argument("--num-classes", type=positive_int, help="expected L (checked against the checkpoint)")
    s.add_argument("--no-crf", action="store_true", help="use the unary network's logits only (skip the CRF)")
    s.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay colours")
    s.add_argument("--palette", default="auto", choices=("auto", "voc", "camvid", "distinct"))
    add_weights_flags(s)
    add_folder_flags(s, workers=False)
    add_common(s)


def _images(items) -> list[Path]:
    """The image files named or held by the folders named; refuses two images of the same name."""
    images: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"image {p} does not exist")
        images.extend(list_images(p) if p.is_dir() else [p])
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise UsageError(f"two images share the name {p.stem!r} ({stems[p.stem]} and {p}); outputs would clash")
        stems[p.stem] = p
    return images


def run(args) -> int:
    from crfrnn.models.checkpoints import unary_only

    dev = device(args.device)
    images = take_shard(_images(args.images), args.shard)
    model, info = load_weights(args)
    L = info["num_classes"]
    class_names = class_names_for(L, info.get("class_names"))
    pal = palette_for(args.palette, L, class_names)
    out_dir = Path(args.out)
    check_out_dir(out_dir)
    outs = [(out_dir / f"{p.stem}.png", out_dir / f"{p.stem}_overlay.png") for p in images]
    check_outputs([o for pair in outs for o in pair], images + [Path(info["checkpoint"])])
    if args.no_crf:
        model = unary_only(model)
    model.to(dev).eval()
    with staged(out_dir) as stage:
        work = functools.partial(_segment_one, args, model, dev, pal, class_names, stage)
        results, failures, seconds = run_items(work, list(zip(images, outs)), args, desc="segment",
                                               name=lambda item: str(item[0]))
    report_rate(args, "images", len(results), seconds, 1)
    emit_json(args, {"model": info["kind"], "checkpoint": info["checkpoint"], "num_classes": L,
                     "class_names": class_names, "device": str(dev), "crf": not args.no_crf, "results": results,
                     "failed": failures, "shard": args.shard, "seconds": seconds})
    return finish(args, failures, len(images), len(results), out_dir)


def _segment_one(args, model, dev, pal, class_names: list[str], stage: Path, item) -> dict:
    """Segment one image; write its label PNG and overlay into ``stage``; returns its JSON record."""
    import torch

    from crfrnn import viz
    from crfrnn.data import read_image

    p, (lab_path, ov_path) = item
    image = read_image(p)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(image[None].to(dev))
    labels = logits[0].argmax(0).cpu()
    seconds = time.perf_counter() - t0
    viz.save_image(viz.label_image(labels, pal), stage / lab_path.name)
    viz.save_image(viz.overlay(image, labels, pal, alpha=args.alpha), stage / ov_path.name)
    L = len(class_names)
    counts = torch.bincount(labels.reshape(-1), minlength=L)
    present = {class_names[k]: float(counts[k]) / labels.numel() for k in range(L) if counts[k] > 0}
    top = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(present.items(), key=lambda kv: -kv[1])[:4])
    return {"image": str(p), "labels": str(lab_path), "overlay": str(ov_path), "height": int(labels.shape[0]),
            "width": int(labels.shape[1]), "classes": present, "seconds": seconds,
            "message": f"{p} -> {lab_path}  [{top}]  {seconds:.2f} s"}
