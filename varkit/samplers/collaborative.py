"""Collaborative decoding (CoDe; Chen et al., CVPR 2025, arXiv 2411.17787) for next-scale generators.

The sampled generator (the pipeline's model, the large one) is the *drafter*: it generates the first
``k`` scales, where a large model's capacity matters most and the token maps are small. The
*refiner*, a smaller generator over the same tokenizer and scale schedule, then takes over: one
block-causal pass over the drafted scales builds its own KV cache (``gen.prefill_steps``; generators
without it are fed one scale a call), and it generates scales ``k … S-1``, where most tokens are but
each adds detail. The drafter's cache is freed before the refiner's is made, so the peak is the
larger of the two; the drafter's holds only the first ``k`` scales.

Both run with the same sampling settings and CFG schedule, and draw from the same per-image
randomness as :class:`~varkit.samplers.ancestral.AncestralSampler`, so a refiner identical to the
drafter reproduces the ancestral image. CoDe is lossy: the late scales come from another model.
The paper's default is ``k = 8`` of VAR's 10 scales (1.7x, FID 1.95 → 1.98 with the fine-tuned pair);
here the default is ``k = S − 2`` (the refiner makes the last two scales), i.e. 8 for VAR. On a 6-scale model
(digits-var: 1,2,3,4,6,8) that is k = 4, drafting 23 % of the tokens (VAR at k = 8: 38 %; k = 5 would draft 51 %);
k = 3 drafts 11 %, the share of the paper's aggressive k = 6 (13 %, 2.9x at FID 2.27), not of its default.

``cache_policy`` (e.g. ``"scalekv:0.1"``) applies to both models' caches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .base import GuidedRunner, SampleResult, Sampler, SamplerStats
from .random import Randomness
from .speculative import resolve_draft, same_codebook


@dataclass
class CollaborativeStats(SamplerStats):
    """:class:`SamplerStats` plus the generator calls of each model (``forward_passes`` is their sum) and the
    peak cache bytes of each (``cache_bytes`` is the larger: the drafter's cache is freed first)."""

    drafter_passes: int = 0
    refiner_passes: int = 0
    drafter_cache_bytes: int = 0
    refiner_cache_bytes: int = 0

    def merge(self, other: SamplerStats) -> "CollaborativeStats":
        base = super().merge(other)
        o = other if isinstance(other, CollaborativeStats) else CollaborativeStats()
        return CollaborativeStats(**vars(base), drafter_passes=self.drafter_passes + o.drafter_passes,
                                  refiner_passes=self.refiner_passes + o.refiner_passes,
                                  drafter_cache_bytes=max(self.drafter_cache_bytes, o.drafter_cache_bytes),
                                  refiner_cache_bytes=max(self.refiner_cache_bytes, o.refiner_cache_bytes))


def default_draft_scales(num_scales: int) -> int:
    """CoDe's default split, 8 of VAR's 10 scales: the refiner makes the last two (at least one scale drafted)."""
    return max(1, num_scales - 2)


class CollaborativeSampler(Sampler):
    """CoDe: the sampled generator drafts the first ``k`` scales, ``refiner`` makes the rest (lossy).

    ``refiner``: bundled name, model folder, Pipeline or Generator (same tokenizer and scale schedule);
    ``k`` (or ``draft_scales``): scales the drafter makes, in 1..S-1 (default S−2); ``cache_policy``:
    a KV budget for both caches (:mod:`varkit.cache_policies`).
    """

    name = "collaborative"
    lossless = False

    def __init__(self, params=None, refiner: Any = None, k: int | None = None, draft_scales: int | None = None,
                 cache_policy: Any = None):
        super().__init__(params)
        if refiner is None:
            raise InvalidArgumentError(
                "collaborative decoding needs a refiner: pass refiner=<bundled name (e.g. digits-var-refiner), model folder, "
                "Pipeline or Generator> (a smaller model over the same tokenizer)")
        if k is not None and draft_scales is not None and k != draft_scales:
            raise InvalidArgumentError(f"k and draft_scales name the same setting; got k={k} and draft_scales={draft_scales}")
        k = k if k is not None else draft_scales
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise InvalidArgumentError(f"k (scales the drafter makes) must be an integer, got {k!r}")
        self.k = k
        self.refiner, self.refiner_tokenizer = resolve_draft(refiner, role="refiner")
        self.refiner.eval()
        if self.refiner_tokenizer is not None:
            self.refiner.bind_tokenizer(self.refiner_tokenizer)
        self.tokenizer = None
        if cache_policy is not None:
            from ..cache_policies import make_cache_policy

            cache_policy = make_cache_policy(cache_policy)
        self.cache_policy = cache_policy

    def bind_tokenizer(self, tokenizer) -> None:
        """The drafter's (pipeline's) tokenizer: checked against the refiner's, and bound to a bare refiner."""
        self.tokenizer = tokenizer
        if self.refiner_tokenizer is None:
            bound = getattr(self.refiner, "_tokenizer", None)  # VAR keeps the tokenizer it builds inputs with
            if bound:
                self.refiner_tokenizer = bound[0]
            else:
                self.refiner.bind_tokenizer(tokenizer)

    def draft_scales(self, num_scales: int) -> int:
        k = default_draft_scales(num_scales) if self.k is None else self.k
        if not 1 <= k <= num_scales - 1:
            raise InvalidArgumentError(
                f"k (scales the drafter makes) must be in 1..{num_scales - 1} for these {num_scales} scales, got {k}")
        return k

    # -- checks ------------------------------------------------------------------------------------------
    def check_generator(self, gen) -> None:
        r = self.refiner
        for role, g in (("drafter", gen), ("refiner", r)):
            if getattr(getattr(g, "layout", None), "kind", None) != "scales":
                raise InvalidArgumentError(
                    f"collaborative decoding splits a next-scale generator's scales; the {role} {type(g).__name__} decodes a "
                    f"{getattr(getattr(g, 'layout', None), 'kind', None)} layout")
        if gen.layout.scale_sizes != r.layout.scale_sizes:
            raise InvalidArgumentError(
                f"drafter and refiner have different scale schedules ({[h for h, _ in gen.layout.scale_sizes]} vs "
                f"{[h for h, _ in r.layout.scale_sizes]}); the refiner must be trained on the drafter's tokenizer and scales")
        hd, hr = gen.head, r.head
        if hd.kind != hr.kind or tuple(hd.token_shape) != tuple(hr.token_shape) or \
                getattr(hd, "vocab_size", None) != getattr(hr, "vocab_size", None):
            raise InvalidArgumentError(
                f"drafter and refiner make different tokens ({hd.kind} {_token_desc(hd)} vs {hr.kind} {_token_desc(hr)}); "
                "the refiner must be trained on the drafter's tokenizer")
        if getattr(gen, "num_classes", None) != getattr(r, "num_classes", None):
            raise InvalidArgumentError(
                f"drafter and refiner take different conditions ({getattr(gen, 'num_classes', '?')} vs "
                f"{getattr(r, 'num_classes', '?')} classes); the refiner must be trained on the same labels")
        if self.tokenizer is not None and self.refiner_tokenizer is not None and \
                not same_tokenizer(self.tokenizer, self.refiner_tokenizer):
            raise InvalidArgumentError(
                "drafter and refiner use different tokenizers (their weights differ); the refiner must be trained on the "
                "drafter's tokenizer")
        self.draft_scales(gen.layout.num_steps)
        if self.cache_policy is not None:
            self.cache_policy.check_generator(gen)
            self.cache_policy.check_generator(r)

    # -- sampling ----------------------------------------------------------------------------------------
    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        rng = Randomness(gens, cond.device) if isinstance(gens, (list, tuple)) else gens
        layout, head = gen.layout, gen.head
        S = layout.num_steps
        k = self.draft_scales(S)
        B = cond.shape[0]
        tokens = torch.zeros(B, layout.num_tokens, *head.token_shape, dtype=head.token_dtype, device=cond.device)
        bar = tqdm(total=S, disable=not progress, desc="scales", leave=False)

        def sample_step(run: GuidedRunner, out, w, step: int) -> None:
            params = self.params.at_step(step, S)
            noise = head.draw_noise(rng, out.shape[1], params)
            layout.write(tokens, step, head.sample(out, w, noise, params))
            bar.update(1)

        # drafter: scales 0..k-1 on a cache of just those positions
        run = GuidedRunner(gen, self.params, cond, rng, cache_policy=self.cache_policy, cache_len=layout.step_starts[k])
        out, w = run.prefill()
        for step in range(k):
            if step > 0:
                out, w = run.forward(layout.read(tokens, step - 1), step)
            sample_step(run, out, w, step)
        drafter_passes, drafter_bytes = run.passes, run.cache_bytes
        del run, out  # CoDe frees the drafter's cache before the refiner's exists

        # refiner: the drafted scales in one block-causal pass, then scales k..S-1
        run = GuidedRunner(self.refiner, self.params, cond, rng, cache_policy=self.cache_policy)
        drafted = tokens[:, :layout.step_starts[k]]
        got = self.refiner.prefill_steps(run.cond, run.cache, torch.cat([drafted, drafted]) if run.cfg else drafted, k)
        if got is None:  # no one-pass prefill: feed the drafted scales one call at a time
            out, w = run.prefill()
            for step in range(1, k + 1):
                out, w = run.forward(layout.read(tokens, step - 1), step)
        else:
            out, run.state = got
            run.passes += 1
            w = run.weights(k, out.shape[1])
        for step in range(k, S):
            if step > k:
                out, w = run.forward(layout.read(tokens, step - 1), step)
            sample_step(run, out, w, step)
        bar.close()
        stats = CollaborativeStats(
            forward_passes=drafter_passes + run.passes, steps=S, accepted_per_pass=list(layout.step_sizes),
            cache_bytes=max(drafter_bytes, run.cache_bytes), drafter_passes=drafter_passes, refiner_passes=run.passes,
            drafter_cache_bytes=drafter_bytes, refiner_cache_bytes=run.cache_bytes)
        return SampleResult(tokens, stats)


def _token_desc(head) -> str:
    size = getattr(head, "vocab_size", None)
    return f"of {size} ids" if size is not None else f"of shape {tuple(head.token_shape)}"


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers are the same (type, config and weights; by codebook where they have one)."""
    if a is b:
        return True
    if type(a) is not type(b) or getattr(a, "config", None) != getattr(b, "config", None):
        return False
    if callable(getattr(a, "codebook", None)):
        return same_codebook(a, b)
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n].cpu(), sb[n].cpu()) for n in sa)
