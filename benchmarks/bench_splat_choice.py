"""The evidence for the fused pass's choice of splat (``crfrnn.lattice.fused.splat_by_ranges``): one pairwise term
splatted by vertex ranges and by scatter into private copies, alternating in one process, whole ``DenseCRF2D``
inference (10 iterations) on VOC images, with the rows per pixel that the scatter's private copies would hold
(``crfrnn.lattice.fused.private_rows``, what the rule compares with 0.1) and the term's lattice vertices per pixel.
``--rule``: instead, the rule against session 20's (ranged from 0.25 vertices per pixel), setup + inference, on the
images where the two differ, at the size where they differ.

    python benchmarks/bench_splat_choice.py --images 5-39 --term 1                # the bilateral term, VOC kernels
    python benchmarks/bench_splat_choice.py --images 5-39 --term 0                # the spatial term
    python benchmarks/bench_splat_choice.py --images 5-39 --term 1 --kernels readme
    python benchmarks/bench_splat_choice.py --images 40-88 --rule                 # the held-out check

Images are indices into ``crfrnn.bench.voc_images`` (0-4 are the speed benchmarks'; keep choices off them).
"""
from __future__ import annotations

import argparse
import time

SIZES = ((375, 500), (750, 1000))


def _indices(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="5-39", help="indices into crfrnn.bench.voc_images, e.g. 5-39 or 10,17,24")
    ap.add_argument("--kernels", choices=("voc", "readme"), default="voc")
    ap.add_argument("--term", type=int, default=1, help="the term forced each way: 0 spatial, 1 bilateral")
    ap.add_argument("--rule", action="store_true", help="the rule against ranged-from-0.25-vertices-per-pixel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)

    import numpy as np

    from crfrnn import bench
    from crfrnn import densecrf as ours
    from crfrnn.lattice import fused

    rule = fused.splat_by_ranges
    ks = bench.kernel_sets()[a.kernels]
    paths = bench.voc_images(max(_indices(a.images)) + 1)
    forced = {"choice": None}

    def choose(stacked, n):
        chosen = rule(stacked, n)
        if forced["choice"] is not None:
            chosen = chosen.copy()
            chosen[a.term] = forced["choice"]
        return chosen

    def by_vertices(stacked, n):
        return np.asarray(stacked[7]) >= 0.25 * n

    print(f"{a.kernels} kernels, L=21, T=10, {a.threads} thread(s), median of {a.rounds} alternating rounds; "
          + ("rule / vertex-count rule, setup + inference" if a.rule else f"term {a.term}: ranged / scattered"))
    with bench.threads(a.threads):
        for i in _indices(a.images):
            if i >= len(paths):
                break
            for size in SIZES:
                rgb, unary = bench._case(paths[i], size, 21)
                n = size[0] * size[1]
                d = bench._densecrf_setup(ours, rgb, unary, ks)
                stacked = d._fused_terms()
                rows = fused.private_rows(stacked, n)
                if a.rule:
                    if np.array_equal(rule(stacked, n), by_vertices(stacked, n)):
                        continue
                    variants = {"rule": rule, "vertex count": by_vertices}
                    run = lambda: bench._densecrf_setup(ours, rgb, unary, ks).inference(10)  # noqa: E731
                else:
                    variants = {"ranged": True, "scattered": False}
                    run = lambda: d.inference(10)  # noqa: E731
                times = {k: [] for k in variants}
                for r in range(a.rounds + 1):
                    for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                        if a.rule:
                            fused.splat_by_ranges = variants[k]
                        else:
                            fused.splat_by_ranges, forced["choice"] = choose, variants[k]
                        t0 = time.perf_counter()
                        run()
                        if r:
                            times[k].append(time.perf_counter() - t0)
                        fused.splat_by_ranges, forced["choice"] = rule, None
                first, second = (np.array(v) for v in times.values())
                print(f"{paths[i].stem} {size[1]}x{size[0]}: vertices/px {stacked[7][a.term] / n:.3f}, private rows/px "
                      f"{rows[a.term] / n:.3f}; {' / '.join(variants)} {np.median(first / second):.2f} "
                      f"({1000 * np.median(first):.0f} / {1000 * np.median(second):.0f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
