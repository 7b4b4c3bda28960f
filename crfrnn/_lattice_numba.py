"""Compiled CPU kernels of the permutohedral lattice (Numba, no compiler needed at install).

The algorithm follows Adams, Baek & Davis (2010) as written in Krähenbühl's ``permutohedral.cpp``
(the code pydensecrf and the official CRF-RNN wrap); see :mod:`crfrnn.lattice` for the maths and
the public API. Everything here works on NumPy arrays and is called only from ``crfrnn.lattice``.

Parallel layout (all loops that write disjoint memory are ``prange``):

* elevation, simplex search and barycentric weights: parallel over points;
* hash-table insertion: sequential (one open-addressing table per image);
* neighbour search: parallel over lattice vertices (read-only table look-ups);
* splat: parallel over blocks of points, each thread scattering into its own copy of the lattice
  (summed afterwards), so no atomics are needed and the input is read in memory order;
* blur: parallel over vertices, one pass per lattice direction;
* slice: parallel over points.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_EMPTY = -1


@njit(parallel=True, cache=True)
def elevate(feat, scale, keys, bary):  # pragma: no cover - compiled
    """Embed ``feat (N, d)`` float64 in the lattice.

    Writes ``keys (N, d+1, d)`` int32: the first ``d`` coordinates of the ``d+1`` enclosing
    simplex vertices, and ``bary (N, d+1)`` float64: the barycentric weights of the point
    (both allocated by the caller with NumPy, which asks for huge pages).
    """
    n, d = feat.shape
    down = 1.0 / (d + 1)
    for k in prange(n):
        elevated = np.empty(d + 1, dtype=np.float64)
        rem0 = np.empty(d + 1, dtype=np.int64)
        rank = np.zeros(d + 1, dtype=np.int64)
        b = np.zeros(d + 2, dtype=np.float64)
        sm = 0.0
        for j in range(d, 0, -1):
            cf = feat[k, j - 1] * scale[j - 1]
            elevated[j] = sm - j * cf
            sm += cf
        elevated[0] = sm
        total = 0
        for i in range(d + 1):
            v = down * elevated[i]
            up = np.ceil(v) * (d + 1)
            dn = np.floor(v) * (d + 1)
            if up - elevated[i] < elevated[i] - dn:
                rem0[i] = np.int64(up)
            else:
                rem0[i] = np.int64(dn)
            total += rem0[i]
        total = total // (d + 1)
        for i in range(d):
            di = elevated[i] - rem0[i]
            for j in range(i + 1, d + 1):
                if di < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) * down
            b[d - rank[i]] += v
            b[d - rank[i] + 1] -= v
        b[0] += 1.0 + b[d + 1]
        for r in range(d + 1):
            bary[k, r] = b[r]
            for i in range(d):
                # canonical simplex vertex r: coordinate = r, or r - (d+1) past position d - r
                c = r if rank[i] <= d - r else r - (d + 1)
                keys[k, r, i] = rem0[i] + c


@njit(inline="always")
def _hash(keys, row, d):  # pragma: no cover - compiled
    h = np.uint64(14695981039346656037)
    for i in range(d):
        h ^= np.uint64(np.int64(keys[row, i]) & 0xFFFFFFFF)
        h *= np.uint64(1099511628211)
    h ^= h >> np.uint64(29)
    return h


@njit(cache=True)
def _rehash(vkeys, m, cap):  # pragma: no cover - compiled
    d = vkeys.shape[1]
    mask = np.uint64(cap - 1)
    table = np.full(cap, _EMPTY, dtype=np.int32)
    for v in range(m):
        h = _hash(vkeys, v, d) & mask
        while table[h] != _EMPTY:
            h = (h + np.uint64(1)) & mask
        table[h] = v
    return table


@njit(cache=True)
def insert(keys, offsets, base):  # pragma: no cover - compiled
    """Insert ``keys (P, d)`` into a fresh hash table (sequential).

    Writes ``offsets (P,)`` int32, ``base`` + the vertex index of every key; returns ``vkeys (M, d)``
    the distinct keys in order of first appearance and the table (``int32``, size a power of two,
    ``-1`` = empty). Table and key store grow with the number of distinct keys (load factor <= 1/2),
    so they stay cache-sized.
    """
    p, d = keys.shape
    cap = 1024
    mask = np.uint64(cap - 1)
    table = np.full(cap, _EMPTY, dtype=np.int32)
    vkeys = np.empty((cap // 2, d), dtype=np.int32)
    m = 0
    for q in range(p):
        h = _hash(keys, q, d) & mask
        while True:
            v = table[h]
            if v == _EMPTY:
                table[h] = m
                for i in range(d):
                    vkeys[m, i] = keys[q, i]
                offsets[q] = m + base
                m += 1
                if 2 * m >= cap:
                    cap *= 2
                    mask = np.uint64(cap - 1)
                    table = _rehash(vkeys, m, cap)
                    grown = np.empty((cap // 2, d), dtype=np.int32)
                    grown[:m] = vkeys[:m]
                    vkeys = grown
                break
            same = True
            for i in range(d):
                if vkeys[v, i] != keys[q, i]:
                    same = False
                    break
            if same:
                offsets[q] = v + base
                break
            h = (h + np.uint64(1)) & mask
    return vkeys[:m].copy(), table


@njit(inline="always")
def _find_neighbour(vkeys, table, v, j, sign, d):  # pragma: no cover - compiled
    """Index of vertex ``v`` moved by ``sign`` along lattice direction ``j``, or -1.

    Direction ``j`` adds ``(d+1) e_j - 1`` (``sign=+1``) or its negative; only the first ``d``
    coordinates are stored (the last is implied by the zero sum).
    """
    cap = table.shape[0]
    mask = np.uint64(cap - 1)
    h = np.uint64(14695981039346656037)
    for i in range(d):
        c = vkeys[v, i] - sign + (sign * (d + 1) if i == j else 0)
        h ^= np.uint64(np.int64(c) & 0xFFFFFFFF)
        h *= np.uint64(1099511628211)
    h ^= h >> np.uint64(29)
    h &= mask
    while True:
        u = table[h]
        if u == _EMPTY:
            return -1
        same = True
        for i in range(d):
            c = vkeys[v, i] - sign + (sign * (d + 1) if i == j else 0)
            if vkeys[u, i] != c:
                same = False
                break
        if same:
            return u
        h = (h + np.uint64(1)) & mask


@njit(parallel=True, cache=True)
def neighbours(vkeys, table, base):  # pragma: no cover - compiled
    """Blur neighbours ``(d+1, M, 2)`` int32 of every vertex, offset by ``base``; -1 = missing."""
    m, d = vkeys.shape
    nbr = np.empty((d + 1, m, 2), dtype=np.int32)
    for v in prange(m):
        for j in range(d + 1):
            a = _find_neighbour(vkeys, table, v, j, 1, d)
            b = _find_neighbour(vkeys, table, v, j, -1, d)
            nbr[j, v, 0] = a + base if a >= 0 else -1
            nbr[j, v, 1] = b + base if b >= 0 else -1
    return nbr


_BLOCK = 64  # points per work item: values are moved through a (_BLOCK, C) buffer


@njit(inline="always")
def _block_range(blk, nblk_img, n):  # pragma: no cover - compiled
    b = blk // nblk_img
    i0 = (blk - b * nblk_img) * _BLOCK
    return b, i0, min(i0 + _BLOCK, n)


def _filter_values(vals, bary, offsets, nbr, reverse, consts, parts, out, pre, post, accumulate):  # pragma: no cover
    """Splat → blur (d+1 directions, reversed if ``reverse``) → slice.

    ``vals (B, C, N)`` (the caller's layout), ``bary``/``offsets`` flat ``(B*N*(d+1),)``,
    ``nbr (d+1, M, 2)``, ``consts = [0.5, alpha]`` and ``bary`` in ``vals``' dtype; ``parts``
    private lattice copies for the splat (about the number of threads). Writes ``out (B, C, N)``
    (allocated by the caller: NumPy asks the kernel for huge pages, which matters above ~32 MB).
    Optional per-point scales fused into the passes: ``pre (B*N,)`` multiplies the input, ``post
    (B*N,)`` the output (empty arrays = none); ``accumulate`` adds into ``out`` instead of writing:
    ``out (+)= post * F(pre * vals)``, for pydensecrf's normalisations without extra passes.

    Points are processed in blocks of ``_BLOCK`` consecutive pixels of one image, moved through a
    small channel-last buffer so that every lattice row access reads or writes ``C`` contiguous
    values. The splat walks the points in memory order (streaming the input) and scatters into
    per-thread copies of the lattice, summed afterwards: no atomics, no random reads of the input.
    """
    nb, c, n = vals.shape
    d1 = nbr.shape[0]
    m = nbr.shape[1]
    nblk_img = (n + _BLOCK - 1) // _BLOCK
    nblk = nb * nblk_img
    parts = max(1, min(parts, nblk))
    partial = np.zeros((parts, m, c), dtype=vals.dtype)
    for t in prange(parts):
        acc = partial[t]
        buf = np.empty((_BLOCK, c), dtype=vals.dtype)
        for blk in range(nblk * t // parts, nblk * (t + 1) // parts):
            b, i0, i1 = _block_range(blk, nblk_img, n)
            for ch in range(c):
                for i in range(i0, i1):
                    buf[i - i0, ch] = vals[b, ch, i]
            if pre.shape[0] > 0:
                for i in range(i0, i1):
                    sp = pre[b * n + i]
                    for ch in range(c):
                        buf[i - i0, ch] *= sp
            for i in range(i0, i1):
                src = buf[i - i0]
                base = (b * n + i) * d1
                for r in range(d1):
                    w = bary[base + r]
                    dst = acc[offsets[base + r]]
                    for ch in range(c):
                        dst[ch] += w * src[ch]
    if parts == 1:
        lat = partial[0]
    else:
        lat = np.empty((m, c), dtype=vals.dtype)
        for v in prange(m):
            for ch in range(c):
                lat[v, ch] = partial[0, v, ch]
            for t in range(1, parts):
                for ch in range(c):
                    lat[v, ch] += partial[t, v, ch]
    tmp = np.empty((m, c), dtype=vals.dtype)
    half = consts[0]
    for jj in range(d1):
        j = d1 - 1 - jj if reverse else jj
        for v in prange(m):
            a = nbr[j, v, 0]
            b = nbr[j, v, 1]
            dst = tmp[v]
            s = lat[v]
            if a >= 0 and b >= 0:
                sa = lat[a]
                sb = lat[b]
                for ch in range(c):
                    dst[ch] = s[ch] + half * (sa[ch] + sb[ch])
            elif a >= 0:
                sa = lat[a]
                for ch in range(c):
                    dst[ch] = s[ch] + half * sa[ch]
            elif b >= 0:
                sb = lat[b]
                for ch in range(c):
                    dst[ch] = s[ch] + half * sb[ch]
            else:
                for ch in range(c):
                    dst[ch] = s[ch]
        lat, tmp = tmp, lat
    al = consts[1]
    for blk in prange(nblk):
        b, i0, i1 = _block_range(blk, nblk_img, n)
        buf = np.zeros((_BLOCK, c), dtype=vals.dtype)
        for i in range(i0, i1):
            dst = buf[i - i0]
            base = (b * n + i) * d1
            for r in range(d1):
                w = bary[base + r] * al
                src = lat[offsets[base + r]]
                for ch in range(c):
                    dst[ch] += w * src[ch]
        if post.shape[0] > 0:
            for i in range(i0, i1):
                sp = post[b * n + i]
                for ch in range(c):
                    buf[i - i0, ch] *= sp
        if accumulate:
            for ch in range(c):
                for i in range(i0, i1):
                    out[b, ch, i] += buf[i - i0, ch]
        else:
            for ch in range(c):
                for i in range(i0, i1):
                    out[b, ch, i] = buf[i - i0, ch]


# one algorithm, two compilations: multi-threaded, and serial for small inputs (where waking threads
# costs more than the work, badly so on an oversubscribed machine). Both give identical results: the
# splat's ``parts`` is fixed by the caller, not by the thread count.
filter_values = njit(parallel=True, cache=True)(_filter_values)
filter_values_serial = njit(parallel=False, cache=True)(_filter_values)
