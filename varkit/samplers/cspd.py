"""Continuous speculative decoding (CSpD; Wang et al., arXiv 2411.11925), exact by default.

A small *draft* generator with a diffusion head proposes ``gamma`` layout steps of continuous tokens
(MAR: sets of a random order; raster: one token each), and the *target* verifies them in one pass.

**What is preserved.** Every token the sampler emits is distributed exactly as the target's, under the
layout's step schedule (``num_iter`` for MAR) and the sampling settings (CFG schedule, temperature,
``head_steps``), with the target's diffusion head drawing its token from the *last denoising step's
Gaussian* (``DiffusionHead.draw_noise(final_noise=True)``): MAR's own sampler returns that Gaussian's
mean, so the preserved distribution differs from MAR's by one N(0, (σ₀·τ)²) draw per token, σ₀ ≈ 0.0064.

**How.** For each token the draft and the target run their denoising chains from the same x_T and the
same per-step noise (*trajectory alignment*), so that given this shared noise ε each model's token law
is its last step's Gaussian, q = N(μ_q(ε), σ_q²) and p = N(μ_p(ε), σ_p²), with exact densities
(``SampleOut.mean/std``). The draft keeps its final-step noise: x = μ_q + σ_q·ξ is a real draw from q.
The target accepts x with probability min(1, p(x)/q(x)); a rejected token is replaced by a draw of
norm(max(0, p − q)), by rejection from p (a proposal y ~ p is kept with probability
max(0, 1 − q(y)/p(y))): ``residual_tries`` proposals are drawn up front and, in the rare case that none is
kept, the same rejection continues with fresh proposals until one is (so the result stays exact; after
an absurd number of rounds it raises rather than emit a wrong value). Given ε the emitted token is thus
a draw from p(·|ε); ε is shared and drawn once per token, so marginally it is the target's token law.
All verdicts go through :func:`varkit.samplers.accept.verify_density`, the routine the discrete
samplers' acceptance shares its decision with.

**Verification schedule.** Step j's tokens are verified against the target conditioned on exactly the
tokens of steps < j (drafted ones included), as the target alone would have seen them: one target call
``gen(tokens of steps m-1 … end-1, m)`` returns the outputs of every window step. Causal generators
(raster) do this with their KV cache; MAR's bidirectional encoder cannot, so MAR runs the window's
prefixes as one padded batch (``MARGenerator.forward`` with several steps): one pass in latency, γ+1
prefixes of compute. Within a step the tokens are conditionally independent and each is decided on its
own; the window stops at the first step with a rejection (that step is committed with its residual
draws, later drafted steps are discarded); if every drafted step is accepted the target's outputs for
the next step give a bonus step drawn from p. The first ``⌊prefill·S⌋ + 1`` steps are done by the target
alone (as the official ``step <= num_iter·ratio``; at least the step the target's prefill returns).

**Relaxed options (the official code's behaviour; not exact).**

- ``inner_temperature=42``: the acceptance ratio uses Gaussians whose exponent is divided by T² (the
  official ``judge_accept``), while the residual stays norm(max(0, p − q)); with σ ≈ 0.0064 almost every
  draft is accepted, so the output drifts towards the drafter's distribution.
- ``merged_window=True`` (``sets`` layouts): every window token is verified against the target given only
  the tokens known before the window (the official ``sample_tokens_step_with_mask``), all decided
  independently and committed, no stop at a rejection and no bonus step. This is exact for a different
  target: the one whose schedule merges each window into a single step (coarser than ``num_iter``).

Not offered, since they are bugs rather than trade-offs: the draft "sample" being the point μ_q, the
trajectory factor Π σ_p/σ_q, and a 100-try cap that leaves the zero vector.

**Randomness and stats.** Each image draws, from its own generator and once per image, its order, every
token's x_T, per-step noise, draft and target final noise, acceptance uniform and residual proposals, so
an image is the same at any batch size (fallback rounds draw more from that image's generator).
Discarded drafts reuse their token's noise: whether a token's draft is discarded depends only on
earlier steps, never on that token's own draws, so they are still fresh when it is drafted again.
``stats.forward_passes`` counts target calls (prefill included, CFG pair once; a merged-window pass of
a ragged batch counts once), ``stats.draft_passes`` drafter calls; ``accepted_per_pass`` the tokens
committed per target pass (batch mean). ``trace`` keeps, for the last call, the per-window-position
counts of verified and accepted tokens and steps, ``target_prefixes`` (step outputs the target computed:
a MAR window pass costs one encoder/decoder prefix per step it verifies, so on a compute-bound device
exact CSpD saves target *passes* but not target compute), the fallback rounds used, and
``mean_shift_sigmas``: |μ_p − μ_q| / σ_p per channel, averaged over verified tokens (a shift of δ σ in each of D
channels is accepted with probability 1 − TV ≈ 2Φ(−δ√D/2)).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..models.base import Generator
from ..models.diffusion import normal_log_prob
from ..models.heads import DiffusionNoise
from .accept import residual_keeps, verify_density
from .base import GuidedRunner, SampleResult, Sampler, SamplerStats
from .logits import SamplingParams
from .random import Randomness
from .speculative import resolve_draft

FALLBACK_CHUNK = 64  # fresh residual proposals per token and round, once the upfront ones are all rejected
FALLBACK_ROUNDS = 10_000  # rounds before giving up (raising): ~6e5 proposals, i.e. p and q differ by TV < ~1e-5


class _GivenOrder:
    """Hands the target's per-image orders to the drafter's runner (both decode the same order)."""

    def __init__(self, order: torch.Tensor | None):
        self.order = order

    def permutations(self, n: int) -> torch.Tensor:
        return self.order


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, inner_temperature: float = 1.0) -> torch.Tensor:
    """log N(x; mean, std²) summed over the last dim; with ``inner_temperature`` T the quadratic term is divided
    by T² and the normaliser kept (the official CSpD's acceptance ratio; T = 1 is the true density)."""
    if inner_temperature == 1.0:
        return normal_log_prob(x, mean, std)
    z = (x - mean) / std
    return (-0.5 * z * z / inner_temperature ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers are the same latent space: same class, token shape and weights."""
    if a is b:
        return True
    if type(a) is not type(b) or tuple(getattr(a, "token_shape", ())) != tuple(getattr(b, "token_shape", ())):
        return False
    sa, sb = (t.state_dict() if hasattr(t, "state_dict") else {} for t in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


class CSpDSampler(Sampler):
    """Continuous speculative decoding; exact unless ``inner_temperature != 1`` or ``merged_window``.

    ``draft``: the drafter (bundled name, model folder, Pipeline or Generator) sharing the target's tokenizer,
    head kind (diffusion), latent size, layout and head steps; ``gamma``: drafted steps per target pass
    (default 8); ``prefill``: share of the steps done by the target alone, in [0, 1) (default 0.15);
    ``inner_temperature`` (default 1 = exact; the official code uses 42) and ``merged_window`` (default False;
    official True): the official relaxations (see the module docstring); ``residual_tries``: residual proposals
    drawn up front per token (default 16; more are drawn only when all are rejected).
    """

    name = "cspd"
    lossless = True

    def __init__(self, params: SamplingParams | None = None, draft: Any = None, gamma: int = 8, prefill: float = 0.15,
                 inner_temperature: float = 1.0, merged_window: bool = False, residual_tries: int = 16):
        super().__init__(params)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise InvalidArgumentError(f"cspd gamma (drafted steps per target pass) must be an integer >= 1, got {gamma!r}")
        if isinstance(prefill, bool) or not isinstance(prefill, Real) or not 0 <= prefill < 1:
            raise InvalidArgumentError(f"cspd prefill (share of steps done by the target alone) must be in [0, 1), got {prefill!r}")
        if isinstance(inner_temperature, bool) or not isinstance(inner_temperature, Real) or not inner_temperature > 0:
            raise InvalidArgumentError(
                f"cspd inner_temperature must be a number > 0 (1 = exact; the official code uses 42), got {inner_temperature!r}")
        if not isinstance(merged_window, bool):
            raise InvalidArgumentError(f"cspd merged_window must be True or False, got {merged_window!r}")
        if isinstance(residual_tries, bool) or not isinstance(residual_tries, int) or residual_tries < 1:
            raise InvalidArgumentError(f"cspd residual_tries must be an integer >= 1, got {residual_tries!r}")
        self.gamma, self.prefill = gamma, float(prefill)
        self.inner_temperature, self.merged_window = float(inner_temperature), merged_window
        self.residual_tries = residual_tries
        self.lossless = self.inner_temperature == 1.0 and not merged_window
        self.draft, self.draft_tokenizer = resolve_draft(draft)
        self._check_head(self.draft, "draft")
        self.draft.eval()
        self.tokenizer = None
        self.trace: dict[str, Any] = {}

    def bind_tokenizer(self, tokenizer) -> None:
        """The target's tokenizer, checked against the drafter's where that is known."""
        self.tokenizer = tokenizer
        if self.draft_tokenizer is not None and not same_tokenizer(self.draft_tokenizer, tokenizer):
            raise InvalidArgumentError(
                "draft and target use different tokenizers (their latent spaces differ); the draft must be trained "
                "on the target's tokenizer")

    # -- checks ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_head(g, role: str) -> None:
        kind = getattr(getattr(g, "head", None), "kind", "missing")
        if kind != "diffusion":
            why = ("its tokens are ids: use sampler='speculative'" if kind == "categorical" else
                   "a flow head's tokens have no density" if kind == "flow" else "it has no diffusion head")
            raise InvalidArgumentError(
                f"cspd needs continuous-token generators with a diffusion head; the {role} "
                f"({type(g).__name__}) has a {kind} head ({why})")

    def check_generator(self, gen: Generator) -> None:
        d, p = self.draft, self.params
        for role, g in (("target", gen), ("draft", d)):
            self._check_head(g, role)
            if not getattr(g, "supports_multistep", False) or not getattr(g, "supports_rollback", False):
                raise InvalidArgumentError(
                    f"cspd needs {role} generators that feed several steps at once and roll back; {type(g).__name__} does not")
        if d.head.token_dim != gen.head.token_dim:
            raise InvalidArgumentError(
                f"draft and target have different latent sizes ({d.head.token_dim} vs {gen.head.token_dim} channels per "
                "token); the draft must be trained on the target's tokenizer")
        dl, tl = d.sampling_layout(p.num_iter), gen.sampling_layout(p.num_iter)
        if dl.kind != tl.kind or dl.step_sizes != tl.step_sizes or not torch.equal(dl.coords, tl.coords):
            raise InvalidArgumentError(
                f"draft and target have different layouts ({dl.kind} {tuple(dl.grid)} in {dl.num_steps} steps vs "
                f"{tl.kind} {tuple(tl.grid)} in {tl.num_steps}); the draft must generate the same token grid in the same steps")
        if getattr(d, "num_classes", None) != getattr(gen, "num_classes", None) or \
                getattr(getattr(d, "config", None), "caption_dim", 0) != getattr(getattr(gen, "config", None), "caption_dim", 0):
            raise InvalidArgumentError(
                f"draft and target take different conditions ({getattr(d, 'num_classes', '?')} vs "
                f"{getattr(gen, 'num_classes', '?')} classes); the draft must be trained on the same labels")
        for s in range(tl.num_steps):
            ps = p.at_step(s, tl.num_steps)
            if d.head.steps_for(ps) != gen.head.steps_for(ps):
                raise InvalidArgumentError(
                    f"draft and target denoise in different step counts ({d.head.steps_for(ps)} vs {gen.head.steps_for(ps)}); "
                    "trajectory alignment shares the per-step noise: pass head_steps")
        if self.merged_window and (tl.kind != "sets" or not hasattr(gen, "encode") or not hasattr(gen, "decode")):
            raise InvalidArgumentError(
                f"merged_window applies to the sets layout (MAR: one bidirectional pass sees every window position); "
                f"the target's layout is {tl.kind}")
        if self.tokenizer is not None:
            gen.head.check_tokenizer(self.tokenizer)

    # -- sampling ---------------------------------------------------------------------------------------------
    def _draft_on(self, device: torch.device) -> Generator:
        w = next(self.draft.parameters(), None)
        if w is not None and w.device != device:
            self.draft.to(device)
        return self.draft

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        rng = Randomness(gens, cond.device) if isinstance(gens, (list, tuple)) else gens
        return _Run(self, gen, self._draft_on(cond.device), cond, rng).sample()


class _Run:
    """One CSpD call: the two runners, the per-token draws, the committed steps of every image."""

    def __init__(self, smp: CSpDSampler, gen: Generator, draft: Generator, cond: torch.Tensor, rng):
        self.smp, self.gen, self.draft, self.rng = smp, gen, draft, rng
        self.params = smp.params
        self.tgt = GuidedRunner(gen, self.params, cond, rng)
        self.drf = GuidedRunner(draft, self.params, cond, _GivenOrder(self.tgt.order))
        self.lay, self.order = self.tgt.layout, self.tgt.order
        S, N, D = self.lay.num_steps, self.lay.num_tokens, gen.head.token_dim
        self.B, self.S, self.D = cond.shape[0], S, D
        self.head_params = [self.params.at_step(s, S) for s in range(S)]
        H = max(gen.head.steps_for(p) for p in self.head_params)
        K = smp.residual_tries
        # every token's randomness, once per image (see the module docstring)
        self.x_T = rng.normals(N, D)
        self.traj = rng.normals(N, H, D)
        self.xi_draft, self.xi_target = rng.normals(N, D), rng.normals(N, D)
        self.u_accept = rng.uniforms(N)
        self.proposals = rng.normals(N, K, D)
        self.u_proposals = rng.uniforms(N * K).view(self.B, N, K)
        dev = cond.device
        dtype = torch.promote_types(gen.head.token_dtype, next(gen.parameters()).dtype)
        self.tokens = torch.zeros(self.B, N, D, dtype=dtype, device=dev)
        self.q_mean = torch.zeros_like(self.tokens)
        self.q_std = torch.ones_like(self.tokens)
        self.rows = torch.arange(self.B, device=dev)
        G = smp.gamma
        self.stat = {k: torch.zeros(G, dtype=torch.long) for k in ("tokens_verified", "tokens_accepted",
                                                                    "steps_verified", "steps_accepted")}
        self.fallback_rounds = 0
        self.merged_passes = 0
        self.target_prefixes = 0  # step outputs the target computed (MAR: one encoder/decoder prefix each)
        self.shift = [0.0, 0]  # Σ over verified tokens of mean_d |μ_p − μ_q| / σ_p, and their count

    # -- helpers --------------------------------------------------------------------------------------------
    def positions(self, step: int) -> torch.Tensor:
        """(B, n) grid positions of ``step`` per image."""
        idx = self.lay.index(step, self.order)
        if isinstance(idx, slice):
            return torch.arange(idx.start, idx.stop, device=self.tokens.device).expand(self.B, -1)
        return idx.to(self.tokens.device)

    def steps_tokens(self, first: int, last: int) -> torch.Tensor:
        """The tokens of steps ``first … last`` (each in layout order), concatenated: what a call feeds."""
        return torch.cat([self.lay.read(self.tokens, s, self.order) for s in range(first, last + 1)], 1)

    def gaussians(self, head, out: torch.Tensor, weights, step: int, sel: torch.Tensor, pos: torch.Tensor):
        """Last-step (mean, std), each (b, n, D), of ``head``'s chains for images ``sel`` (b,) at ``pos`` (b, n),
        from outputs ``out`` (B or 2B, n, C) of the whole batch, with the shared per-token noise."""
        B = self.B
        z = out[sel] if out.shape[0] == B else torch.cat([out[:B][sel], out[B:][sel]])
        ps = self.head_params[step]
        H = head.steps_for(ps)
        r = sel[:, None]
        noise = DiffusionNoise(self.x_T[r, pos], self.traj[r, pos, :H])
        res = head.run(z, weights, noise, ps)
        b, n = pos.shape
        return res.mean.view(b, n, self.D), res.std.view(b, n, self.D)

    def target_draw(self, out, weights, step: int, sel: torch.Tensor) -> None:
        """Step ``step`` of images ``sel`` drawn by the target itself (final-step noise included)."""
        if sel.numel() == 0:
            return
        pos = self.positions(step)[sel]
        mean, std = self.gaussians(self.gen.head, out, weights, step, sel, pos)
        self.tokens[sel[:, None], pos] = (mean + std * self.xi_target[sel[:, None], pos].to(mean)).to(self.tokens.dtype)

    # -- the run ---------------------------------------------------------------------------------------------
    def sample(self) -> SampleResult:
        smp, lay, S, B = self.smp, self.lay, self.S, self.B
        everyone = self.rows
        n_pre = min(S, int(math.floor(smp.prefill * S)) + 1)
        committed: list[torch.Tensor] = []  # tokens committed per target pass, per image
        out, w = self.tgt.prefill()
        self.target_prefixes += n_pre
        self.target_draw(out, w, 0, everyone)
        committed.append(torch.full((B,), lay.step_sizes[0]))
        for s in range(1, n_pre):
            out, w = self.tgt.forward(self.steps_tokens(s - 1, s - 1), s)
            self.target_draw(out, w, s, everyone)
            committed.append(torch.full((B,), lay.step_sizes[s]))
        self.t_next = n_pre  # the step of each runner's next call (its state holds the steps before that - 1)
        self.drf.prefill()  # the drafter's state (its step-0 outputs are not needed: step 0 is the target's)
        self.d_next = 1
        c = torch.full((B,), n_pre, dtype=torch.long, device=self.tokens.device)  # committed steps per image
        starts = torch.tensor(lay.step_starts, device=c.device)
        while bool((c < S).any()):
            before = c
            c = self.round(c)
            committed.append((starts[c] - starts[before]).cpu())
        passes = self.tgt.passes + self.merged_passes
        stats = SamplerStats(forward_passes=passes, steps=S,
                             accepted_per_pass=torch.stack(committed).double().mean(1).tolist(),
                             cache_bytes=self.tgt.cache_bytes + self.drf.cache_bytes, draft_passes=self.drf.passes)
        smp.trace = {k: v.tolist() for k, v in self.stat.items()} | {
            "draft_passes": self.drf.passes, "target_passes": passes, "prefill_steps": n_pre,
            "target_prefixes": self.target_prefixes, "fallback_rounds": self.fallback_rounds,
            "mean_shift_sigmas": self.shift[0] / max(self.shift[1], 1)}
        return SampleResult(self.tokens.to(torch.promote_types(self.gen.head.token_dtype, self.tokens.dtype)), stats)

    def draft_outputs(self, step: int):
        """The drafter's outputs (B or 2B, n, C) and weights for ``step`` given the tokens of the steps before it."""
        if self.d_next > step:
            self.drf.rollback(step)
            self.d_next = step
        out, _ = self.drf.forward(self.steps_tokens(self.d_next - 1, step - 1), self.d_next)
        self.d_next = step + 1
        n = self.lay.step_sizes[step]
        return out[:, out.shape[1] - n:], self.drf.weights(step, n)

    def round(self, c: torch.Tensor) -> torch.Tensor:
        """One target pass: draft each unfinished image's window, verify it, commit; the new committed counts."""
        S, G, lay = self.S, self.smp.gamma, self.lay
        active = c < S
        g = torch.where(active, (S - c).clamp(max=G), 0)  # drafted steps per image
        m = int(c[active].min())
        last = int((c + g)[active].max())  # one past the furthest drafted step
        # -- draft, step by step from the slowest image's first step ------------------------------------
        for j in range(m, last):
            mine = (active & (c <= j) & (j < c + g)).nonzero().squeeze(1)
            out, w = self.draft_outputs(j)
            if mine.numel() == 0:
                continue
            pos = self.positions(j)[mine]
            mean, std = self.gaussians(self.draft.head, out, w, j, mine, pos)
            r = mine[:, None]
            self.tokens[r, pos] = (mean + std * self.xi_draft[r, pos].to(mean)).to(self.tokens.dtype)
            self.q_mean[r, pos], self.q_std[r, pos] = mean.to(self.tokens.dtype), std.to(self.tokens.dtype)
        if self.smp.merged_window:
            return self.verify_merged(c, g, active)
        # -- verify: one target call gives every step m … end given its own prefix --------------------------
        end = int(torch.minimum(c + g, torch.full_like(c, S - 1))[active].max())  # last step whose outputs are read
        if self.t_next != m:
            self.tgt.rollback(m)
        out, _ = self.tgt.forward(self.steps_tokens(m - 1, end - 1), m)
        self.t_next = end + 1
        self.target_prefixes += end - m + 1
        alive = active.clone()  # no rejected step yet in the window
        new_c = c.clone()
        offset = 0
        for j in range(m, end + 1):
            n = lay.step_sizes[j]
            out_j, w_j = out[:, offset:offset + n], self.tgt.weights(j, n)
            offset += n
            verify = (alive & (c <= j) & (j < c + g)).nonzero().squeeze(1)
            if verify.numel():
                rejected = self.verify_step(out_j, w_j, j, verify, c)
                bad = verify[rejected]
                alive[bad] = False
                new_c[bad] = j + 1
            bonus = (alive & (j == c + g) & (j < S)).nonzero().squeeze(1)
            self.target_draw(out_j, w_j, j, bonus)
            new_c[bonus] = j + 1
        new_c = torch.where(alive & (new_c == c), c + g, new_c)  # every drafted step accepted, no bonus (the end)
        return torch.where(active, new_c, c)

    def verify_step(self, out, weights, step: int, sel: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Verify the drafted tokens of ``step`` for images ``sel``; commit them; bool (b,): the step had a rejection."""
        pos = self.positions(step)[sel]
        p_mean, p_std = self.gaussians(self.gen.head, out, weights, step, sel, pos)
        accepted = self.decide(sel, pos, p_mean, p_std)
        window_pos = (step - c[sel]).cpu()
        self.stat["tokens_verified"].index_add_(0, window_pos, torch.full_like(window_pos, pos.shape[1]))
        self.stat["tokens_accepted"].index_add_(0, window_pos, accepted.sum(1).cpu())
        all_ok = accepted.all(1).cpu()
        self.stat["steps_verified"].index_add_(0, window_pos, torch.ones_like(window_pos))
        self.stat["steps_accepted"].index_add_(0, window_pos, all_ok.long())
        return ~all_ok.to(sel.device)

    def decide(self, sel: torch.Tensor, pos: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor) -> torch.Tensor:
        """Accept or replace the drafts at ``pos`` (b, n) of images ``sel`` given the target's last-step Gaussians;
        writes the emitted tokens; returns the accepted mask (b, n)."""
        r = sel[:, None]
        dt = p_mean.dtype
        x, q_mean, q_std = self.tokens[r, pos].to(dt), self.q_mean[r, pos].to(dt), self.q_std[r, pos].to(dt)
        self.shift[0] += float(((p_mean - q_mean).abs() / p_std).mean(-1).sum())
        self.shift[1] += p_mean.shape[0] * p_mean.shape[1]
        T = self.smp.inner_temperature
        log_p_x = gaussian_log_density(x, p_mean, p_std, T)
        log_q_x = gaussian_log_density(x, q_mean, q_std, T)
        y = p_mean[:, :, None] + p_std[:, :, None] * self.proposals[r, pos].to(dt)  # (b, n, K, D) proposals from p
        log_p_y = normal_log_prob(y, p_mean[:, :, None], p_std[:, :, None])
        log_q_y = normal_log_prob(y, q_mean[:, :, None], q_std[:, :, None])

        def fallback(need: torch.Tensor) -> torch.Tensor:
            return self.residual_fallback(sel, need, p_mean, p_std, q_mean, q_std)

        v = verify_density(x, log_p_x, log_q_x, self.u_accept[r, pos], y, log_p_y, log_q_y,
                           self.u_proposals[r, pos], fallback)
        self.tokens[r, pos] = v.tokens.to(self.tokens.dtype)
        return v.accepted

    def residual_fallback(self, sel, need, p_mean, p_std, q_mean, q_std) -> torch.Tensor:
        """Residual draws (M, D) where every upfront proposal was rejected: the same rejection from p, continued with
        fresh proposals from each image's own generator until one is kept (exact)."""
        where = need.nonzero()
        imgs = sel[where[:, 0]].tolist()
        mu, sd = p_mean[need], p_std[need]
        mq, sq = q_mean[need], q_std[need]
        out = torch.empty_like(mu)
        left = torch.ones(mu.shape[0], dtype=torch.bool, device=mu.device)
        for _ in range(FALLBACK_ROUNDS):
            self.fallback_rounds += 1
            idx = left.nonzero().squeeze(1)
            sub = self.rng.subset([imgs[i] for i in idx.tolist()])
            y = mu[idx, None] + sd[idx, None] * sub.normals(FALLBACK_CHUNK, self.D).to(mu)
            keep = residual_keeps(normal_log_prob(y, mu[idx, None], sd[idx, None]),
                                  normal_log_prob(y, mq[idx, None], sq[idx, None]), sub.uniforms(FALLBACK_CHUNK))
            hit = keep.any(1)
            first = keep.to(torch.uint8).argmax(1)
            out[idx[hit]] = y[hit, first[hit]]
            left[idx[hit]] = False
            if not bool(left.any()):
                return out
        raise InvalidArgumentError(
            f"cspd residual sampling kept none of {FALLBACK_ROUNDS * FALLBACK_CHUNK} proposals: draft and target "
            "last-step Gaussians are numerically equal where a rejection happened; check the models' dtype")

    def verify_merged(self, c: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The official merged window: every window token against the target given only the steps before the
        window (one bidirectional pass, prefixes of a ragged batch padded), each decided on its own; the whole
        window is committed."""
        gen, lay, tgt = self.gen, self.lay, self.tgt
        sel = active.nonzero().squeeze(1)
        cs, gs = c[sel].tolist(), g[sel].tolist()
        K = max(lay.step_starts[a] for a in cs)
        n = max(lay.step_starts[a + b] - lay.step_starts[a] for a, b in zip(cs, gs))
        b = sel.numel()
        order = self.order[sel]
        known = order.new_zeros(b, K)
        valid = torch.zeros(b, K, dtype=torch.bool, device=order.device)
        rows = order.new_zeros(b, n)
        for i, (a, k) in enumerate(zip(cs, gs)):
            s0, s1 = lay.step_starts[a], lay.step_starts[a + k]
            known[i, :s0] = order[i, :s0].sort().values
            valid[i, :s0] = True
            rows[i, :s1 - s0] = torch.cat([order[i, lay.step_starts[j]:lay.step_starts[j + 1]].sort().values
                                           for j in range(a, a + k)])
            rows[i, s1 - s0:] = rows[i, 0]
        toks = self.tokens[sel]
        kt = toks.gather(1, known[..., None].expand(-1, -1, self.D))
        cond = tgt.cond[sel] if not tgt.cfg else torch.cat([tgt.cond[:self.B][sel], tgt.cond[self.B:][sel]])
        if tgt.cfg:
            kt, known2, valid2, rows2 = (torch.cat([t, t]) for t in (kt, known, valid, rows))
        else:
            known2, valid2, rows2 = known, valid, rows
        out = gen.decode(gen.encode(cond, kt.to(next(gen.parameters()).dtype), known2, valid2), known2, rows2, valid2)
        self.merged_passes += 1
        self.target_prefixes += 1
        full = out  # (b or 2b, n, C): rows of ``sel`` in order (then their unconditional rows)
        new_c = c.clone()
        for j in sorted({j for a, k in zip(cs, gs) for j in range(a, a + k)}):
            # images whose window holds step j, and where step j's tokens sit in their row list
            mine = [i for i, (a, k) in enumerate(zip(cs, gs)) if a <= j < a + k]
            off = [lay.step_starts[j] - lay.step_starts[cs[i]] for i in mine]
            nj = lay.step_sizes[j]
            idx = torch.tensor(mine, device=out.device)
            cols = torch.tensor(off, device=out.device)[:, None] + torch.arange(nj, device=out.device)
            if tgt.cfg:
                z = torch.cat([full[:b][idx[:, None], cols], full[b:][idx[:, None], cols]])
            else:
                z = full[idx[:, None], cols]
            imgs = sel[idx]
            pos = self.positions(j)[imgs]
            ps = self.head_params[j]
            H = gen.head.steps_for(ps)
            r = imgs[:, None]
            res = gen.head.run(z, tgt.weights(j, nj), DiffusionNoise(self.x_T[r, pos], self.traj[r, pos, :H]), ps)
            p_mean, p_std = res.mean.view(len(mine), nj, self.D), res.std.view(len(mine), nj, self.D)
            accepted = self.decide(imgs, pos, p_mean, p_std)
            wp = torch.tensor([j - cs[i] for i in mine])
            self.stat["tokens_verified"].index_add_(0, wp, torch.full_like(wp, nj))
            self.stat["tokens_accepted"].index_add_(0, wp, accepted.sum(1).cpu())
            self.stat["steps_verified"].index_add_(0, wp, torch.ones_like(wp))
            self.stat["steps_accepted"].index_add_(0, wp, accepted.all(1).long().cpu())
        new_c[sel] = c[sel] + g[sel]
        return new_c
