"""Pictures for segmentation results: label pictures with Pillow, figures with matplotlib.

* Palettes: :func:`palette` (``"voc"``, ``"camvid"`` or a generic set of distinct colours,
  :func:`distinct_palette`), all ``(N, 3)`` uint8 arrays indexed by label.
* :func:`colorize` labels -> RGB picture, :func:`label_image` labels -> palette (mode ``P``) PNG image,
  :func:`overlay` labels blended over a photo, :func:`side_by_side` panels with titles above them.
* :func:`compat_heatmap` a label-compatibility matrix as a labelled heat-map with a diverging colour map
  and a colour bar (as Figure 5 of the CRF-RNN paper).
* :func:`training_curves` the training loss and validation mean IU of a run folder's ``metrics.jsonl``.
* :func:`save_image` writes any of these atomically (:func:`crfrnn.engine.runfiles.atomic_write`).

The two figures need matplotlib, the optional ``plot`` extra (``pip install "crfrnn[plot]"``), imported when
they are drawn; each is drawn on its own ``Figure`` and Agg canvas, never through pyplot's global state.
The palette and label pictures need only Pillow.

Inputs: labels are integer ``(H, W)`` arrays or tensors; images are ``(H, W, 3)`` uint8 arrays,
``(3, H, W)`` float/uint8 tensors in 0..255, or PIL images. Every function returns a PIL image.
"""
from __future__ import annotations

import colorsys
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crfrnn.data import CAMVID_PALETTE, voc_palette
from crfrnn.engine.runfiles import atomic_write

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


# ------------------------------------------------------------------------------------------------ figures
_PLOT_EXTRA = 'pip install "crfrnn[plot]"'
_DPI = 100


def _figure(width: float, height: float, **kw):
    """A matplotlib Figure of ``width x height`` pixels on its own Agg canvas (no pyplot, no global backend).

    matplotlib is the optional ``plot`` extra, imported here on first use.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"crfrnn's plots need matplotlib, which is not installed: {_PLOT_EXTRA}") from e
    # the Agg canvas truncates its pixel size: a quarter pixel more keeps (w/dpi)*dpi from rounding down
    fig = Figure(figsize=((width + 0.25) / _DPI, (height + 0.25) / _DPI), dpi=_DPI, facecolor="white", **kw)
    FigureCanvasAgg(fig)
    return fig


def _rendered(fig, *, tight: bool = False) -> Image.Image:
    """The figure as an RGB image: its full canvas, or with ``tight`` cropped to what it draws."""
    if tight:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1, facecolor="white")
        buf.seek(0)
        with Image.open(buf) as im:
            return im.convert("RGB")
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy(), "RGB")


def _square_matrix(matrix) -> np.ndarray:
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
    return m


def compat_heatmap(matrix, class_names: Sequence[str] | None = None, *, title: str | None = None,
                   cell: int = 26, annotate: bool | None = None) -> Image.Image:
    """A compatibility matrix (L, L) as a labelled heat-map (cf. Figure 5 of the CRF-RNN paper).

    Diverging colour map centred on 0 (``RdBu_r``: blue negative, white 0, red positive, symmetric range
    ``±max|m|``), class names along both axes (rows on the left, columns on top, written vertically),
    a colour bar with its range on the right. Each cell is about ``cell`` pixels wide. With ``annotate``
    (default: L <= 12) every cell shows its value. Needs matplotlib (the ``plot`` extra).
    """
    m = _square_matrix(matrix)
    L = m.shape[0]
    names = [str(k) for k in range(L)] if class_names is None else [str(n) for n in class_names]
    if len(names) != L:
        raise ValueError(f"class_names has {len(names)} names but the matrix is {L} x {L}")
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 4:
        raise ValueError(f"cell must be an int >= 4 (pixels), got {cell!r}")
    annotate = L <= 12 if annotate is None else annotate
    vmax = float(np.abs(m).max()) or 1.0
    grid = L * cell
    # generous canvas, axes placed in pixels; the tight crop below removes the unused margin
    margin = 400
    fig = _figure(grid + 2 * margin, grid + 2 * margin)
    W, H = fig.bbox.width, fig.bbox.height
    ax = fig.add_axes((margin / W, margin / H, grid / W, grid / H))
    cax = fig.add_axes(((margin + grid + 12) / W, margin / H, 16 / W, grid / H))
    font = max(6.0, min(10.0, 0.36 * cell))  # points
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.set_xticks(range(L), names, rotation=90, fontsize=font)
    ax.set_yticks(range(L), names, fontsize=font)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if annotate:
        texts = {ij: f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}" for ij, v in np.ndenumerate(m)}
        # a digit is about 0.6 em wide (DejaVu Sans): the longest value fits in 90 % of a cell
        small = min(0.8 * font, 0.9 * cell / (0.6 * max(map(len, texts.values()))) * 72 / _DPI)
        for (i, j), s in texts.items():
            dark = abs(m[i, j]) > 0.6 * vmax  # the ends of RdBu_r are dark: white text there
            ax.text(j, i, s, ha="center", va="center", fontsize=small, color="white" if dark else "black")
    bar = fig.colorbar(im, cax=cax, ticks=[-vmax, 0.0, vmax])
    bar.ax.set_yticklabels([f"{-vmax:.3g}", "0", f"{vmax:.3g}"], fontsize=0.85 * font)
    if title:
        ax.set_title(title, fontsize=font + 1, pad=8)  # matplotlib lifts it above the column names
    return _rendered(fig, tight=True)


# ------------------------------------------------------------------------------------------ training curves
def read_metrics(path) -> list[dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (a folder is taken to mean its ``metrics.jsonl``);
    see :func:`crfrnn.engine.runfiles.read_metrics`."""
    from crfrnn.engine.runfiles import read_metrics as _read

    return _read(path)


def _curve(ax, xs: list, ys: list, colour: str, title: str, ylim=None) -> None:
    """One panel: the line (with dots for up to 60 points), a light grid, integer steps on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="0.88", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not xs:
        ax.text(0.05, 0.92, "no data", transform=ax.transAxes, color="0.45", fontsize=11, va="top")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.plot(xs, ys, color=colour, linewidth=1.8, marker="o" if len(xs) <= 60 else None, markersize=3.5)
    if min(xs) == max(xs):  # one step: a range of whole steps around it, not matplotlib's +-5 %
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    if ylim is not None:
        ax.set_ylim(*ylim)


def training_curves(metrics, *, title: str | None = None, size: tuple[int, int] = (900, 360)) -> Image.Image:
    """Training loss and validation mean IU against the step, two panels side by side.

    Args:
        metrics: a run folder, its ``metrics.jsonl`` path, or the list of records (``{"kind": "train",
            "step", "loss"}`` and ``{"kind": "val", "step", "mean_iou"}``, as :func:`crfrnn.train.train` writes).
        title: optional heading (default: the run folder's name when a path is given).
        size: (width, height) of the picture in pixels.

    Needs matplotlib (the ``plot`` extra).
    """
    if isinstance(metrics, (str, os.PathLike)):
        p = Path(metrics)
        title = title if title is not None else (p if p.is_dir() else p.parent).name
        records = read_metrics(p)
    else:
        records = list(metrics)
    w, h = size
    if min(w, h) < 100:
        raise ValueError(f"size must be at least (100, 100) pixels, got {size!r}")
    train = [(r["step"], r["loss"]) for r in records
             if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    val = [(r["step"], 100.0 * r["mean_iou"]) for r in records
           if r.get("kind") == "val" and isinstance(r.get("mean_iou"), (int, float))]
    if not train and not val:
        raise ValueError("no training or validation records (kind 'train' with 'loss', kind 'val' with 'mean_iou')")
    fig = _figure(w, h, layout="constrained")
    left, right = fig.subplots(1, 2)
    if title:
        fig.suptitle(str(title), fontsize=12)
    _curve(left, [s for s, _ in train], [v for _, v in train], "tab:blue", "training loss")
    vals = [v for _, v in val]
    ylim = (max(0.0, min(vals) - 5), min(100.0, max(vals) + 5)) if vals else None
    _curve(right, [s for s, _ in val], vals, "tab:red", "validation mean IU (%)", ylim)
    return _rendered(fig)


# --------------------------------------------------------------------------------------------------- files
def save_image(image: Image.Image, path, *, format: str | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`crfrnn.engine.runfiles.atomic_write`).

    The format follows the suffix (``.png`` when there is none and ``format`` is not given). Parent folders
    are created. Returns the path.
    """
    path = Path(path)
    fmt = format or (Image.registered_extensions().get(path.suffix.lower()) if path.suffix else "PNG")
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path} from its suffix; use .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format=fmt))
    return path
