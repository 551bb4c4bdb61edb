"""LANTERN relaxed acceptance (Jang et al., ICLR 2025) for the speculative samplers.

Visual AR models spread probability over many interchangeable tokens, so a draft ``x`` whose
own target probability ``p(x)`` is small is rejected although tokens that decode to nearly
the same patch carry a lot of mass. LANTERN credits ``x`` with the mass of its latent
neighbours:

1. **Neighbourhoods.** ``n_1(x), n_2(x), …`` are the other codebook entries sorted by
   Euclidean distance to ``e(x)`` in the tokenizer's own lookup metric (``tokenizer.codebook()``,
   unit vectors for l2-normalised codebooks), ``x`` itself excluded; the first ``k`` are kept
   (``k`` clamped to ``V − 1``). :func:`neighbour_table` computes them once per codebook and
   caches them (ties: lower token id first for ``V ≤ 4096``, unspecified above).
2. **Credit.** ``c_m(x) = Σ_{i≤m} p(n_i(x))``; ``m(x)`` is the largest ``m ≤ k`` with
   ``c_m(x) ≤ δ`` (0 if none) and ``A(x) = c_{m(x)}(x)`` (:func:`aggregated_mass`). The paper
   credits the draft with ``p̃(x) = p(x) + A(x)``.
3. **Acceptance** ``min(1, (p(x) + b(x)) / q(x))`` with ``b = A`` in the paper and the official
   code, and ``b ≤ A`` under the default bound below.
4. **Rejection.** The replacement is drawn from the ordinary residual ``norm(max(0, p − q))``
   (:func:`varkit.samplers.accept.residual_mass`, unchanged). The official code instead zeroes
   the ``k + 1`` nearest neighbours of ``x`` (in ``q`` on its tree branch, in ``p`` on its chain
   branch) before renormalising. varkit does not: with a one-hot draft that zeroing alone moves
   the *whole* neighbourhood's mass ``c_{k+1}(x)`` (≫ δ for k = 1000), and it changes the
   residual even at ``δ = 0`` wherever neighbours carry no mass (top-k), so neither the δ bound
   nor "``δ = 0`` is lossless" would hold.

**What is guaranteed.** With the standard residual, the token emitted at a verified position
has the closed-form law (:func:`relaxed_kernel`)

    π(y) = min(q(y), p(y) + b(y)) + (1 − Σ_z min(q(z), p(z) + b(z))) · norm(max(0, p − q))(y),

where ``b(y)`` is the credit ``y`` would get as the draft, and

    TV(π, p) = Σ_y min(max(0, q(y) − p(y)), b(y)).

With the paper's ``b = A`` each term is ≤ δ but the sum is not: the paper's statement — each
draft's relaxed target (``p`` with the ``m`` neighbours' mass moved onto ``x``) is within δ of
``p`` — holds per *draft*; the position's output drifts towards ``q`` by up to
``min(TV(p, q), Σ_y A(y))`` (on the bundled digits model with the first, data-trained drafter at
TV 0.43, δ = 0.1 gave a mean per-position TV of 0.1 and a maximum of 0.88). Hence two modes (``bound``):

- ``"position"`` (default): one factor per position scales the credits,
  ``b(y) = λ·min((q(y) − p(y))⁺, A(y))`` with ``λ = min(1, δ / U)`` and
  ``U ≥ Σ_y min((q(y) − p(y))⁺, A(y))`` (:func:`credit_scale`: exact over the 256 tokens with
  the largest ``(q − p)⁺``, ``A ≤ δ`` bounding the rest; it depends on ``p`` and ``q`` only,
  never on the draft). Then ``TV(π, p) ≤ δ`` **at every position, whatever the drafter**.
  ``λ = 1`` — the paper's acceptance exactly — wherever the paper's rule already stays within δ,
  in particular for one-hot ``q`` (SJD's fresh drafts, the official chain branch), where the
  sum is ``min(1 − p(x), A(x)) ≤ δ``.
- ``"draft"``: ``b = A``, the official rule verbatim; per-position TV as in the formula
  (≤ δ for one-hot ``q``, up to ``TV(p, q)`` for a dense drafter).

The accepted mass is ``1 − TV(p, q) + TV(π, p)``: a relaxation raises a position's acceptance
probability by exactly the TV it spends, so under ``"position"`` by at most δ. Over a sequence
the per-position bounds add up (union bound); nothing is claimed jointly. A bonus token
(speculative decoding, all γ drafts accepted) is drawn from ``p`` itself, so a position's law
given its prefix is a mixture of ``π`` and ``p``: still within the bound. ``δ = 0`` credits
nothing and reproduces the lossless sampler token for token.

Defaults ``k = 1000``, ``δ = 0.1`` are the official code's (``entrypoints/generate_images.py``).
LANTERN++'s relative mode (``δ > 1`` read as a multiple of ``p(x)``) is not offered.

Samplers hold a :class:`Lantern` (built by :func:`make_relaxation`), bind it to the
tokenizer (``bind``; the pipeline does this through the sampler's ``bind_tokenizer``), and
verify with ``accepts(p, draft, u, q, rule=lantern.rule(p, draft, q))``: the relaxation is a
rule for the one acceptance routine in :mod:`varkit.samplers.accept`, not a second one.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .accept import AcceptRule, acceptance_prob

RELAXATIONS = ("lantern",)
BOUNDS = ("position", "draft")
DEFAULT_K = 1000
DEFAULT_DELTA = 0.1

_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key → (codebook copy, (V, k_max) neighbours)
_MAX_TABLES = 4


# -- neighbourhoods ---------------------------------------------------------------------------------
def codebook_of(source: Any) -> torch.Tensor:
    """The ``(V, D)`` codebook of a tokenizer (``.codebook()``, in its lookup metric) or a tensor."""
    if isinstance(source, torch.Tensor):
        cb = source
    elif callable(getattr(source, "codebook", None)):
        with torch.no_grad():
            cb = source.codebook()
    else:
        raise InvalidArgumentError(
            f"LANTERN needs a discrete tokenizer's codebook; {type(source).__name__} has no codebook() "
            "(pass the VQ tokenizer or a (V, D) tensor of code vectors)"
        )
    if not isinstance(cb, torch.Tensor) or cb.dim() != 2 or cb.shape[0] < 2 or not cb.is_floating_point():
        raise InvalidArgumentError(
            f"a codebook must be a (V, D) float tensor with V >= 2, got {getattr(cb, 'shape', type(cb))}"
        )
    return cb.detach()


def _compute_neighbours(cb: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(V, k) ids of the k nearest other entries by Euclidean distance, nearest first."""
    x = cb.double()
    V = x.shape[0]
    sq = (x * x).sum(1)
    out = []
    for s in range(0, V, chunk):
        d = sq[s:s + chunk, None] + sq[None] - 2 * x[s:s + chunk] @ x.T  # squared distances
        rows = torch.arange(s, min(s + chunk, V), device=x.device)
        d[rows - s, rows] = float("inf")  # the token itself is not its own neighbour
        if V <= 4096:
            idx = d.sort(dim=1, stable=True).indices[:, :k]  # ties: lower token id first
        else:
            idx = d.topk(k, dim=1, largest=False, sorted=True).indices
        out.append(idx)
    return torch.cat(out)


def neighbour_table(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """``(V, min(k, V−1))`` nearest-neighbour ids of every codebook entry, nearest first.

    Computed once per codebook (keyed by its content) and cached; a smaller ``k`` reuses a
    larger table's prefix. Returned on the codebook's device.
    """
    V = codebook.shape[0]
    k = min(int(k), V - 1)
    cpu = codebook.detach().to("cpu", torch.float32)
    key = (tuple(cpu.shape), float(cpu.double().sum()), float(cpu.double().square().sum()))
    hit = _TABLES.get(key)
    if hit is None or not torch.equal(hit[0], cpu) or hit[1].shape[1] < k:
        table = _compute_neighbours(cpu, k)
        if len(_TABLES) >= _MAX_TABLES and key not in _TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = hit = (cpu, table)
    return hit[1][:, :k].to(codebook.device)


# -- the relaxation ------------------------------------------------------------------------------------
EXACT_TOP = 256  # credit_scale evaluates the paper's credit exactly for this many tokens per position


def aggregated_mass(p: torch.Tensor, ids: torch.Tensor, neighbours: torch.Tensor, delta: float) -> torch.Tensor:
    """The paper's credit ``A(y) = c_{m(y)}(y)``: the mass of the largest prefix of ``y``'s
    neighbour list whose mass is ≤ δ. ``p`` (..., V); ``ids`` (..., M) tokens per position →
    (..., M). ``neighbours`` (V, k)."""
    if neighbours.shape[1] == 0 or delta == 0:
        return torch.zeros(ids.shape, dtype=p.dtype, device=p.device)
    nb = neighbours[ids]  # (..., M, k)
    c = p.unsqueeze(-2).expand(*ids.shape, p.shape[-1]).gather(-1, nb).cumsum(-1)  # nondecreasing (p >= 0)
    return torch.where(c <= delta, c, torch.zeros_like(c)).amax(-1)


def credit_scale(p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, delta: float,
                 exact_top: int = EXACT_TOP) -> torch.Tensor:
    """``λ = min(1, δ / U)`` per position (shape ``p.shape[:-1]``) for a dense draft distribution ``q``,
    where ``U ≥ Σ_y min((q(y) − p(y))⁺, A(y))``: exact over the ``exact_top`` tokens with the largest
    ``(q − p)⁺`` (all of them when V ≤ exact_top), ``A(y) ≤ δ`` bounding the rest. It depends on
    ``p`` and ``q`` only, never on the draft."""
    d = (q.to(p.dtype) - p).clamp(min=0)
    cheap = d.clamp(max=delta).sum(-1)  # ≥ U: where it is ≤ δ (one-hot q, q close to p), λ = 1
    lam = torch.ones_like(cheap)
    need = cheap > delta
    if not bool(need.any()):
        return lam
    d, p = d[need], p[need]  # (n, V)
    M = min(exact_top, d.shape[-1])
    dm, ids = d.topk(M, dim=-1) if M < d.shape[-1] else (d, torch.arange(d.shape[-1], device=d.device).expand(d.shape))
    exact = torch.minimum(dm, aggregated_mass(p, ids, neighbours, delta)).sum(-1)
    rest = d.clamp(max=delta).sum(-1) - dm.clamp(max=delta).sum(-1)
    U = exact + rest.clamp(min=0)
    lam[need] = torch.where(U > delta, delta / U.clamp(min=1e-30), torch.ones_like(U))
    return lam


def credits(p: torch.Tensor, ids: torch.Tensor, q: torch.Tensor | None, neighbours: torch.Tensor, delta: float,
            bound: str = "position") -> torch.Tensor:
    """Mass ``b(y)`` credited to tokens ``ids`` (..., M) if drafted: the paper's ``A(y)``, or for
    ``bound="position"`` with a dense ``q``, ``λ·min((q(y) − p(y))⁺, A(y))`` (:func:`credit_scale`)."""
    A = aggregated_mass(p, ids, neighbours, delta)
    if bound == "draft" or q is None or not q.is_floating_point() or delta == 0:
        return A  # one-hot q: Σ_y min((q−p)⁺, A) = min(1 − p(x), A(x)) ≤ δ, λ = 1
    d = (q.to(p.dtype) - p).clamp(min=0).gather(-1, ids)
    return credit_scale(p, q, neighbours, delta)[..., None] * torch.minimum(d, A)


def relaxed_mass(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, neighbours: torch.Tensor,
                 delta: float, bound: str = "position") -> torch.Tensor:
    """``p̂(x) = p(x) + b(x)``: the target mass credited to each draft ``x``.

    ``p`` (..., V) target; ``draft`` (...) ids; ``q`` the draft distribution (dense (..., V), one-hot
    ids (...), or None = one-hot on the draft); ``neighbours`` (V, k). ``δ = 0`` returns ``p(x)``.
    """
    p_x = p.gather(-1, draft[..., None]).squeeze(-1)
    if delta == 0:
        return p_x
    return p_x + credits(p, draft[..., None], q, neighbours, delta, bound).squeeze(-1)


def relaxed_rule(p_hat: torch.Tensor, base: AcceptRule = acceptance_prob) -> AcceptRule:
    """An acceptance rule for :func:`varkit.samplers.accept.accepts` that credits the drafts
    with ``p_hat`` instead of ``p(x)``: ``base(p̂(x), q(x))`` = ``min(1, p̂(x)/q(x))``."""

    def rule(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
        return base(p_hat.to(p_x.dtype), q_x)

    return rule


def relaxed_kernel(p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, delta: float,
                   bound: str = "position") -> torch.Tensor:
    """The exact law (..., V) of the token a relaxed verification emits when the draft is drawn
    from ``q`` (dense (..., V) or one-hot ids (...)): ``min(q, p + b) + (1 − Σ min(q, p + b))·norm((p − q)⁺)``.

    Needs ``b`` for every token (a (..., V, k) gather): meant for tests and small vocabularies.
    """
    V = p.shape[-1]
    if not q.is_floating_point():
        q = torch.nn.functional.one_hot(q, V).to(p.dtype)
    q = q.to(p.dtype)
    ids = torch.arange(V, device=p.device).expand(p.shape)
    a = torch.minimum(q, p + credits(p, ids, q, neighbours, delta, bound))
    r = (p - q).clamp(min=0)
    rs = r.sum(-1, keepdim=True)
    r = torch.where(rs > 0, r / rs.clamp(min=1e-30), p)
    return a + (1 - a.sum(-1, keepdim=True)).clamp(min=0) * r


def tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance over the last dim."""
    return 0.5 * (a - b).abs().sum(-1)


# -- what samplers hold ------------------------------------------------------------------------------------
class Lantern:
    """LANTERN relaxation settings plus the neighbour table of the bound tokenizer."""

    def __init__(self, k: int = DEFAULT_K, delta: float = DEFAULT_DELTA, bound: str = "position", codebook=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"LANTERN k (neighbours per token) must be an integer >= 1, got {k!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
            raise InvalidArgumentError(f"LANTERN delta (total-variation budget) must be >= 0, got {delta!r}")
        if delta > 1:
            raise InvalidArgumentError(
                f"LANTERN delta must be in [0, 1] (a total-variation distance), got {delta!r}; "
                "LANTERN++'s relative mode (delta > 1) is not supported"
            )
        if bound not in BOUNDS:
            raise InvalidArgumentError(f"unknown LANTERN bound {bound!r}; choose one of {', '.join(BOUNDS)}")
        self.k, self.delta, self.bound = k, float(delta), bound
        self._codebook: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
        if codebook is not None:
            self.bind(codebook)

    def __repr__(self) -> str:
        return f"Lantern(k={self.k}, delta={self.delta}, bound={self.bound!r})"

    @property
    def bound_to_codebook(self) -> bool:
        return self._codebook is not None

    def bind(self, source) -> None:
        """Use the codebook of ``source`` (a tokenizer or a (V, D) tensor) for the neighbourhoods."""
        cb = codebook_of(source)
        if self._codebook is None or cb.shape != self._codebook.shape or not torch.equal(cb.cpu(), self._codebook.cpu()):
            self._codebook, self._table = cb, None

    def check(self, vocab_size: int) -> None:
        """Raise if no codebook is bound or it does not match the generator's vocabulary."""
        if self._codebook is None:
            raise InvalidArgumentError(
                "relax='lantern' needs the tokenizer's codebook for its latent neighbourhoods: sample through "
                "a Pipeline (pipe(..., relax='lantern')), or pass codebook=<tokenizer or (V, D) tensor>"
            )
        if self._codebook.shape[0] != vocab_size:
            raise InvalidArgumentError(
                f"the LANTERN codebook has {self._codebook.shape[0]} entries but the generator has "
                f"{vocab_size} tokens; bind the generator's own tokenizer"
            )

    def neighbours(self, device) -> torch.Tensor:
        """(V, min(k, V−1)) neighbour ids on ``device`` (computed once per codebook)."""
        if self._codebook is None:
            self.check(-1)
        if self._table is None or self._table.device != torch.device(device):
            self._table = neighbour_table(self._codebook, self.k).to(device)
        return self._table

    def mass(self, p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """``p̂(x)`` for the drafts (see :func:`relaxed_mass`)."""
        if self.delta == 0:
            return p.gather(-1, draft[..., None]).squeeze(-1)
        return relaxed_mass(p, draft, q, self.neighbours(p.device), self.delta, self.bound)

    def rule(self, p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None,
             base: AcceptRule = acceptance_prob) -> AcceptRule:
        """The relaxed acceptance rule for these drafts, for ``accepts``/``verify``."""
        return relaxed_rule(self.mass(p, draft, q), base)


def make_relaxation(relax: str | None, k: int = DEFAULT_K, delta: float = DEFAULT_DELTA, bound: str = "position",
                    codebook=None) -> Lantern | None:
    """``None`` for the exact rule (``relax`` None/"none"), else a :class:`Lantern`."""
    if relax is None or relax == "none":
        return None
    if relax not in RELAXATIONS:
        raise InvalidArgumentError(f"unknown relaxation {relax!r}; choose one of none, {', '.join(RELAXATIONS)}")
    return Lantern(k=k, delta=delta, bound=bound, codebook=codebook)
