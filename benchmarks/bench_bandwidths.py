"""CrfRnn forward + backward with learned bandwidths (``learn_bandwidths=True``) against the same layer without
them: 500x375, L=21, T=5, on several VOC sample images, the two alternating in one process (the order flips
every round), median time ratio and its spread; then the peak RSS (``VmHWM``) of each in a fresh process.
Targets (issue 11): time ratio <= 2.5, peak-memory ratio <= 1.5.

    python benchmarks/bench_bandwidths.py                      # 3 images x 3 rounds
    python benchmarks/bench_bandwidths.py --images 5 --rounds 5 --json benchmarks/results/bandwidths.json
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from crfrnn import CrfRnn
from crfrnn.bench import load_image, machine_info

VOC_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "images"
SIZE, LABELS, ITERATIONS = (375, 500), 21, 5

_MEMORY_SCRIPT = r"""
import json, sys, torch
from crfrnn import CrfRnn
from crfrnn.bench import load_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MB
path, h, w, L, T, learn = sys.argv[1], *map(int, sys.argv[2:7])
img = load_image(path or None, (h, w))
layer = CrfRnn(L, num_iterations=T, learn_bandwidths=bool(learn)).train()
unary = torch.randn(1, L, h, w, generator=torch.Generator().manual_seed(0), requires_grad=True)
small = CrfRnn(L, num_iterations=1, learn_bandwidths=bool(learn)).train()
small(unary[..., :16, :16], img[..., :16, :16]).sum().backward()  # load/compile the kernels first
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
layer(unary, img).square().mean().backward()
print(json.dumps({"rss_before_mb": base, "peak_rss_mb": status("VmHWM"), "extra_mb": status("VmHWM") - base}))
"""


def _layers():
    plain = CrfRnn(LABELS, num_iterations=ITERATIONS).train()
    learned = CrfRnn(LABELS, num_iterations=ITERATIONS, learn_bandwidths=True).train()
    learned.load_state_dict(plain.state_dict(), strict=False)
    return plain, learned


def _step(layer, unary, img) -> float:
    u = unary.clone().requires_grad_()
    t0 = time.perf_counter()
    layer(u, img).square().mean().backward()
    return time.perf_counter() - t0


def bench_time(paths, rounds: int):
    plain, learned = _layers()
    unary = torch.randn(1, LABELS, *SIZE, generator=torch.Generator().manual_seed(0))
    rows = []
    for path in paths:
        img = load_image(path, SIZE)
        for layer in (plain, learned):  # warm-up (compilation, allocator)
            _step(layer, unary, img)
        for r in range(rounds):
            order = (("plain", plain), ("learned", learned))
            times = dict((name, _step(layer, unary, img)) for name, layer in (order if r % 2 == 0 else order[::-1]))
            rows.append({"image": Path(path).name if path else "demo scene", "round": r,
                         "plain_s": times["plain"], "learned_s": times["learned"],
                         "ratio": times["learned"] / times["plain"]})
    ratios = [r["ratio"] for r in rows]
    return {
        "rows": rows,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "plain_median_s": statistics.median(r["plain_s"] for r in rows),
        "learned_median_s": statistics.median(r["learned_s"] for r in rows),
    }


def bench_memory(path):
    out = {}
    for name, learn in (("plain", 0), ("learned", 1)):
        argv = [sys.executable, "-c", _MEMORY_SCRIPT, path or "", *map(str, (*SIZE, LABELS, ITERATIONS, learn))]
        res = subprocess.run(argv, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    out["peak_ratio"] = out["learned"]["peak_rss_mb"] / out["plain"]["peak_rss_mb"]
    out["extra_ratio"] = out["learned"]["extra_mb"] / out["plain"]["extra_mb"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3, help="VOC sample images to time on (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per image (default 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here")
    args = p.parse_args(argv)
    paths = [str(q) for q in sorted(VOC_IMAGES.glob("*.jpg"))[: args.images]] or [None]
    timing = bench_time(paths, args.rounds)
    for r in timing["rows"]:
        print(f"{r['image']:>20s} round {r['round']}: plain {r['plain_s']:.2f} s, learned {r['learned_s']:.2f} s, "
              f"ratio {r['ratio']:.2f}")
    print(f"time ratio (learned / plain): median {timing['ratio_median']:.2f}, "
          f"range {timing['ratio_min']:.2f}-{timing['ratio_max']:.2f} (target <= 2.5)")
    memory = bench_memory(paths[0])
    plain, learned = memory["plain"], memory["learned"]
    print(f"peak RSS: plain {plain['peak_rss_mb']:.0f} MB, learned {learned['peak_rss_mb']:.0f} MB, "
          f"ratio {memory['peak_ratio']:.2f} (target <= 1.5); forward+backward extra over the loaded process: "
          f"{plain['extra_mb']:.0f} vs {learned['extra_mb']:.0f} MB, ratio {memory['extra_ratio']:.2f}")
    if args.json:
        from crfrnn.engine.runfiles import atomic_write

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        res = {"machine": machine_info(), "size": f"{SIZE[1]}x{SIZE[0]}", "labels": LABELS, "iterations": ITERATIONS,
               "time": timing, "memory": memory}
        atomic_write(path, lambda f: f.write(json.dumps(res, indent=2).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
