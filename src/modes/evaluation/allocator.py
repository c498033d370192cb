"""Keep freed memory in the process, so that timings compare kernels, not page faults.

glibc's malloc hands large freed blocks back to the kernel (``mmap`` chunks, heap trimming), so
a call that allocates large temporaries faults in fresh zeroed pages every time: a fifth of
the time of transformers' default experts call on a 30B-shaped block (figures in BENCHMARKS.md),
enough to skew any comparison taken under glibc's defaults. CPU inference servers avoid this
with jemalloc or tcmalloc (``LD_PRELOAD``) or glibc's ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...``; `retain_freed_memory` sets the latter two in a running process.
"""

from __future__ import annotations

import ctypes
import platform
import resource

__all__ = ["RETAINED", "SYSTEM_DEFAULT", "choose_allocator", "minor_page_faults", "retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
RETAINED, SYSTEM_DEFAULT = "freed memory retained", "system default"  # as reports name them


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and never give freed memory back,
    so that repeated calls reuse pages instead of faulting in new ones; the process then holds
    its peak memory. Returns False, changing nothing, where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0)
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    return bool(no_mmap and no_trim)  # mallopt returns 1 on success


def choose_allocator(system_malloc: bool) -> str:
    """Keep freed memory unless ``system_malloc`` (or the C library is not glibc); returns what
    is in use, as benchmark reports record it."""
    return RETAINED if not system_malloc and retain_freed_memory() else SYSTEM_DEFAULT


def minor_page_faults() -> int:
    """Minor page faults of this process so far (pages mapped in without disk reads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
