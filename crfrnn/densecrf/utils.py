"""Drop-in replacement for ``pydensecrf.utils``: unaries and pairwise features for :mod:`crfrnn.densecrf`.

Every function returns exactly what its ``pydensecrf.utils`` namesake returns (same values, float32,
same shapes), so code written for pydensecrf runs unchanged::

    from crfrnn.utils import unary_from_softmax, create_pairwise_bilateral

The differences are only in bad input: pydensecrf ``assert``s (or crashes later in C++); these raise
``ValueError``/``TypeError`` naming the argument and its shape.

Shapes follow pydensecrf: unaries are ``(n_labels, n_pixels)`` float32 energies (``-log p``), pixels
flattened in C order of the image's spatial axes; pairwise features are ``(n_features, n_pixels)`` float32.
"""
from __future__ import annotations

import warnings
from numbers import Number

import numpy as np

__all__ = [
    "unary_from_labels",
    "unary_from_softmax",
    "create_pairwise_gaussian",
    "create_pairwise_bilateral",
    "compute_unary",
    "softmax_to_unary",
]


def _as_numpy(x, name: str) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (CPU copy); TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an array (numpy array or torch tensor), got {type(x).__name__}")
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name} must be an array (numpy array or torch tensor), got {type(x).__name__}") from exc


def _positive_scales(values, name: str, n_axes: int = 1) -> list:
    """A scalar (repeated ``n_axes`` times) or a sequence of positive finite numbers, as a list."""
    if isinstance(values, Number) and not isinstance(values, bool):
        seq = [values] * n_axes
    else:
        try:
            seq = list(values)
        except TypeError:
            raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(values).__name__}") from None
    for s in seq:
        if not isinstance(s, Number) or isinstance(s, bool):
            raise TypeError(f"{name} must contain numbers, got {values!r}")
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"{name} must contain positive finite numbers (kernel widths), got {values!r}")
    return seq


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """Unary energies from a (partial) label map: a classifier ``gt_prob`` sure of the annotation.

    Args:
        labels: integer label map of any shape (flattened in C order to N pixels). With
            ``zero_unsure`` the values are 0 ("unknown": uniform probability) and 1..n_labels;
            otherwise 0..n_labels-1.
        n_labels: number of labels L (not counting the "unknown" 0), at least 2.
        gt_prob: probability given to the annotated label, in (0, 1); the rest is spread evenly.
        zero_unsure: whether 0 means "unknown".

    Returns:
        ``(L, N)`` float32 energies ``-log p``.
    """
    if not (isinstance(gt_prob, Number) and 0 < gt_prob < 1):
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise ValueError(f"n_labels must be an integer >= 2, got {n_labels!r}")
    labels = _as_numpy(labels, "labels")
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {labels.shape})")
    labels = labels.flatten()
    if labels.size == 0:
        raise ValueError(f"labels is empty (shape {labels.shape})")
    lo, hi = (0, n_labels) if zero_unsure else (0, n_labels - 1)
    if labels.min() < lo or labels.max() > hi:
        raise ValueError(
            f"labels must lie in [{lo}, {hi}] for n_labels={n_labels}, zero_unsure={bool(zero_unsure)}; "
            f"got values in [{labels.min()}, {labels.max()}]"
        )

    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)

    # the order matters: the later assignments overwrite part of the earlier ones (as in pydensecrf)
    U = np.full((n_labels, len(labels)), n_energy, dtype="float32")
    U[labels - 1 if zero_unsure else labels, np.arange(U.shape[1])] = p_energy
    if zero_unsure:  # "unknown" pixels: uniform probability
        U[:, labels == 0] = -np.log(1.0 / n_labels)
    return U


def compute_unary(labels, M, GT_PROB=0.5):
    """Deprecated alias of :func:`unary_from_labels` (as in pydensecrf)."""
    warnings.warn("compute_unary is deprecated, use unary_from_labels instead", DeprecationWarning, stacklevel=2)
    return unary_from_labels(labels, M, GT_PROB)


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """Unary energies ``-log p`` from class probabilities.

    Args:
        sm: ``(L, *spatial)`` probabilities (classes first; the rest is flattened in C order).
        scale: if given, in (0, 1]: probabilities are mixed with the uniform distribution,
            ``scale * sm + (1 - scale) / L``.
        clip: probabilities are clipped to ``[clip, 1]`` before the log (``None``: no clipping).

    Returns:
        ``(L, N)`` float32 energies.
    """
    sm = _as_numpy(sm, "sm")
    if sm.ndim < 1 or sm.shape[0] == 0:
        raise ValueError(f"sm must have shape (n_classes, ...) with n_classes >= 1, got {sm.shape}")
    if sm.dtype.kind not in "fiub":
        raise TypeError(f"sm must be a numeric array of probabilities, got dtype {sm.dtype}")
    num_cls = sm.shape[0]
    if scale is not None:
        if not (isinstance(scale, Number) and 0 < scale <= 1):
            raise ValueError(f"scale must be in (0, 1] or None, got {scale!r}")
        uniform = np.ones(sm.shape) / num_cls
        sm = scale * sm + (1 - scale) * uniform
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([num_cls, -1]).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):
    """Deprecated form of :func:`unary_from_softmax` (no clipping; as in pydensecrf)."""
    warnings.warn("softmax_to_unary is deprecated, use unary_from_softmax instead", DeprecationWarning, stacklevel=2)
    scale = None if GT_PROB == 1 else GT_PROB
    return unary_from_softmax(sm, scale, clip=None)


def create_pairwise_gaussian(sdims, shape):
    """Position features ``(coordinate_k / sdims[k])`` for any number of spatial axes.

    For 2-D this is what ``DenseCRF2D.addPairwiseGaussian`` uses, except that the axes come in array
    order (row, column) instead of (x, y).

    Args:
        sdims: per-axis kernel widths (``sxy``), positive; one per axis of ``shape`` (a single
            number is used for every axis).
        shape: the spatial shape, e.g. ``(H, W)``.

    Returns:
        ``(len(sdims), prod(shape))`` float32 features.
    """
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}") from None
    sdims = _positive_scales(sdims, "sdims", len(shape))
    if len(sdims) != len(shape):
        raise ValueError(f"sdims has {len(sdims)} entries but shape {shape} has {len(shape)} axes: give one per axis")
    hcord_range = [range(s) for s in shape]
    mesh = np.array(np.meshgrid(*hcord_range, indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    return mesh.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Bilateral features ``(coordinate_k / sdims[k], channel_c / schan[c])`` for any image.

    For a 2-D RGB image with ``chdim=2`` this is what ``DenseCRF2D.addPairwiseBilateral`` uses,
    except that the position axes come in array order (row, column).

    Args:
        sdims: per-axis position widths (``sxy``), positive (a single number: the same for every
            axis; fewer entries than axes leave the remaining axes unscaled, as in pydensecrf).
        schan: channel widths (``srgb``): one number for all channels or one per channel.
        img: the image; ``(*spatial, C)`` with ``chdim`` giving the channel axis, or ``(*spatial)`` with
            ``chdim=-1`` (one channel).
        chdim: the channel axis of ``img``, or -1 when it has none.

    Returns:
        ``(len(sdims) + C, n_pixels)`` float32 features.
    """
    img = _as_numpy(img, "img")
    if chdim == -1:
        im_feat = img[np.newaxis].astype(np.float32)
    else:
        if not isinstance(chdim, (int, np.integer)) or not 0 <= chdim < img.ndim:
            raise ValueError(f"chdim must be -1 or an axis of img (shape {img.shape}), got {chdim!r}")
        im_feat = np.rollaxis(img, chdim).astype(np.float32)
    if im_feat.ndim < 2:
        raise ValueError(f"img must have at least one spatial axis, got shape {img.shape} with chdim={chdim}")
    n_spatial = im_feat.ndim - 1
    sdims = _positive_scales(sdims, "sdims", n_spatial)
    if len(sdims) > n_spatial:
        raise ValueError(
            f"sdims has {len(sdims)} entries but img (shape {img.shape}) has only {n_spatial} spatial axes"
        )
    if isinstance(schan, Number):
        _positive_scales(schan, "schan")
        im_feat /= schan
    else:
        schan = _positive_scales(schan, "schan")
        if len(schan) > im_feat.shape[0]:
            raise ValueError(
                f"schan has {len(schan)} entries but img (shape {img.shape}, chdim={chdim}) "
                f"has {im_feat.shape[0]} channels"
            )
        for i, s in enumerate(schan):
            im_feat[i] /= s

    cord_range = [range(s) for s in im_feat.shape[1:]]
    mesh = np.array(np.meshgrid(*cord_range, indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    feats = np.concatenate([mesh, im_feat])
    return feats.reshape([feats.shape[0], -1])
