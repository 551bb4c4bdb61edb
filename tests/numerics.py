"""Tolerances that hold on any x86-64 CPU, and greedy-token checks that near-ties cannot break.

Golden fixtures were made on one CPU; the suite runs on others (Intel with AMX, AMD with AVX2
only). fp32 results of different kernels (MKL / oneDNN, AVX2 / AVX-512 / AMX: other blockings and
summation orders) differ by a few ulp x sqrt(K) (K the reduction length) relative to the summed
terms; bf16 by a few bf16 ulp (2^-8); sin/cos/pow by an ulp or two of their arguments.

A greedy (argmax) path is exact only where the top-2 logit gap exceeds that error: a near-tie may
flip on another CPU and every later token with it. :func:`assert_greedy_tokens_match` therefore
requires equality up to the first step where the tokens differ, and there only a near-tie.
"""
from __future__ import annotations

import torch

from varkit.samplers import SamplingParams
from varkit.samplers.logits import mix_cfg

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23 = 1.19e-7
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7 = 7.8e-3 (rounding error is half of it)
# How far fp32 logits of the tiny test models (K <= 512, <= 4 layers) can be from exact, relative
# to the largest logit: <= 1e-6 measured against fp64 (raster 5e-7, NAR 9e-7), so two CPUs' fp32
# results differ by <= 2e-6 of it; 1e-5 leaves 5x for any kernel / summation order.
LOGIT_RTOL = 1e-5


@torch.no_grad()
def guided_logits(gen, cond: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, N, V) logits the sampler sees at every position given the prefix of ``tokens`` (teacher
    forcing): CFG-mixed with the weight of each position's step, as ``GuidedRunner`` mixes them."""
    layout = gen.layout
    if not params.uses_cfg(layout.num_steps):
        return gen.teacher_forcing_logits(cond, tokens).float()
    w = torch.tensor([params.guidance(int(s), layout.num_steps) for s in layout.step_of])[:, None]
    both = gen.teacher_forcing_logits(torch.cat([cond, gen.null_condition(cond)]), torch.cat([tokens, tokens]))
    return mix_cfg(both.float(), w)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Gap between the largest and second-largest logit at every position (B, N)."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def assert_greedy_tokens_match(gen, cond: torch.Tensor, params: SamplingParams, got: torch.Tensor,
                               want: torch.Tensor, rtol: float = LOGIT_RTOL) -> None:
    """``got`` (this CPU's greedy tokens, layout order) equals the golden ``want`` where the numbers
    decide it: every row is equal up to the first layout step where they differ; there, each differing
    position must be a near-tie of ``want``'s path (the two tokens' guided logits within
    ``2 · rtol · max|logit|``, computed here by teacher forcing), and what follows may differ."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if torch.equal(got, want):
        return
    logits = guided_logits(gen, cond, want, params)
    tol = 2 * rtol * float(logits.abs().max())
    clear = top2_margin(logits) > tol  # the logits below are the sampler's: their argmax is the golden path
    assert torch.equal(logits.argmax(-1)[clear], want[clear]), "teacher-forced logits disagree with the golden path"
    step_of = gen.layout.step_of.to(want.device)
    for b in range(want.shape[0]):
        diff = (got[b] != want[b]).nonzero().flatten()
        if len(diff) == 0:
            continue
        first_step = int(step_of[diff].min())
        at = diff[step_of[diff] == first_step]
        gap = logits[b, at, want[b, at]] - logits[b, at, got[b, at]]
        assert (gap.abs() <= tol).all(), (
            f"row {b}: tokens differ at positions {at.tolist()} (step {first_step}) where the golden token leads "
            f"by {gap.tolist()} > {tol:.2e}: not a near-tie, a real difference")


# -- nearest-code ids (tokenizer encoders) --------------------------------------------------------
# Squared distances |z|^2 + |e|^2 - 2 z·e of fp32 latents from a small conv encoder: the latents are
# within ~1e-6 of exact relative to their size (as the logits above), the distance within a few ulp
# of |z|^2 + |e|^2; 1e-5 of that scale leaves 5x for any CPU.
DIST_RTOL = 1e-5


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(N, V) squared distances of latents ``z`` (N, D) to every code, in fp64 (no cancellation of our
    own), and the scale they are computed at (max |z|^2 + max |e|^2)."""
    z, e = z.double(), codebook.double()
    d = (z[:, None, :] - e[None]).square().sum(-1)
    return d, float(z.square().sum(-1).max() + e.square().sum(-1).max())


def assert_nearest_codes_match(got: list[torch.Tensor], want: list[torch.Tensor], distances, rtol: float = DIST_RTOL) -> None:
    """Encoder ids (per scale: (B, n_s); one scale for a plain VQ) equal the golden ones wherever the
    numbers decide it: equal up to the first scale where a row differs; there, each differing id must
    be a near-tie of the golden path (the two codes' distances within ``2 · rtol · scale``); later scales,
    which depend on it, may differ. ``distances(si)`` gives (B, n_s, V) distances and their scale along
    the golden path (earlier scales' golden ids)."""
    assert [g.shape for g in got] == [w.shape for w in want]
    if all(torch.equal(g, w) for g, w in zip(got, want)):
        return
    for b in range(want[0].shape[0]):
        for si, (g, w) in enumerate(zip(got, want)):
            at = (g[b] != w[b]).nonzero().flatten()
            if len(at) == 0:
                continue
            d, scale = distances(si)
            tol = 2 * rtol * scale
            two = d[b].topk(2, dim=-1, largest=False).values
            clear = two[:, 1] - two[:, 0] > tol  # the distances below are the encoder's: nearest = golden
            assert torch.equal(d[b].argmin(-1)[clear], w[b][clear]), "distances disagree with the golden ids"
            gap = d[b, at, g[b, at]] - d[b, at, w[b, at]]
            assert (gap.abs() <= tol).all(), (
                f"row {b}, scale {si}: ids differ at {at.tolist()} where the golden code is nearer by "
                f"{gap.tolist()} > {tol:.2e}: not a near-tie, a real difference")
            break


# -- a faster fp32 path against the plain one ----------------------------------------------------
def assert_as_accurate(got: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, factor: float = 10.0) -> None:
    """``got`` (a rewritten fp32 computation) is within ``factor`` times the error of the ``plain`` fp32
    computation, both against ``exact`` (the plain one in fp64), plus 4 ulp of the largest value.

    Why: how far two fp32 orders of summation drift apart depends on the CPU's kernels; the plain path's
    own error, measured on the CPU the test runs on, is the yardstick that holds on every one."""
    exact = exact.double()
    plain_err = float((plain.double() - exact).abs().max())
    floor = 4 * FP32_EPS * float(exact.abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= factor * plain_err + floor, (
        f"max error {err:.3g} against fp64, the plain fp32 path's {plain_err:.3g} (allowed {factor}x + {floor:.2g})")
