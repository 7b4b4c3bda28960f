"""Speed and memory benchmarks (``crfrnn bench``, ``benchmarks/*.py``). Not tests: numbers, not asserts.

Every comparison with a peer is measured side by side in one process, the two runs alternating, and
reported as the median of the per-round ratios: absolute times drift on shared machines, ratios less.

* ``lattice``  — lattice build and filter times, D=5 (bilateral) and D=2 (spatial), 500x375 and
  1000x750, C in (2, 21, 59), both backends; pydensecrf2's setup and per-iteration time on the same
  image when it is installed.
* ``meanfield`` — ``crfrnn.densecrf`` inference (setup + 10 iterations, 21 labels) against pydensecrf2;
  :class:`crfrnn.CrfRnn` forward and forward+backward at T=5.
* ``memory``   — peak RSS of a fresh process running CrfRnn forward+backward (500x375, L=21, T=5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .lattice import PermutohedralLattice

_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc2012-sample" / "images" / "2007_000250.jpg"


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_image(path: Optional[str] = None, size=(375, 500)) -> torch.Tensor:
    """A real RGB image ``(1, 3, H, W)`` float32 0..255 at ``size`` (the VOC sample when present, else
    the scene of :mod:`crfrnn.demo`), resized bilinearly when needed."""
    p = Path(path) if path else _SAMPLE
    if p.exists():
        from PIL import Image

        img = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float()[None]
    else:
        from .demo import make_scene

        img = make_scene(*size)[0][None].float()  # (1, 3, H, W), 0..255
    if tuple(img.shape[-2:]) != tuple(size):
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False).clamp(0, 255)
    return img


def _features(img: torch.Tensor):
    _, _, h, w = img.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bil = torch.cat([torch.stack([x / 80.0, y / 80.0])[None], img / 13.0], 1)
    spa = torch.stack([x / 3.0, y / 3.0])[None]
    return bil, spa


def machine_info() -> Dict[str, object]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except Exception:  # pragma: no cover
        pass
    try:
        import pydensecrf  # noqa: F401
        from importlib.metadata import version

        info["pydensecrf2"] = version("pydensecrf2")
    except Exception:
        info["pydensecrf2"] = None
    return info


def _have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401

        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------- lattice
def bench_lattice(
    sizes=((375, 500), (750, 1000)),
    channels=(2, 21, 59),
    backends=("numba", "torch"),
    repeats: int = 5,
    image: Optional[str] = None,
    device: str = "cpu",
) -> List[Dict[str, object]]:
    rows = []
    for size in sizes:
        img = load_image(image, size).to(device)
        bil, spa = _features(img)
        for backend in backends:
            for name, feats in (("bilateral D=5", bil), ("spatial D=2", spa)):
                PermutohedralLattice(feats, backend=backend).filter(torch.ones_like(feats[:, :1]))  # warm-up / JIT
                lat = PermutohedralLattice(feats, backend=backend)
                row = {
                    "size": f"{size[1]}x{size[0]}", "pixels": size[0] * size[1], "kernel": name, "backend": backend,
                    "vertices": lat.num_vertices,
                    "build_ms": 1000 * _median_time(lambda: PermutohedralLattice(feats, backend=backend), repeats),
                }
                for c in channels:
                    v = torch.rand(1, c, *size, device=device)
                    row[f"filter_C{c}_ms"] = 1000 * _median_time(lambda: lat.filter(v), repeats)
                rows.append(row)
    return rows


def bench_vs_pydensecrf(repeats: int = 7, image: Optional[str] = None, size=(375, 500), labels: int = 21) -> Dict[str, object]:
    """pydensecrf2's setup (both lattices) and per-iteration time vs our lattice builds and our two filters
    (C = labels), alternating, on the same image."""
    import pydensecrf.densecrf as dcrf

    img = load_image(image, size)
    h, w = size
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    rng = np.random.default_rng(0)
    prob = rng.random((labels, h * w)).astype(np.float32)
    prob /= prob.sum(0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(prob))
    bil, spa = _features(img)
    q = torch.rand(1, labels, h, w)

    def pyd_setup():
        d = dcrf.DenseCRF2D(w, h, labels)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
        return d

    def ours_setup():
        return PermutohedralLattice(bil), PermutohedralLattice(spa)

    d = pyd_setup()
    lb, ls = ours_setup()
    lb.filter(q)
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = pyd_setup()
        t1 = time.perf_counter()
        lb, ls = ours_setup()
        t2 = time.perf_counter()
        Q, tmp1, tmp2 = d.startInference()
        t3 = time.perf_counter()
        for _ in range(5):
            d.stepInference(Q, tmp1, tmp2)
        t4 = time.perf_counter()
        for _ in range(5):
            lb.filter(q)
            ls.filter(q)
        t5 = time.perf_counter()
        rounds.append({"pyd_setup": t1 - t0, "our_build": t2 - t1, "pyd_iter": (t4 - t3) / 5, "our_filters": (t5 - t4) / 5})
    med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
    return {
        "size": f"{w}x{h}", "labels": labels, "rounds": repeats,
        "pydensecrf_setup_ms": 1000 * med("pyd_setup"),
        "crfrnn_build_both_ms": 1000 * med("our_build"),
        "pydensecrf_iteration_ms": 1000 * med("pyd_iter"),
        "crfrnn_two_filters_ms": 1000 * med("our_filters"),
        "build_ratio_median": statistics.median(r["our_build"] / r["pyd_setup"] for r in rounds),
        "iteration_ratio_median": statistics.median(r["our_filters"] / r["pyd_iter"] for r in rounds),
    }


# ----------------------------------------------------------------------------- mean field
def bench_densecrf_inference(repeats: int = 5, image: Optional[str] = None, size=(375, 500), labels: int = 21,
                             iterations: int = 10) -> Dict[str, object]:
    """Setup + ``inference(10)`` of ``crfrnn.densecrf`` vs pydensecrf2 (same calls), alternating."""
    from . import densecrf as ours

    have_peer = _have_pydensecrf()
    if have_peer:
        import pydensecrf.densecrf as peer
    img = load_image(image, size)
    h, w = size
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    rng = np.random.default_rng(0)
    prob = rng.random((labels, h * w)).astype(np.float32) ** 4
    prob /= prob.sum(0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(prob))

    def run(mod):
        d = mod.DenseCRF2D(w, h, labels)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
        return np.argmax(np.array(d.inference(iterations)), 0)

    run(ours)
    rounds, agree = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = run(ours)
        t1 = time.perf_counter()
        r = {"ours": t1 - t0}
        if have_peer:
            b = run(peer)
            r["peer"] = time.perf_counter() - t1
            agree = float((a == b).mean())
        rounds.append(r)
    out = {"size": f"{w}x{h}", "labels": labels, "iterations": iterations,
           "crfrnn_densecrf_ms": 1000 * statistics.median(r["ours"] for r in rounds)}
    if have_peer:
        out["pydensecrf_ms"] = 1000 * statistics.median(r["peer"] for r in rounds)
        out["ratio_median"] = statistics.median(r["ours"] / r["peer"] for r in rounds)
        out["map_agreement"] = agree
    return out


def bench_crfrnn(repeats: int = 3, image: Optional[str] = None, size=(375, 500), labels: int = 21,
                 iterations: int = 5, device: str = "cpu") -> Dict[str, object]:
    """CrfRnn forward vs forward+backward (T=5, L=21), alternating."""
    from .meanfield import CrfRnn

    img = load_image(image, size).to(device)
    layer = CrfRnn(labels, num_iterations=iterations).to(device).train()
    unary = torch.randn(1, labels, *size, device=device)

    def fwd():
        with torch.no_grad():
            return layer(unary, img)

    def fwd_bwd():
        u = unary.clone().requires_grad_()
        out = layer(u, img)
        out.square().mean().backward()

    fwd_bwd()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd()
        t1 = time.perf_counter()
        fwd_bwd()
        t2 = time.perf_counter()
        rounds.append((t1 - t0, t2 - t1))
    return {
        "size": f"{size[1]}x{size[0]}", "labels": labels, "iterations": iterations, "device": device,
        "forward_ms": 1000 * statistics.median(r[0] for r in rounds),
        "forward_backward_ms": 1000 * statistics.median(r[1] for r in rounds),
        "fb_over_f_median": statistics.median(r[1] / r[0] for r in rounds),
    }


_MEMORY_SCRIPT = r"""
import json, sys, torch
import crfrnn
from crfrnn.bench import load_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MB
h, w, L, T = map(int, sys.argv[1:5])
img = load_image(None, (h, w))
layer = crfrnn.CrfRnn(L, num_iterations=T).train()
unary = torch.randn(1, L, h, w, requires_grad=True)
small = crfrnn.CrfRnn(L, num_iterations=1).train()
small(unary[..., :16, :16], img[..., :16, :16]).sum().backward()  # load/compile the kernels first
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
out = layer(unary, img)
out.square().mean().backward()
print(json.dumps({"rss_before_mb": base, "peak_rss_mb": status("VmHWM"), "forward_backward_extra_mb": status("VmHWM") - base}))
"""


def bench_memory(size=(375, 500), labels: int = 21, iterations: int = 5) -> Dict[str, object]:
    """Peak RSS (MB, Linux ``VmHWM``) of a fresh process during CrfRnn forward + backward, the peak
    reset after imports and kernel loading; ``rss_before_mb`` is the process's RSS at that point."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size[0]), str(size[1]), str(labels), str(iterations)],
        capture_output=True, text=True, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"size": f"{size[1]}x{size[0]}", "labels": labels, "iterations": iterations})
    return res


# ----------------------------------------------------------------------------- report
def _table(rows: List[Dict[str, object]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda xs: "| " + " | ".join(x.ljust(wd) for x, wd in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"] + [line(c) for c in cells])


def _kv(d: Dict[str, object]) -> str:
    return "\n".join(f"  {k:28s} {v:.3f}" if isinstance(v, float) else f"  {k:28s} {v}" for k, v in d.items())


def run(which=("lattice", "meanfield", "memory"), repeats: int = 5, quick: bool = False, image: Optional[str] = None,
        device: str = "cpu", log: Callable[[str], object] = lambda s: None) -> Dict[str, object]:
    results: Dict[str, object] = {"machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sizes = ((375, 500),) if quick else ((375, 500), (750, 1000))
    if "lattice" in which:
        backends = ("numba", "torch") if device == "cpu" else ("torch",)
        rows = bench_lattice(sizes=sizes, repeats=repeats, image=image, device=device, backends=backends)
        results["lattice"] = rows
        log("== lattice build and filter (median ms) ==")
        log(_table(rows))
        for backend in backends:
            pick = {(r["size"], r["kernel"]): r for r in rows if r["backend"] == backend}
            if len(sizes) == 2:
                small = sum(pick[("500x375", k)]["filter_C21_ms"] for k in ("bilateral D=5", "spatial D=2"))
                big = sum(pick[("1000x750", k)]["filter_C21_ms"] for k in ("bilateral D=5", "spatial D=2"))
                bsmall = sum(pick[("500x375", k)]["build_ms"] for k in ("bilateral D=5", "spatial D=2"))
                bbig = sum(pick[("1000x750", k)]["build_ms"] for k in ("bilateral D=5", "spatial D=2"))
                results.setdefault("scaling", {})[backend] = {"filters_1000x750_over_500x375": big / small,
                                                              "builds_1000x750_over_500x375": bbig / bsmall}
        if "scaling" in results:
            log("== cost growth 1000x750 / 500x375 (4x the pixels) ==")
            log(_kv({f"{b} {k}": v for b, d in results["scaling"].items() for k, v in d.items()}))
        if _have_pydensecrf() and device == "cpu":
            peer = bench_vs_pydensecrf(repeats=max(repeats, 5), image=image)
            results["vs_pydensecrf"] = peer
            log("== vs pydensecrf2, 500x375, 21 labels (alternating rounds, median) ==")
            log(_kv(peer))
    if "meanfield" in which:
        dc = bench_densecrf_inference(repeats=max(3, repeats // 2), image=image)
        results["densecrf_inference"] = dc
        log("== crfrnn.densecrf vs pydensecrf2: setup + 10 iterations, 500x375, 21 labels ==")
        log(_kv(dc))
        cr = bench_crfrnn(repeats=max(3, repeats // 2), image=image, device=device)
        results["crfrnn_layer"] = cr
        log("== CrfRnn layer, 500x375, L=21, T=5 ==")
        log(_kv(cr))
    if "memory" in which:
        mem = bench_memory()
        results["memory"] = mem
        log("== peak RSS, CrfRnn forward+backward, fresh process ==")
        log(_kv(mem))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="crfrnn bench",
        description="Speed and memory benchmarks of the lattice and the CRF layers (against pydensecrf2 if installed).",
        epilog="examples:\n  crfrnn bench --quick\n  crfrnn bench --only lattice --json benchmarks/results/lattice.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=["lattice", "meanfield", "memory"], action="append",
                   help="run only these benchmarks (repeatable)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="500x375 only, fewer repeats")
    p.add_argument("--image", default=None, help="RGB image to benchmark on (default: a VOC sample image)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all numbers and the machine's details here")
    args = p.parse_args(argv)
    which = tuple(args.only) if args.only else ("lattice", "meanfield", "memory")
    res = run(which, repeats=3 if args.quick else args.repeats, quick=args.quick, image=args.image, device=args.device,
              log=print)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
