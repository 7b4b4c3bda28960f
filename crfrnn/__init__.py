"""crfrnn: CRF-RNN (Zheng et al., ICCV 2015) for PyTorch — dense-CRF mean-field as a trainable RNN
layer on a permutohedral lattice, on CPU and GPU.

Where things are:

* :mod:`crfrnn.lattice` — the permutohedral lattice Gaussian filter (and its exact O(N²) twin);
* :mod:`crfrnn.meanfield` — mean-field inference as an RNN: :func:`mean_field` and the :class:`CrfRnn` layer;
"""
from .lattice import PermutohedralLattice, available_backends, dense_gaussian_filter, permutohedral_filter
from .meanfield import CrfRnn, crf_features, mean_field

__version__ = "0.1.0"

__all__ = [
    "PermutohedralLattice",
    "permutohedral_filter",
    "dense_gaussian_filter",
    "available_backends",
    "mean_field",
    "CrfRnn",
    "crf_features",
]
