"""The budget clock (CPU seconds of this process) and the timing calibration the plan is made from."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from crfrnn.meanfield import mean_field
from crfrnn.models import CrfRnnHead

from .common import IGNORE, NUM_CLASSES
from .model import TinyFCN8s, crf_kwargs_for


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


def _timed(fn, repeats: int = 3) -> float:
    """Median CPU time of ``repeats`` calls after one warm-up call (the machine is shared: medians, not means)."""
    fn()
    times = []
    for _ in range(repeats):
        t = cpu()
        fn()
        times.append(cpu() - t)
    return float(np.median(times))


def _batch_of(ds, n):
    items = [ds[i % len(ds)] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _sgd_step(model, opt, x, y):
    def step():
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
        opt.step()

    return step


def calibrate(args, train_set, crf_train_set, val_images, params0) -> dict[str, float]:
    """Seconds per FCN step, per CRF-RNN fine-tuning step, per val image (FCN, mean_field T=10, FCN + CRF)."""
    torch.manual_seed(12345)
    fcn = TinyFCN8s(NUM_CLASSES, args.widths, args.fc)
    fcn_step = _sgd_step(fcn, torch.optim.SGD(fcn.parameters(), lr=1e-9), *_batch_of(train_set, args.batch_size))
    head = CrfRnnHead(copy.deepcopy(fcn), NUM_CLASSES, **crf_kwargs_for(params0, {}, 10))
    crf_step = _sgd_step(head, torch.optim.SGD(head.parameters(), lr=1e-9), *_batch_of(crf_train_set,
                                                                                         args.crf_batch_size))
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
