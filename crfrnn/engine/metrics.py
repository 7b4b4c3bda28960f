"""Segmentation metrics computed from a confusion matrix.

Everything goes through one ``(L, L)`` integer confusion matrix ``conf`` with
rows = ground-truth class and columns = predicted class, so that counts from
many images (or many processes, via ``all_reduce``) simply add up.

Intersection over union (IU) of class ``c``, as in the FCN and CRF-RNN papers::

    IU_c = conf[c, c] / (conf[c, :].sum() + conf[:, c].sum() - conf[c, c])

**Mean IU convention.** :func:`mean_iou` averages ``IU_c`` over the classes whose
union is non-zero, i.e. the classes that occur in the ground truth *or* in the
prediction (over the non-ignored pixels counted). This is the PASCAL VOC
devkit / CRF-RNN paper convention when ``conf`` is accumulated over a whole
data set: a class absent from both the labels and the predictions has an
undefined IU and is left out, a class that is only predicted (a pure false
positive) counts with IU 0. Accumulate ``conf`` over the whole data set before
taking the mean; averaging per-image mean IUs gives a different number.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "class_iou",
    "mean_iou",
    "pixel_accuracy",
    "mean_class_accuracy",
    "format_iou_table",
]


def _check_conf(conf: Tensor) -> None:
    if not isinstance(conf, Tensor):
        raise TypeError(f"conf must be a torch.Tensor, got {type(conf).__name__}")
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] == 0:
        raise ValueError(f"conf must be a square (L, L) matrix with L >= 1, got shape {tuple(conf.shape)}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """Count (ground truth, prediction) label pairs.

    Args:
        pred: integer predicted labels, any shape, e.g. (B, H, W) — use
            ``logits.argmax(1)`` for (B, L, H, W) logits. Values in [0, L).
        target: integer ground-truth labels, same shape as ``pred``. Values in
            [0, L) or ``ignore_index``.
        num_classes: L.
        ignore_index: label of pixels that are not counted (``None``: none).

    Returns:
        (L, L) int64 tensor on ``pred``'s device, ``conf[t, p]`` = number of
        non-ignored pixels with ground truth ``t`` predicted as ``p``.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"pred and target must be torch.Tensors, got {type(pred).__name__} and {type(target).__name__}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got dtype {t.dtype} with shape {tuple(t.shape)}")
    pred = pred.reshape(-1).to(torch.int64)
    target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
    if ignore_index is not None:
        keep = target != ignore_index
        pred = pred[keep]
        target = target[keep]
    if target.numel() > 0:
        lo, hi = torch.aminmax(target)
        if lo.item() < 0 or hi.item() >= num_classes:
            raise ValueError(
                f"target holds labels outside [0, {num_classes}) other than ignore_index={ignore_index}: "
                f"min {lo.item()}, max {hi.item()}"
            )
        lo, hi = torch.aminmax(pred)
        if lo.item() < 0 or hi.item() >= num_classes:
            raise ValueError(f"pred holds labels outside [0, {num_classes}): min {lo.item()}, max {hi.item()}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def class_iou(conf: Tensor) -> Tensor:
    """Per-class intersection over union.

    Args:
        conf: (L, L) confusion matrix (rows ground truth, columns prediction).

    Returns:
        (L,) float64 tensor on ``conf``'s device; NaN for classes with an empty
        union (absent from both ground truth and prediction).
    """
    _check_conf(conf)
    conf = conf.to(torch.float64)
    inter = torch.diagonal(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def mean_iou(conf: Tensor) -> float:
    """Mean IU over the classes present in the ground truth or the prediction.

    Classes with an empty union are excluded (see the module docstring); an
    all-zero matrix gives NaN.
    """
    iou = class_iou(conf)
    present = ~torch.isnan(iou)
    if not bool(present.any()):
        return float("nan")
    return float(iou[present].mean())


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of counted pixels whose prediction is right (NaN when none counted)."""
    _check_conf(conf)
    total = conf.sum()
    if int(total) == 0:
        return float("nan")
    return float(torch.diagonal(conf).sum().to(torch.float64) / total.to(torch.float64))


def mean_class_accuracy(conf: Tensor) -> float:
    """Mean over ground-truth classes present of the per-class recall (FCN's "mean accuracy")."""
    _check_conf(conf)
    conf = conf.to(torch.float64)
    gt = conf.sum(1)
    present = gt > 0
    if not bool(present.any()):
        return float("nan")
    return float((torch.diagonal(conf)[present] / gt[present]).mean())


def format_iou_table(conf: Tensor, class_names: Sequence[str], *, row_name: str = "IU", digits: int = 1) -> str:
    """Per-class IU and mean IU as a table in the layout of the CRF-RNN paper's Table 4.

    One header line with the class names followed by ``Mean IU``, then one row
    (labelled ``row_name``) of per-class IU in percent and the mean IU in
    percent. Classes with an empty union show ``-``. The result is a Markdown
    table (columns separated by ``|``), readable as plain text too.

    Args:
        conf: (L, L) confusion matrix.
        class_names: L names, in label order.
        row_name: label of the value row (e.g. the method name).
        digits: decimals of the percentages.
    """
    _check_conf(conf)
    names = [str(n) for n in class_names]
    if len(names) != conf.shape[0]:
        raise ValueError(
            f"class_names has {len(names)} names but conf has shape {tuple(conf.shape)} ({conf.shape[0]} classes)"
        )
    iou = class_iou(conf).tolist()
    miou = mean_iou(conf)

    def pct(v: float) -> str:
        return "-" if v != v else f"{100.0 * v:.{digits}f}"

    header = ["", *names, "Mean IU"]
    row = [row_name, *(pct(v) for v in iou), pct(miou)]
    widths = [max(len(h), len(r)) for h, r in zip(header, row)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(header), rule, fmt(row)])
