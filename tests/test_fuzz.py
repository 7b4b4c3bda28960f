"""Bounded, seeded fuzzing of the public entry points: every input either gives a finite result of the
promised shape or raises ``ValueError``/``TypeError`` -- never a hang, a crash, another exception or NaN."""
from __future__ import annotations

import contextlib
import math
import signal

import numpy as np
import pytest
import torch

import crfrnn
import crfrnn.densecrf as dcrf

CASES = 60  # per entry point; the whole file runs in a few seconds
SECONDS_PER_CASE = 120  # a hang guard, far above any case's cost (the first calls compile kernels)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]
THETAS = [160.0, 3.0, 1.0, 0.5, 1e-3, 1e6, 0.0, -2.0, float("nan"), float("inf"), 40]


@contextlib.contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"case did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tensor(rng: np.random.Generator, shape, dtype, device, poison: bool) -> torch.Tensor:
    x = torch.from_numpy(rng.normal(0.0, 3.0, size=shape)).to(torch.float64)
    if poison and x.numel():
        flat = x.view(-1)
        flat[int(rng.integers(flat.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    if dtype == torch.bool:
        x = x > 0
    elif not dtype.is_floating_point:
        x = x.clamp(-1e6, 1e6).nan_to_num(0.0).to(dtype)
    else:
        x = x.to(dtype)
    return x.to(device)


def _shape(rng, b, c):
    nd = int(rng.choice([1, 2, 2, 2, 3]))
    spatial = [int(rng.integers(1, 7)) for _ in range(nd)]
    return (b, c, *spatial)


def _case(rng: np.random.Generator):
    """Random (unary, image, kwargs) for mean_field/CrfRnn, usually nearly valid."""
    B, L = int(rng.integers(1, 3)), int(rng.choice([1, 2, 3, 4]))
    shape = _shape(rng, B, L)
    K = int(rng.choice([1, 3, 4]))
    image_shape = (B, K, *shape[2:]) if rng.random() > 0.1 else (B, K, *[s + 1 for s in shape[2:]])
    device = "meta" if rng.random() < 0.08 else "cpu"
    unary = _tensor(rng, shape, DTYPES[int(rng.choice([0, 0, 0, 1, 1, 2, 3, 4]))], device, rng.random() < 0.15)
    image = _tensor(rng, image_shape, DTYPES[int(rng.choice([0, 0, 1, 3]))], device, rng.random() < 0.1) * 40
    theta = {k: (float(rng.choice(THETAS)) if rng.random() < 0.35 else d)
             for k, d in (("theta_alpha", 20.0), ("theta_beta", 8.0), ("theta_gamma", 2.0))}
    return unary, image, theta


def _accepts(result: torch.Tensor, like: torch.Tensor) -> None:
    assert isinstance(result, torch.Tensor)
    assert tuple(result.shape) == tuple(like.shape), (tuple(result.shape), tuple(like.shape))
    assert bool(torch.isfinite(result).all()), "finite inputs were accepted but the result holds NaN/inf"


def _run(fn, *args):
    """``fn(*args)``; True if it ran, False if it raised ValueError/TypeError. Anything else fails."""
    with _deadline(SECONDS_PER_CASE):
        try:
            fn(*args)
        except (ValueError, TypeError) as e:
            assert str(e), "an error without a message"
            return False
    return True


def _fuzz(seed: int, make_case) -> None:
    """Run ``CASES`` cases ``make_case(rng)()`` (each a call to check, drawn from one seeded generator); at least
    a tenth of them must be valid inputs, or the fuzzer would test nothing but errors."""
    rng = np.random.default_rng(seed)
    ran = sum(_run(make_case(rng)) for _ in range(CASES))
    assert ran >= CASES // 10, f"only {ran} of {CASES} cases were valid: the fuzzer tests nothing but errors"


@pytest.mark.parametrize("method", ["permutohedral", "exact"])
def test_fuzz_mean_field(method):
    def case(rng):
        unary, image, theta = _case(rng)

        def call():
            out = crfrnn.mean_field(unary, image, num_iterations=int(rng.integers(0, 4)), method=method, **theta)
            _accepts(out, unary)

        return call

    _fuzz(1234 if method == "exact" else 4321, case)


def test_fuzz_crfrnn_module():
    def case(rng):
        unary, image, theta = _case(rng)

        def call():
            layer = crfrnn.CrfRnn(unary.shape[1], num_iterations=2, **theta)
            out = layer(unary, image)
            _accepts(out, unary)
            if out.requires_grad:
                out.sum().backward()
                for p in layer.parameters():
                    assert p.grad is None or bool(torch.isfinite(p.grad).all())

        return call

    _fuzz(99, case)


def test_fuzz_lattice():
    def case(rng):
        B, D, C = int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
        shape = _shape(rng, B, D)
        device = "meta" if rng.random() < 0.08 else "cpu"
        feats = _tensor(rng, shape, DTYPES[int(rng.choice([0, 0, 1, 2, 3]))], device, rng.random() < 0.15)
        if rng.random() < 0.1:
            feats = feats * 1e12  # beyond the lattice's integer coordinates
        vshape = (B, C, *shape[2:]) if rng.random() > 0.1 else (B, C, *shape[2:-1], shape[-1] + 2)
        values = _tensor(rng, vshape, DTYPES[int(rng.choice([0, 0, 1, 3]))], device, rng.random() < 0.1)
        backend = [None, "torch", "numba"][int(rng.integers(3))]

        def call():
            lattice = crfrnn.PermutohedralLattice(feats, backend=backend)
            out = lattice.filter(values, reverse=bool(rng.random() < 0.3))
            _accepts(out, values)

        return call

    _fuzz(7, case)


def test_fuzz_densecrf():
    def case(rng):
        W, H, L = int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.choice([1, 2, 3, 5]))
        u = rng.normal(0.0, 2.0, size=(L, H * W)).astype(rng.choice([np.float32, np.float32, np.float64]))
        if rng.random() < 0.15:
            u.flat[int(rng.integers(u.size))] = rng.choice([np.nan, np.inf])
        img = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8 if rng.random() > 0.1 else np.float32)
        if rng.random() < 0.1:
            img = img[:, : max(W - 1, 1)]
        sxy = [float(rng.choice(THETAS)) if rng.random() < 0.3 else 3.0 for _ in range(2)]
        srgb = float(rng.choice(THETAS)) if rng.random() < 0.3 else 13.0
        compat = [rng.choice([3.0, -1.0, float("nan")]) if rng.random() < 0.2 else 3.0,
                  np.ones((L, L), np.float32) if rng.random() < 0.2 else 10.0]

        def call():
            d = dcrf.DenseCRF2D(W, H, L)
            d.setUnaryEnergy(u)
            d.addPairwiseGaussian(sxy=sxy[0], compat=compat[0])
            d.addPairwiseBilateral(sxy=sxy[1], srgb=srgb, rgbim=img, compat=compat[1])
            Q = np.asarray(d.inference(int(rng.integers(0, 4))))
            assert Q.shape == (L, H * W) and np.isfinite(Q).all()
            if Q.size:
                assert math.isclose(float(Q.sum(0).mean()), 1.0, rel_tol=1e-3)

        return call

    _fuzz(11, case)
