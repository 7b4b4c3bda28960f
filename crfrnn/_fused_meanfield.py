"""The mean-field loop of :mod:`crfrnn.meanfield` as one compiled pass per iteration over both lattices
(:mod:`crfrnn.lattice.fused`), with a hand-written backward pass. Its slow twin is
``crfrnn.meanfield._mean_field_loop`` (autograd through the lattice filters), tested equal."""
from __future__ import annotations

import numpy as np
import torch

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


def fused_forward(unary, kernels, a, b, num_iterations, history=None):
    """The fused iterations; ``history (T - 1, L, B * N)`` float32 receives the intermediate logits."""
    from .lattice.fused import fused_mean_field, stack_lattices  # numba is optional at import time

    B, L = unary.shape[:2]

    def entering(w):  # logits = unary + a @ m_s + b @ m_b: a vector (L,) or a matrix (L, L)
        w = w.detach().to(torch.float32)
        return (w.expand(L) if w.dim() == 0 else w).contiguous().numpy()

    stacked = stack_lattices([k.lattice for k in kernels], [None, None],
                             [k.inv_norm.detach().reshape(-1).contiguous().numpy() for k in kernels],
                             [entering(a), entering(b)], L)
    logits = unary.detach().reshape(B, L, -1).transpose(0, 1).reshape(L, -1)  # (L, B * N), the lattices' order
    out = fused_mean_field(logits, stacked, num_iterations, marginals=False, history=history)
    return out.reshape(L, B, -1).transpose(0, 1).reshape(unary.shape)


class FusedMeanField(torch.autograd.Function):
    """The fused iterations with a hand-written backward pass: per iteration (last first), with ``g`` the
    gradient of its output logits and ``z = F^T(g / F1)`` per kernel (one filter each),
    ``dL/da += z q^T``, ``dL/dq = a^T z_s + b^T z_b``, then the softmax's backward. ``a``, ``b`` as
    :func:`crfrnn.meanfield._compose` gives them: scalars, ``(L,)`` or ``(L, L)``."""

    @staticmethod
    def forward(ctx, unary, a, b, kernels, num_iterations):
        B, L = unary.shape[:2]
        history = np.empty((num_iterations - 1, L, unary[0, 0].numel() * B), np.float32)
        out = fused_forward(unary, kernels, a, b, num_iterations, history)
        ctx.kernels = kernels
        ctx.save_for_backward(unary, a, b, torch.from_numpy(history))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        unary, a, b, history = ctx.saved_tensors
        B, L = unary.shape[:2]
        spatial = tuple(unary.shape[2:])
        n = unary[0, 0].numel()
        g = grad.reshape(B, L, n).to(unary.dtype).contiguous()
        d_unary = g.clone()
        weights = (a, b)
        dws = [torch.zeros_like(a), torch.zeros_like(b)]
        matrices = a.dim() == 2 and b.dim() == 2  # CrfRnn: the label-space work compiled, per image
        if matrices:
            at, bt = (np.ascontiguousarray(w.detach().t().numpy()) for w in (a, b))
        for t in reversed(range(history.shape[0] + 1)):
            logits = unary.reshape(B, L, n) if t == 0 else history[t - 1].reshape(L, B, n).transpose(0, 1)
            zs = [k.lattice.filter_scaled(g.reshape((B, L) + spatial), reverse=True, pre=k.inv_norm).reshape(B, L, n)
                  for k in ctx.kernels]
            if matrices:
                g = _matrix_step_backward(logits, at, bt, zs, dws, d_unary)
                continue
            q = torch.softmax(logits, dim=1)  # (B, L, n)
            dq = torch.empty_like(q)
            for i in range(B):  # 2-D products (a batch of one is a view)
                for w, dw, z in zip(weights, dws, zs):
                    if w.dim() == 2:
                        dw.addmm_(z[i], q[i].t())
                    else:
                        dw += (z[i] * q[i]).sum(1) if w.dim() == 1 else (z[i] * q[i]).sum()
                dq[i] = sum(torch.mm(w.t(), z[i]) if w.dim() == 2 else z[i] * (w[:, None] if w.dim() == 1 else w)
                            for w, z in zip(weights, zs))
            del zs
            g = dq.sub_((q * dq).sum(1, keepdim=True)).mul_(q)  # through the softmax: dL/d(logits_t)
            d_unary += g
        da, db = dws
        return d_unary.reshape(unary.shape), da, db, None, None


def _matrix_step_backward(logits, at, bt, zs, dws, d_unary) -> torch.Tensor:
    """One iteration of the backward pass for (L, L) weights, given as their transposes ``at``, ``bt`` (C-ordered
    float32; :func:`crfrnn.lattice._numba_kernels.matrix_step_backward`, per image): ``logits (B, L, N)`` before
    the iteration's softmax, ``zs`` the two transposed filters ``(B, L, N)`` of the gradient of its output. Adds
    the weight gradients to ``dws`` and the gradient of ``logits`` to ``d_unary (B, L, N)``; returns that gradient."""
    from .lattice import _numba_kernels as _nb

    B, L, n = d_unary.shape
    nblk = -(-n // _nb._LABEL_BLOCK)
    g = np.empty((B, L, n), np.float32)
    for i in range(B):
        parts = np.empty((2, nblk, L, L), np.float32)
        za, zb, x = (t[i].detach().contiguous().numpy() for t in (zs[0], zs[1], logits))
        _nb.matrix_step_backward(x, za, zb, at, bt, parts[0], parts[1], g[i], d_unary[i].numpy())
        for dw, p in zip(dws, parts):
            dw += torch.from_numpy(p.sum(0))  # the blocks in order: the same bits for any thread count
    return torch.from_numpy(g)
