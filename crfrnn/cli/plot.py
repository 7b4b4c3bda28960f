"""``crfrnn plot``: training loss and validation mean IU of a run folder."""
from __future__ import annotations

from pathlib import Path

from ._args import add_common
from ._common import EXIT_OK, check_outputs, check_png_suffix, emit_json, say

NAME = "plot"
HELP = "training curves of a run folder"
DESCRIPTION = "Plot the training loss and the validation mean IU of a run folder's metrics.jsonl."
EPILOG = ("examples:\n  crfrnn plot runs/a                 # runs/a/curves.png\n"
          "  crfrnn plot runs/a -o a.png --json")


def add_arguments(pl) -> None:
    pl.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or its metrics.jsonl)")
    pl.add_argument("-o", "--output", metavar="OUT.png", help="output picture (default RUN_DIR/curves.png)")
    pl.add_argument("--title", default=None, help="heading (default: the run folder's name)")
    add_common(pl, device=False)


def run(args) -> int:
    from crfrnn import viz

    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    records = viz.read_metrics(metrics)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(args.output) if args.output else folder / "curves.png"
    check_outputs([out], [metrics])
    check_png_suffix(out)
    title = args.title if args.title is not None else folder.name
    viz.save_image(viz.training_curves(records, title=title), out)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [r for r in records if r.get("kind") == "val" and r.get("mean_iou") is not None]
    best = max(val, key=lambda r: r["mean_iou"]) if val else None
    emit_json(args, {"run_dir": str(run_dir), "output": str(out), "train_points": len(train),
                     "val_points": len(val), "last_loss": train[-1]["loss"] if train else None,
                     "best_mean_iou": best["mean_iou"] if best else None,
                     "best_step": best["step"] if best else None})
    say(args, f"{len(train)} loss and {len(val)} validation points"
              + (f" (best mean IU {100 * best['mean_iou']:.2f}% at step {best['step']})" if best else "")
              + f" -> {out}")
    return EXIT_OK
