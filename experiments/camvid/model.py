"""The networks of the experiment (:class:`TinyFCN8s` = :class:`crfrnn.models.SmallFCN8s`, CRF-RNN heads over it)
and prediction over a split."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crfrnn.engine.metrics import confusion_matrix
from crfrnn.meanfield import mean_field
from crfrnn.models import CrfRnnHead, SmallFCN8s

from .common import IGNORE, MAIN_CRF, NUM_CLASSES

# the network lives in the library (so trained models can be shipped as files crfrnn eval/segment read); the
# experiment's name for it stays
TinyFCN8s = SmallFCN8s


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
