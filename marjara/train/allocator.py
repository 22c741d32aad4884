"""Which malloc serves this process. On CPU it matters: glibc hands large freed blocks back to the
kernel, so every step re-faults the pages of the multi-MB gradient and flat ZeRO buffers it
allocates afresh; tcmalloc keeps them (as PyTorch's caching allocator does on a GPU)."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc() -> str | None:
    """The file name of an installed tcmalloc, for LD_PRELOAD; None when there is none."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active_allocator() -> str:
    """'tcmalloc', 'jemalloc' or 'glibc': what is mapped into this process."""
    maps = Path("/proc/self/maps")
    mapped = maps.read_text() if maps.exists() else ""
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in mapped:
            return name
    return "glibc"
