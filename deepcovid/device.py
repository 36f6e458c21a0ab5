"""Where models run: the device ('auto' = CUDA, then MPS, then CPU) and how many CPU threads
this process may use. Shared by training and inference."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def available_threads() -> int:
    """CPU cores this process may use (affinity-aware)."""
    n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        pass
    return max(1, n)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' = cuda > mps > cpu; an explicit device that is not available is a ConfigError."""
    d = str(device).strip().lower() if not isinstance(device, torch.device) else str(device)
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r} requested but MPS is not available here; use --device cpu or auto")
    return dev
