"""Single-file shipped models (:func:`crfrnn.models.checkpoints.save_model_file`): SmallFCN8s as ``small-fcn``
(:class:`UnaryNet`) and ``small-crfrnn`` (:class:`CrfRnnHead`), saved in float16 and read back by
:func:`load_model`, ``crfrnn eval`` and ``crfrnn segment``.

The reference for a loaded model is the original model with its weights rounded to float16 (what the file
holds), run in float32; the CLI's mean IU is recomputed from the loaded model's predictions with
:mod:`crfrnn.engine.metrics`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn.data import read_image
from crfrnn.engine.metrics import confusion_matrix, mean_iou
from crfrnn.models import CrfRnnHead, SmallFCN8s, UnaryNet
from crfrnn.models.checkpoints import (
    MODEL_FILE_FORMAT,
    build_model_from_sidecar,
    crf_options,
    load_model,
    save_model_file,
    small_model_sidecar,
    unary_only,
)
from crfrnn.models.nets import scaled_unary

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

L = 3
WIDTHS, FC = (4, 4, 8, 8, 8), 8
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the defaults: the file must carry them
NAMES = ["road", "car", "sky"]
SIZE = (24, 32)
CASES = [("small-fcn", False), ("small-crfrnn", False), ("small-crfrnn", True)]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values in every floating entry of the state dict (positive running variances), so that zero-
    initialised score layers and identity BatchNorm statistics do not hide a weight that was not loaded."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            r = torch.randn(v.shape, generator=g, dtype=v.dtype)
            sd[k] = r.abs() + 0.5 if k.endswith("running_var") else (
                0.3 * r if not k.startswith("crfrnn.log_theta") else v + 0.1 * r)
    model.load_state_dict(sd)


def make_model(kind: str, learn_bandwidths: bool = False, seed: int = 0):
    """``(model in eval mode, sidecar)`` of a tiny SmallFCN8s-based model of ``kind`` at unary_scale 0.5."""
    torch.manual_seed(seed)
    fcn = SmallFCN8s(L, WIDTHS, FC, mean=MEAN, std=STD)
    if kind == "small-fcn":
        model, crf = UnaryNet(fcn, L, unary_scale=0.5), None
    else:
        crf = {"theta_alpha": 20.0, "theta_beta": [10.0, 12.0, 14.0], "theta_gamma": 2.0, "num_test_iterations": 3,
               "learn_bandwidths": learn_bandwidths}
        model = CrfRnnHead(fcn, L, unary_scale=0.5, **crf)
    _randomise(model, seed)
    sidecar = {"kind": kind, "num_classes": L, "class_names": NAMES, "unary_scale": 0.5,
               "architecture": fcn.architecture(), "crf": crf, "ignore_index": 7, "description": "a test model"}
    return model.eval(), sidecar


def rounded_to_half(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (in place) with every floating state entry rounded to float16 and back."""
    sd = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model


def image_batch(seed: int = 1, size=SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, *size), generator=g).float()


@pytest.mark.parametrize("kind, learn_bandwidths", CASES)
def test_saved_file_loads_as_the_half_rounded_model(tmp_path, kind, learn_bandwidths):
    model, sidecar = make_model(kind, learn_bandwidths)
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    loaded, info = load_model(path)
    assert info["kind"] == kind and info["num_classes"] == L and info["class_names"] == NAMES
    assert info["sidecar"]["description"] == "a test model" and info["checkpoint"] == str(path)
    assert not loaded.training and loaded.unary_scale == 0.5
    assert loaded.model.rgb_mean == pytest.approx(MEAN) and loaded.model.rgb_std == pytest.approx(STD)
    assert all(v.dtype != torch.float16 for v in loaded.state_dict().values())
    x = image_batch()
    with torch.no_grad():
        got, want = loaded(x), rounded_to_half(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if learn_bandwidths:
        assert loaded.crfrnn.theta_beta == pytest.approx(model.crfrnn.theta_beta)


def test_half_false_keeps_float32_exactly(tmp_path):
    model, sidecar = make_model("small-crfrnn", True)
    path = save_model_file(tmp_path / "m.pt", model, sidecar, half=False)
    loaded, _ = load_model(path)
    x = image_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_file_is_weights_only_with_half_floats_and_untouched_integers(tmp_path):
    model, sidecar = make_model("small-crfrnn")
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == MODEL_FILE_FORMAT and obj["sidecar"]["kind"] == "small-crfrnn"
    own = model.state_dict()
    assert set(obj["model"]) == set(own)
    for k, v in obj["model"].items():
        assert v.dtype == (torch.float16 if own[k].is_floating_point() else own[k].dtype), k
    assert any(not v.is_floating_point() for v in obj["model"].values())  # BatchNorm's num_batches_tracked
    assert obj["sidecar"]["architecture"]["widths"] == list(WIDTHS)


def _rewrite(path: Path, change) -> None:
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("change, words", [
    (lambda o: o["sidecar"].pop("architecture"), "'architecture'"),
    (lambda o: o["sidecar"].pop("unary_scale"), "'unary_scale'"),
    (lambda o: o["sidecar"]["architecture"].pop("fc"), "'fc'"),
    (lambda o: o["sidecar"].update(kind="resnet"), "'kind'"),
    (lambda o: o["sidecar"].update(num_classes=4, class_names=None), "weights do not fit"),
    (lambda o: o["sidecar"].update(class_names=["a"]), "'class_names'"),
    (lambda o: o["sidecar"]["crf"].update(learn_bandwidths=True), "weights do not fit"),
    (lambda o: o["sidecar"].update(unary_scale=-1), "unary_scale"),
    (lambda o: o.update(format="crfrnn-model/99"), "crfrnn-model/99"),
    (lambda o: o.pop("sidecar"), "'sidecar'"),
])
def test_corrupted_file_gives_a_clear_error(tmp_path, change, words):
    model, sidecar = make_model("small-crfrnn")
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    _rewrite(path, change)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("change", [
    lambda s: s["architecture"].update(widths=[4, 4, 8, 8, 16]),
    lambda s: s.update(kind="small-fcn", crf=None),
    lambda s: s["crf"].update(learn_bandwidths=True),
    lambda s: s.pop("num_classes"),
    lambda s: s.update(extra=object()),
])
def test_a_file_that_would_not_load_is_never_written(tmp_path, change):
    model, sidecar = make_model("small-crfrnn")
    change(sidecar)
    with pytest.raises((ValueError, TypeError)):
        save_model_file(tmp_path / "m.pt", model, sidecar)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, learn_bandwidths", CASES)
def test_small_model_sidecar_is_the_hand_written_one(kind, learn_bandwidths):
    model, sidecar = make_model(kind, learn_bandwidths)
    derived = small_model_sidecar(model, class_names=NAMES, ignore_index=7, description="a test model")
    assert {k: v for k, v in derived.items() if k != "crf"} == {k: v for k, v in sidecar.items() if k != "crf"}
    fresh = build_model_from_sidecar(derived).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = image_batch()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(TypeError, match="SmallFCN8s"):
        small_model_sidecar(UnaryNet(torch.nn.Conv2d(3, L, 1), L))


def test_build_model_from_sidecar_describes_the_model():
    model, sidecar = make_model("small-crfrnn", True)
    fresh = build_model_from_sidecar(sidecar)
    assert type(fresh) is type(model) and type(fresh.model) is SmallFCN8s
    assert fresh.model.architecture() == model.model.architecture()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert crf_options(fresh.crfrnn) == crf_options(model.crfrnn)


def test_unary_net_is_the_model_at_its_scale():
    torch.manual_seed(0)
    fcn = SmallFCN8s(L, WIDTHS, FC).eval()
    x = image_batch()
    with torch.no_grad():
        assert torch.equal(UnaryNet(fcn, L)(x), fcn(x))
        half = UnaryNet(fcn, L, unary_scale=0.5)
        assert torch.equal(half(x), scaled_unary(fcn, x, 0.5))
        assert torch.equal(half.unary(x), half(x))
    with pytest.raises(ValueError, match="num_classes"):
        UnaryNet(fcn, 0)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        UnaryNet(fcn, 4)(x)


def test_valid_mask_reaches_the_scaled_unary():
    """A padded image scored with its mask equals the image scored alone (the mask crops it before resizing),
    also through :func:`unary_only` of a CRF-RNN head."""
    model, _ = make_model("small-crfrnn")
    x = image_batch(size=(20, 28))[:1]
    canvas = torch.zeros(1, 3, *SIZE)
    canvas[:, :, :20, :28] = x
    mask = torch.zeros(1, 1, *SIZE, dtype=torch.bool)
    mask[:, :, :20, :28] = True
    with torch.no_grad():
        for net in (UnaryNet(model.model, L, unary_scale=0.5), unary_only(model)):
            torch.testing.assert_close(net(canvas, valid_mask=mask)[:, :, :20, :28], net(x), rtol=1e-5, atol=1e-5)


def _folder(tmp_path: Path, n: int = 3) -> Path:
    """``tmp_path/data/test`` with images/ and masks/ (SIZE, labels 0..L-1 and some 7s); class_names.txt in
    ``tmp_path/data`` (the parent)."""
    root = tmp_path / "data" / "test"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        img = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        mask = rng.integers(0, L, SIZE).astype(np.uint8)
        mask[:3] = 7
        Image.fromarray(img).save(root / "images" / f"im{k}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"im{k}.png")
    (root.parent / "class_names.txt").write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("kind", ["small-fcn", "small-crfrnn"])
def test_cli_eval_mean_iou_is_the_metrics_of_the_loaded_model(tmp_path, capsys, kind):
    model, sidecar = make_model(kind)
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    root = _folder(tmp_path)
    rc, out, err = run_cli(["eval", "--weights", path, "--dataset", "folder", "--root", root, "--ignore-index",
                            "7", "--json", "--quiet"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    loaded, _ = load_model(path)
    conf = torch.zeros(L, L, dtype=torch.int64)
    with torch.no_grad():
        for p in sorted((root / "images").glob("*.png")):
            pred = loaded(read_image(p)[None]).argmax(1)
            truth = torch.from_numpy(np.array(Image.open(root / "masks" / p.name)).astype(np.int64))[None]
            conf += confusion_matrix(pred, truth, L, 7)
    assert res["num_images"] == 3 and res["model"] == kind and res["class_names"] == NAMES
    assert res["confusion"] == conf.tolist()
    assert res["mean_iou"] == pytest.approx(float(mean_iou(conf)), abs=1e-12)


def test_cli_eval_takes_ignore_index_from_the_file(tmp_path, capsys):
    model, sidecar = make_model("small-fcn")
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    root = _folder(tmp_path, 1)
    rc, out, err = run_cli(["eval", "--weights", path, "--dataset", "folder", "--root", root, "--json", "-q"],
                           capsys)
    assert rc == 0, err
    assert sum(map(sum, json.loads(out)["confusion"])) == SIZE[0] * SIZE[1] - 3 * SIZE[1]  # the 7s left out


def test_cli_segment_writes_the_label_png(tmp_path, capsys):
    model, sidecar = make_model("small-crfrnn", True)
    path = save_model_file(tmp_path / "m.pt", model, sidecar)
    root = _folder(tmp_path, 1)
    image = root / "images" / "im0.png"
    rc, out, err = run_cli(["segment", image, "--weights", path, "--out", tmp_path / "seg", "--json", "-q"], capsys)
    assert rc == 0, err
    labels = np.array(Image.open(tmp_path / "seg" / "im0.png"))
    loaded, _ = load_model(path)
    with torch.no_grad():
        want = loaded(read_image(image)[None])[0].argmax(0).numpy()
    assert labels.shape == SIZE and np.array_equal(labels, want)
    assert json.loads(out)["class_names"] == NAMES


def test_train_records_unary_scale_and_the_run_folder_loads_with_it(tmp_path, capsys):
    root = _folder(tmp_path, 2)
    run_dir = tmp_path / "run"
    rc, _, err = run_cli(["train", "--dataset", "folder", "--root", root, "--val-split", "", "--model", "tiny-fcn",
                          "--unary-scale", "0.5", "--ignore-index", "7", "--steps", "1", "--batch-size", "1",
                          "--run-dir", run_dir, "--device", "cpu", "-q"], capsys)
    assert rc == 0, err
    assert json.loads((run_dir / "model.json").read_text())["unary_scale"] == 0.5
    model, info = load_model(run_dir)
    assert info["kind"] == "tiny-fcn" and model.unary_scale == 0.5
    rc, _, err = run_cli(["train", "--dataset", "folder", "--root", root, "--model", "fcn8s", "--unary-scale", "0.5",
                          "--run-dir", tmp_path / "run2"], capsys)
    assert rc == 2 and "--unary-scale" in err and not (tmp_path / "run2").exists()
