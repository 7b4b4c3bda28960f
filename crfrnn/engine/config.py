"""The configuration of a training run: :class:`TrainConfig`, one dataclass that is the single source of the
defaults (the ``crfrnn train`` flags are generated from it)."""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

__all__ = ["TrainConfig", "PAPER_LR_SUM", "PAPER_NUM_PIXELS"]

#: Base learning rate of the CRF-RNN paper (summed loss, batch 1).
PAPER_LR_SUM = 1e-13
#: Pixels of one training input in the paper (500 x 500 padded crops).
PAPER_NUM_PIXELS = 500 * 500

_SCHEDULES = ("poly", "fixed")
_REDUCTIONS = ("mean", "sum")
_CRF_KEYS = {
    "crf_spatial": "spatial_ker_weights",
    "crf_bilateral": "bilateral_ker_weights",
    "crf_compat": "compatibility_matrix",
    "crf_theta": "log_theta_",
}



# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable, see :meth:`to_dict`).

    Each field's meaning is its ``metadata["help"]`` (``dataclasses.fields(TrainConfig)``); the ``crfrnn train``
    flags and their help are generated from these fields (``--max-steps``, ``--crf-compat-lr-mult``, ...).
    """

    num_classes: int | None = field(default=None, metadata={
        "help": "number of classes L; None: taken from the model's logits (crfrnn train: from the data set)"})
    lr: float = field(default=1e-3, metadata={"help": "base learning rate (before multipliers and schedule)"})
    momentum: float = field(default=0.9, metadata={
        "help": "SGD momentum (the paper: 0.99; 0.9 is the usual choice for a mean loss)"})
    weight_decay: float = field(default=5e-4, metadata={
        "help": "L2 weight decay of the weights (not of biases, see bias_weight_decay)"})
    batch_size: int = field(default=1, metadata={"help": "images per step per process"})
    epochs: int = field(default=1, metadata={"help": "passes over the training set; ignored when max_steps is set"})
    max_steps: int | None = field(default=None, metadata={
        "help": "total optimiser steps; None: epochs x steps per epoch"})
    schedule: str = field(default="poly", metadata={
        "help": "learning-rate schedule: poly (lr x (1 - step / total) ** poly_power) or fixed",
        "choices": _SCHEDULES})
    poly_power: float = field(default=0.9, metadata={"help": "exponent of the poly schedule"})
    loss_reduction: str = field(default="mean", metadata={
        "help": "mean over the labelled pixels of the (global) batch, or sum (Caffe's normalize: false, as in the "
                "paper)", "choices": _REDUCTIONS})
    bias_lr_mult: float = field(default=2.0, metadata={
        "help": "learning-rate multiplier of biases (FCN's Caffe recipe: 2)"})
    bias_weight_decay: float = field(default=0.0, metadata={
        "help": "weight decay of biases (FCN's Caffe recipe: 0)"})
    crf_spatial_lr_mult: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the CRF's spatial_ker_weights (the paper: 10000)"})
    crf_bilateral_lr_mult: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the CRF's bilateral_ker_weights (the paper: 10000)"})
    crf_compat_lr_mult: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the CRF's compatibility_matrix (the paper: 1000)"})
    learn_bandwidths: bool = field(default=False, metadata={
        "help": "learn the CRF's kernel widths theta_alpha, theta_beta, theta_gamma (log-parameterised: "
                "log_theta_*; crfrnn train builds the model with CrfRnn(learn_bandwidths=True))"})
    crf_theta_lr_mult: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier of the CRF's log_theta_* (no weight decay: it would pull every width "
                "to 1 px); a step of lr x mult x dL/dlog(theta) changes a width by that fraction, so 1 keeps "
                "the base lr's relative steps"})
    crf_weight_decay: float | None = field(default=None, metadata={
        "help": "weight decay of the CRF parameters; None: weight_decay"})
    grad_clip: float | None = field(default=None, metadata={
        "help": "clip the global gradient norm to this value; None: no clipping"})
    amp: bool = field(default=False, metadata={
        "help": "mixed precision (torch.autocast: bfloat16 on CPU, float16 with a GradScaler on CUDA); the loss is "
                "always computed in float32"})
    seed: int = field(default=0, metadata={
        "help": "seeds the global RNGs and determines the data order and augmentations"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when available), cpu, cuda, cuda:1, ...; under torchrun on CUDA each process uses "
                "cuda:LOCAL_RANK"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluate on the validation set every this many steps; 0: at the end of every epoch (always also "
                "at the end of training)"})
    eval_batch_size: int = field(default=1, metadata={"help": "batch size of evaluation"})
    log_every: int = field(default=10, metadata={
        "help": "write a training line to metrics.jsonl every this many steps"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "write last.pt every this many steps; 0: only at the end of every epoch, after every evaluation "
                "and at the end of training"})
    ignore_index: int = field(default=255, metadata={"help": "label of unlabelled pixels (no loss, not counted)"})

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                extra = " or None" if optional else ""
                raise ValueError(f"TrainConfig.{name} must be an int >= {lo}{extra}, got {v!r}")

        def need_float(name: str, lo: float, strict: bool, optional: bool = False, hi: float | None = None) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if strict else v >= lo) and (hi is None or v < hi)
            if not ok:
                bound = f"{'>' if strict else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
                raise ValueError(f"TrainConfig.{name} must be a finite number {bound}, got {v!r}")
            setattr(self, name, float(v))

        need_int("num_classes", 1, optional=True)
        need_float("lr", 0.0, strict=True)
        need_float("momentum", 0.0, strict=False, hi=1.0)
        need_float("weight_decay", 0.0, strict=False)
        need_int("batch_size", 1)
        need_int("epochs", 1)
        need_int("max_steps", 1, optional=True)
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        need_float("poly_power", 0.0, strict=True)
        if self.loss_reduction not in _REDUCTIONS:
            raise ValueError(f"TrainConfig.loss_reduction must be one of {_REDUCTIONS}, got {self.loss_reduction!r}")
        for name in ("bias_lr_mult", "bias_weight_decay", "crf_spatial_lr_mult", "crf_bilateral_lr_mult",
                     "crf_compat_lr_mult", "crf_theta_lr_mult"):
            need_float(name, 0.0, strict=False)
        if not isinstance(self.learn_bandwidths, bool):
            raise ValueError(f"TrainConfig.learn_bandwidths must be a bool, got {self.learn_bandwidths!r}")
        need_float("crf_weight_decay", 0.0, strict=False, optional=True)
        need_float("grad_clip", 0.0, strict=True, optional=True)
        if not isinstance(self.amp, bool):
            raise ValueError(f"TrainConfig.amp must be a bool, got {self.amp!r}")
        need_int("seed", 0)
        need_int("num_workers", 0)
        if not isinstance(self.device, str):
            raise ValueError(f"TrainConfig.device must be a str, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"TrainConfig.device {self.device!r} is not a device: {e}") from e
        need_int("eval_every", 0)
        need_int("eval_batch_size", 1)
        need_int("log_every", 1)
        need_int("checkpoint_every", 0)
        need_int("ignore_index", -(2**31))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"TrainConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def paper(cls, loss_reduction: str = "sum", num_pixels: int = PAPER_NUM_PIXELS, **overrides: Any) -> "TrainConfig":
        """The CRF-RNN paper's recipe (see the module docstring).

        Args:
            loss_reduction: ``"sum"``: literally the paper (lr 1e-13, weight decay
                5e-4, summed loss). ``"mean"``: the same SGD steps with a mean
                loss: lr 1e-13 x ``num_pixels``, weight decay 5e-4 / ``num_pixels``.
                Exact when every batch has ``num_pixels`` labelled pixels.
            num_pixels: labelled pixels per batch used for the conversion
                (default 500 x 500, the paper's input size).
            overrides: any other TrainConfig field.
        """
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {loss_reduction!r}")
        if isinstance(num_pixels, bool) or not isinstance(num_pixels, int) or num_pixels < 1:
            raise ValueError(f"num_pixels must be a positive int, got {num_pixels!r}")
        scale = num_pixels if loss_reduction == "mean" else 1
        base = dict(
            lr=PAPER_LR_SUM * scale,
            momentum=0.99,
            weight_decay=5e-4 / scale,
            batch_size=1,
            schedule="fixed",
            loss_reduction=loss_reduction,
            bias_lr_mult=2.0,
            bias_weight_decay=0.0,
            crf_spatial_lr_mult=10000.0,
            crf_bilateral_lr_mult=10000.0,
            crf_compat_lr_mult=1000.0,
        )
        base.update(overrides)
        return cls(**base)


def _json_normalise(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, sort_keys=True))


