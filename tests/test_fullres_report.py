"""The full-resolution report: synthetic run folders that follow the runner's schema, the page's numbers checked
against the confusions (mean ± std over seeds, the bootstrap interval called directly), figures, summary.json,
and a missing arm reported instead of failing."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from crfrnn.engine.metrics import class_iou, mean_iou, pixel_accuracy
from crfrnn.engine.stats import paired_bootstrap
from experiments.fullres import report

L, N, RADII = 3, 6, [2, 4, 8, 16]
H, W = 8, 10
DATASETS = ("camvid", "weizmann-horse")
SEEDS = (0, 1)
RESAMPLES = 200
CRF = {"theta_alpha": 80.0, "theta_beta": 13.0, "theta_gamma": 3.0, "spatial_weight": 3.0, "bilateral_weight": 5.0}


def _confusions(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random per-image confusions with a heavy diagonal (a plausible segmenter)."""
    c = rng.integers(0, 8, (*shape, L, L))
    return (c + np.eye(L, dtype=np.int64) * rng.integers(10, 40, (*shape, 1, 1))).astype(np.int64)


def _scores(image: np.ndarray, trimap: np.ndarray) -> dict:
    total = torch.from_numpy(image).sum(0)
    return {"mean_iou": mean_iou(total), "pixel_accuracy": pixel_accuracy(total),
            "class_iou": [None if v != v else v for v in class_iou(total).tolist()],
            "trimap_mean_iou": [mean_iou(torch.from_numpy(t).sum(0)) for t in trimap]}


def _arm_record(arm: str, scores: dict, rng: np.random.Generator) -> dict:
    crf = None if arm in ("fcn", "fcn_plus") else {k: float(v * rng.uniform(0.8, 1.2)) for k, v in CRF.items()}
    return {"label": arm, **scores, "steps": None if arm in ("fcn", "crf_post") else 50,
            "train_seconds": None if arm in ("fcn", "crf_post") else 12.5, "eval_seconds": 3.0, "crf": crf}


def _grid(rng: np.random.Generator) -> dict:
    results = [{**CRF, "theta_alpha": a, "held_apart_mean_iou": float(rng.uniform(0.4, 0.6)),
                "voc_default_rescaled": a == 80.0} for a in (40.0, 80.0)]
    best = max(results, key=lambda r: r["held_apart_mean_iou"])
    return {"num_images": 4, "results": results, "best": {k: best[k] for k in CRF},
            "fcn_mean_iou_same_images": 0.45}


def make_run(folder, dataset: str, seed: int, arms=report.ARMS) -> dict:
    """One seed folder following the schema exactly; returns the confusions written, by npz key."""
    rng = np.random.default_rng([seed, len(dataset)])
    folder.mkdir(parents=True)
    conf, records = {}, {}
    for arm in arms:
        conf[f"{arm}/image"], conf[f"{arm}/trimap"] = _confusions(rng, (N,)), _confusions(rng, (len(RADII), N))
        records[arm] = _arm_record(arm, _scores(conf[f"{arm}/image"], conf[f"{arm}/trimap"]), rng)
    names = ["img_a", "img_b"]
    fig_arms = ["fcn", "crf_post", "crfrnn", "crfrnn_theta"]
    figures = {f"{n}/image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for n in names}
    figures.update({f"{n}/truth": np.where(rng.random((H, W)) < 0.1, 255, rng.integers(0, L, (H, W))).astype(
        np.uint8) for n in names})
    figures.update({f"{n}/{a}": rng.integers(0, L, (H, W), dtype=np.uint8) for n in names for a in fig_arms})
    curve = lambda: [{"step": s, "mean_iou": float(rng.uniform(0.3, 0.7)), "loss": 1.0} for s in (0, 25, 50)]  # noqa: E731
    results = {
        "dataset": dataset, "seed": seed, "class_names": ["sky", "road", "car"], "num_classes": L,
        "ignore_index": 255, "unary_scale": 1.0, "full_resolution": "360x480", "trimap_radii": RADII,
        "data": {"num_train": 20, "num_held_apart": 4, "num_val": N, "val_names": [f"v{i}" for i in range(N)],
                 "held_apart_names": ["h0", "h1", "h2", "h3"], "split": "A fixed random split."},
        "config": {"seed": seed, "lr": 0.01},
        "fcn": {"steps": 100, "seconds": 30.0, "num_parameters": 12345, "input_size": "180x240"},
        "grid_search": _grid(rng), "arms": records,
        "curves": {a: curve() for a in report.CURVE_ARMS if a in arms},
        "curve_images": ["v0", "v1"],
        "theta_trajectory": [{"step": s, "theta_alpha": 80.0 + s, "theta_beta": 13.0 - s / 10,
                              "theta_gamma": 3.0} for s in (0, 25, 50)],
        "figures": {"names": names, "arms": fig_arms},
        "timing": {"phases_s": {"fcn": 30.0, "grid": 10.0}, "total_s": 100.0, "wall_s": 110.0},
        "environment": {"torch": "2.x", "python": "3.x", "threads": 1, "machine": "test"},
    }
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    np.savez(folder / "confusion.npz", **conf)
    np.savez(folder / "figures.npz", **figures)
    return conf


@pytest.fixture
def runs(tmp_path):
    """2 datasets x 2 seeds; camvid seed 1 lacks (d). Returns (root, confusions[dataset][seed])."""
    root = tmp_path / "runs"
    confs = {}
    for ds in DATASETS:
        for seed in SEEDS:
            arms = [a for a in report.ARMS if not (ds == "camvid" and seed == 1 and a == "crfrnn_theta")]
            confs.setdefault(ds, {})[seed] = make_run(root / ds / f"seed{seed}", ds, seed, arms)
    return root, confs


def _write(tmp_path, root):
    out = tmp_path / "docs" / "experiments.md"
    figs = tmp_path / "docs" / "figures" / "fullres"
    summary = report.write_report(root, out, figs, num_resamples=RESAMPLES, discussion=tmp_path / "none.md")
    return out.read_text(encoding="utf-8"), figs, summary


def _section(text: str, dataset: str) -> str:
    return text.split(f"## {dataset}\n", 1)[1].split("\n## ", 1)[0]


def _row(section: str, first_cell: str) -> str:
    rows = [line for line in section.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell!r}"
    return rows[0]


def _pct_mean_std(values: list[float]) -> str:
    v = [100 * x for x in values]
    d = report.DIGITS
    return f"{statistics.mean(v):.{d}f} ± {statistics.stdev(v):.{d}f}" if len(v) > 1 else f"{v[0]:.{d}f}"


def test_arm_rows_are_mean_and_std_of_the_confusions(tmp_path, runs):
    root, confs = runs
    text, _, _ = _write(tmp_path, root)
    for ds in DATASETS:
        section = _section(text, ds)
        for arm in report.ARMS:
            per_seed = [mean_iou(torch.from_numpy(confs[ds][s][f"{arm}/image"]).sum(0))
                        for s in SEEDS if f"{arm}/image" in confs[ds][s]]
            row = _row(section, f"{report.TAGS[arm]} `{arm}`")
            assert row.split(" | ")[1] == _pct_mean_std(per_seed), (ds, arm, row)


def test_ci_row_equals_paired_bootstrap(tmp_path, runs):
    root, confs = runs
    text, _, summary = _write(tmp_path, root)
    for ds in DATASETS:
        b, c = (torch.from_numpy(np.stack([confs[ds][s][f"{arm}/image"] for s in SEEDS]))
                for arm in ("crf_post", "crfrnn"))
        direct = paired_bootstrap(b, c, num_resamples=RESAMPLES)
        d = report.DELTA_DIGITS
        cell = f"{100 * direct.difference:+.{d}f} [{100 * direct.low:+.{d}f}, {100 * direct.high:+.{d}f}]"
        assert _row(_section(text, ds), "(c) − (b)").split(" | ")[1] == cell
        [pair] = [p for p in summary["datasets"][ds]["pairs"]
                  if (p["x"], p["y"], p["band"]) == ("crfrnn", "crf_post", None)]
        assert (pair["difference"], pair["low"], pair["high"]) == (direct.difference, direct.low, direct.high)


def test_figures_summary_and_links(tmp_path, runs):
    root, _ = runs
    text, figs, summary = _write(tmp_path, root)
    pngs = sorted(figs.glob("*.png"))
    assert {p.name for p in pngs} >= {"learning_curves.png", "trimap_curves.png", "pictures_camvid.png",
                                      "theta_camvid.png", "pictures_weizmann-horse.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/fullres/{p.name})" in text  # linked relative to the page
    on_disk = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == summary
    assert "GENERATED FILE" in text.splitlines()[0]
    assert "python -m experiments.fullres.report" in text and "(no discussion written)" in text


def test_missing_arm_is_reported(tmp_path, runs):
    root, confs = runs
    text, _, summary = _write(tmp_path, root)
    camvid = _section(text, "camvid")
    assert "arm `crfrnn_theta` (d): missing in seed(s) 1" in camvid
    assert "missing in seed" not in _section(text, "weizmann-horse")
    assert summary["datasets"]["camvid"]["arms"]["crfrnn_theta"]["seeds"] == [0]
    # the pair (d) − (c) falls back to the seed that has both
    [pair] = [p for p in summary["datasets"]["camvid"]["pairs"]
              if (p["x"], p["y"], p["band"]) == ("crfrnn_theta", "crfrnn", None)]
    assert pair["seeds"] == [0] and pair["num_seeds"] == 1


def test_missing_seed_folder_inconsistency_and_discussion(tmp_path, runs):
    root, _ = runs
    (root / "camvid" / "seed2").mkdir()
    (root / "extra" / "seed0").mkdir(parents=True)
    (root / "extra" / "seed0" / "results.json").write_text("{not json", encoding="utf-8")
    f = root / "weizmann-horse" / "seed1" / "results.json"
    results = json.loads(f.read_text(encoding="utf-8"))
    results["arms"]["crfrnn"]["mean_iou"] += 0.01  # no longer what its confusions give
    f.write_text(json.dumps(results), encoding="utf-8")
    (tmp_path / "discussion.md").write_text("Hand-written words.\n", encoding="utf-8")
    out = tmp_path / "page.md"
    report.write_report(root, out, tmp_path / "figs", num_resamples=RESAMPLES, discussion=tmp_path / "discussion.md")
    text = out.read_text(encoding="utf-8")
    assert "seed 2: no results.json (missing run)" in _section(text, "camvid")
    assert "seed 2: no seed2 folder" in _section(text, "weizmann-horse")
    assert "seed 0: unreadable results.json" in _section(text, "extra")
    assert "seed 1: no seed1 folder" in _section(text, "extra")
    assert "**Inconsistent:** seed 1, `crfrnn`" in _section(text, "weizmann-horse")
    assert "Inconsistent" not in _section(text, "camvid")
    assert text.split("## Discussion\n", 1)[1].count("Hand-written words.") == 1


def test_cli(tmp_path, runs):
    root, _ = runs
    out, figs = tmp_path / "cli" / "experiments.md", tmp_path / "cli" / "figs"
    assert report.main(["--runs", str(root), "--output", str(out), "--figures", str(figs), "--resamples", "50",
                        "--summary", str(tmp_path / "s.json")]) == 0
    assert f"--runs {root}" in out.read_text(encoding="utf-8")
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["num_resamples"] == 50
