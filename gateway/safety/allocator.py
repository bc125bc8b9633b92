"""Keep the process heap from growing with every new batch shape.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own
mapping and unmaps it on free, but each time such a chunk is freed it raises the
threshold to the chunk's size (up to 32 MiB). After the first long text, the encoder's
activations (megabytes, a new size for nearly every batch) come from the heap instead,
whose free space fragments across sizes and is seldom given back: ``safegate serve``
grew by about 0.8 MiB per realistic text (docs/BENCHMARKS.md). Setting the threshold
explicitly turns that adjustment off (``mallopt(3)``), so large buffers are mapped and
unmapped every time; a mapping costs microseconds against a forward pass's milliseconds.

A ``MALLOC_MMAP_THRESHOLD_`` in the environment is the operator's choice and is kept.
Nothing changes on a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 64 * 1024
ENVIRONMENT_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; return whether it was set."""
    if ENVIRONMENT_OVERRIDE in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
