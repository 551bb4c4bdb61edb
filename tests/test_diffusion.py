"""MAR's diffusion head math (varkit/models/diffusion.py) against the official DiffLoss and against theory.

Golden outputs: tests/fixtures/mar_diffloss (README there: how they were made). Tolerances:
- fp64 cases are compared to the official code run in fp64 (its two fp32 roundings patched out). The
  schedule coefficients, GEMMs and exp/log then differ at most by a few fp64 ulps (1.1e-16 relative) per
  operation; the explosive random-net chain amplifies relative errors by about 8 (fp32 vs fp64 of the
  official: 5e-7 relative = 8 fp32 ulps), so 1e-11 relative is a 1e4 margin on any x86-64 CPU, yet 1e4
  times below the smallest effect the fixture must resolve (late-step noise: 1e-7, see
  test_fixture_resolves_late_noise).
- fp32 cases: another CPU (AVX2 vs AMX/AVX-512) changes GEMM blocking and vectorised exp/sin rounding, i.e.
  different fp32 roundings of the same computation. Their size is that of the official fp32 run against
  fp64, measured in the README (relative: net 3e-7, sampling 7e-7, loss 5e-8); the bounds below are 30-50x that.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import kstest, norm

from varkit.errors import InvalidArgumentError
from varkit.models.diffusion import (DiffusionMLP, GaussianDiffusion, guide_eps, normal_log_prob,
                                     space_timesteps)

torch.set_num_threads(1)
FIXTURE = Path(__file__).parent / "fixtures" / "mar_diffloss" / "official_outputs.safetensors"
D, Z, W, DEPTH = 16, 32, 64, 2
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# relative (to the largest reference magnitude) tolerance per dtype; see the module docstring
RTOL = {"fp32": 2e-5, "fp64": 1e-11}

# MAR's timestep_map for "100" (official SpacedDiffusion, printed from the official code)
MAR_100 = [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101, 111, 121, 131, 141, 151, 161, 172, 182, 192, 202, 212, 222,
           232, 242, 252, 262, 272, 283, 293, 303, 313, 323, 333, 343, 353, 363, 373, 383, 394, 404, 414, 424, 434,
           444, 454, 464, 474, 484, 494, 505, 515, 525, 535, 545, 555, 565, 575, 585, 595, 605, 616, 626, 636, 646,
           656, 666, 676, 686, 696, 706, 716, 727, 737, 747, 757, 767, 777, 787, 797, 807, 817, 827, 838, 848, 858,
           868, 878, 888, 898, 908, 918, 928, 938, 949, 959, 969, 979, 989, 999]
MAR_25 = [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791, 832, 874,
          916, 957, 999]


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(1000, "cosine")


def make_net(ref, dtype) -> DiffusionMLP:
    net = DiffusionMLP(D, W, 2 * D, Z, DEPTH)
    net.load_state_dict({k[len("net."):]: v for k, v in ref.items() if k.startswith("net.")}, strict=True)
    return net.to(dtype).eval()


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def model_fn(net, z_cond, z_uncond, cfg):
    """What DiffusionHead hands the loop: the net, with MAR's CFG on ε when cfg != 1."""
    if cfg == 1.0:
        return lambda x, t: net(x, t, z_cond)
    z = torch.cat([z_cond, z_uncond])
    return lambda x, t: guide_eps(net(torch.cat([x, x]), torch.cat([t, t]), z), cfg, D)


# ------------------------------------------------------------------------------------------- network

def test_parameter_names_and_shapes_are_mars(ref):
    """A MAR checkpoint converts by stripping `diffloss.net.`: same keys, same shapes."""
    mine = DiffusionMLP(D, W, 2 * D, Z, DEPTH).state_dict()
    theirs = {k[len("net."):]: v for k, v in ref.items() if k.startswith("net.")}
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_init_is_mars(ref):
    """Same RNG draws in the same order as MAR's SimpleMLPAdaLN under one seed (zeros where MAR zeroes)."""
    torch.manual_seed(0)
    state = DiffusionMLP(D, W, 2 * D, Z, DEPTH).state_dict()
    for k, v in state.items():
        f = v.flatten().double()
        got = torch.cat([f[:8], f.sum()[None], f.square().sum()[None]])
        want = ref[f"init.{k}"]
        # identical draws; only vectorised libm rounding of the uniform/normal transforms could differ (1 fp32
        # ulp = 6e-8 relative), and the fp64 sums over <= 16k values add 1e-12 relative: 1e-6 leaves margin
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), k
    assert not state["final_layer.linear.weight"].any() and not state["res_blocks.1.adaLN_modulation.1.bias"].any()


@pytest.mark.parametrize("name", ["fp32", "fp64"])
def test_net_matches_official(ref, name):
    net = make_net(ref, DTYPES[name])
    with torch.no_grad():
        out = net(ref["net_in.x"].to(DTYPES[name]), ref["net_in.t"], ref["net_in.c"].to(DTYPES[name]))
    assert out.dtype == DTYPES[name] and out.shape == (6, 2 * D)
    # fp32: official fp32 vs fp64 differs by 3e-7 of the output scale (README); 2e-5 is a 60x margin
    assert_close_rel(out, ref[f"net_out.{name}"], RTOL[name], "net output")


@pytest.mark.parametrize("name", ["fp32", "fp64"])
def test_cfg_matches_forward_with_cfg(ref, name):
    dt = DTYPES[name]
    net = make_net(ref, dt)
    x, t, c, cu = ref["net_in.x"].to(dt), ref["net_in.t"], ref["net_in.c"].to(dt), ref["cfg_in.c_uncond"].to(dt)
    with torch.no_grad():
        got = guide_eps(net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, cu])), 3.0, D)
    want = ref[f"cfg_out.{name}"]
    # the official's discarded rows carry the same guided ε (their variance columns are the uncond rows')
    assert torch.equal(want[:6, :D], want[6:, :D])
    assert_close_rel(got, want[:6], RTOL[name], "guided output")


# ------------------------------------------------------------------------------------------- sampling

CASES = [(s, tau, cfg) for s in (100, 25) for tau in (1.0, 0.95) for cfg in (1.0, 4.0)]


@pytest.mark.parametrize("name", ["fp32", "fp64"])
@pytest.mark.parametrize("steps,tau,cfg", CASES)
def test_sampling_matches_official(ref, diffusion, name, steps, tau, cfg):
    dt = DTYPES[name]
    net = make_net(ref, dt)
    fn = model_fn(net, ref["sample_in.z_cond"].to(dt), ref["sample_in.z_uncond"].to(dt), cfg)
    x_T, noises = ref["sample_in.x_T"].to(dt), ref["sample_in.noises"][:, :steps].to(dt)
    res = diffusion.respaced(steps).sample(fn, x_T, noises, temperature=tau)
    key = f"sample.s{steps}.tau{tau}.cfg{cfg}.{name}"
    for field in ("x0", "mean", "std", "log_std_sum"):
        got = getattr(res, field)
        assert got.dtype == dt and got.shape == (4, D)
        assert_close_rel(got, ref[f"{key}.{field}"], RTOL[name], f"{key}.{field}")
    assert torch.equal(res.x0, res.mean)  # no noise at t = 0


def test_fixture_resolves_late_noise(ref, diffusion):
    """The fp64 comparison is sensitive to the last noisy step (its noise moves x0 by far more than RTOL)."""
    net = make_net(ref, torch.float64)
    fn = model_fn(net, ref["sample_in.z_cond"].double(), None, 1.0)
    x_T, noises = ref["sample_in.x_T"].double(), ref["sample_in.noises"].double()
    sched = diffusion.respaced(100)
    base = sched.sample(fn, x_T, noises).x0
    moved = noises.clone()
    moved[:, -2] = -moved[:, -2]  # the step t = 10 -> 0's predecessor: the last one that adds noise
    x0 = sched.sample(fn, x_T, moved).x0
    assert (x0 - base).abs().max() > 1e3 * RTOL["fp64"] * base.abs().max()
    unused = noises.clone()
    unused[:, -1] = 0.0  # the t = 0 step's noise is never used
    assert torch.equal(sched.sample(fn, x_T, unused).x0, base)


def test_temperature_scales_only_step_noise(diffusion):
    """τ = 0 makes the per-step noise irrelevant while x_T still matters; std carries τ, log_std_sum not."""
    g = torch.Generator().manual_seed(0)
    sched = diffusion.respaced(10)

    def fn(x, t):  # a smooth toy denoiser whose variance channel depends on x
        return torch.cat([0.9 * x, torch.tanh(x)], 1)

    x_T = torch.randn(3, 2, generator=g, dtype=torch.float64)
    n1, n2 = (torch.randn(3, 10, 2, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = sched.sample(fn, x_T, n1, 0.0), sched.sample(fn, x_T, n2, 0.0)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.std, torch.zeros_like(a.std))
    assert not torch.equal(sched.sample(fn, x_T + 1, n1, 0.0).x0, a.x0)
    one, half = sched.sample(fn, x_T, n1, 1.0), sched.sample(fn, x_T, n1 * 2, 0.5)  # same trajectory
    # fp64, the same trajectory with the noise scaled by exact powers of 2: equal up to a few ulp (2.2e-16)
    # of elementwise ops and logs (a CPU's vectorised log may differ by an ulp): 1e-15 ~ 4.5 ulp
    torch.testing.assert_close(half.std, 0.5 * one.std, rtol=1e-15, atol=0)
    torch.testing.assert_close(half.log_std_sum, one.log_std_sum, rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["fp32", "fp64"])
def test_training_loss_matches_official(ref, diffusion, name):
    dt = DTYPES[name]
    net = make_net(ref, dt)
    seen = {}

    def net_fn(x, t, c):
        out = net(x, t, c)
        out.retain_grad()
        seen["out"] = out
        return out

    x0, noise, c = (ref[f"train_in.{k}"].to(dt) for k in ("x0", "noise", "c"))
    t = ref["train_in.t"]
    loss = diffusion.training_loss(net_fn, x0, c, t, noise)
    assert loss.shape == (8,) and loss.dtype == dt
    loss.sum().backward()
    want = ref[f"train_out.{name}.loss"]
    # fp32: official fp32 vs fp64 differs by 5e-8 relative per row (README); 2e-5 per row is a 400x margin
    torch.testing.assert_close(loss.detach().double(), want.double(), rtol=RTOL[name], atol=0)
    # the gradient w.r.t. the net output: ε gets only the MSE's, the variance channels only the VB's (frozen mean)
    assert_close_rel(seen["out"].grad, ref[f"train_out.{name}.grad_out"], RTOL[name], "d loss / d output")


def test_vb_uses_frozen_mean(diffusion):
    """The ε channels' gradient is exactly the MSE's: 2(ε̂ − ε)/D."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    out = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 100, 600, 999])
    diffusion.training_loss(lambda x, tt, c: out * 1, x0, torch.zeros(5, 1), t, noise).sum().backward()
    # fp64 elementwise gradient of a mean of squares: a few ulp (2.2e-16) on any CPU; 1e-14 relative
    torch.testing.assert_close(out.grad[:, :4], 2 * (out[:, :4] - noise).detach() / 4, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------- schedule facts

def test_respaced_timesteps_are_mars(diffusion):
    assert list(diffusion.respaced(100).timesteps) == MAR_100
    assert list(diffusion.respaced(25).timesteps) == MAR_25
    assert diffusion.respaced(100) is diffusion.respaced(100)  # cached
    assert list(diffusion.full.timesteps) == list(range(1000))


@pytest.mark.parametrize("steps", [2, 3, 7, 10, 16, 25, 50, 64, 100, 128, 250, 333, 999, 1000])
def test_schedule_facts(diffusion, steps):
    sched = diffusion.respaced(steps)
    ts = list(sched.timesteps)
    assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    assert bool((sched.betas > 0).all()) and bool((sched.betas < 1).all())
    # respacing keeps the training marginals: ᾱ at the kept steps are the original ones. ᾱ is rebuilt as
    # Π(1 − β) (as MAR) and 1 − β of a step with β near 1 carries relative error ulp/(1 − β): bound that
    want = torch.tensor([diffusion.alphas_cumprod[t] for t in ts], dtype=torch.float64)
    bound = 4 * torch.finfo(torch.float64).eps * (1 / (1 - sched.betas)).sum()
    assert ((sched.alphas_cumprod - want).abs() / want).max() <= bound


def test_cosine_betas():
    """Nichol & Dhariwal: β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999), ᾱ(s) = cos²((s/T + 0.008)/1.008 · π/2)."""
    betas = GaussianDiffusion().full.betas
    ab = [math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(1001)]
    want = torch.tensor([min(1 - ab[i + 1] / ab[i], 0.999) for i in range(1000)], dtype=torch.float64)
    # the full schedule's betas are re-derived from ᾱ as MAR's SpacedDiffusion does: a few fp64 ulps of 1 − β
    torch.testing.assert_close(betas, want, rtol=1e-9, atol=1e-15)
    assert betas[-1] == pytest.approx(0.999) and 4e-5 < betas[0] < 5e-5


def test_space_timesteps_edge_cases():
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(10, 4) == [0, 3, 6, 9]


# ------------------------------------------------------------------------------------------- statistics

S2 = 0.25  # variance of the 1-D data N(0, S2)


def exact_1d_model(sched):
    """The optimal network for 1-D data N(0, S2): E[ε | x_t] and the exact reverse variance
    β̃ + coef1²·Var(x0 | x_t), expressed through the learned-range channel v."""
    ab, co = sched.alphas_cumprod, sched.coefficients(torch.float64)
    step_of = {t: i for i, t in enumerate(sched.timesteps)}

    def fn(x, t):
        i = step_of[int(t[0])]
        a = ab[i]
        eps = (1 - a).sqrt() * x / (a * S2 + 1 - a)
        var_x0 = S2 * (1 - a) / (a * S2 + 1 - a)
        var = sched.posterior_variance[i] + co.posterior_mean_coef1[i, 0] ** 2 * var_x0
        lo, hi = co.posterior_log_variance_clipped[i, 0], co.log_betas[i, 0]
        v = 2 * (var.log() - lo) / (hi - lo) - 1  # log σ² = frac·hi + (1 − frac)·lo, frac = (v + 1)/2
        return torch.cat([eps, v.expand_as(x)], 1)

    return fn


@pytest.mark.parametrize("steps", [100, 25, 10, 2])
@pytest.mark.parametrize("tau", [1.0, 0.95])
def test_exact_1d_chain_variance(diffusion, steps, tau):
    """With the optimal network the respaced chain is exact for Gaussian data, so a draw from the returned
    final Gaussian, x0 + std·ξ, has variance S2 at τ = 1 (at τ < 1: x_T's part unchanged, the rest × τ).
    The model is linear with x-independent variance, so x0 = a·x_T + Σ b_k ε_k: impulses give a and b_k,
    and the variance a² + Σ b_k² + std² exactly (no sampling error). Checks the learned-range variance, the
    coefficients, where τ applies, and that the last step adds no noise but reports its Gaussian."""
    sched = diffusion.respaced(steps)
    x_T = torch.zeros(steps + 1, 1, dtype=torch.float64)
    x_T[0] = 1
    noises = torch.zeros(steps + 1, steps, 1, dtype=torch.float64)
    for k in range(steps):
        noises[k + 1, k, 0] = 1
    res = sched.sample(exact_1d_model(sched), x_T, noises, tau)
    assert torch.equal(res.std, res.std[:1].expand_as(res.std))  # x-independent variance
    a2, b2, std2 = res.x0[0, 0] ** 2, (res.x0[1:] ** 2).sum(), res.std[0, 0] ** 2
    if tau == 1.0:  # S2 up to the prior mismatch: x_T ~ N(0, 1) while q(x_T) has ᾱ_T = 2.4e-9 of data
        assert abs((a2 + b2 + std2) / S2 - 1) < 1e-7  # fp64: the prior mismatch (2.4e-9) dominates round-off
    else:  # the per-step noise and the reported std carry τ, x_T does not
        one = sched.sample(exact_1d_model(sched), x_T, noises, 1.0)
        # fp64 recursions of <= 50 steps on the same inputs scaled by tau: ~50 ulp (2.2e-16) at most; 1e-13
        torch.testing.assert_close(res.x0[0], one.x0[0], rtol=1e-13, atol=0)
        torch.testing.assert_close(res.x0[1:], tau * one.x0[1:], rtol=1e-13, atol=1e-300)
        torch.testing.assert_close(res.std, tau * one.std, rtol=1e-13, atol=0)


@pytest.mark.parametrize("steps", [100, 25])
def test_final_gaussian_matches_samples_on_exact_1d_model(diffusion, steps):
    """The same exact model, sampled: draws x0 + std·ξ from the returned final Gaussian follow the data
    distribution N(0, S2) (KS test), and ``normal_log_prob`` is that Gaussian's log-density."""
    sched = diffusion.respaced(steps)
    n = 20000
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noises = torch.randn(n, steps, 1, generator=g, dtype=torch.float64)
    res = sched.sample(exact_1d_model(sched), x_T, noises)
    xi = torch.randn(n, 1, generator=g, dtype=torch.float64)
    draws = (res.mean + res.std * xi).squeeze(1).numpy()
    # the final step's std is the posterior spread of x0 given x_1: well above 0 and below the data's
    assert 0 < res.std.min() and res.std.max() < math.sqrt(S2)
    # the p-value is uniform under the null (the seed is fixed, so the test is deterministic: 0.31 and 0.71
    # here); τ = 0.95 instead of 1 gives p ~ 2e-4 at this n (the exact test above is the sharp one)
    assert kstest(draws, norm(scale=math.sqrt(S2)).cdf).pvalue > 1e-3
    lp = normal_log_prob(torch.from_numpy(draws)[:, None], res.mean, res.std)
    want = norm(loc=res.mean.squeeze(1).numpy(), scale=res.std.squeeze(1).numpy()).logpdf(draws)
    torch.testing.assert_close(lp, torch.from_numpy(want), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- errors

def test_errors(diffusion):
    sched = diffusion.respaced(10)
    fn = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1])  # noqa: E731
    with pytest.raises(InvalidArgumentError, match="per-step noise"):
        sched.sample(fn, torch.zeros(2, 3), torch.zeros(2, 9, 3))
    with pytest.raises(InvalidArgumentError, match=r"\(N, 2D\)"):
        sched.sample(lambda x, t: torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 10, 3))
    with pytest.raises(InvalidArgumentError, match="at least 2 steps"):
        diffusion.respaced(1)
    with pytest.raises(InvalidArgumentError, match="1..1000"):
        diffusion.respaced(1001)
    with pytest.raises(InvalidArgumentError, match="unknown noise schedule"):
        GaussianDiffusion(1000, "sqrt")
    with pytest.raises(InvalidArgumentError, match="depth"):
        DiffusionMLP(16, 64, 32, 32, -1)


# ------------------------------------------------------------------------------------------- prepared chains

def chain_fn(net, z_cond, z_uncond, cfg, timesteps):
    """What DiffusionHead hands the loop since the chain's condition-only work is hoisted: a ChainFn."""
    from varkit.models.diffusion import ChainFn

    z = z_cond if cfg == 1.0 else torch.cat([z_cond, z_uncond])
    chain = net.prepare(z, list(timesteps)[::-1])
    if cfg == 1.0:
        return ChainFn(lambda x, k: net.step(x, chain, k))
    return ChainFn(lambda x, k: guide_eps(net.step(torch.cat([x, x]), chain, k), cfg, D))


@pytest.mark.parametrize("name", ["fp32", "fp64"])
@pytest.mark.parametrize("budget", [None, 1, 3 * 6 * (3 * DEPTH + 2) * W])  # all steps / 1 / 3 steps a chunk (6 rows)
def test_chain_step_equals_forward(ref, diffusion, monkeypatch, name, budget):
    """net.step at every step of a prepared chain is net.forward at that step's timestep: the same ops, only the
    row counts of some GEMMs change (S timesteps, steps·N modulation rows), which may make a BLAS pick another
    kernel and sum each dot product in another order. That is <= K·eps·Σ|terms| per GEMM (K = 64 here), a few
    fp32 ulps of the output scale after 4 layers: RTOL (2e-5 fp32, 1e-11 fp64 relative) leaves a wide margin on
    any x86-64 CPU. Chunk budgets that split the chain (1 step, 3 steps: not dividing 25) give the same values."""
    import varkit.models.diffusion as mod

    if budget is not None:
        monkeypatch.setattr(mod, "CHAIN_MODULATION_ELEMENTS", budget)
    dt = DTYPES[name]
    net = make_net(ref, dt)
    x, c = ref["net_in.x"].to(dt), ref["net_in.c"].to(dt)
    ts = list(diffusion.respaced(25).timesteps)[::-1]
    with torch.no_grad():
        chain = net.prepare(c, ts)
        assert chain.chunk == {None: 25, 1: 1}.get(budget, 3)
        for k in list(range(len(ts))) + [0, 24, 3]:  # revisiting earlier chunks recomputes them
            want = net(x, torch.full((6,), ts[k]), c)
            assert_close_rel(net.step(x, chain, k), want, RTOL[name], f"step {k}")
    with pytest.raises(InvalidArgumentError, match="outside this 25-step chain"):
        chain.modulations(25)


@pytest.mark.parametrize("name", ["fp32", "fp64"])
@pytest.mark.parametrize("steps,tau,cfg", [(100, 1.0, 4.0), (25, 0.95, 1.0)])
def test_chain_sampling_matches_official(ref, diffusion, name, steps, tau, cfg):
    """The loop driven by a ChainFn (what DiffusionHead uses) reproduces the official chain (same bounds)."""
    dt = DTYPES[name]
    net = make_net(ref, dt)
    sched = diffusion.respaced(steps)
    fn = chain_fn(net, ref["sample_in.z_cond"].to(dt), ref["sample_in.z_uncond"].to(dt), cfg, sched.timesteps)
    res = sched.sample(fn, ref["sample_in.x_T"].to(dt), ref["sample_in.noises"][:, :steps].to(dt), temperature=tau)
    key = f"sample.s{steps}.tau{tau}.cfg{cfg}.{name}"
    for field in ("x0", "mean", "std", "log_std_sum"):
        assert_close_rel(getattr(res, field), ref[f"{key}.{field}"], RTOL[name], f"{key}.{field}")


def test_head_sampling_uses_the_chain_and_equals_the_plain_loop(diffusion):
    """DiffusionHead.sample (hoisted chain, CFG per position) equals the per-step loop on the plain network in
    fp64: same ops up to GEMM row-count reorderings (a few fp64 ulps, amplified < 1e4 by the 10-step chain)."""
    from types import SimpleNamespace

    from varkit.models.heads import DiffusionHead, DiffusionNoise

    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, depth=2, width=64, default_steps=10, x0_clip=4.0).double()
    for p in head.net.parameters():  # MAR's init zeroes the adaLN and output layers: make them matter
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(1)
    B, n = 2, 3
    out = torch.randn(2 * B, n, 8, generator=g, dtype=torch.float64)
    noise = DiffusionNoise(torch.randn(B, n, 4, generator=g), torch.randn(B, n, 10, 4, generator=g))
    w = torch.tensor([1.5, 3.0, 4.0])
    got = head.sample(out, w, noise, SimpleNamespace(head_steps=None, temperature=0.9))
    sched, z = diffusion.respaced(10), out.reshape(-1, 8)
    ww = w.double().view(1, -1, 1).expand(B, n, 1).reshape(B * n, 1)
    net = head.net

    def plain(x, t):
        o = net(torch.cat([x, x]), torch.cat([t, t]), z)
        return torch.cat([o[B * n:, :4] + (o[:B * n, :4] - o[B * n:, :4]) * ww, o[:B * n, 4:]], 1)

    want = sched.sample(plain, noise.x_T.reshape(-1, 4).double(), noise.steps.reshape(B * n, 10, 4).double(),
                        0.9, 4.0).x0.view(B, n, 4)
    assert_close_rel(got, want, 1e-11, "head sample")
