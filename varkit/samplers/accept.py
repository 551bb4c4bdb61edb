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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .logits import sample_probs

AcceptRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    return u.double() < rule(p_x, draft_probs(q, draft, p.dtype)).double()


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
