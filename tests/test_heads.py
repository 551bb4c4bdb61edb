"""Heads: log-densities agree with their own samples, CFG belongs to the head, per-image randomness
reproduces continuous tokens at any batch position, and the sampling settings heads refuse."""
import math

import pytest
import torch
from scipy import stats

from varkit.errors import InvalidArgumentError
from varkit.layout import sets
from varkit.models import create_model
from varkit.models.heads import CategoricalHead, DiffusionHead, DiffusionNoise, create_head
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.base import GuidedRunner
from varkit.samplers.random import Randomness, image_generators
from stats_helpers import chi2_stat


def _perturbed_diffusion_head(token_dim=1, cond_dim=8, seed=0) -> DiffusionHead:
    """A diffusion head whose zero-initialised layers are perturbed, so ε and σ depend on x, t and z."""
    torch.manual_seed(seed)
    head = DiffusionHead(token_dim, cond_dim, depth=2, width=32)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head.eval().double()  # an untrained chain amplifies x_T strongly: fp64 keeps the checks exact


def test_categorical_log_prob_matches_its_samples():
    """20,000 draws of one position: χ² of the counts against exp(log_prob) (can fail: p < 1e-4)."""
    head = CategoricalHead(8)
    logits = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=0.8, top_k=6)
    M = 20000
    u = torch.rand(M, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    draws = head.sample(logits.expand(M, 1, 8), None, u, params).view(-1)
    probs = head.log_prob(logits.expand(8, 1, 8), None, torch.arange(8).view(8, 1), params).exp().view(-1).double()
    assert abs(float(probs.sum()) - 1) < 1e-5  # fp32 softmax of 8 terms
    stat, df = chi2_stat(torch.bincount(draws, minlength=8).double(), probs)
    assert stats.chi2.sf(stat, df) > 1e-4


def test_diffusion_log_density_matches_its_samples_1d():
    """With ``final_noise`` the token is a draw from the last step's Gaussian; its log-density (read back
    through log_prob at three points: a quadratic gives μ and σ) must describe 20,000 such draws (KS)."""
    head = _perturbed_diffusion_head()
    params = SamplingParams(head_steps=10, temperature=0.9)
    z = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rng = Randomness(image_generators(4, 1))
    base = head.draw_noise(rng, 1, params)
    M = 20000
    finals = torch.randn(M, 1, 1, generator=torch.Generator().manual_seed(5))
    noise = DiffusionNoise(base.x_T.expand(M, 1, 1), base.steps.expand(M, 1, 10, 1), finals)
    with torch.no_grad():
        x = head.sample(z.expand(M, 1, 8), None, noise, params).view(-1).double()
        pts = (x.mean() + x.std() * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)).view(3, 1, 1)
        three = DiffusionNoise(base.x_T.expand(3, 1, 1), base.steps.expand(3, 1, 10, 1))
        lp = head.log_prob(z.expand(3, 1, 8), None, pts, params, three).view(-1).double()
    # log p(x) = c - (x-μ)²/(2σ²) at x = a-h, a, a+h: second difference = -h²/σ², first = h(μ-a)/σ²
    a, h = float(pts[1]), float(pts[2] - pts[1])
    inv_var = float(-(lp[2] - 2 * lp[1] + lp[0])) / h**2
    assert inv_var > 0
    sigma = inv_var ** -0.5
    mu = a + float(lp[2] - lp[0]) / (2 * h) / inv_var
    # the density integrates to one: its normalising constant is that of N(μ, σ²) (fp64: 1e-6 is loose)
    assert abs(float(lp[1]) - (-0.5 * (a - mu) ** 2 / sigma**2 - math.log(sigma) - 0.5 * math.log(2 * math.pi))) < 1e-6
    assert stats.kstest(x.numpy(), "norm", args=(mu, sigma)).pvalue > 1e-4
    # and the draws are not all one point: the final step really adds noise of that σ
    assert abs(float(x.std()) / sigma - 1) < 0.05


def test_diffusion_cfg_weight_one_equals_no_cfg():
    """CFG mixes ε only: a weight of 1 on [cond; uncond] rows gives the conditional chain exactly."""
    head = _perturbed_diffusion_head(token_dim=3)
    params = SamplingParams(head_steps=5)
    z = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = head.draw_noise(Randomness(image_generators(0, 2)), 4, params)
    with torch.no_grad():
        plain = head.sample(z, None, noise, params)
        guided = head.sample(torch.cat([z, torch.randn_like(z)]), torch.ones(4), noise, params)
        strong = head.sample(torch.cat([z, torch.randn_like(z)]), torch.full((4,), 3.0), noise, params)
    # u + 1·(c − u) rounds once per step (fp64 eps 2e-16), amplified along a 5-step untrained chain
    torch.testing.assert_close(guided, plain, rtol=1e-9, atol=0)
    assert not torch.allclose(strong, plain)


def _continuous_raster():
    torch.manual_seed(0)
    g = create_model("raster-tiny", head="diffusion", token_dim=3, head_width=32, head_depth=2).eval()
    with torch.no_grad():
        for p in g.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_same_seed_same_continuous_tokens_at_any_batch_position(cfg):
    gen = _continuous_raster()
    params = SamplingParams(cfg=cfg, cfg_schedule="linear", head_steps=4)
    smp = get_sampler("ancestral", params)
    gens = image_generators(7, 3)
    batch = smp.sample(gen, torch.tensor([0, 1, 2]), gens).tokens
    alone = smp.sample(gen, torch.tensor([2]), image_generators(7, 3)[2:]).tokens
    assert batch.shape == (3, 16, 3) and batch.dtype == torch.float32
    # the same per-image draws through the same kernels at batch 1 vs 3: GEMM blocking may differ by batch
    # size, so allow fp32 rounding (a few ulp, amplified by 16 autoregressive steps of a 2-layer model)
    torch.testing.assert_close(alone[0], batch[2], rtol=1e-4, atol=1e-4)
    other = smp.sample(gen, torch.tensor([2]), image_generators(8, 1)).tokens
    assert (other[0] - batch[2]).abs().max() > 1e-2


def test_runner_weights_follow_mar_linear_schedule_on_sets():
    """On ``sets`` the linear schedule is MAR's: 1 + (cfg − 1)·(N − mask_len)/N with mask_len the tokens
    still masked after the step."""
    layout = sets(4, 4, num_iter=5)
    params = SamplingParams(cfg=4.0, cfg_schedule="linear")
    N, masked = 16, 16
    for step, n in enumerate(layout.step_sizes):
        masked = max(masked - n, 1)  # MAR clamps mask_len to >= 1, also at the last step
        # a float formula of small integers: ulps; approx's default rel 1e-6
        assert params.guidance_at(layout.progress(step)) == pytest.approx(1 + 3.0 * (N - masked) / N)


def test_runner_returns_outputs_and_weights_not_mixed_logits():
    gen = create_model("raster-tiny").eval()
    run = GuidedRunner(gen, SamplingParams(cfg=2.0), torch.tensor([0, 1]))
    out, w = run.prefill()
    assert out.shape[0] == 4 and w.shape == (1,) and float(w[0]) == 2.0
    run1 = GuidedRunner(gen, SamplingParams(cfg=1.0), torch.tensor([0, 1]))
    out1, w1 = run1.prefill()
    assert out1.shape[0] == 2 and w1 is None


def test_sampling_settings_heads_refuse():
    gen = create_model("raster-tiny").eval()
    with pytest.raises(InvalidArgumentError, match="head_steps"):
        get_sampler("ancestral", SamplingParams(head_steps=10)).sample(gen, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="num_iter"):
        get_sampler("ancestral", SamplingParams(num_iter=4)).sample(gen, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="head_steps"):
        SamplingParams(head_steps=0)
    with pytest.raises(InvalidArgumentError, match="num_iter"):
        SamplingParams(num_iter=0)
    with pytest.raises(InvalidArgumentError, match="num_iter"):
        sets(4, 4, num_iter=17)
    cont = _continuous_raster()
    with pytest.raises(InvalidArgumentError, match="top_k"):
        get_sampler("ancestral", SamplingParams(top_k=5)).sample(cont, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="ids"):
        get_sampler("sjd", SamplingParams()).sample(cont, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="unknown head"):
        create_head("gaussian")


def test_head_refuses_tokenizer_of_the_other_kind():
    class Ids:
        token_shape = ()
        codebook_size = 16

    class Latents:
        token_shape = (3,)

    cat, cont = create_model("raster-tiny"), _continuous_raster()
    cat.head.check_tokenizer(Ids())
    cont.head.check_tokenizer(Latents())
    with pytest.raises(InvalidArgumentError, match="continuous"):
        cont.head.check_tokenizer(Ids())
    with pytest.raises(InvalidArgumentError, match="discrete"):
        cat.head.check_tokenizer(Latents())


def test_head_steps_anneal_linearly_over_ar_steps():
    """DiSA's step annealing: "50:5" gives 50 head steps at the first AR step, 5 at the last, linear between,
    and the sampler draws each step's noise for that step's count."""
    p = SamplingParams(head_steps="50:5")
    assert p.head_steps == (50, 5)
    assert [p.at_step(s, 10).head_steps for s in (0, 9)] == [50, 5]
    assert p.at_step(3, 10).head_steps == 35
    assert SamplingParams(head_steps=[8, 2]).head_steps == (8, 2)  # as read back from a folder's JSON defaults
    assert SamplingParams(head_steps="12").head_steps == 12
    for bad in ("0:5", "a:b", "5:4:3", "", 0):
        with pytest.raises(InvalidArgumentError, match="head_steps"):
            SamplingParams(head_steps=bad)
    gen = _continuous_raster()
    seen = []
    orig = gen.head.draw_noise

    def spy(rng, n, params, **kw):
        seen.append(params.head_steps)
        return orig(rng, n, params, **kw)

    gen.head.draw_noise = spy
    get_sampler("ancestral", SamplingParams(head_steps="16:2")).sample(gen, torch.tensor([0]), image_generators(0, 1))
    assert seen[0] == 16 and seen[-1] == 2 and len(seen) == 16 and seen == sorted(seen, reverse=True)


def test_x0_clip_is_off_by_default_and_bounds_the_prediction():
    """None is MAR exactly; a clip keeps an untrained chain's tokens near the latent range instead of ~1e5."""
    head = _perturbed_diffusion_head(token_dim=2)
    params = SamplingParams(head_steps=10)
    z = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = head.draw_noise(Randomness(image_generators(0, 1)), 3, params)
    with torch.no_grad():
        free = head.sample(z, None, noise, params)
        head.x0_clip = 3.0
        clipped = head.sample(z, None, noise, params)
    assert float(free.abs().max()) > 100  # the untrained chain explodes (see _perturbed_diffusion_head)
    # the last step's mean is a convex mix of the clamped x0 and x_1: within the clip plus the last noise scale
    assert float(clipped.abs().max()) < 3.0 + 1.0
    with pytest.raises(InvalidArgumentError, match="x0_clip"):
        DiffusionHead(2, 8, x0_clip=0.0)
