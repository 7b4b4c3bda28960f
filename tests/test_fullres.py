"""The full-resolution reproduction (experiments/fullres): its grid and split, the claim that arm (b) shipped as a
CRF-RNN at its initialisation is the post-processing CRF, and (slow) a miniature of every arm on both data sets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from crfrnn.engine.metrics import confusion_matrix, mean_iou
from crfrnn.meanfield import mean_field
from crfrnn.models import CrfRnnHead, SmallFCN8s, UnaryNet
from crfrnn.models.checkpoints import load_model
from experiments.fullres.data import horse_split
from experiments.fullres.settings import ARMS, HORSE, SETTINGS, VOC, smoke

from conftest import scene_pairs

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
_CRF = ("theta_alpha", "theta_beta", "theta_gamma", "spatial_weight", "bilateral_weight")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_grid_holds_the_rescaled_voc_defaults_and_extends_both_ways(name):
    s = SETTINGS[name]
    grid, d = s.grid(), s.voc_defaults()
    assert d["theta_beta"] == VOC["theta_beta"] and d["bilateral_weight"] == VOC["bilateral_weight"]
    assert d["theta_alpha"] == pytest.approx(VOC["theta_alpha"] * np.sqrt(s.typical_pixels / (500 * 375)), abs=0.05)
    assert sum(row == d for row in grid) == 1
    for key in ("theta_alpha", "theta_beta", "bilateral_weight"):
        values = {row[key] for row in grid}
        assert min(values) < d[key] < max(values), key
    assert len({tuple(row[k] for k in _CRF) for row in grid}) == len(grid)


def test_horse_split_is_fixed_and_disjoint():
    if not (HORSE.root / "images").is_dir():
        pytest.skip(f"no Weizmann horse data at {HORSE.root}")
    train, val = horse_split(HORSE.root)
    assert (len(train), len(val)) == (146, 72) and not set(train) & set(val)
    assert sorted(train + val) == sorted(p.stem for p in (HORSE.root / "images").glob("*.jpg"))
    assert val[:3] == sorted(train + val)[2:9:3]


def test_crf_rnn_at_its_initialisation_is_the_post_processing_crf():
    """Arm (b) is shipped as a CrfRnnHead at its initialisation: in eval mode it must be mean_field(T=10) of the
    unary network's upsampled logits with the grid's parameters."""
    torch.manual_seed(0)
    _, image, _ = scene_pairs(1)[0]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    params = {"theta_alpha": 40.0, "theta_beta": 6.0, "theta_gamma": 2.0, "spatial_weight": 3.0,
              "bilateral_weight": 10.0}
    fcn = SmallFCN8s(3, (4, 4, 8, 8, 8), 8).eval()
    with torch.no_grad():
        for p in fcn.parameters():
            p.normal_(0, 0.5)
    head = CrfRnnHead(fcn, 3, unary_scale=0.5, num_iterations=5, num_test_iterations=10, **params).eval()
    with torch.no_grad():
        expected = mean_field(UnaryNet(fcn, 3, unary_scale=0.5)(x), x, num_iterations=10, **params)
        got = head(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _check_run(run_dir: Path, s) -> None:
    res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert list(res["arms"]) == list(ARMS)
    conf = np.load(run_dir / "confusion.npz")
    from experiments.fullres.data import load  # noqa: PLC0415

    _, _, val, _ = load(s)
    assert res["data"]["val_names"] == val.names
    for arm, m in res["arms"].items():
        per_image = conf[f"{arm}/image"]
        assert per_image.shape == (len(val), res["num_classes"], res["num_classes"])
        assert conf[f"{arm}/trimap"].shape == (len(res["trimap_radii"]),) + per_image.shape
        assert m["mean_iou"] == pytest.approx(mean_iou(torch.from_numpy(per_image.sum(0))), abs=1e-12)
        # the saved model reproduces the recorded confusions on the val images
        model, info = load_model(run_dir / "models" / f"{arm}.pt")
        assert info["class_names"] == res["class_names"]
        with torch.no_grad():
            for k, (im, mask) in enumerate(zip(val.images, val.masks)):
                pred = model(im[None].float()).argmax(1)[0]
                c = confusion_matrix(pred, mask.long(), res["num_classes"], res["ignore_index"]).numpy()
                # float16 storage flips the pixels of near ties (the miniature's barely trained networks have
                # many): at most 0.1 % of them (each flip moves two entries)
                assert np.abs(c - per_image[k]).sum() <= 2 * max(1, per_image[k].sum() // 1000), (arm, k)
    for arm in ("fcn_plus", "crfrnn", "crfrnn_theta", "crf_only"):
        steps = [p["step"] for p in res["curves"][arm]]
        assert steps[0] == 0 and steps[-1] == s.finetune_steps
    learned = res["arms"]["crfrnn_theta"]["crf"]
    assert res["theta_trajectory"][-1]["theta_alpha"] == pytest.approx(learned["theta_alpha"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_miniature_of_every_arm(name, tmp_path):
    s = SETTINGS[name]
    if not s.root.is_dir():
        pytest.skip(f"no data at {s.root}")
    from experiments.fullres.report import write_report  # noqa: PLC0415
    from experiments.fullres.run import run  # noqa: PLC0415

    s = replace(smoke(s), max_val=3)
    run(s, 0, tmp_path / "runs" / name / "seed0")
    _check_run(tmp_path / "runs" / name / "seed0", s)
    summary = write_report(tmp_path / "runs", tmp_path / "experiments.md", tmp_path / "figures", num_resamples=50)
    assert summary and (tmp_path / "experiments.md").is_file()
