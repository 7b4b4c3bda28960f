"""``python -m experiments.fullres {run,reproduce,ship,report}`` (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from crfrnn.engine.runfiles import write_text

from .run import SHIPPED, log, run
from .settings import REPO, SEEDS, SETTINGS, smoke

RESULTS = REPO / "experiments" / "fullres" / "results"  # the committed copy of the result files
MODELS = REPO / "experiments" / "models"
_RESULT_FILES = ("results.json", "confusion.npz", "figures.npz")


def _settings(args):
    s = SETTINGS[args.dataset]
    s = smoke(s) if args.smoke else s
    return replace(s, root=Path(args.data)) if getattr(args, "data", None) else s


def cmd_run(args) -> int:
    run(_settings(args), args.seed, Path(args.run_dir))
    return 0


def _run_job(job: tuple[str, int], root: Path, smoke: bool, env: dict[str, str]) -> int:
    """One data set and seed in a process of its own (one thread), its output in ``root/<dataset>-seed<k>.log``."""
    ds, seed = job
    cmd = [sys.executable, "-m", "experiments.fullres", "run", "--dataset", ds, "--seed", str(seed),
           "--run-dir", str(root / ds / f"seed{seed}")] + (["--smoke"] if smoke else [])
    with open(root / f"{ds}-seed{seed}.log", "w", encoding="utf-8") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def cmd_reproduce(args) -> int:
    """Every data set and seed (``--workers`` processes of one thread each), then the copies and the report."""
    root = Path(args.runs)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--runs {root} exists and is not empty; choose a new folder")
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    jobs = [(ds, seed) for ds in args.datasets for seed in args.seeds]  # the long CamVid runs start first
    with ThreadPoolExecutor(args.workers) as pool:
        codes = list(pool.map(lambda job: _run_job(job, root, args.smoke, env), jobs))
    wall = time.perf_counter() - t0
    log(f"all runs finished in {wall / 60:.1f} min (exit codes {codes})")
    write_text(root / "wall_seconds.txt", f"{wall:.0f}\n")
    if any(codes):
        raise SystemExit("a run failed; see the logs in " + str(root))
    if not args.smoke:
        copy_results(root, RESULTS)
        ship(root, MODELS)
    from .report import main as report_main  # noqa: PLC0415

    report_main(["--runs", str(RESULTS if not args.smoke else root), "--output", args.output, "--figures",
                 args.figures])
    return 0


def copy_results(root: Path, dest: Path) -> None:
    """The result files of every run (not the checkpoints) into ``dest`` (committed with the report)."""
    for res in sorted(root.glob("*/seed*/results.json")):
        out = dest / res.parent.parent.name / res.parent.name
        out.mkdir(parents=True, exist_ok=True)
        for name in _RESULT_FILES:
            shutil.copyfile(res.parent / name, out / name)
    shutil.copyfile(root / "wall_seconds.txt", dest / "wall_seconds.txt")


def ship(root: Path, dest: Path, seed: int = 0) -> None:
    """Seed ``seed``'s models of the shipped arms into ``dest/<dataset>/`` (float16, self-describing)."""
    for ds in SETTINGS:
        src = root / ds / f"seed{seed}" / "models"
        if not src.is_dir():
            continue
        (dest / ds).mkdir(parents=True, exist_ok=True)
        for arm, name in SHIPPED.items():
            shutil.copyfile(src / f"{arm}.pt", dest / ds / name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.fullres", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one data set, one seed, every arm")
    r.add_argument("--dataset", choices=sorted(SETTINGS), required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--run-dir", required=True)
    r.add_argument("--data", default=None, help="data set root (default: ../shared/data/<dataset>)")
    r.add_argument("--smoke", action="store_true", help="a miniature: a few images and steps")
    r.set_defaults(func=cmd_run)
    a = sub.add_parser("reproduce", help="every data set and seed, then the shipped models and the report")
    a.add_argument("--runs", default=str(REPO / "runs" / "fullres"))
    a.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    a.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    a.add_argument("--workers", type=int, default=3, help="processes (one thread each)")
    a.add_argument("--output", default=str(REPO / "docs" / "experiments.md"))
    a.add_argument("--figures", default=str(REPO / "docs" / "figures" / "fullres"))
    a.add_argument("--smoke", action="store_true")
    a.set_defaults(func=cmd_reproduce)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
