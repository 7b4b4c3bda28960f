"""CRF-RNN Table 1 (and Section 7.1 ablations) at small scale on CamVid, CPU only.

The paper (Zheng et al., ICCV 2015, Table 1, VOC 2012 reduced val) reports
FCN-8s 61.3 < FCN-8s + dense CRF as post-processing 63.7 < CRF-RNN trained end to end 69.6 mean IU.
This script checks that *ordering* on real data at a scale a 2-core machine can run:

1. a narrow VGG-style FCN-8s (:class:`TinyFCN8s`: five conv stages, pool3/pool4 skips, FCN-8s fusion,
   trained from scratch: no ImageNet weights offline) is trained on CamVid train minus a held-apart part
   (10 %, fixed split) at reduced resolution;
2. arm (a) = that FCN; arm (b) = the same FCN + dense CRF post-processing (:func:`crfrnn.meanfield.mean_field`,
   T = 10, Potts), CRF parameters picked by a small grid search on the held-apart part (never on val);
   arm (c) = CRF-RNN (:class:`crfrnn.models.CrfRnnHead` over a copy of the FCN, initialised with the grid's
   CRF parameters) fine-tuned end to end, T = 5 in training, T = 10 at test;
3. ablations (Section 7.1), each fine-tuned from (a) exactly like (c) except for one thing: shared / per-class
   kernel weights, Potts (fixed) compatibility, untied iterations, frozen FCN (only the CRF learns), and (c)
   tested with T = 5.

Everything is evaluated on CamVid val (101 images) at the working resolution (masks resized by nearest
neighbour). The budget of one seed (``--budget-minutes``, counted in CPU seconds of this process, which runs one
torch and one lattice thread: on a shared machine other jobs' load and pauses then do not eat into it) is split
between the phases after a short timing calibration: the FCN gets ``--fcn-fraction`` of it, the grid search at
most ``--grid-fraction``, the evaluations are reserved from the calibrated (then measured) cost, and the
fine-tuning arms share the rest (main arm 2 shares, each ablation 1). The plan, the CPU and wall-clock time of
every phase and every number go to ``RUN_DIR/results.json``.

Modes::

    python experiments/camvid_table1.py --seed 0 --budget-minutes 45 --run-dir runs/camvid_s0   # one seed
    python experiments/camvid_table1.py --smoke --run-dir /tmp/smoke                            # tiny run
    python experiments/camvid_table1.py --run-dir runs/camvid_s0 --eval-dir /path/to/camvid/test # re-evaluate
    python experiments/camvid_table1.py --report runs/camvid_s0 runs/camvid_s1 -o docs/experiments.md
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from crfrnn.data import CAMVID_CLASSES, CamVid, Compose, RandomCrop, RandomHorizontalFlip, Resize
from crfrnn.meanfield import mean_field
from crfrnn.engine.metrics import class_iou, confusion_matrix, mean_class_accuracy, mean_iou, pixel_accuracy
from crfrnn.models import CrfRnnHead, bilinear_upsampling_weights
from crfrnn.engine.train import TrainConfig, load_checkpoint, save_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "camvid"
NUM_CLASSES = len(CAMVID_CLASSES)
IGNORE = 255
HOLD_SEED = 2015  # the held-apart split does not depend on --seed

#: arm name -> (table label, kind). Kinds: "fcn", "post" (mean_field on the FCN), "crfrnn" (fine-tuned head).
ARMS: dict[str, str] = {
    "fcn": "(a) FCN-8s (tiny, from scratch)",
    "fcn_crf_post": "(b) FCN + dense CRF post-processing (T=10, grid-searched)",
    "crfrnn": "(c) CRF-RNN end to end (T=5 train / T=10 test)",
}
#: ablation name -> (description, CrfRnn kwargs overriding the main arm's, frozen FCN, test iterations).
ABLATIONS: dict[str, tuple[str, dict[str, Any], bool, int]] = {
    "crfrnn_T5": ("(c) tested with T=5 instead of 10 (evaluation only)", {}, False, 5),
    "abl_shared_kernel": ("one shared weight per kernel (kernel_weights='shared')", {"kernel_weights": "shared"}, False, 10),
    "abl_perclass_kernel": ("per-class kernel weights (kernel_weights='diagonal')", {"kernel_weights": "diagonal"}, False, 10),
    "abl_potts": ("Potts compatibility, fixed (learn_compatibility=False)", {"learn_compatibility": False}, False, 10),
    "abl_untied": ("untied weights per iteration (untied=True)", {"untied": True}, False, 10),
    "abl_frozen_fcn": ("FCN frozen, only the CRF trained", {}, True, 10),
}
MAIN_CRF = {"kernel_weights": "matrix", "learn_compatibility": True, "untied": False}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================================ model


class TinyFCN8s(nn.Module):
    """A narrow VGG-style FCN-8s: five 2-conv stages (3x3 conv + BN + ReLU), 2x2 max-pools, ``fc6`` (3x3) and
    ``fc7`` (1x1) as convolutions, score layers on fc7 / pool4 / pool3 and the FCN-8s fusion
    (``upscore2`` -> + ``score_pool4`` -> ``upscore_pool4`` -> + ``score_pool3`` -> ``upscore8``, deconvolutions
    initialised to bilinear upsampling, score layers to zero, as FCN).

    ``forward(image (B, 3, H, W) raw RGB 0..255) -> logits (B, L, H, W)``; any H, W (the normalised input is
    zero-padded at the bottom/right to a multiple of 32 and the logits cropped back).
    ``freeze_bn()`` keeps every BatchNorm in eval mode from then on (used while fine-tuning the CRF-RNN arms).
    """

    MEAN = (0.390, 0.405, 0.414)  # CamVid RGB statistics (0..1 scale), rounded
    STD = (0.30, 0.31, 0.31)

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(16, 32, 64, 96, 128), fc: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.widths = tuple(widths)
        stages, cin = [], 3
        for w in widths:
            stages.append(nn.Sequential(_cbr(cin, w), _cbr(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc6 = _cbr(cin, fc)
        self.fc7 = _cbr(fc, fc, k=1)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        L = num_classes
        self.upscore2 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(L, L, 4, stride=2, padding=1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(L, L, 16, stride=8, padding=4, bias=False)
        with torch.no_grad():
            for conv in (self.score_fr, self.score_pool4, self.score_pool3):
                conv.weight.zero_()
                conv.bias.zero_()
            for d in (self.upscore2, self.upscore_pool4, self.upscore8):
                d.weight.copy_(bilinear_upsampling_weights(L, L, d.kernel_size[0]))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self._bn_frozen = False

    def freeze_bn(self) -> "TinyFCN8s":
        self._bn_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        H, W = image.shape[2:]
        x = (image.to(self.mean.dtype) - self.mean) / self.std
        x = F.pad(x, (0, (-W) % 32, 0, (-H) % 32))
        pools = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            pools.append(x)
        h = self.fc7(self.fc6(x))
        h = self.upscore2(self.score_fr(h)) + self.score_pool4(pools[3])
        h = self.upscore_pool4(h) + self.score_pool3(pools[2])
        return self.upscore8(h)[:, :, :H, :W].contiguous()


def _cbr(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ============================================================================================ data


class TensorPairs(Dataset):
    """In-memory (image float (3, H, W) 0..255, mask int64 (H, W)) pairs with an optional joint transform."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, names: list[str], transform=None):
        self.images, self.masks, self.names, self.transform = images, masks, names, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        image, mask = self.images[i].float(), self.masks[i].long()
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def load_split(root: Path, split: str, size: tuple[int, int], limit: int | None = None,
               cache_dir: Path | None = None):
    """CamVid ``split`` resized to ``size`` = (H, W): images uint8 (N, 3, H, W), masks uint8 (N, H, W) (void 255).

    ``root/split`` may also be any folder with ``images/`` and ``masks/`` (same layout). With ``cache_dir`` the
    resized arrays are kept in ``cache_dir/<split>_<H>x<W>_<N>.npz`` (keyed by the file names and sizes, so a
    changed folder is re-read) and loaded from there next time.
    """
    ds = CamVid(root, split, transform=Resize(size, antialias=True))
    n = len(ds) if limit is None else min(limit, len(ds))
    names = list(ds.names[:n])
    key = f"{Path(root).resolve()}|{split}|{size}|" + "|".join(
        f"{a.name}:{a.stat().st_size}:{b.stat().st_size}" for a, b in ds.pairs[:n])
    cache = None
    if cache_dir is not None:
        import hashlib  # noqa: PLC0415

        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
        cache = Path(cache_dir) / f"{split}_{size[0]}x{size[1]}_{n}_{digest}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                if list(z["names"]) == names:
                    return torch.from_numpy(z["images"]), torch.from_numpy(z["masks"]), names
    images = torch.empty((n, 3, *size), dtype=torch.uint8)
    masks = torch.empty((n, *size), dtype=torch.uint8)
    for i in range(n):
        im, m = ds[i]
        images[i] = im.round().clamp(0, 255).to(torch.uint8)
        masks[i] = m.to(torch.uint8)
    if cache is not None:
        buf = io.BytesIO()
        np.savez(buf, images=images.numpy(), masks=masks.numpy(), names=np.array(names))
        atomic_bytes(cache, buf.getvalue())
    return images, masks, names


def held_apart_split(names: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-apart indices): a fixed random ``fraction`` of ``names`` (sorted) is held apart."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    k = max(1, round(fraction * len(names)))
    hold = set(random.Random(HOLD_SEED).sample(order, k))
    return [i for i in order if i not in hold], [i for i in order if i in hold]


# ============================================================================================ metrics


def metrics_from_conf(conf: torch.Tensor) -> dict[str, Any]:
    nan_none = lambda v: None if v != v else float(v)  # noqa: E731
    return {
        "mean_iou": nan_none(mean_iou(conf)),
        "class_iou": [nan_none(v) for v in class_iou(conf).tolist()],
        "pixel_accuracy": nan_none(pixel_accuracy(conf)),
        "mean_accuracy": nan_none(mean_class_accuracy(conf)),
        "confusion": conf.tolist(),
    }


@torch.no_grad()
def predict(fn, images: torch.Tensor, masks: torch.Tensor, batch: int = 1):
    """Run ``fn(images (B, 3, H, W) float) -> logits`` over a split; return (labels uint8 (N, H, W), conf)."""
    labels = torch.empty(masks.shape, dtype=torch.uint8)
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for s in range(0, images.shape[0], batch):
        logits = fn(images[s : s + batch].float())
        pred = logits.argmax(1)
        labels[s : s + batch] = pred.to(torch.uint8)
        conf += confusion_matrix(pred, masks[s : s + batch].long(), NUM_CLASSES, IGNORE)
    return labels, conf


def post_crf_fn(fcn: nn.Module, params: dict[str, float], num_iterations: int = 10):
    def fn(images):
        return mean_field(fcn(images), images, num_iterations=num_iterations, **params)

    return fn


# ============================================================================================ files


def atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(path: Path, obj: Any) -> None:
    atomic_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def save_predictions(path: Path, labels: torch.Tensor, names: list[str]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels.numpy(), names=np.array(names))
    atomic_bytes(path, buf.getvalue())


# ============================================================================================ arms


def crf_kwargs_for(params: dict[str, float], overrides: dict[str, Any], test_iterations: int) -> dict[str, Any]:
    kw = dict(MAIN_CRF)
    kw.update(overrides)
    kw.update(
        theta_alpha=params["theta_alpha"], theta_beta=params["theta_beta"], theta_gamma=params["theta_gamma"],
        spatial_weight=params["spatial_weight"], bilateral_weight=params["bilateral_weight"],
        num_iterations=5, num_test_iterations=test_iterations,
    )
    return kw


def build_head(fcn_state: dict, widths, fc: int, crf_kwargs: dict[str, Any], frozen: bool) -> CrfRnnHead:
    fcn = TinyFCN8s(NUM_CLASSES, widths, fc)
    fcn.load_state_dict(fcn_state)
    fcn.freeze_bn()
    if frozen:
        for p in fcn.parameters():
            p.requires_grad_(False)
    return CrfRnnHead(fcn, NUM_CLASSES, **crf_kwargs)


def crf_param_summary(head: CrfRnnHead) -> dict[str, Any]:
    c = head.crfrnn
    return {
        "spatial_ker_weights": c.spatial_ker_weights.detach().tolist(),
        "bilateral_ker_weights": c.bilateral_ker_weights.detach().tolist(),
        "compatibility_matrix": c.compatibility_matrix.detach().tolist(),
    }


# ============================================================================================ timing


def _timed(fn, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call (the machine is shared: medians, not means)."""
    fn()
    times = []
    for _ in range(repeats):
        t = cpu()
        fn()
        times.append(cpu() - t)
    return float(np.median(times))


def calibrate(args, train_set, crf_train_set, val_images, params0) -> dict[str, float]:
    """Seconds per FCN step, per CRF-RNN fine-tuning step, per val image (FCN, mean_field T=10, FCN + CRF)."""
    torch.manual_seed(12345)
    fcn = TinyFCN8s(NUM_CLASSES, args.widths, args.fc)
    opt = torch.optim.SGD(fcn.parameters(), lr=1e-9)

    def batch_of(ds, n):
        items = [ds[i % len(ds)] for i in range(n)]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    x, y = batch_of(train_set, args.batch_size)

    def fcn_step():
        opt.zero_grad()
        F.cross_entropy(fcn(x), y, ignore_index=IGNORE).backward()
        opt.step()

    head = CrfRnnHead(copy.deepcopy(fcn), NUM_CLASSES, **crf_kwargs_for(params0, {}, 10))
    xc, yc = batch_of(crf_train_set, args.crf_batch_size)
    opt2 = torch.optim.SGD(head.parameters(), lr=1e-9)

    def crf_step():
        head.train()
        opt2.zero_grad()
        F.cross_entropy(head(xc), yc, ignore_index=IGNORE).backward()
        opt2.step()

    t_step = _timed(fcn_step)
    v = val_images[:1].float()
    fcn.eval()
    with torch.no_grad():
        t_fcn_eval = _timed(lambda: fcn(v))
        u = fcn(v)
        t_mf = _timed(lambda: mean_field(u, v, num_iterations=10, **params0))
    fcn.train()
    # one forward pass costs less than half a training step per image: the smaller of that and the
    # direct measurement is the steadier estimate on a busy machine
    t_fcn_eval = min(t_fcn_eval, t_step / args.batch_size / 2)
    return {
        "fcn_step": t_step,
        "crf_step": _timed(crf_step, 2),
        "fcn_eval_image": t_fcn_eval,
        "mean_field_image": t_mf,
        "crfrnn_eval_image": t_fcn_eval + t_mf,
    }


def cpu() -> float:
    """CPU seconds of this process: the budget clock. The machine is shared (other jobs renice or even SIGSTOP
    this one for a while); with one torch and one lattice thread, CPU time is what an idle machine's wall clock
    would show, so a budget in CPU time means the same work whatever else runs."""
    return time.process_time()


class Clock:
    """Budget accounting in CPU seconds (:func:`cpu`), with the wall-clock time of every phase recorded too."""

    def __init__(self, budget_s: float):
        self.t0, self.w0 = cpu(), time.perf_counter()
        self.budget = budget_s
        self.phases: dict[str, float] = {}
        self.phases_wall: dict[str, float] = {}
        self._start: dict[str, tuple[float, float]] = {}

    def elapsed(self) -> float:
        return cpu() - self.t0

    def wall(self) -> float:
        return time.perf_counter() - self.w0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def start(self, name: str) -> None:
        self._start[name] = (cpu(), time.perf_counter())

    def stop(self, name: str) -> float:
        c, w = self._start.pop(name)
        d = cpu() - c
        self.phases[name] = self.phases.get(name, 0.0) + d
        self.phases_wall[name] = self.phases_wall.get(name, 0.0) + time.perf_counter() - w
        return d


# ============================================================================================ experiment


def grid_values(args) -> list[dict[str, float]]:
    grid = []
    for ta in args.grid_theta_alpha:
        for tb in args.grid_theta_beta:
            for wb in args.grid_bilateral_weight:
                grid.append({"theta_alpha": float(ta), "theta_beta": float(tb), "theta_gamma": float(args.theta_gamma),
                             "spatial_weight": float(args.spatial_weight), "bilateral_weight": float(wb)})
    return grid


def run_experiment(args) -> dict[str, Any]:
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"--run-dir {run_dir} exists and is not empty; choose a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.numba_threads:
        import numba  # noqa: PLC0415

        numba.set_num_threads(args.numba_threads)
    clock = Clock(args.budget_minutes * 60.0)
    size = tuple(args.resolution)
    ablations = list(ABLATIONS) if args.ablations else []
    log(f"seed {args.seed}, resolution {size}, budget {args.budget_minutes} min, run dir {run_dir}")

    # ---------------------------------------------------------------- data
    clock.start("data")
    root = Path(args.data)
    cache = Path(args.cache_dir) if args.cache_dir else None
    tr_img, tr_mask, tr_names = load_split(root, "train", size, args.max_train, cache)
    va_img, va_mask, va_names = load_split(root, "val", size, args.max_val, cache)
    tr_idx, ho_idx = held_apart_split(tr_names, args.hold_fraction)
    ho_img, ho_mask, ho_names = tr_img[ho_idx], tr_mask[ho_idx], [tr_names[i] for i in ho_idx]
    tr_img, tr_mask, tr_names = tr_img[tr_idx], tr_mask[tr_idx], [tr_names[i] for i in tr_idx]
    crop = tuple(args.crf_crop) if args.crf_crop else size
    train_set = TensorPairs(tr_img, tr_mask, tr_names, RandomHorizontalFlip(0.5))
    crf_train_set = TensorPairs(
        tr_img, tr_mask, tr_names, Compose([RandomCrop(crop, ignore_index=IGNORE), RandomHorizontalFlip(0.5)])
    )
    clock.stop("data")
    log(f"data: {len(tr_names)} train, {len(ho_names)} held apart, {len(va_names)} val ({clock.phases['data']:.1f}s)")

    grid = grid_values(args)
    results: dict[str, Any] = {
        "seed": args.seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "class_names": list(CAMVID_CLASSES),
        "data": {"root": str(root), "num_train": len(tr_names), "num_held_apart": len(ho_names),
                 "num_val": len(va_names), "held_apart_names": ho_names, "resolution": list(size),
                 "crf_crop": list(crop)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
    }

    # ---------------------------------------------------------------- plan
    clock.start("calibration")
    timed = not (args.fcn_steps and args.crf_steps)
    cal = calibrate(args, train_set, crf_train_set, va_img, grid[len(grid) // 2]) if timed else None
    if cal:
        log("calibration: " + ", ".join(f"{k} {v:.3f}s" for k, v in cal.items()))
    clock.stop("calibration")
    finetunes = ["crfrnn"] + [a for a in ablations if a != "crfrnn_T5"]
    t5 = 0.5 if "crfrnn_T5" in ablations else 0.0
    shares = {"crfrnn": 2.0, **{a: 1.0 for a in finetunes[1:]}}
    plan: dict[str, Any] = {"budget_s": clock.budget, "calibration_s": cal, "finetune_shares": shares,
                            "mode": "time" if timed else "steps"}
    grid_images = len(ho_names)
    est = dict(cal) if cal else {}
    if cal:
        # evaluation cannot be shortened: reserve it first (estimated from the calibration, corrected as it runs)
        eval_s = len(va_names) * (2 * cal["fcn_eval_image"] + cal["mean_field_image"]
                                  + (len(finetunes) + t5) * cal["crfrnn_eval_image"])
        eval_s = args.eval_safety * (eval_s + len(ho_names) * cal["fcn_eval_image"])
        grid_s = min(args.grid_fraction * clock.budget, len(grid) * len(ho_names) * cal["mean_field_image"])
        # the FCN gets a fixed share of the budget; the fine-tuning arms share what is left once the evaluations
        # still to run are reserved (re-estimated from the measured evaluation times as the run goes on)
        fcn_s = args.fcn_fraction * clock.budget
        plan.update(eval_s=eval_s, grid_s=grid_s, fcn_s=fcn_s,
                    finetune_s=max(clock.left() * (1.0 - args.margin) - fcn_s - grid_s - eval_s, 0.0))
    log("plan: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in plan.items()
                               if k != "calibration_s"}))
    results["plan"] = plan

    # ---------------------------------------------------------------- (a) FCN training
    torch.manual_seed(args.seed)
    fcn = TinyFCN8s(NUM_CLASSES, args.widths, args.fc)
    fcn_cfg = TrainConfig(
        num_classes=NUM_CLASSES, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, batch_size=args.batch_size,
        max_steps=args.fcn_steps or _MAX_STEPS, schedule="fixed" if timed else "poly", seed=args.seed, device="cpu",
        log_every=10, eval_every=0, checkpoint_every=0, grad_clip=args.grad_clip,
    )
    clock.start("fcn_train")
    fcn_steps = train_for(fcn, train_set, fcn_cfg, run_dir / "fcn", plan.get("fcn_s") if timed else None,
                          poly=True, name="fcn", clock=clock)
    clock.stop("fcn_train")
    fcn.eval()
    fcn_state = copy.deepcopy(fcn.state_dict())
    results["fcn"] = {"steps": fcn_steps, "train_config": fcn_cfg.to_dict(), "checkpoint": "fcn/final.pt",
                      "widths": list(args.widths), "fc": args.fc,
                      "lr_schedule": "poly in CPU time (lr x (1 - t/T)^0.9), stopped at T" if timed
                      else "poly in steps"}

    arms: dict[str, Any] = {}

    def record(name: str, labels: torch.Tensor, conf: torch.Tensor, seconds: float, **extra) -> None:
        m = metrics_from_conf(conf)
        m.update(eval_s=seconds, predictions=f"predictions/{name}.npz", **extra)
        save_predictions(run_dir / "predictions" / f"{name}.npz", labels, va_names)
        arms[name] = m
        results["arms"] = arms
        atomic_json(run_dir / "results.json", results)
        log(f"arm {name}: mean IU {100 * (m['mean_iou'] or 0):.2f}  pixel acc {100 * (m['pixel_accuracy'] or 0):.2f}"
            f"  ({seconds:.0f}s)")

    # ---------------------------------------------------------------- (a) evaluation
    clock.start("eval")
    t = cpu()
    labels, conf = predict(fcn, va_img, va_mask)
    record("fcn", labels, conf, cpu() - t, kind="fcn", checkpoint="fcn/final.pt")
    if est:
        est["fcn_eval_image"] = (cpu() - t) / len(va_names)
    _, conf_ho = predict(fcn, ho_img, ho_mask)
    results["held_apart_fcn_mean_iou"] = mean_iou(conf_ho)
    clock.stop("eval")

    # ---------------------------------------------------------------- (b) grid search on the held-apart part
    # images in the outer loop, settings in the inner one: when the time share runs out every setting has seen
    # the same images
    clock.start("grid_search")
    grid_deadline = cpu() + plan["grid_s"] if timed else math.inf
    confs = [torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) for _ in grid]
    conf_fcn_grid = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    grid_images = 0
    with torch.no_grad():
        for i in range(len(ho_names)):
            if grid_images >= args.min_grid_images and cpu() > grid_deadline:
                break
            x, y = ho_img[i : i + 1].float(), ho_mask[i : i + 1].long()
            u = fcn(x)
            conf_fcn_grid += confusion_matrix(u.argmax(1), y, NUM_CLASSES, IGNORE)
            for params, c in zip(grid, confs):
                c += confusion_matrix(mean_field(u, x, num_iterations=10, **params).argmax(1), y, NUM_CLASSES, IGNORE)
            grid_images += 1
    rows = [{**params, "held_apart_mean_iou": mean_iou(c)} for params, c in zip(grid, confs)]
    best = max(rows, key=lambda r: r["held_apart_mean_iou"])
    best_params = {k: best[k] for k in ("theta_alpha", "theta_beta", "theta_gamma", "spatial_weight", "bilateral_weight")}
    results["grid_search"] = {"num_images": grid_images, "results": rows, "best": best_params,
                              "fcn_mean_iou_same_images": mean_iou(conf_fcn_grid)}
    clock.stop("grid_search")
    log(f"grid search ({len(grid)} settings x {grid_images} held-apart images, {clock.phases['grid_search']:.0f}s): "
        f"best {best_params} held-apart mean IU {100 * best['held_apart_mean_iou']:.2f} "
        f"(FCN alone {100 * mean_iou(conf_fcn_grid):.2f})")

    clock.start("eval")
    t = cpu()
    labels, conf = predict(post_crf_fn(fcn, best_params), va_img, va_mask)
    record("fcn_crf_post", labels, conf, cpu() - t, kind="post", crf=best_params, test_iterations=10,
           checkpoint="fcn/final.pt")
    if est:  # a CRF-RNN arm costs about its FCN + T=10 mean field: correct the estimate with what was measured
        est["crfrnn_eval_image"] = max(est["crfrnn_eval_image"], (cpu() - t) / len(va_names))
    clock.stop("eval")

    # ---------------------------------------------------------------- (c) and ablations: fine-tune from (a)
    for k, name in enumerate(finetunes):
        desc, overrides, frozen, test_T = ("main arm", {}, False, 10) if name == "crfrnn" else ABLATIONS[name]
        crf_kw = crf_kwargs_for(best_params, overrides, test_T)
        seconds = None
        if timed:
            # what is left, minus the evaluations still to run, shared among the remaining arms
            left_evals = args.eval_safety * len(va_names) * est["crfrnn_eval_image"] * (len(finetunes) - k + t5)
            avail = clock.left() * (1.0 - args.margin) - left_evals
            seconds = max(avail * shares[name] / sum(shares[a] for a in finetunes[k:]), args.min_finetune_s)
        torch.manual_seed(args.seed + 1000 + k)
        head = build_head(fcn_state, args.widths, args.fc, crf_kw, frozen)
        cfg = TrainConfig(
            num_classes=NUM_CLASSES, lr=args.crf_lr, momentum=0.9, weight_decay=args.weight_decay,
            batch_size=args.crf_batch_size, max_steps=args.crf_steps or _MAX_STEPS, schedule="fixed",
            seed=args.seed + 1000 + k, device="cpu", log_every=5, eval_every=0, checkpoint_every=0,
            grad_clip=args.grad_clip, crf_spatial_lr_mult=args.crf_kernel_lr_mult,
            crf_bilateral_lr_mult=args.crf_kernel_lr_mult, crf_compat_lr_mult=args.crf_compat_lr_mult,
            crf_weight_decay=0.0,
        )
        log(f"fine-tune {name} ({desc}): " + (f"{seconds:.0f}s" if seconds else f"{args.crf_steps} steps")
            + f" of batches of {args.crf_batch_size} crops {crop}")
        clock.start(f"finetune_{name}")
        steps = train_for(head, crf_train_set, cfg, run_dir / "arms" / name, seconds, poly=False, name=name,
                          clock=clock)
        clock.stop(f"finetune_{name}")
        head.eval()
        evals = [(name, test_T)] + ([("crfrnn_T5", 5)] if name == "crfrnn" and t5 else [])
        for arm_name, T in evals:
            head.crfrnn.num_test_iterations = T
            clock.start("eval")
            t = cpu()
            labels, conf = predict(head, va_img, va_mask)
            dt = cpu() - t
            if est and T == 10:
                est["crfrnn_eval_image"] = dt / len(va_names)
            record(arm_name, labels, conf, dt, kind="crfrnn", crf_kwargs={**crf_kw, "num_test_iterations": T},
                   frozen_fcn=frozen, steps=steps, finetune_s=seconds, train_config=cfg.to_dict(),
                   checkpoint=f"arms/{name}/final.pt", final_loss=_last_loss(run_dir / "arms" / name),
                   learned=crf_param_summary(head),
                   description="main arm" if arm_name == "crfrnn" else ABLATIONS[arm_name][0])
            clock.stop("eval")
        head.crfrnn.num_test_iterations = test_T

    results["timing"] = {"clock": "process CPU seconds (1 torch + 1 lattice thread)", "phases_s": clock.phases,
                         "total_s": clock.elapsed(), "budget_s": clock.budget, "phases_wall_s": clock.phases_wall,
                         "total_wall_s": clock.wall()}
    atomic_json(run_dir / "results.json", results)
    log(f"done in {clock.elapsed():.0f} CPU s, {clock.wall():.0f} wall s (budget {clock.budget:.0f} CPU s); phases: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in clock.phases.items()))
    return results


_MAX_STEPS = 10**7  # "until the time share is used up"


class _OutOfTime(Exception):
    pass


def train_for(model: nn.Module, dataset: Dataset, cfg: TrainConfig, run_dir: Path, seconds: float | None, *,
              poly: bool, name: str, clock: Clock) -> int:
    """:func:`crfrnn.train.train` for ``cfg.max_steps`` steps, or (``seconds`` given) for that much wall-clock time.

    In time mode the run stops after the first step that ends past ``seconds`` and, with ``poly``, the learning
    rate follows the poly schedule in *time*, ``lr x (1 - t / seconds) ** 0.9`` (set through ``cfg.lr`` before each
    step, ``cfg.schedule`` being "fixed"), so it reaches ~0 when the share is used up whatever the machine's load.
    The final weights go to ``run_dir/final.pt``. Returns the number of steps taken.
    """
    base_lr = cfg.lr
    t0 = cpu()
    state = {"step": 0, "log": t0}

    def on_step(step: int, info: dict[str, Any]) -> None:
        state["step"] = step
        now = cpu()
        if now - state["log"] > 30:
            state["log"] = now
            log(f"{name} step {step} loss {info['loss']:.3f} lr {info['lr']:.2e} ({clock.elapsed():.0f} CPU s, {clock.wall():.0f} wall s)")
        if seconds is not None:
            frac = (now - t0) / seconds
            if frac >= 1.0:
                raise _OutOfTime
            if poly:
                cfg.lr = base_lr * (1.0 - frac) ** cfg.poly_power

    try:
        train(model, dataset, None, cfg, run_dir, progress=False, on_step=on_step)
    except _OutOfTime:
        pass
    finally:
        cfg.lr = base_lr
    save_checkpoint({"model": model.state_dict(), "step": state["step"]}, run_dir / "final.pt")
    log(f"{name}: {state['step']} steps in {cpu() - t0:.0f}s, last loss {_last_loss(run_dir)}")
    return state["step"]


def _last_loss(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    loss = None
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and rec.get("loss") is not None:
            loss = rec["loss"]
    return loss


# ============================================================================================ --eval-dir


def eval_dir(args) -> dict[str, Any]:
    """Evaluate every arm of the run in ``--run-dir`` on ``--eval-dir`` (a folder with images/ and masks/)."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    size = tuple(res["data"]["resolution"])
    folder = Path(args.eval_dir)
    images, masks, names = load_split(folder.parent, folder.name, size, args.max_val)
    fcn_info = res["fcn"]
    fcn = TinyFCN8s(NUM_CLASSES, fcn_info["widths"], fcn_info["fc"])
    fcn.load_state_dict(load_checkpoint(run_dir / fcn_info["checkpoint"])["model"])
    fcn.eval()
    out: dict[str, Any] = {"eval_dir": str(folder), "num_images": len(names), "resolution": list(size), "arms": {}}
    tag = folder.name if folder.name not in ("", ".") else "eval"
    for name, arm in res["arms"].items():
        t = time.perf_counter()
        if arm["kind"] == "fcn":
            fn = fcn
        elif arm["kind"] == "post":
            fn = post_crf_fn(fcn, arm["crf"], arm["test_iterations"])
        else:
            state = load_checkpoint(run_dir / arm["checkpoint"])["model"]
            head = CrfRnnHead(TinyFCN8s(NUM_CLASSES, fcn_info["widths"], fcn_info["fc"]), NUM_CLASSES, **arm["crf_kwargs"])
            head.load_state_dict(state)
            head.eval()
            fn = head
        labels, conf = predict(fn, images, masks)
        m = metrics_from_conf(conf)
        m["eval_s"] = time.perf_counter() - t
        m["predictions"] = f"eval_{tag}/{name}.npz"
        save_predictions(run_dir / f"eval_{tag}" / f"{name}.npz", labels, names)
        out["arms"][name] = m
        log(f"{tag} arm {name}: mean IU {100 * (m['mean_iou'] or 0):.2f}")
    atomic_json(run_dir / f"eval_{tag}.json", out)
    return out


# ============================================================================================ --report


def _load_results(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise SystemExit(f"--report: no results.json at {f}")
        r = json.loads(f.read_text(encoding="utf-8"))
        if "arms" not in r or "timing" not in r:
            raise SystemExit(f"--report: {f} is incomplete (no 'arms' or 'timing'; did the run finish?)")
        out.append(r)
    return out


def _ms(values: list[float | None], digits: int = 1) -> str:
    v = [100.0 * x for x in values if x is not None]
    if not v:
        return "-"
    m = float(np.mean(v))
    if len(v) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {float(np.std(v, ddof=1)):.{digits}f}"


def make_report(runs: list[dict[str, Any]], png_path: Path | None, png_rel: str | None,
                discussion: str | None, commands: list[str] | None) -> str:
    names = runs[0]["class_names"]
    seeds = [r["seed"] for r in runs]
    n = len(runs)
    res0 = runs[0]
    L: list[str] = []
    w = L.append
    w("# Experiments: CRF-RNN Table 1 at small scale on CamVid")
    w("")
    w("Generated by `experiments/camvid_table1.py --report` from "
      f"{n} run(s) (seeds {', '.join(map(str, seeds))}); every number below comes from the runs' `results.json`.")
    w("")
    w("## Set-up")
    w("")
    d = res0["data"]
    cfg = res0["config"]
    w(f"* Data: CamVid (SegNet split), {d['num_train']} training images, {d['num_held_apart']} held apart from train "
      f"(fixed random 10 %, used only to pick the post-processing CRF parameters), {d['num_val']} val images for "
      f"all reported numbers. 11 classes, void ignored. Images and masks resized to {d['resolution'][0]}x"
      f"{d['resolution'][1]} (360x480 scaled by {d['resolution'][0] / 360:.3g}; images with antialiasing, masks by nearest neighbour); IU is measured at that resolution.")
    w(f"* Network: a narrow VGG-style FCN-8s (`TinyFCN8s`: stage widths {res0['fcn']['widths']}, fc {res0['fcn']['fc']}, "
      "BatchNorm, pool3/pool4 skips and the FCN-8s fusion, bilinear-initialised deconvolutions), trained from "
      "scratch (no ImageNet weights offline): SGD momentum 0.9, poly schedule over the CPU-time share, "
      f"lr {cfg['lr']}, batch {cfg['batch_size']}, horizontal flips, "
      f"{', '.join(str(r['fcn']['steps']) for r in runs)} steps (per seed; set from the time budget).")
    w(f"* (b) dense CRF post-processing: `crfrnn.meanfield.mean_field`, T=10, Potts, parameters picked by a grid "
      f"search over θα ∈ {cfg['grid_theta_alpha']}, θβ ∈ {cfg['grid_theta_beta']}, bilateral weight ∈ "
      f"{cfg['grid_bilateral_weight']} (θγ = {cfg['theta_gamma']}, spatial weight {cfg['spatial_weight']}) on the "
      "held-apart images. Chosen per seed: " + "; ".join(
          f"seed {r['seed']}: θα {r['grid_search']['best']['theta_alpha']:g}, θβ {r['grid_search']['best']['theta_beta']:g}, "
          f"w_b {r['grid_search']['best']['bilateral_weight']:g}" for r in runs) + ".")
    crf0 = res0["arms"]["crfrnn"]
    w(f"* (c) CRF-RNN: `crfrnn.models.CrfRnnHead` over a copy of (a), CRF initialised with (b)'s parameters "
      "(kernel weights w·I, Potts compatibility), `kernel_weights='matrix'`, learned asymmetric compatibility; "
      f"T=5 in training, T=10 at test; fine-tuned end to end on random {d['crf_crop'][0]}x{d['crf_crop'][1]} crops, "
      f"batch {cfg['crf_batch_size']}, SGD momentum 0.9, lr {cfg['crf_lr']} (fixed), CRF lr multipliers "
      f"{cfg['crf_kernel_lr_mult']:g} (kernel weights) / {cfg['crf_compat_lr_mult']:g} (compatibility), "
      f"FCN BatchNorm statistics frozen; {', '.join(str(r['arms']['crfrnn']['steps']) for r in runs)} steps per seed. "
      "Every ablation is fine-tuned from (a) in the same way, changing one thing.")
    w("")
    w("## Table 1 (mean IU on CamVid val, %, mean ± std over seeds)")
    w("")
    w("| Method | Mean IU | Δ vs (a) (pp) | Pixel acc. | Paper (VOC 2012 reduced val) |")
    w("|---|---:|---:|---:|---:|")
    paper = {"fcn": "61.3", "fcn_crf_post": "63.7", "crfrnn": "69.6"}
    for arm, label in ARMS.items():
        da = [r["arms"][arm]["mean_iou"] - r["arms"]["fcn"]["mean_iou"] for r in runs]
        w(f"| {label} | {_ms([r['arms'][arm]['mean_iou'] for r in runs])} | "
          f"{'' if arm == 'fcn' else _ms(da, 2)} | "
          f"{_ms([r['arms'][arm]['pixel_accuracy'] for r in runs])} | {paper[arm]} |")
    w("")
    w("Δ: mean ± std over seeds of the per-seed difference, in percentage points (the seeds share the data split, "
      "so the paired difference is the sharper comparison).")
    w("")
    w("Per seed (mean IU, %):")
    w("")
    w("| Seed | " + " | ".join(ARMS) + " | ordering a < b < c |")
    w("|---|" + "---:|" * len(ARMS) + "---|")
    for r in runs:
        v = [100 * r["arms"][a]["mean_iou"] for a in ARMS]
        w(f"| {r['seed']} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {'yes' if v[0] < v[1] < v[2] else 'no'} |")
    w("")
    w("Grid search on the held-apart images (mean IU, %): " + "; ".join(
        f"seed {r['seed']}: FCN {100 * r['grid_search']['fcn_mean_iou_same_images']:.2f} → best CRF "
        f"{100 * max(x['held_apart_mean_iou'] for x in r['grid_search']['results']):.2f} "
        f"({r['grid_search']['num_images']} images, {len(r['grid_search']['results'])} settings)" for r in runs) + ".")
    w("")
    w("## Per-class IU (%, mean ± std over seeds)")
    w("")
    arms_all = [a for a in list(ARMS) + list(ABLATIONS) if all(a in r["arms"] for r in runs)]
    w("| Arm | " + " | ".join(names) + " | Mean IU |")
    w("|---|" + "---:|" * (len(names) + 1))
    for a in arms_all:
        cells = [_ms([r["arms"][a]["class_iou"][c] for r in runs]) for c in range(len(names))]
        w(f"| {a} | " + " | ".join(cells) + f" | {_ms([r['arms'][a]['mean_iou'] for r in runs])} |")
    w("")
    abl = [a for a in ABLATIONS if all(a in r["arms"] for r in runs)]
    if abl:
        w("## Ablations (Section 7.1 of the paper), mean IU on CamVid val (%)")
        w("")
        w("| Variant | Mean IU | Δ vs (c) | Δ vs (a) FCN | fine-tuning steps (CPU s), per seed |")
        w("|---|---:|---:|---:|---|")
        for a in ["crfrnn"] + abl:
            desc = "(c) CRF-RNN: matrix kernel weights, learned compatibility, T=10 test" if a == "crfrnn" else ABLATIONS[a][0]
            dc = [r["arms"][a]["mean_iou"] - r["arms"]["crfrnn"]["mean_iou"] for r in runs]
            da = [r["arms"][a]["mean_iou"] - r["arms"]["fcn"]["mean_iou"] for r in runs]
            ft = ", ".join(
                f"{r['arms'][a]['steps']} ({r['timing']['phases_s'].get('finetune_' + r['arms'][a]['checkpoint'].split('/')[1], 0):.0f})"
                for r in runs)
            w(f"| `{a}`: {desc} | {_ms([r['arms'][a]['mean_iou'] for r in runs])} | "
              f"{'' if a == 'crfrnn' else _ms(dc, 2)} | {_ms(da, 2)} | {ft} |")
        w("")
        w("Δ columns: mean ± std over seeds of the per-seed difference (percentage points). `crfrnn_T5` re-uses "
          "(c)'s weights, so its steps are (c)'s. Each fine-tuning arm got its share of what was left of the budget "
          "when it started (see the time table), so the arms did not all train for the same time.")
        w("")
    w("## Time per phase (CPU seconds of the run's process / wall-clock seconds)")
    w("")
    w("The budget is counted in CPU seconds of the experiment's own process (one torch thread, one lattice thread): "
      "the 2-core machine was shared with other jobs that reniced or paused this one, so wall-clock time measures "
      "them more than this experiment. Wall-clock seconds are listed after the slash.")
    w("")
    phases = []
    for r in runs:
        for k in r["timing"]["phases_s"]:
            if k not in phases:
                phases.append(k)
    w("| Phase | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    w("|---|" + "---:|" * n)

    def cell(r, k):
        c = r["timing"]["phases_s"].get(k, 0.0)
        wall = r["timing"].get("phases_wall_s", {}).get(k)
        return f"{c:.0f}" + (f" / {wall:.0f}" if wall is not None else "")

    for k in phases:
        w(f"| {k} | " + " | ".join(cell(r, k) for r in runs) + " |")
    w("| **total** | " + " | ".join(
        f"{r['timing']['total_s']:.0f}" + (f" / {r['timing']['total_wall_s']:.0f}" if "total_wall_s" in r["timing"] else "")
        for r in runs) + " |")
    w("| budget | " + " | ".join(f"{r['timing']['budget_s']:.0f}" for r in runs) + " |")
    w("")
    if png_rel:
        w("## Learned compatibility matrix")
        w("")
        w(f"![learned compatibility]({png_rel})")
        w("")
        w(f"The compatibility matrix μ of arm (c) after fine-tuning, averaged over the {n} seed(s) (initialised to "
          "Potts −I; the layer outputs `unary − μ · messages`, so a negative entry (l, l′) means label l is "
          "encouraged where the kernels see l′, a positive one that it is penalised).")
        w("")
    w("## Commands")
    w("")
    w("```")
    for c in commands or []:
        w(c)
    for r in runs:
        w(r["command"])
    w("```")
    w("")
    if discussion:
        w("## Discussion")
        w("")
        w(discussion.strip())
        w("")
    return "\n".join(L)


def report(args) -> str:
    runs = _load_results(args.report)
    out = Path(args.output)
    png_rel = None
    png_path = None
    if not args.no_picture:
        mats = [np.array(r["arms"]["crfrnn"]["learned"]["compatibility_matrix"], dtype=np.float64) for r in runs]
        mat = np.mean(mats, axis=0)
        if mat.ndim == 3:  # untied: last iteration's matrix
            mat = mat[-1]
        try:
            from crfrnn.viz import compat_heatmap  # noqa: PLC0415
        except ImportError:
            compat_heatmap = None
        if compat_heatmap is not None:
            png_path = Path(args.picture) if args.picture else out.with_name("camvid_compat.png")
            img = compat_heatmap(mat, runs[0]["class_names"], title="CamVid CRF-RNN learned compatibility")
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=True)
            atomic_bytes(png_path, buf.getvalue())
            png_rel = os.path.relpath(png_path, out.parent)
    discussion = Path(args.discussion).read_text(encoding="utf-8") if args.discussion else None
    text = make_report(runs, png_path, png_rel, discussion, args.commands)
    atomic_bytes(out, text.encode("utf-8"))
    return text


# ============================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=45.0, help="wall-clock budget of the whole run (one seed)")
    p.add_argument("--run-dir", default=None, help="run folder (must be new for a training run)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CamVid root with train/ and val/ (images/, masks/)")
    p.add_argument("--resolution", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    p.add_argument("--eval-dir", default=None, help="evaluate the arms of --run-dir on this folder (images/, masks/)")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true", help="tiny run: few images, tiny resolution, a handful of steps")
    p.add_argument("--report", nargs="+", default=None, metavar="RUN", help="aggregate run folders / results.json")
    p.add_argument("-o", "--output", default=str(REPO / "docs" / "experiments.md"))
    p.add_argument("--picture", default=None, help="PNG of the learned compatibility (default next to --output)")
    p.add_argument("--no-picture", action="store_true")
    p.add_argument("--discussion", default=None, help="markdown file with the discussion paragraph to include")
    p.add_argument("--commands", nargs="*", default=None, help="extra command lines to list in the report")
    # model / optimisation
    p.add_argument("--widths", type=int, nargs=5, default=(16, 32, 64, 96, 128))
    p.add_argument("--fc", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--crf-lr", type=float, default=1e-3)
    p.add_argument("--crf-kernel-lr-mult", type=float, default=100.0)
    p.add_argument("--crf-compat-lr-mult", type=float, default=100.0)
    p.add_argument("--crf-batch-size", type=int, default=4)
    p.add_argument("--crf-crop", type=int, nargs=2, default=(80, 112), metavar=("H", "W"))
    p.add_argument("--min-finetune-s", type=float, default=20.0, help="least time for one fine-tuning arm")
    p.add_argument("--min-grid-images", type=int, default=6, help="least held-apart images in the grid search")
    # CRF grid (post-processing) and fixed CRF parameters
    p.add_argument("--grid-theta-alpha", type=float, nargs="+", default=(3.0, 6.0, 12.0))
    p.add_argument("--grid-theta-beta", type=float, nargs="+", default=(3.0, 6.0, 12.0))
    p.add_argument("--grid-bilateral-weight", type=float, nargs="+", default=(2.0, 4.0))
    p.add_argument("--theta-gamma", type=float, default=1.0)
    p.add_argument("--spatial-weight", type=float, default=1.0)
    # budget split
    p.add_argument("--fcn-fraction", type=float, default=0.35, help="share of the budget for training the FCN")
    p.add_argument("--grid-fraction", type=float, default=0.06, help="largest share of the budget for the grid")
    p.add_argument("--margin", type=float, default=0.05, help="share of the budget kept free for overheads")
    p.add_argument("--eval-safety", type=float, default=1.25, help="factor on the estimated evaluation time")
    p.add_argument("--hold-fraction", type=float, default=0.1)
    p.add_argument("--fcn-steps", type=int, default=None, help="fix the FCN steps (skip the budget plan)")
    p.add_argument("--crf-steps", type=int, default=None, help="fix the fine-tuning steps of every arm")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--cache-dir", default=str(REPO / "runs" / ".cache"),
                   help="where resized data are cached between runs ('' to disable)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared, oversubscribed CPU two OpenMP threads are 10x+ slower)")
    p.add_argument("--numba-threads", type=int, default=1, help="lattice threads (1 is fastest on a busy 2-core box)")
    return p


def apply_smoke(args) -> None:
    args.resolution = (48, 64)
    args.crf_crop = (32, 48)
    args.max_train = args.max_train or 12
    args.max_val = args.max_val or 4
    args.hold_fraction = 0.25
    args.fcn_steps = args.fcn_steps or 4
    args.crf_steps = args.crf_steps or 2
    args.batch_size = 4
    args.crf_batch_size = 2
    args.grid_theta_alpha = (10.0, 30.0)
    args.grid_theta_beta = (13.0,)
    args.grid_bilateral_weight = (3.0,)
    args.budget_minutes = min(args.budget_minutes, 5.0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.widths = tuple(args.widths)
    if args.report:
        report(args)
        log(f"wrote {args.output}")
        return 0
    if not args.run_dir:
        raise SystemExit("--run-dir is required (except with --report)")
    if args.eval_dir:
        eval_dir(args)
        return 0
    if args.smoke:
        apply_smoke(args)
    args.resolution = tuple(args.resolution)
    args.crf_crop = tuple(args.crf_crop) if args.crf_crop else None
    run_experiment(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
