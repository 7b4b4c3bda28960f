"""The networks of the experiment (:class:`TinyFCN8s`, CRF-RNN heads over it) and prediction over a split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crfrnn.engine.metrics import confusion_matrix
from crfrnn.meanfield import mean_field
from crfrnn.models import CrfRnnHead, bilinear_upsampling_weights

from .common import IGNORE, MAIN_CRF, NUM_CLASSES


class TinyFCN8s(nn.Module):
    """A narrow VGG-style FCN-8s: five 2-conv stages (3x3 conv + BN + ReLU), 2x2 max-pools, ``fc6`` (3x3) and
    ``fc7`` (1x1) as convolutions, score layers on fc7 / pool4 / pool3 and the FCN-8s fusion
    (``upscore2`` -> + ``score_pool4`` -> ``upscore_pool4`` -> + ``score_pool3`` -> ``upscore8``, deconvolutions
    initialised to bilinear upsampling, score layers to zero, as FCN).

    ``forward(image (B, 3, H, W) raw RGB 0..255) -> logits (B, L, H, W)``; any H, W (the normalised input is
    zero-padded at the bottom/right to a multiple of 32 and the logits cropped back).
    ``freeze_bn()`` keeps every BatchNorm in eval mode from then on (used while fine-tuning the CRF-RNN arms).
    """

    MEAN = (0.390, 0.405, 0.414)  # CamVid RGB statistics (0..1 scale), rounded
    STD = (0.30, 0.31, 0.31)

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(16, 32, 64, 96, 128), fc: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.widths = tuple(widths)
        stages, cin = [], 3
        for w in widths:
            stages.append(nn.Sequential(_cbr(cin, w), _cbr(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc6 = _cbr(cin, fc)
        self.fc7 = _cbr(fc, fc, k=1)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        L = num_classes
        self.upscore2 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(L, L, 16, stride=8, padding=4, bias=False)
        with torch.no_grad():
            for conv in (self.score_fr, self.score_pool4, self.score_pool3):
                conv.weight.zero_()
                conv.bias.zero_()
            for d in (self.upscore2, self.upscore_pool4, self.upscore8):
                d.weight.copy_(bilinear_upsampling_weights(L, L, d.kernel_size[0]))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self._bn_frozen = False

    def freeze_bn(self) -> "TinyFCN8s":
        self._bn_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        H, W = image.shape[2:]
        x = (image.to(self.mean.dtype) - self.mean) / self.std
        x = F.pad(x, (0, (-W) % 32, 0, (-H) % 32))
        pools = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            pools.append(x)
        h = self.fc7(self.fc6(x))
        h = self.upscore2(self.score_fr(h)) + self.score_pool4(pools[3])
        h = self.upscore_pool4(h) + self.score_pool3(pools[2])
        return self.upscore8(h)[:, :, :H, :W].contiguous()


def _cbr(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def crf_kwargs_for(params: dict[str, float], overrides: dict[str, Any], test_iterations: int) -> dict[str, Any]:
    """CrfRnn kwargs of a fine-tuned arm: the main arm's layout, ``overrides``, the grid's CRF parameters."""
    kw = dict(MAIN_CRF)
    kw.update(overrides)
    kw.update(
        theta_alpha=params["theta_alpha"], theta_beta=params["theta_beta"], theta_gamma=params["theta_gamma"],
        spatial_weight=params["spatial_weight"], bilateral_weight=params["bilateral_weight"],
        num_iterations=5, num_test_iterations=test_iterations,
    )
    return kw


def build_head(fcn_state: dict, widths, fc: int, crf_kwargs: dict[str, Any], frozen: bool) -> CrfRnnHead:
    """A CRF-RNN over a copy of the trained FCN (BatchNorm statistics frozen; all its weights with ``frozen``)."""
    fcn = TinyFCN8s(NUM_CLASSES, widths, fc)
    fcn.load_state_dict(fcn_state)
    fcn.freeze_bn()
    if frozen:
        for p in fcn.parameters():
            p.requires_grad_(False)
    return CrfRnnHead(fcn, NUM_CLASSES, **crf_kwargs)


def crf_param_summary(head: CrfRnnHead) -> dict[str, Any]:
    c = head.crfrnn
    return {
        "spatial_ker_weights": c.spatial_ker_weights.detach().tolist(),
        "bilateral_ker_weights": c.bilateral_ker_weights.detach().tolist(),
        "compatibility_matrix": c.compatibility_matrix.detach().tolist(),
    }


@torch.no_grad()
def predict(fn, images: torch.Tensor, masks: torch.Tensor, batch: int = 1):
    """Run ``fn(images (B, 3, H, W) float) -> logits`` over a split; return (labels uint8 (N, H, W), conf)."""
    labels = torch.empty(masks.shape, dtype=torch.uint8)
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for s in range(0, images.shape[0], batch):
        logits = fn(images[s : s + batch].float())
        pred = logits.argmax(1)
        labels[s : s + batch] = pred.to(torch.uint8)
        conf += confusion_matrix(pred, masks[s : s + batch].long(), NUM_CLASSES, IGNORE)
    return labels, conf


def post_crf_fn(fcn: nn.Module, params: dict[str, float], num_iterations: int = 10):
    """The FCN followed by dense-CRF post-processing (:func:`crfrnn.meanfield.mean_field`)."""

    def fn(images):
        return mean_field(fcn(images), images, num_iterations=num_iterations, **params)

    return fn
