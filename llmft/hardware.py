"""What this machine can do fast; read once, used for defaults. (torch is imported on use: `llmft` starts from here.)"""

from __future__ import annotations

import functools
from pathlib import Path


def cuda_available() -> bool:
    import torch

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
    import torch

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


# tcmalloc (or jemalloc) instead of glibc's malloc: a CPU training step frees and allocates thousands of activation
# tensors of changing sizes; with tcmalloc LoRA on the embedded model ran 1.27x faster at 0.89x the peak memory of
# glibc with the threshold above (benchmarks/README.md#cpu-memory-allocator). A library can only replace malloc when
# preloaded, so `llmft train|eval|compare` start themselves again with LD_PRELOAD once, before anything is imported.
ALLOCATORS = ("tcmalloc_minimal", "tcmalloc", "jemalloc")  # the OS packages libtcmalloc-minimal4, libjemalloc2
PRELOADED_COMMANDS = ("train", "eval", "compare")


def allocator_library() -> str | None:
    """The file name of the first of ALLOCATORS installed (found as the dynamic linker finds libraries)."""
    import ctypes.util

    for name in ALLOCATORS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_allocator(argv: list[str]) -> None:
    """Re-run this command with tcmalloc/jemalloc preloaded, for CPU training and evaluation on Linux; returns only
    when there is nothing to do: another command, a GPU machine (/dev/nvidiactl), LD_PRELOAD or
    LLMFT_ALLOCATOR=system already set, or no such library installed."""
    import os
    import platform
    import sys

    if (not argv or argv[0] not in PRELOADED_COMMANDS or platform.system() != "Linux" or os.environ.get("LD_PRELOAD")
            or os.environ.get("LLMFT_ALLOCATOR") == "system" or Path("/dev/nvidiactl").exists()):
        return
    library = allocator_library()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": library, "LLMFT_ALLOCATOR": library}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "llmft", *argv], env)
