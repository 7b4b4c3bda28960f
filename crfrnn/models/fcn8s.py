"""FCN-8s, the unary network of CRF-RNN (the CRF-RNN networks built on it are in :mod:`crfrnn.models.nets`).

* :class:`FCN8s` -- the VGG-16 based FCN-8s of Long et al. (CVPR 2015) that CRF-RNN (Zheng et al., ICCV 2015)
  uses for its unaries, laid out like the Caffe model and the official PyTorch port
  (``sadeepj/crfasrnn_pytorch``): the attribute names are the published state-dict keys
  (``conv1_1.weight`` ... ``upscore8.weight``), ``conv1_1`` pads by 100 and the score maps are cropped at the
  fixed Caffe offsets (5, 9 and 31), so the logits have exactly the input's height and width for any input size.
* :class:`CrfRnnNet` -- FCN-8s followed by :class:`crfrnn.meanfield.CrfRnn` (``self.crfrnn``): the full network of
  the paper. Takes a raw RGB batch in 0..255, normalises it itself for the FCN and gives the raw RGB image to the
  CRF's bilateral kernel.
* :class:`CrfRnnHead` -- a CRF-RNN after any segmentation model that returns logits (B, L, H, W).

Input normalisation (:func:`caffe_normalize`) is the one of the original Caffe/Keras/PyTorch releases: RGB minus
the ImageNet mean (123.68, 116.779, 103.939), channels reordered to BGR, range kept at 0..255.
The official port feeds that normalised (BGR, mean-subtracted) image to the CRF; the bilateral kernel only sees
colour *differences*, which a fixed channel permutation and a constant shift do not change, so giving it the raw
RGB image is the same model (up to the lattice's approximation).

To load the published weights see :mod:`crfrnn.weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN_RGB",
    "caffe_normalize",
    "bilinear_upsampling_weights",
    "FCN8s",
]

#: Per-channel ImageNet mean in RGB order, on the 0..255 scale (the value used by the CRF-RNN releases).
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

# VGG-16 convolutions: (name, in_channels, out_channels); "pool" marks a 2x2 max-pool (ceil mode, as Caffe).
_VGG16_CONVS = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool",
    ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool",
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), "pool",
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), "pool",
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512), "pool",
)  # fmt: skip

# Caffe FCN-8s crop offsets (score_pool4c, score_pool3c, the final score).
_CROP_POOL4, _CROP_POOL3, _CROP_FINAL = 5, 9, 31


def _check_image(image: Tensor, name: str = "image") -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W) (an RGB batch), got {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(image.shape)}")


def _as_float(image: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``image`` as a floating tensor: integer images (e.g. uint8) become ``dtype`` (default dtype if None)."""
    if image.is_floating_point():
        return image if dtype is None else image.to(dtype)
    return image.to(torch.get_default_dtype() if dtype is None else dtype)


def caffe_normalize(image: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Caffe/VGG input normalisation of an RGB batch, as in the CRF-RNN releases.

    Args:
        image: (B, 3, H, W) RGB values in 0..255, float or integer (uint8 is fine). Not modified.
        dtype: floating dtype of the result; ``None`` keeps a floating ``image``'s dtype (integer images
            become the default dtype).

    Returns:
        (B, 3, H, W) tensor in **BGR** order with the ImageNet mean subtracted, still on the 0..255 scale:
        ``out[:, 0] = B - 103.939``, ``out[:, 1] = G - 116.779``, ``out[:, 2] = R - 123.68``.
    """
    _check_image(image)
    x = _as_float(image, dtype)
    mean = torch.tensor(IMAGENET_MEAN_RGB, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean).flip(1)


def bilinear_upsampling_weights(in_channels: int, out_channels: int, kernel_size: int) -> Tensor:
    """Bilinear-interpolation kernel for a ``ConvTranspose2d``, as Caffe's/FCN's "bilinear" filler.

    Returns:
        (in_channels, out_channels, k, k) float32 tensor whose (c, c) slices hold the separable bilinear
        kernel ``(1 - |i - center| / f) * (1 - |j - center| / f)`` with ``f = ceil(k / 2)`` and zero elsewhere,
        so each channel is upsampled independently by the deconvolution's stride (``k = 2 * stride``).
    """
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    r = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1.0 - (r - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size, dtype=torch.float64)
    n = min(in_channels, out_channels)
    weight[torch.arange(n), torch.arange(n)] = filt
    return weight.float()


class FCN8s(nn.Module):
    """FCN-8s on VGG-16 (Long et al., CVPR 2015), the unary network of CRF-RNN.

    Layout and parameter names follow the Caffe model and the official PyTorch port of CRF-RNN:
    ``conv1_1`` .. ``conv5_3`` (3x3, ``conv1_1`` with padding 100), ``fc6`` as a 7x7 convolution
    (4096, 512, 7, 7), ``fc7`` a 1x1 convolution, the score layers ``score_fr`` / ``score_pool4`` /
    ``score_pool3`` (1x1, with bias) and the deconvolutions ``upscore2`` (L, L, 4, 4, with bias),
    ``upscore_pool4`` (L, L, 4, 4, no bias) and ``upscore8`` (L, L, 16, 16, no bias). Dropout (p = 0.5, element-wise
    as Caffe) follows fc6 and fc7.

    Initialisation: VGG layers use PyTorch's defaults (load ImageNet weights with
    :func:`crfrnn.weights.fcn8s_from_vgg16`), the score layers are zero (as the FCN paper) and the deconvolutions
    are bilinear upsampling (:func:`bilinear_upsampling_weights`), ``upscore2``'s bias zero.

    ``forward`` takes raw RGB in 0..255 and normalises it (:func:`caffe_normalize`); :meth:`score` takes an already
    normalised batch.

    Args:
        num_classes: number of labels L (21 for PASCAL VOC).
    """

    def __init__(self, num_classes: int = 21):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        num_classes = int(num_classes)
        self.num_classes = num_classes
        for spec in _VGG16_CONVS:
            if spec == "pool":
                continue
            name, cin, cout = spec
            setattr(self, name, nn.Conv2d(cin, cout, 3, padding=100 if name == "conv1_1" else 1))
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop6 = nn.Dropout(0.5)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=True)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """Zero the score layers and set the deconvolutions to bilinear upsampling (``upscore2`` bias zero)."""
        for conv in (self.score_fr, self.score_pool3, self.score_pool4):
            conv.weight.zero_()
            conv.bias.zero_()
        for deconv in (self.upscore2, self.upscore_pool4, self.upscore8):
            w = bilinear_upsampling_weights(deconv.in_channels, deconv.out_channels, deconv.kernel_size[0])
            deconv.weight.copy_(w)
            if deconv.bias is not None:
                deconv.bias.zero_()

    def normalize(self, image: Tensor) -> Tensor:
        """:func:`caffe_normalize` in the parameters' dtype: (B, 3, H, W) RGB 0..255 -> BGR minus the mean."""
        return caffe_normalize(image, dtype=self.conv1_1.weight.dtype)

    def score(self, x: Tensor) -> Tensor:
        """FCN-8s logits of an already normalised batch.

        Args:
            x: (B, 3, H, W) BGR, mean-subtracted, 0..255 scale (the output of :func:`caffe_normalize`).

        Returns:
            (B, L, H, W) logits (unnormalised scores), the same height and width as ``x``.
        """
        _check_image(x, "x")
        h = x
        pools = []
        for spec in _VGG16_CONVS:
            if spec == "pool":
                h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
                pools.append(h)
            else:
                h = F.relu(getattr(self, spec[0])(h), inplace=True)
        pool3, pool4 = pools[2], pools[3]
        h = self.drop6(F.relu(self.fc6(h), inplace=True))
        h = self.drop7(F.relu(self.fc7(h), inplace=True))
        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        score_pool4c = _crop(self.score_pool4(pool4), _CROP_POOL4, upscore2.shape[2:])
        upscore_pool4 = self.upscore_pool4(upscore2 + score_pool4c)  # 1/8
        score_pool3c = _crop(self.score_pool3(pool3), _CROP_POOL3, upscore_pool4.shape[2:])
        out = self.upscore8(upscore_pool4 + score_pool3c)  # 1/1
        return _crop(out, _CROP_FINAL, x.shape[2:]).contiguous()

    def forward(self, image: Tensor) -> Tensor:
        """FCN-8s logits of a raw RGB batch.

        Args:
            image: (B, 3, H, W) RGB in 0..255 (float or uint8).

        Returns:
            (B, L, H, W) logits.
        """
        return self.score(self.normalize(image))


def _crop(t: Tensor, offset: int, size) -> Tensor:
    h, w = int(size[0]), int(size[1])
    if t.shape[2] < offset + h or t.shape[3] < offset + w:
        raise ValueError(
            f"FCN-8s crop out of range: map of shape {tuple(t.shape)} cannot be cropped at offset {offset} "
            f"to {h}x{w}"
        )
    return t[:, :, offset : offset + h, offset : offset + w]
