"""glibc's allocator tuned for inference: freed buffers stay in the heap instead of going back to the
kernel, so a batch's activations do not fault in fresh zero-filled pages layer after layer (page
faults cost far more inside SGX). The peak resident size is unchanged. Figures: BENCHMARKS.md."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). False where there is no glibc."""
    global _done
    if _done:
        return True
    try:
        # By soname: ctypes.util.find_library() would start /sbin/ldconfig, a process (the enclave starts none).
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
