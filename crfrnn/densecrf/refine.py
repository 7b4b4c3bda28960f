"""Dense-CRF post-processing of a segmentation in one call."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from crfrnn.lattice.cache import LatticeCache

from ._checks import _int_arg, _shape
from .crf import ArrayLike, DenseCRF2D

__all__ = ["refine"]


def _image_hwc(image, h: int, w: int, probs_shape: tuple) -> torch.Tensor:
    """``(h, w, 3)`` uint8 CPU tensor from an ``(H, W, 3)`` or ``(3, H, W)`` uint8 image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image must be uint8 (0..255 RGB), got {image.dtype} with shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image must be uint8 (0..255 RGB), got {image.dtype} with shape {_shape(image)}")
        t = image.detach().cpu()
    else:
        raise TypeError(f"image must be a uint8 numpy array or torch tensor, got {type(image).__name__}")
    shape = _shape(t)
    if t.dim() == 3 and shape == (h, w, 3):
        return t.contiguous()
    if t.dim() == 3 and shape == (3, h, w):
        return t.permute(1, 2, 0).contiguous()
    raise ValueError(
        f"image must have shape (H, W, 3) or (3, H, W) matching probabilities (L, H, W) = {probs_shape}; "
        f"got image of shape {shape}"
    )


def refine(
    image: ArrayLike,
    probabilities: ArrayLike,
    *,
    n_iterations: int = 5,
    sxy_gaussian=3,
    compat_gaussian=3,
    sxy_bilateral=80,
    srgb=13,
    compat_bilateral=10,
    lattice_cache: Optional[LatticeCache] = None,
) -> ArrayLike:
    """Dense-CRF post-processing of a segmentation in one call (pydensecrf's usual recipe).

    Unaries ``-log(clip(p, 1e-5, 1))`` (as :func:`crfrnn.utils.unary_from_softmax`), a Gaussian term
    (``sxy_gaussian``, Potts ``compat_gaussian``) and a bilateral term (``sxy_bilateral``, ``srgb``, Potts
    ``compat_bilateral``), both symmetrically normalised; ``n_iterations`` mean-field steps; arg max.

    Args:
        image: ``(H, W, 3)`` or ``(3, H, W)`` uint8 RGB image (numpy or torch).
        probabilities: ``(L, H, W)`` class probabilities (numpy or torch, floating, finite, >= 0).
        lattice_cache: a :class:`~crfrnn.lattice.LatticeCache` to keep the Gaussian term's lattice in, for
            many images of one size (the results are the same with or without it).

    Returns:
        ``(H, W)`` int64 labels: a numpy array if ``probabilities`` is numpy, otherwise a tensor on
        ``probabilities``' device (where the CRF also runs).
    """
    if isinstance(probabilities, np.ndarray):
        if probabilities.dtype.kind != "f":
            raise TypeError(f"probabilities must be floating point, got {probabilities.dtype} ({probabilities.shape})")
        probs = torch.from_numpy(np.ascontiguousarray(probabilities))
        device, as_numpy = torch.device("cpu"), True
    elif isinstance(probabilities, torch.Tensor):
        if not probabilities.is_floating_point():
            raise TypeError(
                f"probabilities must be floating point, got {probabilities.dtype} ({_shape(probabilities)})"
            )
        probs = probabilities.detach()
        device, as_numpy = probabilities.device, False
    else:
        raise TypeError(
            f"probabilities must be a numpy array or torch tensor (L, H, W), got {type(probabilities).__name__}"
        )
    pshape = _shape(probs)
    if probs.dim() != 3 or min(pshape) < 1:
        raise ValueError(f"probabilities must have shape (L, H, W), got {pshape}")
    lo, hi = torch.aminmax(probs)  # one pass; NaN propagates to both
    if not (bool(torch.isfinite(lo) & torch.isfinite(hi)) and float(lo) >= 0):
        raise ValueError(f"probabilities (shape {pshape}) must be finite and non-negative")
    n_labels, h, w = pshape
    img = _image_hwc(image, h, w, pshape)
    n = _int_arg(n_iterations, "n_iterations", 0)

    crf = DenseCRF2D(w, h, n_labels, device=device, lattice_cache=lattice_cache)
    unary = -torch.log(torch.clamp(probs.to(torch.float32), 1e-5, 1.0)).reshape(n_labels, -1)
    crf._set_unary(unary, "unary (from probabilities)")
    crf.addPairwiseGaussian(sxy_gaussian, compat_gaussian)
    crf.addPairwiseBilateral(sxy_bilateral, srgb, img, compat_bilateral)
    labels = crf._infer(n, labels=True).reshape(h, w).to(torch.int64)
    return labels.cpu().numpy() if as_numpy else labels.to(device)
