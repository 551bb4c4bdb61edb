"""The contract between generators and samplers.

A sampler never knows which architecture it drives. It calls, in order:

1. ``cache = gen.new_cache(batch)`` — the one :class:`~varkit.cache.KVCache`, sized for this generator.
2. ``out, state = gen.prefill(cond, cache, order=None, layout=None)`` — runs the condition, returns
   the head's input (B, n_0, C) for the tokens of layout step 0: logits for a categorical head, a
   conditioning vector for a continuous one (``gen.head`` turns it into tokens). ``layout`` is
   ``gen.sampling_layout(num_iter)``; ``order`` (B, N) is one permutation per image for layouts with
   ``random_order`` (MAR's ``sets``), drawn by the sampler from the per-image randomness.
3. ``out = gen(tokens, step, cache, state)`` — ``tokens`` (B, m, *head.token_shape) are the sampled
   tokens of steps ``step-1 … step+k-2`` (layout order, concatenated); returns outputs for steps
   ``step … step+k-1``. ``k > 1`` (several future steps at once, as speculative samplers need)
   only where ``supports_multistep``.
4. ``gen.rollback(cache, state, step)`` — restore cache and state to what they were just before
   a call ``gen(..., step, ...)``; speculative samplers use it after rejecting drafts. Generators
   whose state cannot be rolled back set ``supports_rollback = False`` and raise.

Per-row steps (``supports_rows``): ``gen.forward_rows(tokens, steps, cache)`` advances every row at its own
layout step (continuous batching, speculative verification per row); see :meth:`Generator.forward_rows`.

CFG belongs to the sampler side: it concatenates ``cond`` with ``gen.null_condition(cond)`` and
doubles the batch; the generator never mixes, the head does (``head.sample(out, weights, ...)``).
Generators that do not reuse a KV cache (MAR re-encodes every step) return None from ``new_cache``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..layout import Layout
from ..modeling import DerivedState, SavableModule
from .heads import Head


def token_fields_for_tokenizer(tokenizer) -> dict:
    """The config fields a tokenizer's tokens fix: ``vocab_size`` for ids, ``token_dim`` for latents."""
    shape = tuple(getattr(tokenizer, "token_shape", ()))
    return {"token_dim": shape[0]} if shape else {"vocab_size": tokenizer.codebook_size}


def latent_side(tokenizer, resolution: int) -> int:
    """The latent grid side of ``resolution``-pixel images under ``tokenizer`` (an error unless it divides)."""
    down = tokenizer.downsample
    if resolution <= 0 or resolution % down:
        raise InvalidArgumentError(
            f"resolution {resolution} is not a positive multiple of the tokenizer's downsample factor {down}")
    return resolution // down


def check_class_ids(cond: torch.Tensor, num_classes: int, model: str | None = None) -> None:
    """Raise ``InvalidArgumentError`` for a class id outside 0..num_classes (num_classes: the null class); with
    ``model`` named, also for anything but integer ids of shape (B,)."""
    if model is not None and (cond.dim() != 1 or cond.is_floating_point()):
        raise InvalidArgumentError(
            f"{model} takes class ids of shape (B,), got a {cond.dtype} tensor of shape {tuple(cond.shape)}")
    bad = (cond < 0) | (cond > num_classes)
    if bad.any():
        raise InvalidArgumentError(
            f"class id {int(cond[bad][0])} is out of range: this model has classes 0..{num_classes - 1}")


class ClassConditional:
    """Mixin of the generators conditioned on a class id alone: ids (B,) in 0..num_classes-1, the null
    condition is class ``num_classes``, and no condition prefix takes KV-cache positions."""

    class_ids_of: str | None = None  # the model's name: also require integer ids of shape (B,)
    num_classes: int

    @property
    def cond_len(self) -> int:
        return 0

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.num_classes)

    def check_condition(self, cond: torch.Tensor) -> None:
        check_class_ids(cond, self.num_classes, self.class_ids_of)


def is_multi_scale_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` (a module, or its saved config dict) gives one id map per scale (VAR's VQVAE)."""
    if isinstance(tokenizer, dict):
        return "patch_nums" in tokenizer
    return getattr(tokenizer, "patch_nums", None) is not None


def check_tokenizer_family(generator, tokenizer) -> None:
    """One line when ``tokenizer`` is of another family than ``generator`` (a generator or its class):
    next-scale generators over VQ maps (VAR) need a multi-scale VQ tokenizer, every other one a single map.
    Checked where a pipeline is assembled and before training, not after sampling."""
    want = bool(getattr(generator, "multi_scale_tokens", False))
    have = is_multi_scale_tokenizer(tokenizer)
    if want != have:
        name = generator.__name__ if isinstance(generator, type) else type(generator).__name__
        tok = tokenizer.get("_class", "?") if isinstance(tokenizer, dict) else type(tokenizer).__name__
        need = "a multi-scale VQ tokenizer (one id map per scale, e.g. digits-msvq)" if want else \
            "a single-map tokenizer (VQ or KL), not a multi-scale one"
        raise InvalidArgumentError(f"tokenizer family mismatch: {name} needs {need}, got a {tok}; "
                                   "use the tokenizer the generator was made for")


def check_row_steps(steps: Any, num_steps: int | None = None) -> None:
    """``forward_rows``' ``steps``: a (B,) integer tensor, each in 1..num_steps-1 (step 0 comes from prefill)."""
    if not isinstance(steps, torch.Tensor) or steps.dim() != 1 or steps.is_floating_point() or steps.dtype == torch.bool:
        raise InvalidArgumentError(f"forward_rows takes steps as a (B,) integer tensor, got "
                                   f"{type(steps).__name__} {tuple(getattr(steps, 'shape', ()))}")
    last = None if num_steps is None else num_steps - 1
    if last is not None and steps.numel() and bool(((steps < 1) | (steps > last)).any()):
        raise InvalidArgumentError(f"forward_rows steps must lie in 1..{last} (step 0 comes from prefill), "
                                   f"got {steps.tolist()}")


class Generator(DerivedState, SavableModule):
    """Base class of every generator; see the module docstring for the contract."""

    layout: Layout
    head: "Head"
    num_classes: int
    supports_multistep: bool = True
    supports_rollback: bool = True
    supports_rows: bool = False  # forward_rows: every row at its own step (see forward_rows)
    multi_scale_tokens: bool = False  # decodes through a multi-scale VQ tokenizer (VAR); see check_tokenizer_family

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Config fields that a trained tokenizer fixes (vocabulary or latent size, grid, ...)."""
        return token_fields_for_tokenizer(tokenizer)

    def bind_tokenizer(self, tokenizer) -> None:
        """Generators whose inputs are tokenizer-side computations (VAR) keep a reference."""

    # -- conditions ----------------------------------------------------------------------------
    @property
    def cond_len(self) -> int:
        """Cache positions taken by the condition prefix."""
        raise NotImplementedError

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` (for CFG and condition dropout)."""
        raise NotImplementedError

    def check_condition(self, cond: torch.Tensor) -> None:
        """Raise ``InvalidArgumentError`` for a condition this model cannot take."""

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace rows where ``drop`` (B,) is True by the null condition (training CFG dropout)."""
        null = self.null_condition(cond)
        shape = (-1,) + (1,) * (cond.dim() - 1)
        return torch.where(drop.view(shape), null, cond)

    # -- cache ----------------------------------------------------------------------------------
    def max_cache_len(self) -> int:
        raise NotImplementedError

    def cache_dims(self) -> tuple[int, int, int]:
        """(num_layers, heads, head_dim) of the KV cache."""
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        layers, heads, head_dim = self.cache_dims()
        p = next(self.parameters())
        return KVCache(layers, batch, heads, max_len or self.max_cache_len(), head_dim, p.device, p.dtype)

    @property
    def vocab_size(self) -> int:
        """Codebook size of a categorical head (discrete-only code paths: SJD, LANTERN, distillation)."""
        size = getattr(self.head, "vocab_size", None)
        if size is None:
            raise InvalidArgumentError(f"{type(self).__name__} generates {self.head.kind} tokens, not ids from a vocabulary")
        return size

    @vocab_size.setter
    def vocab_size(self, size: int) -> None:
        """Generators written before heads existed set ``vocab_size``: that gives them a categorical head."""
        from .heads import create_head

        if "head" not in self._modules:
            self.head = create_head("categorical", vocab_size=size)
        elif getattr(self.head, "vocab_size", None) != size:
            raise InvalidArgumentError(f"vocab_size {size} contradicts this generator's {self.head.kind} head")

    # -- decoding --------------------------------------------------------------------------------
    def sampling_layout(self, num_iter: int | None = None) -> Layout:
        """The layout to decode with; ``num_iter`` (a step count) only where steps are a sampling choice."""
        if num_iter is not None and num_iter != self.layout.num_steps:
            raise InvalidArgumentError(
                f"num_iter applies to layouts whose step count is a sampling choice (sets: MAR); "
                f"this model's {self.layout.kind} layout always takes {self.layout.num_steps} steps"
            )
        return self.layout

    def prefill(self, cond: torch.Tensor, cache: KVCache, order: torch.Tensor | None = None,
                layout: Layout | None = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_rows(self, tokens: torch.Tensor, steps: torch.Tensor, cache: KVCache, state: Any = None) -> torch.Tensor:
        """One step in which every row is at its own layout step; only where ``supports_rows``.

        ``steps`` (B,) long: per row b, the layout step whose outputs come first (``forward``'s ``step``, per
        row, 1 … num_steps-1). ``tokens`` (B, n, *token_shape): row b's sampled tokens of its layout positions
        from ``layout.step_starts[steps[b] - 1]`` on (n the same for all rows: pad shorter rows with any valid
        token). Returns outputs (B, n, C): output j of row b is for layout token ``step_starts[steps[b]] + j``;
        :meth:`valid_row_outputs` says how many of them are meaningful. Each row's keys and values go to its own
        cache positions (``cond_len`` + layout index; writes past ``max_len`` are dropped) and attention reads
        the whole cache under a per-row mask, so whatever a row left beyond what it feeds now is never read:
        ``cache.length`` is neither read nor moved (the caller tracks each row), and rolling a row back is
        feeding it from an earlier step. ``state``: what ``prefill`` returned (None for most generators).
        New rows are prefilled in a cache of their own and copied in with :meth:`KVCache.copy_rows`.
        """
        raise InvalidArgumentError(f"{type(self).__name__} has no per-row steps (supports_rows is False); "
                                   "decode it with gen(tokens, step, cache), one step for the whole batch")

    def check_rows(self, tokens: torch.Tensor, steps: torch.Tensor, cache: KVCache) -> None:
        """One line for :meth:`forward_rows` inputs that do not fit: generator, cache, shapes, steps in range."""
        name = type(self).__name__
        if not self.supports_rows:
            raise InvalidArgumentError(f"{name} has no per-row steps (supports_rows is False); "
                                       "decode it with gen(tokens, step, cache), one step for the whole batch")
        if not isinstance(cache, KVCache) or getattr(cache, "attend", None) is not None:
            raise InvalidArgumentError(f"forward_rows needs a plain KVCache from gen.new_cache, got {type(cache).__name__}")
        check_row_steps(steps)
        want = 2 + len(getattr(self.head, "token_shape", ()))
        B = steps.shape[0]
        if tokens.dim() != want or tokens.shape[0] != B or tokens.shape[1] < 1 or B != cache.batch:
            raise InvalidArgumentError(
                f"forward_rows takes tokens (B, n{', ...' if want > 2 else ''}) with n >= 1 for B = {B} steps and a "
                f"cache of {cache.batch} rows, got tokens of shape {tuple(tokens.shape)}")
        check_row_steps(steps, self.layout.num_steps)

    def valid_row_outputs(self, steps: torch.Tensor, n: int) -> torch.Tensor:
        """(B,) how many leading outputs of ``forward_rows(tokens (B, n), steps, ...)`` are meaningful per row.

        An output is valid when every input step it depends on was fed whole: the fed tokens cover layout
        steps ``steps-1 …`` up to the last complete one, m-1, and the outputs of steps ``steps … m`` (those that
        exist, at most n of them) are valid. One token a step (raster): ``min(n, num_steps - steps)``. NAR: a
        front's targets need their left and upper neighbours, whose hidden states need their whole front; the
        count may end inside a front (the next front can be wider than the n inputs), so callers that advance
        by whole steps round down to a step boundary.
        """
        last = self.layout.num_steps - 1
        if steps.numel() and bool(((steps < 1) | (steps > last)).any()):
            raise InvalidArgumentError(f"valid_row_outputs: steps must lie in 1..{last}, got {steps.tolist()}")
        starts = torch.tensor(self.layout.step_starts, device=steps.device)
        steps = steps.long()
        m = torch.searchsorted(starts, starts[steps - 1] + n, right=True) - 1  # steps < m were fed whole
        last = m.clamp(max=self.layout.num_steps - 1)
        count = torch.where(m >= steps, starts[last + 1] - starts[steps], torch.zeros_like(steps))
        return count.clamp(max=n)

    def prefill_steps(self, cond: torch.Tensor, cache: KVCache, tokens: torch.Tensor,
                      steps: int) -> tuple[torch.Tensor, Any] | None:
        """``prefill`` plus the given ``tokens`` (B, n, ...) of layout steps ``0 … steps-1`` in one block-causal pass:
        the outputs of step ``steps`` and the state, as after ``gen(tokens of step steps-1, steps, ...)``. Collaborative
        decoding hands a drafter's first scales to a refiner this way. None where a generator has no such pass (the
        caller then feeds the steps one call at a time)."""
        return None

    def rollback(self, cache: KVCache, state: Any, step: int) -> None:
        raise InvalidArgumentError(f"{type(self).__name__} cannot roll back its decoding state")

    # -- compiled decoding (opt-in) -----------------------------------------------------------------
    # the compiled step wraps (and froze) this very module: .to() drops it, copies and pickles leave it out
    derived_attrs = ("_compiled_step",)

    def compile_decoding(self, max_autotune: bool = True, inductor: bool | None = None) -> "Generator":
        """Compile this generator's decode step with ``torch.compile`` (CPU) or CUDA graphs (CUDA; over inductor's
        kernels with ``inductor=True``: :func:`varkit.compiled.compile_step`); returns ``self``.

        Generators that support it override this; the rest say so.
        """
        raise InvalidArgumentError(f"{type(self).__name__} has no compiled decode step; decode it eagerly")

    @property
    def compiled_decoding(self) -> bool:
        """Whether a compiled decode step is attached (see :meth:`compile_decoding`)."""
        return self.__dict__.get("_compiled_step") is not None

    def _set_compiled_step(self, fn: Any) -> None:
        # a plain attribute, not a submodule: the compiled step wraps this module (no cycle in
        # modules() or state_dict())
        self.__dict__["_compiled_step"] = fn

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; drops a compiled decode step (it froze the old weights)."""
        self.drop_derived()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def num_steps_in(self, tokens: int, step: int) -> int:
        """How many layout steps ``tokens`` input tokens starting at step ``step-1`` cover."""
        start = self.layout.step_starts[step - 1]
        k = 0
        while self.layout.step_starts[step - 1 + k] < start + tokens:
            k += 1
        if self.layout.step_starts[step - 1 + k] != start + tokens:
            raise InvalidArgumentError(
                f"{tokens} tokens from step {step - 1} do not end on a step boundary of the "
                f"{self.layout.kind} layout"
            )
        return k

    # -- training ----------------------------------------------------------------------------------
    def training_outputs(self, cond: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs (B, N, C) for every token given the ground truth, and the (B, N) mask of positions
        the loss counts (None: all). The trainer applies ``self.head.loss``."""
        return self.teacher_forcing_logits(cond, tokens), None

    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) for every token of the layout given all ground-truth ``tokens``."""
        raise NotImplementedError
