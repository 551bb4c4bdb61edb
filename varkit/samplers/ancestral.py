"""Ancestral sampling: one layout step per forward pass, the reference every sampler matches."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import GuidedRunner, SampleResult, Sampler, SamplerStats
from .logits import sample_logits, uniforms


class AncestralSampler(Sampler):
    """Sample each layout step from the guided, filtered distribution given all earlier steps.

    Works on every discrete generator (raster: one token a step; VAR: one scale; NAR: one
    front). Drives the generator only through the contract in ``varkit.models.base``.
    """

    name = "ancestral"
    lossless = True

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        layout = gen.layout
        run = GuidedRunner(gen, self.params, cond)
        B = cond.shape[0]
        tokens = torch.empty(B, layout.num_tokens, dtype=torch.long, device=cond.device)
        logits = run.prefill()
        for step in tqdm(range(layout.num_steps), disable=not progress, desc="steps", leave=False):
            if step > 0:
                logits = run.forward(tokens[:, layout.step_slice(step - 1)], step)
            u = None if self.params.greedy else uniforms(gens, logits.shape[1], logits.device)
            tokens[:, layout.step_slice(step)] = sample_logits(logits, self.params, u)
        n = layout.num_steps
        stats = SamplerStats(
            forward_passes=run.passes,
            steps=n,
            accepted_per_pass=list(layout.step_sizes),
            cache_bytes=run.cache.nbytes,
        )
        return SampleResult(tokens, stats)
