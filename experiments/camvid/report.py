"""``--report``: the markdown page (docs/experiments.md) aggregated from the runs' ``results.json``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import ABLATIONS, ARMS, atomic_bytes

Writer = Callable[[str], None]


def _load_results(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise SystemExit(f"--report: no results.json at {f}")
        r = json.loads(f.read_text(encoding="utf-8"))
        if "arms" not in r or "timing" not in r:
            raise SystemExit(f"--report: {f} is incomplete (no 'arms' or 'timing'; did the run finish?)")
        out.append(r)
    return out


def _ms(values: list[float | None], digits: int = 1) -> str:
    v = [100.0 * x for x in values if x is not None]
    if not v:
        return "-"
    m = float(np.mean(v))
    if len(v) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {float(np.std(v, ddof=1)):.{digits}f}"


def _setup(w: Writer, runs: list[dict[str, Any]]) -> None:
    res0 = runs[0]
    d = res0["data"]
    cfg = res0["config"]
    w("## Set-up")
    w("")
    w(f"* Data: CamVid (SegNet split), {d['num_train']} training images, {d['num_held_apart']} held apart from train "
      f"(fixed random 10 %, used only to pick the post-processing CRF parameters), {d['num_val']} val images for "
      f"all reported numbers. 11 classes, void ignored. Images and masks resized to {d['resolution'][0]}x"
      f"{d['resolution'][1]} (360x480 scaled by {d['resolution'][0] / 360:.3g}; images with antialiasing, masks by "
      "nearest neighbour); IU is measured at that resolution.")
    w(f"* Network: a narrow VGG-style FCN-8s (`TinyFCN8s`: stage widths {res0['fcn']['widths']}, "
      f"fc {res0['fcn']['fc']}, "
      "BatchNorm, pool3/pool4 skips and the FCN-8s fusion, bilinear-initialised deconvolutions), trained from "
      "scratch (no ImageNet weights offline): SGD momentum 0.9, poly schedule over the CPU-time share, "
      f"lr {cfg['lr']}, batch {cfg['batch_size']}, horizontal flips, "
      f"{', '.join(str(r['fcn']['steps']) for r in runs)} steps (per seed; set from the time budget).")
    w(f"* (b) dense CRF post-processing: `crfrnn.meanfield.mean_field`, T=10, Potts, parameters picked by a grid "
      f"search over θα ∈ {cfg['grid_theta_alpha']}, θβ ∈ {cfg['grid_theta_beta']}, bilateral weight ∈ "
      f"{cfg['grid_bilateral_weight']} (θγ = {cfg['theta_gamma']}, spatial weight {cfg['spatial_weight']}) on the "
      "held-apart images. Chosen per seed: " + "; ".join(
          f"seed {r['seed']}: θα {r['grid_search']['best']['theta_alpha']:g}, "
          f"θβ {r['grid_search']['best']['theta_beta']:g}, "
          f"w_b {r['grid_search']['best']['bilateral_weight']:g}" for r in runs) + ".")
    w(f"* (c) CRF-RNN: `crfrnn.models.CrfRnnHead` over a copy of (a), CRF initialised with (b)'s parameters "
      "(kernel weights w·I, Potts compatibility), `kernel_weights='matrix'`, learned asymmetric compatibility; "
      f"T=5 in training, T=10 at test; fine-tuned end to end on random {d['crf_crop'][0]}x{d['crf_crop'][1]} crops, "
      f"batch {cfg['crf_batch_size']}, SGD momentum 0.9, lr {cfg['crf_lr']} (fixed), CRF lr multipliers "
      f"{cfg['crf_kernel_lr_mult']:g} (kernel weights) / {cfg['crf_compat_lr_mult']:g} (compatibility), "
      f"FCN BatchNorm statistics frozen; {', '.join(str(r['arms']['crfrnn']['steps']) for r in runs)} steps per "
      "seed. Every ablation is fine-tuned from (a) in the same way, changing one thing.")
    w("")


def _table1(w: Writer, runs: list[dict[str, Any]]) -> None:
    w("## Table 1 (mean IU on CamVid val, %, mean ± std over seeds)")
    w("")
    w("| Method | Mean IU | Δ vs (a) (pp) | Pixel acc. | Paper (VOC 2012 reduced val) |")
    w("|---|---:|---:|---:|---:|")
    paper = {"fcn": "61.3", "fcn_crf_post": "63.7", "crfrnn": "69.6"}
    for arm, label in ARMS.items():
        da = [r["arms"][arm]["mean_iou"] - r["arms"]["fcn"]["mean_iou"] for r in runs]
        w(f"| {label} | {_ms([r['arms'][arm]['mean_iou'] for r in runs])} | "
          f"{'' if arm == 'fcn' else _ms(da, 2)} | "
          f"{_ms([r['arms'][arm]['pixel_accuracy'] for r in runs])} | {paper[arm]} |")
    w("")
    w("Δ: mean ± std over seeds of the per-seed difference, in percentage points (the seeds share the data split, "
      "so the paired difference is the sharper comparison).")
    w("")
    w("Per seed (mean IU, %):")
    w("")
    w("| Seed | " + " | ".join(ARMS) + " | ordering a < b < c |")
    w("|---|" + "---:|" * len(ARMS) + "---|")
    for r in runs:
        v = [100 * r["arms"][a]["mean_iou"] for a in ARMS]
        w(f"| {r['seed']} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {'yes' if v[0] < v[1] < v[2] else 'no'} |")
    w("")
    w("Grid search on the held-apart images (mean IU, %): " + "; ".join(
        f"seed {r['seed']}: FCN {100 * r['grid_search']['fcn_mean_iou_same_images']:.2f} → best CRF "
        f"{100 * max(x['held_apart_mean_iou'] for x in r['grid_search']['results']):.2f} "
        f"({r['grid_search']['num_images']} images, {len(r['grid_search']['results'])} settings)" for r in runs) + ".")
    w("")


def _per_class(w: Writer, runs: list[dict[str, Any]]) -> None:
    names = runs[0]["class_names"]
    w("## Per-class IU (%, mean ± std over seeds)")
    w("")
    arms_all = [a for a in list(ARMS) + list(ABLATIONS) if all(a in r["arms"] for r in runs)]
    w("| Arm | " + " | ".join(names) + " | Mean IU |")
    w("|---|" + "---:|" * (len(names) + 1))
    for a in arms_all:
        cells = [_ms([r["arms"][a]["class_iou"][c] for r in runs]) for c in range(len(names))]
        w(f"| {a} | " + " | ".join(cells) + f" | {_ms([r['arms'][a]['mean_iou'] for r in runs])} |")
    w("")


def _ablations(w: Writer, runs: list[dict[str, Any]]) -> None:
    abl = [a for a in ABLATIONS if all(a in r["arms"] for r in runs)]
    if not abl:
        return
    w("## Ablations (Section 7.1 of the paper), mean IU on CamVid val (%)")
    w("")
    w("| Variant | Mean IU | Δ vs (c) | Δ vs (a) FCN | fine-tuning steps (CPU s), per seed |")
    w("|---|---:|---:|---:|---|")
    for a in ["crfrnn"] + abl:
        desc = ("(c) CRF-RNN: matrix kernel weights, learned compatibility, T=10 test" if a == "crfrnn"
                else ABLATIONS[a][0])
        dc = [r["arms"][a]["mean_iou"] - r["arms"]["crfrnn"]["mean_iou"] for r in runs]
        da = [r["arms"][a]["mean_iou"] - r["arms"]["fcn"]["mean_iou"] for r in runs]
        ft = ", ".join(
            f"{r['arms'][a]['steps']} "
            f"({r['timing']['phases_s'].get('finetune_' + r['arms'][a]['checkpoint'].split('/')[1], 0):.0f})"
            for r in runs)
        w(f"| `{a}`: {desc} | {_ms([r['arms'][a]['mean_iou'] for r in runs])} | "
          f"{'' if a == 'crfrnn' else _ms(dc, 2)} | {_ms(da, 2)} | {ft} |")
    w("")
    w("Δ columns: mean ± std over seeds of the per-seed difference (percentage points). `crfrnn_T5` re-uses "
      "(c)'s weights, so its steps are (c)'s. Each fine-tuning arm got its share of what was left of the budget "
      "when it started (see the time table), so the arms did not all train for the same time.")
    w("")


def _time_cell(r: dict[str, Any], k: str) -> str:
    c = r["timing"]["phases_s"].get(k, 0.0)
    wall = r["timing"].get("phases_wall_s", {}).get(k)
    return f"{c:.0f}" + (f" / {wall:.0f}" if wall is not None else "")


def _times(w: Writer, runs: list[dict[str, Any]]) -> None:
    w("## Time per phase (CPU seconds of the run's process / wall-clock seconds)")
    w("")
    w("The budget is counted in CPU seconds of the experiment's own process (one torch thread, one lattice thread): "
      "the 2-core machine was shared with other jobs that reniced or paused this one, so wall-clock time measures "
      "them more than this experiment. Wall-clock seconds are listed after the slash.")
    w("")
    phases: list[str] = []
    for r in runs:
        for k in r["timing"]["phases_s"]:
            if k not in phases:
                phases.append(k)
    w("| Phase | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |")
    w("|---|" + "---:|" * len(runs))
    for k in phases:
        w(f"| {k} | " + " | ".join(_time_cell(r, k) for r in runs) + " |")
    w("| **total** | " + " | ".join(
        f"{r['timing']['total_s']:.0f}"
        + (f" / {r['timing']['total_wall_s']:.0f}" if "total_wall_s" in r["timing"] else "")
        for r in runs) + " |")
    w("| budget | " + " | ".join(f"{r['timing']['budget_s']:.0f}" for r in runs) + " |")
    w("")


def make_report(runs: list[dict[str, Any]], png_path: Path | None, png_rel: str | None,
                discussion: str | None, commands: list[str] | None) -> str:
    """The markdown page: set-up, Table 1, per-class IU, ablations, times, picture, commands, discussion."""
    n = len(runs)
    lines: list[str] = []
    w = lines.append
    w("# Experiments: CRF-RNN Table 1 at small scale on CamVid")
    w("")
    w("Generated by `experiments/camvid_table1.py --report` from "
      f"{n} run(s) (seeds {', '.join(str(r['seed']) for r in runs)}); every number below comes from the runs' "
      "`results.json`.")
    w("")
    for section in (_setup, _table1, _per_class, _ablations, _times):
        section(w, runs)
    if png_rel:
        w("## Learned compatibility matrix")
        w("")
        w(f"![learned compatibility]({png_rel})")
        w("")
        w(f"The compatibility matrix μ of arm (c) after fine-tuning, averaged over the {n} seed(s) (initialised to "
          "Potts −I; the layer outputs `unary − μ · messages`, so a negative entry (l, l′) means label l is "
          "encouraged where the kernels see l′, a positive one that it is penalised).")
        w("")
    w("## Commands")
    w("")
    w("```")
    for c in list(commands or []) + [r["command"] for r in runs]:
        w(c)
    w("```")
    w("")
    if discussion:
        w("## Discussion")
        w("")
        w(discussion.strip())
        w("")
    return "\n".join(lines)


def _picture(args, runs: list[dict[str, Any]], out: Path) -> tuple[Path | None, str | None]:
    """Write the PNG of (c)'s learned compatibility (mean over seeds); (path, path relative to the page)."""
    mats = [np.array(r["arms"]["crfrnn"]["learned"]["compatibility_matrix"], dtype=np.float64) for r in runs]
    mat = np.mean(mats, axis=0)
    if mat.ndim == 3:  # untied: last iteration's matrix
        mat = mat[-1]
    try:
        from crfrnn.viz import compat_heatmap  # noqa: PLC0415
    except ImportError:
        return None, None
    png_path = Path(args.picture) if args.picture else out.with_name("camvid_compat.png")
    img = compat_heatmap(mat, runs[0]["class_names"], title="CamVid CRF-RNN learned compatibility")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_bytes(png_path, buf.getvalue())
    return png_path, os.path.relpath(png_path, out.parent)


def report(args) -> str:
    runs = _load_results(args.report)
    out = Path(args.output)
    png_path, png_rel = (None, None) if args.no_picture else _picture(args, runs, out)
    discussion = Path(args.discussion).read_text(encoding="utf-8") if args.discussion else None
    text = make_report(runs, png_path, png_rel, discussion, args.commands)
    atomic_bytes(out, text.encode("utf-8"))
    return text
