"""LANTERN relaxed acceptance (Jang et al., ICLR 2025) for the speculative samplers.

Visual AR models spread probability over many interchangeable tokens, so a draft ``x`` whose
own target probability ``p(x)`` is small is rejected although tokens that decode to nearly
the same patch carry a lot of mass. LANTERN credits ``x`` with the mass of its latent
neighbours:

1. **Neighbourhoods.** ``n_1(x), n_2(x), …`` are the other codebook entries sorted by
   Euclidean distance to ``e(x)`` in the tokenizer's own lookup metric (``tokenizer.codebook()``,
   unit vectors for l2-normalised codebooks), ``x`` itself excluded; the first ``k`` are kept
   (``k`` is clamped to ``V − 1``). :func:`neighbour_table` computes them once per codebook
   and caches them (ties: token-id order for ``V ≤ 4096``, unspecified above).
2. **Aggregated mass.** ``c_m(x) = Σ_{i≤m} p(n_i(x))``; ``m(x)`` is the largest ``m ≤ k``
   with ``c_m(x) ≤ δ_eff`` (``m = 0`` if none) and the draft is credited with
   ``p̂(x) = p(x) + c_{m(x)}(x)``.
3. **Acceptance** ``min(1, p̂(x) / q(x))`` — the paper's and the official code's rule.
4. **Rejection.** The replacement is drawn from the ordinary residual ``norm(max(0, p − q))``
   (:func:`varkit.samplers.accept.residual_mass`, unchanged). The official code instead
   zeroes the ``k + 1`` nearest neighbours of ``x`` (in ``q`` on its tree branch, in ``p`` on
   its chain branch) before renormalising. varkit does not: with a one-hot draft that
   zeroing alone moves the *whole* neighbourhood's mass ``c_{k+1}(x)`` (≫ δ for k = 1000),
   and it changes the residual even at ``δ = 0`` wherever neighbours carry no mass (top-k),
   so neither the δ bound nor ``δ = 0`` ⇒ lossless would hold.

**What is guaranteed.** With the standard residual, the token emitted at a verified position
has the closed-form law (:func:`relaxed_kernel`)

    π(y) = min(q(y), p̂(y)) + (1 − Σ_z min(q(z), p̂(z))) · norm(max(0, p − q))(y),

where ``p̂(y)`` is the mass credited to ``y`` had it been the draft, and

    TV(π, p) = Σ_y min(max(0, q(y) − p(y)), c_{m(y)}(y)).

Each term is ≤ δ_eff, but the sum is not: the paper's statement — each draft's relaxed
target (``p`` with the ``m`` neighbours' mass moved onto ``x``) is within δ of ``p`` — holds per
*draft*, and the position's output can drift towards ``q`` by up to ``min(TV(p, q), Σ_y c(y))``.
Hence two modes (``bound``):

- ``"position"`` (default): ``δ_eff ≤ δ`` is the largest value with
  ``Σ_y min(max(0, q(y) − p(y)), δ_eff) ≤ δ`` (:func:`water_level`; it depends on ``p`` and
  ``q`` only, never on the draft). Then ``TV(π, p) ≤ δ`` **at every position, whatever the
  draft model**. ``δ_eff = δ`` — exactly the paper's rule — whenever ``q`` is one-hot (SJD's
  fresh drafts, the official chain branch) or ``TV(p, q) ≤ δ``; it shrinks only where the
  drafter is far from the target, which is where the paper's rule would exceed δ.
- ``"draft"``: ``δ_eff = δ``, the official rule verbatim; the per-position TV is the formula
  above (≤ δ for one-hot ``q``, up to ``TV(p, q)`` for a dense drafter).

Either way the acceptance gain over the lossless rule equals the TV spent (the accepted mass
is ``1 − TV(p, q) + TV(π, p)``), so under ``"position"`` no relaxation can raise a position's
acceptance probability by more than δ. Over a sequence the per-position bounds add up (union
bound); the sampled images are not claimed to be within δ jointly. A bonus token (speculative
decoding, all γ drafts accepted) is drawn from ``p`` itself, so its position has TV 0, and a
position's law given its prefix is a mixture of ``π`` and ``p``: still within the bound.
``δ = 0`` credits nothing and reproduces the lossless sampler token for token.

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
def water_level(d: torch.Tensor, delta: float) -> torch.Tensor:
    """Largest ``t ∈ [0, δ]`` with ``Σ_y min(d_y, t) ≤ δ`` over the last dim of ``d ≥ 0``.

    ``g(t) = Σ min(d, t)`` is increasing and concave; for every j, ``g(t) ≤ j·t + S_j`` with
    ``S_j`` the sum of all but the j largest ``d``, so ``t_j = (δ − S_j)/j`` satisfies
    ``g(t_j) ≤ δ`` and the largest ``t_j`` is the solution of ``g(t) = δ``.
    """
    g = d.clamp(max=delta).sum(-1)
    ds = d.sort(-1, descending=True).values
    rest = ds.sum(-1, keepdim=True) - ds.cumsum(-1)  # S_j, j = 1..V
    j = torch.arange(1, d.shape[-1] + 1, device=d.device, dtype=d.dtype)
    t = ((delta - rest) / j).amax(-1).clamp(0.0, delta)
    return torch.where(g <= delta, torch.full_like(t, delta), t)


def effective_delta(p: torch.Tensor, q: torch.Tensor | None, delta: float, bound: str) -> torch.Tensor:
    """``δ_eff`` per position (shape ``p.shape[:-1]``): δ, or the water level for ``bound="position"``
    with a dense ``q`` (one-hot ``q`` — ids or None — never needs less than δ)."""
    full = torch.full(p.shape[:-1], float(delta), dtype=p.dtype, device=p.device)
    if bound == "draft" or q is None or not q.is_floating_point() or delta == 0:
        return full
    return water_level((q.to(p.dtype) - p).clamp(min=0), float(delta)).to(p.dtype)


def aggregated_mass(p: torch.Tensor, ids: torch.Tensor, neighbours: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """``c_{m}(x)`` for tokens ``ids`` (...) : the mass of the largest prefix of x's neighbour list
    with mass ≤ ``eff`` (...). ``p`` (..., V); ``neighbours`` (V, k)."""
    if neighbours.shape[1] == 0:
        return torch.zeros(ids.shape, dtype=p.dtype, device=p.device)
    nb = neighbours[ids]  # (..., k)
    c = p.gather(-1, nb).cumsum(-1)  # nondecreasing (p >= 0)
    return torch.where(c <= eff[..., None], c, torch.zeros_like(c)).amax(-1)


def relaxed_mass(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, neighbours: torch.Tensor,
                 delta: float, bound: str = "position") -> torch.Tensor:
    """``p̂(x) = p(x) + c_{m(x)}(x)``: the target mass credited to each draft ``x``.

    ``p`` (..., V) target; ``draft`` (...) ids; ``q`` the draft distribution (dense (..., V), one-hot
    ids (...), or None = one-hot on the draft); ``neighbours`` (V, k). ``δ = 0`` returns ``p(x)``.
    """
    p_x = p.gather(-1, draft[..., None]).squeeze(-1)
    if delta == 0:
        return p_x
    eff = effective_delta(p, q, delta, bound)
    return p_x + aggregated_mass(p, draft, neighbours, eff)


def relaxed_rule(p_hat: torch.Tensor, base: AcceptRule = acceptance_prob) -> AcceptRule:
    """An acceptance rule for :func:`varkit.samplers.accept.accepts` that credits the drafts
    with ``p_hat`` instead of ``p(x)``: ``base(p̂(x), q(x))`` = ``min(1, p̂(x)/q(x))``."""

    def rule(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
        return base(p_hat.to(p_x.dtype), q_x)

    return rule


def relaxed_kernel(p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, delta: float,
                   bound: str = "position") -> torch.Tensor:
    """The exact law (..., V) of the token a relaxed verification emits when the draft is drawn
    from ``q`` (dense (..., V) or one-hot ids (...)): ``min(q, p̂) + (1 − Σ min(q, p̂))·norm((p − q)⁺)``.

    Needs ``p̂`` for every token (a (..., V, k) gather): meant for tests and small vocabularies.
    """
    V = p.shape[-1]
    if not q.is_floating_point():
        q = torch.nn.functional.one_hot(q, V).to(p.dtype)
    q = q.to(p.dtype)
    eff = effective_delta(p, q, delta, bound) if delta > 0 else torch.zeros(p.shape[:-1], dtype=p.dtype)
    ids = torch.arange(V, device=p.device).expand(*p.shape[:-1], V)
    agg = aggregated_mass(p.unsqueeze(-2).expand(*p.shape[:-1], V, V), ids, neighbours, eff[..., None].expand(ids.shape))
    a = torch.minimum(q, p + agg)
    r = (p - q).clamp(min=0)
    rs = r.sum(-1, keepdim=True)
    r = torch.where(rs > 0, r / rs.clamp(min=1e-300), p)
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
