"""Accuracy of ``geometry_grad="fine"`` for one setting of the fine lattice: dL/dθ of the bilateral kernel
(θα 40, θβ 10) on 60x80 VOC crops against autograd of the exact dense filter, over random losses, as
``tests/test_bandwidths.py`` measures it (its data and losses are reused), split into the θα and θβ parts.

    python benchmarks/fine_accuracy.py                               # the library's setting, the test's crops
    python benchmarks/fine_accuracy.py --rounds 5 --scale 2 --rings 4 # the first fine mode
    python benchmarks/fine_accuracy.py --start 10                     # crops of sample images no test uses
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_bandwidths as tb  # noqa: E402  (the accuracy test's crops, losses and agreement measures)

from crfrnn.lattice import permutohedral  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=permutohedral._FINE_ROUNDS)
    ap.add_argument("--scale", type=float, default=None, help="default: sqrt(3 rounds / 4 + 1 / 4)")
    ap.add_argument("--rings", type=int, default=permutohedral._FINE_RINGS)
    ap.add_argument("--start", type=int, default=0, help="first VOC sample image (sorted); the test uses 0")
    ap.add_argument("--losses", type=int, default=20)
    a = ap.parse_args()
    permutohedral._FINE_ROUNDS, permutohedral._FINE_RINGS = a.rounds, a.rings
    permutohedral._FINE_SCALE = a.scale if a.scale is not None else (3 * a.rounds / 4 + 1 / 4) ** 0.5
    imgs = tb.scenes("voc", 3, 60, 80, start=a.start)
    gen = torch.Generator().manual_seed(7)
    exact, approx = [], []
    t0 = time.perf_counter()
    for i in range(a.losses):
        img, lab = imgs[i % len(imgs)]
        e, lat = tb._theta_gradients(img, lab, "bilateral", (40.0, 10.0), 4, gen, ["torch"], "fine")
        exact.append(e[0])
        approx.append(lat["torch"][0])
    E, A = torch.stack(exact), torch.stack(approx)
    print(f"rounds {a.rounds}, scale {permutohedral._FINE_SCALE:.3f}, rings {a.rings}, images from {a.start}, "
          f"{a.losses} losses, {time.perf_counter() - t0:.0f} s")
    print("all: cosine %.4f, relative L2 %.3f, signs %.2f" % tb.agreement(E, A))
    for k, name in enumerate(["theta_alpha", "theta_beta"]):
        e, x = E[:, k], A[:, k]
        print(f"{name}: projection ratio {float(x @ e / (e @ e)):.3f}, "
              "cosine %.4f, relative L2 %.3f, signs %.2f" % tb.agreement(e, x))


if __name__ == "__main__":
    main()
