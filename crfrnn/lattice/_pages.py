"""Where the compiled kernels' big arrays get their memory.

NumPy advises the kernel to back every array of 4 MB and more with transparent huge pages. For an array the
kernels stream through point after point (the unary's rows, the output, the per-point lattice weights and
vertex numbers) huge pages save nothing, and a fresh one can cost milliseconds to fault in: on a VM whose
balloon driver reports free memory to the host (free page reporting), a 2 MB block faulted in after a while
must be supplied by the host again, 1-7 ms, against ~1 ms for the same memory in 4 KB pages (DEVELOPERS.md,
performance notes). The lattice's vertex rows, read in hash order by the blur and the slice, keep NumPy's huge
pages (TLB misses without them)."""
from __future__ import annotations

import numpy as np
import torch


def in_small_pages(shape, dtype=np.float32) -> np.ndarray:
    """``np.empty(shape, dtype)`` in memory from torch's allocator, which gives no huge-page advice."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()
