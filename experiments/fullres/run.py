"""One run: one data set, one seed, every arm, in a new run folder (results.json, confusion.npz, figures.npz,
models/<arm>.pt, the training run folders)."""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from crfrnn.engine import TrainConfig, atomic_write, train
from crfrnn.engine.metrics import class_iou, confusion_matrix, mean_iou, pixel_accuracy, trimap_confusion
from crfrnn.engine.runfiles import write_text
from crfrnn.engine.state import seed_all
from crfrnn.meanfield import CrfRnn, mean_field
from crfrnn.models import CrfRnnHead, SmallFCN8s, UnaryNet
from crfrnn.models.checkpoints import crf_options, save_model_file, small_model_sidecar

from .data import FullPairs, Split, class_names, fcn_train_set, load
from .settings import ARMS, IGNORE, TRIMAP_RADII, Settings

_CRF_KEYS = ("theta_alpha", "theta_beta", "theta_gamma", "spatial_weight", "bilateral_weight")
#: arm -> the name of its shipped file (experiments/models/<dataset>/).
SHIPPED = {"fcn": "fcn.pt", "crf_post": "crf_post.pt", "crfrnn": "crfrnn.pt", "crfrnn_theta": "crfrnn_theta.pt"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _nan_none(v: float) -> float | None:
    return None if v != v else float(v)


class CachedUnaryCrf(nn.Module):
    """The CRF-only arm's training model: the input is ``[RGB, cached logits]`` (B, 3 + L, H, W)."""

    def __init__(self, crfrnn: CrfRnn):
        super().__init__()
        self.crfrnn = crfrnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.crfrnn(x[:, 3:], x[:, :3])


class Run:
    """The phases of one run, in order (see :func:`run`)."""

    def __init__(self, s: Settings, seed: int, run_dir: Path):
        self.s, self.seed, self.run_dir = s, seed, run_dir
        self.t0, self.w0 = time.process_time(), time.perf_counter()
        self.phases: dict[str, float] = {}
        self.arms: dict[str, dict[str, Any]] = {}
        self.confusion: dict[str, np.ndarray] = {}
        self.figure_preds: dict[str, dict[str, np.ndarray]] = {}
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self.theta_trajectory: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers
    def _phase(self, name: str, t: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + time.process_time() - t

    @torch.no_grad()
    def _confusions(self, fn: Callable[[torch.Tensor], torch.Tensor], split: Split, *, keep: list[str] = ()):
        """Per-image (N, L, L) and trimap (R, N, L, L) confusions of ``fn`` (full-res logits) over ``split``."""
        L = self.L
        conf = np.zeros((len(split), L, L), dtype=np.int64)
        tri = np.zeros((len(TRIMAP_RADII), len(split), L, L), dtype=np.int64)
        preds = {}
        for i, (im, m, name) in enumerate(zip(split.images, split.masks, split.names)):
            pred = fn(im[None].float()).argmax(1)[0]
            target = m.long()
            conf[i] = confusion_matrix(pred, target, L, IGNORE).numpy()
            tri[:, i] = trimap_confusion(pred, target, L, TRIMAP_RADII, ignore_index=IGNORE).numpy()
            if name in keep:
                preds[name] = pred.to(torch.uint8).numpy()
        return conf, tri, preds

    def _record(self, arm: str, fn, t_train: float | None, steps: int | None, crf: dict | None, model=None) -> None:
        t = time.process_time()
        conf, tri, preds = self._confusions(fn, self.val, keep=self.figure_names)
        dt = time.process_time() - t
        self._phase("evaluate", t)
        total = torch.from_numpy(conf.sum(0))
        self.confusion[f"{arm}/image"], self.confusion[f"{arm}/trimap"] = conf, tri
        self.figure_preds[arm] = preds
        self.arms[arm] = {
            "label": ARMS[arm], "mean_iou": _nan_none(mean_iou(total)),
            "pixel_accuracy": _nan_none(pixel_accuracy(total)),
            "class_iou": [_nan_none(v) for v in class_iou(total).tolist()],
            "trimap_mean_iou": [_nan_none(mean_iou(torch.from_numpy(band.sum(0)))) for band in tri],
            "steps": steps, "train_seconds": t_train, "eval_seconds": dt, "crf": crf,
        }
        if model is not None:
            self._save_model(arm, model)
        log(f"{self.s.dataset} seed {self.seed} {arm}: mean IU {100 * (self.arms[arm]['mean_iou'] or 0):.2f} "
            f"pixel acc {100 * (self.arms[arm]['pixel_accuracy'] or 0):.2f} ({dt:.0f}s eval)")
        self._write_results()

    def _save_model(self, arm: str, model: nn.Module) -> None:
        (self.run_dir / "models").mkdir(exist_ok=True)
        sidecar = small_model_sidecar(model, class_names=self.class_names, ignore_index=IGNORE,
                                      description=f"crfrnn full-resolution reproduction, {self.s.dataset}, "
                                                  f"seed {self.seed}")
        save_model_file(self.run_dir / "models" / f"{arm}.pt", model, sidecar)

    # ------------------------------------------------------------------ phases
    def load_data(self) -> None:
        t = time.process_time()
        self.train_split, self.held, self.val, self.split_text = load(self.s)
        self.class_names = class_names(self.s)
        self.L = len(self.class_names)
        self.figure_names = self.val.names[: self.s.figure_images]
        step = max(1, len(self.val) // max(1, self.s.curve_images))
        self.curve_split = self.val.subset(list(range(0, len(self.val), step))[: self.s.curve_images])
        self._phase("data", t)
        log(f"{self.s.dataset} seed {self.seed}: {len(self.train_split)} train, {len(self.held)} held apart, "
            f"{len(self.val)} val")

    def train_fcn(self) -> None:
        s = self.s
        t = time.process_time()
        seed_all(self.seed)
        fcn = SmallFCN8s(self.L, s.widths, s.fc, mean=s.mean, std=s.std)
        cfg = TrainConfig(num_classes=self.L, lr=s.fcn_lr, momentum=0.9, weight_decay=s.weight_decay,
                          batch_size=s.fcn_batch, max_steps=s.fcn_steps, schedule="poly", seed=self.seed, device="cpu",
                          log_every=20, eval_every=0, checkpoint_every=0, grad_clip=s.grad_clip)
        train(fcn, fcn_train_set(s, self.train_split), None, cfg, self.run_dir / "train" / "fcn", progress=False)
        fcn.eval()
        fcn.freeze_bn()
        self.fcn_state = copy.deepcopy(fcn.state_dict())
        self.unary = UnaryNet(fcn, self.L, unary_scale=s.unary_scale).eval()
        self._phase("fcn_train", t)
        size = "x".join(str(round(v * s.unary_scale)) for v in self.val.images[0].shape[1:])
        self.fcn_info = {"steps": s.fcn_steps, "seconds": time.process_time() - t,
                         "num_parameters": sum(p.numel() for p in fcn.parameters()),
                         "input_size": f"{size} for a {'x'.join(map(str, self.val.images[0].shape[1:]))} image "
                                       f"(unary_scale {s.unary_scale:.3g})"}
        self._record("fcn", self.unary, self.fcn_info["seconds"], s.fcn_steps, None, model=self.unary)

    @torch.no_grad()
    def grid_search(self) -> None:
        """(b)'s parameters: the grid setting with the best mean IU on the held-apart training images."""
        t = time.process_time()
        grid, L = self.s.grid(), self.L
        confs = [torch.zeros(L, L, dtype=torch.int64) for _ in grid]
        conf_fcn = torch.zeros(L, L, dtype=torch.int64)
        for im, m in zip(self.held.images, self.held.masks):
            x, y = im[None].float(), m[None].long()
            u = self.unary(x)
            conf_fcn += confusion_matrix(u.argmax(1), y, L, IGNORE)
            for params, c in zip(grid, confs):
                c += confusion_matrix(mean_field(u, x, num_iterations=self.s.test_iterations, **params).argmax(1), y,
                                      L, IGNORE)
        default = self.s.voc_defaults()
        rows = [{**p, "held_apart_mean_iou": _nan_none(mean_iou(c)), "voc_default_rescaled": p == default}
                for p, c in zip(grid, confs)]
        best = max(range(len(rows)), key=lambda k: rows[k]["held_apart_mean_iou"] or -1.0)
        self.best = {k: float(grid[best][k]) for k in _CRF_KEYS}
        self.grid = {"num_images": len(self.held), "results": rows, "best": self.best,
                     "fcn_mean_iou_same_images": _nan_none(mean_iou(conf_fcn))}
        self._phase("grid_search", t)
        log(f"grid: best {self.best} ({100 * rows[best]['held_apart_mean_iou']:.2f} vs FCN "
            f"{100 * mean_iou(conf_fcn):.2f} on {len(self.held)} held-apart images)")

    def post_crf(self) -> None:
        head = self._crf_head(learn_bandwidths=False)  # at its initialisation it is the post-processing CRF
        self._record("crf_post", head, None, None, self._crf_summary(head), model=head)

    # ------------------------------------------------------------------ fine-tuning
    def _crf_kwargs(self, learn_bandwidths: bool) -> dict[str, Any]:
        return {**self.best, "num_iterations": self.s.train_iterations, "num_test_iterations": self.s.test_iterations,
                "kernel_weights": "matrix", "learn_compatibility": True, "untied": False,
                "learn_bandwidths": learn_bandwidths}

    def _fcn_copy(self, trainable: bool) -> SmallFCN8s:
        s = self.s
        fcn = SmallFCN8s(self.L, s.widths, s.fc, mean=s.mean, std=s.std)
        fcn.load_state_dict(self.fcn_state)
        fcn.freeze_bn()
        for p in fcn.parameters():
            p.requires_grad_(trainable)
        return fcn

    def _crf_head(self, learn_bandwidths: bool, trainable_fcn: bool = False) -> CrfRnnHead:
        return CrfRnnHead(self._fcn_copy(trainable_fcn), self.L, unary_scale=self.s.unary_scale,
                          **self._crf_kwargs(learn_bandwidths)).eval()

    def _crf_summary(self, head: CrfRnnHead) -> dict[str, Any]:
        """The CRF's options (the learned widths where they are learned) and its initial kernel weights."""
        return {**self.best, **crf_options(head.crfrnn)}

    def _finetune_cfg(self) -> TrainConfig:
        s = self.s
        return TrainConfig(num_classes=self.L, lr=s.finetune_lr, momentum=0.9, weight_decay=s.weight_decay,
                           batch_size=1, max_steps=s.finetune_steps, schedule="fixed", seed=self.seed + 1000,
                           device="cpu", log_every=10, eval_every=0, checkpoint_every=0, grad_clip=s.grad_clip,
                           crf_spatial_lr_mult=s.kernel_lr_mult, crf_bilateral_lr_mult=s.kernel_lr_mult,
                           crf_compat_lr_mult=s.compat_lr_mult, crf_theta_lr_mult=s.theta_lr_mult,
                           crf_weight_decay=0.0)

    def _curve_point(self, arm: str, step: int, fn, loss: float | None) -> None:
        t = time.process_time()
        conf, _, _ = self._confusions(fn, self.curve_split)
        self.curves.setdefault(arm, []).append(
            {"step": step, "mean_iou": _nan_none(mean_iou(torch.from_numpy(conf.sum(0)))), "loss": loss})
        self._phase("curves", t)

    def finetune(self, arm: str) -> None:
        """Train ``arm`` (one of settings.FINETUNED) from (a) for the common step budget, then evaluate it."""
        s = self.s
        t = time.process_time()
        torch.manual_seed(self.seed + 1000)
        if arm == "fcn_plus":
            net = UnaryNet(self._fcn_copy(True), self.L, unary_scale=s.unary_scale)
            model, fn, dataset = net, net, FullPairs(self.train_split)
        elif arm == "crf_only":
            net = self._crf_head(learn_bandwidths=False)
            model, fn = CachedUnaryCrf(net.crfrnn), net
            dataset = FullPairs(self.train_split, self._train_logits())  # computed once: only this arm uses them
        else:
            net = self._crf_head(learn_bandwidths=arm == "crfrnn_theta", trainable_fcn=True)
            model, fn, dataset = net, net, FullPairs(self.train_split)
        losses: list[float] = []

        def on_step(step: int, info: dict[str, Any]) -> None:
            losses.append(float(info["loss"]))
            if step % s.curve_every == 0 or step == s.finetune_steps:
                model.eval()
                self._curve_point(arm, step, fn, float(np.mean(losses[-s.curve_every:])))
                if arm == "crfrnn_theta":
                    self._theta_point(step, net)
                model.train()

        fn.eval()
        self._curve_point(arm, 0, fn, None)
        if arm == "crfrnn_theta":
            self._theta_point(0, net)
        train(model, dataset, None, self._finetune_cfg(), self.run_dir / "train" / arm, progress=False,
              on_step=on_step)
        model.eval()
        fn.eval()
        t_train = time.process_time() - t
        self._phase(f"finetune_{arm}", t)
        crf = None if arm == "fcn_plus" else self._crf_summary(net)
        self._record(arm, fn, t_train, s.finetune_steps, crf, model=net)

    def _theta_point(self, step: int, head: CrfRnnHead) -> None:
        c = head.crfrnn
        self.theta_trajectory.append({"step": step, "theta_alpha": float(c.theta_alpha),
                                      "theta_beta": _as_number(c.theta_beta), "theta_gamma": float(c.theta_gamma)})

    @torch.no_grad()
    def _train_logits(self) -> list[torch.Tensor]:
        """The frozen FCN's full-resolution logits of every training image."""
        t = time.process_time()
        logits = [self.unary(im[None].float())[0] for im in self.train_split.images]
        self._phase("cache_logits", t)
        return logits

    # ------------------------------------------------------------------ files
    def _write_results(self) -> None:
        s = self.s
        res = {
            "dataset": s.dataset, "seed": self.seed, "class_names": self.class_names, "num_classes": self.L,
            "ignore_index": IGNORE, "unary_scale": s.unary_scale,
            "full_resolution": "360x480" if s.dataset == "camvid" else "each image at its mask size",
            "trimap_radii": list(TRIMAP_RADII),
            "data": {"num_train": len(self.train_split), "num_held_apart": len(self.held), "num_val": len(self.val),
                     "val_names": self.val.names, "held_apart_names": self.held.names, "split": self.split_text},
            "config": s.to_dict(),
            "fcn": getattr(self, "fcn_info", None),
            "grid_search": getattr(self, "grid", None),
            "arms": {a: self.arms[a] for a in ARMS if a in self.arms},
            "curves": self.curves, "curve_images": self.curve_split.names,
            "theta_trajectory": self.theta_trajectory,
            "figures": {"names": self.figure_names, "arms": [a for a in ARMS if a in self.figure_preds]},
            "timing": {"phases_s": self.phases, "total_s": time.process_time() - self.t0,
                       "wall_s": time.perf_counter() - self.w0, "clock": "process CPU seconds, 1 thread"},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count()},
        }
        write_text(self.run_dir / "results.json", json.dumps(res, indent=1, allow_nan=False) + "\n")

    def write_arrays(self) -> None:
        _atomic_npz(self.run_dir / "confusion.npz", self.confusion)
        figs = {}
        for name in self.figure_names:
            k = self.val.names.index(name)
            figs[f"{name}/image"] = self.val.images[k].permute(1, 2, 0).numpy()
            figs[f"{name}/truth"] = self.val.masks[k].numpy()
            for arm, preds in self.figure_preds.items():
                figs[f"{name}/{arm}"] = preds[name]
        _atomic_npz(self.run_dir / "figures.npz", figs)


def _as_number(v) -> float | list[float]:
    t = torch.as_tensor(v).detach().flatten()
    return float(t[0]) if t.numel() == 1 else [float(x) for x in t]


def run(s: Settings, seed: int, run_dir: Path, arms: tuple[str, ...] = tuple(ARMS)) -> Path:
    """Run every arm of data set ``s`` with ``seed`` into the new folder ``run_dir``; returns results.json."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"run folder {run_dir} exists and is not empty; choose a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    r = Run(s, seed, run_dir)
    r.load_data()
    r.train_fcn()
    r.grid_search()
    r.post_crf()
    for arm in ("fcn_plus", "crfrnn", "crfrnn_theta", "crf_only"):
        if arm in arms:
            r.finetune(arm)
    r.write_arrays()
    r._write_results()
    log(f"{s.dataset} seed {seed} done: {time.process_time() - r.t0:.0f} CPU s, {time.perf_counter() - r.w0:.0f} s")
    return run_dir / "results.json"
