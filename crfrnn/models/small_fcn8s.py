"""A narrow VGG-style FCN-8s (:class:`SmallFCN8s`): a unary network small enough to train from scratch on a CPU.

It is the network of the CamVid experiment (``experiments/camvid``); the library holds it so that models trained
there can be shipped as single files (:func:`crfrnn.models.checkpoints.save_model_file`) and run by
``crfrnn eval`` / ``crfrnn segment``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fcn8s import _check_image, bilinear_upsampling_weights

__all__ = ["SmallFCN8s", "CAMVID_MEAN", "CAMVID_STD", "SMALL_FCN_WIDTHS", "SMALL_FCN_FC"]

#: CamVid RGB statistics per channel on the 0..1 scale, rounded: the default input normalisation.
CAMVID_MEAN = (0.390, 0.405, 0.414)
CAMVID_STD = (0.30, 0.31, 0.31)
#: Default channels of the five conv stages and of ``fc6``/``fc7``.
SMALL_FCN_WIDTHS = (16, 32, 64, 96, 128)
SMALL_FCN_FC = 256
# the input is padded to a multiple of the total stride of the five 2x2 max-pools
_STRIDE = 32


def _rgb_triple(value: Any, name: str, positive: bool) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be three numbers (one per RGB channel), got {value!r}") from None
    if len(t) != 3 or (positive and min(t) <= 0):
        raise ValueError(f"{name} must be three {'positive ' if positive else ''}numbers (R, G, B), got {value!r}")
    return t  # type: ignore[return-value]


def _positive_ints(value: Any, name: str, count: int | None = None) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items) or (
        count is not None and len(items) != count
    ):
        what = f"{count} positive integers" if count else "a positive integer"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return items


def _cbr(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallFCN8s(nn.Module):
    """A narrow VGG-style FCN-8s: five 2-conv stages (3x3 conv + BN + ReLU), 2x2 max-pools, ``fc6`` (3x3) and
    ``fc7`` (1x1) as convolutions, score layers on fc7 / pool4 / pool3 and the FCN-8s fusion
    (``upscore2`` -> + ``score_pool4`` -> ``upscore_pool4`` -> + ``score_pool3`` -> ``upscore8``, deconvolutions
    initialised to bilinear upsampling, score layers to zero, as FCN).

    ``forward(image (B, 3, H, W) raw RGB 0..255) -> logits (B, L, H, W)``; any H, W (the normalised input is
    zero-padded at the bottom/right to a multiple of 32 and the logits cropped back).
    ``freeze_bn()`` keeps every BatchNorm in eval mode from then on (used while fine-tuning a CRF-RNN over it).

    Args:
        num_classes: number of labels L.
        widths: channels of the five conv stages.
        fc: channels of ``fc6`` and ``fc7``.
        mean, std: per-channel RGB normalisation on the 0..1 scale (the input is ``(image / 255 - mean) / std``).
            They are not in the state dict (the layout of the experiment's checkpoints); :meth:`architecture`
            gives them, with ``widths`` and ``fc``, for a file's description.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = SMALL_FCN_WIDTHS, fc: int = SMALL_FCN_FC,
                 mean: Sequence[float] = CAMVID_MEAN, std: Sequence[float] = CAMVID_STD):
        super().__init__()
        (L,) = _positive_ints(num_classes, "num_classes")
        self.num_classes = L
        self.widths = _positive_ints(widths, "widths", 5)
        (self.fc,) = _positive_ints(fc, "fc")
        self.rgb_mean = _rgb_triple(mean, "mean", positive=False)
        self.rgb_std = _rgb_triple(std, "std", positive=True)
        stages, cin = [], 3
        for w in self.widths:
            stages.append(nn.Sequential(_cbr(cin, w), _cbr(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc6 = _cbr(cin, self.fc)
        self.fc7 = _cbr(self.fc, self.fc, k=1)
        self.score_fr = nn.Conv2d(self.fc, L, 1)
        self.score_pool4 = nn.Conv2d(self.widths[3], L, 1)
        self.score_pool3 = nn.Conv2d(self.widths[2], L, 1)
        self.upscore2 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(L, L, 16, stride=8, padding=4, bias=False)
        with torch.no_grad():
            for conv in (self.score_fr, self.score_pool4, self.score_pool3):
                conv.weight.zero_()
                conv.bias.zero_()
            for d in (self.upscore2, self.upscore_pool4, self.upscore8):
                d.weight.copy_(bilinear_upsampling_weights(L, L, d.kernel_size[0]))
        # not persistent: the experiment's checkpoints hold no such keys; architecture() records the values
        self.register_buffer("mean", torch.tensor(self.rgb_mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(self.rgb_std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self._bn_frozen = False

    def architecture(self) -> dict[str, Any]:
        """``{"widths", "fc", "mean", "std"}``: the constructor's arguments besides ``num_classes`` (JSON types)."""
        return {"widths": list(self.widths), "fc": self.fc, "mean": list(self.rgb_mean), "std": list(self.rgb_std)}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, widths={self.widths}, fc={self.fc}"

    def freeze_bn(self) -> SmallFCN8s:
        """Keep every BatchNorm in eval mode (running statistics fixed) from now on, also under ``train()``."""
        self._bn_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, image: Tensor) -> Tensor:
        _check_image(image)
        H, W = image.shape[2:]
        x = (image.to(self.mean.dtype) - self.mean) / self.std
        x = F.pad(x, (0, (-W) % _STRIDE, 0, (-H) % _STRIDE))
        pools = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            pools.append(x)
        h = self.fc7(self.fc6(x))
        h = self.upscore2(self.score_fr(h)) + self.score_pool4(pools[3])
        h = self.upscore_pool4(h) + self.score_pool3(pools[2])
        return self.upscore8(h)[:, :, :H, :W].contiguous()
