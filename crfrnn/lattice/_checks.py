"""Argument checks of the lattice's public entry points: errors name the argument, its shape, dtype and device."""
from __future__ import annotations

import torch


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: one reduction pass and no boolean temporary (NaN propagates through min/max)."""
    if t.numel() == 0:
        return True
    if t.device.type == "meta":  # a meta tensor has a shape but no values: nothing can be computed from it
        raise ValueError(f"a tensor on the 'meta' device holds no values to filter ({_describe(t)}); use a real device")
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_features(features) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (B, D, *spatial), got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor (float32 or float64), got {_describe(features)}")
    if features.dim() < 3:
        raise ValueError(
            f"features must have shape (B, D, *spatial) with at least one spatial axis, got {_describe(features)}"
        )
    if features.shape[1] == 0:
        raise ValueError(f"features must have D >= 1 feature channels, got D=0 ({_describe(features)})")
    if features.numel() == 0:
        raise ValueError(f"features is empty: {_describe(features)}")
    if not _all_finite(features):
        raise ValueError(f"features contains NaN or infinite values ({_describe(features)})")


def _check_mask(mask, features, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 1, *spatial), got {type(mask).__name__}")
    want = (features.shape[0], 1) + tuple(features.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(f"{name} must have shape (B, 1, *spatial) = {want}, got {tuple(mask.shape)}")
    if mask.device != features.device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {features.device}")


def _check_bandwidth(bandwidth, features) -> torch.Tensor:
    """``bandwidth`` as a ``(1, D)`` or ``(B, D)`` tensor on the features' device (a view of a tensor
    argument, so that gradients reach it); positive and finite."""
    B, D = features.shape[:2]
    if isinstance(bandwidth, torch.Tensor):
        if not bandwidth.is_floating_point():
            raise TypeError(f"bandwidth must be a floating-point tensor, got {_describe(bandwidth)}")
        if bandwidth.device != features.device:
            raise ValueError(f"bandwidth is on {bandwidth.device} but the features are on {features.device}")
        t = bandwidth
    else:
        vals = list(bandwidth) if isinstance(bandwidth, (list, tuple)) else [bandwidth]
        if not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise TypeError(f"bandwidth must be a number, a sequence of D={D} numbers or a tensor, got {bandwidth!r}")
        t = torch.tensor(vals, dtype=torch.float64, device=features.device)
        if len(vals) == 1 and not isinstance(bandwidth, (list, tuple)):
            t = t.reshape(())
    if t.dim() == 0:
        t = t.expand(1, D)
    elif tuple(t.shape) == (D,):
        t = t.reshape(1, D)
    elif tuple(t.shape) != (B, D):
        raise ValueError(f"bandwidth must have shape (), (D,) = ({D},) or (B, D) = ({B}, {D}), got {tuple(t.shape)}")
    if not _all_finite(t) or not bool((t.detach() > 0).all()):
        raise ValueError(f"bandwidth must be positive and finite, got {t.detach().reshape(-1).tolist()}")
    return t


def _check_pair(values, features) -> None:
    _check_features(features)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor of shape (B, C, *spatial), got {type(values).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {_describe(values)}")
    if values.dim() != features.dim() or values.shape[0] != features.shape[0] or values.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"values (B, C, *spatial) and features (B, D, *spatial) must agree in B and spatial shape: "
            f"values {tuple(values.shape)} vs features {tuple(features.shape)}"
        )
    if values.shape[1] == 0:
        raise ValueError(f"values must have C >= 1 channels, got {tuple(values.shape)}")
    if values.device != features.device:
        raise ValueError(f"values is on {values.device} but features is on {features.device}")
