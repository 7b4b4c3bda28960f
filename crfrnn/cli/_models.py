"""Model building and checkpoint loading of the CLI."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import UsageError, need_file

def _run_dir_checkpoint(path: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"run folder {path} holds neither best.pt nor last.pt")


def _read_sidecar(folder: Path) -> dict:
    p = folder / "model.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {p}: {e}") from None
    return d if isinstance(d, dict) else {}


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged files raise many types
        raise UsageError(
            f"cannot read {path} as a weights-only torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _state_dict_of(obj, path: Path) -> tuple[dict, bool]:
    """(state dict, is_our_checkpoint)."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return dict(obj["model"]), True
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
        if all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd, False
    raise UsageError(f"{path} holds no state dict (a crfrnn checkpoint or a mapping of names to tensors)")


def _architecture(sd: dict, path: Path) -> tuple[str, int]:
    if "tiny_score.weight" in sd:
        return ("tiny" if "crfrnn.compatibility_matrix" in sd else "tiny-fcn"), int(sd["tiny_score.weight"].shape[0])
    if "score_fr.weight" in sd and "conv1_1.weight" in sd:
        kind = "crfrnn" if "crfrnn.compatibility_matrix" in sd else "fcn8s"
        return kind, int(sd["score_fr.weight"].shape[0])
    keys = ", ".join(list(sd)[:5])
    raise UsageError(f"{path}: unknown model layout (keys {keys}, ...); expected FCN-8s / CRF-RNN or a tiny model")


def _crf_layout(sd: dict) -> dict:
    """CrfRnn constructor options that reproduce the parameter shapes found in ``sd``."""
    w, c = sd.get("crfrnn.spatial_ker_weights"), sd.get("crfrnn.compatibility_matrix")
    if w is None or c is None:
        return {}
    untied = c.dim() == 3  # one (L, L) matrix per iteration
    kw: dict = {"kernel_weights": {0: "shared", 1: "diagonal", 2: "matrix"}.get(w.dim() - int(untied), "matrix"),
                "untied": untied}
    if untied:
        kw["num_iterations"] = int(c.shape[0])
    return kw


def build_model(kind: str, num_classes: int, crf: dict | None = None):
    """A fresh model of the CLI's ``--model`` kinds: ``crfrnn``, ``fcn8s``, ``tiny`` (smoke test), ``tiny-fcn``."""
    from crfrnn.models import TinyCrfRnnNet
    from crfrnn.models import CrfRnnNet, FCN8s

    crf = dict(crf or {})
    if kind == "crfrnn":
        return CrfRnnNet(num_classes, **crf)
    if kind == "fcn8s":
        return FCN8s(num_classes)
    if kind == "tiny":
        return TinyCrfRnnNet(num_classes, **crf)
    if kind == "tiny-fcn":
        return TinyCrfRnnNet(num_classes, crf=False)
    raise UsageError(f"unknown model {kind!r}; use crfrnn, fcn8s or tiny")


def load_model(path, *, keras: bool = False, convention: str = "auto", crf: dict | None = None):
    """Load a model for inference from a checkpoint, a run folder, the published ``.pth`` or Keras ``.h5``.

    Returns ``(model, info)``: the model in eval mode on CPU and a dict with ``kind``, ``num_classes``,
    ``checkpoint`` (the file read), ``class_names`` (from the run folder's ``model.json``, if any) and
    ``sidecar`` (that file's contents).
    """
    from crfrnn.models import weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {path} do not exist")
    sidecar: dict = {}
    if path.is_dir():
        sidecar = _read_sidecar(path)
        path = _run_dir_checkpoint(path)
    crf = {k: v for k, v in (crf or {}).items() if v is not None}
    if keras or path.suffix.lower() in (".h5", ".hdf5"):
        model = weights.load_crfasrnn_keras_weights(path, **crf)
        return model.eval(), {"kind": "crfrnn", "num_classes": model.num_classes, "checkpoint": str(path),
                              "class_names": None, "sidecar": {}}
    sd, ours = _state_dict_of(_torch_load(path), path)
    if ours and not sidecar:
        sidecar = _read_sidecar(path.parent)
    kind, num_classes = _architecture(sd, path)
    if kind == "crfrnn" and not ours and convention in ("auto", "crfasrnn_pytorch"):
        # a plain state dict in the published layout: the official port's sign of the compatibility matrix
        model = weights.load_crfasrnn_weights(path, convention="crfasrnn_pytorch", **crf)
    else:
        options = {**sidecar.get("crf", {}), **_crf_layout(sd), **crf}
        model = build_model(kind, num_classes, options if kind in ("crfrnn", "tiny") else None)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise UsageError(f"{path} does not fit a {kind} model with {num_classes} classes: "
                             f"{' '.join(str(e).split())[:300]}") from None
    model.eval()
    return model, {"kind": kind, "num_classes": num_classes, "checkpoint": str(path),
                   "class_names": sidecar.get("class_names"), "sidecar": sidecar}


def _unary_only(model):
    """``--no-crf``: a module whose forward is ``model.unary`` (the CNN's logits before the CRF)."""
    import torch.nn as nn

    if not hasattr(model, "unary"):
        return model

    class UnaryOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return self.inner.unary(image)

    return UnaryOnly(model)

def _init_weights(model, kind: str, path: Path):
    """Initialise ``model`` from our checkpoint, the published .pth / .h5, or a torchvision VGG-16 state dict."""
    from crfrnn.models import weights

    need_file(path, "--init file")
    if path.suffix.lower() in (".h5", ".hdf5"):
        src = weights.load_crfasrnn_keras_weights(path)
        sd = src.state_dict() if kind == "crfrnn" else {k: v for k, v in src.state_dict().items()
                                                         if not k.startswith("crfrnn.")}
        model.load_state_dict(sd)
        return "keras"
    sd, ours = _state_dict_of(_torch_load(path), path)
    if any(k.startswith("features.") for k in sd) and any(k.startswith("classifier.") for k in sd):
        if kind not in ("crfrnn", "fcn8s"):
            raise UsageError(f"--init {path} is a VGG-16; it only initialises --model crfrnn or fcn8s")
        weights.fcn8s_from_vgg16(sd, model=model)
        return "vgg16"
    if not ours and "crfrnn.compatibility_matrix" in sd and "score_fr.weight" in sd:
        sd = dict(sd)
        sd["crfrnn.compatibility_matrix"] = -sd["crfrnn.compatibility_matrix"]  # published port's sign
    if kind in ("fcn8s", "tiny-fcn"):
        sd = {k: v for k, v in sd.items() if not k.startswith("crfrnn.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith("crfrnn.")]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong or not any(k in own for k in sd):
        what = f"missing {missing[:3]}" if missing else f"shapes differ for {wrong[:3]}"
        raise UsageError(f"--init {path} does not fit --model {kind} ({what})")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return "checkpoint"

