"""Folder throughput: ``crfrnn refine DIR --workers N`` against pydensecrf2 run in N processes (a spawn pool,
one thread each) on the same images, probabilities, kernels and iterations. Both sides run as fresh
subprocesses and are timed end to end (start-up, reading the image and the .npy, the CRF, writing the PNG),
after one untimed crfrnn run that fills Numba's cache, alternating, on the VOC sample
(``../shared/data/voc2012-sample``: images/ + masks/). Probabilities are made once from the masks (one-hot,
box-smoothed, noise, softmax; float32 .npy) in a work folder.

    python benchmarks/bench_folders.py                      # 200 images, 2 processes, T=10, VOC + README kernels
    python benchmarks/bench_folders.py --limit 20 --rounds 1 # a quick look

Prints a table; writes JSON to benchmarks/results/folders.json (``--json``). The ratio is crfrnn's images/s
over pydensecrf2's (higher is better for crfrnn), the CPU-time ratio the same from the CPU seconds of all the
processes (robust to other load on the machine); the MAP labels of both are compared pixel by pixel.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VOC = ROOT.parent / "shared" / "data" / "voc2012-sample"
L = 21
#: (sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral)
KERNELS = {
    "voc": (3.0, 3.0, 160.0, 3.0, 5.0),  # CRF-RNN VOC: theta_gamma 3 (w 3), theta_alpha 160, theta_beta 3 (w 5)
    "readme": (3.0, 3.0, 80.0, 13.0, 10.0),  # pydensecrf's README
}
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}


# ------------------------------------------------------------------------------------------------- inputs
def make_inputs(work: Path, limit: int) -> tuple[Path, Path]:
    """work/images (links to the VOC photos) and work/probs (float32 (L, H, W) .npy made from the masks)."""
    import numpy as np
    import torch
    from PIL import Image

    images, probs = work / "images", work / "probs"
    stems = sorted(p.stem for p in (VOC / "images").glob("*.jpg"))[:limit]
    if not stems:
        sys.exit(f"no VOC sample at {VOC}")
    done = images.is_dir() and sorted(p.stem for p in images.iterdir()) == stems and \
        sorted(p.stem for p in probs.glob("*.npy")) == stems
    if done:
        return images, probs
    shutil.rmtree(work, ignore_errors=True)
    images.mkdir(parents=True)
    probs.mkdir()
    for k, stem in enumerate(stems):
        os.symlink(VOC / "images" / f"{stem}.jpg", images / f"{stem}.jpg")
        mask = torch.from_numpy(np.array(Image.open(VOC / "masks" / f"{stem}.png")).astype(np.int64))
        onehot = torch.full((L, *mask.shape), 1.0 / L)  # void (255): uniform
        valid = mask < L
        onehot[:, valid] = torch.nn.functional.one_hot(mask[valid], L).T.float()
        smooth = torch.nn.functional.avg_pool2d(onehot[None], 15, stride=1, padding=7, count_include_pad=False)[0]
        g = torch.Generator().manual_seed(k)
        logits = torch.log(0.8 * smooth + 0.2 / L) + 0.7 * torch.randn(smooth.shape, generator=g)
        np.save(probs / f"{stem}.npy", torch.softmax(logits, 0).numpy().astype(np.float32))
    return images, probs


# ------------------------------------------------------------------------------------- the pydensecrf side
def _pyd_init() -> None:
    os.environ.update(THREAD_ENV)


def _pyd_one(job) -> float:
    """One image with pydensecrf2 (the usual recipe), PNG written; -> seconds in the CRF."""
    import numpy as np
    import pydensecrf.densecrf as dcrf
    from PIL import Image
    from pydensecrf.utils import unary_from_softmax

    img_path, npy_path, out_path, kernels, iterations = job
    sg, cg, sb, srgb, cb = kernels
    with Image.open(img_path) as im:
        rgb = np.ascontiguousarray(np.array(im.convert("RGB")))
    p = np.load(npy_path)
    n, h, w = p.shape
    t0 = time.perf_counter()
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p)))
    d.addPairwiseGaussian(sxy=sg, compat=cg)
    d.addPairwiseBilateral(sxy=sb, srgb=srgb, rgbim=rgb, compat=cb)
    labels = np.argmax(d.inference(iterations), axis=0).reshape(h, w).astype(np.uint8)
    seconds = time.perf_counter() - t0
    Image.fromarray(labels).save(out_path)
    return seconds


def pydensecrf_run(images: Path, probs: Path, out: Path, workers: int, kernels, iterations: int) -> None:
    import multiprocessing

    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(probs / f"{p.stem}.npy"), str(out / f"{p.stem}.png"), kernels, iterations)
            for p in sorted(images.iterdir())]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_pyd_init) as pool:
        list(pool.imap(_pyd_one, jobs, chunksize=1))


# ------------------------------------------------------------------------------------------------ timing
def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its processes): the CPU time is the fairer number on a
    machine shared with other work, the wall time is what a user waits on a quiet one."""
    import resource

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **THREAD_ENV)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def agreement(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    same = total = 0
    for p in sorted(a.glob("*.png")):
        x, y = np.array(Image.open(p)), np.array(Image.open(b / p.name))
        same += int((x == y).sum())
        total += x.size
    return same / total


def warm_up(images: Path, probs: Path, work: Path) -> None:
    """One untimed crfrnn run on one image, so that the compiled kernels are in Numba's cache before the timed
    runs (a cold cache costs each worker about a minute of compiling; pydensecrf2 has nothing to compile)."""
    first = sorted(images.iterdir())[0]
    one = work / "warm_up"
    shutil.rmtree(one, ignore_errors=True)
    (one / "images").mkdir(parents=True)
    (one / "probs").mkdir()
    os.symlink(first.resolve(), one / "images" / first.name)
    os.symlink((probs / f"{first.stem}.npy").resolve(), one / "probs" / f"{first.stem}.npy")
    timed(crfrnn_cmd(one / "images", one / "probs", one / "out", 1, KERNELS["voc"], 1))
    shutil.rmtree(one)


def crfrnn_cmd(images, probs, out, workers, kernels, iterations) -> list[str]:
    sg, cg, sb, srgb, cb = kernels
    return [sys.executable, "-m", "crfrnn", "refine", str(images), "--probs", str(probs), "-o", str(out),
            "--workers", str(workers), "--threads", "1", "--device", "cpu", "--iterations", str(iterations),
            "--sxy-gaussian", str(sg), "--compat-gaussian", str(cg), "--sxy-bilateral", str(sb), "--srgb", str(srgb),
            "--compat-bilateral", str(cb), "--quiet", "--json"]


def pyd_cmd(images, probs, out, workers, kernels, iterations) -> list[str]:
    return [sys.executable, __file__, "--_pydensecrf", json.dumps([str(images), str(probs), str(out), workers,
                                                                   list(kernels), iterations])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="processes on each side")
    ap.add_argument("--limit", type=int, default=200, help="the first N images of the VOC sample")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["voc", "readme"])
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (crfrnn first in odd rounds)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/crfrnn_bench_folders"),
                    help="folder for the inputs (made once, reused) and outputs")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "folders.json")
    ap.add_argument("--_pydensecrf", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._pydensecrf:
        images, probs, out, workers, kernels, iterations = json.loads(a._pydensecrf)
        pydensecrf_run(Path(images), Path(probs), Path(out), workers, tuple(kernels), iterations)
        return 0
    images, probs = make_inputs(a.work, a.limit)
    n = len(list(images.iterdir()))
    warm_up(images, probs, a.work)
    rows = []
    print(f"{n} VOC images, {a.workers} processes x 1 thread, T={a.iterations}, L={L}; wall time of the whole "
          f"command (start-up included)")
    for name in a.kernels:
        k = KERNELS[name]
        times = {"crfrnn": [], "pydensecrf2": []}
        cpu = {"crfrnn": [], "pydensecrf2": []}
        for r in range(a.rounds):
            order = ("crfrnn", "pydensecrf2") if r % 2 == 0 else ("pydensecrf2", "crfrnn")
            for side in order:
                out = a.work / f"out_{side}_{name}"
                shutil.rmtree(out, ignore_errors=True)
                make = crfrnn_cmd if side == "crfrnn" else pyd_cmd
                seconds, cpu_seconds = timed(make(images, probs, out, a.workers, k, a.iterations))
                times[side].append(seconds)
                cpu[side].append(cpu_seconds)
        best = {s: min(t) for s, t in times.items()}
        row = {"kernels": name, "sxy_gaussian": k[0], "compat_gaussian": k[1], "sxy_bilateral": k[2], "srgb": k[3],
               "compat_bilateral": k[4], "images": n, "workers": a.workers, "iterations": a.iterations,
               "seconds": times, "cpu_seconds": cpu, "images_per_second": {s: n / t for s, t in best.items()},
               "throughput_ratio": best["pydensecrf2"] / best["crfrnn"],
               "cpu_ratio": min(cpu["pydensecrf2"]) / min(cpu["crfrnn"]),
               "label_agreement": agreement(a.work / f"out_crfrnn_{name}", a.work / f"out_pydensecrf2_{name}")}
        rows.append(row)
        ips = row["images_per_second"]
        print(f"{name:7s} crfrnn {ips['crfrnn']:6.2f} img/s   pydensecrf2 {ips['pydensecrf2']:6.2f} img/s   "
              f"ratio {row['throughput_ratio']:.2f}x (CPU time {row['cpu_ratio']:.2f}x)   "
              f"labels agree {100 * row['label_agreement']:.2f} %   "
              f"(best of {a.rounds}; all: crfrnn {['%.1f' % t for t in times['crfrnn']]} s, "
              f"pydensecrf2 {['%.1f' % t for t in times['pydensecrf2']]} s)", flush=True)
    from crfrnn.engine.runfiles import write_text

    a.json.parent.mkdir(parents=True, exist_ok=True)
    write_text(a.json, json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
