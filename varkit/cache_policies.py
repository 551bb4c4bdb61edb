"""KV-cache budgets for next-scale generators: ScaleKV (per layer) and HACK (per head), selected by name.

``cache_policy="scalekv:0.1"`` keeps at most 10 % of the full KV cache; ``"hack:0.5"`` half of it.
A policy replaces the sampler's :class:`~varkit.cache.KVCache` by a :class:`BudgetedKVCache`, which
holds, per layer, one key/value tensor per *group* of heads sharing a budget, and attends itself
(:class:`varkit.nn.Attention` hands it the queries: SDPA returns no attention weights, so the
statistic a policy evicts by is computed here, and only where it is needed).

**Budget.** ``b`` in (0, 1]: the bytes the cache holds (keys and values) never exceed ``b`` × the
bytes of the plain cache's full prefix: a capacity of ``C = floor(b·L·H·N)`` head-positions per batch
row (L layers, H heads, N tokens). Kept keys stay in layout order, so no positions are stored.
Nothing is evicted while every key fits; once they do not, each (layer, head) keeps its budget for
the step and drops the rest, layer by layer right after the layer has attended, with budgets
lowered where needed so that the half-compressed cache of a step in progress fits too
(:func:`fit_in_order`). The new keys of the step are attention inputs of one layer at a time
(``BudgetedKVCache.transient_bytes`` is the largest such working set: kept plus new keys of a layer).
The official ScaleKV budget files are no looser: at "10 %" Infinity-2B keeps on average 650 keys a layer
after scales 8-11 and 835 after the 12th (drafters ~all, refiners 420-632), 7.9 % of its 10,521 tokens.

**Which keys.** ScaleKV's observation window: up to ``window`` (16) queries evenly spread over the
current scale (a √window × √window grid of patch centres, as the official ScaleKV code, whose
centres ``i·(h//g) + (h//g − 1)//2`` are kept where g divides the side; varkit spreads them as
``floor(i·h/g + (h/g − 1)/2)`` otherwise, where the official grid bunches into the top-left corner:
rows 0-3 of a 6×6 map); a key's score is the attention those queries give it (softmax probabilities
summed, optionally max-pooled along the sequence). Like the official code, eviction runs after the
scale has attended and chooses among *all* keys, the scale's own included (it caches them for the
next scales). The window's own tokens are kept first where they take at most half the budget
(``2·window`` keys or more, as in every official budget: ≥ 420 keys on Infinity-2B at 10 %); under
that they are scored like the rest, since forcing 16 window keys into a budget of ~13 (digits-var at
10 %) leaves nothing of the earlier scales (0.9 dB PSNR lost there at 10 %, 2.0 dB at 15 %).

**Who gets how much** is decided once per generator and sampling settings, *before* the images are
made, from a calibration run (4 images of classes 0..3, a fixed seed, nothing evicted), as both
papers do offline; images therefore never depend on the batch they are in.

- ``scalekv`` (Li et al., arXiv 2505.19602): at every scale each layer is a *drafter* (attention
  dispersed over earlier scales, many keys needed) or a *refiner* (attention on the current map, few
  keys), and the scale's total budget is shared unevenly among layers; all heads of a layer share its
  budget. ``allocation="coverage"`` (default) gives each layer, per scale, the budget that captures
  the most calibrated attention: the layers' window-attention profiles (mean attention per key,
  sorted) are filled greedily, key by key, wherever the next key carries the most attention, so
  dispersed (drafter) layers get more and concentrated (refiner) ones less, by how much they need.
  ``allocation="drafters"`` is the paper's two-level form: ``max(1, round(L/8))`` layers with the
  lowest share of their window's attention on the current scale get ``drafter_weight`` (4) times a
  refiner's budget (capped at what exists). On digits-var (100 images) the two-level form loses 0.6 dB
  PSNR at 10, 20 and 30 % and 20 dB at 50 % against coverage.
- ``hack`` (Qin et al., arXiv 2504.09261): heads are *contextual* (vertical attention: every query
  attends to the same few keys; high variance of the attention a key receives) or *structural*
  (multi-diagonal: each query attends to its own spatial neighbourhood in earlier scales). The
  ``contextual_share`` (half) of heads with the most concentrated column attention are contextual and
  keep their top-scored keys; structural heads keep the most recent keys (the latest scales, where the
  diagonals are finest; ``structural="score"``: their top-scored keys too) with ``structural_weight``
  (3) times a contextual head's budget (on digits-var "score" is ~1 dB closer to the plain path at
  10-30 %; "recent" stays the default as the reading of HACK's pattern-specific rule). HACK's method
  section and code could not be read here: the classification by attention variance and the
  asymmetric budgets are the paper's (abstract and summaries); the per-type rules and fractions are
  varkit's reading.

The published methods calibrate on their own data sets and choose their drafter/head fractions per
model; the fractions and weights above are varkit's defaults (see docs/design.md), options of
:func:`make_cache_policy`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .cache import KVCache
from .errors import InvalidArgumentError
from .registry import Registry

#: observation queries per step (ScaleKV's ``window_size``)
WINDOW = 16
#: calibration images (classes 0..3, or fewer classes), drawn with this seed
CALIBRATION_IMAGES = 4
CALIBRATION_SEED = 20250526


# -- plan -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Static budgets: ``groups[l]`` the head-index tensors of layer l's groups (a group shares its budget);
    ``kinds[l][g]`` the group's selection rule (``"score"`` or ``"recent"``); ``budgets[s][l][g]`` the keys
    per head the group keeps after step s; ``capacity`` head-positions per batch row."""

    groups: list[list[torch.Tensor]]
    kinds: list[list[str]]
    budgets: list[list[list[int]]]
    capacity: int


@dataclass
class Calibration:
    """Per step s, per layer l, per head: ``current[s][l]`` the share of the window's attention on step s's own
    keys; ``concentration[s][l]`` T·Σ_j ā_j² of the window's mean attention ā over the T keys (1: flat columns,
    T: every query on one key); ``profile[s][l]`` (H, T) ā sorted in decreasing order (coverage curves)."""

    current: list[list[torch.Tensor]] = field(default_factory=list)
    concentration: list[list[torch.Tensor]] = field(default_factory=list)
    profile: list[list[torch.Tensor]] = field(default_factory=list)


def fit_in_order(counts: list[int], old: list[int], new: list[int], capacity: int) -> list[int]:
    """``new`` budgets lowered where needed so that the cache fits ``capacity`` at every moment of a step.

    Units (layer, group) are compressed one after the other in the order given: while unit j attends, units
    before it hold their ``new`` budget and units after it still their ``old`` one, so every prefix of the
    growths ``(new − old)·count`` must fit the slack ``capacity − Σ old·count``.
    """
    slack = capacity - sum(c * o for c, o in zip(counts, old))
    out, run = list(new), 0
    for j, (c, o) in enumerate(zip(counts, old)):
        grow = (out[j] - o) * c
        if run + grow > slack:
            out[j] -= -(-(run + grow - slack) // c)  # ceil: just enough to fit
            grow = (out[j] - o) * c
        run += grow
    return out


def water_fill(counts: list[int], weights: list[float], cap: int, capacity: int) -> list[int]:
    """Per-unit budgets ``min(cap, floor(λ·w))`` with the largest λ whose total ``Σ counts·budget`` fits ``capacity``."""
    def total(lam: float) -> int:
        return sum(c * min(cap, math.floor(lam * w)) for c, w in zip(counts, weights))

    if total(float(cap) / min(weights)) <= capacity:
        return [cap] * len(counts)
    lo, hi = 0.0, float(cap) / min(weights)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= capacity else (lo, mid)
    return [min(cap, math.floor(lo * w)) for w in weights]


def coverage_fill(gains: list[torch.Tensor], count: int, cap: int, capacity: int) -> list[int]:
    """Per-unit budgets (each unit ``count`` heads, at most ``cap`` keys) taking the ``capacity // count`` largest
    marginal gains: ``gains[u][j]`` the attention unit u's (j+1)-th best key carries, non-increasing in j, so the
    chosen gains form a prefix of every unit's curve and the attention kept is the most that fits."""
    n = min(capacity // count, cap * len(gains))
    flat = torch.cat([g[:cap].double() for g in gains])
    unit = torch.cat([torch.full((min(cap, len(g)),), u) for u, g in enumerate(gains)])
    # ties: the earlier unit, then the earlier key (a stable sort of the negated gains)
    chosen = unit[torch.sort(-flat, stable=True).indices[:n]]
    return torch.bincount(chosen, minlength=len(gains)).tolist()


# -- policies -------------------------------------------------------------------------------------------
class CachePolicy:
    """A budget ``b`` in (0, 1] and how it is spread over layers and heads (subclasses: :meth:`plan`)."""

    name: ClassVar[str] = ""

    def __init__(self, budget: float, window: int = WINDOW, pool: int = 1):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise InvalidArgumentError(
                f"a cache budget is the share of the full KV cache to keep, in (0, 1] (e.g. {self.name or 'scalekv'}:0.1), "
                f"got {budget!r}")
        if not isinstance(window, int) or window < 1:
            raise InvalidArgumentError(f"the observation window must be a positive number of queries, got {window!r}")
        if not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
            raise InvalidArgumentError(f"pool must be an odd kernel size >= 1 (1 = no pooling), got {pool!r}")
        self.budget, self.window, self.pool = float(budget), window, pool
        self.last_trace: dict[str, int] = {}  # what the most recent cache made under this policy held (see BudgetedKVCache)

    def __repr__(self) -> str:
        return f"{self.name}:{self.budget:g}"

    # -- which generators -----------------------------------------------------------------------------
    def check_generator(self, gen: Any) -> None:
        """One clear error unless ``gen`` decodes scale by scale through varkit's attention and KV cache."""
        layout = getattr(gen, "layout", None)
        kind = getattr(layout, "kind", None)
        if kind != "scales" or not hasattr(gen, "cache_dims"):
            raise InvalidArgumentError(
                f"cache policy {self!r} needs a next-scale generator (scales layout: VAR, FlowAR) whose steps attend to "
                f"earlier scales through a KV cache; {type(gen).__name__} decodes a {kind} layout")

    # -- budgets --------------------------------------------------------------------------------------
    def capacity(self, layers: int, heads: int, tokens: int) -> int:
        """Head-positions per batch row: ``budget`` × those of the full cache."""
        return int(math.floor(self.budget * layers * heads * tokens + 1e-9))

    def first_full_step(self, layout, layers: int, heads: int, capacity: int) -> int | None:
        """The first step after which the full cache no longer fits (None: it always fits)."""
        for s in range(layout.num_steps):
            if layers * heads * layout.step_starts[s + 1] > capacity:
                return s
        return None

    def plan(self, layout, layers: int, heads: int, capacity: int, calib: Calibration | None) -> Plan:
        raise NotImplementedError


class ScaleKV(CachePolicy):
    """Per-scale drafter/refiner layers (see the module docstring)."""

    name = "scalekv"

    ALLOCATIONS = ("coverage", "drafters")

    def __init__(self, budget: float, allocation: str = "coverage", drafter_weight: float = 4.0,
                 drafters: int | None = None, **kw):
        super().__init__(budget, **kw)
        if allocation not in self.ALLOCATIONS:
            raise InvalidArgumentError(
                f"scalekv allocation must be one of {', '.join(self.ALLOCATIONS)}, got {allocation!r}")
        if not drafter_weight >= 1:
            raise InvalidArgumentError(f"drafter_weight must be >= 1, got {drafter_weight!r}")
        self.allocation, self.drafter_weight, self.drafters = allocation, float(drafter_weight), drafters

    def plan(self, layout, layers, heads, capacity, calib):
        everyone = torch.arange(heads)
        groups = [[everyone] for _ in range(layers)]
        budgets = []
        n_d = self.drafters if self.drafters is not None else max(1, round(layers / 8))
        for s in range(layout.num_steps):
            T = layout.step_starts[s + 1]
            if layers * heads * T <= capacity or calib is None:
                budgets.append([[T] for _ in range(layers)])
                continue
            if self.allocation == "coverage":  # (L,) curves: a layer's heads' mean sorted attention profile
                b = coverage_fill([p.mean(0) for p in calib.profile[s]], heads, T, capacity)
            else:
                share = torch.stack([c.mean() for c in calib.current[s]])  # (L,) attention on the current scale
                drafters = set(share.argsort()[:n_d].tolist())  # the most dispersed layers
                w = [self.drafter_weight if l in drafters else 1.0 for l in range(layers)]
                b = water_fill([heads] * layers, w, T, capacity)
            if s:
                b = fit_in_order([heads] * layers, [x[0] for x in budgets[-1]], b, capacity)
            budgets.append([[x] for x in b])
        return Plan(groups, [["score"] for _ in range(layers)], budgets, capacity)


class HACK(CachePolicy):
    """Contextual / structural heads with asymmetric budgets (see the module docstring)."""

    name = "hack"

    def __init__(self, budget: float, contextual_share: float = 0.5, structural_weight: float = 3.0,
                 structural: str = "recent", **kw):
        super().__init__(budget, **kw)
        if not 0 <= contextual_share <= 1:
            raise InvalidArgumentError(f"contextual_share must be in [0, 1], got {contextual_share!r}")
        if not structural_weight > 0:
            raise InvalidArgumentError(f"structural_weight must be > 0, got {structural_weight!r}")
        if structural not in ("recent", "score"):
            raise InvalidArgumentError(
                f"structural (how structural heads choose their keys) must be recent or score, got {structural!r}")
        self.contextual_share, self.structural_weight = float(contextual_share), float(structural_weight)
        self.structural = structural

    def plan(self, layout, layers, heads, capacity, calib):
        if calib is None:  # nothing is ever evicted
            groups = [[torch.arange(heads)] for _ in range(layers)]
            return Plan(groups, [["score"] for _ in range(layers)],
                        [[[layout.step_starts[s + 1]] for _ in range(layers)] for s in range(layout.num_steps)], capacity)
        steps = [s for s in range(1, layout.num_steps) if calib.concentration[s]]
        conc = torch.stack([torch.stack(calib.concentration[s]) for s in steps]).mean(0)  # (L, H)
        n_c = round(self.contextual_share * layers * heads)
        contextual = torch.zeros(layers * heads, dtype=torch.bool)
        contextual[conc.flatten().argsort(descending=True)[:n_c]] = True
        contextual = contextual.view(layers, heads)
        groups, kinds, units = [], [], []
        for l in range(layers):
            g, k = [], []
            for is_c, kind in ((True, "score"), (False, self.structural)):
                idx = contextual[l].eq(is_c).nonzero().flatten()
                if len(idx):
                    g.append(idx)
                    k.append(kind)
                    units.append((len(idx), 1.0 if is_c else self.structural_weight))
            groups.append(g)
            kinds.append(k)
        budgets = []
        for s in range(layout.num_steps):
            T = layout.step_starts[s + 1]
            counts = [c for c, _ in units]
            flat = water_fill(counts, [w for _, w in units], T, capacity) if layers * heads * T > capacity \
                else [T] * len(units)
            if s:
                flat = fit_in_order(counts, [x for g in budgets[-1] for x in g], flat, capacity)
            it = iter(flat)
            budgets.append([[next(it) for _ in g] for g in groups])
        return Plan(groups, kinds, budgets, capacity)


CACHE_POLICIES: Registry[type[CachePolicy]] = Registry("cache policy", InvalidArgumentError)
for _cls in (ScaleKV, HACK):
    CACHE_POLICIES.register(_cls.name, _cls)


def make_cache_policy(spec: "str | CachePolicy", **options: Any) -> CachePolicy:
    """A policy from ``"name:budget"`` (``"scalekv:0.1"``, ``"hack:0.5"``) or a ready :class:`CachePolicy`."""
    if isinstance(spec, CachePolicy):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise InvalidArgumentError(
            f"a cache policy is NAME:BUDGET with NAME one of {', '.join(CACHE_POLICIES.names())} and BUDGET in (0, 1] "
            f"(e.g. scalekv:0.1), got {spec!r}")
    name, budget = spec.split(":")
    cls = CACHE_POLICIES.lookup(name.strip().lower())
    try:
        value = float(budget)
    except ValueError:
        raise InvalidArgumentError(f"cache budget {budget!r} of {spec!r} is not a number in (0, 1]") from None
    try:
        return cls(value, **options)
    except TypeError:
        raise InvalidArgumentError(f"cache policy {name!r} does not take option(s) {sorted(options)}") from None


# -- the cache ---------------------------------------------------------------------------------------------
class _Group:
    """One group of heads of one layer: its kept keys and values (B, h, m, D), in layout order."""

    __slots__ = ("idx", "k", "v")

    def __init__(self, idx: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor):
        self.idx, self.k, self.v = idx, k, v

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


class _Recorder:
    """Sums the calibration statistics of every (step, layer) over the batch rows."""

    def __init__(self, steps: int, layers: int, heads: int):
        self.current = [[torch.zeros(heads, dtype=torch.float64) for _ in range(layers)] for _ in range(steps)]
        self.conc = [[torch.zeros(heads, dtype=torch.float64) for _ in range(layers)] for _ in range(steps)]
        self.profile: list[list[Any]] = [[0.0] * layers for _ in range(steps)]
        self.rows = [[0] * layers for _ in range(steps)]

    def add(self, step: int, layer: int, probs: torch.Tensor, own: int) -> None:
        """``probs`` (B, H, w, T) of the window over all T keys, the last ``own`` of which are step ``step``'s."""
        p = probs.double()
        cur = p[..., p.shape[-1] - own:].sum(-1).mean(2)  # (B, H)
        mean = p.mean(2)  # (B, H, T): ā
        conc = (mean * mean).sum(-1) * mean.shape[-1]
        self.current[step][layer] += cur.sum(0).cpu()
        self.conc[step][layer] += conc.sum(0).cpu()
        self.profile[step][layer] = self.profile[step][layer] + mean.sort(-1, descending=True).values.sum(0).cpu()
        self.rows[step][layer] += p.shape[0]

    def result(self) -> Calibration:
        cal = Calibration()
        for s in range(len(self.rows)):
            done = all(r > 0 for r in self.rows[s])
            cal.current.append([c / r for c, r in zip(self.current[s], self.rows[s])] if done else [])
            cal.concentration.append([c / r for c, r in zip(self.conc[s], self.rows[s])] if done else [])
            cal.profile.append([c / r for c, r in zip(self.profile[s], self.rows[s])] if done else [])
        return cal


class BudgetedKVCache(KVCache):
    """A KV cache that keeps, per layer and group of heads, at most its plan's budget of keys.

    It has :class:`KVCache`'s length pointer and ``advance``; writes go through :meth:`attend` (called by
    :class:`varkit.nn.Attention`), never ``update``; rollback is refused (no speculative sampler uses it).
    ``nbytes`` is the most the cache has held at once (keys and values); ``transient_bytes`` the most held
    while one layer attends (its kept keys joined with the step's new ones, before eviction).
    """

    def __init__(self, plan: Plan, policy: CachePolicy, layout, num_layers: int, batch: int, heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, recorder: _Recorder | None = None):
        self.plan, self.policy, self.layout, self.recorder = plan, policy, layout, recorder
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.max_len = layout.num_tokens
        self.length = self.peak_length = 0
        self._device, self._dtype = torch.device(device), dtype
        self.held = self.held_peak = self.transient_bytes = 0
        self.trace = {"held_peak_bytes": 0, "transient_bytes": 0}  # updated as it goes; outlives the cache
        self.evicted = False
        self.groups: list[list[_Group]] = []
        for l in range(num_layers):
            gs = []
            for idx in plan.groups[l]:
                h = len(idx)
                empty = torch.empty(batch, h, 0, head_dim, device=self._device, dtype=dtype)
                gs.append(_Group(None if h == heads else idx.to(self._device), empty, empty))
            self.groups.append(gs)
        self._windows: dict[int, torch.Tensor] = {}

    # -- KVCache surface ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.groups)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        """The most bytes of keys and values the cache has held at once (a plain cache: its preallocated total)."""
        return self.held_peak

    @property
    def used_bytes(self) -> int:
        return self.held_peak

    def kept(self) -> torch.Tensor:
        """Keys kept per (layer, head) right now, (L, H)."""
        out = torch.zeros(self.num_layers, self.heads, dtype=torch.long)
        for l, gs in enumerate(self.groups):
            for g in gs:
                out[l, slice(None) if g.idx is None else g.idx.cpu()] = g.k.shape[2]
        return out

    def update(self, layer, k, v):
        raise InvalidArgumentError(
            f"cache policy {self.policy!r}: this generator's attention writes the cache directly; budgets need "
            "varkit.nn.Attention, which lets the cache attend")

    def truncate(self, n: int) -> None:
        raise InvalidArgumentError(f"a KV cache under policy {self.policy!r} cannot roll back (evicted keys are gone)")

    def reset(self) -> None:
        raise InvalidArgumentError(f"a KV cache under policy {self.policy!r} cannot be reset; make a new one")

    def __repr__(self) -> str:
        return (f"BudgetedKVCache({self.policy!r}, layers={self.num_layers}, batch={self.batch}, heads={self.heads}, "
                f"len={self.length}/{self.max_len}, held={self.held} B)")

    # -- attention -------------------------------------------------------------------------------------------
    def _window(self, step: int) -> torch.Tensor:
        """Indices (within step ``step``) of its observation queries: a grid of patch centres (ScaleKV)."""
        if step not in self._windows:
            h, w = self.layout.scale_sizes[step]
            g = math.isqrt(self.policy.window)
            if h * w <= self.policy.window or h < g or w < g:
                idx = torch.arange(h * w)
            else:  # patch centres: the official grid where g divides the side, spread over the map otherwise
                rows = [math.floor(i * h / g + (h / g - 1) / 2) for i in range(g)]
                cols = [math.floor(j * w / g + (w / g - 1) / 2) for j in range(g)]
                idx = torch.tensor([r * w + c for r in rows for c in cols])
            self._windows[step] = idx.to(self._device)
        return self._windows[step]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float | None) -> torch.Tensor:
        """Attention of ``q`` (B, H, n, D) over this layer's kept keys plus the ``n`` new ones, then eviction down
        to the layer's budget for the step. ``mask``: (n, length + n) boolean over layout positions, or None."""
        n, start = k.shape[2], self.length
        if start + n > self.max_len:
            raise InvalidArgumentError(f"KVCache overflow: {start} filled + {n} new > max_len {self.max_len}")
        if mask is not None and self.evicted:
            raise InvalidArgumentError(
                f"cache policy {self.policy!r}: a masked (block-causal) pass needs every earlier key, and some were evicted")
        step = int(self.layout.step_of[start + n - 1])
        own = start + n - self.layout.step_starts[step]  # the step's own keys: the last `own` of the block
        groups = self.groups[layer]
        out = q.new_empty(q.shape) if len(groups) > 1 else None
        for g, budget, kind in zip(groups, self.plan.budgets[step][layer], self.plan.kinds[layer]):
            qg, kn, vn = (q, k, v) if g.idx is None else (q[:, g.idx], k[:, g.idx], v[:, g.idx])
            keys = torch.cat([g.k, kn], 2) if g.k.shape[2] else kn
            vals = torch.cat([g.v, vn], 2) if g.v.shape[2] else vn
            y = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=scale)
            if out is None:
                out = y
            else:
                out[:, g.idx] = y
            total = keys.shape[2]
            self.transient_bytes = max(self.transient_bytes,
                                       self.held + (keys.numel() + vals.numel()) * keys.element_size())
            self.trace["transient_bytes"] = self.transient_bytes
            if self.recorder is not None or total > budget:
                wq = self._window(step) + (n - own)  # the window's rows within this block
                logits = qg[:, :, wq] @ keys.transpose(-1, -2) * (scale if scale is not None else keys.shape[-1] ** -0.5)
                if mask is not None:
                    logits = logits.masked_fill(~mask[wq], float("-inf"))
                probs = logits.float().softmax(-1)  # (B, h, w, total)
                if self.recorder is not None:
                    self.recorder.add(step, layer, probs, own)
                if total > budget:
                    keep = self._select(kind, probs, wq + (total - n), budget)
                    self.evicted = True
                    keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1]))
                    vals = vals.gather(2, keep[..., None].expand(-1, -1, -1, vals.shape[-1]))
            g.k, g.v = keys, vals
            self._account()
        return out

    def _select(self, kind: str, probs: torch.Tensor, window: torch.Tensor, budget: int) -> torch.Tensor:
        """Indices (B, h, budget), ascending, of the keys a group keeps: the window's own tokens first where the
        budget holds twice them or more (``window``: their indices among the keys), then the best scored (``score``:
        the window's attention, max-pooled over ``pool`` neighbours) or the most recent (``recent``)."""
        B, h, _, total = probs.shape
        if budget <= 0:
            return torch.zeros(B, h, 0, dtype=torch.long, device=probs.device)
        if kind == "recent":
            score = torch.arange(total, device=probs.device, dtype=torch.float64).expand(B, h, total).clone()
        else:
            score = probs.sum(2).double()  # (B, h, total)
            p = self.policy.pool
            if p > 1:
                score = F.max_pool1d(score.flatten(0, 1)[:, None], p, stride=1, padding=p // 2)[:, 0].view(B, h, total)
        if budget >= 2 * len(window):  # the window's own keys first, where they leave room for the rest
            score[..., window] = float("inf")
        return score.topk(budget, dim=-1).indices.sort(dim=-1).values

    def _account(self) -> None:
        self.held = sum(g.nbytes for gs in self.groups for g in gs)
        self.held_peak = max(self.held_peak, self.held)
        self.trace["held_peak_bytes"] = self.held_peak


# -- building one ---------------------------------------------------------------------------------------
_CALIBRATIONS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(gen) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in gen.parameters())


def calibrate(gen, params) -> Calibration:
    """Attention statistics of ``gen`` under sampling ``params``: ancestral sampling of a few fixed images with
    nothing evicted (cached per generator weights and settings)."""
    from .samplers.ancestral import AncestralSampler
    from .samplers.random import image_generators

    key = (repr(params), _fingerprint(gen))
    per_gen = _CALIBRATIONS.setdefault(gen, {})
    if key not in per_gen:
        n = min(CALIBRATION_IMAGES, gen.num_classes)
        device = next(gen.parameters()).device
        cond = torch.arange(CALIBRATION_IMAGES, device=device) % n
        layers, heads, _ = gen.cache_dims()
        rec = _Recorder(gen.layout.num_steps, layers, heads)
        AncestralSampler(params, cache_policy=_Observer(rec)).sample(
            gen, cond, image_generators(CALIBRATION_SEED, CALIBRATION_IMAGES))
        per_gen.clear()
        per_gen[key] = rec.result()
    return per_gen[key]


class _Observer(CachePolicy):
    """Keeps everything and records the calibration statistics at every step."""

    name = "observe"

    def __init__(self, recorder: _Recorder):
        super().__init__(1.0)
        self.recorder = recorder

    def plan(self, layout, layers, heads, capacity, calib):
        return Plan([[torch.arange(heads)] for _ in range(layers)], [["score"] for _ in range(layers)],
                    [[[layout.step_starts[s + 1]] for _ in range(layers)] for s in range(layout.num_steps)], capacity)


def budgeted_cache(policy: CachePolicy, gen, batch: int, params) -> BudgetedKVCache:
    """The cache ``policy`` gives ``gen`` for ``batch`` rows (CFG rows included) under sampling ``params``."""
    policy.check_generator(gen)
    layers, heads, head_dim = gen.cache_dims()
    p = next(gen.parameters())
    layout = gen.layout
    capacity = policy.capacity(layers, heads, layout.num_tokens)
    recorder = policy.recorder if isinstance(policy, _Observer) else None
    calib = None
    if recorder is None and policy.first_full_step(layout, layers, heads, capacity) is not None:
        calib = calibrate(gen, params)
    plan = policy.plan(layout, layers, heads, capacity, calib)
    cls = getattr(policy, "cache_class", BudgetedKVCache)  # a policy may bring its own cache (bench: the oracle)
    cache = cls(plan, policy, layout, layers, batch, heads, head_dim, p.device, p.dtype, recorder)
    policy.last_trace = cache.trace  # for inspection after sampling (benchmarks: transient_bytes)
    return cache
