"""A caching CPU allocator for large tensors: freed blocks are kept and handed out again, as CUDA's allocator does.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``, and each 4 KiB
page of it is faulted in and zeroed by the kernel on first touch, then returned to the system on ``free``. A VQ
decoder at 256 px allocates a few dozen 42 MB feature maps per image, so every image pays those faults again:
one core of an Intel Xeon spent 0.62 of the 3.3 s of VAR's decoder in the kernel (330k page faults), and 0.35-0.42
s of VAR-d16's whole batch-1 call. Keeping freed blocks of at least :data:`MIN_CACHED_BYTES` (by size class) for
the next request of that class removes them: the decoder took 2.8-2.9 s, the whole VAR-d16 call ~0.7 s less.
New blocks of 2 MiB and more are 2 MiB-aligned and advised for transparent huge pages (``MADV_HUGEPAGE``: 512x
fewer faults on first touch where the kernel's THP mode is ``madvise`` or ``always``).

The cache holds at most ``VARKIT_CPU_CACHE_MB`` MiB of free blocks (default: a quarter of the machine's memory,
at most 8 GiB); a block freed beyond that goes back to the system, and a failed allocation empties the cache and
tries once more. Blocks below :data:`MIN_CACHED_BYTES` go to torch's own allocator. ``VARKIT_CPU_CACHE_MB=0``
leaves torch's allocator alone. :func:`install` is what :func:`varkit.load_pipeline` calls for a CPU pipeline;
:func:`empty_cache` returns the free blocks, :func:`stats` counts them. The C++ is ``ALLOCATOR_SOURCE`` of
:mod:`varkit.nn.cpu_kernels`, built into the same extension (one build per machine); where that extension cannot be
built, torch's allocator stays.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidArgumentError

#: blocks of at least this many bytes are cached (below it glibc's heap already reuses memory without faults)
MIN_CACHED_BYTES = 1 << 20
#: the default cap on cached free bytes: a quarter of the machine's memory, at most this
DEFAULT_CAP_BYTES = 8 << 30

STAT_KEYS = ("cached_bytes", "cached_blocks", "blocks", "hits", "misses", "released", "cap_bytes")


def _extension() -> Any | None:
    """The extension holding the allocator (:mod:`varkit.nn.cpu_kernels`; None where it cannot be built here)."""
    from .cpu_kernels import cpu_kernels

    return cpu_kernels()


def cap_bytes(env: dict[str, str] | None = None) -> int:
    """The cap on cached free bytes: ``VARKIT_CPU_CACHE_MB`` MiB, else a quarter of the memory (at most
    :data:`DEFAULT_CAP_BYTES`); 0 means no caching."""
    env = os.environ if env is None else env
    raw = env.get("VARKIT_CPU_CACHE_MB")
    if raw is not None and raw.strip() != "":
        try:
            mb = int(raw)
        except ValueError:
            raise InvalidArgumentError(f"VARKIT_CPU_CACHE_MB must be a whole number of MiB (0: off), got {raw!r}") from None
        if mb < 0:
            raise InvalidArgumentError(f"VARKIT_CPU_CACHE_MB must be >= 0 (0: off), got {mb}")
        return mb << 20
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        total = 4 * DEFAULT_CAP_BYTES
    return min(DEFAULT_CAP_BYTES, total // 4)


def install(cap: int | None = None) -> bool:
    """Make torch's CPU tensors of :data:`MIN_CACHED_BYTES` and more come from the cache (once per process; later
    calls only set the cap). ``cap``: bytes of free blocks kept (default :func:`cap_bytes`; 0: do not install).
    Returns whether the cache serves allocations now."""
    cap = cap_bytes() if cap is None else cap
    if cap <= 0:
        return installed()
    ext = _extension()
    if ext is None:
        return False
    ext.allocator_install(int(cap))
    return bool(ext.allocator_installed())


def installed() -> bool:
    """Whether the cache serves this process's CPU allocations."""
    ext = _extension()
    return bool(ext is not None and ext.allocator_installed())


def empty_cache() -> None:
    """Return every cached free block to the system (blocks in use are untouched)."""
    ext = _extension()
    if ext is not None:
        ext.allocator_empty_cache()


def stats() -> dict[str, int]:
    """Counts of the cache: ``cached_bytes`` / ``cached_blocks`` free, ``blocks`` owned (free or in use), ``hits`` and
    ``misses`` of the cached sizes, ``released`` (freed past the cap), ``cap_bytes``; zeros where not installed."""
    if not installed():
        return {k: 0 for k in STAT_KEYS}
    return dict(zip(STAT_KEYS, (int(v) for v in _extension().allocator_stats())))
