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

    def copy_rows(self, rows, src: "KVCache", src_rows=None) -> None:
        """Copy the filled prefix ``[0, src.length)`` of ``src``'s rows ``src_rows`` (all, by default) into this
        cache's rows ``rows``: how a caller that decodes rows at their own steps (``Generator.forward_rows``)
        admits new images, prefilled in a cache of their own. This cache's length pointer does not move."""
        src_rows = range(src.batch) if src_rows is None else src_rows
        dst = torch.as_tensor(rows, dtype=torch.long).flatten()
        srt = torch.as_tensor(src_rows, dtype=torch.long).flatten()
        if dst.numel() != srt.numel():
            raise InvalidArgumentError(f"copy_rows got {dst.numel()} destination rows for {srt.numel()} source rows; "
                                       "pass one destination row per source row")
        for name, idx, b in (("destination", dst, self.batch), ("source", srt, src.batch)):
            if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < b):
                raise InvalidArgumentError(f"copy_rows: a {name} row is outside 0..{b - 1} ({idx.tolist()})")
        mine, theirs = self.k[0].shape, src.k[0].shape
        if (src.num_layers, theirs[1], theirs[3], src.dtype, src.device) != (
                self.num_layers, mine[1], mine[3], self.dtype, self.device):
            raise InvalidArgumentError(f"copy_rows needs caches of one model, dtype and device: {src!r} into {self!r}")
        n = src.length
        if n > self.max_len:
            raise InvalidArgumentError(f"copy_rows: the source holds {n} positions, more than this cache's max_len {self.max_len}")
        dst, srt = dst.to(self.device), srt.to(self.device)
        for mine_l, theirs_l in zip(self.k + self.v, src.k + src.v):
            mine_l[:, :, :n].index_copy_(0, dst, theirs_l[:, :, :n].index_select(0, srt))
        self.peak_length = max(self.peak_length, n)

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
    written yet. ``index`` is (n,) (the same positions in every row) or (B, n) (each row its own
    consecutive positions, ``Generator.forward_rows``); per-row writes at or past ``max_len`` are
    dropped. Nothing here moves the length pointer: the KVCache's owner advances it.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (batch, heads, n, head_dim) at ``index``; return all ``max_len`` positions."""
        kc, vc = self.k[layer], self.v[layer]
        if self.index.dim() == 1:
            kc.index_copy_(2, self.index, k)
            vc.index_copy_(2, self.index, v)
        else:
            _scatter_rows(kc, self.index, k)
            _scatter_rows(vc, self.index, v)
        return kc, vc

    def advance(self, n: int) -> None:
        """Nothing: the owner of the buffers tracks how far each row is filled."""


def _scatter_rows(buf: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """``buf[b, :, index[b, j]] = new[b, :, j]`` for the j whose position is below ``max_len``; the rest dropped.

    Static shapes (no data-dependent slicing): every write past the end is redirected to the last slot
    ``max_len - 1`` carrying the value that slot ends with (the row's own write there, else its old value), so
    duplicate writes agree and the result is deterministic. ``index[b]`` is consecutive, so at most one
    ``j`` of a row writes the last slot.
    """
    B, H, n, D = new.shape
    last = buf.shape[2] - 1
    first = index[:, :1]  # (B, 1)
    hits = (first <= last) & (first + n > last)  # some j writes the last slot
    j_last = (last - first).clamp(0, n - 1)
    keep = torch.where(hits[:, :, None, None], new.gather(2, j_last[:, None, :, None].expand(B, H, 1, D)),
                       buf[:, :, last:])  # (B, H, 1, D): the last slot's final value
    vals = torch.where((index <= last)[:, None, :, None], new, keep)
    # index_put_ on the (B, max_len, H, D) view: inductor writes it in place (a scatter_ along dim 2 cost a third
    # more per raster decode step at batch 16)
    rows = torch.arange(B, device=buf.device)[:, None].expand(B, n)
    buf.transpose(1, 2).index_put_((rows, index.clamp(max=last)), vals.transpose(1, 2))
