"""The fused CPU path of mean_field / CrfRnn (no gradient wanted) against its slow twin, the per-kernel
loop that autograd runs, and against the brute-force float64 reference."""
import contextlib

import numba
import numpy as np
import pytest
import torch
from test_meanfield import noisy_unary, reference_mean_field

import crfrnn.meanfield as mf
from crfrnn import CrfRnn, mean_field
from crfrnn.lattice._numba_kernels import (
    _SOFTMAX_ROWS,
    _matvec_row,
    _matvec_rows_add,
    _slice_rows,
    _slice_terms,
    _softmax_row,
    _softmax_rows,
)

from conftest import crop, image_pairs


def _case(source, count=2, h=60, w=80, L=21, seed=0):
    """Crops as float32 tensors: unary (B, L, h, w), image (B, 3, h, w) 0..255, masks (B, h, w)."""
    rng = np.random.default_rng(seed)
    us, ims, masks = [], [], []
    for _, img, mask in image_pairs(source, count=count):
        m = crop(mask, h, w)
        us.append(noisy_unary(m, L, rng))
        ims.append(crop(img, h, w).transpose(2, 0, 1).astype(np.float64))
        masks.append(m)
    return (torch.from_numpy(np.stack(us)).float(), torch.from_numpy(np.stack(ims)).float(), np.stack(masks))


@contextlib.contextmanager
def twin():
    """Within: every call takes the slow twin (the per-kernel loop that autograd differentiates)."""
    real = mf._fusable
    mf._fusable = lambda *a: False
    try:
        yield
    finally:
        mf._fusable = real


def _slow(fn, unary, *args, **kw):
    with twin(), torch.no_grad():
        return fn(unary, *args, **kw)


def _random_layer(L, seed):
    g = torch.Generator().manual_seed(seed)
    layer = CrfRnn(L)
    with torch.no_grad():  # asymmetric, non-Potts weights: the (L, L) matrices act on lattice vertices
        layer.compatibility_matrix.add_(0.3 * torch.randn(L, L, generator=g))
        layer.spatial_ker_weights.add_(0.5 * torch.randn(L, L, generator=g))
        layer.bilateral_ker_weights.add_(0.5 * torch.randn(L, L, generator=g))
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_crfrnn_without_grad_equals_the_autograd_loop(image_source, training):
    unary, image, _ = _case(image_source)
    layer = _random_layer(21, seed=1).train(training)
    with torch.no_grad():
        fast = layer(unary, image)
    slow = _slow(layer, unary, image)
    exact = _slow(layer.double(), unary.double(), image.double()).float()  # the same maths in float64
    layer.float()
    # float32 rounding, summed in another order, is all that differs: the fused path is as far from the
    # float64 twin as the float32 twin is (within a small factor), and close in absolute terms
    err_fast, err_twin = ((x - exact).abs().max().item() for x in (fast, slow))
    assert err_fast <= 4 * err_twin + 1e-6
    assert (fast - slow).abs().max().item() <= 2e-5 * max(1.0, slow.abs().max().item())
    assert fast.argmax(1).eq(slow.argmax(1)).float().mean().item() >= 0.9999
    assert not torch.equal(fast, unary)  # the messages were applied


@pytest.mark.parametrize("weights", ["scalar", "vector"])
def test_mean_field_fused_weights_and_masks(weights):
    unary, image, _ = _case("scene", count=2, h=40, w=56)
    L = unary.shape[1]
    g = torch.Generator().manual_seed(2)
    ws, wb = (2.5, 4.0) if weights == "scalar" else (torch.rand(L, generator=g) * 4, torch.rand(L, generator=g) * 6)
    mask = torch.ones(2, 1, 40, 56, dtype=torch.bool)
    mask[1, :, 25:, :] = False  # the second image padded below
    mask[1, :, :, 40:] = False
    kw = dict(spatial_weight=ws, bilateral_weight=wb, num_iterations=4, valid_mask=mask)
    fast = mean_field(unary, image, **kw)
    slow = _slow(mean_field, unary, image, **kw)
    assert (fast - slow).abs().max().item() <= 2e-5 * slow.abs().max().item()
    pad = ~mask.expand_as(unary)
    assert torch.equal(fast[pad], unary[pad])  # padding comes out as its unary, bit for bit
    # the padded image equals the unpadded one run alone
    alone = mean_field(unary[1:, :, :25, :40].contiguous(), image[1:, :, :25, :40].contiguous(),
                       spatial_weight=ws, bilateral_weight=wb, num_iterations=4)
    assert (fast[1:, :, :25, :40] - alone).abs().max().item() <= 2e-5 * alone.abs().max().item()


def test_fused_matches_the_float64_reference(image_source):
    unary, image, masks = _case(image_source, count=3)
    L = unary.shape[1]
    rng = np.random.default_rng(3)
    compat = -np.eye(L) + 0.1 * rng.normal(size=(L, L))
    agree, changed = [], []
    for b in range(unary.shape[0]):
        ref = reference_mean_field(unary[b].double().numpy(), image[b].double().numpy(), 160.0, 3.0, 3.0,
                                   3.0 * np.eye(L), 5.0 * np.eye(L), compat, 10)
        with torch.no_grad():
            got = mean_field(unary[b:b + 1], image[b:b + 1], compatibility=torch.from_numpy(compat).float(),
                             num_iterations=10)[0].numpy()
        agree.append((got.argmax(0) == ref.argmax(0)).mean())
        changed.append((ref.argmax(0) != unary[b].numpy().argmax(0)).mean())
    assert min(changed) > 0.2, changed  # the CRF moved many labels: agreement is not trivial
    assert min(agree) >= 0.98 and np.mean(agree) >= 0.99, agree


def test_fused_is_bit_identical_for_any_thread_count():
    """The forward, and the training forward's gradients (the hand-written backward)."""
    unary, image, _ = _case("scene")
    layer = _random_layer(21, seed=4).eval()
    before = numba.get_num_threads()
    try:
        outs, grads = [], []
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            with torch.no_grad():
                outs.append(layer(unary, image))
            layer.train().zero_grad()
            u = unary.clone().requires_grad_()
            layer(u, image).square().mean().backward()
            grads.append([u.grad] + [p.grad.clone() for p in layer.parameters()])
            layer.eval()
    finally:
        numba.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_which_calls_take_the_fused_path(monkeypatch):
    unary, image, _ = _case("scene", count=1, h=24, w=32)
    calls = []
    real = mf._fused_loop
    monkeypatch.setattr(mf, "_fused_loop", lambda *a: calls.append(1) or real(*a))
    layer = CrfRnn(21)
    with torch.no_grad():
        layer(unary, image)
    layer(unary, image).sum().backward()  # training: fused, with its own backward
    assert len(calls) == 2 and layer.compatibility_matrix.grad is not None
    mean_field(unary, image, num_iterations=0)  # nothing to run
    mean_field(unary.double(), image.double())  # float64
    CrfRnn(21, untied=True)(unary, image)  # per-iteration weights
    mean_field(unary, image, method="exact")
    mean_field(unary, image, backend="torch")
    theta = torch.tensor(50.0, requires_grad=True)
    mean_field(unary, image, theta_alpha=theta).sum().backward()  # learned widths: the lattice's geometry path
    assert len(calls) == 2 and theta.grad is not None
    with torch.no_grad():
        mean_field(unary, image, theta_alpha=theta)  # no gradient wanted: fused again
    assert len(calls) == 3


def _grads(fn, unary, params, *args, **kw):
    """(output, d unary, d params) of a fixed random loss."""
    u = unary.clone().requires_grad_()
    out = fn(u, *args, **kw)
    # drawn in float32 for every dtype: a float64 draw from the same seed gives other numbers (another loss)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    grads = torch.autograd.grad((out * w).sum() + out.square().mean(), [u, *params])
    return out.detach(), grads


def _close(fast, slow, exact, name):
    """The fused path is as far from the float64 twin as the float32 twin is, within a small factor."""
    err_fast, err_twin = ((x - exact).abs().max().item() for x in (fast, slow))
    scale = exact.abs().max().item()
    assert err_fast <= 4 * err_twin + 1e-6 * scale, (name, err_fast, err_twin, scale)


@pytest.mark.parametrize("untrained", [True, False])
def test_crfrnn_gradients_equal_the_autograd_loop(image_source, untrained):
    unary, image, _ = _case(image_source, count=2, h=48, w=64)
    layer = (CrfRnn(21) if untrained else _random_layer(21, seed=5)).train()
    params = [layer.spatial_ker_weights, layer.bilateral_ker_weights, layer.compatibility_matrix]
    fast = _grads(layer, unary, params, image)
    with twin():
        slow = _grads(layer, unary, params, image)
        layer.double()
        exact = _grads(layer, unary.double(), params, image.double())
        layer.float()
    for i, name in enumerate(["unary", "spatial", "bilateral", "compatibility"]):
        _close(fast[1][i], slow[1][i], exact[1][i].float(), name)
    _close(fast[0], slow[0], exact[0].float(), "output")


@pytest.fixture(scope="module")
def label_work_case():
    """A layer, its inputs and the twin's gradients in float32 and float64 (computed once for the module)."""
    unary, image, _ = _case("voc", count=2, h=48, w=64)
    layer = _random_layer(21, seed=9).train()
    params = list(layer.parameters())
    with twin():
        slow = _grads(layer, unary, params, image)
        layer.double()
        exact = _grads(layer, unary.double(), params, image.double())
        layer.float()
    return unary, image, layer, params, slow, exact


@pytest.mark.parametrize("splat", ["scatter", "ranges", "as chosen"])
@pytest.mark.parametrize("where", ["points", "vertices", "as chosen"])
def test_label_work_on_points_or_vertices_equals_the_autograd_loop(where, splat, label_work_case, monkeypatch):
    """The backward's weight gradients and ``W^T z`` per point, or on the lattice vertices from the forward's
    kept splats (for every term, or for those with few vertices per point: here the spatial term only), with
    the gradient splatted by scatter into private copies or by vertex ranges (as the forward chooses: here the
    spatial term scattered, the bilateral one by ranges), equal the twin's within float32 rounding, with the
    same bits for 1 and 2 threads."""
    import crfrnn.lattice.fused as fused

    limit = {"points": 0.0, "vertices": np.inf}.get(where)
    if limit is not None:
        monkeypatch.setattr(fused, "_VERTEX_LABEL_WORK_PER_POINT", limit)
    if splat != "as chosen":
        monkeypatch.setattr(fused, "_RANGED_PRIVATE_ROWS_PER_POINT", np.inf if splat == "scatter" else 0.0)
    chosen = []
    real_choice = fused.splat_by_ranges

    def spy(*a):
        chosen.append(real_choice(*a))
        return chosen[-1]

    monkeypatch.setattr(fused, "splat_by_ranges", spy)
    kept = []
    real = fused.splat_rows
    monkeypatch.setattr(fused, "splat_rows", lambda *a: kept.append((real(*a)[0] >= 0).tolist()) or real(*a))
    unary, image, layer, params, slow, exact = label_work_case
    before = numba.get_num_threads()
    try:
        fast = []
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            fast.append(_grads(layer, unary, params, image))
    finally:
        numba.set_num_threads(before)
    expect = {"points": [False, False], "vertices": [True, True]}.get(where, [True, False])
    assert kept and all(k == expect for k in kept), kept  # spatial, bilateral
    expect = {"scatter": [False, False], "ranges": [True, True]}.get(splat, [False, True])
    assert len(chosen) == 4 and all(k.tolist() == expect for k in chosen), chosen  # forward and backward, twice
    assert all(torch.equal(x, y) for x, y in zip(fast[0][1], fast[1][1]))
    for i in range(len(params) + 1):
        _close(fast[0][1][i], slow[1][i], exact[1][i].float(), i)


@pytest.mark.parametrize("weights", ["scalar", "vector"])
def test_mean_field_gradients_with_masks_equal_the_twin(weights):
    unary, image, _ = _case("scene", count=2, h=40, w=56)
    L = unary.shape[1]
    g = torch.Generator().manual_seed(8)
    shape = () if weights == "scalar" else (L,)
    ws = (torch.rand(shape, generator=g) * 4).requires_grad_()
    wb = (torch.rand(shape, generator=g) * 6).requires_grad_()
    compat = (-torch.eye(L) + 0.2 * torch.randn(L, L, generator=g)).requires_grad_()
    mask = torch.ones(2, 1, 40, 56, dtype=torch.bool)
    mask[1, :, 25:, :] = False
    kw = dict(valid_mask=mask, num_iterations=5)

    def run(u, ws, wb, compat):
        return mean_field(u, image.to(u.dtype), spatial_weight=ws, bilateral_weight=wb, compatibility=compat, **kw)

    def both(u, ps):
        return _grads(lambda x, *p: run(x, *p), u, ps, *ps)

    fast = both(unary, [ws, wb, compat])
    with twin():
        slow = both(unary, [ws, wb, compat])
        exact = both(unary.double(), [p.detach().double().requires_grad_() for p in (ws, wb, compat)])
    for i in range(4):
        _close(fast[1][i], slow[1][i], exact[1][i].float(), i)
    pad = ~mask[:, 0]
    assert torch.equal(fast[0].permute(1, 0, 2, 3)[:, pad], unary.permute(1, 0, 2, 3)[:, pad])


@pytest.mark.parametrize("c, width", [(21, 24), (64, 8), (7, 16), (30, 40)])
def test_four_rows_of_label_products_equal_float64(c, width):
    """``_matvec_rows_add`` (the backward's ``W^T z`` and ``z^T q`` products, four rows at once) against float64,
    for rows of 1-3 vectors and wider (the generic path); it adds to ``dst`` and touches no other row."""
    @numba.njit
    def apply(dst, src, cols, c):
        for r in range(0, src.shape[0], 4):
            _matvec_rows_add(dst, src, r, cols, c)

    rng = np.random.default_rng(c + width)
    cols = rng.standard_normal((c + 2, width)).astype(np.float32)  # rows past c are not read
    src = rng.standard_normal((8, c + 3)).astype(np.float32)
    before = rng.standard_normal((9, width)).astype(np.float32)  # row 8 is not one of the products
    dst = before.copy()
    apply(dst, src, cols, c)
    ref = before[:8].astype(np.float64) + src[:, :c].astype(np.float64) @ cols[:c].astype(np.float64)
    assert np.allclose(dst[:8], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(dst[8], before[8])


@numba.njit
def _slice_each_term(rows, init, lat, tmp, offsets, bary, tstart, td1, post):
    """The fused pass's slice before ``_slice_terms``: a copy of ``init``, then ``_slice_rows`` term by term."""
    for i in range(rows.shape[0]):
        rows[i, :] = init[i]
        for t in range(td1.shape[0]):
            d1 = td1[t]
            _slice_rows(rows[i], tmp if d1 % 2 == 1 else lat, offsets, bary, tstart[t] + i * d1, d1, post[t, i])


@numba.njit
def _slice_all_terms(rows, init, lat, tmp, offsets, bary, tstart, td1, post):
    for i in range(rows.shape[0]):
        _slice_terms(rows[i], init[i], lat, tmp, offsets, bary, tstart, td1, post, i)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [8, 24, 32, 40])
def test_slice_of_every_term_in_registers_equals_term_by_term_and_float64(width, dtype):
    """``_slice_terms`` (every term's slice of a point summed in registers from the unary on, as the fused pass
    does) gives the bits of ``_slice_rows`` term after term onto a copy of the unary, for rows of 1-4 vectors
    and wider (the generic path), terms of odd and even ``D + 1`` (read from ``tmp`` and ``lat``), and is the
    float64 sum within rounding."""
    rng = np.random.default_rng(width)
    n, m = 50, 30
    td1 = np.array([3, 6, 2], np.int64)  # odd: from tmp; even: from lat
    tstart = np.concatenate([[0], np.cumsum(n * td1)[:-1]]).astype(np.int64)
    offsets = rng.integers(0, m, int(n * td1.sum())).astype(np.int32)
    bary = rng.random(offsets.shape[0]).astype(dtype)
    lat, tmp = (rng.standard_normal((m, width)).astype(dtype) for _ in range(2))
    post = rng.random((td1.shape[0], n)).astype(dtype)
    init = rng.standard_normal((n, width)).astype(dtype)
    one, fused = np.full((n, width), np.nan, dtype), np.full((n, width), np.nan, dtype)
    _slice_each_term(one, init, lat, tmp, offsets, bary, tstart, td1, post)
    _slice_all_terms(fused, init, lat, tmp, offsets, bary, tstart, td1, post)
    assert np.array_equal(one, fused)
    ref = init.astype(np.float64).copy()
    for t, d1 in enumerate(td1):
        src = (tmp if d1 % 2 == 1 else lat).astype(np.float64)
        k = tstart[t] + np.arange(n)[:, None] * d1 + np.arange(d1)
        w = bary[k].astype(np.float64) * post[t][:, None].astype(np.float64)
        ref += np.einsum("nr,nrc->nc", w, src[offsets[k]])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.allclose(fused, ref, rtol=tol, atol=tol * np.abs(ref).max())


@numba.njit
def _softmax_block(rows, c, interleaved):
    """Each row's softmax over its first ``c`` values, four rows at a time where ``interleaved``."""
    r = 0
    while interleaved and r + _SOFTMAX_ROWS <= rows.shape[0]:
        _softmax_rows(rows, r, c)
        r += _SOFTMAX_ROWS
    for rr in range(r, rows.shape[0]):
        _softmax_row(rows[rr], c)


@pytest.mark.parametrize("c, width", [(21, 24), (2, 8), (32, 32), (59, 64)])
def test_interleaved_softmax_rows_equal_one_row_at_a_time_and_float64(c, width):
    """The fused pass's softmax of four rows at once (registers interleaved; rows of more than 32 values go
    one by one) gives the bits of the one-row kernel, sets the padding to 0 and is float64's softmax within
    float32 rounding, including logits whose exponent falls below the kernel's 2^-60 floor."""
    rng = np.random.default_rng(c)
    x = (8 * rng.standard_normal((4 * 5 + 3, width))).astype(np.float32)
    x[0, :c] = 0.0
    x[1, 0] = 200.0  # every other label far below the floor
    one, four = x.copy(), x.copy()
    _softmax_block(one, c, False)
    _softmax_block(four, c, True)
    assert np.array_equal(one, four)
    assert not four[:, c:].any()
    ref = torch.softmax(torch.from_numpy(x[:, :c]).double(), 1)
    floor = 2.0 ** -60 * ref.max(1, keepdim=True).values  # the kernel's floor on exp(x - max)
    assert torch.allclose(torch.from_numpy(four[:, :c]).double(), ref, rtol=4e-6, atol=float(floor.max()) * 2)


@pytest.mark.parametrize("c, width", [(21, 24), (3, 8), (40, 40)])
def test_label_matrix_on_a_vertex_equals_float64(c, width):
    """``_matvec_row`` (a label matrix applied to a blurred vertex, the columns as padded rows) against
    float64, for rows of 1-4 vectors and wider; the padding comes out 0."""
    @numba.njit
    def apply(dst, src, cols, c):
        for i in range(src.shape[0]):
            _matvec_row(dst[i], src[i], cols, c)

    rng = np.random.default_rng(c)
    w = rng.standard_normal((c, c))
    cols = np.zeros((c, width), np.float32)
    cols[:, :c] = w.T
    src = np.zeros((7, width), np.float32)
    src[:, :c] = rng.standard_normal((7, c))
    dst = np.full((7, width), np.nan, np.float32)
    apply(dst, src, cols, c)
    ref = src[:, :c].astype(np.float64) @ w.astype(np.float32).astype(np.float64).T
    assert np.allclose(dst[:, :c], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert not dst[:, c:].any()


def test_fused_pass_names_a_bad_history_or_splats_array():
    """The fused pass's optional work arrays are checked at its boundary: a wrong history shape or dtype, splats
    without a history, splats of the wrong shape, and splats for a term whose ``pres`` are not ones each raise a
    ValueError that names the array and the expected shape."""
    from crfrnn._fused_meanfield import _stacked
    from crfrnn.lattice.fused import fused_mean_field, history_shape, splats_shape

    unary, image, _ = _case("voc", count=1, h=24, w=32)
    L, n = unary.shape[1], unary[0, 0].numel()
    (bil, bw), (spa, bws) = mf._kernel_geometry(image, 160.0, 3.0, 3.0, None)
    kernels = [mf._Kernel(f, s, "permutohedral", "numba", None, torch.float32) for f, s in ((spa, bws), (bil, bw))]
    stacked = _stacked(kernels, torch.tensor(-3.0), torch.tensor(-5.0), L)
    logits = unary[0].reshape(L, n)
    good_history = np.empty(history_shape(2, L, n), np.float32)
    shape = splats_shape(stacked[7], 2, L, n)
    assert shape[1] > 0  # the spatial term's splats are kept on this small image
    wrong = r"history must be float32 of shape \(2, 768, 24\), got float32 \(1, 768, 24\)"
    with pytest.raises(ValueError, match=wrong):
        fused_mean_field(logits, stacked, 2, history=np.empty(history_shape(1, L, n), np.float32))
    with pytest.raises(ValueError, match="history must be float32 .* got float64"):
        fused_mean_field(logits, stacked, 2, history=np.empty(history_shape(2, L, n), np.float64))
    with pytest.raises(ValueError, match="splats are kept only with a history"):
        fused_mean_field(logits, stacked, 2, splats=np.empty(shape, np.float32))
    with pytest.raises(ValueError, match=rf"splats must be float32 of shape \({shape[0]}, {shape[1]}, 24\)"):
        fused_mean_field(logits, stacked, 2, history=good_history, splats=np.empty((2, 1, 24), np.float32))
    scaled = stacked[:8] + (stacked[8] * 2,) + stacked[9:]
    with pytest.raises(ValueError, match="splats are kept only for terms whose pres are ones"):
        fused_mean_field(logits, scaled, 2, history=good_history, splats=np.empty(shape, np.float32))


def test_workspace_lends_an_array_only_when_nothing_else_holds_it():
    import copy
    import pickle
    import weakref

    from crfrnn.lattice import Workspace

    ws = Workspace()
    a = ws.empty("h", (3, 4), np.float32)
    first = id(a)
    del a
    b = ws.empty("h", (3, 4), np.float32)
    assert id(b) == first  # free again: lent again
    for holder in (lambda x: torch.from_numpy(x), lambda x: x[1:], lambda x: x):
        kept = holder(b)
        taken = id(b)
        del b
        b = ws.empty("h", (3, 4), np.float32)
        assert id(b) != taken and not np.shares_memory(b, np.asarray(kept))  # still held elsewhere: a new one
        del kept
    old = weakref.ref(b)
    del b
    assert ws.empty("h", (3, 5), np.float32).shape == (3, 5) and old() is None  # another shape: the old one freed
    assert ws.empty("h", (3, 5), np.float64).dtype == np.float64  # another dtype
    ws.empty("g", (2,), np.float32)
    assert len(ws) == 2 and ws.nbytes() == 3 * 5 * 8 + 2 * 4
    assert len(copy.deepcopy(ws)) == 0 and len(pickle.loads(pickle.dumps(ws))) == 0 and len(ws) == 2
    ws.clear()
    assert len(ws) == 0 and ws.nbytes() == 0


def test_crfrnn_training_steps_reuse_their_history_with_the_same_bits():
    """The layer's second step writes into the first step's history and splats (whatever they hold) and
    gives the bits of a fresh layer; an output still alive keeps its arrays; eval() lets go of them."""
    unary, image, _ = _case("voc", count=1, h=48, w=64)
    layer, fresh = _random_layer(21, seed=3).train(), _random_layer(21, seed=3).train()
    params = [layer.spatial_ker_weights, layer.bilateral_ker_weights, layer.compatibility_matrix]
    want = _grads(fresh, unary, list(fresh.parameters())[:3], image)
    _grads(layer, unary, params, image)
    held = {name: id(a) for name, a in layer._workspace._arrays.items()}
    assert set(held) == {"history", "splats"}
    for a in layer._workspace._arrays.values():
        a.fill(np.nan)  # a reused array's old contents must not reach the result
    del a
    got = _grads(layer, unary, params, image)
    assert {name: id(a) for name, a in layer._workspace._arrays.items()} == held
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[1], want[1]))

    # two forwards before one backward: the second may not write into the first one's history
    other = unary.flip(-1).contiguous()
    want_other = _grads(fresh, other, list(fresh.parameters())[:3], image)
    u1, u2 = unary.clone().requires_grad_(), other.clone().requires_grad_()
    w = torch.randn(unary.shape, generator=torch.Generator().manual_seed(7))  # _grads's loss, twice
    sum((out * w).sum() + out.square().mean() for out in (layer(u1, image), layer(u2, image))).backward()
    assert torch.equal(u1.grad, want[1][0]) and torch.equal(u2.grad, want_other[1][0])

    layer.eval()
    assert len(layer._workspace) == 0
