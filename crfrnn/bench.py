"""Speed and memory benchmarks (``crfrnn bench``, ``benchmarks/*.py``). Not tests: numbers, not asserts.

Every comparison with the peer (pydensecrf2) is measured in one process, the two runs alternating (the
order swapped every round), and reported as the median of the per-round ratios: absolute times drift on
shared machines, ratios much less. Over several images: the median of the per-image medians, and the
spread (min-max) of the per-image medians.

* ``meanfield`` — ``crfrnn.densecrf`` (setup + 10 iterations) against pydensecrf2 on real VOC images,
  on the kernels CRF-RNN uses (VOC: θα 160, θβ 3, θγ 3, weights 5/3) and on pydensecrf's README kernels
  (sxy 80, srgb 13, compat 10 and 3), 1 and 2 threads, L = 21; then L = 59 and 1000x750; MAP agreement
  with pydensecrf2; the :class:`crfrnn.CrfRnn` layer (T=5) forward, forward + backward (on every image) against
  pydensecrf2's 5 iterations on the VOC kernels.
* ``lattice`` — lattice build and filter times per kernel, 500x375 and 1000x750, C in (2, 21, 59), both
  backends (the torch one at 500x375 only); pydensecrf2's setup and per-iteration time on the same image.
* ``memory`` — peak RSS of a fresh process running CrfRnn forward + backward (500x375, L=21, T=5).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .lattice import PermutohedralLattice

try:
    import resource
except ImportError:  # not on Windows
    resource = None

_VOC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc2012-sample"
_SAMPLE = _VOC / "images" / "2007_000250.jpg"
SIZE = (375, 500)  # (H, W): the VOC image size the targets are stated at


def kernel_sets() -> Dict[str, Dict[str, float]]:
    """The two sets of pairwise kernels benchmarked, as ``densecrf`` arguments: ``"voc"`` (CRF-RNN's
    defaults, what the layer was trained with) first, then ``"readme"`` (pydensecrf's README recipe,
    the defaults of :func:`crfrnn.densecrf.refine`). Read from those signatures: one source of truth."""
    from .densecrf.refine import refine
    from .meanfield import CrfRnn

    c = {k: p.default for k, p in inspect.signature(CrfRnn.__init__).parameters.items()}
    r = {k: p.default for k, p in inspect.signature(refine).parameters.items()}
    voc = {"sxy_bilateral": c["theta_alpha"], "srgb": c["theta_beta"], "compat_bilateral": c["bilateral_weight"],
           "sxy_gaussian": c["theta_gamma"], "compat_gaussian": c["spatial_weight"]}
    return {"voc": voc, "readme": {k: r[k] for k in voc}}


def voc_images(count: int, size=SIZE) -> List[Path]:
    """The first ``count`` validation images of the VOC sample of size ``size`` (H, W), in id order;
    training images if there are not enough; ``[]`` without the sample."""
    ids = _VOC / "ids.csv"
    if not ids.exists():
        return []
    rows = [line.split(",") for line in ids.read_text().splitlines()[1:] if line.strip()]
    fit = [r for r in rows if (int(r[2]), int(r[1])) == tuple(size)]
    fit.sort(key=lambda r: (r[3] != "val", r[0]))
    return [_VOC / "images" / f"{r[0]}.jpg" for r in fit[:count]]


def load_image(path: Optional[str] = None, size=SIZE) -> torch.Tensor:
    """A real RGB image ``(1, 3, H, W)`` float32 0..255 at ``size`` (the VOC sample when present, else
    the scene of :mod:`crfrnn.demo`), resized bilinearly when needed."""
    p = Path(path) if path else _SAMPLE
    if p.exists():
        from .data.io import read_image

        img = read_image(p)[None]
    else:
        from .demo import make_scene

        img = make_scene(*size)[0][None].float()  # (1, 3, H, W), 0..255
    if tuple(img.shape[-2:]) != tuple(size):
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False).clamp(0, 255)
    return img


def _case(path: Optional[Path], size, labels: int):
    """``(rgb (H, W, 3) uint8, unary (L, H*W) float32)`` for one image: unaries ``-log p`` of a noisy
    softmax around the ground truth (a plausible network output, so that the MAP comparison means
    something), or around random labels without a mask."""
    img = load_image(str(path) if path else None, size)
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    h, w = size
    rng = np.random.default_rng(0)
    mask = _VOC / "masks" / f"{path.stem}.png" if path else None
    if mask is not None and mask.exists():
        from .data.io import read_mask

        gt = read_mask(mask)[None, None].float()
        gt = torch.nn.functional.interpolate(gt, size=size, mode="nearest")[0, 0].long().numpy()
        gt = np.where(gt < labels, gt, 0)
    else:
        gt = rng.integers(0, labels, (h, w))
    logits = rng.normal(0.0, 1.5, (labels, h * w)).astype(np.float32)
    logits[gt.reshape(-1), np.arange(h * w)] += 2.5
    logp = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    return rgb, np.ascontiguousarray(-logp, dtype=np.float32)


def _features(img: torch.Tensor, sxy: float, srgb: float, sxy_spatial: float):
    _, _, h, w = img.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bil = torch.cat([torch.stack([x / sxy, y / sxy])[None], img / srgb], 1)
    spa = torch.stack([x / sxy_spatial, y / sxy_spatial])[None]
    return bil, spa


@contextlib.contextmanager
def threads(n: int):
    """Run the block with ``n`` Numba and torch threads (restored afterwards)."""
    import numba

    before = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before[0])
        torch.set_num_threads(before[1])


def machine_info() -> Dict[str, object]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads_max"] = numba.config.NUMBA_NUM_THREADS
        info["numba_threading_layer"] = numba.config.THREADING_LAYER
    except Exception:  # pragma: no cover
        pass
    try:
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


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cpu_ms() -> tuple:
    """This process's user and system CPU time so far, ms (all its threads; ``getrusage`` counts microseconds,
    ``os.times`` where it is missing counts clock ticks)."""
    if resource is None:
        t = os.times()
        return 1000 * t.user, 1000 * t.system
    r = resource.getrusage(resource.RUSAGE_SELF)
    return 1000 * r.ru_utime, 1000 * r.ru_stime


def _alternate(fns: Sequence[Callable[[], object]], rounds: int, cpu: Optional[list] = None) -> List[List[float]]:
    """Seconds of each function in each round, the order reversed every other round. With a list ``cpu``, each
    round also appends to it the CPU time of each call, ``[(user_ms, system_ms), ...]`` in the order of ``fns``:
    what grows where the wall time grows (the computation, or the kernel faulting memory in)."""
    out = []
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else range(len(fns) - 1, -1, -1)
        t = [0.0] * len(fns)
        c = [(0.0, 0.0)] * len(fns)
        for k in order:
            c0 = _cpu_ms()
            t0 = time.perf_counter()
            fns[k]()
            t[k] = time.perf_counter() - t0
            c1 = _cpu_ms()
            c[k] = (c1[0] - c0[0], c1[1] - c0[1])
        out.append(t)
        if cpu is not None:
            cpu.append(c)
    return out


def _med(xs) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------- crfrnn.densecrf
def _densecrf_setup(mod, rgb, unary, kernels):
    """``mod.DenseCRF2D`` (crfrnn's or pydensecrf's) with the unary and the two terms of ``kernels`` set."""
    h, w = rgb.shape[:2]
    d = mod.DenseCRF2D(w, h, unary.shape[0])
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=kernels["sxy_gaussian"], compat=kernels["compat_gaussian"])
    d.addPairwiseBilateral(sxy=kernels["sxy_bilateral"], srgb=kernels["srgb"], rgbim=rgb,
                           compat=kernels["compat_bilateral"])
    return d


def _densecrf(mod, rgb, unary, kernels, iterations):
    return np.argmax(np.array(_densecrf_setup(mod, rgb, unary, kernels).inference(iterations)), 0)


def bench_densecrf(images: Sequence[Optional[Path]], kernels: str = "voc", n_threads: int = 1, labels: int = 21,
                   size=SIZE, rounds: int = 3, iterations: int = 10, base_size=None) -> List[Dict[str, object]]:
    """Setup + ``inference(iterations)`` of ``crfrnn.densecrf`` and pydensecrf2 (same calls), alternating,
    per image: medians over ``rounds``, the median per-round ratio, the MAP agreement. With ``base_size``,
    ours at that size joins the rounds: ``growth`` = the median per-round ratio of ours at ``size`` to ours
    at ``base_size`` (the cost of more pixels, measured side by side), the same for the user CPU time
    (``user_growth``: the computation's) and ours' system CPU time per call at ``size`` (the kernel's, faulting
    memory in)."""
    from . import densecrf as ours

    peer = None
    if _have_pydensecrf():
        import pydensecrf.densecrf as peer
    ks = kernel_sets()[kernels]
    rows = []
    with threads(n_threads):
        for path in images:
            rgb, unary = _case(path, size, labels)
            res = {}
            fns = [lambda: res.__setitem__("ours", _densecrf(ours, rgb, unary, ks, iterations))]
            if peer is not None:
                fns.append(lambda: res.__setitem__("peer", _densecrf(peer, rgb, unary, ks, iterations)))
            if base_size is not None:
                small_rgb, small_unary = _case(path, base_size, labels)
                fns.append(lambda: _densecrf(ours, small_rgb, small_unary, ks, iterations))
            fns[0]()  # compile / load the kernels
            cpu: list = []
            t = _alternate(fns, rounds, cpu)
            row = {"kernels": kernels, "threads": n_threads, "labels": labels, "size": f"{size[1]}x{size[0]}",
                   "image": path.stem if path else "scene", "crfrnn_ms": 1000 * _med(r[0] for r in t)}
            if peer is not None:
                row.update({"pydensecrf_ms": 1000 * _med(r[1] for r in t), "ratio": _med(r[0] / r[1] for r in t),
                            "map_agreement": float((res["ours"] == res["peer"]).mean())})
            if base_size is not None:
                base = f"{base_size[1]}x{base_size[0]}"
                row[f"growth_over_{base}"] = _med(r[0] / r[-1] for r in t)
                row[f"user_growth_over_{base}"] = _med(c[0][0] / max(c[-1][0], 1e-3) for c in cpu)
                row["crfrnn_sys_ms"] = _med(c[0][1] for c in cpu)
            rows.append(row)
    return rows


def summarize(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One line per (kernels, threads, labels, size): medians over the images and the spread of the
    per-image median ratios; the lowest MAP agreement."""
    groups: Dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["kernels"], r["threads"], r["labels"], r["size"]), []).append(r)
    out = []
    for (k, th, lab, size), rs in groups.items():
        s = {"kernels": k, "threads": th, "labels": lab, "size": size, "images": len(rs),
             "crfrnn_ms": _med(r["crfrnn_ms"] for r in rs)}
        if "ratio" in rs[0]:
            ratios = [r["ratio"] for r in rs]
            s.update({"pydensecrf_ms": _med(r["pydensecrf_ms"] for r in rs), "ratio_median": _med(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "map_agreement_min": min(r["map_agreement"] for r in rs)})
        out.append(s)
    return out


def bench_layer(path: Optional[Path], n_threads: int = 1, size=SIZE, labels: int = 21, iterations: int = 5,
                rounds: int = 3) -> Dict[str, object]:
    """:class:`crfrnn.CrfRnn` (VOC kernels, its defaults) forward and forward + backward, alternating with
    pydensecrf2's setup + ``inference(iterations)`` on the same kernels and unaries."""
    from .meanfield import CrfRnn

    rgb, unary = _case(path, size, labels)
    img = torch.from_numpy(rgb).permute(2, 0, 1).float()[None].contiguous()
    logits = torch.from_numpy(-unary).reshape(1, labels, *size)
    layer = CrfRnn(labels, num_iterations=iterations).train()

    def fwd():
        with torch.no_grad():
            layer(logits, img)

    def fwd_bwd():
        u = logits.clone().requires_grad_()
        layer(u, img).square().mean().backward()

    fns = [fwd, fwd_bwd]
    if _have_pydensecrf():
        import pydensecrf.densecrf as peer

        ks = kernel_sets()["voc"]
        fns.append(lambda: _densecrf(peer, rgb, unary, ks, iterations))
    with threads(n_threads):
        fwd_bwd()
        t = _alternate(fns, rounds)
    out = {"threads": n_threads, "size": f"{size[1]}x{size[0]}", "labels": labels, "iterations": iterations,
           "image": path.stem if path else "scene", "forward_ms": 1000 * _med(r[0] for r in t),
           "forward_backward_ms": 1000 * _med(r[1] for r in t), "fb_over_f": _med(r[1] / r[0] for r in t)}
    if len(fns) == 3:
        out.update({"pydensecrf_ms": 1000 * _med(r[2] for r in t),
                    "forward_over_pydensecrf": _med(r[0] / r[2] for r in t)})
    return out


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
# load/compile the kernels first: on a cold cache (or one a source edit made stale) compiling inside the measured
# window adds hundreds of MB; 128x160 = 20480 points takes the parallel build's path too (16384 and more)
small(unary[..., :128, :160], img[..., :128, :160]).sum().backward()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
out = layer(unary, img)
out.square().mean().backward()
peak = status("VmHWM")
print(json.dumps({"rss_before_mb": base, "peak_rss_mb": peak, "forward_backward_extra_mb": peak - base}))
"""


def bench_memory(size=SIZE, labels: int = 21, iterations: int = 5) -> Dict[str, object]:
    """Peak RSS (MB, Linux ``VmHWM``) of a fresh process during CrfRnn forward + backward, the peak
    reset after imports and kernel loading; ``rss_before_mb`` is the process's RSS at that point."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size[0]), str(size[1]), str(labels), str(iterations)],
        capture_output=True, text=True, check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"size": f"{size[1]}x{size[0]}", "labels": labels, "iterations": iterations})
    return res


# ----------------------------------------------------------------------------- lattice
def bench_lattice(sizes=(SIZE, (750, 1000)), channels=(2, 21, 59), backends=("numba", "torch"), repeats: int = 5,
                  image: Optional[str] = None, device: str = "cpu") -> List[Dict[str, object]]:
    """Build and filter times (medians) of each kernel's lattice; the torch backend at the first size only."""
    rows = []
    for si, size in enumerate(sizes):
        img = load_image(image, size).to(device)
        for kname, ks in kernel_sets().items():
            bil, spa = _features(img, ks["sxy_bilateral"], ks["srgb"], ks["sxy_gaussian"])
            for backend in backends if si == 0 else backends[:1]:
                for name, feats in ((f"{kname} bilateral D=5", bil), (f"{kname} spatial D=2", spa)):
                    if kname != "voc" and name.endswith("D=2"):
                        continue  # the same spatial kernel (sxy 3) in both sets
                    PermutohedralLattice(feats, backend=backend).filter(torch.ones_like(feats[:, :1]))  # JIT
                    lat = PermutohedralLattice(feats, backend=backend)
                    row = {"size": f"{size[1]}x{size[0]}", "kernel": name, "backend": backend,
                           "vertices": lat.num_vertices,
                           "build_ms": 1000 * _median_time(lambda: PermutohedralLattice(feats, backend=backend),
                                                           repeats)}
                    for c in channels:
                        v = torch.rand(1, c, *size, device=device)
                        row[f"filter_C{c}_ms"] = 1000 * _median_time(lambda: lat.filter(v), repeats)
                    rows.append(row)
    return rows


def bench_vs_pydensecrf(kernels: str = "voc", rounds: int = 7, image: Optional[str] = None, size=SIZE,
                        labels: int = 21) -> Dict[str, object]:
    """pydensecrf2's setup (both terms) and one iteration against our two lattice builds and our two
    filters (C = labels), alternating, on the same image and kernels."""
    import pydensecrf.densecrf as dcrf

    ks = kernel_sets()[kernels]
    img = load_image(image, size)
    h, w = size
    rgb = np.ascontiguousarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    _, unary = _case(None, size, labels)
    bil, spa = _features(img, ks["sxy_bilateral"], ks["srgb"], ks["sxy_gaussian"])
    q = torch.rand(1, labels, h, w)
    st = {}

    def pyd_setup():
        d = dcrf.DenseCRF2D(w, h, labels)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=ks["sxy_gaussian"], compat=ks["compat_gaussian"])
        d.addPairwiseBilateral(sxy=ks["sxy_bilateral"], srgb=ks["srgb"], rgbim=rgb, compat=ks["compat_bilateral"])
        st["d"] = d
        st["inf"] = d.startInference()

    def pyd_iter():
        st["d"].stepInference(*st["inf"])

    def ours_build():
        st["lats"] = PermutohedralLattice(bil), PermutohedralLattice(spa)

    def ours_filters():
        for lat in st["lats"]:
            lat.filter(q)

    ours_build()
    ours_filters()
    pyd_setup()
    t = _alternate([pyd_setup, ours_build, pyd_iter, ours_filters], rounds)
    return {"kernels": kernels, "size": f"{w}x{h}", "labels": labels, "rounds": rounds,
            "pydensecrf_setup_ms": 1000 * _med(r[0] for r in t), "crfrnn_build_both_ms": 1000 * _med(r[1] for r in t),
            "pydensecrf_iteration_ms": 1000 * _med(r[2] for r in t),
            "crfrnn_two_filters_ms": 1000 * _med(r[3] for r in t),
            "build_ratio_median": _med(r[1] / r[0] for r in t), "iteration_ratio_median": _med(r[3] / r[2] for r in t)}


# ----------------------------------------------------------------------------- report
def _table(rows: List[Dict[str, object]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda xs: "| " + " | ".join(x.ljust(wd) for x, wd in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"] + [line(c) for c in cells])


def _scaling(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Cost of 1000x750 over 500x375 (4x the pixels), per kernel set and thread count: the per-image
    growth measured side by side, median and max over the images; the same median for the user CPU time, and
    the median system CPU time of a 1000x750 call."""
    out = []
    key = f"growth_over_{SIZE[1]}x{SIZE[0]}"
    for k in dict.fromkeys(r["kernels"] for r in rows):
        for th in sorted({r["threads"] for r in rows}):
            scaled = [r for r in rows if r["kernels"] == k and r["threads"] == th and key in r]
            if scaled:
                growth = [r[key] for r in scaled]
                out.append({"kernels": k, "threads": th, "images": len(growth), "growth_median": _med(growth),
                            "growth_max": max(growth),
                            "user_growth_median": _med(r["user_" + key] for r in scaled),
                            "sys_ms_median": _med(r["crfrnn_sys_ms"] for r in scaled)})
    return out


def run_meanfield(quick: bool = False, log: Callable[[str], object] = lambda s: None) -> Dict[str, object]:
    """The ``meanfield`` section: both kernel sets at 1 and 2 threads on 5 VOC images (2 with ``quick``),
    then L = 59 and 1000x750 on the same images (not with ``quick``), and the CrfRnn layer."""
    images = voc_images(2 if quick else 5) or [None]
    rounds = 2 if quick else 3
    rows = []

    def add(new):
        rows.extend(new)
        s = summarize(new)[0]
        log(f"  {s['kernels']:6s} {s['threads']} thread(s) L={s['labels']} {s['size']}: crfrnn {s['crfrnn_ms']:.0f} ms"
            + (f", {s['ratio_median']:.2f}x pydensecrf2 ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
               if "ratio_median" in s else ""))

    for kernels in kernel_sets():
        for th in (1, 2):
            add(bench_densecrf(images, kernels, th, rounds=rounds))
    if not quick:  # the same images and rounds: the protocol asks for at least 5 images per figure
        for kernels in kernel_sets():
            for th in (1, 2):
                add(bench_densecrf(images, kernels, th, labels=59, rounds=rounds))
                add(bench_densecrf(images, kernels, th, size=(750, 1000), rounds=rounds, base_size=SIZE))
    res = {"densecrf_per_image": rows, "densecrf": summarize(rows), "scaling": _scaling(rows)}
    log("== crfrnn.densecrf vs pydensecrf2: setup + 10 iterations (ratio: median of per-round ratios; over images: "
        "median and min-max of the per-image medians) ==")
    log(_table(res["densecrf"]))
    if res["scaling"]:
        log("== cost of 1000x750 over 500x375 (4x the pixels) ==")
        log(_table(res["scaling"]))
    res.update(run_layer(images, rounds, log))
    return res


def summarize_layer(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One line per thread count: medians over the images of the per-image medians, and their spread."""
    out = []
    for th in sorted({r["threads"] for r in rows}):
        rs = [r for r in rows if r["threads"] == th]
        s = {"threads": th, "images": len(rs), "forward_ms": _med(r["forward_ms"] for r in rs),
             "forward_backward_ms": _med(r["forward_backward_ms"] for r in rs)}
        for key in ("fb_over_f", "forward_over_pydensecrf"):
            if key in rs[0]:
                xs = [r[key] for r in rs]
                s.update({key: _med(xs), f"{key}_min": min(xs), f"{key}_max": max(xs)})
        out.append(s)
    return out


def run_layer(images: Sequence[Optional[Path]], rounds: int = 3, log: Callable[[str], object] = lambda s: None
              ) -> Dict[str, object]:
    """The CrfRnn layer (T=5) on every image, 1 and 2 threads: per-image rows and their summary."""
    rows = [bench_layer(path, th, rounds=rounds) for th in (1, 2) for path in images]
    log("== CrfRnn layer, VOC kernels, T=5, vs pydensecrf2 setup + 5 iterations (per image) ==")
    log(_table(rows))
    return {"crfrnn_layer_per_image": rows, "crfrnn_layer": summarize_layer(rows)}


def run(which=("lattice", "meanfield", "memory"), repeats: int = 5, quick: bool = False, image: Optional[str] = None,
        device: str = "cpu", log: Callable[[str], object] = lambda s: None) -> Dict[str, object]:
    results: Dict[str, object] = {"machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if "meanfield" in which:
        results["meanfield"] = run_meanfield(quick, log)
    elif "layer" in which:
        results["meanfield"] = run_layer(voc_images(2 if quick else 5) or [None], 2 if quick else 3, log)
    if "lattice" in which:
        sizes = (SIZE,) if quick else (SIZE, (750, 1000))
        backends = ("numba", "torch") if device == "cpu" else ("torch",)
        rows = bench_lattice(sizes=sizes, repeats=repeats, image=image, device=device, backends=backends)
        results["lattice"] = rows
        log("== lattice build and filter (median ms, all threads) ==")
        log(_table(rows))
        if _have_pydensecrf() and device == "cpu":
            peer = []
            for th in (1, 2):
                with threads(th):
                    peer += [dict(threads=th, **bench_vs_pydensecrf(k, rounds=max(repeats, 5), image=image))
                             for k in kernel_sets()]
            results["vs_pydensecrf"] = peer
            log("== lattices vs pydensecrf2, 500x375, 21 labels (alternating rounds, medians) ==")
            log(_table(peer))
    if "memory" in which:
        mem = bench_memory()
        results["memory"] = mem
        log("== peak RSS, CrfRnn forward+backward, fresh process ==")
        log(_table([mem]))
    results["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="crfrnn bench",
        description="Speed and memory benchmarks of the lattice and the CRF layers (against pydensecrf2 if installed).",
        epilog="examples:\n  crfrnn bench --quick\n"
               "  crfrnn bench --only meanfield --json benchmarks/results/meanfield.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=["lattice", "meanfield", "layer", "memory"], action="append",
                   help="run only these benchmarks (repeatable)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per lattice measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="2 images, 500x375 and 21 labels only, fewer rounds")
    p.add_argument("--image", default=None, help="RGB image for the lattice benchmark (default: a VOC sample image)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (lattice benchmark)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all numbers and the machine's details here")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="let glibc keep the memory this process frees, as `crfrnn train` and folder jobs do (by "
                        "default each call faults its blocks above 32 MB in again)")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        from .cli._common import keep_freed_memory

        keep_freed_memory()
    which = tuple(args.only) if args.only else ("lattice", "meanfield", "memory")
    res = run(which, repeats=3 if args.quick else args.repeats, quick=args.quick, image=args.image, device=args.device,
              log=print)
    res["keep_freed_memory"] = args.keep_freed_memory
    if args.json:
        from .engine.runfiles import atomic_write

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(res, indent=2).encode("utf-8")))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
