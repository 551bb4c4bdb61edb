"""Continuous speculative decoding (sampler="cspd"): exactness by a two-sample test that can fail, the official
relaxations detected by the same test, the continuous acceptance routine, and bad input.

The test models are tiny MAR / raster generators whose diffusion head is the *optimal* denoiser of a known
Gaussian (token | z ~ N(W z + shift, s²)): their chains are well behaved (a random MLP head's are not: the
cosine schedule's first step multiplies its ε errors by ~2e4), their last-step Gaussians have σ ≈ 0.0064, and
a drafter that differs only by ``shift`` = 0.006 per channel is accepted about half the time, so both the
acceptance and the residual branches carry weight.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import ks_2samp
from torch import nn

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.models.diffusion import GaussianDiffusion, normal_log_prob
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.accept import accept_mask, accepts, residual_keeps, verify_density
from varkit.samplers.base import GuidedRunner
from varkit.samplers.cspd import CSpDSampler, gaussian_log_density
from varkit.samplers.random import image_generators

N_SAMPLES = 20000
ALPHA = 1e-3  # family-wise level of each two-sample comparison (Bonferroni over its KS tests)
SHIFT = 0.006  # the drafter's mean offset per channel (about 1 σ of the last denoising step)
PARAMS = SamplingParams(cfg=2.0, cfg_schedule="linear")
MAR_TINY = dict(token_dim=2, grid=2, num_iter=4, head_steps=4, encoder_dim=8, encoder_depth=1, encoder_heads=1,
                decoder_dim=8, decoder_depth=1, decoder_heads=1, buffer_size=1, mlp_ratio=1.0)
RASTER_TINY = dict(head="diffusion", token_dim=2, grid=2, dim=8, n_layer=1, n_head=1, multiple_of=8,
                   head_steps=4, head_depth=1, head_width=8)


class GaussianDenoiser(nn.Module):
    """ε-prediction of the optimal denoiser for tokens ~ N(W z + shift, s² I) given the condition z (and a zero
    variance interpolation): what a diffusion head trained to convergence on that law would output."""

    def __init__(self, W: torch.Tensor, shift: float, s: float = 0.02):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.shift, self.s = shift, s
        self.register_buffer("ac", torch.tensor(GaussianDiffusion(1000, "cosine").alphas_cumprod, dtype=torch.float64))

    def forward(self, x, t, c):
        m = c.to(self.W.dtype) @ self.W.T + self.shift
        a = self.ac[t].to(x.dtype)[:, None]
        eps = (x - a.sqrt() * m) * (1 - a).sqrt() / (a * self.s ** 2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1)


class FastRandomness:
    """The Randomness interface drawing the whole batch from one generator (20k per-image generators would
    dominate the test's time; a statistical test needs independent draws, not per-image streams)."""

    def __init__(self, batch: int, seed: int | torch.Generator):
        self.batch, self.device = batch, torch.device("cpu")
        self.g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.batch

    def subset(self, rows):
        return FastRandomness(len(rows), self.g)

    def uniforms(self, n):
        return torch.rand(self.batch, n, generator=self.g, dtype=torch.float64)

    def normals(self, *shape, dtype=torch.float32):
        return torch.randn(self.batch, *shape, generator=self.g).to(dtype)

    def permutations(self, n):
        return torch.rand(self.batch, n, generator=self.g).argsort(1)


def pair(config: str, shift: float = SHIFT, **overrides):
    """(target, draft): the same network, heads N(W z, s²) and N(W z + shift, s²)."""
    torch.manual_seed(0)
    kw = {**(MAR_TINY if config == "mar-tiny" else RASTER_TINY), **overrides}
    target = create_model(config, **kw).eval()
    C = target.head.cond_dim
    W = torch.randn(kw["token_dim"], C, generator=torch.Generator().manual_seed(1)) * 0.1 / C ** 0.5
    draft = create_model(config, **kw).eval()
    draft.load_state_dict(target.state_dict())
    target.head.net, draft.head.net = GaussianDenoiser(W, 0.0), GaussianDenoiser(W, shift)
    return target, draft


@torch.inference_mode()
def target_alone(gen, params, cond, rng) -> torch.Tensor:
    """The target's own samples under the same schedule, each token a draw from its last step's Gaussian
    (``final_noise``): the law CSpD must reproduce. Written against the public head/runner API only."""
    run = GuidedRunner(gen, params, cond, rng)
    lay = run.layout
    tokens = torch.zeros(cond.shape[0], lay.num_tokens, gen.head.token_dim)
    out, w = run.prefill()
    for step in range(lay.num_steps):
        if step:
            out, w = run.forward(lay.read(tokens, step - 1, run.order), step)
        noise = gen.head.draw_noise(rng, out.shape[1], params, final_noise=True)
        lay.write(tokens, step, gen.head.sample(out, w, noise, params), run.order)
    return tokens


def min_ks_pvalue(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Smallest p-value of two-sample KS tests on every coordinate of the flattened token sequences and on 16
    fixed random projections (which see dependence between tokens), and the number of tests."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    P = torch.randn(x.shape[1], 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xs, ys = torch.cat([x, x @ P], 1), torch.cat([y, y @ P], 1)
    ps = [ks_2samp(xs[:, i].numpy(), ys[:, i].numpy()).pvalue for i in range(xs.shape[1])]
    return min(ps), len(ps)


@pytest.fixture(scope="module")
def mar_pair():
    target, draft = pair("mar-tiny")
    cond = torch.arange(N_SAMPLES) % 4
    return target, draft, cond, target_alone(target, PARAMS, cond, FastRandomness(N_SAMPLES, 1))


def _cspd(target, draft, cond, seed=2, **options):
    smp = CSpDSampler(PARAMS, draft=draft, gamma=2, prefill=0.0, **options)
    return smp, smp.sample(target, cond, FastRandomness(cond.shape[0], seed))


# -- exactness -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_exact_cspd_matches_the_target_alone_and_the_relaxations_do_not(mar_pair):
    """20k CSpD samples (MAR, CFG linear, γ = 2 over a 4-step schedule: a rejection at either window position or
    a bonus step; one residual proposal up front so the exact fallback runs too) against 20k target-alone
    samples: no KS test rejects at family-wise 1e-3. The same
    test rejects the official inner temperature 42 (drafts accepted ~always: the drafter's law leaks in) and the
    official merged window (steps verified against the wrong prefix)."""
    target, draft, cond, ref = mar_pair
    smp, res = _cspd(target, draft, cond, residual_tries=1)
    acc = sum(smp.trace["tokens_accepted"]) / sum(smp.trace["tokens_verified"])
    assert 0.3 < acc < 0.7, f"the test pair should accept about half the drafts, got {acc:.3f}"
    assert smp.trace["steps_accepted"][1] > 1000  # images that took both drafts, then the bonus step
    assert smp.trace["fallback_rounds"] > 0  # the exact continuation of the residual rejection ran
    p, n = min_ks_pvalue(res.tokens, ref)
    assert p > ALPHA / n, f"exact CSpD differs from the target alone: min KS p-value {p:.2e} over {n} tests"
    for relaxed in ({"inner_temperature": 42.0}, {"merged_window": True}):
        smp, res = _cspd(target, draft, cond, **relaxed)
        assert not smp.lossless
        p, n = min_ks_pvalue(res.tokens, ref)
        assert p < ALPHA / n, f"{relaxed} was not detected: min KS p-value {p:.2e} over {n} tests"


@pytest.mark.slow
def test_exact_cspd_on_a_raster_pair():
    """The causal path (KV cache, several steps per call, rollback): 20k CSpD samples of a raster generator with a
    diffusion head match the target alone (4 tokens, γ = 2 and a bonus token, CFG linear)."""
    target, draft = pair("raster-tiny")
    cond = torch.arange(N_SAMPLES) % 4
    ref = target_alone(target, PARAMS, cond, FastRandomness(N_SAMPLES, 1))
    smp = CSpDSampler(PARAMS, draft=draft, gamma=2, prefill=0.0)
    res = smp.sample(target, cond, FastRandomness(N_SAMPLES, 2))
    assert smp.trace["steps_accepted"][1] > 1000  # images that took both drafts, then the bonus token
    acc = sum(smp.trace["tokens_accepted"]) / sum(smp.trace["tokens_verified"])
    assert 0.3 < acc < 0.7
    p, n = min_ks_pvalue(res.tokens, ref)
    assert p > ALPHA / n, f"exact CSpD (raster) differs from the target alone: min KS p-value {p:.2e} over {n} tests"


def test_identical_draft_is_always_accepted_and_saves_passes():
    """q = p: every draft accepted, γ steps and a bonus step per target pass. fp64: the drafter's one-step calls
    and the target's batched prefixes agree to ~1e-15, so each log-ratio is ~1e-13 and no uniform falls that
    close to 1 (in fp32 a rejection would have probability ~1e-5 per token)."""
    target, draft = pair("mar-tiny", shift=0.0, grid=4, num_iter=8)
    target, draft = target.double(), draft.double()
    smp = CSpDSampler(SamplingParams(), draft=draft, gamma=3, prefill=0.0)
    res = smp.sample(target, torch.tensor([0, 1, 2]), image_generators(0, 3))
    tr = smp.trace
    assert tr["tokens_accepted"] == tr["tokens_verified"] and tr["fallback_rounds"] == 0
    # step 0 by the target's prefill, then windows of 3 drafted steps + 1 bonus: 1 + ceil(7 / 4) = 3 passes
    assert res.stats.forward_passes == 3 and res.stats.draft_passes == tr["draft_passes"] > 0
    assert sum(res.stats.accepted_per_pass) == pytest.approx(16)


def test_same_image_alone_or_in_a_batch():
    """Each image draws all its randomness from its own generator, once: alone or among others (whose windows
    make the batch ragged) it is the same image. fp64, so batched kernels differ only at ~1e-15 and no
    acceptance decision sits that close to its uniform; 1e-9 leaves room for any CPU."""
    target, draft = pair("mar-tiny", grid=3, num_iter=5)
    target, draft = target.double(), draft.double()
    cond = torch.tensor([0, 1, 2, 3, 0])
    smp = CSpDSampler(PARAMS, draft=draft, gamma=2, prefill=0.2)
    batch = smp.sample(target, cond, image_generators(7, 5)).tokens
    for i in (0, 3):
        alone = smp.sample(target, cond[i:i + 1], image_generators(7, 5)[i:i + 1]).tokens
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-9)


def test_pipeline_style_options_and_registry():
    target, draft = pair("mar-tiny")
    smp = get_sampler("cspd", SamplingParams(), draft=draft, gamma=1, prefill=0.5, inner_temperature=42.0,
                      merged_window=True)
    assert isinstance(smp, CSpDSampler) and not smp.lossless and smp.gamma == 1
    res = smp.sample(target, torch.tensor([1, 2]), image_generators(0, 2))
    assert res.tokens.shape == (2, 4, 2) and torch.isfinite(res.tokens).all()
    assert CSpDSampler(SamplingParams(), draft=draft).lossless


# -- the continuous acceptance routine ---------------------------------------------------------------------------
def _gauss(mu, sd, n, g):
    return mu + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)


def test_verify_density_outputs_p_for_analytic_gaussians():
    """1-D p = N(0, 1), q = N(0.8, 1.3²), 100k drafts: accept-or-residual output follows p (KS at 1e-3), the
    residual draws follow norm(max(0, p − q)) (KS against its CDF by numerical integration), and accepting by a
    tempered ratio (T = 4, the official relaxation's shape) with the same residual does not give p."""
    import numpy as np
    from scipy.stats import kstest, norm

    g, n, K = torch.Generator().manual_seed(0), 100_000, 8
    pm, ps, qm, qs = 0.0, 1.0, 0.8, 1.3
    t = lambda *a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    lp = lambda v: normal_log_prob(v, t(pm), t(ps))  # noqa: E731
    lq = lambda v: normal_log_prob(v, t(qm), t(qs))  # noqa: E731
    x = _gauss(qm, qs, n, g)
    y = pm + ps * torch.randn(n, K, 1, generator=g, dtype=torch.float64)
    u_y = torch.rand(n, K, generator=g, dtype=torch.float64)

    def fallback(need):  # the exact continuation: more proposals from p until one is kept
        M = int(need.sum())
        out, left = torch.empty(M, 1, dtype=torch.float64), torch.ones(M, dtype=torch.bool)
        while bool(left.any()):
            z = _gauss(pm, ps, M, g)
            keep = residual_keeps(lp(z), lq(z), torch.rand(M, generator=g, dtype=torch.float64)) & left
            out[keep], left = z[keep], left & ~keep
        return out

    u = torch.rand(n, generator=g, dtype=torch.float64)
    v = verify_density(x, lp(x), lq(x), u, y, lp(y), lq(y), u_y, fallback)
    assert kstest(v.tokens[:, 0].numpy(), norm(pm, ps).cdf).pvalue > 1e-3
    # every position's residual draw (acceptance forced off)
    r = verify_density(x, lp(x), lq(x), torch.ones(n, dtype=torch.float64), y, lp(y), lq(y), u_y, fallback).tokens
    grid = np.linspace(-9, 9, 36001)
    dens = np.cumsum((norm(pm, ps).pdf(grid) - norm(qm, qs).pdf(grid)).clip(min=0))
    assert kstest(r[:, 0].numpy(), lambda z: np.interp(z, grid, dens / dens[-1])).pvalue > 1e-3
    tempered = accept_mask((gaussian_log_density(x, t(pm), t(ps), 4.0) - gaussian_log_density(x, t(qm), t(qs), 4.0))
                           .clamp(max=0).exp(), u)
    assert kstest(torch.where(tempered[:, None], x, r)[:, 0].numpy(), norm(pm, ps).cdf).pvalue < 1e-6


def test_verify_density_invariants():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, 2, generator=g, dtype=torch.float64)
    lp = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(50, 3, 2, 2, generator=g, dtype=torch.float64)
    u = torch.rand(50, 3, generator=g, dtype=torch.float64)
    v = verify_density(x, lp, lp, u, y, torch.zeros(50, 3, 2), torch.zeros(50, 3, 2), torch.rand(50, 3, 2))
    assert v.accepted.all() and torch.equal(v.tokens, x)  # q = p: everything accepted
    # no proposal kept (q ≥ p at every proposal) and no fallback: an error, never a made-up token
    with pytest.raises(RuntimeError, match="fallback"):
        verify_density(x, lp - 50, lp, u, y, torch.zeros(50, 3, 2), torch.zeros(50, 3, 2) + 1, torch.rand(50, 3, 2))
    # the discrete path decides with the same core
    p = torch.tensor([[0.2, 0.8]])
    assert accepts(p, torch.tensor([1]), torch.tensor([0.5]), q=torch.tensor([[0.5, 0.5]])).item()
    assert accept_mask(torch.tensor([0.3]), torch.tensor([0.3])).item() is False


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_options_one_line_each():
    _, draft = pair("mar-tiny")
    cases = [({"gamma": 0}, "gamma"), ({"gamma": 2.5}, "gamma"), ({"prefill": 1.0}, r"prefill.*\[0, 1\)"),
             ({"prefill": -0.1}, "prefill"), ({"inner_temperature": 0}, "inner_temperature"),
             ({"merged_window": "yes"}, "merged_window"), ({"residual_tries": 0}, "residual_tries")]
    for opts, msg in cases:
        with pytest.raises(InvalidArgumentError, match=msg) as e:
            CSpDSampler(SamplingParams(), draft=draft, **opts)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidArgumentError, match="draft model"):
        CSpDSampler(SamplingParams())


def test_bad_pairs_one_line_each():
    target, draft = pair("mar-tiny")
    cond, gens = torch.tensor([0]), image_generators(0, 1)

    def fails(d, msg, gen=target, params=SamplingParams(), **opts):
        with pytest.raises(InvalidArgumentError, match=msg) as e:
            CSpDSampler(params, draft=d, **opts).sample(gen, cond, gens)
        assert "\n" not in str(e.value)

    fails(pair("mar-tiny", token_dim=3)[1], "different latent sizes")
    fails(pair("mar-tiny", grid=3)[1], "different layouts")
    fails(pair("raster-tiny")[1], "different layouts")
    fails(pair("mar-tiny", head_steps=5)[1], "different step counts")
    fails(create_model("digits-maskgit", encoder_dim=8, decoder_dim=8, encoder_heads=1, decoder_heads=1, grid=2, num_iter=3),
          "categorical head")
    fails(draft, "categorical head", gen=create_model("raster-tiny", grid=2))
    rt, rd = pair("raster-tiny")
    fails(rd, "merged_window applies to the sets layout", gen=rt, merged_window=True)


def test_different_tokenizers_are_refused():
    _, draft = pair("mar-tiny")
    smp = CSpDSampler(SamplingParams(), draft=draft)
    smp.draft_tokenizer = nn.Linear(2, 2)
    other = nn.Linear(2, 2)
    with pytest.raises(InvalidArgumentError, match="different tokenizers"):
        smp.bind_tokenizer(other)
    smp.bind_tokenizer(smp.draft_tokenizer)  # the same one passes
