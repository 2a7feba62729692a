"""Resolve the device once (the caller passes it down) and choose autocast settings for it."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; asking for an absent device is a ``UserError``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available; use train.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``, or None for fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UserError("train.precision=fp16 is not supported on CPU; use bf16 or fp32")
        return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, configured: int = 0, cores: int | None = None) -> int:
    """Torch threads for one of ``workers`` processes sharing this machine: ``configured`` if set
    (``train.num_threads``), else an equal share of the ``cores`` (default ``available_cores()``), at least 1.

    Two processes each asking for every core oversubscribe them: the threads of one
    wait at every parallel region for threads the other has descheduled.
    """
    if configured:
        return configured
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for benchmark headers: figures differ over 2x between machines."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
