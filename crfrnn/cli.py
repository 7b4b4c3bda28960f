"""The ``crfrnn`` command line. Thin: every subcommand calls library functions."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _demo_image(h: int = 375, w: int = 500):
    """A deterministic built-in RGB scene (B=1, 3, H, W), 0..255: shaded discs and bars on a gradient."""
    import torch

    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img = torch.stack([x / w * 120 + 40, y / h * 120 + 40, torch.full_like(x, 90.0)])
    for cy, cx, r, col in [(120, 140, 70, (230, 40, 40)), (240, 330, 90, (40, 200, 60)), (90, 400, 45, (30, 60, 220))]:
        inside = ((y - cy) ** 2 + (x - cx) ** 2) < r * r
        for c in range(3):
            img[c][inside] = col[c]
    img[:, 300:330, 40:260] = 250.0
    return img[None]


def cmd_demo(args) -> int:
    import torch

    from .lattice import PermutohedralLattice

    img = _demo_image()
    _, _, h, w = img.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bil = torch.cat([torch.stack([x / 80.0, y / 80.0])[None], img / 13.0], 1)
    spa = torch.stack([x / 3.0, y / 3.0])[None]
    q = torch.rand(1, 21, h, w, generator=torch.Generator().manual_seed(0))
    PermutohedralLattice(spa).filter(q[:, :1])  # warm-up: compile/load the kernels once
    rows = {}
    for name, feats in (("bilateral (D=5)", bil), ("spatial (D=2)", spa)):
        t0 = time.perf_counter()
        lat = PermutohedralLattice(feats)
        t1 = time.perf_counter()
        lat.filter(q)
        t2 = time.perf_counter()
        rows[name] = {"build_ms": 1000 * (t1 - t0), "filter_ms": 1000 * (t2 - t1), "vertices": lat.num_vertices,
                      "backend": lat.backend}
    if args.json:
        print(json.dumps({"image": [h, w], "channels": 21, "filters": rows}))
    else:
        print(f"permutohedral filtering of a built-in {w}x{h} image, 21 channels")
        for name, r in rows.items():
            print(f"  {name:16s} build {r['build_ms']:7.1f} ms   filter {r['filter_ms']:7.1f} ms   "
                  f"{r['vertices']} lattice vertices ({r['backend']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crfrnn", description="CRF-RNN: dense-CRF mean-field as a trainable RNN layer.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the built-in demo")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
