"""What the CrfRnn layer's workspace saves a training step: forward + backward (VOC kernels, 500x375, L=21,
T=5) with the layer's :class:`crfrnn.lattice.Workspace` (the history of the marginals reused across steps)
and without it (a fresh history each step, as before session 25), alternating in one process with glibc's
default allocator. Per image: median wall, user and system CPU ms of a step over the rounds after the first.

    python benchmarks/bench_layer_workspace.py --threads 1
"""
from __future__ import annotations

import argparse
import resource
import sys
import time


def _cpu_ms():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return 1000 * ru.ru_utime, 1000 * ru.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from crfrnn import CrfRnn, bench
    from crfrnn.lattice import Workspace

    print(f"CrfRnn forward + backward, VOC kernels, 500x375, L=21, T=5, {a.threads} thread(s); median ms a step "
          f"(wall, user, system) over {a.rounds - 1} rounds, with and without the workspace, alternating")
    with bench.threads(a.threads):
        for path in bench.voc_images(a.images):
            rgb, unary = bench._case(path, (375, 500), 21)
            image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None].contiguous()
            logits = torch.from_numpy(-unary).reshape(1, 21, 375, 500)
            layer, held = CrfRnn(21, num_iterations=5).train(), Workspace()
            steps = {"workspace": [], "none": []}
            for r in range(a.rounds):
                for mode, times in steps.items():
                    layer._workspace = held if mode == "workspace" else None
                    u0, s0 = _cpu_ms()
                    t0 = time.perf_counter()
                    layer(logits.clone().requires_grad_(), image).square().mean().backward()
                    wall = 1000 * (time.perf_counter() - t0)
                    u1, s1 = _cpu_ms()
                    if r:  # the first round compiles and faults in
                        times.append((wall, u1 - u0, s1 - s0))
            med = {m: np.median(np.array(t), axis=0) for m, t in steps.items()}
            print(f"{path.stem}  " + "   ".join(f"{m}: {w:.0f} ms (user {u:.0f}, sys {s:.0f})"
                                                for m, (w, u, s) in med.items())
                  + f"   ratio {med['workspace'][0] / med['none'][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
