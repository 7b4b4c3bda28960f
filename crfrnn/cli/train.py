"""``crfrnn train``: train FCN-8s / CRF-RNN (flags or a JSON --config); torchrun-able."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crfrnn.engine.runfiles import atomic_write
from crfrnn.models.checkpoints import MODEL_KINDS, SIDECAR

from ._args import add_common, nonneg_int, parse_size, positive_float, positive_int
from ._common import EXIT_OK, UsageError, device, emit_json, need_file, rank, say, show_progress
from ._datasets import DATASETS, dataset, limit

NAME = "train"
HELP = "train FCN-8s / CRF-RNN"
DESCRIPTION = ("Train with SGD on softmax cross-entropy (crfrnn.train.train) and write a run folder "
               "(config.json, metrics.jsonl, last.pt, best.pt, model.json). Settings come from flags or a "
               "JSON --config whose keys are the flag names (e.g. {\"dataset\": \"voc\", \"steps\": 1000}) "
               "or any crfrnn.train.TrainConfig field; flags override the file. Under torchrun every process "
               "runs this command and train() distributes itself (DDP, one process per GPU).")
EPILOG = ("examples:\n"
          "  crfrnn train --dataset voc --root VOC2012 --model fcn8s --init vgg16.pth --run-dir runs/fcn \\\n"
          "      --steps 100000 --lr 1e-4 --crop-size 500\n"
          "  crfrnn train --dataset voc --root VOC2012 --model crfrnn --init runs/fcn/best.pt --run-dir runs/crf "
          "--paper\n"
          "  crfrnn train --config train.json --run-dir runs/b --resume\n"
          "  torchrun --nproc_per_node=2 -m crfrnn train --config train.json\n"
          "  crfrnn train --dataset folder --root my_data --num-classes 6 --model tiny --steps 20 "
          "--run-dir runs/smoke\n\n"
          "--model tiny is a smoke-test network (three small convolutions + CRF-RNN), for checking a set-up in "
          "seconds, not for real use.")


def add_arguments(t) -> None:
    t.add_argument("--config", metavar="JSON", help="JSON file of settings (keys = flag names)")
    t.add_argument("--dataset", choices=DATASETS, default=None, help="data set kind (default voc)")
    t.add_argument("--root", metavar="DIR", help="data set folder (voc: devkit, SBD or images/+masks/; camvid: "
                                                 "split folders; folder: images/+masks/)")
    t.add_argument("--train-split", default=None, help="training split (default train)")
    t.add_argument("--val-split", default=None, help="validation split (default val; '' for none)")
    t.add_argument("--val-root", metavar="DIR", default=None, help="separate validation folder (--dataset folder)")
    t.add_argument("--num-classes", type=positive_int, default=None, help="L (folder data sets without "
                                                                            "class_names.txt)")
    t.add_argument("--ignore-index", type=int, default=None, help="label without loss (default 255)")
    t.add_argument("--model", choices=MODEL_KINDS, default=None,
                   help="network (default crfrnn)")
    t.add_argument("--init", metavar="W", default=None,
                   help="initial weights: a crfrnn checkpoint, crfasrnn_weights.pth, the Keras .h5, or a torchvision "
                        "VGG-16 state dict (for fcn8s/crfrnn)")
    t.add_argument("--run-dir", metavar="DIR", default=None, help="run folder (must be new or empty unless --resume)")
    t.add_argument("--resume", action="store_const", const=True, default=None, help="continue the run in --run-dir")
    t.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default: --epochs epochs)")
    t.add_argument("--epochs", type=positive_int, default=None, help="epochs when --steps is not given (default 1)")
    t.add_argument("--lr", type=positive_float, default=None, help="base learning rate (default 1e-3)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    t.add_argument("--schedule", choices=("poly", "fixed"), default=None, help="learning-rate schedule (default poly)")
    t.add_argument("--paper", action="store_const", const=True, default=None,
                   help="the paper's recipe (TrainConfig.paper, mean-loss form): momentum 0.99, fixed lr, CRF lr "
                        "multipliers 10000/10000/1000")
    t.add_argument("--batch-size", type=positive_int, default=None, help="images per step per process (default 1)")
    t.add_argument("--crop-size", default=None, metavar="N|HxW", help="random crops (padded with ignore)")
    t.add_argument("--no-flip", dest="flip", action="store_const", const=False, default=None,
                   help="no random horizontal flips")
    t.add_argument("--eval-every", type=nonneg_int, default=None, help="validate every N steps (0: every epoch)")
    t.add_argument("--log-every", type=positive_int, default=None, help="log the loss every N steps (default 10)")
    t.add_argument("--checkpoint-every", type=nonneg_int, default=None, help="write last.pt every N steps")
    t.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training images")
    t.add_argument("--val-limit", type=positive_int, default=None, help="use the first N validation images")
    t.add_argument("--crf-iterations", type=positive_int, default=None, help="mean-field iterations in training "
                                                                              "(default 5)")
    t.add_argument("--crf-test-iterations", type=positive_int, default=None, help="... at evaluation (default 10)")
    t.add_argument("--seed", type=nonneg_int, default=None, help="random seed (default 0)")
    t.add_argument("--num-workers", type=nonneg_int, default=None, help="DataLoader workers (default 0)")
    t.add_argument("--amp", action="store_const", const=True, default=None, help="mixed precision")
    add_common(t)
    t.set_defaults(device=None)  # None: not given, so --config may set it


# flags of `crfrnn train` (dest -> default); a --config JSON may set any of them and any TrainConfig field
_TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "voc", "root": None, "train_split": "train", "val_split": "val", "val_root": None,
    "num_classes": None, "model": "crfrnn", "init": None, "run_dir": None, "steps": None, "epochs": 1,
    "lr": None, "momentum": None, "weight_decay": None, "batch_size": 1, "crop_size": None, "flip": True,
    "eval_every": 0, "log_every": 10, "checkpoint_every": 0, "train_limit": None, "val_limit": None,
    "seed": 0, "num_workers": 0, "amp": False, "resume": False, "paper": False, "schedule": None,
    "crf_iterations": 5, "crf_test_iterations": 10, "ignore_index": 255, "device": "auto",
}


def _merge_config(args) -> dict:
    from dataclasses import fields

    from crfrnn.engine.train import TrainConfig

    cfg: dict[str, Any] = {}
    if args.config is not None:
        path = need_file(Path(args.config), "--config file")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read --config {path}: {e}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {path} must hold a JSON object")
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        tc_fields = {f.name for f in fields(TrainConfig)}
        unknown = sorted(k for k in cfg if k not in _TRAIN_DEFAULTS and k not in tc_fields and k != "max_steps")
        if unknown:
            raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
        if "max_steps" in cfg:
            cfg.setdefault("steps", cfg.pop("max_steps"))
    merged = dict(_TRAIN_DEFAULTS)
    merged.update(cfg)
    for key in _TRAIN_DEFAULTS:
        v = getattr(args, key, None)
        if v is not None:
            merged[key] = v
    return merged



def _check_run(o: dict) -> Path:
    if o["run_dir"] is None:
        raise UsageError("--run-dir is required (the folder that receives config.json, metrics.jsonl, last.pt, "
                         "best.pt)")
    run_dir = Path(o["run_dir"])
    if not o["resume"] and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"--run-dir {run_dir} exists and is not empty; pass --resume to continue it or choose a new "
                         f"folder (runs are never overwritten)")
    if o["model"] not in MODEL_KINDS:
        raise UsageError(f"--model must be crfrnn, fcn8s or tiny, got {o['model']!r}")
    return run_dir


def _data_sets(o: dict):
    """(training set, validation set or None, L, class names)."""
    from crfrnn import data

    ignore = int(o["ignore_index"])
    tf = []
    if o["crop_size"] is not None:
        crop = o["crop_size"]
        crop = parse_size(str(crop)) if not isinstance(crop, (list, tuple)) else tuple(crop)
        tf.append(data.RandomCrop(crop, ignore_index=ignore))
    if o["flip"]:
        tf.append(data.RandomHorizontalFlip())
    train_set, L, class_names = dataset(o["dataset"], o["root"], o["train_split"], o["num_classes"],
                                        data.Compose(tf) if tf else None, ignore)
    val_set = None
    if o["val_root"] is not None:
        val_set, _, _ = dataset(o["dataset"], o["val_root"], None, L, None, ignore)
    elif o["val_split"] and o["dataset"] != "folder":
        val_set, _, _ = dataset(o["dataset"], o["root"], o["val_split"], L, None, ignore)
    elif o["val_split"] and o["dataset"] == "folder" and (Path(o["root"]) / o["val_split"] / "images").is_dir():
        val_set, _, _ = dataset("folder", o["root"], o["val_split"], L, None, ignore)
    train_set = limit(train_set, o["train_limit"])
    if val_set is not None:
        val_set = limit(val_set, o["val_limit"])
    return train_set, val_set, L, class_names


def _train_config(o: dict, L: int):
    from crfrnn.engine.config import TrainConfig

    tc_names = {f for f in TrainConfig.__dataclass_fields__}
    tc: dict[str, Any] = {k: v for k, v in o.items() if k in tc_names and k not in _TRAIN_DEFAULTS}
    for key in ("lr", "momentum", "weight_decay", "schedule"):
        if o[key] is not None:
            tc[key] = o[key]
    tc.update(num_classes=L, batch_size=int(o["batch_size"]), epochs=int(o["epochs"]), max_steps=o["steps"],
              eval_every=int(o["eval_every"]), log_every=int(o["log_every"]),
              checkpoint_every=int(o["checkpoint_every"]), seed=int(o["seed"]), num_workers=int(o["num_workers"]),
              amp=bool(o["amp"]), device=str(o["device"]), ignore_index=int(o["ignore_index"]))
    if o["device"] != "auto":
        device(o["device"])
    return TrainConfig.paper("mean", **tc) if o["paper"] else TrainConfig(**tc)


def run(args) -> int:
    from crfrnn.engine.train import train
    from crfrnn.models.checkpoints import build_model, init_weights

    o = _merge_config(args)
    run_dir = _check_run(o)
    train_set, val_set, L, class_names = _data_sets(o)
    crf = {"num_iterations": int(o["crf_iterations"]), "num_test_iterations": int(o["crf_test_iterations"])}
    model = build_model(o["model"], L, crf if o["model"] in ("crfrnn", "tiny") else None)
    init = None
    if o["init"] is not None and not o["resume"]:
        init = init_weights(model, o["model"], need_file(Path(o["init"]), "--init file"))
    cfg = _train_config(o, L)
    sidecar = {"model": o["model"], "num_classes": L, "class_names": class_names, "crf": crf,
               "data": {"dataset": o["dataset"], "root": str(o["root"]), "train_split": o["train_split"],
                        "val_split": o["val_split"], "val_root": o["val_root"], "ignore_index": int(o["ignore_index"])},
               "init": str(o["init"]) if o["init"] else None}

    def write_sidecar(*_):
        if rank() == 0 and run_dir.is_dir() and not (run_dir / SIDECAR).exists():
            text = json.dumps(sidecar, indent=2) + "\n"
            atomic_write(run_dir / SIDECAR, lambda f: f.write(text.encode("utf-8")))

    say(args, f"training {o['model']} ({L} classes) on {len(train_set)} images of {o['root']}"
              + (f", validating on {len(val_set)}" if val_set is not None else "")
              + (f"; init from {o['init']} ({init})" if init else "") + f" -> {run_dir}")
    res = train(model, train_set, val_set, cfg, run_dir, resume=bool(o["resume"]), progress=show_progress(args),
                on_step=write_sidecar)
    write_sidecar()
    best = res.get("best_mean_iou")
    emit_json(args, {**res, "model": o["model"], "num_classes": L, "config": cfg.to_dict()})
    say(args, f"done: {res['step']} steps"
              + (f", best validation mean IU {100 * best:.2f}% at step {res['best_step']}" if best is not None else "")
              + f"; run folder {run_dir}")
    return EXIT_OK
