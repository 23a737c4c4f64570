"""Memory of this process: now, at its peak, and the peak of one phase (loading, generating).

On a GPU the phase peak is the CUDA caching allocator's (``torch.cuda.reset_peak_memory_stats`` /
``max_memory_allocated``). On Linux the kernel's resident high-water mark (``VmHWM``) is reset by
writing ``5`` to ``/proc/self/clear_refs``, so each phase gets its own peak; where that file cannot be
written the meter falls back to ``ru_maxrss``, which never goes down: a phase that stays below an
earlier peak then reads that earlier peak, and the meter says so in ``method``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

import psutil

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
# clear_refs value that resets the peak resident set size (Linux >= 4.0, Documentation/filesystems/proc).
RESET_PEAK_RSS = "5"


def rss_now() -> int:
    """Resident memory of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """The highest resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _vm_hwm() -> int | None:
    try:
        lines = PROC_STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def release_memory(device: str) -> None:
    """Give freed memory back (Python garbage, CUDA's cache, glibc's free heap pages) before a phase,
    so that its baseline is what is really held."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


class PeakMeter:
    """Peak memory between ``reset()`` and ``peak()``: the CUDA allocator on ``cuda``, RSS otherwise."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            self.method = "torch.cuda.max_memory_allocated (CUDA context excluded)"
        elif self._reset_hwm() and _vm_hwm() is not None:
            self.method = "peak RSS (VmHWM, reset per phase through /proc/self/clear_refs)"
        else:
            self.method = "peak RSS (ru_maxrss, not resettable: a phase below an earlier peak reads that peak)"
        self._resettable = device == "cuda" or self.method.startswith("peak RSS (VmHWM")

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            CLEAR_REFS.write_text(RESET_PEAK_RSS)
        except OSError:
            return False
        return True

    def current(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.memory_allocated())
        return rss_now()

    def reset(self) -> int:
        """Start a phase; returns the current reading (the phase's baseline)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self._resettable:
            self._reset_hwm()
        return self.current()

    def peak(self) -> int:
        """The highest reading since the last ``reset``."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        hwm = _vm_hwm() if self._resettable else None
        return max(hwm if hwm is not None else peak_rss(), rss_now())
