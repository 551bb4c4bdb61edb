"""Rotary position embeddings over 1-D sequences and 2-D token grids.

Pairs are interleaved (elements 2i, 2i+1), as in LlamaGen. For a 2-D grid the first half of
the pairs rotates by the row and the second half by the column. Condition-prefix rows are
all zeros (cos = sin = 0), which zeroes q and k of those tokens exactly as LlamaGen does.
"""
from __future__ import annotations

import torch
from torch import nn


def _freqs(n: int, dim: int, base: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` frequencies ``base^(-2j/dim)`` for j < n."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device)[:n].float() / dim))


def rope_angles_1d(length: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(length, head_dim/2) rotation angles for positions 0..length-1."""
    f = _freqs(head_dim // 2, head_dim, base)
    return torch.outer(torch.arange(length).float(), f)


def rope_angles_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(n, head_dim/2) angles for grid cells (rows[i], cols[i]): [row·f, col·f]."""
    half = head_dim // 2
    f = _freqs(half // 2, half, base, rows.device)
    return torch.cat([torch.outer(rows.float(), f), torch.outer(cols.float(), f)], dim=-1)


class RotaryTable(nn.Module):
    """cos/sin tables for every cache position of a generator, indexed by position.

    ``angles`` is (num_positions, head_dim/2); rows listed in ``zero_rows`` get cos = sin = 0.
    """

    def __init__(self, angles: torch.Tensor, zero_rows: int = 0):
        super().__init__()
        cos, sin = angles.cos(), angles.sin()
        cos[:zero_rows] = 0
        sin[:zero_rows] = 0
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # the tables stay fp32 whatever the model's dtype (as LlamaGen's freqs_cis); only the device follows
        cos, sin = self.cos, self.sin
        super()._apply(fn, recurse)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self

    def forward(self, positions: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, n, H, D) by per-position (n, D/2) tables (or (B, n, D/2): each row its own
    positions, ``Generator.forward_rows``), in fp32, interleaved pairs.

    Eager: one complex multiply per pair, ``(x0 + i·x1)(c + i·s)``, the same products and sums as
    the real form ``(x0·c − x1·s, x1·c + x0·s)`` (LlamaGen's) in one kernel instead of eight (5-12x
    faster at decode shapes, where this runs once per layer for q and for k). Under torch.compile
    the real form, which inductor fuses by itself (complex views would break its graph).
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    if torch.compiler.is_compiling():
        x0, x1 = xf[..., 0], xf[..., 1]
        c, s = _per_row(cos), _per_row(sin)
        return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2).type_as(x)
    if xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs pairs aligned to complex elements
    rot = _per_row(torch.complex(cos, sin))
    return torch.view_as_real(torch.view_as_complex(xf) * rot).flatten(-2).type_as(x)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """A (n, D/2) or (B, n, D/2) table as (1 or B, n, 1, D/2), to broadcast over heads."""
    return t[:, :, None, :] if t.dim() == 3 else t[None, :, None, :]
