"""crfrnn.viz: the matplotlib figures (size, content, colour follows the matrix sign), the message when
matplotlib is missing, and the atomic image writer. matplotlib is part of the ``test`` extra: the figure tests
do not skip without it, they fail with the install hint."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crfrnn import viz


def _records(n_train=30, val_steps=(10, 20, 30)):
    train = [{"kind": "train", "step": s, "loss": 2.0 / s} for s in range(1, n_train + 1)]
    val = [{"kind": "val", "step": s, "mean_iou": 0.2 + s / 100} for s in val_steps]
    return train + val


def _ink(img: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels that are not (near) white."""
    return (np.asarray(img.convert("RGB")).astype(int) < 230).any(-1)


def _reddish(px):
    r, g, b = (int(c) for c in px)
    return r > b + 40 and r > g + 20


def _bluish(px):
    r, g, b = (int(c) for c in px)
    return b > r + 40


# ------------------------------------------------------------------------------------------ training curves
def test_training_curves_size_and_both_panels_drawn():
    img = viz.training_curves(_records(), title="run a")
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (900, 360)
    a = np.asarray(img).astype(int)
    # the loss curve is drawn in blue in the left half, the mean IU in red in the right half
    blue = (a[..., 2] > a[..., 0] + 80) & (a[..., 2] > 120)
    red = (a[..., 0] > a[..., 2] + 80) & (a[..., 0] > 120)
    assert blue[:, :450].sum() > 200 and blue[:, 450:].sum() == 0
    assert red[:, 450:].sum() > 100 and red[:, :450].sum() == 0
    # the red curve rises to the right: its mean row over the first columns lies lower than over the last
    cols = np.nonzero(red.any(0))[0]
    rows_left = np.nonzero(red[:, cols[:10]].any(1))[0].mean()
    rows_right = np.nonzero(red[:, cols[-10:]].any(1))[0].mean()
    assert rows_left > rows_right + 50
    assert 0.02 < _ink(img).mean() < 0.5  # axes, labels and curves, on a white background
    assert viz.training_curves(_records(), size=(640, 300)).size == (640, 300)
    assert viz.training_curves(_records(), size=(333, 251)).size == (333, 251)


def test_training_curves_from_a_run_folder_and_empty_panels(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records(5, (5,))) + "\n")
    assert viz.training_curves(run).size == (900, 360)
    only_val = viz.training_curves([{"kind": "val", "step": 3, "mean_iou": 0.5}])
    assert _ink(only_val).any()
    with pytest.raises(ValueError, match="no training or validation records"):
        viz.training_curves([{"kind": "other", "step": 1}])
    with pytest.raises(ValueError, match=r"size must be at least"):
        viz.training_curves(_records(), size=(50, 300))


# ------------------------------------------------------------------------------------------------ heat-map
def _grid_cells(img: Image.Image, L: int) -> np.ndarray:
    """(L, L, 3) colours at the cell centres of a heat-map whose every cell is strongly coloured.

    The grid is the first run of columns (from the left) holding saturated pixels; the colour bar is the
    second, narrower one."""
    a = np.asarray(img).astype(int)
    sat = (a.max(-1) - a.min(-1)) > 60
    cols = sat.sum(0) > 0
    runs, start = [], None
    for x, on in enumerate(list(cols) + [False]):
        if on and start is None:
            start = x
        elif not on and start is not None:
            runs.append((start, x))
            start = None
    assert len(runs) == 2, runs  # the grid and the colour bar
    (x0, x1), (b0, b1) = runs
    assert x1 - x0 > 3 * (b1 - b0)
    rows = np.nonzero(sat[:, x0:x1].any(1))[0]
    y0, y1 = rows[0], rows[-1] + 1
    assert abs((x1 - x0) - (y1 - y0)) <= 2  # square cells
    step = (x1 - x0) / L
    centres = [int(x0 + (k + 0.5) * step) for k in range(L)]
    rcentres = [int(y0 + (k + 0.5) * step) for k in range(L)]
    return np.array([[a[r, c] for c in centres] for r in rcentres])


def test_compat_heatmap_colour_follows_the_sign():
    rng = np.random.default_rng(0)
    L = 5
    sign = rng.choice([-1.0, 1.0], size=(L, L))
    m = sign * rng.uniform(0.7, 1.0, (L, L))  # every cell far from 0: saturated red or blue
    img = viz.compat_heatmap(m, [f"class{k}" for k in range(L)], title="t", annotate=False)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width > L * 26 and img.height > L * 26
    cells = _grid_cells(img, L)
    for i in range(L):
        for j in range(L):
            expect = _reddish if m[i, j] > 0 else _bluish
            assert expect(cells[i, j]), (i, j, m[i, j], cells[i, j])
    # the transposed matrix transposes the colours; the negated one swaps red and blue
    cells_t = _grid_cells(viz.compat_heatmap(m.T, annotate=False), L)
    assert np.abs(cells_t.astype(int) - cells.transpose(1, 0, 2)).max() <= 3
    cells_n = _grid_cells(viz.compat_heatmap(-m, annotate=False), L)
    assert all(_bluish(cells_n[i, j]) == _reddish(cells[i, j]) for i in range(L) for j in range(L))


def test_compat_heatmap_zero_is_white_and_size_follows_cell():
    import torch

    m = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    cells = _grid_cells(viz.compat_heatmap(m, annotate=False), 2)
    assert _reddish(cells[0, 0]) and _bluish(cells[1, 1])
    assert (cells[0, 1] > 235).all() and (cells[1, 0] > 235).all()  # 0 sits at the white middle of the map
    small = viz.compat_heatmap(np.eye(4), cell=20)
    large = viz.compat_heatmap(np.eye(4), cell=60)
    assert large.width - small.width >= 4 * 35 and large.height - small.height >= 4 * 35
    annotated = viz.compat_heatmap(np.eye(4), annotate=True)
    assert _ink(annotated).sum() > _ink(viz.compat_heatmap(np.eye(4), annotate=False)).sum()


def test_compat_heatmap_bad_input():
    with pytest.raises(ValueError, match=r"square \(L, L\).*\(2, 3\)"):
        viz.compat_heatmap(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        viz.compat_heatmap(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="class_names has 1 names but the matrix is 2 x 2"):
        viz.compat_heatmap(np.eye(2), ["a"])
    with pytest.raises(ValueError, match="cell must be an int >= 4"):
        viz.compat_heatmap(np.eye(2), cell=2)


# ------------------------------------------------------------------------------------------ no matplotlib
@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as on a machine without the ``plot`` extra."""
    names = [n for n in list(sys.modules) if n == "matplotlib" or n.startswith("matplotlib.")]
    for n in set(names) | {"matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"}:
        monkeypatch.setitem(sys.modules, n, None)


def test_plots_without_matplotlib_say_how_to_install_it(no_matplotlib):
    for draw in (lambda: viz.compat_heatmap(np.eye(3)), lambda: viz.training_curves(_records())):
        with pytest.raises(ImportError, match=r'matplotlib.*pip install "crfrnn\[plot\]"'):
            draw()
    # the Pillow-only pictures do not need it
    assert viz.colorize(np.array([[0, 1], [2, 3]])).size == (2, 2)
    assert viz.side_by_side([np.zeros((4, 5, 3), np.uint8)] * 2, ["a", "b"]).width > 10


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, crfrnn.viz, crfrnn.cli; print(any(m.startswith('matplotlib') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------- files
def test_save_image_is_atomic_and_follows_the_suffix(tmp_path, monkeypatch):
    img = viz.colorize(np.arange(12).reshape(3, 4) % 5)
    out = viz.save_image(img, tmp_path / "sub" / "a.png")
    assert out == tmp_path / "sub" / "a.png"
    with Image.open(out) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    with Image.open(viz.save_image(img, tmp_path / "b.jpg")) as back:
        assert back.format == "JPEG"
    with pytest.raises(ValueError, match=r"cannot tell the image format.*\.xyz"):
        viz.save_image(img, tmp_path / "c.xyz")
    # a failure while writing leaves the old file as it was and no temporary file behind
    before = out.read_bytes()

    def broken(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        viz.save_image(img, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]
