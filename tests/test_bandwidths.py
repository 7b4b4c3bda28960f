"""Learnable kernel bandwidths: the lattice's gradient w.r.t. features and bandwidths against autograd of the
exact dense filter, mean field with θ tensors, ``CrfRnn(learn_bandwidths=True)``, recovery of known θ."""
import math

import numpy as np
import pytest
import torch

from crfrnn import CrfRnn, PermutohedralLattice, available_backends, mean_field
from crfrnn.lattice import _geometry_grad, dense_gaussian_filter, permutohedral_filter
from crfrnn.lattice._geometry_grad import divided

from conftest import VOC, crop, voc_pairs

BACKENDS = available_backends()
HAVE_VOC = any((VOC / "images").glob("*.jpg")) if (VOC / "images").exists() else False


# ----------------------------------------------------------------------------- data
def synthetic_scene(h, w, seed):
    """An RGB image (3, h, w) float64 in 0..255 of a few overlapping shapes with noise, and its labels (h, w)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    labels = torch.zeros(h, w, dtype=torch.int64)
    colours = torch.rand(5, 3, generator=g, dtype=torch.float64) * 255
    for k in range(1, 5):
        cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
        ry, rx = (0.15 + 0.3 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        inside = ((yy - cy) / (ry * h)) ** 2 + ((xx - cx) / (rx * w)) ** 2 <= 1
        labels[inside] = k
    img = colours[labels].permute(2, 0, 1) + 12 * torch.randn(3, h, w, generator=g, dtype=torch.float64)
    return img.clamp(0, 255), labels


def scenes(source, count, h, w, start=0):
    """``count`` (image (3, h, w) float64, labels (h, w) int64) pairs: central VOC crops (of the sample's images
    from ``start`` on, sorted) or synthetic scenes."""
    if source == "synthetic":
        return [synthetic_scene(h, w, seed) for seed in range(count)]
    out = []
    for _, img, mask in voc_pairs(count=count, start=start):
        lab = torch.from_numpy(crop(mask, h, w).astype(np.int64))
        lab[lab == 255] = 0
        out.append((torch.from_numpy(crop(img, h, w).copy()).permute(2, 0, 1).double(), lab))
    return out


SOURCES = ["synthetic", pytest.param("voc", marks=pytest.mark.skipif(not HAVE_VOC, reason="VOC sample not found"))]
SOURCE = "voc" if HAVE_VOC else "synthetic"  # the default tests: real images where present


def positions(h, w, dtype=torch.float64):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([yy, xx])


def soft_labels(labels, L, gen, noise=1.0):
    """(1, L, h, w) label probabilities: softmax of a noisy one-hot map."""
    onehot = torch.nn.functional.one_hot(labels % L, L).permute(2, 0, 1).double()
    return torch.softmax(2.0 * onehot + noise * torch.randn(onehot.shape, generator=gen, dtype=torch.float64), 0)[None]


def agreement(exact, approx):
    e, a = exact.flatten(), approx.flatten()
    cos = float(torch.nn.functional.cosine_similarity(e, a, 0))
    rel = float((a - e).norm() / e.norm())
    sign = float((e.sign() == a.sign()).double().mean())
    return cos, rel, sign


# ----------------------------------------------------------------------------- the formula, with the exact kernel
@pytest.fixture
def exact_lattice(monkeypatch):
    """Swap the lattice's filter for the exact dense Gaussian filter: the gradient code then differentiates
    the ideal filter, so it must equal autograd of ``dense_gaussian_filter`` to rounding."""

    def filter_scaled(self, values, *, reverse=False, pre=None, post=None, out=None):
        feats, bw, valid = self._exact
        v = values if pre is None else values * pre
        if valid is not None:
            v = v * valid
        res = dense_gaussian_filter(v, divided(feats, bw).to(v.dtype))
        if valid is not None:
            res = res * valid
        return res if post is None else res * post

    orig_init = PermutohedralLattice.__init__

    def init(self, features, *, backend=None, mask=None, bandwidth=None, **kw):
        orig_init(self, features, backend=backend, mask=mask, bandwidth=bandwidth, **kw)
        bw = None if bandwidth is None else torch.as_tensor(bandwidth, dtype=torch.float64).detach()
        bw = None if bw is None else (bw.expand(1, self.dim) if bw.dim() == 0 else bw.reshape(-1, self.dim))
        self._exact = (features.detach(), bw, None if mask is None else (mask != 0).to(torch.float64))

    monkeypatch.setattr(PermutohedralLattice, "filter_scaled", filter_scaled)
    monkeypatch.setattr(PermutohedralLattice, "__init__", init)


def _grads(fn, *inputs):
    out = fn(*inputs)
    w = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * w).sum() + (out ** 2).sum(), inputs)


def _lattice_and_exact(mask, reverse, **lattice_kw):
    """``(v, f, b, *scales) ->`` the lattice filter and its exact dense twin: ``post * F(pre * v)`` with
    scales, else ``F v`` (``F^T`` if ``reverse``), normalised by the filtered mask when there is one."""

    def lattice_fn(v, f, b, *scales):
        lat = PermutohedralLattice(f, mask=mask, bandwidth=b, **lattice_kw)
        if scales:
            return lat._filter_diff(v, pre=scales[0], post=scales[1])
        out = lat.filter(v, reverse=reverse)
        return out if mask is None else out / lat.filter(mask.to(v.dtype)).clamp_min(1e-300) * mask

    def dense_fn(v, f, b, *scales):
        extra = (1,) * (v.dim() - 2)
        bshape = b.shape + extra if b.dim() == 2 else (1, -1) + extra
        vv = v if not scales else v * scales[0]
        if mask is not None:
            vv = vv * mask
        out = dense_gaussian_filter(vv, f / b.reshape(bshape))
        if scales:
            return out * scales[1]
        if mask is None:
            return out
        return out / dense_gaussian_filter(mask.to(v.dtype), f / b.reshape(bshape)).clamp_min(1e-300) * mask

    return lattice_fn, dense_fn


# the gradient's filter passes: several channel groups per pass (small C), or one group per pass with f^d folded
# into the pass's input scale (C >= 13, CRF-RNN's 21 labels); _PASS_CHANNELS = 1 forces the second for C = 3
PASSES = pytest.mark.parametrize("pass_channels", [None, 1], ids=["grouped", "one-group-per-pass"])


@PASSES
@pytest.mark.parametrize("case", ["2d", "3d-batch", "masked", "reverse", "scales"])
def test_formula_equals_autograd_of_the_exact_filter(exact_lattice, monkeypatch, case, pass_channels):
    if pass_channels is not None:
        monkeypatch.setattr(_geometry_grad, "_PASS_CHANNELS", pass_channels)
    g = torch.Generator().manual_seed(1)
    spatial = (2, 4, 5) if case == "3d-batch" else (6, 7)
    B = 2 if case == "3d-batch" else 1
    D = 4
    feats = (torch.randn((B, D) + spatial, generator=g, dtype=torch.float64) * 2).requires_grad_()
    bw = (0.5 + torch.rand((B, D) if case == "3d-batch" else (D,), generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn((B, 3) + spatial, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if case == "masked":
        mask = torch.ones((B, 1) + spatial, dtype=torch.bool)
        mask[..., :2, :] = False
    pre = post = None
    if case == "scales":
        pre = torch.rand((B, 1) + spatial, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
        post = torch.rand((B, 1) + spatial, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    inputs = (v, feats, bw) + (() if pre is None else (pre, post))

    lattice_fn, dense_fn = _lattice_and_exact(mask, case == "reverse")

    got = _grads(lattice_fn, *inputs)
    want = _grads(dense_fn, *inputs)
    for name, a, b in zip(["values", "features", "bandwidth", "pre", "post"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient w.r.t. {name}")


@PASSES
@pytest.mark.parametrize("case", ["2d", "3d-batch", "masked", "reverse", "scales"])
def test_fine_mode_formula_equals_autograd_of_the_exact_filter(exact_lattice, monkeypatch, case, pass_channels):
    """``geometry_grad="fine"`` with the exact kernel as its moment lattice: its centred moments plus the
    lattice's mean moment are then the exact moments, so the bandwidth gradient is autograd's."""
    if pass_channels is not None:
        monkeypatch.setattr(_geometry_grad, "_PASS_CHANNELS", pass_channels)
    monkeypatch.setattr(PermutohedralLattice, "_moment_lattice", lambda self: self)
    g = torch.Generator().manual_seed(11)
    spatial = (2, 4, 5) if case == "3d-batch" else (6, 7)
    B = 2 if case == "3d-batch" else 1
    feats = torch.randn((B, 4) + spatial, generator=g, dtype=torch.float64) * 2
    bw = (0.5 + torch.rand((B, 4) if case == "3d-batch" else (4,), generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.randn((B, 3) + spatial, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if case == "masked":
        mask = torch.ones((B, 1) + spatial, dtype=torch.bool)
        mask[..., :2, :] = False
    scales = ()
    if case == "scales":
        scales = tuple(torch.rand((B, 1) + spatial, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
                       for _ in range(2))

    fine, exact = _lattice_and_exact(mask, case == "reverse", geometry_grad="fine")

    def lattice_fn(v, b, *sc):
        return fine(v, feats, b, *sc)

    def dense_fn(v, b, *sc):
        return exact(v, feats, b, *sc)

    inputs = (v, bw) + scales
    for name, a, b in zip(["values", "bandwidth", "pre", "post"], _grads(lattice_fn, *inputs), _grads(dense_fn, *inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient w.r.t. {name}")


def test_fine_moment_lattice_kernel_is_closer_to_the_gaussian():
    """The fine lattice's kernel, measured on a dense random 2-D cloud: unit variance per dimension (the
    design: 3/4 per blur round, 1/4 from splat + slice, features x 2.5, 8 rounds) and a fourth moment
    ``E r^4 / (E r^2)^2`` less than half as far from the Gaussian's 2 as the official lattice's (measured
    1.93 and 1.77: the official kernel has a flat top and a cut tail)."""
    g = torch.Generator().manual_seed(12)
    D, N, S = 2, 20000, 16
    pts = torch.cat([torch.randn(S, D, generator=g, dtype=torch.float64) * 0.5,
                     (torch.rand(N, D, generator=g, dtype=torch.float64) * 2 - 1) * 6.0])
    f = pts.T.reshape(1, D, -1, 1).contiguous()
    v = torch.zeros(1, S, S + N, 1, dtype=torch.float64)
    v[0, torch.arange(S), torch.arange(S)] = 1
    delta = pts[None, S:] - pts[:S, None]  # (S, N, D)
    r2 = (delta ** 2).sum(-1)
    stats = {}
    for mode in ("lattice", "fine"):
        lat = PermutohedralLattice(f, bandwidth=torch.ones(D, dtype=torch.float64, requires_grad=True))
        op = lat if mode == "lattice" else lat._moment_lattice()
        k = op.filter_scaled(v, reverse=True)[0, :, S:, 0]
        m2 = (k[..., None] * delta ** 2).sum(1) / k.sum(1)[:, None]
        kurt = ((k * r2 ** 2).sum(1) / k.sum(1)) / m2.sum(1) ** 2
        stats[mode] = (m2.mean(0), float(kurt.mean()))
    torch.testing.assert_close(stats["fine"][0], torch.ones(D, dtype=torch.float64), rtol=0.05, atol=0)
    assert abs(stats["fine"][1] - 2.0) < 0.5 * abs(stats["lattice"][1] - 2.0), stats


# ----------------------------------------------------------------------------- the lattice against the exact filter
def _theta_gradients(image, labels, kernel, thetas, L, gen, backends, geometry_grad="lattice"):
    """dL/dθ and dL/d(features) of one random loss for the exact dense filter (autograd) and the lattice on
    each backend. The loss is L = <g, z> for the normalised filter z of noisy label probabilities v, with
    g = z_exact - t, t another noisy label map: the upstream gradient of |z - t|^2 / 2, the same for both,
    so that the comparison measures the backward pass alone (the forward differs by the lattice's error)."""
    h, w = labels.shape
    base = positions(h, w)[None] if kernel == "spatial" else torch.cat([positions(h, w), image])[None]
    v = soft_labels(labels, L, gen)
    target = soft_labels(torch.roll(labels, 3, 1), L, gen, noise=2.0)
    S = 2

    def run(filter_fn, g=None):
        th = [torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in thetas]
        bw = th[0].expand(S) if kernel == "spatial" else torch.cat([th[0].expand(S), th[1].expand(3)])
        f = base.clone().requires_grad_()
        z = filter_fn(f, bw)
        g = (z - target).detach() if g is None else g
        grads = torch.autograd.grad((z * g).sum(), th + [f])
        return torch.stack(grads[:-1]), grads[-1], g

    exact = run(lambda f, bw: dense_gaussian_filter(v, f / bw.view(1, -1, 1, 1), normalize=True))
    lattice = {b: run(lambda f, bw: permutohedral_filter(v, f, normalize=True, backend=b, bandwidth=bw,
                                                         geometry_grad=geometry_grad), exact[2])[:2]
               for b in backends}
    return exact[:2], lattice


def _check_against_exact(source, size, thetas, losses, cos_min, rel_max, sign_min, geometry_grad="lattice",
                         backends=BACKENDS):
    """dL/dθ of the lattice vs autograd of the exact filter over ``losses`` random losses, for the bilateral
    (D = 5: θα, θβ) and the spatial (D = 2: θγ) kernel, on both backends: cosine, relative L2 error and
    sign agreement of the stacked gradients; per-pixel feature gradients by their median cosine."""
    h, w = size
    imgs = scenes(source, 3, h, w)
    gen = torch.Generator().manual_seed(7)
    for kernel, th in zip(("bilateral", "spatial"), thetas):
        exact_t, lat_t = [], {b: [] for b in backends}
        cos_f = {b: [] for b in backends}
        for i in range(losses):
            img, lab = imgs[i % len(imgs)]
            exact, lattice = _theta_gradients(img, lab, kernel, th, 4, gen, backends, geometry_grad)
            exact_t.append(exact[0])
            for b, (gt, gf) in lattice.items():
                lat_t[b].append(gt)
                cos_f[b].append(agreement(exact[1], gf)[0])
        for b in backends:
            cos, rel, sign = agreement(torch.cat(exact_t), torch.cat(lat_t[b]))
            msg = (f"{source} {size} {kernel} θ={th} {b} {geometry_grad}: cosine {cos:.3f}, relative L2 {rel:.3f}, "
                   f"signs {sign:.2f}")
            assert cos >= cos_min and rel <= rel_max and sign >= sign_min, msg
            assert float(np.median(cos_f[b])) >= 0.9, f"{msg}; feature-gradient cosines {np.round(cos_f[b], 3)}"


# The issue asks for cosine >= 0.97, relative L2 <= 10 % and signs >= 95 %. The lattice-evaluated gradient
# points the right way (cosine 0.97-1.0 at these θ) but its size is off by -15..+20 % depending on θ and the
# image: the lattice's kernel has a flat top and a cut tail (its 4th moment is below the Gaussian's, where
# dk/dθ ~ |f_i - f_j|^2 k puts its weight), and on the sparse bilateral lattice the blur is cut short where no
# point lies (docs/bandwidths.md, Accuracy). The thresholds below are what it achieves; geometry_grad="fine"
# (moment terms on a finer, untruncated lattice) meets the issue's bar (the slow tests further down).
def test_bandwidth_gradient_matches_exact_filter():
    _check_against_exact(SOURCE, (30, 40), [(20.0, 13.0), (1.5,)], losses=20, cos_min=0.95, rel_max=0.4, sign_min=0.8)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_bandwidth_gradient_matches_exact_filter_60x80(source):
    _check_against_exact(source, (60, 80), [(40.0, 10.0), (3.0,)], losses=20, cos_min=0.97, rel_max=0.4, sign_min=0.85)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("size", [(30, 40), (60, 80)], ids=["30x40", "60x80"])
def test_fine_bandwidth_gradient_against_the_issue_bar(source, size):
    # The issue's bar: cosine >= 0.97, relative L2 <= 10 %, signs >= 95 %
    thetas = [(20.0, 13.0), (1.5,)] if size == (30, 40) else [(40.0, 10.0), (3.0,)]
    # one backend: the fine lattice is the torch backend's either way, and the backends agree (test below)
    _check_against_exact(source, size, thetas, losses=20, cos_min=0.97, rel_max=0.10, sign_min=0.95,
                         geometry_grad="fine", backends=BACKENDS[:1])


def test_geometry_grad_is_checked_and_leaves_the_forward_alone():
    g = torch.Generator().manual_seed(13)
    f = torch.randn(1, 3, 6, 7, generator=g, dtype=torch.float64)
    v = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"geometry_grad must be one of \('lattice', 'fine'\), got 'exact'"):
        PermutohedralLattice(f, geometry_grad="exact")
    bw = torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    outs = [permutohedral_filter(v, f, normalize=True, bandwidth=bw, geometry_grad=m) for m in ("lattice", "fine")]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    grads = [torch.autograd.grad(o.square().sum(), [bw])[0] for o in outs]
    assert torch.isfinite(grads[1]).all() and not torch.equal(grads[0], grads[1])  # its own moment terms


# ----------------------------------------------------------------------------- opt-in, paths, backends
def test_value_only_path_keeps_nothing_and_saves_nothing():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 3, 6, 7, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    for lat in (PermutohedralLattice(f), PermutohedralLattice(f, bandwidth=torch.tensor([1.0, 2.0, 3.0]))):
        assert lat._geometry is None and lat._diff_features is None and lat._diff_bandwidth is None
        out = lat.filter(v)
        assert out.grad_fn.saved_tensors == ()  # nothing per pixel kept for the backward pass
    lat = PermutohedralLattice(f, bandwidth=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True))
    assert lat._geometry is not None and lat._diff_bandwidth is not None
    # with a constant bandwidth the filter is the lattice of the divided features, bit for bit
    bw = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    divided_first = PermutohedralLattice(f / bw.view(1, -1, 1, 1)).filter(v)
    torch.testing.assert_close(PermutohedralLattice(f, bandwidth=bw).filter(v), divided_first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bandwidth_only_gradient_equals_the_full_feature_path(backend):
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64) * 3
    v = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    bw0 = 0.5 + torch.rand(4, generator=g, dtype=torch.float64)
    grads = []
    for with_features in (False, True):
        bw = bw0.clone().requires_grad_()
        ff = f.clone().requires_grad_(with_features)
        out = permutohedral_filter(v, ff, normalize=True, backend=backend, bandwidth=bw)
        grads.append(torch.autograd.grad((out * w).sum(), [bw])[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def _all_grads(backend, device, dtype=torch.float64, geometry_grad="lattice"):
    g = torch.Generator().manual_seed(3)
    f = (torch.randn(2, 3, 2, 5, 6, generator=g, dtype=dtype) * 2).to(device).requires_grad_()
    bw = (0.5 + torch.rand(2, 3, generator=g, dtype=dtype)).to(device).requires_grad_()
    v = torch.rand(2, 4, 2, 5, 6, generator=g, dtype=dtype).to(device).requires_grad_()
    mask = torch.ones(2, 1, 2, 5, 6, dtype=torch.bool)
    mask[1, :, :, :2] = False
    mask = mask.to(device)
    w = torch.randn(2, 4, 2, 5, 6, generator=g, dtype=dtype).to(device)
    lat = PermutohedralLattice(f, backend=backend, mask=mask, bandwidth=bw, geometry_grad=geometry_grad)
    out = lat.filter(v) / lat.filter(mask.to(dtype)).clamp_min(1e-12)
    return [t.cpu() for t in torch.autograd.grad((out * w).sum(), [v, f, bw])]


@pytest.mark.parametrize("geometry_grad", ["lattice", "fine"])
def test_backends_and_devices_give_the_same_gradients(geometry_grad):
    """3-D volumes, a per-image (B, D) bandwidth and a mask: every backend on every device the same."""
    ref = _all_grads("torch", "cpu", geometry_grad=geometry_grad)
    cuda = [("torch", "cuda")] if torch.cuda.is_available() else []  # every device present
    runs = [(b, "cpu") for b in BACKENDS if b != "torch"] + cuda
    for backend, device in runs:
        got = _all_grads(backend, device, geometry_grad=geometry_grad)
        for name, a, b in zip(["values", "features", "bandwidth"], got, ref):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"{backend} on {device}: {name}")
    assert ref[1][1, :, :, :2].abs().max() == 0  # left-out points get no feature gradient


def test_double_backward_through_the_feature_gradient_raises():
    f = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    bw = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.rand(1, 2, 5, 6, dtype=torch.float64)
    (gb,) = torch.autograd.grad(permutohedral_filter(v, f, bandwidth=bw).square().sum(), [bw], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gb.sum().backward()


# ----------------------------------------------------------------------------- mean field
def _thetas(ta=6.0, tb=(20.0, 30.0, 25.0), tg=1.5, dtype=torch.float64):
    return [torch.tensor(ta, dtype=dtype, requires_grad=True), torch.tensor(tb, dtype=dtype, requires_grad=True),
            torch.tensor([tg], dtype=dtype, requires_grad=True)]


def test_exact_twin_gradcheck_theta_2d_and_3d_with_spacing_and_mask():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64)
    im = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64) * 255

    def mf2(ta, tb, tg):
        return mean_field(u, im, theta_alpha=ta, theta_beta=tb, theta_gamma=tg, num_iterations=3, method="exact")

    assert torch.autograd.gradcheck(mf2, tuple(_thetas()))
    u3 = torch.randn(1, 2, 2, 3, 4, generator=g, dtype=torch.float64)
    im3 = torch.rand(1, 1, 2, 3, 4, generator=g, dtype=torch.float64) * 100
    vm = torch.ones(1, 1, 2, 3, 4, dtype=torch.bool)
    vm[..., 0, :] = False

    def mf3(ta, tb, tg):
        return mean_field(u3, im3, theta_alpha=ta, theta_beta=tb, theta_gamma=tg, num_iterations=2, method="exact",
                          spacing=(2.0, 1.0, 0.5), valid_mask=vm)

    assert torch.autograd.gradcheck(mf3, tuple(_thetas(3.0, 40.0, 1.2)))


def _mf_theta_grads(u, im, target, method, thetas, **kw):
    th = [t.detach().clone().requires_grad_() for t in thetas]
    out = mean_field(u, im, theta_alpha=th[0], theta_beta=th[1], theta_gamma=th[2], num_iterations=5, method=method,
                     **kw)
    loss = ((torch.softmax(out, 1) - target) ** 2).sum()
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, th)]), out


@pytest.mark.parametrize("case", ["2d", "3d-spacing"])
def test_mean_field_theta_gradient_close_to_exact_twin(case):
    gen = torch.Generator().manual_seed(5)
    if case == "2d":
        img, lab = synthetic_scene(24, 30, seed=11)
        im, lab = img[None], lab[None]
        kw, thetas = {}, _thetas(8.0, (20.0, 30.0, 25.0), 1.5)
    else:
        img, lab = synthetic_scene(10, 12, seed=12)
        im = torch.stack([img[0], img[0].roll(1, 1), img[0].roll(2, 1)])[None, None]  # (1, 1, 3, 10, 12)
        lab = torch.stack([lab, lab.roll(1, 1), lab.roll(2, 1)], 0)[None]
        kw, thetas = {"spacing": (2.0, 1.0, 1.0)}, _thetas(4.0, 25.0, 1.2)
    L = 3
    onehot = torch.nn.functional.one_hot(lab % L, L).movedim(-1, 1).double()
    u = 0.5 * onehot + torch.randn(onehot.shape, generator=gen, dtype=torch.float64)
    kw.update(spatial_weight=1.0, bilateral_weight=2.0)  # unsaturated: the output depends on θ visibly
    # an informative loss: the distance to the exact twin's output at other θ (a random target would make
    # dL/dθ a small sum of large cancelling terms, for the exact twin as well)
    exact, lattice = [], {b: [] for b in BACKENDS}
    for factor in ([1.6, 0.7, 1.4], [0.6, 1.5, 0.7]):
        other = [t.detach() * f for t, f in zip(thetas, factor)]
        with torch.no_grad():
            target = torch.softmax(mean_field(u, im, theta_alpha=other[0], theta_beta=other[1], theta_gamma=other[2],
                                              num_iterations=5, method="exact", **kw), 1)
        exact.append(_mf_theta_grads(u, im, target, "exact", thetas, **kw)[0])
        for backend in BACKENDS:
            lattice[backend].append(_mf_theta_grads(u, im, target, "permutohedral", thetas, backend=backend, **kw)[0])
    for backend in BACKENDS:
        cos, rel, sign = agreement(torch.cat(exact), torch.cat(lattice[backend]))
        assert cos >= 0.9 and sign >= 0.8, (case, backend, exact, lattice[backend])


def test_padding_is_invisible_to_theta_gradients():
    gen = torch.Generator().manual_seed(6)
    img, lab = synthetic_scene(20, 24, seed=3)
    u = 2 * torch.nn.functional.one_hot(lab % 3, 3).permute(2, 0, 1).double()[None]
    u = u + torch.randn(u.shape, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(u.shape, generator=gen, dtype=torch.float64), 1)
    thetas = _thetas(8.0, 20.0, 1.5)
    ref, _ = _mf_theta_grads(u, img[None], target, "permutohedral", thetas)
    up = torch.randn(1, 3, 25, 31, generator=gen, dtype=torch.float64)
    imp = torch.rand(1, 3, 25, 31, generator=gen, dtype=torch.float64) * 255
    tp = torch.softmax(torch.randn(1, 3, 25, 31, generator=gen, dtype=torch.float64), 1)
    up[..., 3:23, 4:28], imp[..., 3:23, 4:28], tp[..., 3:23, 4:28] = u, img, target
    vm = torch.zeros(1, 1, 25, 31, dtype=torch.bool)
    vm[..., 3:23, 4:28] = True
    # the loss sees the padded outputs too: they are the unary there, independent of θ
    got, _ = _mf_theta_grads(up, imp, tp, "permutohedral", thetas, valid_mask=vm)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- the module
def test_crfrnn_learn_bandwidths_parameters_and_forward(lattice_builds):
    g = torch.Generator().manual_seed(8)
    m = CrfRnn(3, theta_alpha=20.0, theta_beta=(10.0, 12.0, 14.0), theta_gamma=2.0, learn_bandwidths=True)
    names = dict(m.named_parameters())
    assert names["log_theta_alpha"].shape == () and names["log_theta_beta"].shape == (3,)
    assert math.isclose(m.theta_alpha, 20.0, rel_tol=1e-6) and m.theta_beta == pytest.approx((10.0, 12.0, 14.0))
    u = torch.randn(2, 3, 9, 11, generator=g)
    im = torch.rand(2, 3, 9, 11, generator=g) * 255
    out = m(u, im)
    fixed = CrfRnn(3, theta_alpha=20.0, theta_beta=(10.0, 12.0, 14.0), theta_gamma=2.0)
    torch.testing.assert_close(out, fixed(u, im), rtol=1e-5, atol=1e-5)
    builds = len(lattice_builds)
    assert builds == 4  # two forwards, two lattices each
    out.square().mean().backward()
    assert len(lattice_builds) == builds  # the backward pass, θ included, reuses the lattices
    for n in ("log_theta_alpha", "log_theta_beta", "log_theta_gamma"):
        assert names[n].grad is not None and torch.isfinite(names[n].grad).all() and names[n].grad.abs().sum() > 0, n
    with torch.no_grad():  # log-parameterised: any real value is a valid (positive) θ
        names["log_theta_gamma"].fill_(-3.0)
    assert m.theta_gamma == pytest.approx(math.exp(-3.0))
    m(u, im)
    assert set(CrfRnn(3).state_dict()) | {"log_theta_alpha", "log_theta_beta", "log_theta_gamma"} == set(m.state_dict())
    assert "learn_bandwidths=True" in repr(m)


# ----------------------------------------------------------------------------- recovery
def _recovery_case(source, size):
    if source == "voc":
        pairs = scenes("voc", 2, *size)
    else:
        pairs = [synthetic_scene(*size, seed=s) for s in (21, 22)]
    gen = torch.Generator().manual_seed(9)
    im = torch.stack([p[0] for p in pairs]).float()
    lab = torch.stack([p[1] for p in pairs])
    L = 4
    onehot = torch.nn.functional.one_hot(lab % L, L).permute(0, 3, 1, 2).float()
    u = 1.5 * onehot + 1.5 * torch.randn(onehot.shape, generator=gen)
    return u, im


def _recover(u, im, truth, start, steps, lr, final_lr):
    """Adam on log θ alone, learning rate decaying geometrically to ``final_lr``; returns the final θ.
    A short second-moment memory (β2 = 0.9): the large gradients of the first steps would otherwise shrink
    the late steps of the flatter widths (θγ) for the rest of the run."""
    kw = dict(spatial_weight=3.0, bilateral_weight=5.0, num_iterations=5)
    with torch.no_grad():
        out = mean_field(u, im, theta_alpha=truth[0], theta_beta=truth[1], theta_gamma=truth[2], **kw)
        target = torch.softmax(out, 1)
    logs = torch.tensor([math.log(s) for s in start], requires_grad=True)
    opt = torch.optim.Adam([logs], lr=lr, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, (final_lr / lr) ** (1 / steps))
    for _ in range(steps):
        th = logs.exp()
        out = mean_field(u, im, theta_alpha=th[0], theta_beta=th[1], theta_gamma=th[2], **kw)
        loss = ((torch.softmax(out, 1) - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return logs.detach().exp().tolist()


def _check_recovery(source, size, truth, factor, steps, lr, final_lr):
    u, im = _recovery_case(source, size)
    got = _recover(u, im, truth, [t * factor for t in truth], steps, lr, final_lr)
    for name, t, g in zip(("theta_alpha", "theta_beta", "theta_gamma"), truth, got):
        assert abs(g / t - 1) <= 0.25, f"{name}: {g:.3g} vs truth {t} (start {t * factor:.3g}); all {got}"


@pytest.mark.parametrize("factor", [3.0, 1 / 3.0], ids=["3x-too-large", "3x-too-small"])
def test_training_theta_alone_recovers_the_truth(factor):
    # θα scaled to the 48x64 crops (a kernel wider than the crop barely depends on θα)
    _check_recovery(SOURCE, (48, 64), (20.0, 10.0, 3.0), factor, steps=60, lr=0.15, final_lr=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("factor", [3.0, 1 / 3.0], ids=["3x-too-large", "3x-too-small"])
def test_training_theta_alone_recovers_the_truth_large(source, factor):
    _check_recovery(source, (150, 200), (40.0, 10.0, 3.0), factor, steps=100, lr=0.1, final_lr=0.01)


# ----------------------------------------------------------------------------- bad input
def test_bad_theta_tensors_are_named():
    u = torch.randn(1, 3, 8, 9)
    im = torch.rand(1, 3, 8, 9) * 255

    def err(exc, match, **kw):
        with pytest.raises(exc, match=match):
            mean_field(u, im, **kw)

    err(ValueError, r"theta_alpha must be positive and finite, got \[0.0\]", theta_alpha=torch.tensor(0.0))
    err(ValueError, r"theta_beta must be positive and finite, got \[3.0, -1.0, 3.0\]",
        theta_beta=torch.tensor([3.0, -1.0, 3.0]))
    err(ValueError, r"theta_gamma must be positive and finite, got \[nan\]", theta_gamma=torch.tensor([float("nan")]))
    err(ValueError, r"theta_alpha must be a number: a tensor of shape \(\) or \(1,\), got shape \(2,\)",
        theta_alpha=torch.ones(2))
    err(ValueError, r"theta_beta must be a number or one value per image channel \(K=3\).*got shape \(2,\)",
        theta_beta=torch.ones(2))
    err(ValueError, r"theta_gamma must be .*got shape \(1, 1\)", theta_gamma=torch.ones(1, 1))
    err(TypeError, r"theta_alpha must be a number or a floating-point tensor, got shape \(\), dtype torch.int64",
        theta_alpha=torch.tensor(3))
    err(ValueError, r"theta_gamma is on meta but unary is on cpu", theta_gamma=torch.ones((), device="meta"))
    err(ValueError, r"theta_beta must be a number or one value per image channel \(K=3\), got 2 values",
        theta_beta=(3.0, 4.0))
    with pytest.raises(ValueError, match=r"theta_alpha must be positive and finite, got \[-0.0\]"):
        mean_field(u, im, theta_alpha=torch.tensor(-0.0))
    m = CrfRnn(3, learn_bandwidths=True)
    with torch.no_grad():
        m.log_theta_alpha.fill_(float("nan"))  # e.g. a diverged optimiser
    with pytest.raises(ValueError, match=r"theta_alpha must be positive and finite, got \[nan\]"):
        m(u, im)
    f = torch.randn(1, 2, 4, 5)
    with pytest.raises(ValueError, match=r"bandwidth must have shape \(\), \(D,\) = \(2,\) or \(B, D\) = \(1, 2\), "
                                         r"got \(3,\)"):
        PermutohedralLattice(f, bandwidth=torch.ones(3))
    with pytest.raises(ValueError, match=r"bandwidth must be positive and finite"):
        PermutohedralLattice(f, bandwidth=[1.0, float("inf")])
    with pytest.raises(TypeError, match=r"bandwidth must be a floating-point tensor"):
        PermutohedralLattice(f, bandwidth=torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bandwidth is on meta but the features are on cpu"):
        PermutohedralLattice(f, bandwidth=torch.ones(2, device="meta"))

