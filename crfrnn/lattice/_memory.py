"""Memory for the big arrays the compiled kernels stream through: small pages, recycled across calls.

The unary's rows, the output, the lattice's per-point weights and vertex numbers are written and read point
after point, so:

* Small pages. NumPy advises the kernel to back every array of 4 MB and more with transparent huge pages. For
  a streamed array they save nothing, and a fresh one can cost milliseconds to fault in: on a VM whose balloon
  driver reports free memory to the host, a 2 MB block faulted in after a while must be supplied by the host
  again. The memory comes from torch's allocator, which gives no huge-page advice. The lattice's vertex rows,
  read in hash order by the blur and the slice, keep NumPy's huge pages (TLB misses without them).
* Recycled. glibc maps every block above 32 MB afresh and unmaps it when freed, so at 1000x750 every call
  faulted its streamed arrays in again, 4 KB at a time: 80-110 ms of system time in a ~1 s call, where at
  500x375 the same arrays came back from glibc's heap for free. That made cost grow faster than the pixels
  for pydensecrf-style code, which makes one object per image. So a block whose last array (and every view
  and tensor of it) has died goes back to a process-wide cache, and the next array of its size class takes it
  instead of new memory. The cache changes no result (the contents of a new array are undefined either way,
  as ``np.empty``'s; a test fills the cache with NaN and gets the same bits), holds at most
  :data:`CACHE_LIMIT_BYTES`, freeing the oldest blocks beyond, and is inspected and emptied with
  :func:`cached_memory_bytes` and :func:`release_cached_memory` (DEVELOPERS.md, performance notes, session 31).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import List

import numpy as np
import torch

__all__ = ["cached_empty", "cached_memory_bytes", "release_cached_memory", "CACHE_LIMIT_BYTES"]

CACHE_LIMIT_BYTES = 512 * 2**20  # the streamed arrays of one 1000x750 call with either kernel set, and then some
MIN_CACHED_BYTES = 2**20  # glibc's heap already recycles smaller blocks


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to a class: whole 4 KB pages, at most 1/8 more than asked, so that images of
    nearly the same size share blocks."""
    step = 1 << max(nbytes.bit_length() - 4, 12)
    return -(-nbytes // step) * step


class BlockCache:
    """Blocks of memory lent out as arrays and taken back when the last reference to them dies.

    Neither side ever waits for the lock: a take that finds it held makes new memory, and a block given back
    while it is held is freed. So a block can never be lent twice or kept past the limit, no thread blocks on
    another, and a collection that runs inside the locked section cannot deadlock it."""

    def __init__(self, limit_bytes: int = CACHE_LIMIT_BYTES):
        self.limit_bytes = int(limit_bytes)
        self._free: List[torch.Tensor] = []  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """``np.empty(shape, dtype)``, C-contiguous, in small pages; the memory may be a block given back
        earlier (contents undefined, as ``np.empty``'s)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if nbytes < MIN_CACHED_BYTES:  # NumPy advises huge pages from 4 MB only
            return np.empty(shape, dtype)
        return np.asarray(_Lent(self, self._take(_size_class(nbytes)), shape, dtype))

    def nbytes(self) -> int:
        """Bytes held for reuse (lent blocks not counted)."""
        return self._bytes

    def clear(self) -> int:
        """Free every block held for reuse; returns how many bytes that was."""
        with self._lock:
            freed, self._free, self._bytes = self._bytes, [], 0
        return freed

    def _take(self, size: int) -> torch.Tensor:
        if self._lock.acquire(blocking=False):
            try:
                for i in range(len(self._free) - 1, -1, -1):  # the most recently given back first
                    if self._free[i].numel() == size:
                        self._bytes -= size
                        return self._free.pop(i)
            finally:
                self._lock.release()
        return torch.empty(size, dtype=torch.uint8)

    def _give_back(self, block: torch.Tensor) -> None:
        size = block.numel()
        if size > self.limit_bytes or not self._lock.acquire(blocking=False):
            return
        try:
            self._free.append(block)
            self._bytes += size
            while self._bytes > self.limit_bytes:
                self._bytes -= self._free.pop(0).numel()
        finally:
            self._lock.release()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at the fork stays held in the child


class _Lent:
    """The base object of a lent array: NumPy keeps it alive as long as any view of the array (or a tensor
    from ``torch.from_numpy``) is; when it dies, its block goes back to the cache."""

    __slots__ = ("_cache", "_block", "__array_interface__")

    def __init__(self, cache: BlockCache, block: torch.Tensor, shape: tuple, dtype: np.dtype):
        self._cache, self._block = cache, block
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str,
                                    "data": (block.data_ptr(), False)}

    def __del__(self):
        if not sys.is_finalizing():
            self._cache._give_back(self._block)


_CACHE = BlockCache()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CACHE._after_fork)


def cached_empty(shape, dtype=np.float32) -> np.ndarray:
    """``np.empty(shape, dtype)`` for an array the kernels stream through: small pages, from the process's
    block cache (see the module's docstring)."""
    return _CACHE.empty(shape, dtype)


def cached_memory_bytes() -> int:
    """Bytes the process's block cache holds for reuse: memory that arrays of crfrnn's compiled CPU kernels
    have given back and the next calls will take (at most :data:`CACHE_LIMIT_BYTES`)."""
    return _CACHE.nbytes()


def release_cached_memory() -> int:
    """Free the memory the block cache holds for reuse (as ``torch.cuda.empty_cache`` does for CUDA's);
    arrays still in use are not touched. Returns how many bytes were freed."""
    return _CACHE.clear()
