"""Input validation shared by the algorithm modules: errors name the argument and the value."""
from __future__ import annotations

import torch


def as_1d(name: str, x: torch.Tensor | object, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a 1-D tensor, or raise ValueError naming ``name``."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty input")
    return t if dtype is None else t.to(dtype)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/inf value(s)")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors share shape and device."""
    first, t0 = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != t0.shape:
            raise ValueError(f"{n}: shape {tuple(t.shape)} does not match {first} shape {tuple(t0.shape)}")
        if t.device != t0.device:
            raise ValueError(f"{n}: device {t.device} does not match {first} device {t0.device}")


def check_group_size(group_size: int, n: int, what: str = "rows") -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(f"group_size: {n} {what} are not divisible by group_size={group_size}")
