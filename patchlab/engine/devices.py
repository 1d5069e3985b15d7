"""Compute devices: ``auto`` picks CUDA when there is one."""

from __future__ import annotations

import torch

from patchlab.errors import DeviceError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. Asking for CUDA without it is an error."""
    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {d!r} requested but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(d)
    except RuntimeError:
        raise DeviceError(f"unknown device {d!r}; use auto, cpu or cuda") from None
