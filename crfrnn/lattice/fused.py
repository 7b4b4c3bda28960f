"""Mean field over several CPU lattices in one compiled pass per iteration (the numba backend).

Every pairwise term's slice, the unary, the softmax and every term's splat run point by point in one pass
(:func:`crfrnn.lattice._numba_kernels.dense_meanfield`), so the marginals never go through memory between
iterations, and a label matrix is applied to the blurred lattice vertices rather than to every point.
Used by :mod:`crfrnn.densecrf` (pydensecrf's inference) and by :func:`crfrnn.mean_field` /
:class:`crfrnn.CrfRnn` when no gradient is needed. Their slow twins (one filter call per term and
iteration) are tested equal.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numba
import numpy as np
import torch

from . import _memory
from . import _numba_kernels as _nb
from .permutohedral import _SPLAT_COPIES, PermutohedralLattice

__all__ = ["stack_lattices", "fused_mean_field", "fused_mean_field_rows", "fused_mean_field_backward", "label_rows",
           "history_shape", "splat_rows", "splats_shape", "transposed_terms"]


def _padded(n_labels: int) -> int:
    """Labels padded to whole SIMD registers, as the fused kernel lays them out."""
    return -(-n_labels // _nb._LANES) * _nb._LANES


def history_shape(n_iterations: int, n_labels: int, n_points: int) -> tuple:
    """The shape of :func:`fused_mean_field`'s ``history``: the marginals each iteration filters, as rows."""
    return (n_iterations, n_points, _padded(n_labels))


# A term whose lattice has fewer than this many vertices per point does the backward pass's label-space work
# (its weight gradient and W^T z, O(L^2) per row each) on its vertices rather than on the points: the forward
# keeps each iteration's splat of the marginals for it (M rows; the splat is computed anyway).
_VERTEX_LABEL_WORK_PER_POINT = 0.5


def splat_rows(num_vertices: np.ndarray, num_points: int) -> tuple:
    """The terms (``num_vertices (T,)``) whose splats :func:`fused_mean_field` keeps: ``(rows (T,) int64, R)``,
    term ``t``'s first row of ``splats`` (-1 for a term not kept) and the rows in all."""
    kept = np.asarray(num_vertices, np.int64) * (np.asarray(num_vertices) < _VERTEX_LABEL_WORK_PER_POINT * num_points)
    rows = np.where(kept > 0, np.cumsum(kept) - kept, -1).astype(np.int64)
    return rows, int(kept.sum())


def splats_shape(num_vertices: np.ndarray, n_iterations: int, n_labels: int, n_points: int) -> tuple:
    """The shape of :func:`fused_mean_field`'s ``splats``."""
    return (n_iterations, splat_rows(num_vertices, n_points)[1], _padded(n_labels))


def stack_lattices(
    lattices: Sequence[PermutohedralLattice],
    pres: Sequence[Optional[np.ndarray]],
    posts: Sequence[Optional[np.ndarray]],
    weights: Sequence[np.ndarray],
    n_labels: int,
) -> tuple:
    """The terms laid end to end, as the fused kernel takes them (made once per set of terms).

    Term ``t`` sends the message ``m = posts[t] * F_t(pres[t] * Q)`` (``pres``/``posts``: ``(P,)``
    float32 per-point scales over the lattice's ``P = B * N`` points, or ``None`` for ones), which enters
    the logits as ``+ weights[t] * m`` for a vector ``(L,)`` or ``+ weights[t] @ m`` for a matrix
    ``(L, L)``. Every lattice must be a numba one over the same points.
    """
    lattices = list(lattices)
    arrays = [lat.compiled_arrays() for lat in lattices]
    nt, n = len(lattices), (lattices[0].batch_size * lattices[0].num_points if lattices else 0)
    sizes = lambda name: np.array([getattr(a, name).shape[0] for a in arrays], dtype=np.int64)  # noqa: E731
    starts = lambda sz: np.cumsum(sz) - sz  # noqa: E731
    tsize, nsize = sizes("barycentric"), sizes("neighbours")
    vcount = np.array([lat.num_vertices for lat in lattices], dtype=np.int64)
    tstart, nstart, vstart = starts(tsize), starts(nsize), starts(vcount)
    td1 = np.array([lat.dim + 1 for lat in lattices], dtype=np.int64)
    # one array per kind, each term's part copied in place with its vertex rows moved past the earlier terms'
    # (a compiled pass: NumPy's concatenate of shifted copies made three temporaries per term)
    bary = _memory.cached_empty(int(tsize.sum()), np.float32)  # read point after point: small pages
    offsets = _memory.cached_empty(int(tsize.sum()), np.int32)
    nbr = np.empty(int(nsize.sum()), np.int32)
    pre, post = _memory.cached_empty((nt, n), np.float32), _memory.cached_empty((nt, n), np.float32)
    wdiag = np.zeros((nt, _padded(n_labels)), np.float32)
    wcols = np.zeros((nt, n_labels, _padded(n_labels)), np.float32)  # each matrix's columns as padded rows
    ismat = np.zeros(nt, np.bool_)
    for t, (a, p_pre, p_post, w) in enumerate(zip(arrays, pres, posts, weights, strict=True)):
        part = slice(tstart[t], tstart[t] + tsize[t])
        bary[part] = a.barycentric
        _nb.copy_shifted(offsets[part], a.offsets, np.int32(vstart[t]))
        _nb.copy_shifted(nbr[nstart[t]:nstart[t] + nsize[t]], a.neighbours, np.int32(vstart[t]))
        pre[t] = 1.0 if p_pre is None else p_pre
        alpha = np.float32(a.alpha)  # the lattice's output factor, folded into post
        if p_post is None:
            post[t] = alpha
        else:
            np.multiply(np.asarray(p_post, np.float32), alpha, out=post[t])
        w = np.asarray(w, np.float32)
        if w.ndim == 1:
            wdiag[t, :n_labels] = w
        else:
            wcols[t, :, :n_labels] = w.T
        ismat[t] = w.ndim == 2
    return (bary, offsets, tstart, td1, nbr, nstart, vstart, vcount, pre, post, wdiag, wcols, ismat)


# A term is splatted by vertex ranges (a pass of its own over the points' rows, each thread adding the entries of
# its range of vertices: :func:`_nb._splat_by_ranges`) rather than by scatter into private copies when those copies
# would hold at least this many rows per point (:func:`_nb.private_rows`). The scatter's extra cost is adding and
# clearing the copies' rows every iteration (and writing two lattice arrays at once); the ranged splat's is a pass of
# the points' rows through memory. The copies hold the vertices that several parts of the image share: few for a
# spatial term (θγ = 3: 0.002-0.005 rows per point), many for a bilateral term whose vertices span the image
# (CRF-RNN's θα = 160, θβ = 3: 0.1-3 on VOC images; pydensecrf's README kernels 0.01-0.2). Whole inference, ranged /
# scatter, VOC images 5-39 (not the benchmarks'), 1 thread: 0.68-1.00 from 0.101 rows per point up, 0.97-1.08 at
# 0.008-0.086; 2 threads 0.80-1.06 and 0.98-1.15. The vertex count alone does not tell them apart: a spatial term
# of 0.13 vertices per point has almost no shared rows (ranged there: 0.93-1.25).
_RANGED_PRIVATE_ROWS_PER_POINT = 0.1


def label_rows(x: np.ndarray, negate: bool = False) -> np.ndarray:
    """``x (L, P)`` (or ``-x``) as the kernels' rows ``(P, Cp)``: a point's labels side by side, padded with
    zeros (a new array: ``x`` is only read)."""
    L, n = x.shape
    rows = _memory.cached_empty((n, _padded(L)))
    _nb.channels_to_rows(np.ascontiguousarray(x, dtype=np.float32), rows, negate)
    return rows


def _splat_parts(n: int) -> int:
    """The splat's private copies for ``n`` points (and the backward's runs of weight gradients): fixed, so that
    the bits do not depend on the thread count, and at most one per block of points, as the kernels clamp it."""
    return max(1, min(_SPLAT_COPIES, -(-n // _nb._BLOCK)))


def private_rows(stacked: tuple, num_points: int) -> np.ndarray:
    """The rows the scatter's private splat copies would hold for each term of :func:`stack_lattices`
    (``stacked``, over ``num_points`` points), ``(T,)`` int64 (:func:`_nb.private_rows`)."""
    offsets, tstart, td1, vstart, vcount = stacked[1], stacked[2], stacked[3], stacked[6], stacked[7]
    return _nb.private_rows(offsets, tstart, td1, vstart, vcount, num_points, _splat_parts(num_points))


def splat_by_ranges(stacked: tuple, num_points: int) -> np.ndarray:
    """Which terms of :func:`stack_lattices` (``stacked``, over ``num_points`` points) the fused pass splats by
    vertex ranges, ``(T,)`` bool: those whose private splat copies would hold at least
    ``_RANGED_PRIVATE_ROWS_PER_POINT`` rows per point. It depends on the lattices only, not on the thread count."""
    return private_rows(stacked, num_points) >= _RANGED_PRIVATE_ROWS_PER_POINT * num_points


def _scattered_rows(stacked: tuple, ranged: np.ndarray) -> int:
    """The end of the last scattered term's vertex rows (0 if every term is ranged): the rows the splat's
    private copies need."""
    vstart, vcount = stacked[6], stacked[7]
    ends = (vstart + vcount)[~ranged]
    return int(ends.max()) if ends.size else 0


def fused_mean_field(logits: torch.Tensor, stacked: tuple, n_iterations: int, *, marginals: bool = True,
                     history: Optional[np.ndarray] = None, splats: Optional[np.ndarray] = None,
                     energies: bool = False, labels: bool = False) -> torch.Tensor:
    """``n_iterations`` of mean field from ``logits (L, P)`` (float32, CPU) on the terms of
    :func:`stack_lattices`: ``Q = softmax(logits)``, then per iteration ``softmax(logits + sum_t
    message_t(Q))``. Returns ``Q (L, P)``, or with ``marginals=False`` the last iteration's logits
    (before its softmax; ``logits`` itself for 0 iterations). ``history``: an optional float32 array
    ``(n_iterations, P, Cp)`` (:func:`history_shape`) that receives the marginals each iteration filters, as
    rows, for :func:`fused_mean_field_backward`; with it, ``splats`` (:func:`splats_shape`, float32) receives
    the splats of those marginals for the terms :func:`splat_rows` names (their ``pres`` must be ones).
    ``energies``: ``logits`` holds unary energies ``-logits`` (pydensecrf's convention), negated on the way
    in (in the copy the kernel's layout needs anyway). ``labels``: return each point's arg max of the output,
    ``(P,)`` int64 (the first label at a tie), instead of the output itself."""
    return fused_mean_field_rows(label_rows(logits.detach().numpy(), negate=energies), logits.shape[0], stacked,
                                 n_iterations, marginals=marginals, history=history, splats=splats, labels=labels)


def fused_mean_field_rows(logit_rows: np.ndarray, n_labels: int, stacked: tuple, n_iterations: int, *,
                          marginals: bool = True, history: Optional[np.ndarray] = None,
                          splats: Optional[np.ndarray] = None, labels: bool = False,
                          by_point: bool = False) -> torch.Tensor:
    """:func:`fused_mean_field` from the logits already laid out as :func:`label_rows` lays them out,
    ``logit_rows (P, Cp)`` float32 for ``n_labels`` labels (only read): for a caller that keeps its unary in that
    layout, so that no call copies it again (:class:`crfrnn.densecrf.DenseCRF`). ``by_point``: the ``(L, P)``
    output is the transpose of a contiguous ``(P, L)`` array, a point's labels side by side (pydensecrf's
    layout, in which an arg max over the labels reads each point's values together, with no copy)."""
    L, n = n_labels, stacked[8].shape[1]  # pre (T, P): the terms' points
    if (logit_rows.dtype != np.float32 or logit_rows.shape != (n, _padded(L))
            or not logit_rows.flags["C_CONTIGUOUS"]):
        raise ValueError(f"logit_rows must be C-contiguous float32 of shape (P, Cp) = ({n}, {_padded(L)}) for the "
                         f"terms' {n} points and {L} labels, got {logit_rows.dtype} {logit_rows.shape}")
    un = logit_rows
    ranged = splat_by_ranges(stacked, n)
    # the ranged splat's input rows (the history, if kept) and the output share memory (the kernel's last pass
    # writes the output and no rows): one array fewer to fault in per call
    row_values = n * un.shape[1] if ranged.any() and history is None else 0
    shared = _memory.cached_empty(max(row_values, 0 if labels else L * n))
    qrows = shared[:row_values].reshape(-1, un.shape[1])
    out = shared[:0 if labels else L * n].reshape((-1, L) if by_point else (L, -1))
    lab = np.empty(n if labels else 0, dtype=np.int64)
    m = int(stacked[7].sum())  # vertices of all terms
    parts = _splat_parts(n)
    work = (np.zeros((parts, _scattered_rows(stacked, ranged) + 1, un.shape[1]), np.float32),  # + a zero row
            *(np.empty((m + 1, un.shape[1]), np.float32) for _ in range(2)))  # + the zero row
    srow, kept = _checked_splats(splats, stacked, n_iterations, L, n, history is not None)
    if history is None:
        history = np.empty((0, n, un.shape[1]), np.float32)
    elif history.shape != history_shape(n_iterations, L, n) or history.dtype != np.float32:
        raise ValueError(f"history must be float32 of shape {history_shape(n_iterations, L, n)}, got "
                         f"{history.dtype} {history.shape}")
    _nb.dense_meanfield(un, out, *stacked, n_iterations, marginals, history, lab, *work, ranged,
                        numba.get_num_threads(), qrows, kept, srow, by_point)
    if labels:
        return torch.from_numpy(lab)
    return torch.from_numpy(out).T if by_point else torch.from_numpy(out)


def _splat_layout(splats, vcount: np.ndarray, n_iterations: int, L: int, n: int) -> tuple:
    """``(srow, splats)`` for the kernels: :func:`splat_rows`' rows and the checked array, or rows -1 and an
    empty array without ``splats``."""
    if splats is None:
        return np.full(vcount.shape[0], -1, np.int64), np.empty((0, 0, _padded(L)), np.float32)
    shape = splats_shape(vcount, n_iterations, L, n)
    if splats.shape != shape or splats.dtype != np.float32:
        raise ValueError(f"splats must be float32 of shape {shape}, got {splats.dtype} {splats.shape}")
    return splat_rows(vcount, n)[0], splats


def _checked_splats(splats, stacked: tuple, n_iterations: int, L: int, n: int, with_history: bool) -> tuple:
    """:func:`_splat_layout` for the forward: splats are kept only with a history and for terms whose
    ``pres`` are ones."""
    if splats is not None and not with_history:
        raise ValueError("splats are kept only with a history")
    srow, splats = _splat_layout(splats, stacked[7], n_iterations, L, n)
    if not np.all(stacked[8][srow >= 0] == 1):
        raise ValueError("splats are kept only for terms whose pres are ones")
    return srow, splats


def transposed_terms(stacked: tuple, lattices: Sequence[PermutohedralLattice],
                     scales: Sequence[np.ndarray]) -> tuple:
    """:func:`stack_lattices`' terms (``stacked``, of ``lattices``) for their transposed filters
    (:func:`fused_mean_field_backward`): ``scales`` (the forward's ``posts``) as ``pres``, and ``posts`` None.
    The lattice arrays are shared, not copied."""
    pre = np.stack([np.asarray(s, np.float32) for s in scales])
    post = np.stack([np.full(pre.shape[1], np.float32(lat.compiled_arrays().alpha), np.float32) for lat in lattices])
    return stacked[:8] + (pre, post) + stacked[10:]


def fused_mean_field_backward(grad: torch.Tensor, history: np.ndarray, stacked: tuple,
                              matrices: Sequence[np.ndarray], splats: Optional[np.ndarray] = None) -> tuple:
    """The backward pass of :func:`fused_mean_field` with ``marginals=False`` (float32, CPU): per iteration, last
    first, one compiled splat-blur pass per term and one pass over the points
    (:func:`crfrnn.lattice._numba_kernels.dense_meanfield_backward`).

    ``grad (L, P)``: the gradient of the output logits; ``history``: the forward's (:func:`history_shape`);
    ``stacked``: the forward's terms for their transposed filters (:func:`transposed_terms`: the transpose of
    ``post * F(Q)`` is ``F^T(post * g)``, and ``F^T`` is ``F`` with the blur's directions in reverse order);
    ``matrices``: the terms' label matrices ``W_t (L, L)`` (logits ``+= W_t @ m_t``; a scalar or diagonal weight
    as its matrix); ``splats``: the forward's, if it kept them (the terms :func:`splat_rows` names then do
    their label-space work on their vertices). Returns the gradient of the unary logits ``(L, P)`` and the
    list of the ``W_t``'s gradients ``(L, L)``."""
    L, n = grad.shape
    cp = _padded(L)
    (bary, offsets, tstart, td1, nbr, nstart, vstart, vcount, pre, post) = stacked[:10]
    nt = td1.shape[0]
    rows = label_rows(grad.detach().numpy())
    wtcols = np.zeros((nt, cp, cp), dtype=np.float32)
    for t, w in enumerate(matrices):
        wtcols[t, :L, :L] = w
    m = int(vcount.sum())
    ranged = splat_by_ranges(stacked, n)  # as the forward splats
    # the unary's gradient is summed in place of the incoming one when no term's splat reads rows from it
    d_unary = rows.copy() if ranged.any() else rows
    parts = _splat_parts(n)  # the splat's copies and the weight gradients' runs
    partial = np.zeros((parts, _scattered_rows(stacked, ranged) + 1, cp), np.float32)
    work = [np.empty((m + 1, cp), np.float32) for _ in range(4)]
    accs = np.zeros((parts, nt, cp, cp), np.float32)
    srow, splats = _splat_layout(splats, vcount, history.shape[0], L, n)
    if any(np.any(post[t] != post[t, 0]) for t in np.flatnonzero(srow >= 0)):
        raise ValueError("the label work is done on the vertices only for terms whose posts are one value")
    _nb.dense_meanfield_backward(rows, d_unary, history, bary, offsets, tstart, td1, nbr, nstart, vstart, vcount,
                                 pre, post, wtcols, L, ranged, numba.get_num_threads(), partial, *work, accs,
                                 splats, srow)
    total = accs[0].copy()
    for p in range(1, accs.shape[0]):  # in order: the same bits for any thread count
        total += accs[p]
    for t in np.flatnonzero(srow >= 0):  # summed over vertices: the slice's scale (one per term) still to apply
        total[t] *= post[t, 0]
    grads = [torch.from_numpy(np.ascontiguousarray(total[t, :L, :L].T)) for t in range(nt)]
    out = np.empty((L, n), np.float32)
    _nb.rows_to_channels(d_unary, out)
    return torch.from_numpy(out), grads
