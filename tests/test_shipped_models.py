"""The model files shipped with the experiments (``experiments/models/*/*.pt``, written by
:func:`crfrnn.models.checkpoints.save_model_file`): each loads, describes itself consistently and runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crfrnn.models.checkpoints import CRF_KINDS, MODEL_FILE_FORMAT, MODEL_KINDS, load_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "experiments" / "models"
SHIPPED = sorted(MODELS.glob("*/*.pt"))
FILES = [pytest.param(p, id=str(p.relative_to(ROOT))) for p in SHIPPED]
#: What the full-resolution reproduction ships (experiments/fullres): seed 0 of every arm but the controls.
EXPECTED = {f"{ds}/{arm}.pt" for ds in ("camvid", "weizmann-horse") for arm in ("fcn", "crf_post", "crfrnn",
                                                                              "crfrnn_theta")}
CLASSES = {"camvid": 11, "weizmann-horse": 2}


def test_the_reproduction_ships_every_model_within_10_mb():
    assert {str(p.relative_to(MODELS)) for p in SHIPPED} == EXPECTED
    assert sum(p.stat().st_size for p in SHIPPED) <= 10 * 2**20


@pytest.mark.parametrize("path", FILES)
def test_shipped_model_matches_its_arm(path):
    _, info = load_model(path)
    sc = info["sidecar"]
    assert info["num_classes"] == CLASSES[path.parent.name]
    assert sc["kind"] == ("small-fcn" if path.stem == "fcn" else "small-crfrnn")
    if path.stem != "fcn":
        assert sc["crf"]["learn_bandwidths"] == (path.stem == "crfrnn_theta")
        assert sc["crf"]["num_test_iterations"] == 10


@pytest.mark.parametrize("path", FILES)
def test_shipped_model_loads_and_runs(path):
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == MODEL_FILE_FORMAT
    model, info = load_model(path)
    sc = info["sidecar"]
    assert sc == raw["sidecar"] and info["kind"] == sc["kind"] in MODEL_KINDS
    L = info["num_classes"]
    assert L == sc["num_classes"] == model.num_classes
    names = info["class_names"]
    assert isinstance(names, list) and len(names) == L and all(isinstance(n, str) and n for n in names)
    assert len(set(names)) == L, f"class names repeat: {names}"
    assert model.unary_scale == pytest.approx(sc["unary_scale"])
    assert (sc["kind"] in CRF_KINDS) == hasattr(model, "crfrnn") == bool(sc.get("crf"))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 45, 60), generator=g).float()
    with torch.no_grad():
        logits = model(image)
    assert logits.shape == (1, L, 45, 60) and torch.isfinite(logits).all()
