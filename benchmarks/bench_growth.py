"""What 4x the pixels costs, with and without page faults: crfrnn.densecrf and pydensecrf2 (setup + 10
iterations, 1 thread) at 1000x750 and at 500x375 on the same VOC images, alternating in one process; run twice,
in fresh processes: with glibc's default allocator, which hands every freed block above 32 MB (and the heap's
top) back to the kernel, so that each call on a big image faults its working memory in again, and with the
freed memory kept (``crfrnn.cli._folder.keep_freed_memory``, what ``crfrnn refine DIR`` does in its workers).
Minor page faults per call are counted (``getrusage``).

    python benchmarks/bench_growth.py                 # README kernels, 3 images, 3 rounds
    python benchmarks/bench_growth.py --kernels voc
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {"big": (750, 1000), "small": (375, 500)}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(kernels: str, images: int, rounds: int, keep: bool) -> list[dict]:
    if keep:
        from crfrnn.cli._folder import keep_freed_memory

        keep_freed_memory()
    import numpy as np
    import pydensecrf.densecrf as peer

    from crfrnn import bench
    from crfrnn import densecrf as ours

    ks = bench.kernel_sets()[kernels]
    rows = []
    with bench.threads(1):
        for path in bench.voc_images(images):
            cases = {k: bench._case(path, size, 21) for k, size in SIZES.items()}
            fns = {(lib, k): (lambda m=mod, c=cases[k]: bench._densecrf(m, *c, ks, 10))
                   for lib, mod in (("crfrnn", ours), ("pydensecrf2", peer)) for k in SIZES}
            for f in fns.values():  # compile / load, first touches
                f()
            times = {key: [] for key in fns}
            faults = {key: [] for key in fns}
            for _ in range(rounds):
                for key, f in fns.items():
                    before, t0 = _faults(), time.perf_counter()
                    f()
                    times[key].append(time.perf_counter() - t0)
                    faults[key].append(_faults() - before)
            row = {"image": path.stem, "kept_freed_memory": keep}
            for lib in ("crfrnn", "pydensecrf2"):
                big, small = np.array(times[(lib, "big")]), np.array(times[(lib, "small")])
                row[lib] = {"big_ms": 1000 * float(np.median(big)), "small_ms": 1000 * float(np.median(small)),
                            "growth": float(np.median(big / small)),
                            "faults_big": int(np.median(faults[(lib, "big")])),
                            "faults_small": int(np.median(faults[(lib, "small")]))}
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", choices=("readme", "voc"), default="readme")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_child", choices=("default", "keep"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        print(json.dumps(child(a.kernels, a.images, a.rounds, a._child == "keep")))
        return 0
    print(f"{a.kernels} kernels, L=21, T=10, 1 thread: cost of 1000x750 over 500x375 (median of per-round ratios); "
          f"minor page faults per call at 1000x750 / 500x375")
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, "--kernels", a.kernels, "--images", str(a.images),
                              "--rounds", str(a.rounds), "--_child", mode], capture_output=True, text=True, check=True)
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            c, p = r["crfrnn"], r["pydensecrf2"]
            print(f"{mode:8s} {r['image']}  crfrnn {c['growth']:.2f}x ({c['big_ms']:.0f}/{c['small_ms']:.0f} ms, faults "
                  f"{c['faults_big']}/{c['faults_small']})   pydensecrf2 {p['growth']:.2f}x ({p['big_ms']:.0f}/"
                  f"{p['small_ms']:.0f} ms, faults {p['faults_big']}/{p['faults_small']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
