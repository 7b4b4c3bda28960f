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

Lattice rows are padded to whole SIMD registers and the per-point row updates of the splat and the
slice are explicit vector FMAs (:func:`_splat_rows`, :func:`_slice_rows`, Numba intrinsics). The
dense-CRF mean field of :mod:`crfrnn.densecrf` has its own fused kernel, :func:`dense_meanfield`.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# A hash-table slot is one uint64: the vertex in the low 32 bits and, above them, the high 32 bits of its key's
# hash (a fingerprint: the slot's index uses the low bits), so that a probe passes over another key's slot
# without reading that key (a cache miss once the table holds ~1 vertex per pixel); all ones = empty.
_EMPTY_SLOT = np.uint64(0xFFFFFFFFFFFFFFFF)
_VERTEX_BITS = np.uint64(0xFFFFFFFF)
_PRINT_BITS = np.uint64(0xFFFFFFFF00000000)
_ELEVATE_CHUNK = 1024  # points per work item of the elevation
_AHEAD_HASH = 8  # hash look-ups are computed and their table slots prefetched this many keys ahead
_PREFETCH_TABLE = 1 << 16  # ... by the insert once its table has this many slots (512 KB)


@intrinsic
def _prefetch(typingctx, arr, i):  # pragma: no cover - compiled
    """Hint the cache to fetch ``arr[i]``: an element of a 1-D array, or row ``i`` of a C-contiguous
    2-D array (both ends: a row of 24 float32 spans two lines). No effect on results. Used ahead of
    the irregular reads that the out-of-order core cannot see coming (hash slots, blur neighbours,
    a point's simplex vertices), so that many misses are in flight at once."""
    if not (isinstance(arr, types.Array) and arr.ndim in (1, 2) and arr.layout == "C" and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        if signature.args[0].ndim == 1:
            where = [idx]
        else:
            width = builder.extract_value(a.shape, 1)
            first = builder.mul(idx, width)
            where = [first, builder.add(first, builder.sub(width, ir.Constant(width.type, 1)))]
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        for k in where:  # read, keep in all levels, data cache
            ptr = builder.bitcast(builder.gep(a.data, [k]), i8p)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


def elevate(feat, scale, keys, bary):
    """Embed ``feat (N, d)`` float64 in the lattice.

    Writes ``keys (N, d+1, d)`` int32: the first ``d`` coordinates of the ``d+1`` enclosing
    simplex vertices, and ``bary (N, d+1)`` float64: the barycentric weights of the point
    (both allocated by the caller with NumPy, which asks for huge pages). Dimensions up to
    ``_ELEVATE_FIXED`` run a kernel compiled for that ``d`` (its loops unroll: 1.3-1.5x faster).
    """
    d = feat.shape[1]
    if d > _ELEVATE_FIXED:
        return _elevate_any(feat, scale, keys, bary)
    kernel = _elevate_fixed.get(d)
    if kernel is None:
        kernel = _elevate_fixed[d] = _elevate_for(d)
    return kernel(feat, scale, keys, bary)


_ELEVATE_FIXED = 8
_elevate_fixed = {}


def _elevate_for(d):
    """:func:`elevate` compiled for one dimension ``d`` (a constant of the closure; cached per ``d``)."""

    @njit(parallel=True, cache=True)
    def kernel(feat, scale, keys, bary):  # pragma: no cover - compiled
        for ck in prange((feat.shape[0] + _ELEVATE_CHUNK - 1) // _ELEVATE_CHUNK):
            _elevate_chunk(feat, scale, keys, bary, ck, d)

    return kernel


@njit(parallel=True, cache=True)
def _elevate_any(feat, scale, keys, bary):  # pragma: no cover - compiled
    for ck in prange((feat.shape[0] + _ELEVATE_CHUNK - 1) // _ELEVATE_CHUNK):
        _elevate_chunk(feat, scale, keys, bary, ck, feat.shape[1])


@njit(inline="always")
def _elevate_chunk(feat, scale, keys, bary, ck, d):  # pragma: no cover - compiled
    """Points ``ck * _ELEVATE_CHUNK ...`` of :func:`elevate` (scratch allocated once per chunk)."""
    n = feat.shape[0]
    down = 1.0 / (d + 1)
    elevated = np.empty(d + 1, dtype=np.float64)
    rem0 = np.empty(d + 1, dtype=np.int64)
    rank = np.empty(d + 1, dtype=np.int64)
    b = np.empty(d + 2, dtype=np.float64)
    for k in range(ck * _ELEVATE_CHUNK, min(n, (ck + 1) * _ELEVATE_CHUNK)):
        _elevate_point(feat, scale, keys, bary, k, k, d, down, elevated, rem0, rank, b)


@njit(inline="always")
def _elevate_point(feat, scale, keys, bary, k, out, d, down, elevated, rem0, rank, b):  # pragma: no cover - compiled
    """Point ``k`` of :func:`elevate`, written to row ``out`` of ``keys``/``bary`` (scratch from the caller)."""
    for i in range(d + 1):
        rank[i] = 0
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
    for i in range(d + 1):
        b[i] = elevated[i] - rem0[i]  # (b is scratch here)
    for i in range(d):
        di = b[i]
        for j in range(i + 1, d + 1):
            lt = np.int64(di < b[j])  # branch-free: the comparisons are unpredictable
            rank[i] += lt
            rank[j] += 1 - lt
    for i in range(d + 2):
        b[i] = 0.0
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
        bary[out, r] = b[r]
        for i in range(d):
            # canonical simplex vertex r: coordinate = r, or r - (d+1) past position d - r
            c = r if rank[i] <= d - r else r - (d + 1)
            keys[out, r, i] = rem0[i] + c


@njit(inline="always")
def _hash_term(c, i):  # pragma: no cover - compiled
    # coordinate i's contribution, a non-linear scramble of (i, c); the terms are summed, so the
    # coordinates are hashed independently (instruction-level parallelism, no FNV-style serial chain)
    x = (np.uint64(np.int64(c) & 0xFFFFFFFF) << np.uint64(8)) + np.uint64(i)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    return x


@njit(inline="always")
def _hash_mix(h):  # pragma: no cover - compiled
    h ^= h >> np.uint64(32)
    h *= np.uint64(0xD6E8FEB86659FD93)
    h ^= h >> np.uint64(32)
    return h


@njit(inline="always")
def _hash(keys, row, d):  # pragma: no cover - compiled
    h = np.uint64(0)
    for i in range(d):
        h += _hash_term(keys[row, i], i)
    return _hash_mix(h)


@njit(inline="always")
def _slot(v, full):  # pragma: no cover - compiled
    """The table slot of vertex ``v`` whose key hashes to ``full`` (before masking)."""
    return (full & _PRINT_BITS) | np.uint64(v)


@njit(inline="always")
def _may_hold(slot, full):  # pragma: no cover - compiled
    """Whether ``slot`` (not empty) may hold the key hashing to ``full``: their fingerprints agree."""
    return ((slot ^ full) & _PRINT_BITS) == np.uint64(0)


@njit(cache=True)
def _rehash(vkeys, m, cap):  # pragma: no cover - compiled
    d = vkeys.shape[1]
    mask = np.uint64(cap - 1)
    table = np.full(cap, _EMPTY_SLOT, dtype=np.uint64)
    for v in range(m):
        full = _hash(vkeys, v, d)
        h = full & mask
        while table[h] != _EMPTY_SLOT:
            h = (h + np.uint64(1)) & mask
        table[h] = _slot(v, full)
    return table


@njit(inline="always")
def _find_key(table, vkeys, keys, row, full, mask, d):  # pragma: no cover - compiled
    """Probe ``table`` for key ``keys[row]`` (hash ``full``): ``(v, h)``, its vertex and slot, or ``v = -1`` and
    the empty slot ``h`` where it would go."""
    h = full & mask
    while True:
        slot = table[h]
        if slot == _EMPTY_SLOT:
            return -1, h
        if _may_hold(slot, full):
            v = np.int64(slot & _VERTEX_BITS)
            same = True
            for i in range(d):
                if vkeys[v, i] != keys[row, i]:
                    same = False
                    break
            if same:
                return v, h
        h = (h + np.uint64(1)) & mask


@njit(inline="always")
def _add_key(table, vkeys, keys, row, full, h, m, cap, d):  # pragma: no cover - compiled
    """Vertex ``m`` for key ``keys[row]`` into the empty slot ``h``; the table and key store doubled once half
    full. Returns ``(table, vkeys, cap)``. Called on a miss only: the two inserts' loops (:func:`_insert_range`,
    :func:`_build_range`) each spell out find-or-add, because a helper returning the arrays for every key made the
    build 1.3-1.45x slower (the arrays' reference counts, touched per key)."""
    table[h] = _slot(m, full)
    for i in range(d):
        vkeys[m, i] = keys[row, i]
    if 2 * (m + 1) >= cap:
        cap *= 2
        table = _rehash(vkeys, m + 1, cap)
        grown = np.empty((cap // 2, d), dtype=np.int32)
        grown[:m + 1] = vkeys[:m + 1]
        vkeys = grown
    return table, vkeys, cap


@njit(inline="always")
def _same_key(keys, a, b, d):  # pragma: no cover - compiled
    """Whether rows ``a`` and ``b`` of ``keys`` hold the same key: the inserts' check of the previous point's same
    vertex, which then takes its offset unhashed."""
    for i in range(d):
        if keys[a, i] != keys[b, i]:
            return False
    return True


@njit(inline="always")
def _initial_capacity(npts):  # pragma: no cover - compiled
    """The fused build's first table size for ``npts`` points: room for a quarter of a vertex per point before
    it grows (the spatial lattice of θγ = 3 has 0.13; a bilateral one of θβ = 3 0.1-1.2 on VOC images), so the
    early doublings and their rehashes are skipped: the bilateral build 0.94-0.95x the time of a table that
    starts at 1024 slots, the spatial 0.97-0.99x (5 VOC images, alternating in one process); sized for a vertex
    per point, the spatial build was slower (a sparse table, more cache misses)."""
    cap = 1024
    while cap < npts // 2:
        cap *= 2
    return cap


_CHUNK_POINTS = 8192  # the fewest points a parallel insert or build gives a chunk (and a hash table) of its own


@njit(cache=True)
def _chunk_count(npts, threads):  # pragma: no cover - compiled
    """Chunks of points a parallel insert or lattice build cuts ``npts`` points into: one per thread, each of at
    least ``_CHUNK_POINTS`` points (so one chunk, the serial work, below twice that)."""
    return min(threads, max(1, npts // _CHUNK_POINTS))


@njit(cache=True)
def _insert_range(keys, q0, q1, offsets, base, stride, firsts):  # pragma: no cover - compiled
    """Insert rows ``q0 <= q < q1`` of ``keys (P, d)`` into a fresh hash table (sequential).

    Writes ``offsets[q]`` int32 = ``base`` + the vertex index of key ``q`` (vertices numbered in order
    of first appearance) and, if ``firsts`` is not empty, ``firsts[q0 + v]`` = the row where vertex
    ``v`` first appears. Returns ``vkeys (M, d)`` and the table (``uint64`` slots, :func:`_slot`, size a power
    of two). Table and key store start at :func:`_initial_capacity` and grow with the number of distinct keys
    (load factor <= 1/2), so they stay cache-sized. Neighbouring points mostly share their simplex: a key equal
    to the one ``stride`` (= d+1) rows earlier (the previous point's same vertex) takes its offset unhashed.
    """
    d = keys.shape[1]
    record = firsts.shape[0] > 0
    cap = _initial_capacity((q1 - q0) // stride)  # as the fused build's: the same table
    mask = np.uint64(cap - 1)
    table = np.full(cap, _EMPTY_SLOT, dtype=np.uint64)
    vkeys = np.empty((cap // 2, d), dtype=np.int32)
    m = 0
    # once the table outgrows the L2 cache (~1 vertex per pixel), the keys ahead are hashed and their
    # table slots prefetched: ``ring[k]`` holds the hash of key ``ahead[k]``
    ring = np.empty(_AHEAD_HASH, dtype=np.uint64)
    ahead = np.full(_AHEAD_HASH, -1, dtype=np.int64)
    for q in range(q0, q1):
        k = q % _AHEAD_HASH
        hashed, h = ahead[k] == q, ring[k]
        qa = q + _AHEAD_HASH
        if cap >= _PREFETCH_TABLE and qa < q1:
            ring[k] = _hash(keys, qa, d)
            ahead[k] = qa
            _prefetch(table, ring[k] & mask)
        if q - q0 >= stride and _same_key(keys, q, q - stride, d):
            offsets[q] = offsets[q - stride]
            continue
        full = h if hashed else _hash(keys, q, d)
        v, h = _find_key(table, vkeys, keys, q, full, mask, d)
        if v >= 0:
            offsets[q] = v + base
            continue
        table, vkeys, cap = _add_key(table, vkeys, keys, q, full, h, m, cap, d)
        mask = np.uint64(cap - 1)
        if record:
            firsts[q0 + m] = q
        offsets[q] = m + base
        m += 1
    return vkeys[:m].copy(), table


@njit(parallel=True, cache=True)
def insert(keys, offsets, base, stride, threads):  # pragma: no cover - compiled
    """Insert ``keys (P, d)`` (``stride`` = d+1 rows per point) into a fresh hash table.

    Writes ``offsets (P,)`` int32 = ``base`` + vertex index (vertices numbered in order of first
    appearance); returns ``vkeys (M, d)`` and the table (see :func:`_insert_range`). With ``threads``
    > 1 the points are cut into contiguous chunks, each inserted into its own table in parallel;
    the chunks' distinct keys are then merged in chunk order (a small sequential insert) and the
    offsets renumbered: the numbering is exactly the sequential one, whatever the thread count.
    """
    p = keys.shape[0]
    npts = p // stride
    nch = _chunk_count(npts, threads)
    if nch <= 1:
        return _insert_range(keys, 0, p, offsets, base, stride, np.empty(0, dtype=np.int64))
    bounds = np.empty(nch + 1, dtype=np.int64)  # chunk c = key rows bounds[c] ... bounds[c + 1]
    for c in range(nch + 1):
        bounds[c] = npts * c // nch * stride
    firsts = np.empty(p, dtype=np.int64)
    counts = np.zeros(nch, dtype=np.int64)
    for c in prange(nch):
        vk, _ = _insert_range(keys, bounds[c], bounds[c + 1], offsets, 0, stride, firsts)
        counts[c] = vk.shape[0]
    # merge: every chunk's distinct keys, in chunk order, then in order of first appearance
    start = np.zeros(nch + 1, dtype=np.int64)  # chunk c's vertices are merged rows start[c] ...
    for c in range(nch):
        start[c + 1] = start[c] + counts[c]
    merged_keys = np.empty((start[nch], keys.shape[1]), dtype=np.int32)
    for c in range(nch):
        for j in range(counts[c]):
            merged_keys[start[c] + j] = keys[firsts[bounds[c] + j]]
    return _insert_merged(merged_keys, start, bounds, offsets, base)


_BUILD_BLOCK = 256  # points the fused build elevates at a time, their keys in a scratch that stays in L2


def elevate_insert(src, divisors, scale, bary64, bary32, offsets, base, threads):
    """:func:`elevate` and :func:`insert` (its tested twin) in one pass over the points ``src[:, k] / divisors``
    (``src (d, N)`` float32 or float64, one image's features as channels; ``divisors (d,)`` float64, the
    bandwidths: ``float64(src) / divisors`` are the bits of :func:`._geometry_grad.divided`), ``d <=
    _ELEVATE_FIXED``: the same ``offsets``, vertex keys and table, bit for bit, without the ``(N, d+1, d)`` array
    of keys (90 MB for a 1000x750 bilateral lattice, written once and read once) nor the ``(N, d)`` float64 point
    rows: the points are divided and elevated ``_BUILD_BLOCK`` at a time into a small scratch and their keys
    inserted from there. Writes ``bary32 (N, d+1)`` float32 (the barycentric weights rounded), ``bary64`` (the
    same in float64) unless it is empty, and ``offsets (N (d+1),)`` int32; returns ``vkeys (M, d)`` and the
    table."""
    d = src.shape[0]
    kernel = _build_fixed.get(d)
    if kernel is None:
        kernel = _build_fixed[d] = _build_for(d)
    return kernel(src, divisors, scale, bary64, bary32, offsets, base, threads)


_build_fixed = {}


def _build_for(d):
    """:func:`elevate_insert` compiled for one dimension ``d``, a constant of the closure (its loops unroll). The
    closure captures nothing but ``d``: Numba's on-disk cache can then find it again in a new process."""

    @njit(cache=True)
    def serial(src, divisors, scale, bary64, bary32, offsets, base):  # pragma: no cover - compiled
        # inlined, not a call of _build_points: 1-4 % faster (one more compile when both paths are used)
        return _build_range(src, divisors, scale, 0, src.shape[1], bary64, bary32, offsets, base, d)

    @njit(parallel=True, cache=True)
    def chunked(src, divisors, scale, bary64, bary32, offsets, base, threads):  # pragma: no cover - compiled
        return _build_chunks(src, divisors, scale, bary64, bary32, offsets, base, threads, d)

    def build(src, divisors, scale, bary64, bary32, offsets, base, threads):
        # one chunk runs outside a parallel function: compiled on its own it is ~5 % faster
        if _chunk_count(src.shape[1], threads) <= 1:
            return serial(src, divisors, scale, bary64, bary32, offsets, base)
        return chunked(src, divisors, scale, bary64, bary32, offsets, base, threads)

    return build


# 0 as a run-time int64: a literal 0 passed to _build_points would make Numba compile it for that constant
_ZERO = np.int64(0)


@njit(cache=True)
def _build_points(src, divisors, scale, i0, i1, bary64, bary32, offsets, base, d):  # pragma: no cover - compiled
    """:func:`_build_range`, compiled on its own once per dimension for the parallel build: its closure calls it with
    its constant ``d``, which Numba passes as a literal (``Literal[int](d)``, a constant in the compiled code, so
    the loops unroll as they do inlined). Inlined into the parallel build, the build took 30-38 s to compile per
    dimension at every first use (the parallel-loop passes over the whole build), against 15-23 s now (6-12 s of it
    this function), with the same bits and the same speed."""
    return _build_range(src, divisors, scale, i0, i1, bary64, bary32, offsets, base, d)


@njit(inline="always")
def _elevate_block(pts, scale, keys3, bsc, nb, d, el, r0, rk, bt, sm, tot):  # pragma: no cover - compiled
    """Points ``0 <= k < nb`` of ``pts (d, _BUILD_BLOCK)`` (a coordinate per row) elevated as
    :func:`_elevate_point` elevates a point, written to rows ``k + 1`` of ``keys3``/``bsc``: the same operations on
    the same values (the same bits), each step a loop over the block's points on scratch laid out a coordinate per
    row (``el``, ``bt`` float64, ``r0``, ``rk`` int32 ``(d + 1, _BUILD_BLOCK)``; ``sm``, ``tot`` a row each), which
    LLVM vectorises in part: the spatial build (d = 2) 0.55-0.63x the time of a point at a time, the bilateral
    (d = 5) 0.92-0.98x."""
    _block_remainders(pts, scale, nb, d, el, r0, rk, bt, sm, tot)
    _block_weights_keys(keys3, bsc, nb, d, el, r0, rk, bt, sm)


@njit(inline="always")
def _block_remainders(pts, scale, nb, d, el, r0, rk, bt, sm, tot):  # pragma: no cover - compiled
    """:func:`_elevate_block`'s first half: the elevated points ``el``, their nearest remainder-0 points ``r0`` and
    ranks ``rk`` (after the wrap), and in ``bt`` each coordinate's share ``v`` of the barycentric weights."""
    down = 1.0 / (d + 1)
    for k in range(nb):
        sm[k] = 0.0
        tot[k] = 0
    for j in range(d, 0, -1):
        sj = scale[j - 1]
        for k in range(nb):
            cf = pts[j - 1, k] * sj
            el[j, k] = sm[k] - j * cf
            sm[k] += cf
    for k in range(nb):
        el[0, k] = sm[k]
    for i in range(d + 1):
        ei = el[i]
        ri = r0[i]
        for k in range(nb):  # a loop of its own (one array written): vectorised
            e = ei[k]
            v = down * e
            up = np.ceil(v) * (d + 1)
            dn = np.floor(v) * (d + 1)
            ri[k] = np.int32(up if up - e < e - dn else dn)
        bi = bt[i]
        for k in range(nb):
            tot[k] += ri[k]
            bi[k] = ei[k] - ri[k]
        rk[i, :nb] = 0
    for i in range(d):
        for j in range(i + 1, d + 1):
            for k in range(nb):
                lt = np.int32(bt[i, k] < bt[j, k])
                rk[i, k] += lt
                rk[j, k] += 1 - lt
    for k in range(nb):
        tot[k] = tot[k] // (d + 1)
    for i in range(d + 1):
        for k in range(nb):
            rr = rk[i, k] + tot[k]
            rm = r0[i, k]
            lo = rr < 0
            hi = rr > d
            rk[i, k] = rr + (d + 1) if lo else (rr - (d + 1) if hi else rr)
            rm = rm + (d + 1) if lo else (rm - (d + 1) if hi else rm)
            r0[i, k] = rm
            bt[i, k] = (el[i, k] - rm) * down


@njit(inline="always")
def _block_weights_keys(keys3, bsc, nb, d, el, r0, rk, bt, sm):  # pragma: no cover - compiled
    """:func:`_elevate_block`'s second half: the barycentric weights and the simplex's keys.

    :func:`_elevate_point` adds ``v`` to weight ``d - rank`` and subtracts it from weight ``d - rank + 1`` for
    each coordinate; the ranks being a permutation, weight ``r >= 1`` receives two terms, ``v(rank d - r) - v(rank
    d - r + 1)`` (the same bits in either order), and weight 0 ``v(rank d) + (1 - v(rank 0))``."""
    for r in range(d + 1):
        for k in range(nb):
            a = 0.0
            c = 0.0
            for i in range(d + 1):
                a = bt[i, k] if rk[i, k] == d - r else a
                c = bt[i, k] if rk[i, k] == d - r + 1 else c
            el[r, k] = a - c if r > 0 else a
    for k in range(nb):
        c = 0.0
        for i in range(d + 1):
            c = bt[i, k] if rk[i, k] == 0 else c
        sm[k] = c
    for k in range(nb):
        el[0, k] = el[0, k] + (1.0 - sm[k])
    for k in range(nb):
        for r in range(d + 1):
            bsc[k + 1, r] = el[r, k]
            for i in range(d):
                # canonical simplex vertex r: coordinate = r, or r - (d+1) past position d - r
                keys3[k + 1, r, i] = r0[i, k] + (r if rk[i, k] <= d - r else r - (d + 1))


@njit(inline="always")
def _build_range(src, divisors, scale, i0, i1, bary64, bary32, offsets, base, d):  # pragma: no cover - compiled
    """Points ``i0 <= i < i1`` of :func:`elevate_insert` into a fresh table, as :func:`_insert_range` inserts
    their keys (sequential)."""
    stride = d + 1
    with64 = bary64.shape[0] > 0
    pts = np.empty((d, _BUILD_BLOCK), dtype=np.float64)  # a block of points, divided, a coordinate per row
    el = np.empty((d + 1, _BUILD_BLOCK), dtype=np.float64)  # _elevate_block's scratch
    bt = np.empty((d + 1, _BUILD_BLOCK), dtype=np.float64)
    # int32 (the keys' type): as int64 the block's loops ran on half as many lanes and the build took 1.2x as long
    r0 = np.empty((d + 1, _BUILD_BLOCK), dtype=np.int32)
    rk = np.empty((d + 1, _BUILD_BLOCK), dtype=np.int32)
    sm = np.empty(_BUILD_BLOCK, dtype=np.float64)
    tot = np.empty(_BUILD_BLOCK, dtype=np.int64)
    keys = np.empty(((_BUILD_BLOCK + 1) * stride, d), dtype=np.int32)  # point slot 0: the previous point
    keys3 = keys.reshape((_BUILD_BLOCK + 1, stride, d))
    bsc = np.empty((_BUILD_BLOCK + 1, stride), dtype=np.float64)
    cap = _initial_capacity(i1 - i0)
    mask = np.uint64(cap - 1)
    table = np.full(cap, _EMPTY_SLOT, dtype=np.uint64)
    vkeys = np.empty((cap // 2, d), dtype=np.int32)
    m = 0
    hs = np.empty(_BUILD_BLOCK * stride, dtype=np.uint64)  # the block's key hashes
    first_row = i0 * stride
    for s in range(i0, i1, _BUILD_BLOCK):
        e = min(i1, s + _BUILD_BLOCK)
        for i in range(d):
            for k in range(e - s):
                pts[i, k] = np.float64(src[i, s + k]) / divisors[i]
        _elevate_block(pts, scale, keys3, bsc, e - s, d, el, r0, rk, bt, sm, tot)
        for k in range(e - s):
            for r in range(stride):
                bary32[s + k, r] = np.float32(bsc[k + 1, r])
            if with64:
                for r in range(stride):
                    bary64[s + k, r] = bsc[k + 1, r]
        nrows = (e - s) * stride
        # the block's hashes first, in a loop of their own (no branches): the build 0.83-0.91x the time of hashing
        # each key in the insert's loop, some keys ahead for the prefetch (which wasted the hashes of the keys that
        # the previous point's same vertex then took unhashed)
        for lq in range(nrows):
            hs[lq] = _hash(keys, lq + stride, d)
        for lq in range(nrows):
            q = s * stride + lq
            row = lq + stride
            if cap >= _PREFETCH_TABLE and lq + _AHEAD_HASH < nrows:
                _prefetch(table, hs[lq + _AHEAD_HASH] & mask)
            if q - first_row >= stride and _same_key(keys, row, row - stride, d):  # the previous point's same vertex
                offsets[q] = offsets[q - stride]
                continue
            full = hs[lq]
            v, h = _find_key(table, vkeys, keys, row, full, mask, d)
            if v >= 0:
                offsets[q] = v + base
                continue
            table, vkeys, cap = _add_key(table, vkeys, keys, row, full, h, m, cap, d)
            mask = np.uint64(cap - 1)
            offsets[q] = m + base
            m += 1
        keys3[0, :, :] = keys3[e - s, :, :]
    return vkeys[:m].copy(), table


@njit(inline="always")
def _build_chunks(src, divisors, scale, bary64, bary32, offsets, base, threads, d):  # pragma: no cover - compiled
    """:func:`elevate_insert`: chunks of points in parallel, then merged as :func:`insert` merges them."""
    stride = d + 1
    npts = src.shape[1]
    nch = _chunk_count(npts, threads)  # more than one: one chunk is the serial build's work
    bounds = np.empty(nch + 1, dtype=np.int64)
    for c in range(nch + 1):
        bounds[c] = npts * c // nch
    found = np.empty((npts * stride, d), dtype=np.int32)  # chunk c's distinct keys from row bounds[c] * stride
    counts = np.zeros(nch, dtype=np.int64)
    for c in prange(nch):
        vk, _ = _build_points(src, divisors, scale, bounds[c], bounds[c + 1], bary64, bary32, offsets, _ZERO, d)
        counts[c] = vk.shape[0]
        _copy_rows(found, bounds[c] * stride, vk)
    return _merge_chunks(found, bounds, counts, stride, offsets, base)


@njit(cache=True)
def _copy_rows(dst, r0, src):  # pragma: no cover - compiled
    """``dst[r0 : r0 + len(src)] = src`` (a loop: the slice assignment's shape check compiled its error message's
    string formatting into every caller, seconds at each first use)."""
    for r in range(src.shape[0]):
        for i in range(src.shape[1]):
            dst[r0 + r, i] = src[r, i]


@njit(cache=True)
def _merge_chunks(found, bounds, counts, stride, offsets, base):  # pragma: no cover - compiled
    """:func:`_build_chunks`' merge: chunk ``c``'s ``counts[c]`` distinct keys (rows ``bounds[c] * stride ...`` of
    ``found``) gathered in chunk order, then :func:`_insert_merged` (as :func:`insert` ends). One compiled function
    for every dimension."""
    nch = counts.shape[0]
    start = np.zeros(nch + 1, dtype=np.int64)
    for c in range(nch):
        start[c + 1] = start[c] + counts[c]
    merged = np.empty((start[nch], found.shape[1]), dtype=np.int32)
    for c in range(nch):
        _copy_rows(merged, start[c], found[bounds[c] * stride: bounds[c] * stride + counts[c]])
    return _insert_merged(merged, start, bounds * stride, offsets, base)


@njit(parallel=True, cache=True)
def _insert_merged(merged, start, rows, offsets, base):  # pragma: no cover - compiled
    """The end of a chunked insert (:func:`insert`, :func:`_merge_chunks`): ``merged (M, d)``, every chunk's distinct
    keys in chunk order (chunk ``c``'s from row ``start[c]``), inserted into one table, numbered from ``base``; then
    chunk ``c``'s ``offsets`` (rows ``rows[c] ... rows[c + 1]``, numbered from 0 within the chunk) renumbered to
    the merged vertices. Returns ``vkeys`` and the table, as :func:`_insert_range`."""
    m = merged.shape[0]
    remap = np.empty(m, dtype=np.int32)
    vkeys, table = _insert_range(merged, 0, m, remap, base, m + 1, np.empty(0, dtype=np.int64))
    for c in prange(start.shape[0] - 1):
        for q in range(rows[c], rows[c + 1]):
            offsets[q] = remap[start[c] + offsets[q]]
    return vkeys, table


@njit(inline="always")
def _neighbour_hashes(vkeys, v, d, out):  # pragma: no cover - compiled
    """Hashes (before masking) of the ``d+1`` blur neighbours of vertex ``v`` on the positive side: ``out[j]`` for
    ``+((d+1) e_j - 1)`` (``j = d`` moves only the implied last coordinate). The hash is a sum of per-coordinate
    terms, so each neighbour's is the vertex's shifted sum with one term replaced."""
    hp = np.uint64(0)
    for i in range(d):
        hp += _hash_term(vkeys[v, i] - 1, i)
    for j in range(d):
        c = vkeys[v, j]
        out[j] = _hash_mix(hp - _hash_term(c - 1, j) + _hash_term(c + d, j))
    out[d] = _hash_mix(hp)


@njit(inline="always")
def _find_neighbour(vkeys, table, v, j, d, full, mask):  # pragma: no cover - compiled
    """Index of vertex ``v`` moved along lattice direction ``j`` (``+(d+1) e_j - 1``; only the first ``d``
    coordinates are stored, the last is implied by the zero sum), or -1; ``full`` its hash. :func:`_find_key`'s
    probe with the key formed on the fly: looking it up from a scratch row (one probe loop for both) made the
    neighbour search 1.2-1.3x slower."""
    h = full & mask
    while True:
        slot = table[h]
        if slot == _EMPTY_SLOT:
            return -1
        if _may_hold(slot, full):
            u = np.int64(slot & _VERTEX_BITS)
            same = True
            for i in range(d):
                if vkeys[u, i] != vkeys[v, i] - 1 + (d + 1 if i == j else 0):
                    same = False
                    break
            if same:
                return u
        h = (h + np.uint64(1)) & mask


@njit(inline="always")
def _key_packing(vkeys):  # pragma: no cover - compiled
    """Bit fields that hold every vertex key of ``vkeys (M, d)``, and every key one blur step from one (a coordinate
    moves by -1 or +d), as one int64: ``(lo, shift, fits)``, coordinate ``i`` stored as ``key[i] - lo[i]`` from bit
    ``shift[i]`` on; ``fits`` is False where the fields need more than 63 bits (or there are no vertices)."""
    m, d = vkeys.shape
    lo = np.zeros(d, dtype=np.int64)
    hi = np.zeros(d, dtype=np.int64)
    shift = np.zeros(d, dtype=np.int64)
    if m == 0:
        return lo, shift, False
    for i in range(d):
        lo[i] = vkeys[0, i]
        hi[i] = vkeys[0, i]
    for v in range(1, m):
        for i in range(d):
            x = np.int64(vkeys[v, i])
            lo[i] = min(lo[i], x)
            hi[i] = max(hi[i], x)
    total = 0
    for i in range(d):
        lo[i] -= 1
        span = hi[i] + d - lo[i] + 1
        bits = 1
        while (np.int64(1) << bits) < span:
            bits += 1
        shift[i] = total
        total += bits
    return lo, shift, total <= 63


@njit(inline="always")
def _packed_key(vkeys, v, lo, shift, d):  # pragma: no cover - compiled
    s = np.int64(0)
    for i in range(d):
        s += (np.int64(vkeys[v, i]) - lo[i]) << shift[i]
    return s


@njit(inline="always")
def _find_packed(packed, table, want, full, mask):  # pragma: no cover - compiled
    """:func:`_find_neighbour` where every key packs into one int64 (:func:`_key_packing`): a slot whose fingerprint
    agrees is checked against ``packed[u] == want``, one 8-byte read, instead of the vertex's key row."""
    h = full & mask
    while True:
        slot = table[h]
        if slot == _EMPTY_SLOT:
            return -1
        if _may_hold(slot, full):
            u = np.int64(slot & _VERTEX_BITS)
            if packed[u] == want:
                return u
        h = (h + np.uint64(1)) & mask


_NBR_CHUNK = 4096  # vertices per work item of the neighbour search


@njit(parallel=True, cache=True)
def neighbours(vkeys, table, base):  # pragma: no cover - compiled
    """Blur neighbours ``(d+1, M, 2)`` int32 of every vertex, offset by ``base``; -1 = missing.

    Each vertex looks up its neighbours on the positive side only: ``u = v + ((d+1) e_j - 1)`` is found by ``v``
    and writes both ``nbr[j, v, 0] = u`` and ``nbr[j, u, 1] = v`` (``v`` is the only vertex whose positive
    neighbour is ``u``, so no two work items write the same entry): half the look-ups. Software-pipelined: the
    table slots of vertex ``v + _AHEAD_HASH``'s neighbours are prefetched while ``v``'s are looked up (a table of
    ~1 vertex per pixel is larger than the L2 cache). Where the keys pack into one int64 (:func:`_key_packing`:
    always for CRF-RNN's and pydensecrf's kernels), a found slot is checked against the vertices' packed keys
    (8 bytes a vertex) rather than their key rows (4 d bytes, a second random read): the search 0.80-0.89x the
    time on VOC images at 500x375 (2007_004241, 220 k vertices: 31 -> 25 ms); otherwise against the rows."""
    m, d = vkeys.shape
    nbr = np.full((d + 1, m, 2), -1, dtype=np.int32)
    mask = np.uint64(table.shape[0] - 1)
    lo, shift, packs = _key_packing(vkeys)
    packed = np.empty(m if packs else 0, dtype=np.int64)
    down = np.int64(0)  # the packed step that moves every coordinate by -1
    steps = np.zeros(d + 1, dtype=np.int64)  # ... then coordinate j by +(d+1) (j = d: none)
    if packs:
        for v in prange(m):
            packed[v] = _packed_key(vkeys, v, lo, shift, d)
        for i in range(d):
            down += np.int64(1) << shift[i]
            steps[i] = np.int64(d + 1) << shift[i]
    for ck in prange((m + _NBR_CHUNK - 1) // _NBR_CHUNK):
        v0 = ck * _NBR_CHUNK
        v1 = min(m, v0 + _NBR_CHUNK)
        ring = np.empty((_AHEAD_HASH, d + 1), dtype=np.uint64)  # hashes of the vertices ahead
        for v in range(v0, min(v1, v0 + _AHEAD_HASH)):
            _neighbour_hashes(vkeys, v, d, ring[v % _AHEAD_HASH])
        for v in range(v0, v1):
            hs = ring[v % _AHEAD_HASH]
            pv = packed[v] - down if packs else np.int64(0)  # v's key with every coordinate moved by -1
            for j in range(d + 1):
                if packs:
                    u = _find_packed(packed, table, pv + steps[j], hs[j], mask)
                else:
                    u = _find_neighbour(vkeys, table, v, j, d, hs[j], mask)
                if u >= 0:
                    nbr[j, v, 0] = u + base
                    nbr[j, u, 1] = v + base
            va = v + _AHEAD_HASH
            if va < v1:
                _neighbour_hashes(vkeys, va, d, hs)
                for k in range(d + 1):
                    _prefetch(table, hs[k] & mask)
    return nbr


# Explicit-SIMD row kernels (LLVM vector fused multiply-adds: 8 float32 or 4 float64 per register) for
# lattices whose rows are padded to a multiple of ``_LANES`` values: LLVM's own vectorisation of a
# ``for ch in range(c)`` loop re-checks aliasing and peels a remainder for every short row, which costs
# more than the arithmetic. ``w = bary * scale`` is rounded to the dtype, then one FMA per value.
def _float_kind(t):
    """(llvm element type, lanes, fma name) for a float32/float64 array type, else None."""
    if isinstance(t, types.Array) and t.dtype == types.float32:
        return ir.FloatType(), 8, "llvm.fma.v8f32"
    if isinstance(t, types.Array) and t.dtype == types.float64:
        return ir.DoubleType(), 4, "llvm.fma.v4f64"
    return None


class _RowKernel:
    """IR helpers shared by :func:`_slice_rows`, :func:`_slice_terms` and :func:`_splat_rows`: the vector type and
    FMA of the arrays' dtype, the number of vector chunks in a (padded) row, per simplex vertex ``k`` the lattice
    row's first element and the broadcast weight ``bary[k] * scale``, and the slices' sum in registers."""

    def __init__(self, builder, kind, rowa, lata, offa, bara, scale):
        elem, lanes, name = kind
        self.builder, self.offa, self.bara, self.scale = builder, offa, bara, scale
        self.vec = ir.VectorType(elem, lanes)
        self.lanes = lanes
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vec, [self.vec] * 3), name)
        self.intp = builder.extract_value(rowa.shape, 0).type
        self.shift = ir.Constant(self.intp, lanes.bit_length() - 1)
        self.width = builder.extract_value(lata.shape, 1)
        self.nchunk = builder.lshr(builder.extract_value(rowa.shape, 0), self.shift)

    def vec_ptr(self, data, index):
        return self.builder.bitcast(self.builder.gep(data, [index]), self.vec.as_pointer())

    def chunk(self, data, start, c):
        """Pointer to vector ``c`` (a constant) of the row starting at element ``start`` (None: 0)."""
        first = ir.Constant(self.intp, c * self.lanes)
        return self.vec_ptr(data, first if start is None else self.builder.add(start, first))

    def vertex(self, k, split=None, shift=None, scale=None):
        """Row start and broadcast weight of simplex vertex ``k`` (``scale``: this call's, else the kernel's); with
        ``split``/``shift``, vertices numbered below ``split`` are moved ``shift`` rows on (into the splat's
        private copy)."""
        b = self.builder
        off = b.sext(b.load(b.gep(self.offa.data, [k])), self.intp)
        if split is not None:
            off = b.add(off, b.select(b.icmp_signed("<", off, split), shift, ir.Constant(self.intp, 0)))
        x = b.fmul(b.load(b.gep(self.bara.data, [k])), self.scale if scale is None else scale)
        return b.mul(off, self.width), _broadcast(b, self.vec, x)

    def slices(self, init, out, each_term):
        """``out[:] = init + `` the slices ``each_term`` adds, per vector of the row in registers (its vectors
        unrolled for rows of up to ``_UNROLL`` vectors). ``each_term(add)`` emits ``add(base, d1, src, scale)``
        for each term, in order: ``sum_{r < d1} (bary[base + r] * scale) * src[offsets[base + r], :]`` is added,
        ``r`` in order (``src``: the lattice's data)."""
        b = self.builder

        def unrolled(K):
            accs = [cgutils.alloca_once_value(b, b.load(self.chunk(init, None, c), align=4)) for c in range(K)]

            def add(base, d1, src, scale):
                with cgutils.for_range(b, d1) as lr:
                    row0, w = self.vertex(b.add(base, lr.index), scale=scale)
                    for c in range(K):
                        sv = b.load(self.chunk(src, row0, c), align=4)
                        b.store(b.call(self.fma, [w, sv, b.load(accs[c])]), accs[c])

            each_term(add)
            for c in range(K):
                b.store(b.load(accs[c]), self.chunk(out, None, c), align=4)

        def generic():
            with cgutils.for_range(b, self.nchunk) as lc:
                c0 = b.shl(lc.index, self.shift)
                accp = cgutils.alloca_once_value(b, b.load(self.vec_ptr(init, c0), align=4))

                def add(base, d1, src, scale):
                    with cgutils.for_range(b, d1) as lr:
                        row0, w = self.vertex(b.add(base, lr.index), scale=scale)
                        sv = b.load(self.vec_ptr(src, b.add(row0, c0)), align=4)
                        b.store(b.call(self.fma, [w, sv, b.load(accp)]), accp)

                each_term(add)
                b.store(b.load(accp), self.vec_ptr(out, c0), align=4)

        _by_width(b, self.nchunk, unrolled, generic)


def _broadcast(b, vec, x):
    """The scalar ``x`` in every lane of the vector type ``vec``."""
    w = cgutils.get_null_value(vec)
    for lane in range(vec.count):
        w = b.insert_element(w, x, ir.Constant(ir.IntType(32), lane))
    return w


def _same_float_arrays(*ts):
    kinds = [_float_kind(t) for t in ts]
    return kinds[0] is not None and all(k == kinds[0] for k in kinds) and all(t.layout == "C" for t in ts)


def _is_i32_vector(t):
    return isinstance(t, types.Array) and t.dtype == types.int32 and t.ndim == 1


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """Scalar ``a * b + c`` with one rounding (as the vector kernels), float32 or float64."""
    if not (a == b == c and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        t = ir.FloatType() if signature.args[0] == types.float32 else ir.DoubleType()
        name = "llvm.fma.f32" if signature.args[0] == types.float32 else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name)
        return builder.call(fn, list(args))

    return a(a, b, c), codegen


_UNROLL = 4  # rows of up to this many vectors (32 float32 labels) keep every vector of the row in a register


def _by_width(b, nchunk, unrolled, generic, most=_UNROLL):
    """Emit ``unrolled(K)`` for rows of ``K = nchunk = 1 ... most`` vectors (a branch on the row's width, the
    same for every call of a kernel: predicted), else ``generic()``. Unrolled, per-row work (a simplex vertex's
    row and weight, a label's broadcast) is done once per row instead of once per vector, and the row's vectors
    stay in registers."""

    def emit(K):
        if K > most:
            generic()
            return
        with b.if_else(b.icmp_unsigned("==", nchunk, ir.Constant(nchunk.type, K))) as (then, other):
            with then:
                unrolled(K)
            with other:
                emit(K + 1)

    emit(1)


@intrinsic
def _slice_rows(typingctx, row, lat, offsets, bary, base, d1, scale):  # pragma: no cover - compiled
    """``row[:] += sum_{r < d1} (bary[base + r] * scale) * lat[offsets[base + r], :]`` (``len(row)`` a
    multiple of the vector width, ``lat (M, len(row))``), the sum held in registers (per vector of the row,
    the terms are added in the order of ``r``)."""
    if not (_same_float_arrays(row, lat, bary) and row.ndim == 1 and lat.ndim == 2 and _is_i32_vector(offsets)):
        return None
    kind = _float_kind(row)
    sig = types.void(row, lat, offsets, bary, types.intp, types.intp, row.dtype)

    def codegen(context, builder, signature, args):
        rowa, lata, offa, bara = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(4))
        base, d1, scale = args[4], args[5], args[6]
        k_ = _RowKernel(builder, kind, rowa, lata, offa, bara, scale)
        k_.slices(rowa.data, rowa.data, lambda add: add(base, d1, lata.data, scale))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _slice_terms(typingctx, row, init, lat, tmp, offsets, bary, tstart, td1, post, i):  # pragma: no cover - compiled
    """``row[:] = init + sum_t sum_{r < d1_t} (bary[k] * post[t, i]) * src_t[offsets[k], :]`` with ``k = tstart[t] + i
    d1_t + r`` and ``src_t`` ``tmp`` for an odd ``d1_t``, else ``lat``: point ``i``'s slice of every term, the sum
    held in registers from ``init`` on (per vector, terms in order and ``r`` in order: :func:`_slice_rows` term
    after term onto a copy of ``init``, bit for bit, without storing and reloading the row between terms)."""
    if not (_same_float_arrays(row, init, lat, tmp, bary, post) and row.ndim == 1 and init.ndim == 1 and lat.ndim == 2
            and tmp.ndim == 2 and post.ndim == 2 and _is_i32_vector(offsets) and isinstance(i, types.Integer)
            and all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.int64 for a in (tstart, td1))):
        return None
    kind = _float_kind(row)
    sig = types.void(row, init, lat, tmp, offsets, bary, tstart, td1, post, types.intp)

    def codegen(context, builder, signature, args):
        rowa, inita, lata, tmpa, offa, bara, tsa, tda, posta = (
            context.make_array(signature.args[k])(context, builder, args[k]) for k in range(9))
        b = builder
        i = args[9]
        k_ = _RowKernel(b, kind, rowa, lata, offa, bara, None)
        one = ir.Constant(k_.intp, 1)
        nterms = b.extract_value(tsa.shape, 0)
        npts = b.extract_value(posta.shape, 1)

        def each_term(add):
            with cgutils.for_range(b, nterms) as lt:
                t = lt.index
                d1 = b.load(b.gep(tda.data, [t]))
                odd = b.icmp_unsigned("!=", b.and_(d1, one), ir.Constant(k_.intp, 0))
                add(b.add(b.load(b.gep(tsa.data, [t])), b.mul(i, d1)), d1, b.select(odd, tmpa.data, lata.data),
                    b.load(b.gep(posta.data, [b.add(b.mul(t, npts), i)])))

        k_.slices(inita.data, rowa.data, each_term)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _splat_rows(typingctx, lat, offsets, bary, base, d1, scale, row, split, shift):  # pragma: no cover - compiled
    """``lat[o, :] += (bary[base + r] * scale) * row[:]`` for ``r < d1``, ``o = offsets[base + r]``, plus
    ``shift`` if ``o < split`` (``len(row)`` a multiple of the vector width, ``lat (rows, len(row))``)."""
    if not (_same_float_arrays(lat, bary, row) and row.ndim == 1 and lat.ndim == 2 and _is_i32_vector(offsets)):
        return None
    kind = _float_kind(row)
    sig = types.void(lat, offsets, bary, types.intp, types.intp, row.dtype, row, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        lata, offa, bara = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3))
        rowa = context.make_array(signature.args[6])(context, builder, args[6])
        base, d1, scale, split, shift = args[3], args[4], args[5], args[7], args[8]
        k_ = _RowKernel(builder, kind, rowa, lata, offa, bara, scale)
        b = builder

        def unrolled(K):
            rv = [b.load(k_.chunk(rowa.data, None, c), align=4) for c in range(K)]
            with cgutils.for_range(b, d1) as lr:
                row0, w = k_.vertex(b.add(base, lr.index), split, shift)
                for c in range(K):
                    dp = k_.chunk(lata.data, row0, c)
                    b.store(b.call(k_.fma, [w, rv[c], b.load(dp, align=4)]), dp, align=4)

        def generic():
            with cgutils.for_range(b, d1) as lr:
                row0, w = k_.vertex(b.add(base, lr.index), split, shift)
                with cgutils.for_range(b, k_.nchunk) as lc:
                    c0 = b.shl(lc.index, k_.shift)
                    rv = b.load(k_.vec_ptr(rowa.data, c0), align=4)
                    dp = k_.vec_ptr(lata.data, b.add(row0, c0))
                    b.store(b.call(k_.fma, [w, rv, b.load(dp, align=4)]), dp, align=4)

        _by_width(builder, k_.nchunk, unrolled, generic)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _matvec_row(typingctx, dst, src, cols, c):  # pragma: no cover - compiled
    """``dst[:] = sum_{k < c} src[k] * cols[k, :]`` (``dst``, ``src`` distinct rows of a multiple of the
    vector width, ``cols (>= c, len(dst))``: a matrix's columns, padded), k in order, one FMA per vector and
    term: a label matrix applied to a lattice vertex with each row of ``cols`` a whole number of vectors
    (a scalar dot product per output label, as written in Python, is ~3x slower)."""
    if not (_same_float_arrays(dst, src, cols) and dst.ndim == src.ndim == 1 and cols.ndim == 2
            and isinstance(c, types.Integer)):
        return None
    kind = _float_kind(dst)
    sig = types.void(dst, src, cols, c)

    def codegen(context, builder, signature, args):
        dsta, srca, cola = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3))
        elem, lanes, name = kind
        b = builder
        vec = ir.VectorType(elem, lanes)
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vec, [vec] * 3), name)
        intp = b.extract_value(dsta.shape, 0).type
        n_cols = context.cast(b, args[3], signature.args[3], types.intp)
        width = b.extract_value(cola.shape, 1)
        nchunk = b.lshr(b.extract_value(dsta.shape, 0), ir.Constant(intp, lanes.bit_length() - 1))

        def vptr(data, index):
            return b.bitcast(b.gep(data, [index]), vec.as_pointer())

        def broadcast(k):
            return _broadcast(b, vec, b.load(b.gep(srca.data, [k])))

        def unrolled(K):
            accs = [cgutils.alloca_once_value(b, cgutils.get_null_value(vec)) for _ in range(K)]
            with cgutils.for_range(b, n_cols) as lk:
                s = broadcast(lk.index)
                row0 = b.mul(lk.index, width)
                for c_ in range(K):
                    col = b.load(vptr(cola.data, b.add(row0, ir.Constant(intp, c_ * lanes))), align=4)
                    b.store(b.call(fma, [col, s, b.load(accs[c_])]), accs[c_])
            for c_ in range(K):
                b.store(b.load(accs[c_]), vptr(dsta.data, ir.Constant(intp, c_ * lanes)), align=4)

        def generic():
            with cgutils.for_range(b, nchunk) as lc:
                c0 = b.shl(lc.index, ir.Constant(intp, lanes.bit_length() - 1))
                acc = cgutils.alloca_once_value(b, cgutils.get_null_value(vec))
                with cgutils.for_range(b, n_cols) as lk:
                    col = b.load(vptr(cola.data, b.add(b.mul(lk.index, width), c0)), align=4)
                    b.store(b.call(fma, [col, broadcast(lk.index), b.load(acc)]), acc)
                b.store(b.load(acc), vptr(dsta.data, c0), align=4)

        _by_width(b, nchunk, unrolled, generic)
        return context.get_dummy_value()

    return sig, codegen


_MATVEC_ROWS = 4  # rows whose products :func:`_matvec_rows_add` interleaves


@intrinsic
def _matvec_rows_add(typingctx, dst, src, r0, cols, c):  # pragma: no cover - compiled
    """``dst[r0 + j, :] += sum_{k < c} src[r0 + j, k] * cols[k, :]`` for ``j < 4`` (``dst (rows, W)``, ``src
    (rows, >= c)``, ``cols (>= c, W)``, ``W`` a multiple of the vector width), k in order: :func:`_matvec_row`
    for four rows at once. For rows of up to 3 vectors the four rows' sums are twelve independent
    accumulators, so the FMAs' latency is hidden (one row's sum is a chain of ``c`` dependent FMAs per
    vector: the backward pass's weight gradients, ``z^T q`` over a block, took ~4x as long one row at a
    time)."""
    if not (_same_float_arrays(dst, src, cols) and dst.ndim == src.ndim == cols.ndim == 2
            and isinstance(r0, types.Integer) and isinstance(c, types.Integer)):
        return None
    kind = _float_kind(dst)
    rows = _MATVEC_ROWS

    def codegen(context, builder, signature, args):
        dsta, srca, cola = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 3))
        elem, lanes, name = kind
        b = builder
        vec = ir.VectorType(elem, lanes)
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vec, [vec] * 3), name)
        intp = b.extract_value(dsta.shape, 0).type
        first = context.cast(b, args[2], signature.args[2], types.intp)
        n_cols = context.cast(b, args[4], signature.args[4], types.intp)
        width = b.extract_value(cola.shape, 1)
        dwidth = b.extract_value(dsta.shape, 1)
        swidth = b.extract_value(srca.shape, 1)
        nchunk = b.lshr(dwidth, ir.Constant(intp, lanes.bit_length() - 1))

        def vptr(data, index):
            return b.bitcast(b.gep(data, [index]), vec.as_pointer())

        def dst_ptr(j, c0):
            return vptr(dsta.data, b.add(b.mul(b.add(first, ir.Constant(intp, j)), dwidth), c0))

        def broadcast(j, k):  # src[r0 + j, k] in every lane
            row = b.add(first, ir.Constant(intp, j))
            return _broadcast(b, vec, b.load(b.gep(srca.data, [b.add(b.mul(row, swidth), k)])))

        def unrolled(K):
            offs = [ir.Constant(intp, c_ * lanes) for c_ in range(K)]
            accs = [[cgutils.alloca_once_value(b, b.load(dst_ptr(j, offs[c_]), align=4)) for c_ in range(K)]
                    for j in range(rows)]
            with cgutils.for_range(b, n_cols) as lk:
                row0 = b.mul(lk.index, width)
                cs = [b.load(vptr(cola.data, b.add(row0, offs[c_])), align=4) for c_ in range(K)]
                for j in range(rows):
                    s = broadcast(j, lk.index)
                    for c_ in range(K):
                        b.store(b.call(fma, [cs[c_], s, b.load(accs[j][c_])]), accs[j][c_])
            for j in range(rows):
                for c_ in range(K):
                    b.store(b.load(accs[j][c_]), dst_ptr(j, offs[c_]), align=4)

        def generic():
            for j in range(rows):
                with cgutils.for_range(b, nchunk) as lc:
                    c0 = b.shl(lc.index, ir.Constant(intp, lanes.bit_length() - 1))
                    acc = cgutils.alloca_once_value(b, b.load(dst_ptr(j, c0), align=4))
                    with cgutils.for_range(b, n_cols) as lk:
                        col = b.load(vptr(cola.data, b.add(b.mul(lk.index, width), c0)), align=4)
                        b.store(b.call(fma, [col, broadcast(j, lk.index), b.load(acc)]), acc)
                    b.store(b.load(acc), dst_ptr(j, c0), align=4)

        _by_width(b, nchunk, unrolled, generic, most=3)  # twelve accumulators at most: 4 rows of 3 vectors
        return context.get_dummy_value()

    return types.void(dst, src, r0, cols, c), codegen


def _blur_codegen(weighted):
    """Code of :func:`_blur_rows` (``weighted``: of :func:`_blur_rows_weighted`)."""

    def codegen(context, builder, signature, args):
        dsta, srca = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(2))
        b = builder
        elem, lanes, name = _float_kind(signature.args[0])
        vec = ir.VectorType(elem, lanes)
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(vec, [vec] * 3), name)
        intp = b.extract_value(dsta.shape, 0).type
        width = b.extract_value(srca.shape, 1)
        shift = ir.Constant(intp, lanes.bit_length() - 1)
        nchunk = b.lshr(b.extract_value(dsta.shape, 0), shift)
        starts = [b.mul(context.cast(b, args[k], signature.args[k], types.intp), width) for k in (2, 3, 4)]
        half = cgutils.get_null_value(vec)
        for j in range(lanes):
            half = b.insert_element(half, args[5], ir.Constant(ir.IntType(32), j))
        wa = context.make_array(signature.args[6])(context, b, args[6]) if weighted else None

        def vptr(data, start, c0):
            return b.bitcast(b.gep(data, [b.add(start, c0)]), vec.as_pointer())

        def one(c0):  # the vector at element c0 of the row
            s, sa, sb = (b.load(vptr(srca.data, st, c0), align=4) for st in starts)
            out = b.call(fma, [half, b.fadd(sa, sb), s])
            if weighted:
                out = b.fmul(b.load(vptr(wa.data, ir.Constant(intp, 0), c0), align=4), out)
            b.store(out, vptr(dsta.data, ir.Constant(intp, 0), c0), align=4)

        def unrolled(K):
            for c in range(K):
                one(ir.Constant(intp, c * lanes))

        def generic():
            with cgutils.for_range(b, nchunk) as lc:
                one(b.shl(lc.index, shift))

        _by_width(b, nchunk, unrolled, generic)
        return context.get_dummy_value()

    return codegen


def _blur_args_ok(dst, src, idx, half):
    return (_same_float_arrays(dst, src) and dst.ndim == 1 and src.ndim == 2 and all(isinstance(i, types.Integer)
                                                                                     for i in idx)
            and half == dst.dtype)


@intrinsic
def _blur_rows(typingctx, dst, src, row, a, b, half):  # pragma: no cover - compiled
    """``dst[:] = src[row] + half * (src[a] + src[b])`` (one FMA per vector; rows a multiple of the vector
    width). Written as vectors: LLVM's vectorisation of the loop over a row re-checked aliasing and peeled
    a remainder for every vertex."""
    if not _blur_args_ok(dst, src, (row, a, b), half):
        return None
    return types.void(dst, src, row, a, b, half), _blur_codegen(False)


@intrinsic
def _blur_rows_weighted(typingctx, dst, src, row, a, b, half, w):  # pragma: no cover - compiled
    """:func:`_blur_rows` times ``w`` (a row: a diagonal compatibility), lane by lane, on the way out."""
    if not (_blur_args_ok(dst, src, (row, a, b), half) and _same_float_arrays(dst, w) and w.ndim == 1):
        return None
    return types.void(dst, src, row, a, b, half, w), _blur_codegen(True)


_VERTEX_CHUNK = 1024  # vertices per work item where a pass needs a scratch row
_BLOCK = 64  # points per work item: values are moved through a (_BLOCK, C) buffer
_LANES = 8  # lattice rows are padded to a multiple of this many values (whole SIMD registers)


@njit(inline="always")
def _band(offsets, k0, k1, m):  # pragma: no cover - compiled
    """The vertex rows ``[lo, hi)`` that ``offsets[k0:k1]`` touch (``lo = hi = m`` if none)."""
    if k1 <= k0:
        return np.int64(m), np.int64(m)
    # the array reductions vectorise: 7x faster than a loop of min/max over the entries (18 MB of int32)
    touched = offsets[k0:k1]
    return np.int64(touched.min()), np.int64(touched.max()) + 1


@njit(inline="always")
def _sum_copies(partial, lo, hi, v, dst):  # pragma: no cover - compiled
    """``dst = sum_p partial[p, v]`` in copy order (fixed: results do not depend on the thread count),
    adding only the copies whose band ``[lo[p], hi[p])`` holds row ``v`` (the others are zero there:
    neighbouring pixels share vertices, numbered in order of first appearance, so bands are narrow)."""
    dst[:] = 0
    for p in range(partial.shape[0]):
        if lo[p] <= v < hi[p]:
            src = partial[p, v]
            for ch in range(dst.shape[0]):
                dst[ch] += src[ch]


@njit(inline="always")
def _add_copies(partial, lo, hi, v):  # pragma: no cover - compiled
    """``partial[0, v] += partial[p, v]`` for ``p = 1, 2, ...`` in copy order where copy ``p``'s band
    ``[lo[p], hi[p])`` holds row ``v``, clearing the rows added: the same sums, bit for bit, as
    :func:`_sum_copies` into a zeroed row (``0 + x = x`` for the non-negative splat values)."""
    dst = partial[0, v]
    for p in range(1, partial.shape[0]):
        if lo[p] <= v < hi[p]:
            src = partial[p, v]
            for ch in range(dst.shape[0]):
                dst[ch] += src[ch]
            src[:] = 0


_AHEAD = 16  # the blur prefetches the neighbours of the vertex this many rows ahead
_AHEAD_POINTS = 2  # the splat and slice prefetch the vertex rows of the point this many points ahead


@njit(inline="always")
def _or_zero(a, zero):  # pragma: no cover - compiled
    # a select, not a branch: whether a neighbour exists is unpredictable, and a mispredicted branch
    # would also discard the loads in flight
    return a if a >= 0 else zero


@njit(inline="always")
def _prefetch_vertices(lat, offsets, k0, d1, split, shift):  # pragma: no cover - compiled
    """Prefetch the rows ``lat[offsets[k0 : k0 + d1]]`` (one point's simplex vertices), those below
    ``split`` moved by ``shift`` (as :func:`_splat_rows`)."""
    for r in range(d1):
        o = offsets[k0 + r]
        _prefetch(lat, o + (shift if o < split else 0))


@njit(inline="always")
def _owner_split(lo, hi, v0, v1):  # pragma: no cover - compiled
    """The splat's owner rule, from the rows ``[lo[p], hi[p])`` each part's points touch.

    Vertices are numbered in order of first appearance and the parts are consecutive runs of points,
    so the vertices that parts ``< p`` touch are the rows below ``split[p]`` = max of their ``hi``.
    Part ``p`` splats a vertex at or above ``split[p]`` (first seen in part ``p``: no earlier part
    touched it, no later part writes it there) straight into copy 0, the shared lattice, and one
    below into its private copy ``p``. Every row of copy 0 then holds the contributions of the first
    part that touches it, the private copies those of later parts: summed in copy order, the values
    are those of one private copy per part, bit for bit, in a fraction of the memory (a vertex
    shared by several parts is the exception, not the rule). The rule depends on the offsets only,
    and copy 0's rows are written by one part each whatever the numbering, so no write races.
    Returns ``split (parts,)`` and rewrites ``lo``/``hi`` as the bands of the copies (``[v0, v1)``,
    the whole lattice, for copy 0; for copy ``p`` the part of its band below ``split[p]``)."""
    parts = lo.shape[0]
    split = np.empty(parts, dtype=np.int64)
    seen = v0
    for p in range(parts):
        split[p] = seen
        top = max(seen, hi[p])
        hi[p] = max(lo[p], min(hi[p], seen))
        seen = top
    lo[0] = v0
    hi[0] = v1
    return split


@njit(inline="always")
def _blur_neighbours(src, pairs, k, zero):  # pragma: no cover - compiled
    """The rows ``(a, b) = pairs[2k], pairs[2k + 1]`` of ``src``, a missing neighbour (-1) read as row ``zero``
    (all zeros: adding it changes no value); prefetches the neighbours of ``k + _AHEAD``."""
    ka = 2 * (k + _AHEAD)
    if ka < pairs.shape[0]:
        _prefetch(src, _or_zero(pairs[ka], zero))
        _prefetch(src, _or_zero(pairs[ka + 1], zero))
    return _or_zero(pairs[2 * k], zero), _or_zero(pairs[2 * k + 1], zero)


@njit(inline="always")
def _blur_vertex(src, dst, row, pairs, k, zero, half):  # pragma: no cover - compiled
    """``dst = src[row] + half * (src[a] + src[b])``, the neighbours as :func:`_blur_neighbours` reads them."""
    a, b = _blur_neighbours(src, pairs, k, zero)
    _blur_rows(dst, src, row, a, b, half)


@njit(inline="always")
def _blur_vertex_weighted(src, dst, row, pairs, k, zero, half, w):  # pragma: no cover - compiled
    """:func:`_blur_vertex` with the result multiplied by ``w`` (a diagonal compatibility) on the way out."""
    a, b = _blur_neighbours(src, pairs, k, zero)
    _blur_rows_weighted(dst, src, row, a, b, half, w)


@njit(inline="always")
def _block_range(blk, nblk_img, n):  # pragma: no cover - compiled
    b = blk // nblk_img
    i0 = (blk - b * nblk_img) * _BLOCK
    return b, i0, min(i0 + _BLOCK, n)


def _filter_values(vals, bary, offsets, nbr, reverse, consts, parts, out, pre, post, accumulate,
                   work=None):  # pragma: no cover
    """Splat → blur (d+1 directions, reversed if ``reverse``) → slice.

    ``vals (B, C, N)`` (the caller's layout), ``bary``/``offsets`` flat ``(B*N*(d+1),)``,
    ``nbr (d+1, M, 2)``, ``consts = [0.5, alpha]`` and ``bary`` in ``vals``' dtype; ``parts``
    private lattice copies for the splat (fixed by the caller: results do not depend on the thread
    count). Writes ``out (B, C, N)`` (allocated by the caller: NumPy asks the kernel for huge pages,
    which matters above ~32 MB). Optional per-point scales fused into the passes: ``pre (B*N,)``
    multiplies the input, ``post (B*N,)`` the output (empty arrays = none); ``accumulate`` adds into
    ``out`` instead of writing: ``out (+)= post * F(pre * vals)``. ``work``: optional fresh ``(partial,
    lat, tmp)`` from :func:`filter_work` (NumPy asks for huge pages: Numba's own allocations of
    lattice-sized arrays fault in 4 KB pages, a third of the filter's time at ~1 vertex per pixel);
    allocated here if None.

    Points are processed in blocks of ``_BLOCK`` consecutive pixels of one image, moved through a
    small channel-last buffer so that every lattice row access reads or writes contiguous values;
    lattice rows are padded to a multiple of ``_LANES`` channels for the vector row kernels. The splat
    walks the points in memory order (streaming the input) and scatters into per-thread copies of
    the lattice, summed afterwards: no atomics, no random reads of the input.
    """
    nb, c, n = vals.shape
    cp = (c + _LANES - 1) // _LANES * _LANES
    d1 = nbr.shape[0]
    m = nbr.shape[1]
    nblk_img = (n + _BLOCK - 1) // _BLOCK
    nblk = nb * nblk_img
    parts = max(1, min(parts, nblk))
    one = consts[0] + consts[0]
    # pages of a copy never written stay unmapped; row m of every lattice array is the zero row that
    # stands for a missing blur neighbour
    if work is None:
        partial = np.zeros((parts, m + 1, cp), dtype=vals.dtype)
        lat_w = np.empty((m + 1, cp), dtype=vals.dtype)
        tmp = np.empty((m + 1, cp), dtype=vals.dtype)
    else:
        partial, lat_w, tmp = work
        partial = partial[:parts]
    lo = np.empty(parts, dtype=np.int64)  # the band of vertex rows each copy's points touch
    hi = np.empty(parts, dtype=np.int64)
    for t in prange(parts):
        acc = partial[t]
        buf = np.zeros((_BLOCK, cp), dtype=vals.dtype)  # padding channels stay 0
        blk0, blk1 = nblk * t // parts, nblk * (t + 1) // parts  # blk1 > blk0: parts <= nblk
        b0, s0, _ = _block_range(blk0, nblk_img, n)
        b1, _, e1 = _block_range(blk1 - 1, nblk_img, n)
        lo[t], hi[t] = _band(offsets, (b0 * n + s0) * d1, (b1 * n + e1) * d1, m)
        for blk in range(blk0, blk1):
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
                if i + _AHEAD_POINTS < i1:
                    _prefetch_vertices(acc, offsets, (b * n + i + _AHEAD_POINTS) * d1, d1, 0, 0)
                _splat_rows(acc, offsets, bary, (b * n + i) * d1, d1, one, buf[i - i0], 0, 0)
    if parts == 1:
        lat = partial[0]
    else:
        lat = lat_w
        lat[m] = 0
        for v in prange(m):
            _sum_copies(partial, lo, hi, v, lat[v])
    tmp[m] = 0
    half = consts[0]
    for jj in range(d1):
        j = d1 - 1 - jj if reverse else jj
        pairs = nbr[j].reshape(2 * m)
        for v in prange(m):
            _blur_vertex(lat, tmp[v], v, pairs, v, m, half)
        lat, tmp = tmp, lat
    al = consts[1]
    for blk in prange(nblk):
        b, i0, i1 = _block_range(blk, nblk_img, n)
        buf = np.zeros((_BLOCK, cp), dtype=vals.dtype)
        for i in range(i0, i1):
            if i + _AHEAD_POINTS < i1:
                _prefetch_vertices(lat, offsets, (b * n + i + _AHEAD_POINTS) * d1, d1, 0, 0)
            _slice_rows(buf[i - i0], lat, offsets, bary, (b * n + i) * d1, d1, al)
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


def _filter_one_channel(  # pragma: no cover
    vals, bary, offsets, nbr, reverse, consts, parts, out, pre, post, accumulate
):
    """:func:`_filter_values` for ``C = 1`` (normalisers: the filter of ones), same arguments and
    the same operations in the same order, written with scalars (no per-row channel loops)."""
    nb, c, n = vals.shape
    d1 = nbr.shape[0]
    m = nbr.shape[1]
    nblk_img = (n + _BLOCK - 1) // _BLOCK
    nblk = nb * nblk_img
    parts = max(1, min(parts, nblk))
    partial = np.zeros((parts, m), dtype=vals.dtype)
    one = consts[0] + consts[0]
    has_pre = pre.shape[0] > 0
    has_post = post.shape[0] > 0
    for t in prange(parts):
        acc = partial[t]
        for blk in range(nblk * t // parts, nblk * (t + 1) // parts):
            b, i0, i1 = _block_range(blk, nblk_img, n)
            for i in range(i0, i1):
                x = vals[b, 0, i]
                if has_pre:
                    x *= pre[b * n + i]
                base = (b * n + i) * d1
                for r in range(d1):
                    o = offsets[base + r]
                    acc[o] = _fma(bary[base + r] * one, x, acc[o])
    lat = np.empty(m + 1, dtype=vals.dtype)  # + the zero row read for missing blur neighbours
    lat[m] = 0
    for v in prange(m):
        a = partial[0, v]
        for t in range(1, parts):
            a += partial[t, v]
        lat[v] = a
    tmp = np.empty(m + 1, dtype=vals.dtype)
    tmp[m] = 0
    half = consts[0]
    for jj in range(d1):
        j = d1 - 1 - jj if reverse else jj
        for v in prange(m):
            tmp[v] = lat[v] + half * (lat[_or_zero(nbr[j, v, 0], m)] + lat[_or_zero(nbr[j, v, 1], m)])
        lat, tmp = tmp, lat
    al = consts[1]
    for blk in prange(nblk):
        b, i0, i1 = _block_range(blk, nblk_img, n)
        for i in range(i0, i1):
            base = (b * n + i) * d1
            y = half - half  # zero in the values' dtype
            for r in range(d1):
                y = _fma(bary[base + r] * al, lat[offsets[base + r]], y)
            if has_post:
                y *= post[b * n + i]
            if accumulate:
                out[b, 0, i] += y
            else:
                out[b, 0, i] = y


def filter_work(vals_shape, num_vertices, parts, dtype):
    """Work arrays for :func:`filter_values` (allocated by NumPy: huge pages): ``partial (parts, M+1,
    Cp)`` zeros (the splat's private copies; pages never written stay unmapped), ``lat``, ``tmp``
    ``(M+1, Cp)`` uninitialised. ``parts`` is clamped as the kernel clamps it."""
    nb, c, n = vals_shape
    cp = (c + _LANES - 1) // _LANES * _LANES
    parts = max(1, min(parts, nb * ((n + _BLOCK - 1) // _BLOCK)))
    shape = (num_vertices + 1, cp)
    return np.zeros((parts,) + shape, dtype=dtype), np.empty(shape, dtype=dtype), np.empty(shape, dtype=dtype)


# one algorithm, two compilations: multi-threaded, and serial for small inputs (where waking threads
# costs more than the work, badly so on an oversubscribed machine). Both give identical results: the
# splat's ``parts`` is fixed by the caller, not by the thread count.
filter_values = njit(parallel=True, cache=True)(_filter_values)
filter_values_serial = njit(parallel=False, cache=True)(_filter_values)


# ---------------------------------------------------------------------------------------------------
# Fused dense-CRF mean field (pydensecrf's inference) over several lattices at once.
#
# One iteration of Krähenbühl's mean field is: for every pairwise term t, filter Q on lattice t with
# per-point scales (pydensecrf's normalisations) and a label compatibility; add everything to the
# negative unary; softmax over labels. Done as separate filter calls, every call streams Q, its
# output and the lattice's weights/offsets through memory. Here one parallel pass over the points
# per iteration does, for each point: slice every term's (already blurred) lattice, add the
# negative unary, softmax, and splat the new Q straight into every term's lattice for the next
# iteration. Q never goes through memory between iterations (only at the end), and the per-point
# arrays are read once per iteration instead of four times.

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, the first with few significant bits
_LN2_LO = _F32(-2.12194440e-4)
_EXP_FLOOR = _F32(-60 * 0.6931471805599453)  # exp() >= 2^-60 ~ 8.7e-19: Q > 0 and far from denormals
_E1, _E2, _E3, _E4, _E5, _E6 = _F32(1.0), _F32(0.5), _F32(1 / 6), _F32(1 / 24), _F32(1 / 120), _F32(1 / 720)


_T8_STAGES = (  # an 8x8 transpose of float32 vectors: three rounds, each pairing vectors ``step`` apart
    (1, [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]),
    (2, [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
    (4, [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]),
)
_T8_ORDER = [0, 2, 1, 3, 4, 6, 5, 7]  # after the rounds, lane l of every input is in vector _T8_ORDER[l]


class _Vec8:
    """llvmlite helpers for 8-lane float32 code: splats, lane-wise max, FMA and tree reductions."""

    def __init__(self, builder):
        self.b = builder
        self.f32, self.i32 = ir.FloatType(), ir.IntType(32)
        self.vec, self.ivec = ir.VectorType(self.f32, 8), ir.VectorType(self.i32, 8)
        self.fma_fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vec, [self.vec] * 3), "llvm.fma.v8f32")

    def const(self, x):
        return ir.Constant(self.vec, [float(x)] * 8)

    def at(self, data, row, width, col):
        """Pointer to the vector of the 8 values from ``data[row * width + col]`` on."""
        return self.b.bitcast(self.b.gep(data, [self.b.add(self.b.mul(row, width), col)]), self.vec.as_pointer())

    def transpose(self, vs):
        """``out[j][p] = vs[p][j]`` for eight vectors (three rounds of two-input shuffles)."""
        vs = list(vs)
        for step, lo, hi in _T8_STAGES:
            out = [None] * 8
            for a in range(8):
                if a & step:
                    continue
                x, y = vs[a], vs[a + step]
                out[a] = self.b.shuffle_vector(x, y, ir.Constant(self.ivec, lo))
                out[a + step] = self.b.shuffle_vector(x, y, ir.Constant(self.ivec, hi))
            vs = out
        return [vs[_T8_ORDER[j]] for j in range(8)]

    def splat(self, x):
        v = ir.Constant(self.vec if x.type == self.f32 else self.ivec, ir.Undefined)
        for j in range(8):
            v = self.b.insert_element(v, x, ir.Constant(self.i32, j))
        return v

    def max(self, a, b):
        return self.b.select(self.b.fcmp_ordered(">", a, b), a, b)

    def fma(self, a, b, c):
        return self.b.call(self.fma_fn, [a, b, c])

    def reduce(self, v, op):
        """``op`` over the 8 lanes as a fixed tree (the same order every time)."""
        n = 8
        while n > 1:
            n //= 2
            lo = self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(self.i32, n), list(range(n))))
            hi = self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(self.i32, n), list(range(n, 2 * n))))
            v = op(lo, hi)
        return self.b.extract_element(v, ir.Constant(self.i32, 0))


def _exp_chunk(b, v8, x, mx, valid):
    """``exp(x - mx)`` of one vector (0 in the lanes not ``valid``), as :func:`_softmax_row` documents it."""
    x = v8.max(b.fsub(x, mx), v8.const(_EXP_FLOOR))
    k = b.fptosi(b.fsub(b.fmul(x, v8.const(_LOG2E)), v8.const(0.5)), v8.ivec)  # toward zero: x <= 0
    kf = b.sitofp(k, v8.vec)
    f = v8.fma(b.fneg(kf), v8.const(_LN2_HI), x)
    f = v8.fma(b.fneg(kf), v8.const(_LN2_LO), f)
    poly = v8.const(_E6)
    for e in (_E5, _E4, _E3, _E2, _E1, _E1):
        poly = v8.fma(poly, f, v8.const(e))
    scale = b.bitcast(b.shl(b.add(k, v8.splat(ir.Constant(v8.i32, 127))), v8.splat(ir.Constant(v8.i32, 23))),
                      v8.vec)
    return b.select(valid, b.fmul(poly, scale), v8.const(0.0))


def _softmax_args_ok(block, c):
    return (isinstance(block, types.Array) and block.dtype == types.float32 and block.layout == "C"
            and isinstance(c, types.Integer))


def _emit_row_softmax(b, data, nchunk, n_lab):
    """The code of :func:`_softmax_row` for the row at ``data`` (``nchunk`` vectors, ``n_lab`` labels)."""
    v8 = _Vec8(b)
    intp = nchunk.type
    lane = ir.Constant(v8.ivec, list(range(8)))

    def chunk(index):  # (pointer to the index-th vector, mask of its label lanes)
        c0 = b.shl(index, ir.Constant(intp, 3))
        ptr = b.bitcast(b.gep(data, [c0]), v8.vec.as_pointer())
        left = b.trunc(b.sub(n_lab, c0), v8.i32)  # labels from c0 on (< 0: none)
        return ptr, b.icmp_signed("<", lane, v8.splat(left))

    acc = cgutils.alloca_once_value(b, v8.const(float("-inf")))
    with cgutils.for_range(b, nchunk) as lp:
        ptr, valid = chunk(lp.index)
        x = b.select(valid, b.load(ptr, align=4), v8.const(float("-inf")))
        b.store(v8.max(x, b.load(acc)), acc)
    mx = v8.splat(v8.reduce(b.load(acc), v8.max))
    b.store(v8.const(0.0), acc)
    with cgutils.for_range(b, nchunk) as lp:
        ptr, valid = chunk(lp.index)
        e = _exp_chunk(b, v8, b.load(ptr, align=4), mx, valid)
        b.store(e, ptr, align=4)
        b.store(b.fadd(b.load(acc), e), acc)
    inv = v8.splat(b.fdiv(ir.Constant(v8.f32, 1.0), v8.reduce(b.load(acc), b.fadd)))
    with cgutils.for_range(b, nchunk) as lp:
        ptr, _ = chunk(lp.index)
        b.store(b.fmul(b.load(ptr, align=4), inv), ptr, align=4)


@intrinsic
def _softmax_row(typingctx, row, c):  # pragma: no cover - compiled
    """In-place softmax of ``row[:c]`` (float32, ``len(row)`` a multiple of 8); ``row[c:]`` (padding,
    any values) is set to 0. Explicit 8-lane SIMD: three passes over the row's vectors (max; exp and
    sum; scale), the padding lanes masked, the lane reductions in a fixed tree order.

    ``exp(x) = 2^k e^f`` by range reduction: ``k = round(x / ln 2)``, ``2^k`` built in the exponent
    bits, ``f = x - k ln 2`` in two FMAs (Cody-Waite: ``|f| <= ln2/2``) and ``e^f`` by its series to
    6th order (relative error ~1e-7), with arguments below ``-60 ln 2`` raised to it (smaller values
    would head for denormals: slow)."""
    if not (_softmax_args_ok(row, c) and row.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        rowa = context.make_array(signature.args[0])(context, builder, args[0])
        intp = builder.extract_value(rowa.shape, 0).type
        nchunk = builder.lshr(builder.extract_value(rowa.shape, 0), ir.Constant(intp, 3))
        _emit_row_softmax(builder, rowa.data, nchunk, context.cast(builder, args[1], signature.args[1], types.intp))
        return context.get_dummy_value()

    return types.void(row, c), codegen


_SOFTMAX_ROWS = 4  # rows of up to _UNROLL vectors whose softmaxes :func:`_softmax_rows` interleaves


@intrinsic
def _softmax_rows(typingctx, block, r0, c):  # pragma: no cover - compiled
    """:func:`_softmax_row` of rows ``r0 ... r0 + 3`` of ``block (rows, Cp)``, the same operations in the same
    order, so the same bits. For rows of up to ``_UNROLL`` vectors the four rows' vectors are held in
    registers and their operations interleaved: one row's softmax is a chain of dependent steps (max,
    reduction, exp, sum, reduction, division) too long for out-of-order execution to overlap the next
    row's (on Zen 1 a 21-label row took ~180 cycles, ~3x its throughput bound)."""
    if not (_softmax_args_ok(block, c) and block.ndim == 2 and isinstance(r0, types.Integer)):
        return None
    rows = _SOFTMAX_ROWS

    def codegen(context, builder, signature, args):
        blka = context.make_array(signature.args[0])(context, builder, args[0])
        v8 = _Vec8(builder)
        b = builder
        intp = b.extract_value(blka.shape, 0).type
        first = context.cast(b, args[1], signature.args[1], types.intp)
        n_lab = context.cast(b, args[2], signature.args[2], types.intp)
        width = b.extract_value(blka.shape, 1)
        nchunk = b.lshr(width, ir.Constant(intp, 3))
        lane = ir.Constant(v8.ivec, list(range(8)))
        def vptr(r, k):
            start = b.add(b.mul(b.add(first, ir.Constant(intp, r)), width), ir.Constant(intp, 8 * k))
            return b.bitcast(b.gep(blka.data, [start]), v8.vec.as_pointer())

        def unrolled(K):
            valid = [b.icmp_signed("<", lane, v8.splat(b.trunc(b.sub(n_lab, ir.Constant(intp, 8 * k)), v8.i32)))
                     for k in range(K)]
            xs = [[b.load(vptr(r, k), align=4) for k in range(K)] for r in range(rows)]
            mxs = []
            for r in range(rows):
                acc = v8.const(float("-inf"))
                for k in range(K):
                    acc = v8.max(b.select(valid[k], xs[r][k], v8.const(float("-inf"))), acc)
                mxs.append(v8.splat(v8.reduce(acc, v8.max)))
            es, invs = [], []
            for r in range(rows):
                acc = v8.const(0.0)
                es.append([])
                for k in range(K):
                    es[r].append(_exp_chunk(b, v8, xs[r][k], mxs[r], valid[k]))
                    acc = b.fadd(acc, es[r][k])
                invs.append(v8.splat(b.fdiv(ir.Constant(v8.f32, 1.0), v8.reduce(acc, b.fadd))))
            for r in range(rows):
                for k in range(K):
                    b.store(b.fmul(es[r][k], invs[r]), vptr(r, k), align=4)

        def one_by_one():
            for r in range(rows):
                start = b.mul(b.add(first, ir.Constant(intp, r)), width)
                _emit_row_softmax(b, b.gep(blka.data, [start]), nchunk, n_lab)

        _by_width(b, nchunk, unrolled, one_by_one)
        return context.get_dummy_value()

    return types.void(block, r0, c), codegen


@njit(inline="always")
def _argmax_row(row, c):  # pragma: no cover - compiled
    """The first index of the largest of ``row[:c]`` (NaN wins, as in ``np.argmax``)."""
    best = 0
    for ch in range(1, c):
        if row[ch] > row[best] or (row[ch] != row[ch] and row[best] == row[best]):
            best = ch
    return best


@njit(inline="always")
def _splat_by_ranges(dst, rows, offsets, bary, pre, t0, d1, n, v0, m, ranges):  # pragma: no cover - compiled
    """One term's splat as a pass of its own over the points' ``rows (N, Cp)``: ``dst[v] = sum_i sum_r (bary[k] *
    pre[i]) * rows[i]`` over the entries ``k = t0 + i d1 + r`` with ``offsets[k] = v``, for the term's vertex rows
    ``v0 <= v < v0 + m`` (cleared first).

    Each of ``ranges`` work items (the caller's threads) owns a range of the rows, reads every point's row and adds
    the entries that fall in its range, in point order: no private copies, and the same sums, bit for bit, as a
    scatter into one copy in point order, whatever the number of ranges. For a lattice of ~1 vertex per pixel
    this is cheaper than private copies (their sum costs ``parts`` lattices) and than a gather by vertex (each
    vertex's points lie all over the image, so the gather's reads of their rows miss cache, and its index costs
    a counting sort per call)."""
    for g in prange(ranges):
        lo = v0 + m * g // ranges
        hi = v0 + m * (g + 1) // ranges
        for v in range(lo, hi):
            dst[v, :] = 0
        for i in range(n):
            for r in range(d1):
                k = t0 + i * d1 + r
                o = offsets[k]
                if o >= lo and o < hi:
                    _splat_rows(dst, offsets, bary, k, 1, pre[i], rows[i], 0, 0)


@njit(inline="always")
def _copy_bands(offsets, tstart, td1, vstart, vcount, n, parts, mtot):  # pragma: no cover - compiled
    """The private splat copies' bands and owner rule: ``(lo, hi, split)``, each ``(parts, T)``.

    ``[lo, hi)`` are the vertex rows of term ``t`` that part ``p``'s points (consecutive blocks of
    ``_BLOCK``) touch: neighbouring pixels share vertices and rows are numbered in order of first appearance,
    so they are a band of the lattice, and the reduction reads (and clears) only the copies whose band holds
    the row; ``split`` and the rewritten bands are :func:`_owner_split`'s, per term."""
    nt = td1.shape[0]
    nblk = (n + _BLOCK - 1) // _BLOCK
    lo = np.empty((parts, nt), dtype=np.int64)
    hi = np.empty((parts, nt), dtype=np.int64)
    for p in prange(parts):
        i0 = nblk * p // parts * _BLOCK
        i1 = min(n, nblk * (p + 1) // parts * _BLOCK)
        for t in range(nt):
            lo[p, t], hi[p, t] = _band(offsets, tstart[t] + i0 * td1[t], tstart[t] + i1 * td1[t], mtot)
    split = np.empty((parts, nt), dtype=np.int64)
    for t in range(nt):
        split[:, t] = _owner_split(lo[:, t], hi[:, t], vstart[t], vstart[t] + vcount[t])
    return lo, hi, split


@njit(cache=True)
def private_rows(offsets, tstart, td1, vstart, vcount, n, parts):  # pragma: no cover - compiled
    """Per term ``(T,)`` int64: the rows that the splat's private copies ``1 ... parts - 1`` hold, the bands of
    :func:`_copy_bands` after the owner rule (the vertices that several parts of the points share), which the
    scatter's reduction adds and clears every iteration."""
    mtot = 0
    for t in range(td1.shape[0]):
        mtot += vcount[t]
    lo, hi, _ = _copy_bands(offsets, tstart, td1, vstart, vcount, n, parts, mtot)
    rows = np.zeros(td1.shape[0], dtype=np.int64)
    for p in range(1, parts):
        for t in range(td1.shape[0]):
            rows[t] += hi[p, t] - lo[p, t]
    return rows


def _dense_meanfield(neg_unary, q, bary, offsets, tstart, td1, nbr, nstart, vstart, vcount,
                     pre, post, wdiag, wcols, ismat, n_iter, marginals, history, labels, partial, lat, tmp,
                     ranged, ranges, qrows, splats, srow, q_by_point):  # pragma: no cover - compiled
    """Mean field of a dense CRF with ``T`` Gaussian pairwise terms, fused over the lattices.

    ``neg_unary (N, Cp)``: -U, one point's labels side by side, padded with zeros to ``Cp`` (a
    multiple of ``_LANES``) channels; ``q (L, N)``, or ``(N, L)`` with ``q_by_point`` (a point's labels side by
    side, pydensecrf's layout of its marginals): receives the marginals (which start as
    ``softmax(-U)``), or with ``marginals`` False the last iteration's logits (before its softmax:
    CRF-RNN's output). ``history (T, N, Cp)`` (or empty, ``(0, N, Cp)``) receives, as rows, the marginals
    each iteration filters (:func:`dense_meanfield_backward` reads them). ``labels (N,)`` int64 (or empty):
    receives each point's arg max of the output (the first label at a tie, as ``np.argmax``) instead of ``q``
    (then ``(L, 0)``, or ``(0, L)``), so that a caller who wants labels skips writing and re-reading ``(L, N)`` values.
    Term ``t`` (``td1[t] = D_t + 1`` simplex vertices per point) owns
    ``bary[tstart[t] : tstart[t] + N * td1[t]]`` and the same slice of ``offsets`` (global vertex
    rows), vertex rows ``vstart[t] ... vstart[t] + vcount[t]`` and blur neighbours ``nbr[nstart[t] :
    ...]`` laid out ``(td1, vcount, 2)`` (global rows, -1 = missing). ``pre (T, N)``/``post (T, N)``:
    per-point scales (``post`` includes the lattice's output factor). The messages ``m = post *
    F(pre * Q)`` enter the logits as ``+ wdiag[t] * m`` (``wdiag (T, Cp)``), or as ``+ W_t @ m`` where
    ``ismat[t]`` (``wcols (T, L, Cp)``: ``wcols[t, k, :L]`` is column ``k`` of ``W_t``, padded with zeros);
    being linear, the compatibility is applied to the blurred vertices (``M`` rows, as the last blur
    direction writes them) rather than to the sliced points (``N`` rows). Work arrays from the
    caller (NumPy allocations get huge pages; Numba's would fault in 4 KB pages every call):
    ``partial (parts, R, Cp)`` zeros, the private lattice copies of the splat (their number fixed by
    the caller: results do not depend on the thread count; ``parts <= ceil(N / _BLOCK)``; copy 0 is
    also the blur's first source, so no pass copies it out). Only the scattered terms' rows are splatted,
    so ``R`` is one more than the end of the last scattered term's rows (1 if every term is ranged): the
    last row stays zero, read for missing blur neighbours (a ranged term's rows need no copies: for
    CRF-RNN's bilateral term, ``parts`` lattice-sized arrays fewer to clear or fault in). ``lat``, ``tmp``
    ``(M + 1, Cp)``, uninitialised: the blur's other two buffers. The last direction writes a term's
    messages (blurred vertices times the compatibility) into whichever of them it does not read: ``tmp``
    for an odd ``D + 1``, else ``lat`` (terms own disjoint rows, so no buffer of messages is needed, and
    the pass over the points touches one lattice-sized array fewer).

    ``ranged (T,)`` bool: the terms splatted by vertex ranges (:func:`_splat_by_ranges`, ``ranges`` of them)
    rather than by scatter. For those, the pass over the points writes each point's marginals to ``qrows (N,
    Cp)`` (``(0, Cp)`` if no term is ranged, or with a ``history``, whose rows the splat then reads) and a pass
    of their own splats those rows (the last pass, which splats nothing, leaves ``qrows`` alone: it may share
    ``q``'s memory): no private copies, and the same sums, bit for bit, as a scatter into one copy in point
    order. The sums go to ``lat``, where the first blur
    direction reads them, so these terms' blur runs between two buffers and copy 0 of ``partial`` is never
    touched for them (for CRF-RNN's bilateral term, one lattice-sized array fewer in cache and to fault in).

    With ``history``, ``splats (n_iter, R, Cp)`` (else ``(0, 0, Cp)``) receives the splat of the marginals each
    iteration filters, for the terms with ``srow[t] >= 0`` (``srow (T,)`` int64), term ``t``'s vertex
    ``v`` as row ``srow[t] + v`` (:func:`dense_meanfield_backward` takes these terms' weight gradients on
    their vertices).
    """
    n, cp = neg_unary.shape
    c = q.shape[1] if q_by_point else q.shape[0]
    nt = td1.shape[0]
    mtot = 0
    for t in range(nt):
        mtot += vcount[t]
    nblk = (n + _BLOCK - 1) // _BLOCK
    parts = partial.shape[0]
    lo, hi, split = _copy_bands(offsets, tstart, td1, vstart, vcount, n, parts, mtot)
    rows = partial.shape[1]  # every copy ends in a zero row: copy 0 is also the blur's first source
    flat = partial.reshape((parts * rows, cp))  # copy p's row v is row p * rows + v
    use_q = qrows.shape[0] > 0  # the points' rows go through memory, for the ranged splat
    keep = history.shape[0] > 0
    want_labels = labels.shape[0] > 0
    splat = partial[0]  # copy 0: the shared lattice the points splat into
    lat[mtot] = 0  # the zero row read for missing blur neighbours
    tmp[mtot] = 0
    for it in range(n_iter + 1):
        if it > 0:
            # finish the splat: a ranged term's vertices sum their points' rows, in point order, into
            # lat; a scattered term's private copies are added into copy 0 (and cleared for the next
            # splat). Then blur each term: its splat -> tmp, then between tmp and lat; copy 0 is cleared
            # while the second direction runs, and a diagonal compatibility is applied as the last
            # direction writes
            for t in range(nt):
                if ranged[t]:
                    _splat_by_ranges(lat, history[it - 1] if keep else qrows, offsets, bary, pre[t], tstart[t], td1[t],
                                     n, vstart[t], vcount[t], ranges)
                elif parts > 1:
                    for v in prange(vstart[t], vstart[t] + vcount[t]):
                        _add_copies(partial, lo[:, t], hi[:, t], v)
            if keep:
                for t in range(nt):
                    if srow[t] >= 0:
                        first = lat if ranged[t] else splat
                        kept = splats[it - 1]
                        for v in prange(vcount[t]):
                            kept[srow[t] + v, :] = first[vstart[t] + v]
            for t in range(nt):
                d1 = td1[t]
                mt = vcount[t]
                v0 = vstart[t]
                first = lat if ranged[t] else splat  # where the term's splat is
                clear = not ranged[t]  # copy 0, read by the first direction only, cleared by the second
                for j in range(d1):
                    src_a = first if j == 0 else (tmp if j % 2 == 1 else lat)
                    dst_a = tmp if j % 2 == 0 else lat
                    zero = rows - 1 if j == 0 and clear else mtot  # the source's zero row
                    pairs = nbr[nstart[t] + j * mt * 2: nstart[t] + (j + 1) * mt * 2]
                    if j == d1 - 1 and ismat[t]:
                        # the last direction writes the messages: the compatibility applied to each blurred
                        # vertex (``M`` rows) rather than to every sliced point (the slice is linear), the
                        # vertex held in a scratch row that stays in L1
                        cols = wcols[t]
                        for ck in prange((mt + _VERTEX_CHUNK - 1) // _VERTEX_CHUNK):
                            s = np.empty(cp, dtype=np.float32)
                            for v in range(ck * _VERTEX_CHUNK, min(mt, (ck + 1) * _VERTEX_CHUNK)):
                                _blur_vertex(src_a, s, v0 + v, pairs, v, zero, _F32(0.5))
                                _matvec_row(dst_a[v0 + v], s, cols, c)
                                if j == 1 and clear:
                                    splat[v0 + v, :] = 0
                        continue
                    weighted = j == d1 - 1  # the last direction writes the messages
                    wd = wdiag[t]
                    for v in prange(mt):
                        if weighted:
                            _blur_vertex_weighted(src_a, dst_a[v0 + v], v0 + v, pairs, v, zero, _F32(0.5), wd)
                        else:
                            _blur_vertex(src_a, dst_a[v0 + v], v0 + v, pairs, v, zero, _F32(0.5))
                        if j == 1 and clear:
                            splat[v0 + v, :] = 0
        last = it == n_iter
        keep_it = keep and it < n_iter
        # the rows go through memory for the ranged splat: kept as the history, if any, else in qrows (the
        # last pass splats nothing: qrows may share q's memory)
        ranged_q = use_q and not last and not keep
        for p in prange(parts):
            shift = p * rows
            buf = np.empty((_BLOCK, cp), dtype=np.float32)
            for blk in range(nblk * p // parts, nblk * (p + 1) // parts):
                i0 = blk * _BLOCK
                i1 = min(i0 + _BLOCK, n)
                # no software prefetch of the next points' vertex rows: out-of-order execution already
                # has them in flight, and the prefetches' address arithmetic cost more than they saved
                # (whole inference 0.86-0.95x without them, 1 thread; 2 and 8 points ahead measured)
                for i in range(i0, i1):
                    row = history[it, i] if keep_it else (qrows[i] if ranged_q else buf[i - i0])
                    un = neg_unary[i]
                    if it > 0:
                        _slice_terms(row, un, lat, tmp, offsets, bary, tstart, td1, post, i)
                    else:
                        for ch in range(cp):
                            row[ch] = un[ch]
                rows_out = history[it, i0:i1] if keep_it else (qrows[i0:i1] if ranged_q else buf)
                if marginals or not last:  # the block's softmaxes, four rows interleaved
                    r = 0
                    while r + _SOFTMAX_ROWS <= i1 - i0:
                        _softmax_rows(rows_out, r, c)
                        r += _SOFTMAX_ROWS
                    for rr in range(r, i1 - i0):
                        _softmax_row(rows_out[rr], c)
                if not last:
                    for i in range(i0, i1):
                        row = rows_out[i - i0]
                        for t in range(nt):
                            if ranged[t]:
                                continue
                            d1 = td1[t]
                            _splat_rows(flat, offsets, bary, tstart[t] + i * d1, d1, pre[t, i], row, split[p, t], shift)
                if last and want_labels:
                    for i in range(i0, i1):
                        labels[i] = _argmax_row(rows_out[i - i0], c)
                elif last and q_by_point:
                    for i in range(i0, i1):
                        row = rows_out[i - i0]
                        for ch in range(c):
                            q[i, ch] = row[ch]
                elif last:  # eight points at a time, as rows_to_channels
                    r = 0
                    while r + 8 <= i1 - i0:
                        _rows_to_columns8(q, rows_out, r, i0 + r, c)
                        r += 8
                    for i in range(i0 + r, i1):
                        row = rows_out[i - i0]
                        for ch in range(c):
                            q[ch, i] = row[ch]


dense_meanfield = njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "arcp"})(_dense_meanfield)
filter_one_channel = njit(parallel=True, cache=True)(_filter_one_channel)
filter_one_channel_serial = njit(parallel=False, cache=True)(_filter_one_channel)


# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# The backward pass of the fused mean field (CRF-RNN's, crfrnn/_fused_meanfield.py), fused like the forward:
# per iteration, last first, every term's transposed filter of the gradient (the splat by vertex ranges or by
# scatter, the blur's directions in reverse order) and one pass over the points that slices every term,
# recomputes the softmax, and does the label-space work in registers: the weight gradients ``z q^T``,
# ``dq = sum_t W_t^T z_t``, the softmax's backward, the sum into the unary's gradient, and the rows the next
# iteration's splat reads.


def _dense_meanfield_backward(grows, d_unary, history, bary, offsets, tstart, td1, nbr, nstart,
                              vstart, vcount, pre, post, wtcols, c, ranged, ranges, partial, splat, lat,
                              tmp, blurred, accs, splats, srow):  # pragma: no cover - compiled
    """The gradient of :func:`dense_meanfield`'s last logits (``marginals`` False) w.r.t. the unary logits and
    the terms' label matrices ``W_t`` (logits ``+= W_t @ m_t``, ``m_t = post_t * F_t(pre_t * Q)``).

    Rows are a point's labels side by side, padded with zeros to ``Cp`` (a multiple of ``_LANES``), points in
    the lattices' order. ``grows (N, Cp)``: the gradient of the output logits on entry (overwritten: the
    rows the ranged splat reads); ``d_unary (N, Cp)``: receives, added, the gradient of the unary logits
    (the caller starts it at ``grows``: the output is the unary plus messages; it may be ``grows`` itself when
    no term is ``ranged``, the gradient on entry being read only where it is added to).
    ``history (T, N, Cp)``: the marginals each iteration filtered (:func:`dense_meanfield`'s). Terms laid out as
    :func:`dense_meanfield` takes them; ``pre (T, N)`` the splat's scale and ``post (T, N)`` the slice's (the
    lattice's output factor): the transposed filter splats ``pre * g``. ``wtcols (T, Cp, Cp)``: row ``k`` of
    ``wtcols[t]`` is row ``k`` of ``W_t`` (zero rows for ``k >= c``), so ``W_t^T z = wtcols[t]^T @ z``.

    The splat as in :func:`dense_meanfield`: the terms ``ranged`` by vertex ranges (:func:`_splat_by_ranges`,
    ``ranges`` of them, with ``pre``) into ``splat``, the others scattered by the pass over the
    points into ``partial (parts, R, Cp)`` zeros (the private copies and their owner rule; ``R`` one more than
    the end of the last scattered term's rows), the gradient on entry by a pass of its own. Work arrays
    ``splat``, ``lat``, ``tmp``, ``blurred`` ``(M + 1, Cp)``; ``accs (parts, T, Cp, Cp)`` zeros: per run of
    points (the same ``parts`` runs as the copies'), ``accs[p, t, k, r]`` receives ``sum_i z_t[i, r] q[i,
    k]`` (``dW_t = sum_p accs[p, t, :c, :c]^T``); the runs are fixed by the caller, so the bits do not depend
    on the thread count.

    ``splats``, ``srow``: :func:`dense_meanfield`'s (its ``pre`` ones): the terms with ``srow[t] >= 0`` do their
    label-space work on their lattice's vertices rather than on the points (both linear in the slice): ``dq``
    slices ``W_t^T b`` of the blurred vertices ``b`` (written over the term's ``splat`` rows, which its blur
    has consumed or, for a scattered term, never used), and ``accs[p, t]`` sums ``s^T b`` over a run ``p`` of
    the term's vertices, ``s`` the forward's splat of the marginals (``dW_t = post * (sum_p accs[p, t, :c,
    :c])^T`` for a ``post`` that is the same for every point, as the lattice's output factor is). ``O(M L^2)``
    instead of ``O(N L^2)`` per term and step, and no pass over the points for the weight gradient.
    """
    n, cp = grows.shape
    nt = td1.shape[0]
    mtot = splat.shape[0] - 1
    n_iter = history.shape[0]
    nblk = (n + _BLOCK - 1) // _BLOCK
    parts = accs.shape[0]
    lo, hi, split = _copy_bands(offsets, tstart, td1, vstart, vcount, n, parts, mtot)  # as dense_meanfield's
    rows = partial.shape[1]
    flat = partial.reshape((parts * rows, cp))
    copy0 = partial[0]
    any_ranged = False
    any_on_points = False
    for t in range(nt):
        any_ranged = any_ranged or ranged[t]
        any_on_points = any_on_points or srow[t] < 0
    splat[mtot] = 0  # the zero row read for missing blur neighbours
    lat[mtot] = 0
    tmp[mtot] = 0
    for p in prange(parts):  # the first step's scattering splat: the gradient on entry
        for i in range(nblk * p // parts * _BLOCK, min(n, nblk * (p + 1) // parts * _BLOCK)):
            for t in range(nt):
                if not ranged[t]:
                    d1 = td1[t]
                    _splat_rows(flat, offsets, bary, tstart[t] + i * d1, d1, pre[t, i], grows[i], split[p, t],
                                p * rows)
    for step in range(n_iter):
        it = n_iter - 1 - step  # the iteration whose output's gradient is being filtered
        for t in range(nt):  # finish the splat, as dense_meanfield does
            if ranged[t]:
                _splat_by_ranges(splat, grows, offsets, bary, pre[t], tstart[t], td1[t], n, vstart[t], vcount[t],
                                 ranges)
            elif parts > 1:
                for v in prange(vstart[t], vstart[t] + vcount[t]):
                    _add_copies(partial, lo[:, t], hi[:, t], v)
        for t in range(nt):
            d1 = td1[t]
            mt = vcount[t]
            v0 = vstart[t]
            clear = not ranged[t]  # copy 0, read by the first direction only, cleared by the second
            for jj in range(d1):
                j = d1 - 1 - jj  # the transpose of the blur: its directions in reverse order
                src_a = (splat if ranged[t] else copy0) if jj == 0 else (tmp if jj % 2 == 1 else lat)
                dst_a = blurred if jj == d1 - 1 else (tmp if jj % 2 == 0 else lat)
                zero = rows - 1 if jj == 0 and clear else mtot  # the source's zero row
                pairs = nbr[nstart[t] + j * mt * 2: nstart[t] + (j + 1) * mt * 2]
                for v in prange(mt):
                    _blur_vertex(src_a, dst_a[v0 + v], v0 + v, pairs, v, zero, _F32(0.5))
                    if jj == 1 and clear:
                        copy0[v0 + v, :] = 0
        marg = history[it]
        for t in range(nt):
            if srow[t] >= 0:
                _vertex_label_work(splats[it], srow[t], blurred, splat, wtcols[t], c, accs, t, vstart[t], vcount[t])
        more = it > 0  # the next step splats this step's gradient
        for p in prange(parts):
            shift = p * rows
            # zero-initialised: the products run over whole groups of four rows, a block's last rows included
            zb = np.zeros((nt, _BLOCK, cp), dtype=np.float32)  # the block's sliced terms
            dqb = np.zeros((_BLOCK, cp), dtype=np.float32)  # sum_t W_t^T z_t
            qt = np.zeros((cp, _BLOCK), dtype=np.float32)  # the block's marginals, a label's along the points
            g = np.empty(cp, dtype=np.float32)  # a point's gradient of its logits, for the next step's splat
            bacc = np.empty((cp, cp), dtype=np.float32)  # a block's weight gradient, then added to the run's
            acc = accs[p]
            for blk in range(nblk * p // parts, nblk * (p + 1) // parts):
                i0 = blk * _BLOCK
                i1 = min(i0 + _BLOCK, n)
                w = i1 - i0
                dqb[:, :] = 0
                for i in range(i0, i1):
                    for t in range(nt):
                        d1 = td1[t]
                        if srow[t] >= 0:  # W_t^T already applied to the vertices
                            _slice_rows(dqb[i - i0], splat, offsets, bary, tstart[t] + i * d1, d1, post[t, i])
                            continue
                        z = zb[t, i - i0]
                        z[:] = 0
                        _slice_rows(z, blurred, offsets, bary, tstart[t] + i * d1, d1, post[t, i])
                for r in range(0, w, _MATVEC_ROWS):
                    for t in range(nt):
                        if srow[t] < 0:
                            _matvec_rows_add(dqb, zb[t], r, wtcols[t], c)
                for i in range(i0, i1):
                    q = marg[i]
                    dq = dqb[i - i0]
                    s = _F32(0.0)
                    for ch in range(cp):
                        s += q[ch] * dq[ch]
                    gu = d_unary[i]
                    for ch in range(cp):  # through the softmax (padding: q = 0)
                        gv = q[ch] * (dq[ch] - s)
                        gu[ch] += gv
                        g[ch] = gv
                    if more:
                        if any_ranged:
                            grows[i, :] = g
                        for t in range(nt):
                            if not ranged[t]:
                                d1 = td1[t]
                                _splat_rows(flat, offsets, bary, tstart[t] + i * d1, d1, pre[t, i], g, split[p, t],
                                            shift)
                if any_on_points:
                    for i in range(w):
                        q = marg[i0 + i]
                        for k in range(c):
                            qt[k, i] = q[k]
                for t in range(nt):  # the weight gradients: z_t^T q over the block, four labels of q at a time
                    if srow[t] < 0:
                        _block_products_add(acc[t], bacc, qt, zb[t], c, w)


@njit(inline="always")
def _vertex_label_work(kept, r0, blurred, wblurred, cols, c, accs, t, v0, mt):  # pragma: no cover - compiled
    """One term's label-space work of :func:`dense_meanfield_backward` on its vertices ``v0 ... v0 + mt``:
    ``wblurred[v] = W^T blurred[v]`` (``cols``: row ``k`` of ``W``) and ``accs[p, t] += s^T blurred`` over run
    ``p`` of the vertices (``accs (parts, T, Cp, Cp)``), ``s[v] = kept[r0 + v - v0]``; the runs are fixed by
    ``accs``' shape, so the bits do not depend on the thread count."""
    parts, cp = accs.shape[0], accs.shape[2]
    for p in prange(parts):
        acc = accs[p, t]
        st = np.zeros((cp, _BLOCK), dtype=np.float32)  # a block's kept splats, a label's along the vertices
        bacc = np.empty((cp, cp), dtype=np.float32)
        a0 = v0 + mt * p // parts
        a1 = v0 + mt * (p + 1) // parts
        for b0 in range(a0, a1, _BLOCK):
            w = min(_BLOCK, a1 - b0)
            for v in range(b0, b0 + w):
                s = kept[r0 + v - v0]
                for k in range(c):
                    st[k, v - b0] = s[k]
                _matvec_row(wblurred[v], blurred[v], cols, c)
            _block_products_add(acc, bacc, st, blurred[b0:b0 + w], c, w)


@njit(inline="always")
def _block_products_add(acc, bacc, xt, y, c, w):  # pragma: no cover - compiled
    """``acc[:c] += xt[:c, :w] @ y[:w]``, the block's products summed in ``bacc`` first: a run's sum is then a
    sum of block sums (the rounding error grows with the number of blocks, not of rows)."""
    bacc[:, :] = 0
    for k in range(0, c, _MATVEC_ROWS):
        _matvec_rows_add(bacc, xt, k, y, w)
    for k in range(c):
        a = acc[k]
        b = bacc[k]
        for ch in range(a.shape[0]):
            a[ch] += b[ch]


def _f32_2d(t):
    return isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32 and t.layout == "C"


@intrinsic
def _rows_to_columns8(typingctx, out, rows, r0, i, c):  # pragma: no cover - compiled
    """``out[:c, i : i + 8] = rows[r0 : r0 + 8, :c]^T`` (``out (C, N)``, ``rows (R, Cp)`` float32, ``Cp`` a multiple
    of 8 with ``Cp >= c``): eight points' rows moved into the labels' columns through 8x8 transposes in registers,
    the stores eight points wide (a point at a time, each label a 4-byte store into its own column, the fused
    pass's output took 0.7 ms more at 500x375, L = 21)."""
    if not (_f32_2d(out) and _f32_2d(rows) and all(isinstance(a, types.Integer) for a in (r0, i, c))):
        return None
    sig = types.void(out, rows, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        outa = context.make_array(signature.args[0])(context, builder, args[0])
        rowa = context.make_array(signature.args[1])(context, builder, args[1])
        r0_, i_, c_ = args[2], args[3], args[4]
        b, v8 = builder, _Vec8(builder)
        step = [ir.Constant(r0_.type, k) for k in range(9)]
        n = b.extract_value(outa.shape, 1)
        cp = b.extract_value(rowa.shape, 1)
        with cgutils.for_range(b, b.udiv(b.add(c_, step[7]), step[8])) as lk:  # the label chunks
            c0 = b.mul(lk.index, step[8])
            cols = v8.transpose([b.load(v8.at(rowa.data, b.add(r0_, step[p]), cp, c0), align=4) for p in range(8)])
            for j in range(8):
                lab = b.add(c0, step[j])
                with cgutils.if_likely(b, b.icmp_signed("<", lab, c_)):
                    b.store(cols[j], v8.at(outa.data, lab, n, i_), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _columns_to_rows8(typingctx, rows, x, r0, i, sign):  # pragma: no cover - compiled
    """``rows[r0 : r0 + 8, :] = sign * x[:, i : i + 8]^T``, padded with zeros (``x (C, N)``, ``rows (R, Cp)`` float32,
    ``Cp`` a multiple of 8 with ``Cp >= C``): :func:`_rows_to_columns8`'s inverse, eight points at a time."""
    if not (_f32_2d(rows) and _f32_2d(x) and isinstance(r0, types.Integer) and isinstance(i, types.Integer)
            and sign == types.float32):
        return None
    sig = types.void(rows, x, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        rowa = context.make_array(signature.args[0])(context, builder, args[0])
        xa = context.make_array(signature.args[1])(context, builder, args[1])
        r0_, i_, sgn = args[2], args[3], args[4]
        b, v8 = builder, _Vec8(builder)
        step = [ir.Constant(r0_.type, k) for k in range(9)]
        c_ = b.extract_value(xa.shape, 0)
        n = b.extract_value(xa.shape, 1)
        cp = b.extract_value(rowa.shape, 1)
        svec = v8.splat(sgn)
        with cgutils.for_range(b, b.udiv(cp, step[8])) as lk:  # the row's vectors, labels past C read as zeros
            c0 = b.mul(lk.index, step[8])
            vs = []
            for j in range(8):
                lab = b.add(c0, step[j])
                slot = cgutils.alloca_once_value(b, v8.const(0.0))
                with cgutils.if_likely(b, b.icmp_signed("<", lab, c_)):
                    b.store(b.fmul(b.load(v8.at(xa.data, lab, n, i_), align=4), svec), slot)
                vs.append(b.load(slot))
            for p, v in enumerate(v8.transpose(vs)):
                b.store(v, v8.at(rowa.data, b.add(r0_, step[p]), cp, c0), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def channels_to_rows(x, rows, negate):  # pragma: no cover - compiled
    """``rows (N, Cp)``: ``x (C, N)`` transposed (negated if ``negate``), each row padded with zeros to ``Cp``, eight
    points at a time through 8x8 transposes in registers (:func:`_columns_to_rows8`; where ``Cp`` is not whole
    vectors, and for a block's last points, a point at a time: 1.3-1.4x slower; a label at a time along a block of
    points, the stores strided, 3.6-3.9x slower, 21 and 59 labels)."""
    c, n = x.shape
    cp = rows.shape[1]
    sign = np.float32(-1.0) if negate else np.float32(1.0)
    wide = cp % 8 == 0 and cp >= c  # rows of whole vectors: eight points at a time through registers
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        i = blk * _BLOCK
        end = min(i + _BLOCK, n)
        while wide and i + 8 <= end:
            _columns_to_rows8(rows, x, i, i, sign)
            i += 8
        for k in range(i, end):
            row = rows[k]
            for ch in range(c):
                row[ch] = sign * x[ch, k]
            for ch in range(c, cp):
                row[ch] = 0


@njit(parallel=True, cache=True)
def copy_shifted(dst, src, shift):  # pragma: no cover - compiled
    """``dst[i] = src[i] + shift`` where ``src[i] >= 0``, else ``src[i]`` (vertex rows moved by ``shift``; -1, a
    missing blur neighbour, kept), in chunks. Each chunk's loop runs over its own slices: indexed into the whole
    arrays, LLVM did not vectorise it (10x slower)."""
    n = src.shape[0]
    chunk = 1 << 16
    for k in prange((n + chunk - 1) // chunk):
        s = src[k * chunk: min(n, (k + 1) * chunk)]
        d = dst[k * chunk: min(n, (k + 1) * chunk)]
        for i in range(s.shape[0]):
            v = s[i]
            d[i] = v + shift if v >= 0 else v


@njit(parallel=True, cache=True)
def rows_to_channels(rows, out):  # pragma: no cover - compiled
    """``out (C, N) = rows[:, :C]^T`` for ``rows (N, >= C)``, eight points at a time through 8x8 transposes in
    registers (:func:`_rows_to_columns8`; a point at a time, each label a 4-byte store into its own column: 1.3-1.6x
    slower; NumPy's strided copy of the transposed view: ~6x; a label at a time along a block of points: 3-5x, for
    21 and 59 labels)."""
    c, n = out.shape
    wide = rows.shape[1] % 8 == 0 and rows.shape[1] >= c  # rows of whole vectors: eight points at a time
    for blk in prange((n + _BLOCK - 1) // _BLOCK):
        i = blk * _BLOCK
        end = min(i + _BLOCK, n)
        while wide and i + 8 <= end:
            _rows_to_columns8(out, rows, i, i, c)
            i += 8
        for k in range(i, end):
            row = rows[k]
            for ch in range(c):
                out[ch, k] = row[ch]


dense_meanfield_backward = njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "arcp"})(
    _dense_meanfield_backward)
