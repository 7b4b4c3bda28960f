"""The mean-field loop of :mod:`crfrnn.meanfield` as one compiled pass per iteration over both lattices
(:mod:`crfrnn.lattice.fused`), with a hand-written backward pass. Its slow twin is
``crfrnn.meanfield._mean_field_loop`` (autograd through the lattice filters), tested equal."""
from __future__ import annotations

import numpy as np
import torch

from .lattice.workspace import Workspace

__all__ = ["fusable", "fused_forward", "FusedMeanField"]


def fusable(unary, kernels, weights, thetas) -> bool:
    """Whether :func:`crfrnn.meanfield._fused_loop` may run: CPU float32 on numba lattices, the same weights in every
    iteration, and bandwidths that are not learned (their gradient needs the lattice's geometry)."""
    if unary.dtype != torch.float32 or unary.device.type != "cpu" or not weights[0]:  # T = 0: nothing to run
        return False
    if any(k.matrix is not None or k.lattice.backend != "numba" for k in kernels):
        return False
    if any(any(w is not ws[0] for w in ws) for ws in weights):
        return False
    return not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in thetas))


def _stacked(kernels, a, b, L):
    """The two kernels as :func:`crfrnn.lattice.fused.stack_lattices` lays them out for the forward."""
    from .lattice.fused import stack_lattices  # numba is optional at import time

    def entering(w):  # logits = unary + a @ m_s + b @ m_b: a vector (L,) or a matrix (L, L)
        w = w.detach().to(torch.float32)
        return (w.expand(L) if w.dim() == 0 else w).contiguous().numpy()

    return stack_lattices([k.lattice for k in kernels], [None, None], [_inv_norm(k) for k in kernels],
                          [entering(a), entering(b)], L)


def _inv_norm(kernel):
    return kernel.inv_norm.detach().reshape(-1).contiguous().numpy()


def fused_forward(unary, kernels, a, b, num_iterations, history=None, stacked=None, splats=None):
    """The fused iterations; ``history`` (:func:`crfrnn.lattice.fused.history_shape`) receives the marginals
    each iteration filters, and ``splats`` (:func:`crfrnn.lattice.fused.splats_shape`) some terms' splats of
    them; ``stacked``: :func:`_stacked`'s, if the caller has it."""
    from .lattice.fused import fused_mean_field

    B, L = unary.shape[:2]
    if stacked is None:
        stacked = _stacked(kernels, a, b, L)
    logits = unary.detach().reshape(B, L, -1).transpose(0, 1).reshape(L, -1)  # (L, B * N), the lattices' order
    out = fused_mean_field(logits, stacked, num_iterations, marginals=False, history=history, splats=splats)
    return out.reshape(L, B, -1).transpose(0, 1).reshape(unary.shape)


class FusedMeanField(torch.autograd.Function):
    """The fused iterations with a backward pass fused like them
    (:func:`crfrnn.lattice.fused.fused_mean_field_backward`): per iteration (last first), with ``g`` the gradient
    of its output logits and ``z = F^T(g / F1)`` per kernel, ``dL/da += z q^T``, ``dL/dq = a^T z_s + b^T z_b``,
    then the softmax's backward. ``a``, ``b`` as :func:`crfrnn.meanfield._compose` gives them: scalars, ``(L,)``
    or ``(L, L)``; the backward works with their matrices and takes the trace or diagonal of those gradients.
    ``workspace``: a :class:`~crfrnn.lattice.workspace.Workspace` for the history and splats, or ``None``."""

    @staticmethod
    def forward(ctx, unary, a, b, kernels, num_iterations, workspace=None):
        from .lattice.fused import history_shape, splats_shape

        B, L = unary.shape[:2]
        n = unary[0, 0].numel() * B
        # CrfRnn's workspace lends the last step's arrays once its graph is gone; without one, a throwaway's are new
        ws = Workspace() if workspace is None else workspace
        history = ws.empty("history", history_shape(num_iterations, L, n), np.float32)
        stacked = _stacked(kernels, a, b, L)
        splats = ws.empty("splats", splats_shape(stacked[7], num_iterations, L, n), np.float32)
        out = fused_forward(unary, kernels, a, b, num_iterations, history, stacked, splats)
        ctx.kernels, ctx.stacked = kernels, stacked
        # saved tensors (not ctx attributes): autograd frees them after the backward, even while the output lives
        ctx.save_for_backward(unary, a, b, torch.from_numpy(history), torch.from_numpy(splats))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from .lattice.fused import fused_mean_field_backward, transposed_terms
        from .meanfield import _label_matrix

        unary, a, b, history, splats = ctx.saved_tensors
        B, L = unary.shape[:2]

        def lattice_order(x):  # (B, L, *spatial) -> (L, B * N), the lattices' order of points
            return x.detach().to(torch.float32).reshape(B, L, -1).transpose(0, 1).reshape(L, -1).contiguous()

        def matrix(w):
            return _label_matrix(w.detach().to(torch.float32), L).contiguous().numpy()

        stacked = transposed_terms(ctx.stacked, [k.lattice for k in ctx.kernels], [_inv_norm(k) for k in ctx.kernels])
        d_unary, (da, db) = fused_mean_field_backward(lattice_order(grad), history.numpy(), stacked,
                                                      [matrix(a), matrix(b)], splats.numpy())

        def reduce(d, w):  # the gradient of a scalar or (L,) weight from that of its matrix
            d = d.to(w.dtype)
            return d if w.dim() == 2 else torch.diagonal(d).clone() if w.dim() == 1 else torch.trace(d)

        d_unary = d_unary.reshape(L, B, -1).transpose(0, 1).reshape(unary.shape)
        return d_unary.to(unary.dtype), reduce(da, a), reduce(db, b), None, None, None
