"""Which implementation a k15sys op runs: its Triton kernels or the plain-torch reference of the same algorithm."""
from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]


def pick_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` in {"auto", "triton", "torch"} and tensors on ``device``.

    ``"auto"`` takes Triton on CUDA and torch elsewhere; ``"triton"`` off CUDA needs ``TRITON_INTERPRET=1`` (the CPU
    interpreter the kernel tests use). Anything else is a ValueError naming ``backend``."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter")
    return backend
