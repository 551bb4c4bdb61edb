"""The one attention module: fused qkv, SDPA, optional RoPE and q/k l2-norm, KVCache I/O."""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from .cpu_kernels import cpu_kernels
from .layers import Linear
from .rope import apply_rope


@functools.cache
def _sdpa_slow_at_one_query() -> bool:
    """Whether SDPA's CPU kernel is slow for bf16 at one query (checked: AMD Zen 4, AVX-512-BF16 without AMX)."""
    from ..device import cpu_info

    return cpu_info().get("bf16_isa") != "amx"


def one_query_kernel_enabled() -> bool:
    """Whether one-query CPU attention goes through :mod:`varkit.nn.cpu_kernels` (``VARKIT_ATTEND_KERNEL=0``: SDPA)."""
    return os.environ.get("VARKIT_ATTEND_KERNEL", "1") != "0"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except for one query a row on a CPU (raster decode steps).

    Unmasked, there the C++ kernel of :mod:`varkit.nn.cpu_kernels` reads each cached key and value once, in fp32
    (AMD Zen 4, one thread, GPT-B's 12 heads at batch 2 over a decode step's cache: SDPA reads it at ~7 GB/s, about
    a quarter of the core's DRAM rate). Masked, bf16 on a CPU without AMX takes the plain products in fp32: SDPA's
    bf16 kernel takes 2.5x longer there (707 vs 280 us at batch 2 over 257 keys). Results agree with SDPA's to fp32
    rounding (bf16: to the rounding of the output)."""
    if (q.shape[-2] == 1 and q.device.type == "cpu" and dropout_p == 0.0 and q.dim() == 4
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and q.requires_grad)):
        if (mask is None and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
                and k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape == v.shape and one_query_kernel_enabled()):
            kernels = cpu_kernels()
            if kernels is not None:
                return kernels.attend(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
        if q.dtype == torch.bfloat16 and _sdpa_slow_at_one_query():
            s = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            return (s.softmax(-1) @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def block_causal_mask(q_steps: torch.Tensor, k_steps: torch.Tensor) -> torch.Tensor:
    """Boolean (nq, nk) mask: query at step s sees every key at step <= s.

    With one token per step this is the usual causal mask; with a whole scale or front per
    step, tokens of one step see each other (VAR's scales, NAR's fronts).
    """
    return k_steps[None, :] <= q_steps[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over ``[cached positions] + [new positions]``.

    Parameter names follow LlamaGen (``wqkv``, ``wo``) so its checkpoints map 1:1. Options
    cover VAR's variant: bias on q and v only, q/k l2-normalised with a learned per-head
    scale and softmax scale 1, an output bias.
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        qv_bias: bool = False,
        out_bias: bool = False,
        qk_l2norm: bool = False,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
    ):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wqkv = Linear(dim, 3 * dim, bias=False)
        self.wo = Linear(dim, dim, bias=out_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.qk_l2norm = qk_l2norm
        if qk_l2norm:
            self.qk_scale = nn.Parameter(torch.full((1, n_head, 1, 1), math.log(4.0)))
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.wqkv(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.wqkv.linear(x, bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``x`` (B, n, dim) → (B, n, dim).

        ``rope``: (cos, sin) of the n new positions. ``mask``: boolean (n, n_keys) or
        broadcastable, True = may attend; None = attend to every key. With a ``cache``, keys
        are the cache's filled prefix plus the new positions (the caller advances the cache).
        """
        B, n, _ = x.shape
        fused = self._fused_front(x, rope, mask, cache, layer)
        if fused is not None:
            return fused
        qkv = self._qkv(x).view(B, n, 3, self.n_head, self.head_dim)
        if rope is not None:  # q's and k's heads rotated in one call, as 2 * n_head heads at the same positions
            qk = apply_rope(qkv[:, :, :2].reshape(B, n, 2 * self.n_head, self.head_dim), *rope)
            (q, k), v = qk.view(B, n, 2, self.n_head, self.head_dim).unbind(2), qkv[:, :, 2]
        else:
            q, k, v = qkv.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = None
        if self.qk_l2norm:
            q = F.normalize(q, dim=-1) * self.qk_scale.clamp(max=math.log(100.0)).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if cache is not None:
            attend = getattr(cache, "attend", None)
            if attend is not None:  # a budgeted cache (varkit.cache_policies) keeps other keys per head: it attends
                y = attend(layer, q, k, v, mask, scale)
                return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, n, -1)))
            k, v = cache.update(layer, k, v)
        drop = self.attn_dropout if self.training else 0.0
        y = attention(q, k, v, mask, drop, scale)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, n, -1)))

    def front_kernel_applies(self, x: torch.Tensor, rope, mask, cache) -> bool:
        """Whether ``attend_front`` serves this call (see :meth:`_fused_front`; also asked by a block that runs whole
        in one call, :meth:`varkit.models.raster.TransformerBlock._fused_front`)."""
        n = x.shape[1]
        return not (n < 2 or mask is not None or rope is None or type(cache) is not KVCache or x.device.type != "cpu"
                    or x.dtype not in (torch.float32, torch.bfloat16) or cache.dtype != x.dtype or self.qk_l2norm
                    or self.q_bias is not None or self.head_dim % 2 or rope[0].dim() != 2
                    or cache.length + n > cache.max_len or self.training or torch.is_grad_enabled()
                    or torch.compiler.is_compiling() or not one_query_kernel_enabled())

    def _fused_front(self, x: torch.Tensor, rope, mask, cache, layer: int) -> torch.Tensor | None:
        """Rotary, cache write and attention in one C++ call (``cpu_kernels.attend_front``) where it applies: 2 or
        more new tokens a row that see every cached key and each other (no mask: NAR's fronts), RoPE, a plain
        static cache of the activations' dtype, inference on a CPU. Else None (the module path). Module path per
        layer, NAR-B bf16 at a 16-token front over 257 keys, one Zen 4 core: rotary, transposes and cache writes
        ~0.2 ms, SDPA 0.52 ms; the kernel 0.29 ms for all of it (fp32 0.36). With the projections, at 4-256 tokens
        over 14-680 keys: 1.1-1.3x the module path in bf16, 1.1-1.4x in fp32."""
        if not self.front_kernel_applies(x, rope, mask, cache):
            return None
        kernels = cpu_kernels()
        if kernels is None:
            return None
        y = kernels.attend_front(self._qkv(x), rope[0], rope[1], cache.k[layer], cache.v[layer], cache.length,
                                 self.head_dim ** -0.5)
        return self.resid_dropout(self.wo(y))
