"""The pieces of the training loop: the ``lr_schedule`` and ``should_stop`` hooks, and padded batches in training
and evaluation (``valid_mask`` reaches the CRF of models that accept it, so a padded batch trains and evaluates
like its images one by one)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from test_train import SyntheticSet, TinyNet, small_cfg
from torch import nn

from crfrnn.engine import TrainConfig, accepts_valid_mask, evaluate, load_checkpoint, param_groups, read_metrics, train
from crfrnn.engine.samplers import collate
from crfrnn.engine.step import train_step


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


# --------------------------------------------------------------------------- hooks


def test_should_stop_ends_cleanly_and_the_run_resumes_bit_exactly(tmp_path):
    train_set, val_set = SyntheticSet(9, seed=1), SyntheticSet(3, seed=2, augment=False)
    cfg = small_cfg(checkpoint_every=0)  # 12 steps, 4 per epoch, evaluation every 4
    torch.manual_seed(0)
    ref = TinyNet(4, dropout=0.3)
    train(ref, train_set, val_set, cfg, tmp_path / "ref", progress=False)

    seen = []
    torch.manual_seed(0)
    model = TinyNet(4, dropout=0.3)
    out = train(model, train_set, val_set, cfg, tmp_path / "run", progress=False,
                should_stop=lambda step, info: seen.append((step, sorted(info))) or step == 6)
    assert out["step"] == 6 and seen == [(s, ["epoch", "loss", "lr"]) for s in range(1, 7)]
    recs = read_metrics(tmp_path / "run")
    # the stop step is handled as the last one: log line, evaluation and last.pt at step 6 (not an eval step)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [4, 6] and recs[-1]["step"] == 6
    assert out["last_eval"]["step"] == 6 and load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 6

    summary = train(TinyNet(4, dropout=0.3), train_set, val_set, cfg, tmp_path / "run", resume=True, progress=False)
    assert summary["step"] == 12
    last, ref_last = (load_checkpoint(tmp_path / d / "last.pt") for d in ("run", "ref"))
    for k, v in ref.state_dict().items():
        assert torch.equal(last["model"][k], v), k
    ref_recs = _strip_time(read_metrics(tmp_path / "ref"))
    run_recs = _strip_time(read_metrics(tmp_path / "run"))
    assert [r for r in run_recs if not (r["kind"] == "val" and r["step"] == 6)] == ref_recs


def test_lr_schedule_hook_sets_every_step_learning_rate(tmp_path):
    data = SyntheticSet(6, seed=1)
    calls = []

    def halving(step, total):
        calls.append((step, total))
        return 0.5 ** step

    torch.manual_seed(0)
    hooked = TinyNet(4)
    cfg = small_cfg(max_steps=5, eval_every=0, schedule="poly")
    train(hooked, data, None, cfg, tmp_path / "hooked", progress=False, lr_schedule=halving)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "hooked") if r["kind"] == "train"]
    assert lrs == [cfg.lr * 0.5 ** s for s in range(5)]
    assert sorted(set(calls)) == [(s, 5) for s in range(6)]  # steps 0..4, and 5 for last.pt's record

    # a constant hook on a "poly" config trains exactly like the "fixed" schedule without a hook
    torch.manual_seed(0)
    a = TinyNet(4)
    train(a, data, None, cfg, tmp_path / "const", progress=False, lr_schedule=lambda step, total: 1.0)
    torch.manual_seed(0)
    b = TinyNet(4)
    fixed = small_cfg(max_steps=5, eval_every=0, schedule="fixed")
    train(b, data, None, fixed, tmp_path / "fixed", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "const" / "config.json").read_text())["schedule"] == "poly"




def _pointwise_crf_net(num_classes: int = 3, dtype=torch.float64):
    """A CRF-RNN over a pointwise (1x1) backbone: padding cannot reach the unaries, only the CRF could see it."""
    from crfrnn.models import CrfRnnHead

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Tanh(), nn.Conv2d(6, num_classes, 1))
    net = CrfRnnHead(backbone, num_classes, num_iterations=3, num_test_iterations=2, theta_alpha=4.0,
                     theta_beta=30.0, theta_gamma=2.0)
    with torch.no_grad():  # non-trivial compatibility, so every CRF parameter gets a gradient of its own
        net.crfrnn.compatibility_matrix.add_(0.3 * torch.randn(num_classes, num_classes))
    return net.to(dtype)


def _odd_sized_pairs(num_classes: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    pairs = []
    for h, w in ((7, 9), (10, 6)):
        image = (torch.rand(3, h, w, generator=g) * 255).to(dtype)
        mask = torch.randint(0, num_classes, (h, w), generator=g)
        mask[torch.rand(h, w, generator=g) < 0.2] = 255
        pairs.append((image, mask))
    return pairs


def test_padded_batch_gives_the_loss_and_gradients_of_the_images_one_by_one():
    pairs = _odd_sized_pairs()
    cfg = TrainConfig(num_classes=3, lr=1.0, momentum=0.0, weight_decay=0.0, device="cpu")

    # reference: every image alone, unpadded; mean over all labelled pixels of both
    ref_net = _pointwise_crf_net().train()
    count = sum(int((m != 255).sum()) for _, m in pairs)
    ref_loss = sum(F.cross_entropy(ref_net(im[None]), m[None], ignore_index=255, reduction="sum")
                   for im, m in pairs) / count
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in ref_net.named_parameters()}

    def padded_step(with_mask: bool):
        net = _pointwise_crf_net().train()
        opt = torch.optim.SGD(param_groups(net, cfg), lr=cfg.lr)
        images, masks, valid = collate(pairs, ignore_index=255)
        assert valid is not None and images.shape == (2, 3, 10, 9) and not bool(valid.all())
        out = train_step(net, opt, images, masks, cfg, valid_mask=valid if with_mask else None, factor=0.0)
        return out, {k: p.grad for k, p in net.named_parameters()}

    assert accepts_valid_mask(_pointwise_crf_net()) and not accepts_valid_mask(TinyNet(3))
    out, grads = padded_step(with_mask=True)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-12, atol=0)
    for k, g in ref_grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[k], g, rtol=1e-9, atol=1e-12, msg=k)
    # without the mask the CRF mixes padding into the images' messages: the test can tell
    out_nomask, _ = padded_step(with_mask=False)
    assert abs(float(out_nomask.loss) - ref_loss.item()) > 1e-6


class _MaskSpy(nn.Module):
    """Wraps a model whose forward accepts valid_mask; records what each call received."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, tuple[int, ...]]] = []

    def forward(self, image, valid_mask=None):
        self.calls.append((self.training, None if valid_mask is None else tuple(valid_mask.shape)))
        return self.net(image, valid_mask=valid_mask)


def test_train_and_evaluate_pass_valid_mask_for_padded_batches(tmp_path):
    pairs = _odd_sized_pairs(dtype=torch.float32)
    model = _MaskSpy(_pointwise_crf_net(dtype=torch.float32))
    cfg = small_cfg(num_classes=3, batch_size=2, max_steps=2, eval_every=0, eval_batch_size=2, log_every=1)
    train(model, pairs, pairs, cfg, tmp_path / "run", progress=False)
    train_calls = [shape for training, shape in model.calls if training]
    eval_calls = [shape for training, shape in model.calls if not training]
    assert train_calls == [(2, 1, 10, 9)] * 2 and eval_calls == [(2, 1, 10, 9)] * 2  # one step per epoch
    # evaluation of the padded batch equals evaluation image by image
    net = model.net
    one = evaluate(net, pairs, 3, batch_size=1, progress=False)
    two = evaluate(net, pairs, 3, batch_size=2, progress=False)
    assert torch.equal(one["confusion"], two["confusion"]) and one["confusion"].sum() > 0
    # a model without valid_mask still trains on padded batches (plain model(images))
    plain = TinyNet(3)
    train(plain, pairs, pairs, cfg, tmp_path / "plain", progress=False)
    assert plain.modes and all(isinstance(m, bool) for m in plain.modes)
