"""The CRF-RNN networks: :class:`CrfRnnNet` (FCN-8s + CRF-RNN, the paper's network), :class:`CrfRnnHead`
(a CRF-RNN after any segmentation model) and :class:`TinyCrfRnnNet` (a seconds-fast smoke-test network).

**Unary scale.** Each network takes ``unary_scale`` (default 1.0): the unary network runs on the input resized by
that factor (:func:`scaled_unary`), its logits are upsampled bilinearly back to the input's size, and the CRF runs
at the input's size on the full-resolution image. A cheap network thus gives full-resolution output whose edges
the CRF draws from the full-resolution image (the geometry of the CRF-RNN paper, where FCN-8s' stride-8 scores are
upsampled before the CRF). At 1.0 nothing is resized: the forward pass is exactly the unscaled one.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn.meanfield import CrfRnn

from .fcn8s import FCN8s, _as_float, _check_image

__all__ = ["CrfRnnNet", "CrfRnnHead", "TinyCrfRnnNet", "UnaryNet", "scaled_unary", "check_unary_scale"]


def check_unary_scale(unary_scale: Any) -> float:
    """``unary_scale`` as a float; ``TypeError``/``ValueError`` unless it is a positive finite real number."""
    if isinstance(unary_scale, bool) or not isinstance(unary_scale, numbers.Real):
        raise TypeError(f"unary_scale must be a positive finite number, got {type(unary_scale).__name__} "
                        f"{unary_scale!r}")
    value = float(unary_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"unary_scale must be a positive finite number, got {unary_scale!r}")
    return value


def _scaled_size(size: tuple[int, int], unary_scale: float) -> tuple[int, int]:
    # the rounding of crfrnn.data.scale_pair, so a data set rescaled there and here gets the same sizes
    return max(1, round(size[0] * unary_scale)), max(1, round(size[1] * unary_scale))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, H, W) to ``size`` with half-pixel centres; antialiased where it shrinks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _valid_boxes(valid_mask: Tensor, shape: tuple[int, int]) -> list[tuple[int, int, int, int] | None]:
    """Per image, the bounding box ``(top, left, height, width)`` of its valid pixels (None: none valid)."""
    v = valid_mask.reshape(valid_mask.shape[0], *shape) != 0
    rows, cols = v.any(2).cpu(), v.any(1).cpu()
    boxes = []
    for r, c in zip(rows, cols):
        if not bool(r.any()):
            boxes.append(None)
            continue
        ri, ci = torch.nonzero(r)[:, 0], torch.nonzero(c)[:, 0]
        top, left = int(ri[0]), int(ci[0])
        boxes.append((top, left, int(ri[-1]) + 1 - top, int(ci[-1]) + 1 - left))
    return boxes


def scaled_unary(unary: Callable[[Tensor], Tensor], image: Tensor, unary_scale: float,
                 valid_mask: Tensor | None = None) -> Tensor:
    """Logits of ``unary`` run on ``image`` resized by ``unary_scale``, upsampled back to the image's size.

    Both resizes are bilinear with half-pixel centres (``align_corners=False``), antialiased where they shrink;
    the reduced size is ``max(1, round(H * unary_scale))`` (likewise W), as :func:`crfrnn.data.scale_pair`.

    With a ``valid_mask``, each image's unary network sees only its own pixels: the bounding box of its valid
    pixels is cut out, resized, scored and upsampled back into place (zeros elsewhere, where the CRF's mask keeps
    the logits out of the messages). Resizing the padded canvas instead would blend the padding into the image's
    border pixels and misalign the image's extent by a fraction of a pixel, so a padded batch would not give
    each image what it gets alone. Images whose boxes have one size are scored in one call. Invalid pixels
    inside a box (a mask that is not a rectangle) are seen as they are, like the unscaled network sees padding.

    Args:
        unary: maps (B, C, h, w) to logits (B, L, h', w') (any h', w'; they are upsampled to the box size).
        image: (B, C, H, W) floating input of ``unary`` (integer images are cast to the default dtype).
        unary_scale: positive factor (see :func:`check_unary_scale`).
        valid_mask: optional (B, 1, H, W), nonzero on real pixels.

    Returns:
        (B, L, H, W) logits.
    """
    unary_scale = check_unary_scale(unary_scale)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor (B, C, H, W), got {type(image).__name__}")
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W) to be resized by unary_scale, got {tuple(image.shape)}")
    x = image if image.is_floating_point() else image.to(torch.get_default_dtype())
    H, W = int(x.shape[2]), int(x.shape[3])

    def score(crops: Tensor) -> Tensor:
        size = (int(crops.shape[2]), int(crops.shape[3]))
        logits = unary(_resize(crops, _scaled_size(size, unary_scale)))
        if not isinstance(logits, Tensor) or logits.dim() != 4:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the unary network must return logits (B, L, h, w), got {got}")
        return _resize(logits, size)

    if valid_mask is None:
        return score(x)
    if not isinstance(valid_mask, Tensor):
        raise TypeError(f"valid_mask must be a torch.Tensor (B, 1, H, W), got {type(valid_mask).__name__}")
    if tuple(valid_mask.shape) != (x.shape[0], 1, H, W):
        raise ValueError(f"valid_mask must have shape (B, 1, H, W) = {(x.shape[0], 1, H, W)}, "
                         f"got {tuple(valid_mask.shape)}")
    boxes = _valid_boxes(valid_mask, (H, W))
    if all(b == (0, 0, H, W) for b in boxes):
        return score(x)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(boxes):
        if b is not None:
            groups.setdefault(b[2:], []).append(i)
    placed: dict[int, Tensor] = {}
    for (h, w), idx in groups.items():
        crops = torch.stack([x[i, :, boxes[i][0]:boxes[i][0] + h, boxes[i][1]:boxes[i][1] + w] for i in idx])
        for i, logits in zip(idx, score(crops)):
            top, left = boxes[i][:2]
            placed[i] = F.pad(logits, (left, W - left - w, top, H - top - h))
    if not placed:
        raise ValueError("valid_mask marks no pixel of any image as valid")
    like = next(iter(placed.values()))
    return torch.stack([placed.get(i, torch.zeros_like(like)) for i in range(x.shape[0])])


class CrfRnnNet(FCN8s):
    """CRF-RNN (Zheng et al., ICCV 2015): FCN-8s unaries followed by the mean-field CRF-RNN ``self.crfrnn``.

    The state dict is the FCN-8s keys plus ``crfrnn.spatial_ker_weights``, ``crfrnn.bilateral_ker_weights`` and
    ``crfrnn.compatibility_matrix`` (the layout of the published PyTorch weights; note their compatibility sign,
    handled by :func:`crfrnn.weights.load_crfasrnn_weights`).

    Args:
        num_classes: number of labels L.
        unary_scale: the FCN runs on the image resized by this factor; its logits are upsampled to the image's
            size before the CRF (see :func:`scaled_unary`). 1.0: no resizing.
        **crf_kwargs: passed to :class:`crfrnn.meanfield.CrfRnn` (``theta_alpha``, ``theta_beta``,
            ``theta_gamma``, ``spatial_weight``, ``bilateral_weight``, ``num_iterations``,
            ``num_test_iterations``, ...).
    """

    def __init__(self, num_classes: int = 21, *, unary_scale: float = 1.0, **crf_kwargs):
        super().__init__(num_classes)
        self.unary_scale = check_unary_scale(unary_scale)
        self.crfrnn = CrfRnn(self.num_classes, **crf_kwargs)

    def extra_repr(self) -> str:
        return f"unary_scale={self.unary_scale}"

    def unary(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """The CRF's unaries: FCN-8s logits of a raw RGB batch, (B, 3, H, W) in 0..255 -> (B, L, H, W); at
        ``unary_scale`` != 1 computed on the resized image (``valid_mask`` (B, 1, H, W): see
        :func:`scaled_unary`) and upsampled."""
        if self.unary_scale == 1.0:
            return FCN8s.forward(self, image)
        _check_image(image)
        x = _as_float(image, self.conv1_1.weight.dtype)
        return scaled_unary(lambda t: FCN8s.forward(self, t), x, self.unary_scale, valid_mask)

    def forward(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """Segment a raw RGB batch.

        Args:
            image: (B, 3, H, W) RGB in 0..255 (float or uint8). Normalised internally for the FCN; the raw RGB
                values feed the CRF's bilateral kernel.
            valid_mask: optional (B, 1, H, W) bool marking real (not padded) pixels, passed on to the CRF (see
                :class:`crfrnn.meanfield.CrfRnn`) and, at ``unary_scale`` != 1, to :func:`scaled_unary`.

        Returns:
            (B, L, H, W) logits after mean-field inference.
        """
        unary = self.unary(image, valid_mask)
        rgb = _as_float(image, unary.dtype)
        return self.crfrnn(unary, rgb, valid_mask=valid_mask)


def _check_head_args(model: Any, num_classes: Any) -> int:
    """``num_classes`` as an int, after checking that ``model`` is callable and L a positive integer."""
    if not callable(model):
        raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _model_logits(model: Callable, image: Tensor) -> Tensor:
    """``model(image)``, or its ``"out"`` entry (torchvision's segmentation models return a mapping)."""
    logits = model(image)
    if isinstance(logits, Mapping) and "out" in logits:
        logits = logits["out"]
    if not isinstance(logits, Tensor):
        raise TypeError(f"model must return a logits tensor (B, L, H, W), got {type(logits).__name__}")
    return logits


class CrfRnnHead(nn.Module):
    """A CRF-RNN after any segmentation model.

    Args:
        model: module mapping an input batch to logits (B, L, H, W) (a mapping with an ``"out"`` entry, as
            torchvision's segmentation models return, is accepted too).
        num_classes: number of labels L the model predicts.
        unary_scale: the model runs on ``image`` resized by this factor; its logits are upsampled to the size of
            ``image`` before the CRF (see :func:`scaled_unary`). 1.0: no resizing, and the model's logits must
            have the size of ``crf_image``.
        **crf_kwargs: passed to :class:`crfrnn.meanfield.CrfRnn`.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, unary_scale: float = 1.0, **crf_kwargs):
        super().__init__()
        self.num_classes = _check_head_args(model, num_classes)
        self.unary_scale = check_unary_scale(unary_scale)
        self.model = model
        self.crfrnn = CrfRnn(self.num_classes, **crf_kwargs)

    def extra_repr(self) -> str:
        return f"unary_scale={self.unary_scale}"

    def _model_logits(self, image: Tensor) -> Tensor:
        return _model_logits(self.model, image)

    def unary(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """The CRF's unaries: the model's logits of ``image`` (at ``unary_scale`` != 1 computed on the resized
        image, ``valid_mask`` (B, 1, H, W) as :func:`scaled_unary`, and upsampled to the image's size)."""
        if self.unary_scale == 1.0:
            return self._model_logits(image)
        return scaled_unary(self._model_logits, image, self.unary_scale, valid_mask)

    def forward(self, image: Tensor, crf_image: Tensor | None = None, valid_mask: Tensor | None = None) -> Tensor:
        """Run the model, then mean-field inference on its logits.

        Args:
            image: the model's input, e.g. a normalised (B, 3, H, W) batch.
            crf_image: (B, K, H, W) features for the CRF's bilateral kernel, typically the raw RGB image in
                0..255 (the kernel widths ``theta_beta`` are on that scale). Defaults to ``image``.
            valid_mask: optional (B, 1, H, W) mask passed on to the CRF and, at ``unary_scale`` != 1, to
                :func:`scaled_unary`.

        Returns:
            (B, L, H, W) logits after mean-field inference.
        """
        logits = self.unary(image, valid_mask)
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


class UnaryNet(nn.Module):
    """A segmentation model without CRF, run at a ``unary_scale``: the counterpart of :class:`CrfRnnHead` without
    the mean-field layer (same ``model`` and ``unary_scale``, so a CRF-RNN and its unary network compare alike).

    ``forward(image (B, 3, H, W), valid_mask=None) -> logits (B, L, H, W)``: ``model`` run on the image resized by
    ``unary_scale``, its logits upsampled back to the image's size (:func:`scaled_unary`; ``valid_mask``
    (B, 1, H, W) as there). :meth:`unary` is the same.

    Args:
        model: module mapping an image batch to logits (B, L, h, w) (or a mapping with an ``"out"`` entry).
        num_classes: number of labels L the model predicts (checked on every output).
        unary_scale: positive factor (see :func:`check_unary_scale`); 1.0: the model's logits as they are.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, unary_scale: float = 1.0):
        super().__init__()
        self.num_classes = _check_head_args(model, num_classes)
        self.unary_scale = check_unary_scale(unary_scale)
        self.model = model

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, unary_scale={self.unary_scale}"

    def _model_logits(self, image: Tensor) -> Tensor:
        return _model_logits(self.model, image)

    def unary(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """The model's logits of ``image`` (B, 3, H, W) -> (B, L, H, W), at ``unary_scale`` (see the class)."""
        if self.unary_scale == 1.0:
            logits = self._model_logits(image)
        else:
            logits = scaled_unary(self._model_logits, image, self.unary_scale, valid_mask)
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"model output must have shape (B, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        return logits

    def forward(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return self.unary(image, valid_mask)


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
        unary_scale: the convolutions run on the image resized by this factor, their logits are upsampled to the
            image's size (see :func:`scaled_unary`). 1.0: no resizing.
        **crf_kwargs: passed to :class:`~crfrnn.meanfield.CrfRnn`.
    """

    def __init__(self, num_classes: int, *, width: int = 8, crf: bool = True, unary_scale: float = 1.0,
                 **crf_kwargs: Any):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.unary_scale = check_unary_scale(unary_scale)
        self.tiny_conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.tiny_conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.tiny_score = nn.Conv2d(width, num_classes, 1)
        self.crfrnn = CrfRnn(num_classes, **crf_kwargs) if crf else None

    def extra_repr(self) -> str:
        return f"unary_scale={self.unary_scale}"

    def _convs(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.to(self.tiny_conv1.weight.dtype) - 128.0) / 64.0
        x = torch.relu(self.tiny_conv1(x))
        x = torch.relu(self.tiny_conv2(x))
        return self.tiny_score(x)

    def unary(self, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the convolutions: (B, 3, H, W) RGB 0..255 -> (B, L, H, W) (at ``unary_scale`` != 1
        computed on the resized image, ``valid_mask`` as :func:`scaled_unary`, and upsampled)."""
        if self.unary_scale == 1.0:
            return self._convs(image)
        return scaled_unary(self._convs, image.to(self.tiny_conv1.weight.dtype), self.unary_scale, valid_mask)

    def forward(self, image: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.unary(image, valid_mask)
        if self.crfrnn is None:
            return logits
        return self.crfrnn(logits, image.to(logits.dtype), valid_mask=valid_mask)
