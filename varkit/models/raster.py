"""Next-token (raster) generator with LlamaGen's architecture.

A Llama-style decoder over ``[condition tokens] + [image tokens]``: class embedding with a
null row for CFG (or a caption projection for text-to-image), 2-D RoPE on the token grid,
RMSNorm, SwiGLU, no biases. Parameter names are LlamaGen's, so its published checkpoints
load 1:1. The same class hosts NAR's backbone (``neighbors`` layout, see ``neighbors.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..cache import IndexedKV, KVCache
from ..errors import InvalidArgumentError
from ..layout import Layout, build_layout
from ..modeling import DerivedState, register_module
from ..nn import Attention, RMSNorm, RotaryTable, SwiGLU, block_causal_mask, weight_arena
from ..nn.cpu_kernels import cpu_kernels, fused_decode_enabled
from ..nn.layers import gate_kernel_serves, swiglu_hidden_dim, weight_key
from ..nn.rope import rope_angles_2d
from ..nn.stream_gemv import MAX_ROWS, STREAM_MAX_ROWS, panel_dtypes, panel_max_rows, panel_rows
from .base import Generator, check_class_ids, token_fields_for_tokenizer
from .heads import HeadConfig, head_from_config


@dataclass
class RasterConfig(HeadConfig):
    vocab_size: int = 16384
    num_classes: int = 1000
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    grid: int = 16
    layout: str = "raster"
    cls_token_num: int = 1
    caption_dim: int = 0  # > 0: text-to-image, the condition is (B, cls_token_num, caption_dim)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1


class LabelEmbedder(nn.Module):
    """Class ids → one condition token; row ``num_classes`` is the null class for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)[:, None]


class CaptionEmbedder(nn.Module):
    """Caption embeddings (B, T, caption_dim) → T condition tokens; a learned null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = nn.Sequential()
        self.cap_proj.add_module("fc1", nn.Linear(caption_dim, dim, bias=False))
        self.cap_proj.add_module("act", nn.GELU(approximate="tanh"))
        self.cap_proj.add_module("fc2", nn.Linear(dim, dim, bias=False))
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(captions)


def fused_decode_applies(x: torch.Tensor, rope, mask, cache, training: bool, max_rows: int = MAX_ROWS) -> bool:
    """Whether a step's inputs suit ``cpu_kernels.decode_layers``: a CPU inference decode step of one token a row
    (no mask), at most ``max_rows`` rows (by default the streaming kernel's MAX_ROWS: batch 1-2 with CFG), fp32 or
    bf16, one position's rotary tables, a plain static cache of the rows' dtype with room left, and the kernels
    built. The caller advances the cache, as on the module path."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 3
            and x.shape[1] == 1 and x.shape[0] <= max_rows and mask is None and rope is not None
            and rope[0].dim() == 2 and type(cache) is KVCache and cache.dtype == x.dtype
            and cache.length < cache.max_len and not training and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and fused_decode_enabled() and cpu_kernels() is not None)


def fused_front_applies(x: torch.Tensor, rope, mask, cache, attention: Attention) -> bool:
    """Whether a step's inputs suit ``cpu_kernels.front_layers``: a front of 2+ tokens a row that sees the whole cache
    (``attention.front_kernel_applies``), contiguous, the fused path on, and the kernels built with SwiGLU's gate in
    them for the rows' dtype (the gate as the module path computes it: ``silu_mul_`` where SwiGLU takes it)."""
    if (x.dim() != 3 or not fused_decode_enabled() or not x.is_contiguous()
            or not attention.front_kernel_applies(x, rope, mask, cache)):
        return False
    kernels = cpu_kernels()
    return kernels is not None and gate_kernel_serves(x.dtype, kernels)


def _param_key(module: nn.Module, name: str) -> tuple | None:
    """:func:`~varkit.nn.layers.weight_key` of ``module``'s parameter ``name`` (None when it is None), taken from its
    ``_parameters`` dict where it is registered there, else through the attribute (a plain tensor set in its place)."""
    params = module._parameters
    t = params[name] if name in params else getattr(module, name, None)
    return None if t is None else weight_key(t)


class TransformerBlock(DerivedState, nn.Module):
    # the linears' panel copies for whole-layer front calls (_front_panels): stale after .to(), never pickled
    derived_attrs = ("_front_plan",)

    def __init__(self, cfg: RasterConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_head, resid_dropout=cfg.resid_dropout)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = swiglu_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)
        self.feed_forward = SwiGLU(cfg.dim, hidden, cfg.ffn_dropout)

    def forward(self, x, rope, mask, cache, layer):
        fused = self._fused_decode(x, rope, mask, cache, layer)
        if fused is None:
            fused = self._fused_front(x, rope, mask, cache, layer)
        if fused is not None:
            return fused
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))

    def _fused_decode(self, x, rope, mask, cache, layer) -> torch.Tensor | None:
        """The whole block in one C++ call (``cpu_kernels.decode_layers`` over this one layer) where it applies (see
        :func:`fused_decode_applies` and :meth:`decode_weights`), else None (the module path). A generator's decode
        step runs all its blocks in one such call instead (:meth:`RasterGenerator._fused_blocks`); this serves a
        block called on its own."""
        if not fused_decode_applies(x, rope, mask, cache, self.training):
            return None
        weights = self.decode_weights(x.dtype)
        if weights is None:
            return None
        cos, sin = rope
        out = cpu_kernels().decode_layers(x.reshape(x.shape[0], -1), weights, self.attention_norm.eps,
                                          self.feed_forward.w1.weight.shape[0], [cache.k[layer]], [cache.v[layer]],
                                          cache.length, cos[0].contiguous(), sin[0].contiguous(), False)
        return out.view_as(x)

    def decode_linears(self) -> tuple:
        """The five linears in the order ``decode_layers`` takes their copies: wqkv, wo, w1, w3, w2."""
        att, ffn = self.attention, self.feed_forward
        return att.wqkv, att.wo, ffn.w1, ffn.w3, ffn.w2

    def decode_state(self) -> list:
        """What :meth:`decode_weights` depends on besides the dtype: each linear's weight key, prepacked switch and
        bias key, each norm gain's key, and whether a forward hook is set on the block. Read from the modules' own dicts
        (``_modules``, ``_parameters``): a step asks this of every block, and through ``nn.Module.__getattr__`` (~20
        lookups a block) LlamaGen-B's 12 took 0.38 ms of a bf16 step in a decode loop (its objects out of cache after
        the weights streamed), against 0.20 here (0.2 ms and 0.05 back to back)."""
        mods = self._modules
        att, ffn = mods["attention"]._modules, mods["feed_forward"]._modules
        state: list = [(_param_key(lin, "weight"), getattr(lin, "prepacked", False), _param_key(lin, "bias"))
                       for lin in (att["wqkv"], att["wo"], ffn["w1"], ffn["w3"], ffn["w2"])]
        state += [_param_key(mods["attention_norm"], "weight"), _param_key(mods["ffn_norm"], "weight"),
                  bool(self._forward_hooks or self._forward_pre_hooks)]
        return state

    def decode_weights(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The seven tensors ``decode_layers`` takes for this block (the two norm gains, the five linears' blocked
        copies) where its fused decode serves rows of ``dtype``: every linear prepacked, without a bias, of that
        dtype with a blocked layout; plain attention (no q bias, no q/k normalization); norms of that dtype.
        Else None."""
        att = self.attention
        linears = self.decode_linears()
        if (att.q_bias is not None or att.qk_l2norm
                or any(not getattr(lin, "prepacked", False) or lin.bias is not None or lin.weight.dtype != dtype
                       for lin in linears)
                or self.attention_norm.weight.dtype != dtype or self.ffn_norm.weight.dtype != dtype
                or self.ffn_norm.eps != self.attention_norm.eps):  # the kernel takes one eps
            return None
        blocked = [lin._blocked_weight() for lin in linears]
        if any(b is None for b in blocked):
            return None
        return [self.attention_norm.weight, self.ffn_norm.weight, *blocked]

    def front_weights(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The seven tensors ``front_layers`` (and ``decode_layers`` over panels) takes for this block: the two norm
        gains and the five linears' panel copies for ``x``'s rows, where each linear would run them on the panel
        kernel, leaving the step's own conditions aside (those the caller checks once). Else None."""
        att = self.attention
        if (att.q_bias is not None or att.qk_l2norm or att.head_dim % 2
                or self.attention_norm.weight.dtype != x.dtype or self.ffn_norm.weight.dtype != x.dtype
                or self.ffn_norm.eps != self.attention_norm.eps):
            return None
        panels = self._front_panels(x)
        return None if panels is None else [self.attention_norm.weight, self.ffn_norm.weight, *panels]

    def _front_panels(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The five linears' panel copies (wqkv, wo, w1, w3, w2) when each would run ``x``'s rows on the panel kernel
        without a bias (:meth:`~varkit.nn.layers.Linear.panels_for`), else None. Kept per dtype and row range until a
        weight changes: asking each linear costs ~30 us a layer, a front's whole layer 0.3-1.3 ms (NAR-B)."""
        linears = self.decode_linears()
        rows = x.numel() // x.shape[-1]
        key = (x.dtype, panel_rows(rows), panel_dtypes(), weight_arena.generation(),
               *(weight_key(lin.weight) for lin in linears), *(lin.prepacked for lin in linears))
        cached = self.__dict__.get("_front_plan")
        # a copy made since the last gathering is asked for again: panels_for moves them all into one buffer
        if cached is None or cached[0] != key or weight_arena.is_pending(linears[0], "_panels"):
            panels = None
            if all(lin.bias is None for lin in linears):
                panels = [lin.panels_for(x) for lin in linears]
                if any(p is None for p in panels):
                    panels = None
            cached = (key, panels)
            self.__dict__["_front_plan"] = cached
        return cached[1]

    def _fused_front(self, x, rope, mask, cache, layer) -> torch.Tensor | None:
        """The whole block in one C++ call (``cpu_kernels.front_layers`` over this one layer) where it applies
        (:func:`fused_front_applies`, :meth:`front_weights`): a front of 2+ new tokens a row that sees the whole cache
        (NAR's one-front steps: the attention's ``attend_front``) with every linear on the panel kernel
        (:meth:`~varkit.nn.layers.Linear.panels_for`), no biases. Same ops and roundings as the module path
        (RMSNorm, the five linears, ``attend_front``, ``silu_mul_``, the residual sums, these added in the linears'
        stores), so the same numbers, without the ~0.1 ms of Python and small ops a layer of the module path and
        with w1's and w3's input packed once (NAR-B bf16 batch 1, one Zen 4 core: ~7 % faster). Else None (the
        module path). A generator's front step runs its blocks in one such call instead
        (:meth:`RasterGenerator._fused_blocks`); this serves a block called on its own."""
        if not fused_front_applies(x, rope, mask, cache, self.attention):
            return None
        weights = self.front_weights(x)
        if weights is None:
            return None
        return cpu_kernels().front_layers(x, weights, self.attention_norm.eps, self.feed_forward.w1.weight.shape[0],
                                          rope[0], rope[1], [cache.k[layer]], [cache.v[layer]], cache.length,
                                          self.attention.head_dim ** -0.5)


class _StaticRowsStep(nn.Module):
    """``gen.decode_rows`` as a module, so that inductor's freezing sees the weights as parameters."""

    def __init__(self, gen: "RasterGenerator"):
        super().__init__()
        self.gen = gen

    def forward(self, tokens: torch.Tensor, steps: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        return self.gen.decode_rows(tokens, steps, keys, values)


@register_module
class RasterGenerator(Generator):
    """LlamaGen-architecture generator on a raster (or, for NAR's backbone, another) layout."""

    config_class = RasterConfig
    # the blocks' one-call plans (_fused_blocks): stale after .to(), never pickled
    derived_attrs = Generator.derived_attrs + ("_block_plans",)

    def __init__(self, config: RasterConfig):
        super().__init__(config)
        c = config
        self.layout: Layout = build_layout(c.layout, (c.grid, c.grid))
        self.num_classes = c.num_classes
        self.head = head_from_config(c, c.dim)
        if c.caption_dim > 0:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, c.cls_token_num)
        else:
            if c.cls_token_num != 1:
                raise InvalidArgumentError("class-conditional models use exactly one condition token")
            self.cls_embedding = LabelEmbedder(c.num_classes, c.dim)
        self.tok_embeddings = self.head.input_embedding(c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = self.head.output_layer(c.dim)
        # Rotary rows: condition prefix (zeros, as LlamaGen), then token i at cond_len + i.
        coords = self.layout.coords
        angles = rope_angles_2d(coords[:, 0], coords[:, 1], c.dim // c.n_head, c.rope_base)
        angles = torch.cat([angles.new_zeros(c.cls_token_num, angles.shape[1]), angles])
        self.rope = RotaryTable(angles, zero_rows=c.cls_token_num)
        self.register_buffer("token_steps", self.layout.step_of.clone(), persistent=False)
        # per cache position: its layout step (-1 for the condition prefix), and every step's first layout index
        self.register_buffer("position_steps", torch.cat([self.layout.step_of.new_full((c.cls_token_num,), -1), self.layout.step_of]),
                             persistent=False)
        self.register_buffer("step_starts", torch.tensor(self.layout.step_starts), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's init: normal(0.02) for linear and embedding weights, zero output head.

        The token head's own network (a diffusion MLP) keeps its own init."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not name.startswith("head."):
                nn.init.normal_(m.weight, std=0.02)
        if isinstance(self.output, nn.Linear):
            nn.init.zeros_(self.output.weight)

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Config fields a trained tokenizer fixes."""
        return {**token_fields_for_tokenizer(tokenizer), "grid": resolution // tokenizer.downsample}

    # -- contract: conditions and cache ----------------------------------------------------------
    @property
    def cond_len(self) -> int:
        return self.config.cls_token_num

    @property
    def is_text_conditional(self) -> bool:
        return self.config.caption_dim > 0

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        if self.is_text_conditional:
            null = self.cls_embedding.uncond_embedding.to(cond.dtype).expand_as(cond)
            # padded caption rows (all zeros) stay zero, so the null half is padded like the caption
            # half (LlamaGen masks both halves with the same emb_masks; padded rows are never read)
            return torch.where(cond.ne(0).any(-1, keepdim=True), null, torch.zeros_like(null))
        return torch.full_like(cond, self.num_classes)

    def caption_mask(self, cond: torch.Tensor) -> torch.Tensor | None:
        """(B, T) True for real caption tokens; None when nothing is padded (or class-conditional).

        Padded tokens are the all-zero rows of the caption embeddings, as LlamaGen's
        ``sample_t2i.py`` makes them (``caption_embs * emb_masks``). Like LlamaGen's
        ``emb_masks``, no position attends to a padded token except that token itself.
        """
        if not self.is_text_conditional:
            return None
        valid = cond.ne(0).any(-1)
        return None if bool(valid.all()) else valid

    @staticmethod
    def _mask_padded_captions(mask, queries: range, n_keys: int, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1, nq, n_keys) mask: ``mask`` (or all-visible) without padded caption keys, plus the diagonal."""
        dev = valid.device
        keys_ok = torch.cat([valid, valid.new_ones(valid.shape[0], n_keys - valid.shape[1])], 1)[:, None, None, :]
        base = torch.ones(len(queries), n_keys, dtype=torch.bool, device=dev) if mask is None else mask.to(dev)
        q = torch.arange(queries.start, queries.stop, device=dev)
        eye = torch.arange(n_keys, device=dev)[None, :] == q[:, None]
        return (base & keys_ok) | eye

    def check_condition(self, cond: torch.Tensor) -> None:
        if self.is_text_conditional:
            want = (self.config.cls_token_num, self.config.caption_dim)
            if cond.dim() != 3 or tuple(cond.shape[1:]) != want:
                raise InvalidArgumentError(
                    f"caption embeddings must have shape (B, {want[0]}, {want[1]}), got {tuple(cond.shape)}; "
                    "pad or truncate the text encoder's output to that many tokens"
                )
            return
        check_class_ids(cond, self.num_classes)

    def cache_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer, c.n_head, c.dim // c.n_head

    def max_cache_len(self) -> int:
        return self.cond_len + self.layout.num_tokens

    # -- the transformer ---------------------------------------------------------------------------
    def _run(self, h: torch.Tensor, positions: slice, mask, cache: KVCache | None) -> torch.Tensor:
        """Run the blocks on embeddings ``h`` placed at cache ``positions``; return final hidden."""
        h = self.tok_dropout(h)
        rope = self.rope(positions)
        h = self._run_blocks(h, rope, mask, cache, 0, len(self.layers))
        if cache is not None:
            cache.advance(h.shape[1])
        return h

    def _run_blocks(self, h: torch.Tensor, rope, mask, cache, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` on ``h``: in one C++ call where :meth:`_fused_blocks` applies, else one by
        one."""
        fused = self._fused_blocks(h, rope, mask, cache, start, stop)
        if fused is not None:
            return fused
        for i in range(start, stop):
            h = self.layers[i](h, rope, mask, cache, i)
        return h

    def _fused_blocks(self, h: torch.Tensor, rope, mask, cache, start: int, stop: int) -> torch.Tensor | None:
        """Blocks ``start .. stop - 1`` of a step in one C++ call where each block's own fused call applies: a decode
        step of one token a row (``cpu_kernels.decode_layers``: :func:`fused_decode_applies`,
        :meth:`TransformerBlock.decode_weights`; past 2 rows, batch 2+ with CFG, the linears on the panel kernel as on
        the module path at those rows, :meth:`TransformerBlock.front_weights`) or a front of 2+ tokens a row that sees
        the whole cache (``front_layers``: NAR's one-front steps, :meth:`TransformerBlock.front_weights`); the blocks
        share their norms' eps and FFN width, and no forward hook is set on a block or globally (a hook sees its
        block's call). Else None. The same kernel code a layer as a block's own call (and, on the panels, as the
        module path), so the same numbers, without the Python and checks between layers: in a decode loop a block's
        call cost ~0.1 ms of it (LlamaGen-B, its objects out of cache after the weights streamed); at batch 8 the
        module path's ~40 small ops a block too (LlamaGen-B batch 8: bf16 14-17 % faster, fp32 14 %). The weights
        are kept as a plan per (kind, blocks) until its key changes (:meth:`_plan_key`); a plan over copies about
        to be gathered into the weight arena is not kept."""
        if (torch.compiler.is_compiling() or type(cache) is not KVCache or len(cache.k) != len(self.layers)
                or _global_forward_hooks or _global_forward_pre_hooks or stop <= start):
            return None
        blocks = list(self.layers._modules.values())[start:stop]
        rows = h.numel() // h.shape[-1]
        if h.shape[1] == 1:
            if not fused_decode_applies(h, rope, mask, cache, self.training, max_rows=panel_max_rows()):
                return None
            # 1-2 rows on the blocked copies, more on the panels, as prepacked linears split them. LlamaGen-B batch 2
            # with CFG (4 rows), same process: fp32 5.21-5.70 s an image pair on the panels against 6.39-7.21 on the
            # blocked copies (two rows of x of K = 2048 already fill 16 KiB of L1), bf16 2.71-3.60 against 3.00-3.47
            if rows <= STREAM_MAX_ROWS:
                kind = "decode"
            elif panel_rows(rows) and h.dtype in panel_dtypes():
                kind = ("decode", panel_rows(rows), panel_dtypes())
            else:
                return None
        else:
            if not fused_front_applies(h, rope, mask, cache, blocks[0].attention):
                return None
            kind = ("front", panel_rows(rows), panel_dtypes())
        plans = self.__dict__.setdefault("_block_plans", {})
        key = self._plan_key(kind, h.dtype, blocks)
        plan = plans.get((kind, start, stop))
        if plan is None or plan[0] != key:
            weights = self._plan_weights(blocks, h, blocked=kind == "decode")
            key = self._plan_key(kind, h.dtype, blocks)  # asking for the copies may have gathered them
            copies = "_blocked" if kind == "decode" else "_panels"
            if not any(weight_arena.is_pending(lin, copies) for b in blocks for lin in b.decode_linears()):
                plans[(kind, start, stop)] = (key, weights)
            plan = (key, weights)
        weights = plan[1]
        if weights is None:
            return None
        cos, sin = rope
        first = blocks[0]
        eps, hidden = first.attention_norm.eps, first.feed_forward.w1.weight.shape[0]
        if h.shape[1] == 1:
            out = cpu_kernels().decode_layers(h.reshape(h.shape[0], -1), weights, eps, hidden, cache.k[start:stop],
                                              cache.v[start:stop], cache.length, cos[0].contiguous(),
                                              sin[0].contiguous(), kind != "decode")
            return out.view_as(h)
        return cpu_kernels().front_layers(h, weights, eps, hidden, cos, sin, cache.k[start:stop], cache.v[start:stop],
                                          cache.length, first.attention.head_dim ** -0.5)

    @staticmethod
    def _plan_key(kind, dtype: torch.dtype, blocks: list) -> tuple:
        """What a plan of :meth:`_fused_blocks` depends on: the kind of step, the rows' dtype, the arena's
        generation, and each block's :meth:`~TransformerBlock.decode_state` (the blocks listed afresh, so a block or
        linear swapped in is seen)."""
        return kind, dtype, weight_arena.generation(), [block.decode_state() for block in blocks]

    @staticmethod
    def _plan_weights(blocks: list, h: torch.Tensor, blocked: bool) -> list[torch.Tensor] | None:
        """The blocks' :meth:`~TransformerBlock.decode_weights` (``blocked``: one token a row, 1-2 rows) or
        :meth:`~TransformerBlock.front_weights` (the panel copies for ``h``'s rows: fronts, and decode steps of more
        rows) end to end, or None where one block has none or the blocks differ in norm eps or FFN width (one call
        takes one of each)."""
        first = blocks[0]
        weights = []
        for block in blocks:
            if block._forward_hooks or block._forward_pre_hooks:
                return None
            w = block.decode_weights(h.dtype) if blocked else block.front_weights(h)
            if (w is None or block.attention_norm.eps != first.attention_norm.eps
                    or block.feed_forward.w1.weight.shape[0] != first.feed_forward.w1.weight.shape[0]):
                return None
            weights += w
        return weights

    def hidden_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    def _mask(self, token_idx: slice, past: int, device) -> torch.Tensor | None:
        """Block-causal mask of new inputs ``token_idx`` over ``past`` cached + the new keys."""
        steps = self.token_steps[token_idx]
        if steps.numel() == 1:
            return None
        new = block_causal_mask(steps, steps)
        return torch.cat([new.new_ones(new.shape[0], past), new], 1).to(device)

    def _cond_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        p = self.tok_embeddings.weight
        if self.is_text_conditional:
            cond = cond.to(p.dtype)
        return self.cls_embedding(cond).to(p.dtype)

    # -- contract: decoding ----------------------------------------------------------------------------
    def prefill_hidden(self, cond: torch.Tensor, cache: KVCache, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state of the last condition token, after writing the prefix into ``cache``.

        ``caption_mask``: :meth:`caption_mask` of ``cond`` (None: no padded caption tokens).
        """
        self.check_condition(cond)
        if cache.length != 0:
            raise InvalidArgumentError("prefill needs an empty KVCache")
        h = self._cond_embeddings(cond)
        n = h.shape[1]
        mask = None if n == 1 else torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        if caption_mask is not None:
            mask = self._mask_padded_captions(mask, range(0, n), n, caption_mask)
        return self._run(h, slice(0, n), mask, cache)[:, -1:]

    def prefill(self, cond: torch.Tensor, cache: KVCache, order=None, layout=None) -> tuple[torch.Tensor, Any]:
        """Logits of step 0; the state is the caption padding mask (None for classes / no padding)."""
        caption_mask = self.caption_mask(cond)
        return self.hidden_to_logits(self.prefill_hidden(cond, cache, caption_mask)), caption_mask

    def forward_hidden(self, tokens: torch.Tensor, step: int, cache: KVCache,
                       caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of input ``tokens`` (steps ``step-1 …``), written into ``cache``.

        ``caption_mask``: the state :meth:`prefill` returned (padded caption tokens stay hidden).
        """
        start = self._check_cache_at(step, cache)
        n = tokens.shape[1]
        idx = slice(start, start + n)
        mask = self._mask(idx, cache.length, tokens.device)
        if caption_mask is not None:
            mask = self._mask_padded_captions(mask, range(cache.length, cache.length + n), cache.length + n, caption_mask)
        pos = slice(self.cond_len + start, self.cond_len + start + n)
        return self._run(self.tok_embeddings(tokens), pos, mask, cache)

    def _check_cache_at(self, step: int, cache: KVCache) -> int:
        """Layout index of the first input token of ``step``, after checking the cache is filled up to it."""
        start = self.layout.step_starts[step - 1]
        if cache.length != self.cond_len + start:
            raise InvalidArgumentError(
                f"cache holds {cache.length} positions but step {step} needs {self.cond_len + start}; "
                "roll back with gen.rollback before re-feeding"
            )
        return start

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: Any = None) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled_step")
        if (compiled is not None and tokens.shape[1] == 1 and state is None and cache.length < cache.max_len
                and not self.training and not torch.is_grad_enabled()):
            self._check_cache_at(step, cache)
            # a 0-dim step: every row at this step (one indexed cache write a layer instead of a per-row scatter)
            logits = compiled(tokens, torch.full((), step, dtype=torch.long, device=tokens.device), cache.k, cache.v)
            cache.advance(1)
            return logits
        return self.hidden_to_logits(self.forward_hidden(tokens, step, cache, state))

    # -- per-row steps (the static-shape step compiled decoding runs) ------------------------------------
    @property
    def supports_rows(self) -> bool:
        """Per-row steps need one token a step (raster); NAR's subclass has its own fronts."""
        return self.layout.single_token_steps and not getattr(self, "is_dd_student", False)

    def forward_rows(self, tokens: torch.Tensor, steps: torch.Tensor, cache: KVCache, state: Any = None) -> torch.Tensor:
        """Every row at its own step (see ``Generator.forward_rows``); outputs j of row b are the logits of layout
        token ``steps[b] + j``. ``state``: :meth:`prefill`'s caption mask, or a (B, T) one of copied-in rows."""
        self.check_rows(tokens, steps, cache)
        steps = steps.to(tokens.device, torch.long)
        if state is not None and (state.dtype != torch.bool or tuple(state.shape) != (steps.shape[0], self.cond_len)):
            raise InvalidArgumentError(f"forward_rows takes prefill's caption mask (B, {self.cond_len}) as its state, "
                                       f"got {getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}")
        compiled = self.__dict__.get("_compiled_step")
        if compiled is not None and state is None and not self.training and not torch.is_grad_enabled():
            return compiled(tokens, steps, cache.k, cache.v)
        return self.decode_rows(tokens, steps, cache.k, cache.v, state)

    def decode_rows(self, tokens: torch.Tensor, steps: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor], caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_rows` on a cache's buffers ``keys``/``values``, unchecked, with static shapes.

        Row b's n inputs sit at cache positions ``cond_len + step_starts[steps[b] - 1] + j``: their keys and
        values are written there (past ``max_len``: dropped) and attention reads all ``max_len`` positions
        under the per-row mask of :meth:`_rows_mask`, so one ``torch.compile`` graph serves every step of every
        row for one (batch, n). Nothing here reads or moves the cache's length pointer. A 0-dim ``steps`` puts
        every row at that step, whose inputs must lie below ``max_len`` (raster's one-token ``forward``): one
        indexed write a layer instead of the per-row scatter (a tenth of a step's kernels on a GPU).
        """
        n = tokens.shape[1]
        uniform = steps.dim() == 0
        steps = steps.reshape(1) if uniform else steps
        first = self.cond_len + self.step_starts[steps - 1]  # (B,) or (1,) cache position of each row's first input
        pos = first[:, None] + torch.arange(n, device=tokens.device)  # (B, n) or (1, n)
        mask = self._rows_mask(pos, first + n, keys[0].shape[2], caption_mask)
        h = self._run(self.tok_embeddings(tokens), pos.clamp(max=self.max_cache_len() - 1), mask,
                      IndexedKV(keys, values, pos[0] if uniform else pos))
        return self._rows_outputs(h, steps)

    def _rows_mask(self, pos: torch.Tensor, end: torch.Tensor, max_len: int,
                   caption_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, n, max_len): a query sees the condition prefix and the keys of layout steps up to its own,
        among positions below its row's fed end ``end`` (B,): block-causal, and blind to stale entries."""
        table = self.position_steps
        size = table.shape[0]
        if max_len > size:  # a cache longer than the layout: positions past it are never visible
            table = torch.cat([table, table.new_full((max_len - size,), self.layout.num_steps)])
        key_steps, q_steps = table[:max_len], table[pos.clamp(max=size - 1)]
        keys = torch.arange(max_len, device=pos.device)
        mask = (key_steps[None, None, :] <= q_steps[:, :, None]) & (keys[None, None, :] < end[:, None, None])
        if caption_mask is not None:  # padded caption tokens stay hidden (as in prefill and forward)
            T = caption_mask.shape[1]
            mask = mask & torch.cat([caption_mask, caption_mask.new_ones(caption_mask.shape[0], max_len - T)], 1)[:, None, :]
        return mask[:, None]

    def _rows_outputs(self, h: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Outputs of the targets from layout token ``step_starts[steps]`` on: raster's input j predicts its successor."""
        return self.hidden_to_logits(h)

    def decode_static(self, tokens: torch.Tensor, index: torch.Tensor, keys: list[torch.Tensor],
                      values: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, 1, V) after one input token per row at cache position ``index`` (a (1,) tensor):
        :meth:`decode_rows` with every row at the same step."""
        steps = (index.long() - self.cond_len + 1).expand(tokens.shape[0])
        return self.decode_rows(tokens, steps, keys, values)

    def compile_decoding(self, max_autotune: bool = True, inductor: bool | None = None) -> "RasterGenerator":
        """Decode steps through ``torch.compile`` (inductor); opt-in, returns ``self``.

        Why: at batch 1 a decode step is hundreds of small ops around a few matrix-vector products.
        Inductor fuses the small ops, and with ``freezing`` prepacks the weights for its own GEMM
        kernels (``max_autotune`` lets it pick them: AMX / AVX-512 where the CPU has them; not for
        fp32 on the CPU, where MKL's GEMVs are faster).
        :meth:`decode_rows` keeps shapes static, so there is one compile per (batch, inputs per row): raster's
        one-token ``forward`` steps, NAR's one-front ``forward`` steps (padded to the widest front) and
        :meth:`forward_rows` of a fixed width (a speculative verify window) each take one graph; the first call
        of each compiles (tens of seconds for GPT-B). Prefill, other multi-token ``forward`` calls, captions
        with padding, training and grad-enabled calls stay eager. The compiled
        step froze the weights as they are now: ``.to()`` and ``load_state_dict`` drop it (decoding
        is eager again until the next call); other in-place weight edits need a new call. Compiled
        CPU kernels keep the thread count of the compile.
        """
        if not self.supports_rows:
            raise InvalidArgumentError(
                f"compiled decoding covers one token a step (raster layout) and NAR's fronts; this model's layout "
                f"is {self.layout.kind}: decode it eagerly")
        from ..compiled import compile_step

        step = compile_step(_StaticRowsStep(self), max_autotune, inductor)
        self._set_compiled_step(step)
        return self

    def rollback(self, cache: KVCache, state: Any, step: int) -> None:
        cache.truncate(self.cond_len + self.layout.step_starts[step - 1])

    # -- training ------------------------------------------------------------------------------------
    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One pass over ``[cond] + tokens[:, :-1]``; logits (B, n, V) for tokens 0..n-1.

        ``tokens`` may be a prefix of the layout (n <= N).
        """
        h = torch.cat([self._cond_embeddings(cond), self.tok_embeddings(tokens[:, :-1])], 1)
        L = h.shape[1]
        # condition tokens are causal among themselves (negative steps), image tokens by step
        steps = torch.cat([torch.arange(self.cond_len, device=h.device) - self.cond_len, self.token_steps[: tokens.shape[1] - 1]])
        mask = block_causal_mask(steps, steps)
        caption_mask = self.caption_mask(cond)
        if caption_mask is not None:
            mask = self._mask_padded_captions(mask, range(0, L), L, caption_mask)
        h = self._run(h, slice(0, L), mask, None)
        return self.hidden_to_logits(h[:, self.cond_len - 1:])
