"""What every sampler shares: its statistics, its result, and the CFG-doubled decode step."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cache import KVCache
from ..errors import NumericalError
from ..models.base import Generator
from .logits import SamplingParams
from .random import Randomness


@dataclass
class SamplerStats:
    """What a sampling run cost. ``forward_passes`` counts generator calls (CFG counted once): the *target*'s
    under a drafting sampler, whose drafter calls are ``draft_passes`` (0 without a drafter).
    ``passes_per_image[i]``: the target passes image i took part in (every pass of its batch, or under
    continuous batching those from its admission to its finish); ``rounds``: batch passes of the slots
    (continuous batching; 0 otherwise)."""

    forward_passes: int = 0
    steps: int = 0
    tokens: int = 0
    accepted_per_pass: list[float] = field(default_factory=list)  # per-image mean tokens committed by each pass
    wall_s: float = 0.0
    cache_bytes: int = 0
    draft_passes: int = 0
    passes_per_image: list[int] = field(default_factory=list)
    rounds: int = 0

    def merge(self, other: "SamplerStats") -> "SamplerStats":
        """Totals over two runs (e.g. two batches)."""
        return SamplerStats(
            self.forward_passes + other.forward_passes,
            self.steps + other.steps,
            self.tokens + other.tokens,
            self.accepted_per_pass + other.accepted_per_pass,
            self.wall_s + other.wall_s,
            max(self.cache_bytes, other.cache_bytes),
            self.draft_passes + other.draft_passes,
            self.passes_per_image + other.passes_per_image,
            self.rounds + other.rounds,
        )

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_per_pass) / max(len(self.accepted_per_pass), 1)

    @property
    def mean_passes_per_image(self) -> float:
        """Mean target passes an image took part in (what a batch costs per image, per slot)."""
        return sum(self.passes_per_image) / max(len(self.passes_per_image), 1)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N, *head.token_shape) in layout order (row-major for sets layouts)
    stats: SamplerStats


def is_categorical(gen: Any) -> bool:
    """Whether ``gen`` decodes ids through a categorical head (what the discrete speculative samplers need)."""
    return getattr(getattr(gen, "head", None), "kind", None) == "categorical"


class GuidedRunner:
    """Drives a generator with or without the CFG-doubled batch; returns outputs and CFG weights.

    Samplers call ``prefill``/``forward``/``rollback`` on this runner instead of the generator. It
    picks the layout to decode with (``gen.sampling_layout(params.num_iter)``), draws each image's
    generation order where the layout has random orders, doubles conditions, orders and tokens for
    CFG, and counts forward passes. It does not mix: ``prefill``/``forward`` return the raw outputs
    (2B rows under CFG: conditional, then unconditional) and ``weights``, the CFG weight of each
    returned position (a (n,) tensor; None without CFG), which the head applies
    (``gen.head.sample(out, weights, ...)``; ``gen.head.mix`` for categorical logits).
    """

    def __init__(self, gen: Generator, params: SamplingParams, cond: torch.Tensor, rng: Randomness | None = None,
                 cache_policy: Any = None, cache_len: int | None = None):
        """``cache_policy``: a :class:`~varkit.cache_policies.CachePolicy` (a budgeted cache instead of the plain
        one); ``cache_len``: positions of the plain cache (default: the generator's whole sequence)."""
        self.gen, self.params = gen, params
        gen.head.check_params(params)
        self.layout = gen.sampling_layout(params.num_iter)
        self.num_steps = self.layout.num_steps
        self.batch = cond.shape[0]
        gen.check_condition(cond)
        self.order = None
        if self.layout.random_order:
            if rng is None:
                raise ValueError("a layout with random orders needs the per-image randomness (rng=)")
            self.order = rng.permutations(self.layout.num_tokens)
        # CFG weight of every token position, from its step's progress (non-constant schedules)
        step_w = [params.guidance_at(self.layout.progress(s)) for s in range(self.num_steps)]
        self.cfg = params.uses_cfg(self.num_steps)
        self.token_weights = torch.tensor(step_w, dtype=torch.float32)[self.layout.step_of].to(cond.device)
        self.cond = torch.cat([cond, gen.null_condition(cond)]) if self.cfg else cond
        if cache_policy is not None:
            from ..cache_policies import budgeted_cache

            self.cache: KVCache | None = budgeted_cache(cache_policy, gen, self.cond.shape[0], params)
        else:
            self.cache = gen.new_cache(self.cond.shape[0], cache_len) if cache_len else gen.new_cache(self.cond.shape[0])
        self.state: Any = None
        self.passes = 0

    @property
    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    def weights(self, step: int, n: int) -> torch.Tensor | None:
        """CFG weights (n,) of the ``n`` positions starting at layout step ``step`` (None: no CFG)."""
        if not self.cfg:
            return None
        start = self.layout.step_starts[step]
        return self.token_weights[start:start + n]

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra: dict[str, Any] = {}  # only layouts chosen at sampling time travel (fixed-layout generators take none)
        if self.order is not None:
            extra["order"] = torch.cat([self.order, self.order]) if self.cfg else self.order
        if self.layout is not self.gen.layout:
            extra["layout"] = self.layout
        out, self.state = self.gen.prefill(self.cond, self.cache, **extra)
        self.passes += 1
        if not bool(torch.isfinite(out).all()):  # once per call: NaN weights would otherwise sample silently
            raise NumericalError(f"{type(self.gen).__name__} gives non-finite outputs (NaN or inf) on its first "
                                 "step: its weights are corrupt or overflow in this dtype; re-save or re-convert it")
        return out, self.weights(0, out.shape[1])

    def forward(self, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` (B, m, ...) of steps ``step-1 …`` → outputs (B or 2B, n, C) of steps ``step …`` and weights."""
        if self.cfg:
            tokens = torch.cat([tokens, tokens])
        out = self.gen(tokens, step, self.cache, self.state)
        self.passes += 1
        return out, self.weights(step, out.shape[1])

    def logits(self, guided: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Guided logits (B, n, V) of a categorical head from ``prefill``/``forward``'s result."""
        return self.gen.head.mix(*guided)

    def rollback(self, step: int) -> None:
        self.gen.rollback(self.cache, self.state, step)


class Sampler:
    """Base class: holds the sampling parameters and the guarantee the sampler makes."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    # decodes a queue of images in max_batch slots, each at its own step (samplers/slots.py), where the
    # generators support it; other samplers (and generators) take max_batch images at a time
    continuous_batching: ClassVar[bool] = False

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()

    def check_generator(self, gen: Generator) -> None:
        """Raise ``InvalidArgumentError`` if this sampler cannot drive ``gen``."""

    def continuous_for(self, gen: Generator) -> bool:
        """Whether ``sample(..., max_batch=B)`` decodes ``gen`` by continuous batching (else B images at a time)."""
        return False

    @torch.inference_mode()
    def sample(self, gen: Generator, cond: torch.Tensor, gens: list[torch.Generator] | Randomness,
               progress: bool = False, max_batch: int | None = None) -> SampleResult:
        """Sample one token sequence per row of ``cond``. ``gens``: one ``torch.Generator`` per image, or a
        :class:`~varkit.samplers.random.Randomness` (e.g. one replaying recorded draws, for equality tests).

        ``max_batch``: at most this many images at once (None: all). Samplers with ``continuous_batching``
        keep ``max_batch`` slots and refill a slot as soon as its image finishes (:mod:`.slots`); the others
        sample ``max_batch`` images at a time. Either way an image is the same whatever ``max_batch``."""
        from .slots import check_max_batch

        max_batch = check_max_batch(max_batch)
        self.check_generator(gen)
        t0 = time.perf_counter()
        N = cond.shape[0]
        if max_batch is not None and self.continuous_for(gen):
            result = self._sample(gen, cond, gens, progress, max_batch=max_batch)
        elif max_batch is None or max_batch >= N:
            result = self._sample(gen, cond, gens, progress)
        else:
            parts = [self._sample(gen, cond[i:i + max_batch], _rows(gens, i, max_batch), progress)
                     for i in range(0, N, max_batch)]
            for p in parts:
                _fill_passes(p.stats, p.tokens.shape[0])
            stats = parts[0].stats
            for p in parts[1:]:
                stats = stats.merge(p.stats)
            result = SampleResult(torch.cat([p.tokens for p in parts]), stats)
        if result.tokens.is_cuda:
            torch.cuda.synchronize()
        _fill_passes(result.stats, N)
        result.stats.wall_s = time.perf_counter() - t0
        result.stats.tokens = result.tokens.numel()
        return result

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        raise NotImplementedError


def _rows(gens: list[torch.Generator] | Randomness, start: int, n: int):
    """The per-image randomness of images ``start … start+n-1``."""
    if isinstance(gens, Randomness):
        return gens.subset(list(range(start, min(start + n, len(gens)))))
    return gens[start:start + n]


def _fill_passes(stats: SamplerStats, images: int) -> None:
    """A batch without per-image counts: every image took part in every pass."""
    if not stats.passes_per_image:
        stats.passes_per_image = [stats.forward_passes] * images
