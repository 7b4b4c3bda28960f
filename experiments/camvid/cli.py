"""The command line of the experiment (``python experiments/camvid_table1.py ...``)."""

from __future__ import annotations

import argparse

from . import __doc__ as _DOC
from .common import DEFAULT_DATA, REPO, log
from .report import report
from .run import eval_dir, run_experiment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=45.0, help="wall-clock budget of the whole run (one seed)")
    p.add_argument("--run-dir", default=None, help="run folder (must be new for a training run)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CamVid root with train/ and val/ (images/, masks/)")
    p.add_argument("--resolution", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    p.add_argument("--eval-dir", default=None, help="evaluate the arms of --run-dir on this folder (images/, masks/)")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true", help="tiny run: few images, tiny resolution, a handful of steps")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN", help="aggregate run folders / results.json")
    p.add_argument("-o", "--output", default=str(REPO / "docs" / "experiments.md"))
    p.add_argument("--picture", default=None, help="PNG of the learned compatibility (default next to --output)")
    p.add_argument("--no-picture", action="store_true")
    p.add_argument("--discussion", default=None, help="markdown file with the discussion paragraph to include")
    p.add_argument("--commands", nargs="*", default=None, help="extra command lines to list in the report")
    # model / optimisation
    p.add_argument("--widths", type=int, nargs=5, default=(16, 32, 64, 96, 128))
    p.add_argument("--fc", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--crf-lr", type=float, default=1e-3)
    p.add_argument("--crf-kernel-lr-mult", type=float, default=100.0)
    p.add_argument("--crf-compat-lr-mult", type=float, default=100.0)
    p.add_argument("--crf-batch-size", type=int, default=4)
    p.add_argument("--crf-crop", type=int, nargs=2, default=(80, 112), metavar=("H", "W"))
    p.add_argument("--min-finetune-s", type=float, default=20.0, help="least time for one fine-tuning arm")
    p.add_argument("--min-grid-images", type=int, default=6, help="least held-apart images in the grid search")
    # CRF grid (post-processing) and fixed CRF parameters
    p.add_argument("--grid-theta-alpha", type=float, nargs="+", default=(3.0, 6.0, 12.0))
    p.add_argument("--grid-theta-beta", type=float, nargs="+", default=(3.0, 6.0, 12.0))
    p.add_argument("--grid-bilateral-weight", type=float, nargs="+", default=(2.0, 4.0))
    p.add_argument("--theta-gamma", type=float, default=1.0)
    p.add_argument("--spatial-weight", type=float, default=1.0)
    # budget split
    p.add_argument("--fcn-fraction", type=float, default=0.35, help="share of the budget for training the FCN")
    p.add_argument("--grid-fraction", type=float, default=0.06, help="largest share of the budget for the grid")
    p.add_argument("--margin", type=float, default=0.05, help="share of the budget kept free for overheads")
    p.add_argument("--eval-safety", type=float, default=1.25, help="factor on the estimated evaluation time")
    p.add_argument("--hold-fraction", type=float, default=0.1)
    p.add_argument("--fcn-steps", type=int, default=None, help="fix the FCN steps (skip the budget plan)")
    p.add_argument("--crf-steps", type=int, default=None, help="fix the fine-tuning steps of every arm")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--cache-dir", default=str(REPO / "runs" / ".cache"),
                   help="where resized data are cached between runs ('' to disable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU two OpenMP threads are 10x+ slower)")
    p.add_argument("--numba-threads", type=int, default=1, help="lattice threads (1 is fastest on a busy 2-core box)")
    return p


def apply_smoke(args) -> None:
    args.resolution = (48, 64)
    args.crf_crop = (32, 48)
    args.max_train = args.max_train or 12
    args.max_val = args.max_val or 4
    args.hold_fraction = 0.25
    args.fcn_steps = args.fcn_steps or 4
    args.crf_steps = args.crf_steps or 2
    args.batch_size = 4
    args.crf_batch_size = 2
    args.grid_theta_alpha = (10.0, 30.0)
    args.grid_theta_beta = (13.0,)
    args.grid_bilateral_weight = (3.0,)
    args.budget_minutes = min(args.budget_minutes, 5.0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.widths = tuple(args.widths)
    if args.report:
        report(args)
        log(f"wrote {args.output}")
        return 0
    if not args.run_dir:
        raise SystemExit("--run-dir is required (except with --report)")
    if args.eval_dir:
        eval_dir(args)
        return 0
    if args.smoke:
        apply_smoke(args)
    args.resolution = tuple(args.resolution)
    args.crf_crop = tuple(args.crf_crop) if args.crf_crop else None
    run_experiment(args)
    return 0
