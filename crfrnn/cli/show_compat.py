"""``crfrnn show-compat``: the learned compatibility matrix of a checkpoint as a heat-map."""
from __future__ import annotations

from pathlib import Path

from crfrnn.models.checkpoints import CONVENTIONS

from ._args import add_common
from ._common import (
    EXIT_OK,
    UsageError,
    check_outputs,
    check_png_suffix,
    class_names_for,
    emit_json,
    read_names_file,
    say,
)

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
    c.add_argument("--convention", choices=CONVENTIONS, default="auto",
                   help="auto: plain state dicts are the official port's (negated), our checkpoints are not")
    c.add_argument("--iteration", type=int, default=0, help="untied models: which iteration's matrix")
    c.add_argument("--title", default=None, help="heading of the picture")
    add_common(c, device=False)


def _matrix(args, path: Path):
    """(matrix (L, L) float64 in this library's convention, sign flipped?, sidecar) of ``--checkpoint``."""
    from crfrnn.models.checkpoints import read_compatibility

    m, info = read_compatibility(path, convention=args.convention)
    if m.dim() == 3:  # untied: one matrix per iteration
        if not -m.shape[0] <= args.iteration < m.shape[0]:
            raise UsageError(f"--iteration {args.iteration} is out of range: {info['checkpoint']} has {m.shape[0]} "
                             f"matrices")
        m = m[args.iteration]
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise UsageError(f"the compatibility matrix in {info['checkpoint']} has shape {tuple(m.shape)}, expected "
                         f"(L, L)")
    return m, info["sign_flipped"], info["sidecar"]


def run(args) -> int:
    from crfrnn import viz
    from crfrnn.models.checkpoints import run_checkpoint

    given = Path(args.checkpoint)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint {given} does not exist")
    path = run_checkpoint(given) if given.is_dir() else given
    out = Path(args.output) if args.output else Path(f"{path.stem}_compat.png")
    check_outputs([out], [path])
    check_png_suffix(out)
    m, flipped, sidecar = _matrix(args, given)
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
