"""Miniature of the CamVid Table 1 experiment (experiments/camvid_table1.py): smoke run, re-evaluation, report.

Slow (about a minute on 2 cores): run with ``pytest -m slow tests/test_experiment.py``.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "camvid_table1.py"
CAMVID = REPO.parent / "shared" / "data" / "camvid"

ARMS = ["fcn", "fcn_crf_post", "crfrnn", "crfrnn_T5", "abl_shared_kernel", "abl_perclass_kernel", "abl_potts",
        "abl_untied", "abl_frozen_fcn"]


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _iou_numpy(pred: np.ndarray, gt: np.ndarray, L: int = 11) -> tuple[float, np.ndarray]:
    """Mean IU over classes present in ground truth or prediction, computed independently of crfrnn.metrics."""
    keep = gt != 255
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    inter = np.array([np.sum((p == c) & (g == c)) for c in range(L)], dtype=np.float64)
    union = np.array([np.sum((p == c) | (g == c)) for c in range(L)], dtype=np.float64)
    present = union > 0
    iou = np.full(L, np.nan)
    iou[present] = inter[present] / union[present]
    return float(np.nanmean(iou)), iou


@pytest.mark.slow
def test_smoke_pipeline_eval_dir_and_report(tmp_path):
    if not (CAMVID / "train" / "images").is_dir() or not (CAMVID / "val" / "images").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID}")
    run = tmp_path / "run"
    _run("--smoke", "--seed", 3, "--run-dir", run, "--data", CAMVID, "--cache-dir", "")

    res = json.loads((run / "results.json").read_text())
    for key in ("seed", "config", "command", "class_names", "data", "plan", "fcn", "grid_search", "arms", "timing"):
        assert key in res, f"results.json lacks {key!r}"
    assert res["seed"] == 3
    assert res["data"]["num_val"] == 4 and res["data"]["resolution"] == [48, 64]
    assert set(ARMS) <= set(res["arms"]), sorted(res["arms"])
    assert res["timing"]["total_s"] > 0 and res["timing"]["phases_s"]["fcn_train"] > 0
    assert len(res["grid_search"]["results"]) == 2
    best = res["grid_search"]["best"]
    assert best["theta_alpha"] in (10.0, 30.0)
    # the chosen setting is the grid's best on the held-apart images
    top = max(r["held_apart_mean_iou"] for r in res["grid_search"]["results"])
    chosen = [r for r in res["grid_search"]["results"] if r["theta_alpha"] == best["theta_alpha"]][0]
    assert chosen["held_apart_mean_iou"] == top

    # saved predictions: valid label maps whose IU (recomputed with numpy) is the reported one
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import camvid_table1 as exp
    finally:
        sys.path.pop(0)
    _, masks, names = exp.load_split(CAMVID, "val", (48, 64), 4)
    gt = masks.numpy()
    for arm in ARMS:
        m = res["arms"][arm]
        assert 0.0 <= m["mean_iou"] <= 1.0 and math.isfinite(m["mean_iou"]), (arm, m["mean_iou"])
        assert 0.0 <= m["pixel_accuracy"] <= 1.0
        assert len(m["class_iou"]) == 11
        with np.load(run / m["predictions"]) as z:
            labels, pred_names = z["labels"], list(z["names"])
        assert labels.shape == (4, 48, 64) and labels.dtype == np.uint8
        assert labels.max() < 11
        assert pred_names == names
        miou, iou = _iou_numpy(labels, gt)
        assert miou == pytest.approx(m["mean_iou"], abs=1e-9), arm
        got = np.array([np.nan if v is None else v for v in m["class_iou"]])
        np.testing.assert_allclose(got, iou, atol=1e-9)
    # the T=5 arm is the main arm's checkpoint tested with fewer iterations
    assert res["arms"]["crfrnn_T5"]["checkpoint"] == res["arms"]["crfrnn"]["checkpoint"]
    assert res["arms"]["crfrnn_T5"]["crf_kwargs"]["num_test_iterations"] == 5
    assert res["arms"]["crfrnn"]["crf_kwargs"]["num_test_iterations"] == 10
    # frozen-FCN ablation: its FCN weights equal (a)'s; the main arm's FCN moved
    fcn = torch.load(run / "fcn" / "final.pt", weights_only=True)["model"]
    frozen = torch.load(run / "arms" / "abl_frozen_fcn" / "final.pt", weights_only=True)["model"]
    main = torch.load(run / "arms" / "crfrnn" / "final.pt", weights_only=True)["model"]
    for k, v in fcn.items():
        assert torch.equal(frozen["model." + k], v), k
    assert any(not torch.equal(main["model." + k], v) for k, v in fcn.items() if v.is_floating_point())
    assert res["arms"]["abl_potts"]["learned"]["compatibility_matrix"] == (-np.eye(11)).tolist()
    assert np.array(res["arms"]["abl_untied"]["learned"]["compatibility_matrix"]).shape == (5, 11, 11)

    # re-evaluation of the saved arms on another folder of the same layout
    _run("--run-dir", run, "--eval-dir", CAMVID / "val", "--max-val", 2)
    ev = json.loads((run / "eval_val.json").read_text())
    assert ev["num_images"] == 2 and set(ARMS) <= set(ev["arms"])
    for arm in ARMS:
        assert 0.0 <= ev["arms"][arm]["mean_iou"] <= 1.0
    # on the same images the saved CRF-RNN reproduces its predictions
    with np.load(run / ev["arms"]["crfrnn"]["predictions"]) as z1, \
            np.load(run / res["arms"]["crfrnn"]["predictions"]) as z2:
        np.testing.assert_array_equal(z1["labels"], z2["labels"][:2])

    # report: markdown with the Table 1 rows, the ablation table and the picture
    out = tmp_path / "docs" / "experiments.md"
    _run("--report", run, "-o", out)
    text = out.read_text()
    assert "| Method | Mean IU |" in text
    for label in exp.ARMS.values():
        assert label in text
    row = next(line for line in text.splitlines() if line.startswith("| (a) FCN-8s"))
    assert f"{100 * res['arms']['fcn']['mean_iou']:.1f}" in row
    assert "abl_frozen_fcn" in text and "## Ablations" in text
    assert (tmp_path / "docs" / "camvid_compat.png").is_file()


@pytest.mark.slow
def test_report_rejects_incomplete_results(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"seed": 0}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--report", str(bad), "-o", str(tmp_path / "x.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "incomplete" in proc.stderr
    assert not (tmp_path / "x.md").exists()
