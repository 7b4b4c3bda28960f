"""Loading pretrained CRF-RNN / FCN-8s / VGG-16 weights into :mod:`crfrnn.models`.

* :func:`load_crfasrnn_weights` -- the published PyTorch weights ``crfasrnn_weights.pth`` of the official port
  ``sadeepj/crfasrnn_pytorch`` (FCN-8s + CRF-RNN trained on PASCAL VOC, 21 labels).
* :func:`load_crfasrnn_keras_weights` -- the Keras release ``crfrnn_keras_model.h5`` of ``sadeepj/crfasrnn_keras``
  (needs ``h5py``).
* :func:`fcn8s_from_vgg16` -- an FCN-8s initialised from an ImageNet VGG-16 state dict in torchvision's key
  layout, for training.

Compatibility-matrix sign conventions
-------------------------------------
This library (as the paper, the Caffe code and the Keras code) computes one mean-field step as::

    m = S @ filter_spatial(Q) + W @ filter_bilateral(Q)
    logits = unary - C @ m                                  # Potts initialisation: C = -I

The official PyTorch port instead computes ``logits = unary + C' @ m`` and initialises ``C' = +I``, so its
matrix is the negative of ours: ``C = -C'`` (:func:`flip_compatibility`). :func:`load_crfasrnn_weights` flips the
sign (unless told the file is already in this library's convention); the Keras file uses our convention and is
copied as is. ``S`` and ``W`` (``spatial_ker_weights``, ``bilateral_ker_weights``) mean the same in all three.

Every file is read by :func:`torch_load` (``torch.load(..., weights_only=True)``): a pickle that would run code is
refused. :func:`as_state_dict` unwraps the usual checkpoint containers. :mod:`crfrnn.models.checkpoints` builds
the one loader of every checkpoint kind on these.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .fcn8s import _VGG16_CONVS, IMAGENET_MEAN_RGB, FCN8s
from .nets import CrfRnnNet

__all__ = [
    "crfasrnn_state_dict_shapes",
    "load_crfasrnn_weights",
    "load_crfasrnn_keras_weights",
    "fcn8s_from_vgg16",
    "TORCHVISION_VGG16_MEAN",
    "TORCHVISION_VGG16_STD",
    "torch_load",
    "UNSAFE_CHECKPOINT",
    "as_state_dict",
    "flip_compatibility",
]

#: torchvision's ImageNet input normalisation (RGB, on the 0..1 scale).
TORCHVISION_VGG16_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_VGG16_STD = (0.229, 0.224, 0.225)

_CONVENTIONS = ("crfasrnn_pytorch", "crfrnn")
_CRF_KEYS = ("crfrnn.spatial_ker_weights", "crfrnn.bilateral_ker_weights", "crfrnn.compatibility_matrix")


def _vgg_convs():
    return [spec for spec in _VGG16_CONVS if spec != "pool"]


def crfasrnn_state_dict_shapes(num_classes: int = 21) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the published CRF-RNN PyTorch state dict (``crfasrnn_weights.pth``).

    Returns:
        ``{key: shape}``, in the port's order: ``conv1_1.weight`` (64, 3, 3, 3), ``conv1_1.bias`` (64,), ...,
        ``fc6.weight`` (4096, 512, 7, 7), ``fc7.weight`` (4096, 4096, 1, 1), ``score_fr`` / ``score_pool3`` /
        ``score_pool4`` weight (L, C, 1, 1) and bias (L,), ``upscore2.weight`` (L, L, 4, 4), ``upscore2.bias`` (L,),
        ``upscore8.weight`` (L, L, 16, 16), ``upscore_pool4.weight`` (L, L, 4, 4) and the three
        ``crfrnn.*`` matrices (L, L). ``L = num_classes`` (21 in the published file).
    """
    L = int(num_classes)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout in _vgg_convs():
        shapes[f"{name}.weight"] = (cout, cin, 3, 3)
        shapes[f"{name}.bias"] = (cout,)
    shapes.update({
        "fc6.weight": (4096, 512, 7, 7), "fc6.bias": (4096,),
        "fc7.weight": (4096, 4096, 1, 1), "fc7.bias": (4096,),
        "score_fr.weight": (L, 4096, 1, 1), "score_fr.bias": (L,),
        "score_pool3.weight": (L, 256, 1, 1), "score_pool3.bias": (L,),
        "score_pool4.weight": (L, 512, 1, 1), "score_pool4.bias": (L,),
        "upscore2.weight": (L, L, 4, 4), "upscore2.bias": (L,),
        "upscore8.weight": (L, L, 16, 16),
        "upscore_pool4.weight": (L, L, 4, 4),
    })  # fmt: skip
    for key in _CRF_KEYS:
        shapes[key] = (L, L)
    return shapes


#: The first bytes of files people pass by mistake where a checkpoint is expected, and what they are.
_NOT_TORCH_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                    (b"\x89HDF", "an HDF5 file; a Keras .h5 needs --keras"), (b"GIF8", "a GIF image"),
                    (b"BM", "a BMP image"), (b"{", "a JSON file"))
UNSAFE_CHECKPOINT = ("not a checkpoint this library can load safely (it holds Python objects other than tensors); "
                     "we never unpickle code")


def _refusal(path: Path, e: Exception) -> str:
    """The one-line reason why ``torch.load(path, weights_only=True)`` raised ``e`` (torch's own text is not quoted:
    it advises ``weights_only=False``, which would run the file's code)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return f"{path} is empty, not a torch file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a torch zip archive or a (legacy) pickle
        if isinstance(e, pickle.UnpicklingError):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            return f"{path}: {UNSAFE_CHECKPOINT}" + (f" (found {found.group(1)})" if found else "")
        return f"{path} is a damaged or truncated torch file ({type(e).__name__})"
    what = next((name for magic, name in _NOT_TORCH_MAGIC if head.startswith(magic)), None)
    return f"{path} is not a torch file" + (f" (it is {what})" if what else "")


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, map_location=..., weights_only=True)`` with one clear error for a file it refuses (the
    reader of every weights file of :mod:`crfrnn.models` and of :func:`crfrnn.engine.runfiles.load_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``torch.load`` refuses the file; the message names the file and says which case it is: not a
            torch file (an image, say), damaged or truncated, or a pickle holding Python objects other than
            tensors, which is never unpickled (:data:`UNSAFE_CHECKPOINT`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of a plain pickle before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError for damaged archives, ...
        raise ValueError(_refusal(path, e)) from None


def as_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    """The state dict in ``obj``: unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints, strips a
    ``module.`` (DataParallel) prefix, checks that it maps names to tensors. ``source`` names it in errors."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source} holds no state dict (a crfrnn checkpoint or a mapping of names to tensors) but a "
            f"{type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source} is not a state dict: entries {bad[:5]!r} are not str -> Tensor")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def flip_compatibility(matrix: Tensor) -> Tensor:
    """Convert a compatibility matrix between this library's sign convention and the official PyTorch port's.

    This library computes ``logits = unary - C @ m`` (Potts ``C = -I``), ``sadeepj/crfasrnn_pytorch``
    ``logits = unary + C' @ m`` (``C' = +I``), so ``C' = -C``: the conversion is a negation, the same in both
    directions (its own inverse). Works on ``(L, L)`` and untied ``(T, L, L)`` matrices; returns a new tensor.
    """
    if not isinstance(matrix, Tensor):
        raise TypeError(f"matrix must be a torch.Tensor (L, L), got {type(matrix).__name__}")
    return -matrix


def _check_layout(sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    missing = [k for k in expected if k not in sd]
    if missing:
        listed = ", ".join(f"{k} {expected[k]}" for k in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{source}: missing key(s) {listed}{more}")
    wrong = [(k, expected[k], tuple(sd[k].shape)) for k in expected if tuple(sd[k].shape) != expected[k]]
    if wrong:
        listed = "; ".join(f"{k}: expected shape {e}, got {g}" for k, e, g in wrong[:8])
        raise ValueError(f"{source}: wrong shape for key(s) {listed}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ValueError(f"{source}: unexpected key(s) {unexpected[:8]!r} (not in the CRF-RNN FCN-8s layout)")
    nonfloat = [k for k in expected if not sd[k].is_floating_point()]
    if nonfloat:
        raise ValueError(f"{source}: key(s) {nonfloat[:8]!r} are not floating-point tensors")


def _infer_num_classes(sd: Mapping[str, Tensor], source: str) -> int:
    w = sd.get("score_fr.weight")
    if w is None:
        raise ValueError(f"{source}: missing key score_fr.weight (L, 4096, 1, 1)")
    if w.dim() != 4 or w.shape[0] < 1:
        raise ValueError(
            f"{source}: wrong shape for key score_fr.weight: expected (L, 4096, 1, 1), got {tuple(w.shape)}"
        )
    return int(w.shape[0])


def _build_net(sd: dict[str, Tensor], num_classes: int, crf_kwargs: dict, source: str) -> CrfRnnNet:
    model = CrfRnnNet(num_classes, **crf_kwargs)
    own = model.state_dict()
    for key, value in sd.items():
        if key not in own:
            raise ValueError(f"{source}: key {key} has no counterpart in CrfRnnNet (model keys: {len(own)})")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: key {key} has shape {tuple(value.shape)}, CrfRnnNet expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_crfasrnn_weights(
    path: str | os.PathLike,
    *,
    num_iterations: int = 5,
    num_test_iterations: int = 10,
    map_location: str | torch.device = "cpu",
    convention: str = "crfasrnn_pytorch",
    **crf_kwargs,
) -> CrfRnnNet:
    """Load the published PyTorch CRF-RNN weights (``crfasrnn_weights.pth``) into a :class:`CrfRnnNet`.

    The file is a state dict with exactly the keys of :func:`crfasrnn_state_dict_shapes` (``conv1_1`` ..
    ``conv5_3``, ``fc6``, ``fc7``, ``score_fr``, ``score_pool3``, ``score_pool4``, ``upscore2``, ``upscore8``,
    ``upscore_pool4`` and ``crfrnn.spatial_ker_weights``, ``crfrnn.bilateral_ker_weights``,
    ``crfrnn.compatibility_matrix``, each (L, L)); L is read from ``score_fr.weight`` (21 in the release).
    A ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are accepted.

    Sign of the compatibility matrix: the port computes ``unary + C' @ m`` (``C'`` initialised to ``+I``), this
    library ``unary - C @ m`` (Potts ``C = -I``), so with ``convention="crfasrnn_pytorch"`` (default) the loaded
    matrix is ``C = -C'``. Pass ``convention="crfrnn"`` for a file already in this library's convention
    (e.g. ``CrfRnnNet.state_dict()`` saved by this library -- ``model.load_state_dict`` works for those too).

    Args:
        path: the ``.pth`` file. Read with ``torch.load(path, map_location=..., weights_only=True)``.
        num_iterations: mean-field iterations in training mode.
        num_test_iterations: mean-field iterations in eval mode (the release used 10).
        map_location: passed to ``torch.load``; the returned model lives on CPU unless moved.
        convention: ``"crfasrnn_pytorch"`` (the published file) or ``"crfrnn"`` (no sign flip).
        **crf_kwargs: further :class:`crfrnn.meanfield.CrfRnn` arguments (the release used theta_alpha=160,
            theta_beta=3, theta_gamma=3, the defaults).

    Returns:
        :class:`CrfRnnNet` in eval mode holding the file's values.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read with ``weights_only=True`` (not a torch file, or a pickle with code),
            is not a state dict, or has a missing, misshaped or unexpected key (the message names key and shapes).
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    path = Path(path)
    source = f"weights file {path}"
    sd = as_state_dict(torch_load(path, map_location), source)
    num_classes = _infer_num_classes(sd, source)
    _check_layout(sd, crfasrnn_state_dict_shapes(num_classes), source)
    if convention == "crfasrnn_pytorch":
        sd["crfrnn.compatibility_matrix"] = flip_compatibility(sd["crfrnn.compatibility_matrix"])
    crf_kwargs.update(num_iterations=num_iterations, num_test_iterations=num_test_iterations)
    return _build_net(sd, num_classes, crf_kwargs, source)


# Keras layer name -> (our module name, kind). Kinds: conv (kernel (kh, kw, in, out)), deconv (kernel
# (kh, kw, out, in)), both optionally with bias (out,).
_KERAS_LAYERS = {
    **{name: (name, "conv") for name, _, _ in _vgg_convs()},
    "fc6": ("fc6", "conv"),
    "fc7": ("fc7", "conv"),
    "score-fr": ("score_fr", "conv"),
    "score-pool4": ("score_pool4", "conv"),
    "score-pool3": ("score_pool3", "conv"),
    "score2": ("upscore2", "deconv"),
    "score4": ("upscore_pool4", "deconv"),
    "upsample": ("upscore8", "deconv"),
}


def _h5_datasets(group) -> dict[str, object]:
    """All datasets below an h5 group, keyed by their base name without the ``:0`` suffix."""
    import h5py

    found: dict[str, object] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            base = name.rsplit("/", 1)[-1].split(":", 1)[0]
            found.setdefault(base, obj)

    group.visititems(visit)
    return found


def load_crfasrnn_keras_weights(
    path: str | os.PathLike, *, num_iterations: int = 5, num_test_iterations: int = 10, **crf_kwargs
) -> CrfRnnNet:
    """Load the Keras CRF-RNN release (``crfrnn_keras_model.h5``, ``sadeepj/crfasrnn_keras``) into a :class:`CrfRnnNet`.

    The h5 file (``model.save`` or ``model.save_weights`` of Keras 2) holds one group per layer, under
    ``model_weights/`` or at the root: ``<layer>/<layer>/kernel:0`` and ``bias:0`` for the layers ``conv1_1`` ..
    ``conv5_3``, ``fc6``, ``fc7``, ``score-fr``, ``score-pool4``, ``score-pool3`` (Conv2D, kernel
    (kh, kw, in, out)), ``score2`` (Conv2DTranspose with bias), ``score4`` and ``upsample`` (Conv2DTranspose
    without bias, kernel (kh, kw, out, in)) and ``crfrnn/crfrnn/{spatial_ker_weights, bilateral_ker_weights,
    compatibility_matrix}:0`` (L, L). Both kernel kinds become PyTorch layout by permuting axes (3, 2, 0, 1)
    (conv (out, in, kh, kw), transposed conv (in, out, kh, kw)); TF's and PyTorch's convolutions are both
    cross-correlations, so no spatial flip. Layer mapping: ``score-fr`` -> ``score_fr``, ``score-pool4`` ->
    ``score_pool4``, ``score-pool3`` -> ``score_pool3``, ``score2`` -> ``upscore2``, ``score4`` -> ``upscore_pool4``,
    ``upsample`` -> ``upscore8``.

    The Keras layer computes ``unaries - C @ m`` (Potts initialisation ``-I``), this library's convention: the
    compatibility matrix is copied without a sign change.

    Args:
        path: the ``.h5`` file.
        num_iterations, num_test_iterations, **crf_kwargs: as :func:`load_crfasrnn_weights`.

    Returns:
        :class:`CrfRnnNet` in eval mode.

    Raises:
        ImportError: h5py is not installed.
        FileNotFoundError / ValueError: missing file, or a missing or misshaped layer weight (named).
    """
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_crfasrnn_keras_weights needs h5py to read Keras .h5 files: pip install h5py "
            "(or pip install 'crfrnn[keras]')"
        ) from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    source = f"Keras weights file {path}"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"cannot open {source} as HDF5: {e}") from e
    sd: dict[str, Tensor] = {}
    with f:
        root = f["model_weights"] if "model_weights" in f else f

        def layer(name: str) -> dict[str, object]:
            if name not in root or not isinstance(root[name], h5py.Group):
                raise ValueError(f"{source}: missing layer group {name!r} (have {sorted(root.keys())[:30]})")
            return _h5_datasets(root[name])

        def get(datasets, layer_name, weight):
            if weight not in datasets:
                raise ValueError(f"{source}: missing weight {layer_name}/{weight}:0")
            return torch.from_numpy(datasets[weight][()].astype("float32", copy=False))

        for kname, (tname, _kind) in _KERAS_LAYERS.items():
            ds = layer(kname)
            kernel = get(ds, kname, "kernel")
            if kernel.dim() != 4:
                raise ValueError(f"{source}: {kname}/kernel:0 must be 4-D (kh, kw, ., .), got {tuple(kernel.shape)}")
            sd[f"{tname}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
            if "bias" in ds:
                sd[f"{tname}.bias"] = get(ds, kname, "bias")
        ds = layer("crfrnn")
        for key in _CRF_KEYS:
            sd[key] = get(ds, "crfrnn", key.split(".", 1)[1])
    num_classes = _infer_num_classes(sd, source)
    _check_layout(sd, crfasrnn_state_dict_shapes(num_classes), source)
    crf_kwargs.update(num_iterations=num_iterations, num_test_iterations=num_test_iterations)
    return _build_net(sd, num_classes, crf_kwargs, source)


# torchvision vgg16: indices of the 13 convolutions in ``features``.
_TORCHVISION_VGG16_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def fcn8s_from_vgg16(
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike,
    num_classes: int = 21,
    *,
    input_convention: str = "torchvision",
    model: FCN8s | None = None,
) -> FCN8s:
    """An FCN-8s initialised from ImageNet VGG-16 weights in torchvision's key layout, ready for training.

    Keys used: ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` -> ``conv1_1`` .. ``conv5_3``,
    ``classifier.0`` (4096, 25088) -> ``fc6`` (4096, 512, 7, 7) (torchvision flattens (512, 7, 7) in C, H, W
    order), ``classifier.3`` (4096, 4096) -> ``fc7`` (4096, 4096, 1, 1). ``classifier.6`` (the 1000 ImageNet
    classes) and any other keys are ignored. The score layers are zeroed and the deconvolutions set to bilinear
    upsampling (:meth:`FCN8s.reset_head`).

    Input convention: this FCN is fed :func:`crfrnn.models.caffe_normalize` output (BGR, mean-subtracted,
    0..255), as the Caffe VGG-16. torchvision's own VGG-16 weights expect RGB in 0..1 normalised by
    :data:`TORCHVISION_VGG16_MEAN` / :data:`TORCHVISION_VGG16_STD`. With ``input_convention="torchvision"``
    (default) that difference is folded into ``conv1_1`` (channels reordered, weights divided by ``255 * std``,
    the mean offset moved into the bias), so on every pixel whose 3x3 window lies inside the image conv1_1 gives
    exactly what torchvision's first layer gives on its own normalisation. Use ``input_convention="caffe"`` for
    Caffe VGG-16 weights that were merely renamed to torchvision's keys (copied as they are).

    Args:
        state_dict_or_path: a state dict, or a file read with ``torch.load(weights_only=True)``.
        num_classes: number of labels L of a new model (ignored when ``model`` is given).
        input_convention: ``"torchvision"`` or ``"caffe"``.
        model: an existing :class:`FCN8s` (or :class:`crfrnn.models.CrfRnnNet`) to fill in; a new FCN8s otherwise.

    Returns:
        The model, its VGG layers holding the converted weights.
    """
    if input_convention not in ("torchvision", "caffe"):
        raise ValueError(f"input_convention must be 'torchvision' or 'caffe', got {input_convention!r}")
    if model is not None and not isinstance(model, FCN8s):
        raise TypeError(f"model must be an FCN8s (or CrfRnnNet), got {type(model).__name__}")
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        source = f"VGG-16 weights file {path}"
        sd = as_state_dict(torch_load(path), source)
    else:
        source = "VGG-16 state dict"
        sd = as_state_dict(state_dict_or_path, source)

    expected: dict[str, tuple[int, ...]] = {}
    ours: dict[str, str] = {}
    for idx, (name, cin, cout) in zip(_TORCHVISION_VGG16_FEATURES, _vgg_convs()):
        expected[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        expected[f"features.{idx}.bias"] = (cout,)
        ours[f"features.{idx}.weight"] = f"{name}.weight"
        ours[f"features.{idx}.bias"] = f"{name}.bias"
    expected.update({
        "classifier.0.weight": (4096, 512 * 7 * 7), "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
    })  # fmt: skip
    ours.update({
        "classifier.0.weight": "fc6.weight", "classifier.0.bias": "fc6.bias",
        "classifier.3.weight": "fc7.weight", "classifier.3.bias": "fc7.bias",
    })  # fmt: skip
    _check_layout({k: v for k, v in sd.items() if k in expected}, expected, source)

    new: dict[str, Tensor] = {}
    for key, target in ours.items():
        value = sd[key].detach().to(torch.float64 if key.startswith("features.0.") else torch.float32)
        if key == "classifier.0.weight":
            value = value.reshape(4096, 512, 7, 7)
        elif key == "classifier.3.weight":
            value = value.reshape(4096, 4096, 1, 1)
        new[target] = value
    if input_convention == "torchvision":
        w, b = new["conv1_1.weight"], new["conv1_1.bias"]  # float64, input RGB channels
        mean_rgb = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float64)
        tv_mean = torch.tensor(TORCHVISION_VGG16_MEAN, dtype=torch.float64)
        tv_std = torch.tensor(TORCHVISION_VGG16_STD, dtype=torch.float64)
        # x_tv[c] = (rgb[c] / 255 - m[c]) / s[c] = x_ours[2 - c] / (255 s[c]) + (mean_rgb[c] / 255 - m[c]) / s[c]
        offset = (mean_rgb / 255.0 - tv_mean) / tv_std
        b = b + (w.sum(dim=(2, 3)) * offset).sum(dim=1)
        w = (w / (255.0 * tv_std).view(1, 3, 1, 1)).flip(1)
        new["conv1_1.weight"], new["conv1_1.bias"] = w, b
    new["conv1_1.weight"] = new["conv1_1.weight"].float()
    new["conv1_1.bias"] = new["conv1_1.bias"].float()

    if model is None:
        model = FCN8s(num_classes)
    model.load_state_dict(new, strict=False)
    model.reset_head()
    return model
