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
* the Keras release ``crfrnn_keras_model.h5`` (needs h5py);
* a **model file** (:func:`save_model_file`): one self-describing file ``{"format": MODEL_FILE_FORMAT,
  "model": state_dict, "sidecar": {...}}`` whose sidecar says how to build the model
  (:func:`build_model_from_sidecar`); the way trained models are shipped.

Every torch file is read by :func:`crfrnn.models.weights.torch_load` (``torch.load(..., weights_only=True)``).

Model kinds (:data:`MODEL_KINDS`): ``crfrnn`` (FCN-8s + CRF-RNN), ``fcn8s``, ``tiny`` (the smoke-test
:class:`~crfrnn.models.TinyCrfRnnNet` with its CRF), ``tiny-fcn`` (the same without CRF), ``small-fcn``
(:class:`~crfrnn.models.UnaryNet` over a :class:`~crfrnn.models.SmallFCN8s`) and ``small-crfrnn``
(:class:`~crfrnn.models.CrfRnnHead` over a :class:`~crfrnn.models.SmallFCN8s`). The two ``small-`` kinds are
only read from model files (their architecture is not in the state dict).

Model-file sidecar keys: ``kind``, ``num_classes``, ``class_names`` (list of L names or None), ``unary_scale``,
``architecture`` (``small-`` kinds: ``{"widths", "fc", "mean", "std"}`` of :class:`~crfrnn.models.SmallFCN8s`),
``crf`` (:class:`~crfrnn.meanfield.CrfRnn` options of the kinds with a CRF; absent or None otherwise) and,
optional, ``ignore_index`` (of the data it was trained on), ``description`` (free text) and anything else
JSON-serialisable (kept, not read).
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
from .nets import CrfRnnHead, CrfRnnNet, TinyCrfRnnNet, UnaryNet, check_unary_scale
from .small_fcn8s import SmallFCN8s
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
    "MODEL_FILE_FORMAT",
    "build_model_from_sidecar",
    "check_sidecar",
    "crf_options",
    "save_model_file",
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
MODEL_KINDS = ("crfrnn", "fcn8s", "tiny", "tiny-fcn", "small-fcn", "small-crfrnn")
#: The kinds whose model ends in a CRF-RNN (their sidecar's ``crf`` options apply).
CRF_KINDS = ("crfrnn", "tiny", "small-crfrnn")
#: The kinds built on :class:`~crfrnn.models.SmallFCN8s` (their sidecar needs ``architecture``).
SMALL_KINDS = ("small-fcn", "small-crfrnn")
#: The ``format`` entry of a model file (:func:`save_model_file`); the number after the slash is its version.
MODEL_FILE_FORMAT = "crfrnn-model/1"
_MODEL_FILE_PREFIX = "crfrnn-model/"
_ARCHITECTURE_KEYS = ("widths", "fc", "mean", "std")
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
        checkpoint or a model file, whose compatibility matrix is in this library's convention), ``sidecar``
        (the run folder's ``model.json`` or the model file's sidecar, ``{}`` if none) and ``model_file``. A model
        file's floating tensors are returned as float32.

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
    if _is_model_file(obj):
        sd, sidecar = _read_model_file(obj, path)
        return sd, {"checkpoint": str(path), "ours": True, "sidecar": sidecar, "model_file": True}
    ours = _is_training_checkpoint(obj)
    sd = as_state_dict(obj, str(path))
    if ours and not sidecar:
        sidecar = read_sidecar(path.parent)
    return sd, {"checkpoint": str(path), "ours": ours, "sidecar": sidecar, "model_file": False}


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


def build_model(kind: str, num_classes: int, crf: dict | None = None, *, unary_scale: float = 1.0,
                architecture: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh model of one of the :data:`MODEL_KINDS`.

    Args:
        kind: a :data:`MODEL_KINDS` entry.
        num_classes: number of labels L.
        crf: :class:`~crfrnn.meanfield.CrfRnn` options of the kinds with a CRF (:data:`CRF_KINDS`); ignored by
            the others.
        unary_scale: the unary network runs on the image resized by this factor (every kind but ``fcn8s``,
            which only takes 1.0).
        architecture: :class:`~crfrnn.models.SmallFCN8s` arguments ``widths``, ``fc``, ``mean``, ``std`` of the
            ``small-`` kinds (missing ones take its defaults); ignored by the others.
    """
    crf = dict(crf or {})
    if kind == "crfrnn":
        return CrfRnnNet(num_classes, unary_scale=unary_scale, **crf)
    if kind == "fcn8s":
        if check_unary_scale(unary_scale) != 1.0:
            raise ValueError(f"the fcn8s model has no unary_scale (got {unary_scale!r}); use 1.0")
        return FCN8s(num_classes)
    if kind == "tiny":
        return TinyCrfRnnNet(num_classes, unary_scale=unary_scale, **crf)
    if kind == "tiny-fcn":
        return TinyCrfRnnNet(num_classes, crf=False, unary_scale=unary_scale)
    if kind in SMALL_KINDS:
        arch = dict(architecture or {})
        unknown = sorted(set(arch) - set(_ARCHITECTURE_KEYS))
        if unknown:
            raise ValueError(f"architecture has unknown keys {unknown}; SmallFCN8s takes {list(_ARCHITECTURE_KEYS)}")
        fcn = SmallFCN8s(num_classes, **arch)
        if kind == "small-fcn":
            return UnaryNet(fcn, num_classes, unary_scale=unary_scale)
        return CrfRnnHead(fcn, num_classes, unary_scale=unary_scale, **crf)
    raise ValueError(f"unknown model {kind!r}; use one of {', '.join(MODEL_KINDS)}")


def _is_model_file(obj: object) -> bool:
    """A file of :func:`save_model_file` (any version): a mapping whose ``format`` names this family."""
    return isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith(
        _MODEL_FILE_PREFIX)


def _need(d: Mapping[str, Any], key: str, source: str, what: str) -> Any:
    if key not in d:
        raise ValueError(f"{source}: the sidecar lacks the key {key!r} ({what})")
    return d[key]


def check_sidecar(sidecar: Any, source: str = "sidecar") -> dict[str, Any]:
    """Validate a model file's sidecar (keys in the module docstring); returns it as a new dict.

    Raises:
        ValueError: a key is missing or holds a wrong value; the message names ``source`` and the key.
    """
    if not isinstance(sidecar, Mapping):
        raise ValueError(f"{source}: the sidecar must be a dict, got {type(sidecar).__name__}")
    sc = dict(sidecar)
    kind = _need(sc, "kind", source, f"one of {', '.join(MODEL_KINDS)}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"{source}: sidecar 'kind' must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    L = _need(sc, "num_classes", source, "the number of labels")
    if isinstance(L, bool) or not isinstance(L, int) or L < 2:
        raise ValueError(f"{source}: sidecar 'num_classes' must be an integer >= 2, got {L!r}")
    names = _need(sc, "class_names", source, "a list of num_classes names, or None")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != L
                              or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{source}: sidecar 'class_names' must be None or a list of {L} strings, got {names!r}")
    try:
        check_unary_scale(_need(sc, "unary_scale", source, "a positive number"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: sidecar 'unary_scale': {e}") from None
    if kind in SMALL_KINDS:
        arch = _need(sc, "architecture", source, f"the SmallFCN8s arguments {list(_ARCHITECTURE_KEYS)}")
        if not isinstance(arch, Mapping):
            raise ValueError(f"{source}: sidecar 'architecture' must be a dict, got {type(arch).__name__}")
        for key in _ARCHITECTURE_KEYS:
            if key not in arch:
                raise ValueError(f"{source}: sidecar 'architecture' lacks the key {key!r}")
    if kind in CRF_KINDS and not isinstance(_need(sc, "crf", source, "the CrfRnn options"), Mapping):
        raise ValueError(f"{source}: sidecar 'crf' must be a dict of CrfRnn options, got {type(sc['crf']).__name__}")
    if kind not in CRF_KINDS and sc.get("crf"):
        raise ValueError(f"{source}: sidecar 'crf' must be absent or None for the {kind} model (it has no CRF)")
    ignore = sc.get("ignore_index")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise ValueError(f"{source}: sidecar 'ignore_index' must be an integer or None, got {ignore!r}")
    return sc


def build_model_from_sidecar(sidecar: Mapping[str, Any], *, crf: Mapping[str, Any] | None = None,
                             source: str = "sidecar") -> nn.Module:
    """A fresh model as a model file's sidecar describes it (:func:`check_sidecar`); ``crf``: CrfRnn options that
    override the sidecar's (kinds with a CRF only). ``source`` names the sidecar in errors."""
    sc = check_sidecar(sidecar, source)
    kind = sc["kind"]
    options = {**(sc.get("crf") or {}), **(crf or {})} if kind in CRF_KINDS else None
    try:
        return build_model(kind, sc["num_classes"], options, unary_scale=sc["unary_scale"],
                           architecture=sc.get("architecture"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: the sidecar does not describe a {kind} model: {e}") from None


def crf_options(crf: nn.Module) -> dict[str, Any]:
    """The :class:`~crfrnn.meanfield.CrfRnn` options that rebuild ``crf``'s layout (for a sidecar's ``crf``).

    The bandwidths are the current ones; ``spatial_weight`` / ``bilateral_weight`` only initialise parameters
    (the state dict holds their values) and are left out, as are ``spacing`` and ``backend`` when unset.
    """
    from crfrnn.meanfield import CrfRnn

    if not isinstance(crf, CrfRnn):
        raise TypeError(f"crf must be a crfrnn.meanfield.CrfRnn, got {type(crf).__name__}")
    beta = crf.theta_beta
    opts: dict[str, Any] = {
        "theta_alpha": crf.theta_alpha, "theta_beta": list(beta) if isinstance(beta, tuple) else beta,
        "theta_gamma": crf.theta_gamma, "num_iterations": crf.num_iterations,
        "num_test_iterations": crf.num_test_iterations, "kernel_weights": crf.kernel_weights,
        "learn_compatibility": isinstance(crf.compatibility_matrix, nn.Parameter),
        "learn_bandwidths": crf.learn_bandwidths, "untied": bool(crf.untied),
    }
    if crf.spacing is not None:
        opts["spacing"] = [float(s) for s in crf.spacing]
    if crf.backend is not None:
        opts["backend"] = crf.backend
    return opts


def _json_sidecar(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar with JSON types only (tuples become lists), so ``torch.load(weights_only=True)`` reads it."""
    try:
        return json.loads(json.dumps(dict(sidecar)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the sidecar must hold JSON-serialisable values only: {e}") from None


def _storage_state_dict(model: nn.Module, half: bool) -> dict[str, Tensor]:
    """``model``'s state dict on CPU, detached, floating tensors as float16 when ``half`` (other dtypes kept)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.to(torch.float16) if half and v.is_floating_point() else v.clone()
    return out


def _load_strict(model: nn.Module, sd: Mapping[str, Tensor], source: str, kind: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: the weights do not fit the {kind} model the sidecar describes: "
                         f"{' '.join(str(e).split())[:300]}") from None


def save_model_file(path: str | os.PathLike, model: nn.Module, sidecar: dict, *, half: bool = True) -> Path:
    """Write ``model`` as one self-describing file ``{"format": MODEL_FILE_FORMAT, "model": state_dict,
    "sidecar": sidecar}`` that :func:`load_model` (and so ``crfrnn eval`` / ``crfrnn segment``) reads.

    Before anything is written the sidecar is validated (:func:`check_sidecar`) and the model it describes
    (:func:`build_model_from_sidecar`) must take the stored state dict strictly, so a file that does not load is
    never written. The write is atomic (:func:`crfrnn.engine.runfiles.atomic_write`).

    Args:
        path: the file to write (its folder must exist).
        model: the trained model, e.g. ``UnaryNet(SmallFCN8s(...))`` (``small-fcn``) or
            ``CrfRnnHead(SmallFCN8s(...))`` (``small-crfrnn``).
        sidecar: its description (keys in the module docstring); JSON-serialisable values only.
        half: store floating tensors as float16 (halves the file; they are read back as float32). Integer and
            bool tensors are never converted.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from crfrnn.engine.runfiles import atomic_write  # crfrnn.engine imports crfrnn.models: import when used

    path = Path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sc = check_sidecar(_json_sidecar(sidecar), f"sidecar for {path}")
    sd = _storage_state_dict(model, half)
    fresh = build_model_from_sidecar(sc, source=f"sidecar for {path}")
    _load_strict(fresh, sd, f"model for {path}", sc["kind"])
    payload = {"format": MODEL_FILE_FORMAT, "model": sd, "sidecar": sc}
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def _read_model_file(obj: Mapping[str, Any], path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict float32, sidecar)`` of a loaded model file; ValueError naming ``path`` if it is not one this
    version reads."""
    if obj["format"] != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: model file format {obj['format']!r} is not supported (this version reads "
                         f"{MODEL_FILE_FORMAT!r}); upgrade crfrnn")
    for key in ("model", "sidecar"):
        if key not in obj:
            raise ValueError(f"{path}: the model file lacks the key {key!r}")
    sidecar = check_sidecar(obj["sidecar"], str(path))
    sd = as_state_dict(obj["model"], str(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, sidecar


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
            are never negated.
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
    if info["model_file"]:
        kind, num_classes = sidecar["kind"], sidecar["num_classes"]
        model = build_model_from_sidecar(sidecar, crf=crf, source=str(file))
        _load_strict(model, sd, str(file), kind)
        return model.eval(), {"kind": kind, "num_classes": num_classes, "checkpoint": str(file),
                              "class_names": sidecar.get("class_names"), "sidecar": sidecar}
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

    def forward(self, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        # a model's own ``unary`` may not take the mask; pass it only when there is one
        return self.inner.unary(image) if valid_mask is None else self.inner.unary(image, valid_mask)


def unary_only(model: nn.Module) -> nn.Module:
    """A module whose forward is ``model.unary`` (the network's logits before the CRF); ``model`` itself when it
    has no ``unary``."""
    return _UnaryOnly(model) if hasattr(model, "unary") else model
