"""Tests for crfrnn.models (FCN-8s, CrfRnnNet, CrfRnnHead) and crfrnn.weights (published / Keras / VGG loaders)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crfrnn.models import (
    IMAGENET_MEAN_RGB,
    CrfRnnHead,
    CrfRnnNet,
    FCN8s,
    bilinear_upsampling_weights,
    caffe_normalize,
)
from crfrnn.weights import (
    TORCHVISION_VGG16_MEAN,
    TORCHVISION_VGG16_STD,
    crfasrnn_state_dict_shapes,
    fcn8s_from_vgg16,
    load_crfasrnn_keras_weights,
    load_crfasrnn_weights,
)

VGG_NAMES = [
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
]  # fmt: skip
TV_FEATURES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]

# The published crfasrnn_weights.pth layout, written out by hand from sadeepj/crfasrnn_pytorch (fcn8s.py, crfrnn.py).
PUBLISHED = {
    "conv1_1.weight": (64, 3, 3, 3), "conv1_1.bias": (64,),
    "conv1_2.weight": (64, 64, 3, 3), "conv1_2.bias": (64,),
    "conv2_1.weight": (128, 64, 3, 3), "conv2_1.bias": (128,),
    "conv2_2.weight": (128, 128, 3, 3), "conv2_2.bias": (128,),
    "conv3_1.weight": (256, 128, 3, 3), "conv3_1.bias": (256,),
    "conv3_2.weight": (256, 256, 3, 3), "conv3_2.bias": (256,),
    "conv3_3.weight": (256, 256, 3, 3), "conv3_3.bias": (256,),
    "conv4_1.weight": (512, 256, 3, 3), "conv4_1.bias": (512,),
    "conv4_2.weight": (512, 512, 3, 3), "conv4_2.bias": (512,),
    "conv4_3.weight": (512, 512, 3, 3), "conv4_3.bias": (512,),
    "conv5_1.weight": (512, 512, 3, 3), "conv5_1.bias": (512,),
    "conv5_2.weight": (512, 512, 3, 3), "conv5_2.bias": (512,),
    "conv5_3.weight": (512, 512, 3, 3), "conv5_3.bias": (512,),
    "fc6.weight": (4096, 512, 7, 7), "fc6.bias": (4096,),
    "fc7.weight": (4096, 4096, 1, 1), "fc7.bias": (4096,),
    "score_fr.weight": (21, 4096, 1, 1), "score_fr.bias": (21,),
    "score_pool3.weight": (21, 256, 1, 1), "score_pool3.bias": (21,),
    "score_pool4.weight": (21, 512, 1, 1), "score_pool4.bias": (21,),
    "upscore2.weight": (21, 21, 4, 4), "upscore2.bias": (21,),
    "upscore8.weight": (21, 21, 16, 16),
    "upscore_pool4.weight": (21, 21, 4, 4),
    "crfrnn.spatial_ker_weights": (21, 21),
    "crfrnn.bilateral_ker_weights": (21, 21),
    "crfrnn.compatibility_matrix": (21, 21),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def published_sd():
    """Random values in the exact published layout (generated once: ~134 M parameters)."""
    g = torch.Generator().manual_seed(1234)
    return {k: torch.randn(s, generator=g) for k, s in PUBLISHED.items()}


@pytest.fixture(scope="module")
def published_file(published_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "crfasrnn_weights.pth"
    torch.save(published_sd, path)
    return path


def _cheap_sd(shapes):
    """A state dict with the given shapes whose tensors share one scalar storage (tiny files)."""
    one = torch.ones(())
    return {k: one.expand(s) for k, s in shapes.items()}


# ----------------------------------------------------------------------------------------------- normalisation


def test_caffe_normalize_matches_numpy_reference():
    rng = np.random.default_rng(0)
    rgb_hwc = rng.integers(0, 256, size=(2, 7, 9, 3)).astype(np.uint8)
    # The releases' util.get_preprocessed_image: im - mean (RGB), then im[:, :, ::-1] (to BGR), then CHW.
    ref = (rgb_hwc.astype(np.float32) - np.array([123.68, 116.779, 103.939], np.float32))[..., ::-1]
    ref = ref.transpose(0, 3, 1, 2)
    image_u8 = torch.from_numpy(rgb_hwc).permute(0, 3, 1, 2)
    image_f = image_u8.float()
    before = image_f.clone()
    out_f = caffe_normalize(image_f)
    out_u8 = caffe_normalize(image_u8)
    np.testing.assert_allclose(out_f.numpy(), ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out_u8.numpy(), ref, rtol=0, atol=1e-4)
    assert torch.equal(image_f, before)  # caller's tensor untouched
    assert out_f.dtype == torch.float32
    assert caffe_normalize(image_f.double()).dtype == torch.float64
    assert IMAGENET_MEAN_RGB == (123.68, 116.779, 103.939)


def test_caffe_normalize_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 5, 5\)"):
        caffe_normalize(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(3, 5, 5\)"):
        caffe_normalize(torch.zeros(3, 5, 5))
    with pytest.raises(TypeError):
        caffe_normalize(np.zeros((1, 3, 5, 5)))


# ----------------------------------------------------------------------------------------------- bilinear deconv


@pytest.mark.parametrize("k", [4, 16, 3])
def test_bilinear_weights_match_fcn_reference(k):
    # FCN's surgery.upsample_filt, written independently with numpy
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = np.ogrid[:k, :k]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    w = bilinear_upsampling_weights(5, 5, k).numpy()
    assert w.shape == (5, 5, k, k)
    for i in range(5):
        for j in range(5):
            np.testing.assert_allclose(w[i, j], filt if i == j else 0.0, atol=1e-7)


def test_bilinear_deconv_interpolates_linear_ramp():
    # A stride-s deconvolution with the bilinear kernel reproduces a linear function away from the borders.
    s = 8
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 1, 10).expand(1, 1, 10, 10).contiguous()
    w = bilinear_upsampling_weights(1, 1, 2 * s).double()
    y = F.conv_transpose2d(x, w, stride=s)[0, 0]
    inner = y[2 * s : -2 * s, 2 * s : -2 * s]
    d = inner[:, 1:] - inner[:, :-1]
    torch.testing.assert_close(d, torch.full_like(d, 1.0 / s))
    torch.testing.assert_close(inner[:, 1:] - inner[:, :-1], d)
    assert torch.allclose(inner[1:] - inner[:-1], torch.zeros_like(inner[1:]))


# ----------------------------------------------------------------------------------------------- FCN-8s


def test_fcn8s_parameter_layout_equals_published():
    with torch.device("meta"):
        net = CrfRnnNet(21)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == PUBLISHED
    assert list(shapes) == list(PUBLISHED)  # the port's order too
    assert crfasrnn_state_dict_shapes(21) == PUBLISHED
    assert net.upscore2.bias is not None and net.upscore8.bias is None and net.upscore_pool4.bias is None


@pytest.mark.parametrize(
    "hw", [(500, 500), (375, 500), (321, 481), (64, 64), (1, 1), (7, 33), (333, 17), (1000, 777)]
)
def test_fcn8s_output_size_equals_input_size(hw):
    with torch.device("meta"):
        net = FCN8s(21)
    out = net(torch.empty(2, 3, *hw, device="meta"))
    assert tuple(out.shape) == (2, 21, *hw)


def test_fcn8s_real_forward_small():
    torch.manual_seed(0)
    net = FCN8s(5).eval()
    image = torch.rand(1, 3, 9, 14) * 255
    with torch.no_grad():
        out = net(image)
        ref = net.score(caffe_normalize(image))
    assert out.shape == (1, 5, 9, 14) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    # freshly built: zero score layers -> zero logits; deconvolutions are bilinear
    assert torch.count_nonzero(out) == 0
    torch.testing.assert_close(net.upscore8.weight, bilinear_upsampling_weights(5, 5, 16))


def _centroid(y):
    y = y.clamp(min=0).double()
    ys = torch.arange(y.shape[0], dtype=torch.float64)
    xs = torch.arange(y.shape[1], dtype=torch.float64)
    s = y.sum()
    return float((y.sum(1) * ys).sum() / s), float((y.sum(0) * xs).sum() / s)


def test_fcn8s_crops_align_scores_with_input():
    """Identity VGG (channel c -> c) and one-hot score layers: a square in the input must come out where it is.

    Classes 0-2 see only the pool3 skip, 3-5 only pool4, 6-8 only fc7; 8 squares over the 3 channels x 3 images
    cover all 8 sub-stride phases, so for the stride-8 path the mean centroid error is 0 if the crops are right.
    """
    L = 9
    net = FCN8s(L).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for name in VGG_NAMES:
            for c in range(3):
                getattr(net, name).weight[c, c, 1, 1] = 1
        for c in range(3):
            net.fc6.weight[c, c, 3, 3] = 1
            net.fc7.weight[c, c, 0, 0] = 1
            net.score_pool3.weight[c, c] = 1
            net.score_pool4.weight[3 + c, c] = 1
            net.score_fr.weight[6 + c, c] = 1
        for deconv in (net.upscore2, net.upscore_pool4, net.upscore8):
            deconv.weight.copy_(bilinear_upsampling_weights(L, L, deconv.kernel_size[0]))
    H = W = 48
    side = 16
    x = torch.zeros(3, 3, H, W)
    truth = {}
    for k in range(8):
        b, c = divmod(k, 3)
        y0, x0 = 14 + k, 16 + (3 * k) % 8
        x[b, c, y0 : y0 + side, x0 : x0 + side] = 1.0
        truth[(b, c)] = (y0 + (side - 1) / 2, x0 + (side - 1) / 2)
    with torch.no_grad():
        out = net.score(x)
    assert out.shape == (3, L, H, W)
    for first_class, tol in ((0, 0.25), (3, 4.0), (6, 4.0)):
        errs = []
        for (b, c), (ty, tx) in truth.items():
            cy, cx = _centroid(out[b, first_class + c])
            errs.append((cy - ty, cx - tx))
        mean_err = np.mean(np.array(errs), axis=0)
        assert np.all(np.abs(mean_err) <= tol), (first_class, errs)


# ----------------------------------------------------------------------------------------------- CrfRnnNet


class _SpyCrf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, unary, image, valid_mask=None):
        self.calls.append((unary, image, valid_mask))
        return unary * 2


def test_crfrnnnet_feeds_normalised_image_to_fcn_and_raw_rgb_to_crf():
    torch.manual_seed(0)
    net = CrfRnnNet(4).eval()
    with torch.no_grad():
        for conv in (net.score_fr, net.score_pool3, net.score_pool4):
            conv.weight.normal_(std=0.01)
            conv.bias.normal_()
    net.crfrnn = _SpyCrf()
    image = (torch.rand(1, 3, 12, 17) * 255).round().to(torch.uint8)
    mask = torch.ones(1, 12, 17, dtype=torch.bool)
    with torch.no_grad():
        out = net(image, valid_mask=mask)
        ref_unary = net.score(caffe_normalize(image))
    (unary, crf_image, valid_mask), = net.crfrnn.calls
    torch.testing.assert_close(unary, ref_unary)
    assert unary.abs().sum() > 0
    assert crf_image.dtype == torch.float32
    torch.testing.assert_close(crf_image, image.float())  # raw RGB, not BGR / mean-subtracted
    assert valid_mask is mask
    torch.testing.assert_close(out, 2 * ref_unary)


def test_crfrnnnet_end_to_end_small():
    torch.manual_seed(0)
    net = CrfRnnNet(3, num_iterations=2, num_test_iterations=3).eval()
    with torch.no_grad():
        for conv in (net.score_fr, net.score_pool3, net.score_pool4):
            conv.weight.normal_(std=0.01)
            conv.bias.normal_()
    image = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        out = net(image)
        unary = net.unary(image)
        ref = net.crfrnn(unary, image)
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, unary)  # the CRF did something


# ----------------------------------------------------------------------------------------------- CrfRnnHead


def test_crfrnnhead_wiring_and_validation():
    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(3, 4, 1)
    head = CrfRnnHead(backbone, 4, num_iterations=2, num_test_iterations=2).eval()
    spy = _SpyCrf()
    head.crfrnn = spy
    image = torch.rand(2, 3, 12, 10)
    rgb = torch.rand(2, 3, 12, 10) * 255
    with torch.no_grad():
        out = head(image)
        out2 = head(image, crf_image=rgb)
    torch.testing.assert_close(out, 2 * backbone(image))
    assert spy.calls[0][1] is image
    assert spy.calls[1][1] is rgb
    torch.testing.assert_close(out2, out)

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = backbone

        def forward(self, x):
            return {"out": self.conv(x), "aux": None}

    head_d = CrfRnnHead(DictModel(), 4)
    head_d.crfrnn = _SpyCrf()
    with torch.no_grad():
        torch.testing.assert_close(head_d(image), out)

    with pytest.raises(ValueError, match=r"crf_image.*\(2, 3, 6, 5\)"):
        head(image, crf_image=rgb[:, :, :6, :5])
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\).*\(2, 4, 12, 10\)"):
        CrfRnnHead(backbone, 5)(image)


def test_crfrnnhead_real_crf_matches_direct_call():
    torch.manual_seed(1)
    backbone = torch.nn.Conv2d(3, 3, 3, padding=1)
    head = CrfRnnHead(backbone, 3, num_iterations=2, num_test_iterations=2).eval()
    image = torch.rand(1, 3, 20, 24) * 255
    with torch.no_grad():
        out = head(image)
        ref = head.crfrnn(backbone(image), image)
    assert out.shape == (1, 3, 20, 24)
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------------------------- published weights


def test_load_published_weights_values_and_sign(published_sd, published_file):
    model = load_crfasrnn_weights(published_file)
    assert isinstance(model, CrfRnnNet) and not model.training
    got = model.state_dict()
    for key in PUBLISHED:
        if key == "crfrnn.compatibility_matrix":
            # the port computes unary + C' m (C' = +I initially); we compute unary - C m, so C = -C'
            assert torch.equal(got[key], -published_sd[key])
        else:
            assert torch.equal(got[key], published_sd[key]), key
    assert model.crfrnn.compatibility_matrix.dtype == torch.float32
    del model
    same = load_crfasrnn_weights(published_file, convention="crfrnn", num_iterations=3, num_test_iterations=4)
    assert torch.equal(same.crfrnn.compatibility_matrix, published_sd["crfrnn.compatibility_matrix"])
    assert (same.crfrnn.num_iterations, same.crfrnn.num_test_iterations) == (3, 4)


def test_load_published_weights_layout_errors(tmp_path):
    shapes = dict(PUBLISHED)
    # missing key
    sd = _cheap_sd({k: s for k, s in shapes.items() if k != "upscore8.weight"})
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing.pth.*upscore8\.weight.*\(21, 21, 16, 16\)"):
        load_crfasrnn_weights(tmp_path / "missing.pth")
    # wrong shape
    sd = _cheap_sd({**shapes, "fc6.weight": (4096, 512, 3, 3)})
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"fc6\.weight.*\(4096, 512, 7, 7\).*\(4096, 512, 3, 3\)"):
        load_crfasrnn_weights(tmp_path / "shape.pth")
    sd = _cheap_sd({**shapes, "crfrnn.compatibility_matrix": (21, 20)})
    torch.save(sd, tmp_path / "compat.pth")
    with pytest.raises(ValueError, match=r"crfrnn\.compatibility_matrix.*\(21, 21\).*\(21, 20\)"):
        load_crfasrnn_weights(tmp_path / "compat.pth")
    # unexpected key
    torch.save(_cheap_sd({**shapes, "extra.weight": (3,)}), tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.weight"):
        load_crfasrnn_weights(tmp_path / "extra.pth")
    # a checkpoint wrapper and a DataParallel prefix are unwrapped before the layout check
    wrapped = {"state_dict": {f"module.{k}": v for k, v in _cheap_sd(shapes).items() if k != "fc7.bias"}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"missing key\(s\) fc7\.bias \(4096,\)$"):
        load_crfasrnn_weights(tmp_path / "wrapped.pth")
    # not a state dict
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*list"):
        load_crfasrnn_weights(tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        load_crfasrnn_weights(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_crfasrnn_weights(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="convention"):
        load_crfasrnn_weights(tmp_path / "missing.pth", convention="keras")


class _Evil:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_refuses_pickle_with_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    payload = {"conv1_1.weight": torch.zeros(1), "boom": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, bad)
    else:
        with open(bad, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pth: not a checkpoint this library can load safely.*never unpickle"):
        load_crfasrnn_weights(bad)
    with pytest.raises(ValueError, match=r"evil\.pth"):
        fcn8s_from_vgg16(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- Keras weights


_KERAS_NAMES = {
    **{n: n for n in VGG_NAMES},
    "fc6": "fc6", "fc7": "fc7", "score_fr": "score-fr", "score_pool4": "score-pool4",
    "score_pool3": "score-pool3", "upscore2": "score2", "upscore_pool4": "score4", "upscore8": "upsample",
}  # fmt: skip


def _write_keras_h5(path, sd, root_group=True):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if root_group else f
        layer_names = []
        for ours, kname in _KERAS_NAMES.items():
            w = sd[f"{ours}.weight"].numpy()
            # Conv2D kernel (kh, kw, in, out) from torch (out, in, kh, kw);
            # Conv2DTranspose kernel (kh, kw, out, in) from torch (in, out, kh, kw): the same axis order.
            g = root.create_group(kname).create_group(kname)
            g.create_dataset("kernel:0", data=np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0))))
            names = [f"{kname}/kernel:0"]
            if f"{ours}.bias" in sd:
                g.create_dataset("bias:0", data=sd[f"{ours}.bias"].numpy())
                names.append(f"{kname}/bias:0")
            root[kname].attrs["weight_names"] = np.array(names, dtype="S")
            layer_names.append(kname)
        g = root.create_group("crfrnn").create_group("crfrnn")
        for name in ("spatial_ker_weights", "bilateral_ker_weights", "compatibility_matrix"):
            g.create_dataset(f"{name}:0", data=sd[f"crfrnn.{name}"].numpy())
        layer_names += ["input_1", "zero_padding2d_1", "crfrnn"]
        root.create_group("input_1")
        root.create_group("zero_padding2d_1")
        root.attrs["layer_names"] = np.array(layer_names, dtype="S")


def test_load_keras_weights(published_sd, tmp_path):
    path = tmp_path / "crfrnn_keras_model.h5"
    _write_keras_h5(path, published_sd)
    model = load_crfasrnn_keras_weights(path)
    got = model.state_dict()
    for key in PUBLISHED:  # Keras uses unary - C m, as we do: no sign flip
        assert torch.equal(got[key], published_sd[key]), key

    # Orientation check of a transposed convolution against a direct numpy evaluation of Keras/TF's
    # Conv2DTranspose (stride 2, "valid"): out[s*i + a, s*j + b, o] += x[i, j, c] * K[a, b, o, c].
    import h5py

    with h5py.File(path, "r") as f:
        K = f["model_weights/score2/score2/kernel:0"][()].astype(np.float64)
        bias = f["model_weights/score2/score2/bias:0"][()].astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 21))  # (h, w, c), channels last
    ref = np.zeros(((3 - 1) * 2 + 4, (2 - 1) * 2 + 4, 21))
    for i in range(3):
        for j in range(2):
            for a in range(4):
                for b in range(4):
                    ref[2 * i + a, 2 * j + b] += K[a, b] @ x[i, j]
    ref += bias
    out = model.upscore2(torch.from_numpy(x.transpose(2, 0, 1)[None]).float())[0].permute(1, 2, 0)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-4, atol=1e-3)

    # and a Conv2D: out[y, x, o] = sum_{a, b, c} xpad[y + a, x + b, c] * K[a, b, c, o] (cross-correlation, 'same')
    w_k = np.transpose(published_sd["conv2_1.weight"].numpy(), (2, 3, 1, 0)).astype(np.float64)
    x2 = rng.standard_normal((4, 5, 64))
    xp = np.pad(x2, ((1, 1), (1, 1), (0, 0)))
    ref2 = np.zeros((4, 5, 128)) + published_sd["conv2_1.bias"].numpy()
    for a in range(3):
        for b in range(3):
            ref2 += xp[a : a + 4, b : b + 5] @ w_k[a, b]
    out2 = model.conv2_1(torch.from_numpy(x2.transpose(2, 0, 1)[None]).float())[0].permute(1, 2, 0)
    np.testing.assert_allclose(out2.detach().numpy(), ref2, rtol=1e-4, atol=1e-2)


def test_load_keras_weights_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_group("model_weights").create_group("conv1_1")
    with pytest.raises(ValueError, match=r"bad\.h5.*conv1_1/kernel"):
        load_crfasrnn_keras_weights(path)
    # model.save_weights layout: layer groups at the root (conv1_1 complete, conv1_2 absent)
    root = tmp_path / "root.h5"
    with h5py.File(root, "w") as f:
        g = f.create_group("conv1_1").create_group("conv1_1")
        g.create_dataset("kernel:0", data=np.zeros((3, 3, 3, 64), np.float32))
        g.create_dataset("bias:0", data=np.zeros(64, np.float32))
    with pytest.raises(ValueError, match=r"root\.h5.*missing layer group 'conv1_2'"):
        load_crfasrnn_keras_weights(root)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"text\.h5"):
        load_crfasrnn_keras_weights(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError):
        load_crfasrnn_keras_weights(tmp_path / "none.h5")


# ----------------------------------------------------------------------------------------------- VGG-16 init


def _torchvision_sd(published_sd):
    sd = {}
    for idx, name in zip(TV_FEATURES, VGG_NAMES):
        sd[f"features.{idx}.weight"] = published_sd[f"{name}.weight"]
        sd[f"features.{idx}.bias"] = published_sd[f"{name}.bias"]
    sd["classifier.0.weight"] = published_sd["fc6.weight"].reshape(4096, 25088)
    sd["classifier.0.bias"] = published_sd["fc6.bias"]
    sd["classifier.3.weight"] = published_sd["fc7.weight"].reshape(4096, 4096)
    sd["classifier.3.bias"] = published_sd["fc7.bias"]
    sd["classifier.6.weight"] = torch.zeros(1000, 4096)
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


def test_fcn8s_from_torchvision_vgg16(published_sd, tmp_path):
    tv = _torchvision_sd(published_sd)
    model = fcn8s_from_vgg16(tv, num_classes=21)
    assert isinstance(model, FCN8s)
    for name in VGG_NAMES[1:] + ["fc6", "fc7"]:
        assert torch.equal(getattr(model, name).weight, published_sd[f"{name}.weight"]), name
        assert torch.equal(getattr(model, name).bias, published_sd[f"{name}.bias"]), name
    # fc6 = classifier.0 viewed as (4096, 512, 7, 7): one row's (c, y, x) entry is column c*49 + y*7 + x
    assert model.fc6.weight[17, 300, 2, 5] == tv["classifier.0.weight"][17, 300 * 49 + 2 * 7 + 5]
    for conv in (model.score_fr, model.score_pool3, model.score_pool4):
        assert torch.count_nonzero(conv.weight) == 0 and torch.count_nonzero(conv.bias) == 0
    torch.testing.assert_close(model.upscore8.weight, bilinear_upsampling_weights(21, 21, 16))
    torch.testing.assert_close(model.upscore2.weight, bilinear_upsampling_weights(21, 21, 4))

    # conv1_1 absorbs torchvision's normalisation: our conv on Caffe-normalised BGR == torchvision's conv on
    # its own (RGB / 255 - mean) / std input (no padding: the fold is exact wherever the window is inside).
    rgb = torch.rand(1, 3, 11, 13, dtype=torch.float64) * 255
    mean = torch.tensor(TORCHVISION_VGG16_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(TORCHVISION_VGG16_STD, dtype=torch.float64).view(1, 3, 1, 1)
    ref = F.conv2d((rgb / 255 - mean) / std, tv["features.0.weight"].double(), tv["features.0.bias"].double())
    ours = F.conv2d(caffe_normalize(rgb), model.conv1_1.weight.double(), model.conv1_1.bias.double())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3 * ref.abs().max().item())

    # "caffe" convention copies conv1_1 as is; a file path works; a CrfRnnNet can be filled in place
    path = tmp_path / "vgg16.pth"
    torch.save(tv, path)
    del model
    net = CrfRnnNet(21)
    out = fcn8s_from_vgg16(path, input_convention="caffe", model=net)
    assert out is net
    assert torch.equal(net.conv1_1.weight, published_sd["conv1_1.weight"])
    assert torch.equal(net.fc7.bias, published_sd["fc7.bias"])


def test_fcn8s_from_vgg16_errors():
    shapes = {f"features.{i}.weight": (1,) for i in TV_FEATURES}
    with pytest.raises(ValueError, match=r"missing key.*features\.0\.bias"):
        fcn8s_from_vgg16(_cheap_sd(shapes))
    good = {}
    for idx, name in zip(TV_FEATURES, VGG_NAMES):
        good[f"features.{idx}.weight"] = PUBLISHED[f"{name}.weight"]
        good[f"features.{idx}.bias"] = PUBLISHED[f"{name}.bias"]
    good.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                 "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,)})  # fmt: skip
    with pytest.raises(ValueError, match=r"classifier\.0\.weight.*\(4096, 25088\).*\(4096, 9216\)"):
        fcn8s_from_vgg16(_cheap_sd({**good, "classifier.0.weight": (4096, 9216)}))
    with pytest.raises(ValueError, match="input_convention"):
        fcn8s_from_vgg16(_cheap_sd(good), input_convention="bgr")
