r"""High-dimensional Gaussian filtering with the permutohedral lattice.

The operator everything in CRF-RNN stands on: given reference features :math:`f_i \in \mathbb{R}^D`
(one per pixel/voxel) and values :math:`v_i \in \mathbb{R}^C`, compute

.. math::  \tilde v_i = \sum_j k(f_i, f_j)\, v_j, \qquad k(f_i, f_j) = \exp(-\tfrac12 \|f_i - f_j\|^2)

(the pixel itself included). Features are pre-scaled by the caller, e.g. ``(x/θα, y/θα, r/θβ, g/θβ, b/θβ)``
for CRF-RNN's bilateral kernel.

* :func:`dense_gaussian_filter` is the exact O(N²) sum: the slow twin and test oracle (small inputs only).
* :class:`PermutohedralLattice` (Adams, Baek & Davis, 2010) approximates it in O(N·D²): points are
  embedded in a lattice of simplices, *splatted* onto the simplex vertices with barycentric weights,
  *blurred* with a ``[1/2, 1, 1/2]`` kernel along each of the ``D+1`` lattice directions, and *sliced*
  back. It follows Krähenbühl's ``permutohedral.cpp`` (used by pydensecrf and the official CRF-RNN),
  including its scale ``sqrt(2/3)(D+1)`` and the output factor ``alpha = 1/(1 + 2^-D)``.
  The lattice depends only on the features: build it once, then :meth:`~PermutohedralLattice.filter`
  as many values as you like (every mean-field iteration, and the backward pass).
* ``filter(values, reverse=True)`` applies the exact transpose (blur directions in reverse order). The
  filter is linear in ``values`` and its gradient is the transpose, so the backward pass re-uses the
  lattice and stores nothing per pixel.
* Opt-in gradients w.r.t. the features (or a per-dimension ``bandwidth`` they are divided by): the
  gradient of the ideal Gaussian filter, each of its terms a filter on the same lattice (see
  ``docs/bandwidths.md``). The lattice keeps the features only when they (or the bandwidth) require grad.

Two backends share the maths:

* ``"numba"``: compiled, multi-threaded CPU kernels (:mod:`crfrnn.lattice._numba_kernels`), the default on CPU;
* ``"torch"``: vectorised tensor code (sorting instead of hashing, ``index_add_``/gather), which runs on
  any device (CUDA included) and is the oracle of the compiled path.

Both give the same operator up to floating-point summation order.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from ._checks import _all_finite, _check_bandwidth, _check_features, _check_mask, _check_pair, _describe
from ._geometry_grad import divided as _divided
from ._geometry_grad import geometric_backward

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "PermutohedralLattice",
    "permutohedral_filter",
    "available_backends",
]

try:  # the compiled CPU path is optional at import time (it is a hard dependency of the package)
    from . import _numba_build
    from . import _numba_kernels as _nb

    _HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only without numba
    _nb = _numba_build = None
    _HAVE_NUMBA = False

_BACKENDS = ("numba", "torch")
# the compiled splat scatters into this many private copies of the lattice, summed in a fixed order:
# a constant (not the thread count) so that results are bit-identical whatever the number of threads
_SPLAT_COPIES = 4
# below this many multiply-adds per filter (B*N*(D+1)*C) the serial compilation is used
_SERIAL_WORK = 1 << 18
# keys are int32; this bound keeps every lattice coordinate (and its neighbours) representable
_MAX_ELEVATED = 2.0**30
# how the feature/bandwidth gradient's moment terms are evaluated (docs/bandwidths.md, Accuracy): on this
# lattice, or on a finer, untruncated one whose kernel is closer to the Gaussian (opt-in, slower)
_GEOMETRY_GRADS = ("lattice", "fine")
# The fine lattice's kernel: n blur rounds (each adds a variance of 3/4 per dimension, splat + slice 1/4)
# with the features x sqrt(3 n / 4 + 1 / 4), so that its variance is the Gaussian's; its distance from the
# Gaussian's shape falls like 1 / n (Edgeworth). Rings: extra vertices within two kernel widths (2 x scale
# lattice steps) of the occupied ones, so that the blur is not cut short where no point lies.
_FINE_ROUNDS = 8
_FINE_SCALE = math.sqrt(3 * _FINE_ROUNDS / 4 + 1 / 4)  # 2.5
_FINE_RINGS = math.ceil(2 * _FINE_SCALE)  # 5


def available_backends() -> tuple:
    """Backends usable in this process (``"torch"`` always; ``"numba"`` if it imported)."""
    return _BACKENDS if _HAVE_NUMBA else ("torch",)


def _scale_factors(d: int) -> torch.Tensor:
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    return torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)], dtype=torch.float64)


def _version(t: Optional[torch.Tensor]) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place edit); None for None or an inference tensor (it has none)."""
    return None if t is None or t.is_inference() else t._version


def _snapshot(t: Optional[torch.Tensor]) -> tuple:
    """``(t, its version)`` detached, or for an inference tensor ``(a copy, None)``."""
    if t is None:
        return None, None
    t = t.detach()
    return (t.clone(), None) if t.is_inference() else (t, _version(t))


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None:
        return "numba" if (device.type == "cpu" and _HAVE_NUMBA) else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "numba":
        if not _HAVE_NUMBA:
            raise ValueError("backend='numba' requested but numba is not importable; use backend='torch'")
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on the CPU only, but the features are on {device}")
    return backend


class CompiledArrays(NamedTuple):
    """A numba-built lattice as flat arrays: barycentric weights and vertex offsets ``(B*N*(D+1),)``,
    blur neighbours ``(D+1, M, 2)`` flattened, and the output factor ``alpha``."""

    barycentric: "np.ndarray"
    offsets: "np.ndarray"
    neighbours: "np.ndarray"
    alpha: float


class PermutohedralLattice:
    r"""A permutohedral lattice built from ``features`` of shape ``(B, D, *spatial)``.

    Built once, without gradients (the features are treated as constants); then
    :meth:`filter` approximates :math:`\tilde v_i = \sum_j \exp(-\frac12\|f_i - f_j\|^2) v_j` for any
    number of value channels, as often as needed. Images of a batch share this object but have
    disjoint lattices: values never cross from one image to another.

    Args:
        features: ``(B, D, *spatial)`` floating tensor, already divided by the kernel's standard
            deviations. Any number of spatial axes (2-D images, 3-D volumes, 1-D signals); ``D >= 1``.
        backend: ``None`` (``"numba"`` on CPU, ``"torch"`` elsewhere), ``"numba"`` or ``"torch"``.
        mask: optional ``(B, 1, *spatial)`` boolean tensor; points where it is False are left out of the
            lattice entirely (they neither send nor receive: their output is 0). Used for padded
            canvases: a padded image filters exactly like the unpadded one inside the mask.
        bandwidth: optional per-dimension standard deviations the features are divided by: a number,
            ``D`` numbers, or a tensor of shape ``()``, ``(D,)`` or ``(B, D)``; the kernel is then
            :math:`\exp(-\frac12\sum_d (f_i^d - f_j^d)^2 / \sigma_d^2)`. A tensor may require grad.
        geometry_grad: how the gradient w.r.t. ``features``/``bandwidth`` evaluates its moment terms:
            ``"lattice"`` (default) on this lattice; ``"fine"`` on a second lattice (features x 2.5, 8 blur
            rounds, five rings of extra vertices, ``"torch"`` backend) whose kernel is much closer to the
            Gaussian: a more accurate but much slower and larger backward pass (``docs/bandwidths.md``).
            The forward pass is the same either way.

    Gradients w.r.t. ``features`` and ``bandwidth`` are opt-in: when either requires grad, :meth:`filter`
    is differentiable in it too (the lattice keeps a reference to them; otherwise it keeps nothing).
    A ``bandwidth`` gradient alone costs one filter pass of ``(D + 1) C`` channels in the backward
    pass (instead of ``C``); a ``features`` gradient one more pass of ``D C`` channels.

    Attributes:
        batch_size, dim (D), spatial_shape, num_points (per image), num_vertices (all images),
        device, backend.
    """

    def __init__(
        self,
        features: torch.Tensor,
        *,
        backend: Optional[str] = None,
        mask: Optional[torch.Tensor] = None,
        bandwidth=None,
        geometry_grad: str = "lattice",
    ):
        _check_features(features)
        if mask is not None:
            _check_mask(mask, features)
        if geometry_grad not in _GEOMETRY_GRADS:
            raise ValueError(f"geometry_grad must be one of {_GEOMETRY_GRADS}, got {geometry_grad!r}")
        self.geometry_grad = geometry_grad
        self._rounds = 1
        bandwidth = None if bandwidth is None else _check_bandwidth(bandwidth, features)
        self.backend = _resolve_backend(backend, features.device)
        self.device = features.device
        self.batch_size = int(features.shape[0])
        self.dim = int(features.shape[1])
        self.spatial_shape = tuple(int(s) for s in features.shape[2:])
        self.num_points = int(math.prod(self.spatial_shape))
        d = self.dim
        with torch.no_grad():
            valid = None
            if mask is not None:
                valid = mask.reshape(self.batch_size, self.num_points) != 0
                empty = (~valid.any(1)).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(
                        f"mask excludes every pixel of image(s) {empty} of the batch (mask {tuple(mask.shape)})"
                    )
            if self.backend == "numba":  # the build divides by the bandwidth point by point
                absmax = _numba_build.absmax(features.detach(), bandwidth, valid)
            else:
                f = _divided(features.detach(), bandwidth).reshape(self.batch_size, d, self.num_points)
                if valid is not None:
                    f = torch.where(valid[:, None, :], f, torch.zeros((), dtype=f.dtype, device=f.device))
                absmax = torch.maximum(-f.amin(dim=(0, 2)), f.amax(dim=(0, 2)))
            scale = _scale_factors(d).to(features.device)
            bound = (absmax * scale).sum() * (d + 1)
            if float(bound) >= _MAX_ELEVATED:
                raise ValueError(
                    f"features span too large a range for the lattice (max |f| scaled = {float(bound):.3g} >= 2^30); "
                    "did you forget to divide positions/colours by the kernel's standard deviations? "
                    f"({_describe(features)})"
                )
            self._alpha = 1.0 / (1.0 + 2.0 ** (-d))
            self._bary_cache = {}
            if self.backend == "numba":
                self._build_numba(features, bandwidth, valid, scale)
            else:
                self._build_torch(f, scale, valid)
        self._keep_geometry(features, bandwidth, valid)

    # ------------------------------------------------------------------ builds
    def _build_numba(self, features, bandwidth, valid, scale: torch.Tensor) -> None:
        built = _numba_build.build(features.detach(), bandwidth, valid, scale.numpy())
        self._offsets, self._nbr, self.num_vertices = built.offsets, built.nbr, built.num_vertices
        self._bary_cache[torch.float32] = built.bary32
        if built.bary64 is not None:
            self._bary_cache[torch.float64] = built.bary64
        # what the float64 weights are re-made from on request: the caller's tensors and their versions, or a
        # copy of an inference tensor (it has no version counter)
        (f, fv), (bw, bv) = _snapshot(features), _snapshot(bandwidth)
        self._source, self._source_versions = (f, bw, valid, scale.numpy()), (fv, bv)

    def _build_torch(self, f: torch.Tensor, scale: torch.Tensor, valid: Optional[torch.Tensor], rings: int = 0) -> None:
        d, B, n = self.dim, self.batch_size, self.num_points
        dev = f.device
        pts = f.permute(0, 2, 1).reshape(B * n, d)  # (P0, d)
        batch_id = torch.arange(B, device=dev).repeat_interleave(n)
        keep = None if valid is None or bool(valid.all()) else valid.reshape(-1).nonzero().flatten()
        if keep is not None:
            pts, batch_id = pts[keep], batch_id[keep]
        cf = pts * scale
        # elevated[0] = sum_i cf_i ; elevated[j] = sum_{i>=j} cf_i - j * cf_{j-1}
        rc = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])
        tail = torch.cat([rc[:, 1:], torch.zeros_like(rc[:, :1])], dim=1)
        jj = torch.arange(1, d + 1, device=dev, dtype=torch.float64)
        elevated = torch.cat([rc[:, :1], tail - jj * cf], dim=1)  # (P0, d+1)
        down = 1.0 / (d + 1)
        v = elevated * down
        up = torch.ceil(v) * (d + 1)
        dn = torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - dn, up, dn).to(torch.int64)
        total = torch.div(rem0.sum(1), d + 1, rounding_mode="floor")
        diff = elevated - rem0.to(torch.float64)
        # rank[k] = #{i<k : diff_i >= diff_k} + #{i>k : diff_i > diff_k}  (Krähenbühl's tie-breaking)
        di = diff[:, :, None]
        dk = diff[:, None, :]
        upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).triu(1)
        lower = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).tril(-1)
        rank = ((di >= dk) & upper).sum(1) + ((di > dk) & lower).sum(1)
        rank = rank + total[:, None]
        neg = rank < 0
        over = rank > d
        rank = torch.where(neg, rank + (d + 1), torch.where(over, rank - (d + 1), rank))
        rem0 = torch.where(neg, rem0 + (d + 1), torch.where(over, rem0 - (d + 1), rem0))
        vb = (elevated - rem0.to(torch.float64)) * down
        b = torch.zeros(pts.shape[0], d + 2, dtype=torch.float64, device=dev)
        b.scatter_add_(1, d - rank, vb)
        b.scatter_add_(1, d - rank + 1, -vb)
        b[:, 0] += 1.0 + b[:, d + 1]
        bary = b[:, : d + 1]  # (P0, d+1)
        r_idx = torch.arange(d + 1, device=dev)
        # canonical[r, k] = r if k <= d - r else r - (d+1)
        canon = torch.where(r_idx[None, :] <= d - r_idx[:, None], r_idx[:, None], r_idx[:, None] - (d + 1))
        keys = rem0[:, None, :d] + canon[r_idx[None, :, None], rank[:, None, :d]]  # (P0, d+1, d)
        keys = torch.cat([batch_id[:, None, None].expand(-1, d + 1, 1), keys], dim=2).reshape(-1, d + 1)
        codes = _encode_rows(keys)
        ucodes, inverse = torch.unique(codes, return_inverse=True)
        m = ucodes.numel()
        first = torch.full((m,), keys.shape[0], dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, inverse, torch.arange(keys.shape[0], device=dev), reduce="amin")
        vkeys = keys[first]  # (M, 1 + d), sorted by code
        # neighbours along direction j: +-((d+1) e_j - 1) on the d stored coordinates
        step = torch.full((d + 1, d), -1, dtype=torch.int64, device=dev)
        step[torch.arange(d), torch.arange(d)] = d
        step = torch.cat([torch.zeros(d + 1, 1, dtype=torch.int64, device=dev), step], dim=1)  # batch id fixed
        if rings:  # add the vertices within `rings` blur steps, so that the blur is not cut short where
            # no point lies (the moment lattice of geometry_grad="fine"); the points keep their vertices
            for _ in range(rings):
                vkeys = torch.cat([vkeys, (vkeys[None] + step[:, None]).reshape(-1, d + 1),
                                   (vkeys[None] - step[:, None]).reshape(-1, d + 1)])
                uc, inv = torch.unique(_encode_rows(vkeys), return_inverse=True)
                first = torch.full((uc.numel(),), vkeys.shape[0], dtype=torch.int64, device=dev)
                first.scatter_reduce_(0, inv, torch.arange(vkeys.shape[0], device=dev), reduce="amin")
                vkeys = vkeys[first]
            m = vkeys.shape[0]
            codes = _encode_rows(torch.cat([vkeys, keys], 0))
            svc, perm = torch.sort(codes[:m])
            inverse = perm[torch.searchsorted(svc, codes[m:])]
        queries = torch.stack([vkeys[None] + step[:, None], vkeys[None] - step[:, None]], dim=2)  # (d+1, M, 2, 1+d)
        all_codes = _encode_rows(torch.cat([vkeys, queries.reshape(-1, d + 1)], 0))
        vcodes, qcodes = all_codes[:m], all_codes[m:]
        svc, perm = torch.sort(vcodes)
        pos = torch.searchsorted(svc, qcodes).clamp_(max=m - 1)
        found = svc[pos] == qcodes
        nbr = torch.where(found, perm[pos], torch.full_like(pos, m)).reshape(d + 1, m, 2)
        nbr = nbr.transpose(1, 2).contiguous()  # (d+1, 2, M): each direction's two index vectors contiguous
        self.num_vertices = m
        offsets = inverse.reshape(-1, d + 1)
        if keep is not None:  # left-out points: weight 0 on vertex 0
            full_off = torch.zeros(B * n, d + 1, dtype=torch.int64, device=dev)
            full_bary = torch.zeros(B * n, d + 1, dtype=torch.float64, device=dev)
            full_off[keep] = offsets
            full_bary[keep] = bary
            offsets, bary = full_off, full_bary
        self._offsets_t = offsets
        self._bary64_t = bary.contiguous()
        self._nbr_t = nbr  # index m = the all-zero row

    # ------------------------------------------------------------------ gradients w.r.t. the geometry
    def _keep_geometry(self, features, bandwidth, valid) -> None:
        """Keep references to what the feature/bandwidth gradient needs, only if one of them requires grad."""
        self._diff_features = features if features.requires_grad else None
        self._diff_bandwidth = bandwidth if bandwidth is not None and bandwidth.requires_grad else None
        self._geometry = None
        self._grad_cache = {}  # centred features and work buffers of the gradient, reused by every call
        if self._diff_features is not None or self._diff_bandwidth is not None:
            self._geometry = (features.detach(), None if bandwidth is None else bandwidth.detach(), valid)

    def _moment_lattice(self) -> "PermutohedralLattice":
        """The lattice of ``geometry_grad="fine"`` (cached): the features x ``_FINE_SCALE``, ``_FINE_ROUNDS``
        blur rounds, ``_FINE_RINGS`` rings of extra vertices, ``"torch"`` backend.

        Each blur round adds a variance of 3/4 per dimension (``[1/4, 1/2, 1/4]`` along the ``D + 1``
        directions) and splat + slice 1/4 (so the official lattice's kernel has variance 1, as measured);
        with the features x s the kernel's variance in the original units is ``(3 n / 4 + 1 / 4) / s^2``, 1
        for s = 2.5, n = 8. Eight rounds of a finer blur make the kernel much closer to the Gaussian than one
        round (its tails and its peak, where the moment terms ``|f_i - f_j|^2 k`` weigh), and the extra
        vertices keep the blur from being cut short where no point lies (the sparse bilateral lattice).
        Its scale (alpha) does not matter: the gradient rescales it to this lattice's row sums."""
        key = ("moment lattice",)
        if key not in self._grad_cache:
            feats, bw, valid = self._geometry
            f = _divided(feats, bw).reshape(self.batch_size, self.dim, self.num_points)
            if valid is not None:
                f = torch.where(valid[:, None, :], f, torch.zeros((), dtype=f.dtype, device=f.device))
            lat = PermutohedralLattice.__new__(PermutohedralLattice)
            lat.backend, lat.device, lat.geometry_grad = "torch", self.device, "lattice"
            lat.batch_size, lat.dim, lat.spatial_shape, lat.num_points = (
                self.batch_size, self.dim, self.spatial_shape, self.num_points)
            lat._alpha, lat._rounds, lat._bary_cache, lat._grad_cache = 1.0, _FINE_ROUNDS, {}, {}
            lat._diff_features = lat._diff_bandwidth = lat._geometry = None
            lat._build_torch(f * _FINE_SCALE, _scale_factors(self.dim).to(f.device), valid, rings=_FINE_RINGS)
            self._grad_cache[key] = lat
        return self._grad_cache[key]

    # ------------------------------------------------------------------ apply
    def _bary(self, dtype):
        """The barycentric weights in ``dtype`` (float32 or float64 on the numba backend), made once."""
        if dtype not in self._bary_cache:
            if self.backend == "numba":
                self._bary_cache[dtype] = self._numba_bary64()
            else:
                self._bary_cache[dtype] = self._bary64_t.to(dtype)
        return self._bary_cache[dtype]

    def _numba_bary64(self):
        features, bandwidth, valid, scale = self._source
        if (_version(features), _version(bandwidth)) != self._source_versions:
            raise RuntimeError(
                "the features (or bandwidth) this lattice was built from were modified in place since; filtering "
                "float64 values re-reads them: build a new lattice"
            )
        return _numba_build.barycentric64(features, bandwidth, valid, scale)

    def compiled_arrays(self) -> CompiledArrays:
        """The numba backend's arrays in float32, for kernels that drive several lattices at once
        (``crfrnn.densecrf``'s fused mean field). Read-only views; the lattice keeps ownership."""
        if self.backend != "numba":
            raise ValueError(f"compiled_arrays needs a lattice built with backend='numba', not {self.backend!r}")
        return CompiledArrays(self._bary(torch.float32), self._offsets, self._nbr.reshape(-1), self._alpha)

    def _check_values(self, values, name: str = "values") -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, *spatial), got {type(values).__name__}")
        if not values.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(values)}")
        expect = f"(B={self.batch_size}, C, {', '.join(map(str, self.spatial_shape))})"
        if (
            values.dim() != 2 + len(self.spatial_shape)
            or values.shape[0] != self.batch_size
            or tuple(values.shape[2:]) != self.spatial_shape
        ):
            raise ValueError(
                f"{name} must have shape {expect} to match the lattice's features, got {tuple(values.shape)}"
            )
        if values.shape[1] == 0:
            raise ValueError(f"{name} must have C >= 1 channels, got {tuple(values.shape)}")
        if values.device != self.device:
            raise ValueError(
                f"{name} is on {values.device} but the lattice (features) is on {self.device}; move them to one device"
            )

    def filter(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Gaussian-filter ``values (B, C, *spatial)`` on this lattice; returns the same shape.

        ``reverse=True`` applies the exact transpose (blur directions in reverse order).
        Differentiable w.r.t. ``values`` (the backward pass is the reverse filter on this lattice), and
        w.r.t. the features / bandwidth the lattice was built from if they require grad.
        """
        self._check_values(values)
        if not _all_finite(values):
            raise ValueError(f"values contains NaN or infinite values ({_describe(values)})")
        return _LatticeFilter.apply(values, self, bool(reverse), None, None, self._diff_features, self._diff_bandwidth)

    def _filter_diff(self, values, *, pre=None, post=None) -> torch.Tensor:
        """Differentiable ``post * F(values * pre)`` with the scales fused into the compiled passes.

        ``pre``/``post`` ``(B, 1, *spatial)`` may require grad (the mean-field loop's normalisation by the
        response to ones, which then costs no extra pass, depends on learned bandwidths); a ``post`` that
        requires grad must be non-zero (its gradient is taken from ``out / post``).
        """
        return _LatticeFilter.apply(values, self, False, pre, post, self._diff_features, self._diff_bandwidth)

    def filter_scaled(
        self,
        values: torch.Tensor,
        *,
        reverse: bool = False,
        pre: Optional[torch.Tensor] = None,
        post: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``post * F(pre * values)`` without gradients, optionally added into ``out`` in place.

        ``pre``/``post``: per-point scales ``(B, 1, *spatial)`` (or anything of ``B * N`` elements in
        that order); ``out``: a contiguous tensor of the values' shape and dtype to accumulate into.
        The scales and the accumulation are fused into the compiled passes (used by
        :mod:`crfrnn.densecrf` for pydensecrf's kernel normalisations). Not differentiable.
        """
        B, C = values.shape[0], values.shape[1]
        n = self.num_points
        if out is not None and (out.shape != values.shape or out.dtype != values.dtype or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {values.dtype} tensor of shape {tuple(values.shape)}")
        if self.backend == "numba" and (out is None or values.dtype in (torch.float32, torch.float64)):
            import numpy as np

            work = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
            x = values.detach().reshape(B, C, n).to(work).contiguous().numpy()
            consts = np.array([0.5, self._alpha], dtype=x.dtype)
            parts = _SPLAT_COPIES
            serial = x.size * (self.dim + 1) < _SERIAL_WORK
            empty = np.empty(0, dtype=x.dtype)
            sc = [empty if t is None else t.detach().reshape(-1).to(work).contiguous().numpy() for t in (pre, post)]
            res = np.empty(x.shape, dtype=x.dtype) if out is None else out.detach().reshape(B, C, n).numpy()
            args = (x, self._bary(work), self._offsets, self._nbr, reverse, consts, parts, res, sc[0], sc[1],
                    out is not None)
            if C == 1:  # normalisers: a scalar kernel (rows of one value gain nothing from SIMD padding)
                (_nb.filter_one_channel_serial if serial else _nb.filter_one_channel)(*args)
            else:  # the lattice-sized work arrays from NumPy, which advises huge pages for large arrays
                (_nb.filter_values_serial if serial else _nb.filter_values)(
                    *args, _nb.filter_work(x.shape, self.num_vertices, parts, x.dtype))
            return out if out is not None else torch.from_numpy(res).to(values.dtype).reshape(values.shape)
        shape = (B, 1) + tuple(values.shape[2:])
        v = values if pre is None else values * pre.reshape(shape)
        flat = v.reshape(B, C, n).permute(0, 2, 1).reshape(B * n, C)
        res = self._filter_torch(flat, reverse).reshape(B, n, C).permute(0, 2, 1).reshape(values.shape)
        if post is not None:
            res = res * post.reshape(shape)
        if out is None:
            return res.contiguous()
        with torch.no_grad():
            out.add_(res)
        return out

    def _filter_torch(self, flat: torch.Tensor, reverse: bool) -> torch.Tensor:
        d1 = self.dim + 1
        m = self.num_vertices
        C = flat.shape[1]
        w = self._bary(flat.dtype)  # (P0, d+1)
        off = self._offsets_t
        lat = torch.zeros(m + 1, C, dtype=flat.dtype, device=flat.device)
        lat.index_add_(0, off.reshape(-1), (flat[:, None, :] * w[:, :, None]).reshape(-1, C))
        directions = range(d1 - 1, -1, -1) if reverse else range(d1)
        new, side = torch.zeros_like(lat), torch.empty_like(lat[:m])  # row m stays 0: the missing neighbour
        for j in [j for _ in range(self._rounds) for j in directions]:
            lower, upper = self._nbr_t[j]
            # lat + 0.5 (lower + upper) in two work buffers (the fine lattice's many rounds over ~1e6 vertices)
            torch.index_select(lat, 0, lower, out=new[:m])
            new[:m].add_(torch.index_select(lat, 0, upper, out=side)).mul_(0.5).add_(lat[:m])
            lat, new = new, lat
        return (lat[off] * (w * self._alpha)[:, :, None]).sum(1)

    def __repr__(self) -> str:
        return (
            f"PermutohedralLattice(batch_size={self.batch_size}, dim={self.dim}, spatial_shape={self.spatial_shape}, "
            f"num_vertices={self.num_vertices}, backend={self.backend!r}, device={self.device})"
        )


def _encode_rows(rows: torch.Tensor) -> torch.Tensor:
    """Injective int64 code of each row of an integer matrix (exact: no hashing, no collisions).

    Packs columns into one integer while they fit in 62 bits; when they would not, the partial code
    is re-numbered by ``torch.unique`` (dense ranks) first.
    """
    mins = rows.amin(0)
    widths = (rows.amax(0) - mins + 1).tolist()
    code = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    span = 1
    for c, w in enumerate(widths):
        if span * w >= 2**62:
            uniq, code = torch.unique(code, return_inverse=True)
            span = uniq.numel()
        code = code * w + (rows[:, c] - mins[c])
        span *= w
    return code


class _LatticeFilter(torch.autograd.Function):
    """``post * F(pre * values)`` on ``lattice``; ``pre``/``post`` per-point scales or None. ``features`` and
    ``bandwidth`` are the lattice's own (None unless they require grad): inputs only so that autograd
    routes their gradients here."""

    @staticmethod
    def forward(ctx, values, lattice, reverse, pre, post, features, bandwidth):
        ctx.lattice, ctx.reverse = lattice, reverse
        out = lattice.filter_scaled(values, reverse=reverse, pre=pre, post=post)
        ctx.geometric = any(ctx.needs_input_grad[3:])
        if ctx.geometric:
            ctx.save_for_backward(values, out, pre, post)
        else:
            ctx.pre, ctx.post = pre, post
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.geometric:
            return geometric_backward(ctx, grad)
        # linear: the adjoint is pre * F^T(post * grad), and F^T is the same lattice blurred in the
        # opposite order -- the same Function with the scales swapped (so double backward works too)
        g = _LatticeFilter.apply(grad.contiguous(), ctx.lattice, not ctx.reverse, ctx.post, ctx.pre, None, None)
        return g, None, None, None, None, None, None


def permutohedral_filter(
    values: torch.Tensor,
    features: torch.Tensor,
    normalize: bool = False,
    *,
    backend: Optional[str] = None,
    bandwidth=None,
    geometry_grad: str = "lattice",
) -> torch.Tensor:
    """One-shot lattice build + filter: ``values (B, C, *spatial)``, ``features (B, D, *spatial)``.

    ``normalize=True`` divides by the filter's response to ones (a weighted average, self included).
    ``bandwidth``: optional per-dimension stds the features are divided by (see
    :class:`PermutohedralLattice`). Differentiable w.r.t. ``values``, and w.r.t. ``features`` and
    ``bandwidth`` when they require grad (opt-in; the normalisation is differentiated too; ``geometry_grad`` as
    in :class:`PermutohedralLattice`). To filter
    several value tensors with the same features, build a :class:`PermutohedralLattice` once instead.
    """
    _check_pair(values, features)
    lattice = PermutohedralLattice(features, backend=backend, bandwidth=bandwidth, geometry_grad=geometry_grad)
    out = lattice.filter(values)
    if normalize:
        ones = torch.ones((values.shape[0], 1) + tuple(values.shape[2:]), dtype=values.dtype, device=values.device)
        out = out / lattice.filter(ones)
    return out
