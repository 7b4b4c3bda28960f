"""The argument checks of :mod:`crfrnn.densecrf` (pydensecrf's argument types, with errors that name the
argument and its shape)."""
from __future__ import annotations

import math
from numbers import Number
from typing import Tuple

import numpy as np
import torch

from crfrnn.lattice._checks import _all_finite


def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def _float32_array(x, name: str, ndim: int, *, contiguous: bool = True, copy: bool = True) -> torch.Tensor:
    """pydensecrf's ``float[:, ::1]`` argument: a float32 (C-contiguous) numpy array or torch tensor.

    Returns a float32 CPU tensor that owns its memory (a copy: later edits of ``x`` do not leak in), or with
    ``copy=False`` one that may share ``x``'s memory, for a caller that copies it itself.
    """
    if x is None:
        raise TypeError(f"{name} must not be None")
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (as pydensecrf), got {x.dtype} with shape {_shape(x)}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(x)}")
        return x.detach().to("cpu", copy=copy).contiguous()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a float32 numpy array (or torch tensor), got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(
            f"{name} must be float32 (as pydensecrf), got {x.dtype} with shape {x.shape}; use .astype(np.float32)"
        )
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if contiguous and not x.flags["C_CONTIGUOUS"]:
        raise ValueError(
            f"{name} (shape {x.shape}) must be C-contiguous (as pydensecrf); convert it with np.ascontiguousarray()"
        )
    # a read-only array is copied all the same (torch warns on wrapping one)
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=copy or not x.flags["WRITEABLE"]))


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not _all_finite(t):
        raise ValueError(f"{name} (shape {_shape(t)}) contains NaN or infinite values")


def _positive_widths(value, name: str, n: int) -> Tuple[float, ...]:
    """A kernel width given as one number or ``n`` numbers (per axis/channel), each positive and finite."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, Number) and not isinstance(value, bool):
        seq = (value,) * n
    else:
        try:
            seq = tuple(value)
        except TypeError:
            kind = type(value).__name__
            raise TypeError(f"{name} must be a number or a sequence of {n} numbers, got {kind}") from None
        if len(seq) != n:
            raise ValueError(f"{name} must be a number or a sequence of {n} numbers, got {len(seq)}: {value!r}")
    out = []
    for s in seq:
        if isinstance(s, torch.Tensor) and s.dim() == 0:
            s = s.item()
        if not isinstance(s, Number) or isinstance(s, bool):
            raise TypeError(f"{name} must contain numbers, got {value!r}")
        if not math.isfinite(float(s)) or float(s) <= 0:
            raise ValueError(f"{name} must be positive and finite (a kernel width), got {value!r}")
        out.append(float(s))
    return tuple(out)


def _enum(value, cls, name: str):
    try:
        return cls(int(value))
    except (TypeError, ValueError):
        valid = ", ".join(f"{m.name}={m.value}" for m in cls)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}") from None


def _int_arg(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
