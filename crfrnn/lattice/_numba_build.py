"""The numba backend's lattice build: the compiled elevation, hash insert and neighbour search
(:mod:`crfrnn.lattice._numba_kernels`) driven image by image over a batch.

Every large array is allocated here with NumPy. The float64 barycentric weights are made only on request
(:func:`barycentric64`, for float64 values): the float32 filters, CRF-RNN's and pydensecrf's, read the float32
weights the build writes, and the float64 ones would be 36 MB written and never read for a 1000x750 bilateral
lattice.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numba
import numpy as np
import torch

from . import _memory
from . import _numba_kernels as _nb


class NumbaBuild(NamedTuple):
    """What :func:`build` returns: ``offsets`` and ``bary32`` ``(B*N*(D+1),)``, ``bary64`` (or None),
    ``nbr (D+1, M, 2)`` and the number ``M`` of vertices of all images."""

    offsets: np.ndarray
    bary32: np.ndarray
    bary64: Optional[np.ndarray]
    nbr: np.ndarray
    num_vertices: int


def absmax(features: torch.Tensor, bandwidth, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``max |features / bandwidth|`` per dimension ``(D,)`` float64 over the kept points (what the lattice's
    range check needs, without the divided points: dividing by a positive number keeps the order)."""
    B, D = features.shape[:2]
    x = features.reshape(B, D, -1)
    if valid is not None:
        x = torch.where(valid[:, None, :], x, torch.zeros((), dtype=x.dtype))
    # amin and amax: aminmax along a dimension took 2 ms on (1, 5, 187500) floats, these 0.1 ms together
    lo, hi = x.amin(2), x.amax(2)  # (B, D)
    top = torch.maximum(-lo, hi).to(torch.float64)
    if bandwidth is not None:
        top = top / bandwidth.detach().to(torch.float64).reshape(-1, D)
    return top.amax(0)


def _sources(features: torch.Tensor, bandwidth, valid: Optional[torch.Tensor]):
    """Per image: its kept points' features as channels ``(D, k)`` (float32 or float64, a view where nothing
    is masked), the divisors ``(D,)`` float64 and the kept point indices (None: all)."""
    B, D = features.shape[:2]
    x = features.reshape(B, D, -1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64)  # exact; Numba reads float32 and float64
    divisors = (np.ones((1, D)) if bandwidth is None
                else bandwidth.detach().to(torch.float64).reshape(-1, D).numpy())
    for b in range(B):
        keep = None if valid is None or bool(valid[b].all()) else valid[b].numpy().nonzero()[0]
        src = x[b] if keep is None else x[b][:, torch.from_numpy(keep)]
        yield src.contiguous().numpy(), np.ascontiguousarray(divisors[b % divisors.shape[0]]), keep


def _elevate_insert(src, divisors, scale, bary64, bary32, offsets, base: int):
    """One image's points: elevation and hash insert fused (:func:`_nb.elevate_insert`) where a kernel is
    compiled for the dimension, else :func:`_nb.elevate` of the point rows then :func:`_nb.insert` (the fused
    build's tested twin; it writes the float64 weights on the way). Returns the vertex keys and the table."""
    d, k = src.shape
    if d <= _nb._ELEVATE_FIXED:
        return _nb.elevate_insert(src, divisors, scale, bary64, bary32, offsets, base, numba.get_num_threads())
    keys = np.empty((k, d + 1, d), dtype=np.int32)
    rows = np.ascontiguousarray(src.T, dtype=np.float64) / divisors
    b64 = bary64 if bary64.shape[0] else np.empty((k, d + 1), dtype=np.float64)
    _nb.elevate(rows, scale, keys, b64)
    bary32[...] = b64
    return _nb.insert(keys.reshape(-1, d), offsets, base, d + 1, numba.get_num_threads())


def _weights(B: int, n: int, d: int, dtype, masked: bool) -> np.ndarray:
    w = _memory.cached_empty((B, n, d + 1), dtype)  # written and read point after point
    if masked:
        w.fill(0)  # left-out points keep weight 0 (on their image's first vertex)
    return w


def _elevate_images(features, bandwidth, valid, scale, offsets, bary32, bary64):
    """Elevate and insert ``features (B, D, *spatial)`` image by image into the batch arrays ``offsets`` and
    ``bary32`` ``(B, N, D+1)`` and ``bary64`` (or None), the vertices numbered on from the previous image's; a
    left-out point keeps weight 0 on its image's first vertex. Yields each image's vertex keys, hash table and
    first vertex number, after its rows are in place."""
    d = features.shape[1]
    no64 = np.empty((0, d + 1), dtype=np.float64)
    base = 0
    for b, (src, divisors, keep) in enumerate(_sources(features, bandwidth, valid)):
        whole = (offsets[b], bary32[b], no64 if bary64 is None else bary64[b])
        # the kept points' rows are made apart and scattered in (an image's own rows where nothing is left out)
        off, b32, b64 = whole if keep is None else \
            (np.empty((len(keep), d + 1), dtype=a.dtype) if a.shape[0] else a for a in whole)
        vkeys, table = _elevate_insert(src, divisors, scale, b64, b32, off.reshape(-1), base)
        if keep is not None:
            offsets[b] = base
            for dst, part in zip(whole, (off, b32, b64)):
                if part.shape[0]:
                    dst[keep] = part
        yield vkeys, table, base
        base += vkeys.shape[0]


def build(features: torch.Tensor, bandwidth, valid: Optional[torch.Tensor], scale: np.ndarray) -> NumbaBuild:
    """The lattice of ``features (B, D, *spatial)`` (divided by ``bandwidth``; points where ``valid (B, N)`` is
    False left out), images one after the other, their vertices numbered on from the previous image's."""
    B, d = features.shape[:2]
    n = features[0, 0].numel()
    offsets = _memory.cached_empty((B, n, d + 1), np.int32)
    bary32 = _weights(B, n, d, np.float32, valid is not None)
    bary64 = _weights(B, n, d, np.float64, valid is not None) if d > _nb._ELEVATE_FIXED else None
    nbrs = [_nb.neighbours(vkeys, table, base)
            for vkeys, table, base in _elevate_images(features, bandwidth, valid, scale, offsets, bary32, bary64)]
    nbr = np.concatenate(nbrs, axis=1) if len(nbrs) > 1 else nbrs[0]
    total = int(nbr.shape[1])
    return NumbaBuild(offsets.reshape(-1), bary32.reshape(-1), None if bary64 is None else bary64.reshape(-1),
                      nbr, total)


def barycentric64(features: torch.Tensor, bandwidth, valid: Optional[torch.Tensor], scale: np.ndarray) -> np.ndarray:
    """The float64 barycentric weights ``(B*N*(D+1),)`` of :func:`build`'s lattice, bit for bit (the same
    compiled elevation, its vertex keys, offsets and float32 weights thrown away)."""
    B, d = features.shape[:2]
    n = features[0, 0].numel()
    bary64 = _weights(B, n, d, np.float64, valid is not None)
    scratch = (np.empty((B, n, d + 1), dtype=np.int32), np.empty((B, n, d + 1), dtype=np.float32))
    for _ in _elevate_images(features, bandwidth, valid, scale, *scratch, bary64):
        pass
    return bary64.reshape(-1)
