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

    jemalloc returns freed pages to the system over its decay time (10 s by default) yet, for tensors of several MB
    freed and allocated again within milliseconds, still hands out fresh pages: each one faults on first touch and
    is zeroed by the kernel (a 113 MB gradient buffer: ~75 ms instead of ~9 ms). With decay off (-1) freed pages
    are reused as they are; purge() returns them.
    """

    ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL

    def __init__(self, mallctl):
        self._mallctl = mallctl
        self.default_decay = {kind: self._read_ssize(f"opt.{kind}_decay_ms") for kind in ("dirty", "muzzy")}

    @classmethod
    def loaded(cls) -> Jemalloc | None:
        """None unless jemalloc is this process's allocator (its unprefixed mallctl answers `version`)."""
        import ctypes

        try:
            mallctl = ctypes.CDLL(None).mallctl
        except (AttributeError, OSError):
            return None
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        version, size = ctypes.c_char_p(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_char_p))
        if mallctl(b"version", ctypes.byref(version), ctypes.byref(size), None, 0) != 0:
            return None
        return cls(mallctl)

    def _read(self, name: str, value):
        import ctypes

        size = ctypes.c_size_t(ctypes.sizeof(value))
        if self._mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            raise OSError(f"jemalloc mallctl {name}: not readable")
        return value.value

    def _read_ssize(self, name: str) -> int:
        import ctypes

        return self._read(name, ctypes.c_ssize_t())

    def set_decay(self, milliseconds: dict[str, int] | int) -> None:
        """Every arena's dirty and muzzy decay time (-1: never return freed pages on its own)."""
        import ctypes

        for arena in range(self._read("arenas.narenas", ctypes.c_uint())):
            for kind in ("dirty", "muzzy"):
                ms = milliseconds[kind] if isinstance(milliseconds, dict) else milliseconds
                value = ctypes.c_ssize_t(ms)  # an arena not yet in use refuses: nothing to set there
                self._mallctl(f"arena.{arena}.{kind}_decay_ms".encode(), None, None, ctypes.byref(value),
                              ctypes.sizeof(value))

    def decay(self, kind: str = "dirty", arena: int = 0) -> int:
        return self._read_ssize(f"arena.{arena}.{kind}_decay_ms")

    def purge(self) -> None:
        """Return every arena's freed pages to the system now."""
        self._mallctl(f"arena.{self.ALL_ARENAS}.purge".encode(), None, None, None, 0)


def allocator_in_use() -> str:
    """What run.json records: the library llmft preloaded, a user's own LD_PRELOAD, or glibc's malloc."""
    import os

    preload = os.environ.get("LD_PRELOAD", "")
    chosen = os.environ.get("LLMFT_ALLOCATOR", "")
    if preload and chosen and chosen in preload:
        return chosen
    return f"LD_PRELOAD={preload}" if preload else "system malloc"
