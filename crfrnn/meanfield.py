r"""Mean-field inference in a fully connected CRF, unrolled as an RNN (CRF-RNN, Zheng et al. 2015).

The energy of a labelling :math:`x` is :math:`E(x) = \sum_i \psi_u(x_i) + \sum_{i<j} \psi_p(x_i, x_j)` with
:math:`\psi_p(x_i, x_j) = \mu(x_i, x_j) \sum_m w^{(m)} k^{(m)}(f_i, f_j)` and two Gaussian kernels:

* spatial (the paper's "smoothness" kernel), std :math:`\theta_\gamma` on positions;
* bilateral ("appearance") kernel, stds :math:`\theta_\alpha` on positions and :math:`\theta_\beta` on colour.

Conventions (the paper's and the official Caffe/Keras code's):

* ``unary`` is **logits** :math:`U = -\psi_u` (e.g. the CNN's scores), shape ``(B, L, *spatial)``; the
  output is refined logits of the same shape (apply ``softmax`` for marginals, ``argmax`` for labels).
* One iteration (Algorithm 1 of the paper)::

      Q   = softmax(logits)                                    # logits = unary at t = 0
      m_s = filter_spatial(Q) / filter_spatial(1)              # message passing, pixel itself included,
      m_b = filter_bilateral(Q) / filter_bilateral(1)          #   normalised by the response to ones
      msg = W_s @ m_s + W_b @ m_b                              # per-class kernel weights (L x L)
      logits = unary - compatibility @ msg                     # compatibility transform, add unary

  ``@`` acts on the label axis. This is exactly the official code's message passing (which divides
  by the lattice's response to ones, pixel included).
* ``compatibility`` is the label compatibility :math:`\mu(l, l')`, a *penalty*: Potts is
  ``1 - I`` in the paper's energy and ``-I`` in the official code; the two differ by a constant per
  pixel that softmax removes, so they give identical outputs. We initialise to ``-I`` as the official
  code does, so its ``compatibility_matrix`` loads unchanged. The official *PyTorch* port (and
  anything that computes ``logits + C @ msg``) stores ``C = -compatibility``.
* pydensecrf: ``addPairwiseGaussian(sxy=θγ, compat=w)`` / ``addPairwiseBilateral(sxy=θα, srgb=θβ,
  compat=w)`` with a number ``w`` correspond to kernel weight ``w`` and Potts compatibility here (its
  default normalisation, ``NORMALIZE_SYMMETRIC``, differs slightly; see :mod:`crfrnn.densecrf` for an
  exact drop-in).
* Colour scale: ``image`` is used as given; for RGB pass 0..255 values, the scale θβ = 3 (VOC) and
  pydensecrf's ``srgb`` assume.

Both kernels' lattices are built once per call and reused by every iteration and the backward pass; a
:class:`CrfRnn` layer also keeps its spatial kernel (positions only) for the last two input sizes. On CPU
in float32 with tied weights and fixed bandwidths the iterations run as one fused compiled pass each
(:func:`_fused_loop`, with its own backward); everything else takes the autograd loop, its tested twin.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ._fused_meanfield import FusedMeanField, fused_forward
from ._fused_meanfield import fusable as _fusable
from .lattice import LatticeCache, PermutohedralLattice, Workspace, dense_gaussian_kernel
from .lattice._checks import _all_finite, _check_mask

__all__ = ["mean_field", "CrfRnn", "crf_features"]

Weight = Union[float, torch.Tensor]
Theta = Union[float, torch.Tensor]
_METHODS = ("permutohedral", "exact")


# ----------------------------------------------------------------------------- validation
def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_inputs(unary, image, valid_mask) -> None:
    if not isinstance(unary, torch.Tensor):
        raise TypeError(f"unary must be a torch.Tensor of logits (B, L, *spatial), got {type(unary).__name__}")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor (B, K, *spatial), got {type(image).__name__}")
    if not unary.is_floating_point():
        raise TypeError(f"unary must be floating-point logits, got {_describe(unary)}")
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"image must be a real-valued tensor (float, or uint8 for RGB 0..255), got {_describe(image)}")
    if unary.dim() < 3:
        raise ValueError(f"unary must have shape (B, L, *spatial), got {tuple(unary.shape)}")
    if unary.shape[1] < 2:
        raise ValueError(f"unary must have L >= 2 labels on axis 1, got L={unary.shape[1]} ({tuple(unary.shape)})")
    if unary.numel() == 0:
        raise ValueError(f"unary is empty: {tuple(unary.shape)}")
    if image.dim() != unary.dim() or image.shape[0] != unary.shape[0] or image.shape[2:] != unary.shape[2:]:
        raise ValueError(
            f"image (B, K, *spatial) must match unary (B, L, *spatial) in B and spatial shape: "
            f"image {tuple(image.shape)} vs unary {tuple(unary.shape)}"
        )
    if image.shape[1] == 0:
        raise ValueError(f"image must have K >= 1 channels, got {tuple(image.shape)}")
    if image.device != unary.device:
        raise ValueError(f"image is on {image.device} but unary is on {unary.device}")
    if not _all_finite(unary):
        raise ValueError(f"unary contains NaN or infinite values ({_describe(unary)})")
    if image.is_floating_point() and not _all_finite(image):
        raise ValueError(f"image contains NaN or infinite values ({_describe(image)})")
    if valid_mask is not None:
        _check_mask(valid_mask, unary, name="valid_mask")


def _positive(name: str, value) -> None:
    vals = value if isinstance(value, (list, tuple)) else [value]
    for v in vals:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name} must be a positive number, got {value!r}")
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _check_theta(name: str, value, channels: Optional[int], ref: torch.Tensor):
    """A kernel std θ: a positive number (for ``theta_beta`` also one per image channel), or a float tensor
    of shape ``()``/``(1,)`` (``(K,)`` for ``theta_beta``) on ``ref``'s device, which may require grad.
    Returns a float, a tuple of floats, or a 1-D tensor."""
    what = "a number" if channels is None else f"a number or one value per image channel (K={channels})"
    if not isinstance(value, torch.Tensor):
        if channels is not None and isinstance(value, (list, tuple)):
            if len(value) not in (1, channels):
                raise ValueError(f"{name} must be {what}, got {len(value)} values {tuple(value)!r}")
            _positive(name, list(value))
            return tuple(float(v) for v in value)
        _positive(name, value)
        return float(value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {_describe(value)}")
    if value.dim() > 1 or value.numel() not in ((1,) if channels is None else (1, channels)):
        raise ValueError(f"{name} must be {what}: a tensor of shape () or (1,)"
                         f"{'' if channels is None else f' or ({channels},)'}, got {_describe(value)}")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but unary is on {ref.device}; move them to one device")
    if not bool((torch.isfinite(value) & (value > 0)).all()):
        raise ValueError(f"{name} must be positive and finite, got {value.detach().reshape(-1).tolist()}")
    return value.reshape(-1)


def _as_weight(name: str, w: Weight, L: int, ref: torch.Tensor) -> torch.Tensor:
    """A kernel weight / compatibility as a tensor of shape (), (L,) or (L, L) on ``ref``'s device."""
    if isinstance(w, torch.Tensor):
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a float scalar or tensor, got {_describe(w)}")
        t = w
    elif isinstance(w, numbers.Real) and not isinstance(w, bool):
        t = torch.tensor(float(w))
    else:
        raise TypeError(f"{name} must be a number or a float tensor, got {type(w).__name__}")
    if tuple(t.shape) not in ((), (L,), (L, L)):
        raise ValueError(
            f"{name} must be a scalar, an (L,) vector or an (L, L) matrix with L={L}, got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.to(device=ref.device, dtype=ref.dtype)


def _apply_labels(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a scalar or diagonal ``(L,)`` weight on the label axis of ``x (B, L, *spatial)``."""
    if w.dim() == 0:
        return w * x
    return w.view((1, -1) + (1,) * (x.dim() - 2)) * x


# ----------------------------------------------------------------------------- features
def crf_features(
    image: torch.Tensor,
    theta_alpha: Union[float, torch.Tensor],
    theta_beta: Union[float, Sequence[float], torch.Tensor],
    theta_gamma: Union[float, torch.Tensor],
    spacing: Optional[Sequence[float]] = None,
    dtype: Optional[torch.dtype] = None,
    valid_mask: Optional[torch.Tensor] = None,
):
    """Features of the two kernels: ``(bilateral (B, S+K, *spatial), spatial (B, S, *spatial))``.

    Positions are pixel indices along each of the ``S`` spatial axes (times ``spacing``, for anisotropic
    volumes), divided by θα (bilateral) or θγ (spatial); the ``K`` image channels are divided by θβ
    (a number or one value per channel). With a ``valid_mask (B, 1, *spatial)`` positions count from
    the first valid index of each image along each axis, so padding on any side leaves the features
    of the valid pixels (and hence the lattice, which is not translation invariant) unchanged.
    The θ may be tensors (differentiable).
    """
    (bil, bw_bil), (spa, bw_spa) = _kernel_geometry(image, theta_alpha, theta_beta, theta_gamma, spacing, dtype,
                                                    valid_mask)
    return _divide(bil, bw_bil), _divide(spa, bw_spa)


def _divide(features: torch.Tensor, bandwidth) -> torch.Tensor:
    if not isinstance(bandwidth, torch.Tensor):
        bandwidth = torch.tensor(bandwidth, dtype=features.dtype, device=features.device)
    return features / bandwidth.to(features.dtype).view((1, -1) + (1,) * (features.dim() - 2))


def _kernel_geometry(image, theta_alpha, theta_beta, theta_gamma, spacing, dtype=None, valid_mask=None):
    """Undivided features and per-dimension stds of both kernels:
    ``((positions + image (B, S+K, *spatial), [θα]*S + θβ), (positions (B, S, *spatial), [θγ]*S))``.
    The stds are lists of floats, or 1-D tensors if any θ of the kernel is a tensor."""
    B, K = image.shape[:2]
    spatial = tuple(image.shape[2:])
    S = len(spatial)
    dtype = dtype or (image.dtype if image.is_floating_point() else torch.float32)
    if spacing is None:
        spacing = (1.0,) * S
    spacing = tuple(spacing)
    if len(spacing) != S:
        raise ValueError(f"spacing must have one entry per spatial axis ({S}), got {spacing}")
    _positive("spacing", spacing)
    axes = [torch.arange(s, dtype=dtype, device=image.device) * sp for s, sp in zip(spatial, spacing)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(B, -1, *spatial)
    if valid_mask is not None:
        v = (valid_mask != 0).reshape(B, *spatial)
        origin = []
        for a, (s, sp) in enumerate(zip(spatial, spacing)):
            other = tuple(i for i in range(1, S + 1) if i != a + 1)
            hit = v.any(dim=other) if other else v  # (B, s)
            first = torch.where(hit, torch.arange(s, device=image.device), s).amin(1)
            origin.append(first.to(dtype) * sp)
        pos = pos - torch.stack(origin, 1).view(B, S, *([1] * S))
    tb = theta_beta if isinstance(theta_beta, (torch.Tensor, list, tuple)) else [theta_beta]
    if len(tb) not in (1, K):
        raise ValueError(f"theta_beta must be a number or have one value per image channel (K={K}), got {theta_beta!r}")
    bilateral = torch.cat([pos, image.to(dtype)], 1)
    return (bilateral, _stds([theta_alpha] * S + [tb] * (K if len(tb) == 1 else 1))), (pos, _stds([theta_gamma] * S))


def _stds(parts):
    """Concatenate numbers / 1-D sequences / tensors into one list of floats, or a 1-D tensor if any is a tensor."""
    if not any(isinstance(p, torch.Tensor) for p in parts):
        out = []
        for p in parts:
            out.extend(float(x) for x in p) if isinstance(p, (list, tuple)) else out.append(float(p))
        return out
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([torch.as_tensor(p, dtype=dtype, device=tensors[0].device).reshape(-1) for p in parts])


class _Kernel:
    """One Gaussian kernel, built once: ``__call__(Q)`` returns the normalised message (B, L, *spatial).

    ``features (B, D, *spatial)`` undivided, ``stds`` the D standard deviations (floats, or a tensor that
    may require grad: the lattice then differentiates its filter, normaliser included, w.r.t. them)."""

    def __init__(self, features, stds, method, backend, valid_mask, dtype):
        B = features.shape[0]
        ones = torch.ones((B, 1) + tuple(features.shape[2:]), dtype=dtype, device=features.device)
        if valid_mask is not None:
            ones = (valid_mask != 0).to(dtype)
        if method == "permutohedral":
            self.lattice = PermutohedralLattice(features, backend=backend, mask=valid_mask, bandwidth=stds)
            self.matrix = None
            norm = self.lattice.filter(ones)
        else:  # the exact O(N^2) kernel matrix, masked rows and columns removed
            w = ones.reshape(B, 1, -1)
            self.matrix = dense_gaussian_kernel(_divide(features, stds)).to(dtype) * w * w.transpose(1, 2)
            norm = self.matrix.sum(-1).reshape(ones.shape)
        if valid_mask is not None:
            norm = torch.where(valid_mask != 0, norm, torch.ones((), dtype=dtype, device=norm.device))
        self.inv_norm = 1.0 / norm

    def __call__(self, q):
        if self.matrix is None:
            return self.lattice._filter_diff(q, post=self.inv_norm)  # normalisation fused into the slice
        B, L = q.shape[:2]
        out = torch.matmul(q.reshape(B, L, -1), self.matrix.transpose(1, 2)).reshape(q.shape)
        return out * self.inv_norm


def _label_matrix(w: torch.Tensor, L: int) -> torch.Tensor:
    """A scalar / (L,) / (L, L) label weight as an (L, L) matrix (differentiably)."""
    if w.dim() == 2:
        return w
    eye = torch.eye(L, dtype=w.dtype, device=w.device)
    return eye * w if w.dim() == 0 else torch.diag(w)


def _compose(ws, wb, c):
    """The label-axis weights with which one iteration's messages enter the logits:
    ``-compatibility @ W_s`` and ``-compatibility @ W_b`` (the sign of the subtraction folded in).

    All-scalar/diagonal weights stay elementwise (scalars or ``(L,)``); otherwise ``(L, L)`` matrices,
    so a pixel-sized GEMM is done once per kernel.
    """
    if ws.dim() < 2 and wb.dim() < 2 and c.dim() < 2:
        return -(c * ws), -(c * wb)
    L = max(t.shape[-1] for t in (ws, wb, c) if t.dim() > 0)
    cm = -_label_matrix(c, L)
    return cm @ _label_matrix(ws, L), cm @ _label_matrix(wb, L)


def _add_messages(unary, a, b, m_spatial, m_bilateral):
    """``unary + a @ m_s + b @ m_b`` on the label axis of ``(B, L, *spatial)`` messages, weights from
    :func:`_compose`. Matrices go through two ``baddbmm`` accumulating onto the unary, so neither the
    pass nor its backward touches a pixel-sized tensor more than the products themselves need."""
    if a.dim() < 2:
        return unary + (_apply_labels(a, m_spatial) + _apply_labels(b, m_bilateral))
    B, L = m_spatial.shape[:2]
    dt = m_spatial.dtype
    out = torch.baddbmm(unary.reshape(B, L, -1), a.to(dt).expand(B, L, L), m_spatial.reshape(B, L, -1))
    out = torch.baddbmm(out, b.to(dt).expand(B, L, L), m_bilateral.reshape(B, L, -1))
    return out.reshape(unary.shape)


def _mean_field_loop(unary, kernels, spatial_w, bilateral_w, compat, num_iterations, valid_mask):
    """The RNN: ``spatial_w``, ``bilateral_w``, ``compat`` are per-iteration lists of weights."""
    k_spatial, k_bilateral = kernels
    composed = {}  # tied iterations share one composition (computed once, not per iteration)
    logits = unary
    for t in range(num_iterations):
        key = (id(spatial_w[t]), id(bilateral_w[t]), id(compat[t]))
        if key not in composed:
            composed[key] = _compose(spatial_w[t], bilateral_w[t], compat[t])
        a, b = composed[key]
        q = torch.softmax(logits, dim=1)
        logits = _add_messages(unary, a, b, k_spatial(q), k_bilateral(q))
    if valid_mask is not None and num_iterations > 0:
        logits = torch.where(valid_mask != 0, logits, unary)
    return logits


def _spatial_kernel(features, stds, method, backend, valid_mask, dtype, spacing, cache):
    """The spatial kernel, from ``cache`` (a :class:`~crfrnn.lattice.LatticeCache`) when it can be reused: its
    features are the positions alone, so without a mask or a θγ that needs a gradient it depends only on the
    shape, θγ, the spacing, dtype, device and backend."""
    learned = isinstance(stds, torch.Tensor) and stds.requires_grad
    if cache is None or valid_mask is not None or learned or method != "permutohedral":
        return _Kernel(features, stds, method, backend, valid_mask, dtype)
    key = (tuple(features.shape), tuple(float(s) for s in stds), None if spacing is None else tuple(spacing),
           str(dtype), str(features.device), backend)
    return cache.get(key, lambda: _Kernel(features, stds, method, backend, valid_mask, dtype))


def _run(unary, image, valid_mask, thetas, weights, num_iterations, spacing, method, backend, spatial_cache=None,
         workspace=None):
    """The one path of :func:`mean_field` and :meth:`CrfRnn.forward`: checks the inputs, θ and ``method``
    once, builds both kernels once and iterates. ``weights(unary)`` returns the per-iteration lists of
    spatial weights, bilateral weights and compatibilities (validated by the caller's rules).
    ``spatial_cache``: a :class:`~crfrnn.lattice.LatticeCache` for the spatial kernel, ``workspace``: a
    :class:`~crfrnn.lattice.workspace.Workspace` for the fused backward's arrays (both :class:`CrfRnn`'s)."""
    _check_inputs(unary, image, valid_mask)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    K = image.shape[1]
    ta = _check_theta("theta_alpha", thetas[0], None, unary)
    tb = _check_theta("theta_beta", thetas[1], K, unary)
    tg = _check_theta("theta_gamma", thetas[2], None, unary)
    ws, wb, c = weights(unary)
    img = image.detach()  # the reference image is a constant
    (bil, bw_bil), (spa, bw_spa) = _kernel_geometry(img, ta, tb, tg, spacing, valid_mask=valid_mask)
    kernels = (
        _spatial_kernel(spa, bw_spa, method, backend, valid_mask, unary.dtype, spacing, spatial_cache),
        _Kernel(bil, bw_bil, method, backend, valid_mask, unary.dtype),
    )
    if _fusable(unary, kernels, (ws, wb, c), (ta, tb, tg)):
        return _fused_loop(unary, kernels, ws[0], wb[0], c[0], num_iterations, workspace)
    return _mean_field_loop(unary, kernels, ws, wb, c, num_iterations, valid_mask)


def _fused_loop(unary, kernels, spatial_w, bilateral_w, compat, num_iterations, workspace=None):
    """:func:`_mean_field_loop` (its slow twin, tested equal) as one compiled pass per iteration over both
    lattices (:mod:`crfrnn.lattice.fused`): the label weights act on the blurred lattice vertices and the
    marginals never go through memory between iterations. Masked points have no lattice weight and a
    normaliser of 1, so they come out as their unary, as in the twin. With gradients wanted, the
    iterations' logits are kept for :class:`FusedMeanField`'s backward pass."""
    a, b = _compose(spatial_w, bilateral_w, compat)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (unary, a, b)):
        return FusedMeanField.apply(unary, a, b, kernels, num_iterations, workspace)
    return fused_forward(unary, kernels, a, b, num_iterations)


def mean_field(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    theta_alpha: Theta = 160.0,
    theta_beta: Union[Theta, Sequence[float]] = 3.0,
    theta_gamma: Theta = 3.0,
    spatial_weight: Weight = 3.0,
    bilateral_weight: Weight = 5.0,
    compatibility: Optional[torch.Tensor] = None,
    num_iterations: int = 10,
    valid_mask: Optional[torch.Tensor] = None,
    spacing: Optional[Sequence[float]] = None,
    method: str = "permutohedral",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Dense-CRF mean-field inference (CRF-RNN, Algorithm 1), differentiable end to end.

    Args:
        unary: logits :math:`U = -\psi_u`, ``(B, L, *spatial)``, L >= 2, float32/float64.
        image: reference image ``(B, K, *spatial)``, any K >= 1 (RGB, grey, multi-spectral, CT...).
            For RGB use the 0..255 scale, as θβ assumes. Treated as a constant (no gradient).
        theta_alpha, theta_beta, theta_gamma: kernel stds θα (bilateral, positions, in pixels),
            θβ (bilateral, colour; a number or one per channel), θγ (spatial, positions). VOC: 160, 3, 3.
            Numbers, or float tensors (shape ``()``/``(1,)``, ``(K,)`` for θβ) on the unary's device that
            may require grad: the bandwidths are then learned (see ``docs/bandwidths.md``).
        spatial_weight, bilateral_weight: kernel weights :math:`w^{(m)}`: a scalar (shared), an
            ``(L,)`` vector (per class) or an ``(L, L)`` matrix (as the official code). May require grad.
        compatibility: ``(L, L)`` label compatibility :math:`\mu` (a penalty; asymmetric allowed);
            ``None`` = Potts (``-I``, equivalently ``1 - I``). May require grad.
        num_iterations: mean-field iterations T (the paper: 5 in training, 10 at test).
        valid_mask: optional ``(B, 1, *spatial)``; pixels where it is False (padding) neither send nor
            receive messages and are returned as their unary, so a padded canvas gives the same result
            inside as the unpadded image.
        spacing: per-axis pixel spacing (anisotropic volumes); positions are ``index * spacing``.
        method: ``"permutohedral"`` (O(N)) or ``"exact"`` (O(N²) dense kernels; small inputs, tests).
        backend: lattice backend (``None``, ``"numba"``, ``"torch"``).

    Returns:
        refined logits ``(B, L, *spatial)``, dtype and device of ``unary``.
    """
    if not isinstance(num_iterations, numbers.Integral) or num_iterations < 0:
        raise ValueError(f"num_iterations must be a non-negative integer, got {num_iterations!r}")
    T = int(num_iterations)

    def weights(u):
        L = u.shape[1]
        ws = _as_weight("spatial_weight", spatial_weight, L, u)
        wb = _as_weight("bilateral_weight", bilateral_weight, L, u)
        if compatibility is None:
            c = -torch.ones((), dtype=u.dtype, device=u.device)
        else:
            if not isinstance(compatibility, torch.Tensor) or tuple(compatibility.shape) != (L, L):
                is_tensor = isinstance(compatibility, torch.Tensor)
                shape = tuple(compatibility.shape) if is_tensor else type(compatibility).__name__
                raise ValueError(f"compatibility must be an (L, L) = ({L}, {L}) tensor or None, got {shape}")
            c = _as_weight("compatibility", compatibility, L, u)
        return [ws] * T, [wb] * T, [c] * T

    return _run(unary, image, valid_mask, (theta_alpha, theta_beta, theta_gamma), weights, T, spacing, method, backend)


class CrfRnn(nn.Module):
    r"""The CRF-RNN layer: mean-field iterations with learnable kernel weights and compatibility.

    ``forward(unary (B, L, *spatial) logits, image (B, K, *spatial), valid_mask=None) -> logits``.
    Runs ``num_iterations`` (5) in training mode and ``num_test_iterations`` (10) in eval mode.

    Parameters (the official code's names and initialisation):

    * ``spatial_ker_weights`` — ``(L, L)``, ``spatial_weight * I``;
    * ``bilateral_ker_weights`` — ``(L, L)``, ``bilateral_weight * I``;
    * ``compatibility_matrix`` — ``(L, L)``, Potts ``-I``; output = ``unary - compatibility @ messages``;
    * with ``learn_bandwidths=True``: ``log_theta_alpha`` ``()``, ``log_theta_beta`` ``()`` (or ``(K,)`` if
      ``theta_beta`` is given per channel), ``log_theta_gamma`` ``()`` — the kernel stds, log-parameterised
      so that they stay positive (shared by all iterations; the lattices are built once per forward).

    Ablations of the paper's Section 7.1:

    * ``kernel_weights="matrix"`` (official, L x L), ``"diagonal"`` (per class, ``(L,)``) or ``"shared"``
      (one scalar per kernel);
    * ``learn_compatibility=False`` keeps Potts fixed (a buffer);
    * ``untied=True`` gives every iteration its own parameters (leading axis ``num_iterations``); at test,
      iterations beyond ``num_iterations`` reuse the last set.

    Memory: in training mode on the CPU the layer keeps the marginals of every iteration for the backward
    pass (``4 * T * B * N * Lp`` bytes, ``Lp`` = L rounded up to a multiple of 8: 90 MB at 500x375, L=21, T=5)
    and holds on to that array after the step (a :class:`~crfrnn.lattice.Workspace`), so that the next step
    writes into it instead of faulting fresh memory in; ``eval()`` lets go of it. The layer also keeps its
    spatial kernel for the last two input sizes.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        theta_alpha: float = 160.0,
        theta_beta: Union[float, Sequence[float]] = 3.0,
        theta_gamma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 5.0,
        num_iterations: int = 5,
        num_test_iterations: int = 10,
        kernel_weights: str = "matrix",
        learn_compatibility: bool = True,
        learn_bandwidths: bool = False,
        untied: bool = False,
        spacing: Optional[Sequence[float]] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if kernel_weights not in ("matrix", "diagonal", "shared"):
            raise ValueError(f"kernel_weights must be 'matrix', 'diagonal' or 'shared', got {kernel_weights!r}")
        for name, v in (("num_iterations", num_iterations), ("num_test_iterations", num_test_iterations)):
            if not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        _positive("theta_alpha", theta_alpha)
        _positive("theta_gamma", theta_gamma)
        _positive("theta_beta", list(theta_beta) if isinstance(theta_beta, (list, tuple)) else theta_beta)
        L = int(num_classes)
        self.num_classes = L
        self.learn_bandwidths = bool(learn_bandwidths)
        beta = tuple(float(b) for b in theta_beta) if isinstance(theta_beta, (list, tuple)) else float(theta_beta)
        if self.learn_bandwidths:
            self.log_theta_alpha = nn.Parameter(torch.tensor(math.log(theta_alpha)))
            self.log_theta_beta = nn.Parameter(torch.tensor(beta).log())
            self.log_theta_gamma = nn.Parameter(torch.tensor(math.log(theta_gamma)))
        else:
            self._thetas = (float(theta_alpha), beta, float(theta_gamma))
        self.num_iterations, self.num_test_iterations = int(num_iterations), int(num_test_iterations)
        self.kernel_weights, self.untied, self.spacing, self.backend = kernel_weights, untied, spacing, backend
        # the spatial kernel of the last input sizes: its lattice depends only on the size and θγ (not saved)
        self._spatial_lattices = LatticeCache(2)
        # the training forward's history of the marginals, reused by the next step (not saved; eval() frees it)
        self._workspace = Workspace()
        lead = (self.num_iterations,) if untied else ()

        def init(w):
            base = {"matrix": w * torch.eye(L), "diagonal": torch.full((L,), float(w)),
                    "shared": torch.tensor(float(w))}
            t = base[kernel_weights]
            return t.expand(lead + t.shape).clone()

        self.spatial_ker_weights = nn.Parameter(init(spatial_weight))
        self.bilateral_ker_weights = nn.Parameter(init(bilateral_weight))
        potts = (-torch.eye(L)).expand(lead + (L, L)).clone()
        if learn_compatibility:
            self.compatibility_matrix = nn.Parameter(potts)
        else:
            self.register_buffer("compatibility_matrix", potts)

    def bandwidths(self):
        """The kernel stds ``(θα, θβ, θγ)`` the forward pass uses: numbers, or (with ``learn_bandwidths``)
        tensors ``exp(log_theta_*)`` that carry gradients."""
        if not self.learn_bandwidths:
            return self._thetas
        return self.log_theta_alpha.exp(), self.log_theta_beta.exp(), self.log_theta_gamma.exp()

    def _theta_value(self, i: int):
        t = self.bandwidths()[i]
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return float(t) if t.dim() == 0 else tuple(t.tolist())

    @property
    def theta_alpha(self) -> float:
        """Current θα (a number; read-only)."""
        return self._theta_value(0)

    @property
    def theta_beta(self):
        """Current θβ (a number or one per channel; read-only)."""
        return self._theta_value(1)

    @property
    def theta_gamma(self) -> float:
        """Current θγ (a number; read-only)."""
        return self._theta_value(2)

    def extra_repr(self) -> str:
        tb = self.theta_beta
        tb = f"{tb:g}" if isinstance(tb, float) else "(" + ", ".join(f"{b:g}" for b in tb) + ")"
        return (
            f"num_classes={self.num_classes}, theta_alpha={self.theta_alpha:g}, theta_beta={tb}, "
            f"theta_gamma={self.theta_gamma:g}, learn_bandwidths={self.learn_bandwidths}, "
            f"num_iterations={self.num_iterations}, num_test_iterations={self.num_test_iterations}, "
            f"kernel_weights={self.kernel_weights!r}, untied={self.untied}"
        )

    def _per_iteration(self, p: torch.Tensor, T: int):
        if not self.untied:
            return [p] * T
        sets = p.unbind(0)  # iterations past num_iterations reuse the last set (the same tensor)
        return [sets[min(t, len(sets) - 1)] for t in range(T)]

    def forward(
        self,
        unary: torch.Tensor,
        image: torch.Tensor,
        valid_mask: Optional[torch.Tensor] = None,
        *,
        method: str = "permutohedral",
    ) -> torch.Tensor:
        T = self.num_iterations if self.training else self.num_test_iterations

        def weights(u):
            if u.shape[1] != self.num_classes:
                raise ValueError(
                    f"unary has L={u.shape[1]} labels but this CrfRnn was built for num_classes={self.num_classes} "
                    f"(unary {tuple(u.shape)})"
                )
            # float64 unaries with float32 parameters
            return tuple(self._per_iteration(p.to(u.dtype), T)
                         for p in (self.spatial_ker_weights, self.bilateral_ker_weights, self.compatibility_matrix))

        return _run(unary, image, valid_mask, self.bandwidths(), weights, T, self.spacing, method, self.backend,
                    self._spatial_lattices, self._workspace)

    def train(self, mode: bool = True) -> "CrfRnn":
        if not mode:  # inference keeps no history: let go of the training steps' scratch arrays
            self._workspace.clear()
        return super().train(mode)
