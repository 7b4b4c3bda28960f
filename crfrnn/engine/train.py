"""Training of segmentation networks (FCN-8s, CRF-RNN, or any model): :func:`train`.

The functions are generic: ``model`` is any ``nn.Module`` mapping images
(B, 3, H, W) to logits (B, L, H, W); data sets yield ``(image, mask)`` pairs,
image float (3, H, W), mask int64 (H, W) with ``ignore_index`` for unlabelled
pixels (the contract of :mod:`crfrnn.data`).

How it reads, top down: :func:`train` sets up (distributed, run folder, optimiser, resume) and runs
:func:`_loop`: epochs of batches, each one :func:`crfrnn.engine.step.train_step`, then
:func:`_after_step` (log line, evaluation, checkpoint). Three hooks steer it from outside:
``lr_schedule`` (the learning-rate factor of each step), ``should_stop`` (end the run now) and ``on_step``
(observe). The run folder and checkpoint contents are described in :mod:`crfrnn.engine.runfiles` and
:mod:`crfrnn.engine.state`.

Paper recipe (Zheng et al. 2015, following FCN's Caffe set-up): SGD, momentum
0.99, weight decay 5e-4, batch 1, fixed learning rate 1e-13 on a *summed*
(not averaged) softmax cross-entropy, and learning-rate multipliers 10000 /
10000 / 1000 on the CRF's spatial kernel weights / bilateral kernel weights /
compatibility matrix. :meth:`TrainConfig.paper` returns that configuration,
either literally (``loss_reduction="sum"``) or in the equivalent mean-loss form
(``loss_reduction="mean"``): the mean over N labelled pixels has gradient
(summed gradient) / N, so SGD takes exactly the same steps with the learning
rate multiplied by N and the weight decay divided by N (the product lr x wd,
which is what weight decay contributes to a step, is unchanged).

Distributed training: launched under ``torchrun`` (environment variables
``RANK`` / ``WORLD_SIZE`` set, ``WORLD_SIZE > 1``), :func:`train` initialises
``torch.distributed`` (NCCL on CUDA, gloo on CPU) unless the caller already
did, wraps the model in ``DistributedDataParallel``, gives each process its
share of every epoch with a ``DistributedSampler`` and all-reduces the
confusion matrix in evaluation. ``cfg.batch_size`` is the batch size of one
process (global batch = ``batch_size x world size``), and the loss is
normalised over the *global* batch so that N processes take the same step as
one process on the combined batch. Only rank 0 writes files and shows
progress bars; on several nodes ``run_dir`` must be on a shared file system.
"""

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from crfrnn.engine.config import PAPER_LR_SUM, PAPER_NUM_PIXELS, TrainConfig, _json_normalise
from crfrnn.engine.distributed import agree, all_gather, setup_distributed
from crfrnn.engine.evaluate import accepts_valid_mask, evaluate, nan_to_none
from crfrnn.engine.runfiles import (
    BEST_FILE,
    LAST_FILE,
    METRICS_FILE,
    CheckpointError,
    load_checkpoint,
    prepare_run_dir,
    read_metrics,
    save_checkpoint,
    write_metrics,
)
from crfrnn.engine.samplers import ResumableSampler, SeededDataset, collate
from crfrnn.engine.state import (
    RunSpec,
    TrainState,
    load_state,
    preserve_rng,
    rng_state,
    save_best,
    save_state,
    seed_all,
)
from crfrnn.engine.step import lr_factor, make_scaler, param_groups, train_step

__all__ = [
    "TrainConfig",
    "CheckpointError",
    "param_groups",
    "lr_factor",
    "train",
    "train_step",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "PAPER_LR_SUM",
    "PAPER_NUM_PIXELS",
]

#: ``lr_schedule(step, total_steps) -> factor`` of the update after ``step`` completed steps.
LrSchedule = Callable[[int, int], float]
#: ``hook(step, info)`` after optimiser step ``step`` (1-based); ``info`` has ``loss``, ``lr``, ``epoch``.
StepHook = Callable[[int, dict[str, Any]], Any]


@dataclass
class _Run:
    """Everything the loop works with (built once by :func:`_start`)."""

    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    spec: RunSpec
    state: TrainState
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    show: bool
    pass_mask: bool
    lr_schedule: LrSchedule
    resumed: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None


def train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: StepHook | None = None,
    lr_schedule: LrSchedule | None = None,
    should_stop: StepHook | None = None,
    run_files: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with SGD + momentum on softmax cross-entropy; write the run folder.

    The model is moved to ``cfg.device`` and trained in place (train mode, so a
    ``CrfRnn`` unrolls ``num_iterations`` mean-field steps). Its initial weights
    are the caller's: for a repeatable run build it after seeding from
    ``cfg.seed`` (``crfrnn.engine.state.seed_all``, as ``crfrnn train`` does). The global RNGs
    are seeded with ``cfg.seed`` (+ rank). The data order is a function of
    (``cfg.seed``, epoch) only and the random augmentations of a sample a
    function of (``cfg.seed``, epoch, index) — the RNGs are seeded per sample
    while it is loaded — so the run is reproducible and independent of
    ``num_workers``. Incomplete last batches of an epoch are dropped. Images of
    different sizes are padded; a model whose ``forward`` accepts ``valid_mask``
    gets the padding mask (see :mod:`crfrnn.engine.evaluate`).

    Args:
        model: maps images (B, 3, H, W) to logits (B, L, H, W).
        train_set: yields (image (3, H, W) float, mask (H, W) int64) pairs.
        val_set: the same, for evaluation (mean IU picks ``best.pt``); ``None``:
            no evaluation and no ``best.pt``.
        cfg: the hyper-parameters.
        run_dir: the run folder. Without ``resume`` it must not exist or be
            empty (existing runs are never overwritten).
        resume: continue the run in ``run_dir`` from its ``last.pt`` (written
            first at step 0, with the initial weights; a run stopped before
            even that starts again from ``model`` as given). The
            given ``cfg`` must equal the run's ``config.json``. On CPU the
            resumed run ends with bit-exactly the weights of an uninterrupted
            one. metrics.jsonl lines after the checkpoint are dropped. Only the run's length
            (``max_steps``, ``epochs``) may differ from ``config.json``: a longer run extends a finished or
            interrupted one (the new length is written to ``config.json``; with the fixed schedule the result
            equals a run given that length from the start, with ``poly`` the schedule is stretched from the
            resumed step on); a shorter one than the steps already done is refused.
        progress: show tqdm bars (rank 0 only).
        on_step: called as ``on_step(step, info)`` after every optimiser step,
            once that step's logging / evaluation / checkpoint is done, on every
            rank (``info`` holds ``loss``, ``lr``, ``epoch``).
        lr_schedule: ``lr_schedule(step, total_steps) -> factor``: every group's
            learning rate for the update after ``step`` completed steps is
            ``cfg.lr x lr_mult x factor``. Default: :func:`lr_factor` (``cfg.schedule``).
            Also called when a checkpoint is written (its factor is recorded).
        should_stop: ``should_stop(step, info) -> bool`` after every optimiser
            step, on every rank (``info`` as for ``on_step``). True on any rank
            ends the run cleanly at that step, as if it were the last one: the
            log line, the evaluation and ``last.pt`` are written, and
            ``resume=True`` would continue from there.
        run_files: further files (name -> contents) written by rank 0 into the run folder when it is created,
            next to ``config.json`` (e.g. the CLI's ``model.json``); on resume, those missing are written.

    Returns:
        dict with ``run_dir``, ``step``, ``best_mean_iou``, ``best_step`` and
        ``last_eval`` (the last evaluation's JSON record, or None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    schedule = lr_schedule if lr_schedule is not None else functools.partial(lr_factor, cfg)
    rank, world, device, owns_group = setup_distributed(cfg.device)
    try:
        run = _start(model, train_set, cfg, Path(run_dir), resume, progress, schedule, rank, world, device,
                     run_files)
        _loop(run, train_set, val_set, on_step, should_stop)
        st = run.state
        return {
            "run_dir": str(run.run_dir),
            "step": st.step,
            "best_mean_iou": st.best_mean_iou if st.best_step >= 0 else None,
            "best_step": st.best_step if st.best_step >= 0 else None,
            "last_eval": run.last_eval,
        }
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_spec(train_set: Dataset, cfg: TrainConfig, rank: int, world: int) -> RunSpec:
    n_train = len(train_set)  # type: ignore[arg-type]
    per_rank = ResumableSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed).num_samples
    steps_per_epoch = per_rank // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"train_set has {n_train} samples ({per_rank} per process with {world} processes), "
            f"fewer than batch_size={cfg.batch_size}"
        )
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    return RunSpec(config=_json_normalise(cfg.to_dict()), seed=cfg.seed, schedule=cfg.schedule,
                   steps_per_epoch=steps_per_epoch, total_steps=total, train_len=n_train, world_size=world)


def _start(model: nn.Module, train_set: Dataset, cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool,
           schedule: LrSchedule, rank: int, world: int, device: torch.device,
           run_files: dict[str, bytes] | None = None) -> _Run:
    """Check the run folder, build optimiser and scaler, restore ``last.pt`` or seed the RNGs, wrap in DDP."""
    spec = _run_spec(train_set, cfg, rank, world)
    ckpt = prepare_run_dir(run_dir, spec.config, resume, rank, world, run_files, spec.total_steps)
    model.to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    scaler = make_scaler(cfg, device)
    if ckpt is not None:
        state = load_state(ckpt, run_dir / LAST_FILE, model, optimizer, scaler if scaler.is_enabled() else None,
                           spec, rank)
    else:
        state = TrainState(num_classes=cfg.num_classes)
        seed_all(cfg.seed + rank)
    run = _Run(model=model, net=model, optimizer=optimizer, scaler=scaler, cfg=cfg, spec=spec, state=state,
               run_dir=run_dir, rank=rank, world=world, device=device, show=progress and rank == 0,
               pass_mask=accepts_valid_mask(model), lr_schedule=schedule, resumed=ckpt is not None)
    if rank == 0 and resume:
        metrics = run_dir / METRICS_FILE
        run.records = read_metrics(metrics, up_to_step=state.step) if metrics.is_file() else []
        write_metrics(metrics, run.records)  # drop the lines written after the checkpoint
        run.last_eval = next((r for r in reversed(run.records) if r.get("kind") == "val"), None)
    if world > 1:
        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _epoch_loader(run: _Run, dataset: Dataset, sampler: ResumableSampler) -> DataLoader:
    """The loader of the rest of the current epoch (from the sampler's position in the run state)."""
    sampler.set_epoch(run.state.epoch)
    sampler.set_start(run.state.batch_in_epoch * run.cfg.batch_size)
    return DataLoader(
        SeededDataset(dataset),
        batch_size=run.cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=run.cfg.num_workers,
        collate_fn=functools.partial(collate, ignore_index=run.cfg.ignore_index),
        generator=torch.Generator().manual_seed(run.cfg.seed),
        pin_memory=run.device.type == "cuda",
    )


def _loop(run: _Run, train_set: Dataset, val_set: Dataset | None, on_step: StepHook | None,
          should_stop: StepHook | None) -> None:
    """Epochs of steps until ``total_steps`` (or until ``should_stop``)."""
    st, cfg, spec = run.state, run.cfg, run.spec
    sampler = ResumableSampler(train_set, num_replicas=run.world, rank=run.rank, seed=cfg.seed)
    if not run.resumed:
        _checkpoint(run)  # step 0: initial weights and RNG states, so any kill can be resumed
    bar = tqdm(total=spec.total_steps, initial=st.step, desc="train", disable=not run.show, dynamic_ncols=True)
    done = st.step >= spec.total_steps
    try:
        run.model.train()
        while not done:
            for images, masks, valid in _epoch_loader(run, train_set, sampler):
                factor = run.lr_schedule(st.step, spec.total_steps)
                out = train_step(
                    run.net, run.optimizer, images.to(run.device, non_blocking=True),
                    masks.to(run.device, non_blocking=True), cfg,
                    valid_mask=valid.to(run.device, non_blocking=True) if run.pass_mask and valid is not None else None,
                    factor=factor, scaler=run.scaler, world=run.world, num_classes=st.num_classes,
                )
                st.num_classes = st.num_classes or out.num_classes
                st.step += 1
                st.batch_in_epoch += 1
                bar.update(1)
                info: dict[str, Any] = {"epoch": st.epoch, "lr": cfg.lr * factor}
                if on_step is not None or should_stop is not None:
                    info["loss"] = float(out.loss)
                stop = should_stop is not None and not agree(not should_stop(st.step, info), run.world)
                epoch_done = st.batch_in_epoch == spec.steps_per_epoch
                done = st.step >= spec.total_steps or stop
                _after_step(run, val_set, out.loss, info, epoch_done, done, bar)
                if on_step is not None:
                    on_step(st.step, info)
                if done or epoch_done:
                    break
    finally:
        bar.close()


def _after_step(run: _Run, val_set: Dataset | None, loss: Tensor, info: dict[str, Any], epoch_done: bool,
                done: bool, bar: tqdm) -> None:
    """The bookkeeping of a step: log line, evaluation, checkpoint (each when due, all at the end)."""
    st, cfg = run.state, run.cfg
    if st.step % cfg.log_every == 0 or done:
        loss_value = float(loss)
        if not math.isfinite(loss_value) and not run.scaler.is_enabled():
            raise FloatingPointError(f"training loss became {loss_value} at step {st.step}")
        info["loss"] = loss_value
        bar.set_postfix(loss=f"{loss_value:.4g}")
        _append_record(run, {"kind": "train", "step": st.step, "epoch": st.epoch,
                             "loss": loss_value if math.isfinite(loss_value) else None,
                             "lr": info["lr"], "time": time.time()})
    eval_due = st.step % cfg.eval_every == 0 if cfg.eval_every > 0 else epoch_done
    if eval_due or done:
        _validate(run, val_set)
    if epoch_done:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    if eval_due or epoch_done or done or (cfg.checkpoint_every > 0 and st.step % cfg.checkpoint_every == 0):
        _checkpoint(run)


def _append_record(run: _Run, record: dict[str, Any]) -> None:
    if run.rank == 0:
        run.records.append(record)
        write_metrics(run.run_dir / METRICS_FILE, run.records)


def _validate(run: _Run, val_set: Dataset | None) -> None:
    """Evaluate on ``val_set`` (RNG states untouched), log the record, keep ``best.pt``."""
    st, cfg = run.state, run.cfg
    if val_set is None or st.num_classes is None:
        return
    with preserve_rng():
        res = evaluate(run.model, val_set, st.num_classes, batch_size=cfg.eval_batch_size, device=run.device,
                       ignore_index=cfg.ignore_index, progress=run.show, num_workers=cfg.num_workers)
    miou = res["mean_iou"]
    rec = {
        "kind": "val", "step": st.step, "epoch": st.epoch,
        "mean_iou": None if miou != miou else miou,
        "pixel_accuracy": nan_to_none([res["pixel_accuracy"]])[0],
        "mean_accuracy": nan_to_none([res["mean_accuracy"]])[0],
        "class_iou": nan_to_none(res["class_iou"]),
        "num_images": res["num_images"],
    }
    run.last_eval = rec
    improved = miou == miou and miou > st.best_mean_iou
    if improved:
        st.best_mean_iou, st.best_step = miou, st.step
    _append_record(run, rec)
    if improved and run.rank == 0:
        save_best(run.run_dir / BEST_FILE, run.model, st, rec, run.spec.config)


def _checkpoint(run: _Run) -> None:
    """Write ``last.pt`` (every rank contributes its RNG states)."""
    rngs = all_gather(rng_state(), run.world)
    if run.rank == 0:
        save_state(run.run_dir / LAST_FILE, run.model, run.optimizer, run.scaler if run.scaler.is_enabled() else None,
                   run.state, run.spec, rngs, run.lr_schedule(run.state.step, run.spec.total_steps))
