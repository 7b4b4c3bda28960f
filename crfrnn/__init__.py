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
import importlib
import importlib.util

#: The public names of the package and the module each comes from. They are imported on first use (PEP 562):
#: ``import crfrnn`` and the command line's parent process, which only hands out work, need no torch.
_EXPORTS = {
    "PermutohedralLattice": ".lattice",
    "permutohedral_filter": ".lattice",
    "dense_gaussian_filter": ".lattice",
    "available_backends": ".lattice",
    "mean_field": ".meanfield",
    "CrfRnn": ".meanfield",
    "crf_features": ".meanfield",
    "refine": ".densecrf",
    "FCN8s": ".models",
    "CrfRnnNet": ".models",
    "CrfRnnHead": ".models",
    "load_crfasrnn_weights": ".models.weights",
    "load_crfasrnn_keras_weights": ".models.weights",
    "fcn8s_from_vgg16": ".models.weights",
}

__version__ = "0.1.0"

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """A public name, or a submodule (``crfrnn.lattice`` after a bare ``import crfrnn``), imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
