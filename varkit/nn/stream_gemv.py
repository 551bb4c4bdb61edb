"""A weight-streaming product ``x @ W.T`` for the few rows of a CPU decode step (batch 1, CFG: 1-4 rows).

Why: such a step reads every weight once and is bound by how fast one core streams them from DRAM; torch's paths
read them at half that or less (:mod:`varkit.nn.cpu_kernels` has the numbers and the C++). Prepacked linears hand
their 1-2 row products here, over a copy of the weight in the kernel's blocked layout (:func:`block_weight`, made
once per weight, like oneDNN's packed copy). Results equal ``F.linear``'s up to the order of the fp32 sums (and, for
bf16 weights, up to the one rounding of the output to bf16).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .cpu_kernels import BLOCK_ROWS, CHUNK_BYTES, cpu_kernels

#: the most rows the kernel takes (beyond that the products are compute-bound and oneDNN's GEMMs win)
MAX_ROWS = 4
#: the most rows prepacked linears stream (one Zen 4 core, GB/s read, plain-row kernel / oneDNN-packed: fp32 21.8/13.9
#: at one row, 16.6/11.5 at two, 15.5/16.1 at three; bf16 23.1/13.6, 16.2/11.4, 11.6/13.8; the blocked layout reads
#: two rows at the one-row rate)
STREAM_MAX_ROWS = 2


def blockable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (N, K) has the blocked layout: fp32 or bf16, K a whole number of 64-byte chunks."""
    return (weight.dim() == 2 and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.shape[1] % (CHUNK_BYTES // weight.element_size()) == 0)


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K) in the kernel's blocked layout: rows padded with zeros to a multiple of ``BLOCK_ROWS``, then
    per block of rows, per 64-byte chunk of K, the chunk of each row (one sequential stream for the kernel)."""
    if not blockable(weight):
        raise ValueError(f"a weight {tuple(weight.shape)} of {weight.dtype} has no blocked layout")
    n, k = weight.shape
    e = CHUNK_BYTES // weight.element_size()
    pad = -n % BLOCK_ROWS
    w = torch.cat([weight.detach(), weight.new_zeros(pad, k)]) if pad else weight.detach()
    return w.reshape(-1, BLOCK_ROWS, k // e, e).transpose(1, 2).contiguous()


#: the most rows prepacked linears hand to the panel kernel (``gemm_panels``; beyond, oneDNN's GEMM is as fast). One
#: core of an Intel Xeon with AVX-512 (no AMX), fp32, every linear of NAR-B, panels / oneDNN-packed ms: 33.8/40.1 at 4
#: rows, 38.7/47.0 at 8, 57.2/80.8 at 32 (131 of the core's 165 GFLOP/s), 103/128 at 64, 187/210 at 128, 377/393 at
#: 256; two threads 31.4/43.6 at 32 rows. One Zen 4 core (AVX-512-BF16), VAR-d16's linear shapes, weights in cache,
#: GFLOP/s panels / oneDNN-packed: fp32 95/86 at 64 rows, 99/99 at 128, 100/104 at 256, 94/112 at 1024; bf16 (pair
#: tile) 201/190 at 64, equal (205-217) from 128 to 1024, 198/214 at 2048: nothing to gain past 128 rows
PANEL_MAX_ROWS = 128
#: the same where the kernels were built for AVX2 (8-lane vectors: 6 x 16 tiles). One Zen 3 core, fp32, VAR-d16's
#: linear shapes (K 1024-4096, N 1024-6144) at 200-1024 rows: the panel kernel 89-97 GFLOP/s, MKL's sgemm 77-93,
#: oneDNN's packed GEMM 71-79 (at 32-128 rows 71-95 against oneDNN's 50-74)
PANEL_MAX_ROWS_AVX2 = 1024


@functools.cache
def panel_max_rows() -> int:
    """The most rows a prepacked linear hands to the panel kernel on this machine: :data:`PANEL_MAX_ROWS_AVX2` where
    the kernels' tiles are AVX2's (panel width 16), else :data:`PANEL_MAX_ROWS` (past 128 rows AVX-512's tiles lose
    to oneDNN in fp32 and tie in bf16 on a Zen 4 core; on a Xeon they were measured to 256 rows)."""
    kernel = cpu_kernels()
    return PANEL_MAX_ROWS_AVX2 if kernel is not None and kernel.panel_width() == 16 else PANEL_MAX_ROWS


def panel_rows(rows: int) -> bool:
    """Whether a prepacked linear hands a product of ``rows`` rows to the panel kernel rather than the streaming
    kernel (at most :data:`STREAM_MAX_ROWS`) or oneDNN's GEMM (past :func:`panel_max_rows`): the one row-range rule
    that :class:`~varkit.nn.layers.Linear` and the fused layers' plans share."""
    return STREAM_MAX_ROWS < rows <= panel_max_rows()


def panel_weight(weight: torch.Tensor, width: int, pairs: bool = False) -> torch.Tensor:
    """``weight`` (N, K) in the panel kernel's layout: rows padded with zeros to a multiple of ``width``, then per
    panel of ``width`` rows, per k, the panel's ``width`` values (``[ceil(N/width)][K][width]``). ``pairs`` (bf16,
    for the kernel's dot-product tile where :func:`panel_pairs` holds): per k pair, each row's values at k and k+1
    side by side, K padded with a zero column to an even count (``[ceil(N/width)][ceil(K/2)][width][2]``)."""
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"a weight {tuple(weight.shape)} of {weight.dtype} has no panel layout")
    if pairs and weight.dtype != torch.bfloat16:
        raise ValueError(f"the pair layout is for bf16 weights, not {weight.dtype}")
    n, k = weight.shape
    w = F.pad(weight.detach(), (0, k % 2 if pairs else 0, 0, -n % width))
    if pairs:
        return w.reshape(-1, width, w.shape[1] // 2, 2).transpose(1, 2).contiguous()
    return w.reshape(-1, width, k).transpose(1, 2).contiguous()


def panel_pairs(dtype: torch.dtype) -> bool:
    """Whether the panel kernel takes ``dtype`` weights in the pair layout: bf16 where the kernels were built with
    AVX-512-BF16 (its dot-product instruction does 32 bf16 products where the widening tile does 16 in fp32)."""
    if dtype != torch.bfloat16:
        return False
    kernel = cpu_kernels()
    return kernel is not None and kernel.panel_pairs()


def panel_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes the panel kernel serves: fp32; bf16 where the CPU has no bf16 arithmetic (there both it and
    oneDNN widen bf16 to fp32) or has AVX-512-BF16 without AMX (the kernel's dot-product tile, :func:`panel_pairs`;
    over NAR-B's linear shapes at 4-12 rows, weights in cache, one Zen 4 core: oneDNN's bf16 GEMM 88-201 GFLOP/s,
    the tile 171-221; equal from 16 rows). With AMX, oneDNN's bf16 GEMMs use the tiles.
    ``VARKIT_PANEL_GEMM=0``: none (benches time both; read on every call, as ``VARKIT_STREAM_GEMV``)."""
    if os.environ.get("VARKIT_PANEL_GEMM", "1") == "0":
        return ()
    return _cpu_panel_dtypes()


@functools.cache
def _cpu_panel_dtypes() -> tuple[torch.dtype, ...]:
    """:func:`panel_dtypes` by this CPU's flags (read once)."""
    from ..device import cpu_info

    isa = cpu_info().get("bf16_isa")
    if isa == "amx" or (isa == "avx512_bf16" and not panel_pairs(torch.bfloat16)):
        return (torch.float32,)
    return (torch.float32, torch.bfloat16)


def _as_linear_output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's fp32 (rows, N) product as ``F.linear``'s output: plus the bias, in x's dtype and leading shape."""
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def panel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, panels: torch.Tensor) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the panel kernel over ``panels`` (:func:`panel_weight` of ``weight`` at
    the kernel's width); None where the kernel is not available."""
    kernel = cpu_kernels()
    if kernel is None:
        return None
    y = kernel.linear_panels(x.reshape(-1, x.shape[-1]), panels, weight.shape[0], bias)  # x's dtype, bias added
    return y.reshape(*x.shape[:-1], y.shape[-1])


def stream_kernel():
    """The kernels' extension (None where it cannot be built here)."""
    return cpu_kernels()


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  blocked: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the kernel, for at most :data:`MAX_ROWS` rows on a CPU (over
    ``blocked`` = :func:`block_weight` of ``weight`` when given); None where the kernel is not available."""
    kernel = cpu_kernels()
    if kernel is None:
        return None
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    y = kernel.gemv(rows, weight) if blocked is None else kernel.gemv_blocked(rows, blocked, weight.shape[0])
    return _as_linear_output(y, x, bias)
