"""The contract between generators and samplers.

A sampler never knows which architecture it drives. It calls, in order:

1. ``cache = gen.new_cache(batch)`` — the one :class:`~varkit.cache.KVCache`, sized for this generator.
2. ``logits, state = gen.prefill(cond, cache)`` — runs the condition, returns logits (B, n_0, V)
   for the tokens of layout step 0.
3. ``logits = gen(tokens, step, cache, state)`` — ``tokens`` (B, m) are the sampled tokens of
   steps ``step-1 … step+k-2`` (layout order, concatenated); returns logits for steps
   ``step … step+k-1``. ``k > 1`` (several future steps at once, as speculative samplers need)
   only where ``supports_multistep``.
4. ``gen.rollback(cache, state, step)`` — restore cache and state to what they were just before
   a call ``gen(..., step, ...)``; speculative samplers use it after rejecting drafts. Generators
   whose state cannot be rolled back set ``supports_rollback = False`` and raise.

CFG belongs to the sampler: it concatenates ``cond`` with ``gen.null_condition(cond)`` and
doubles the batch; the generator never mixes logits.
"""
from __future__ import annotations

from typing import Any

import torch

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..layout import Layout
from ..modeling import DerivedState, SavableModule


class Generator(DerivedState, SavableModule):
    """Base class of every generator; see the module docstring for the contract."""

    layout: Layout
    vocab_size: int
    num_classes: int
    supports_multistep: bool = True
    supports_rollback: bool = True

    @classmethod
    def config_for_tokenizer(cls, tokenizer, resolution: int) -> dict:
        """Config fields that a trained tokenizer fixes (vocabulary, grid, ...)."""
        return {"vocab_size": tokenizer.codebook_size}

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

    # -- decoding --------------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def rollback(self, cache: KVCache, state: Any, step: int) -> None:
        raise InvalidArgumentError(f"{type(self).__name__} cannot roll back its decoding state")

    # -- compiled decoding (opt-in) -----------------------------------------------------------------
    # the compiled step wraps (and froze) this very module: .to() drops it, copies and pickles leave it out
    derived_attrs = ("_compiled_step",)

    def compile_decoding(self, max_autotune: bool = True) -> "Generator":
        """Compile this generator's decode step with ``torch.compile``; returns ``self``.

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
    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) for every token of the layout given all ground-truth ``tokens``."""
        raise NotImplementedError
