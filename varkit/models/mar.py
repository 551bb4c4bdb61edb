"""Masked generator with MAR's architecture (LTH14/mar), on the ``sets`` layout.

A bidirectional ViT encoder/decoder. The encoder sees ``buffer_size`` slots holding the class
embedding plus the tokens known so far; the decoder puts a learned mask token at every unknown
position and returns one output per position: MAR's conditioning vector z for a diffusion head,
logits for a categorical head (MaskGIT-style). Each image is decoded in its own random order,
revealed by MAR's cosine schedule (:func:`varkit.layout.sets`); every step re-encodes all known
tokens (no KV reuse), exactly what MAR's ``sample_tokens`` computes.

Parameter names are MAR's (``class_emb``, ``fake_latent``, ``z_proj``, ``encoder_blocks.{i}.attn.qkv``
…); MAR's ``diffloss.net.*`` is ``head.net.*``, so published checkpoints convert by a prefix
rename (:mod:`varkit.checkpoints.mar`). The null class (id ``num_classes``) is MAR's ``fake_latent``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from ..layout import Layout, sets
from ..modeling import register_module
from ..nn.layers import Linear
from .base import ClassConditional, Generator, check_row_steps, latent_side, token_fields_for_tokenizer
from .heads import HeadConfig, head_from_config


@dataclass
class MARConfig(HeadConfig):
    """MAR's hyper-parameters; the head fields (``head``, ``token_dim``, ``head_depth``…) come from HeadConfig.

    ``head_batch_mul`` is MAR's ``diffusion_batch_mul``; ``num_iter`` the default number of decode steps.
    """

    head: str = "diffusion"
    token_dim: int = 16
    vocab_size: int = 0  # categorical heads only
    grid: int = 16
    num_classes: int = 1000
    encoder_dim: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_dim: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7
    num_iter: int = 64
    grad_checkpointing: bool = False


# -- timm's ViT block, with timm's parameter names ------------------------------------------------
class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv (bias) and SDPA; bidirectional (a key mask only for padding)."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        if dim % heads:
            raise InvalidArgumentError(f"width {dim} is not divisible by {heads} attention heads")
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output for every position, or only for query ``rows`` (B, n) (keys: all positions, or
        those where ``key_mask`` (B, L) is True: padded rows of a batch of different lengths)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rows is not None:
            q = q.gather(2, rows[:, None, :, None].expand(B, self.heads, rows.shape[1], q.shape[-1]))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, -1, C)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=True)
        self.fc2 = Linear(hidden, dim, bias=True)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class ViTBlock(nn.Module):
    """Pre-norm ViT block (timm's ``Block``: LayerNorm eps 1e-6, GELU MLP) with timm's parameter names."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block on ``x`` (B, L, C); with ``rows`` (B, n) only those positions come out (B, n, C);
        ``key_mask`` (B, L): the positions attended to (None: all)."""
        h = self.attn(self.norm1(x), rows, key_mask)
        x = x if rows is None else x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        x = x + h
        return x + self.mlp(self.norm2(x))


# -- decoding state ----------------------------------------------------------------------------------
@dataclass
class MARState:
    """What a MAR decode carries between steps: no KV cache, the known tokens themselves.

    ``tokens`` (B', N, *token_shape) hold the sampled tokens in grid (row-major) order, ``known``
    (B', N) marks them, ``step`` is the last step whose outputs were returned (``forward``; under
    ``forward_rows`` each row is at its own step, which the caller tracks: ``step`` and ``known`` are not kept).
    ``positions`` (B', N): the grid position of each layout token (``order`` sorted within each step).
    """

    cond: torch.Tensor
    order: torch.Tensor
    layout: Layout
    tokens: torch.Tensor
    known: torch.Tensor
    step: int = 0
    positions: torch.Tensor | None = None

    def copy_rows(self, rows: torch.Tensor, src: "MARState") -> None:
        """Rows ``rows`` of this state become ``src``'s rows (in order): new images admitted into free slots."""
        if not isinstance(src, MARState) or src.layout.step_sizes != self.layout.step_sizes:
            raise InvalidArgumentError("MAR admits rows only from a state of the same layout (prefill with layout=)")
        rows = rows.to(self.order.device)
        for name in ("cond", "order", "tokens", "known", "positions"):
            getattr(self, name)[rows] = getattr(src, name).to(getattr(self, name).device)


@register_module
class MARGenerator(ClassConditional, Generator):
    """MAR's masked encoder/decoder on the ``sets`` layout, with any head (diffusion: MAR; categorical: MaskGIT)."""

    config_class = MARConfig
    class_ids_of = "MAR"  # the null class id num_classes is MAR's fake_latent (not a row of class_emb)
    # several steps at once: each step's own prefix, the prefixes run as one padded batch (speculative samplers)
    supports_multistep = True
    supports_rollback = True
    supports_rows = True  # forward_rows: every row at its own step (one prefix per (row, step), one padded batch)
    rows_wanted = True  # forward_rows(wanted=): a prefix per step costs a whole pass, so only the wanted ones run

    def __init__(self, config: MARConfig):
        super().__init__(config)
        c = config
        _check_config(c)
        N, E, Dd, S = c.grid * c.grid, c.encoder_dim, c.decoder_dim, c.buffer_size
        self.layout: Layout = sets(c.grid, c.grid, c.num_iter)
        self.num_classes = c.num_classes
        self.head = head_from_config(c, Dd)
        # encoder: class embedding (its null is ``fake_latent``), token projection, buffer + tokens
        self.class_emb = nn.Embedding(c.num_classes, E)
        self.fake_latent = nn.Parameter(torch.zeros(1, E))
        self.z_proj = self.head.input_embedding(E)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + N, E))
        self.encoder_blocks = nn.ModuleList(
            ViTBlock(E, c.encoder_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(E, eps=1e-6)
        # decoder: mask tokens at unknown positions, then the head's input per position
        self.decoder_embed = Linear(E, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + N, Dd))
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(Dd, c.decoder_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, N, Dd))
        self.output = self.head.output_layer(Dd)  # Identity for a diffusion head (z is its condition)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's init: normal(0.02) embeddings and learned tokens, xavier-uniform linears with zero bias,
        unit LayerNorms. The head's own network keeps its own init."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("head."):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding) and m is not self.class_emb:
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Grid and token fields a trained tokenizer fixes; the other token field is zeroed, so a VQ
        tokenizer under a diffusion-head config (or a KL one under a categorical config) fails clearly."""
        grid = latent_side(tokenizer, resolution)
        fields = token_fields_for_tokenizer(tokenizer)
        fields = {"token_dim": 0, **fields} if "vocab_size" in fields else {"vocab_size": 0, **fields}
        return {**fields, "grid": grid}

    # -- contract: conditions, cache, layouts ------------------------------------------------------------
    @property
    def cond_len(self) -> int:
        return self.config.buffer_size

    def new_cache(self, batch: int, max_len: int | None = None) -> None:
        """None: MAR re-encodes every known token each step, there is nothing to cache."""
        return None

    def sampling_layout(self, num_iter: int | None = None) -> Layout:
        """The ``sets`` layout over ``num_iter`` steps (None: the config's ``num_iter``), 1 <= num_iter <= N."""
        if num_iter is None or num_iter == self.layout.num_steps:
            return self.layout
        N = self.layout.num_tokens
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or not 1 <= num_iter <= N:
            raise InvalidArgumentError(f"num_iter must be an integer in 1..{N} (this model's token count), got {num_iter}")
        return sets(self.config.grid, self.config.grid, num_iter)

    # -- the network ---------------------------------------------------------------------------------
    def class_embedding(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, E) class embeddings; id ``num_classes`` is ``fake_latent``."""
        emb = self.class_emb(cond.clamp(0, self.num_classes - 1))
        return torch.where((cond == self.num_classes)[:, None], self.fake_latent.to(emb.dtype), emb)

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, None, key_mask, use_reentrant=False)
            else:
                x = blk(x, None, key_mask)
        return x

    def encode(self, cond: torch.Tensor, tokens: torch.Tensor, known: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S + K, E) for the buffer and the tokens (B, K, ...) at grid positions ``known`` (B, K).

        As MAR's ``forward_mae_encoder``: buffer slots = class embedding, + position embedding, LayerNorm,
        then only buffer + known tokens through the blocks (``known`` sorted: MAR keeps grid order).
        ``valid`` (B, K): rows padded to a common K mark their real tokens; the padding is never attended to.
        """
        S = self.config.buffer_size
        pos = self.encoder_pos_embed_learned[0]
        cls = self.class_embedding(cond)
        x = cls[:, None, :] + pos[:S]
        if known.shape[1]:
            if tokens.is_floating_point():
                tokens = tokens.to(self.encoder_pos_embed_learned.dtype)
            x = torch.cat([x, self.z_proj(tokens) + pos[S + known]], 1)
        x = self.z_proj_ln(x)
        key_mask = None if valid is None else torch.cat([valid.new_ones(valid.shape[0], S), valid], 1)
        return self.encoder_norm(self._blocks(self.encoder_blocks, x, key_mask))

    def decode(self, h: torch.Tensor, known: torch.Tensor, rows: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Head inputs (B, N, C) at every position, or (B, n, C) at grid positions ``rows`` (B, n), as
        MAR's ``forward_mae_decoder``: mask tokens re-inserted, decoder blocks, + ``diffusion_pos_embed``.
        ``valid`` (B, K): as :meth:`encode`; padded slots are dropped before the decoder."""
        S, N = self.config.buffer_size, self.layout.num_tokens
        x = self.decoder_embed(h)
        B, C = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, S + N + (valid is not None), C).clone()
        full[:, :S] = x[:, :S]
        if known.shape[1]:
            dest = S + known if valid is None else torch.where(valid, S + known, S + N)  # padding → a spare slot
            full.scatter_(1, dest[..., None].expand(-1, -1, C), x[:, S:])
        full = full[:, :S + N]
        x = full + self.decoder_pos_embed_learned
        if rows is None:
            x = self.decoder_norm(self._blocks(self.decoder_blocks, x))[:, S:] + self.diffusion_pos_embed_learned
        else:
            # only ``rows`` are read: the last block computes its queries and MLP for them alone
            x = self._blocks(self.decoder_blocks[:-1], x)
            x = self.decoder_norm(self.decoder_blocks[-1](x, S + rows)) + self.diffusion_pos_embed_learned[0][rows]
        out = self.output(x)
        # logits are sampled in fp32; a continuous head's z feeds the head's own network (same dtype as ours)
        low = out.dtype in (torch.float16, torch.bfloat16)
        return out.float() if low and self.head.kind == "categorical" else out

    # -- contract: decoding ------------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache: Any = None, order: torch.Tensor | None = None,
                layout: Layout | None = None) -> tuple[torch.Tensor, MARState]:
        """Outputs (B', n_0, C) of step 0 (nothing known yet) for per-image permutations ``order`` (B', N)."""
        self.check_condition(cond)
        layout = self._check_layout(layout)
        N = layout.num_tokens
        if order is None:
            raise InvalidArgumentError("MAR decodes each image in its own random order: pass order= (B, N) permutations")
        if tuple(order.shape) != (cond.shape[0], N):
            raise InvalidArgumentError(f"order must have shape {(cond.shape[0], N)} (one permutation per row), got {tuple(order.shape)}")
        dev = self.fake_latent.device
        order = order.to(dev, torch.long)
        dtype = self.head.token_dtype
        if dtype.is_floating_point:  # latents are kept at least as precise as the weights (fp64 runs stay fp64)
            dtype = torch.promote_types(dtype, self.fake_latent.dtype)
        tokens = torch.zeros(cond.shape[0], N, *self.head.token_shape, dtype=dtype, device=dev)
        known = torch.zeros(cond.shape[0], N, dtype=torch.bool, device=dev)
        positions = torch.cat([layout.index(s, order) for s in range(layout.num_steps)], 1)
        state = MARState(cond.to(dev), order, layout, tokens, known, 0, positions)
        return self._outputs(state), state

    def forward(self, tokens: torch.Tensor, step: int, cache: Any = None, state: MARState | None = None) -> torch.Tensor:
        """Store ``tokens`` (B', m, ...) of steps ``step-1 … step+k-2`` (each step's tokens in layout order,
        concatenated), re-encode, return the outputs of steps ``step … step+k-1`` (concatenated).

        Step j's outputs see exactly the tokens of the steps before j, as k one-step calls would: the
        encoder is bidirectional, so each step gets its own prefix, and the k prefixes run as one batch
        (padded to the longest, padding masked out of attention). k = 1 is MAR's own step."""
        if not isinstance(state, MARState):
            raise InvalidArgumentError("MAR's forward needs the state prefill returned")
        lay = state.layout
        if step != state.step + 1 or step >= lay.num_steps:
            raise InvalidArgumentError(
                f"MAR decodes one step at a time from its state (or several, given all their tokens): after step "
                f"{state.step} of {lay.num_steps} the next call is step {state.step + 1}, got {step} "
                "(gen.rollback goes back)")
        k = _steps_covered(lay, step, tokens.shape[1])
        prev = torch.cat([lay.index(j, state.order) for j in range(step - 1, step - 1 + max(k, 1))], 1)
        want = (*prev.shape, *self.head.token_shape)
        if k == 0 or step + k - 1 >= lay.num_steps or tuple(tokens.shape) != want:
            raise InvalidArgumentError(
                f"the tokens from step {step - 1} must cover whole steps before the last ({lay.step_sizes[step - 1]} "
                f"for one step: shape {(prev.shape[0], lay.step_sizes[step - 1], *self.head.token_shape)}), "
                f"got shape {tuple(tokens.shape)}")
        rows = torch.arange(prev.shape[0], device=prev.device)[:, None]
        state.tokens[rows, prev] = tokens.to(state.tokens.device, state.tokens.dtype)
        state.known[rows, prev] = True
        state.step = step + k - 1
        return self._outputs(state) if k == 1 else self._outputs_of_steps(state, range(step, step + k))

    def rollback(self, cache: Any, state: MARState, step: int) -> None:
        """Back to just before the call ``gen(..., step, ...)``: the tokens of steps >= step-1 are forgotten."""
        if not isinstance(state, MARState) or not 1 <= step <= state.step + 1:
            raise InvalidArgumentError(
                f"MAR rolls back to a step in 1..{getattr(state, 'step', 0) + 1} (the next call's step), got {step}")
        state.step = step - 1
        K = state.layout.step_starts[step - 1]
        state.known.zero_()
        state.known.scatter_(1, state.order[:, :K], True)

    def _outputs_of_steps(self, state: MARState, steps: range) -> torch.Tensor:
        """Outputs (B', Σ n_j, C) of each step j in ``steps`` given the tokens of the steps before j, in one
        batched pass over the len(steps) prefixes (row i·B' + b: prefix i of image b)."""
        lay = state.layout
        B, k = state.order.shape[0], len(steps)
        dev = state.order.device
        rows = torch.arange(B, device=dev).repeat(k)
        js = torch.arange(steps.start, steps.stop, device=dev).repeat_interleave(B)
        ns = [lay.step_sizes[j] for j in steps]
        out = self._outputs_of_pairs(state, rows, js).view(k, B, max(ns), -1)
        return torch.cat([out[i, :, :ns[i]] for i in range(k)], 1)

    def _outputs_of_pairs(self, state: MARState, rows: torch.Tensor, js: torch.Tensor) -> torch.Tensor:
        """Outputs (P, n, C) of step ``js[p]`` of image row ``rows[p]`` given that row's tokens of the steps before
        it, for P (row, step) pairs in one pass: prefixes padded to the longest (the padding masked out of
        attention), a step's outputs in layout order, padded to the widest step (padding: its first position)."""
        lay, order = state.layout, state.order
        N = lay.num_tokens
        starts = torch.tensor(lay.step_starts, device=order.device)
        Ks, ns = starts[js], starts[js + 1] - starts[js]
        K, n = int(Ks.max()), int(ns.max())
        ar = torch.arange(N, device=order.device)
        # each prefix: the first K_p positions of its row's order, in grid order (as MAR's nonzero() gathers them)
        known = torch.where(ar < Ks[:, None], order[rows], N).sort(1).values[:, :K]
        valid = ar[:K] < Ks[:, None]
        known = known.masked_fill(~valid, 0)
        cols = Ks[:, None] + ar[:n]
        query = state.positions[rows].gather(1, cols.clamp(max=N - 1))
        query = torch.where(ar[:n] < ns[:, None], query, query[:, :1])
        shape = self.head.token_shape
        toks = state.tokens[rows]
        known_tokens = toks.gather(1, known.view(*known.shape, *[1] * len(shape)).expand(*known.shape, *shape))
        mask = None if bool((Ks == K).all()) else valid  # one prefix length: MAR's own unmasked pass
        h = self.encode(state.cond[rows], known_tokens, known, mask)
        return self.decode(h, known, query, mask)

    def forward_rows(self, tokens: torch.Tensor, steps: torch.Tensor, cache: Any = None, state: MARState | None = None,
                     wanted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every row at its own step (``Generator.forward_rows``): row b's ``tokens`` (B', n, ...) are its layout
        tokens from ``step_starts[steps[b] - 1]`` on (stored at their grid positions; past the last token:
        dropped), and output j of row b is for layout token ``step_starts[steps[b]] + j``.

        MAR has no cache: each output step is its own prefix (the row's tokens of the steps before it), and all
        (row, step) prefixes run as one padded batch. Only outputs that are valid (every step before theirs fed,
        now or earlier) are computed, and with ``wanted = (lo, hi)`` ((B',) each) only those of the steps that
        output columns ``lo[b] <= j < hi[b]`` fall in (a row with ``hi <= lo`` computes nothing): the rest of the
        (B', n, C) outputs are zeros. Rolling a row back is feeding it from an earlier step."""
        lay = self._rows_check(tokens, steps, state)
        S, N = lay.num_steps, lay.num_tokens
        dev = state.order.device
        steps = steps.to(dev, torch.long)
        B, n = tokens.shape[:2]
        starts = torch.tensor(lay.step_starts, device=dev)
        ar = torch.arange(n, device=dev)
        # store the fed tokens at each row's own grid positions
        lp = starts[steps - 1, None] + ar
        b, j = (lp < N).nonzero(as_tuple=True)
        state.tokens[b, state.positions[b, lp[b, j]]] = tokens.to(dev, state.tokens.dtype)[b, j]
        # the output steps to compute: valid (steps <= last: the steps before them fed whole) and wanted
        last = (torch.searchsorted(starts, starts[steps - 1] + n, right=True) - 1).clamp(max=S - 1)
        lo, hi = (torch.zeros_like(steps), torch.full_like(steps, n)) if wanted is None else \
            (wanted[0].to(dev, torch.long).clamp(min=0), wanted[1].to(dev, torch.long).clamp(max=n))
        step_of = lay.step_of.to(dev)
        first = step_of[(starts[steps] + lo).clamp(max=N - 1)]
        upto = torch.minimum(step_of[(starts[steps] + hi - 1).clamp(0, N - 1)], last)
        count = torch.where((hi > lo) & (starts[steps] + lo < N), upto - first + 1, 0).clamp(min=0)
        P = int(count.sum())
        if P == 0:
            return torch.zeros(B, n, self._out_dim(), dtype=self._out_dtype(), device=dev)
        rows = torch.arange(B, device=dev).repeat_interleave(count)
        offset = torch.cumsum(count, 0) - count
        js = first[rows] + torch.arange(P, device=dev) - offset[rows]
        res = self._outputs_of_pairs(state, rows, js)  # (P, n_max, C)
        # pair p's output t is column step_starts[js] - step_starts[steps] + t of its row
        w = res.shape[1]
        tw = torch.arange(w, device=dev)
        col = (starts[js] - starts[steps[rows]])[:, None] + tw
        keep = (tw < (starts[js + 1] - starts[js])[:, None]) & (col < n)
        out = res.new_zeros(B, n, res.shape[-1])
        out[rows[:, None].expand_as(col)[keep], col[keep]] = res[keep]
        return out

    def _out_dim(self) -> int:
        return getattr(self.output, "out_features", self.config.decoder_dim)

    def _out_dtype(self) -> torch.dtype:
        """What :meth:`decode` returns: the weights' dtype, fp32 logits for a low-precision categorical head."""
        dt = self.decoder_embed.weight.dtype
        return torch.float32 if self.head.kind == "categorical" and dt in (torch.float16, torch.bfloat16) else dt

    def _rows_check(self, tokens: torch.Tensor, steps: torch.Tensor, state: Any) -> Layout:
        """One line for :meth:`forward_rows` inputs that do not fit; the state's layout."""
        if not isinstance(state, MARState) or state.positions is None:
            raise InvalidArgumentError("MAR's forward_rows needs the state prefill returned (MAR has no cache)")
        check_row_steps(steps)
        B, shape = state.order.shape[0], tuple(self.head.token_shape)
        if steps.shape[0] != B or tokens.dim() != 2 + len(shape) or tokens.shape[0] != B or tokens.shape[1] < 1 \
                or tuple(tokens.shape[2:]) != shape:
            raise InvalidArgumentError(f"forward_rows takes tokens (B, n{', ' + str(shape)[1:-1] if shape else ''}) with "
                                       f"n >= 1 and steps (B,) for the state's B = {B} rows, got tokens of shape "
                                       f"{tuple(tokens.shape)} and {steps.shape[0]} steps")
        check_row_steps(steps, state.layout.num_steps)
        return state.layout

    def _outputs(self, state: MARState) -> torch.Tensor:
        K = state.layout.step_starts[state.step]
        known = state.order[:, :K].sort(1).values  # grid order, as MAR's nonzero() gathers them
        known_tokens = state.tokens.gather(1, known.view(*known.shape, *[1] * len(self.head.token_shape)).expand(
            *known.shape, *self.head.token_shape))
        h = self.encode(state.cond, known_tokens, known)
        return self.decode(h, known, state.layout.index(state.step, state.order))

    def _check_layout(self, layout: Layout | None) -> Layout:
        if layout is None:
            return self.layout
        if layout.kind != "sets" or tuple(layout.grid) != tuple(self.layout.grid):
            raise InvalidArgumentError(
                f"MAR decodes a sets layout over its {self.layout.grid} grid, got a {layout.kind} layout over {layout.grid}; "
                "use gen.sampling_layout(num_iter)")
        return layout

    # -- training ----------------------------------------------------------------------------------------
    def random_mask(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """MAR's training mask (B, N) bool, True = masked: a random order per image and one mask ratio per
        batch from a normal(1, 0.25) truncated to [mask_ratio_min, 1]; ``ceil(N·ratio)`` tokens masked.

        Drawn on the CPU from torch's global generator (reproducible under ``torch.manual_seed``)."""
        N = self.layout.num_tokens
        order = torch.rand(batch, N).argsort(1)
        lo = torch.special.ndtr(torch.tensor((self.config.mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
        u = torch.rand((), dtype=torch.float64)
        ratio = 1.0 + 0.25 * float(torch.special.ndtri(lo + u * (0.5 - lo)))
        masked = min(N, max(1, math.ceil(N * ratio)))
        mask = torch.zeros(batch, N, dtype=torch.bool).scatter_(1, order[:, :masked], True)
        return mask.to(device)

    def outputs_for_mask(self, cond: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Outputs (B, N, C) at every position when the tokens (B, N, ...) under ``mask`` (B, N; True =
        unknown, the same count per row) are hidden: MAR's ``forward_mae_encoder`` + ``forward_mae_decoder``."""
        B, N = mask.shape
        K = int((~mask[0]).sum())
        if bool(((~mask).sum(1) != K).any()):
            raise InvalidArgumentError("every row of the mask must hide the same number of tokens (as MAR's)")
        known = (~mask).nonzero()[:, 1].view(B, K)
        idx = known.view(B, K, *[1] * (tokens.dim() - 2)).expand(B, K, *tokens.shape[2:])
        return self.decode(self.encode(cond, tokens.gather(1, idx), known), known)

    def training_outputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MAR's training forward: outputs (B, N, C) at every position and the mask (B, N) of the hidden
        positions the loss counts; in train mode each class is replaced by the null class (``fake_latent``)
        with probability ``label_drop_prob``."""
        mask = self.random_mask(tokens.shape[0], tokens.device)
        if self.training and self.config.label_drop_prob > 0:
            drop = torch.rand(cond.shape[0]) < self.config.label_drop_prob
            cond = self.drop_condition(cond, drop.to(cond.device))
        return self.outputs_for_mask(cond, tokens, mask), mask

    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise InvalidArgumentError(
            "MAR-style generators have no teacher-forced pass (every step sees a random subset of tokens); "
            "train them through training_outputs")


def _steps_covered(layout: Layout, step: int, m: int) -> int:
    """How many whole steps from ``step-1`` ``m`` tokens cover (0 if they end inside a step)."""
    start, k = layout.step_starts[step - 1], 0
    while step - 1 + k < layout.num_steps and layout.step_starts[step - 1 + k] < start + m:
        k += 1
    return k if layout.step_starts[step - 1 + k] == start + m else 0


def _check_config(c: MARConfig) -> None:
    if c.head == "diffusion" and c.token_dim < 1:
        raise InvalidArgumentError(
            "this generator's diffusion head makes continuous tokens: it needs a continuous (KL) tokenizer, "
            "not a discrete (VQ) one")
    if c.head == "categorical" and c.vocab_size < 2:
        raise InvalidArgumentError(
            "this generator's categorical head makes token ids: it needs a discrete (VQ) tokenizer, "
            "not a continuous (KL) one")
    if c.grid < 1 or c.buffer_size < 1 or c.encoder_depth < 1 or c.decoder_depth < 1:
        raise InvalidArgumentError(
            f"MAR needs grid, buffer_size and encoder/decoder depths >= 1, got grid {c.grid}, buffer {c.buffer_size}, "
            f"depths {c.encoder_depth}/{c.decoder_depth}")
    if not 0 < c.mask_ratio_min <= 1:
        raise InvalidArgumentError(f"mask_ratio_min must be in (0, 1], got {c.mask_ratio_min}")
