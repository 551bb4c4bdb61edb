"""Next-scale generator with FlowAR's architecture, over continuous latents, with a flow-matching head.

FlowAR (wangqiang9/FlowAR, ``models/flowar.py``) generates a KL-VAE latent (MAR's KL-16, scaled by
0.2325) scale by scale, 1, 2, 4, 8, 16 by default, on the same ``scales`` layout, :class:`KVCache` and
block-causal attention as VAR (:mod:`varkit.models.scales`). Only the head and the scale inputs differ:

- tokens are continuous; the coarse scales are the finest latent area-downsampled (:class:`LatentPyramid`:
  the tokenizer's one latent map *is* the whole token sequence, and decoding reads the finest scale);
- the input of scale k is the sampled scale k−1 bicubic-upsampled to the finest grid, area-downsampled
  to scale k, then ``z_proj`` (:meth:`FlowARGenerator.next_scale_input`); scale 0's input is the class
  embedding; the null class is id ``num_classes`` (FlowAR's 1000);
- the transformer is an encoder then a decoder stack of blocks with affine-free RMSNorm, adaLN from the
  class embedding (6 chunks, VAR's order), attention with a bias on q, k and v and FlowAR's per-scale 2-D
  RoPE (scale s at ``i·G/s`` on the finest G-grid), and timm's gated MLP with GELU (8/3·dim);
- the output per position is the flow head's condition z (decoder output + ``diffusion_pos_embed``):
  :class:`~varkit.models.heads.FlowHead` samples a whole scale from it.

Parameter names are FlowAR's except the attention's (varkit's ``wqkv``/``wo`` for FlowAR's ``qkv``/``proj``)
and the head (``head.net.*`` for ``flownet.*``): :mod:`varkit.checkpoints.flowar` converts.
FlowAR's per-scale CFG ramp ``(cfg − 1)·k/(K − 1) + 1`` is varkit's ``linear`` schedule on this layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..layout import Layout, scales
from ..modeling import register_module
from ..nn import Attention, block_causal_mask
from ..nn.layers import Linear
from ..nn.rope import RotaryTable
from .base import ClassConditional, Generator, latent_side
from .flow import GatedMlp, RMSNorm, check_head_dim, gated_hidden, scale_rope_angles
from .heads import HeadConfig, head_from_config


@dataclass
class FlowARConfig(HeadConfig):
    """FlowAR's hyper-parameters. Head fields: ``head_depth``/``head_width`` (FlowAR's ``diffloss_d``/``_w``),
    ``head_cross`` (Block_v2 cross-attention: FlowAR-L/H), ``head_steps`` (Euler steps by default; 25 is
    FlowAR's two-piece grid) and ``guidance_interval`` (CFG while t <= it, by default)."""

    head: str = "flow"
    token_dim: int = 16
    head_depth: int = 2
    head_width: int = 1024
    head_steps: int = 25
    head_cross: bool = False
    guidance_interval: float = 0.9
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 4, 8, 16)
    dim: int = 768
    n_head: int = 12
    encoder_depth: int = 6
    decoder_depth: int = 6
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False


def doubling_scales(grid: int) -> tuple[int, ...]:
    """FlowAR's scale schedule 1, 2, 4, …, grid for a power-of-two latent side; an error otherwise."""
    if grid < 1 or grid & (grid - 1):
        raise InvalidArgumentError(
            f"a {grid}x{grid} latent cannot be made by FlowAR's scales 1, 2, 4, ... (each twice the last): choose a "
            "resolution whose latent side (resolution / the tokenizer's downsample factor) is a power of two, or set patch_nums")
    return tuple(2 ** i for i in range(grid.bit_length()))


def area_pyramid(latent: torch.Tensor, sides: list[int]) -> list[torch.Tensor]:
    """A channels-last latent (B, G, G, D) area-downsampled to every side (B, s, s, D) (FlowAR's coarse scales)."""
    x = latent.permute(0, 3, 1, 2)
    return [F.interpolate(x, size=(s, s), mode="area").permute(0, 2, 3, 1) for s in sides]


class LatentPyramid(Layout):
    """The ``scales`` layout over one continuous latent map: scale k is the map area-downsampled to
    pn_k × pn_k. ``from_grids`` takes the tokenizer's one map (or one map per scale) and ``to_tokenizer_ids``
    returns the finest scale, which is what the tokenizer decodes."""

    @classmethod
    def of(cls, patch_nums: tuple[int, ...]) -> "LatentPyramid":
        base = scales(patch_nums)
        return cls(base.kind, base.step_sizes, base.coords, base.scale_sizes)

    def from_grids(self, grids):
        if isinstance(grids, torch.Tensor):
            grids = [grids]
        if len(grids) == 1 and len(self.scale_sizes) > 1:
            g = grids[0]
            if tuple(g.shape[1:3]) != tuple(self.grid):
                raise InvalidArgumentError(
                    f"the latent map is {g.shape[1]}x{g.shape[2]} but this model's finest scale is "
                    f"{self.grid[0]}x{self.grid[1]}: encode images whose latent has that size")
            grids = area_pyramid(g, [h for h, _ in self.scale_sizes[:-1]]) + [g]
        return super().from_grids(grids)

    def to_tokenizer_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        return tokens[:, self.step_slice(self.num_steps - 1)].reshape(tokens.shape[0], h, w, *tokens.shape[2:])


class QKVBiasAttention(Attention):
    """varkit's :class:`~varkit.nn.Attention` (KV cache, masks, RoPE) with a bias on all of q, k and v and
    on the output (FlowAR's ``qkv_bias=True``): the fused ``wqkv`` Linear carries the bias."""

    def __init__(self, dim: int, n_head: int):
        super().__init__(dim, n_head, out_bias=True)
        self.wqkv = Linear(dim, 3 * dim, bias=True)


class FlowARBlock(nn.Module):
    """``x += γ1·attn(RMS(x)(1+s1)+b1)``; ``x += γ2·mlp(RMS(x)(1+s2)+b2)``; γ, s, b = ada_lin(class)."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: float):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = QKVBiasAttention(dim, n_head)
        self.norm2 = RMSNorm(dim)
        self.mlp = GatedMlp(dim, gated_hidden(dim, mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def modulation(self, cond_emb: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): γ1, γ2, s1, s2, b1, b2 from the class embedding."""
        return self.ada_lin(cond_emb).view(-1, 1, 6, self.dim)

    def forward(self, x, mods, rope, mask, cache, layer):
        g1, g2, s1, s2, b1, b2 = mods.unbind(2)
        x = x + self.attn(self.norm1(x) * (s1 + 1) + b1, rope, mask, cache, layer) * g1
        return x + self.mlp(self.norm2(x) * (s2 + 1) + b2) * g2


@dataclass
class FlowARState:
    """Per-image decoding state: the blocks' adaLN modulations (the class is fixed) and the last step done."""

    mods: list[torch.Tensor] = field(default_factory=list)
    step: int = 0


@register_module
class FlowARGenerator(ClassConditional, Generator):
    """FlowAR: class-conditional next-scale prediction of continuous latents, sampled by a flow head."""

    config_class = FlowARConfig
    class_ids_of = "FlowAR"
    supports_multistep = False
    supports_rollback = False

    def __init__(self, config: FlowARConfig):
        super().__init__(config)
        c = config
        _check_config(c)
        self.layout = LatentPyramid.of(tuple(c.patch_nums))
        self.num_classes = c.num_classes
        N, C = self.layout.num_tokens, c.dim
        self.head = head_from_config(c, C)
        self.class_emb = nn.Embedding(c.num_classes + 1, C)
        self.z_proj = self.head.input_embedding(C)
        self.z_proj_ln = RMSNorm(C, affine=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N, C))
        self.encoder_blocks = nn.ModuleList(FlowARBlock(C, c.n_head, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.encoder_norm = RMSNorm(C, affine=True)
        self.decoder_embed = Linear(C, C)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N, C))
        self.decoder_blocks = nn.ModuleList(FlowARBlock(C, c.n_head, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = RMSNorm(C, affine=True)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, N, C))
        self.output = self.head.output_layer(C)  # Identity: z is the flow head's condition
        self.rope = RotaryTable(self._rope_angles())
        self.register_buffer("step_of", self.layout.step_of.clone(), persistent=False)
        self.reset_parameters()

    def _rope_angles(self) -> torch.Tensor:
        """(N, head_dim/2) angles of every position: each scale on the finest grid (FlowAR's per-scale RoPE)."""
        c = self.config
        G = c.patch_nums[-1]
        return torch.cat([scale_rope_angles(p, G, c.dim // c.n_head) for p in c.patch_nums])

    def reset_parameters(self) -> None:
        """FlowAR's init: N(0, 0.02) class and position embeddings, xavier-uniform linears with zero bias.
        The head keeps its own init (FlowAR's ``SimpleTransformerAdaLN.initialize_weights``)."""
        for p in (self.class_emb.weight, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("head."):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Token channels and scales (1, 2, 4, …, latent side) a continuous tokenizer and resolution fix."""
        shape = tuple(getattr(tokenizer, "token_shape", ()))
        if not shape:
            raise InvalidArgumentError(
                "FlowAR generates continuous latents: it needs a continuous (KL) tokenizer, not a discrete (VQ) one")
        return {"token_dim": shape[0], "patch_nums": doubling_scales(latent_side(tokenizer, resolution))}

    # -- contract: cache (conditions: ClassConditional) ------------------------------------------
    def cache_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.encoder_depth + c.decoder_depth, c.n_head, c.dim // c.n_head

    def max_cache_len(self) -> int:
        return self.layout.num_tokens

    # -- the transformer ----------------------------------------------------------------------------
    def modulations(self, cond_emb: torch.Tensor) -> list[torch.Tensor]:
        """Every block's adaLN modulation (encoder then decoder), (B, 1, 6, C) each."""
        return [b.modulation(cond_emb) for b in (*self.encoder_blocks, *self.decoder_blocks)]

    def _blocks(self, blocks, x, mods, rope, mask, cache, first: int) -> torch.Tensor:
        ckpt = self.config.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(blocks):
            if ckpt:
                x = checkpoint(block, x, mods[first + i], rope, mask, None, first + i, use_reentrant=False)
            else:
                x = block(x, mods[first + i], rope, mask, cache, first + i)
        return x

    def _run(self, x: torch.Tensor, sl: slice, mods: list[torch.Tensor], mask, cache: KVCache | None) -> torch.Tensor:
        """Inputs (B, n, C) at layout positions ``sl`` → the flow head's conditions z (B, n, C)."""
        rope = self.rope(sl)
        E = self.config.encoder_depth
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, sl])
        x = self.encoder_norm(self._blocks(self.encoder_blocks, x, mods, rope, mask, cache, 0))
        x = self.decoder_embed(x) + self.decoder_pos_embed_learned[:, sl]
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x, mods, rope, mask, cache, E))
        if cache is not None:
            cache.advance(x.shape[1])
        return self.output(x + self.diffusion_pos_embed_learned[:, sl])

    def next_scale_input(self, grid: torch.Tensor, step: int) -> torch.Tensor:
        """Scale ``step``'s input tokens (B, pn², D) from scale ``step − 1``'s latents (B, s, s, D): bicubic up to
        the finest grid, area down to pn × pn (FlowAR), in at least fp32."""
        G, p = self.config.patch_nums[-1], self.config.patch_nums[step]
        x = grid.permute(0, 3, 1, 2).to(torch.promote_types(grid.dtype, torch.float32))
        x = F.interpolate(F.interpolate(x, size=(G, G), mode="bicubic"), size=(p, p), mode="area")
        return x.flatten(2).transpose(1, 2)

    def _embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.z_proj(x.to(self.z_proj.weight.dtype))

    # -- contract: decoding ----------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache: KVCache, order=None, layout=None) -> tuple[torch.Tensor, FlowARState]:
        """The class token alone → conditions (B', pn_0², C) of scale 0."""
        self.check_condition(cond)
        if cache is None or cache.length != 0:
            raise InvalidArgumentError("prefill needs an empty KVCache (gen.new_cache(batch))")
        emb = self.class_emb(cond)
        state = FlowARState(self.modulations(emb), 0)
        return self._run(emb[:, None], self.layout.step_slice(0), state.mods, None, cache), state

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: FlowARState = None) -> torch.Tensor:
        """``tokens`` (B', pn_{step-1}², D) of scale ``step − 1`` → conditions (B', pn_step², C) of scale ``step``."""
        if not isinstance(state, FlowARState):
            raise InvalidArgumentError("FlowAR's forward needs the state prefill returned")
        if step != state.step + 1 or not 0 < step < self.layout.num_steps:
            raise InvalidArgumentError(
                f"FlowAR decodes one scale a step: after scale {state.step} of {self.layout.num_steps} the next call is "
                f"step {state.step + 1}, got {step}")
        p = self.config.patch_nums[step - 1]
        want = (p * p, self.head.token_dim)
        if tuple(tokens.shape[1:]) != want:
            raise InvalidArgumentError(
                f"scale {step - 1} tokens must have shape (B, {want[0]}, {want[1]}), got {tuple(tokens.shape)}")
        x = self._embed_tokens(self.next_scale_input(tokens.reshape(tokens.shape[0], p, p, -1), step))
        state.step = step
        return self._run(x, self.layout.step_slice(step), state.mods, None, cache)

    def prefill_steps(self, cond: torch.Tensor, cache: KVCache, tokens: torch.Tensor, steps: int) -> tuple[torch.Tensor, FlowARState]:
        """The class token and the latents ``tokens`` of scales ``0 … steps-1`` in one block-causal pass → conditions of
        scale ``steps`` (collaborative decoding's refiner prefill; see :meth:`Generator.prefill_steps`)."""
        self.check_condition(cond)
        if cache is None or cache.length != 0:
            raise InvalidArgumentError("prefill needs an empty KVCache (gen.new_cache(batch))")
        lay = self.layout
        if not 0 < steps < lay.num_steps or tokens.shape[1] != lay.step_starts[steps]:
            raise InvalidArgumentError(
                f"prefill_steps takes the latents of scales 0..{steps - 1} (steps in 1..{lay.num_steps - 1}), "
                f"got {tokens.shape[1]} tokens for steps={steps}")
        emb = self.class_emb(cond)
        state = FlowARState(self.modulations(emb), steps)
        xs = [emb[:, None]]
        for s in range(1, steps + 1):
            p = self.config.patch_nums[s - 1]
            grid = tokens[:, lay.step_slice(s - 1)].reshape(tokens.shape[0], p, p, -1)
            xs.append(self._embed_tokens(self.next_scale_input(grid, s)))
        end = lay.step_starts[steps + 1]
        mask = block_causal_mask(self.step_of[:end], self.step_of[:end])
        out = self._run(torch.cat(xs, 1), slice(0, end), state.mods, mask, cache)
        return out[:, lay.step_starts[steps]:], state

    # -- training ------------------------------------------------------------------------------------
    def training_outputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        """One block-causal pass over every scale (FlowAR's training forward): conditions (B, N, C) for the
        ground-truth latents ``tokens`` (B, N, D) in layout order; every position counts."""
        self.check_condition(cond)
        grids = self.layout.to_grids(tokens)
        emb = self.class_emb(cond)
        inputs = torch.cat([self.next_scale_input(grids[k - 1], k) for k in range(1, len(grids))], 1)
        x = torch.cat([emb[:, None], self._embed_tokens(inputs)], 1)
        mask = block_causal_mask(self.step_of, self.step_of)
        return self._run(x, slice(0, self.layout.num_tokens), self.modulations(emb), mask, None), None

    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise InvalidArgumentError("FlowAR's outputs are flow-head conditions, not logits; use training_outputs")


def _check_config(c: FlowARConfig) -> None:
    if c.head != "flow":
        raise InvalidArgumentError(f"FlowAR samples with a flow head (head='flow'), got head={c.head!r}")
    if c.token_dim < 1:
        raise InvalidArgumentError(
            "FlowAR generates continuous latents: it needs a continuous (KL) tokenizer, not a discrete (VQ) one")
    pn = tuple(c.patch_nums)
    if not pn or pn[0] != 1:
        raise InvalidArgumentError(f"FlowAR's first scale is the class token alone: patch_nums must start at 1, got {pn}")
    if c.encoder_depth < 1 or c.decoder_depth < 1:
        raise InvalidArgumentError(f"FlowAR needs encoder and decoder depths >= 1, got {c.encoder_depth}+{c.decoder_depth}")
    if c.n_head < 1 or c.dim % c.n_head:
        raise InvalidArgumentError(f"width {c.dim} is not divisible by {c.n_head} attention heads")
    check_head_dim(c.dim // c.n_head, "FlowAR transformer")
    if c.num_classes < 1:
        raise InvalidArgumentError(f"FlowAR needs num_classes >= 1, got {c.num_classes}")
