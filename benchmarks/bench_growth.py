"""What 4x the pixels costs, with and without page faults: crfrnn.densecrf and pydensecrf2 (setup + 10
iterations, 1 thread) at 1000x750 and at 500x375 on the same VOC images, alternating in one process; run three
times, in fresh processes:

* ``default``: glibc's default allocator, which hands every freed block above 32 MB (and the heap's top) back to
  the kernel, so that each call on a big image faults its working memory in again, except the arrays crfrnn's
  block cache recycles (``crfrnn/lattice/_memory.py``);
* ``released``: the same, with crfrnn's block cache emptied after each of its calls
  (``crfrnn.lattice.release_cached_memory``, inside the timed call): every array fresh, as before session 31;
* ``keep``: the freed memory kept (``crfrnn.cli._common.keep_freed_memory``, what ``crfrnn refine DIR`` does in
  its workers).

Per call: minor page faults, user and system CPU time (``getrusage``) and transparent huge pages faulted in
(``thp_fault_alloc`` of ``/proc/vmstat``: counted for the whole machine, so run it on a quiet one). The growth
of the user CPU time alone is the computation's; the system time is the kernel's, faulting memory in.

A third row, ``memory``, is a control with no CRF in it: the memory that any call made the pydensecrf way
(one object per image, ``np.argmax(np.array(d.inference(10)), 0)``) must allocate whatever the implementation, made
and written as crfrnn makes it: the object's own copy of the unary (its rows, ``label_rows``), the output ``Q``
written once (both from the block cache, emptied after the control too in ``released``), and the caller's copy of
it and its arg max. ``crfrnn less memory`` is crfrnn's growth with the control's time taken off both sizes, per
round: what the rest of the call (lattices, mean field) costs.

    python benchmarks/bench_growth.py                 # README kernels, 3 images, 3 rounds
    python benchmarks/bench_growth.py --kernels voc --json benchmarks/results/growth-voc-1.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {"big": (750, 1000), "small": (375, 500)}
LIBS = ("crfrnn", "pydensecrf2", "memory")


def _huge_page_faults() -> int:
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("thp_fault_alloc "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _counters() -> dict:
    """Minor faults, user and system CPU ms, huge pages faulted in (machine-wide), wall ms: now."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"faults": ru.ru_minflt, "user_ms": 1000 * ru.ru_utime, "sys_ms": 1000 * ru.ru_stime,
            "huge_pages": _huge_page_faults(), "ms": 1000 * time.perf_counter()}


MODES = ("default", "released", "keep")


def child(kernels: str, images: int, rounds: int, mode: str) -> list[dict]:
    if mode == "keep":
        from crfrnn.cli._common import keep_freed_memory

        keep_freed_memory()
    import numpy as np
    import pydensecrf.densecrf as peer

    from crfrnn import bench
    from crfrnn import densecrf as ours
    from crfrnn.lattice import _memory, release_cached_memory
    from crfrnn.lattice.fused import label_rows

    def memory(rgb, unary):  # the control: the fresh memory of a call, no CRF (module docstring)
        rows = label_rows(unary, negate=True)
        out = _memory.cached_empty((unary.shape[1], unary.shape[0]))
        out.fill(1.0 / unary.shape[0])
        return np.argmax(np.array(out.T), 0), rows

    ks = bench.kernel_sets()[kernels]
    rows = []
    with bench.threads(1):
        for path in bench.voc_images(images):
            cases = {k: bench._case(path, size, 21) for k, size in SIZES.items()}
            fns = {(lib, k): (lambda m=mod, c=cases[k]: bench._densecrf(m, *c, ks, 10))
                   for lib, mod in (("crfrnn", ours), ("pydensecrf2", peer)) for k in SIZES}
            fns.update({("memory", k): (lambda c=cases[k]: memory(*c)) for k in SIZES})
            if mode == "released":
                fns = {key: (f if key[0] == "pydensecrf2" else lambda f=f: (f(), release_cached_memory()))
                       for key, f in fns.items()}
            for f in fns.values():  # compile / load, first touches
                f()
            calls = {key: [] for key in fns}  # per round: the counters' increase over the call
            for _ in range(rounds):
                for key, f in fns.items():
                    before = _counters()
                    f()
                    after = _counters()
                    calls[key].append({k: after[k] - before[k] for k in after})
            row = {"image": path.stem, "mode": mode}
            per = {key: {k: np.array([c[k] for c in v]) for k in v[0]} for key, v in calls.items()}  # per round
            for lib in LIBS:
                big, small = per[(lib, "big")], per[(lib, "small")]
                row[lib] = {"big_ms": float(np.median(big["ms"])), "small_ms": float(np.median(small["ms"])),
                            "growth": float(np.median(big["ms"] / small["ms"])),
                            "user_growth": float(np.median(big["user_ms"] / np.maximum(small["user_ms"], 1e-3))),
                            **{f"{k}_{size}": float(np.median(v[k])) for size, v in (("big", big), ("small", small))
                               for k in ("faults", "user_ms", "sys_ms", "huge_pages")}}
            ms = {key: v["ms"] for key, v in per.items()}
            row["crfrnn"]["growth_less_memory"] = float(np.median(
                (ms[("crfrnn", "big")] - ms[("memory", "big")]) / (ms[("crfrnn", "small")] - ms[("memory", "small")])))
            rows.append(row)
    return rows


def _describe(lib: str, c: dict) -> str:
    less = f" (less memory {c['growth_less_memory']:.2f}x)" if "growth_less_memory" in c else ""
    return (f"{lib} {c['growth']:.2f}x{less}, user {c['user_growth']:.2f}x ({c['big_ms']:.0f}/{c['small_ms']:.0f} ms; sys "
            f"{c['sys_ms_big']:.0f}/{c['sys_ms_small']:.0f} ms, faults {c['faults_big']:.0f}/{c['faults_small']:.0f}, "
            f"huge {c['huge_pages_big']:.0f}/{c['huge_pages_small']:.0f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", choices=("readme", "voc"), default="readme")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write every row (both modes) to this file")
    ap.add_argument("--_child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        print(json.dumps(child(a.kernels, a.images, a.rounds, a._child)))
        return 0
    print(f"{a.kernels} kernels, L=21, T=10, 1 thread: cost of 1000x750 over 500x375 (median of per-round ratios: "
          f"wall time; user CPU time alone), and per call at 1000x750 / 500x375: system CPU ms, minor page faults, "
          f"huge pages faulted in")
    results = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--kernels", a.kernels, "--images", str(a.images),
                              "--rounds", str(a.rounds), "--_child", mode], capture_output=True, text=True, check=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        results += rows
        for r in rows:
            print(f"{mode:8s} {r['image']}  " + "   ".join(_describe(lib, r[lib]) for lib in LIBS),
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kernels": a.kernels, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
