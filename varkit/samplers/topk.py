"""The k largest logits of each row, sorted: a C++ kernel on a CPU, ``torch.topk`` elsewhere.

Why: sampling with top-k (LlamaGen's and NAR's 2000, VAR's 900) sorts each row's candidates, and torch's CPU
``topk`` selects them by comparisons at ~13 ns a word: 260 us a row of a 16384-word vocabulary, a tenth of NAR-B's
batch-1 time on an AVX-512 Xeon. The kernel (:mod:`varkit.nn.cpu_kernels`) takes ~34 us there. It returns the same
values and the same set of indices; where values tie, the lower index comes first (torch's tie order is
unspecified), so a draw from the sorted candidates is a draw from the same distribution either way.
``VARKIT_TOPK_KERNEL=0``: ``torch.topk`` everywhere (benches, checks).
"""
from __future__ import annotations

import os

import torch

from ..nn.cpu_kernels import cpu_kernels


def topk_kernel_enabled() -> bool:
    """Whether CPU top-k goes through the kernel (``VARKIT_TOPK_KERNEL=0``: ``torch.topk``)."""
    return os.environ.get("VARKIT_TOPK_KERNEL", "1") != "0"


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row of ``x`` (..., V), largest first, as
    ``x.topk(k, dim=-1)``; NaN counts as the largest (as in ``torch.topk``) unless its sign bit is set."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and 0 < k <= x.shape[-1]
            and x.numel() > 0 and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)
            and topk_kernel_enabled()):
        kernels = cpu_kernels()
        if kernels is not None:
            values, indices = kernels.topk(x, k)
            return values, indices
    return x.topk(k, dim=-1)
