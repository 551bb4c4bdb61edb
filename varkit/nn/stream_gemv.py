"""A weight-streaming product ``x @ W.T`` for the few rows of a CPU decode step (batch 1, CFG: 1-4 rows).

Why: such a step reads every weight once and is bound by how fast one core streams them from DRAM; torch's paths
read them at half that or less (:mod:`varkit.nn.cpu_kernels` has the numbers and the C++). Prepacked linears hand
their 1-2 row products here, over a copy of the weight in the kernel's blocked layout (:func:`block_weight`, made
once per weight, like oneDNN's packed copy). Results equal ``F.linear``'s up to the order of the fp32 sums (and, for
bf16 weights, up to the one rounding of the output to bf16).
"""
from __future__ import annotations

import torch

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
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
