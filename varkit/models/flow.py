"""FlowAR's flow-matching head math: the velocity network, its Euler sampler and its training loss.

FlowAR (wangqiang9/FlowAR: ``models/flowmodel.py``, ``sampler.py``, ``flowloss.py``) samples all the
tokens of one scale *jointly*: a small transformer (SimpleTransformerAdaLN, here :class:`FlowNet`)
predicts the velocity of every token of the scale at time t, attending across the scale's tokens, and
an Euler ODE solver in float64 carries Gaussian noise (t = 1) to the tokens (t = 0). This module is that
math only; :class:`~varkit.models.heads.FlowHead` wires it into generators and samplers.

- :class:`FlowNet`: the network. Parameter names are FlowAR's ``flownet.*`` so a published checkpoint
  converts by a prefix rename. "Spatial adaLN": every token is modulated by ``SiLU(t + cond_embed(z))``
  of its own condition z (the AR transformer's output at that position). ``cross=False`` (FlowAR-S,
  ``Block_v1``): self-attention + gated MLP. ``cross=True`` (FlowAR-L/H, ``Block_v2``): self-attention
  modulated by t only, cross-attention from the tokens to the scale's conditions z, MLP modulated by
  ``c + t``. Attention uses FlowAR's 2-D RoPE: scale s places its s×s tokens at ``i·G/s`` on the
  G-grid of the finest scale (G = 16 for the published models: FlowAR's ``pt_seq_len``).
- :class:`FlowCondition` (:meth:`FlowNet.prepare`): what depends on z alone (``cond_embed(z)``, the cross blocks'
  keys and values, the RoPE tables), computed once per scale rather than at every Euler step (same arithmetic).
- :func:`time_grid` and :func:`euler_sample`: FlowAR's ``euler_sampler``: 25 steps use its two-piece
  grid ``linspace(1, 0.3, 12) ++ linspace(0.25, 0, 13)`` (25 time points: 24 Euler steps, exactly as
  the official sampler), any other count a uniform grid (FlowAR's 50). CFG mixes the velocity
  ``u + w·(c − u)`` only while ``t <= interval``; outside it only the conditional rows are evaluated
  (FlowAR evaluates both halves there but never lets the unconditional half reach its output).
- :func:`flow_matching_loss`: FlowAR's ``SILoss``: linear path ``x_t = (1 − t)·x + t·ε``, target ``ε − x``.

The time input of the network is FlowAR's ``(t·1000).long()``, computed in the network's dtype (at least
fp32, as FlowAR's autocast sampling), so the 25-step grid's ``t = 0.3`` maps to step 300 as in FlowAR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from ..nn.layers import Linear
from ..nn.rope import apply_rope, rope_angles_2d
from .diffusion import FinalLayer, TimestepEmbedder, init_linears_and_timestep, modulate

Rope = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
    """FlowAR's RMSNorm (eps 1e-6), optionally with a gain (``weight``).

    Computed in at least fp32 (FlowAR: ``x.float()``) and cast back before the gain; fp64 stays fp64.
    """

    def __init__(self, dim: int, affine: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


class GatedMlp(nn.Module):
    """timm's ``SwiGLU`` as FlowAR instantiates it: ``fc2(GELU(fc1_g x) · fc1_x x)`` with biases.

    FlowAR passes its blocks' default ``act_layer=nn.GELU``, so the gate is the exact (erf) GELU, not
    SiLU. Hidden width ``int(dim · mlp_ratio · 2/3)``; parameter names are timm's.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_g = Linear(dim, hidden)
        self.fc1_x = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


def gated_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """FlowAR's MLP hidden width: ``int(dim · mlp_ratio · 2/3)`` (2048 at 768, 2730 at 1024)."""
    return int(dim * mlp_ratio * 2 / 3.0)


def scale_positions(side: int, grid: int) -> torch.Tensor:
    """Row (= column) coordinates ``i·grid/side`` of a side×side scale on the finest scale's grid (fp32,
    computed as FlowAR's ``torch.arange(s) / s * pt_seq_len``)."""
    return torch.arange(side, dtype=torch.float32) / side * grid


def scale_rope_angles(side: int, grid: int, head_dim: int) -> torch.Tensor:
    """(side², head_dim/2) RoPE angles of a row-major side×side scale: rows rotate the first half of the
    pairs, columns the second (FlowAR's ``VisionRotaryEmbeddingFast``, EVA-02's interleaved pairs)."""
    pos = scale_positions(side, grid)
    return rope_angles_2d(pos.repeat_interleave(side), pos.repeat(side), head_dim)


def check_head_dim(head_dim: int, what: str) -> None:
    if head_dim < 4 or head_dim % 4:
        raise InvalidArgumentError(f"{what}: 2-D RoPE needs a head dimension divisible by 4, got {head_dim}")


# --------------------------------------------------------------------------------------------- network
class FlowSelfAttention(nn.Module):
    """Self-attention over the tokens of one scale, with 2-D RoPE; FlowAR's names (``qkv`` without bias, ``proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        B, n, C = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(B, n, C))


class FlowCrossAttention(nn.Module):
    """Attention from the tokens (queries) to their scale's conditions z (keys, values), both rotated by
    the same 2-D RoPE; FlowAR's ``CrossAttention`` names (``q``, ``kv`` without bias, ``proj``)."""

    def __init__(self, dim: int, cond_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim, bias=False)
        self.kv = Linear(cond_dim, 2 * dim, bias=False)
        self.proj = Linear(dim, dim)

    def keys(self, cond: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, heads, n, head_dim) of the (normed) conditions: fixed for a whole ODE."""
        B, n, _ = cond.shape
        k, v = self.kv(cond).view(B, n, 2, self.heads, self.head_dim).unbind(2)
        return apply_rope(k, *rope).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], rope: Rope) -> torch.Tensor:
        B, n, C = x.shape
        q = apply_rope(self.q(x).view(B, n, self.heads, self.head_dim), *rope)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), *kv)
        return self.proj(o.transpose(1, 2).reshape(B, n, C))


class FlowBlock(nn.Module):
    """FlowAR's ``Block_v1`` (FlowAR-S): per-token adaLN (6 chunks) from ``SiLU(t + c)``, self-attention, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = FlowSelfAttention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = GatedMlp(dim, gated_hidden(dim))
        self.ada_lin = Linear(dim, 6 * dim)

    def forward(self, x, t, c, kv, rope):
        B, n, _ = c.shape
        g1, g2, s1, s2, b1, b2 = self.ada_lin(F.silu(t + c)).view(B, n, 6, self.dim).unbind(2)
        x = x + self.attn(modulate(self.norm1(x), b1, s1), rope) * g1
        return x + self.mlp(modulate(self.norm2(x), b2, s2)) * g2


class FlowCrossBlock(nn.Module):
    """FlowAR's ``Block_v2`` (FlowAR-L/H): self-attention modulated by t only, cross-attention to the
    scale's conditions z (RMSNorms with gains), MLP modulated per token by ``c + t``."""

    def __init__(self, dim: int, heads: int, cond_dim: int):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = FlowSelfAttention(dim, heads)
        self.crossattn = FlowCrossAttention(dim, cond_dim, heads)
        self.norm2_1 = RMSNorm(dim, affine=True)
        self.norm2_2 = RMSNorm(cond_dim, affine=True)
        self.norm3 = RMSNorm(dim)
        self.mlp = GatedMlp(dim, gated_hidden(dim))
        self.ada_lin_attn = Linear(dim, 3 * dim)
        self.ada_lin_mlp = Linear(dim, 3 * dim)

    def keys(self, cond: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crossattn.keys(self.norm2_2(cond), rope)

    def forward(self, x, t, c, kv, rope):
        B, n, _ = c.shape
        g1, s1, b1 = self.ada_lin_attn(F.silu(t)).view(B, 1, 3, self.dim).unbind(2)
        g2, s2, b2 = self.ada_lin_mlp(F.silu(c + t)).view(B, n, 3, self.dim).unbind(2)
        x = x + self.attn(modulate(self.norm1(x), b1, s1), rope) * g1
        x = x + self.crossattn(self.norm2_1(x), kv, rope)
        return x + self.mlp(modulate(self.norm3(x), b2, s2)) * g2


class FlowFinalLayer(FinalLayer):
    """MAR's final layer on an affine-free RMSNorm: adaLN (shift, scale) from ``c + t``, then the velocity projection."""

    def __init__(self, width: int, out_channels: int):
        super().__init__(width, out_channels, norm=RMSNorm(width))


@dataclass
class FlowCondition:
    """What the network derives from a scale's conditions z alone, computed once per scale instead of at every
    Euler step: ``cond_embed(z)``, each cross block's rotated keys and values, and the scale's RoPE tables.
    Rows slice like a tensor (``cond[:B]``: the conditional rows under CFG)."""

    c: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    rope: Rope

    def __getitem__(self, rows) -> "FlowCondition":
        return FlowCondition(self.c[rows], [None if p is None else (p[0][rows], p[1][rows]) for p in self.kv], self.rope)

    @property
    def shape(self) -> torch.Size:
        return self.c.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.c.dtype


class FlowNet(nn.Module):
    """FlowAR's SimpleTransformerAdaLN: the velocity (R, n, D) of the n tokens of one scale.

    Arguments: token channels D, width W (heads W // 64, FlowAR's rule), the AR output width C, depth,
    ``cross`` (Block_v2) and ``grid`` (the finest scale's side, where RoPE positions live).
    """

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int, cross: bool = False, grid: int = 16,
                 grad_checkpointing: bool = False):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("cond_dim", cond_dim), ("grid", grid)):
            if value < 1:
                raise InvalidArgumentError(f"the flow head needs {name} >= 1, got {value}")
        heads = width // 64
        if heads < 1 or width % heads:
            raise InvalidArgumentError(
                f"the flow head's width must be a multiple of its {max(heads, 1)} heads of ~64 (FlowAR: heads = width // 64), "
                f"got {width}")
        if depth < 1:
            raise InvalidArgumentError(f"the flow head needs depth >= 1, got {depth}")
        check_head_dim(width // heads, "flow head")
        self.token_dim, self.width, self.cond_dim, self.grid = token_dim, width, cond_dim, grid
        self.heads, self.cross, self.grad_checkpointing = heads, cross, grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = Linear(cond_dim, width)
        self.input_proj = Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(
            FlowCrossBlock(width, heads, cond_dim) if cross else FlowBlock(width, heads) for _ in range(depth))
        self.final_layer = FlowFinalLayer(width, token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """FlowAR's init: xavier-uniform linears with zero bias, timestep MLP N(0, 0.02), zero output layer."""
        init_linears_and_timestep(self, self.time_embed)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rope(self, n: int, device: torch.device | str = "cpu") -> Rope:
        """(cos, sin) tables (n, head_dim/2) of a scale of n = s² tokens."""
        side = math.isqrt(n)
        if side * side != n:
            raise InvalidArgumentError(f"the flow head samples whole square scales; got {n} tokens, not s×s")
        angles = scale_rope_angles(side, self.grid, self.width // self.heads).to(device)
        return angles.cos(), angles.sin()

    def prepare(self, cond: torch.Tensor) -> FlowCondition:
        """The step-independent part of the network for conditions ``cond`` (R, n, C) of one scale."""
        rope = self.rope(cond.shape[1], cond.device)
        kv = [b.keys(cond, rope) if isinstance(b, FlowCrossBlock) else None for b in self.res_blocks]
        return FlowCondition(self.cond_embed(cond), kv, rope)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | FlowCondition) -> torch.Tensor:
        """Velocity (R, n, D) of tokens x (R, n, D) at times t (R,) in [0, 1] given conditions cond (R, n, C)
        (or their :meth:`prepare`'d form)."""
        if not isinstance(cond, FlowCondition):
            cond = self.prepare(cond)
        steps = (t * 1000).long()  # FlowAR's time input, floored
        h = self.input_proj(x)
        te = self.time_embed(steps).unsqueeze(1)
        c = cond.c
        for block, kv in zip(self.res_blocks, cond.kv):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, te, c, kv, cond.rope, use_reentrant=False)
            else:
                h = block(h, te, c, kv, cond.rope)
        return self.final_layer(h, c + te)


# --------------------------------------------------------------------------------------------- sampling
FLOWAR_GRID_STEPS = 25  # the step count whose grid is FlowAR's two-piece one


def time_grid(steps: int) -> torch.Tensor:
    """Float64 time points from 1 to 0 for ``steps`` head steps.

    25: FlowAR's ``linspace(1, 0.3, 12) ++ linspace(0.25, 0, 13)`` (25 points, 24 Euler steps, as its
    ``euler_sampler(num_steps=25)``); any other count ``linspace(1, 0, steps + 1)`` (FlowAR's 50).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"head_steps must be an integer >= 1, got {steps!r}")
    if steps == FLOWAR_GRID_STEPS:
        half = steps // 2
        return torch.cat([torch.linspace(1, 0.3, half, dtype=torch.float64),
                          torch.linspace(0.25, 0, half + 1, dtype=torch.float64)])
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(net: VelocityFn, x1: torch.Tensor, cond: torch.Tensor, weight: torch.Tensor | float | None,
                 grid: torch.Tensor, interval: float) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (``x1``, (B, n, D)) to t = 0 along ``grid``; float64 result.

    ``cond`` (B, n, C), or (2B, n, C) = [conditional; unconditional] rows under CFG (a tensor or anything
    that slices rows and has ``shape``/``dtype``, e.g. a :class:`FlowCondition`). ``weight``: None
    (no CFG) or the CFG weight (a number, or one per position (n,)); where a step's time is <= ``interval``
    and some weight differs from 1 the velocity is ``u + w·(c − u)``, elsewhere the conditional one.
    ``net(x, t, cond)`` runs in ``cond``'s dtype; x and the update stay float64 (FlowAR).
    """
    B = x1.shape[0]
    dtype = cond.dtype
    tdtype = torch.promote_types(dtype, torch.float32)
    w = weight
    if isinstance(w, torch.Tensor):
        w = w.to(x1.device, torch.float64).view(1, -1, 1)
    guided = w is not None and bool(torch.as_tensor(w != 1).any())
    if guided and cond.shape[0] != 2 * B:
        raise InvalidArgumentError(f"CFG needs [conditional; unconditional] conditions ({2 * B} rows), got {cond.shape[0]}")
    cond_rows = cond[:B]
    x = x1.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        xin = x.to(dtype)
        if guided and t_cur <= interval:
            t_in = t_cur.to(tdtype).expand(2 * B).to(x.device)
            v = net(torch.cat([xin, xin]), t_in, cond).to(torch.float64)
            v_c, v_u = v[:B], v[B:]
            d = v_u + w * (v_c - v_u)
        else:
            d = net(xin, t_cur.to(tdtype).expand(B).to(x.device), cond_rows).to(torch.float64)
        x = x + (t_next - t_cur) * d
    return x


# --------------------------------------------------------------------------------------------- training
def flow_matching_loss(net: VelocityFn, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Per-token squared velocity error (B, n), mean over channels, of FlowAR's ``SILoss``.

    x (B, n, D) data, cond (B, n, C), t (B,) one time per row, noise (B, n, D):
    ``x_t = (1 − t)·x + t·ε``, target ``ε − x``.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    x, noise = x.to(dt), noise.to(dt)
    tt = t.to(dt).view(-1, 1, 1)
    xt = (1 - tt) * x + tt * noise
    target = -x + noise
    v = net(xt.to(cond.dtype), t.to(dt), cond)
    return (v.to(dt) - target).pow(2).mean(-1)
