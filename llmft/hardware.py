"""What this machine can do fast; read once, used for defaults."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX): ~4x fp32 there, and far slower elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, so stay with fp32
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def fast_bf16_available() -> bool:
    if cuda_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()
