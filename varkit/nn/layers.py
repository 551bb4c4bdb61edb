"""Norms and feed-forward blocks shared by the generators."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the gain (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) with a faster CPU path for decoding in bf16.

    With few rows (decode steps: batch x CFG), PyTorch's bf16 ``x @ W.T`` on the CPU runs well
    below memory bandwidth; the weight-major product ``(W @ x.T).T`` reads the same bytes about
    1.6x faster. Results are the same up to bf16 rounding of the accumulation order.
    """

    small_rows = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile the plain linear is what inductor's freezing replaces by its own prepacked GEMM
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= self.small_rows * x.shape[-1]
                and not torch.compiler.is_compiling()):
            y = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t()
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return super().forward(x)


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's hidden size rule: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))
