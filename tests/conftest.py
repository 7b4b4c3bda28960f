from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC = DATA / "voc2012-sample"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def voc_pairs(count=4, start=0):
    """First ``count`` (image, mask) pairs of the VOC sample as uint8 arrays (skip if absent)."""
    images = sorted((VOC / "images").glob("*.jpg"))
    if not images:
        pytest.skip(f"VOC sample not found at {VOC}")
    from PIL import Image

    out = []
    for p in images[start : start + count]:
        img = np.array(Image.open(p).convert("RGB"))
        mask = np.array(Image.open(VOC / "masks" / (p.stem + ".png")))
        out.append((p.stem, img, mask))
    return out


def crop(arr, h, w):
    """Central ``h x w`` crop of an (H, W, ...) array."""
    H, W = arr.shape[:2]
    y, x = (H - h) // 2, (W - w) // 2
    return arr[y : y + h, x : x + w]


def grid_features(image_chw: torch.Tensor, sxy: float, srgb=None) -> torch.Tensor:
    """(1, 2[+K], H, W) features (x/sxy, y/sxy[, image/srgb]) built independently of the library."""
    H, W = image_chw.shape[-2:]
    y, x = torch.meshgrid(
        torch.arange(H, dtype=image_chw.dtype), torch.arange(W, dtype=image_chw.dtype), indexing="ij"
    )
    parts = [x[None] / sxy, y[None] / sxy]
    if srgb is not None:
        parts.append(image_chw / srgb)
    return torch.cat(parts, 0)[None]


@pytest.fixture
def lattice_builds(monkeypatch):
    """A list that grows by one each time a PermutohedralLattice is built (for build-once checks)."""
    from crfrnn import PermutohedralLattice

    builds = []
    orig = PermutohedralLattice.__init__

    def counting(self, *a, **k):
        builds.append(1)
        orig(self, *a, **k)

    monkeypatch.setattr(PermutohedralLattice, "__init__", counting)
    return builds
