"""Evaluation of a segmentation model (confusion matrix, mean IU, accuracies), and the forward pass that
training and evaluation share.

**Padded batches.** Images of different sizes are padded into one batch (see
:func:`crfrnn.engine.samplers.collate`). Padded mask pixels carry ``ignore_index``, so they never count in
the loss or the metrics. A model whose ``forward`` has a ``valid_mask`` parameter (``CrfRnnNet``,
``CrfRnnHead``, ``TinyCrfRnnNet``) also receives ``valid_mask (B, 1, H, W)`` bool for such batches, so that
its CRF neither sends nor receives messages across the padding: with it, a padded batch gives each image the
CRF result it gets alone. Whether the model accepts it is read once from its ``forward`` signature
(:func:`accepts_valid_mask`); batches of one size are run as ``model(images)``.
"""

import functools
import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from crfrnn.engine.distributed import all_reduce, dist_info, unwrap
from crfrnn.engine.metrics import class_iou, confusion_matrix, mean_class_accuracy, mean_iou, pixel_accuracy
from crfrnn.engine.samplers import PlainDataset, ShardSampler, collate

__all__ = ["evaluate", "accepts_valid_mask", "forward"]


def accepts_valid_mask(model: nn.Module) -> bool:
    """Whether ``model.forward`` (inside a DDP wrapper, if any) has a ``valid_mask`` keyword parameter."""
    try:
        params = inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):  # no signature to read (e.g. a C-implemented forward)
        return False
    p = params.get("valid_mask")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def forward(model: nn.Module, images: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """``model(images)``, or ``model(images, valid_mask=valid_mask)`` when a mask is given."""
    return model(images) if valid_mask is None else model(images, valid_mask=valid_mask)


def check_logits(logits: Any, images: Tensor, masks: Tensor, num_classes: int | None) -> None:
    """TypeError / ValueError unless ``logits`` is a (B, L, H, W) tensor matching the batch."""
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


def nan_to_none(xs: Sequence[float]) -> list[float | None]:
    """JSON-friendly floats: NaN -> None."""
    return [None if x != x else float(x) for x in xs]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_args(model: Any, num_classes: Any, batch_size: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _confusion(model: nn.Module, loader: DataLoader, num_classes: int, ignore_index: int, dev: torch.device,
               show: bool) -> tuple[Tensor, int]:
    """(confusion matrix (L, L) on ``dev``, number of images) of ``model`` over ``loader``."""
    pass_mask = accepts_valid_mask(model)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev)
    count = 0
    for images, masks, valid in tqdm(loader, desc="eval", leave=False, disable=not show, dynamic_ncols=True):
        images = images.to(dev, non_blocking=True)
        masks = masks.to(dev, non_blocking=True)
        valid = valid.to(dev, non_blocking=True) if pass_mask and valid is not None else None
        logits = forward(model, images, valid)
        check_logits(logits, images, masks, num_classes)
        conf += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
        count += images.shape[0]
    return conf, count


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
            padded (see the module docstring): the CRF of a model that accepts
            ``valid_mask`` ignores the padding, but convolutions still see it
            near the borders; 1 evaluates every image as is.
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
    _check_args(model, num_classes, batch_size)
    model = unwrap(model)
    dev = _model_device(model) if device is None else torch.device(device)
    if device is not None:
        model.to(dev)
    rank, world = dist_info()
    loader = DataLoader(
        PlainDataset(dataset),
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=functools.partial(collate, ignore_index=ignore_index),
        generator=torch.Generator().manual_seed(0),
        pin_memory=dev.type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        conf, count = _confusion(model, loader, num_classes, ignore_index, dev, progress and rank == 0)
    finally:
        model.train(was_training)
    if world > 1:
        conf = all_reduce(conf, world)
        count = int(all_reduce(torch.tensor([count], dtype=torch.int64, device=dev), world).item())
    conf = conf.cpu()
    return {
        "mean_iou": mean_iou(conf),
        "class_iou": class_iou(conf).tolist(),
        "pixel_accuracy": pixel_accuracy(conf),
        "mean_accuracy": mean_class_accuracy(conf),
        "confusion": conf,
        "num_images": count,
    }
