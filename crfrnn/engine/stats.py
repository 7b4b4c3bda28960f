"""Paired bootstrap confidence intervals for the difference between two arms (methods) scored on the same images.

Each arm is given as per-image confusion matrices, ``(N, L, L)``, or ``(S, N, L, L)`` for S seeds (training runs)
of the arm, image ``n`` being the same image in every seed and in both arms. A score is computed the way a data
set's score is (:mod:`crfrnn.engine.metrics`): the per-image matrices of the images drawn are summed, then mean
IU (or pixel accuracy) is taken of the sum; with seeds, the arm's score is the mean of its seeds' scores.

:func:`paired_bootstrap` resamples the images with replacement (the same draw for both arms, which is what makes
the comparison paired: the images' difficulty cancels) and, with ``resample_seeds``, the seeds too (seed ``s`` of
one arm pairs with seed ``s`` of the other, e.g. a fine-tuned arm and the run it started from). The interval is
the percentile interval of the resampled differences ``score(b) - score(a)``.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import Tensor

__all__ = ["BootstrapResult", "paired_bootstrap", "mean_iou_many", "METRICS"]

#: Scores :func:`paired_bootstrap` can compare.
METRICS = ("mean_iou", "pixel_accuracy")
_CHUNK = 256  # resamples per vectorised step (bounds the (chunk, N) weight matrix)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """The outcome of :func:`paired_bootstrap`; scores are fractions (not percent)."""

    difference: float  #: point estimate, ``score_b - score_a`` on all images and seeds
    low: float  #: lower end of the percentile interval
    high: float  #: upper end
    score_a: float
    score_b: float
    confidence: float
    metric: str
    num_images: int
    num_seeds: int
    num_resamples: int
    resample_seeds: bool
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_iou_many(conf: Tensor) -> Tensor:
    """:func:`crfrnn.metrics.mean_iou` of many matrices at once: ``(..., L, L)`` -> ``(...)`` float64 (classes with
    an empty union left out, NaN where none is left)."""
    conf = conf.to(torch.float64)
    inter = torch.diagonal(conf, dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - inter
    present = union > 0
    iou = torch.where(present, inter / torch.where(present, union, torch.ones_like(union)), torch.zeros_like(union))
    count = present.sum(-1)
    return torch.where(count > 0, iou.sum(-1) / count.clamp_min(1), torch.full_like(iou[..., 0], float("nan")))


def _pixel_accuracy_many(conf: Tensor) -> Tensor:
    conf = conf.to(torch.float64)
    total = conf.sum((-2, -1))
    correct = torch.diagonal(conf, dim1=-2, dim2=-1).sum(-1)
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))


def _as_arms(conf_a: Tensor, conf_b: Tensor) -> tuple[Tensor, Tensor]:
    for name, c in (("conf_a", conf_a), ("conf_b", conf_b)):
        if not isinstance(c, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, L, L) or (S, N, L, L), got {type(c).__name__}")
        if c.dim() not in (3, 4) or c.shape[-1] != c.shape[-2] or c.shape[-1] == 0 or c.shape[-3] == 0:
            raise ValueError(f"{name} must have shape (N, L, L) or (S, N, L, L) with N, L >= 1, got {tuple(c.shape)}")
        if c.is_complex() or c.dtype == torch.bool:
            raise TypeError(f"{name} must hold counts, got dtype {c.dtype}")
        if bool((c < 0).any()) or not bool(torch.isfinite(c.to(torch.float64)).all()):
            raise ValueError(f"{name} must hold finite counts >= 0 (shape {tuple(c.shape)})")
    if conf_a.shape != conf_b.shape:
        raise ValueError(f"conf_a and conf_b must have the same shape (the same images, seeds and classes), got "
                         f"{tuple(conf_a.shape)} and {tuple(conf_b.shape)}")
    a, b = (c.to(torch.float64) for c in (conf_a, conf_b))
    if a.dim() == 3:
        a, b = a[None], b[None]
    if b.device != a.device:
        b = b.to(a.device)
    return a, b


def _check_options(num_resamples, confidence, seed, metric) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, numbers.Integral) or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive int, got {num_resamples!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _resampled_differences(a: Tensor, b: Tensor, score, num_resamples: int, resample_seeds: bool,
                           seed: int) -> Tensor:
    """(num_resamples,) float64 differences ``score(b) - score(a)`` over bootstrap draws."""
    S, N = a.shape[0], a.shape[1]
    # separate streams for images and seeds: the image draws do not depend on S
    g_img = torch.Generator().manual_seed(int(seed))
    g_seed = torch.Generator().manual_seed(int(seed) + 1)
    flat_a, flat_b = a.reshape(S, N, -1), b.reshape(S, N, -1)
    L = a.shape[-1]
    out = []
    for start in range(0, num_resamples, _CHUNK):
        n = min(_CHUNK, num_resamples - start)
        idx = torch.randint(0, N, (n, N), generator=g_img)
        weights = torch.zeros(n, N, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n, N, dtype=torch.float64))
        weights = weights.to(a.device)
        per_seed = [score(torch.einsum("rn,snk->rsk", weights, f).reshape(n, S, L, L)) for f in (flat_a, flat_b)]
        if resample_seeds and S > 1:
            pick = torch.randint(0, S, (n, S), generator=g_seed).to(a.device)
            per_seed = [torch.gather(p, 1, pick) for p in per_seed]
        out.append(per_seed[1].mean(1) - per_seed[0].mean(1))
    return torch.cat(out)


def paired_bootstrap(
    conf_a: Tensor,
    conf_b: Tensor,
    *,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    metric: str = "mean_iou",
    resample_seeds: bool = True,
) -> BootstrapResult:
    """Percentile bootstrap interval of ``score(b) - score(a)`` over images (and seeds), paired.

    Args:
        conf_a, conf_b: per-image confusion matrices of the two arms on the same images, ``(N, L, L)`` or
            ``(S, N, L, L)`` for S seeds (rows ground truth, as :func:`crfrnn.metrics.confusion_matrix`). For the
            boundary bands of :func:`crfrnn.metrics.trimap_confusion` pass one band at a time.
        num_resamples: bootstrap draws.
        confidence: coverage of the interval (0.95: the 2.5 and 97.5 percentiles).
        seed: seeds the draws; the same seed gives the same interval.
        metric: ``"mean_iou"`` (of the summed matrices, as a data set's) or ``"pixel_accuracy"``.
        resample_seeds: also draw the S seeds with replacement (pairs of seeds kept), so that the interval
            includes the spread between training runs; ``False`` keeps all seeds in every draw.

    Returns:
        :class:`BootstrapResult` with the point estimate on all images and the interval's ends.
    """
    a, b = _as_arms(conf_a, conf_b)
    _check_options(num_resamples, confidence, seed, metric)
    score = mean_iou_many if metric == "mean_iou" else _pixel_accuracy_many
    score_a, score_b = float(score(a.sum(1)).mean()), float(score(b.sum(1)).mean())
    if score_a != score_a or score_b != score_b:
        raise ValueError("conf_a or conf_b counts no pixel in some seed: the score is undefined")
    diffs = _resampled_differences(a, b, score, int(num_resamples), bool(resample_seeds), int(seed))
    tail = (1.0 - float(confidence)) / 2.0
    # a draw of images that all lack every class of some seed has no score; such draws are left out
    diffs = diffs[~torch.isnan(diffs)].cpu()
    if diffs.numel() == 0:
        raise ValueError("no bootstrap draw has a score: too few images with counted pixels")
    low, high = torch.quantile(diffs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return BootstrapResult(difference=score_b - score_a, low=low, high=high, score_a=score_a, score_b=score_b,
                           confidence=float(confidence), metric=metric, num_images=int(a.shape[1]),
                           num_seeds=int(a.shape[0]), num_resamples=int(num_resamples),
                           resample_seeds=bool(resample_seeds), seed=int(seed))
