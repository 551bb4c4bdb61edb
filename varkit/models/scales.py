"""Next-scale generator with VAR's architecture.

One layout step is a whole scale. The input of scale k is not its token ids but the
area-downsampled accumulated residual ``f_hat`` of scales < k, a tokenizer-side computation
(:meth:`MultiScaleVQTokenizer.next_scale_input`), so the generator is bound to its tokenizer
(``bind_tokenizer``) and keeps ``f_hat`` in its decoding state. Blocks are AdaLN-modulated
(class embedding → 6 modulation vectors), attention is the shared :class:`~varkit.nn.Attention`
with q/k l2-normalisation, positions are learned (per token) plus a level embedding per scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..layout import scales
from ..modeling import register_module
from ..nn import Attention, block_causal_mask
from ..nn.drop_path import DropPath
from ..nn.layers import Linear
from .base import ClassConditional, Generator, check_tokenizer_family
from .heads import create_head


@dataclass
class ScalesConfig:
    vocab_size: int = 4096
    num_classes: int = 1000
    depth: int = 16
    dim: int = 1024
    n_head: int = 16
    mlp_ratio: float = 4.0
    vae_dim: int = 32  # Cvae: channels of the tokenizer's latent f_hat
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    shared_aln: bool = False
    norm_eps: float = 1e-6
    drop_path: float = 0.0
    init_std: float = -1.0  # < 0: sqrt(1 / dim / 3), as VAR


class GeluMlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` on varkit's Linear; parameter names as timm's ``Mlp`` (VAR's ``ffn.fc1/fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the GELU as fc1's post-op where oneDNN runs it (VAR's largest scales: no second pass over the 4·dim hidden)
        return self.fc2(self.fc1.linear(x, self.fc1.bias, "gelu_tanh"))


class AdaLNBlock(nn.Module):
    """``x += γ1·attn(LN(x)(1+s1)+b1)``; ``x += γ2·ffn(LN(x)(1+s2)+b2)``; γ, s, b from the class."""

    def __init__(self, c: ScalesConfig, drop_path: float):
        super().__init__()
        self.dim = c.dim
        self.attn = Attention(c.dim, c.n_head, qv_bias=True, out_bias=True, qk_l2norm=True)
        self.ffn = GeluMlp(c.dim, int(c.dim * c.mlp_ratio))
        self.ln = nn.LayerNorm(c.dim, eps=c.norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if c.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c.dim) / c.dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): γ1, γ2, s1, s2, b1, b2 from the class embedding (or the shared modulation)."""
        if hasattr(self, "ada_gss"):
            return self.ada_gss + cond  # cond: shared modulation (B, 1, 6, C)
        return self.ada_lin(cond).view(-1, 1, 6, self.dim)

    def forward(self, x, cond, mask, cache, layer, mods=None):
        g1, g2, s1, s2, b1, b2 = (self.modulation(cond) if mods is None else mods).unbind(2)
        # addcmul: one pass over (B, n, C) instead of two for each modulation and gated residual
        h = self.attn(torch.addcmul(b1, self.ln(x), s1 + 1), None, mask, cache, layer)
        x = x + self.drop_path(h * g1) if self.training else torch.addcmul(x, h, g1)
        h = self.ffn(torch.addcmul(b2, self.ln(x), s2 + 1))
        return x + self.drop_path(h * g2) if self.training else torch.addcmul(x, h, g2)


class AdaLNHead(nn.Module):
    """LayerNorm modulated by the class (scale, shift) before the output head."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.ln = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        return self.ada_lin(cond).view(-1, 1, 2, self.dim)

    def forward(self, x, cond, mods=None):
        scale, shift = (self.modulation(cond) if mods is None else mods).unbind(2)
        return self.ln(x) * (scale + 1) + shift


@dataclass
class ScalesState:
    """Per-image decoding state: the class embedding and the accumulated residual ``f_hat``."""

    cond_emb: torch.Tensor
    f_hat: torch.Tensor | None = None
    block_mods: list[torch.Tensor] | None = None  # AdaLN modulation of each block, computed once per image
    head_mods: torch.Tensor | None = None


class _PrefixKV:
    """A KVCache's buffers written at a fixed position: :meth:`KVCache.update`'s signature with the start baked in.

    A scale's static step (one graph per scale) writes its ``n`` keys and values at ``[start, start + n)`` and
    attends to the exact prefix ``[0, start + n)``. The length pointer is the KVCache owner's to move.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], start: int):
        self.k, self.v, self.start = k, v, start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, self.start:end].copy_(k)
        vc[:, :, self.start:end].copy_(v)
        return kc[:, :, :end], vc[:, :, :end]


class _StaticScaleStep(nn.Module):
    """``gen.decode_scale_static`` of one scale as a module, so that inductor's freezing sees the weights as parameters."""

    def __init__(self, gen: "ScalesGenerator", step: int):
        super().__init__()
        self.gen, self.step = gen, step

    def forward(self, inp: torch.Tensor, cond_emb: torch.Tensor, block_mods: list[torch.Tensor], head_mods: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        return self.gen.decode_scale_static(self.step, inp, cond_emb, block_mods, head_mods, keys, values)


@register_module
class ScalesGenerator(ClassConditional, Generator):
    """VAR: class-conditional next-scale prediction over a multi-scale VQ tokenizer."""

    config_class = ScalesConfig
    legacy_keys = {"head.weight": "output.weight", "head.bias": "output.bias"}  # VAR's name for the output Linear
    supports_multistep = False
    supports_rollback = False
    multi_scale_tokens = True

    def __init__(self, config: ScalesConfig):
        super().__init__(config)
        c = config
        self.layout = scales(c.patch_nums)
        self.num_classes = c.num_classes
        self.head = create_head("categorical", vocab_size=c.vocab_size)
        L, first = self.layout.num_tokens, c.patch_nums[0] ** 2
        std = c.init_std if c.init_std > 0 else math.sqrt(1 / c.dim / 3)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)
        self.pos_start = nn.Parameter(torch.empty(1, first, c.dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, c.dim))
        self.lvl_embed = nn.Embedding(len(c.patch_nums), c.dim)
        self.word_embed = nn.Linear(c.vae_dim, c.dim)
        if c.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        dpr = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(AdaLNBlock(c, dpr[i]) for i in range(c.depth))
        self.head_nm = AdaLNHead(c.dim, c.norm_eps)
        self.output = Linear(c.dim, c.vocab_size)  # VAR's ``head`` Linear (with a bias); ``self.head`` is the token head
        self.register_buffer("lvl_1L", self.layout.step_of.clone(), persistent=False)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for m in [self.class_emb, self.lvl_embed]:
            nn.init.trunc_normal_(m.weight, std=std)
        self._init_weights(std)
        self._tokenizer: list = []  # bound tokenizer, kept out of the module tree

    def _init_weights(self, std: float) -> None:
        """VAR's init: small head, residual projections scaled by depth, near-zero AdaLN gates."""
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.output.weight.mul_(0.02)
            for b in self.blocks:
                b.attn.wo.weight.div_(math.sqrt(2 * c.depth))
                b.ffn.fc2.weight.div_(math.sqrt(2 * c.depth))
                if not c.shared_aln:
                    w = b.ada_lin[-1].weight
                    w[2 * c.dim:].mul_(0.5)
                    w[: 2 * c.dim].mul_(1e-5)

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Config fields a trained tokenizer fixes."""
        check_tokenizer_family(cls, tokenizer)
        return {"vocab_size": tokenizer.codebook_size, "vae_dim": tokenizer.codebook_dim,
                "patch_nums": tuple(tokenizer.patch_nums)}

    # -- tokenizer binding -------------------------------------------------------------------------
    def bind_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` (a :class:`MultiScaleVQTokenizer`) to build each scale's input."""
        check_tokenizer_family(self, tokenizer)
        tc = tokenizer.config
        if tuple(tc.patch_nums) != tuple(self.config.patch_nums) or tc.codebook_size != self.vocab_size \
                or tc.z_channels != self.config.vae_dim:
            raise InvalidArgumentError(
                f"tokenizer (patch_nums {tuple(tc.patch_nums)}, {tc.codebook_size} codes of dim {tc.z_channels}) "
                f"does not match the VAR transformer (patch_nums {tuple(self.config.patch_nums)}, "
                f"{self.vocab_size} codes of dim {self.config.vae_dim}); use the VAE it was trained with"
            )
        self._tokenizer = [tokenizer]

    @property
    def tokenizer(self):
        if not self._tokenizer:
            raise InvalidArgumentError("this VAR generator has no tokenizer bound; call bind_tokenizer(tokenizer)")
        return self._tokenizer[0]

    # -- contract: cache (conditions: ClassConditional) ------------------------------------------
    def cache_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.depth, c.n_head, c.dim // c.n_head

    def max_cache_len(self) -> int:
        return self.layout.num_tokens

    # -- the transformer ----------------------------------------------------------------------------
    def _modulation(self, cond_emb: torch.Tensor) -> torch.Tensor:
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_emb).view(-1, 1, 6, self.config.dim)
        return cond_emb

    def _run(self, x, cond_emb, mask, cache: KVCache | None, state: ScalesState | None = None) -> torch.Tensor:
        if state is None:  # training: one pass, nothing to reuse
            mods = self._modulation(cond_emb)
            block_mods, head_mods = [None] * len(self.blocks), None
        else:  # decoding: the class-only modulations are the same at every scale
            self._decode_mods(state)
            mods, block_mods, head_mods = None, state.block_mods, state.head_mods
        logits = self._blocks_and_head(x, cond_emb, mods, block_mods, head_mods, mask, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return logits

    def _blocks_and_head(self, x, cond_emb, mods, block_mods, head_mods, mask, cache) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, mods, mask, cache, i, block_mods[i])
        # the head in its weights' dtype: fp32 as VAR (x.float()), bf16 for a bf16 model (fp32 inputs would not
        # multiply bf16 weights); logits always fp32
        hd = self.output.weight.dtype
        return self.output(self.head_nm(x.to(hd), cond_emb.to(hd), head_mods)).float()

    def _decode_mods(self, state: ScalesState) -> None:
        """The class-only AdaLN modulations of every block and of the head, once per image (the same at every scale)."""
        if state.block_mods is None:
            shared = self._modulation(state.cond_emb)
            state.block_mods = [b.modulation(shared) for b in self.blocks]
            state.head_mods = self.head_nm.modulation(state.cond_emb.to(self.output.weight.dtype))

    def _level_pos(self, sl: slice) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L[sl])[None] + self.pos_1LC[:, sl]

    def _first_input(self, cond_emb: torch.Tensor) -> torch.Tensor:
        first = self.pos_start.shape[1]
        return cond_emb[:, None] + self.pos_start + self._level_pos(slice(0, first))

    # -- contract: decoding ----------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache: KVCache, order=None, layout=None) -> tuple[torch.Tensor, ScalesState]:
        self.check_condition(cond)
        if cache.length != 0:
            raise InvalidArgumentError("prefill needs an empty KVCache")
        state = ScalesState(self.class_emb(cond))
        compiled = self._compiled_scale(0, cache)
        if compiled is not None:
            return self._run_compiled(compiled, 0, state.cond_emb, state, cache), state
        logits = self._run(self._first_input(state.cond_emb), state.cond_emb, None, cache, state)
        return logits, state

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: ScalesState = None) -> torch.Tensor:
        """``tokens`` (B, pn_{step-1}²) of scale ``step-1`` → logits (B, pn_step², V) of scale ``step``."""
        if tokens.shape[1] != self.layout.step_sizes[step - 1]:
            raise InvalidArgumentError(
                f"VAR decodes one scale a step: expected {self.layout.step_sizes[step - 1]} tokens of scale "
                f"{step - 1}, got {tokens.shape[1]}"
            )
        state.f_hat, nxt = self.tokenizer.next_scale_input(step - 1, tokens, state.f_hat)
        compiled = self._compiled_scale(step, cache)
        if compiled is not None:
            return self._run_compiled(compiled, step, nxt, state, cache)
        return self._run(self._scale_input(step, nxt), state.cond_emb, None, cache, state)

    def _scale_input(self, step: int, inp: torch.Tensor) -> torch.Tensor:
        """The transformer input of scale ``step``: from the class embedding (B, C) at step 0, else from the
        downsampled ``f_hat`` (B, pn_step², Cvae)."""
        if step == 0:
            return self._first_input(inp)
        return self.word_embed(inp.to(self.word_embed.weight.dtype)) + self._level_pos(self.layout.step_slice(step))

    # -- compiled decoding (opt-in) ------------------------------------------------------------------
    def decode_scale_static(self, step: int, inp: torch.Tensor, cond_emb: torch.Tensor, block_mods: list[torch.Tensor],
                            head_mods: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, pn_step², V) of scale ``step`` from its input ``inp`` (:meth:`_scale_input`'s), for ``torch.compile``.

        The step :meth:`prefill` / :meth:`forward` take, with every shape fixed by ``step`` (a Python int: one graph
        per scale): the scale's keys and values are written into the KV buffers ``keys``/``values`` (a KVCache's
        ``k``/``v``) at ``step_starts[step]``, and attention reads the exact prefix of the earlier scales plus this
        one, unmasked. Nothing here reads or moves the cache's length pointer.
        """
        kv = _PrefixKV(keys, values, self.layout.step_starts[step])
        return self._blocks_and_head(self._scale_input(step, inp), cond_emb, None, block_mods, head_mods, None, kv)

    def compile_decoding(self, max_autotune: bool = True, inductor: bool | None = None) -> "ScalesGenerator":
        """Decode every scale through ``torch.compile`` (inductor, :func:`varkit.compiled.compile_step`); returns ``self``.

        Why: a scale's pass is a few GEMMs (its tokens × the weights) among hundreds of small ops (AdaLN, q/k
        l2-norms, GELU, residuals) that inductor fuses, and outside fp32 on the CPU it prepacks the frozen weights
        for its own GEMMs (AMX where the CPU has it). One graph per scale (:meth:`decode_scale_static`: each scale's
        token count and cache prefix are fixed), so the first image compiles ``num_steps`` graphs (about a minute for
        VAR-d16) and later images of the same batch size and dtype compile nothing. The tokenizer's
        ``next_scale_input`` (``f_hat``), ``prefill_steps``, budgeted caches (``varkit.cache_policies``), training and
        grad-enabled calls stay eager. The compiled steps froze the weights as they are now: ``.to()`` and
        ``load_state_dict`` drop them; other in-place weight edits need a new call. Memory: outside fp32 on the CPU
        each frozen graph holds its own prepacked copy of the weights (VAR-d16 bf16: about 0.45 GB a graph, 4.5 GB
        per batch size), so compile in a process that decodes one or two batch sizes.
        """
        if type(self).prefill is not ScalesGenerator.prefill or type(self).forward is not ScalesGenerator.forward:
            raise InvalidArgumentError(f"{type(self).__name__} has no compiled decode step; decode it eagerly")
        from ..compiled import compile_step

        graphs = None
        if self.pos_start.device.type == "cuda":  # the scales' CUDA graphs write one cache: they share its buffers
            from ..cuda_graphs import GraphSet

            graphs = GraphSet()
        self._set_compiled_step([compile_step(_StaticScaleStep(self, s), max_autotune, inductor, graphs)
                                 for s in range(self.layout.num_steps)])
        return self

    def _compiled_scale(self, step: int, cache: KVCache):
        """The compiled step of scale ``step`` where it applies to this call, else None (eager)."""
        steps = self.__dict__.get("_compiled_step")
        if (steps is None or type(cache) is not KVCache or cache.length != self.layout.step_starts[step]
                or self.training or torch.is_grad_enabled()):
            return None
        return steps[step]

    def _run_compiled(self, compiled, step: int, inp: torch.Tensor, state: ScalesState, cache: KVCache) -> torch.Tensor:
        self._decode_mods(state)
        logits = compiled(inp, state.cond_emb, state.block_mods, state.head_mods, cache.k, cache.v)
        cache.advance(self.layout.step_sizes[step])
        return logits

    def prefill_steps(self, cond: torch.Tensor, cache: KVCache, tokens: torch.Tensor, steps: int) -> tuple[torch.Tensor, ScalesState]:
        """The class and the ``tokens`` of scales ``0 … steps-1`` in one block-causal pass → logits of scale ``steps``
        (CoDe's refiner prefill; see :meth:`Generator.prefill_steps`)."""
        self.check_condition(cond)
        if cache.length != 0:
            raise InvalidArgumentError("prefill needs an empty KVCache")
        if not 0 < steps < self.layout.num_steps or tokens.shape[1] != self.layout.step_starts[steps]:
            raise InvalidArgumentError(
                f"prefill_steps takes the {self.layout.step_starts[steps] if 0 < steps < self.layout.num_steps else '?'} "
                f"tokens of scales 0..{steps - 1} (steps in 1..{self.layout.num_steps - 1}), got {tokens.shape[1]} for steps={steps}")
        state = ScalesState(self.class_emb(cond))
        xs = [self._first_input(state.cond_emb)]
        for s in range(1, steps + 1):
            state.f_hat, nxt = self.tokenizer.next_scale_input(s - 1, tokens[:, self.layout.step_slice(s - 1)], state.f_hat)
            xs.append(self.word_embed(nxt.to(self.word_embed.weight.dtype)) + self._level_pos(self.layout.step_slice(s)))
        lvl = self.lvl_1L[: self.layout.step_starts[steps + 1]]
        logits = self._run(torch.cat(xs, 1), state.cond_emb, block_causal_mask(lvl, lvl), cache, state)
        return logits[:, self.layout.step_starts[steps]:], state

    # -- training ------------------------------------------------------------------------------------
    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One block-causal pass over every scale; logits (B, L, V)."""
        cond_emb = self.class_emb(cond)
        grids = self.layout.to_grids(tokens)
        inputs = self.tokenizer.teacher_forcing_inputs(grids[:-1]).to(self.word_embed.weight.dtype)
        L = self.layout.num_tokens
        x = torch.cat([self._first_input(cond_emb), self.word_embed(inputs) + self._level_pos(slice(self.pos_start.shape[1], L))], 1)
        mask = block_causal_mask(self.lvl_1L, self.lvl_1L)
        return self._run(x, cond_emb, mask, None)
