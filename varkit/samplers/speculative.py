"""Draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023), optionally LANTERN-relaxed.

A small *draft* generator over the same tokenizer proposes ``gamma`` tokens one by one
(its own :class:`~varkit.cache.KVCache`, driven through its own
:class:`~varkit.samplers.base.GuidedRunner` with the same sampling settings and CFG, so its
distribution ``q`` is processed exactly like the target's). The *target* then scores all of
them in one multi-step ``forward`` and, left to right, accepts draft ``x_j`` with probability
``min(1, p_j(x_j) / q_j(x_j))`` (:func:`varkit.samplers.accept.verify`, the routine SJD uses
too). At the first rejection the position is re-drawn from ``norm(max(0, p_j − q_j))`` and the
pass ends; if all ``gamma`` drafts are accepted, a bonus token is drawn from the target's
``p`` at the next position. Every emitted token is distributed exactly as the target's
processed conditional (CFG mix, temperature, top-k, top-p): lossless whatever the drafter.
Both caches are rolled back with ``rollback`` to what was committed.

The first pass is the target's ``prefill``, which only yields position 0: that token is drawn
from ``p`` directly. The drafter and the target must share the vocabulary, the layout and the
conditions (class count / caption shape); when both tokenizers are known (a pipeline, or a
drafter given as a pipeline folder or bundled name), their codebooks must be identical.
Layouts with one token per step (raster) only; ``gamma`` counts tokens.

``relax="lantern"`` (with ``k``, ``delta``, ``bound``) credits each draft with the target mass
of its latent neighbours (:mod:`varkit.samplers.lantern`; the sampler is then lossy, with a
per-position total-variation bound ``delta``; ``delta=0`` is the lossless sampler token for
token). The neighbourhoods come from the tokenizer's codebook: a pipeline binds it
(``bind_tokenizer``); outside one pass ``codebook=``.

**Batches (ragged acceptance).** Images accept different numbers of drafts. Both models are driven through
:mod:`varkit.samplers.slots` over one queue of images. *Lockstep* (``sample(gen, cond, gens)``): each model
keeps one cache length for the batch; every call starts at the smallest prefix a live row needs (rolled
back there, or caught up from where the cache stands); rows that are ahead re-feed committed tokens (outputs
ignored), rows with shorter windows are padded (causal attention: only positions they ignore see it); the
batch takes its slowest image's passes. *Continuous* (``sample(..., max_batch=B)``, generators with
``supports_rows``): ``B`` slots, every row fed from its own position (``forward_rows``): the drafter's first
call of a pass catches each row up from the last token it holds, then one call per draft slot; a finished
image leaves its slot to the next queued one (target and drafter prefilled, rows copied in). Either way each
image sees exactly the computation it would see alone and draws a fixed number of uniforms per pass
(``3·gamma + 1``) from its own ``torch.Generator``: the same image whatever the batch size, its slot or the
mode (up to floating-point differences of batched kernels).

**Stats.** ``forward_passes`` counts *target* calls (prefills included, a CFG pair counted
once); ``passes_per_image`` the target passes each image took part in; ``accepted_per_pass[i]`` is the
mean over the images of the tokens committed in each image's pass i (sums to the tokens of one
image; ``mean_accepted`` is the mean accepted length per target pass, bonus or re-drawn token included); ``cache_bytes`` both caches. ``SpeculativeSampler.trace``
keeps, for the last call, every image's committed position before each of its passes, what it
committed ((passes, N)), and ``draft_passes`` (drafter calls).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..models.base import Generator
from .accept import AcceptRule, acceptance_prob, verify
from .base import SampleResult, Sampler, SamplerStats, is_categorical
from .lantern import DEFAULT_DELTA, DEFAULT_K, make_relaxation
from .logits import SamplingParams, processed_probs, sample_probs, uniforms
from .slots import SlotRunner, Slots, rows_capable


@functools.lru_cache(maxsize=4)
def _load_draft(path: str, mtime: float, role: str = "draft") -> tuple[Generator, Any]:
    """(generator, tokenizer or None) of a pipeline folder or a bare generator folder."""
    from ..modeling import load_module, read_config

    cfg = read_config(path)
    if cfg.get("_class") == "Pipeline":
        return load_module(Path(path) / "generator"), load_module(Path(path) / "tokenizer")
    module = load_module(path)
    if not isinstance(module, Generator):
        raise InvalidArgumentError(f"{path} holds a {type(module).__name__}, not a generator ({role})")
    return module, None


def resolve_draft(draft: Any, role: str = "draft") -> tuple[Generator, Any]:
    """A drafter given as a Generator, a Pipeline, a pipeline/generator folder or a bundled name
    → (generator, its tokenizer or None). ``role`` names it in errors (training's ``init_from``
    resolves its source generator here too)."""
    if draft is None:
        raise InvalidArgumentError(
            "speculative decoding needs a draft model: pass draft=<bundled name (e.g. digits-draft), "
            "model folder, Pipeline or Generator>"
        )
    if isinstance(draft, Generator):
        return draft, None
    if hasattr(draft, "generator") and hasattr(draft, "tokenizer"):
        return draft.generator, draft.tokenizer
    if isinstance(draft, (str, Path)):
        from ..hub import resolve_model_dir

        path = resolve_model_dir(draft, f"{role} model")
        cfg = path / "config.json"
        return _load_draft(str(path.resolve()), cfg.stat().st_mtime if cfg.is_file() else 0.0, role)
    raise InvalidArgumentError(
        f"{role} must be a bundled name, a model folder, a Pipeline or a Generator, got {type(draft).__name__}"
    )


def check_same_tokens(model, ref, model_tok, ref_tok, roles: tuple[str, str]) -> None:
    """One clear error if ``model`` cannot stand in for ``ref`` token by token: vocabulary, layout,
    conditions and (where both are known) tokenizer codebook must agree. ``roles`` names the two
    in messages: ("draft", "target") for speculative decoding, ("student", "teacher") for distillation."""
    a, b = roles
    if model.vocab_size != ref.vocab_size:
        raise InvalidArgumentError(
            f"{a} and {b} have different vocabularies ({model.vocab_size} vs {ref.vocab_size} tokens); "
            f"the {a} must be trained on the {b}'s tokenizer"
        )
    ml, rl = model.layout, ref.layout
    if ml.kind != rl.kind or ml.step_sizes != rl.step_sizes or not torch.equal(ml.coords, rl.coords):
        raise InvalidArgumentError(
            f"{a} and {b} have different layouts ({ml.kind} {tuple(ml.grid)} vs {rl.kind} {tuple(rl.grid)}); "
            f"the {a} must generate the same token grid in the same order"
        )
    if getattr(model, "num_classes", None) != getattr(ref, "num_classes", None) or \
            getattr(getattr(model, "config", None), "caption_dim", 0) != getattr(getattr(ref, "config", None), "caption_dim", 0):
        raise InvalidArgumentError(
            f"{a} and {b} take different conditions ({getattr(model, 'num_classes', '?')} vs "
            f"{getattr(ref, 'num_classes', '?')} classes); the {a} must be trained on the same labels"
        )
    if model_tok is not None and ref_tok is not None and not same_codebook(model_tok, ref_tok):
        raise InvalidArgumentError(
            f"{a} and {b} use different tokenizers (the {a} comes from another tokenizer: their codebooks "
            f"differ); the {a} must be trained on the {b}'s tokenizer"
        )


def same_codebook(a, b) -> bool:
    """Whether two tokenizers share their codebook (by content; by size where one exposes none)."""
    if a is b:
        return True
    ca, cb = getattr(a, "codebook", None), getattr(b, "codebook", None)
    if not callable(ca) or not callable(cb):
        return getattr(a, "codebook_size", None) == getattr(b, "codebook_size", None)
    with torch.no_grad():
        x, y = ca().detach().float().cpu(), cb().detach().float().cpu()
    return x.shape == y.shape and torch.equal(x, y)


class SpeculativeSampler(Sampler):
    """Draft-model speculative decoding; lossless unless ``relax="lantern"``.

    ``draft``: the drafter (bundled name, model folder, Pipeline or Generator);
    ``gamma``: drafts per target pass (default 4); ``relax``: ``None`` or ``"lantern"`` with
    ``k`` (neighbours, default 1000, clamped to V−1), ``delta`` (TV budget, default 0.1) and
    ``bound`` (``"position"``, default, or ``"draft"``; see :mod:`varkit.samplers.lantern`);
    ``codebook``: tokenizer or (V, D) tensor for LANTERN outside a pipeline.
    """

    name = "speculative"
    lossless = True
    continuous_batching = True
    # the acceptance probability of a draft from (p(x), q(x)); private hook for tests
    _rule: ClassVar[AcceptRule] = staticmethod(acceptance_prob)

    def __init__(self, params: SamplingParams | None = None, draft: Any = None, gamma: int = 4,
                 relax: str | None = None, k: int = DEFAULT_K, delta: float = DEFAULT_DELTA,
                 bound: str = "position", codebook: Any = None):
        super().__init__(params)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise InvalidArgumentError(f"speculative gamma (drafts per target pass) must be an integer >= 1, got {gamma!r}")
        self.gamma = gamma
        self.relaxation = make_relaxation(relax, k=k, delta=delta, bound=bound, codebook=codebook)
        self.lossless = self.relaxation is None or self.relaxation.delta == 0
        self.draft, self.draft_tokenizer = resolve_draft(draft)
        self.draft.eval()
        self.tokenizer = None
        self.trace: dict[str, Any] = {}

    def bind_tokenizer(self, tokenizer) -> None:
        """The target's tokenizer: checked against the drafter's, and LANTERN's codebook."""
        self.tokenizer = tokenizer
        if self.relaxation is not None:
            self.relaxation.bind(tokenizer)

    # -- checks ------------------------------------------------------------------------------------------
    def check_generator(self, gen) -> None:
        d = self.draft
        layout = getattr(gen, "layout", None)
        if not is_categorical(gen) or layout is None:
            raise InvalidArgumentError(
                f"speculative decoding needs a generator of ids with token logits; {type(gen).__name__} has a "
                f"{getattr(getattr(gen, 'head', None), 'kind', 'missing')} head (use sampler='ancestral')")
        if not layout.single_token_steps:
            raise InvalidArgumentError(
                f"speculative decoding drafts one token per step; the {layout.kind} layout of {type(gen).__name__} "
                "has multi-token steps (use sampler='sjd' on neighbors, 'ancestral' on scales)"
            )
        for role, g in (("target", gen), ("draft", d)):
            if not getattr(g, "supports_multistep", False) or not getattr(g, "supports_rollback", False):
                raise InvalidArgumentError(
                    f"speculative decoding needs {role} generators that feed several steps at once and roll back "
                    f"their state; {type(g).__name__} does not (supports_multistep="
                    f"{getattr(g, 'supports_multistep', None)}, supports_rollback={getattr(g, 'supports_rollback', None)})"
                )
        check_same_tokens(d, gen, self.draft_tokenizer, self.tokenizer, roles=("draft", "target"))
        if self.relaxation is not None:
            self.relaxation.check(gen.vocab_size)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _draft_on(self, device: torch.device) -> Generator:
        p = next(self.draft.parameters(), None)
        if p is not None and p.device != device:
            self.draft.to(device)
        return self.draft

    def continuous_for(self, gen) -> bool:
        return rows_capable(gen, self.draft)

    def _sample(self, gen, cond, gens, progress, max_batch: int | None = None) -> SampleResult:
        params, G = self.params, self.gamma
        dev = cond.device
        N, T, V = cond.shape[0], gen.layout.num_tokens, gen.vocab_size
        draft = self._draft_on(dev)
        slots = Slots(N, max_batch)
        continuous = max_batch is not None
        tgt = SlotRunner(gen, params, cond, slots, continuous)
        drf = SlotRunner(draft, params, cond, slots, continuous)
        B = slots.B
        steps = torch.arange(G + 1, device=dev)
        rows = torch.arange(B, device=dev)
        result = torch.zeros(N, T, dtype=torch.long, device=dev)
        tokens = torch.zeros(B, T + G + 1, dtype=torch.long, device=dev)  # G + 1 padding columns
        q = torch.zeros(B, G, V, device=dev)
        n = torch.full((B,), T, dtype=torch.long, device=dev)  # committed tokens per slot (T: empty or done)
        fed = torch.zeros_like(n)  # positions whose K/V the drafter holds for the committed tokens
        trace: list[list[tuple[int, int]]] = [[] for _ in range(N)]  # per image: (committed before, committed)
        bar = tqdm(total=N * T, disable=not progress, desc="tokens", leave=False)
        while True:
            new, images = slots.refill()
            passing = n < T  # slots whose image verifies drafts this round (not the ones admitted now)
            if len(images):
                # an admitted image's first pass: the target's prefill yields position 0; draw it from p
                new = new.to(dev)
                tokens[new] = 0
                u0 = uniforms([gens[i] for i in images], 1, dev)[:, 0]
                p0 = processed_probs(tgt.mix(*tgt.admit(new, images))[:, 0], params)
                tokens[new, 0] = sample_probs(p0, u0)
                drf.admit(new, images)
                n[new], fed[new] = 1, 0
                for i in images:
                    trace[i].append((0, 1))
                bar.update(len(images))
            elif not bool(passing.any()):
                break
            occupied = slots.occupied.to(dev)
            active = passing & (n < T)
            idx = active.nonzero().squeeze(1)
            if idx.numel():
                before = n.clone()
                u = torch.zeros(B, 3 * G + 1, dtype=torch.float64, device=dev)
                u[idx] = uniforms([gens[int(slots.image[i])] for i in idx.tolist()], 3 * G + 1, dev)
                u_draft, u_acc, u_res = u[:, :G], u[:, G:2 * G], u[:, 2 * G:]
                g = torch.where(active, (T - n).clamp(max=G), 0)  # drafts per image this pass

                # -- draft: one drafter call per draft slot; the first catches the drafter up -------------------
                for j in range(int(g.max())):
                    live = active & (j < g)
                    P = n + j  # the position each live row drafts
                    feed = torch.where(live, fed + 1 if j == 0 else P, n.clamp(max=T - 1))  # others re-feed their last token
                    out, w = drf.outputs(tokens, feed, P, P, P + 1, live)
                    qP = processed_probs(drf.mix(out, w)[:, 0], params)
                    fed = torch.where(live, P, fed)
                    x = sample_probs(qP, u_draft[:, j])
                    tokens[rows, P.clamp(max=T + G)] = torch.where(live, x, tokens[rows, P.clamp(max=T + G)])
                    q[:, j] = torch.where(live[:, None], qP, q[:, j])

                # -- verify all drafts (and the bonus position) in one target pass --------------------------
                in_end = torch.minimum(n + g, torch.full_like(n, T - 1))
                out, w = tgt.outputs(tokens, n.clamp(max=T - 1), in_end, n.clamp(max=T - 1),
                                     torch.minimum(n + g + 1, torch.full_like(n, T)), active)
                logits = tgt.mix(out, w)  # column j: position n + j
                if logits.shape[1] < G + 1:
                    logits = torch.cat([logits, logits[:, -1:].expand(-1, G + 1 - logits.shape[1], -1)], 1)
                pos = n[:, None] + steps  # (B, G+1) positions of the drafts and the bonus
                p = processed_probs(logits[:, :G + 1], params)  # (B, G+1, V)
                p_d = p[:, :G]
                drafts = tokens.gather(1, pos[:, :G])
                rule = self._rule if self.relaxation is None else self.relaxation.rule(p_d, drafts, q, base=self._rule)
                v = verify(p_d, drafts, u_acc, u_res[:, :G], q, rule=rule)
                valid = steps[:G] < g[:, None]
                bad = torch.where(valid & ~v.accepted, steps[:G], G).amin(1)  # first rejection, G if none
                rejected = bad < g
                bonus_ok = ~rejected & (n + g < T)
                # commit: accepted drafts stay; the rejected slot gets its residual draw; or the bonus token
                at = (n + bad.clamp(max=G - 1)).clamp(max=T + G)
                fix = torch.where(rejected, v.tokens[rows, bad.clamp(max=G - 1)], tokens[rows, at])
                tokens[rows, at] = torch.where(active & rejected, fix, tokens[rows, at])
                bonus = sample_probs(p[:, G], u_res[:, G])
                bpos = (n + G).clamp(max=T + G)
                tokens[rows, bpos] = torch.where(active & bonus_ok, bonus, tokens[rows, bpos])
                count = torch.where(rejected, bad + 1, g + bonus_ok.long())
                count = torch.where(active, count, 0)
                n = n + count
                # the drafter holds the accepted drafts; a re-drawn or bonus token (and the draft before a bonus) not
                fed = torch.where(active, torch.minimum(fed, n - 1), fed)
                for b in idx.tolist():
                    trace[int(slots.image[b])].append((int(before[b]), int(count[b])))
                bar.update(int(count.sum()))
            slots.count_round()
            finished = occupied & (n >= T)
            if continuous and bool(finished.any()):
                fin = finished.nonzero().squeeze(1)
                result[slots.image[fin.cpu()].to(dev)] = tokens[fin, :T]
                slots.release(fin)
        bar.close()
        if not continuous:
            result = tokens[:, :T].contiguous()
        return self._result(result, trace, slots, tgt, drf, gen.layout.num_steps, T)

    def _result(self, tokens, trace, slots, tgt, drf, S, T) -> SampleResult:
        """Tokens, stats and ``self.trace`` (per image and pass: committed position before it, tokens committed)."""
        P = max(len(t) for t in trace)
        start = torch.full((P, len(trace)), T, dtype=torch.long)
        accepted = torch.zeros(P, len(trace), dtype=torch.long)
        for i, t in enumerate(trace):
            start[:len(t), i] = torch.tensor([a for a, _ in t])
            accepted[:len(t), i] = torch.tensor([c for _, c in t])
        self.trace = {"start": start, "accepted": accepted, "draft_passes": drf.passes}
        stats = SamplerStats(forward_passes=tgt.passes, steps=S, accepted_per_pass=accepted.double().mean(1).tolist(),
                             cache_bytes=tgt.cache_bytes + drf.cache_bytes, draft_passes=drf.passes,
                             passes_per_image=slots.passes.tolist(), rounds=slots.rounds if tgt.continuous else 0)
        return SampleResult(tokens, stats)
