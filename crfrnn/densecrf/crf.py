r"""Fully connected CRF inference (Krähenbühl & Koltun, 2011): a drop-in replacement for ``pydensecrf.densecrf``.

::

    import crfrnn.densecrf as dcrf          # instead of: import pydensecrf.densecrf as dcrf
    d = dcrf.DenseCRF2D(W, H, n_labels)
    d.setUnaryEnergy(U)                      # (n_labels, H*W) float32, -log p
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)   # image (H, W, 3) uint8
    Q = d.inference(5)                       # (n_labels, H*W) float32 marginals
    labels = np.argmax(Q, axis=0).reshape(H, W)

or, for the common post-processing case, :func:`refine` in one call.

The model and its conventions are pydensecrf's (read from its C++ sources, ``densecrf.cpp``,
``pairwise.cpp``, ``labelcompatibility.cpp``), so results agree with it up to floating-point rounding:

* Mean field: :math:`Q^0 = \mathrm{softmax}(-U)`, then per iteration
  :math:`Q \leftarrow \mathrm{softmax}\big(-U - \sum_k \mu_k(\tilde K_k Q)\big)` over labels, where
  :math:`\tilde K_k Q` is the (normalised) Gaussian filter of the marginals and :math:`\mu_k` the label
  compatibility. The filter includes the pixel itself (``k(f_i, f_i) = 1``), exactly as pydensecrf.
* Compatibility ``compat`` (:math:`\mu`), applied to the filtered marginals ``M``:

  - a number ``w`` (Potts): :math:`\mu(M) = -w M`, i.e. ``w > 0`` *rewards* equal labels;
  - a vector ``w`` of length L (diagonal): :math:`\mu(M) = \mathrm{diag}(w) M` - note the opposite sign:
    a Potts-like attraction needs *negative* entries;
  - an ``(L, L)`` matrix ``m``: :math:`\mu(M) = \tfrac12(m + m^\top) M` (pydensecrf symmetrises it);
    ``m[l, l']`` is the energy of labels ``l, l'`` side by side, so ``1 - I`` is Potts with ``w = 1``
    (up to a per-pixel constant that the softmax ignores).
* Normalisation of the kernel with :math:`n = K\mathbf 1` (the filtered ones):
  ``NORMALIZE_SYMMETRIC`` :math:`\tilde K Q = n^{-1/2} K (n^{-1/2} Q)`; ``NORMALIZE_BEFORE``
  :math:`K(n^{-1} Q)`; ``NORMALIZE_AFTER`` :math:`n^{-1} K Q`; ``NO_NORMALIZATION`` :math:`K Q` (pydensecrf
  computes a mean normaliser for this case but never applies it; neither do we).
* ``kernel`` (``DIAG_KERNEL``, ``CONST_KERNEL``, ``FULL_KERNEL``) only matters to pydensecrf's parameter
  learning; inference uses the features as given, whatever the kernel type. It is validated and recorded.
* ``klDivergence(Q)`` is pydensecrf's objective: :math:`\sum Q\log Q + \sum U Q + \sum_k \sum Q\,\mu_k(\tilde K_k Q)`.

Implementation: every pairwise term builds its :class:`~crfrnn.lattice.PermutohedralLattice` once, when
it is added (as pydensecrf does). On the CPU, ``inference`` runs all terms and the softmax fused in one
compiled pass over the pixels per iteration (:func:`crfrnn.lattice._numba_kernels.dense_meanfield`: slice every
term's blurred lattice, add the unary, softmax, splat the new marginals into every lattice), with
pydensecrf's maths; elsewhere, and in ``stepInference``/``klDivergence``, each iteration filters all
labels in one call per term (the fused path's test oracle). The fused softmax computes ``exp`` to float32
accuracy but raises arguments below ``-60 ln 2`` to it, so marginals are never below ``2^-60 / n_labels``
(~1e-19; pydensecrf's go down to ~1e-38 before they underflow to 0); otherwise marginals agree with
pydensecrf's to float32 rounding. Arrays are stored as float32 torch tensors (on ``device``, CPU by default);
what is returned to the caller is a float32 numpy array ``(n_labels, n_pixels)`` like pydensecrf's
(``np.array(Q)``, ``np.argmax(Q, 0)`` work).

Arguments are checked as pydensecrf checks them (unaries and features must be float32 and C-contiguous,
images uint8), plus the checks pydensecrf leaves to crashes: shapes of ``compat``, non-finite inputs,
non-positive kernel widths. Errors are ``ValueError``/``TypeError`` naming the argument and its shape.
"""
from __future__ import annotations

import math
from enum import IntEnum
from numbers import Number
from typing import Optional, Tuple, Union

import numpy as np
import torch

from crfrnn.lattice.cache import LatticeCache
from crfrnn.lattice.permutohedral import PermutohedralLattice

from ._checks import _check_finite, _enum, _float32_array, _int_arg, _positive_widths, _shape
from ._fused import fused_meanfield, stack_terms, unary_rows

__all__ = [
    "DenseCRF",
    "DenseCRF2D",
    "KernelType",
    "NormalizationType",
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NO_NORMALIZATION",
    "NORMALIZE_BEFORE",
    "NORMALIZE_AFTER",
    "NORMALIZE_SYMMETRIC",
    "Unary",
    "ConstUnary",
    "LogisticUnary",
]


class KernelType(IntEnum):
    """pydensecrf's kernel types (same values)."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(IntEnum):
    """pydensecrf's kernel normalisations (same values)."""

    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL
NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------- compatibility
class _Compatibility:
    """Label compatibility :math:`\\mu` (pydensecrf's Potts / Diagonal / Matrix compatibilities)."""

    def __init__(self, compat, n_labels: int, device: torch.device):
        if isinstance(compat, torch.Tensor) and compat.dim() == 0:
            compat = compat.item()
        if isinstance(compat, np.ndarray) and compat.ndim == 0:
            compat = compat.item()
        if isinstance(compat, Number):
            w = float(compat)
            if not math.isfinite(w):
                raise ValueError(f"compat must be finite, got {compat!r}")
            self.kind, self.weight = "potts", w
            return
        if isinstance(compat, (np.ndarray, torch.Tensor)):
            nd = compat.ndim
            if nd > 2:
                raise ValueError(
                    f"compat must be a number (Potts), a vector (n_labels,) or a matrix (n_labels, n_labels); "
                    f"got shape {_shape(compat)} (LabelCompatibility of dimension >2 not meaningful)"
                )
            t = _float32_array(compat, "compat", nd)
            want = (n_labels,) * nd
            if _shape(t) != want:
                kind = "vector" if nd == 1 else "matrix"
                raise ValueError(f"compat {kind} must have shape {want} for n_labels={n_labels}, got {_shape(t)}")
            _check_finite(t, "compat")
            t = t.to(device)
            if nd == 1:
                self.kind, self.weight = "diag", t[:, None]  # (L, 1)
            else:
                self.kind, self.weight = "matrix", 0.5 * (t + t.T)  # (L, L), as pydensecrf's MatrixCompatibility
            return
        raise TypeError(
            f"compat must be a number, or a float32 numpy array / torch tensor of shape (n_labels,) or "
            f"(n_labels, n_labels); got {type(compat).__name__}"
        )

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """``(L, N)`` filtered marginals -> ``(L, N)`` pairwise energies."""
        if self.kind == "potts":
            return m * (-self.weight)
        if self.kind == "diag":
            return self.weight * m
        return self.weight @ m


def _lattice_and_row_sums(features: torch.Tensor) -> tuple:
    """The lattice of ``features (D, N)`` and its kernel's row sums ``(N,)`` float64 (pixel itself included)."""
    lattice = PermutohedralLattice(features[None])  # (1, D, N)
    with torch.no_grad():
        ones = torch.ones(1, 1, features.shape[1], dtype=torch.float32, device=features.device)
        return lattice, lattice.filter(ones)[0, 0].double()


class _Pairwise:
    """One pairwise term: its lattice (built once), kernel normaliser and compatibility."""

    def __init__(self, features: torch.Tensor, compat: _Compatibility, kernel, normalization, built=None):
        self.kernel = kernel
        self.normalization = normalization
        self.compat = compat
        n = features.shape[1]
        self.lattice, k1 = built if built is not None else _lattice_and_row_sums(features)
        if normalization == NORMALIZE_SYMMETRIC:
            norm = (1.0 / torch.sqrt(k1 + 1e-20)).float()
        elif normalization in (NORMALIZE_BEFORE, NORMALIZE_AFTER):
            norm = (1.0 / (k1 + 1e-20)).float()
        else:  # NO_NORMALIZATION: pydensecrf computes a constant normaliser but never applies it
            norm = None
        # pydensecrf's DenseKernel::filter: scale by `pre` (N,), filter, scale by `post` (N,)
        self.pre = norm if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE) else None
        self.post = norm if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER) else None
        # Potts fast path: logits -= -w * post * K(pre q)  <=>  logits += (w * post) * K(pre q), with the
        # scales and the accumulation fused into the lattice passes
        if compat.kind == "potts":
            w = compat.weight
            self.potts_post = torch.full((n,), w, dtype=torch.float32, device=features.device) if self.post is None \
                else self.post * w

    def filtered(self, q: torch.Tensor) -> torch.Tensor:
        """Normalised Gaussian filter of ``q (L, N)`` -> ``(L, N)`` (pydensecrf's ``DenseKernel::apply``)."""
        return self.lattice.filter_scaled(q[None], pre=self.pre, post=self.post)[0]

    def energy(self, q: torch.Tensor) -> torch.Tensor:
        """Pairwise energies ``mu(K~ q)``, ``(L, N)`` (pydensecrf's ``PairwisePotential::apply``)."""
        return self.compat.apply(self.filtered(q))

    def subtract_from(self, logits: torch.Tensor, q: torch.Tensor) -> None:
        """``logits -= mu(K~ q)`` in place (one filter call for all labels)."""
        if self.compat.kind == "potts":
            self.lattice.filter_scaled(q[None], pre=self.pre, post=self.potts_post, out=logits[None])
        else:
            logits.sub_(self.energy(q))


# ------------------------------------------------------------------------------------------------ unary
class Unary:
    """Base of the unary-energy objects accepted by :meth:`DenseCRF.setUnary` (as pydensecrf)."""

    def get(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ConstUnary(Unary):
    """Constant unary energies ``u (n_labels, n_pixels)`` float32."""

    def __init__(self, u):
        self.u = _float32_array(u, "u", 2)

    def get(self) -> torch.Tensor:
        return self.u


class LogisticUnary(Unary):
    """Unary energies ``L @ f``: ``L (n_labels, K)`` weights times ``f (K, n_pixels)`` features, float32."""

    def __init__(self, L, f):
        self.L = _float32_array(L, "L", 2)
        self.f = _float32_array(f, "f", 2)
        if self.L.shape[1] != self.f.shape[0]:
            raise ValueError(
                f"LogisticUnary needs L (n_labels, K) and f (K, n_pixels) with matching K, "
                f"got L {_shape(self.L)} and f {_shape(self.f)}"
            )

    def get(self) -> torch.Tensor:
        return self.L @ self.f


# ------------------------------------------------------------------------------------------------- CRF
class DenseCRF:
    """A fully connected CRF over ``n_pixels`` variables with ``n_labels`` labels (pydensecrf's ``DenseCRF``).

    Args:
        n_pixels: number of variables N.
        n_labels: number of labels L.
        device: where the tensors and lattices live (default CPU; the lattice uses its numba kernels on
            CPU and its torch backend elsewhere). Results are returned as numpy arrays either way.
        lattice_cache: a :class:`~crfrnn.lattice.LatticeCache` that :meth:`DenseCRF2D.addPairwiseGaussian`
            takes its lattice and normaliser from (they depend only on ``w``, ``h`` and ``sxy``): pass the same
            one to the CRFs of many same-size images to build them once. ``None`` (default): built every time.
    """

    def __init__(self, n_pixels: int, n_labels: int, *, device: Optional[Union[str, torch.device]] = None,
                 lattice_cache: Optional[LatticeCache] = None):
        self._nvar = _int_arg(n_pixels, "n_pixels", 1)
        self._nlabel = _int_arg(n_labels, "n_labels", 1)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if lattice_cache is not None and not isinstance(lattice_cache, LatticeCache):
            raise TypeError(f"lattice_cache must be a crfrnn.lattice.LatticeCache or None, got "
                            f"{type(lattice_cache).__name__}")
        self._lattice_cache = lattice_cache
        # the unary energies: on the CPU as the fused pass reads them (-U in rows (N, Cp), made once per
        # setUnary: no inference copies them again), elsewhere (L, N) float32 on the device
        self._unary_rows: Optional[np.ndarray] = None
        self._unary: Optional[torch.Tensor] = None
        self._pairwise: list = []
        self._stacked: Optional[tuple] = None  # the terms laid out for the fused CPU mean field

    @property
    def n_pixels(self) -> int:
        return self._nvar

    @property
    def n_labels(self) -> int:
        return self._nlabel

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_pixels={self._nvar}, n_labels={self._nlabel}, "
            f"pairwise_terms={len(self._pairwise)}, unary={'set' if self._has_unary() else 'unset'}, "
            f"device={self.device})"
        )

    # ----------------------------------------------------------------------------------- energies
    def setUnaryEnergy(self, u, f=None) -> None:
        """Set the unary energies ``u (n_labels, n_pixels)`` float32 C-contiguous (``-log p``).

        With ``f`` given, the energies are ``u @ f`` (pydensecrf's logistic unary): ``u (n_labels, K)``,
        ``f (K, n_pixels)``.
        """
        if f is None:
            # not copied here: _set_unary makes the CRF's own copy (as rows on the CPU)
            t = _float32_array(u, "unary energy u", 2, copy=False)
            want = (self._nlabel, self._nvar)
            if _shape(t) != want:
                raise ValueError(f"Bad shape for unary energy u: need (n_labels, n_pixels) = {want}, got {_shape(t)}")
            self._set_unary(t, "unary energy u")
        else:
            self.setUnary(LogisticUnary(u, f))

    def setUnary(self, u: Unary) -> None:
        """Set the unary from a :class:`ConstUnary` or :class:`LogisticUnary`."""
        if not isinstance(u, Unary):
            raise TypeError(f"setUnary expects a ConstUnary or LogisticUnary, got {type(u).__name__}")
        t = u.get()
        want = (self._nlabel, self._nvar)
        if _shape(t) != want:
            raise ValueError(f"Bad shape for unary energy: need (n_labels, n_pixels) = {want}, got {_shape(t)}")
        self._set_unary(t, "unary energy")

    def _set_unary(self, t: torch.Tensor, name: str) -> None:
        """``t (L, N)`` float32 CPU, checked and copied (``t`` may be the caller's memory)."""
        _check_finite(t, name)
        if self.device.type == "cpu":
            self._unary_rows, self._unary = unary_rows(t), None
        else:
            self._unary_rows, self._unary = None, t.to(self.device, copy=True)

    def _has_unary(self) -> bool:
        return self._unary is not None or self._unary_rows is not None

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Add a Gaussian pairwise term on ``features (D, n_pixels)`` float32 C-contiguous.

        The features are already divided by the kernel widths (see :mod:`crfrnn.utils`). ``compat`` is a
        number (Potts), an ``(n_labels,)`` vector or an ``(n_labels, n_labels)`` matrix (module docstring
        for the signs). The lattice is built here, once.
        """
        t = _float32_array(features, "features", 2)
        if t.shape[1] != self._nvar or t.shape[0] < 1:
            raise ValueError(
                f"Bad shape for pairwise energy features: need (D, n_pixels) = (?, {self._nvar}) with D >= 1, "
                f"got {_shape(t)}"
            )
        self._add(t, compat, kernel, normalization)

    def _add(self, features: torch.Tensor, compat, kernel, normalization, cache_key=None) -> None:
        kernel = _enum(kernel, KernelType, "kernel")
        normalization = _enum(normalization, NormalizationType, "normalization")
        comp = _Compatibility(compat, self._nlabel, self.device)
        _check_finite(features, "features")
        features = features.to(self.device)
        built = None
        if cache_key is not None and self._lattice_cache is not None:
            built = self._lattice_cache.get(cache_key, lambda: _lattice_and_row_sums(features))
        self._pairwise.append(_Pairwise(features, comp, kernel, normalization, built))
        self._stacked = None

    # ---------------------------------------------------------------------------------- inference
    def _unary_or_zero(self) -> torch.Tensor:
        """The unary energies ``(L, N)`` float32 on ``self.device`` (zeros if none was set)."""
        if self._unary_rows is not None:  # negation is exact: the energies as they were set
            return (-torch.from_numpy(self._unary_rows[:, :self._nlabel])).T.contiguous()
        if self._unary is None:
            return torch.zeros(self._nlabel, self._nvar, dtype=torch.float32, device=self.device)
        return self._unary

    def _fused_terms(self) -> Optional[tuple]:
        """The terms laid out for the fused CPU pass (made once), or None unless every lattice is a numba one."""
        if not (self._pairwise and all(t.lattice.backend == "numba" for t in self._pairwise)):
            return None
        if self._stacked is None:
            self._stacked = stack_terms(self._pairwise, self._nlabel)
        return self._stacked

    @torch.no_grad()
    def _infer(self, n_iterations: int, labels: bool = False) -> torch.Tensor:
        """Mean field as tensors: ``Q (L, N)`` float32 on ``self.device``, or with ``labels`` its arg max ``(N,)``
        int64 (the first label at a tie). On CPU lattices fused, and the fused pass picks the labels as it goes
        (no ``(L, N)`` marginals written and read back)."""
        stacked = self._fused_terms()
        if stacked is not None:
            rows = self._unary_rows if self._unary_rows is not None else unary_rows(self._unary_or_zero().cpu())
            return fused_meanfield(rows, self._nlabel, stacked, n_iterations, labels=labels)
        q = self._infer_by_terms(-self._unary_or_zero(), n_iterations)
        return q.argmax(0) if labels else q

    @torch.no_grad()
    def _infer_by_terms(self, neg_unary: torch.Tensor, n_iterations: int) -> torch.Tensor:
        """Mean field one filter call per term and iteration (any device; the fused path's twin)."""
        q = torch.softmax(neg_unary, dim=0)
        for _ in range(n_iterations):
            logits = neg_unary.clone()
            for term in self._pairwise:
                term.subtract_from(logits, q)
            q = torch.softmax(logits, dim=0)
        return q

    def inference(self, n_iterations: int) -> np.ndarray:
        """Run ``n_iterations`` mean-field steps; returns the marginals ``Q (n_labels, n_pixels)`` float32."""
        n = _int_arg(n_iterations, "n_iterations", 0)
        return self._infer(n).cpu().numpy()

    def startInference(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Initial marginals ``softmax(-U)`` and two scratch arrays: ``(Q, tmp1, tmp2)``, each ``(L, N)`` float32.

        Pass them to :meth:`stepInference`, which updates ``Q`` in place (``tmp1`` receives the
        pre-softmax logits, ``tmp2`` the last pairwise term's energies).
        """
        with torch.no_grad():
            q = torch.softmax(-self._unary_or_zero(), dim=0).cpu().numpy()
        shape = (self._nlabel, self._nvar)
        return q, np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _marginals(self, Q, name: str = "Q", writable: bool = False) -> torch.Tensor:
        want = (self._nlabel, self._nvar)
        if isinstance(Q, np.ndarray):
            if _shape(Q) != want:
                raise ValueError(f"{name} must have shape (n_labels, n_pixels) = {want}, got {Q.shape}")
            if writable and (Q.dtype != np.float32 or not Q.flags["WRITEABLE"]):
                raise ValueError(
                    f"{name} must be a writable float32 array (as returned by startInference), got {Q.dtype} "
                    f"{'read-only ' if not Q.flags['WRITEABLE'] else ''}array of shape {Q.shape}"
                )
            return torch.from_numpy(np.ascontiguousarray(Q, dtype=np.float32)).to(self.device)
        if isinstance(Q, torch.Tensor):
            if _shape(Q) != want:
                raise ValueError(f"{name} must have shape (n_labels, n_pixels) = {want}, got {_shape(Q)}")
            if writable and Q.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {Q.dtype}")
            return Q.detach().to(self.device, torch.float32)
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape {want}, got {type(Q).__name__}")

    def stepInference(self, Q, tmp1=None, tmp2=None) -> None:
        """One mean-field step, updating ``Q`` (from :meth:`startInference`) in place."""
        q = self._marginals(Q, "Q", writable=True)
        with torch.no_grad():
            unary = self._unary_or_zero()
            logits = -unary
            last = None
            for term in self._pairwise:
                last = term.energy(q)
                logits = logits - last
            new = torch.softmax(logits, dim=0)
        _write(Q, new)
        _write(tmp1, logits, optional=True)
        if last is not None:
            _write(tmp2, last, optional=True)

    def klDivergence(self, Q) -> float:
        """pydensecrf's KL objective of marginals ``Q (n_labels, n_pixels)`` (up to the log-partition).

        :math:`\\sum Q \\log \\max(Q, 10^{-20}) + \\sum U Q + \\sum_k \\sum Q\\, \\mu_k(\\tilde K_k Q)`.
        """
        q = self._marginals(Q, "Q")
        with torch.no_grad():
            qd = q.double()
            kl = (qd * torch.log(torch.clamp(q, min=1e-20).double())).sum()
            if self._has_unary():
                kl = kl + (self._unary_or_zero().double() * qd).sum()
            for term in self._pairwise:
                kl = kl + (qd * term.energy(q).double()).sum()
        return float(kl)


def _write(dst, src: torch.Tensor, optional: bool = False) -> None:
    """Copy ``src`` into the caller's buffer ``dst`` (numpy array or tensor) in place."""
    if isinstance(dst, np.ndarray):
        if dst.shape == tuple(src.shape) and dst.flags["WRITEABLE"]:
            dst[...] = src.cpu().numpy()
            return
    elif isinstance(dst, torch.Tensor):
        if tuple(dst.shape) == tuple(src.shape):
            with torch.no_grad():
                dst.copy_(src)
            return
    if not optional:  # pragma: no cover - _marginals checked Q already
        raise ValueError("cannot write the result into the given buffer")


class DenseCRF2D(DenseCRF):
    """A dense CRF on a ``w x h`` image (pydensecrf's ``DenseCRF2D``); pixel ``(x, y)`` is variable ``y*w + x``.

    Args:
        w, h: image width and height (note the order, as pydensecrf).
        n_labels: number of labels L.
        device, lattice_cache: see :class:`DenseCRF`.
    """

    def __init__(self, w: int, h: int, n_labels: int, *, device: Optional[Union[str, torch.device]] = None,
                 lattice_cache: Optional[LatticeCache] = None):
        self._w = _int_arg(w, "w", 1)
        self._h = _int_arg(h, "h", 1)
        super().__init__(self._w * self._h, n_labels, device=device, lattice_cache=lattice_cache)

    def __repr__(self) -> str:
        return (
            f"DenseCRF2D(w={self._w}, h={self._h}, n_labels={self._nlabel}, pairwise_terms={len(self._pairwise)}, "
            f"unary={'set' if self._has_unary() else 'unset'}, device={self.device})"
        )

    def _positions(self, sx: float, sy: float) -> torch.Tensor:
        """``(2, h*w)`` float32 features ``(x / sx, y / sy)``, computed in float32 like pydensecrf."""
        xs = torch.arange(self._w, dtype=torch.float32) / torch.tensor(sx, dtype=torch.float32)
        ys = torch.arange(self._h, dtype=torch.float32) / torch.tensor(sy, dtype=torch.float32)
        return torch.stack([xs[None, :].expand(self._h, -1), ys[:, None].expand(-1, self._w)]).reshape(2, -1)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Smoothness term with features ``(x/sx, y/sy)``; ``sxy`` is a number or ``(sx, sy)``."""
        sx, sy = _positive_widths(sxy, "sxy", 2)
        key = ("positions", self._w, self._h, sx, sy, str(self.device))  # all the lattice depends on
        self._add(self._positions(sx, sy), compat, kernel, normalization, key)

    def addPairwiseBilateral(
        self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC
    ) -> None:
        """Appearance term with features ``(x/sx, y/sy, r/sr, g/sg, b/sb)``.

        Args:
            sxy: a number or ``(sx, sy)``.
            srgb: a number or ``(sr, sg, sb)``.
            rgbim: ``(h, w, 3)`` uint8 C-contiguous image (numpy, or a uint8 torch tensor).
        """
        sx, sy = _positive_widths(sxy, "sxy", 2)
        widths = _positive_widths(srgb, "srgb", 3)
        if rgbim is None:
            raise TypeError("rgbim must not be None")
        if isinstance(rgbim, torch.Tensor):
            if rgbim.dtype != torch.uint8:
                raise ValueError(f"rgbim must be uint8 (as pydensecrf), got {rgbim.dtype} with shape {_shape(rgbim)}")
            img = rgbim.detach().cpu()
        elif isinstance(rgbim, np.ndarray):
            if rgbim.dtype != np.uint8:
                raise ValueError(f"rgbim must be uint8 (as pydensecrf), got {rgbim.dtype} with shape {rgbim.shape}")
            if not rgbim.flags["C_CONTIGUOUS"]:
                raise ValueError(
                    f"rgbim (shape {rgbim.shape}) must be C-contiguous (as pydensecrf); use np.ascontiguousarray(rgbim)"
                )
            img = torch.from_numpy(np.array(rgbim, copy=True))
        else:
            raise TypeError(f"rgbim must be a uint8 numpy array of shape (h, w, 3), got {type(rgbim).__name__}")
        if img.dim() != 3 or _shape(img)[:2] != (self._h, self._w):
            raise ValueError(
                f"Bad shape for pairwise bilateral rgbim: need (h, w, 3) = {(self._h, self._w, 3)}, got {_shape(img)}"
            )
        if img.shape[2] != 3:
            raise ValueError(
                f"addPairwiseBilateral only works for RGB images (h, w, 3), got {_shape(img)}; for other images use "
                f"crfrnn.utils.create_pairwise_bilateral and addPairwiseEnergy"
            )
        colour = img.reshape(-1, 3).T.to(torch.float32) / torch.tensor(widths, dtype=torch.float32)[:, None]
        self._add(torch.cat([self._positions(sx, sy), colour], 0), compat, kernel, normalization)
