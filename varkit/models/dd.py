"""Distilled Decoding (DD1) students: the teacher generator plus DD's noise/data input and continuous output.

A student maps a whole sequence X_t = (codewords of the first t layout steps, noise after them) to every
token at once, in one pass (DD1, Liu et al., ICLR 2025). It is its teacher's transformer, initialised from it,
with the changes of the official ``DDTransformer`` (microsoft/distilled_decoding, LlamaGen/autoregressive/
models/dd.py and VAR/models/dd.py), kept under the official attribute names so that their published weights
map by a rename table:

- the token input is a codeword-space vector (the noise ε or a codeword e_v), embedded by a Linear
  (LlamaGen: ``tok_embeddings``, Linear(codebook_dim → dim); VAR: ``word_embed``, Linear(Cvae → C), the
  teacher's own layer);
- ``n_d_embed`` (Embedding(2, dim): row 0 noise, row 1 data) is added to every position (the condition
  position counts as data); VAR adds it again inside every block, after attention, through
  ``layerwise_n_d_embed[i]`` (Linear(C, C), one per block plus one before the heads);
- position i outputs token i (not i+1): logits through the teacher's head (``norm``/``output``; VAR
  ``head_nm``/``head``, varkit's ``output``) and a continuous codeword prediction through
  ``final_layer_conti`` (PixArt's final layer: ``norm_final``, ``scale_shift_table`` modulated by the class
  embedding, ``linear``);
- attention: causal over positions (LlamaGen); VAR sees every earlier scale plus itself (``d >= dT + 1`` or
  the diagonal), over a sequence that starts with a 1×1 class "scale" (official ``patch_nums = (1,) +
  patch_nums``), so ``pos_1LC`` and ``lvl_embed`` have one more row than the teacher's.

The tokenizer's codebook (``codebook``, (V, d), in the lookup's metric) is a buffer of the student: the sampler
embeds known tokens and reads continuous predictions with it, and binding another tokenizer is refused.
A student is not an AR generator: ``prefill``/``forward`` refuse (``sampler="distilled"`` drives
:meth:`dd_forward`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..modeling import register_module
from .raster import RasterConfig, RasterGenerator
from .scales import ScalesConfig, ScalesGenerator

# how far a rebuilt codebook may drift from the stored one and still be "the same tokenizer": l2-normalised rows
# recomputed on another CPU differ by a few fp32 ulps of their norm (d terms, ~d·2^-24 relative); another
# tokenizer differs by far more
CODEBOOK_ATOL = 1e-5


def check_teacher(gen) -> None:
    """One clear error unless ``gen`` is a teacher DD1 supports: a class-conditional raster (LlamaGen) or scales
    (VAR) generator of ids."""
    kind = getattr(getattr(gen, "head", None), "kind", None)
    layout = getattr(getattr(gen, "layout", None), "kind", None)
    ok = kind == "categorical" and (
        (type(gen) is RasterGenerator and layout == "raster" and not gen.is_text_conditional)
        or (type(gen) is ScalesGenerator and gen.config.patch_nums[0] == 1))
    if not ok:
        what = f"a {type(gen).__name__}" + (f" with a {layout} layout and a {kind} head" if layout else "")
        raise InvalidArgumentError(
            f"distilled decoding takes a class-conditional raster (LlamaGen) or scales (VAR) teacher of token ids; "
            f"this teacher is {what}")


def tokenizer_codebook(tokenizer) -> torch.Tensor:
    """The tokenizer's (V, d) codebook as its lookup sees it (what DD's flow and student live in)."""
    book = getattr(tokenizer, "codebook", None)
    if not callable(book):
        raise InvalidArgumentError(f"distilled decoding needs a VQ tokenizer with a codebook; {type(tokenizer).__name__} has none")
    return book().detach().float()


class DDFinalLayer(nn.Module):
    """DD's continuous output (official ``final_layer_conti``, PixArt's ``FinalLayer``): LayerNorm without affine,
    shift/scale = ``scale_shift_table`` + the class embedding, then a Linear to the codeword dimension."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, dim), ``cond`` the class embedding (B, dim) or (B, 1, dim) → (B, L, out_dim)."""
        shift, scale = (self.scale_shift_table[None] + cond.reshape(cond.shape[0], 1, -1)).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DDStudent:
    """What both students share: the codebook buffer, the data/noise flags, the refusals of the AR contract."""

    layout: object
    codebook: torch.Tensor
    is_dd_student = True

    def n_data(self, t: torch.Tensor) -> torch.Tensor:
        """Tokens given as data (B,) when the first ``t`` (B,) layout steps are data."""
        starts = torch.tensor(self.layout.step_starts, device=t.device)
        return starts[t.long()]

    def data_flags(self, t: torch.Tensor, prefix: int) -> torch.Tensor:
        """(B, prefix + N) long: 1 for the ``prefix`` condition positions and data tokens, 0 for noise."""
        N = self.layout.num_tokens
        pos = torch.arange(N, device=t.device)[None]
        tok = (pos < self.n_data(t)[:, None]).long()
        return torch.cat([tok.new_ones(t.shape[0], prefix), tok], 1)

    def check_dd_inputs(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> None:
        N, d = self.layout.num_tokens, self.codebook.shape[1]
        if x.dim() != 3 or tuple(x.shape[1:]) != (N, d) or x.shape[0] != cond.shape[0]:
            raise InvalidArgumentError(
                f"a DD student takes inputs (B, {N}, {d}) (codewords, then noise) for B={cond.shape[0]} conditions, "
                f"got {tuple(x.shape)}")
        if t.shape != (cond.shape[0],) or bool(((t < 0) | (t >= self.layout.num_steps)).any()):
            raise InvalidArgumentError(
                f"DD timesteps t must be (B,) layout steps in 0..{self.layout.num_steps - 1}, got {t.tolist()}")

    def bind_codebook(self, tokenizer) -> None:
        """Refuse a tokenizer whose codebook is not the one this student was distilled with."""
        book = tokenizer_codebook(tokenizer).to(self.codebook.device)
        if book.shape != self.codebook.shape or not torch.allclose(book, self.codebook.float(), rtol=0, atol=CODEBOOK_ATOL):
            raise InvalidArgumentError(
                "this distilled student was trained on another tokenizer (its codebook differs from this tokenizer's); "
                "use its teacher's tokenizer")

    def _not_ar(self, *args, **kwargs):
        raise InvalidArgumentError(
            f"{type(self).__name__} is a distilled-decoding student, not an autoregressive generator: "
            "sample it with sampler='distilled'")

    prefill = _not_ar
    forward = _not_ar
    teacher_forcing_logits = _not_ar
    training_outputs = _not_ar


def _init_dd_linear(m: nn.Module, std: float = 0.02) -> None:
    """The official ``_init_weights``: normal(std) weights, zero biases."""
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=std)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)


def _config_from(config_class, teacher_config, **extra):
    names = {f.name for f in fields(config_class)}
    vals = {f.name: getattr(teacher_config, f.name) for f in fields(teacher_config) if f.name in names}
    return config_class(**{**vals, **extra})


# -- LlamaGen ------------------------------------------------------------------------------------------------
@dataclass
class DDRasterConfig(RasterConfig):
    codebook_dim: int = 8
    dd_timesteps: tuple[int, ...] = (0,)  # layout steps trained as the data/noise boundary (official t_list)
    dd_split: int | None = None  # layout step from which the continuous output is used (official split_t); None: never


@register_module
class DDRasterGenerator(DDStudent, RasterGenerator):
    """DD1 student of a LlamaGen (raster) teacher: official ``DDTransformer`` (LlamaGen/autoregressive/models/dd.py)."""

    config_class = DDRasterConfig

    def __init__(self, config: DDRasterConfig):
        super().__init__(config)
        c = config
        self.tok_embeddings = nn.Linear(c.codebook_dim, c.dim)  # official tok_embeddings: Linear(codebook_dim → dim)
        self.n_d_embed = nn.Embedding(2, c.dim)  # official n_d_embed: row 0 noise, row 1 data
        self.final_layer_conti = DDFinalLayer(c.dim, c.codebook_dim)  # official final_layer_conti
        self.register_buffer("codebook", torch.zeros(c.vocab_size, c.codebook_dim))
        for m in (self.tok_embeddings, self.n_d_embed, self.final_layer_conti):
            _init_dd_linear(m)

    @classmethod
    def from_teacher(cls, teacher: RasterGenerator, codebook: torch.Tensor, **overrides) -> "DDRasterGenerator":
        """A student whose transformer, class embedding and logits head are the teacher's (official
        ``init_with_teacher``: cls_embedding, layers, norm, output); dropout off as the official ModelArgs."""
        check_teacher(teacher)
        cfg = _config_from(DDRasterConfig, teacher.config, codebook_dim=int(codebook.shape[1]), token_dropout=0.0,
                           resid_dropout=0.0, ffn_dropout=0.0, **overrides)
        student = cls(cfg)
        theirs = teacher.state_dict()
        with torch.no_grad():
            for k, v in student.state_dict().items():
                if k.startswith(("cls_embedding.", "layers.", "norm.", "output.")):
                    v.copy_(theirs[k])
            student.codebook.copy_(codebook)
        return student.to(next(teacher.parameters()).device)

    def bind_tokenizer(self, tokenizer) -> None:
        self.bind_codebook(tokenizer)

    def dd_forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over X_t: ``x`` (B, N, d) codewords of the first ``t`` (B,) steps then noise, class ids
        ``cond`` (B,) → (continuous tokens (B, N, d), logits (B, N, V)), position i predicting token i."""
        self.check_condition(cond)
        self.check_dd_inputs(x, cond, t)
        compiled = self.__dict__.get("_compiled_step")
        if compiled is not None and not self.training and not torch.is_grad_enabled():
            return compiled(x, cond, t)
        return self._dd_pass(x, cond, t)

    def _dd_pass(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`dd_forward` after its input checks (the step :meth:`compile_decoding` compiles)."""
        cond_emb = self._cond_embeddings(cond)  # (B, 1, dim)
        p = self.cond_len
        h = torch.cat([cond_emb, self.tok_embeddings(x.to(cond_emb.dtype))], 1)
        h = h + self.n_d_embed(self.data_flags(t, p)).to(h.dtype)
        L = h.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        h = self._run(h, slice(0, L), mask, None)
        logits = self.output(self.norm(h)).float()[:, p:]
        conti = self.final_layer_conti(h, cond_emb).float()[:, p:]
        return conti, logits


    def compile_decoding(self, max_autotune: bool = True, inductor: bool | None = None) -> "DDRasterGenerator":
        """Run the student's pass (:meth:`dd_forward`) through ``torch.compile`` (:func:`varkit.compiled.compile_step`);
        returns ``self``.

        Why: a one-step student is a single pass over all N tokens, and at batch 1 its small ops (norms, RoPE,
        residuals, the input and output layers) cost as much as its GEMMs; inductor fuses them. Shapes are static
        (N tokens), so there is one graph per batch size; the first pass compiles. Training and grad-enabled
        calls stay eager; ``.to()`` and ``load_state_dict`` drop the compiled pass (it froze the weights)."""
        from ..compiled import compile_step

        self._set_compiled_step(compile_step(_StaticDDPass(self), max_autotune, inductor))
        return self


class _StaticDDPass(nn.Module):
    """``DDRasterGenerator._dd_pass`` as a module of the student's weights, for :func:`varkit.compiled.compile_step`."""

    def __init__(self, gen: DDRasterGenerator):
        super().__init__()
        self.gen = gen

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gen._dd_pass(x, cond, t)


# -- VAR ------------------------------------------------------------------------------------------------------
@dataclass
class DDScalesConfig(ScalesConfig):
    layerwise_n_d_embed: bool = True  # official DD_Model(layerwise_n_d_embed=True)
    dd_timesteps: tuple[int, ...] = (0,)
    dd_split: int | None = None


@register_module
class DDScalesGenerator(DDStudent, ScalesGenerator):
    """DD1 student of a VAR (scales) teacher: official ``DD_Model`` (VAR/models/dd.py)."""

    config_class = DDScalesConfig

    def __init__(self, config: DDScalesConfig):
        super().__init__(config)
        c = config
        if c.patch_nums[0] != 1:
            raise InvalidArgumentError(f"a VAR DD student needs a scale schedule starting at 1×1, got {tuple(c.patch_nums)}")
        L, S = self.layout.num_tokens, len(c.patch_nums)
        std = c.init_std if c.init_std > 0 else math.sqrt(1 / c.dim / 3)
        # official: VAR built on patch_nums (1,) + patch_nums: the class token is its own 1×1 level 0
        self.pos_1LC = nn.Parameter(torch.empty(1, 1 + L, c.dim))
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.lvl_embed = nn.Embedding(S + 1, c.dim)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=std)
        self.n_d_embed = nn.Embedding(2, c.dim)
        nn.init.trunc_normal_(self.n_d_embed.weight, std=std)
        if c.layerwise_n_d_embed:
            self.layerwise_n_d_embed = nn.ModuleList(nn.Linear(c.dim, c.dim) for _ in range(c.depth + 1))
            for m in self.layerwise_n_d_embed:
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        self.final_layer_conti = DDFinalLayer(c.dim, c.vae_dim)
        nn.init.trunc_normal_(self.final_layer_conti.linear.weight, std=std)
        nn.init.zeros_(self.final_layer_conti.linear.bias)
        self.register_buffer("codebook", torch.zeros(c.vocab_size, c.vae_dim))
        levels = torch.cat([torch.zeros(1, dtype=torch.long), self.layout.step_of + 1])
        self.register_buffer("dd_levels", levels, persistent=False)
        self.register_buffer("dd_mask", (levels[:, None] > levels[None, :]) | torch.eye(1 + L, dtype=torch.bool),
                             persistent=False)

    @classmethod
    def from_teacher(cls, teacher: ScalesGenerator, codebook: torch.Tensor, **overrides) -> "DDScalesGenerator":
        """A student initialised as the official ``init_with_teacher``: word_embed, class_emb, pos_start, blocks,
        shared_ada_lin, head_nm and the head copied; level and position tables shifted by the new class level
        (row 0 copied, rows 2… from the teacher's 1…, row 1 fresh)."""
        check_teacher(teacher)
        cfg = _config_from(DDScalesConfig, teacher.config, **overrides)
        student = cls(cfg)
        theirs = teacher.state_dict()
        with torch.no_grad():
            for k, v in student.state_dict().items():
                if k.startswith(("word_embed.", "class_emb.", "pos_start", "blocks.", "shared_ada_lin.", "head_nm.", "output.")):
                    v.copy_(theirs[k])
            student.lvl_embed.weight[0].copy_(teacher.lvl_embed.weight[0])
            student.lvl_embed.weight[2:].copy_(teacher.lvl_embed.weight[1:])
            student.pos_1LC[:, 0].copy_(teacher.pos_1LC[:, 0])
            student.pos_1LC[:, 2:].copy_(teacher.pos_1LC[:, 1:])
            student.codebook.copy_(codebook)
        return student.to(next(teacher.parameters()).device)

    def bind_tokenizer(self, tokenizer) -> None:
        ScalesGenerator.bind_tokenizer(self, tokenizer)
        self.bind_codebook(tokenizer)

    def _block(self, block, x, mods, mask, n_d) -> torch.Tensor:
        """VAR's AdaLN block with DD's data/noise embedding added between attention and FFN (official
        ``AdaLNSelfAttn.forward(..., n_d_emb)``)."""
        g1, g2, s1, s2, b1, b2 = block.modulation(mods).unbind(2)
        x = x + block.drop_path(block.attn(torch.addcmul(b1, block.ln(x), s1 + 1), None, mask, None, 0) * g1)
        x = x + n_d
        return x + block.drop_path(block.ffn(torch.addcmul(b2, block.ln(x), s2 + 1)) * g2)

    def dd_forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over X_t: ``x`` (B, N, Cvae) codewords of the first ``t`` (B,) scales then noise, class ids
        ``cond`` (B,) → (continuous tokens (B, N, Cvae), logits (B, N, V)), position i predicting token i."""
        self.check_condition(cond)
        self.check_dd_inputs(x, cond, t)
        cond_emb = self.class_emb(cond)  # (B, C)
        sos = cond_emb[:, None] + self.pos_start
        h = torch.cat([sos, self.word_embed(x.to(sos.dtype))], 1)
        h = h + self.lvl_embed(self.dd_levels)[None] + self.pos_1LC
        n_d = self.n_d_embed(self.data_flags(t, 1)).to(h.dtype)
        h = h + n_d
        mods = self._modulation(cond_emb)
        lw = self.layerwise_n_d_embed if self.config.layerwise_n_d_embed else None
        for i, block in enumerate(self.blocks):
            h = self._block(block, h, mods, self.dd_mask, lw[i](n_d) if lw is not None else n_d)
        h = h.float() + (lw[-1](n_d) if lw is not None else n_d).float()
        hd = self.output.weight.dtype  # the heads compute in their weights' dtype (fp32 as VAR's; bf16 under auto)
        h, cond_h = h.to(hd), cond_emb.to(hd)
        logits = self.output(self.head_nm(h, cond_h)).float()[:, 1:]
        conti = self.final_layer_conti(h, cond_h).float()[:, 1:]
        return conti, logits


def student_from_teacher(teacher, tokenizer, **overrides):
    """The DD1 student of ``teacher`` (a raster or scales generator) over ``tokenizer``'s codebook."""
    check_teacher(teacher)
    codebook = tokenizer_codebook(tokenizer).to(next(teacher.parameters()).device)
    cls = DDRasterGenerator if isinstance(teacher, RasterGenerator) else DDScalesGenerator
    return cls.from_teacher(teacher, codebook, **overrides)
