"""The one speculative acceptance routine every lossless speculative sampler uses.

A draft token ``x`` drawn from a draft distribution ``q`` is accepted with probability
``min(1, p(x)/q(x))``; when it is rejected, a replacement is drawn from the residual
``norm(max(0, p − q))``. Whatever ``q`` is (a draft model's distribution, the previous
Jacobi iteration's distribution, or a one-hot on a guessed token) the emitted token is then
distributed exactly as the target ``p`` (Leviathan et al. 2023; Chen et al. 2023).

Everything here is batched and per position: ``p`` is (..., V), the draft ``x`` and the
uniforms are (...), and ``q`` is either dense (..., V), or one-hot, given as token ids
(...) or as ``None`` (one-hot on the draft itself). Positions are independent; which
positions a sampler commits (the prefix up to the first rejection for a chain, every token of
a layout step for a step of conditionally independent tokens) is the sampler's business.

Continuous tokens (densities, no vocabulary to sum over) come in as *log-densities*:
:func:`verify_density` takes log p(x), log q(x) at the drafts and, for the residual, proposals
drawn from ``p`` with their log p, log q; the residual ``norm(max(0, p − q))`` is then drawn by
rejection from ``p`` (``max(0, p − q) ≤ p``: a proposal y is kept with probability
``max(0, 1 − q(y)/p(y))``). Both kinds decide with the same core, :func:`accept_mask`
(``u < min(1, ratio)``), fed by :func:`acceptance_prob` (probabilities) or
:func:`log_acceptance_prob` (log-densities).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .logits import sample_probs

AcceptRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accept_mask(prob: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The one acceptance decision of every speculative sampler: ``u < prob`` in float64, so a draft
    is accepted with probability ``prob`` for ``u ~ U[0, 1)`` (a NaN ``prob`` never accepts)."""
    return u.double() < prob.double()


def log_acceptance_prob(log_p_x: torch.Tensor, log_q_x: torch.Tensor) -> torch.Tensor:
    """``min(1, p(x)/q(x))`` (float64) from log-densities (continuous tokens: ratios of densities)."""
    return (log_p_x.double() - log_q_x.double()).clamp(max=0.0).exp()


def acceptance_prob(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """``min(1, p(x)/q(x))`` elementwise. (A draft with ``q(x) = 0``, which a sampler drawing
    from ``q`` never produces, gets 1 if ``p(x) > 0`` and NaN, never accepted, if not.)"""
    return (p_x / q_x).clamp(max=1.0)


def draft_probs(q: torch.Tensor | None, draft: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q(x)`` at the drafts: dense ``q`` gathered, one-hot ``q`` (ids or None) → 1 where it is x."""
    if q is None:
        return torch.ones(draft.shape, dtype=dtype, device=draft.device)
    if not q.is_floating_point():
        return (q == draft).to(dtype)
    return q.gather(-1, draft[..., None]).squeeze(-1).to(dtype)


def residual_mass(p: torch.Tensor, q: torch.Tensor | None = None, draft: torch.Tensor | None = None) -> torch.Tensor:
    """``max(0, p − q)`` unnormalised (what an inverse-CDF draw needs); ``p`` where it has no mass."""
    if q is None or not q.is_floating_point():
        ids = draft if q is None else q
        if ids is None:
            raise ValueError("a one-hot q needs the draft token ids")
        r = p.scatter(-1, ids[..., None], 0.0)  # max(0, p − onehot(x)) is p with x removed (p(x) ≤ 1)
    else:
        r = (p - q.to(p.dtype)).clamp_(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def residual(p: torch.Tensor, q: torch.Tensor | None = None, draft: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(max(0, p − q))`` over the last dim; ``q`` dense, one-hot ids, or None (one-hot on ``draft``).

    Where the residual has no mass (``p ≤ q`` everywhere, so a rejection has probability 0)
    it is ``p`` itself, so the result is always a distribution.
    """
    r = residual_mass(p, q, draft)
    return r / r.sum(-1, keepdim=True)


@dataclass
class Verdict:
    """Per position: the emitted token (the draft if accepted, else a residual draw) and whether
    the draft was accepted."""

    tokens: torch.Tensor  # (...) long
    accepted: torch.Tensor  # (...) bool


def accepts(p: torch.Tensor, draft: torch.Tensor, u: torch.Tensor, q: torch.Tensor | None = None,
            rule: AcceptRule = acceptance_prob) -> torch.Tensor:
    """Bool (...): ``u < rule(p(x), q(x))``, i.e. the draft ``x`` is accepted with probability
    ``min(1, p(x)/q(x))``. ``rule`` exists so tests can inject a wrong rule."""
    p_x = p.gather(-1, draft[..., None]).squeeze(-1)
    return accept_mask(rule(p_x, draft_probs(q, draft, p.dtype)), u)


def verify(
    p: torch.Tensor,
    draft: torch.Tensor,
    u_accept: torch.Tensor,
    u_resample: torch.Tensor,
    q: torch.Tensor | None = None,
    rule: AcceptRule = acceptance_prob,
) -> Verdict:
    """Accept each draft with probability ``rule(p(x), q(x))`` (default ``min(1, p(x)/q(x))``)
    using ``u_accept``; replace each rejected one by an inverse-CDF draw from
    ``norm(max(0, p − q))`` using ``u_resample``. Shapes: ``p`` (..., V); ``draft``,
    ``u_accept``, ``u_resample`` (...); ``q`` (..., V), ids (...) or None (one-hot on ``draft``).
    """
    accepted = accepts(p, draft, u_accept, q, rule)
    if bool(accepted.all()):
        return Verdict(draft.clone(), accepted)
    resampled = sample_probs(residual_mass(p, q, draft), u_resample)
    return Verdict(torch.where(accepted, draft, resampled), accepted)


def accepts_density(log_p_x: torch.Tensor, log_q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bool (...): draft ``x ~ q`` accepted with probability ``min(1, p(x)/q(x))`` from its log-densities."""
    return accept_mask(log_acceptance_prob(log_p_x, log_q_x), u)


def residual_keeps(log_p_y: torch.Tensor, log_q_y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bool (...): proposal ``y ~ p`` kept as a draw of ``norm(max(0, p − q))``, with probability
    ``max(0, 1 − q(y)/p(y))``: rejection sampling with envelope ``p`` (``max(0, p − q) ≤ p``), exact.
    The same decision as acceptance with p and q swapped, negated: ``u ≥ min(1, q(y)/p(y))``."""
    return ~accept_mask(log_acceptance_prob(log_q_y, log_p_y), u)


ResidualFallback = Callable[[torch.Tensor], torch.Tensor]


def verify_density(
    draft: torch.Tensor,
    log_p_x: torch.Tensor,
    log_q_x: torch.Tensor,
    u_accept: torch.Tensor,
    proposals: torch.Tensor,
    log_p_y: torch.Tensor,
    log_q_y: torch.Tensor,
    u_proposals: torch.Tensor,
    fallback: ResidualFallback | None = None,
) -> Verdict:
    """Continuous speculative acceptance: accept each draft ``x ~ q`` with probability ``min(1, p(x)/q(x))``;
    replace each rejected one by a draw of ``norm(max(0, p − q))``.

    Shapes: ``draft`` (..., D), ``log_p_x``/``log_q_x``/``u_accept`` (...); the residual comes from K
    ``proposals`` (..., K, D) drawn from ``p``, with ``log_p_y``/``log_q_y``/``u_proposals`` (..., K): the
    first kept one (:func:`residual_keeps`). Where none of the K is kept, ``fallback(need)`` (``need``:
    bool (...)) must return residual draws (n_need, D) for those positions, e.g. by continuing the same
    rejection with fresh proposals (what keeps the result exact; a fixed value such as the official code's
    zero vector would not be). Without a fallback that case raises.
    """
    accepted = accepts_density(log_p_x, log_q_x, u_accept)
    if bool(accepted.all()):
        return Verdict(draft.clone(), accepted)
    keep = residual_keeps(log_p_y, log_q_y, u_proposals) & ~accepted[..., None]
    found = keep.any(-1)
    first = keep.to(torch.uint8).argmax(-1)  # index of the first kept proposal (0 where none)
    res = proposals.gather(-2, first[..., None, None].expand(*first.shape, 1, proposals.shape[-1])).squeeze(-2)
    need = ~accepted & ~found
    if bool(need.any()):
        if fallback is None:
            raise RuntimeError("no residual proposal was kept and no fallback was given")
        res = res.clone()
        res[need] = fallback(need).to(res.dtype)
    return Verdict(torch.where(accepted[..., None], draft, res), accepted)
