"""Gradients of the lattice filter w.r.t. the features and their per-dimension bandwidths.

The backward pass of :class:`crfrnn.lattice.permutohedral._LatticeFilter` when the lattice's features (or
bandwidth), or its per-point scales, require grad. The derivation is in ``docs/bandwidths.md``.
"""
from __future__ import annotations

import torch

__all__ = ["geometric_backward", "divided"]


@torch.autograd.function.once_differentiable
def geometric_backward(ctx, grad):
    r"""Gradients of ``out = post * G(pre * values)`` where ``G`` (``F`` or ``F^T``) stands for the Gaussian
    filter :math:`y_k = \sum_j k(f_k, f_j) v_j`. With ``v = pre * values``, ``g = post * grad`` and
    centred features ``f`` (the kernel sees only differences):

    .. math:: \partial L / \partial f_k^d = \sum_c g_{kc} (G(f^d v_c)_k - f_k^d y_{kc})
              + v_{kc} (G^T(f^d g_c)_k - f_k^d G^T(g_c)_k)

    (the second term differentiates the kernel as a column, hence the adjoint ``G^T``; with it the
    gradient sums to zero over the points, as the exact one does, so centring changes nothing).
    One pass of ``G^T`` over ``[f^d g, g]`` gives the values' gradient and the second term; the first
    needs one pass of ``G`` over ``[f^d v]`` -- unless only the bandwidth is needed: its gradient is
    :math:`-\sigma_d^{-1} \sum_k f_k^d \partial L / \partial f_k^d`, where the two terms' bilinear parts
    are equal (:math:`\langle f^d g, G(f^d v)\rangle = \langle G^T(f^d g), f^d v\rangle`).
    """
    lat = ctx.lattice
    values, out, pre, post = ctx.saved_tensors
    need = ctx.needs_input_grad
    B, C, n, D = values.shape[0], values.shape[1], lat.num_points, lat.dim
    spatial = tuple(values.shape[2:])
    dt = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
    scale = lambda t: None if t is None else t.reshape(B, 1, n).to(dt)  # noqa: E731
    pre_s, post_s = scale(pre), scale(post)
    g = grad.reshape(B, C, n).to(dt)
    gs = g if post_s is None else g * post_s
    v = values.reshape(B, C, n).to(dt)
    vs = v if pre_s is None else v * pre_s
    if post_s is None:
        y = out.reshape(B, C, n).to(dt)
    elif bool((post_s != 0).all()):
        y = out.reshape(B, C, n).to(dt) / post_s
    else:
        y = lat.filter_scaled(values, reverse=ctx.reverse, pre=pre).reshape(B, C, n).to(dt)
    fc = _centred(lat, dt)
    stack = torch.empty(B, D + 1, C, n, dtype=dt, device=values.device)
    torch.mul(fc[:, :, None], gs[:, None], out=stack[:, :D])
    stack[:, D] = gs
    adj = lat.filter_scaled(stack.reshape((B, (D + 1) * C) + spatial), reverse=not ctx.reverse)
    del stack
    adj = adj.reshape(B, D + 1, C, n)
    bg = adj[:, D]
    grads = [None] * 7
    if need[0]:
        grads[0] = (bg if pre_s is None else bg * pre_s).reshape(values.shape).to(values.dtype)
    if need[3]:
        grads[3] = (v * bg).sum(1, keepdim=True).reshape(pre.shape).to(pre.dtype)
    if need[4]:
        grads[4] = (g * y).sum(1, keepdim=True).reshape(post.shape).to(post.dtype)
    if need[5] or need[6]:
        common = (gs * y).sum(1) + (vs * bg).sum(1)  # (B, n)
        second = torch.stack([(vs * adj[:, d]).sum(1) for d in range(D)], 1)  # (B, D, n)
        del adj
        if need[5]:
            a = lat.filter_scaled((fc[:, :, None] * vs[:, None]).reshape((B, D * C) + spatial), reverse=ctx.reverse)
            a = a.reshape(B, D, C, n)
            first = torch.stack([(gs * a[:, d]).sum(1) for d in range(D)], 1)
            del a
            df = first + second - fc * common[:, None]  # dL/d(features / bandwidth), (B, D, n)
            s = (fc * df).sum(2)
            grads[5] = _features_grad(df, lat._geometry[1], spatial).to(lat._diff_features.dtype)
        else:
            s = (fc * (2.0 * second - fc * common[:, None])).sum(2)  # (B, D): sum_k f_k dL/df_k
        if need[6]:
            bw = lat._geometry[1].to(dt)
            gb = -s / bw
            if bw.shape[0] != B:
                gb = gb.sum(0, keepdim=True)
            grads[6] = gb.to(lat._diff_bandwidth.dtype)
    return tuple(grads)


def _features_grad(df, bandwidth, spatial):
    """dL/d(features) from dL/d(features / bandwidth), ``(B, D, *spatial)``."""
    B, D = df.shape[:2]
    if bandwidth is not None:
        df = df / bandwidth.to(df.dtype).reshape(-1, D, 1)
    return df.reshape((B, D) + spatial)


def _centred(lat, dtype) -> torch.Tensor:
    """The features as the lattice sees them (divided by the bandwidth) minus each image's mean over its
    valid points, ``(B, D, N)`` in ``dtype`` (0 at left-out points), cached on the lattice. The kernel sees
    only differences, so the gradient is unchanged; small magnitudes keep its products clear of float32
    cancellation."""
    if dtype not in lat._centred_cache:
        feats, bw, valid = lat._geometry
        f = divided(feats, bw).reshape(lat.batch_size, lat.dim, lat.num_points)
        if valid is None:
            f = f - f.mean(2, keepdim=True)
        else:
            w = valid[:, None].to(f.dtype)
            f = (f - (f * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)) * w
        lat._centred_cache[dtype] = f.to(dtype).contiguous()
    return lat._centred_cache[dtype]


def divided(features: torch.Tensor, bandwidth) -> torch.Tensor:
    """``features / bandwidth`` in float64 (the lattice's coordinates), ``(B, D, *spatial)``; ``bandwidth``
    ``(1 or B, D)`` or None."""
    f = features.to(torch.float64)
    if bandwidth is None:
        return f
    return f / bandwidth.to(torch.float64).reshape(bandwidth.shape + (1,) * (f.dim() - 2))
