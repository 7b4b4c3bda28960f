"""One optimisation step and what it needs: SGD parameter groups, the learning-rate schedule, the loss and
:func:`train_step` (forward under autocast, loss, backward, gradient clipping, optimiser step, written once
for runs with and without a ``GradScaler``).

Loss: softmax cross-entropy over labelled pixels (``ignore_index`` excluded), computed in float32 even under
autocast (in float64 for a float64 model). ``"mean"`` divides by the labelled pixels of the *global* batch
(all ranks), ``"sum"`` does not (Caffe's ``normalize: false``, as in the CRF-RNN paper). Under DDP, which
averages gradients over ranks, the local loss is multiplied by the world size, so N processes take the same
step as one process on the combined batch.
"""

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn.engine.config import _CRF_KEYS, TrainConfig
from crfrnn.engine.distributed import all_reduce, unwrap
from crfrnn.engine.evaluate import check_logits, forward

__all__ = ["param_groups", "lr_factor", "train_step", "StepOutput", "make_scaler", "amp_dtype"]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """SGD parameter groups: CRF kernel weights / compatibility / widths, other CRF parameters, biases, the rest.

    A parameter named ``*spatial_ker_weights*`` goes to group ``crf_spatial``,
    ``*bilateral_ker_weights*`` to ``crf_bilateral``, ``*compatibility_matrix*``
    to ``crf_compat`` (learning-rate multipliers ``cfg.crf_*_lr_mult``, weight
    decay ``cfg.crf_weight_decay``); ``*log_theta_*`` (the kernel widths of
    ``CrfRnn(learn_bandwidths=True)``) to ``crf_theta`` (multiplier
    ``cfg.crf_theta_lr_mult``, no weight decay: it would pull log θ to 0, every
    width to 1 pixel); any other parameter under a ``crfrnn.``
    module to ``crf`` (multiplier 1); a ``bias`` to ``bias`` (multiplier
    ``cfg.bias_lr_mult``, weight decay ``cfg.bias_weight_decay``); everything
    else to ``weight``. Frozen parameters (``requires_grad=False``) are left
    out, and so are empty groups. Each group dict has ``name``, ``params``,
    ``lr_mult``, ``lr`` (= ``cfg.lr x lr_mult``) and ``weight_decay``.

    Raises:
        ValueError: ``cfg.learn_bandwidths`` is set but the model has no trainable ``log_theta_*`` (it would
            silently train fixed widths), or the model has no trainable parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    crf_wd = cfg.weight_decay if cfg.crf_weight_decay is None else cfg.crf_weight_decay
    spec = {
        "crf_spatial": (cfg.crf_spatial_lr_mult, crf_wd),
        "crf_bilateral": (cfg.crf_bilateral_lr_mult, crf_wd),
        "crf_compat": (cfg.crf_compat_lr_mult, crf_wd),
        "crf_theta": (cfg.crf_theta_lr_mult, 0.0),
        "crf": (1.0, crf_wd),
        "bias": (cfg.bias_lr_mult, cfg.bias_weight_decay),
        "weight": (1.0, cfg.weight_decay),
    }
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in spec}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            buckets[_group_of(name)].append(p)
    if cfg.learn_bandwidths and not buckets["crf_theta"]:
        raise ValueError("cfg.learn_bandwidths is set but the model has no trainable log_theta_* parameters; "
                         "build its CrfRnn with learn_bandwidths=True")
    groups = []
    for g, params in buckets.items():
        if params:
            mult, wd = spec[g]
            groups.append({"name": g, "params": params, "lr_mult": mult, "lr": cfg.lr * mult, "weight_decay": wd})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def _group_of(name: str) -> str:
    group = next((g for g, key in _CRF_KEYS.items() if key in name), None)
    if group is not None:
        return group
    if name.startswith("crfrnn.") or ".crfrnn." in name:
        return "crf"
    if name == "bias" or name.endswith(".bias"):
        return "bias"
    return "weight"


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Schedule factor for the update that follows ``step`` completed steps (the default schedule hook of
    :func:`crfrnn.engine.train`).

    ``"fixed"``: 1. ``"poly"``: ``(1 - step / total_steps) ** cfg.poly_power``.
    """
    if cfg.schedule == "fixed":
        return 1.0
    return max(0.0, 1.0 - step / total_steps) ** cfg.poly_power


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype: float16 on CUDA (with a GradScaler), bfloat16 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for float16 autocast (``cfg.amp`` on CUDA). A disabled scaler passes the loss,
    the gradients and ``optimizer.step()`` through unchanged, so :func:`train_step` has one path."""
    return torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")


class StepOutput(NamedTuple):
    """``loss``: the loss of the global batch (detached float64 scalar, as ``cfg.loss_reduction`` defines it);
    ``num_classes``: L of the logits."""

    loss: Tensor
    num_classes: int


def _loss(logits: Tensor, masks: Tensor, cfg: TrainConfig, world: int) -> tuple[Tensor, Tensor]:
    """(the loss to differentiate on this rank, the detached loss of the global batch)."""
    if logits.dtype != torch.float64:  # float16 / bfloat16 logits of autocast: the loss in float32
        logits = logits.float()
    loss_sum = F.cross_entropy(logits, masks, ignore_index=cfg.ignore_index, reduction="sum")
    stats = torch.stack([loss_sum.detach().double(), (masks != cfg.ignore_index).sum().double()])
    stats = all_reduce(stats, world)  # global loss sum and labelled-pixel count
    if cfg.loss_reduction == "mean":
        # DDP averages gradients over ranks: x world / global count gives the mean over the global batch
        return loss_sum * (world / max(float(stats[1]), 1.0)), stats[0] / stats[1].clamp_min(1.0)
    return loss_sum * world, stats[0]


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    masks: Tensor,
    cfg: TrainConfig,
    *,
    valid_mask: Tensor | None = None,
    factor: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    world: int = 1,
    num_classes: int | None = None,
) -> StepOutput:
    """One SGD step of ``net`` on a batch: set the learning rates, forward, loss, backward, clip, step.

    Args:
        net: the model (or its DDP wrapper), in train mode.
        optimizer: with the groups of :func:`param_groups` (each has ``lr_mult``).
        images: (B, C, H, W) on the model's device.
        masks: (B, H, W) int64, ``cfg.ignore_index`` for unlabelled (and padded) pixels.
        cfg: ``lr``, ``amp``, ``grad_clip``, ``loss_reduction``, ``ignore_index`` are used.
        valid_mask: (B, 1, H, W) bool, passed to the model as ``valid_mask=`` when given (padded batches of
            models that accept it, see :mod:`crfrnn.engine.evaluate`).
        factor: schedule factor: every group's lr is ``cfg.lr x lr_mult x factor``.
        scaler: a :func:`make_scaler` GradScaler; ``None``: none (full-precision gradients).
        world: number of processes (the loss is normalised over the global batch).
        num_classes: L expected from the logits; ``None``: any.
    """
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g["lr_mult"] * factor
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=images.device.type, dtype=amp_dtype(images.device), enabled=cfg.amp):
        logits = forward(net, images, valid_mask)
    check_logits(logits, images, masks, num_classes)
    loss, global_loss = _loss(logits, masks, cfg, world)
    scaler = scaler if scaler is not None else _NO_SCALER
    scaler.scale(loss).backward()
    if cfg.grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    scaler.step(optimizer)  # optimizer.step(), skipped by an enabled scaler when the gradients overflowed
    scaler.update()
    return StepOutput(global_loss, int(logits.shape[1]))


_NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)
