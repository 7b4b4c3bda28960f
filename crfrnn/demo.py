"""The built-in demo: a generated scene with ground truth, a coarse FCN-like prediction of it, and its
dense-CRF refinement.

Nothing here is downloaded: :func:`make_scene` draws a deterministic picture (textured shapes of a few
classes on a textured background, with colour differences and noise) together with its exact labels, and
:func:`coarse_logits` imitates what an FCN-8s outputs for it (the ground truth seen at the network's
output stride of 8, upsampled bilinearly, with noise): blobby, with rounded and misplaced boundaries and
some wrong patches. :func:`refine_logits` runs the dense CRF (:func:`crfrnn.meanfield.mean_field`) on it,
which pulls the boundaries back onto the image edges. :func:`evaluate_pair` does all of that for one
(image, ground truth) pair and returns the confusion matrices before and after, so the same recipe runs on
real data (``crfrnn demo --data DIR``).

Shapes follow :mod:`crfrnn.data`: an image is float32 ``(3, H, W)`` RGB in 0..255, a mask int64 ``(H, W)``
with class ids in ``[0, L)`` or ``ignore_index``; logits are ``(L, H, W)``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crfrnn.engine.metrics import confusion_matrix
from crfrnn.meanfield import mean_field

__all__ = [
    "SCENE_CLASSES",
    "DEMO_CRF",
    "make_scene",
    "coarse_logits",
    "refine_logits",
    "evaluate_pair",
]

#: Class names of :func:`make_scene` (label k = entry k).
SCENE_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "bar")

#: Dense-CRF parameters of the demo: CRF-RNN's PASCAL VOC initialisation (the defaults of
#: :func:`crfrnn.meanfield.mean_field`: bilateral θα = 160 px, θβ = 3 colour levels, weight 5; spatial
#: θγ = 3 px, weight 3; Potts), 5 mean-field iterations.
DEMO_CRF: dict[str, Any] = dict(
    theta_alpha=160.0, theta_beta=3.0, theta_gamma=3.0, spatial_weight=3.0, bilateral_weight=5.0, num_iterations=5
)

# base colour (RGB) and texture of each class
_STYLE = (
    ((118, 128, 104), "grass"),
    ((196, 72, 60), "stripes"),
    ((70, 110, 190), "checker"),
    ((222, 190, 70), "speckle"),
    ((150, 84, 170), "stripes"),
    ((88, 170, 150), "checker"),
)


_PULL, _TEXTURE, _NOISE = 0.25, 25.0, 8.0  # colour pulled towards the background, texture amplitude, pixel noise


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) texture in about [-1, 1]."""
    h, w = yy.shape
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 12)
        return np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    if kind == "checker":
        s = int(rng.integers(5, 9))
        return np.where(((yy // s) + (xx // s)) % 2 == 0, 0.8, -0.8)
    if kind == "speckle":
        return np.clip(rng.normal(0, 0.9, (h, w)), -2, 2)
    # "grass": low-frequency blotches plus fine grain
    coarse = rng.normal(0, 1, ((h + 15) // 16 + 1, (w + 15) // 16 + 1))
    t = torch.from_numpy(coarse)[None, None]
    blot = F.interpolate(t, scale_factor=16, mode="bicubic", align_corners=False)[0, 0, :h, :w].numpy()
    return 0.7 * blot + 0.3 * rng.normal(0, 1, (h, w))


def _shape_mask(kind: int, yy, xx, cy, cx, r, rng) -> np.ndarray:
    if kind == 1:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    if kind == 2:  # box, possibly rotated
        a = rng.uniform(0, math.pi / 2)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        return (np.abs(u) < r) & (np.abs(v) < r * rng.uniform(0.5, 1.0))
    if kind == 3:  # triangle
        a0 = rng.uniform(0, 2 * math.pi)
        angles = [a0 + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        inside = np.ones(yy.shape, bool)
        sign = None
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            s = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
            sign = np.sign((x1 - x0) * (cy - y0) - (y1 - y0) * (cx - x0)) if sign is None else sign
            inside &= s * sign > 0
        return inside
    if kind == 4:  # ring
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    # bar: a long thin rotated rectangle
    a = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    return (np.abs(u) < 1.6 * r) & (np.abs(v) < max(4.0, 0.18 * r))


def make_scene(height: int = 360, width: int = 480, *, num_classes: int = 6, seed: int = 0):
    """A deterministic textured scene and its exact labels.

    Background (class 0, green-grey blotches) with 2 to 3 objects of every other class
    (:data:`SCENE_CLASSES`: discs, rotated boxes, triangles, rings, thin bars), each with its own base
    colour, a texture (stripes, checker, speckle), a random brightness shift and Gaussian pixel noise.
    Later shapes occlude earlier ones.

    Args:
        height, width: image size (at least 32 x 32).
        num_classes: L, 2..6 (background + L-1 shape classes).
        seed: the same seed gives the same scene.

    Returns:
        ``(image, mask)``: image float32 ``(3, H, W)`` RGB with integer values in 0..255, mask int64
        ``(H, W)`` in ``[0, L)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be an int in [2, {len(SCENE_CLASSES)}], got {num_classes!r}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 32:
            raise ValueError(f"{name} must be an int >= 32, got {v!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    mask = np.zeros((height, width), np.int64)
    colour = np.zeros((height, width, 3))
    base, tex = _STYLE[0]
    t = _texture(tex, yy, xx, rng)
    colour[:] = np.asarray(base, float) + 28 * t[..., None] + np.stack([xx / width * 30, yy / height * 20, 0 * xx], -1)
    scale = min(height, width)
    objects = [k for k in range(1, num_classes) for _ in range(int(rng.integers(2, 4)))]
    rng.shuffle(objects)
    for k in objects:
        r = rng.uniform(0.08, 0.17) * scale
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        inside = _shape_mask(k, yy, xx, cy, cx, r, rng)
        base, tex = _STYLE[k]
        t = _texture(tex, yy, xx, rng)
        shade = (1 - _PULL) * np.asarray(base, float) + _PULL * np.asarray(_STYLE[0][0], float) + rng.normal(0, 10, 3)
        mask[inside] = k
        colour[inside] = shade + _TEXTURE * t[inside][:, None]
    colour += rng.normal(0, _NOISE, colour.shape)
    image = np.clip(np.rint(colour), 0, 255).astype(np.float32)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)


def coarse_logits(
    mask: torch.Tensor,
    num_classes: int,
    *,
    stride: int = 8,
    blur: float = 1.5,
    confidence: float = 12.0,
    noise: float = 3.0,
    seed: int = 0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """An FCN-like coarse prediction made from ground truth.

    1. The one-hot ground truth is averaged over ``stride x stride`` cells (FCN-8s's output stride; ignored
       pixels do not count; a cell without labelled pixels is uniform over the classes of the mask).
    2. These low-resolution probabilities are blurred with a Gaussian of ``blur`` cells (a network's
       receptive field makes its scores smooth): corners round off, thin parts fade.
    3. Scores ``confidence * p + N(0, noise^2)`` per cell and class (some cells come out wrong, as a network's
       do); classes absent from the mask get ``-confidence`` (a network rarely hesitates about classes
       that are not in the picture at all).
    4. Bilinear upsampling to the mask's size: boundaries are blurred and shifted by several pixels.

    Args:
        mask: int64 ``(H, W)`` labels in ``[0, L)`` or ``ignore_index``.
        num_classes: L.
        stride, blur, confidence, noise, seed: see above; the same seed gives the same prediction.

    Returns:
        float32 logits ``(L, H, W)`` (``softmax`` over axis 0 gives probabilities).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_floating_point():
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be an integer tensor of shape (H, W), got {got}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if not (blur >= 0 and math.isfinite(blur)):
        raise ValueError(f"blur must be a finite number >= 0, got {blur!r}")
    valid = mask != ignore_index
    if bool(((mask[valid] < 0) | (mask[valid] >= num_classes)).any()):
        raise ValueError(
            f"mask (shape {tuple(mask.shape)}) holds labels outside [0, {num_classes}) other than {ignore_index}"
        )
    h, w = mask.shape
    onehot = F.one_hot(torch.where(valid, mask, 0), num_classes).permute(2, 0, 1).to(torch.float32)
    onehot = onehot * valid.to(torch.float32)
    hs, ws = math.ceil(h / stride), math.ceil(w / stride)
    padded = F.pad(onehot[None], (0, ws * stride - w, 0, hs * stride - h))
    cells = F.avg_pool2d(padded, stride)[0]  # (L, hs, ws)
    present = cells.sum((1, 2)) > 0
    if not bool(present.any()):
        present = torch.ones_like(present)
    total = cells.sum(0, keepdim=True)
    uniform = (present.to(torch.float32) / present.sum())[:, None, None].expand_as(cells)
    p = torch.where(total > 0, cells / total.clamp_min(1e-12), uniform)
    if blur > 0:
        r = max(1, math.ceil(2 * blur))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * blur * blur))
        k = k / k.sum()
        q = F.pad(p[:, None], (r, r, 0, 0), mode="replicate")
        q = F.conv2d(q, k.view(1, 1, 1, -1))
        q = F.pad(q, (0, 0, r, r), mode="replicate")
        p = F.conv2d(q, k.view(1, 1, -1, 1))[:, 0]
    g = torch.Generator().manual_seed(int(seed))
    low = confidence * p + noise * torch.randn(p.shape, generator=g)
    low = torch.where(present[:, None, None], low, torch.full_like(low, -float(confidence)))
    # bilinear upsampling of the padded grid, then crop: cell centres land on the cells' pixels
    up = F.interpolate(low[None], size=(hs * stride, ws * stride), mode="bilinear", align_corners=False)[0]
    return up[:, :h, :w].contiguous()


def refine_logits(image: torch.Tensor, logits: torch.Tensor, **crf: Any) -> torch.Tensor:
    """Dense-CRF mean field on one image: ``image (3, H, W)`` RGB 0..255, ``logits (L, H, W)`` -> ``(L, H, W)``.

    ``crf`` overrides :data:`DEMO_CRF` (any :func:`crfrnn.meanfield.mean_field` keyword). The unary is
    the log-softmax of ``logits`` (pydensecrf's ``-log p``).
    """
    params = {**DEMO_CRF, **crf}
    unary = torch.log_softmax(logits.to(torch.float32), 0)[None]
    rgb = image.to(device=unary.device, dtype=torch.float32)[None]
    with torch.no_grad():
        return mean_field(unary, rgb, **params)[0]


def evaluate_pair(
    image: torch.Tensor,
    mask: torch.Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    coarse: dict | None = None,
    crf: dict | None = None,
) -> dict[str, Any]:
    """Coarse prediction of ``mask``, its dense-CRF refinement and both confusion matrices.

    Args:
        image: float ``(3, H, W)`` RGB 0..255.
        mask: int64 ``(H, W)`` ground truth (``ignore_index`` not counted).
        num_classes: L.
        seed: seed of :func:`coarse_logits`.
        device: where the CRF runs.
        coarse, crf: extra keyword arguments of :func:`coarse_logits` / :func:`refine_logits`.

    Returns:
        dict with ``coarse`` and ``refined`` int64 ``(H, W)`` labels (CPU), ``conf_coarse`` and
        ``conf_refined`` ``(L, L)`` confusion matrices (rows ground truth) and ``seconds`` (CRF time).
    """
    if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != tuple(mask.shape):
        raise ValueError(f"image (3, H, W) {tuple(image.shape)} and mask (H, W) {tuple(mask.shape)} differ in size")
    logits = coarse_logits(mask, num_classes, seed=seed, ignore_index=ignore_index, **(coarse or {}))
    t0 = time.perf_counter()
    refined = refine_logits(image.to(device), logits.to(device), **(crf or {})).argmax(0).cpu()
    seconds = time.perf_counter() - t0
    before = logits.argmax(0)
    return {
        "coarse": before,
        "refined": refined,
        "conf_coarse": confusion_matrix(before, mask, num_classes, ignore_index),
        "conf_refined": confusion_matrix(refined, mask, num_classes, ignore_index),
        "seconds": seconds,
    }
