"""Process-wide settings that make CPU training fast.

glibc's malloc returns large freed blocks (a batch's activations) to the kernel at once and
page-faults them back in on the next step; on this kind of machine that cost up to a third of
the epoch time. Raising the mmap and trim thresholds keeps those blocks in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused.
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # ~2 GiB kept before memory is given back
_configured = False


def _glibc() -> ctypes.CDLL | None:
    """The C library, for the allocator calls below; None when FASHION_CNN_NO_MALLOPT is set or
    there is none to load."""
    if os.environ.get("FASHION_CNN_NO_MALLOPT"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed activation buffers instead of unmapping them; True if applied."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
        return bool(ok_mmap and ok_trim)
    except AttributeError:  # not glibc (musl, macOS): nothing to do
        return False


def return_freed_memory() -> bool:
    """Give the heap memory that is free now back to the system (glibc's malloc_trim), after a
    garbage collection; True if applied. keep_freed_memory() makes the allocator hold on to
    freed blocks, which is what a training loop wants; between two runs in one process (a
    study) it would carry one run's buffers over as the next run's resident memory."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)  # 1 if it released memory, 0 if there was none
    except AttributeError:  # not glibc
        return False
    return True


def configure_runtime(threads: int = 0) -> None:
    """Apply the allocator setting once, and the thread count when one is given."""
    global _configured
    if not _configured:
        keep_freed_memory()
        # Values below ~1e-38 (denormals) take a slow path in CPU arithmetic; they appear in
        # optimizer buffers as the learning rate anneals. Flushing them to zero, as
        # TensorFlow does on CPUs, changes nothing measurable in training.
        torch.set_flush_denormal(True)
        _configured = True
    if threads:
        torch.set_num_threads(threads)


def machine_memory_bytes() -> int | None:
    """Bytes of memory this process may use: the machine's physical memory, or its
    container's (cgroup v2 or v1) limit where that is lower; None where neither can be read.

    >>> machine_memory_bytes()                                          # doctest: +SKIP
    25193656320
    """
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max",  # cgroup v2
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v1
        try:
            with open(limit_file) as handle:
                text = handle.read(64).strip()
        except OSError:
            continue
        if text.isdigit():  # "max" where there is no limit
            sizes.append(int(text))
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def cpu_autocast_is_bf16() -> bool:
    """True inside torch.autocast("cpu", dtype=torch.bfloat16) (our --precision bf16)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

