"""The one checkpoint loader (``crfrnn.models.checkpoints``, used by ``crfrnn segment/eval/show-compat/train``):
every kind of file it claims, written here, loads into a model equal to the one saved; the sign flip of the
official port's compatibility matrix is one function, its own inverse, and the published-weights loader and
``crfrnn show-compat`` agree on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crfrnn.cli import main
from crfrnn.models import CrfRnnNet, TinyCrfRnnNet
from crfrnn.models.checkpoints import (
    CONVENTIONS,
    RUN_CHECKPOINTS,
    SIDECAR,
    build_model,
    init_weights,
    load_model,
    load_state_dict,
    read_compatibility,
    unary_only,
)
from crfrnn.models.weights import crfasrnn_state_dict_shapes, flip_compatibility, load_crfasrnn_weights

L = 5


def tiny(seed: int, **crf) -> TinyCrfRnnNet:
    torch.manual_seed(seed)
    model = TinyCrfRnnNet(L, **crf)
    with torch.no_grad():  # parameters unlike a fresh model's, so that a load that did nothing is seen
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def assert_same_state(got: torch.nn.Module, want: dict) -> None:
    sd = got.state_dict()
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


def cheap_published(compat: torch.Tensor) -> dict:
    """The published crfasrnn_weights.pth layout: every tensor a view of one scalar (small files) but the CRF's."""
    one = torch.ones(())
    sd = {k: one.expand(s) for k, s in crfasrnn_state_dict_shapes(compat.shape[0]).items()}
    g = torch.Generator().manual_seed(7)
    sd["crfrnn.spatial_ker_weights"] = torch.randn(compat.shape, generator=g)
    sd["crfrnn.bilateral_ker_weights"] = torch.randn(compat.shape, generator=g)
    sd["crfrnn.compatibility_matrix"] = compat
    return sd


# --------------------------------------------------------------------------------------------------- sign flip
def test_flip_compatibility_is_its_own_inverse():
    for shape in ((4, 4), (3, 4, 4)):
        m = torch.randn(shape, dtype=torch.float64)
        before = m.clone()
        flipped = flip_compatibility(m)
        assert np.array_equal(flipped.numpy(), -before.numpy())  # C' = -C, elementwise
        assert torch.equal(flip_compatibility(flipped), before)
        assert torch.equal(m, before)  # the caller's tensor is untouched
    with pytest.raises(TypeError, match="matrix"):
        flip_compatibility(np.eye(3))


# ------------------------------------------------------------------------------------ every checkpoint kind
def test_run_folder_prefers_best_and_reads_model_json(tmp_path):
    best, last = tiny(1, num_iterations=2, num_test_iterations=3), tiny(2)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": best.state_dict(), "step": 4}, run / "best.pt")
    torch.save({"model": last.state_dict(), "step": 5}, run / "last.pt")
    names = [f"c{k}" for k in range(L)]
    (run / SIDECAR).write_text(json.dumps({"model": "tiny", "class_names": names,
                                           "crf": {"num_iterations": 2, "num_test_iterations": 3}}))
    model, info = load_model(run)
    assert info["kind"] == "tiny" and info["num_classes"] == L and info["checkpoint"] == str(run / "best.pt")
    assert info["class_names"] == names and not model.training
    assert_same_state(model, best.state_dict())
    assert model.crfrnn.num_test_iterations == 3  # from model.json
    x = torch.rand(1, 3, 20, 24) * 255
    with torch.no_grad():
        assert torch.equal(model(x), best(x))
    # the checkpoint file itself: model.json from its folder
    model, info = load_model(run / "last.pt")
    assert info["checkpoint"] == str(run / "last.pt") and info["class_names"] == names
    assert_same_state(model, last.state_dict())
    # without best.pt the folder's last.pt
    (run / "best.pt").unlink()
    assert load_model(run)[1]["checkpoint"] == str(run / "last.pt")
    assert RUN_CHECKPOINTS == ("best.pt", "last.pt")


@pytest.mark.parametrize("wrap", ["plain", "state_dict+module"])
@pytest.mark.parametrize("kind, crf", [("tiny", {}), ("tiny", {"kernel_weights": "diagonal", "untied": True,
                                                               "num_iterations": 3}), ("tiny-fcn", {"crf": False})])
def test_plain_state_dicts(tmp_path, kind, crf, wrap):
    src = tiny(3, **crf)
    sd = src.state_dict()
    obj = sd if wrap == "plain" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(obj, tmp_path / "w.pth")
    model, info = load_model(tmp_path / "w.pth")
    assert info["kind"] == kind and info["num_classes"] == L and info["sidecar"] == {}
    assert_same_state(model, sd)  # the CRF's layout (diagonal, untied) is read from the shapes
    got, _ = load_state_dict(tmp_path / "w.pth")
    assert sorted(got) == sorted(sd)


def test_published_pth_loader_and_show_compat_agree(tmp_path, capsys):
    compat = torch.randn(21, 21)
    torch.save(cheap_published(compat), tmp_path / "crfasrnn_weights.pth")
    published = load_crfasrnn_weights(tmp_path / "crfasrnn_weights.pth").crfrnn.compatibility_matrix.detach()
    assert torch.equal(published, flip_compatibility(compat))
    model, info = load_model(tmp_path / "crfasrnn_weights.pth")
    assert info["kind"] == "crfrnn" and isinstance(model, CrfRnnNet)
    assert torch.equal(model.crfrnn.compatibility_matrix.detach(), published)
    del model
    m, info = read_compatibility(tmp_path / "crfasrnn_weights.pth")
    assert info["sign_flipped"] and torch.equal(m, published.double())
    rc = main(["show-compat", str(tmp_path / "crfasrnn_weights.pth"), "-o", str(tmp_path / "c.png"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["sign_flipped"] is True
    assert np.array_equal(np.array(out["matrix"]), published.double().numpy())
    # convention="crfrnn": the file's own values
    model, _ = load_model(tmp_path / "crfasrnn_weights.pth", convention="crfrnn")
    assert torch.equal(model.crfrnn.compatibility_matrix.detach(), compat)


def test_training_checkpoint_is_never_flipped(tmp_path):
    src = tiny(4)
    torch.save({"model": src.state_dict()}, tmp_path / "last.pt")
    m, info = read_compatibility(tmp_path / "last.pt")
    assert not info["sign_flipped"] and torch.equal(m, src.crfrnn.compatibility_matrix.detach().double())
    assert_same_state(load_model(tmp_path / "last.pt", convention="crfasrnn_pytorch")[0], src.state_dict())
    m, info = read_compatibility(tmp_path / "last.pt", convention="crfasrnn_pytorch")  # asked for: flipped
    assert info["sign_flipped"] and torch.equal(m, -src.crfrnn.compatibility_matrix.detach().double())


def test_keras_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    from crfrnn.models.weights import _KERAS_LAYERS

    compat = torch.randn(21, 21)
    shapes = crfasrnn_state_dict_shapes(21)
    path = tmp_path / "crfrnn_keras_model.h5"
    with h5py.File(path, "w") as f:  # unwritten datasets read as their fill value: a small file
        root = f.create_group("model_weights")
        for kname, (ours, _) in _KERAS_LAYERS.items():
            g = root.create_group(kname).create_group(kname)
            out_c, in_c, kh, kw = shapes[f"{ours}.weight"]
            g.create_dataset("kernel:0", shape=(kh, kw, in_c, out_c), dtype="f4", fillvalue=0.5)
            if f"{ours}.bias" in shapes:
                g.create_dataset("bias:0", shape=shapes[f"{ours}.bias"], dtype="f4", fillvalue=0.25)
        g = root.create_group("crfrnn").create_group("crfrnn")
        for name in ("spatial_ker_weights", "bilateral_ker_weights"):
            g.create_dataset(f"{name}:0", data=np.eye(21, dtype=np.float32))
        g.create_dataset("compatibility_matrix:0", data=compat.numpy())
    m, info = read_compatibility(path)
    assert not info["sign_flipped"] and torch.equal(m, compat.double())  # Keras: our convention
    model, info = load_model(path)
    assert info["kind"] == "crfrnn" and info["num_classes"] == 21 and info["checkpoint"] == str(path)
    assert torch.equal(model.crfrnn.compatibility_matrix.detach(), compat)
    assert torch.equal(model.upscore8.weight.detach(), torch.full((21, 21, 16, 16), 0.5))


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither best.pt nor last.pt"):
        load_model(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt is not a torch file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"x.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: unknown model layout"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt holds no crfrnn\.compatibility_matrix"):
        read_compatibility(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="convention"):
        load_model(tmp_path / "other.pt", convention="keras")
    assert CONVENTIONS == ("auto", "crfasrnn_pytorch", "crfrnn")
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", L)


# ---------------------------------------------------------------------------------------- training init
def test_init_weights(tmp_path):
    src = tiny(5)
    torch.save({"model": src.state_dict()}, tmp_path / "ck.pt")
    fresh = build_model("tiny", L)
    assert init_weights(fresh, "tiny", tmp_path / "ck.pt") == "checkpoint"
    assert_same_state(fresh, src.state_dict())
    fcn = build_model("tiny-fcn", L)  # the CRF's parameters are not wanted there
    assert init_weights(fcn, "tiny-fcn", tmp_path / "ck.pt") == "checkpoint"
    assert_same_state(fcn, {k: v for k, v in src.state_dict().items() if not k.startswith("crfrnn.")})
    with pytest.raises(ValueError, match=r"ck\.pt do not fit a tiny model"):
        init_weights(TinyCrfRnnNet(L + 1), "tiny", tmp_path / "ck.pt")
    torch.save({"features.0.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="VGG-16"):
        init_weights(build_model("tiny", L), "tiny", tmp_path / "vgg.pth")


def test_unary_only():
    model = tiny(6)
    x = torch.rand(1, 3, 16, 16) * 255
    with torch.no_grad():
        assert torch.equal(unary_only(model)(x), model.unary(x))
        assert not torch.equal(model(x), model.unary(x))
    plain = torch.nn.Identity()
    assert unary_only(plain) is plain
