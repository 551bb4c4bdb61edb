"""Speculative Jacobi decoding (SJD; Teng et al., ICLR 2025): lossless, training-free, parallel.

Every image keeps a *window* of draft tokens right after the tokens it has committed. One
forward pass feeds the last committed step plus the window's drafts and returns, for every
window position j, the target distribution ``p_j = p(· | committed, drafts before j)`` (the
guided, temperature/top-k/top-p processed distribution: :func:`~varkit.samplers.logits.processed_probs`
of the CFG-mixed logits, exactly what ancestral sampling draws from). Then, left to right:

1. a draft ``x_j`` stored with the distribution ``q_j`` it was drawn from is accepted with
   probability ``min(1, p_j(x_j) / q_j(x_j))`` (:func:`varkit.samplers.accept.accepts`, the
   routine every speculative sampler shares);
2. at the first rejection the position is re-drawn from ``norm(max(0, p_j − q_j))``
   (:func:`~varkit.samplers.accept.residual_mass`) and
   committed, and verification stops for this pass (the later ``p`` condition on a token
   that has just changed);
3. every window position after it keeps a new draft sampled from this pass's ``p_j`` and
   stores that ``p_j`` as its ``q_j`` (the Jacobi update: the tail is refined pass by pass).
   ``coupling=True`` draws that new draft by maximal coupling with the old one instead of
   independently (keep ``x_j`` with probability ``min(1, p_j(x_j)/q_j(x_j))``, else draw from
   the residual; MC-SJD): it is still exactly ``p_j``-distributed, but stays put when ``p``
   barely moved, so the tail converges in fewer passes. Off by default (the paper's SJD);
4. the window is topped up to its length with new drafts whose ``q`` is one-hot on them:
   ``init="random"`` (a uniform token), ``"repeat_horizon"`` (the current token of the left
   neighbour (row, col−1); the paper's LlamaGen default) or ``"sample_horizon"`` (the argmax
   of the left neighbour's latest distribution: the ``p`` it was last verified against, or
   its ``q``); column 0 falls back to random.

Each emitted token is per-token speculative sampling with a valid ``q`` (the draft was
drawn from ``q`` with its own uniform, independently of everything that decides the prefix
it is verified on), so the joint distribution of the output is exactly the ancestral one,
whatever the window, the initialisation or ``q``. The first pass is the generator's
``prefill``, which only yields step 0; it verifies a fresh step-0 draft.

**Window.** ``window`` counts tokens: one pass feeds ``window`` tokens (the last committed
step and the drafts) and can commit at most ``window`` tokens; ``window=1`` needs exactly as
many passes as ancestral sampling. On layouts whose steps hold several tokens the window is
the longest run of whole steps with at most ``window`` tokens (at least one step).

**Layout steps.** Verification works per layout step: given the earlier steps, the tokens of
one step are conditionally independent (raster: one token; NAR's neighbors layout: one front
of ``p(token | earlier fronts)``), so each token of the step is verified independently against
its own ``p`` and ``q``, each rejected token is re-drawn from its own residual, and the step is
exact. The step counts as accepted only if all its tokens were; the first step with a
rejection is committed (with its re-drawn tokens) and ends the pass; later steps are the
Jacobi tail. On raster this is the usual token-by-token chain.

**Batches (ragged acceptance).** Each image commits its own number of steps per pass. Two ways to batch
them, both through :mod:`varkit.samplers.slots` (an image draws a fixed number of uniforms per pass, three
per window slot, from its own ``torch.Generator``, and each row sees exactly the computation it would see
alone: an image is the same whatever the batch size, its place in the batch or the mode, up to
floating-point differences of batched kernels, and exactly lossless):

- *lockstep* (``sample(gen, cond, gens)``): the batch shares one :class:`~varkit.cache.KVCache` length.
  Every pass starts at the *smallest* committed prefix over the images still running (the cache is
  rolled back there); a row that is ahead re-feeds its committed tokens (outputs ignored, never
  re-verified), a row whose window ends earlier is padded with whatever its buffer holds (it can only
  influence positions after its window). A pass feeds ``window + spread`` tokens per row (``spread``:
  the gap between the furthest and the slowest image) and the batch takes its slowest image's passes.
- *continuous* (``sample(..., max_batch=B)``, generators with ``supports_rows``): ``B`` slots over the
  queue of images; every row is fed from its own last committed step (``gen.forward_rows``), a finished
  image leaves its slot and the next one is prefilled into it. Each image takes its own passes.

**Stats.** ``forward_passes`` counts generator calls (the prefills included, a CFG pair
counted once); ``steps`` is the number of layout steps; ``accepted_per_pass[i]`` is the mean
over the images of the tokens committed in each image's pass i (so it sums to the tokens of one
image); ``passes_per_image`` the passes each image took part in. ``SJDSampler.trace`` keeps, for the
last call, every image's first window token before each of its passes and what it committed ((passes, N)).

Drives the generator only through the contract, by way of :class:`~varkit.samplers.slots.SlotRunner`:
``prefill``, ``forward`` over several future steps at once and ``rollback`` (lockstep), or ``forward_rows``
and :meth:`~varkit.cache.KVCache.copy_rows` (continuous). Generators that cannot feed
several steps at once or roll back, and layouts whose steps are not drafted token grids (VAR's
scales), are refused.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .accept import AcceptRule, acceptance_prob, accepts, residual_mass
from .base import Sampler, SampleResult, SamplerStats, is_categorical
from .lantern import DEFAULT_DELTA, DEFAULT_K, make_relaxation
from .logits import SamplingParams, processed_probs, sample_probs, uniforms
from .slots import SlotRunner, Slots, rows_capable

INITS = ("random", "repeat_horizon", "sample_horizon")
LAYOUTS = ("raster", "neighbors")


def left_neighbours(layout) -> torch.Tensor:
    """Index of the token at (row, col−1) of the same scale for every token, −1 if none."""
    coords = layout.coords.tolist()
    where = {tuple(rc): i for i, rc in enumerate(coords)}
    return torch.tensor([where.get((r, c - 1, s), -1) for r, c, s in coords], dtype=torch.long)


def draft_sources(layout, pad: int) -> torch.Tensor:
    """Where spatial init takes a new draft's token from, for every first-new position ``a``.

    ``src[a, P]`` for a new draft at position ``P`` when the positions ``>= a`` are the new
    ones: follow left neighbours from ``P`` to the nearest position that is not new and copy
    it (``src >= 0``); if the row's column 0 is reached first, every draft on the way copies
    the random token drawn there, ``src = -(that position + 1)``. Shape (T + 1, T + pad).
    """
    T = layout.num_tokens
    left = left_neighbours(layout).tolist()
    chains = []
    for p in range(T):
        ch = [p]
        while left[ch[-1]] >= 0:
            ch.append(left[ch[-1]])
        chains.append(ch)
    L = max(len(ch) for ch in chains)
    C = torch.tensor([ch + [-1] * (L - len(ch)) for ch in chains])  # (T, L)
    last = torch.tensor([ch[-1] for ch in chains])  # column-0 end of each chain
    a = torch.arange(T + 1)[:, None, None]
    old = (C[None] >= 0) & (C[None] < a)  # (T+1, T, L): chain entries that are not new
    first = old.int().argmax(-1)  # the nearest one (first True)
    nearest = torch.gather(C.expand(T + 1, T, L), 2, first[..., None]).squeeze(-1)
    src = torch.where(old.any(-1), nearest, -(last + 1))
    return torch.cat([src, torch.full((T + 1, pad), -1)], 1)


def window_ends(step_starts: list[int], window: int) -> list[int]:
    """For each committed count c, the end step of the window [c, e): c = 0 → 1 (the prefill
    yields step 0 only); else the most whole steps with ≤ ``window`` tokens, at least one."""
    S = len(step_starts) - 1
    ends = [1]
    for c in range(1, S):
        e = c + 1
        while e < S and step_starts[e + 1] - step_starts[c] <= window:
            e += 1
        ends.append(e)
    return ends


class SJDSampler(Sampler):
    """Speculative Jacobi decoding; lossless. See the module docstring for the algorithm,
    the per-step verification, ragged batches and the stats.

    ``window``: tokens fed and at most committed per pass (default 16, the paper's);
    ``init``: how new drafts start (``random``, ``repeat_horizon``, ``sample_horizon``);
    ``coupling``: maximal coupling of the tail's redraws (MC-SJD; default off).
    """

    name = "sjd"
    lossless = True
    continuous_batching = True
    # the acceptance probability of a draft from (p(x), q(x)); private hook for tests
    _rule: ClassVar[AcceptRule] = staticmethod(acceptance_prob)

    def __init__(self, params: SamplingParams | None = None, window: int = 16, init: str = "repeat_horizon",
                 coupling: bool = False, relax: str | None = None, k: int = DEFAULT_K, delta: float = DEFAULT_DELTA,
                 bound: str = "position", codebook=None):
        super().__init__(params)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidArgumentError(f"SJD window must be an integer >= 1 (tokens per pass), got {window!r}")
        if init not in INITS:
            raise InvalidArgumentError(f"unknown SJD init {init!r}; choose one of {', '.join(INITS)}")
        if not isinstance(coupling, bool):
            raise InvalidArgumentError(f"SJD coupling must be true or false, got {coupling!r}")
        self.window, self.init, self.coupling = window, init, coupling
        # LANTERN relaxed acceptance (varkit.samplers.lantern); lossy unless delta == 0
        self.relaxation = make_relaxation(relax, k=k, delta=delta, bound=bound, codebook=codebook)
        self.lossless = self.relaxation is None or self.relaxation.delta == 0
        self.trace: dict[str, torch.Tensor] = {}
        self._geo_key, self._geo = None, {}

    def bind_tokenizer(self, tokenizer) -> None:
        """The generator's tokenizer: its codebook gives LANTERN's latent neighbourhoods."""
        if self.relaxation is not None:
            self.relaxation.bind(tokenizer)

    def check_generator(self, gen) -> None:
        layout = getattr(gen, "layout", None)
        kind = getattr(layout, "kind", None)
        if kind not in LAYOUTS:
            raise InvalidArgumentError(
                f"SJD cannot drive {type(gen).__name__}: its {kind} layout has no drafted token steps "
                f"(SJD works on the {' and '.join(LAYOUTS)} layouts); use sampler='ancestral'"
            )
        if not is_categorical(gen):
            raise InvalidArgumentError(
                f"SJD needs a generator of ids with token logits; {type(gen).__name__} has a "
                f"{getattr(getattr(gen, 'head', None), 'kind', 'missing')} head (use sampler='ancestral')")
        if not getattr(gen, "supports_multistep", False) or not getattr(gen, "supports_rollback", False):
            raise InvalidArgumentError(
                f"SJD needs a generator that feeds several steps at once and rolls back its state; "
                f"{type(gen).__name__} does not (supports_multistep={getattr(gen, 'supports_multistep', None)}, "
                f"supports_rollback={getattr(gen, 'supports_rollback', None)}); use sampler='ancestral'"
            )
        if self.window > layout.num_tokens:
            raise InvalidArgumentError(
                f"SJD window {self.window} is longer than the {layout.num_tokens}-token sequence; "
                f"use a window of 1..{layout.num_tokens}"
            )
        if self.relaxation is not None:
            self.relaxation.check(gen.vocab_size)

    def continuous_for(self, gen) -> bool:
        return rows_capable(gen)

    def _sample(self, gen, cond, gens, progress, max_batch: int | None = None) -> SampleResult:
        layout, params = gen.layout, self.params
        dev = cond.device
        N, S, T, V = cond.shape[0], layout.num_steps, layout.num_tokens, gen.vocab_size
        g = self._geometry(layout, dev)
        Wt, tok0_of, end_of, pos_of, valid_of, rel_step_of, sources = (
            g["Wt"], g["tok0"], g["end"], g["pos"], g["valid"], g["rel_step"], g["sources"])
        slot_idx = torch.arange(Wt, device=dev)
        starts = torch.tensor(layout.step_starts, device=dev)

        slots = Slots(N, max_batch)
        run = SlotRunner(gen, params, cond, slots, continuous=max_batch is not None)
        B = slots.B
        result = torch.zeros(N, T, dtype=torch.long, device=dev)
        tokens = torch.zeros(B, T + Wt, dtype=torch.long, device=dev)
        # what spatial init copies from: the tokens, or (sample_horizon) each position's latest argmax
        guide = tokens.clone() if self.init == "sample_horizon" else tokens
        c = torch.full((B,), S, dtype=torch.long, device=dev)  # committed steps per slot (S: empty or done)
        d_end = torch.zeros_like(c)  # drafts exist for steps [c, d_end)
        q = torch.zeros(B, Wt, V, device=dev)  # q of the draft at token tok0_of[c] + slot
        trace: list[list[tuple[int, int]]] = [[] for _ in range(N)]  # per image: (first window token, committed)
        bar = tqdm(total=N * T, disable=not progress, desc="tokens", leave=False)
        while True:
            new, images = slots.refill()
            if len(images):
                new = new.to(dev)
                for buf in {id(tokens): tokens, id(guide): guide}.values():
                    buf[new] = 0
                c[new], d_end[new], q[new] = 0, 0, 0.0
            active = c < S
            idx = active.nonzero().squeeze(1).tolist()
            if not idx:
                break
            tok0, e = tok0_of[c], end_of[c]  # window [c, e) in steps
            pos, valid, rel_step = pos_of[c], valid_of[c], rel_step_of[c]  # (B, Wt) each
            u = uniforms([gens[int(slots.image[i])] for i in idx], 3 * Wt, dev)
            if len(idx) < B:
                u = torch.zeros(B, 3 * Wt, dtype=u.dtype, device=dev).index_copy_(0, torch.tensor(idx, device=dev), u)
            u_acc, u_res, u_init = u[:, :Wt], u[:, Wt:2 * Wt], u[:, 2 * Wt:]

            # -- top the windows up with new drafts, q one-hot on them --------------------------------
            first_new = tok0_of[torch.maximum(d_end, c)]  # (B,) token index
            new_pos = valid & (pos >= first_new[:, None])
            fresh = self._new_drafts(guide, pos, tok0, first_new, sources, u_init, V)
            drafts = torch.where(new_pos, fresh, tokens.gather(1, pos))
            tokens.scatter_(1, pos, drafts)
            if guide is not tokens:
                guide.scatter_(1, pos, torch.where(new_pos, fresh, guide.gather(1, pos)))
            q = torch.where(new_pos[..., None], torch.zeros_like(q).scatter_(-1, fresh[..., None], 1.0), q)

            # -- one pass: admitted images get their prefill (step 0), the others their windows -------------
            logits = torch.zeros(B, Wt, V, device=dev)
            if len(images):
                logits[new, :1] = run.mix(*run.admit(new, images))[:, :1].to(logits.dtype)
            running = active & (c > 0)
            if bool(running.any()):
                feed = torch.where(running, c, 1)
                out = run.mix(*run.outputs(tokens, feed, starts[(e - 1).clamp(min=0)], feed, starts[e], running))
                k = min(out.shape[1], Wt)
                logits[:, :k] = torch.where(running[:, None, None], out[:, :k].to(logits.dtype), logits[:, :k])
            p_win = processed_probs(logits, params)  # (B, Wt, V): slot j is token tok0 + j

            # -- verify every window token; the first step with a rejection ends the pass -----------
            rule = self._rule if self.relaxation is None else self.relaxation.rule(p_win, drafts, q, base=self._rule)
            accepted = accepts(p_win, drafts, u_acc, q, rule=rule)
            first_bad = torch.where(valid & ~accepted, rel_step, S + 1).amin(1)
            done = torch.minimum(first_bad + 1, e - c)  # steps committed this pass
            tail = valid & (rel_step >= done[:, None])
            # a rejected token is re-drawn from norm(max(0, p − q)); the Jacobi tail re-drafts from
            # this pass's p, which becomes its q; with maximal coupling the tail keeps its old draft
            # w.p. min(1, p/q) and otherwise draws from the residual: still exactly p, closer to x
            redraw = residual_mass(p_win, q, drafts)
            if not self.coupling:
                redraw = torch.where(tail[..., None], p_win, redraw)
                accepted = accepted & ~tail
            elif rule is not self._rule:  # the coupled tail keeps its draft by the exact rule: it must stay p-distributed
                accepted = torch.where(tail, accepts(p_win, drafts, u_acc, q, rule=self._rule), accepted)
            out_tok = torch.where(valid & ~accepted, sample_probs(redraw, u_res), drafts)
            tokens.scatter_(1, pos, out_tok)
            q = torch.where(tail[..., None], p_win, q)
            if guide is not tokens:
                guide.scatter_(1, pos, torch.where(valid, p_win.argmax(-1), guide.gather(1, pos)))

            # -- advance: commit, slide the q buffer; finished images leave their slots (continuous) ---
            c = c + done
            shift = tok0_of[c] - tok0  # tokens committed
            q = q.gather(1, (slot_idx + shift[:, None]).clamp(max=Wt - 1)[..., None].expand(-1, -1, V))
            d_end = torch.where(active, e, d_end)
            slots.count_round()
            for b in idx:
                trace[int(slots.image[b])].append((int(tok0[b]), int(shift[b])))
            finished = active & (c >= S)
            if bool(finished.any()):
                fin = finished.nonzero().squeeze(1)
                result[slots.image[fin.cpu()].to(dev)] = tokens[fin, :T]
                if run.continuous:
                    slots.release(fin)
            if progress:
                bar.update(int(shift[active].sum()))
        bar.close()
        return self._result(result, trace, slots, run, S, T)

    def _result(self, tokens, trace, slots, run, S, T) -> SampleResult:
        """Tokens, stats and ``self.trace`` (per image: first window token and tokens committed, per pass)."""
        P = max(len(t) for t in trace)
        start = torch.full((P, len(trace)), T, dtype=torch.long)
        accepted = torch.zeros(P, len(trace), dtype=torch.long)
        for i, t in enumerate(trace):
            if t:
                start[:len(t), i] = torch.tensor([a for a, _ in t])
                accepted[:len(t), i] = torch.tensor([n for _, n in t])
        self.trace = {"start": start, "accepted": accepted}
        stats = SamplerStats(forward_passes=run.passes, steps=S, accepted_per_pass=accepted.double().mean(1).tolist(),
                             cache_bytes=run.cache_bytes, passes_per_image=slots.passes.tolist(),
                             rounds=slots.rounds if run.continuous else 0)
        return SampleResult(tokens, stats)

    def _geometry(self, layout, dev) -> dict:
        """Per committed count c (S = finished), the window and its slots, as lookup tables;
        cached per layout and device."""
        key = (id(layout), str(dev))
        if self._geo_key == key and self._geo["layout"] is layout:
            return self._geo
        S, starts = layout.num_steps, layout.step_starts
        ends = window_ends(starts, self.window)
        Wt = max(starts[e] - starts[c] for c, e in enumerate(ends))  # window slots (tokens)
        tok0 = torch.tensor(starts, device=dev)  # first window token
        ntok = torch.tensor([starts[e] - starts[c] for c, e in enumerate(ends)] + [0], device=dev)
        slots = torch.arange(Wt, device=dev)
        # slot token indices: token buffers carry Wt padding columns so slots never need clamping
        pos = tok0[:, None] + slots
        step_of = torch.cat([layout.step_of.to(dev), torch.full((Wt,), S, device=dev)])
        self._geo_key = key
        self._geo = {
            "layout": layout, "Wt": Wt, "tok0": tok0, "end": torch.tensor(ends + [S], device=dev), "pos": pos,
            "valid": slots < ntok[:, None], "rel_step": step_of[pos] - torch.arange(S + 1, device=dev)[:, None],
            "sources": draft_sources(layout, Wt).to(dev) if self.init != "random" else None,
        }
        return self._geo

    def _new_drafts(self, guide, pos, tok0, first_new, sources, u_init, V) -> torch.Tensor:
        """Draft tokens for window slots (B, Wt) of which those at ``pos >= first_new`` are new:
        random, or copied along the chain of left neighbours (see :func:`draft_sources`)."""
        rnd = (u_init * V).long().clamp_(max=V - 1)
        if sources is None:
            return rnd
        src = sources[first_new[:, None], pos]
        copied = guide.gather(1, src.clamp(min=0))
        root = (-src - 1 - tok0[:, None]).clamp(0, pos.shape[1] - 1)  # slot of the random column-0 draft
        return torch.where(src >= 0, copied, rnd.gather(1, root))
