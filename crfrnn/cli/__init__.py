"""The ``crfrnn`` command line (``crfrnn ...`` or ``python -m crfrnn ...``).

Thin: every subcommand parses its flags, checks the user's files, calls library functions and writes its
results atomically. One module per subcommand, each with ``NAME``, ``HELP``, ``DESCRIPTION``, ``EPILOG``,
``add_arguments(parser)`` and ``run(args)``::

    demo          built-in demo: a coarse FCN-like prediction refined by the dense CRF (or --data DIR)
    refine        dense-CRF post-processing of probabilities (.npy) or a label map (PNG), pydensecrf-style
    segment       run a trained CRF-RNN / FCN-8s checkpoint on images: palette PNGs and overlays
    train         train FCN-8s / CRF-RNN (flags or a JSON --config); torchrun-able
    eval          mean IU, pixel accuracy and the per-class IU table of a checkpoint on a data set
    show-compat   the learned compatibility matrix of a checkpoint as a heat-map
    plot          training loss and validation mean IU of a run folder
    bench         speed measurements (forwards to crfrnn.bench)

Exit status: 0 success, 2 a usage or user error (bad flag, missing or mismatched file, an output that would
overwrite an input), 1 any other failure, 130 interrupted (SIGINT, Ctrl-C: ``crfrnn: interrupted``). Errors, usage
errors included, are one line on stderr, ``crfrnn: error: ...``; set ``CRFRNN_DEBUG=1`` for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Sequence

from . import bench
from ._args import Formatter
from ._common import EXIT_OK, EXIT_USAGE, UsageError, guarded, set_threads

__all__ = ["main", "build_parser", "UsageError"]

#: The subcommands' modules in the order of ``crfrnn --help`` (bench, which parses its own arguments, comes
#: last); a command's name is its module's ``NAME`` (``show-compat`` for ``show_compat``).
COMMANDS = ("demo", "refine", "segment", "train", "eval", "show_compat", "plot")


def _command(module: str):
    return importlib.import_module(f".{module}", __name__)


def _modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The subcommand modules a parser for ``argv`` needs: only the named command's when ``argv`` starts with
    one (a command imports what it uses when it runs: ``crfrnn refine DIR --workers N`` hands out the images
    without importing torch), else all (``crfrnn --help``, a usage error)."""
    module = argv[0].replace("-", "_") if argv else ""
    if module in COMMANDS and _command(module).NAME == argv[0]:
        return (module,)
    return COMMANDS


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``crfrnn: error: ...``, exit status 2), as every other
    error of the command; the usage is in ``--help``."""

    def error(self, message: str):
        where = self.prog.removeprefix("crfrnn").strip()
        hint = f"crfrnn {where} --help" if where else "crfrnn --help"
        self.exit(EXIT_USAGE, f"crfrnn: error: {where + ': ' if where else ''}{' '.join(message.split())} "
                              f"(see '{hint}')\n")


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of ``crfrnn``: one subparser per module of ``commands`` (default :data:`COMMANDS`), plus
    ``bench``."""
    from crfrnn import __version__

    p = _Parser(
        prog="crfrnn", formatter_class=Formatter,
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
               "input error, 1 other failure, 130 interrupted (Ctrl-C).",
    )
    p.add_argument("--version", action="version", version=f"crfrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in map(_command, commands):
        sp = sub.add_parser(command.NAME, formatter_class=Formatter, help=command.HELP,
                            description=command.DESCRIPTION, epilog=command.EPILOG)
        command.add_arguments(sp)
        sp.set_defaults(func=command.run)
    sub.add_parser(bench.NAME, help=bench.HELP, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 usage/input error, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()

    def body() -> int:
        if argv and argv[0] == bench.NAME:
            return bench.run(argv[1:])
        try:
            args = build_parser(_modules_for(argv)).parse_args(argv)
        except SystemExit as e:  # --help / --version (0) or a usage error (2), already printed by argparse
            return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
        args._t0 = t0
        if getattr(args, "threads", None):
            set_threads(args.threads)
        return int(args.func(args) or EXIT_OK)

    return guarded(body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
