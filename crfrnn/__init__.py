"""crfrnn: CRF-RNN (Zheng et al., ICCV 2015) for PyTorch — dense-CRF mean-field as a trainable RNN
layer on a permutohedral lattice, on CPU and GPU.

Where things are:

* :mod:`crfrnn.lattice` — the permutohedral lattice Gaussian filter (and its exact O(N²) twin);
"""
from .lattice import PermutohedralLattice, available_backends, dense_gaussian_filter, permutohedral_filter

__version__ = "0.1.0"

__all__ = [
    "PermutohedralLattice",
    "permutohedral_filter",
    "dense_gaussian_filter",
    "available_backends",
]
