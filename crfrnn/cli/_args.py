"""argparse pieces shared by the subcommands: the help formatter, value types and the common flag groups."""
from __future__ import annotations

import argparse
import math


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; appends a flag's default when it is informative."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or action.option_strings == []:
            return text
        shown = "x".join(map(str, d)) if isinstance(d, tuple) else d
        return f"{text} (default: {shown})"


def parse_size(text: str) -> tuple[int, int]:
    """``N`` or ``HxW`` (also ``H,W``) -> (H, W)."""
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0], parts[1]


def number(cast, ok, what: str):
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


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
finite_float = number(float, math.isfinite, "a finite number")


def add_common(p: argparse.ArgumentParser, device: bool | None = True) -> None:
    """``--device``, ``--json``, ``--threads``, ``--quiet``: every command has them. ``device``: True for a command
    that runs a model, False for one that does not (the flag is accepted for uniformity), None for a command that
    makes its own ``--device``."""
    g = p.add_argument_group("output and device")
    if device:
        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    elif device is not None:
        g.add_argument("--device", default="auto", help="accepted for uniformity; this command runs no model")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON document instead of text")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch and the compiled lattice kernels (default: all cores; 1 is often "
                        "faster for small images or on a busy machine)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars (they are off anyway when stderr "
                                                              "is not a terminal)")


def add_weights_flags(p: argparse.ArgumentParser) -> None:
    """``--keras``, ``--convention``, ``--iterations`` of the commands that load a model (segment, eval)."""
    from crfrnn.models.checkpoints import CONVENTIONS

    p.add_argument("--keras", action="store_true", help="the weights are the Keras release (.h5; implied by the "
                                                        "suffix)")
    p.add_argument("--convention", choices=CONVENTIONS, default="auto",
                   help="sign convention of a plain state dict's compatibility matrix: auto = the published "
                        "crfasrnn_weights.pth (official port, negated on load); our checkpoints are never negated")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="mean-field iterations at inference (default: the model's, 10)")


def _crf_overrides(args) -> dict:
    """CrfRnn options set by ``--iterations`` (of :func:`add_weights_flags`)."""
    return {"num_test_iterations": args.iterations} if getattr(args, "iterations", None) is not None else {}


def load_weights(args):
    """``--weights`` (with ``--keras``, ``--convention``, ``--iterations``) -> (model, info); checks
    ``--num-classes`` against the checkpoint."""
    from crfrnn.models.checkpoints import load_model

    from ._common import UsageError

    model, info = load_model(args.weights, keras=args.keras, convention=args.convention, crf=_crf_overrides(args))
    L = info["num_classes"]
    if args.num_classes is not None and args.num_classes != L:
        raise UsageError(f"--num-classes is {args.num_classes} but the checkpoint {info['checkpoint']} predicts "
                         f"L = {L} classes")
    return model, info
