"""The CRF-RNN networks: :class:`CrfRnnNet` (FCN-8s + CRF-RNN, the paper's network), :class:`CrfRnnHead`
(a CRF-RNN after any segmentation model) and :class:`TinyCrfRnnNet` (a seconds-fast smoke-test network)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from crfrnn.meanfield import CrfRnn

from .fcn8s import FCN8s, _as_float

__all__ = ["CrfRnnNet", "CrfRnnHead", "TinyCrfRnnNet"]


class CrfRnnNet(FCN8s):
    """CRF-RNN (Zheng et al., ICCV 2015): FCN-8s unaries followed by the mean-field CRF-RNN ``self.crfrnn``.

    The state dict is the FCN-8s keys plus ``crfrnn.spatial_ker_weights``, ``crfrnn.bilateral_ker_weights`` and
    ``crfrnn.compatibility_matrix`` (the layout of the published PyTorch weights; note their compatibility sign,
    handled by :func:`crfrnn.weights.load_crfasrnn_weights`).

    Args:
        num_classes: number of labels L.
        **crf_kwargs: passed to :class:`crfrnn.meanfield.CrfRnn` (``theta_alpha``, ``theta_beta``,
            ``theta_gamma``, ``spatial_weight``, ``bilateral_weight``, ``num_iterations``,
            ``num_test_iterations``, ...).
    """

    def __init__(self, num_classes: int = 21, **crf_kwargs):
        super().__init__(num_classes)
        self.crfrnn = CrfRnn(self.num_classes, **crf_kwargs)

    def unary(self, image: Tensor) -> Tensor:
        """FCN-8s logits (the CRF's unaries) of a raw RGB batch: (B, 3, H, W) in 0..255 -> (B, L, H, W)."""
        return FCN8s.forward(self, image)

    def forward(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """Segment a raw RGB batch.

        Args:
            image: (B, 3, H, W) RGB in 0..255 (float or uint8). Normalised internally for the FCN; the raw RGB
                values feed the CRF's bilateral kernel.
            valid_mask: optional mask passed on to the CRF (see :class:`crfrnn.meanfield.CrfRnn`), e.g.
                (B, H, W) bool marking real (not padded) pixels.

        Returns:
            (B, L, H, W) logits after mean-field inference.
        """
        unary = self.unary(image)
        rgb = _as_float(image, unary.dtype)
        return self.crfrnn(unary, rgb, valid_mask=valid_mask)


class CrfRnnHead(nn.Module):
    """A CRF-RNN after any segmentation model.

    Args:
        model: module mapping an input batch to logits (B, L, H, W) (a mapping with an ``"out"`` entry, as
            torchvision's segmentation models return, is accepted too).
        num_classes: number of labels L the model predicts.
        **crf_kwargs: passed to :class:`crfrnn.meanfield.CrfRnn`.
    """

    def __init__(self, model: nn.Module, num_classes: int, **crf_kwargs):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.model = model
        self.crfrnn = CrfRnn(self.num_classes, **crf_kwargs)

    def forward(self, image: Tensor, crf_image: Tensor | None = None, valid_mask: Tensor | None = None) -> Tensor:
        """Run the model, then mean-field inference on its logits.

        Args:
            image: the model's input, e.g. a normalised (B, 3, H, W) batch.
            crf_image: (B, K, H, W) features for the CRF's bilateral kernel, typically the raw RGB image in
                0..255 (the kernel widths ``theta_beta`` are on that scale). Defaults to ``image``.
            valid_mask: optional mask passed on to the CRF.

        Returns:
            (B, L, H, W) logits after mean-field inference.
        """
        logits = self.model(image)
        if isinstance(logits, Mapping) and "out" in logits:
            logits = logits["out"]
        if not isinstance(logits, Tensor):
            raise TypeError(f"model must return a logits tensor (B, L, H, W), got {type(logits).__name__}")
        crf_image = image if crf_image is None else crf_image
        if not isinstance(crf_image, Tensor):
            raise TypeError(f"crf_image must be a torch.Tensor (B, K, H, W), got {type(crf_image).__name__}")
        if logits.dim() < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"model output must have shape (B, {self.num_classes}, H, W), got {tuple(logits.shape)}"
            )
        if crf_image.dim() != logits.dim() or crf_image.shape[0] != logits.shape[0] or (
            crf_image.shape[2:] != logits.shape[2:]
        ):
            raise ValueError(
                f"crf_image of shape {tuple(crf_image.shape)} does not match the model's logits of shape "
                f"{tuple(logits.shape)}: batch and spatial sizes must be equal"
            )
        return self.crfrnn(logits, _as_float(crf_image, logits.dtype), valid_mask=valid_mask)


class TinyCrfRnnNet(nn.Module):
    """A smoke-test segmentation network: three small convolutions and, optionally, a CRF-RNN on top.

    **Not a real model.** It exists so that the command line (``crfrnn train/eval/segment --model tiny``)
    and its tests can run the whole pipeline in seconds on a CPU. Parameter names start with ``tiny_``
    (and ``crfrnn.`` for the CRF), so checkpoints are recognised by their keys.

    ``forward(image (B, 3, H, W) RGB 0..255, valid_mask=None) -> logits (B, L, H, W)``;
    :meth:`unary` gives the logits before the CRF.

    Args:
        num_classes: L >= 2.
        width: channels of the hidden layers.
        crf: put a :class:`crfrnn.meanfield.CrfRnn` on the convolutions' logits.
        **crf_kwargs: passed to :class:`~crfrnn.meanfield.CrfRnn`.
    """

    def __init__(self, num_classes: int, *, width: int = 8, crf: bool = True, **crf_kwargs: Any):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.tiny_conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.tiny_conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.tiny_score = nn.Conv2d(width, num_classes, 1)
        self.crfrnn = CrfRnn(num_classes, **crf_kwargs) if crf else None

    def unary(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of the convolutions: (B, 3, H, W) RGB 0..255 -> (B, L, H, W)."""
        x = (image.to(self.tiny_conv1.weight.dtype) - 128.0) / 64.0
        x = torch.relu(self.tiny_conv1(x))
        x = torch.relu(self.tiny_conv2(x))
        return self.tiny_score(x)

    def forward(self, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.unary(image)
        if self.crfrnn is None:
            return logits
        return self.crfrnn(logits, image.to(logits.dtype), valid_mask=valid_mask)
