"""``crfrnn show-compat``: the learned compatibility matrix of a checkpoint as a heat-map."""
from __future__ import annotations

from pathlib import Path

from ._args import add_common
from ._common import EXIT_OK, UsageError, check_outputs, check_png_suffix, class_names_for, emit_json, \
    read_names_file, say

NAME = "show-compat"
HELP = "heat-map of a learned compatibility matrix"
DESCRIPTION = ("Draw crfrnn.compatibility_matrix (the label compatibility mu, a penalty: this library's "
               "convention, logits = unary - mu @ messages) of a checkpoint as a labelled heat-map like "
               "Figure 5 of the paper. The published crfasrnn_weights.pth stores -mu; it is negated "
               "(see --convention).")
EPILOG = ("examples:\n"
          "  crfrnn show-compat runs/a -o compat.png\n"
          "  crfrnn show-compat crfasrnn_weights.pth -o compat_voc.png --json")


def add_arguments(c) -> None:
    c.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder, .pt checkpoint, state dict .pth or .h5")
    c.add_argument("-o", "--output", metavar="X.png", help="output picture (default STEM_compat.png)")
    c.add_argument("--classes", help="class names: a file (one per line) or a comma-separated list "
                                     "(default: VOC/CamVid names by L, or the run's)")
    c.add_argument("--convention", choices=("auto", "crfasrnn_pytorch", "crfrnn"), default="auto",
                   help="auto: plain state dicts are the official port's (negated), our checkpoints are not")
    c.add_argument("--iteration", type=int, default=0, help="untied models: which iteration's matrix")
    c.add_argument("--title", default=None, help="heading of the picture")
    add_common(c, device=False)


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


def _matrix(args, path: Path, sidecar: dict):
    """(matrix (L, L) float64, sign flipped?, sidecar) of the checkpoint file ``path``."""
    from ._models import _read_sidecar, _state_dict_of, _torch_load

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
    return m, flipped, sidecar


def run(args) -> int:
    from crfrnn import viz
    from ._models import _read_sidecar, _run_dir_checkpoint

    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = {}
    if path.is_dir():
        sidecar = _read_sidecar(path)
        path = _run_dir_checkpoint(path)
    out = Path(args.output) if args.output else Path(f"{path.stem}_compat.png")
    check_outputs([out], [path])
    check_png_suffix(out)
    m, flipped, sidecar = _matrix(args, path, sidecar)
    L = m.shape[0]
    names = None
    if args.classes:
        cp = Path(args.classes)
        names = read_names_file(cp) if cp.is_file() else [s.strip() for s in args.classes.split(",")]
        if len(names) != L:
            raise UsageError(f"--classes gives {len(names)} names but the matrix is {L} x {L}")
    names = class_names_for(L, names or sidecar.get("class_names"))
    title = args.title if args.title is not None else f"label compatibility ({path.name})"
    viz.save_image(viz.compat_heatmap(m, names, title=title), out)
    emit_json(args, {"checkpoint": str(path), "output": str(out), "class_names": names, "matrix": m.tolist(),
                     "sign_flipped": flipped})
    say(args, f"{L}x{L} compatibility matrix of {path}" + (" (sign flipped from the official port's)" if flipped
                                                            else "") + f" -> {out}")
    return EXIT_OK
