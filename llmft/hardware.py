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


# glibc's malloc raises its mmap threshold as large blocks are freed, so after a few steps the differently sized
# activation and logit tensors of a CPU run come from a heap it never gives back: resident memory grows step after
# step. A fixed 8 MB threshold maps every large tensor on its own and unmaps it when freed: peak memory -22% for
# the same speed (benchmarks/README.md#cpu-memory-allocator). A user's own MALLOC_MMAP_THRESHOLD_ or a preloaded
# allocator (jemalloc, tcmalloc) is left alone.
MMAP_THRESHOLD = 8 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold for this process; True when it was set."""
    import ctypes
    import os
    import platform

    if platform.system() != "Linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
