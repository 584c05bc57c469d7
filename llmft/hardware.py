"""What this machine can do fast; read once, used for defaults. (torch is imported on use: `llmft` starts from here.)"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# With ONEDNN_MAX_CPU_ISA at one of these, oneDNN (PyTorch's bf16 CPU matmuls) has no native bf16 dot products: bf16
# then runs on PyTorch's ~100x slower fallback (up to AVX2_VNNI) or on oneDNN's emulation at or below fp32 speed.
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, so no flags (fp32)
        return ""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX): ~4x fp32 there, and far slower elsewhere;
    False also when ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) keeps PyTorch's matmuls from those instructions."""
    import os

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if capped.upper() in ISAS_WITHOUT_BF16:
        return False
    flags = _cpu_flags()
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


# jemalloc (or tcmalloc) instead of glibc's malloc: a CPU training step frees and allocates thousands of activation
# tensors of changing sizes; with jemalloc LoRA on the embedded model ran ~1.2x faster at less peak memory than
# glibc with the threshold above (benchmarks/README.md#cpu-memory-allocator). A library can only replace malloc when
# preloaded, so `llmft train|eval|compare` start themselves again with LD_PRELOAD once, before anything is imported.
# jemalloc first: tcmalloc trained as fast but kept the evaluation's generation memory (peak +20% on lora/demo).
ALLOCATORS = ("jemalloc", "tcmalloc_minimal", "tcmalloc")  # the OS packages libjemalloc2, libtcmalloc-minimal4
PRELOADED_COMMANDS = ("train", "eval", "compare")


def allocator_library() -> str | None:
    """The file name of the first of ALLOCATORS installed (found as the dynamic linker finds libraries)."""
    import ctypes.util

    for name in ALLOCATORS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL2: GPU runs keep their allocator


def preload_allocator(argv: list[str]) -> None:
    """Re-run this command line (sys.orig_argv: the same interpreter flags and entry point) with jemalloc/tcmalloc
    preloaded, for CPU training and evaluation on Linux; returns only when there is nothing to do: another command,
    a GPU machine, LD_PRELOAD or LLMFT_ALLOCATOR=system already set, no such library installed, or exec failing."""
    import os
    import platform
    import sys

    if (not argv or argv[0] not in PRELOADED_COMMANDS or platform.system() != "Linux" or os.environ.get("LD_PRELOAD")
            or os.environ.get("LLMFT_ALLOCATOR") == "system" or any(Path(d).exists() for d in GPU_DEVICES)):
        return
    library = allocator_library()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": library, "LLMFT_ALLOCATOR": library}
    sys.stdout.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # no exec here (a sandbox, a frozen binary): run on glibc's malloc
        return


class Jemalloc:
    """The jemalloc this process runs on (preloaded), through its mallctl interface.

    jemalloc gave a tensor of several MB fresh pages although the same size had just been freed: each page faults on
    first touch and is zeroed by the kernel (a 113 MB gradient buffer: ~57-80 ms instead of ~9 ms). Its arena for
    large blocks returns freed pages at once (decay 0). With an arena's decay at -1, freed pages are reused as they
    are; purge() returns them to the system.
    """

    ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL

    def __init__(self, mallctl):
        self._mallctl = mallctl

    @classmethod
    def loaded(cls) -> Jemalloc | None:
        """None unless jemalloc 5 (per-arena decay times) is this process's allocator."""
        try:
            mallctl = ctypes.CDLL(None).mallctl
        except (AttributeError, OSError):
            return None
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        jemalloc = cls(mallctl)
        try:
            jemalloc._read("opt.dirty_decay_ms", ctypes.c_ssize_t())  # jemalloc 4 has none: nothing to tune
        except OSError:
            return None
        return jemalloc

    def _read(self, name: str, value):
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if self._mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            raise OSError(f"jemalloc mallctl {name}: not readable")
        return value.value

    def decays(self) -> dict[str, int]:
        """The dirty and muzzy decay times (ms) of every arena created so far, by mallctl name."""
        found = {}
        for arena in range(self._read("arenas.narenas", ctypes.c_uint())):
            for kind in ("dirty", "muzzy"):
                name = f"arena.{arena}.{kind}_decay_ms"
                try:
                    found[name] = self._read(name, ctypes.c_ssize_t())
                except OSError:  # an arena index not in use yet
                    break
        return found

    def set_decays(self, decays: dict[str, int]) -> None:
        for name, milliseconds in decays.items():
            value = ctypes.c_ssize_t(milliseconds)
            if self._mallctl(name.encode(), None, None, ctypes.byref(value), ctypes.sizeof(value)) != 0:
                raise OSError(f"jemalloc mallctl {name}: not writable")

    def purge(self) -> None:
        """Return every arena's freed pages to the system now."""
        if self._mallctl(f"arena.{self.ALL_ARENAS}.purge".encode(), None, None, None, 0) != 0:
            raise OSError("jemalloc mallctl arena.<all>.purge failed")


def allocator_in_use() -> str:
    """What run.json records: the library llmft preloaded, a user's own LD_PRELOAD, or glibc's malloc."""
    import os

    preload = os.environ.get("LD_PRELOAD", "")
    chosen = os.environ.get("LLMFT_ALLOCATOR", "")
    if preload and chosen and chosen in preload:
        return chosen
    return f"LD_PRELOAD={preload}" if preload else "system malloc"
