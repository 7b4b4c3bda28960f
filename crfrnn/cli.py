"""The ``crfrnn`` command line (``crfrnn ...`` or ``python -m crfrnn ...``).

Thin: every subcommand parses its flags, checks the user's files, calls library functions and writes its
results atomically. Subcommands::

    demo          built-in demo: a coarse FCN-like prediction refined by the dense CRF (or --data DIR)
    refine        dense-CRF post-processing of probabilities (.npy) or a label map (PNG), pydensecrf-style
    segment       run a trained CRF-RNN / FCN-8s checkpoint on images: palette PNGs and overlays
    train         train FCN-8s / CRF-RNN (flags or a JSON --config); torchrun-able
    eval          mean IU, pixel accuracy and the per-class IU table of a checkpoint on a data set
    show-compat   the learned compatibility matrix of a checkpoint as a heat-map
    plot          training loss and validation mean IU of a run folder
    bench         speed measurements (forwards to crfrnn.bench)

Exit status: 0 success, 2 a usage or user error (bad flag, missing or mismatched file, an output that would
overwrite an input), 1 any other failure. Errors are one line on stderr, ``crfrnn: error: ...``; set
``CRFRNN_DEBUG=1`` for the traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["main", "build_parser", "UsageError", "load_model"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)


class UsageError(ValueError):
    """A mistake in the command line or the user's files (exit status 2)."""


# ============================================================================================== helpers
def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _say(args, text: str) -> None:
    """Human-readable output (stdout), suppressed by --json (which prints one JSON document instead)."""
    if not getattr(args, "json", False) and _rank() == 0:
        print(text, flush=True)


def _emit_json(args, payload: Any) -> None:
    if getattr(args, "json", False) and _rank() == 0:
        print(json.dumps(payload, indent=2, allow_nan=False, default=_json_default), flush=True)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(x):
    """NaN -> None for JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _show_progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty() and _rank() == 0


def _progress(iterable, args, **kw):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not _show_progress(args), dynamic_ncols=True, leave=False, **kw)


def _device(spec: str | None):
    import torch

    spec = spec or "auto"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: only cpu and cuda devices are supported")
    return dev


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_outputs(outputs: Sequence[Path], inputs: Iterable[Path]) -> None:
    """Refuse outputs that are inputs, folders, or written twice -- before anything is written."""
    inputs = [Path(p) for p in inputs]
    seen: dict[Path, Path] = {}
    for out in outputs:
        out = Path(out)
        for inp in inputs:
            if _same_file(out, inp):
                raise UsageError(f"output {out} is the input file {inp}; refusing to overwrite an input")
        if out.is_dir():
            raise UsageError(f"output {out} is an existing folder, expected a file path")
        key = out.resolve()
        if key in seen:
            raise UsageError(f"two results would be written to the same file {out}")
        seen[key] = out


def _check_png_suffix(path: Path) -> None:
    from PIL import Image

    if Image.registered_extensions().get(path.suffix.lower()) is None:
        raise UsageError(f"output {path}: unknown picture format {path.suffix!r}; use .png")


def _list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
    if not files:
        raise UsageError(f"folder {folder} holds no images ({', '.join(_IMAGE_EXTS)})")
    return files


def _need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, expected a file")
    return path


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # Pillow raises many types for bad files
        raise UsageError(f"cannot read image {path}: {e}") from None
    return h, w


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode
    except Exception as e:
        raise UsageError(f"cannot read image {path}: {e}") from None


def _read_rgb(path: Path):
    """(H, W, 3) uint8 array."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise UsageError(f"cannot read image {path}: {e}") from None


def _class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    from crfrnn import data
    from crfrnn.demo import SCENE_CLASSES

    if names is not None and len(names) >= num_classes:
        return [str(n) for n in names[:num_classes]]
    for known in (data.VOC_CLASSES, data.CAMVID_CLASSES, data.PASCAL_CONTEXT_CLASSES):
        if len(known) == num_classes:
            return list(known)
    if num_classes == len(SCENE_CLASSES):
        return list(SCENE_CLASSES)
    return [str(k) for k in range(num_classes)]


def _palette_for(name: str, num_classes: int, class_names: Sequence[str] | None = None):
    from crfrnn import data, viz

    if name == "auto":
        if class_names is not None and tuple(class_names[:11]) == tuple(data.CAMVID_CLASSES):
            name = "camvid"
        else:
            name = "voc" if num_classes <= 256 else "distinct"
    return viz.palette(name, max(256, num_classes))


def _read_names_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0], parts[1]


def _number(cast, ok, what: str):
    """An argparse ``type=``: ``cast`` the text, refuse it unless ``ok(value)``; errors say ``what`` was expected."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what.replace(" ", "_")
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_float = _number(float, math.isfinite, "a finite number")


# ========================================================================================= model loading
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


# ================================================================================================ demo
def _demo_picture(image, result, mask, pal, before: float, after: float):
    """image | coarse | refined | truth, mean IU in the titles."""
    from crfrnn import viz

    return viz.side_by_side(
        [image, viz.colorize(result["coarse"], pal), viz.colorize(result["refined"], pal), viz.colorize(mask, pal)],
        ["image", f"coarse (FCN-like) {100 * before:.1f}% mIU", f"dense CRF {100 * after:.1f}% mIU",
         "ground truth"],
    )


def cmd_demo(args) -> int:
    import torch

    from crfrnn import demo, viz
    from crfrnn.engine.metrics import mean_iou, pixel_accuracy

    t_start = getattr(args, "_t0", time.perf_counter())
    dev = _device(args.device)
    crf = {"num_iterations": args.iterations} if args.iterations is not None else {}
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")

    if args.data is None:  # ------------------------------------------------- the built-in scene
        out = out_dir / "demo.png"
        _check_outputs([out], [])
        h, w = args.size
        if h < 32 or w < 32:
            raise UsageError(f"--size must be at least 32x32, got {h}x{w}")
        L = len(demo.SCENE_CLASSES)
        image, mask = demo.make_scene(h, w, num_classes=L, seed=args.seed)
        r = demo.evaluate_pair(image, mask, L, seed=args.seed, device=dev, crf=crf)
        before, after = mean_iou(r["conf_coarse"]), mean_iou(r["conf_refined"])
        pal = viz.palette("voc")
        viz.save_image(_demo_picture(image, r, mask, pal, before, after), out)
        total = time.perf_counter() - t_start
        _emit_json(args, {
            "mode": "scene", "image": [h, w], "num_classes": L, "class_names": list(demo.SCENE_CLASSES),
            "seed": args.seed, "mean_iou_coarse": before, "mean_iou_refined": after,
            "pixel_accuracy_coarse": pixel_accuracy(r["conf_coarse"]),
            "pixel_accuracy_refined": pixel_accuracy(r["conf_refined"]),
            "crf_seconds": r["seconds"], "total_seconds": total, "device": str(dev), "output": str(out),
            "crf": {**demo.DEMO_CRF, **crf},
        })
        _say(args, f"built-in scene {w}x{h}, {L} classes ({', '.join(demo.SCENE_CLASSES)}), seed {args.seed}")
        _say(args, f"  mean IU   coarse {100 * before:5.1f}%   ->   dense CRF {100 * after:5.1f}%")
        _say(args, f"  pixel acc coarse {100 * pixel_accuracy(r['conf_coarse']):5.1f}%   ->   dense CRF "
                   f"{100 * pixel_accuracy(r['conf_refined']):5.1f}%")
        _say(args, f"  CRF {r['seconds']:.2f} s on {dev} (includes compiling the lattice kernels if not cached), "
                   f"total {total:.1f} s")
        _say(args, f"  wrote {out}  (image | coarse | refined | truth)")
        return EXIT_OK

    # ------------------------------------------------------------------------------------ --data DIR
    from crfrnn.data import SegmentationFolder

    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data folder {root} does not exist")
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise UsageError(f"--data {root} must hold images/ and masks/ folders (VOC style, matched by stem)")
    names_file = next((p for p in (root / "class_names.txt", root.parent / "class_names.txt") if p.is_file()), None)
    names = _read_names_file(names_file) if names_file else None
    L = args.num_classes or (len(names) if names else 21)
    if 0 <= args.ignore_index == L - 1 and args.num_classes is None:
        L -= 1  # the last listed class is the void label (CamVid's "Unlabelled" with --ignore-index 11)
    if L < 2:
        raise UsageError(f"--num-classes must be at least 2, got {L}")
    class_names = _class_names_for(L, names)
    ds = SegmentationFolder(root / "images", root / "masks", num_classes=L, ignore_index=args.ignore_index)
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    n_examples = min(args.examples, n)
    outs = [out_dir / f"{ds.names[i]}.png" for i in range(n_examples)]
    _check_outputs(outs, [p for pair in ds.pairs for p in pair])
    pal = _palette_for(args.palette, L, class_names)
    conf_c = torch.zeros(L, L, dtype=torch.int64)
    conf_r = torch.zeros(L, L, dtype=torch.int64)
    per_c, per_r, crf_time = [], [], 0.0
    for i in _progress(range(n), args, desc="demo", total=n):
        image, mask = ds[i]
        r = demo.evaluate_pair(image, mask, L, seed=args.seed + i, ignore_index=args.ignore_index, device=dev, crf=crf)
        conf_c += r["conf_coarse"]
        conf_r += r["conf_refined"]
        crf_time += r["seconds"]
        bc, ac = mean_iou(r["conf_coarse"]), mean_iou(r["conf_refined"])
        if not math.isnan(bc):
            per_c.append(bc)
            per_r.append(ac)
        if i < n_examples:
            viz.save_image(_demo_picture(image, r, mask, pal, bc, ac), outs[i])
    total = time.perf_counter() - t_start
    before, after = mean_iou(conf_c), mean_iou(conf_r)
    pb = sum(per_c) / len(per_c) if per_c else float("nan")
    pa = sum(per_r) / len(per_r) if per_r else float("nan")
    _emit_json(args, {
        "mode": "data", "data": str(root), "num_images": n, "num_classes": L, "ignore_index": args.ignore_index,
        "mean_iou_coarse": _finite(before), "mean_iou_refined": _finite(after),
        "per_image_mean_iou_coarse": _finite(pb), "per_image_mean_iou_refined": _finite(pa),
        "pixel_accuracy_coarse": _finite(pixel_accuracy(conf_c)),
        "pixel_accuracy_refined": _finite(pixel_accuracy(conf_r)),
        "crf_seconds": crf_time, "total_seconds": total, "device": str(dev),
        "examples": [str(p) for p in outs], "crf": {**demo.DEMO_CRF, **crf},
    })
    _say(args, f"{n} image/mask pairs of {root} ({L} classes, ignore {args.ignore_index}); coarse prediction from the "
               f"ground truth at stride 8")
    _say(args, "                         coarse   dense CRF")
    _say(args, f"  mean IU (data set)     {100 * before:5.1f}%     {100 * after:5.1f}%")
    _say(args, f"  mean IU (per image)    {100 * pb:5.1f}%     {100 * pa:5.1f}%")
    pc, pr = pixel_accuracy(conf_c), pixel_accuracy(conf_r)
    _say(args, f"  pixel accuracy         {100 * pc:5.1f}%     {100 * pr:5.1f}%")
    _say(args, f"  CRF {crf_time:.1f} s ({crf_time / max(n, 1):.2f} s/image) on {dev}, total {total:.1f} s")
    if outs:
        _say(args, f"  wrote {len(outs)} example(s) to {out_dir}/")
    return EXIT_OK


# ============================================================================================== refine
def _refine_jobs(args) -> list[tuple[Path, Path, Path]]:
    """(image, probs-or-labels file, output) triples; checks that the files exist and match by stem."""
    image = Path(args.image)
    source = Path(args.probs if args.probs is not None else args.labels)
    flag = "--probs" if args.probs is not None else "--labels"
    ext = ".npy" if args.probs is not None else ".png"
    if not image.exists():
        raise FileNotFoundError(f"image {image} does not exist")
    if image.is_dir():
        if not source.is_dir():
            raise UsageError(f"IMAGE {image} is a folder, so {flag} must be a folder too (got {source})")
        out_dir = Path(args.output) if args.output else Path("refined")
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {out_dir} must be a folder when IMAGE is a folder")
        jobs = []
        for img in _list_images(image):
            src = source / (img.stem + ext)
            if not src.is_file():
                raise FileNotFoundError(f"{flag} folder {source} has no {img.stem}{ext} for image {img}")
            jobs.append((img, src, out_dir / f"{img.stem}.png"))
        return jobs
    _need_file(source, f"{flag} file")
    out = Path(args.output) if args.output else Path(f"{image.stem}_crf.png")
    if out.is_dir():
        out = out / f"{image.stem}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: label maps are written as PNG; use a .png name")
    return [(image, source, out)]


def _load_probs(path: Path, logits: bool):
    import numpy as np

    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"cannot read probabilities {path} as a .npy array: {e}") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise UsageError(f"probabilities {path} must be a float array (L, H, W), got dtype {getattr(a, 'dtype', '?')}")
    if a.ndim != 3 or a.shape[0] < 2:
        raise UsageError(f"probabilities {path} must have shape (L, H, W) with L >= 2 classes, got {a.shape}")
    if not np.isfinite(a).all():
        raise UsageError(f"probabilities {path} (shape {a.shape}) contain NaN or infinite values")
    if logits:
        a = a.astype(np.float64)
        a = np.exp(a - a.max(0, keepdims=True))
        a /= a.sum(0, keepdims=True)
    elif (a < 0).any():
        raise UsageError(f"probabilities {path} (shape {a.shape}) hold negative values; pass --logits for raw scores")
    return np.ascontiguousarray(a, dtype=np.float32)


def _labels_to_probs(labels, path: Path, args):
    """pydensecrf's unary_from_labels as probabilities over the label values that are classes."""
    import numpy as np

    from crfrnn.densecrf.utils import unary_from_labels

    unknown = args.unknown
    known = labels[labels != unknown] if unknown is not None else labels
    if known.size == 0:
        raise UsageError(f"labels {path} hold only the unknown value {unknown}")
    L = args.num_classes if args.num_classes is not None else int(known.max()) + 1
    if int(known.max()) >= L:
        raise UsageError(f"labels {path} hold value {int(known.max())} but --num-classes is {L} "
                         f"(values must lie in [0, {L}) or be the --unknown value)")
    classes = [v for v in range(L) if v != unknown]
    if len(classes) < 2:
        raise UsageError(f"labels {path}: need at least 2 classes, found {len(classes)} (--num-classes {L})")
    lut = np.full(max(L, int(labels.max()) + 1), -1, np.int64)
    lut[classes] = np.arange(len(classes))
    if unknown is not None:
        compact = np.where(labels == unknown, 0, lut[np.where(labels == unknown, 0, labels)] + 1)
        U = unary_from_labels(compact, len(classes), args.gt_prob, zero_unsure=True)
    else:
        U = unary_from_labels(lut[labels], len(classes), args.gt_prob, zero_unsure=False)
    probs = np.exp(-U.astype(np.float64)).reshape(len(classes), *labels.shape).astype(np.float32)
    return probs, np.asarray(classes, np.int64)


def cmd_refine(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from crfrnn import densecrf, viz
    from crfrnn.data import read_mask

    if not 0.0 < args.gt_prob < 1.0:
        raise UsageError(f"--gt-prob must lie in (0, 1), got {args.gt_prob}")
    dev = _device(args.device)
    jobs = _refine_jobs(args)
    # check every pair before writing anything
    for img, src, _ in jobs:
        h, w = _image_size(img)
        if args.probs is not None:
            try:
                shape = np.load(src, mmap_mode="r", allow_pickle=False).shape
            except Exception as e:
                raise UsageError(f"cannot read probabilities {src} as a .npy array: {e}") from None
            if len(shape) != 3:
                raise UsageError(f"probabilities {src} must have shape (L, H, W), got {shape}")
            if tuple(shape[1:]) != (h, w):
                raise UsageError(f"probabilities {src} have (H, W) = {tuple(shape[1:])} but image {img} is "
                                 f"{h}x{w} (H, W) = {(h, w)}")
            if args.num_classes is not None and shape[0] != args.num_classes:
                raise UsageError(f"probabilities {src} have L = {shape[0]} classes but --num-classes is "
                                 f"{args.num_classes}")
        else:
            lh, lw = _image_size(src)
            if (lh, lw) != (h, w):
                raise UsageError(f"labels {src} are {lh}x{lw} (H x W) but image {img} is {h}x{w}")
    if args.palette == "input":
        for _, src, _ in jobs:
            if args.probs is not None or _image_mode(src) != "P":
                raise UsageError(f"--palette input needs palette PNG labels; {src} has none")
    _check_outputs([o for _, _, o in jobs], [p for j in jobs for p in j[:2]])

    params = dict(n_iterations=args.iterations, sxy_gaussian=args.sxy_gaussian, compat_gaussian=args.compat_gaussian,
                  sxy_bilateral=args.sxy_bilateral, srgb=args.srgb, compat_bilateral=args.compat_bilateral)
    results = []
    for img, src, out in _progress(jobs, args, desc="refine"):
        rgb = _read_rgb(img)
        input_palette = None
        if args.probs is not None:
            probs = _load_probs(src, args.logits)
            values = np.arange(probs.shape[0])
            before = probs.argmax(0)
            known = np.ones(before.shape, bool)
        else:
            labels = read_mask(src).numpy()
            with Image.open(src) as im:
                if im.mode == "P" and im.getpalette():
                    pal = np.array(im.getpalette()[: 3 * 256], np.uint8)
                    input_palette = np.zeros((256, 3), np.uint8)
                    input_palette[: pal.size // 3] = pal.reshape(-1, 3)
            probs, values = _labels_to_probs(labels, src, args)
            before = labels
            known = labels != args.unknown if args.unknown is not None else np.ones(labels.shape, bool)
        t0 = time.perf_counter()
        out_idx = densecrf.refine(torch.from_numpy(rgb).to(dev), torch.from_numpy(probs).to(dev), **params)
        seconds = time.perf_counter() - t0
        refined = values[out_idx.cpu().numpy()]
        pal = input_palette if (args.palette in ("auto", "input") and input_palette is not None) else \
            _palette_for("voc" if args.palette in ("auto", "input") else args.palette, int(refined.max()) + 1)
        viz.save_image(viz.label_image(refined, pal), out)
        changed = float((refined[known] != before[known]).mean()) if known.any() else 0.0
        results.append({"image": str(img), "source": str(src), "output": str(out), "height": int(rgb.shape[0]),
                        "width": int(rgb.shape[1]), "num_classes": int(len(values)),
                        "changed_fraction": changed, "seconds": seconds})
        _say(args, f"{img} -> {out}  ({100 * changed:.1f}% of the labelled pixels changed, {seconds:.2f} s)")
    _emit_json(args, {"results": results, "params": params, "device": str(dev)})
    return EXIT_OK


# ============================================================================================= segment
def _crf_overrides(args) -> dict:
    return {"num_test_iterations": args.iterations} if getattr(args, "iterations", None) is not None else {}


def cmd_segment(args) -> int:
    import torch

    from crfrnn import viz
    from crfrnn.data import read_image

    dev = _device(args.device)
    images: list[Path] = []
    for item in args.images:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"image {p} does not exist")
        images.extend(_list_images(p) if p.is_dir() else [p])
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise UsageError(f"two images share the name {p.stem!r} ({stems[p.stem]} and {p}); outputs would clash")
        stems[p.stem] = p
    model, info = load_model(args.weights, keras=args.keras, convention=args.convention, crf=_crf_overrides(args))
    L = info["num_classes"]
    if args.num_classes is not None and args.num_classes != L:
        raise UsageError(f"--num-classes is {args.num_classes} but the checkpoint {info['checkpoint']} predicts "
                         f"L = {L} classes")
    class_names = _class_names_for(L, info.get("class_names"))
    pal = _palette_for(args.palette, L, class_names)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")
    outs = []
    for p in images:
        outs.append((out_dir / f"{p.stem}.png", out_dir / f"{p.stem}_overlay.png"))
    _check_outputs([o for pair in outs for o in pair], images + [Path(info["checkpoint"])])
    if args.no_crf:
        model = _unary_only(model)
    model.to(dev).eval()
    results = []
    for p, (lab_path, ov_path) in zip(_progress(images, args, desc="segment"), outs):
        image = read_image(p)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(image[None].to(dev))
        labels = logits[0].argmax(0).cpu()
        seconds = time.perf_counter() - t0
        viz.save_image(viz.label_image(labels, pal), lab_path)
        viz.save_image(viz.overlay(image, labels, pal, alpha=args.alpha), ov_path)
        counts = torch.bincount(labels.reshape(-1), minlength=L)
        present = {class_names[k]: float(counts[k]) / labels.numel() for k in range(L) if counts[k] > 0}
        results.append({"image": str(p), "labels": str(lab_path), "overlay": str(ov_path),
                        "height": int(labels.shape[0]), "width": int(labels.shape[1]), "classes": present,
                        "seconds": seconds})
        top = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(present.items(), key=lambda kv: -kv[1])[:4])
        _say(args, f"{p} -> {lab_path}  [{top}]  {seconds:.2f} s")
    _emit_json(args, {"model": info["kind"], "checkpoint": info["checkpoint"], "num_classes": L,
                      "class_names": class_names, "device": str(dev), "crf": not args.no_crf, "results": results})
    return EXIT_OK


# ========================================================================================= train / eval
_DATASETS = ("voc", "camvid", "folder")


def _folder_dataset(root: Path, num_classes: int | None, transform, ignore_index: int):
    from crfrnn.data import SegmentationFolder

    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise UsageError(f"folder data set {root} must hold images/ and masks/")
    names = _read_names_file(root / "class_names.txt") if (root / "class_names.txt").is_file() else None
    L = num_classes or (len(names) if names else None)
    if L is None:
        raise UsageError(f"--num-classes is needed for {root} (no class_names.txt)")
    return SegmentationFolder(root / "images", root / "masks", num_classes=L, ignore_index=ignore_index,
                              transform=transform, classes=_class_names_for(L, names))


def _dataset(kind: str, root, split: str | None, num_classes: int | None, transform=None, ignore_index: int = 255):
    """(dataset, num_classes, class_names)."""
    from crfrnn.data import CamVid, VOCSegmentation

    if kind not in _DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(_DATASETS)}, got {kind!r}")
    if root is None:
        raise UsageError("--root is required (the data set's folder)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    if kind == "voc":
        ds = VOCSegmentation(root, split=split, transform=transform)
    elif kind == "camvid":
        ds = CamVid(root, split=split or "train", transform=transform)
    else:
        sub = root / split if split and (root / split / "images").is_dir() else root
        ds = _folder_dataset(sub, num_classes, transform, ignore_index)
    if num_classes is not None and num_classes != ds.num_classes:
        raise UsageError(f"--num-classes is {num_classes} but the {kind} data set has {ds.num_classes} classes")
    return ds, ds.num_classes, list(ds.classes) if ds.classes else _class_names_for(ds.num_classes)


def _limit(ds, n: int | None):
    from torch.utils.data import Subset

    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


# flags of `crfrnn train` (dest -> default); a --config JSON may set any of them and any TrainConfig field
_TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "voc", "root": None, "train_split": "train", "val_split": "val", "val_root": None,
    "num_classes": None, "model": "crfrnn", "init": None, "run_dir": None, "steps": None, "epochs": 1,
    "lr": None, "momentum": None, "weight_decay": None, "batch_size": 1, "crop_size": None, "flip": True,
    "eval_every": 0, "log_every": 10, "checkpoint_every": 0, "train_limit": None, "val_limit": None,
    "seed": 0, "num_workers": 0, "amp": False, "resume": False, "paper": False, "schedule": None,
    "crf_iterations": 5, "crf_test_iterations": 10, "ignore_index": 255, "device": "auto",
}


def _merge_config(args) -> dict:
    from dataclasses import fields

    from crfrnn.engine.train import TrainConfig

    cfg: dict[str, Any] = {}
    if args.config is not None:
        path = _need_file(Path(args.config), "--config file")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read --config {path}: {e}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {path} must hold a JSON object")
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        tc_fields = {f.name for f in fields(TrainConfig)}
        unknown = sorted(k for k in cfg if k not in _TRAIN_DEFAULTS and k not in tc_fields and k != "max_steps")
        if unknown:
            raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
        if "max_steps" in cfg:
            cfg.setdefault("steps", cfg.pop("max_steps"))
    merged = dict(_TRAIN_DEFAULTS)
    merged.update(cfg)
    for key in _TRAIN_DEFAULTS:
        v = getattr(args, key, None)
        if v is not None:
            merged[key] = v
    return merged


def _init_weights(model, kind: str, path: Path):
    """Initialise ``model`` from our checkpoint, the published .pth / .h5, or a torchvision VGG-16 state dict."""
    from crfrnn.models import weights

    _need_file(path, "--init file")
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


def cmd_train(args) -> int:
    from crfrnn import data
    from crfrnn.engine.train import TrainConfig, train

    o = _merge_config(args)
    if o["run_dir"] is None:
        raise UsageError("--run-dir is required (the folder that receives config.json, metrics.jsonl, last.pt, "
                         "best.pt)")
    run_dir = Path(o["run_dir"])
    if not o["resume"] and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"--run-dir {run_dir} exists and is not empty; pass --resume to continue it or choose a new "
                         f"folder (runs are never overwritten)")
    if o["model"] not in ("crfrnn", "fcn8s", "tiny", "tiny-fcn"):
        raise UsageError(f"--model must be crfrnn, fcn8s or tiny, got {o['model']!r}")
    ignore = int(o["ignore_index"])
    tf = []
    if o["crop_size"] is not None:
        crop = o["crop_size"]
        crop = _parse_size(str(crop)) if not isinstance(crop, (list, tuple)) else tuple(crop)
        tf.append(data.RandomCrop(crop, ignore_index=ignore))
    if o["flip"]:
        tf.append(data.RandomHorizontalFlip())
    train_set, L, class_names = _dataset(o["dataset"], o["root"], o["train_split"], o["num_classes"],
                                         data.Compose(tf) if tf else None, ignore)
    val_set = None
    if o["val_root"] is not None:
        val_set, _, _ = _dataset(o["dataset"], o["val_root"], None, L, None, ignore)
    elif o["val_split"] and o["dataset"] != "folder":
        val_set, _, _ = _dataset(o["dataset"], o["root"], o["val_split"], L, None, ignore)
    elif o["val_split"] and o["dataset"] == "folder" and (Path(o["root"]) / o["val_split"] / "images").is_dir():
        val_set, _, _ = _dataset("folder", o["root"], o["val_split"], L, None, ignore)
    train_set = _limit(train_set, o["train_limit"])
    if val_set is not None:
        val_set = _limit(val_set, o["val_limit"])

    crf = {"num_iterations": int(o["crf_iterations"]), "num_test_iterations": int(o["crf_test_iterations"])}
    model = build_model(o["model"], L, crf if o["model"] in ("crfrnn", "tiny") else None)
    init = None
    if o["init"] is not None and not o["resume"]:
        init = _init_weights(model, o["model"], Path(o["init"]))

    tc_names = {f for f in TrainConfig.__dataclass_fields__}
    tc: dict[str, Any] = {k: v for k, v in o.items() if k in tc_names and k not in _TRAIN_DEFAULTS}
    for key in ("lr", "momentum", "weight_decay", "schedule"):
        if o[key] is not None:
            tc[key] = o[key]
    tc.update(num_classes=L, batch_size=int(o["batch_size"]), epochs=int(o["epochs"]), max_steps=o["steps"],
              eval_every=int(o["eval_every"]), log_every=int(o["log_every"]),
              checkpoint_every=int(o["checkpoint_every"]), seed=int(o["seed"]), num_workers=int(o["num_workers"]),
              amp=bool(o["amp"]), device=str(o["device"]), ignore_index=ignore)
    if o["device"] != "auto":
        _device(o["device"])
    cfg = TrainConfig.paper("mean", **tc) if o["paper"] else TrainConfig(**tc)

    sidecar = {"model": o["model"], "num_classes": L, "class_names": class_names, "crf": crf,
               "data": {"dataset": o["dataset"], "root": str(o["root"]), "train_split": o["train_split"],
                        "val_split": o["val_split"], "val_root": o["val_root"], "ignore_index": ignore},
               "init": str(o["init"]) if o["init"] else None}

    def write_sidecar(*_):
        if _rank() == 0 and run_dir.is_dir() and not (run_dir / "model.json").exists():
            tmp = run_dir / f".model.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, run_dir / "model.json")

    _say(args, f"training {o['model']} ({L} classes) on {len(train_set)} images of {o['root']}"
               + (f", validating on {len(val_set)}" if val_set is not None else "")
               + (f"; init from {o['init']} ({init})" if init else "") + f" -> {run_dir}")
    res = train(model, train_set, val_set, cfg, run_dir, resume=bool(o["resume"]), progress=_show_progress(args),
                on_step=write_sidecar)
    write_sidecar()
    best = res.get("best_mean_iou")
    _emit_json(args, {**res, "model": o["model"], "num_classes": L, "config": cfg.to_dict()})
    _say(args, f"done: {res['step']} steps"
               + (f", best validation mean IU {100 * best:.2f}% at step {res['best_step']}" if best is not None else "")
               + f"; run folder {run_dir}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from crfrnn.engine.metrics import format_iou_table
    from crfrnn.engine.train import evaluate

    dev = _device(args.device)
    model, info = load_model(args.weights, keras=args.keras, convention=args.convention, crf=_crf_overrides(args))
    L = info["num_classes"]
    if args.num_classes is not None and args.num_classes != L:
        raise UsageError(f"--num-classes is {args.num_classes} but the checkpoint {info['checkpoint']} predicts "
                         f"L = {L} classes")
    saved = info["sidecar"].get("data", {})
    kind = args.dataset or saved.get("dataset")
    root = args.root or (saved.get("val_root") or saved.get("root"))
    split = args.split if args.split is not None else (None if saved.get("val_root") else saved.get("val_split", "val"))
    if kind is None or root is None:
        raise UsageError("--dataset and --root are required (or a run folder whose model.json names its data)")
    ignore = saved.get("ignore_index", 255) if args.ignore_index is None else args.ignore_index
    ds, dl, names = _dataset(kind, root, split, L if kind == "folder" else None, None, ignore)
    if dl != L:
        raise UsageError(f"the checkpoint predicts L = {L} classes but the {kind} data set at {root} has {dl}")
    ds = _limit(ds, args.limit)
    if args.no_crf:
        model = _unary_only(model)
    t0 = time.perf_counter()
    res = evaluate(model, ds, L, batch_size=args.batch_size, device=dev, ignore_index=ignore,
                   progress=_show_progress(args))
    seconds = time.perf_counter() - t0
    conf = res["confusion"]
    _emit_json(args, {
        "checkpoint": info["checkpoint"], "model": info["kind"], "crf": not args.no_crf, "dataset": kind,
        "root": str(root), "split": split, "num_images": res["num_images"], "num_classes": L,
        "mean_iou": _finite(res["mean_iou"]), "pixel_accuracy": _finite(res["pixel_accuracy"]),
        "mean_accuracy": _finite(res["mean_accuracy"]),
        "class_iou": {n: _finite(v) for n, v in zip(names, res["class_iou"])},
        "class_names": names, "confusion": conf.tolist(), "seconds": seconds, "device": str(dev),
    })
    label = info["kind"] + (" (no CRF)" if args.no_crf else "")
    _say(args, f"{label} {info['checkpoint']} on {res['num_images']} images of {root} ({kind}"
               + (f", {split}" if split else "") + f"), {seconds:.1f} s")
    _say(args, f"  mean IU {100 * res['mean_iou']:.2f}%   pixel accuracy {100 * res['pixel_accuracy']:.2f}%   "
               f"mean accuracy {100 * res['mean_accuracy']:.2f}%")
    _say(args, format_iou_table(conf, names, row_name=label))
    return EXIT_OK


# ======================================================================================= show-compat / plot
def _compat_from_h5(path: Path):
    import numpy as np
    import torch

    try:
        import h5py
    except ImportError:
        raise UsageError("reading a Keras .h5 file needs h5py (pip install h5py)") from None
    found = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.append(np.array(obj)) if isinstance(obj, h5py.Dataset)
                         and name.rsplit("/", 1)[-1].startswith("compatibility_matrix") else None)
    except OSError as e:
        raise UsageError(f"cannot open {path} as HDF5: {e}") from None
    if not found:
        raise UsageError(f"{path} holds no crfrnn/compatibility_matrix")
    return torch.from_numpy(found[0].astype(np.float64))


def cmd_show_compat(args) -> int:
    from crfrnn import viz

    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = {}
    if path.is_dir():
        sidecar = _read_sidecar(path)
        path = _run_dir_checkpoint(path)
    out = Path(args.output) if args.output else Path(f"{path.stem}_compat.png")
    _check_outputs([out], [path])
    _check_png_suffix(out)
    flipped = False
    if path.suffix.lower() in (".h5", ".hdf5"):
        m = _compat_from_h5(path)
    else:
        sd, ours = _state_dict_of(_torch_load(path), path)
        key = next((k for k in sd if k.endswith("compatibility_matrix")), None)
        if key is None:
            raise UsageError(f"{path} holds no crfrnn.compatibility_matrix (not a CRF-RNN checkpoint)")
        m = sd[key].detach().double()
        if ours and not sidecar:
            sidecar = _read_sidecar(path.parent)
        if args.convention == "crfasrnn_pytorch" or (args.convention == "auto" and not ours):
            m, flipped = -m, True  # the official PyTorch port stores the negative (see crfrnn.weights)
    if m.dim() == 3:  # untied: one matrix per iteration
        if not -m.shape[0] <= args.iteration < m.shape[0]:
            raise UsageError(f"--iteration {args.iteration} is out of range: {path} has {m.shape[0]} matrices")
        m = m[args.iteration]
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise UsageError(f"the compatibility matrix in {path} has shape {tuple(m.shape)}, expected (L, L)")
    L = m.shape[0]
    names = None
    if args.classes:
        cp = Path(args.classes)
        names = _read_names_file(cp) if cp.is_file() else [s.strip() for s in args.classes.split(",")]
        if len(names) != L:
            raise UsageError(f"--classes gives {len(names)} names but the matrix is {L} x {L}")
    names = _class_names_for(L, names or sidecar.get("class_names"))
    title = args.title if args.title is not None else f"label compatibility ({path.name})"
    viz.save_image(viz.compat_heatmap(m, names, title=title), out)
    _emit_json(args, {"checkpoint": str(path), "output": str(out), "class_names": names, "matrix": m.tolist(),
                      "sign_flipped": flipped})
    _say(args, f"{L}x{L} compatibility matrix of {path}" + (" (sign flipped from the official port's)" if flipped
                                                             else "") + f" -> {out}")
    return EXIT_OK


def cmd_plot(args) -> int:
    from crfrnn import viz

    run = Path(args.run_dir)
    if not run.exists():
        raise FileNotFoundError(f"run folder {run} does not exist")
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    records = viz.read_metrics(metrics)
    out = Path(args.output) if args.output else (run if run.is_dir() else run.parent) / "curves.png"
    _check_outputs([out], [metrics])
    _check_png_suffix(out)
    title = args.title if args.title is not None else (run if run.is_dir() else run.parent).name
    viz.save_image(viz.training_curves(records, title=title), out)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [r for r in records if r.get("kind") == "val" and r.get("mean_iou") is not None]
    best = max(val, key=lambda r: r["mean_iou"]) if val else None
    _emit_json(args, {"run_dir": str(run), "output": str(out), "train_points": len(train), "val_points": len(val),
                      "last_loss": train[-1]["loss"] if train else None,
                      "best_mean_iou": best["mean_iou"] if best else None, "best_step": best["step"] if best else None})
    _say(args, f"{len(train)} loss and {len(val)} validation points"
               + (f" (best mean IU {100 * best['mean_iou']:.2f}% at step {best['step']})" if best else "")
               + f" -> {out}")
    return EXIT_OK


# ================================================================================================ bench
def cmd_bench(argv: list[str]) -> int:
    try:
        from crfrnn import bench
    except ImportError as e:
        if getattr(e, "name", "") not in ("crfrnn.bench", None):
            raise
        raise RuntimeError("crfrnn.bench is not available in this installation") from None
    try:
        rc = bench.main(argv)
    except SystemExit as e:  # its own argparse: --help (0) or a usage error (2)
        rc = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    return EXIT_OK if rc is None else int(rc)


# =============================================================================================== parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; appends a flag's default when it is informative."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or action.option_strings == []:
            return text
        shown = "x".join(map(str, d)) if isinstance(d, tuple) else d
        return f"{text} (default: {shown})"


def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    g = p.add_argument_group("output and device")
    if device:
        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    else:
        g.add_argument("--device", default="auto", help="accepted for uniformity; this command runs no model")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON document instead of text")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch and the compiled lattice kernels (default: all cores; 1 is often "
                        "faster for small images or on a busy machine)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars (they are off anyway when stderr "
                                                              "is not a terminal)")


def _weights_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keras", action="store_true", help="the weights are the Keras release (.h5; implied by the "
                                                        "suffix)")
    p.add_argument("--convention", choices=("auto", "crfasrnn_pytorch", "crfrnn"), default="auto",
                   help="sign convention of a plain state dict's compatibility matrix: auto = the published "
                        "crfasrnn_weights.pth (official port, negated on load); our checkpoints are never negated")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="mean-field iterations at inference (default: the model's, 10)")


def build_parser() -> argparse.ArgumentParser:
    from crfrnn import __version__

    p = argparse.ArgumentParser(
        prog="crfrnn", formatter_class=_Formatter,
        description="CRF-RNN (Zheng et al., ICCV 2015): dense-CRF mean-field inference as a trainable RNN layer, "
                    "on a permutohedral lattice.",
        epilog="examples:\n"
               "  crfrnn demo                                   # built-in scene, writes demo_out/demo.png\n"
               "  crfrnn demo --data data/voc2012-sample        # the same recipe on real VOC pairs\n"
               "  crfrnn refine photo.jpg --probs probs.npy -o labels.png\n"
               "  crfrnn segment photos/ --weights crfasrnn_weights.pth --out seg/\n"
               "  crfrnn train --dataset voc --root VOC2012 --model crfrnn --init fcn8s.pt --run-dir runs/a\n"
               "  crfrnn eval --weights runs/a --dataset voc --root VOC2012 --split val\n"
               "  crfrnn show-compat runs/a -o compat.png;  crfrnn plot runs/a\n\n"
               "Run 'crfrnn COMMAND --help' for the options of a command. Exit status: 0 success, 2 usage or "
               "input error, 1 other failure.",
    )
    p.add_argument("--version", action="version", version=f"crfrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------------------------------ demo
    d = sub.add_parser(
        "demo", formatter_class=_Formatter, help="refine a coarse prediction with the dense CRF (built-in or --data)",
        description="Make a coarse, FCN-like prediction from ground truth (one-hot seen at the FCN-8s stride of 8, "
                    "with noise, upsampled bilinearly), refine it with dense-CRF mean field and report mean IU "
                    "before and after. Without --data the scene is generated (textured shapes with exact labels); "
                    "nothing is downloaded.",
        epilog="examples:\n"
               "  crfrnn demo                                     # demo_out/demo.png: image|coarse|refined|truth\n"
               "  crfrnn demo --seed 3 --size 240x320 --json\n"
               "  crfrnn demo --data /work/shared/data/voc2012-sample --limit 50 --out demo_voc\n"
               "  crfrnn demo --data /work/shared/data/camvid/val --ignore-index 11",
    )
    d.add_argument("--data", metavar="DIR", help="VOC-style folder with images/ and masks/ (matched by stem)")
    d.add_argument("--out", metavar="DIR", default="demo_out", help="folder for the PNGs")
    d.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N pairs of --data")
    d.add_argument("--examples", type=_nonneg_int, default=4, metavar="K",
                   help="with --data, write side-by-side PNGs of the first K pairs")
    d.add_argument("--num-classes", type=_positive_int, help="with --data: L (default: lines of class_names.txt, "
                                                            "else 21)")
    d.add_argument("--ignore-index", type=int, default=255, help="with --data: label that is not counted")
    d.add_argument("--palette", default="auto", choices=("auto", "voc", "camvid", "distinct"))
    d.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the scene and of the coarse prediction's noise")
    d.add_argument("--size", type=_parse_size, default=(360, 480), metavar="HxW", help="size of the built-in scene")
    d.add_argument("--iterations", type=_positive_int, help="mean-field iterations (default 5)")
    _common(d)
    d.set_defaults(func=cmd_demo)

    # ---------------------------------------------------------------------------------------- refine
    r = sub.add_parser(
        "refine", formatter_class=_Formatter, help="dense-CRF post-processing of probabilities or labels",
        description="Dense-CRF post-processing (Kraehenbuehl & Koltun 2011, pydensecrf's recipe): unaries "
                    "-log(p) from class probabilities (.npy, shape (L, H, W)) or from a label map (PNG, index or "
                    "palette) like pydensecrf's unary_from_labels, a Gaussian and a bilateral Potts term, mean "
                    "field, arg max. Writes a palette PNG of labels. IMAGE may be a folder: then --probs/--labels "
                    "is a folder with files of the same stems and -o a folder.",
        epilog="examples:\n"
               "  crfrnn refine photo.jpg --probs photo_probs.npy -o photo_labels.png\n"
               "  crfrnn refine photo.jpg --labels coarse.png -o refined.png --gt-prob 0.7\n"
               "  crfrnn refine im1.png --labels anno1.png --unknown 2 --gt-prob 0.7   # scribbles, 2 = unlabelled\n"
               "  crfrnn refine images/ --probs probs/ -o refined/ --iterations 10",
    )
    r.add_argument("image", metavar="IMAGE", help="RGB image, or a folder of images")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--probs", metavar="P.npy", help="class probabilities (L, H, W) float (or a folder of .npy)")
    src.add_argument("--labels", metavar="COARSE.png", help="label map to refine (or a folder of .png)")
    r.add_argument("-o", "--output", metavar="OUT", help="output PNG (folder for folder input); default "
                                                         "STEM_crf.png, or refined/ for folders")
    r.add_argument("--logits", action="store_true", help="--probs hold raw scores: apply softmax over L first")
    r.add_argument("--gt-prob", type=float, default=0.5, help="--labels: probability of the given label")
    r.add_argument("--unknown", type=int, default=None, metavar="V",
                   help="--labels: value V means 'unknown' (uniform unary); --unknown 0 is pydensecrf's "
                        "zero_unsure")
    r.add_argument("--num-classes", type=_positive_int, help="L: checked against --probs; for --labels the label "
                                                            "values 0..L-1 (default: largest value + 1)")
    crf = r.add_argument_group("dense CRF (pydensecrf's defaults)")
    crf.add_argument("--iterations", type=_nonneg_int, default=5, help="mean-field iterations")
    crf.add_argument("--sxy-gaussian", type=_positive_float, default=3.0, help="Gaussian kernel: position std (px)")
    crf.add_argument("--compat-gaussian", type=_float, default=3.0, help="Gaussian kernel: Potts weight")
    crf.add_argument("--sxy-bilateral", type=_positive_float, default=80.0, help="bilateral kernel: position std (px)")
    crf.add_argument("--srgb", type=_positive_float, default=13.0, help="bilateral kernel: colour std (0..255)")
    crf.add_argument("--compat-bilateral", type=_float, default=10.0, help="bilateral kernel: Potts weight")
    r.add_argument("--palette", default="auto", choices=("auto", "input", "voc", "camvid", "distinct"),
                   help="colours of the output PNG (auto: the input label PNG's palette if it has one, else VOC)")
    _common(r)
    r.set_defaults(func=cmd_refine)

    # --------------------------------------------------------------------------------------- segment
    s = sub.add_parser(
        "segment", formatter_class=_Formatter, help="segment images with a trained checkpoint",
        description="Run a trained network on images of any size and write, per image, a palette PNG of labels "
                    "(OUT/STEM.png) and an overlay (OUT/STEM_overlay.png). --weights is a run folder (best.pt, "
                    "else last.pt), one of its checkpoints, the published crfasrnn_weights.pth, or the Keras "
                    "crfrnn_keras_model.h5.",
        epilog="examples:\n"
               "  crfrnn segment input.jpg --weights crfasrnn_weights.pth --out seg/\n"
               "  crfrnn segment photos/ --weights runs/voc1 --out seg/ --device cuda\n"
               "  crfrnn segment input.jpg --weights crfrnn_keras_model.h5 --out seg/ --no-crf   # FCN-8s only",
    )
    s.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    s.add_argument("--weights", required=True, metavar="W", help="checkpoint, run folder, .pth or .h5")
    s.add_argument("--out", default="segment_out", metavar="DIR", help="output folder")
    s.add_argument("--num-classes", type=_positive_int, help="expected L (checked against the checkpoint)")
    s.add_argument("--no-crf", action="store_true", help="use the unary network's logits only (skip the CRF)")
    s.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay colours")
    s.add_argument("--palette", default="auto", choices=("auto", "voc", "camvid", "distinct"))
    _weights_flags(s)
    _common(s)
    s.set_defaults(func=cmd_segment)

    # ----------------------------------------------------------------------------------------- train
    t = sub.add_parser(
        "train", formatter_class=_Formatter, help="train FCN-8s / CRF-RNN",
        description="Train with SGD on softmax cross-entropy (crfrnn.train.train) and write a run folder "
                    "(config.json, metrics.jsonl, last.pt, best.pt, model.json). Settings come from flags or a "
                    "JSON --config whose keys are the flag names (e.g. {\"dataset\": \"voc\", \"steps\": 1000}) "
                    "or any crfrnn.train.TrainConfig field; flags override the file. Under torchrun every process "
                    "runs this command and train() distributes itself (DDP, one process per GPU).",
        epilog="examples:\n"
               "  crfrnn train --dataset voc --root VOC2012 --model fcn8s --init vgg16.pth --run-dir runs/fcn \\\n"
               "      --steps 100000 --lr 1e-4 --crop-size 500\n"
               "  crfrnn train --dataset voc --root VOC2012 --model crfrnn --init runs/fcn/best.pt --run-dir runs/crf "
               "--paper\n"
               "  crfrnn train --config train.json --run-dir runs/b --resume\n"
               "  torchrun --nproc_per_node=2 -m crfrnn train --config train.json\n"
               "  crfrnn train --dataset folder --root my_data --num-classes 6 --model tiny --steps 20 "
               "--run-dir runs/smoke\n\n"
               "--model tiny is a smoke-test network (three small convolutions + CRF-RNN), for checking a set-up in "
               "seconds, not for real use.",
    )
    t.add_argument("--config", metavar="JSON", help="JSON file of settings (keys = flag names)")
    t.add_argument("--dataset", choices=_DATASETS, default=None, help="data set kind (default voc)")
    t.add_argument("--root", metavar="DIR", help="data set folder (voc: devkit, SBD or images/+masks/; camvid: "
                                                 "split folders; folder: images/+masks/)")
    t.add_argument("--train-split", default=None, help="training split (default train)")
    t.add_argument("--val-split", default=None, help="validation split (default val; '' for none)")
    t.add_argument("--val-root", metavar="DIR", default=None, help="separate validation folder (--dataset folder)")
    t.add_argument("--num-classes", type=_positive_int, default=None, help="L (folder data sets without "
                                                                            "class_names.txt)")
    t.add_argument("--ignore-index", type=int, default=None, help="label without loss (default 255)")
    t.add_argument("--model", choices=("crfrnn", "fcn8s", "tiny", "tiny-fcn"), default=None,
                   help="network (default crfrnn)")
    t.add_argument("--init", metavar="W", default=None,
                   help="initial weights: a crfrnn checkpoint, crfasrnn_weights.pth, the Keras .h5, or a torchvision "
                        "VGG-16 state dict (for fcn8s/crfrnn)")
    t.add_argument("--run-dir", metavar="DIR", default=None, help="run folder (must be new or empty unless --resume)")
    t.add_argument("--resume", action="store_const", const=True, default=None, help="continue the run in --run-dir")
    t.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps (default: --epochs epochs)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="epochs when --steps is not given (default 1)")
    t.add_argument("--lr", type=_positive_float, default=None, help="base learning rate (default 1e-3)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    t.add_argument("--schedule", choices=("poly", "fixed"), default=None, help="learning-rate schedule (default poly)")
    t.add_argument("--paper", action="store_const", const=True, default=None,
                   help="the paper's recipe (TrainConfig.paper, mean-loss form): momentum 0.99, fixed lr, CRF lr "
                        "multipliers 10000/10000/1000")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="images per step per process (default 1)")
    t.add_argument("--crop-size", default=None, metavar="N|HxW", help="random crops (padded with ignore)")
    t.add_argument("--no-flip", dest="flip", action="store_const", const=False, default=None,
                   help="no random horizontal flips")
    t.add_argument("--eval-every", type=_nonneg_int, default=None, help="validate every N steps (0: every epoch)")
    t.add_argument("--log-every", type=_positive_int, default=None, help="log the loss every N steps (default 10)")
    t.add_argument("--checkpoint-every", type=_nonneg_int, default=None, help="write last.pt every N steps")
    t.add_argument("--train-limit", type=_positive_int, default=None, help="use the first N training images")
    t.add_argument("--val-limit", type=_positive_int, default=None, help="use the first N validation images")
    t.add_argument("--crf-iterations", type=_positive_int, default=None, help="mean-field iterations in training "
                                                                              "(default 5)")
    t.add_argument("--crf-test-iterations", type=_positive_int, default=None, help="... at evaluation (default 10)")
    t.add_argument("--seed", type=_nonneg_int, default=None, help="random seed (default 0)")
    t.add_argument("--num-workers", type=_nonneg_int, default=None, help="DataLoader workers (default 0)")
    t.add_argument("--amp", action="store_const", const=True, default=None, help="mixed precision")
    _common(t)
    t.set_defaults(func=cmd_train, device=None)

    # ------------------------------------------------------------------------------------------ eval
    e = sub.add_parser(
        "eval", formatter_class=_Formatter, help="mean IU and per-class IU of a checkpoint on a data set",
        description="Evaluate a checkpoint (run folder, .pt, published .pth or .h5) on a data set: mean IU over the "
                    "data set's confusion matrix (the VOC convention), pixel accuracy, mean accuracy and the "
                    "per-class IU table. Without --dataset/--root a run folder's own validation data is used.",
        epilog="examples:\n"
               "  crfrnn eval --weights crfasrnn_weights.pth --dataset voc --root data/voc2012-sample --split val\n"
               "  crfrnn eval --weights runs/a --json > scores.json\n"
               "  crfrnn eval --weights runs/a --no-crf          # the unary network alone",
    )
    e.add_argument("--weights", required=True, metavar="W", help="checkpoint, run folder, .pth or .h5")
    e.add_argument("--dataset", choices=_DATASETS, help="data set kind")
    e.add_argument("--root", metavar="DIR", help="data set folder")
    e.add_argument("--split", default=None, help="split (voc/camvid: val, train, ...); default val")
    e.add_argument("--limit", type=_positive_int, help="use the first N images")
    e.add_argument("--num-classes", type=_positive_int, help="expected L (checked against the checkpoint)")
    e.add_argument("--ignore-index", type=int, default=None, help="label that is not counted (default 255)")
    e.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward pass (padded)")
    e.add_argument("--no-crf", action="store_true", help="evaluate the unary network's logits only")
    _weights_flags(e)
    _common(e)
    e.set_defaults(func=cmd_eval)

    # ----------------------------------------------------------------------------------- show-compat
    c = sub.add_parser(
        "show-compat", formatter_class=_Formatter, help="heat-map of a learned compatibility matrix",
        description="Draw crfrnn.compatibility_matrix (the label compatibility mu, a penalty: this library's "
                    "convention, logits = unary - mu @ messages) of a checkpoint as a labelled heat-map like "
                    "Figure 5 of the paper. The published crfasrnn_weights.pth stores -mu; it is negated "
                    "(see --convention).",
        epilog="examples:\n"
               "  crfrnn show-compat runs/a -o compat.png\n"
               "  crfrnn show-compat crfasrnn_weights.pth -o compat_voc.png --json",
    )
    c.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder, .pt checkpoint, state dict .pth or .h5")
    c.add_argument("-o", "--output", metavar="X.png", help="output picture (default STEM_compat.png)")
    c.add_argument("--classes", help="class names: a file (one per line) or a comma-separated list "
                                     "(default: VOC/CamVid names by L, or the run's)")
    c.add_argument("--convention", choices=("auto", "crfasrnn_pytorch", "crfrnn"), default="auto",
                   help="auto: plain state dicts are the official port's (negated), our checkpoints are not")
    c.add_argument("--iteration", type=int, default=0, help="untied models: which iteration's matrix")
    c.add_argument("--title", default=None, help="heading of the picture")
    _common(c, device=False)
    c.set_defaults(func=cmd_show_compat)

    # ------------------------------------------------------------------------------------------ plot
    pl = sub.add_parser(
        "plot", formatter_class=_Formatter, help="training curves of a run folder",
        description="Plot the training loss and the validation mean IU of a run folder's metrics.jsonl.",
        epilog="examples:\n  crfrnn plot runs/a                 # runs/a/curves.png\n"
               "  crfrnn plot runs/a -o a.png --json",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or its metrics.jsonl)")
    pl.add_argument("-o", "--output", metavar="OUT.png", help="output picture (default RUN_DIR/curves.png)")
    pl.add_argument("--title", default=None, help="heading (default: the run folder's name)")
    _common(pl, device=False)
    pl.set_defaults(func=cmd_plot)

    # ----------------------------------------------------------------------------------------- bench
    sub.add_parser("bench", help="speed measurements (all arguments go to crfrnn.bench; see crfrnn bench --help)",
                   add_help=False)
    return p


# ================================================================================================= main
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 usage/input error, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CRFRNN_DEBUG", "") not in ("", "0")
    t0 = time.perf_counter()
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version (0) or a usage error (2), already printed by argparse
            return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
        args._t0 = t0
        if getattr(args, "threads", None):
            _set_threads(args.threads)
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("crfrnn: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"crfrnn: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the top level turns every failure into one line
        if debug:
            raise
        print(f"crfrnn: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
