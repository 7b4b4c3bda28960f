"""Scratch arrays reused across calls, held by whoever reuses them (never global).

A training step of the CRF-RNN layer keeps the marginals of every iteration for its backward pass: 90 MB at
500x375, L=21, T=5. glibc hands blocks above 32 MB back to the system when they are freed, so without reuse
every step faults that block in again (12-450 ms of system time a step on a 2-core VM, against a forward +
backward of 200-800 ms; DEVELOPERS.md, performance notes). :class:`~crfrnn.CrfRnn` holds a
:class:`Workspace` and the next step writes into the last step's arrays once their graph has let go of them.
"""
from __future__ import annotations

import sys
import threading
from typing import Dict, Tuple

import numpy as np

__all__ = ["Workspace"]


def _references(arrays: dict, name: str) -> int:
    return sys.getrefcount(arrays[name])


# what _references counts for an entry that nothing else holds (its dict's reference and the call's own),
# measured rather than assumed, so that an interpreter that counts differently still compares like with like
_HELD_ONLY_BY_US = _references({"entry": object()}, "entry")


class Workspace:
    """Named scratch arrays: ``empty(name, shape, dtype)`` is ``np.empty(shape, dtype)`` that returns the array
    last made under ``name`` when its shape and dtype match and nothing but this workspace references it any
    more (no array, view or tensor made from it is alive); otherwise a new array, which it then holds in place
    of the old one. Like ``np.empty``'s, the contents are undefined. At most one array is held per name;
    :meth:`clear` lets go of them. Copies and pickles of a workspace start empty (its arrays are scratch)."""

    def __init__(self):
        self._arrays: Dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # two threads must not both take the same free array

    def empty(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        with self._lock:
            if name in self._arrays and _references(self._arrays, name) == _HELD_ONLY_BY_US:
                held = self._arrays[name]
                if held.shape == shape and held.dtype == dtype:
                    return held
                del held, self._arrays[name]  # freed before its replacement is made
            made = np.empty(shape, dtype)
            self._arrays[name] = made
            return made

    def nbytes(self) -> int:
        """The bytes the workspace holds."""
        return sum(a.nbytes for a in self._arrays.values())

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()

    def __len__(self) -> int:
        return len(self._arrays)

    def __getstate__(self) -> dict:  # copy, deepcopy and pickle: a new, empty workspace
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __repr__(self) -> str:
        return f"Workspace(arrays={len(self._arrays)}, nbytes={self.nbytes()})"

