"""The CPU fast path of :class:`~crfrnn.densecrf.DenseCRF` inference: every pairwise term and the softmax
in one compiled pass per iteration (:mod:`crfrnn.lattice.fused`). Its slow twin is
``DenseCRF._infer_by_terms`` (tested equal)."""
from __future__ import annotations

import numpy as np
import torch

from crfrnn.lattice.fused import fused_mean_field_rows, label_rows, stack_lattices

__all__ = ["fused_meanfield", "stack_terms", "unary_rows"]


def unary_rows(unary: torch.Tensor) -> np.ndarray:
    """The unary energies ``(L, N)`` (CPU float32) as :func:`fused_meanfield` reads them: ``-U`` in rows ``(N,
    Cp)``, a point's labels side by side (padded). :class:`DenseCRF` keeps its unary in this form on the CPU, made
    once from the caller's array (which is its copy), so that no inference copies it again."""
    return label_rows(unary.detach().numpy(), negate=True)


def fused_meanfield(neg_rows: np.ndarray, n_labels: int, stacked: tuple, n_iterations: int,
                    labels: bool = False) -> torch.Tensor:
    """Mean field with every term and the softmax fused into one compiled pass per iteration: the maths
    of :meth:`DenseCRF._infer_by_terms` (its slow twin) in a third of the memory traffic.
    ``neg_rows``: the unary energies as :func:`unary_rows` lays them out; returns ``Q (L, N)``, laid out as
    pydensecrf lays out its marginals (the transpose of a contiguous ``(N, L)``: ``np.argmax(Q, axis=0)``
    reads each pixel's labels together instead of first copying ``Q`` into that order), or with ``labels`` its
    arg max over the labels ``(N,)``."""
    return fused_mean_field_rows(neg_rows, n_labels, stacked, n_iterations, labels=labels, by_point=True)


def _entering_weight(compat, n_labels: int) -> np.ndarray:
    """pydensecrf's compatibility as the weight with which a message enters the logits (``logits -=
    mu(m)``): Potts ``w`` (energy ``-w m``) enters as ``+w``, a vector or matrix as its negative."""
    if compat.kind == "potts":
        return np.full(n_labels, compat.weight, np.float32)
    if compat.kind == "diag":
        return -compat.weight[:, 0].numpy()
    return -compat.weight.numpy()


def stack_terms(terms: list, n_labels: int) -> tuple:
    """The terms' lattices, scales and compatibilities laid end to end, as the fused kernel takes them
    (made once per set of terms)."""
    return stack_lattices(
        [t.lattice for t in terms],
        [None if t.pre is None else t.pre.numpy() for t in terms],
        [None if t.post is None else t.post.numpy() for t in terms],
        [_entering_weight(t.compat, n_labels) for t in terms],
        n_labels,
    )
