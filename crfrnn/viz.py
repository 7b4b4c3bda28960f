"""Pictures for segmentation results, drawn with Pillow only (no matplotlib).

* Palettes: :func:`palette` (``"voc"``, ``"camvid"`` or a generic set of distinct colours,
  :func:`distinct_palette`), all ``(N, 3)`` uint8 arrays indexed by label.
* :func:`colorize` labels -> RGB picture, :func:`label_image` labels -> palette (mode ``P``) PNG image,
  :func:`overlay` labels blended over a photo, :func:`side_by_side` panels with titles above them.
* :func:`compat_heatmap` a label-compatibility matrix as a labelled heat-map with a diverging colour map
  and a colour bar (as Figure 5 of the CRF-RNN paper).
* :func:`training_curves` the training loss and validation mean IU of a run folder's ``metrics.jsonl``.
* :func:`save_image` writes any of these atomically (temporary file in the same folder, then
  ``os.replace``).

Inputs: labels are integer ``(H, W)`` arrays or tensors; images are ``(H, W, 3)`` uint8 arrays,
``(3, H, W)`` float/uint8 tensors in 0..255, or PIL images. Every function returns a PIL image.
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crfrnn.data import CAMVID_PALETTE, voc_palette

__all__ = [
    "distinct_palette",
    "palette",
    "colorize",
    "label_image",
    "overlay",
    "side_by_side",
    "compat_heatmap",
    "training_curves",
    "read_metrics",
    "save_image",
]

_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)


# ------------------------------------------------------------------------------------------------ palettes
def distinct_palette(num_colors: int = 256) -> np.ndarray:
    """``(num_colors, 3)`` uint8 of well-separated colours: black for label 0, then golden-ratio hues.

    Hue steps of the golden ratio, alternating saturation/value, so neighbouring labels differ strongly.
    """
    if isinstance(num_colors, bool) or not isinstance(num_colors, int) or not 1 <= num_colors <= 65536:
        raise ValueError(f"num_colors must be an int in [1, 65536], got {num_colors!r}")
    out = np.zeros((num_colors, 3), np.uint8)
    for k in range(1, num_colors):
        h = (0.11 + 0.618033988749895 * k) % 1.0
        s = (0.9, 0.6, 0.75)[k % 3]
        v = (0.95, 0.75, 0.55)[(k // 3) % 3]
        out[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)]
    return out


def palette(name: str | int = "voc", num_colors: int = 256) -> np.ndarray:
    """A label palette ``(N, 3)`` uint8.

    Args:
        name: ``"voc"`` (PASCAL VOC colour map, 256 entries, 255 = void cream), ``"camvid"`` (SegNet's 11
            class colours + black void, padded to ``num_colors`` with distinct colours and 255 black) or
            ``"distinct"`` / ``"generic"``.
        num_colors: number of entries (at least the largest label + 1).
    """
    key = str(name).lower()
    if key == "voc":
        return voc_palette(min(num_colors, 256)) if num_colors <= 256 else _extend(voc_palette(256), num_colors)
    if key == "camvid":
        pal = _extend(np.asarray(CAMVID_PALETTE), max(num_colors, 12))
        if pal.shape[0] > 255:
            pal[255] = 0  # the loaders map CamVid's void to 255
        return pal[:num_colors]
    if key in ("distinct", "generic"):
        return distinct_palette(num_colors)
    raise ValueError(f"unknown palette {name!r}; use 'voc', 'camvid' or 'distinct'")


def _extend(pal: np.ndarray, n: int) -> np.ndarray:
    if pal.shape[0] >= n:
        return pal[:n].copy()
    extra = distinct_palette(n)[pal.shape[0] :]
    return np.concatenate([pal, extra], 0).astype(np.uint8)


def _check_palette(pal, need: int, what: str = "labels") -> np.ndarray:
    pal = np.asarray(pal)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
        raise ValueError(f"palette must have shape (N, 3), got {pal.shape}")
    if pal.shape[0] < need:
        raise ValueError(f"palette has {pal.shape[0]} colours but the {what} go up to {need - 1}")
    return np.clip(pal, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- inputs
def _labels(labels, name: str = "labels") -> np.ndarray:
    try:
        import torch

        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(labels, Image.Image):
        labels = np.array(labels)
    a = np.asarray(labels)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {a.shape}")
    if a.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {a.dtype} (shape {a.shape})")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} hold negative values (min {a.min()})")
    return a.astype(np.int64)


def _rgb(image, name: str = "image") -> np.ndarray:
    """``(H, W, 3)`` uint8 from a PIL image, an (H, W, 3) array or a (3, H, W) tensor/array in 0..255."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
                image = image.permute(1, 2, 0)
            image = image.numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"{name} must be (H, W, 3), (3, H, W) or (H, W), got {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, 2)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------------------------------------ pictures
def colorize(labels, pal=None) -> Image.Image:
    """RGB picture of a label map: label ``k`` gets ``pal[k]`` (default: the VOC palette)."""
    a = _labels(labels)
    pal = palette("voc") if pal is None else pal
    pal = _check_palette(pal, int(a.max()) + 1 if a.size else 1)
    return Image.fromarray(pal[a], "RGB")


def label_image(labels, pal=None) -> Image.Image:
    """Palette (mode ``P``) image of a label map whose pixel values are the labels (0..255), the usual
    VOC-style label PNG: it opens as colours in a viewer and as indices with ``np.array(Image.open(...))``."""
    a = _labels(labels)
    if a.size and a.max() > 255:
        raise ValueError(f"labels go up to {a.max()}; a palette PNG holds at most 256 labels (0..255)")
    pal = palette("voc") if pal is None else pal
    pal = _check_palette(pal, int(a.max()) + 1 if a.size else 1)
    full = np.zeros((256, 3), np.uint8)
    full[: min(256, pal.shape[0])] = pal[:256]
    im = Image.fromarray(a.astype(np.uint8), "P")
    im.putpalette(full.reshape(-1).tolist())
    return im


def overlay(image, labels, pal=None, alpha: float = 0.5, ignore_index: int | None = 255) -> Image.Image:
    """Labels blended over an image: ``(1 - alpha) * image + alpha * colour``; ``ignore_index`` pixels
    (and label 0 of a palette whose entry 0 is black, the usual background) are left as they are."""
    rgb = _rgb(image)
    a = _labels(labels)
    if a.shape != rgb.shape[:2]:
        raise ValueError(f"labels (H, W)={a.shape} and image (H, W, 3)={rgb.shape} differ in size")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    pal = palette("voc") if pal is None else pal
    pal = _check_palette(pal, int(a.max()) + 1 if a.size else 1)
    colour = pal[a].astype(np.float64)
    keep = np.ones(a.shape, bool)
    if ignore_index is not None:
        keep &= a != ignore_index
    if not pal[0].any():
        keep &= a != 0
    out = rgb.astype(np.float64)
    out[keep] = (1 - alpha) * out[keep] + alpha * colour[keep]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):  # Pillow < 10.1 or no FreeType: bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _as_pil(panel) -> Image.Image:
    if isinstance(panel, Image.Image):
        return panel.convert("RGB")
    return Image.fromarray(_rgb(panel, "panel"), "RGB")


def side_by_side(panels: Sequence, titles: Sequence[str] | None = None, *, pad: int = 6,
                 font_size: int = 14) -> Image.Image:
    """Panels in one row on a white background, each with its title centred above it.

    Args:
        panels: PIL images or image arrays (any sizes; shorter ones are top-aligned).
        titles: one title per panel (``None``: no titles).
        pad: margin in pixels around and between panels.
    """
    ims = [_as_pil(p) for p in panels]
    if not ims:
        raise ValueError("side_by_side needs at least one panel")
    if titles is not None and len(titles) != len(ims):
        raise ValueError(f"got {len(ims)} panels but {len(titles)} titles")
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = 0 if titles is None else max(_text_size(probe, t or "Ag", font)[1] for t in list(titles) + ["Ag"]) + pad
    width = sum(im.width for im in ims) + pad * (len(ims) + 1)
    height = max(im.height for im in ims) + title_h + 2 * pad
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    x = pad
    for k, im in enumerate(ims):
        if titles is not None and titles[k]:
            tw, _ = _text_size(draw, titles[k], font)
            draw.text((x + max(0, (im.width - tw) // 2), pad), titles[k], fill=_BLACK, font=font)
        canvas.paste(im, (x, pad + title_h))
        x += im.width + pad
    return canvas


# ----------------------------------------------------------------------------------------------- heat-map
def _diverging(t: np.ndarray) -> np.ndarray:
    """Blue - white - red colour map of ``t`` in [-1, 1] -> (..., 3) uint8 (RdBu-like, reversed)."""
    stops = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    cols = np.array([[5, 48, 97], [67, 147, 195], [247, 247, 247], [214, 96, 77], [103, 0, 31]], float)
    t = np.clip(t, -1, 1)
    out = np.stack([np.interp(t, stops, cols[:, c]) for c in range(3)], -1)
    return np.rint(out).astype(np.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def compat_heatmap(matrix, class_names: Sequence[str] | None = None, *, title: str | None = None,
                   cell: int = 26, annotate: bool | None = None) -> Image.Image:
    """A compatibility matrix (L, L) as a labelled heat-map (cf. Figure 5 of the CRF-RNN paper).

    Diverging colour map centred on 0 (blue negative, white 0, red positive, symmetric range
    ``±max|m|``), class names along both axes (rows on the left, columns on top, written vertically),
    a colour bar with its range on the right. With ``annotate`` (default: L <= 12) every cell shows its value.
    """
    try:
        import torch

        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().cpu().to(torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"matrix must be square (L, L), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"matrix (shape {m.shape}) contains NaN or infinite values")
    L = m.shape[0]
    names = [str(k) for k in range(L)] if class_names is None else [str(n) for n in class_names]
    if len(names) != L:
        raise ValueError(f"class_names has {len(names)} names but the matrix is {L} x {L}")
    annotate = L <= 12 if annotate is None else annotate
    vmax = float(np.abs(m).max()) or 1.0
    font = _font(max(9, min(14, cell // 2)))
    small = _font(max(8, min(12, cell // 2 - 2)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_size(probe, n, font)[0] for n in names) + 8
    title_h = (_text_size(probe, title, font)[1] + 12) if title else 0
    pad, bar_w = 10, 16
    grid = L * cell
    tick_w = max(_text_size(probe, _fmt(v), small)[0] for v in (vmax, -vmax, 0.0)) + 6
    W = pad + name_w + grid + 2 * pad + bar_w + tick_w + pad
    H = pad + title_h + name_w + grid + pad
    img = Image.new("RGB", (W, H), _WHITE)
    draw = ImageDraw.Draw(img)
    x0, y0 = pad + name_w, pad + title_h + name_w
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((W - tw) // 2, pad), title, fill=_BLACK, font=font)
    colours = _diverging(m / vmax)
    for i in range(L):
        for j in range(L):
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            draw.rectangle(box, fill=tuple(int(c) for c in colours[i, j]))
            if annotate:
                s = f"{m[i, j]:.2f}" if abs(m[i, j]) < 10 else f"{m[i, j]:.0f}"
                tw, th = _text_size(draw, s, small)
                lum = colours[i, j].astype(float) @ [0.299, 0.587, 0.114]
                draw.text((box[0] + (cell - tw) // 2, box[1] + (cell - th) // 2 - 1), s,
                          fill=_WHITE if lum < 120 else _BLACK, font=small)
    draw.rectangle((x0 - 1, y0 - 1, x0 + grid, y0 + grid), outline=_GREY)
    for i, n in enumerate(names):  # row names, right-aligned left of the grid
        tw, th = _text_size(draw, n, font)
        draw.text((x0 - 6 - tw, y0 + i * cell + (cell - th) // 2 - 2), n, fill=_BLACK, font=font)
    for j, n in enumerate(names):  # column names, vertical, above the grid
        tw, th = _text_size(draw, n, font)
        tile = Image.new("RGB", (tw + 2, th + 6), _WHITE)
        ImageDraw.Draw(tile).text((1, 0), n, fill=_BLACK, font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (x0 + j * cell + (cell - tile.width) // 2, y0 - 6 - tile.height))
    # colour bar: top = +vmax, bottom = -vmax
    bx = x0 + grid + 2 * pad
    ramp = np.linspace(1, -1, grid)[:, None].repeat(bar_w, 1)
    img.paste(Image.fromarray(_diverging(ramp), "RGB"), (bx, y0))
    draw.rectangle((bx - 1, y0 - 1, bx + bar_w, y0 + grid), outline=_GREY)
    for v, y in ((vmax, y0), (0.0, y0 + grid // 2), (-vmax, y0 + grid - 1)):
        draw.line((bx + bar_w, y, bx + bar_w + 3, y), fill=_BLACK)
        _, th = _text_size(draw, _fmt(v), small)
        draw.text((bx + bar_w + 5, min(max(y - th // 2 - 2, 0), H - th - 4)), _fmt(v), fill=_BLACK, font=small)
    return img


# ------------------------------------------------------------------------------------------ training curves
def read_metrics(path) -> list[dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (a folder is taken to mean its ``metrics.jsonl``);
    see :func:`crfrnn.engine.runfiles.read_metrics`."""
    from crfrnn.engine.runfiles import read_metrics as _read

    return _read(path)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _plot(draw, box, xs, ys, colour, title, font, small, ylim=None):
    """Line plot of (xs, ys) into box (x0, y0, x1, y1) with axes, ticks and a title."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 20), title, fill=_BLACK, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=_BLACK)
    if not xs:
        draw.text((x0 + 10, y0 + 10), "no data", fill=_GREY, font=font)
        return
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = ylim if ylim is not None else (min(ys), max(ys))
    if yhi == ylo:
        ylo, yhi = ylo - 0.5 * (abs(ylo) or 1), yhi + 0.5 * (abs(yhi) or 1)
    span = yhi - ylo
    if ylim is None:
        ylo, yhi = ylo - 0.05 * span, yhi + 0.05 * span
    px = lambda x: x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)  # noqa: E731
    py = lambda y: y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)  # noqa: E731
    for t in _nice_ticks(ylo, yhi):
        y = py(t)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        s = f"{t:.4g}"
        tw, th = _text_size(draw, s, small)
        draw.text((x0 - tw - 5, y - th // 2 - 2), s, fill=_BLACK, font=small)
    for t in _nice_ticks(xlo, xhi):
        if xlo <= t <= xhi:
            x = px(t)
            draw.line((x, y1, x, y1 + 4), fill=_BLACK)
            s = f"{t:g}"
            tw, _ = _text_size(draw, s, small)
            draw.text((x - tw // 2, y1 + 6), s, fill=_BLACK, font=small)
    pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        draw.line(pts, fill=colour, width=2)
    for x, y in pts if len(pts) <= 60 else []:
        draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    if len(pts) == 1:
        x, y = pts[0]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw.rectangle((x0, y0, x1, y1), outline=_BLACK)


def training_curves(metrics, *, title: str | None = None, size: tuple[int, int] = (900, 360)) -> Image.Image:
    """Training loss and validation mean IU against the step, two panels side by side.

    Args:
        metrics: a run folder, its ``metrics.jsonl`` path, or the list of records (``{"kind": "train",
            "step", "loss"}`` and ``{"kind": "val", "step", "mean_iou"}``, as :func:`crfrnn.train.train` writes).
        title: optional heading (default: the run folder's name when a path is given).
        size: (width, height) of the picture.
    """
    if isinstance(metrics, (str, os.PathLike)):
        p = Path(metrics)
        title = title if title is not None else (p if p.is_dir() else p.parent).name
        records = read_metrics(p)
    else:
        records = list(metrics)
    train = [(r["step"], r["loss"]) for r in records
             if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    val = [(r["step"], 100.0 * r["mean_iou"]) for r in records
           if r.get("kind") == "val" and isinstance(r.get("mean_iou"), (int, float))]
    if not train and not val:
        raise ValueError("no training or validation records (kind 'train' with 'loss', kind 'val' with 'mean_iou')")
    w, h = size
    img = Image.new("RGB", (w, h), _WHITE)
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    top = 34 + (24 if title else 0)
    if title:
        tw, _ = _text_size(draw, str(title), font)
        draw.text(((w - tw) // 2, 8), str(title), fill=_BLACK, font=font)
    left, gap, bottom = 60, 80, 40
    pw = (w - left - gap - 20) // 2
    b1 = (left, top, left + pw, h - bottom)
    b2 = (left + pw + gap, top, left + 2 * pw + gap, h - bottom)
    _plot(draw, b1, [s for s, _ in train], [v for _, v in train], (31, 119, 180), "training loss", font, small)
    vals = [v for _, v in val]
    ylim = (max(0.0, min(vals) - 5), min(100.0, max(vals) + 5)) if vals else None
    _plot(draw, b2, [s for s, _ in val], vals, (214, 39, 40), "validation mean IU (%)", font, small, ylim)
    for b in (b1, b2):
        tw, _ = _text_size(draw, "step", small)
        draw.text(((b[0] + b[2] - tw) // 2, h - 18), "step", fill=_BLACK, font=small)
    return img


# --------------------------------------------------------------------------------------------------- files
def save_image(image: Image.Image, path, *, format: str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    The format follows the suffix (``.png`` when there is none and ``format`` is not given). Parent folders
    are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = format or (Image.registered_extensions().get(path.suffix.lower()) if path.suffix else "PNG")
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path} from its suffix; use .png")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
