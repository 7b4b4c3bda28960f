"""The experiment, phase by phase (:class:`Experiment`), and the re-evaluation of a finished run on another
folder (:func:`eval_dir`)."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from crfrnn.data import CAMVID_CLASSES, Compose, RandomCrop, RandomHorizontalFlip
from crfrnn.engine import TrainConfig, load_checkpoint
from crfrnn.engine.metrics import confusion_matrix, mean_iou
from crfrnn.meanfield import mean_field
from crfrnn.models import CrfRnnHead

from .budget import Clock, calibrate, cpu
from .common import ABLATIONS, IGNORE, NUM_CLASSES, atomic_json, log, metrics_from_conf, save_predictions
from .data import TensorPairs, held_apart_split, load_split
from .fit import MAX_STEPS, last_loss, train_for
from .model import TinyFCN8s, build_head, crf_kwargs_for, crf_param_summary, post_crf_fn, predict

_CRF_PARAMS = ("theta_alpha", "theta_beta", "theta_gamma", "spatial_weight", "bilateral_weight")


def grid_values(args) -> list[dict[str, float]]:
    grid = []
    for ta in args.grid_theta_alpha:
        for tb in args.grid_theta_beta:
            for wb in args.grid_bilateral_weight:
                grid.append({"theta_alpha": float(ta), "theta_beta": float(tb), "theta_gamma": float(args.theta_gamma),
                             "spatial_weight": float(args.spatial_weight), "bilateral_weight": float(wb)})
    return grid


def run_experiment(args) -> dict[str, Any]:
    """One seed of the experiment in a new ``args.run_dir``; returns (and writes) ``results.json``'s content."""
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"--run-dir {run_dir} exists and is not empty; choose a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.numba_threads:
        import numba  # noqa: PLC0415

        numba.set_num_threads(args.numba_threads)
    exp = Experiment(args, run_dir)
    exp.load_data()
    exp.make_plan()
    exp.train_fcn()
    exp.evaluate_fcn()
    exp.grid_search()
    exp.evaluate_post()
    for k, name in enumerate(exp.finetunes):
        exp.finetune(k, name)
    return exp.finish()


class Experiment:
    """The phases of one seed, in order: data, plan, (a) FCN, grid search, (b), (c) and the ablations."""

    def __init__(self, args, run_dir: Path):
        self.args, self.run_dir = args, run_dir
        self.clock = Clock(args.budget_minutes * 60.0)
        self.size = tuple(args.resolution)
        self.ablations = list(ABLATIONS) if args.ablations else []
        self.grid = grid_values(args)
        self.timed = not (args.fcn_steps and args.crf_steps)
        self.finetunes = ["crfrnn"] + [a for a in self.ablations if a != "crfrnn_T5"]
        self.t5 = 0.5 if "crfrnn_T5" in self.ablations else 0.0  # the T=5 arm costs half an evaluation share
        self.shares = {"crfrnn": 2.0, **{a: 1.0 for a in self.finetunes[1:]}}
        self.arms: dict[str, Any] = {}
        self.est: dict[str, float] = {}
        log(f"seed {args.seed}, resolution {self.size}, budget {args.budget_minutes} min, run dir {run_dir}")

    # ---------------------------------------------------------------- data
    def load_data(self) -> None:
        args, clock = self.args, self.clock
        clock.start("data")
        root = Path(args.data)
        cache = Path(args.cache_dir) if args.cache_dir else None
        tr_img, tr_mask, tr_names = load_split(root, "train", self.size, args.max_train, cache)
        self.va_img, self.va_mask, self.va_names = load_split(root, "val", self.size, args.max_val, cache)
        tr_idx, ho_idx = held_apart_split(tr_names, args.hold_fraction)
        self.ho_img, self.ho_mask, self.ho_names = tr_img[ho_idx], tr_mask[ho_idx], [tr_names[i] for i in ho_idx]
        tr_img, tr_mask, tr_names = tr_img[tr_idx], tr_mask[tr_idx], [tr_names[i] for i in tr_idx]
        self.crop = tuple(args.crf_crop) if args.crf_crop else self.size
        self.train_set = TensorPairs(tr_img, tr_mask, tr_names, RandomHorizontalFlip(0.5))
        self.crf_train_set = TensorPairs(
            tr_img, tr_mask, tr_names, Compose([RandomCrop(self.crop, ignore_index=IGNORE), RandomHorizontalFlip(0.5)])
        )
        clock.stop("data")
        log(f"data: {len(tr_names)} train, {len(self.ho_names)} held apart, {len(self.va_names)} val "
            f"({clock.phases['data']:.1f}s)")
        self.results: dict[str, Any] = {
            "seed": args.seed,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "class_names": list(CAMVID_CLASSES),
            "data": {"root": str(root), "num_train": len(tr_names), "num_held_apart": len(self.ho_names),
                     "num_val": len(self.va_names), "held_apart_names": self.ho_names, "resolution": list(self.size),
                     "crf_crop": list(self.crop)},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "machine": platform.machine()},
        }

    # ---------------------------------------------------------------- plan
    def make_plan(self) -> None:
        """Calibrate (time mode) and split the budget between the phases."""
        args, clock = self.args, self.clock
        clock.start("calibration")
        cal = None
        if self.timed:
            cal = calibrate(args, self.train_set, self.crf_train_set, self.va_img, self.grid[len(self.grid) // 2])
            log("calibration: " + ", ".join(f"{k} {v:.3f}s" for k, v in cal.items()))
        clock.stop("calibration")
        self.plan: dict[str, Any] = {"budget_s": clock.budget, "calibration_s": cal, "finetune_shares": self.shares,
                                     "mode": "time" if self.timed else "steps"}
        self.est = dict(cal) if cal else {}
        if cal:
            n_val, n_ho = len(self.va_names), len(self.ho_names)
            # evaluation cannot be shortened: reserve it first (estimated from the calibration, corrected as it runs)
            eval_s = n_val * (2 * cal["fcn_eval_image"] + cal["mean_field_image"]
                              + (len(self.finetunes) + self.t5) * cal["crfrnn_eval_image"])
            eval_s = args.eval_safety * (eval_s + n_ho * cal["fcn_eval_image"])
            grid_s = min(args.grid_fraction * clock.budget, len(self.grid) * n_ho * cal["mean_field_image"])
            # the FCN gets a fixed share of the budget; the fine-tuning arms share what is left once the evaluations
            # still to run are reserved (re-estimated from the measured evaluation times as the run goes on)
            fcn_s = args.fcn_fraction * clock.budget
            self.plan.update(eval_s=eval_s, grid_s=grid_s, fcn_s=fcn_s,
                             finetune_s=max(clock.left() * (1.0 - args.margin) - fcn_s - grid_s - eval_s, 0.0))
        log("plan: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in self.plan.items()
                                   if k != "calibration_s"}))
        self.results["plan"] = self.plan

    # ---------------------------------------------------------------- (a)
    def train_fcn(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        self.fcn = TinyFCN8s(NUM_CLASSES, args.widths, args.fc)
        cfg = TrainConfig(
            num_classes=NUM_CLASSES, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
            batch_size=args.batch_size, max_steps=args.fcn_steps or MAX_STEPS,
            schedule="fixed" if self.timed else "poly", seed=args.seed, device="cpu",
            log_every=10, eval_every=0, checkpoint_every=0, grad_clip=args.grad_clip,
        )
        self.clock.start("fcn_train")
        steps = train_for(self.fcn, self.train_set, cfg, self.run_dir / "fcn",
                          self.plan.get("fcn_s") if self.timed else None, poly=True, name="fcn", clock=self.clock)
        self.clock.stop("fcn_train")
        self.fcn.eval()
        self.fcn_state = copy.deepcopy(self.fcn.state_dict())
        self.results["fcn"] = {"steps": steps, "train_config": cfg.to_dict(), "checkpoint": "fcn/final.pt",
                               "widths": list(args.widths), "fc": args.fc,
                               "lr_schedule": "poly in CPU time (lr x (1 - t/T)^0.9), stopped at T" if self.timed
                               else "poly in steps"}

    def record(self, name: str, labels: torch.Tensor, conf: torch.Tensor, seconds: float, **extra) -> None:
        """Keep an arm's metrics and predictions; rewrite results.json."""
        m = metrics_from_conf(conf)
        m.update(eval_s=seconds, predictions=f"predictions/{name}.npz", **extra)
        save_predictions(self.run_dir / "predictions" / f"{name}.npz", labels, self.va_names)
        self.arms[name] = m
        self.results["arms"] = self.arms
        atomic_json(self.run_dir / "results.json", self.results)
        log(f"arm {name}: mean IU {100 * (m['mean_iou'] or 0):.2f}  pixel acc {100 * (m['pixel_accuracy'] or 0):.2f}"
            f"  ({seconds:.0f}s)")

    def evaluate_fcn(self) -> None:
        self.clock.start("eval")
        t = cpu()
        labels, conf = predict(self.fcn, self.va_img, self.va_mask)
        self.record("fcn", labels, conf, cpu() - t, kind="fcn", checkpoint="fcn/final.pt")
        if self.est:
            self.est["fcn_eval_image"] = (cpu() - t) / len(self.va_names)
        _, conf_ho = predict(self.fcn, self.ho_img, self.ho_mask)
        self.results["held_apart_fcn_mean_iou"] = mean_iou(conf_ho)
        self.clock.stop("eval")

    # ---------------------------------------------------------------- (b)
    def grid_search(self) -> None:
        """Pick the post-processing CRF's parameters on the held-apart images. Images in the outer loop,
        settings in the inner one: when the time share runs out every setting has seen the same images."""
        args, grid = self.args, self.grid
        self.clock.start("grid_search")
        deadline = cpu() + self.plan["grid_s"] if self.timed else math.inf
        confs = [torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) for _ in grid]
        conf_fcn = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
        n = 0
        with torch.no_grad():
            for i in range(len(self.ho_names)):
                if n >= args.min_grid_images and cpu() > deadline:
                    break
                x, y = self.ho_img[i : i + 1].float(), self.ho_mask[i : i + 1].long()
                u = self.fcn(x)
                conf_fcn += confusion_matrix(u.argmax(1), y, NUM_CLASSES, IGNORE)
                for params, c in zip(grid, confs):
                    c += confusion_matrix(mean_field(u, x, num_iterations=10, **params).argmax(1), y, NUM_CLASSES,
                                          IGNORE)
                n += 1
        rows = [{**params, "held_apart_mean_iou": mean_iou(c)} for params, c in zip(grid, confs)]
        best = max(rows, key=lambda r: r["held_apart_mean_iou"])
        self.best_params = {k: best[k] for k in _CRF_PARAMS}
        self.results["grid_search"] = {"num_images": n, "results": rows, "best": self.best_params,
                                       "fcn_mean_iou_same_images": mean_iou(conf_fcn)}
        self.clock.stop("grid_search")
        log(f"grid search ({len(grid)} settings x {n} held-apart images, {self.clock.phases['grid_search']:.0f}s): "
            f"best {self.best_params} held-apart mean IU {100 * best['held_apart_mean_iou']:.2f} "
            f"(FCN alone {100 * mean_iou(conf_fcn):.2f})")

    def evaluate_post(self) -> None:
        self.clock.start("eval")
        t = cpu()
        labels, conf = predict(post_crf_fn(self.fcn, self.best_params), self.va_img, self.va_mask)
        self.record("fcn_crf_post", labels, conf, cpu() - t, kind="post", crf=self.best_params, test_iterations=10,
                    checkpoint="fcn/final.pt")
        if self.est:  # a CRF-RNN arm costs about its FCN + T=10 mean field: correct the estimate with what was measured
            self.est["crfrnn_eval_image"] = max(self.est["crfrnn_eval_image"], (cpu() - t) / len(self.va_names))
        self.clock.stop("eval")

    # ---------------------------------------------------------------- (c) and ablations: fine-tune from (a)
    def _finetune_seconds(self, k: int, name: str) -> float | None:
        """What is left, minus the evaluations still to run, shared among the remaining arms (time mode)."""
        if not self.timed:
            return None
        args = self.args
        left_evals = (args.eval_safety * len(self.va_names) * self.est["crfrnn_eval_image"]
                      * (len(self.finetunes) - k + self.t5))
        avail = self.clock.left() * (1.0 - args.margin) - left_evals
        return max(avail * self.shares[name] / sum(self.shares[a] for a in self.finetunes[k:]), args.min_finetune_s)

    def _finetune_cfg(self, k: int) -> TrainConfig:
        args = self.args
        return TrainConfig(
            num_classes=NUM_CLASSES, lr=args.crf_lr, momentum=0.9, weight_decay=args.weight_decay,
            batch_size=args.crf_batch_size, max_steps=args.crf_steps or MAX_STEPS, schedule="fixed",
            seed=args.seed + 1000 + k, device="cpu", log_every=5, eval_every=0, checkpoint_every=0,
            grad_clip=args.grad_clip, crf_spatial_lr_mult=args.crf_kernel_lr_mult,
            crf_bilateral_lr_mult=args.crf_kernel_lr_mult, crf_compat_lr_mult=args.crf_compat_lr_mult,
            crf_weight_decay=0.0,
        )

    def finetune(self, k: int, name: str) -> None:
        """Fine-tune arm ``name`` (the ``k``-th) from (a), then evaluate it (and (c) also with T=5)."""
        args = self.args
        desc, overrides, frozen, test_T = ("main arm", {}, False, 10) if name == "crfrnn" else ABLATIONS[name]
        crf_kw = crf_kwargs_for(self.best_params, overrides, test_T)
        seconds = self._finetune_seconds(k, name)
        torch.manual_seed(args.seed + 1000 + k)
        head = build_head(self.fcn_state, args.widths, args.fc, crf_kw, frozen)
        cfg = self._finetune_cfg(k)
        log(f"fine-tune {name} ({desc}): " + (f"{seconds:.0f}s" if seconds else f"{args.crf_steps} steps")
            + f" of batches of {args.crf_batch_size} crops {self.crop}")
        self.clock.start(f"finetune_{name}")
        steps = train_for(head, self.crf_train_set, cfg, self.run_dir / "arms" / name, seconds, poly=False, name=name,
                          clock=self.clock)
        self.clock.stop(f"finetune_{name}")
        head.eval()
        evals = [(name, test_T)] + ([("crfrnn_T5", 5)] if name == "crfrnn" and self.t5 else [])
        for arm_name, T in evals:
            head.crfrnn.num_test_iterations = T
            self.clock.start("eval")
            t = cpu()
            labels, conf = predict(head, self.va_img, self.va_mask)
            dt = cpu() - t
            if self.est and T == 10:
                self.est["crfrnn_eval_image"] = dt / len(self.va_names)
            self.record(arm_name, labels, conf, dt, kind="crfrnn", crf_kwargs={**crf_kw, "num_test_iterations": T},
                        frozen_fcn=frozen, steps=steps, finetune_s=seconds, train_config=cfg.to_dict(),
                        checkpoint=f"arms/{name}/final.pt", final_loss=last_loss(self.run_dir / "arms" / name),
                        learned=crf_param_summary(head),
                        description="main arm" if arm_name == "crfrnn" else ABLATIONS[arm_name][0])
            self.clock.stop("eval")
        head.crfrnn.num_test_iterations = test_T

    def finish(self) -> dict[str, Any]:
        clock = self.clock
        self.results["timing"] = {
            "clock": "process CPU seconds (1 torch + 1 lattice thread)", "phases_s": clock.phases,
            "total_s": clock.elapsed(), "budget_s": clock.budget, "phases_wall_s": clock.phases_wall,
            "total_wall_s": clock.wall(),
        }
        atomic_json(self.run_dir / "results.json", self.results)
        log(f"done in {clock.elapsed():.0f} CPU s, {clock.wall():.0f} wall s (budget {clock.budget:.0f} CPU s); "
            "phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in clock.phases.items()))
        return self.results


# ============================================================================================ --eval-dir


def _arm_fn(arm: dict[str, Any], fcn: TinyFCN8s, fcn_info: dict[str, Any], run_dir: Path):
    if arm["kind"] == "fcn":
        return fcn
    if arm["kind"] == "post":
        return post_crf_fn(fcn, arm["crf"], arm["test_iterations"])
    state = load_checkpoint(run_dir / arm["checkpoint"])["model"]
    head = CrfRnnHead(TinyFCN8s(NUM_CLASSES, fcn_info["widths"], fcn_info["fc"]), NUM_CLASSES, **arm["crf_kwargs"])
    head.load_state_dict(state)
    head.eval()
    return head


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
        labels, conf = predict(_arm_fn(arm, fcn, fcn_info, run_dir), images, masks)
        m = metrics_from_conf(conf)
        m["eval_s"] = time.perf_counter() - t
        m["predictions"] = f"eval_{tag}/{name}.npz"
        save_predictions(run_dir / f"eval_{tag}" / f"{name}.npz", labels, names)
        out["arms"][name] = m
        log(f"{tag} arm {name}: mean IU {100 * (m['mean_iou'] or 0):.2f}")
    atomic_json(run_dir / f"eval_{tag}.json", out)
    return out
