"""Boundary-band (trimap) confusion matrices against a brute-force NumPy reference (boundaries by looping over
neighbours, distances between all pixel pairs) and small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crfrnn.metrics import (
    TRIMAP_RADII,
    boundary_distance2,
    boundary_mask,
    confusion_matrix,
    mean_iou,
    trimap_confusion,
)

IGN = 255


def boundary_ref(t: np.ndarray, ignore: int | None, connectivity: int) -> np.ndarray:
    h, w = t.shape
    nb = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        nb += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if t[y, x] == ignore:
                continue
            for dy, dx in nb:
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and t[v, u] != ignore and t[v, u] != t[y, x]:
                    out[y, x] = True
    return out


def band_conf_ref(pred, target, L, radii, ignore, connectivity):
    """(R, L, L) by brute force, one image at a time: the pairwise distance of every pixel to every boundary."""
    out = np.zeros((len(radii), L, L), np.int64)
    for p, t in zip(pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:])):
        b = boundary_ref(t, ignore, connectivity)
        yy, xx = np.mgrid[: t.shape[0], : t.shape[1]]
        pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
        bpts = pts[b.ravel()]
        if len(bpts):
            d = np.sqrt(((pts[:, None, :] - bpts[None, :, :]) ** 2).sum(-1)).min(1).reshape(t.shape)
        else:
            d = np.full(t.shape, np.inf)
        for k, r in enumerate(radii):
            sel = (d <= r) & (t != ignore)
            np.add.at(out[k], (t[sel], p[sel]), 1)
    return out


def blobs(shape, L, seed, void_frac=0.1):
    """Random piecewise-constant label maps (upsampled coarse noise), a few void pixels, and noisy predictions."""
    g = torch.Generator().manual_seed(seed)
    *lead, h, w = shape
    coarse = torch.randint(0, L, (*lead, (h + 4) // 5, (w + 4) // 5), generator=g)
    target = coarse.repeat_interleave(5, -2).repeat_interleave(5, -1)[..., :h, :w].clone()
    target[torch.rand(target.shape, generator=g) < void_frac] = IGN
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target.clamp_max(L - 1),
                       torch.randint(0, L, target.shape, generator=g))
    return pred, target


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trimap_confusion_matches_brute_force(connectivity, seed):
    L = 4
    pred, target = blobs((2, 23, 31), L, seed)
    radii = (3.2, 0, 7, 1.5, 2, 1, 2)  # unsorted, one repeated
    got = trimap_confusion(pred, target, L, radii, ignore_index=IGN, connectivity=connectivity)
    want = band_conf_ref(pred.numpy(), target.numpy(), L, radii, IGN, connectivity)
    assert got.dtype == torch.int64 and got.shape == (len(radii), L, L)
    np.testing.assert_array_equal(got.numpy(), want)
    for t in target:
        np.testing.assert_array_equal(boundary_mask(t, connectivity=connectivity).numpy(),
                                      boundary_ref(t.numpy(), IGN, connectivity))


def test_distance_matches_pairwise_on_random_boundaries():
    g = torch.Generator().manual_seed(4)
    b = torch.rand(3, 29, 26, generator=g) < 0.01
    b[2] = False  # an image without boundary
    R = 9
    d2 = boundary_distance2(b, R)
    for img, got in zip(b.numpy(), d2.numpy()):
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        pts = np.stack([yy.ravel(), xx.ravel()], 1)
        bp = pts[img.ravel()]
        want = ((pts[:, None] - bp[None]) ** 2).sum(-1).min(1).reshape(img.shape) if len(bp) else np.full(
            img.shape, 10**9)
        near = want <= R * R
        np.testing.assert_array_equal(got[near], want[near])
        assert (got[~near] > R * R).all()


def test_default_radii_and_accumulation_over_images():
    assert TRIMAP_RADII == (2, 4, 8, 16)
    pred, target = blobs((3, 40, 37), 3, seed=5)
    whole = trimap_confusion(pred, target, 3)
    assert whole.shape == (4, 3, 3)
    assert torch.equal(whole, sum(trimap_confusion(p, t, 3) for p, t in zip(pred, target)))
    # the bands grow with r, and the widest of a small image is all its labelled pixels
    counts = whole.sum((1, 2))
    assert bool((counts[1:] >= counts[:-1]).all())
    assert torch.equal(trimap_confusion(pred, target, 3, (100,))[0], confusion_matrix(pred, target, 3))


def test_padding_with_ignore_changes_nothing():
    pred, target = blobs((1, 17, 19), 3, seed=6)
    padded_t = torch.full((1, 25, 30), IGN, dtype=target.dtype)
    padded_p = torch.zeros((1, 25, 30), dtype=pred.dtype)
    padded_t[:, :17, :19], padded_p[:, :17, :19] = target, pred
    assert torch.equal(trimap_confusion(padded_p, padded_t, 3), trimap_confusion(pred, target, 3))


# ----------------------------------------------------------------------------------------------- by hand


def test_one_row_by_hand():
    t = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert boundary_mask(t).tolist() == [[False, False, False, True, True, False, False]]
    p = torch.tensor([[0, 0, 1, 1, 1, 0, 1]])
    conf = trimap_confusion(p, t, 2, (0, 1, 2))
    # r=0: pixels 3 (t0, p1) and 4 (t1, p1); r=1 adds 2 (t0, p1) and 5 (t1, p0); r=2 adds 1 (t0, p0), 6 (t1, p1)
    assert conf[0].tolist() == [[0, 1], [0, 1]]
    assert conf[1].tolist() == [[0, 2], [1, 1]]
    assert conf[2].tolist() == [[1, 2], [1, 2]]
    assert mean_iou(conf[0]) == pytest.approx((0 + 1 / 2) / 2)


def test_void_makes_no_boundary_and_is_not_counted():
    t = torch.tensor([[0, 0, IGN, 1, 1]])
    assert not bool(boundary_mask(t).any())
    assert int(trimap_confusion(t.clamp_max(1), t, 2).sum()) == 0
    t2 = torch.tensor([[0, IGN, 1, 0]])  # 1 | 0 meet at x=2,3; the band reaches x=1 (void) and x=0
    assert boundary_mask(t2).tolist() == [[False, False, True, True]]
    conf = trimap_confusion(torch.zeros_like(t2), t2, 2, (1, 2))
    assert int(conf[0].sum()) == 2 and int(conf[1].sum()) == 3
    assert boundary_mask(t2, ignore_index=None).tolist() == [[True, True, True, True]]


def test_connectivity_by_hand():
    t = torch.tensor([[0, 0], [0, 1]])  # (0, 0) touches the 1 only diagonally
    assert boundary_mask(t, connectivity=4).tolist() == [[False, True], [True, True]]
    assert boundary_mask(t, connectivity=8).tolist() == [[True, True], [True, True]]
    # a vertical edge in a 5 x 6 image: columns 2 and 3 are boundary; r = 1 reaches columns 1..4
    t = torch.zeros(5, 6, dtype=torch.int64)
    t[:, 3:] = 1
    want = torch.zeros(5, 6, dtype=torch.bool)
    want[:, 2:4] = True
    assert torch.equal(boundary_mask(t, connectivity=4), want) and torch.equal(boundary_mask(t), want)
    assert torch.equal(boundary_distance2(want, 3)[0], torch.tensor([4, 1, 0, 0, 1, 4]))


def test_bad_input():
    t = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="connectivity"):
        boundary_mask(t, connectivity=6)
    with pytest.raises(TypeError, match="target"):
        boundary_mask(t.float())
    with pytest.raises(ValueError, match="radii"):
        trimap_confusion(t, t, 2, (2, -1))
    with pytest.raises(ValueError, match="radii"):
        trimap_confusion(t, t, 2, ())
    with pytest.raises(ValueError, match="same shape"):
        trimap_confusion(t, t[:3], 2)
    with pytest.raises(TypeError, match="boundary"):
        boundary_distance2(t, 2)
    with pytest.raises(ValueError, match="max_distance"):
        boundary_distance2(t.bool(), -1)
