"""Tests of crfrnn.metrics and crfrnn.train: metrics vs. loops, training, run folders, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from crfrnn.engine import (
    CheckpointError,
    TrainConfig,
    evaluate,
    load_checkpoint,
    param_groups,
    train,
)
from crfrnn.engine.metrics import (
    class_iou,
    confusion_matrix,
    format_iou_table,
    mean_iou,
    pixel_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CAMVID = DATA / "camvid"
CAMVID_VOID = 11
CAMVID_CLASSES = 11


# --------------------------------------------------------------------------- helpers (also imported by subprocesses)


class TinyNet(nn.Module):
    """Two convolutions: (B, 3, H, W) RGB 0..255 -> (B, L, H, W) logits; optional dropout exercises the RNG."""

    def __init__(self, num_classes: int = CAMVID_CLASSES, dropout: float = 0.0, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.conv2 = nn.Conv2d(width, num_classes, 1)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.conv2(self.drop(F.relu(self.conv1(x / 255.0 - 0.5))))


class SyntheticSet(Dataset):
    """Deterministic random images / masks (with ignore pixels); random crop + flip from torch's global RNG."""

    def __init__(self, n: int, size: int = 20, crop: int = 16, num_classes: int = 4, seed: int = 0,
                 augment: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 255
        masks = torch.randint(0, num_classes, (n, size, size), generator=g)
        # make the labels learnable: brightness of channel 0 decides the class
        masks = torch.where(torch.rand(n, size, size, generator=g) < 0.7,
                            (self.images[:, 0] / 256 * num_classes).long(), masks)
        masks[torch.rand(n, size, size, generator=g) < 0.1] = 255
        self.masks = masks
        self.crop, self.augment = crop, augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, mask = self.images[i], self.masks[i]
        c = self.crop
        if self.augment:
            top = int(torch.randint(0, image.shape[1] - c + 1, ()))
            left = int(torch.randint(0, image.shape[2] - c + 1, ()))
            image, mask = image[:, top:top + c, left:left + c], mask[top:top + c, left:left + c]
            if torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
        else:
            image, mask = image[:, :c, :c], mask[:c, :c]
        return image.clone(), mask.clone()


def load_camvid(split: str, n: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """n CamVid pairs spread over the split, resized to size=(W, H); void -> 255."""
    from PIL import Image

    names = sorted(p.name for p in (CAMVID / split / "images").glob("*.png"))
    names = [names[i] for i in np.linspace(0, len(names) - 1, n).astype(int)]
    images, masks = [], []
    for name in names:
        img = Image.open(CAMVID / split / "images" / name).convert("RGB").resize(size, Image.BILINEAR)
        msk = Image.open(CAMVID / split / "masks" / name).resize(size, Image.NEAREST)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
        m = torch.from_numpy(np.asarray(msk, dtype=np.int64).copy())
        m[m == CAMVID_VOID] = 255
        masks.append(m)
    return torch.stack(images), torch.stack(masks)


class TensorPairs(Dataset):
    """(image, mask) from stacked tensors, with an optional random crop (+ flip) drawn from torch's global RNG."""

    def __init__(self, images, masks, crop: int | None = None):
        self.images, self.masks, self.crop = images, masks, crop

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, mask = self.images[i], self.masks[i]
        if self.crop is not None:
            c = self.crop
            top = int(torch.randint(0, image.shape[1] - c + 1, ()))
            left = int(torch.randint(0, image.shape[2] - c + 1, ()))
            image, mask = image[:, top:top + c, left:left + c], mask[top:top + c, left:left + c]
            if torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
        return image.clone(), mask.clone()


needs_camvid = pytest.mark.skipif(not (CAMVID / "train" / "images").is_dir(), reason="CamVid not in shared/data")


def small_cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, momentum=0.9, batch_size=2, max_steps=12, eval_every=4, log_every=1,
                checkpoint_every=5, device="cpu", seed=3, num_classes=4)
    base.update(kw)
    return TrainConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def file_snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())}


# --------------------------------------------------------------------------- metrics


def loop_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != ignore:
            conf[t, p] += 1
    return conf


def loop_mean_iou(conf: np.ndarray) -> tuple[list[float], float]:
    ious, present = [], []
    for c in range(conf.shape[0]):
        inter = conf[c, c]
        gt = sum(conf[c, k] for k in range(conf.shape[0]))
        pr = sum(conf[k, c] for k in range(conf.shape[0]))
        union = gt + pr - inter
        ious.append(inter / union if union > 0 else float("nan"))
        if union > 0:
            present.append(inter / union)
    return ious, sum(present) / len(present)


def test_metrics_match_pixel_loops():
    g = torch.Generator().manual_seed(0)
    L = 6
    target = torch.randint(0, 4, (3, 17, 23), generator=g)  # classes 0..3 in the ground truth
    target[torch.rand(target.shape, generator=g) < 0.15] = 255
    pred = torch.randint(0, 4, target.shape, generator=g)
    pred[torch.rand(target.shape, generator=g) < 0.05] = 4  # class 4 only predicted; class 5 absent everywhere
    conf = confusion_matrix(pred, target, L)
    ref = loop_confusion(pred.numpy(), target.numpy(), L, 255)
    assert conf.dtype == torch.int64 and conf.device == pred.device
    np.testing.assert_array_equal(conf.numpy(), ref)
    ref_ious, ref_miou = loop_mean_iou(ref)
    ious = class_iou(conf)
    assert np.isnan(ious[5].item()) and ious[4].item() == 0.0
    np.testing.assert_allclose(ious.numpy(), np.array(ref_ious), rtol=1e-12, equal_nan=True)
    assert mean_iou(conf) == pytest.approx(ref_miou, rel=1e-12)
    assert pixel_accuracy(conf) == pytest.approx(np.trace(ref) / ref.sum(), rel=1e-12)
    table = format_iou_table(conf, [f"c{i}" for i in range(L)], row_name="tiny")
    lines = table.splitlines()
    assert len(lines) == 3 and "Mean IU" in lines[0] and "tiny" in lines[2]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[-1] == f"{100 * ref_miou:.1f}" and cells[6] == "-"  # c5: absent
    assert cells[1:5] == [f"{100 * v:.1f}" for v in ref_ious[:4]]


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="pred"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]), 4)
    with pytest.raises(ValueError, match="class_names"):
        format_iou_table(torch.eye(3, dtype=torch.long), ["a", "b"])


# --------------------------------------------------------------------------- config and parameter groups


def test_config_json_roundtrip_validation_and_paper_equivalence():
    cfg = small_cfg(grad_clip=1.0)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({**d, "bogus": 1})
    s, m = TrainConfig.paper("sum"), TrainConfig.paper("mean", num_pixels=1000)
    assert (s.lr, s.momentum, s.loss_reduction, s.crf_spatial_lr_mult, s.crf_compat_lr_mult) == (
        1e-13, 0.99, "sum", 10000.0, 1000.0)
    assert m.lr == pytest.approx(s.lr * 1000) and m.lr * m.weight_decay == pytest.approx(s.lr * s.weight_decay)


def test_mean_loss_with_scaled_lr_equals_sum_loss(tmp_path):
    """The documented equivalence: sum loss with (lr, wd) == mean loss with (lr x N, wd / N), N labelled pixels."""
    data = SyntheticSet(4, size=8, crop=8, augment=False)
    data.masks[data.masks == 255] = 0  # every pixel labelled: N is the same in every batch
    n_pixels = 2 * 8 * 8
    weights = []
    for red, lr, wd in (("sum", 1e-5, 5e-4), ("mean", 1e-5 * n_pixels, 5e-4 / n_pixels)):
        torch.manual_seed(0)
        model = TinyNet(4)
        cfg = small_cfg(loss_reduction=red, lr=lr, weight_decay=wd, momentum=0.99, schedule="fixed", max_steps=3,
                        eval_every=0, checkpoint_every=0)
        train(model, data, None, cfg, tmp_path / red, progress=False)
        weights.append(model.state_dict())
    torch.manual_seed(0)
    before = TinyNet(4).state_dict()
    for k in weights[0]:
        assert not torch.equal(weights[0][k], before[k])  # it did move
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7)


class WithCrf(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyNet(4)
        self.crfrnn = nn.Module()
        self.crfrnn.spatial_ker_weights = nn.Parameter(torch.eye(4))
        self.crfrnn.bilateral_ker_weights = nn.Parameter(torch.eye(4))
        self.crfrnn.compatibility_matrix = nn.Parameter(torch.eye(4))
        self.crfrnn.theta = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)


def test_param_groups_split_crf_bias_and_weights():
    model = WithCrf()
    cfg = TrainConfig(lr=1e-3, weight_decay=1e-4, crf_spatial_lr_mult=7.0, crf_bilateral_lr_mult=5.0,
                      crf_compat_lr_mult=3.0, crf_weight_decay=0.0)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    m = model
    assert ids["crf_spatial"] == {id(m.crfrnn.spatial_ker_weights)}
    assert ids["crf_bilateral"] == {id(m.crfrnn.bilateral_ker_weights)}
    assert ids["crf_compat"] == {id(m.crfrnn.compatibility_matrix)}
    assert ids["crf"] == {id(m.crfrnn.theta)}
    assert ids["bias"] == {id(m.backbone.conv1.bias), id(m.backbone.conv2.bias)}
    assert ids["weight"] == {id(m.backbone.conv1.weight), id(m.backbone.conv2.weight)}
    assert groups["crf_spatial"]["lr"] == pytest.approx(7e-3) and groups["crf_compat"]["lr"] == pytest.approx(3e-3)
    assert groups["bias"]["lr"] == pytest.approx(2e-3) and groups["bias"]["weight_decay"] == 0.0
    assert groups["weight"]["weight_decay"] == 1e-4 and groups["crf_bilateral"]["weight_decay"] == 0.0
    assert id(m.frozen) not in set().union(*ids.values())


# --------------------------------------------------------------------------- training on CamVid


@needs_camvid
def test_short_camvid_training_lowers_loss_and_writes_run_folder(tmp_path):
    images, masks = load_camvid("train", 12, (120, 90))
    val_images, val_masks = load_camvid("val", 3, (96, 72))
    train_set = TensorPairs(images, masks, crop=64)
    val_set = TensorPairs(val_images, val_masks)
    torch.manual_seed(0)
    model = TinyNet(CAMVID_CLASSES, width=16)

    def fixed_loss() -> float:
        with torch.no_grad():
            logits = model(images[:, :, 13:77, 28:92])
            return F.cross_entropy(logits, masks[:, 13:77, 28:92], ignore_index=255).item()

    before = fixed_loss()
    cfg = TrainConfig(num_classes=CAMVID_CLASSES, lr=0.02, momentum=0.9, batch_size=4, max_steps=36, eval_every=18,
                      log_every=6, device="cpu", seed=1)
    summary = train(model, train_set, val_set, cfg, tmp_path / "run", progress=False)
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)

    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    recs = read_jsonl(run / "metrics.jsonl")
    train_recs = [r for r in recs if r["kind"] == "train"]
    val_recs = [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in train_recs] == [6, 12, 18, 24, 30, 36]
    assert [r["step"] for r in val_recs] == [18, 36]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert train_recs[-1]["lr"] < train_recs[0]["lr"]  # poly schedule
    last = load_checkpoint(run / "last.pt")
    best = load_checkpoint(run / "best.pt")
    assert last["step"] == 36 and summary["step"] == 36
    best_rec = max(val_recs, key=lambda r: r["mean_iou"])
    assert best["step"] == best_rec["step"] == summary["best_step"]
    assert best["metrics"]["mean_iou"] == pytest.approx(best_rec["mean_iou"])
    # best.pt's weights give that mean IU again
    fresh = TinyNet(CAMVID_CLASSES, width=16)
    fresh.load_state_dict(best["model"])
    res = evaluate(fresh, val_set, CAMVID_CLASSES, progress=False)
    assert res["mean_iou"] == pytest.approx(best_rec["mean_iou"], rel=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(last["model"][k], v)


@needs_camvid
def test_evaluate_matches_independent_count():
    images, masks = load_camvid("val", 4, (48, 36))
    torch.manual_seed(5)
    model = TinyNet(CAMVID_CLASSES, dropout=0.5)
    with torch.no_grad():  # spread the predictions over several classes
        model.conv2.weight.mul_(20)
    model.train()
    res = evaluate(model, TensorPairs(images, masks), CAMVID_CLASSES, progress=False)
    assert model.training and model.modes[-1] is False  # evaluated in eval mode, mode restored

    model.eval()
    conf = np.zeros((CAMVID_CLASSES, CAMVID_CLASSES), dtype=np.int64)
    with torch.no_grad():
        for i in range(len(images)):
            pred = model(images[i : i + 1])[0].argmax(0).numpy()
            conf += loop_confusion(pred, masks[i].numpy(), CAMVID_CLASSES, 255)
    ious, miou = loop_mean_iou(conf)
    assert len({int(k) for k in np.nonzero(conf.sum(0))[0]}) >= 3
    np.testing.assert_array_equal(res["confusion"].numpy(), conf)
    assert res["mean_iou"] == pytest.approx(miou, rel=1e-12)
    np.testing.assert_allclose(res["class_iou"], ious, rtol=1e-12, equal_nan=True)
    assert res["pixel_accuracy"] == pytest.approx(np.trace(conf) / conf.sum(), rel=1e-12)
    assert res["num_images"] == 4
    res2 = evaluate(model, TensorPairs(images, masks), CAMVID_CLASSES, batch_size=3, progress=False)
    assert torch.equal(res2["confusion"], res["confusion"])


# --------------------------------------------------------------------------- resume


class Kill(Exception):
    pass


@pytest.mark.parametrize("kill_at", [3, 8])
def test_killed_then_resumed_run_is_bit_exact(tmp_path, kill_at):
    # 9 samples, batch 2 -> 4 steps per epoch; 12 steps cross epoch boundaries; dropout and random crops use RNGs
    train_set, val_set = SyntheticSet(9, seed=1), SyntheticSet(3, seed=2, augment=False)
    cfg = small_cfg()

    torch.manual_seed(0)
    ref = TinyNet(4, dropout=0.3)
    train(ref, train_set, val_set, cfg, tmp_path / "ref", progress=False)

    def killer(step, info):
        if step == kill_at:
            raise Kill

    torch.manual_seed(0)
    with pytest.raises(Kill):
        train(TinyNet(4, dropout=0.3), train_set, val_set, cfg, tmp_path / "run", progress=False, on_step=killer)
    torch.manual_seed(123)  # resumed process: other initial weights and RNG state, must not matter
    np.random.seed(7)
    model = TinyNet(4, dropout=0.3)
    summary = train(model, train_set, val_set, cfg, tmp_path / "run", resume=True, progress=False)
    assert summary["step"] == 12
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    run_recs, ref_recs = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("run", "ref"))
    assert strip(run_recs) == strip(ref_recs)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "ref" / name), load_checkpoint(tmp_path / "run" / name)
        assert a["step"] == b["step"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


_KILL_SCRIPT = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from test_train import TinyNet, SyntheticSet, small_cfg
from crfrnn.engine import train
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
cfg = small_cfg(max_steps=int(sys.argv[4]), checkpoint_every=1, eval_every=3)
train(TinyNet(4, dropout=0.3), SyntheticSet(9, seed=1), SyntheticSet(3, seed=2, augment=False), cfg, sys.argv[2],
      progress=False, on_step=lambda step, info: time.sleep(0.15))
"""


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    steps = 14
    script = tmp_path / "killme.py"
    script.write_text(_KILL_SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent), str(run), str(torch.get_num_threads()), str(steps)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            if (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["step"] >= 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at step >= 4 within 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = load_checkpoint(run / "last.pt")["step"]  # still readable: written atomically
    assert 4 <= killed_at < steps

    cfg = small_cfg(max_steps=steps, checkpoint_every=1, eval_every=3)
    torch.manual_seed(0)
    ref = TinyNet(4, dropout=0.3)
    train(ref, SyntheticSet(9, seed=1), SyntheticSet(3, seed=2, augment=False), cfg, tmp_path / "ref", progress=False)
    model = TinyNet(4, dropout=0.3)
    train(model, SyntheticSet(9, seed=1), SyntheticSet(3, seed=2, augment=False), cfg, run, resume=True,
          progress=False)
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    assert not list(run.glob(".*.tmp"))


# --------------------------------------------------------------------------- refusals and corrupt files


def test_refusals_never_overwrite_and_corrupt_checkpoints_are_named(tmp_path):
    train_set, val_set = SyntheticSet(6, seed=1), SyntheticSet(2, seed=2, augment=False)
    cfg = small_cfg(max_steps=2, eval_every=2)
    run = tmp_path / "run"
    train(TinyNet(4), train_set, val_set, cfg, run, progress=False)
    snap = file_snapshot(run)

    with pytest.raises(FileExistsError, match=str(run)):
        train(TinyNet(4), train_set, val_set, cfg, run, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0\.05.*0\.01"):
        train(TinyNet(4), train_set, val_set, small_cfg(max_steps=2, eval_every=2, lr=0.01), run, resume=True,
              progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(TinyNet(4), train_set, val_set, cfg, tmp_path / "nowhere", resume=True, progress=False)
    assert file_snapshot(run) == snap
    assert not (tmp_path / "nowhere").exists()

    # corrupt files: truncated last.pt, garbage best.pt, a torch file that is not a checkpoint
    (run / "last.pt").write_bytes(snap["last.pt"][0][: len(snap["last.pt"][0]) // 2])
    with pytest.raises(CheckpointError, match=str(run / "last.pt")):
        train(TinyNet(4), train_set, val_set, cfg, run, resume=True, progress=False)
    (run / "best.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(run / "best.pt")):
        load_checkpoint(run / "best.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_amp_on_cpu_trains(tmp_path):
    model = TinyNet(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = small_cfg(max_steps=2, amp=True, grad_clip=1.0, eval_every=0)
    out = train(model, SyntheticSet(4), SyntheticSet(2, augment=False), cfg, tmp_path / "amp", progress=False)
    assert out["step"] == 2
    assert all(r["loss"] is not None and np.isfinite(r["loss"])
               for r in read_jsonl(tmp_path / "amp" / "metrics.jsonl") if r["kind"] == "train")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- torchrun (gloo, 2 processes)


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_train import TinyNet, SyntheticSet, small_cfg
from crfrnn.engine import evaluate, train
out = sys.argv[2]
torch.manual_seed(0)
model = TinyNet(4)
cfg = small_cfg(batch_size=2, max_steps=2, eval_every=0, checkpoint_every=0)
train(model, SyntheticSet(8, seed=1), SyntheticSet(5, seed=2, augment=False), cfg, out + "/run", progress=False)
assert not dist.is_initialized()  # train created the process group and took it down
# a fresh store: re-using torchrun's store for a second process group can mix up the two groups' keys
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=rank, world_size=world)
res = evaluate(model, SyntheticSet(5, seed=2, augment=False), 4, progress=False)
if dist.get_rank() == 0:
    torch.save({"model": model.state_dict(), "confusion": res["confusion"], "n": res["num_images"]}, out + "/ddp.pt")
dist.destroy_process_group()
"""


def test_torchrun_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(Path(__file__).parent), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # one process, combined batch (2 x 2)
    torch.manual_seed(0)
    single = TinyNet(4)
    init = {k: v.clone() for k, v in single.state_dict().items()}
    cfg = small_cfg(batch_size=4, max_steps=2, eval_every=0, checkpoint_every=0)
    train(single, SyntheticSet(8, seed=1), SyntheticSet(5, seed=2, augment=False), cfg, tmp_path / "single",
          progress=False)
    for k, v in single.state_dict().items():
        assert not torch.equal(v, init[k])
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-5, atol=1e-6)
    ddp_loss = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    one_loss = [r["loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if r["kind"] == "train"]
    np.testing.assert_allclose(ddp_loss, one_loss, rtol=1e-5)

    # distributed evaluation == one-process evaluation of the same weights (5 images: uneven shards)
    model = TinyNet(4)
    model.load_state_dict(ddp["model"])
    res = evaluate(model, SyntheticSet(5, seed=2, augment=False), 4, progress=False)
    assert ddp["n"] == 5
    assert torch.equal(ddp["confusion"], res["confusion"])
    run_val = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    assert run_val and run_val[-1]["num_images"] == 5


# --------------------------------------------------------------------------- integration with crfrnn.models / data


@needs_camvid
def test_crfrnn_head_on_camvid_crops(tmp_path):
    models = pytest.importorskip("crfrnn.models")
    data = pytest.importorskip("crfrnn.data")
    try:
        transform = data.Compose([data.RandomCrop(48), data.RandomHorizontalFlip()])
        train_set = data.CamVid(CAMVID, "train", transform=transform)
        val_set = data.CamVid(CAMVID, "val", transform=data.Compose([data.RandomCrop(48)]))
    except (AttributeError, TypeError) as e:
        pytest.skip(f"crfrnn.data API differs: {e}")
    train_set = torch.utils.data.Subset(train_set, range(4))
    val_set = torch.utils.data.Subset(val_set, range(2))
    torch.manual_seed(0)
    model = models.CrfRnnHead(TinyNet(CAMVID_CLASSES), CAMVID_CLASSES, num_iterations=2, num_test_iterations=3)
    names = {g["name"] for g in param_groups(model, TrainConfig())}
    assert {"crf_spatial", "crf_bilateral", "crf_compat"} <= names
    crf_before = model.crfrnn.spatial_ker_weights.detach().clone()
    cfg = TrainConfig(num_classes=CAMVID_CLASSES, lr=1e-3, batch_size=2, max_steps=2, device="cpu",
                      crf_spatial_lr_mult=100.0, log_every=1)
    out = train(model, train_set, val_set, cfg, tmp_path / "run", progress=False)
    assert out["last_eval"]["num_images"] == 2
    assert not torch.equal(model.crfrnn.spatial_ker_weights, crf_before)
