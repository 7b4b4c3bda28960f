"""The permutohedral lattice against independent references: the exact O(N^2) filter, adjoint
identities, linearity, batch independence, cross-backend agreement and gradcheck."""
import math

import numpy as np
import pytest
import torch

from crfrnn import PermutohedralLattice, available_backends, dense_gaussian_filter, permutohedral_filter

from conftest import CUDA, crop, grid_features, image_pairs, scene_pairs

BACKENDS = available_backends()


def _corr(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_dense_filter_matches_naive_double_loop():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=g)
    got = dense_gaussian_filter(v, f, block_size=7)
    got_n = dense_gaussian_filter(v, f, normalize=True)
    fb = f.reshape(2, 3, -1)
    vb = v.reshape(2, 2, -1)
    ref = torch.zeros_like(vb)
    norm = torch.zeros(2, 1, 20, dtype=torch.float64)
    for b in range(2):
        for i in range(20):
            for j in range(20):
                k = math.exp(-0.5 * float(((fb[b, :, i] - fb[b, :, j]) ** 2).sum()))
                ref[b, :, i] += k * vb[b, :, j]
                norm[b, 0, i] += k
    torch.testing.assert_close(got, ref.reshape(v.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_n, (ref / norm).reshape(v.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [(80.0, 13.0), (160.0, 3.0), (3.0, None)], ids=["bil80-13", "bil160-3", "spatial3"])
def test_normalized_filter_close_to_exact_on_images(backend, kernel, image_source):
    # the bounds hold with a wide margin on both the scenes and VOC (worst: corr 0.9986, rel 0.032 on VOC)
    sxy, srgb = kernel
    for name, img, mask in image_pairs(image_source, count=3):
        im = torch.from_numpy(crop(img, 60, 80).copy()).permute(2, 0, 1).double()
        lab = torch.from_numpy(crop(mask, 60, 80).astype(np.int64))
        lab[lab == 255] = 0
        onehot = torch.nn.functional.one_hot(lab, 21).permute(2, 0, 1).double()
        present = onehot.sum((1, 2)) > 0
        # values: the ground-truth label maps (what mean-field filters) plus the image itself
        v = torch.cat([onehot[present], im / 255.0], 0)[None]
        f = grid_features(im, sxy, srgb)
        exact = dense_gaussian_filter(v, f, normalize=True)
        approx = permutohedral_filter(v, f, normalize=True, backend=backend)
        assert _corr(approx, exact) >= 0.97, name
        assert _rel(approx, exact) <= 0.05, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 2, 5, 16])
def test_adjoint_identity_and_linearity(backend, dim):
    g = torch.Generator().manual_seed(dim)
    f = torch.randn(2, dim, 9, 11, dtype=torch.float64, generator=g) * 2
    lat = PermutohedralLattice(f, backend=backend)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    y = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    fx = lat.filter(x)
    fty = lat.filter(y, reverse=True)
    lhs, rhs = float((fx * y).sum()), float((x * fty).sum())
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), abs(rhs))
    a, b = 0.7, -1.9
    torch.testing.assert_close(lat.filter(a * x + b * y), a * fx + b * lat.filter(y), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(fx).all() and fx.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_is_the_transpose_not_the_forward(backend):
    # with D >= 2 the blur order matters: an operator equal to its own transpose would pass the
    # adjoint test for the wrong reason, so check forward != reverse while <Fx,y> = <x,F^T y>.
    g = torch.Generator().manual_seed(3)
    f = torch.randn(1, 3, 10, 10, dtype=torch.float64, generator=g)
    lat = PermutohedralLattice(f, backend=backend)
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64, generator=g)
    assert (lat.filter(x) - lat.filter(x, reverse=True)).abs().max() > 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_independence(backend):
    (_, img0, _), (_, img1, _) = scene_pairs(count=2)
    ims = [torch.from_numpy(crop(i, 40, 50).copy()).permute(2, 0, 1).float() for i in (img0, img1)]
    f = torch.cat([grid_features(im, 20.0, 13.0) for im in ims], 0)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 4, 40, 50, generator=g)
    batched = permutohedral_filter(v, f, normalize=True, backend=backend)
    for b in range(2):
        alone = permutohedral_filter(v[b : b + 1], f[b : b + 1], normalize=True, backend=backend)
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-6)
    # changing image 1's values leaves image 0's output untouched
    v2 = v.clone()
    v2[1] = 100.0
    lat = PermutohedralLattice(f, backend=backend)
    assert torch.equal(lat.filter(v)[0], lat.filter(v2)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_agree(dtype):
    if "numba" not in BACKENDS:
        pytest.skip("numba not available")
    _, img, _ = scene_pairs(count=1, start=5)[0]
    im = torch.from_numpy(crop(img, 70, 90).copy()).permute(2, 0, 1).to(dtype)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1, 7, 70, 90, generator=g, dtype=dtype)
    for sxy, srgb in [(80.0, 13.0), (3.0, None)]:
        f = grid_features(im, sxy, srgb)
        a = PermutohedralLattice(f, backend="numba")
        b = PermutohedralLattice(f, backend="torch")
        assert a.num_vertices == b.num_vertices
        for rev in (False, True):
            torch.testing.assert_close(a.filter(v, reverse=rev), b.filter(v, reverse=rev), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("dim", [5, 9])
def test_backends_agree_on_both_numba_builds(dim):
    """The numba build fuses elevation and insert for D <= 8 and runs them apart above (its twin): both filter
    float32 and float64 values as the torch backend does."""
    if "numba" not in BACKENDS:
        pytest.skip("numba not available")
    g = torch.Generator().manual_seed(dim)
    f = torch.randn(2, dim, 9, 11, dtype=torch.float64, generator=g) * 0.7
    a = PermutohedralLattice(f, backend="numba")
    b = PermutohedralLattice(f, backend="torch")
    assert a.num_vertices == b.num_vertices
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        v = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64).to(dtype)
        torch.testing.assert_close(a.filter(v), b.filter(v), rtol=tol, atol=tol)

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    lat = PermutohedralLattice(f, backend=backend)
    v = torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lat.filter(x), (v,))
    assert torch.autograd.gradcheck(lambda x: lat.filter(x, reverse=True), (v,))
    assert torch.autograd.gradcheck(lambda x: permutohedral_filter(x, f, normalize=True, backend=backend), (v,))
    assert torch.autograd.gradgradcheck(lambda x: lat.filter(x) ** 2, (v,))


def test_backward_reuses_the_lattice(lattice_builds):
    builds = lattice_builds
    f = torch.randn(1, 2, 6, 6)
    lat = PermutohedralLattice(f)
    v = torch.randn(1, 3, 6, 6, requires_grad=True)
    out = v
    for _ in range(5):
        out = lat.filter(out)
    out.sum().backward()
    assert len(builds) == 1 and v.grad is not None and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_volume_and_extreme_dims(backend):
    g = torch.Generator().manual_seed(0)
    # 3-D volume, spatial-only features (z, y, x)/2: compare with the exact filter
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (6, 7, 8)), indexing="ij")
    f3 = torch.stack([z, y, x])[None] / 2.0
    v3 = torch.rand(1, 2, 6, 7, 8, dtype=torch.float64, generator=g)
    out3 = permutohedral_filter(v3, f3, normalize=True, backend=backend)
    ex3 = dense_gaussian_filter(v3, f3, normalize=True)
    assert out3.shape == v3.shape
    assert _corr(out3, ex3) >= 0.97 and _rel(out3, ex3) <= 0.05
    # D = 1: a 1-D signal (B, 1, N)
    f1 = torch.arange(50, dtype=torch.float64)[None, None] / 3.0
    v1 = torch.rand(2, 3, 50, dtype=torch.float64, generator=g)
    out1 = permutohedral_filter(v1, f1.expand(2, 1, 50), normalize=True, backend=backend)
    ex1 = dense_gaussian_filter(v1, f1.expand(2, 1, 50), normalize=True)
    assert _corr(out1, ex1) >= 0.97 and _rel(out1, ex1) <= 0.05
    # D = 16: works, finite, sensible normalised averages of positive values lie inside their range
    f16 = torch.randn(1, 16, 12, 12, generator=g) * 0.5
    v16 = torch.rand(1, 2, 12, 12, generator=g) + 1.0
    out16 = permutohedral_filter(v16, f16, normalize=True, backend=backend)
    assert out16.shape == v16.shape and torch.isfinite(out16).all()
    assert out16.min() >= 1.0 - 1e-4 and out16.max() <= 2.0 + 1e-4
    assert _corr(out16, dense_gaussian_filter(v16, f16, normalize=True)) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_and_device_follow_inputs(backend):
    f = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    lat = PermutohedralLattice(f, backend=backend)
    for dt in (torch.float32, torch.float64):
        out = lat.filter(torch.ones(1, 1, 5, 5, dtype=dt))
        assert out.dtype == dt and out.device == f.device
    v = torch.randn(1, 2, 5, 5)
    before = v.clone()
    permutohedral_filter(v, f.float(), normalize=True, backend=backend)
    assert torch.equal(v, before)  # no in-place edits of the caller's tensor


@pytest.mark.parametrize("device", CUDA)
def test_cuda_matches_cpu(device):
    _, img, _ = scene_pairs(count=1)[0]
    im = torch.from_numpy(crop(img, 60, 80).copy()).permute(2, 0, 1).float()
    f = grid_features(im, 80.0, 13.0)
    v = torch.rand(1, 5, 60, 80)
    cpu = permutohedral_filter(v, f, normalize=True)
    gpu = permutohedral_filter(v.to(device), f.to(device), normalize=True)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    vg = v.to(device).requires_grad_()
    permutohedral_filter(vg, f.to(device)).sum().backward()
    assert vg.grad.device.type == "cuda"


# ----------------------------------------------------------------------------- bad input
def _raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_features():
    _raises(TypeError, "features must be a torch.Tensor", lambda: PermutohedralLattice(np.zeros((1, 2, 3, 3))))
    _raises(TypeError, r"features must be a floating-point.*torch.int64",
            lambda: PermutohedralLattice(torch.zeros(1, 2, 3, 3, dtype=torch.long)))
    _raises(ValueError, r"D=0.*\(1, 0, 3, 3\)", lambda: PermutohedralLattice(torch.zeros(1, 0, 3, 3)))
    _raises(ValueError, r"features is empty.*\(0, 2, 3, 3\)", lambda: PermutohedralLattice(torch.zeros(0, 2, 3, 3)))
    _raises(ValueError, r"features is empty.*\(1, 2, 0, 3\)", lambda: PermutohedralLattice(torch.zeros(1, 2, 0, 3)))
    _raises(ValueError, r"\(B, D, \*spatial\).*\(2, 3\)", lambda: PermutohedralLattice(torch.zeros(2, 3)))
    bad = torch.zeros(1, 2, 3, 3)
    bad[0, 1, 2, 2] = float("nan")
    _raises(ValueError, "features contains NaN or infinite", lambda: PermutohedralLattice(bad))
    bad[0, 1, 2, 2] = float("inf")
    _raises(ValueError, "features contains NaN or infinite", lambda: PermutohedralLattice(bad))
    _raises(ValueError, "too large a range", lambda: PermutohedralLattice(torch.full((1, 2, 2, 2), 1e12)))
    _raises(ValueError, "backend must be one of", lambda: PermutohedralLattice(torch.zeros(1, 2, 3, 3), backend="cuda"))


def test_bad_values():
    lat = PermutohedralLattice(torch.zeros(2, 2, 3, 4))
    _raises(ValueError, r"values must have shape \(B=2, C, 3, 4\).*\(1, 1, 3, 4\)",
            lambda: lat.filter(torch.zeros(1, 1, 3, 4)))
    _raises(ValueError, r"values must have shape .*\(2, 1, 4, 3\)", lambda: lat.filter(torch.zeros(2, 1, 4, 3)))
    _raises(ValueError, r"C >= 1.*\(2, 0, 3, 4\)", lambda: lat.filter(torch.zeros(2, 0, 3, 4)))
    _raises(TypeError, r"values must be a floating-point.*torch.int32",
            lambda: lat.filter(torch.zeros(2, 1, 3, 4, dtype=torch.int32)))
    _raises(TypeError, "values must be a torch.Tensor", lambda: lat.filter([1.0]))
    _raises(ValueError, r"values \(B, C, \*spatial\) and features.*\(1, 3, 3, 4\) vs features \(2, 2, 3, 4\)",
            lambda: permutohedral_filter(torch.zeros(1, 3, 3, 4), torch.zeros(2, 2, 3, 4)))
    _raises(ValueError, r"\(2, 3, 5, 4\) vs features \(2, 2, 3, 4\)",
            lambda: dense_gaussian_filter(torch.zeros(2, 3, 5, 4), torch.zeros(2, 2, 3, 4)))
    _raises(TypeError, r"values must be a floating-point",
            lambda: permutohedral_filter(torch.zeros(2, 3, 3, 4, dtype=torch.long), torch.zeros(2, 2, 3, 4)))
    if torch.cuda.is_available():
        _raises(ValueError, "cuda", lambda: lat.filter(torch.zeros(2, 1, 3, 4, device="cuda")))
    meta = torch.zeros(2, 1, 3, 4, device="meta")
    _raises(ValueError, r"values is on meta but the lattice \(features\) is on cpu", lambda: lat.filter(meta))
    _raises(ValueError, "values is on meta but features is on cpu",
            lambda: permutohedral_filter(meta, torch.zeros(2, 2, 3, 4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_makes_padding_invisible(backend):
    _, img, _ = scene_pairs(count=1, start=2)[0]
    im = torch.from_numpy(crop(img, 40, 50).copy()).permute(2, 0, 1).double()
    f = grid_features(im, 10.0, 13.0)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1, 3, 40, 50, dtype=torch.float64, generator=g)
    ref = permutohedral_filter(v, f, backend=backend)
    # pad to 48 x 64 with garbage features/values in the padding; the mask removes them
    fp = torch.randn(1, 5, 48, 64, dtype=torch.float64, generator=g) * 5
    vp = torch.rand(1, 3, 48, 64, dtype=torch.float64, generator=g) * 9
    fp[..., 3:43, 7:57] = f
    vp[..., 3:43, 7:57] = v
    mask = torch.zeros(1, 1, 48, 64, dtype=torch.bool)
    mask[..., 3:43, 7:57] = True
    lat = PermutohedralLattice(fp, backend=backend, mask=mask)
    out = lat.filter(vp)
    torch.testing.assert_close(out[..., 3:43, 7:57], ref, rtol=1e-10, atol=1e-12)
    assert float(out[~mask.expand_as(out)].abs().max()) == 0.0
    _raises(ValueError, r"mask must have shape \(B, 1, \*spatial\) = \(1, 1, 48, 64\), got \(1, 1, 48, 63\)",
            lambda: PermutohedralLattice(fp, mask=mask[..., :63]))
    _raises(ValueError, r"mask excludes every pixel of image\(s\) \[0\]",
            lambda: PermutohedralLattice(fp, mask=torch.zeros_like(mask)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_scaled_fuses_scales_and_accumulation(backend):
    g = torch.Generator().manual_seed(7)
    f = torch.randn(2, 3, 10, 12, dtype=torch.float64, generator=g)
    lat = PermutohedralLattice(f, backend=backend)
    v = torch.randn(2, 4, 10, 12, dtype=torch.float64, generator=g)
    pre = torch.rand(2, 1, 10, 12, dtype=torch.float64, generator=g)
    post = torch.rand(2, 1, 10, 12, dtype=torch.float64, generator=g)
    for rev in (False, True):
        ref = post * lat.filter(pre * v, reverse=rev)
        torch.testing.assert_close(lat.filter_scaled(v, reverse=rev, pre=pre, post=post), ref, rtol=1e-12, atol=1e-12)
        acc = torch.full_like(v, 2.0)
        returned = lat.filter_scaled(v, reverse=rev, pre=pre, post=post, out=acc)
        assert returned is acc
        torch.testing.assert_close(acc, ref + 2.0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float64 tensor of shape \(2, 4, 10, 12\)"):
        lat.filter_scaled(v, out=torch.zeros(2, 4, 12, 10, dtype=torch.float64))


def test_compiled_results_do_not_depend_on_threads_or_serial_path():
    if "numba" not in BACKENDS:
        pytest.skip("numba not available")
    import numba

    from crfrnn.lattice import _numba_kernels as nb

    _, img, _ = scene_pairs(count=1, start=3)[0]
    im = torch.from_numpy(crop(img, 120, 160).copy()).permute(2, 0, 1).float()
    lat = PermutohedralLattice(grid_features(im, 20.0, 13.0), backend="numba")
    v = torch.rand(1, 21, 120, 160, generator=torch.Generator().manual_seed(0))
    before = numba.get_num_threads()
    try:
        outs = []
        for nt in sorted({1, before}):
            numba.set_num_threads(nt)
            outs.append(lat.filter(v))
    finally:
        numba.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    x = v.reshape(1, 21, -1).numpy()
    consts = np.array([0.5, lat._alpha], dtype=np.float32)
    empty = np.empty(0, dtype=np.float32)
    res = [np.empty_like(x), np.empty_like(x)]
    for kernel, r in zip((nb.filter_values, nb.filter_values_serial), res):
        kernel(x, lat._bary(torch.float32), lat._offsets, lat._nbr, False, consts, 4, r, empty, empty, False)
    assert np.array_equal(res[0], res[1])
    assert np.array_equal(res[0], outs[0].reshape(1, 21, -1).numpy())


def test_parallel_build_numbers_vertices_as_the_sequential_insert():
    """The chunked parallel hash insert (per-chunk tables merged in chunk order) gives exactly the
    sequential first-appearance numbering: same offsets, keys, neighbours for 1, 2 and 3 threads."""
    if "numba" not in BACKENDS:
        pytest.skip("numba not available")
    import numba

    from crfrnn.lattice import _numba_kernels as nb

    _, img, _ = scene_pairs(count=1, start=4)[0]
    im = torch.from_numpy(crop(img, 200, 240).copy()).permute(2, 0, 1).float()
    feats = grid_features(im, 15.0, 11.0)  # (1, 5, 200, 240): 48000 points, several chunks
    d = feats.shape[1]
    pts = np.ascontiguousarray(feats[0].reshape(d, -1).T.double().numpy())
    from crfrnn.lattice.permutohedral import _scale_factors

    keys = np.empty((pts.shape[0], d + 1, d), dtype=np.int32)
    bary = np.empty((pts.shape[0], d + 1), dtype=np.float64)
    nb.elevate(pts, _scale_factors(d).numpy(), keys, bary)
    flat = keys.reshape(-1, d)
    ref_off = np.empty(flat.shape[0], dtype=np.int32)
    ref_keys, _ = nb._insert_range(flat, 0, flat.shape[0], ref_off, 5, d + 1, np.empty(0, dtype=np.int64))
    # independent check of the numbering: vertex v is the v-th distinct key in order of appearance
    _, first = np.unique(flat, axis=0, return_index=True)
    np.testing.assert_array_equal(ref_keys, flat[np.sort(first)])
    for chunks in (2, 3, 5):
        off = np.empty_like(ref_off)
        vkeys, table = nb.insert(flat, off, 5, d + 1, chunks)
        np.testing.assert_array_equal(off, ref_off)
        np.testing.assert_array_equal(vkeys, ref_keys)
    before = numba.get_num_threads()
    try:
        lats = []
        for nt in sorted({1, before}):
            numba.set_num_threads(nt)
            lats.append(PermutohedralLattice(feats, backend="numba"))
    finally:
        numba.set_num_threads(before)
    for lat in lats[1:]:
        assert np.array_equal(lat._offsets, lats[0]._offsets) and np.array_equal(lat._nbr, lats[0]._nbr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_channel_kernel_equals_general_kernel(dtype):
    """C = 1 (normalisers) takes a scalar compiled kernel: bit-identical to the general one, with scales,
    accumulation and the reverse order."""
    if "numba" not in BACKENDS:
        pytest.skip("numba not available")
    from crfrnn.lattice import _numba_kernels as nb

    g = torch.Generator().manual_seed(0)
    lat = PermutohedralLattice(torch.randn(2, 5, 40, 50, dtype=torch.float64, generator=g) * 3, backend="numba")
    v, pre, post = (torch.rand(2, 1, 40, 50, dtype=dtype, generator=g) for _ in range(3))
    x = v.reshape(2, 1, -1).numpy()
    consts = np.array([0.5, lat._alpha], dtype=x.dtype)
    for reverse in (False, True):
        for accumulate in (False, True):
            ref = np.full_like(x, 0.25)
            got = np.full_like(x, 0.25)
            args = (lat._bary(dtype), lat._offsets, lat._nbr, reverse, consts, 4)
            sc = (pre.reshape(-1).numpy(), post.reshape(-1).numpy(), accumulate)
            nb.filter_values(x, *args, ref, *sc)
            nb.filter_one_channel(x, *args, got, *sc)
            assert np.array_equal(ref, got)
            assert np.abs(ref - 0.25).max() > 0.1
    torch.testing.assert_close(lat.filter(v), torch.from_numpy(
        _general(nb, lat, x, consts)).reshape(v.shape), rtol=0, atol=0)


def _general(nb, lat, x, consts):
    out = np.empty_like(x)
    empty = np.empty(0, dtype=x.dtype)
    nb.filter_values(x, lat._bary(torch.float32 if x.dtype == np.float32 else torch.float64), lat._offsets,
                     lat._nbr, False, consts, 4, out, empty, empty, False)
    return out


def test_numba_build_divides_as_torch_bit_for_bit():
    """The numba build divides the features by the bandwidth point by point (float32 or float64 features, masks,
    per-image bandwidths): the same lattice, bit for bit, as the build from torch's ``features / bandwidth``."""
    from crfrnn.lattice._geometry_grad import divided

    torch.manual_seed(0)
    for B in (1, 3):
        for dtype in (torch.float32, torch.float64):
            f = (torch.rand(B, 5, 30, 20) * 100).to(dtype)
            for bw in (torch.tensor([80.0, 80.0, 13.0, 13.0, 13.0]), torch.rand(B, 5) + 0.5):
                for mask in (None, torch.rand(B, 1, 30, 20) > 0.3):
                    lat = PermutohedralLattice(f, bandwidth=bw, mask=mask, backend="numba")
                    ref = PermutohedralLattice(divided(f, bw), mask=mask, backend="numba")
                    assert lat.num_vertices == ref.num_vertices
                    np.testing.assert_array_equal(lat._offsets, ref._offsets)
                    np.testing.assert_array_equal(lat._nbr, ref._nbr)
                    for w in (torch.float32, torch.float64):
                        np.testing.assert_array_equal(lat._bary(w), ref._bary(w))


@pytest.mark.parametrize("d", [2, 9])
def test_numba_float64_weights_on_request_match_the_torch_build(d):
    """The float64 weights, made on request (fused build, d <= 8) or by the build itself (d = 9), equal the torch
    backend's to rounding, round to the float32 weights the build wrote, and filter float64 values."""
    torch.manual_seed(1)
    f = torch.rand(2, d, 17, 13) * 4
    mask = torch.rand(2, 1, 17, 13) > 0.2
    lat = PermutohedralLattice(f, mask=mask, backend="numba")
    ref = PermutohedralLattice(f, mask=mask, backend="torch")
    w64 = lat._bary(torch.float64)
    assert w64.dtype == np.float64
    np.testing.assert_array_equal(w64.astype(np.float32), lat._bary(torch.float32))
    np.testing.assert_allclose(np.sort(w64.reshape(-1, d + 1), axis=1),
                               np.sort(ref._bary(torch.float64).numpy().reshape(-1, d + 1), axis=1), atol=1e-12)
    v = torch.rand(2, 3, 17, 13, dtype=torch.float64)
    torch.testing.assert_close(lat.filter(v), ref.filter(v), rtol=1e-10, atol=1e-12)


def test_numba_float64_weights_refuse_features_modified_in_place():
    """Filtering float64 values re-reads the features; if they changed in place since the build, a clear error
    (never weights of other features)."""
    f = torch.rand(1, 3, 10, 10)
    lat = PermutohedralLattice(f, backend="numba")
    lat.filter(torch.rand(1, 2, 10, 10))  # float32: the build's own weights
    f.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        lat.filter(torch.rand(1, 2, 10, 10, dtype=torch.float64))


def test_numba_lattice_built_in_inference_mode_filters_float64_values():
    """Inference tensors have no version counter: a lattice built in ``torch.inference_mode`` keeps a copy of
    them for the float64 weights, which then equal those of a lattice built outside it (and later in-place
    edits of the features do not reach them)."""
    f = torch.rand(1, 5, 12, 9) * 3
    bw = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5])
    v = torch.rand(1, 2, 12, 9, dtype=torch.float64)
    want = PermutohedralLattice(f, bandwidth=bw, backend="numba").filter(v)
    with torch.inference_mode():
        fi = f.clone()
        lat = PermutohedralLattice(fi, bandwidth=bw, backend="numba")
        fi.mul_(2.0)
        got = lat.filter(v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
