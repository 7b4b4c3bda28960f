"""``crfrnn train``: train FCN-8s / CRF-RNN (flags or a JSON --config); torchrun-able.

The flags are generated from two dataclasses, the single source of their defaults and help:
:class:`TrainOptions` (data, model, run folder: what only the command needs) and
:class:`crfrnn.engine.config.TrainConfig` (the training run's hyper-parameters). ``--config FILE.json`` sets the
defaults of both; flags given on the command line override it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from crfrnn.engine.config import TrainConfig
from crfrnn.engine.runfiles import CONFIG_FILE
from crfrnn.models.checkpoints import CRF_KINDS, SIDECAR, TRAIN_KINDS

from ._args import add_common, parse_size, positive_float, positive_int
from ._common import EXIT_OK, UsageError, device, emit_json, keep_freed_memory, need_file, note, say, show_progress
from ._dataclass_args import add_dataclass_arguments, given, read_config
from ._datasets import DATASETS, dataset, limit

NAME = "train"
HELP = "train FCN-8s / CRF-RNN"
DESCRIPTION = ("Train with SGD on softmax cross-entropy (crfrnn.train.train) and write a run folder "
               "(config.json, metrics.jsonl, last.pt, best.pt, model.json). Settings come from flags or a "
               "JSON --config whose keys are the flag names (e.g. {\"dataset\": \"voc\", \"steps\": 1000}); flags "
               "override the file. The training flags are the fields of crfrnn.train.TrainConfig. Under torchrun "
               "every process runs this command and train() distributes itself (DDP, one process per GPU).")
EPILOG = ("examples:\n"
          "  crfrnn train --dataset voc --root VOC2012 --model fcn8s --init vgg16.pth --run-dir runs/fcn \\\n"
          "      --steps 100000 --lr 1e-4 --crop-size 500\n"
          "  crfrnn train --dataset voc --root VOC2012 --model crfrnn --init runs/fcn/best.pt --run-dir runs/crf "
          "--paper\n"
          "  crfrnn train --run-dir runs/b --resume              # settings from the run folder\n"
          "  crfrnn train --run-dir runs/b --resume --steps 200000  # extend it\n"
          "  torchrun --nproc_per_node=2 -m crfrnn train --config train.json\n"
          "  crfrnn train --dataset folder --root my_data --num-classes 6 --model tiny --steps 20 "
          "--run-dir runs/smoke\n\n"
          "--model tiny is a smoke-test network (three small convolutions + CRF-RNN), for checking a set-up in "
          "seconds, not for real use.")

#: Other names of TrainConfig fields: flag -> field (``--steps`` and the ``--config`` key ``steps``).
_ALIASES = {"max_steps": ["--steps"]}
_CONFIG_ALIASES = {"steps": "max_steps"}
#: The --model kinds that have a CRF (and take its options).
_CRF_MODELS = tuple(k for k in TRAIN_KINDS if k in CRF_KINDS)


@dataclass
class TrainOptions:
    """The settings of ``crfrnn train`` that are not :class:`TrainConfig` fields (each field's help: its
    ``metadata``)."""

    dataset: str = field(default="voc", metadata={"help": "data set kind", "choices": DATASETS})
    root: str | None = field(default=None, metadata={
        "help": "data set folder (voc: devkit, SBD or images/+masks/; camvid: split folders; folder: "
                "images/+masks/)", "metavar": "DIR"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    val_split: str = field(default="val", metadata={"help": "validation split ('' for none)"})
    val_root: str | None = field(default=None, metadata={
        "help": "separate validation folder (--dataset folder)", "metavar": "DIR"})
    model: str = field(default="crfrnn", metadata={"help": "network", "choices": TRAIN_KINDS})
    unary_scale: float = field(default=1.0, metadata={
        "help": "the unary network runs on the image resized by this factor, its logits are upsampled back "
                "(crfrnn, tiny, tiny-fcn; recorded in model.json)", "type": positive_float, "metavar": "S"})
    init: str | None = field(default=None, metadata={
        "help": "initial weights: a crfrnn checkpoint, crfasrnn_weights.pth, the Keras .h5, or a torchvision "
                "VGG-16 state dict (for fcn8s/crfrnn)", "metavar": "W"})
    run_dir: str | None = field(default=None, metadata={
        "help": "run folder (must be new or empty unless --resume)", "metavar": "DIR"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --run-dir with its saved settings (other flags only to extend it: --steps)"})
    paper: bool = field(default=False, metadata={
        "help": "the paper's recipe (TrainConfig.paper, mean-loss form): momentum 0.99, fixed lr, CRF lr "
                "multipliers 10000/10000/1000; TrainConfig flags override it"})
    crop_size: tuple[int, int] | None = field(default=None, metadata={
        "help": "random crops (padded with ignore)", "type": parse_size, "metavar": "N|HxW"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    train_limit: int | None = field(default=None, metadata={
        "help": "use the first N training images", "type": positive_int})
    val_limit: int | None = field(default=None, metadata={
        "help": "use the first N validation images", "type": positive_int})
    crf_iterations: int = field(default=5, metadata={
        "help": "mean-field iterations in training", "type": positive_int})
    crf_test_iterations: int = field(default=10, metadata={
        "help": "mean-field iterations at evaluation", "type": positive_int})


def add_arguments(t) -> None:
    t.add_argument("--config", metavar="JSON", help="JSON file of settings (keys = flag names, dashes or "
                                                     "underscores); flags override it")
    add_dataclass_arguments(t.add_argument_group("data, model and run folder"), TrainOptions)
    add_dataclass_arguments(t.add_argument_group("training (crfrnn.train.TrainConfig)"), TrainConfig,
                            aliases=_ALIASES)
    add_common(t, device=None)  # --device is TrainConfig.device


def settings(args) -> tuple[TrainOptions, dict]:
    """(options, TrainConfig keywords): the dataclasses' defaults, overridden by --config, overridden by flags.

    With ``--resume`` the run folder's settings (``model.json``'s options, ``config.json``) take the place of the
    defaults; flags (or --config keys) that contradict them are refused, except a new length (``--steps``,
    ``--epochs``), which extends the run."""
    from_file = [{}, {}]
    if getattr(args, "config", None) is not None:
        from_file = read_config(Path(args.config), [TrainOptions, TrainConfig], _CONFIG_ALIASES)
    opts_given, tc_given = {**from_file[0], **given(args, TrainOptions)}, {**from_file[1], **given(args, TrainConfig)}
    saved = _saved_run(opts_given) if opts_given.get("resume") else None
    if saved is None:
        return TrainOptions(**opts_given), tc_given
    _check_contradictions(Path(opts_given["run_dir"]), saved, opts_given, tc_given)
    return TrainOptions(**{**saved[0], **opts_given}), {**saved[1], **tc_given}


def _saved_run(opts_given: dict) -> tuple[dict, dict] | None:
    """(options, TrainConfig dict) saved in the run folder named by ``--run-dir``; None when it holds none."""
    from crfrnn.engine.runfiles import read_config_json
    from crfrnn.models.checkpoints import read_sidecar

    run_dir = opts_given.get("run_dir")
    if run_dir is None or not (Path(run_dir) / CONFIG_FILE).is_file():
        return None
    options = read_sidecar(run_dir).get("options")
    if not isinstance(options, dict):
        return None  # a run of an older version: every flag must be given again
    names = {f.name for f in dataclasses.fields(TrainOptions)} - {"run_dir", "resume"}
    return {k: v for k, v in options.items() if k in names}, read_config_json(Path(run_dir) / CONFIG_FILE)


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as read back from the run folder


def _check_contradictions(run_dir: Path, saved: tuple[dict, dict], opts_given: dict, tc_given: dict) -> None:
    from crfrnn.engine.runfiles import RESUMABLE_CHANGES

    clashes = [f"--{k.replace('_', '-')} {given_v!r} (the run has {saved_d.get(k)!r})"
               for saved_d, given_d, skip in ((saved[0], opts_given, ("run_dir", "resume")),
                                              (saved[1], tc_given, RESUMABLE_CHANGES))
               for k, given_v in given_d.items()
               if k not in skip and k in saved_d and _as_json(given_v) != _as_json(saved_d[k])]
    if clashes:
        raise UsageError(f"cannot resume {run_dir}: {'; '.join(clashes)}; a resumed run keeps its settings "
                         f"(model.json, config.json) except its length (--steps, --epochs); drop these flags or "
                         f"start a new --run-dir")


def _check_run(opts: TrainOptions) -> Path:
    if opts.run_dir is None:
        raise UsageError("--run-dir is required (the folder that receives config.json, metrics.jsonl, last.pt, "
                         "best.pt)")
    run_dir = Path(opts.run_dir)
    if not opts.resume and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"--run-dir {run_dir} exists and is not empty; pass --resume to continue it or choose a new "
                         f"folder (runs are never overwritten)")
    if opts.resume and not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"cannot resume: {run_dir} is not a run folder (no config.json)" if run_dir.is_dir()
                         else f"cannot resume: --run-dir {run_dir} does not exist")
    if opts.model not in TRAIN_KINDS:
        raise UsageError(f"--model must be one of {', '.join(TRAIN_KINDS)}, got {opts.model!r}")
    if opts.model == "fcn8s" and opts.unary_scale != 1.0:
        raise UsageError(f"--unary-scale {opts.unary_scale:g} needs --model crfrnn, tiny or tiny-fcn (fcn8s has none)")
    return run_dir


def _train_config(opts: TrainOptions, tc: dict) -> TrainConfig:
    """The TrainConfig (checked before any data is read); ``num_classes`` is set from the data set later."""
    if tc.get("device", "auto") != "auto":
        device(tc["device"])  # the other commands' message for a device that is not there
    if opts.resume and _saved_run({"run_dir": opts.run_dir}) is not None:
        cfg = TrainConfig(**tc)  # the run's own config (--paper already applied when it started)
    else:
        cfg = TrainConfig.paper("mean", **tc) if opts.paper else TrainConfig(**tc)
    if cfg.learn_bandwidths and opts.model not in _CRF_MODELS:
        raise UsageError(f"--learn-bandwidths needs a model with a CRF ({' or '.join(_CRF_MODELS)}), "
                         f"got --model {opts.model}")
    return cfg


def _data_sets(args, opts: TrainOptions, num_classes: int | None, ignore: int):
    """(training set, validation set or None, L, class names)."""
    from crfrnn import data

    tf = []
    if opts.crop_size is not None:
        crop = opts.crop_size
        crop = parse_size(str(crop)) if not isinstance(crop, (list, tuple)) else tuple(crop)
        tf.append(data.RandomCrop(crop, ignore_index=ignore))
    if opts.flip:
        tf.append(data.RandomHorizontalFlip())
    train_set, L, class_names = dataset(opts.dataset, opts.root, opts.train_split, num_classes,
                                        data.Compose(tf) if tf else None, ignore)
    val_set = None
    if opts.val_root is not None:
        val_set, _, _ = dataset(opts.dataset, opts.val_root, None, L, None, ignore)
    elif opts.val_split and opts.dataset != "folder":
        val_set, _, _ = dataset(opts.dataset, opts.root, opts.val_split, L, None, ignore)
    elif opts.val_split and opts.dataset == "folder" and (Path(opts.root) / opts.val_split / "images").is_dir():
        val_set, _, _ = dataset("folder", opts.root, opts.val_split, L, None, ignore)
    elif opts.dataset == "folder":
        why = f"{Path(opts.root) / opts.val_split / 'images'} does not exist" if opts.val_split else "--val-split ''"
        note(args, f"no validation set ({why}; give --val-split NAME or --val-root DIR): the run is not evaluated "
                   f"and writes no best.pt")
    train_set = limit(train_set, opts.train_limit)
    if val_set is not None:
        val_set = limit(val_set, opts.val_limit)
    return train_set, val_set, L, class_names


def _sidecar(opts: TrainOptions, L: int, class_names: list[str], crf: dict, ignore: int) -> dict:
    """model.json: what segment, eval and show-compat need to know about the run's model and data, and the
    command's options (what ``--resume`` reads back)."""
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("run_dir", "resume")}
    return {"model": opts.model, "num_classes": L, "class_names": class_names, "crf": crf,
            "unary_scale": opts.unary_scale,
            "data": {"dataset": opts.dataset, "root": str(opts.root), "train_split": opts.train_split,
                     "val_split": opts.val_split, "val_root": opts.val_root, "ignore_index": ignore},
            "init": str(opts.init) if opts.init else None, "options": options}


def run(args) -> int:
    from crfrnn.engine.state import seed_all
    from crfrnn.engine.train import train
    from crfrnn.models.checkpoints import build_model, init_weights

    opts, tc = settings(args)
    keep_freed_memory()  # every step allocates the same sizes: reuse them rather than fault them in again
    run_dir = _check_run(opts)
    cfg = _train_config(opts, tc)
    train_set, val_set, L, class_names = _data_sets(args, opts, cfg.num_classes, cfg.ignore_index)
    cfg = dataclasses.replace(cfg, num_classes=L)
    crf = {"num_iterations": opts.crf_iterations, "num_test_iterations": opts.crf_test_iterations}
    if cfg.learn_bandwidths:  # in model.json too, so that the loader rebuilds the log_theta_* parameters
        crf["learn_bandwidths"] = True
    seed_all(cfg.seed)  # the initial weights are a function of --seed (train() then reseeds with seed + rank)
    model = build_model(opts.model, L, crf if opts.model in _CRF_MODELS else None, unary_scale=opts.unary_scale)
    init = None
    if opts.init is not None and not opts.resume:
        init = init_weights(model, opts.model, need_file(Path(opts.init), "--init file"))
    sidecar = (json.dumps(_sidecar(opts, L, class_names, crf, cfg.ignore_index), indent=2) + "\n").encode("utf-8")
    say(args, f"training {opts.model} ({L} classes) on {len(train_set)} images of {opts.root}"
              + (f", validating on {len(val_set)}" if val_set is not None else "")
              + (f"; init from {opts.init} ({init})" if init else "") + f" -> {run_dir}")
    res = train(model, train_set, val_set, cfg, run_dir, resume=opts.resume, progress=show_progress(args),
                run_files={SIDECAR: sidecar})
    best = res.get("best_mean_iou")
    emit_json(args, {**res, "model": opts.model, "num_classes": L, "config": cfg.to_dict()})
    say(args, f"done: {res['step']} steps"
              + (f", best validation mean IU {100 * best:.2f}% at step {res['best_step']}" if best is not None else "")
              + f"; run folder {run_dir}")
    return EXIT_OK
