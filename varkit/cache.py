"""The one KV cache: preallocated, static shapes, a length pointer, rollback.

Every generator uses this class; none keeps a cache of its own. Storage is one tensor per
layer for keys and one for values, shaped ``(batch, heads, max_len, head_dim)`` on the
model's device and dtype. ``batch`` already counts the CFG-doubled rows. Attention reads
only the filled prefix ``[:length + n]``, so decode cost grows with what is filled, not with
``max_len``. Speculative samplers roll back with :meth:`truncate`.
"""
from __future__ import annotations

import torch

from .errors import InvalidArgumentError


class KVCache:
    """Per-layer key/value storage with a shared length pointer.

    A forward pass writes its ``n`` new positions at ``[length, length + n)`` in every layer
    (:meth:`update`) and then calls :meth:`advance` once. Positions past ``length`` hold stale
    values that are never read.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if min(num_layers, batch, heads, max_len, head_dim) < 1:
            raise InvalidArgumentError(
                f"KVCache sizes must be positive, got layers={num_layers} batch={batch} "
                f"heads={heads} max_len={max_len} head_dim={head_dim}"
            )
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len
        self.batch = batch
        self.peak_length = 0

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the preallocated total)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used_bytes(self) -> int:
        """Bytes of the filled prefix at its peak (what a dynamic cache would have held)."""
        per_pos = self.nbytes // self.max_len
        return per_pos * self.peak_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` of shape (batch, heads, n, head_dim) after the filled prefix.

        Returns views of every filled position including the new ones, for attention.
        """
        n = k.shape[-2]
        end = self.length + n
        if end > self.max_len:
            raise InvalidArgumentError(
                f"KVCache overflow: {self.length} filled + {n} new > max_len {self.max_len}; "
                "build the cache with a larger max_len"
            )
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, self.length:end].copy_(k)
        vc[:, :, self.length:end].copy_(v)
        return kc[:, :, :end], vc[:, :, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` positions written by the last forward pass."""
        self.length += n
        self.peak_length = max(self.peak_length, self.length)

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` positions (speculative rejection)."""
        if not 0 <= n <= self.length:
            raise InvalidArgumentError(f"cannot truncate a KVCache of length {self.length} to {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0

    def __repr__(self) -> str:
        k = self.k[0]
        return (
            f"KVCache(layers={self.num_layers}, batch={k.shape[0]}, heads={k.shape[1]}, "
            f"len={self.length}/{self.max_len}, head_dim={k.shape[3]}, {k.dtype}, {k.device})"
        )


class IndexedKV:
    """A KVCache's buffers written at positions given as a tensor: static shapes for compiled decoding.

    ``update`` has :meth:`KVCache.update`'s signature, so attention takes either. It writes the
    new keys and values at ``index`` (a tensor, not a Python int, so one compiled graph serves
    every step) and returns the whole ``max_len`` buffers: attention must mask the positions not
    written yet. Nothing here moves the length pointer: the KVCache's owner advances it.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (batch, heads, len(index), head_dim) at ``index``; return all ``max_len`` positions."""
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(2, self.index, k)
        vc.index_copy_(2, self.index, v)
        return kc, vc
