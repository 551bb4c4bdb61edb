"""Ancestral sampling: one layout step per forward pass, the reference every sampler matches."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import GuidedRunner, SampleResult, Sampler, SamplerStats
from .random import Randomness


class AncestralSampler(Sampler):
    """Sample each layout step from the guided, filtered distribution given all earlier steps.

    Works on every generator and every head (raster: one token a step; VAR: one scale; NAR: one
    front; MAR: one set of a random order; ids or continuous latents): the head turns each step's
    outputs into tokens with noise drawn per image. Drives the generator only through the contract
    in ``varkit.models.base``.
    """

    name = "ancestral"
    lossless = True

    def __init__(self, params=None, cache_policy=None):
        """``cache_policy``: ``"scalekv:0.1"``, ``"hack:0.5"`` or a :class:`~varkit.cache_policies.CachePolicy`:
        decode on a KV cache within that budget (next-scale generators; lossy below 1.0)."""
        super().__init__(params)
        if cache_policy is not None:
            from ..cache_policies import make_cache_policy

            cache_policy = make_cache_policy(cache_policy)
        self.cache_policy = cache_policy

    def check_generator(self, gen) -> None:
        if self.cache_policy is not None:
            self.cache_policy.check_generator(gen)

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        # a list of per-image generators, or a ready Randomness-like object (injected draws, for equality tests)
        rng = Randomness(gens, cond.device) if isinstance(gens, (list, tuple)) else gens
        run = GuidedRunner(gen, self.params, cond, rng, cache_policy=self.cache_policy)
        layout, head, order = run.layout, gen.head, run.order
        B = cond.shape[0]
        tokens = torch.zeros(B, layout.num_tokens, *head.token_shape, dtype=head.token_dtype, device=cond.device)
        out, w = run.prefill()
        for step in tqdm(range(layout.num_steps), disable=not progress, desc="steps", leave=False):
            if step > 0:
                out, w = run.forward(layout.read(tokens, step - 1, order), step)
            params = self.params.at_step(step, layout.num_steps)  # annealed head steps (DiSA) resolve per step
            noise = head.draw_noise(rng, out.shape[1], params)
            layout.write(tokens, step, head.sample(out, w, noise, params), order)
        stats = SamplerStats(
            forward_passes=run.passes,
            steps=layout.num_steps,
            accepted_per_pass=list(layout.step_sizes),
            cache_bytes=run.cache_bytes,
        )
        return SampleResult(tokens, stats)
