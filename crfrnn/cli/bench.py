"""``crfrnn bench``: speed measurements; every argument is passed on to :func:`crfrnn.bench.main`."""
from __future__ import annotations

from ._common import EXIT_OK, EXIT_USAGE

NAME = "bench"
HELP = "speed measurements (all arguments go to crfrnn.bench; see crfrnn bench --help)"


def run(argv: list[str]) -> int:
    """Unlike the other commands, ``run`` takes the raw arguments: crfrnn.bench parses its own."""
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
