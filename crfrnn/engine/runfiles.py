"""Run files: atomic writes, checkpoints (``torch.load(..., weights_only=True)``), ``config.json`` and
``metrics.jsonl``. Every file a run writes goes through :func:`atomic_write`."""

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch



__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_write"]

class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or does not fit the run."""



def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (tmp file in the same folder + ``os.replace``).

    ``obj`` should hold only tensors and plain containers / numbers / strings
    so that :func:`load_checkpoint` (``weights_only=True``) can read it.
    """
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``torch.load(..., weights_only=True)``).

    Returns the dict; ``["model"]`` is the model's ``state_dict``. Raises
    :class:`CheckpointError` (a ValueError) naming the file when it is
    missing, truncated, corrupt or not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt, truncated or not a weights-only torch file "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} is not a crfrnn checkpoint (no 'model' state dict)")
    return obj


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read run config {path}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"run config {path} does not hold a JSON object")
    return d


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot read {path}: bad JSON line {line[:80]!r}: {e}") from e
        if rec.get("step", 0) <= up_to_step:
            records.append(rec)
    return records


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


