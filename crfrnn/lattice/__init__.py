"""The permutohedral lattice: O(N) high-dimensional Gaussian filtering, and its exact O(N²) twin.

* :mod:`.permutohedral` — :class:`PermutohedralLattice` (build once, filter many), :func:`permutohedral_filter`,
  the vectorised torch backend (any device) and the dispatch to the compiled CPU kernels;
* :mod:`._numba_kernels` — the compiled CPU kernels (Numba): build, splat/blur/slice, fused dense-CRF pass;
* :mod:`._geometry_grad` — the opt-in gradient w.r.t. the features / bandwidths (filters on the same lattice);
* :mod:`.fused` — mean field over several lattices in one compiled pass per iteration (CPU);
* :mod:`.exact` — :func:`dense_gaussian_filter`, the brute-force oracle;
* :mod:`.cache` — :class:`LatticeCache`, lattices of repeating features built once by their user;
* :mod:`.workspace` — :class:`Workspace`, scratch arrays a caller reuses across calls (the layer's history);
* :mod:`._memory` — memory for the arrays the kernels stream through: small pages, recycled across calls
  (:func:`cached_memory_bytes`, :func:`release_cached_memory`);
* :mod:`._checks` — the argument checks of the public entry points.
"""
from ._memory import cached_memory_bytes, release_cached_memory
from .cache import LatticeCache
from .exact import dense_gaussian_filter, dense_gaussian_kernel
from .permutohedral import PermutohedralLattice, available_backends, permutohedral_filter
from .workspace import Workspace

__all__ = [
    "PermutohedralLattice",
    "permutohedral_filter",
    "dense_gaussian_filter",
    "dense_gaussian_kernel",
    "available_backends",
    "LatticeCache",
    "Workspace",
    "cached_memory_bytes",
    "release_cached_memory",
]
