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
    B, C, n = values.shape[0], values.shape[1], lat.num_points
    dt = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
    pre_s = None if pre is None else pre.reshape(B, 1, n).to(dt)
    g = grad.reshape(B, C, n).to(dt)
    v = values.reshape(B, C, n).to(dt)
    vs = v if pre_s is None else v * pre_s
    geometric = need[5] or need[6]
    fc = _centred(lat, dt) if geometric else None
    fine = geometric and lat.geometry_grad == "fine"
    second = None
    if fine and not need[5]:  # the values' gradient on this lattice, the moment terms on the fine one
        bg = lat.filter_scaled(g.reshape(values.shape), reverse=not ctx.reverse, pre=post).reshape(B, C, n).to(dt)
    else:  # G^T(post g) and sum_c v G^T(f^d post g)
        bg, second = _filter_groups(lat, g, post, fc, not ctx.reverse, vs, with_plain=True)
    grads = [None] * 7
    if need[0]:
        grads[0] = (bg if pre_s is None else bg * pre_s).reshape(values.shape).to(values.dtype)
    if need[3]:
        grads[3] = _sum_channels(v, bg).reshape(pre.shape).to(pre.dtype)
    if need[4] or geometric:
        go = _sum_channels(g, out.reshape(B, C, n).to(dt))  # sum_c g out = sum_c (post g) y, (B, n)
    if need[4]:  # sum_c g y with y = out / post: post is non-zero where it requires grad (see _filter_diff)
        grads[4] = (go / post.reshape(B, n).to(dt)).reshape(post.shape).to(post.dtype)
    if geometric and second is not None:  # the features' gradient stays on this lattice in the fine mode too
        common = go + _sum_channels(vs, bg)  # sum_c (g y + v G^T g), (B, n)
        del bg
        grads[5], grads[6] = _geometry_grads(ctx, fc, g, vs, second, common, tuple(values.shape[2:]))
    bg = None  # freed before the fine lattice's passes
    if fine and need[6]:  # the bandwidth's gradient from the fine lattice's moments
        grads[6] = _fine_bandwidth_grad(ctx, fc, g, vs, post, go, tuple(values.shape[2:]))
    return tuple(grads)


def _fine_bandwidth_grad(ctx, fc, g, vs, post, go, spatial):
    r"""dL/dσ of ``geometry_grad="fine"``: the moment terms on the fine lattice ``M`` (see
    ``PermutohedralLattice._moment_lattice``), centred on its own mean moment, plus this lattice's mean moment:

    .. math:: D_d(v) = \rho\,(M_d v - a^M_d\, M v) + a^G_d\, G v, \qquad
              dL/d\sigma_d = \sigma_d^{-1} \sum_c \langle g_c, D_d(v_c) \rangle

    with :math:`(M_d v)_i = \sum_j M_{ij} (f_i^d - f_j^d)^2 v_j` (likewise :math:`G_d`),
    :math:`a^M_d = M_d 1 / M 1`, :math:`a^G_d = G_d 1 / G 1` and :math:`\rho = G 1 / M 1` (per point).
    For the exact kernel every estimate of :math:`D_d` is :math:`\sum_j k_{ij} (f_i^d - f_j^d)^2 v_j`; here,
    in a normalised filter ``G v / G 1`` the official terms cancel and the derivative is the covariance of
    :math:`(f_i^d - f_j^d)^2` and ``v`` under ``M``'s kernel, whatever the forward's normalised output is
    (mixing ``M``'s moments with the forward's mean would add (z_M - z_G) a, an error of the forward).
    ``g`` (B, C, n) the incoming gradient, ``vs`` the (pre-scaled) values, ``go = sum_c (post g) y``."""
    lat = ctx.lattice
    B, C, n = g.shape
    mom = lat._moment_lattice()
    rho, a_fine, a_lat = _fine_constants(lat, mom, fc, ctx.reverse, spatial)
    gp = g if post is None else g * post.reshape(B, 1, n).to(g.dtype)  # post g
    # sum_i (rho g)_i (M_d v)_i by the bilinear identity of the single-pass bandwidth gradient
    plain, second = _filter_groups(mom, gp, rho.reshape((B, 1) + spatial), fc, not ctx.reverse, vs, with_plain=True)
    my = mom.filter_scaled(vs.reshape((B, C) + spatial), reverse=ctx.reverse).reshape(B, C, n)
    gmy = _sum_channels(gp, my)  # sum_c (post g) M v, (B, n)
    common = rho * gmy + _sum_channels(vs, plain)
    del plain, my
    s = (fc * (2.0 * second - fc * common[:, None])).sum(2, dtype=torch.float64)  # -sum (rho g) M_d v
    s = s + ((rho * gmy)[:, None] * a_fine).sum(2, dtype=torch.float64)
    s = s - (go[:, None] * a_lat).sum(2, dtype=torch.float64)
    bandwidth = lat._geometry[1]
    gb = -s / bandwidth.to(torch.float64)
    if bandwidth.shape[0] != B:
        gb = gb.sum(0, keepdim=True)
    return gb.to(lat._diff_bandwidth.dtype)


def _fine_constants(lat, mom, fc, reverse, spatial):
    """``rho = G 1 / M 1`` (B, n) and the mean moments ``a^M_d = M_d 1 / M 1``, ``a^G_d = G_d 1 / G 1`` (B, D, n)
    in the forward's orientation, cached on the lattice (they depend on the features only)."""
    key = ("fine constants", reverse, fc.dtype)
    if key not in lat._grad_cache:
        B, D, n = fc.shape
        chans = torch.cat([fc * fc, fc, torch.ones_like(fc[:, :1])], 1).reshape((B, 2 * D + 1) + spatial)
        out = []
        for op in (mom, lat):
            r = op.filter_scaled(chans, reverse=reverse).reshape(B, 2 * D + 1, n)
            row = r[:, 2 * D]
            moment = r[:, :D] - 2.0 * fc * r[:, D : 2 * D] + fc * fc * row[:, None]  # G_d 1
            ok = row > 0  # left-out points: 0 / 0, and no part in the gradient
            mean = torch.where(ok[:, None], moment / row.clamp_min(1e-300)[:, None], torch.zeros_like(moment))
            out.append((row, mean))
        (row_m, a_fine), (row_g, a_lat) = out
        rho = torch.where(row_m > 0, row_g / row_m.clamp_min(1e-300), torch.zeros_like(row_g))
        lat._grad_cache[key] = (rho, a_fine, a_lat)
    return lat._grad_cache[key]


# channels per filter pass of the gradient: [f^d g] for all d is (D + 1) C channels, whose input, output and
# the lattice's own buffers (which grow with the channels) would otherwise all be alive at once. Lattice rows
# of a few SIMD registers also stay in cache during the blur: one group per pass for CRF-RNN's C = 21 (peak
# memory of the learned-bandwidth layer 1.35x the plain one's, against 1.60x with 64; the same time)
_PASS_CHANNELS = 24


def _buffer(lat, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A work tensor kept on the lattice for the next call (fresh pixel-sized allocations cost page faults)."""
    cache = lat._grad_cache
    key = (name, tuple(shape), like.dtype, like.device)
    if key not in cache:
        cache[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return cache[key]


def _sum_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_c a[:, c] * b[:, c]`` for ``(B, C, n)`` tensors: ``(B, n)``, one multiply-add per channel into
    the result (a product tensor reduced over its channel axis moves 3x the memory: 3x slower at C = 21,
    n = 187500)."""
    out = torch.mul(a[:, 0], b[:, 0])
    for c in range(1, a.shape[1]):
        out.addcmul_(a[:, c], b[:, c])
    return out


def _filter_groups(lat, x, scale, fc, reverse, w, with_plain):
    """Filter the channel groups ``[f^1 x, ..., f^D x]`` (and ``x`` itself if ``with_plain``), with ``scale``
    fused in as the input scale, in passes of at most ``_PASS_CHANNELS`` channels, and contract each
    ``H_d = G(f^d scale x)`` with ``w`` over the channels at once: ``sum_c w H_d``, ``(B, D, n)``.
    Returns ``(G(scale x) or None, contractions or None)``."""
    B, C, n = x.shape
    spatial = lat.spatial_shape
    D = 0 if fc is None else fc.shape[1]
    groups = D + int(with_plain)
    per = max(1, _PASS_CHANNELS // C)
    if per == 1:
        return _filter_each_group(lat, x, scale, fc, reverse, w, with_plain)
    plain, parts = None, []
    for d0 in range(0, groups, per):
        d1 = min(d0 + per, groups)
        nd = min(d1, D) - d0  # groups f^d x in this pass; the rest is x itself
        buf = _buffer(lat, "groups", (B, d1 - d0, C, n), x)
        if nd > 0:
            torch.mul(fc[:, d0 : d0 + nd, None], x[:, None], out=buf[:, :nd])
        if d1 > D:
            buf[:, nd] = x
        res = lat.filter_scaled(buf.reshape((B, (d1 - d0) * C) + spatial), reverse=reverse, pre=scale)
        res = res.reshape(B, d1 - d0, C, n)
        if d1 > D:
            plain = res[:, nd].clone()
        if nd > 0:  # the input buffer is free again: it takes the products
            parts.append(torch.mul(res[:, :nd], w[:, None], out=buf[:, :nd]).sum(2))
    return plain, (torch.cat(parts, 1) if parts else None)


def _filter_each_group(lat, x, scale, fc, reverse, w, with_plain):
    """:func:`_filter_groups` one group per pass, ``f^d`` folded into the pass's per-point input scale (one
    value per point, instead of a copy of ``x`` per group)."""
    B, C, n = x.shape
    shape = (B, C) + lat.spatial_shape
    plain, parts = None, []
    if with_plain:
        plain = lat.filter_scaled(x.reshape(shape), reverse=reverse, pre=scale).reshape(B, C, n)
    scale_n = None if scale is None or fc is None else scale.reshape(B, 1, n).to(fc.dtype)
    for d in range(0 if fc is None else fc.shape[1]):
        pre = fc[:, d : d + 1] if scale_n is None else fc[:, d : d + 1] * scale_n
        res = lat.filter_scaled(x.reshape(shape), reverse=reverse, pre=pre.reshape((B, 1) + lat.spatial_shape))
        res = res.reshape(B, C, n)
        parts.append(_sum_channels(res, w))
    return plain, (torch.stack(parts, 1) if parts else None)


def _geometry_grads(ctx, fc, g, vs, second, common, spatial):
    """Gradients w.r.t. the features and the bandwidth (each None unless needed). ``second``: the adjoint
    term ``sum_c v G^T(f^d post g)`` ``(B, D, n)``; ``common = sum_c (g y + v G^T(post g))`` ``(B, n)``."""
    lat, need = ctx.lattice, ctx.needs_input_grad
    B, D, n = fc.shape
    feats = bw = None
    bandwidth = lat._geometry[1]
    if need[5]:
        _, first = _filter_groups(lat, vs, None, fc, ctx.reverse, g, with_plain=False)  # sum_c g G(f^d v)
        post = ctx.saved_tensors[3]
        if post is not None:
            first = first * post.reshape(B, 1, n).to(first.dtype)
        df = first + second - fc * common[:, None]  # dL/d(features / bandwidth), (B, D, n)
        s = (fc * df).sum(2, dtype=torch.float64)
        if bandwidth is not None:
            df = df / bandwidth.to(df.dtype).reshape(-1, D, 1)
        feats = df.reshape((B, D) + spatial).to(lat._diff_features.dtype)
    else:  # sum_k f_k dL/df_k, where the two bilinear terms are equal. Its two parts are ~|f|^2 times the
        # result (f spans the image in units of the kernel's width) and cancel: sum the points in float64
        s = (fc * (2.0 * second - fc * common[:, None])).sum(2, dtype=torch.float64)
    if need[6]:
        gb = -s / bandwidth.to(torch.float64)
        if bandwidth.shape[0] != B:
            gb = gb.sum(0, keepdim=True)
        bw = gb.to(lat._diff_bandwidth.dtype)
    return feats, bw


def _centred(lat, dtype) -> torch.Tensor:
    """The features as the lattice sees them (divided by the bandwidth) minus each image's mean over its
    valid points, ``(B, D, N)`` in ``dtype`` (0 at left-out points), cached on the lattice. The kernel sees
    only differences, so the gradient is unchanged; small magnitudes keep its products clear of float32
    cancellation."""
    key = ("centred", dtype)
    if key not in lat._grad_cache:
        feats, bw, valid = lat._geometry
        f = divided(feats, bw).reshape(lat.batch_size, lat.dim, lat.num_points)
        if valid is None:
            f = f - f.mean(2, keepdim=True)
        else:
            w = valid[:, None].to(f.dtype)
            f = (f - (f * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)) * w
        lat._grad_cache[key] = f.to(dtype).contiguous()
    return lat._grad_cache[key]


def divided(features: torch.Tensor, bandwidth) -> torch.Tensor:
    """``features / bandwidth`` in float64 (the lattice's coordinates), ``(B, D, *spatial)``; ``bandwidth``
    ``(1 or B, D)`` or None."""
    f = features.to(torch.float64)
    if bandwidth is None:
        return f
    return f / bandwidth.to(torch.float64).reshape(bandwidth.shape + (1,) * (f.dim() - 2))
