"""What every sampler shares: its statistics, its result, and the CFG-doubled decode step."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..cache import KVCache
from ..models.base import Generator
from .logits import SamplingParams, mix_cfg


@dataclass
class SamplerStats:
    """What a sampling run cost. ``forward_passes`` counts generator calls (CFG counted once)."""

    forward_passes: int = 0
    steps: int = 0
    tokens: int = 0
    accepted_per_pass: list[float] = field(default_factory=list)  # per-image mean tokens committed by each pass
    wall_s: float = 0.0
    cache_bytes: int = 0

    def merge(self, other: "SamplerStats") -> "SamplerStats":
        """Totals over two runs (e.g. two batches)."""
        return SamplerStats(
            self.forward_passes + other.forward_passes,
            self.steps + other.steps,
            self.tokens + other.tokens,
            self.accepted_per_pass + other.accepted_per_pass,
            self.wall_s + other.wall_s,
            max(self.cache_bytes, other.cache_bytes),
        )

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_per_pass) / max(len(self.accepted_per_pass), 1)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N) in layout order
    stats: SamplerStats


class GuidedRunner:
    """Drives a generator with or without the CFG-doubled batch and returns mixed logits.

    Samplers call ``prefill``/``forward``/``rollback`` on this runner instead of the
    generator; it doubles conditions and tokens, mixes logits with the step's CFG weight,
    and counts forward passes.
    """

    def __init__(self, gen: Generator, params: SamplingParams, cond: torch.Tensor):
        self.gen, self.params = gen, params
        self.num_steps = gen.layout.num_steps
        self.cfg = params.uses_cfg(self.num_steps)
        self.batch = cond.shape[0]
        gen.check_condition(cond)
        self.cond = torch.cat([cond, gen.null_condition(cond)]) if self.cfg else cond
        self.cache: KVCache = gen.new_cache(self.cond.shape[0])
        self.state: Any = None
        self.passes = 0
        layout = gen.layout
        # CFG weight of every token position, from its step (non-constant schedules)
        self.token_weights = torch.tensor(
            [params.guidance(int(st), self.num_steps) for st in layout.step_of], dtype=torch.float32
        )

    def _mix(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        if not self.cfg:
            return logits
        if self.params.cfg_schedule == "constant":
            return mix_cfg(logits, self.params.cfg)
        start = self.gen.layout.step_starts[step]
        return mix_cfg(logits, self.token_weights[start:start + logits.shape[1], None].to(logits))

    def prefill(self) -> torch.Tensor:
        logits, self.state = self.gen.prefill(self.cond, self.cache)
        self.passes += 1
        return self._mix(logits, 0)

    def forward(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """``tokens`` (B, m) of steps ``step-1 …`` → guided logits (B, ·, V) of steps ``step …``."""
        if self.cfg:
            tokens = torch.cat([tokens, tokens])
        logits = self.gen(tokens, step, self.cache, self.state)
        self.passes += 1
        return self._mix(logits, step)

    def rollback(self, step: int) -> None:
        self.gen.rollback(self.cache, self.state, step)


class Sampler:
    """Base class: holds the sampling parameters and the guarantee the sampler makes."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()

    def check_generator(self, gen: Generator) -> None:
        """Raise ``InvalidArgumentError`` if this sampler cannot drive ``gen``."""

    @torch.inference_mode()
    def sample(self, gen: Generator, cond: torch.Tensor, gens: list[torch.Generator], progress: bool = False) -> SampleResult:
        self.check_generator(gen)
        t0 = time.perf_counter()
        result = self._sample(gen, cond, gens, progress)
        if result.tokens.is_cuda:
            torch.cuda.synchronize()
        result.stats.wall_s = time.perf_counter() - t0
        result.stats.tokens = result.tokens.numel()
        return result

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        raise NotImplementedError
