from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC = DATA / "voc2012-sample"

#: Device parametrisations: the CUDA case is always collected, marked ``cuda``, and skips without a GPU.
CUDA = [pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]
DEVICES = ["cpu", *CUDA]

#: Size of the generated scenes: about a VOC image's area / 2.4, with objects as large relative to it.
SCENE_SIZE = (240, 320)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker 'cuda'); none available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def scene_pairs(count=4, start=0):
    """``count`` generated scenes (:func:`crfrnn.demo.make_scene`, seeds ``start``, ``start + 1``, ...) as
    ``(name, image uint8 (H, W, 3), mask uint8 (H, W))``, the form :func:`voc_pairs` gives; always available.

    Textured shapes of 5 classes on a textured background with pixel noise and exact labels: the stand-in
    for the VOC sample when ``../shared`` is absent.
    """
    from crfrnn.demo import make_scene

    out = []
    for seed in range(start, start + count):
        img, mask = make_scene(*SCENE_SIZE, seed=seed)
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy().astype(np.uint8))
        out.append((f"scene{seed}", rgb, mask.numpy().astype(np.uint8)))
    return out


def image_pairs(source, count=4, start=0):
    """:func:`scene_pairs` (``source="scene"``) or :func:`voc_pairs` (``"voc"``, skips without the data)."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {IMAGE_SOURCES}, got {source!r}")
    return scene_pairs(count, start) if source == "scene" else voc_pairs(count, start)


#: Image sources of the accuracy tests whose thresholds depend on the content: each source has its own.
IMAGE_SOURCES = ("scene", "voc")


@pytest.fixture(params=IMAGE_SOURCES)
def image_source(request):
    """Runs a test on the generated scenes and (when ``../shared`` is present) on the VOC sample."""
    return request.param


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


@pytest.fixture
def one_cpu_thread():
    """One CPU thread for torch and numba: on a shared 2-core machine this is much faster for small inputs."""
    import numba

    t, n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(t)
    numba.set_num_threads(n)


def run_cli(argv, capsys):
    """Run the ``crfrnn`` command in-process: (exit status, stdout, stderr)."""
    from crfrnn.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def write_scene_folder(folder: Path, seeds, h=40, w=48) -> None:
    """Generated scenes (crfrnn.demo.make_scene, seeds ``seeds``) as ``folder/images/s<seed>.png`` and label
    PNGs ``folder/masks/s<seed>.png``: a folder data set for the command-line tests."""
    from PIL import Image

    from crfrnn import viz
    from crfrnn.demo import make_scene

    for s in seeds:
        img, mask = make_scene(h, w, seed=s)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).byte().numpy()).save(folder / "images" / f"s{s}.png")
        viz.label_image(mask).save(folder / "masks" / f"s{s}.png")
