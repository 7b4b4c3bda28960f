"""Run files: atomic writes, checkpoints (``torch.load(..., weights_only=True)``), ``config.json`` and
``metrics.jsonl``. Every file a run writes goes through :func:`atomic_write`; every reader of
``metrics.jsonl`` goes through :func:`read_metrics`.

A run folder (written by :func:`crfrnn.engine.train`, rank 0 only)::

    run_dir/config.json    the TrainConfig, as JSON
    run_dir/metrics.jsonl  one JSON object per line: training log lines
                           {"kind": "train", "step", "epoch", "loss", "lr", "time"}
                           and evaluations {"kind": "val", "step", "epoch", "mean_iou", ...}
    run_dir/last.pt        everything needed to resume (see :func:`crfrnn.engine.state.save_state`)
    run_dir/best.pt        weights with the best validation mean IU so far
"""

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from crfrnn.engine.config import TrainConfig, _json_normalise
from crfrnn.engine.distributed import agree, barrier
from crfrnn.models.weights import torch_load

__all__ = [
    "CheckpointError",
    "atomic_write",
    "ctrl_c_deferred",
    "write_text",
    "save_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "write_metrics",
    "METRICS_FILE",
    "CONFIG_FILE",
    "LAST_FILE",
    "BEST_FILE",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or does not fit the run."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` by calling ``write(f)`` on a temporary binary file in the same folder, then ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write (the temporary file is
    fsynced before the rename). A failing ``write`` leaves ``path`` untouched and removes the temporary file.
    A Ctrl-C during the write takes effect once the file is in place (see :func:`ctrl_c_deferred`). The folder
    must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with ctrl_c_deferred():
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block has ended, then raise it as the handler in place would.

    ``torch.save`` writes through C++ that calls back into Python: a ``KeyboardInterrupt`` raised inside one of
    those calls leaves torch's writer unfinished, and its destructor later writes to the closed file, which
    aborts the process (``std::terminate``, SIGABRT) instead of letting it exit with the interrupt. Only the
    main thread runs Python's signal handlers; elsewhere, and when SIGINT has no Python handler (ignored, or
    the default action), there is nothing to hold back.
    """
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if caught:
            handler(caught[0], None)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_tmp(folder: Path) -> None:
    """Remove temporary files left in ``folder`` by a process killed inside :func:`atomic_write`."""
    for stale in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (tmp file in the same folder + ``os.replace``).

    ``obj`` should hold only tensors and plain containers / numbers / strings
    so that :func:`load_checkpoint` (``weights_only=True``) can read it.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`crfrnn.engine.train` (``torch.load(..., weights_only=True)``).

    Returns the dict; ``["model"]`` is the model's ``state_dict``. Raises
    :class:`CheckpointError` (a ValueError) naming the file when it is
    missing, truncated, corrupt or not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch_load(path, map_location)
    except ValueError as e:  # the one message of every refused torch file (crfrnn.models.weights.torch_load)
        raise CheckpointError(f"cannot read checkpoint: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} is not a crfrnn checkpoint (no 'model' state dict)")
    return obj


def read_config_json(path: Path, what: str = "run config") -> dict[str, Any]:
    """The JSON object in ``path`` (a run's ``config.json``, a ``--config`` file); ValueError naming ``what``
    and the file otherwise."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return d


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, in file order.

    Args:
        path: the file, or a run folder (then its ``metrics.jsonl``).
        up_to_step: keep only records with ``step <= up_to_step`` (a record without ``step`` counts
            as step 0); ``None``: all.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not a JSON object (the message names the file and the line).
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {p} does not exist")
    records = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot read {p}, line {n}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"cannot read {p}, line {n}: expected a JSON object, got {type(rec).__name__}")
        if up_to_step is None or rec.get("step", 0) <= up_to_step:
            records.append(rec)
    return records


def write_metrics(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as ``metrics.jsonl`` (one JSON object per line, no NaN) atomically."""
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


# --------------------------------------------------------------------------- run folder


#: TrainConfig fields that a resumed run may change: its length (a finished run is extended by more steps).
RESUMABLE_CHANGES = ("max_steps", "epochs")


def _differences(saved: dict[str, Any], given: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    return [k for k in sorted(set(saved) | set(given))
            if k not in ignore and saved.get(k, "<missing>") != given.get(k, "<missing>")]


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the TrainConfig fields it lacks at their defaults: a run of an older version, written
    before those fields existed, ran as their defaults do (e.g. ``learn_bandwidths`` False), so it resumes."""
    defaults = _json_normalise(TrainConfig().to_dict())
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def prepare_run_dir(run_dir: Path, cfg_dict: dict[str, Any], resume: bool, rank: int, world: int,
                    files: dict[str, bytes] | None = None, total_steps: int | None = None) -> dict | None:
    """Check / create the run folder on every rank; return the checkpoint to resume from (or None).

    Without ``resume`` the folder must not exist or be empty, and rank 0 writes ``config.json`` and ``files``
    (name -> contents). With ``resume`` its ``config.json`` (and ``last.pt``'s config, when there is one) must
    equal ``cfg_dict`` except for :data:`RESUMABLE_CHANGES` (a changed length is written to ``config.json``),
    ``files`` missing from the folder are written, and temporary files left by a killed process are removed;
    a ``last.pt`` further on than ``total_steps`` (the given config's length) is refused. All ranks raise
    together; nothing is written when one does.
    """
    error: Exception | None = None
    ckpt = None
    try:
        if resume:
            ckpt = _check_resumable(run_dir, cfg_dict, total_steps)
        elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise FileExistsError(
                f"run_dir {run_dir} already exists and is not empty; pass resume=True to continue that run "
                "or choose a new run_dir (existing runs are never overwritten)"
            )
    except Exception as e:  # re-raised below on this rank; other ranks learn of it via agree
        error = e
    if not agree(error is None, world):
        if error is not None:
            raise error
        raise RuntimeError(f"another rank failed to prepare run_dir {run_dir}")
    barrier(world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_stale_tmp(run_dir)
        if not resume or read_config_json(run_dir / CONFIG_FILE) != cfg_dict:  # new, or a new length
            write_text(run_dir / CONFIG_FILE, json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        for name, data in (files or {}).items():
            if not resume or not (run_dir / name).exists():
                atomic_write(run_dir / name, lambda f, data=data: f.write(data))
    barrier(world)
    return ckpt


def _check_resumable(run_dir: Path, cfg_dict: dict[str, Any], total_steps: int | None) -> dict | None:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run_dir {run_dir} does not exist")
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"cannot resume: {cfg_path} does not exist ({run_dir} is not a run folder)")
    saved = _with_defaults(read_config_json(cfg_path))
    diffs = [f"{k}: {saved.get(k, '<missing>')!r} in {cfg_path.name} vs {cfg_dict.get(k, '<missing>')!r} given"
             for k in _differences(saved, cfg_dict, RESUMABLE_CHANGES)]
    if diffs:
        raise ValueError(
            f"cannot resume run {run_dir}: the given TrainConfig differs from its {cfg_path.name} ("
            + "; ".join(diffs) + "). Resume with the same config (only "
            + "/".join(RESUMABLE_CHANGES) + " may change) or start a new run_dir."
        )
    last = run_dir / LAST_FILE
    if not last.exists():
        return None
    ckpt = load_checkpoint(last)
    if _differences(_with_defaults(_json_normalise(ckpt.get("config", {}))), cfg_dict, RESUMABLE_CHANGES):
        raise CheckpointError(f"checkpoint {last} was written with a config other than {cfg_path}")
    if total_steps is not None and int(ckpt.get("step", 0)) > total_steps:
        raise ValueError(f"cannot resume run {run_dir}: it has done {int(ckpt['step'])} steps, more than the "
                         f"{total_steps} of the given config (runs are extended, never shortened)")
    return ckpt
