"""Paired bootstrap of a difference in mean IU: coverage of a known difference, degenerate cases, seeding."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from crfrnn.engine.stats import BootstrapResult, mean_iou_many, paired_bootstrap
from crfrnn.metrics import mean_iou, pixel_accuracy

N0, N1 = 60, 30  # pixels of class 0 and class 1 per synthetic image


def synthetic_arms(num_images: int, delta: float, g: torch.Generator, seeds: int = 1):
    """Two-class images; image i has difficulty d_i ~ U(0.3, 0.8), arm a labels each pixel right with
    probability d_i, arm b with d_i + delta (the same images: paired). Returns (S, N, 2, 2) int64 per arm."""
    d = 0.3 + 0.5 * torch.rand(num_images, generator=g, dtype=torch.float64)
    arms = []
    for p in (d, d + delta):
        p = p.expand(seeds, num_images)
        right0 = torch.binomial(torch.full_like(p, N0), p, generator=g)
        right1 = torch.binomial(torch.full_like(p, N1), p, generator=g)
        conf = torch.stack([torch.stack([right0, N0 - right0], -1), torch.stack([N1 - right1, right1], -1)], -2)
        arms.append(conf.to(torch.int64))
    return arms


def true_mean_iou(p: float) -> float:
    """Mean IU of the expected confusion matrix [[N0 p, N0 (1 - p)], [N1 (1 - p), N1 p]] (a large data set)."""
    iu0 = N0 * p / (N0 + N1 * (1 - p))
    iu1 = N1 * p / (N1 + N0 * (1 - p))
    return (iu0 + iu1) / 2


def test_mean_iou_many_equals_mean_iou():
    g = torch.Generator().manual_seed(0)
    confs = torch.randint(0, 5, (20, 4, 4), generator=g)
    confs[3, 2, :] = 0
    confs[3, :, 2] = 0  # a class absent from truth and prediction
    confs[5] = 0  # nothing counted
    got = mean_iou_many(confs)
    for c, v in zip(confs, got):
        want = mean_iou(c)
        assert (math.isnan(want) and math.isnan(v)) or v.item() == pytest.approx(want, abs=1e-15)


def test_point_estimate_is_the_data_set_score():
    g = torch.Generator().manual_seed(1)
    a, b = synthetic_arms(25, 0.05, g, seeds=3)
    r = paired_bootstrap(a, b, num_resamples=200)
    want_a = sum(mean_iou(a[s].sum(0)) for s in range(3)) / 3
    want_b = sum(mean_iou(b[s].sum(0)) for s in range(3)) / 3
    assert r.score_a == pytest.approx(want_a, abs=1e-14) and r.score_b == pytest.approx(want_b, abs=1e-14)
    assert r.difference == pytest.approx(want_b - want_a, abs=1e-14)
    assert r.low <= r.difference <= r.high
    assert (r.num_images, r.num_seeds, r.metric) == (25, 3, "mean_iou")
    acc = paired_bootstrap(a[0], b[0], num_resamples=50, metric="pixel_accuracy")
    assert acc.difference == pytest.approx(pixel_accuracy(b[0].sum(0)) - pixel_accuracy(a[0].sum(0)), abs=1e-14)


def test_ci_covers_the_true_difference_at_about_the_nominal_rate():
    g = torch.Generator().manual_seed(2)
    delta = 0.04
    mean_d = 0.55  # E[d_i]
    truth = true_mean_iou(mean_d + delta) - true_mean_iou(mean_d)
    reps, covered, widths, estimates = 200, 0, [], []
    for rep in range(reps):
        a, b = synthetic_arms(80, delta, g)
        r = paired_bootstrap(a, b, num_resamples=400, seed=rep)
        covered += r.low <= truth <= r.high
        widths.append(r.high - r.low)
        estimates.append(r.difference)
    rate = covered / reps
    # nominal 0.95; 200 repetitions have a binomial sd of 0.015, and the percentile interval runs a little short
    assert 0.88 <= rate <= 0.995, rate
    # the interval's width matches the spread of the estimate over repeated data sets (+-1.96 sd)
    spread = 2 * 1.96 * statistics.stdev(estimates)
    assert 0.75 < statistics.mean(widths) / spread < 1.25
    assert abs(statistics.mean(estimates) - truth) < 0.1 * truth  # the point estimate is (nearly) unbiased


def test_pairing_narrows_the_interval():
    """Shared image difficulty cancels in the paired difference: much narrower than either arm's own spread."""
    g = torch.Generator().manual_seed(3)
    a, b = synthetic_arms(80, 0.04, g)
    paired = paired_bootstrap(a, b, num_resamples=500)
    unpaired = paired_bootstrap(a, b[:, torch.randperm(80, generator=g)], num_resamples=500)
    assert unpaired.difference == pytest.approx(paired.difference, abs=1e-12)  # a permutation: same sums
    assert (paired.high - paired.low) < 0.5 * (unpaired.high - unpaired.low)


def test_identical_arms_give_a_zero_width_interval_at_zero():
    g = torch.Generator().manual_seed(4)
    a, _ = synthetic_arms(30, 0.0, g, seeds=2)
    r = paired_bootstrap(a, a.clone(), num_resamples=300)
    assert (r.difference, r.low, r.high) == (0.0, 0.0, 0.0)


def test_identical_images_give_a_zero_width_interval_at_the_difference():
    ca = torch.tensor([[50, 10], [5, 35]])
    cb = torch.tensor([[55, 5], [4, 36]])
    r = paired_bootstrap(ca.expand(12, 2, 2), cb.expand(12, 2, 2), num_resamples=100)
    want = mean_iou(cb) - mean_iou(ca)
    assert r.difference == pytest.approx(want, abs=1e-14)
    assert r.low == pytest.approx(want, abs=1e-14) and r.high == pytest.approx(want, abs=1e-14)


def test_reproducible_with_the_same_seed():
    g = torch.Generator().manual_seed(5)
    a, b = synthetic_arms(40, 0.02, g, seeds=3)
    r1 = paired_bootstrap(a, b, num_resamples=600, seed=7)
    r2 = paired_bootstrap(a.clone(), b.clone(), num_resamples=600, seed=7)
    r3 = paired_bootstrap(a, b, num_resamples=600, seed=8)
    assert r1 == r2
    assert (r1.low, r1.high) != (r3.low, r3.high)
    assert isinstance(r1, BootstrapResult) and r1.to_dict()["seed"] == 7


def test_seeds():
    g = torch.Generator().manual_seed(6)
    a, b = synthetic_arms(40, 0.03, g)
    one = paired_bootstrap(a, b, num_resamples=300)
    assert one == paired_bootstrap(a[0], b[0], num_resamples=300)
    # three identical seeds: the same as one (the image draws do not depend on the number of seeds)
    three = paired_bootstrap(a.expand(3, -1, -1, -1), b.expand(3, -1, -1, -1), num_resamples=300)
    assert (three.low, three.high) == pytest.approx((one.low, one.high), abs=1e-14)
    # seeds that disagree widen the interval only when seeds are resampled
    a2, b2 = synthetic_arms(40, 0.03, g, seeds=3)
    b2[1] = a2[1]  # seed 1 of arm b gains nothing
    wide = paired_bootstrap(a2, b2, num_resamples=500)
    fixed = paired_bootstrap(a2, b2, num_resamples=500, resample_seeds=False)
    assert wide.difference == fixed.difference
    assert (wide.high - wide.low) > (fixed.high - fixed.low)


def test_bad_input():
    c = torch.ones(5, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(c, c[:4])
    with pytest.raises(ValueError, match="conf_a"):
        paired_bootstrap(c[0], c[0])
    with pytest.raises(TypeError, match="conf_b"):
        paired_bootstrap(c, c.numpy())
    with pytest.raises(ValueError, match=">= 0"):
        paired_bootstrap(-c, c)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(c, c, confidence=95)
    with pytest.raises(ValueError, match="num_resamples"):
        paired_bootstrap(c, c, num_resamples=0)
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap(c, c, metric="dice")
    with pytest.raises(ValueError, match="no pixel"):
        paired_bootstrap(torch.zeros_like(c), c)
