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

**Boundary bands (trimap IU).** :func:`trimap_confusion` gives one confusion matrix per band of pixels within
``r`` px of a ground-truth boundary (the trimap of Kohli et al. 2009, which Krähenbühl and Koltun 2011 use to
show where a dense CRF acts); they add up over a data set like :func:`confusion_matrix`'s. See
:func:`boundary_mask` and :func:`boundary_distance2` for the definitions.
"""

from __future__ import annotations

import math
import numbers
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
    "TRIMAP_RADII",
    "boundary_mask",
    "boundary_distance2",
    "trimap_confusion",
]

#: Widths (px) of the boundary bands of :func:`trimap_confusion`.
TRIMAP_RADII = (2, 4, 8, 16)


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


def _check_labels(target: Tensor, name: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of labels (..., H, W), got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer labels, got dtype {target.dtype} with shape {tuple(target.shape)}")
    if target.ndim < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {tuple(target.shape)}")


def _pair_slices(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of the pixels p and of q = p + (dy, dx), over the p whose q lies in an h x w image."""
    ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
    yq, xq = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
    return (ys, xs), (yq, xq)


def boundary_mask(target: Tensor, *, ignore_index: int | None = 255, connectivity: int = 8) -> Tensor:
    """Ground-truth boundary pixels: labelled pixels with a labelled neighbour of another label.

    Neighbours are the 8 surrounding pixels (``connectivity=8``, the default: a diagonal contact between two
    regions is a boundary too) or the 4 edge-sharing ones (``connectivity=4``). Both pixels of a differing pair
    are boundary pixels, so a straight edge is two pixels wide. Pixels labelled ``ignore_index`` are never
    boundary pixels and make none: a region next to a void (unlabelled) band has no boundary there, since its
    true extent is unknown. The image border is no boundary.

    Args:
        target: integer labels (..., H, W); leading axes are separate images.

    Returns:
        bool tensor of ``target``'s shape.
    """
    _check_labels(target, "target")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    h, w = target.shape[-2:]
    t = target.reshape(-1, h, w)
    labelled = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    edge = torch.zeros_like(t, dtype=torch.bool)
    offsets = ((0, 1), (1, 0)) + (((1, 1), (1, -1)) if connectivity == 8 else ())
    for dy, dx in offsets:  # each unordered neighbour pair once
        (ys, xs), (yq, xq) = _pair_slices(dy, dx, h, w)
        differ = (t[:, ys, xs] != t[:, yq, xq]) & labelled[:, ys, xs] & labelled[:, yq, xq]
        edge[:, ys, xs] |= differ
        edge[:, yq, xq] |= differ
    return edge.reshape(target.shape)


def boundary_distance2(boundary: Tensor, max_distance: int) -> Tensor:
    """Squared Euclidean distance (in px, between pixel centres) from every pixel to the nearest ``True`` pixel
    of ``boundary`` (..., H, W), exact up to ``max_distance``; farther pixels (or images without boundary) get a
    value above ``max_distance ** 2``. Int64, ``boundary``'s shape.

    Separable and truncated: the nearest boundary pixel in each row (running maxima of column indices), then
    the minimum over the rows within ``max_distance`` of ``dy**2`` plus that row's squared column distance.
    """
    if not isinstance(boundary, Tensor) or boundary.dtype != torch.bool or boundary.ndim < 2:
        got = f"{boundary.dtype} {tuple(boundary.shape)}" if isinstance(boundary, Tensor) else type(boundary).__name__
        raise TypeError(f"boundary must be a bool tensor (..., H, W), got {got}")
    if isinstance(max_distance, bool) or not isinstance(max_distance, numbers.Integral) or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative int, got {max_distance!r}")
    R = int(max_distance)
    far = R * R + 1  # 'farther than R'; the minima below never return more
    h, w = boundary.shape[-2:]
    b = boundary.reshape(-1, h, w)
    # in each row, the column distance to the nearest boundary pixel on the left and on the right (running maxima)
    x = torch.arange(w, device=b.device)
    none = torch.tensor(-(w + R + 1), device=b.device)  # no boundary pixel: a distance above R either way
    left = x - torch.where(b, x, none).cummax(-1).values
    right = torch.where(b, -x, none).flip(-1).cummax(-1).values.flip(-1).neg() - x
    dx = torch.minimum(left, right)
    row = torch.where(dx <= R, dx * dx, far)
    dist = row.clone()
    for dy in range(-min(R, h - 1), min(R, h - 1) + 1):
        if dy == 0:
            continue
        (ys, xs), (yq, xq) = _pair_slices(dy, 0, h, w)
        dist[:, ys, xs] = torch.minimum(dist[:, ys, xs], row[:, yq, xq] + dy * dy)
    return dist.reshape(boundary.shape)


def _check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(radii)
    except TypeError:
        raise TypeError(f"radii must be a sequence of numbers, got {type(radii).__name__}") from None
    if not out or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r < 0
                      for r in out):
        raise ValueError(f"radii must be a non-empty sequence of finite numbers >= 0, got {radii!r}")
    return out


def trimap_confusion(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    radii: Sequence[float] = TRIMAP_RADII,
    *,
    ignore_index: int | None = 255,
    connectivity: int = 8,
) -> Tensor:
    """Confusion matrices of the boundary bands (trimap): one per radius ``r``, over the labelled pixels whose
    centre lies within Euclidean distance ``r`` of a ground-truth boundary pixel's (:func:`boundary_mask`, with
    ``ignore_index`` and ``connectivity``). The distance is geometric: a band reaches across void pixels (which
    themselves are never counted). Boundaries are found per image (the last two axes), so a padded batch whose
    padding is ``ignore_index`` gives the sum of its images' matrices.

    Args:
        pred, target: integer labels of one shape (..., H, W), e.g. (B, H, W); as :func:`confusion_matrix`.
        num_classes: L.
        radii: band widths in px (default :data:`TRIMAP_RADII`); 0 counts the boundary pixels only.

    Returns:
        (len(radii), L, L) int64 on ``pred``'s device; ``[k]`` is the confusion matrix of band ``radii[k]``. Sum it
        over images, then take :func:`mean_iou` / :func:`class_iou` of each ``[k]``.
    """
    radii = _check_radii(radii)
    _check_labels(pred, "pred")
    _check_labels(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)}")
    target = target.to(pred.device)
    confusion_matrix(pred, target, num_classes, ignore_index)  # validates the labels
    d2 = boundary_distance2(boundary_mask(target, ignore_index=ignore_index, connectivity=connectivity),
                            int(math.floor(max(radii))))
    # bands are nested: count each pixel once in the narrowest band holding it (index K: none), then sum up
    order = sorted(range(len(radii)), key=lambda k: radii[k])
    K, L = len(radii), num_classes
    r2 = torch.tensor([float(radii[k]) ** 2 for k in order], dtype=torch.float64, device=d2.device)
    band = torch.bucketize(d2.to(torch.float64), r2)  # first k with d2 <= r2[k]
    t = target.to(torch.int64)
    if ignore_index is not None:
        band = torch.where(t == ignore_index, K, band)
        t = torch.where(t == ignore_index, 0, t)
    codes = (band * L + t) * L + pred.to(torch.int64)
    counts = torch.bincount(codes.reshape(-1), minlength=(K + 1) * L * L)[: K * L * L]
    nested = counts.reshape(K, L, L).cumsum(0)
    return nested[torch.tensor(order, device=d2.device).argsort()]
