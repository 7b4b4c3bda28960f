"""The CPU fast path of :class:`~crfrnn.densecrf.DenseCRF` inference: every pairwise term and the softmax
in one compiled pass per iteration. Its slow twin is ``DenseCRF._infer_by_terms`` (tested equal)."""
from __future__ import annotations

import numpy as np
import torch

from crfrnn.lattice import _numba_kernels as _nb
from crfrnn.lattice.permutohedral import _SPLAT_COPIES

__all__ = ["fused_meanfield", "stack_terms"]


def _padded(n_labels: int) -> int:
    """Labels padded to whole SIMD registers, as the fused kernel lays them out."""
    return -(-n_labels // _nb._LANES) * _nb._LANES


def fused_meanfield(unary: torch.Tensor, stacked: tuple, n_iterations: int) -> torch.Tensor:
    """Mean field on CPU lattices with every term and the softmax fused into one compiled pass per
    iteration (:func:`crfrnn.lattice._numba_kernels.dense_meanfield`): the maths of
    :meth:`DenseCRF._infer_by_terms` (its slow twin) in a third of the memory traffic.
    ``unary (L, N)``; returns ``Q (L, N)``."""
    L, n = unary.shape
    un = np.zeros((n, _padded(L)), dtype=np.float32)  # (N, Cp): a point's labels side by side
    np.negative(unary.numpy().T, out=un[:, :L])
    q = np.empty((L, n), dtype=np.float32)
    m = int(stacked[7].sum())  # vertices of all terms
    parts = max(1, min(_SPLAT_COPIES, -(-n // _nb._BLOCK)))
    work = (np.zeros((parts, m, un.shape[1]), np.float32),
            *(np.empty((m + 1, un.shape[1]), np.float32) for _ in range(3)))  # + the zero row
    _nb.dense_meanfield(un, q, *stacked, n_iterations, *work)
    return torch.from_numpy(q)


def stack_terms(terms: list, n_labels: int) -> tuple:
    """The terms' lattices, scales and compatibilities laid end to end, as
    :func:`crfrnn.lattice._numba_kernels.dense_meanfield` takes them (made once per set of terms)."""
    bary, offsets, nbr, tstart, td1, nstart, vstart, vcount = [], [], [], [], [], [], [], []
    pre, post, wdiag, wmat, ismat = [], [], [], [], []
    pos = npos = vpos = 0
    zeros_mat = np.zeros((n_labels, n_labels), np.float32)
    for t in terms:
        lat = t.lattice
        arrays = lat.compiled_arrays()
        bary.append(arrays.barycentric)
        offsets.append(arrays.offsets + np.int32(vpos) if vpos else arrays.offsets)
        nb = arrays.neighbours
        nbr.append(np.where(nb >= 0, nb + np.int32(vpos), nb) if vpos else nb)
        tstart.append(pos)
        td1.append(lat.dim + 1)
        nstart.append(npos)
        vstart.append(vpos)
        vcount.append(lat.num_vertices)
        pos += bary[-1].shape[0]
        npos += nb.shape[0]
        vpos += lat.num_vertices
        n = lat.num_points
        alpha = np.float32(arrays.alpha)
        pre.append(np.ones(n, np.float32) if t.pre is None else t.pre.numpy())
        post.append(np.full(n, alpha, np.float32) if t.post is None else t.post.numpy() * alpha)
        kind, w = t.compat.kind, t.compat.weight
        # messages m enter the logits as + wdiag * m, or - wmat @ m
        wd = np.zeros(_padded(n_labels), np.float32)
        wd[:n_labels] = w if kind == "potts" else -w[:, 0].numpy() if kind == "diag" else 0.0
        wdiag.append(wd)
        wmat.append(w.numpy() if kind == "matrix" else zeros_mat)
        ismat.append(kind == "matrix")
    i64 = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    return (np.concatenate(bary), np.concatenate(offsets), i64(tstart), i64(td1), np.concatenate(nbr),
            i64(nstart), i64(vstart), i64(vcount), np.stack(pre), np.stack(post), np.stack(wdiag),
            np.ascontiguousarray(np.stack(wmat)), np.array(ismat, dtype=np.bool_))
