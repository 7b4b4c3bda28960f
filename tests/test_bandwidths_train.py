"""Learned kernel widths in training: the ``crf_theta`` parameter group (``TrainConfig.crf_theta_lr_mult``, no
weight decay), ``crfrnn train --learn-bandwidths`` and loading the learned widths back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crfrnn.engine.config import TrainConfig
from crfrnn.engine.step import param_groups
from crfrnn.models import TinyCrfRnnNet
from crfrnn.models.checkpoints import SIDECAR, build_model, crf_layout, init_weights, load_model, read_compatibility
from crfrnn.models.weights import flip_compatibility

from conftest import run_cli, write_scene_folder

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

THETA_NAMES = ("crfrnn.log_theta_alpha", "crfrnn.log_theta_beta", "crfrnn.log_theta_gamma")
L = 6


def _thetas(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "log_theta_" in k}


# ------------------------------------------------------------------------------------------ parameter groups
def test_theta_group_holds_exactly_the_widths_with_its_lr_and_no_decay():
    model = TinyCrfRnnNet(L, learn_bandwidths=True, theta_beta=[10.0, 20.0, 30.0])
    cfg = TrainConfig(lr=0.01, weight_decay=0.5, crf_weight_decay=0.25, crf_theta_lr_mult=7.0,
                      learn_bandwidths=True)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    named = dict(model.named_parameters())
    theta = groups["crf_theta"]
    assert {id(p) for p in theta["params"]} == {id(named[k]) for k in THETA_NAMES}
    assert len(theta["params"]) == 3
    assert theta["lr_mult"] == 7.0 and theta["lr"] == pytest.approx(0.01 * 7.0) and theta["weight_decay"] == 0.0
    others = [id(p) for name, g in groups.items() if name != "crf_theta" for p in g["params"]]
    assert not {id(named[k]) for k in THETA_NAMES} & set(others)
    assert groups["crf_compat"]["weight_decay"] == 0.25  # the other CRF parameters keep the CRF decay
    # every parameter is in exactly one group
    assert sorted(others + [id(p) for p in theta["params"]]) == sorted(id(p) for p in model.parameters())


def test_theta_group_sgd_step_moves_widths_by_lr_mult_times_grad_only():
    """With a gradient on everything, one SGD step changes log theta by exactly -lr x mult x grad (no decay
    term), while a decayed weight also shrinks."""
    torch.manual_seed(0)
    model = TinyCrfRnnNet(L, learn_bandwidths=True)
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, crf_theta_lr_mult=3.0, learn_bandwidths=True)
    opt = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=0.0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = grads[k].clone()
    opt.step()
    for k, p in model.named_parameters():
        if k in THETA_NAMES:
            expected = before[k] - 0.1 * 3.0 * grads[k]
        elif k == "tiny_conv1.weight":
            expected = before[k] - 0.1 * (grads[k] + 0.5 * before[k])
        else:
            continue
        torch.testing.assert_close(p.detach(), expected)


def test_no_theta_group_without_learned_widths_and_the_flag_needs_them():
    groups = param_groups(TinyCrfRnnNet(L), TrainConfig())
    assert "crf_theta" not in {g["name"] for g in groups}
    assert not any("log_theta_" in k for k, _ in TinyCrfRnnNet(L).named_parameters())
    with pytest.raises(ValueError, match="learn_bandwidths"):
        param_groups(TinyCrfRnnNet(L), TrainConfig(learn_bandwidths=True))


@pytest.mark.parametrize("kw", [{"learn_bandwidths": 1}, {"learn_bandwidths": "yes"}, {"crf_theta_lr_mult": -1.0},
                                {"crf_theta_lr_mult": float("nan")}])
def test_config_checks_the_new_fields(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TrainConfig(**kw)


def test_config_round_trip_keeps_the_new_fields():
    cfg = TrainConfig(learn_bandwidths=True, crf_theta_lr_mult=0.5)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------------------------------ loading
def test_plain_state_dict_with_learned_widths_loads_without_sidecar(tmp_path):
    torch.manual_seed(1)
    model = TinyCrfRnnNet(L, learn_bandwidths=True, theta_beta=[10.0, 20.0, 30.0])
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "log_theta_" in k:
                p.add_(torch.randn_like(p) * 0.3)
    sd = model.state_dict()
    layout = crf_layout(sd)
    assert layout["learn_bandwidths"] is True and len(layout["theta_beta"]) == 3
    assert "learn_bandwidths" not in crf_layout(TinyCrfRnnNet(L).state_dict())
    torch.save(sd, tmp_path / "plain.pt")
    loaded, info = load_model(tmp_path / "plain.pt")
    assert info["kind"] == "tiny" and loaded.crfrnn.learn_bandwidths
    got = _thetas(loaded)
    assert set(got) == set(THETA_NAMES) and got["crfrnn.log_theta_beta"].shape == (3,)
    for k, v in _thetas(model).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    x = torch.rand(1, 3, 20, 24) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_state_dict_with_learned_widths_is_in_our_convention(tmp_path):
    """The published files have no widths: a plain state dict with them is not negated under ``auto``."""
    torch.manual_seed(2)
    m = torch.randn(L, L)
    torch.save({"crfrnn.compatibility_matrix": m}, tmp_path / "port.pt")
    torch.save({"crfrnn.compatibility_matrix": m, "crfrnn.log_theta_alpha": torch.tensor(4.0)}, tmp_path / "ours.pt")
    port, info = read_compatibility(tmp_path / "port.pt")
    assert info["sign_flipped"] and not info["ours"]
    torch.testing.assert_close(port, flip_compatibility(m.double()))
    ours, info = read_compatibility(tmp_path / "ours.pt")
    assert not info["sign_flipped"] and info["ours"]
    torch.testing.assert_close(ours, m.double())


def test_init_copies_learned_widths_only_into_a_model_that_learns_them(tmp_path):
    torch.manual_seed(3)
    src = TinyCrfRnnNet(L, learn_bandwidths=True)
    with torch.no_grad():
        src.crfrnn.log_theta_gamma.add_(0.5)
    torch.save({"model": src.state_dict(), "step": 0}, tmp_path / "ck.pt")
    learns = build_model("tiny", L, {"learn_bandwidths": True})
    assert init_weights(learns, "tiny", tmp_path / "ck.pt") == "checkpoint"
    for k, v in _thetas(src).items():
        torch.testing.assert_close(_thetas(learns)[k], v, rtol=0, atol=0)
    fixed = build_model("tiny", L)
    init_weights(fixed, "tiny", tmp_path / "ck.pt")  # the widths are dropped, the rest is copied
    assert _thetas(fixed) == {} and fixed.crfrnn.theta_gamma == pytest.approx(TinyCrfRnnNet(L).crfrnn.theta_gamma)
    torch.testing.assert_close(fixed.tiny_score.weight, src.tiny_score.weight, rtol=0, atol=0)


def test_scalar_theta_beta_layout_keeps_the_sidecars_values(tmp_path):
    sd = TinyCrfRnnNet(L, learn_bandwidths=True).state_dict()
    assert crf_layout(sd) == {**crf_layout(TinyCrfRnnNet(L).state_dict()), "learn_bandwidths": True}


# ------------------------------------------------------------------------------------------ crfrnn train
def _train(tmp_path, capsys, run_dir, *extra):
    data = tmp_path / "data"
    if not data.is_dir():
        write_scene_folder(data, range(2), h=32, w=40)
    argv = ["train", "--dataset", "folder", "--root", data, "--train-split", "", "--val-split", "",
            "--num-classes", L, "--model", "tiny", "--batch-size", 2, "--lr", 0.05, "--log-every", 1,
            "--crf-iterations", 2, "--crf-test-iterations", 2, "--device", "cpu", "--run-dir", run_dir,
            "--json", "--quiet", *extra]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    return json.loads(out)


def test_train_learns_widths_and_the_run_folder_loads_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    res = _train(tmp_path, capsys, run_dir, "--steps", 3, "--learn-bandwidths", "--crf-theta-lr-mult", 20)
    assert res["step"] == 3 and res["config"]["learn_bandwidths"] is True
    assert json.loads((run_dir / SIDECAR).read_text())["crf"]["learn_bandwidths"] is True
    trained = _thetas_from_checkpoint(run_dir / "last.pt")
    init = _thetas(build_model("tiny", L, {"learn_bandwidths": True}))
    assert set(trained) == set(init) == set(THETA_NAMES)
    assert all(not torch.equal(trained[k], init[k]) for k in THETA_NAMES)  # every width moved
    loaded, _ = load_model(run_dir)
    for k, v in _thetas(loaded).items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    (run_dir / SIDECAR).unlink()  # the keys alone say that the widths are parameters
    loaded, info = load_model(run_dir)
    assert info["sidecar"] == {} and loaded.crfrnn.learn_bandwidths
    for k, v in _thetas(loaded).items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)


def test_train_resumes_a_run_with_learned_widths(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(tmp_path, capsys, run_dir, "--steps", 1, "--learn-bandwidths", "--crf-theta-lr-mult", 20,
           "--schedule", "fixed")
    first = _thetas_from_checkpoint(run_dir / "last.pt")
    res = _train(tmp_path, capsys, run_dir, "--steps", 2, "--resume")  # the flag comes from config.json
    assert res["step"] == 2 and res["config"]["learn_bandwidths"] is True
    second = _thetas_from_checkpoint(run_dir / "last.pt")
    assert set(second) == set(THETA_NAMES) and any(not torch.equal(first[k], second[k]) for k in THETA_NAMES)


def test_a_run_of_a_version_without_the_fields_resumes(tmp_path, capsys):
    """config.json and last.pt written before learn_bandwidths / crf_theta_lr_mult existed: they ran as the
    defaults, so the run resumes (and config.json gains the fields)."""
    run_dir = tmp_path / "run"
    _train(tmp_path, capsys, run_dir, "--steps", 1)
    new_fields = ("learn_bandwidths", "crf_theta_lr_mult")
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in new_fields}))
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in new_fields}
    torch.save(ckpt, run_dir / "last.pt")
    res = _train(tmp_path, capsys, run_dir, "--steps", 2, "--resume")
    assert res["step"] == 2 and res["config"]["learn_bandwidths"] is False
    assert set(new_fields) <= set(json.loads((run_dir / "config.json").read_text()))


def test_train_without_the_flag_has_no_width_parameters(tmp_path, capsys):
    run_dir = tmp_path / "run"
    res = _train(tmp_path, capsys, run_dir, "--steps", 1)
    assert res["config"]["learn_bandwidths"] is False
    assert "learn_bandwidths" not in json.loads((run_dir / SIDECAR).read_text())["crf"]
    assert _thetas_from_checkpoint(run_dir / "last.pt") == {}
    loaded, _ = load_model(run_dir)
    assert not loaded.crfrnn.learn_bandwidths and _thetas(loaded) == {}


def test_train_refuses_the_flag_for_a_model_without_crf(tmp_path, capsys):
    write_scene_folder(tmp_path / "data", range(2), h=32, w=40)
    rc, _, err = run_cli(["train", "--dataset", "folder", "--root", tmp_path / "data", "--train-split", "",
                          "--val-split", "", "--num-classes", L, "--model", "tiny-fcn", "--steps", 1,
                          "--learn-bandwidths", "--run-dir", tmp_path / "run"], capsys)
    assert rc == 2 and "--learn-bandwidths" in err and not (tmp_path / "run").exists()


def _thetas_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in sd.items() if "log_theta_" in k}
