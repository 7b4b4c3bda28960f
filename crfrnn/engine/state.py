"""The state of a training run and its checkpoint: :class:`TrainState` (what changes from step to step),
:class:`RunSpec` (what is fixed for the run), RNG states, and :func:`save_state` / :func:`load_state`,
which write and restore ``last.pt`` (model, optimiser, scaler, RNG states of every rank and the sampler's
position), so that a resumed run continues bit-exactly.

``last.pt`` holds ``model`` (state dict), ``optimizer``, ``scaler``, ``scheduler`` (schedule, total steps,
the factor of the next update), ``step``, ``epoch``, ``data`` (seed, epoch, batch in epoch, steps per epoch,
training-set length, world size), ``rng`` (torch / CUDA / numpy / python states of every rank),
``best_mean_iou``, ``best_step``, ``num_classes`` and ``config``. ``best.pt`` holds ``model``, ``step``,
``epoch``, ``metrics``, ``num_classes`` and ``config``. All load with ``weights_only=True``.
"""

import contextlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from crfrnn.engine.distributed import unwrap
from crfrnn.engine.runfiles import CheckpointError, save_checkpoint

__all__ = ["TrainState", "RunSpec", "save_state", "load_state", "save_best", "rng_state", "set_rng_state",
           "preserve_rng", "seed_all"]


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), numpy and python as weights-only-loadable objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version), "state": torch.tensor(pystate, dtype=torch.int64), "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Leave the global torch / numpy / python RNG states as they were."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- run state


@dataclass(frozen=True)
class RunSpec:
    """What is fixed for a run: its config (as JSON dict), data layout and length."""

    config: dict[str, Any]
    seed: int
    schedule: str
    steps_per_epoch: int
    total_steps: int
    train_len: int
    world_size: int


@dataclass
class TrainState:
    """What changes from step to step. ``epoch`` / ``batch_in_epoch`` are the sampler's position: the next
    batch is batch ``batch_in_epoch`` of epoch ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_mean_iou: float = -math.inf
    best_step: int = -1
    num_classes: int | None = None


def save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    spec: RunSpec,
    rngs: list[dict[str, Any]],
    next_lr_factor: float,
) -> None:
    """Write the resumable checkpoint (``last.pt``) atomically; ``rngs`` holds every rank's :func:`rng_state`."""
    save_checkpoint(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": {"schedule": spec.schedule, "total_steps": spec.total_steps, "factor": next_lr_factor},
            "step": state.step,
            "epoch": state.epoch,
            "data": {"seed": spec.seed, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                     "steps_per_epoch": spec.steps_per_epoch, "train_len": spec.train_len,
                     "world_size": spec.world_size},
            "rng": rngs,
            "best_mean_iou": state.best_mean_iou,
            "best_step": state.best_step,
            "num_classes": state.num_classes,
            "config": spec.config,
        },
        path,
    )


def load_state(
    ckpt: dict[str, Any],
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    spec: RunSpec,
    rank: int,
) -> TrainState:
    """Restore model, optimiser, scaler and this rank's RNG states from ``ckpt`` (read from ``path``) and
    return the run's state; :class:`CheckpointError` when it does not fit this model / run."""
    data = ckpt.get("data", {})
    if data.get("world_size") != spec.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {data.get('world_size')} processes, this run has "
            f"{spec.world_size}; resume with the same number of processes"
        )
    if data.get("train_len") != spec.train_len:
        raise CheckpointError(
            f"checkpoint {path} was written for a training set of {data.get('train_len')} samples, "
            f"train_set has {spec.train_len}"
        )
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank])
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model / run: {e}") from e
    step = int(ckpt["step"])
    epoch, batch_in_epoch = divmod(step, spec.steps_per_epoch)
    return TrainState(
        step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
        best_mean_iou=float(ckpt.get("best_mean_iou", -math.inf)),
        best_step=int(ckpt.get("best_step", -1)),
        num_classes=ckpt.get("num_classes") or spec.config.get("num_classes"),
    )


def save_best(path: Path, model: nn.Module, state: TrainState, record: dict[str, Any], config: dict[str, Any]) -> None:
    """Write ``best.pt``: the weights and the evaluation ``record`` that made them the best."""
    save_checkpoint(
        {"model": unwrap(model).state_dict(), "step": state.step, "epoch": record["epoch"],
         "metrics": {k: v for k, v in record.items() if k != "kind"}, "num_classes": state.num_classes,
         "config": config},
        path,
    )
