"""The kernels' copies of many weights laid end to end in one buffer of transparent huge pages.

Why: a batch-1 decode step streams every weight once from DRAM, and one core streams fastest from one long run of
memory. The streaming and panel kernels' copies (:func:`~varkit.nn.stream_gemv.block_weight`,
:func:`~varkit.nn.stream_gemv.panel_weight`) are made one per linear, each in its own allocation of (mostly) 4 KiB
pages, so the core's prefetchers start over at every page and every weight. One Zen 4 core, LlamaGen-B's linears
(12 layers), 2 rows, the blocked copies read by ``gemv_blocked``: bf16 22.5 GB/s as separate copies, 30.4 GB/s end to
end in 2 MiB pages (fp32 24.4 -> 28.8); ``torch.sum`` over 256 MiB reads 27.9 there.

How: :func:`~varkit.nn.layers.derived_copy` reports each new copy of a kind (``"_blocked"``, ``"_panels"``) as
pending; the first time a pending copy is asked for again (the next decode step), every pending copy of that kind is
moved into one new buffer, in the order they were made (the order the step reads them), and its module's cache
points at its slice. Copies are moved, never recomputed: the numbers stay the same. ``VARKIT_WEIGHT_ARENA=0`` keeps
the separate copies (read on every call, for benches).
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import Any, Callable

import torch

#: the transparent huge page size of x86-64 Linux: buffers of at least this size are aligned to it and advised
HUGE_PAGE_BYTES = 2 << 20
#: each copy starts on a cache line
COPY_ALIGN = 64

_lock = threading.Lock()
# kind -> {id(module): weakref to it} for the modules whose new copy of that kind is not in a buffer yet, in the
# order the copies were made
_pending: dict[str, dict[int, weakref.ref]] = {}
_generation = 0


def enabled() -> bool:
    """Whether new copies are gathered into buffers (``VARKIT_WEIGHT_ARENA=0``: no)."""
    return os.environ.get("VARKIT_WEIGHT_ARENA", "1") != "0"


def generation() -> int:
    """How many buffers have been filled in this process: callers that cache the copies themselves (the fused
    layers' plans) key on it, so that they pick up the moved copies."""
    return _generation


def huge_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialised bytes (uint8), from an anonymous mapping advised for transparent huge pages and
    aligned to :data:`HUGE_PAGE_BYTES` when at least that large and the platform has ``MADV_HUGEPAGE``; else from
    torch's allocator. The mapping lives as long as the tensor (or a view of it)."""
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    try:  # private: a shared anonymous mapping is shmem, which gets no transparent huge pages
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space for it: torch's allocator (which raises its own error if it cannot either)
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: plain pages, still one run
        pass
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    return whole[start:start + nbytes]


def note_new(module: torch.nn.Module, kind: str) -> None:
    """Record that ``module`` just made a new copy of ``kind`` (held as ``module.__dict__[kind] = (key, tensor)``)."""
    if not enabled():
        return
    with _lock:
        _pending.setdefault(kind, {})[id(module)] = weakref.ref(module)


def is_pending(module: torch.nn.Module, kind: str) -> bool:
    """Whether ``module``'s copy of ``kind`` was made since the last buffer of that kind was filled."""
    return id(module) in _pending.get(kind, ())


def gather(kind: str, current_key: Callable[[torch.nn.Module], Any]) -> int:
    """Move every pending copy of ``kind`` whose module still holds it under ``current_key(module)`` (its weight
    unchanged) into one new buffer, in the order they were made; returns how many were moved (none where fewer
    than two are left: one copy is already one run)."""
    global _generation
    with _lock:
        refs = _pending.pop(kind, {})
        entries = []
        for ref in refs.values():
            module = ref()
            cached = None if module is None else module.__dict__.get(kind)
            if cached is None or cached[0] != current_key(module) or not cached[1].is_contiguous():
                continue
            entries.append((module, cached))
        if len(entries) < 2:
            return 0
        offsets, total = [], 0
        for _, (_, t) in entries:
            total = -(-total // COPY_ALIGN) * COPY_ALIGN
            offsets.append(total)
            total += t.numel() * t.element_size()
        try:
            buf = huge_buffer(total)
        except (RuntimeError, MemoryError):  # no memory for a second copy now: the copies stay where they are
            return 0
        for (module, (key, t)), at in zip(entries, offsets):
            moved = buf[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            moved.copy_(t)
            module.__dict__[kind] = (key, moved)
        _generation += 1
        return len(entries)
