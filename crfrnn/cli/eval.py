"""``crfrnn eval``: mean IU, pixel accuracy and the per-class IU table of a checkpoint on a data set."""
from __future__ import annotations

import time

from ._args import add_common, add_weights_flags, load_weights, positive_int
from ._common import EXIT_OK, UsageError, class_names_for, device, emit_json, finite, note, say, show_progress
from ._datasets import DATASETS, dataset, limit, short_names

NAME = "eval"
HELP = "mean IU and per-class IU of a checkpoint on a data set"
DESCRIPTION = ("Evaluate a checkpoint (run folder, .pt, published .pth or .h5) on a data set: mean IU over the "
               "data set's confusion matrix (the VOC convention), pixel accuracy, mean accuracy and the "
               "per-class IU table. Without --dataset/--root a run folder's own validation data is used.")
EPILOG = ("examples:\n"
          "  crfrnn eval --weights crfasrnn_weights.pth --dataset voc --root data/voc2012-sample --split val\n"
          "  crfrnn eval --weights runs/a --json > scores.json\n"
          "  crfrnn eval --weights runs/a --no-crf          # the unary network alone")


def add_arguments(e) -> None:
    e.add_argument("--weights", required=True, metavar="W", help="checkpoint, run folder, .pth or .h5")
    e.add_argument("--dataset", choices=DATASETS, help="data set kind")
    e.add_argument("--root", metavar="DIR", help="data set folder")
    e.add_argument("--split", default=None, help="split (voc/camvid: val, train, ...); default val")
    e.add_argument("--limit", type=positive_int, help="use the first N images")
    e.add_argument("--num-classes", type=positive_int, help="expected L (checked against the checkpoint)")
    e.add_argument("--ignore-index", type=int, default=None, help="label that is not counted (default 255)")
    e.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass (padded)")
    e.add_argument("--no-crf", action="store_true", help="evaluate the unary network's logits only")
    add_weights_flags(e)
    add_common(e)


def _data(args, info: dict):
    """The data set: flags first, else the run folder's model.json. Returns (dataset, kind, root, split, names,
    ignore_index)."""
    L = info["num_classes"]
    saved = info["sidecar"].get("data", {})
    kind = args.dataset or saved.get("dataset")
    root = args.root or (saved.get("val_root") or saved.get("root"))
    split = args.split if args.split is not None else (None if saved.get("val_root") else saved.get("val_split", "val"))
    if kind is None or root is None:
        raise UsageError("--dataset and --root are required (or a run folder whose model.json names its data)")
    # a run folder's model.json keeps it under "data", a model file's sidecar at its top
    default_ignore = saved.get("ignore_index", info["sidecar"].get("ignore_index"))
    ignore = args.ignore_index if args.ignore_index is not None else (
        255 if default_ignore is None else default_ignore)
    ckpt_names = info.get("class_names")
    source = f"the checkpoint {info['checkpoint']}" + (f" ({short_names(ckpt_names)})" if ckpt_names else "")
    ds, dl, names = dataset(kind, root, split, L if kind == "folder" else None, None, ignore, classes_from=source)
    if dl != L:
        raise UsageError(f"{source} predicts L = {L} classes but the {kind} data set at {root} has {dl}")
    if kind == "folder" and ckpt_names and len(ckpt_names) == len(names) and list(names) == class_names_for(len(names)):
        names = list(ckpt_names)  # a data set without names (no class_names.txt) takes the checkpoint's
    elif ckpt_names and list(ckpt_names) != list(names) and len(ckpt_names) == len(names):
        note(args, f"{source} was trained on the classes {short_names(ckpt_names)}; the data set names them "
                   f"{short_names(names)}")
    return limit(ds, args.limit), kind, root, split, names, ignore


def run(args) -> int:
    from crfrnn.engine.metrics import format_iou_table
    from crfrnn.engine.train import evaluate
    from crfrnn.models.checkpoints import unary_only

    dev = device(args.device)
    model, info = load_weights(args)
    L = info["num_classes"]
    ds, kind, root, split, names, ignore = _data(args, info)
    if args.no_crf:
        model = unary_only(model)
    t0 = time.perf_counter()
    res = evaluate(model, ds, L, batch_size=args.batch_size, device=dev, ignore_index=ignore,
                   progress=show_progress(args))
    seconds = time.perf_counter() - t0
    conf = res["confusion"]
    emit_json(args, {
        "checkpoint": info["checkpoint"], "model": info["kind"], "crf": not args.no_crf, "dataset": kind,
        "root": str(root), "split": split, "num_images": res["num_images"], "num_classes": L,
        "mean_iou": finite(res["mean_iou"]), "pixel_accuracy": finite(res["pixel_accuracy"]),
        "mean_accuracy": finite(res["mean_accuracy"]),
        "class_iou": {n: finite(v) for n, v in zip(names, res["class_iou"])},
        "class_names": names, "confusion": conf.tolist(), "seconds": seconds, "device": str(dev),
    })
    label = info["kind"] + (" (no CRF)" if args.no_crf else "")
    say(args, f"{label} {info['checkpoint']} on {res['num_images']} images of {root} ({kind}"
              + (f", {split}" if split else "") + f"), {seconds:.1f} s")
    say(args, f"  mean IU {100 * res['mean_iou']:.2f}%   pixel accuracy {100 * res['pixel_accuracy']:.2f}%   "
              f"mean accuracy {100 * res['mean_accuracy']:.2f}%")
    say(args, format_iou_table(conf, names, row_name=label))
    return EXIT_OK
