"""Training for a number of steps or for a share of the CPU-time budget, steered only through the hooks of
:func:`crfrnn.engine.train` (``lr_schedule``, ``should_stop``, ``on_step``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from crfrnn.engine import TrainConfig, read_metrics, save_checkpoint, train

from .budget import Clock, cpu
from .common import log

MAX_STEPS = 10**7  # "until the time share is used up"


def train_for(model: nn.Module, dataset: Dataset, cfg: TrainConfig, run_dir: Path, seconds: float | None, *,
              poly: bool, name: str, clock: Clock) -> int:
    """:func:`crfrnn.engine.train` for ``cfg.max_steps`` steps, or (``seconds`` given) for that much CPU time.

    In time mode the run stops after the first step that ends past ``seconds`` (the ``should_stop`` hook) and,
    with ``poly``, the learning rate follows the poly schedule in *time*, ``lr x (1 - t / seconds) ** 0.9``
    (the ``lr_schedule`` hook), so it reaches ~0 when the share is used up whatever the machine's load.
    The final weights go to ``run_dir/final.pt``. Returns the number of steps taken.
    """
    t0 = cpu()
    last_log = [t0]

    def share_used() -> float:
        return (cpu() - t0) / seconds

    def time_poly(step: int, total_steps: int) -> float:
        return max(0.0, 1.0 - share_used()) ** cfg.poly_power

    def out_of_time(step: int, info: dict[str, Any]) -> bool:
        return share_used() >= 1.0

    def progress(step: int, info: dict[str, Any]) -> None:
        now = cpu()
        if now - last_log[0] > 30:
            last_log[0] = now
            log(f"{name} step {step} loss {info['loss']:.3f} lr {info['lr']:.2e} ({clock.elapsed():.0f} CPU s, "
                f"{clock.wall():.0f} wall s)")

    timed = seconds is not None
    summary = train(model, dataset, None, cfg, run_dir, progress=False, on_step=progress,
                    should_stop=out_of_time if timed else None, lr_schedule=time_poly if timed and poly else None)
    save_checkpoint({"model": model.state_dict(), "step": summary["step"]}, run_dir / "final.pt")
    log(f"{name}: {summary['step']} steps in {cpu() - t0:.0f}s, last loss {last_loss(run_dir)}")
    return summary["step"]


def last_loss(run: Path) -> float | None:
    """The last logged training loss of the run folder ``run`` (None without one)."""
    try:
        records = read_metrics(run)
    except FileNotFoundError:
        return None
    losses = [r["loss"] for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    return losses[-1] if losses else None
