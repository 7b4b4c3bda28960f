"""crfrnn: CRF-RNN (Zheng et al., ICCV 2015) for PyTorch — dense-CRF mean-field as a trainable RNN
layer on a permutohedral lattice, on CPU and GPU.

Where things are:

* :mod:`crfrnn.lattice` — the permutohedral lattice Gaussian filter (and its exact O(N²) twin);
* :mod:`crfrnn.meanfield` — mean-field inference as an RNN: :func:`mean_field` and the :class:`CrfRnn` layer;
* :mod:`crfrnn.densecrf` — a drop-in for ``pydensecrf.densecrf`` (and ``crfrnn.densecrf.utils``, also
  importable as ``crfrnn.utils``, for its utils), plus :func:`refine` for one-call post-processing;
* :mod:`crfrnn.models` — FCN-8s, ``CrfRnnNet`` (FCN-8s + CRF-RNN), ``CrfRnnHead`` for any network, and the
  weight loaders (:mod:`crfrnn.models.weights`, also importable as ``crfrnn.weights``);
* :mod:`crfrnn.data` — readers, VOC (+SBD), Pascal Context, CamVid and folder datasets, joint transforms;
* :mod:`crfrnn.engine` — training (SGD, run folders, resume, DDP), evaluation and metrics (also importable
  as ``crfrnn.train`` and ``crfrnn.metrics``);
* :mod:`crfrnn.cli` — the ``crfrnn`` command; :mod:`crfrnn.viz` — palettes, overlays, figures;
  :mod:`crfrnn.demo` — the built-in scene; :mod:`crfrnn.bench` — benchmarks.
"""
from .lattice import PermutohedralLattice, available_backends, dense_gaussian_filter, permutohedral_filter
from .meanfield import CrfRnn, crf_features, mean_field
from .densecrf import refine
from .models import CrfRnnHead, CrfRnnNet, FCN8s
from .models.weights import fcn8s_from_vgg16, load_crfasrnn_keras_weights, load_crfasrnn_weights

__version__ = "0.1.0"

__all__ = [
    "PermutohedralLattice",
    "permutohedral_filter",
    "dense_gaussian_filter",
    "available_backends",
    "mean_field",
    "CrfRnn",
    "crf_features",
    "refine",
    "FCN8s",
    "CrfRnnNet",
    "CrfRnnHead",
    "load_crfasrnn_weights",
    "load_crfasrnn_keras_weights",
    "fcn8s_from_vgg16",
]
