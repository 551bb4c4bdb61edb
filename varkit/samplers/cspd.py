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

**Batches (continuous batching).** Images are driven through :mod:`varkit.samplers.slots`. A round is one target
call for every held image: images within their first ``⌊prefill·S⌋ + 1`` steps get a one-step window (the target
alone), the others their drafted window; the drafter runs one call per window position, each row catching up from
the last step it holds. *Lockstep* (``sample(gen, cond, gens)``): one call feeds the batch from the slowest image's
step (MAR computes every window prefix of every row), and the batch takes its slowest image's passes.
*Continuous* (``sample(..., max_batch=B)``, generators with ``supports_rows``; not ``merged_window``): ``B`` slots,
each row fed from its own step (``forward_rows``; MAR computes only the prefixes each row reads), a finished image
leaves its slot to the next queued one (both models prefilled, rows copied in).

**Randomness and stats.** Each image draws, from its own generator and once, when it is admitted, its order, every
token's x_T, per-step noise, draft and target final noise, acceptance uniform and residual proposals, so an image
is the same at any batch size, slot or mode (up to floating-point differences of batched kernels; fallback rounds
draw more from that image's generator). Discarded drafts reuse their token's noise: whether a token's draft is
discarded depends only on earlier steps, never on that token's own draws, so they are still fresh when it is
drafted again. ``stats.forward_passes`` counts target calls (admissions included, CFG pair once; a merged-window
pass of a ragged batch counts once), ``passes_per_image`` the target passes each image took part in,
``stats.draft_passes`` drafter calls; ``accepted_per_pass[i]`` the mean over images of the tokens committed in each
image's pass i. ``trace`` keeps, for the last call, the per-window-position
counts of verified and accepted tokens and steps, ``target_prefixes`` ((image, step) outputs the target computed:
a MAR window pass costs one encoder/decoder prefix per step it verifies, so on a compute-bound device
exact CSpD saves target *passes* but not target compute), the fallback rounds used, and
``mean_shift_sigmas``: |μ_p − μ_q| / σ_p per channel, averaged over verified tokens (a shift of δ σ in each of D
channels is accepted with probability 1 − TV ≈ 2Φ(−δ√D/2)).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, NamedTuple

import torch

from ..errors import InvalidArgumentError
from ..models.base import Generator
from ..models.diffusion import normal_log_prob
from ..models.heads import DiffusionNoise
from .accept import residual_keeps, verify_density
from .base import SampleResult, Sampler, SamplerStats
from .logits import SamplingParams
from .random import Randomness
from .slots import SlotRunner, Slots, rows_capable
from .speculative import resolve_draft

FALLBACK_CHUNK = 64  # fresh residual proposals per token and round, once the upfront ones are all rejected
FALLBACK_ROUNDS = 10_000  # rounds before giving up (raising): ~6e5 proposals, i.e. p and q differ by TV < ~1e-5


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
    continuous_batching = True

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

    def continuous_for(self, gen: Generator) -> bool:
        """Slots refilled from the queue where both generators decode rows at their own steps (the merged window
        verifies a batch's windows in one bidirectional pass of its own: it takes ``max_batch`` images at a time)."""
        return rows_capable(gen, self.draft) and not self.merged_window

    def _sample(self, gen, cond, gens, progress, max_batch: int | None = None) -> SampleResult:
        rng = Randomness(gens, cond.device) if isinstance(gens, (list, tuple)) else gens
        return _Run(self, gen, self._draft_on(cond.device), cond, rng, max_batch).sample()


class _Tokens(NamedTuple):
    """Tokens of some slots, flattened: slot ``rows`` (M,), grid positions ``pos`` (M,), and a chain's last-step
    Gaussian at each, ``mean``/``std`` (M, D)."""

    rows: torch.Tensor
    pos: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class _Run:
    """One CSpD call over :class:`Slots`: the two runners, each slot's draws and committed steps, the stats.

    Per slot: ``tokens`` (grid order), the drafter's Gaussians ``q_mean``/``q_std``, the image's draws (grid
    order), ``perm`` (the grid position of each layout token), ``c`` (committed steps; S: empty or done) and
    ``held`` (the drafter holds the tokens of the steps before it)."""

    def __init__(self, smp: CSpDSampler, gen: Generator, draft: Generator, cond: torch.Tensor, rng, max_batch):
        self.smp, self.gen, self.draft, self.rng = smp, gen, draft, rng
        params = self.params = smp.params
        self.slots = slots = Slots(cond.shape[0], max_batch)
        self.continuous = max_batch is not None
        self.tgt = SlotRunner(gen, params, cond, slots, self.continuous)
        self.drf = SlotRunner(draft, params, cond, slots, self.continuous)
        self.cond_all = cond
        lay = self.lay = self.tgt.layout
        S, T, D, B = lay.num_steps, lay.num_tokens, gen.head.token_dim, slots.B
        self.S, self.T, self.D, self.B = S, T, D, B
        self.head_params = [params.at_step(s, S) for s in range(S)]
        H_of = [gen.head.steps_for(p) for p in self.head_params]  # the drafter's are the same (check_generator)
        self.H = max(H_of)
        self.H_of = torch.tensor(H_of, device=cond.device)
        self.params_of_H = {h: self.head_params[H_of.index(h)] for h in set(H_of)}
        self.n_pre = min(S, int(math.floor(smp.prefill * S)) + 1)  # steps the target does alone
        dev = self.dev = cond.device
        self.starts = torch.tensor(lay.step_starts, device=dev)
        self.sizes = self.starts[1:] - self.starts[:-1]
        dtype = torch.promote_types(gen.head.token_dtype, next(gen.parameters()).dtype)
        K = smp.residual_tries
        self.perm = torch.arange(T, device=dev).repeat(B, 1)
        self.tokens = torch.zeros(B, T, D, dtype=dtype, device=dev)
        self.q_mean, self.q_std = torch.zeros_like(self.tokens), torch.ones_like(self.tokens)
        f32 = dict(dtype=torch.float32, device=dev)
        self.x_T, self.traj = torch.zeros(B, T, D, **f32), torch.zeros(B, T, self.H, D, **f32)
        self.xi_draft, self.xi_target = torch.zeros(B, T, D, **f32), torch.zeros(B, T, D, **f32)
        self.proposals = torch.zeros(B, T, K, D, **f32)
        self.u_accept = torch.zeros(B, T, dtype=torch.float64, device=dev)
        self.u_proposals = torch.zeros(B, T, K, dtype=torch.float64, device=dev)
        self.c = torch.full((B,), S, dtype=torch.long, device=dev)
        self.held = torch.zeros_like(self.c)
        self.result = torch.zeros(cond.shape[0], T, D, dtype=dtype, device=dev)
        self.committed: list[list[int]] = [[] for _ in range(cond.shape[0])]  # tokens per target pass, per image
        self.stat = {k: torch.zeros(smp.gamma, dtype=torch.long) for k in ("tokens_verified", "tokens_accepted",
                                                                          "steps_verified", "steps_accepted")}
        self.fallback_rounds = 0
        self.merged_passes = 0
        self.target_prefixes = 0  # (image, step) prefixes the target computed (MAR: one encoder/decoder pass each)
        self.shift = [0.0, 0]  # Σ over verified tokens of mean_d |μ_p − μ_q| / σ_p, and their count

    # -- helpers --------------------------------------------------------------------------------------------
    def layout_tokens(self) -> torch.Tensor:
        """Every slot's tokens (B, T, D) in its layout order: what the runners feed."""
        return self.tokens.gather(1, self.perm[..., None].expand(-1, -1, self.D))

    def chains(self, head, out: torch.Tensor, sel: torch.Tensor, steps: torch.Tensor, off: torch.Tensor,
               out_rows: torch.Tensor | None = None) -> _Tokens:
        """Last-step Gaussians of ``head``'s chains for the tokens of step ``steps[i]`` of slot ``sel[i]``, whose
        outputs are columns ``off[i] …`` of row ``out_rows[i]`` (default ``sel[i]``) of ``out`` (under CFG its
        second half holds the unconditional twins), with the shared per-token noise. The tokens of every row go
        through one chain call (flattened, each with its own CFG weight); steps with different denoising step
        counts (annealed ``head_steps``) through one call each."""
        dev = out.device
        n = self.sizes[steps]
        rows = sel.repeat_interleave(n)
        M = rows.numel()
        k = torch.arange(M, device=dev) - (torch.cumsum(n, 0) - n).repeat_interleave(n)
        lidx = self.starts[steps].repeat_interleave(n) + k  # layout index of each token
        col = off.repeat_interleave(n) + k
        src = (sel if out_rows is None else out_rows).repeat_interleave(n)
        pos = self.perm[rows, lidx]
        z = out[src, col]
        z_null = out[src + out.shape[0] // 2, col] if self.tgt.cfg else None
        H = self.H_of[steps].repeat_interleave(n)
        mean = std = None
        for h in H.unique().tolist():
            t = (H == h).nonzero().squeeze(1)
            zt = z[t][None] if z_null is None else torch.stack([z[t], z_null[t]])
            noise = DiffusionNoise(self.x_T[rows[t], pos[t]][None], self.traj[rows[t], pos[t], :h][None])
            w = self.tgt.token_weights[lidx[t]] if self.tgt.cfg else None
            res = head.run(zt, w, noise, self.params_of_H[h])
            if mean is None:
                mean = res.mean.new_empty(M, self.D)
                std = torch.empty_like(mean)
            mean[t], std[t] = res.mean, res.std
        return _Tokens(rows, pos, mean, std)

    def target_draw(self, t: _Tokens) -> None:
        """Tokens ``t`` drawn by the target itself (its final-step noise)."""
        self.tokens[t.rows, t.pos] = (t.mean + t.std * self.xi_target[t.rows, t.pos].to(t.mean)).to(self.tokens.dtype)

    # -- the run ---------------------------------------------------------------------------------------------
    def sample(self) -> SampleResult:
        slots, S = self.slots, self.S
        while True:
            new, images = slots.refill()
            passing = self.c < S  # slots with a round this time (not the ones admitted now)
            if images:
                self.admit(new.to(self.dev), images)
            elif not bool(passing.any()):
                break
            if bool(passing.any()):
                c = self.c
                new_c = self.round(passing)
                self.held = torch.where(passing, torch.minimum(self.held, new_c - 1), self.held)
                self.c = torch.where(passing, new_c, c)
                got = (self.starts[self.c] - self.starts[c]).tolist()
                for b in passing.nonzero().squeeze(1).tolist():
                    self.committed[int(slots.image[b])].append(got[b])
            slots.count_round()
            finished = slots.occupied.to(self.dev) & (self.c >= S)
            if bool(finished.any()):
                fin = finished.nonzero().squeeze(1)
                self.result[slots.image[fin.cpu()].to(self.dev)] = self.tokens[fin]
                if self.continuous:
                    slots.release(fin)
        return self.finish()

    def finish(self) -> SampleResult:
        smp, S = self.smp, self.S
        P = max(len(t) for t in self.committed)
        per_pass = torch.zeros(P, len(self.committed), dtype=torch.float64)
        for i, t in enumerate(self.committed):
            per_pass[:len(t), i] = torch.tensor(t, dtype=torch.float64)
        passes = self.tgt.passes + self.merged_passes
        stats = SamplerStats(forward_passes=passes, steps=S, accepted_per_pass=per_pass.mean(1).tolist(),
                             cache_bytes=self.tgt.cache_bytes + self.drf.cache_bytes, draft_passes=self.drf.passes,
                             passes_per_image=self.slots.passes.tolist(),
                             rounds=self.slots.rounds if self.continuous else 0)
        smp.trace = {k: v.tolist() for k, v in self.stat.items()} | {
            "draft_passes": self.drf.passes, "target_passes": passes, "prefill_steps": self.n_pre,
            "target_prefixes": self.target_prefixes, "fallback_rounds": self.fallback_rounds,
            "mean_shift_sigmas": self.shift[0] / max(self.shift[1], 1)}
        return SampleResult(self.result.to(torch.promote_types(self.gen.head.token_dtype, self.result.dtype)), stats)

    def admit(self, new: torch.Tensor, images: list[int]) -> None:
        """Images ``images`` into slots ``new``: their draws (order first, in the order a lone image makes them),
        both prefills, and step 0 drawn by the target."""
        T, D, S = self.T, self.D, self.S
        sub = self.rng.subset(images)
        order = sub.permutations(T) if self.lay.random_order else None
        self.x_T[new], self.traj[new] = sub.normals(T, D), sub.normals(T, self.H, D)
        self.xi_draft[new], self.xi_target[new] = sub.normals(T, D), sub.normals(T, D)
        self.u_accept[new] = sub.uniforms(T)
        self.proposals[new] = sub.normals(T, self.smp.residual_tries, D)
        self.u_proposals[new] = sub.uniforms(T * self.smp.residual_tries).view(len(images), T, -1)
        if order is not None:
            order = order.to(self.dev)
            self.perm[new] = torch.cat([self.lay.index(s, order) for s in range(S)], 1)
        self.tokens[new], self.q_mean[new], self.q_std[new] = 0, 0, 1
        out, _ = self.tgt.admit(new, images, order)
        self.drf.admit(new, images, order)  # the drafter's state (its step-0 outputs are not needed)
        self.target_prefixes += len(images)
        zero = torch.zeros_like(new)
        self.target_draw(self.chains(self.gen.head, out, new, zero, zero, torch.arange(len(images), device=self.dev)))
        self.c[new], self.held[new] = 1, 0
        for i in images:
            self.committed[i].append(self.lay.step_sizes[0])

    def round(self, live: torch.Tensor) -> torch.Tensor:
        """One target pass for the ``live`` slots: a step of the target alone for those within the first
        ``n_pre`` steps; for the others their drafted window, verified; the new committed counts."""
        S, G, st, c = self.S, self.smp.gamma, self.starts, self.c
        pre = live & (c < self.n_pre)
        drafting = live & ~pre
        g = torch.where(drafting, (S - c).clamp(max=G), 0)  # drafted steps per slot
        if bool(drafting.any()):
            self.draft_window(drafting, g)
            if self.smp.merged_window:  # (lockstep: every live image is drafting by now)
                return self.verify_merged(drafting, g)
        # -- one target call: each slot's outputs from step c to e (a one-step window within the first steps) ----
        e = torch.where(drafting, torch.minimum(c + g, torch.full_like(c, S - 1)), c)  # last step whose outputs are read
        feed = c.clamp(1, S - 1)
        out, _ = self.tgt.outputs(self.layout_tokens(), feed, st[e], feed, st[(e + 1).clamp(max=S)], live)
        if self.continuous:
            self.target_prefixes += int((e - c + 1)[live].sum())
        else:
            self.target_prefixes += (int(e[live].max()) - int(c[live].min()) + 1) * self.B
        # -- window position by window position: verify each slot's drafted step, or draw the target's own ----------
        alive = drafting.clone()  # no rejected step yet in the window
        new_c = torch.where(pre, c + 1, c)
        for jj in range(int((e - c)[live].max()) + 1):
            j = c + jj
            ver = alive & (jj < g)
            draw = (pre & (jj == 0)) | (alive & (jj == g) & (j < S))  # a step of the target alone, or the bonus step
            sel = (ver | draw).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            t = self.chains(self.gen.head, out, sel, j[sel], st[j[sel]] - st[c[sel]])
            v = ver[t.rows]
            if bool(v.any()):
                vt = _Tokens(t.rows[v], t.pos[v], t.mean[v], t.std[v])
                bad = self.verify(vt, jj)
                alive &= ~bad
                new_c = torch.where(bad, j + 1, new_c)
            d = ~v
            if bool(d.any()):
                self.target_draw(_Tokens(t.rows[d], t.pos[d], t.mean[d], t.std[d]))
                bonus = draw & ~pre
                new_c = torch.where(bonus, j + 1, new_c)
        return torch.where(alive & (new_c == c), c + g, new_c)  # every drafted step accepted, no bonus (the end)

    def draft_window(self, drafting: torch.Tensor, g: torch.Tensor) -> None:
        """Draft steps ``c … c+g-1`` of the ``drafting`` slots. Continuous: one drafter call per window position
        (each row at its own step); lockstep: one per step, from the slowest image's first. A row's first call
        catches the drafter up from the last step it holds."""
        S, st, c = self.S, self.starts, self.c
        if self.continuous:
            calls = [(c + jj, drafting & (jj < g)) for jj in range(int(g.max()))]
        else:
            lo, hi = int(c[drafting].min()), int((c + g)[drafting].max())
            calls = [(torch.full_like(c, j), drafting & (c <= j) & (j < c + g)) for j in range(lo, hi)]
        for P, on in calls:
            if not bool(on.any()):
                continue
            idle = self.held.clamp(1, S - 1)  # rows not drafting re-feed what they hold (outputs unused)
            P = torch.where(on, P, idle)
            feed = torch.where(on, torch.minimum(self.held + 1, P), idle)
            out, _ = self.drf.outputs(self.layout_tokens(), feed, st[P], P, st[P + 1], on)
            self.held = torch.where(on, P, self.held)
            sel = on.nonzero().squeeze(1)
            t = self.chains(self.draft.head, out, sel, P[sel], torch.zeros_like(sel))
            self.tokens[t.rows, t.pos] = (t.mean + t.std * self.xi_draft[t.rows, t.pos].to(t.mean)).to(self.tokens.dtype)
            self.q_mean[t.rows, t.pos], self.q_std[t.rows, t.pos] = t.mean.to(self.tokens.dtype), t.std.to(self.tokens.dtype)

    def verify(self, t: _Tokens, window_pos: int) -> torch.Tensor:
        """Verify the drafted tokens ``t`` (whole steps of some slots, at one window position); commit them; bool (B,):
        the slots whose step had a rejection."""
        accepted = self.decide(t)
        sel, ok = _all_per_row(t.rows, accepted)
        self.stat["tokens_verified"][window_pos] += accepted.numel()
        self.stat["tokens_accepted"][window_pos] += int(accepted.sum())
        self.stat["steps_verified"][window_pos] += sel.numel()
        self.stat["steps_accepted"][window_pos] += int(ok.sum())
        bad = torch.zeros(self.B, dtype=torch.bool, device=sel.device)
        bad[sel[~ok]] = True
        return bad

    def decide(self, t: _Tokens) -> torch.Tensor:
        """Accept or replace the drafts ``t`` (M tokens) given the target's last-step Gaussians ``t.mean/std``; writes
        the emitted tokens; returns the accepted mask (M,)."""
        r, pos, p_mean, p_std = t
        dt = p_mean.dtype
        x, q_mean, q_std = self.tokens[r, pos].to(dt), self.q_mean[r, pos].to(dt), self.q_std[r, pos].to(dt)
        self.shift[0] += float(((p_mean - q_mean).abs() / p_std).mean(-1).sum())
        self.shift[1] += p_mean.shape[0]
        T = self.smp.inner_temperature
        log_p_x = gaussian_log_density(x, p_mean, p_std, T)
        log_q_x = gaussian_log_density(x, q_mean, q_std, T)
        y = p_mean[:, None] + p_std[:, None] * self.proposals[r, pos].to(dt)  # (M, K, D) proposals from p
        log_p_y = normal_log_prob(y, p_mean[:, None], p_std[:, None])
        log_q_y = normal_log_prob(y, q_mean[:, None], q_std[:, None])

        def fallback(need: torch.Tensor) -> torch.Tensor:
            return self.residual_fallback(r[need], p_mean[need], p_std[need], q_mean[need], q_std[need])

        v = verify_density(x, log_p_x, log_q_x, self.u_accept[r, pos], y, log_p_y, log_q_y,
                           self.u_proposals[r, pos], fallback)
        self.tokens[r, pos] = v.tokens.to(self.tokens.dtype)
        return v.accepted

    def residual_fallback(self, rows, mu, sd, mq, sq) -> torch.Tensor:
        """Residual draws (M, D) for the tokens of slots ``rows`` (M,) whose upfront proposals were all rejected: the
        same rejection from p, continued with fresh proposals from each image's own generator until one is kept."""
        imgs = self.slots.image[rows.cpu()].tolist()
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

    def verify_merged(self, active: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The official merged window (lockstep only): every window token against the target given only the steps
        before the window (one bidirectional pass, prefixes of a ragged batch padded), each decided on its own;
        the whole window is committed."""
        gen, lay, tgt, c = self.gen, self.lay, self.tgt, self.c
        sel = active.nonzero().squeeze(1)
        cs, gs = c[sel].tolist(), g[sel].tolist()
        K = max(lay.step_starts[a] for a in cs)
        n = max(lay.step_starts[a + b] - lay.step_starts[a] for a, b in zip(cs, gs))
        b = sel.numel()
        order = tgt.order[sel]
        known = order.new_zeros(b, K)
        valid = torch.zeros(b, K, dtype=torch.bool, device=order.device)
        rows = order.new_zeros(b, n)
        for i, (a, k) in enumerate(zip(cs, gs)):
            s0, s1 = lay.step_starts[a], lay.step_starts[a + k]
            known[i, :s0] = order[i, :s0].sort().values
            valid[i, :s0] = True
            rows[i, :s1 - s0] = self.perm[sel[i], s0:s1]
            rows[i, s1 - s0:] = rows[i, 0]
        toks = self.tokens[sel]
        kt = toks.gather(1, known[..., None].expand(-1, -1, self.D))
        cond = self.cond_all[self.slots.image[sel.cpu()].to(self.cond_all.device)]
        if tgt.cfg:
            cond = torch.cat([cond, gen.null_condition(cond)])
            kt, known, valid, rows = (torch.cat([x, x]) for x in (kt, known, valid, rows))
        out = gen.decode(gen.encode(cond, kt.to(next(gen.parameters()).dtype), known, valid), known, rows, valid)
        self.merged_passes += 1
        self.target_prefixes += b
        local = torch.arange(b, device=out.device)
        for jj in range(max(gs)):
            mine = (g[sel] > jj).nonzero().squeeze(1)  # images whose window holds window position jj
            steps = c[sel][mine] + jj
            t = self.chains(gen.head, out, sel[mine], steps, self.starts[steps] - self.starts[c[sel][mine]], local[mine])
            accepted = self.decide(t)
            ids, ok = _all_per_row(t.rows, accepted)
            self.stat["tokens_verified"][jj] += accepted.numel()
            self.stat["tokens_accepted"][jj] += int(accepted.sum())
            self.stat["steps_verified"][jj] += ids.numel()
            self.stat["steps_accepted"][jj] += int(ok.sum())
        return torch.where(active, c + g, c)


def _all_per_row(rows: torch.Tensor, accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ``rows`` (sorted) and, for each, whether all its tokens were ``accepted``."""
    ids, inv = rows.unique(return_inverse=True)
    rejected = torch.zeros(ids.numel(), dtype=torch.long, device=ids.device).index_add_(0, inv, (~accepted).long())
    return ids, rejected == 0
