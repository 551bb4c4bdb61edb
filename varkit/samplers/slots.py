"""Slots and the per-slot generator driver the speculative samplers (SJD, speculative, CSpD) share.

**Why.** A speculative sampler commits a different number of tokens per pass for every image. With one
cache length for the batch, a batch advances at its slowest image's pace: every pass is rolled back to
the smallest committed prefix and the images that are ahead re-feed tokens (``spread``), and a finished
image keeps its row until the last one finishes. With :meth:`Generator.forward_rows` every row sits at
its own step, so a batch of ``B`` *slots* can serve a queue of ``N > B`` images: an image that finishes
leaves its slot, the next queued image is prefilled (its CFG pair included) in a small cache of its own
and its rows are copied in (:meth:`KVCache.copy_rows`), and the batch stays full (continuous batching).

:class:`Slots` is the queue: which image each slot holds, and how many passes each image took part in.
:class:`SlotRunner` drives one generator over the slots, in one of two modes:

- *lockstep* (``continuous=False``, every generator): all images are admitted at once by one ``prefill``;
  a call feeds every row from the smallest step any live row needs (rolling the cache back with
  ``gen.rollback`` first, catching up when the cache is behind), exactly the batching the samplers
  always did; images keep their rows until the call ends.
- *rows* (``continuous=True``, generators with ``supports_rows``): each row is fed from its own step with
  ``gen.forward_rows``; rows that need nothing this call are fed from a step the sampler names (their
  committed frontier: what they write there is what they already hold), so nothing they rely on changes.

Either way the sampler asks for the same thing, per row: feed from layout step ``feed`` (inputs start at
``step_starts[feed - 1]``) up to position ``in_end``, and return the outputs of the tokens from
``step_starts[first]`` up to position ``out_end``; outputs come back *aligned*: column j of row b is the
output of layout token ``step_starts[first[b]] + j``. Each image draws from its own ``torch.Generator``
and each row computes what it would alone, so an image is the same whatever the batch size, its slot,
or the mode (up to floating-point differences of batched kernels), and the samplers stay exact.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgumentError, NumericalError
from ..models.base import Generator
from .logits import SamplingParams, mix_cfg


def check_max_batch(max_batch: Any) -> int | None:
    """``max_batch`` as an int >= 1, or None; one line otherwise."""
    if max_batch is None:
        return None
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidArgumentError(f"max_batch (images decoded at once) must be an integer >= 1 or None, got {max_batch!r}")
    return max_batch


def rows_capable(*gens: Generator) -> bool:
    """Whether every generator decodes rows at their own steps (what continuous batching needs)."""
    return all(bool(getattr(g, "supports_rows", False)) for g in gens)


class Slots:
    """``B = min(capacity, N)`` slots over a queue of ``N`` images, admitted in index order.

    ``image[b]`` is the image slot ``b`` holds (-1: empty); ``passes[i]`` counts the passes image ``i``
    took part in (every round its slot held it: under lockstep, every pass of its batch).
    """

    def __init__(self, num_images: int, capacity: int | None = None):
        self.N = num_images
        self.B = num_images if capacity is None else min(capacity, num_images)
        self.image = torch.full((self.B,), -1, dtype=torch.long)
        self.queued = 0  # images admitted so far (the queue's head)
        self.passes = torch.zeros(num_images, dtype=torch.long)
        self.rounds = 0

    @property
    def occupied(self) -> torch.Tensor:
        return self.image >= 0

    def refill(self) -> tuple[torch.Tensor, list[int]]:
        """Fill empty slots from the queue; (slots (k,), their images)."""
        free = (~self.occupied).nonzero().squeeze(1)[: self.N - self.queued]
        images = list(range(self.queued, self.queued + free.numel()))
        self.image[free] = torch.tensor(images, dtype=torch.long)
        self.queued += len(images)
        return free, images

    def release(self, slots: torch.Tensor) -> None:
        self.image[slots.cpu()] = -1

    def count_round(self) -> None:
        """One round of passes: every held image took part."""
        held = self.image[self.occupied]
        self.passes[held] += 1
        self.rounds += 1


class SlotRunner:
    """One generator driven over :class:`Slots` (see the module docstring), with CFG doubling and pass counts.

    ``cond`` (N, ...) holds every image's condition; slot b's rows are b (and B + b, its unconditional twin,
    under CFG). ``passes`` counts generator calls (CFG counted once), admissions included.
    """

    def __init__(self, gen: Generator, params: SamplingParams, cond: torch.Tensor, slots: Slots, continuous: bool):
        if continuous and not getattr(gen, "supports_rows", False):
            raise InvalidArgumentError(f"{type(gen).__name__} cannot decode rows at their own steps (supports_rows "
                                       "is False): continuous batching needs it; pass max_batch=None")
        self.gen, self.params, self.slots, self.continuous = gen, params, slots, continuous
        gen.head.check_params(params)
        gen.check_condition(cond)
        self.layout = gen.sampling_layout(params.num_iter)
        lay = self.layout
        self.S, self.T = lay.num_steps, lay.num_tokens
        self.cond_all = cond
        self.cfg = params.uses_cfg(self.S)
        step_w = [params.guidance_at(lay.progress(s)) for s in range(self.S)]
        self.token_weights = torch.tensor(step_w, dtype=torch.float32)[lay.step_of].to(cond.device)
        self.starts = torch.tensor(lay.step_starts, device=cond.device)
        self.B = slots.B
        self.cache: Any = None
        self.state: Any = None
        self.order: torch.Tensor | None = None  # (B, T) per-slot orders of random-order layouts
        self.started = False
        self.next_step = 1  # lockstep: the step of the next call (the cache holds the steps before it - 1)
        self.passes = 0

    @property
    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Generator rows of ``slots``: themselves, then their unconditional twins under CFG."""
        slots = slots.to(self.starts.device)
        return torch.cat([slots, slots + self.B]) if self.cfg else slots

    def _extra(self, order: torch.Tensor | None) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.layout.random_order:
            if order is None:
                raise ValueError("a layout with random orders needs each image's order at admission")
            extra["order"] = torch.cat([order, order]) if self.cfg else order
        if self.layout is not self.gen.layout:
            extra["layout"] = self.layout
        return extra

    # -- admission ------------------------------------------------------------------------------------------
    def admit(self, slots: torch.Tensor, images: list[int], order: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill ``images`` into ``slots``; their step-0 outputs (k or 2k rows, n_0, C) and CFG weights (n_0,).

        The first admission fills every slot with one ``prefill`` (the batch's cache and state); later ones
        (continuous only) prefill in a cache of their own and copy the rows in."""
        cond = self.cond_all[torch.as_tensor(images, device=self.cond_all.device)]
        if self.cfg:
            cond = torch.cat([cond, self.gen.null_condition(cond)])
        extra = self._extra(order)
        if not self.started:
            if slots.numel() != self.B:
                raise ValueError("the first admission fills every slot")
            self.cache = self.gen.new_cache(cond.shape[0])
            out, self.state = self.gen.prefill(cond, self.cache, **extra)
            self.started = True
        else:
            if not self.continuous:
                raise ValueError("lockstep batches admit every image at once")
            sub = self.gen.new_cache(cond.shape[0])
            out, sub_state = self.gen.prefill(cond, sub, **extra)
            dst = self.rows_of(slots)
            if self.cache is not None:
                self.cache.copy_rows(dst, sub)
            self.state = _copy_state_rows(self.state, sub_state, dst, 2 * self.B if self.cfg else self.B)
        if order is not None:
            if self.order is None:
                self.order = order.new_zeros(self.B, order.shape[1])
            self.order[slots.to(order.device)] = order
        self.passes += 1
        if not bool(torch.isfinite(out).all()):
            raise NumericalError(f"{type(self.gen).__name__} gives non-finite outputs (NaN or inf) on its first "
                                 "step: its weights are corrupt or overflow in this dtype; re-save or re-convert it")
        n0 = out.shape[1]
        return out, (self.token_weights[:n0] if self.cfg else None)

    # -- a call ---------------------------------------------------------------------------------------------
    def outputs(self, tokens: torch.Tensor, feed: torch.Tensor, in_end: torch.Tensor, first: torch.Tensor,
                out_end: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One generator call; (outputs (B or 2B, n, C) aligned to ``first``, per-row CFG weights (B, n) or None).

        ``tokens`` (B, L, ...): every slot's token buffer in layout order (L covers the fed positions; columns
        past it read as its last). Per row: inputs from ``step_starts[feed - 1]`` to position ``in_end``;
        outputs wanted for tokens ``step_starts[first]`` … ``out_end - 1`` (``feed <= first``). Rows not
        ``live`` are fed from their ``feed`` step too (rows mode) and their outputs are garbage."""
        st = self.starts
        first, s = first.clamp(0, self.S - 1), feed.clamp(1, self.S - 1)  # (rows not live may point anywhere)
        n_out = int((out_end - st[first])[live].max())
        if self.continuous:
            n = int(torch.maximum(in_end - st[s - 1], out_end - st[s])[live].max())
            idx = (st[s - 1][:, None] + torch.arange(n, device=st.device)).clamp(max=tokens.shape[1] - 1)
            inp = _take(tokens, idx)
            if self.cfg:
                inp, steps = torch.cat([inp, inp]), torch.cat([s, s])
            else:
                steps = s
            kw = {}
            if getattr(self.gen, "rows_wanted", False):  # MAR: every output step is a pass of its own: only those read
                lo, hi = torch.where(live, st[first] - st[s], 0), torch.where(live, out_end - st[s], 0)
                kw["wanted"] = (torch.cat([lo, lo]), torch.cat([hi, hi])) if self.cfg else (lo, hi)
            out = self.gen.forward_rows(inp, steps, self.cache, self.state, **kw)
            base = st[s]
        else:
            m = int(s[live].min())
            if self.next_step > m:
                self.gen.rollback(self.cache, self.state, m)
            else:
                m = self.next_step  # the cache is behind: catch up from where it stands
            end = int(in_end[live].max())
            inp = tokens[:, int(st[m - 1]):end]
            if self.cfg:
                inp = torch.cat([inp, inp])
            out = self.gen(inp, m, self.cache, self.state)
            # steps fed whole: the cache now holds the steps before next_step - 1
            self.next_step = int(torch.searchsorted(st, st[m - 1] + inp.shape[1], right=True))
            base = st[m].expand(self.B)
        self.passes += 1
        rel = ((st[first] - base)[:, None] + torch.arange(n_out, device=st.device)).clamp(0, out.shape[1] - 1)
        if self.cfg:
            rel = torch.cat([rel, rel])
        out = out.gather(1, rel.view(*rel.shape, *[1] * (out.dim() - 2)).expand(*rel.shape, *out.shape[2:]))
        weights = None
        if self.cfg:
            tok = (st[first][:, None] + torch.arange(n_out, device=st.device)).clamp(max=self.T - 1)
            weights = self.token_weights[tok]
        return out, weights

    @staticmethod
    def mix(out: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Guided logits (B, n, V) of a categorical head: per-row weights (B, n) or per-position (n,)."""
        if weights is None:
            return out
        w = weights[..., None] if weights.dim() == 2 else weights.view(1, -1, 1)
        return mix_cfg(out, w.to(out.dtype))


def _take(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tokens[b, idx[b, j]]`` (B, n, ...)."""
    if tokens.dim() == 2:
        return tokens.gather(1, idx)
    return tokens.gather(1, idx.view(*idx.shape, *[1] * (tokens.dim() - 2)).expand(*idx.shape, *tokens.shape[2:]))


def _copy_state_rows(state: Any, sub: Any, rows: torch.Tensor, batch: int) -> Any:
    """The batch's decoding ``state`` with rows ``rows`` taken from a sub-batch's ``sub`` (as KVCache.copy_rows)."""
    if hasattr(state, "copy_rows"):
        state.copy_rows(rows, sub)
        return state
    if state is None and sub is None:
        return None
    if isinstance(sub, torch.Tensor) or isinstance(state, torch.Tensor):  # raster: caption padding masks
        like = sub if isinstance(sub, torch.Tensor) else state
        full = state if isinstance(state, torch.Tensor) else torch.ones(batch, *like.shape[1:], dtype=like.dtype,
                                                                          device=like.device)
        full[rows.to(full.device)] = sub if isinstance(sub, torch.Tensor) else True
        return full
    raise InvalidArgumentError(f"cannot admit new rows into a {type(state).__name__} decoding state")
