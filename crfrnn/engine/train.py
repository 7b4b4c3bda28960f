"""Training and evaluation of segmentation networks (FCN-8s, CRF-RNN, or any model).

The functions are generic: ``model`` is any ``nn.Module`` mapping images
(B, 3, H, W) to logits (B, L, H, W); data sets yield ``(image, mask)`` pairs,
image float (3, H, W), mask int64 (H, W) with ``ignore_index`` for unlabelled
pixels (the contract of :mod:`crfrnn.data`).

Run folder written by :func:`train` (only by rank 0; every file written
atomically: temporary file in the same folder, then ``os.replace``)::

    run_dir/config.json    the TrainConfig, as JSON
    run_dir/metrics.jsonl  one JSON object per line: training log lines
                           {"kind": "train", "step", "epoch", "loss", "lr", ...}
                           and evaluations {"kind": "val", "step", "mean_iou", ...}
    run_dir/last.pt        everything needed to resume (see :func:`train`)
    run_dir/best.pt        weights with the best validation mean IU so far

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


import contextlib
import functools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from crfrnn.engine.metrics import class_iou, confusion_matrix, mean_class_accuracy, mean_iou, pixel_accuracy
from crfrnn.engine.config import _CRF_KEYS, PAPER_LR_SUM, PAPER_NUM_PIXELS, TrainConfig, _json_normalise
from crfrnn.engine.runfiles import (
    CheckpointError, _read_config_json, _read_metrics, _write_metrics, _write_text, load_checkpoint, save_checkpoint,
)

__all__ = [
    "TrainConfig",
    "CheckpointError",
    "param_groups",
    "lr_factor",
    "train",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "PAPER_LR_SUM",
    "PAPER_NUM_PIXELS",
]

#: Base learning rate of the CRF-RNN paper (summed loss, batch 1).
# --------------------------------------------------------------------------- optimiser


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """SGD parameter groups: CRF kernel weights / compatibility, other CRF parameters, biases, the rest.

    A parameter named ``*spatial_ker_weights*`` goes to group ``crf_spatial``,
    ``*bilateral_ker_weights*`` to ``crf_bilateral``, ``*compatibility_matrix*``
    to ``crf_compat`` (learning-rate multipliers ``cfg.crf_*_lr_mult``, weight
    decay ``cfg.crf_weight_decay``); any other parameter under a ``crfrnn.``
    module to ``crf`` (multiplier 1); a ``bias`` to ``bias`` (multiplier
    ``cfg.bias_lr_mult``, weight decay ``cfg.bias_weight_decay``); everything
    else to ``weight``. Frozen parameters (``requires_grad=False``) are left
    out, and so are empty groups. Each group dict has ``name``, ``params``,
    ``lr_mult``, ``lr`` (= ``cfg.lr x lr_mult``) and ``weight_decay``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    crf_wd = cfg.weight_decay if cfg.crf_weight_decay is None else cfg.crf_weight_decay
    spec = {
        "crf_spatial": (cfg.crf_spatial_lr_mult, crf_wd),
        "crf_bilateral": (cfg.crf_bilateral_lr_mult, crf_wd),
        "crf_compat": (cfg.crf_compat_lr_mult, crf_wd),
        "crf": (1.0, crf_wd),
        "bias": (cfg.bias_lr_mult, cfg.bias_weight_decay),
        "weight": (1.0, cfg.weight_decay),
    }
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in spec}
    for name, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        group = next((g for g, key in _CRF_KEYS.items() if key in name), None)
        if group is None:
            if name.startswith("crfrnn.") or ".crfrnn." in name:
                group = "crf"
            elif name == "bias" or name.endswith(".bias"):
                group = "bias"
            else:
                group = "weight"
        buckets[group].append(p)
    groups = []
    for g, params in buckets.items():
        if params:
            mult, wd = spec[g]
            groups.append({"name": g, "params": params, "lr_mult": mult, "lr": cfg.lr * mult, "weight_decay": wd})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Schedule factor for the update that follows ``step`` completed steps.

    ``"fixed"``: 1. ``"poly"``: ``(1 - step / total_steps) ** cfg.poly_power``.
    """
    if cfg.schedule == "fixed":
        return 1.0
    return max(0.0, 1.0 - step / total_steps) ** cfg.poly_power


# --------------------------------------------------------------------------- RNG state


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """Leave the global torch CPU / numpy / python RNG states as they were."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0xC4F]).generate_state(1, np.uint32)[0])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (order a function of seed and epoch) that can start part-way into an epoch.

    Yields ``(dataset index, sample seed)``; the sample seed is a function of
    (seed, epoch, index) and seeds the RNGs while that sample is loaded, so
    random augmentations do not depend on workers, ranks or resumption.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for i, idx in enumerate(super().__iter__()):
            if i >= self.start:
                yield int(idx), _sample_seed(self.seed, self.epoch, int(idx))

    def __len__(self) -> int:
        return self.num_samples - self.start


class _SeededDataset(Dataset):
    """Loads ``dataset[index]`` with torch / numpy / python RNGs seeded by the sample seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = key
        py, npst = random.getstate(), np.random.get_state()
        cpu = torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            item = self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npst)
            torch.set_rng_state(cpu)
        return _as_pair(item, index)


class _PlainDataset(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return _as_pair(self.dataset[index], index)


def _as_pair(item: Any, index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"dataset item {index} must be an (image, mask) pair, got {type(item).__name__}")
    image = torch.as_tensor(item[0])
    mask = torch.as_tensor(item[1])
    if image.ndim != 3 or mask.ndim != 2 or tuple(image.shape[-2:]) != tuple(mask.shape):
        raise ValueError(
            f"dataset item {index}: need image (C, H, W) and mask (H, W) of the same H, W, "
            f"got image {tuple(image.shape)} and mask {tuple(mask.shape)}"
        )
    if mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise TypeError(f"dataset item {index}: mask must hold integer labels, got dtype {mask.dtype}")
    if not image.dtype.is_floating_point:
        image = image.to(torch.float32)
    return image, mask.to(torch.int64)


def _collate(batch: list[tuple[Tensor, Tensor]], ignore_index: int) -> tuple[Tensor, Tensor]:
    images = [b[0] for b in batch]
    masks = [b[1] for b in batch]
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), torch.stack(masks)
    from crfrnn.data import pad_collate  # images of different sizes: pad (masks with ignore_index)

    padded = pad_collate(list(zip(images, masks)), ignore_index=ignore_index)
    return padded[0], padded[1]


class _ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample exactly once over all ranks."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


# --------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(spec: str, local_rank: int, distributed: bool) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {spec!r} but CUDA is not available")
        if distributed and device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _setup_distributed(spec: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group)."""
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = _resolve_device(spec, local_rank, True)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
    rank, world = _dist_info()
    device = _resolve_device(spec, int(os.environ.get("LOCAL_RANK", "0")), world > 1)
    return rank, world, device, owns


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _agree(ok: bool, world: int) -> bool:
    """True when ``ok`` holds on every rank (so all ranks raise together, none hangs)."""
    if world == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


# --------------------------------------------------------------------------- evaluation


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    ignore_index: int = 255,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Confusion matrix, mean IU, per-class IU and pixel accuracy of ``model`` on ``dataset``.

    The model runs in eval mode (so a ``CrfRnn`` uses its ``num_test_iterations``)
    and is put back into its previous mode afterwards. Predictions are
    ``argmax`` over the L logits; pixels labelled ``ignore_index`` are not
    counted. When ``torch.distributed`` is initialised with several processes,
    each evaluates every world-size-th image and the confusion matrices are
    summed with ``all_reduce``: every rank returns the totals.

    Args:
        model: maps images (B, 3, H, W) to logits (B, L, H, W), L = ``num_classes``.
        dataset: yields (image (3, H, W), mask (H, W)) pairs.
        num_classes: L.
        batch_size: images per forward pass. Images of different sizes are
            padded (see :func:`crfrnn.data.pad_collate`), which changes the
            model's context near the borders; 1 evaluates every image as is.
        device: where to run; ``None``: the model's device. A different device
            moves the model there.
        ignore_index: label of unlabelled pixels.
        progress: show a tqdm bar (rank 0 only).
        num_workers: DataLoader worker processes.

    Returns:
        dict with ``mean_iou`` (float, over classes present in ground truth or
        prediction, see :mod:`crfrnn.metrics`), ``class_iou`` (list of L floats,
        NaN for classes absent from both), ``pixel_accuracy``, ``mean_accuracy``,
        ``confusion`` ((L, L) int64 CPU tensor, rows ground truth) and
        ``num_images``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = _unwrap(model)
    dev = _model_device(model) if device is None else torch.device(device)
    if device is not None:
        model.to(dev)
    rank, world = _dist_info()
    n = len(dataset)  # type: ignore[arg-type]
    loader = DataLoader(
        _PlainDataset(dataset),
        batch_size=batch_size,
        sampler=_ShardSampler(n, rank, world),
        num_workers=num_workers,
        collate_fn=functools.partial(_collate, ignore_index=ignore_index),
        generator=torch.Generator().manual_seed(0),
        pin_memory=dev.type == "cuda",
    )
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for images, masks in tqdm(loader, desc="eval", leave=False, disable=not (progress and rank == 0),
                                  dynamic_ncols=True):
            images = images.to(dev, non_blocking=True)
            masks = masks.to(dev, non_blocking=True)
            logits = model(images)
            _check_logits(logits, images, masks, num_classes)
            conf += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
            count += images.shape[0]
    finally:
        model.train(was_training)
    if world > 1:
        red = conf if dist.get_backend() != "nccl" or conf.is_cuda else conf.cuda()
        extra = torch.tensor([count], dtype=torch.int64, device=red.device)
        dist.all_reduce(red)
        dist.all_reduce(extra)
        conf, count = red.to(dev), int(extra.item())
    conf = conf.cpu()
    return {
        "mean_iou": mean_iou(conf),
        "class_iou": class_iou(conf).tolist(),
        "pixel_accuracy": pixel_accuracy(conf),
        "mean_accuracy": mean_class_accuracy(conf),
        "confusion": conf,
        "num_images": count,
    }


def _check_logits(logits: Any, images: Tensor, masks: Tensor, num_classes: int | None) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"model must return a logits tensor (B, L, H, W), got {type(logits).__name__}")
    if (
        logits.ndim != 4
        or logits.shape[0] != images.shape[0]
        or tuple(logits.shape[-2:]) != tuple(masks.shape[-2:])
        or (num_classes is not None and logits.shape[1] != num_classes)
    ):
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for images {tuple(images.shape)} and masks "
            f"{tuple(masks.shape)}; expected (B, L, H, W) with B, H, W of the batch"
            + (f" and L = num_classes = {num_classes}" if num_classes is not None else "")
        )


def _nan_to_none(xs: Sequence[float]) -> list[float | None]:
    return [None if x != x else float(x) for x in xs]


# --------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with SGD + momentum on softmax cross-entropy; write the run folder.

    The model is moved to ``cfg.device`` and trained in place (train mode, so a
    ``CrfRnn`` unrolls ``num_iterations`` mean-field steps). The global RNGs
    are seeded with ``cfg.seed`` (+ rank). The data order is a function of
    (``cfg.seed``, epoch) only and the random augmentations of a sample a
    function of (``cfg.seed``, epoch, index) — the RNGs are seeded per sample
    while it is loaded — so the run is reproducible and independent of
    ``num_workers``. Incomplete last batches of an epoch are dropped.

    ``last.pt`` holds ``model`` (state dict), ``optimizer``, ``scaler``,
    ``scheduler`` (schedule, total steps, current factor), ``step``, ``epoch``,
    ``data`` (seed, epoch, batch in epoch, training-set length, world size),
    ``rng`` (torch/CUDA/numpy/python states of every rank), ``best_mean_iou``,
    ``best_step`` and ``config``. ``best.pt`` holds ``model``, ``step``,
    ``metrics`` and ``config``. All load with ``weights_only=True``.

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
            one. metrics.jsonl lines after the checkpoint are dropped.
        progress: show tqdm bars (rank 0 only).
        on_step: called as ``on_step(step, info)`` after every optimiser step,
            once that step's logging / evaluation / checkpoint is done, on every
            rank (``info`` holds ``loss``, ``lr``, ``epoch``).

    Returns:
        dict with ``run_dir``, ``step``, ``best_mean_iou``, ``best_step`` and
        ``last_eval`` (the last evaluation's JSON record, or None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    run_dir = Path(run_dir)
    rank, world, device, owns_group = _setup_distributed(cfg.device)
    try:
        return _train(model, train_set, val_set, cfg, run_dir, resume, progress, on_step, rank, world, device)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _prepare_run_dir(run_dir: Path, cfg_dict: dict[str, Any], resume: bool, rank: int, world: int) -> dict | None:
    """Check / create the run folder on every rank; return the checkpoint to resume from (or None)."""
    error: Exception | None = None
    ckpt = None
    try:
        if resume:
            if not run_dir.is_dir():
                raise FileNotFoundError(f"cannot resume: run_dir {run_dir} does not exist")
            cfg_path = run_dir / "config.json"
            if not cfg_path.is_file():
                raise FileNotFoundError(f"cannot resume: {cfg_path} does not exist ({run_dir} is not a run folder)")
            saved = _read_config_json(cfg_path)
            diffs = [
                f"{k}: {saved.get(k, '<missing>')!r} in {cfg_path.name} vs {cfg_dict.get(k, '<missing>')!r} given"
                for k in sorted(set(saved) | set(cfg_dict))
                if saved.get(k, "<missing>") != cfg_dict.get(k, "<missing>")
            ]
            if diffs:
                raise ValueError(
                    f"cannot resume run {run_dir}: the given TrainConfig differs from its {cfg_path.name} ("
                    + "; ".join(diffs) + "). Resume with the same config or start a new run_dir."
                )
            last = run_dir / "last.pt"
            if last.exists():
                ckpt = load_checkpoint(last)
                if _json_normalise(ckpt.get("config", {})) != cfg_dict:
                    raise CheckpointError(f"checkpoint {last} was written with a config other than {cfg_path}")
        elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise FileExistsError(
                f"run_dir {run_dir} already exists and is not empty; pass resume=True to continue that run "
                "or choose a new run_dir (existing runs are never overwritten)"
            )
    except Exception as e:  # re-raised below on this rank; other ranks learn of it via _agree
        error = e
    if not _agree(error is None, world):
        if error is not None:
            raise error
        raise RuntimeError(f"another rank failed to prepare run_dir {run_dir}")
    _barrier(world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            _write_text(run_dir / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        else:
            for stale in run_dir.glob(".*.tmp"):  # left by a process killed while writing
                with contextlib.suppress(OSError):
                    stale.unlink()
    _barrier(world)
    return ckpt


def _gather_rng(world: int) -> list[dict[str, Any]]:
    state = _rng_state()
    if world == 1:
        return [state]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


def _train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    cfg_dict = _json_normalise(cfg.to_dict())
    n_train = len(train_set)  # type: ignore[arg-type]
    sampler = _ResumableSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"train_set has {n_train} samples ({sampler.num_samples} per process with {world} processes), "
            f"fewer than batch_size={cfg.batch_size}"
        )
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    ckpt = _prepare_run_dir(run_dir, cfg_dict, resume, rank, world)
    show = progress and rank == 0

    model.to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    step = 0
    best_miou = -math.inf
    best_step = -1
    num_classes = cfg.num_classes
    metrics_path = run_dir / "metrics.jsonl"
    last_path = run_dir / "last.pt"
    best_path = run_dir / "best.pt"
    last_eval: dict[str, Any] | None = None

    if ckpt is not None:
        data = ckpt.get("data", {})
        if data.get("world_size") != world:
            raise CheckpointError(
                f"checkpoint {last_path} was written by {data.get('world_size')} processes, this run has {world}; "
                "resume with the same number of processes"
            )
        if data.get("train_len") != n_train:
            raise CheckpointError(
                f"checkpoint {last_path} was written for a training set of {data.get('train_len')} samples, "
                f"train_set has {n_train}"
            )
        try:
            _unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"][rank])
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {last_path} does not fit this model / run: {e}") from e
        step = int(ckpt["step"])
        best_miou = float(ckpt.get("best_mean_iou", -math.inf))
        best_step = int(ckpt.get("best_step", -1))
        num_classes = ckpt.get("num_classes") or num_classes
    else:
        _seed_all(cfg.seed + rank)

    records: list[dict[str, Any]] = []
    if rank == 0:
        records = _read_metrics(metrics_path, step) if resume else []
        if resume:
            _write_metrics(metrics_path, records)
        last_eval = next((r for r in reversed(records) if r.get("kind") == "val"), None)

    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    collate = functools.partial(_collate, ignore_index=cfg.ignore_index)
    wrapped = _SeededDataset(train_set)

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        rngs = _gather_rng(world)
        if rank != 0:
            return
        save_checkpoint(
            {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "scheduler": {"schedule": cfg.schedule, "total_steps": total_steps,
                              "factor": lr_factor(cfg, step, total_steps)},
                "step": step,
                "epoch": epoch,
                "data": {"seed": cfg.seed, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                         "steps_per_epoch": steps_per_epoch, "train_len": n_train, "world_size": world},
                "rng": rngs,
                "best_mean_iou": best_miou,
                "best_step": best_step,
                "num_classes": num_classes,
                "config": cfg_dict,
            },
            last_path,
        )

    def run_eval(epoch: int) -> None:
        nonlocal best_miou, best_step, last_eval
        if val_set is None or num_classes is None:
            return
        with _preserve_rng():
            res = evaluate(model, val_set, num_classes, batch_size=cfg.eval_batch_size, device=device,
                           ignore_index=cfg.ignore_index, progress=show, num_workers=cfg.num_workers)
        miou = res["mean_iou"]
        rec = {
            "kind": "val", "step": step, "epoch": epoch,
            "mean_iou": None if miou != miou else miou,
            "pixel_accuracy": _nan_to_none([res["pixel_accuracy"]])[0],
            "mean_accuracy": _nan_to_none([res["mean_accuracy"]])[0],
            "class_iou": _nan_to_none(res["class_iou"]),
            "num_images": res["num_images"],
        }
        last_eval = rec
        improved = miou == miou and miou > best_miou
        if improved:
            best_miou, best_step = miou, step
        if rank == 0:
            records.append(rec)
            _write_metrics(metrics_path, records)
            if improved:
                save_checkpoint(
                    {"model": _unwrap(model).state_dict(), "step": step, "epoch": epoch,
                     "metrics": {k: v for k, v in rec.items() if k != "kind"}, "num_classes": num_classes,
                     "config": cfg_dict},
                    best_path,
                )

    epoch, batch_in_epoch = divmod(step, steps_per_epoch)
    if ckpt is None:
        checkpoint(epoch, batch_in_epoch)  # step 0: initial weights and RNG states, so any kill can be resumed
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not show, dynamic_ncols=True)
    try:
        model.train()
        while step < total_steps:
            sampler.set_epoch(epoch)
            sampler.set_start(batch_in_epoch * cfg.batch_size)
            loader = DataLoader(
                wrapped,
                batch_size=cfg.batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=cfg.num_workers,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(cfg.seed),
                pin_memory=device.type == "cuda",
            )
            for images, masks in loader:
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                factor = lr_factor(cfg, step, total_steps)
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * g["lr_mult"] * factor
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=cfg.amp):
                    logits = net(images)
                _check_logits(logits, images, masks, num_classes)
                num_classes = num_classes or int(logits.shape[1])
                loss_sum = F.cross_entropy(logits.float(), masks, ignore_index=cfg.ignore_index, reduction="sum")
                stats = torch.stack([loss_sum.detach().double(), (masks != cfg.ignore_index).sum().double()])
                if world > 1:
                    dist.all_reduce(stats)  # global loss sum and labelled-pixel count
                if cfg.loss_reduction == "mean":
                    # DDP averages gradients over ranks: x world / global count gives the mean over the global batch
                    loss = loss_sum * (world / max(float(stats[1]), 1.0))
                    global_loss = stats[0] / stats[1].clamp_min(1.0)
                else:
                    loss = loss_sum * world
                    global_loss = stats[0]
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                step += 1
                batch_in_epoch += 1
                bar.update(1)
                epoch_done = batch_in_epoch == steps_per_epoch
                done = step >= total_steps
                info: dict[str, Any] = {"epoch": epoch, "lr": cfg.lr * factor}

                if step % cfg.log_every == 0 or done:
                    loss_value = float(global_loss)
                    if not math.isfinite(loss_value) and scaler is None:
                        raise FloatingPointError(f"training loss became {loss_value} at step {step}")
                    info["loss"] = loss_value
                    bar.set_postfix(loss=f"{loss_value:.4g}")
                    if rank == 0:
                        records.append({"kind": "train", "step": step, "epoch": epoch,
                                        "loss": loss_value if math.isfinite(loss_value) else None,
                                        "lr": cfg.lr * factor, "time": time.time()})
                        _write_metrics(metrics_path, records)
                evaluated = False
                eval_due = step % cfg.eval_every == 0 if cfg.eval_every > 0 else epoch_done
                if eval_due or done:
                    run_eval(epoch)
                    evaluated = True
                if epoch_done:
                    epoch, batch_in_epoch = epoch + 1, 0
                if evaluated or epoch_done or done or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                    checkpoint(epoch, batch_in_epoch)
                if on_step is not None:
                    info.setdefault("loss", float(global_loss))
                    on_step(step, info)
                if done or epoch_done:
                    break
    finally:
        bar.close()
    return {
        "run_dir": str(run_dir),
        "step": step,
        "best_mean_iou": best_miou if best_step >= 0 else None,
        "best_step": best_step if best_step >= 0 else None,
        "last_eval": last_eval,
    }
