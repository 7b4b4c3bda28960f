"""``unary_scale`` of CrfRnnNet / CrfRnnHead / TinyCrfRnnNet: the unary network on a resized input, its logits
upsampled to the input's size, the CRF at full resolution. References: an independent float64 NumPy resampler
(triangle filter, half-pixel centres, as PIL / antialiased bilinear) and the unscaled code path written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from crfrnn.models import CrfRnnHead, CrfRnnNet, FCN8s, TinyCrfRnnNet
from crfrnn.models.nets import check_unary_scale, scaled_unary

CRF = dict(num_iterations=2, num_test_iterations=3, theta_alpha=6.0, theta_beta=20.0, theta_gamma=2.0)


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of bilinear resampling with half-pixel centres; shrinking widens the triangle
    by the factor (antialiasing), taps outside the image are dropped and the rest renormalised."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale  # in input pixel units, pixel j covers [j, j + 1)
        for j in range(n_in):
            m[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / support)
        m[i] /= m[i].sum()
    return m


def resize_ref(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Separable NumPy resize of (B, C, H, W) to ``size``, float64."""
    a = x.detach().double().numpy()
    rh, rw = resample_matrix(a.shape[2], size[0]), resample_matrix(a.shape[3], size[1])
    return torch.from_numpy(np.einsum("ih,bchw,jw->bcij", rh, a, rw))


def small_size(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, round(h * s)), max(1, round(w * s))


def rgb(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(shape, generator=g, dtype=torch.float64) * 255
    img[..., : shape[-2] // 2, :] *= 0.3  # an edge for the bilateral kernel
    return img


class Backbone(nn.Module):
    """A small convolutional model (the head's 'any segmentation model')."""

    def __init__(self, L=3):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, L, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x / 128.0 - 1.0)))


@pytest.fixture(scope="module")
def fcn_net():
    """One CrfRnnNet (~134 M parameters, slow to build) shared by the tests; each sets ``unary_scale``."""
    torch.manual_seed(1)
    net = CrfRnnNet(3, **CRF).eval()
    with torch.no_grad():  # score layers start at zero; give them values so that the logits vary
        for conv in (net.score_fr, net.score_pool3, net.score_pool4):
            conv.weight.normal_(0, 0.01)
            conv.bias.normal_(0, 0.1)
    return net


# ----------------------------------------------------------------------------------------------- default 1.0


def test_default_scale_is_bit_identical_to_unscaled_path(fcn_net):
    image = rgb((2, 3, 21, 17))
    valid = torch.ones(2, 1, 21, 17, dtype=torch.bool)
    valid[1, :, 15:, :] = False
    head = CrfRnnHead(Backbone().double(), 3, **CRF).eval()
    assert head.unary_scale == 1.0
    for mask in (None, valid):
        want = head.crfrnn(head.model(image), image, valid_mask=mask)  # the forward pass without unary_scale
        assert torch.equal(head(image, valid_mask=mask), want)
    tiny = TinyCrfRnnNet(3, **CRF).double().eval()
    for mask in (None, valid):
        want = tiny.crfrnn(tiny._convs(image), image, valid_mask=mask)
        assert torch.equal(tiny(image, valid_mask=mask), want)
    net = fcn_net
    net.unary_scale = 1.0
    assert CrfRnnNet.__init__.__kwdefaults__["unary_scale"] == 1.0
    img = rgb((1, 3, 19, 23)).float()
    assert torch.equal(net(img), net.crfrnn(FCN8s.forward(net, img), img))
    assert torch.equal(net.unary(img), FCN8s.forward(net, img))


# ----------------------------------------------------------------------------------------------- against a reference


@pytest.mark.parametrize("size,scale", [((17, 23), 0.5), ((20, 16), 0.5), ((15, 21), 0.37), ((9, 11), 1.6)])
def test_resize_matches_numpy_reference(size, scale):
    x = rgb((2, 3) + size, seed=3)
    ident = lambda t: t  # noqa: E731 - the unary is the identity: only the two resizes remain
    got = scaled_unary(ident, x, scale)
    small = small_size(*size, scale)
    want = resize_ref(resize_ref(x, small), size)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [(17, 23), (24, 19)])
def test_head_half_scale_equals_resize_by_hand_then_crf(size):
    image = rgb((2, 3) + size, seed=5)
    head = CrfRnnHead(Backbone().double(), 3, unary_scale=0.5, **CRF).eval()
    out = head(image)
    assert out.shape == (2, 3) + size
    small = small_size(*size, 0.5)
    logits = resize_ref(head.model(resize_ref(image, small)), size)
    want = head.crfrnn(logits, image)
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-7)


def test_tiny_half_scale_equals_resize_by_hand_then_crf():
    image = rgb((1, 3, 13, 18), seed=6)
    tiny = TinyCrfRnnNet(3, unary_scale=0.5, **CRF).double().eval()
    want = tiny.crfrnn(resize_ref(tiny._convs(resize_ref(image, (6, 9))), (13, 18)), image)
    torch.testing.assert_close(tiny(image), want, rtol=1e-7, atol=1e-7)
    fcn = TinyCrfRnnNet(3, crf=False, unary_scale=0.5).double()
    torch.testing.assert_close(fcn(image), resize_ref(fcn._convs(resize_ref(image, (6, 9))), (13, 18)))


def test_crfrnnnet_half_scale_odd_size(fcn_net):
    net = fcn_net
    net.unary_scale = 0.5
    image = rgb((1, 3, 27, 33), seed=7).float()
    with torch.no_grad():
        out = net(image)
        assert out.shape == (1, 3, 27, 33)
        logits = resize_ref(FCN8s.forward(net, resize_ref(image, (14, 16)).float()), (27, 33)).float()
        want = net.crfrnn(logits, image)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_uint8_image_is_accepted(fcn_net):
    net = fcn_net
    net.unary_scale = 0.5
    image = rgb((1, 3, 16, 20), seed=8).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net(image), net(image.float()))


# ----------------------------------------------------------------------------------------------- padded batches


def test_padded_batch_gives_each_image_what_it_gets_alone():
    """The unary network sees each image's own pixels (its valid box), not the padding."""
    a, b = rgb((1, 3, 19, 14), seed=9), rgb((1, 3, 12, 21), seed=10)
    H, W = 19, 21
    batch = torch.zeros(2, 3, H, W, dtype=torch.float64)
    batch[0, :, :19, :14], batch[1, :, :12, :21] = a[0], b[0]
    batch[:, :, 12:, 14:] = 200.0  # padding content that a canvas-wide resize would smear into the images
    valid = torch.zeros(2, 1, H, W, dtype=torch.bool)
    valid[0, :, :19, :14], valid[1, :, :12, :21] = True, True
    for model in (CrfRnnHead(Backbone().double(), 3, unary_scale=0.5, **CRF).eval(),
                  TinyCrfRnnNet(3, unary_scale=0.6, **CRF).double().eval()):
        out = model(batch, valid_mask=valid)
        torch.testing.assert_close(out[0:1, :, :19, :14], model(a), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1:2, :, :12, :21], model(b), rtol=1e-6, atol=1e-6)
        unary = model.unary(batch, valid)
        assert torch.equal(unary[0, :, :, 14:], torch.zeros_like(unary[0, :, :, 14:]))
        # without the mask the padding leaks into image 0's unaries near its border
        assert not torch.allclose(model.unary(batch)[0, :, :19, :14], unary[0, :, :19, :14])


def test_full_mask_equals_no_mask_and_offset_box():
    image = rgb((2, 3, 15, 18), seed=11)
    head = CrfRnnHead(Backbone().double(), 3, unary_scale=0.5, **CRF).eval()
    full = torch.ones(2, 1, 15, 18, dtype=torch.bool)
    assert torch.equal(head.unary(image, full), head.unary(image))
    box = torch.zeros_like(full)
    box[:, :, 3:14, 2:17] = True  # a box not at the origin
    got = head.unary(image, box)
    torch.testing.assert_close(got[:, :, 3:14, 2:17], head.unary(image[:, :, 3:14, 2:17]), rtol=0, atol=0)
    assert not bool(got[:, :, :3].any())


# ----------------------------------------------------------------------------------------------- training, config


def test_gradients_reach_the_unary_network():
    image = rgb((2, 3, 17, 15), seed=12).float()
    for model in (CrfRnnHead(Backbone(), 3, unary_scale=0.5, **CRF), TinyCrfRnnNet(3, unary_scale=0.5, **CRF)):
        model.train()
        model(image).logsumexp(1).mean().backward()
        unary_params = [p for n, p in model.named_parameters() if not n.startswith("crfrnn.")]
        assert unary_params
        for p in unary_params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 2, 3, padding=1).double()
    x = rgb((1, 3, 7, 9), seed=13) / 255

    x = torch.cat([x, x.flip(-1)])
    valid = torch.ones(2, 1, 7, 9, dtype=torch.bool)
    valid[1, :, 5:] = False  # a padded second image: its own box is cut out, scored and put back

    def f(w, mask=None):
        conv = lambda t: nn.functional.conv2d(t, w, net.bias, padding=1)  # noqa: E731
        return scaled_unary(conv, x, 0.6, mask).square().sum()

    w = net.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradcheck(lambda w: f(w, valid), (w,))


def test_unary_scale_attribute_and_validation():
    assert TinyCrfRnnNet(3, unary_scale=0.25).unary_scale == 0.25
    assert isinstance(CrfRnnHead(Backbone(), 3, unary_scale=1).unary_scale, float)
    assert "unary_scale=0.5" in repr(TinyCrfRnnNet(3, unary_scale=0.5))
    for bad in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="unary_scale"):
            TinyCrfRnnNet(3, unary_scale=bad)
        with pytest.raises(ValueError, match="unary_scale"):
            CrfRnnHead(Backbone(), 3, unary_scale=bad)
    for bad in ("0.5", None, True, torch.tensor([0.5, 0.5])):
        with pytest.raises(TypeError, match="unary_scale"):
            check_unary_scale(bad)
    with pytest.raises(ValueError, match="valid_mask"):
        scaled_unary(lambda t: t, rgb((1, 3, 8, 8)), 0.5, torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid_mask"):
        scaled_unary(lambda t: t, rgb((1, 3, 8, 8)), 0.5, [[True]])
    with pytest.raises(ValueError, match="image"):
        scaled_unary(lambda t: t, rgb((3, 8, 8)), 0.5)
