"""Process-level settings that make CPU inference (and training) much faster on small images.

- The allocator: glibc hands buffers above its mmap threshold back to the kernel when they are freed,
  so every layer's output of a batch is a fresh mapping whose pages fault in, zero-filled, one by
  one. Measured here (MobileNetV1, batch 128, 28x28): stage 0 took 45 ms, 17 ms with the settings
  below. Inside SGX a page fault is far more expensive still. We keep freed memory in the heap
  instead; the peak resident size is unchanged, it is just not given back between layers.
- Tensor layout: convolutions on channels-last activations run 1.5-2x faster with oneDNN here;
  ``channels_last`` converts a module's 4-D weights so that its outputs come out channels-last.
``tune_allocator`` is standard library only (the enclave calls it); ``channels_last`` is for PyTorch,
owner side (training and export).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    M = TypeVar("M", bound=torch.nn.Module)

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


def channels_last(module: M) -> M:
    """Convert 4-D parameters and buffers to channels-last in place (a no-op for other modules)."""
    import torch

    # torch's stubs list no memory_format for Module.to, which takes it (documented, and it works)
    converted: M = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return converted
