"""The exact O(N²) Gaussian filter: the slow twin and test oracle of the permutohedral lattice."""
from __future__ import annotations

import torch

from ._checks import _check_features, _check_pair

__all__ = ["dense_gaussian_filter", "dense_gaussian_kernel"]


def dense_gaussian_filter(
    values: torch.Tensor,
    features: torch.Tensor,
    normalize: bool = False,
    *,
    block_size: int = 2048,
) -> torch.Tensor:
    r"""Exact O(N²) Gaussian filter :math:`\sum_j \exp(-\frac12\|f_i-f_j\|^2) v_j` (self included).

    The slow twin of :class:`PermutohedralLattice` and its test oracle: for **small inputs only**
    (N = prod(spatial) up to a few thousand; it forms ``block_size x N`` kernel blocks).
    ``values (B, C, *spatial)``, ``features (B, D, *spatial)``; differentiable w.r.t. both.
    ``normalize=True`` divides by the response to ones.
    """
    _check_pair(values, features)
    B, C = values.shape[:2]
    D = features.shape[1]
    n = values[0, 0].numel()
    dtype = torch.promote_types(values.dtype, features.dtype)
    f = features.reshape(B, D, n).transpose(1, 2).to(dtype)  # (B, N, D)
    v = values.reshape(B, C, n).transpose(1, 2).to(dtype)  # (B, N, C)
    outs, norms = [], []
    for s in range(0, n, block_size):
        k = torch.exp(-0.5 * _sqdist(f[:, s : s + block_size], f))  # (B, b, N)
        outs.append(k @ v)
        if normalize:
            norms.append(k.sum(-1, keepdim=True))
    out = torch.cat(outs, 1)
    if normalize:
        out = out / torch.cat(norms, 1)
    return out.transpose(1, 2).reshape(values.shape).to(values.dtype)


def dense_gaussian_kernel(features: torch.Tensor) -> torch.Tensor:
    """The exact kernel matrix ``K[b, i, j] = exp(-|f_i - f_j|^2 / 2)``, ``(B, N, N)`` (small inputs only)."""
    _check_features(features)
    B, D = features.shape[:2]
    f = features.reshape(B, D, -1).transpose(1, 2)
    return torch.exp(-0.5 * _sqdist(f, f))


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # exact squared distances without the |a|^2+|b|^2-2ab cancellation: accumulate per coordinate
    sq = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    for c in range(a.shape[2]):
        sq = sq + (a[:, :, None, c] - b[:, None, :, c]) ** 2
    return sq
