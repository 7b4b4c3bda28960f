"""The compiled lattice's fast paths against slow twins written here in NumPy: the filter (branch-free
blur with a zero row for missing neighbours, prefetching splat/slice, caller-allocated work arrays)
against a float64 splat / blur / slice over the lattice's own arrays; the pipelined neighbour search
against a dictionary of the keys; the pipelined hash insert against first-appearance numbering."""
import numpy as np
import pytest
import torch

from crfrnn import PermutohedralLattice, available_backends

from conftest import crop, grid_features, voc_pairs

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="numba not available")


def _reference(lat, x, reverse=False, pre=None, post=None):
    """``post * F(pre * x)`` in float64 NumPy from the lattice's offsets, weights and neighbours:
    scatter-add splat, one ``[1/2, 1, 1/2]`` pass per direction (missing neighbour = nothing), gather
    slice. ``x (B, C, N)``."""
    B, C, n = x.shape
    d1 = lat.dim + 1
    off = lat._offsets.reshape(B * n, d1).astype(np.int64)
    w = lat._bary(torch.float64).reshape(B * n, d1)
    v = x.transpose(0, 2, 1).reshape(B * n, C).astype(np.float64)
    if pre is not None:
        v = v * pre.reshape(-1, 1)
    grid = np.zeros((lat.num_vertices, C))
    np.add.at(grid, off, w[..., None] * v[:, None, :])
    for j in (range(d1 - 1, -1, -1) if reverse else range(d1)):
        new = grid.copy()
        for side in (0, 1):
            nb = lat._nbr[j, :, side].astype(np.int64)
            has = nb >= 0
            new[has] += 0.5 * grid[nb[has]]
        grid = new
    out = (grid[off] * w[..., None]).sum(1) * lat._alpha
    if post is not None:
        out = out * post.reshape(-1, 1)
    return out.reshape(B, n, C).transpose(0, 2, 1)


def _features(d, B, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, h, w, dtype=torch.float64, generator=g) * 2.5


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_equals_numpy_twin(d, dtype):
    """Every option of the compiled filter against the float64 twin: batch of 2, a mask, C = 1 (the
    scalar kernel), 3 and 21 (padded rows), forward and reverse, per-point scales, accumulation."""
    B, h, w = 2, 23, 31  # 713 points per image: several blocks, four splat copies
    f = _features(d, B, h, w, d)
    mask = torch.ones(B, 1, h, w, dtype=torch.bool)
    mask[1, :, 5:9, 3:20] = False
    lat = PermutohedralLattice(f, backend="numba", mask=mask)
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    g = torch.Generator().manual_seed(10 + d)
    for c in (1, 3, 21):
        x = torch.rand(B, c, h, w, dtype=dtype, generator=g)
        pre, post = (torch.rand(B, 1, h, w, dtype=dtype, generator=g) + 0.5 for _ in range(2))
        xn = x.reshape(B, c, -1).double().numpy()
        pn, qn = pre.reshape(-1).double().numpy(), post.reshape(-1).double().numpy()
        for reverse in (False, True):
            got = lat.filter_scaled(x, reverse=reverse, pre=pre, post=post).reshape(B, c, -1)
            ref = _reference(lat, xn, reverse, pn, qn)
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got.double().numpy() / scale, ref / scale, **tol)
            acc = torch.full_like(x, 0.5)
            lat.filter_scaled(x, reverse=reverse, out=acc)
            np.testing.assert_allclose(acc.reshape(B, c, -1).double().numpy(), 0.5 + _reference(lat, xn, reverse),
                                       **tol)
        assert float(got.reshape(B, c, h, w)[1, :, 5:9, 3:20].abs().max()) == 0.0  # masked out: no output


def test_filter_on_real_image_lattices_equals_numpy_twin():
    """The VOC kernels (θβ = 3: about one vertex per pixel, many missing neighbours) and the README
    kernels on a real image crop, float32, against the float64 twin."""
    _, img, _ = voc_pairs(count=1, start=3)[0]
    im = torch.from_numpy(crop(img, 90, 120).copy()).permute(2, 0, 1).float()
    for sxy, srgb in ((160.0, 3.0), (80.0, 13.0), (3.0, None)):
        lat = PermutohedralLattice(grid_features(im, sxy, srgb), backend="numba")
        x = torch.rand(1, 21, 90, 120, generator=torch.Generator().manual_seed(1))
        ref = _reference(lat, x.reshape(1, 21, -1).double().numpy())
        got = lat.filter(x).reshape(1, 21, -1).double().numpy()
        np.testing.assert_allclose(got / ref.max(), ref / ref.max(), rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_work_arrays_from_the_caller_change_nothing(dtype):
    """``filter_values`` with NumPy work arrays (the library's path; ``lat``/``tmp`` uninitialised, here
    NaN-filled) is bit-identical to the kernel allocating its own, for 1 and 4 splat copies."""
    from crfrnn.lattice import _numba_kernels as nb

    lat = PermutohedralLattice(_features(5, 2, 30, 40, 3), backend="numba")
    x = np.random.default_rng(0).random((2, 13, 1200)).astype(dtype)
    consts = np.array([0.5, lat._alpha], dtype=dtype)
    empty = np.empty(0, dtype=dtype)
    bary = lat._bary(torch.float64).astype(dtype)
    for parts in (1, 4):
        for reverse in (False, True):
            ref, got = np.empty_like(x), np.empty_like(x)
            args = (bary, lat._offsets, lat._nbr, reverse, consts, parts)
            nb.filter_values(x, *args, ref, empty, empty, False)
            work = nb.filter_work(x.shape, lat.num_vertices, parts, dtype)
            work[1][:] = np.nan
            work[2][:] = np.nan
            nb.filter_values(x, *args, got, empty, empty, False, work)
            assert np.array_equal(ref, got)


def test_filter_is_independent_of_thread_count_and_serial_compilation():
    import numba

    from crfrnn.lattice import _numba_kernels as nb

    lat = PermutohedralLattice(_features(4, 1, 60, 70, 5), backend="numba")
    x = torch.rand(1, 21, 60, 70, generator=torch.Generator().manual_seed(2))
    before = numba.get_num_threads()
    try:
        outs = []
        for nt in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(nt)
            outs.append(lat.filter(x, reverse=True))
    finally:
        numba.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    xn = x.reshape(1, 21, -1).numpy()
    serial = np.empty_like(xn)
    empty = np.empty(0, dtype=np.float32)
    nb.filter_values_serial(xn, lat._bary(torch.float32), lat._offsets, lat._nbr, True,
                            np.array([0.5, lat._alpha], dtype=np.float32), 4, serial, empty, empty, False,
                            nb.filter_work(xn.shape, lat.num_vertices, 4, np.float32))
    assert np.array_equal(serial, outs[0].reshape(1, 21, -1).numpy())


def _keys(d, n, seed, spread=3.0):
    from crfrnn.lattice import _numba_kernels as nb
    from crfrnn.lattice.permutohedral import _scale_factors

    pts = np.random.default_rng(seed).normal(0, spread, (n, d))
    keys = np.empty((n, d + 1, d), dtype=np.int32)
    nb.elevate(pts, _scale_factors(d).numpy(), keys, np.empty((n, d + 1)))
    return keys.reshape(-1, d)


@pytest.mark.parametrize("d, spread, far, packs", [(1, 3.0, False, True), (2, 3.0, False, True), (3, 3.0, False, True),
                                                   (5, 3.0, False, True), (8, 1.0, False, True), (8, 3.0, False, False),
                                                   (3, 3.0, True, False), (5, 3.0, True, False)])
def test_neighbour_search_equals_dictionary(d, spread, far, packs):
    """The software-pipelined neighbour search (hashes derived from the vertex's shifted sum, table
    slots prefetched ahead) against a Python dictionary of the keys, with a vertex offset; for keys that pack
    into one int64 (found slots checked against packed keys) and keys that do not (checked against the key rows):
    d = 8 with a wide spread, or a second cluster of keys translated by ~2^28 lattice units (``far``)."""
    from crfrnn.lattice import _numba_kernels as nb

    flat = _keys(d, 3000, d, spread=spread)
    if far:  # a lattice translation (multiples of d + 1), so every neighbour link inside a cluster stays one
        flat = np.concatenate([flat, flat + (d + 1) * (2 ** 28 // (d + 1))]).astype(np.int32)
    vkeys, table = nb.insert(flat, np.empty(flat.shape[0], dtype=np.int32), 0, d + 1, 1)
    assert nb._key_packing(vkeys)[2] == packs  # the path under test
    got = nb.neighbours(vkeys, table, 7)
    index = {tuple(k): i for i, k in enumerate(vkeys.tolist())}
    m = vkeys.shape[0]
    want = np.full((d + 1, m, 2), -1, dtype=np.int64)
    for j in range(d + 1):
        step = np.full(d, -1, dtype=np.int64)
        if j < d:
            step[j] = d
        for side, sign in ((0, 1), (1, -1)):
            for v in range(m):
                u = index.get(tuple((vkeys[v] + sign * step).tolist()))
                want[j, v, side] = -1 if u is None else u + 7
    assert np.array_equal(got, want)
    assert 0 < (got >= 0).mean() < 1  # some neighbours present, some missing


@pytest.mark.parametrize("d", [1, 2, 5])
def test_key_packing_keeps_keys_and_their_blur_steps_apart(d):
    """``_key_packing``'s fields hold every vertex key and every key one blur step from one (a coordinate -1 or
    +d; the neighbour search looks those up): each field in range, the packed values below 2^63, and two keys
    packed alike only if equal (checked with Python's integers, keys at the corners of their range included)."""
    from crfrnn.lattice import _numba_kernels as nb

    rng = np.random.default_rng(d)
    vkeys = rng.integers(-40, 41, (500, d)).astype(np.int32)
    vkeys[:2] = [[-40] * d, [40] * d]
    lo, shift, fits = nb._key_packing(vkeys)
    assert fits
    ends = list(shift[1:]) + [63]
    keys = {tuple(k) for k in vkeys.tolist()}
    for k in list(keys):
        for j in range(d + 1):
            keys.add(tuple(x - 1 + (d + 1 if i == j else 0) for i, x in enumerate(k)))
    packed = {}
    for k in keys:
        fields = [x - int(lo[i]) for i, x in enumerate(k)]
        assert all(0 <= f < 2 ** (int(ends[i]) - int(shift[i])) for i, f in enumerate(fields))
        value = sum(f << int(shift[i]) for i, f in enumerate(fields))
        assert value < 2 ** 63
        assert packed.setdefault(value, k) == k
    assert [nb._packed_key(vkeys, v, lo, shift, d) for v in range(3)] == \
        [sum((int(x) - int(lo[i])) << int(shift[i]) for i, x in enumerate(vkeys[v])) for v in range(3)]
    assert not nb._key_packing(np.empty((0, d), np.int32))[2]


@pytest.mark.parametrize("n_points", [1, 2, 3, 50, 20000])
def test_pipelined_insert_numbers_in_order_of_first_appearance(n_points):
    """Hash insert with the slots of the keys ahead prefetched, including inputs shorter than the
    look-ahead: vertex v is the v-th distinct key in order of appearance, every key maps to its vertex."""
    from crfrnn.lattice import _numba_kernels as nb

    d = 3
    flat = _keys(d, n_points, n_points, spread=1.0)
    for threads in (1, 3):
        off = np.empty(flat.shape[0], dtype=np.int32)
        vkeys, _ = nb.insert(flat, off, 2, d + 1, threads)
        _, first = np.unique(flat, axis=0, return_index=True)
        np.testing.assert_array_equal(vkeys, flat[np.sort(first)])
        np.testing.assert_array_equal(vkeys[off - 2], flat)


def test_insert_with_a_table_past_the_prefetch_threshold():
    """A VOC-kernel lattice of ~1 vertex per pixel: the insert's table outgrows ``_PREFETCH_TABLE`` and
    the look-ahead path runs; the numbering is still exactly first appearance, and the neighbours
    match the dictionary twin on a sample of vertices."""
    from crfrnn.lattice import _numba_kernels as nb
    from crfrnn.lattice.permutohedral import _scale_factors

    _, img, _ = voc_pairs(count=1, start=2)[0]
    im = torch.from_numpy(crop(img, 300, 360).copy()).permute(2, 0, 1).double()
    f = grid_features(im, 160.0, 3.0)[0].reshape(5, -1).T.contiguous().numpy()
    keys = np.empty((f.shape[0], 6, 5), dtype=np.int32)
    nb.elevate(f, _scale_factors(5).numpy(), keys, np.empty((f.shape[0], 6)))
    flat = keys.reshape(-1, 5)
    off = np.empty(flat.shape[0], dtype=np.int32)
    vkeys, table = nb.insert(flat, off, 0, 6, 1)
    assert table.shape[0] > nb._PREFETCH_TABLE
    _, first = np.unique(flat, axis=0, return_index=True)
    np.testing.assert_array_equal(vkeys, flat[np.sort(first)])
    np.testing.assert_array_equal(vkeys[off], flat)
    nbr = nb.neighbours(vkeys, table, 0)
    index = {tuple(k): i for i, k in enumerate(vkeys.tolist())}
    for v in range(0, vkeys.shape[0], 97):
        for j in range(6):
            step = np.full(5, -1, dtype=np.int64)
            if j < 5:
                step[j] = 5
            for side, sign in ((0, 1), (1, -1)):
                assert nbr[j, v, side] == index.get(tuple((vkeys[v] + sign * step).tolist()), -1)


def _fused_build_equals_twin(pts, threads):
    from crfrnn.lattice import _numba_kernels as nb
    from crfrnn.lattice.permutohedral import _scale_factors

    n, d = pts.shape
    sc = _scale_factors(d).numpy()
    keys = np.empty((n, d + 1, d), dtype=np.int32)
    bary = np.empty((n, d + 1))
    nb.elevate(pts, sc, keys, bary)
    off = np.empty(n * (d + 1), dtype=np.int32)
    vkeys, table = nb.insert(keys.reshape(-1, d), off, 4, d + 1, threads)
    src, ones = np.ascontiguousarray(pts.T), np.ones(d)  # the fused build divides: by 1 here (exact)
    for with64 in (True, False):
        b64 = np.empty((n if with64 else 0, d + 1))
        b32 = np.empty((n, d + 1), dtype=np.float32)
        off2 = np.empty_like(off)
        vkeys2, table2 = nb.elevate_insert(src, ones, sc, b64, b32, off2, 4, threads)
        np.testing.assert_array_equal(off2, off)
        np.testing.assert_array_equal(vkeys2, vkeys)
        np.testing.assert_array_equal(table2, table)
        np.testing.assert_array_equal(b32, bary.astype(np.float32))
        if with64:
            np.testing.assert_array_equal(b64, bary)


# 20000 points make 2 and 3 chunks (the chunked build: the same compiled kernel per chunk, then the merge)
@pytest.mark.parametrize("d,n_points", [(d, n) for d in (1, 2, 3, 5, 8) for n in (1, 7, 300, 20000)])
def test_fused_build_equals_elevate_then_insert(d, n_points):
    """The fused elevation + insert (keys made 256 points at a time, never stored) against its twin, the
    elevation into an (N, d+1, d) array of keys and the insert of that array: the same offsets, vertex keys,
    table and barycentric weights, bit for bit, for 1 and 3 chunks of points (block and chunk edges included)."""
    pts = np.random.default_rng(d * 100 + n_points).normal(0, 2.0, (n_points, d))
    for threads in (1, 3):
        _fused_build_equals_twin(pts, threads)


def test_fused_build_equals_twin_on_a_voc_bilateral_lattice():
    """~1 vertex per pixel (the insert's table past ``_PREFETCH_TABLE``, its look-ahead running across the
    fused build's blocks), 1 and 2 chunks."""
    from crfrnn.lattice import _numba_kernels as nb

    _, img, _ = voc_pairs(count=1, start=2)[0]
    im = torch.from_numpy(crop(img, 300, 360).copy()).permute(2, 0, 1).double()
    f = grid_features(im, 160.0, 3.0)[0].reshape(5, -1).T.contiguous().numpy()
    assert f.shape[0] * 6 // 2 > nb._PREFETCH_TABLE
    for threads in (1, 2):
        _fused_build_equals_twin(f, threads)


def test_stacked_terms_equal_numpy_concatenation():
    """``stack_lattices`` (compiled copies with the vertex rows moved) against NumPy's concatenation of the
    lattices' arrays: three terms of dimension 2, 5 and 3 over the same points, scales given and not, a vector
    and a matrix weight."""
    from crfrnn.lattice.fused import _padded, stack_lattices

    h, w, L = 19, 27, 5
    lats = [PermutohedralLattice(_features(d, 1, h, w, 40 + d), backend="numba") for d in (2, 5, 3)]
    n = h * w
    g = np.random.default_rng(3)
    pres = [None, g.random(n, dtype=np.float32) + 0.5, None]
    posts = [g.random(n, dtype=np.float32) + 0.5, None, None]
    weights = [g.random(L, dtype=np.float32), g.random((L, L), dtype=np.float32), g.random(L, dtype=np.float32)]
    (bary, offsets, tstart, td1, nbr, nstart, vstart, vcount, pre, post, wdiag, wcols,
     ismat) = stack_lattices(lats, pres, posts, weights, L)
    arrays = [lat.compiled_arrays() for lat in lats]
    shift = np.cumsum([0] + [lat.num_vertices for lat in lats])[:-1]
    np.testing.assert_array_equal(bary, np.concatenate([a.barycentric for a in arrays]))
    want_offsets = np.concatenate([a.offsets.astype(np.int64) + s for a, s in zip(arrays, shift)])
    np.testing.assert_array_equal(offsets, want_offsets)
    want_nbr = np.concatenate([np.where(a.neighbours >= 0, a.neighbours.astype(np.int64) + s, -1)
                               for a, s in zip(arrays, shift)])
    np.testing.assert_array_equal(nbr, want_nbr)
    assert (nbr[nbr < 0] == -1).all() and (nbr < 0).any()  # missing neighbours kept as -1
    np.testing.assert_array_equal(tstart, np.cumsum([0] + [a.barycentric.size for a in arrays])[:-1])
    np.testing.assert_array_equal(nstart, np.cumsum([0] + [a.neighbours.size for a in arrays])[:-1])
    np.testing.assert_array_equal(vstart, shift)
    np.testing.assert_array_equal(vcount, [lat.num_vertices for lat in lats])
    np.testing.assert_array_equal(td1, [3, 6, 4])
    alphas = [np.float32(a.alpha) for a in arrays]
    np.testing.assert_array_equal(pre, np.stack([np.ones(n, np.float32), pres[1], np.ones(n, np.float32)]))
    np.testing.assert_array_equal(post, np.stack([posts[0] * alphas[0], np.full(n, alphas[1], np.float32),
                                                  np.full(n, alphas[2], np.float32)]))
    cp = _padded(L)
    assert wdiag.shape == (3, cp) and wcols.shape == (3, L, cp)
    np.testing.assert_array_equal(wdiag[:, :L], np.stack([weights[0], np.zeros(L), weights[2]]))
    np.testing.assert_array_equal(wcols[1, :, :L], weights[1].T)
    assert not wdiag[:, L:].any() and not wcols[[0, 2]].any() and not wcols[:, :, L:].any()
    np.testing.assert_array_equal(ismat, [False, True, False])


@pytest.mark.parametrize("L", [1, 8, 21])
@pytest.mark.parametrize("negate", [False, True])
def test_rows_are_the_padded_transpose(L, negate):
    from crfrnn.lattice.fused import _padded, label_rows

    x = np.random.default_rng(L).standard_normal((L, 1000)).astype(np.float32)
    want = np.zeros((1000, _padded(L)), np.float32)
    want[:, :L] = -x.T if negate else x.T
    np.testing.assert_array_equal(label_rows(x, negate), want)
    np.testing.assert_array_equal(label_rows(x[:, ::2], negate), want[::2])  # a strided view


@pytest.mark.parametrize("labels", [1, 2, 21, 59])
def test_row_transposes_equal_numpy(labels):
    """``channels_to_rows`` (the kernels' row layout: transposed, negated on request, zero padding) and
    ``rows_to_channels`` against NumPy's transposes, over a number of points that is not a whole block nor a whole
    number of 8-point transposes, for padded rows (8 points at a time in registers) and unpadded ones."""
    from crfrnn.lattice import _numba_kernels as nb
    from crfrnn.lattice.fused import _padded

    n = 3 * nb._BLOCK + 17
    x = np.random.default_rng(labels).normal(size=(labels, n)).astype(np.float32)
    cp = _padded(labels)
    for negate in (False, True):
        rows = np.full((n, cp), np.nan, np.float32)
        nb.channels_to_rows(x, rows, negate)
        want = np.zeros((n, cp), np.float32)
        want[:, :labels] = -x.T if negate else x.T
        np.testing.assert_array_equal(rows, want)
    back = np.full((labels, n), np.nan, np.float32)
    nb.rows_to_channels(rows, back)
    np.testing.assert_array_equal(back, -x)
    # rows that are not whole vectors (no padding) take the point-at-a-time path, both ways
    tight = np.full((n, labels), np.nan, np.float32)
    nb.channels_to_rows(x, tight, False)
    np.testing.assert_array_equal(tight, x.T)
    back[:] = np.nan
    nb.rows_to_channels(tight, back)
    np.testing.assert_array_equal(back, x)
