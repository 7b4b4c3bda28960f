"""One loader for every kind of checkpoint, and the models they describe.

Kinds of file :func:`load_model` reads (architecture and number of classes come from the keys and shapes):

* a run folder of ``crfrnn train`` / :func:`crfrnn.train.train` (its ``best.pt``, else ``last.pt``), or one of
  those checkpoint files; the run's ``model.json`` (written by ``crfrnn train``) gives the CRF settings and the
  class names;
* a plain state dict (``torch.save(model.state_dict())``, also wrapped as ``{"state_dict": ...}`` or with a
  ``module.`` prefix) of :class:`~crfrnn.models.CrfRnnNet`, :class:`~crfrnn.models.FCN8s` or
  :class:`~crfrnn.models.TinyCrfRnnNet`;
* the published ``crfasrnn_weights.pth`` of the official PyTorch port (the sign of its compatibility matrix is
  converted by :func:`~crfrnn.models.weights.flip_compatibility`, see ``convention``);
* the Keras release ``crfrnn_keras_model.h5`` (needs h5py).

Every torch file is read by :func:`crfrnn.models.weights.torch_load` (``torch.load(..., weights_only=True)``).

Model kinds (:data:`MODEL_KINDS`): ``crfrnn`` (FCN-8s + CRF-RNN), ``fcn8s``, ``tiny`` (the smoke-test
:class:`~crfrnn.models.TinyCrfRnnNet` with its CRF) and ``tiny-fcn`` (the same without CRF).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fcn8s import FCN8s
from .nets import CrfRnnNet, TinyCrfRnnNet
from .weights import (
    _h5_datasets,
    as_state_dict,
    fcn8s_from_vgg16,
    flip_compatibility,
    load_crfasrnn_keras_weights,
    load_crfasrnn_weights,
    torch_load,
)

__all__ = [
    "MODEL_KINDS",
    "CONVENTIONS",
    "RUN_CHECKPOINTS",
    "SIDECAR",
    "build_model",
    "load_model",
    "load_state_dict",
    "read_compatibility",
    "init_weights",
    "architecture",
    "crf_layout",
    "read_sidecar",
    "run_checkpoint",
    "unary_only",
]

#: The ``--model`` kinds of the command line, in the order of its help.
MODEL_KINDS = ("crfrnn", "fcn8s", "tiny", "tiny-fcn")
#: Sign conventions of a plain state dict's compatibility matrix: ``auto`` (a plain CRF-RNN state dict is the
#: official port's), ``crfasrnn_pytorch`` (the port's, negated on load), ``crfrnn`` (this library's).
CONVENTIONS = ("auto", "crfasrnn_pytorch", "crfrnn")
#: The checkpoints of a run folder, in the order they are preferred.
RUN_CHECKPOINTS = ("best.pt", "last.pt")
#: The run folder's description of its model (kind, classes, CRF settings, data), written by ``crfrnn train``.
SIDECAR = "model.json"
_KERAS_SUFFIXES = (".h5", ".hdf5")


def run_checkpoint(folder: str | os.PathLike) -> Path:
    """The checkpoint of a run folder: ``best.pt``, else ``last.pt``."""
    folder = Path(folder)
    for name in RUN_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"run folder {folder} holds neither best.pt nor last.pt")


def read_sidecar(folder: str | os.PathLike) -> dict:
    """The run folder's ``model.json`` as a dict; ``{}`` when there is none."""
    p = Path(folder) / SIDECAR
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    return d if isinstance(d, dict) else {}


def _is_training_checkpoint(obj: object) -> bool:
    """A checkpoint of :func:`crfrnn.train.train`: its ``"model"`` entry is the state dict, in our convention."""
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict of a run folder, a checkpoint of :func:`crfrnn.train.train` or a plain torch state dict.

    Returns:
        ``(state_dict, info)``; ``info`` holds ``checkpoint`` (the file read), ``ours`` (True for a training
        checkpoint or a state dict with learned widths, ``crfrnn.log_theta_*``: its compatibility matrix is in
        this library's convention) and ``sidecar`` (the run folder's ``model.json``, ``{}`` if none).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a run folder holds no checkpoint.
        ValueError: the file is not a weights-only torch file or holds no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {path} do not exist")
    sidecar: dict = {}
    if path.is_dir():
        sidecar = read_sidecar(path)
        path = run_checkpoint(path)
    obj = torch_load(path)
    ours = _is_training_checkpoint(obj)
    sd = as_state_dict(obj, str(path))
    if ours and not sidecar:
        sidecar = read_sidecar(path.parent)
    ours = ours or "crfrnn.log_theta_alpha" in sd  # learned widths: no published file has them
    return sd, {"checkpoint": str(path), "ours": ours, "sidecar": sidecar}


def architecture(sd: Mapping[str, Tensor], source: str = "state dict") -> tuple[str, int]:
    """``(kind, num_classes)`` of the model a state dict belongs to (a :data:`MODEL_KINDS` entry)."""
    if "tiny_score.weight" in sd:
        return ("tiny" if "crfrnn.compatibility_matrix" in sd else "tiny-fcn"), int(sd["tiny_score.weight"].shape[0])
    if "score_fr.weight" in sd and "conv1_1.weight" in sd:
        kind = "crfrnn" if "crfrnn.compatibility_matrix" in sd else "fcn8s"
        return kind, int(sd["score_fr.weight"].shape[0])
    keys = ", ".join(list(sd)[:5])
    raise ValueError(f"{source}: unknown model layout (keys {keys}, ...); expected FCN-8s / CRF-RNN or a tiny model")


def crf_layout(sd: Mapping[str, Tensor]) -> dict:
    """:class:`~crfrnn.meanfield.CrfRnn` options that reproduce the parameter shapes found in ``sd``."""
    w, c = sd.get("crfrnn.spatial_ker_weights"), sd.get("crfrnn.compatibility_matrix")
    if w is None or c is None:
        return {}
    untied = c.dim() == 3  # one (L, L) matrix per iteration
    kw: dict = {"kernel_weights": {0: "shared", 1: "diagonal", 2: "matrix"}.get(w.dim() - int(untied), "matrix"),
                "untied": untied}
    if untied:
        kw["num_iterations"] = int(c.shape[0])
    log_beta = sd.get("crfrnn.log_theta_beta")
    if log_beta is not None:  # learned widths: the parameters exist only with learn_bandwidths
        kw["learn_bandwidths"] = True
        if log_beta.dim() == 1:  # one width per colour channel: the parameter's shape (K,) needs K values
            kw["theta_beta"] = [float(b) for b in log_beta.detach().double().exp()]
    return kw


def build_model(kind: str, num_classes: int, crf: dict | None = None) -> nn.Module:
    """A fresh model of one of the :data:`MODEL_KINDS`; ``crf``: :class:`~crfrnn.meanfield.CrfRnn` options of
    ``crfrnn`` and ``tiny``."""
    crf = dict(crf or {})
    if kind == "crfrnn":
        return CrfRnnNet(num_classes, **crf)
    if kind == "fcn8s":
        return FCN8s(num_classes)
    if kind == "tiny":
        return TinyCrfRnnNet(num_classes, **crf)
    if kind == "tiny-fcn":
        return TinyCrfRnnNet(num_classes, crf=False)
    raise ValueError(f"unknown model {kind!r}; use crfrnn, fcn8s or tiny")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def load_model(path: str | os.PathLike, *, keras: bool = False, convention: str = "auto",
               crf: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model for inference from any checkpoint kind (see the module docstring).

    Args:
        path: a run folder, a checkpoint, a plain state dict, the published ``.pth`` or the Keras ``.h5``.
        keras: read ``path`` as a Keras ``.h5`` whatever its suffix (implied by ``.h5`` / ``.hdf5``).
        convention: sign of a plain CRF-RNN state dict's compatibility matrix (:data:`CONVENTIONS`): ``auto``
            and ``crfasrnn_pytorch`` negate it (the published file), ``crfrnn`` keeps it. Training checkpoints
            and state dicts with learned widths (``crfrnn.log_theta_*``) are never negated.
        crf: :class:`~crfrnn.meanfield.CrfRnn` options that override the checkpoint's (``None`` values ignored).

    Returns:
        ``(model, info)``: the model in eval mode on CPU, and a dict with ``kind``, ``num_classes``,
        ``checkpoint`` (the file read), ``class_names`` (from the run folder's ``model.json``, if any) and
        ``sidecar`` (that file's contents).
    """
    _check_convention(convention)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {path} do not exist")
    crf = {k: v for k, v in (crf or {}).items() if v is not None}
    if keras or path.suffix.lower() in _KERAS_SUFFIXES:
        model = load_crfasrnn_keras_weights(path, **crf)
        return model.eval(), {"kind": "crfrnn", "num_classes": model.num_classes, "checkpoint": str(path),
                              "class_names": None, "sidecar": {}}
    sd, info = load_state_dict(path)
    file, sidecar = Path(info["checkpoint"]), info["sidecar"]
    kind, num_classes = architecture(sd, str(file))
    if kind == "crfrnn" and not info["ours"] and convention in ("auto", "crfasrnn_pytorch"):
        # a plain state dict in the published layout: the official port's sign of the compatibility matrix
        model = load_crfasrnn_weights(file, convention="crfasrnn_pytorch", **crf)
    else:
        options = {**sidecar.get("crf", {}), **crf_layout(sd), **crf}
        model = build_model(kind, num_classes, options if kind in ("crfrnn", "tiny") else None)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{file} does not fit a {kind} model with {num_classes} classes: "
                             f"{' '.join(str(e).split())[:300]}") from None
    model.eval()
    return model, {"kind": kind, "num_classes": num_classes, "checkpoint": str(file),
                   "class_names": sidecar.get("class_names"), "sidecar": sidecar}


def _keras_compatibility(path: Path) -> Tensor:
    """The compatibility matrix of a Keras ``.h5`` (no other layer is read)."""
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the Keras file {path} needs h5py: pip install h5py (or 'crfrnn[keras]')") from e

    try:
        with h5py.File(path, "r") as f:
            found = _h5_datasets(f).get("compatibility_matrix")
            matrix = None if found is None else found[()]
    except OSError as e:
        raise ValueError(f"cannot open {path} as HDF5: {e}") from None
    if matrix is None:
        raise ValueError(f"{path} holds no crfrnn/compatibility_matrix")
    return torch.from_numpy(matrix).double()


def read_compatibility(path: str | os.PathLike, *, convention: str = "auto") -> tuple[Tensor, dict[str, Any]]:
    """The compatibility matrix of any checkpoint kind, float64, in this library's convention.

    ``convention`` as :func:`load_model`, but for every plain state dict (``auto``: a plain state dict is the
    official port's and is negated; ``crfasrnn_pytorch`` also negates a training checkpoint's). The Keras file is
    in this library's convention.

    Returns:
        ``(matrix, info)``: the matrix ``(L, L)`` or, for untied models, ``(T, L, L)``; ``info`` holds
        ``checkpoint``, ``sidecar`` (as :func:`load_state_dict`) and ``sign_flipped``.
    """
    _check_convention(convention)
    path = Path(path)
    if path.suffix.lower() in _KERAS_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"weights {path} do not exist")
        return _keras_compatibility(path), {"checkpoint": str(path), "sidecar": {}, "sign_flipped": False}
    sd, info = load_state_dict(path)
    key = next((k for k in sd if k.endswith("compatibility_matrix")), None)
    if key is None:
        raise ValueError(f"{info['checkpoint']} holds no crfrnn.compatibility_matrix (not a CRF-RNN checkpoint)")
    m = sd[key].detach().double()
    flipped = convention == "crfasrnn_pytorch" or (convention == "auto" and not info["ours"])
    return (flip_compatibility(m) if flipped else m), {**info, "sign_flipped": flipped}


def _is_vgg16(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("features.") for k in sd) and any(k.startswith("classifier.") for k in sd)


def init_weights(model: nn.Module, kind: str, path: str | os.PathLike) -> str:
    """Initialise a fresh ``model`` of kind ``kind`` (:data:`MODEL_KINDS`) for training from ``path``.

    ``path`` is a checkpoint or plain state dict of this library, the published ``.pth`` (compatibility negated),
    the Keras ``.h5``, or a torchvision VGG-16 state dict (for ``crfrnn`` and ``fcn8s``, converted by
    :func:`~crfrnn.models.weights.fcn8s_from_vgg16`). The CRF parameters may be missing (they keep their
    initialisation); ``fcn8s`` and ``tiny-fcn`` ignore them. Returns what was read: ``"keras"``, ``"vgg16"`` or
    ``"checkpoint"``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"initial weights {path} do not exist")
    if path.is_dir():
        raise ValueError(f"initial weights {path} is a folder, expected a file")
    if path.suffix.lower() in _KERAS_SUFFIXES:
        sd = load_crfasrnn_keras_weights(path).state_dict()
        model.load_state_dict(sd if kind == "crfrnn" else {k: v for k, v in sd.items() if not k.startswith("crfrnn.")})
        return "keras"
    obj = torch_load(path)
    ours, sd = _is_training_checkpoint(obj), as_state_dict(obj, str(path))
    if _is_vgg16(sd):
        if kind not in ("crfrnn", "fcn8s"):
            raise ValueError(f"initial weights {path} are a VGG-16; they only initialise a crfrnn or fcn8s model")
        fcn8s_from_vgg16(sd, model=model)
        return "vgg16"
    if not ours and "crfrnn.compatibility_matrix" in sd and "score_fr.weight" in sd:  # the published file
        sd["crfrnn.compatibility_matrix"] = flip_compatibility(sd["crfrnn.compatibility_matrix"])
    if kind in ("fcn8s", "tiny-fcn"):
        sd = {k: v for k, v in sd.items() if not k.startswith("crfrnn.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("crfrnn.")]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong or not any(k in own for k in sd):
        what = f"missing {missing[:3]}" if missing else f"shapes differ for {wrong[:3]}"
        raise ValueError(f"initial weights {path} do not fit a {kind} model ({what})")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return "checkpoint"


class _UnaryOnly(nn.Module):
    """``inner.unary`` as the forward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, image: Tensor) -> Tensor:
        return self.inner.unary(image)


def unary_only(model: nn.Module) -> nn.Module:
    """A module whose forward is ``model.unary`` (the network's logits before the CRF); ``model`` itself when it
    has no ``unary``."""
    return _UnaryOnly(model) if hasattr(model, "unary") else model
