"""The report of the full-resolution reproduction: a generated markdown page (docs/experiments.md), its figures and
``summary.json``, from the run folders ``<runs>/<dataset>/seed<k>/`` (results.json, confusion.npz, figures.npz;
the format is the runner's contract, /work/notes/fullres_schema.md).

Every number on the page comes from those files: the arms' scores from ``results.json``, the paired differences
and their 95 % bootstrap intervals from the per-image confusions (:func:`crfrnn.engine.stats.paired_bootstrap`,
images and seeds resampled). The page says what is missing (a seed folder without results, an arm a seed lacks)
instead of failing. The only hand-written part is ``experiments/fullres/discussion.md``, copied under
"Discussion".

    python -m experiments.fullres.report --runs DIR --output docs/experiments.md --figures docs/figures/fullres
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from crfrnn.engine.metrics import mean_iou
from crfrnn.engine.runfiles import atomic_write, write_text
from crfrnn.engine.stats import paired_bootstrap
from crfrnn.viz import palette

from .settings import ARMS as _ARM_LABELS
from .settings import FINETUNED, SETTINGS

__all__ = ["write_report", "load_runs", "main", "ARMS", "PAIRS", "DISCUSSION_FILE"]

#: The arms, in report order (the runner's), and the paper-style tag of each.
ARMS = tuple(_ARM_LABELS)
TAGS = {"fcn": "(a)", "fcn_plus": "(a+)", "crf_post": "(b)", "crfrnn": "(c)", "crfrnn_theta": "(d)",
        "crf_only": "crf-only"}
#: Paired differences reported, ``(x, y)`` meaning score(x) − score(y) on the same images and seeds.
PAIRS = (("crf_post", "fcn"), ("crfrnn", "fcn"), ("crfrnn", "fcn_plus"), ("crfrnn", "crf_post"),
         ("crfrnn_theta", "crfrnn"), ("crfrnn_theta", "crf_post"), ("fcn_plus", "fcn"), ("crf_only", "crf_post"))
#: Arms with a learning curve (the fine-tuned ones).
CURVE_ARMS = FINETUNED
#: Columns of the picture grid (Figure 4 of the paper), between the photo and the truth.
PICTURE_ARMS = (("fcn", "FCN"), ("crf_post", "+ CRF"), ("crfrnn", "CRF-RNN"), ("crfrnn_theta", "(d) θ learned"))
CRF_KEYS = ("theta_alpha", "theta_beta", "theta_gamma", "spatial_weight", "bilateral_weight")
THETA_KEYS = CRF_KEYS[:3]
#: Known datasets come first, in this order; other dataset folders follow alphabetically.
DATASETS = tuple(SETTINGS)
#: The hand-written discussion copied into the page.
DISCUSSION_FILE = Path(__file__).with_name("discussion.md")
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
DIGITS = 1  #: decimals of scores in percent
DELTA_DIGITS = 2  #: decimals of differences in percentage points
_DPI = 100
_SEED_DIR = re.compile(r"^seed(\d+)$")

Writer = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- loading
@dataclass
class SeedRun:
    """One ``<dataset>/seed<k>/`` folder; ``results`` is None when it could not be read (``problem`` says why)."""

    seed: int
    folder: Path
    results: dict[str, Any] | None = None
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def arm(self, arm: str) -> dict[str, Any] | None:
        return (self.results or {}).get("arms", {}).get(arm)


@dataclass
class DatasetRuns:
    name: str
    seeds: list[SeedRun]

    @property
    def good(self) -> list[SeedRun]:
        """The seeds whose results.json was read."""
        return [s for s in self.seeds if s.results is not None]

    @property
    def arms(self) -> list[str]:
        """Arms present in at least one seed, known ones in :data:`ARMS` order, unknown ones after."""
        found = {a for s in self.good for a in s.results.get("arms", {})}
        return [a for a in ARMS if a in found] + sorted(found - set(ARMS))

    @property
    def first(self) -> dict[str, Any]:
        return self.good[0].results


def _read_npz(path: Path, problems: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        problems.append(f"unreadable {path.name} ({e})")
        return {}


def _load_seed(folder: Path, seed: int) -> SeedRun:
    run = SeedRun(seed, folder)
    f = folder / "results.json"
    if not f.is_file():
        run.problems.append("no results.json (missing run)")
        return run
    try:
        results = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.problems.append(f"unreadable results.json ({e})")
        return run
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict):
        run.problems.append("results.json has no 'arms' object")
        return run
    run.results = results
    run.confusion = _read_npz(folder / "confusion.npz", run.problems)
    return run


def _dataset_order(name: str) -> tuple[int, str]:
    return (DATASETS.index(name), "") if name in DATASETS else (len(DATASETS), name)


def load_runs(run_root: Path) -> list[DatasetRuns]:
    """Every ``<run_root>/<dataset>/seed<k>/`` folder, datasets in :data:`DATASETS` order, seeds by number."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise FileNotFoundError(f"run_root {run_root} is not a folder")
    out = []
    for d in sorted((p for p in run_root.iterdir() if p.is_dir()), key=lambda p: _dataset_order(p.name)):
        seeds = sorted((int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _SEED_DIR.match(p.name)))
        if seeds:
            out.append(DatasetRuns(d.name, [_load_seed(p, k) for k, p in seeds]))
    return out


# ---------------------------------------------------------------------------------------------- aggregates
def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; None with one value) of the non-null values, as fractions."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    mean = float(np.mean(v)) if v else None
    std = float(np.std(v, ddof=1)) if len(v) > 1 else None
    return {"values": list(values), "n": len(v), "mean": mean, "std": std}


def _arm_summary(ds: DatasetRuns, arm: str, radii: list[int]) -> dict[str, Any]:
    seeds = [s for s in ds.good if s.arm(arm) is not None]
    rec = [s.arm(arm) for s in seeds]
    L = len(ds.first.get("class_names", []))
    trimap = [(r.get("trimap_mean_iou") or []) for r in rec]
    classes = [(r.get("class_iou") or []) for r in rec]
    return {
        "seeds": [s.seed for s in seeds],
        "label": rec[0].get("label", arm) if rec else arm,
        "mean_iou": _stats([r.get("mean_iou") for r in rec]),
        "pixel_accuracy": _stats([r.get("pixel_accuracy") for r in rec]),
        "trimap_mean_iou": [_stats([t[k] if k < len(t) else None for t in trimap]) for k in range(len(radii))],
        "class_iou": [_stats([c[k] if k < len(c) else None for c in classes]) for k in range(L)],
        "crf": {str(s.seed): s.arm(arm).get("crf") for s in seeds if s.arm(arm).get("crf")},
    }


def _missing(ds: DatasetRuns, all_seeds: Sequence[int]) -> list[str]:
    """What the page reports as missing: seed folders other datasets have, unreadable seeds, arms a seed lacks,
    confusions a seed lacks."""
    have = {s.seed for s in ds.seeds}
    out = [f"seed {k}: no seed{k} folder (other datasets have one)" for k in all_seeds if k not in have]
    out += [f"seed {s.seed}: {p}" for s in ds.seeds for p in s.problems]
    for arm in ds.arms:
        lacking = [s.seed for s in ds.good if s.arm(arm) is None]
        if lacking:
            out.append(f"arm `{arm}` {TAGS.get(arm, '')}: missing in seed(s) {', '.join(map(str, lacking))}")
        no_conf = [s.seed for s in ds.good if s.arm(arm) is not None and s.confusion
                   and f"{arm}/image" not in s.confusion]
        if no_conf:
            out.append(f"arm `{arm}`: no per-image confusions in seed(s) {', '.join(map(str, no_conf))}")
    absent = [a for a in ARMS if a not in ds.arms]
    if absent:
        out.append("not run in any seed: " + ", ".join(f"`{a}` {TAGS[a]}" for a in absent))
    return out


def _consistency(ds: DatasetRuns) -> list[str]:
    """Seeds whose results.json mean IU differs from the mean IU of its summed per-image confusions, or whose
    trimap radii differ from the first seed's (the columns follow the first seed)."""
    radii = ds.first.get("trimap_radii")
    out = [f"seed {s.seed}: trimap radii {s.results.get('trimap_radii')}, not {radii}"
           for s in ds.good if s.results.get("trimap_radii") != radii]
    for s in ds.good:
        for arm, rec in s.results["arms"].items():
            conf = s.confusion.get(f"{arm}/image")
            if conf is None or rec.get("mean_iou") is None:
                continue
            again = mean_iou(torch.from_numpy(conf).sum(0))
            if not math.isclose(again, rec["mean_iou"], abs_tol=1e-6):
                out.append(f"seed {s.seed}, `{arm}`: results.json mean IU {rec['mean_iou']:.6f} but its confusions "
                           f"give {again:.6f}")
    return out


def _band(conf: np.ndarray, band: int | None) -> np.ndarray:
    return conf if band is None else conf[band]


def _pair(ds: DatasetRuns, x: str, y: str, band: int | None, num_resamples: int) -> dict[str, Any]:
    """Bootstrap of score(x) − score(y) over the seeds that have both arms' confusions."""
    key = "image" if band is None else "trimap"
    seeds = [s for s in ds.good if f"{x}/{key}" in s.confusion and f"{y}/{key}" in s.confusion]
    out: dict[str, Any] = {"x": x, "y": y, "band": band, "seeds": [s.seed for s in seeds]}
    if not seeds:
        out["missing"] = f"no seed has the confusions of both `{x}` and `{y}`"
        return out
    if len({json.dumps(s.results.get("data", {}).get("val_names")) for s in seeds}) > 1:
        out["missing"] = "the seeds' val_names differ: images cannot be paired across seeds"
        return out
    try:
        cy, cx = (torch.from_numpy(np.stack([_band(s.confusion[f"{a}/{key}"], band) for s in seeds]))
                  for a in (y, x))
        res = paired_bootstrap(cy, cx, num_resamples=num_resamples, confidence=CONFIDENCE, seed=BOOTSTRAP_SEED)
    except (ValueError, IndexError) as e:  # seeds on different images, an empty band: reported, not fatal
        out["missing"] = str(e)
        return out
    out.update(res.to_dict())
    return out


def _pairs(ds: DatasetRuns, radii: list[int], num_resamples: int) -> list[dict[str, Any]]:
    bands: list[int | None] = [None, *range(len(radii))]
    return [_pair(ds, x, y, b, num_resamples) for x, y in PAIRS for b in bands]


def _protocol(s: SeedRun) -> dict[str, Any]:
    r = s.results
    keep = ("dataset", "num_classes", "class_names", "unary_scale", "full_resolution", "trimap_radii", "data",
            "fcn", "timing", "environment", "config", "curve_images", "figures")
    return {k: r.get(k) for k in keep}


def _summarise(ds: DatasetRuns, all_seeds: Sequence[int], num_resamples: int) -> dict[str, Any]:
    if not ds.good:
        return {"seeds": [], "missing": _missing(ds, all_seeds)}
    radii = list(ds.first.get("trimap_radii", []))
    return {
        "seeds": [s.seed for s in ds.good],
        "trimap_radii": radii,
        "class_names": list(ds.first.get("class_names", [])),
        "missing": _missing(ds, all_seeds),
        "inconsistent": _consistency(ds),
        "arms": {a: _arm_summary(ds, a, radii) for a in ds.arms},
        "pairs": _pairs(ds, radii, num_resamples),
        "grid_search_seed": ds.good[0].seed,
        "grid_search": ds.first.get("grid_search"),
        "protocol": {str(s.seed): _protocol(s) for s in ds.good},
    }


# ----------------------------------------------------------------------------------------------- formatting
def _pct(x: float | None, digits: int = DIGITS) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100.0 * x:.{digits}f}"


def _mean_std(st: dict[str, Any]) -> str:
    """``mean ± std`` in percent (just the mean for one seed, "missing" for none)."""
    if st["mean"] is None:
        return "missing"
    if st["std"] is None:
        return _pct(st["mean"])
    return f"{_pct(st['mean'])} ± {_pct(st['std'])}"


def _delta(p: dict[str, Any]) -> str:
    if "missing" in p:
        return "missing"
    d = DELTA_DIGITS
    return f"{100 * p['difference']:+.{d}f} [{100 * p['low']:+.{d}f}, {100 * p['high']:+.{d}f}]"


def _arm_name(arm: str) -> str:
    return f"{TAGS.get(arm, '')} `{arm}`".strip()


def _pair_name(x: str, y: str) -> str:
    return f"{TAGS.get(x, x)} − {TAGS.get(y, y)}"


def _table(w: Writer, header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> None:
    w("| " + " | ".join(header) + " |")
    w("|---|" + "|".join(align for _ in header[1:]) + "|")
    for row in rows:
        w("| " + " | ".join(row) + " |")
    w("")


def _distinct(ds: DatasetRuns, get: Callable[[dict[str, Any]], Any]) -> str:
    """A fact that should be equal in every seed: the value, or each seed's when they differ."""
    vals = [(s.seed, get(s.results)) for s in ds.good]
    if len({json.dumps(v, sort_keys=True, default=str) for _, v in vals}) == 1:
        return str(vals[0][1])
    return "; ".join(f"seed {k}: {v}" for k, v in vals)


# -------------------------------------------------------------------------------------------- page sections
def _protocol_section(w: Writer, ds: DatasetRuns) -> None:
    def data(k):
        return _distinct(ds, lambda r: r.get("data", {}).get(k))

    def fcn(k):
        return _distinct(ds, lambda r: r.get("fcn", {}).get(k))

    w("### Protocol")
    w("")
    w(f"* Seeds: {', '.join(str(s.seed) for s in ds.good)}.")
    w(f"* Split: {data('num_train')} training, {data('num_held_apart')} held-apart (CRF grid search), "
      f"{data('num_val')} val images. {data('split')}")
    w(f"* Classes ({_distinct(ds, lambda r: r.get('num_classes'))}): "
      f"{_distinct(ds, lambda r: ', '.join(r.get('class_names', [])))}; ignore index "
      f"{_distinct(ds, lambda r: r.get('ignore_index'))}.")
    w(f"* Evaluated at full resolution: {_distinct(ds, lambda r: r.get('full_resolution'))}; "
      f"unary scale {_distinct(ds, lambda r: r.get('unary_scale'))}; trimap radii "
      f"{_distinct(ds, lambda r: r.get('trimap_radii'))} px.")
    w(f"* FCN: {fcn('num_parameters')} parameters, input {fcn('input_size')}.")
    env = ds.first.get("environment", {})
    w(f"* Environment (seed {ds.good[0].seed}): torch {env.get('torch')}, python {env.get('python')}, "
      f"{env.get('threads')} threads, {env.get('machine')}.")
    w("")
    _timing_table(w, ds)
    w("<details><summary>Run configuration (seed {})</summary>\n".format(ds.good[0].seed))
    w("```json")
    w(json.dumps(ds.first.get("config", {}), indent=1, sort_keys=True, default=str))
    w("```")
    w("</details>")
    w("")


def _seconds(x: Any) -> str:
    return "–" if not isinstance(x, (int, float)) else f"{x:.0f}"


def _steps(s: SeedRun, arm: str) -> str:
    steps = (s.arm(arm) or {}).get("steps")
    return "–" if steps is None else str(steps)


def _timing_table(w: Writer, ds: DatasetRuns) -> None:
    rows = []
    for s in ds.good:
        fcn, t = s.results.get("fcn", {}), s.results.get("timing", {})
        phases = ", ".join(f"{k} {_seconds(v)}" for k, v in (t.get("phases_s") or {}).items())
        rows.append([str(s.seed), str(fcn.get("steps", "–")), _seconds(fcn.get("seconds")),
                     _steps(s, "crfrnn"), _steps(s, "crfrnn_theta"), _seconds(t.get("total_s")),
                     _seconds(t.get("wall_s")), phases or "–"])
    w("Budget and time per seed (seconds):")
    w("")
    _table(w, ["seed", "FCN steps", "FCN s", "(c) steps", "(d) steps", "total s", "wall s", "phases (s)"], rows)


def _results_section(w: Writer, summ: dict[str, Any]) -> None:
    radii = summ["trimap_radii"]
    w("### Scores (val, %, mean ± std over seeds)")
    w("")
    header = ["arm", "mean IU", "pixel acc.", *[f"trimap IU r={r}" for r in radii], "seeds"]
    rows = [[_arm_name(a), _mean_std(s["mean_iou"]), _mean_std(s["pixel_accuracy"]),
             *[_mean_std(t) for t in s["trimap_mean_iou"]], str(len(s["seeds"]))]
            for a, s in summ["arms"].items()]
    _table(w, header, rows)
    w("Std is the sample standard deviation over seeds (ddof = 1); one seed shows its value alone. Trimap IU: mean "
      "IU of the pixels within r px of a ground-truth boundary.")
    w("")


def _class_section(w: Writer, summ: dict[str, Any]) -> None:
    arms = list(summ["arms"])
    w("### Per-class IU (val, %, mean over seeds)")
    w("")
    rows = [[name, *[_pct(summ["arms"][a]["class_iou"][k]["mean"]) if k < len(summ["arms"][a]["class_iou"])
                     else "–" for a in arms]]
            for k, name in enumerate(summ["class_names"])]
    _table(w, ["class", *[TAGS.get(a, a) for a in arms]], rows)


def _pairs_section(w: Writer, summ: dict[str, Any], num_resamples: int) -> None:
    radii = summ["trimap_radii"]
    by = {(p["x"], p["y"], p["band"]): p for p in summ["pairs"]}
    w(f"### Paired differences (percentage points, {CONFIDENCE:.0%} bootstrap CI)")
    w("")
    w(f"Δ = score(first) − score(second) on the same val images and seeds; the interval is the percentile "
      f"interval of {num_resamples} paired resamples of the images and of the seeds "
      "(`crfrnn.engine.stats.paired_bootstrap`). Trimap columns: mean IU within r px of a boundary.")
    w("")
    rows = []
    for x, y in PAIRS:
        cells = [_delta(by[(x, y, b)]) for b in [None, *range(len(radii))]]
        rows.append([_pair_name(x, y), *cells, ", ".join(map(str, by[(x, y, None)]["seeds"])) or "–"])
    _table(w, ["pair", "mean IU", *[f"trimap r={r}" for r in radii], "seeds"], rows)
    notes = sorted({f"{_pair_name(p['x'], p['y'])}: {p['missing']}" for p in summ["pairs"] if "missing" in p})
    for n in notes:
        w(f"* {n}")
    if notes:
        w("")


def _grid_section(w: Writer, summ: dict[str, Any]) -> None:
    g = summ.get("grid_search")
    w(f"### Grid search of (b)'s parameters (seed {summ['grid_search_seed']})")
    w("")
    if not g or not g.get("results"):
        w("missing (no grid_search in results.json)")
        w("")
        return
    best = g.get("best") or {}
    w(f"Held-apart images: {g.get('num_images')}; the FCN's mean IU on them: "
      f"{_pct(g.get('fcn_mean_iou_same_images'), DELTA_DIGITS)} %.")
    w("")
    rows = []
    for r in sorted(g["results"], key=lambda r: -(r.get("held_apart_mean_iou") or -1.0)):
        chosen = best and all(r.get(k) == best.get(k) for k in CRF_KEYS)
        marks = [m for m, on in (("**chosen**", chosen), ("VOC default rescaled", r.get("voc_default_rescaled")))
                 if on]
        rows.append([*[f"{r.get(k)}" for k in CRF_KEYS], _pct(r.get("held_apart_mean_iou"), DELTA_DIGITS),
                     ", ".join(marks)])
    _table(w, ["θα", "θβ", "θγ", "w spatial", "w bilateral", "held-apart mean IU (%)", ""], rows)


def _crf_section(w: Writer, summ: dict[str, Any], theta_png: str | None) -> None:
    w("### CRF parameters per seed")
    w("")
    rows = [[_arm_name(a), seed, *[f"{crf.get(k, float('nan')):.4g}" for k in CRF_KEYS]]
            for a, s in summ["arms"].items() for seed, crf in s["crf"].items()]
    if rows:
        w("(b) holds the grid search's choice, the initialisation of (c) and (d); (c) learns the kernel weights, "
          "(d) the bandwidths θ too.")
        w("")
        _table(w, ["arm", "seed", *["θα", "θβ", "θγ", "w spatial", "w bilateral"]], rows)
    else:
        w("missing (no arm has a `crf` entry)")
        w("")
    if theta_png:
        w(f"![θ of (d) during training]({theta_png})")
        w("")


# ------------------------------------------------------------------------------------------------- figures
def _figure(width_in: float, height_in: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot state), as :mod:`crfrnn.viz` draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI, facecolor="white"))
    return path


def _colours(arms: Sequence[str]) -> dict[str, str]:
    return {a: f"C{ARMS.index(a) if a in ARMS else len(ARMS) + k}" for k, a in enumerate(arms)}


def _learning_curves(runs: list[DatasetRuns], path: Path) -> Path | None:
    panels = [ds for ds in runs if any(s.results.get("curves") for s in ds.good)]
    if not panels:
        return None
    fig = _figure(5.0 * len(panels), 3.8)
    colours = _colours(ARMS)
    for ax, ds in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for k, s in enumerate(ds.good):
            for arm in CURVE_ARMS:
                pts = [p for p in (s.results.get("curves") or {}).get(arm) or []
                       if isinstance(p.get("step"), (int, float)) and isinstance(p.get("mean_iou"), (int, float))]
                if pts:
                    ax.plot([p["step"] for p in pts], [100 * p["mean_iou"] for p in pts], color=colours[arm],
                            linestyle=("-", "--", ":", "-.")[k % 4], marker="o", markersize=3,
                            label=f"{TAGS[arm]} seed {s.seed}")
        ax.set_title(ds.name, loc="left")
        ax.set_xlabel("step")
        ax.set_ylabel("val-subset mean IU (%)")
        ax.grid(True, color="0.88")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _trimap_curves(runs: list[DatasetRuns], summaries: dict[str, dict], path: Path) -> Path | None:
    rows = [ds for ds in runs if summaries[ds.name].get("trimap_radii")]
    if not rows:
        return None
    fig = _figure(10.0, 3.6 * len(rows))
    colours = _colours(ARMS)
    for (left, right), ds in zip(fig.subplots(len(rows), 2, squeeze=False), rows):
        summ = summaries[ds.name]
        radii = summ["trimap_radii"]
        for arm, s in summ["arms"].items():
            m = [np.nan if t["mean"] is None else 100 * t["mean"] for t in s["trimap_mean_iou"]]
            e = [0.0 if t["std"] is None else 100 * t["std"] for t in s["trimap_mean_iou"]]
            left.errorbar(radii, m, yerr=e, color=colours[arm], marker="o", capsize=3, label=TAGS.get(arm, arm))
        _delta_panel(right, summ, colours)
        left.set_title(f"{ds.name}: trimap IU", loc="left")
        left.set_ylabel("mean IU in band (%)")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(radii, [str(r) for r in radii])
            ax.set_xlabel("band radius (px)")
            ax.grid(True, color="0.88")
            ax.legend(fontsize=7)
    return _save(fig, path)


def _delta_panel(ax, summ: dict[str, Any], colours: dict[str, str]) -> None:
    """Δ vs (b) per band: the bootstrap estimates and intervals of the pairs (x) − (b) of :data:`PAIRS`."""
    radii = summ["trimap_radii"]
    for x, y in PAIRS:
        if y != "crf_post":
            continue
        ps = [p for p in summ["pairs"] if p["x"] == x and p["y"] == y and p["band"] is not None]
        ok = [(radii[p["band"]], 100 * p["difference"], 100 * p["low"], 100 * p["high"]) for p in ps
              if "missing" not in p]
        if ok:
            r, d, lo, hi = map(np.asarray, zip(*ok))
            ax.errorbar(r, d, yerr=[d - lo, hi - d], color=colours[x], marker="o", capsize=3,
                        label=_pair_name(x, y))
    ax.axhline(0.0, color="0.4", linewidth=0.8)
    ax.set_title(f"Δ vs (b), {CONFIDENCE:.0%} CI", loc="left")
    ax.set_ylabel("Δ mean IU in band (pp)")


def _theta_plot(ds: DatasetRuns, path: Path) -> Path | None:
    seeds = [s for s in ds.good if s.results.get("theta_trajectory")]
    if not seeds:
        return None
    fig = _figure(12.0, 3.4)
    for ax, key in zip(fig.subplots(1, 3), THETA_KEYS):
        for s in seeds:
            traj = [p for p in s.results["theta_trajectory"] if isinstance(p.get(key), (int, float))]
            ax.plot([p.get("step") for p in traj], [p[key] for p in traj], marker="o", markersize=3,
                    label=f"seed {s.seed}")
        ax.set_title(f"{ds.name}: (d) {key}", loc="left")
        ax.set_xlabel("step")
        ax.grid(True, color="0.88")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _label_palette(dataset: str) -> np.ndarray:
    """256 colours for the labels; 255 (void) black."""
    pal = palette("camvid" if dataset == "camvid" else "voc", 256).copy()
    pal[255] = 0
    return pal


def _picture_grid(ds: DatasetRuns, path: Path) -> tuple[Path | None, str | None]:
    """Figure 4 of the paper from the first seed's figures.npz; (path, None) or (None, why not)."""
    s = ds.good[0]
    names = (s.results.get("figures") or {}).get("names") or []
    problems: list[str] = []
    z = _read_npz(s.folder / "figures.npz", problems)
    if problems or not names:
        return None, f"seed {s.seed}: " + ("; ".join(problems) or "no figure names in results.json")
    pal = _label_palette(ds.name)
    h, w = z[f"{names[0]}/truth"].shape
    cols = [("image", "image"), *PICTURE_ARMS, ("truth", "truth")]
    fig = _figure(1.8 * len(cols), 1.8 * len(names) * h / w + 0.4)
    axes = fig.subplots(len(names), len(cols), squeeze=False)
    for i, name in enumerate(names):
        for j, (key, title) in enumerate(cols):
            ax = axes[i][j]
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
            a = z.get(f"{name}/{key}")
            if a is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, color="0.4")
                continue
            ax.imshow(a if key == "image" else pal[a.astype(np.int64)], interpolation="nearest")
    return _save(fig, path), None


def _rel(path: Path | None, output_md: Path) -> str | None:
    if path is None:
        return None
    return Path(os.path.relpath(path.resolve(), output_md.parent.resolve())).as_posix()


# ------------------------------------------------------------------------------------------------ the page
def _discussion(w: Writer, discussion: Path) -> None:
    w("## Discussion")
    w("")
    w(f"<!-- hand-written: {DISCUSSION_FILE.name} next to the report module, copied verbatim -->")
    w("")
    w(discussion.read_text(encoding="utf-8").rstrip("\n") if discussion.is_file() else "(no discussion written)")
    w("")


def _dataset_section(w: Writer, ds: DatasetRuns, summ: dict[str, Any], figs: dict[str, str | None],
                     num_resamples: int) -> None:
    w(f"## {ds.name}")
    w("")
    if summ["missing"]:
        w("**Missing:**")
        w("")
        for m in summ["missing"]:
            w(f"* {m}")
        w("")
    if not ds.good:
        w("No seed of this dataset could be read.")
        w("")
        return
    for m in summ["inconsistent"]:
        w(f"* **Inconsistent:** {m}")
    if summ["inconsistent"]:
        w("")
    _protocol_section(w, ds)
    _results_section(w, summ)
    _class_section(w, summ)
    _pairs_section(w, summ, num_resamples)
    _grid_section(w, summ)
    _crf_section(w, summ, figs.get("theta"))
    w(f"### Pictures (seed {ds.good[0].seed})")
    w("")
    w(f"![picture grid]({figs['pictures']})" if figs.get("pictures") else f"missing: {figs.get('pictures_why')}")
    w("")


def _figures(runs: list[DatasetRuns], summaries: dict[str, dict], figures_dir: Path,
             output_md: Path) -> dict[str, Any]:
    """Draw every figure; the markdown links (relative to the page), per dataset and for all."""
    out: dict[str, Any] = {"curves": _rel(_learning_curves(runs, figures_dir / "learning_curves.png"), output_md),
                           "trimap": _rel(_trimap_curves(runs, summaries, figures_dir / "trimap_curves.png"),
                                          output_md)}
    for ds in runs:
        if not ds.good:
            continue
        pics, why = _picture_grid(ds, figures_dir / f"pictures_{ds.name}.png")
        out[ds.name] = {"theta": _rel(_theta_plot(ds, figures_dir / f"theta_{ds.name}.png"), output_md),
                        "pictures": _rel(pics, output_md), "pictures_why": why}
    return out


def _page(runs: list[DatasetRuns], summaries: dict[str, dict], figs: dict[str, Any], command: str,
          num_resamples: int, discussion: Path) -> str:
    lines: list[str] = []
    w = lines.append
    w("<!-- GENERATED FILE: do not edit by hand. -->")
    w("# Full-resolution reproduction")
    w("")
    w(f"> Generated by `{command}` from the run folders' results.json / confusion.npz / figures.npz. Do not edit "
      f"by hand: rerun the command. The discussion is `experiments/fullres/{DISCUSSION_FILE.name}`.")
    w("")
    w("Arms: " + "; ".join(f"{TAGS[a]} `{a}`" for a in ARMS) + ". Scores are on the val images at full resolution.")
    w("")
    for ds in runs:
        _dataset_section(w, ds, summaries[ds.name], figs.get(ds.name, {}), num_resamples)
    w("## Curves")
    w("")
    for key, alt in (("curves", "learning curves"), ("trimap", "trimap curves")):
        w(f"![{alt}]({figs[key]})" if figs.get(key) else f"{alt}: missing (no data)")
        w("")
    _discussion(w, discussion)
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so that the summary is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(run_root: Path, output_md: Path, figures_dir: Path, *, num_resamples: int = 2000,
                 command: str | None = None, summary_json: Path | None = None,
                 discussion: Path | None = None) -> dict:
    """Write the page ``output_md``, its PNG figures into ``figures_dir`` and ``summary_json``.

    Args:
        run_root: holds ``<dataset>/seed<k>/`` folders (results.json, confusion.npz, figures.npz).
        output_md: the markdown page (docs/experiments.md); figures are linked relative to it.
        figures_dir: folder of the PNG figures (created).
        num_resamples: bootstrap draws per paired difference.
        command: the command line named in the page's header (default: the equivalent CLI call).
        summary_json: every number on the page (default ``run_root/"summary.json"``).
        discussion: the hand-written discussion (default :data:`DISCUSSION_FILE`); absent: a placeholder.

    Returns:
        The summary written to ``summary_json`` (fractions, not percent).
    """
    run_root, output_md, figures_dir = Path(run_root), Path(output_md), Path(figures_dir)
    summary_json = run_root / "summary.json" if summary_json is None else Path(summary_json)
    if command is None:
        command = shlex.join(["python", "-m", "experiments.fullres.report", "--runs", str(run_root),
                              "--output", str(output_md), "--figures", str(figures_dir)])
    runs = load_runs(run_root)
    if not runs:
        raise FileNotFoundError(f"no <dataset>/seed<k>/ folders under {run_root}")
    all_seeds = sorted({s.seed for ds in runs for s in ds.seeds})
    summaries = {ds.name: _summarise(ds, all_seeds, num_resamples) for ds in runs}
    figs = _figures(runs, summaries, figures_dir, output_md)
    text = _page(runs, summaries, figs, command, num_resamples,
                 DISCUSSION_FILE if discussion is None else Path(discussion))
    summary = _json_safe({"command": command, "num_resamples": num_resamples, "confidence": CONFIDENCE,
                          "bootstrap_seed": BOOTSTRAP_SEED, "figures": figs, "datasets": summaries})
    output_md.parent.mkdir(parents=True, exist_ok=True)
    write_text(output_md, text + "\n")
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    write_text(summary_json, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.fullres.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, type=Path, help="folder holding <dataset>/seed<k>/ run folders")
    p.add_argument("--output", type=Path, default=Path("docs/experiments.md"), help="the markdown page")
    p.add_argument("--figures", type=Path, default=Path("docs/figures/fullres"), help="folder of the PNG figures")
    p.add_argument("--summary", type=Path, default=None, help="summary JSON (default: RUNS/summary.json)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per difference")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.fullres.report", *argv])
    write_report(args.runs, args.output, args.figures, num_resamples=args.resamples, command=command,
                 summary_json=args.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
