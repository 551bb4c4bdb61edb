"""FlowAR: the flow head and the generator against wangqiang9/FlowAR's official code, the converter, bad input.

The golden fixtures (tests/fixtures/flowar/) hold the official code's outputs on two tiny FlowARs (FlowAR-S's head
and FlowAR-L/H's cross-attention head) whose weights the tests rebuild from ``keys``/``shapes``/``seeds`` with
``varkit.checkpoints.synthetic.flowar_state_dict``; tests/fixtures/flowar/README.md says how they were made.
These tests need no FlowAR code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from varkit.checkpoints import mar_vae
from varkit.checkpoints.flowar import (
    FLOWAR_DEFAULTS,
    FLOWAR_SIZES,
    convert_flowar,
    flowar_config_from_state_dict,
    flowar_state_dict_from_official,
    flowar_state_dict_to_official,
    generator_from_flowar_state_dict,
    load_flowar,
)
from varkit.checkpoints.synthetic import flowar_state_dict
from varkit.cli import main as cli_main
from varkit.errors import CheckpointError, InvalidArgumentError
from varkit.modeling import load_module
from varkit.models import create_model
from varkit.models.flow import euler_sample, time_grid
from varkit.models.flowar import FlowARGenerator, doubling_scales
from varkit.pipeline import Pipeline, load_pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.base import GuidedRunner
from varkit.samplers.random import Randomness, image_generators
from varkit.tokenizers import VQConfig, VQTokenizer, create_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "flowar"
LABELS = torch.tensor([3, 7])

# Tolerances (fixture values: |velocity| <= 5.3, |z| <= 5.8, loss ~5.2, sampled tokens |x| <= 18).
# Network and training pass: varkit does the official arithmetic op by op (measured: bit-identical in fp32 on
# this machine). Another x86-64 CPU may block its fp32 GEMMs differently (AVX2 vs AVX-512/AMX machines): each
# dot product (<= 2730 terms, 2 + 4 blocks) then moves by ~sqrt(K)·eps32·|terms|, ~1e-6 per layer; 5e-5 on
# values <= 6 leaves >10x margin. fp64 runs differ from FlowAR's by varkit's fp32 RoPE tables and rotation (as
# LlamaGen's; FlowAR's fp64 run rotates in fp64): 6e-8 relative per rotation, measured 3.7e-7 on the net, so 5e-6.
NET_ATOL = {torch.float32: 5e-5, torch.float64: 5e-6}
LOSS_RTOL = {torch.float32: 1e-5, torch.float64: 1e-6}  # a mean of 341x16 squared errors: measured 1e-7 / 3e-9
# Whole sampling runs (5 scales x 24-50 Euler steps, each scale fed into the next, CFG up to 4.3) amplify any
# rounding difference: FlowAR's own fp32 and fp64 runs differ by 1e-4 x max|x| (case 1). varkit differs from
# FlowAR by rounding only (measured 2e-5 x max|x|: FlowAR evaluates both CFG halves where guidance is off, varkit
# the conditional rows alone, so its GEMMs see other batch sizes; fp32 CFG weights). 1e-3 x max|x| is 10x
# FlowAR's own fp32/fp64 spread; a wrong step, weight or interval moves tokens by O(1).
SAMPLE_RTOL = 1e-3


@pytest.fixture(scope="module")
def net_train():
    return torch.load(FIXTURES / "official_net_train.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def samples():
    return torch.load(FIXTURES / "official_sample.pt", map_location="cpu", weights_only=True)


def official_weights(meta, name, seed=None):
    return flowar_state_dict(zip(meta["keys"][name], meta["shapes"][name]), meta["seeds"][name] if seed is None else seed)


def fixture_gen(meta, name, dtype=torch.float32) -> FlowARGenerator:
    """The fixture's FlowAR ``name`` converted as `varkit convert flowar` does (4 heads: not a published size)."""
    sd = flowar_state_dict_from_official(official_weights(meta, name))
    cfg, size = flowar_config_from_state_dict(sd, heads=4)
    assert size == "flowar_w64_d2"
    return generator_from_flowar_state_dict(sd, cfg).to(dtype)


class Replay(Randomness):
    """Randomness whose normal draws are given noise (B, N, D), one scale after the other."""

    def __init__(self, noise: torch.Tensor, sizes: list[int]):
        super().__init__([torch.Generator() for _ in range(noise.shape[0])])
        self.chunks = list(noise.split(sizes, 1))

    def normals(self, *shape, dtype=torch.float32):
        chunk = self.chunks.pop(0)
        assert tuple(chunk.shape[1:]) == shape
        return chunk.to(dtype)


def tiny(seed: int = 0, **kw) -> FlowARGenerator:
    """flowar-tiny with every weight N(0, 0.3²): FlowAR's zero-initialised output layer would make tokens = noise."""
    gen = create_model("flowar-tiny", **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return gen.eval()


def sample_with_noise(gen, noise, labels=LABELS, **params):
    sizes = list(gen.layout.step_sizes)
    return get_sampler("ancestral", SamplingParams(**params)).sample(gen, labels, Replay(noise, sizes))


# -- against the official code ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s", "l"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_network_matches_official(net_train, name, dtype):
    gen = fixture_gen(net_train, name, dtype)
    assert gen.head.net.cross == (name == "l")
    n = net_train["net"]
    with torch.no_grad():
        v = gen.head.net(n["x"].to(dtype), n["t"].to(dtype), n["z"].to(dtype))
    ref = n[name + ("32" if dtype == torch.float32 else "64")]
    torch.testing.assert_close(v, ref.to(dtype), rtol=0, atol=NET_ATOL[dtype])


@pytest.mark.parametrize("name", ["s", "l"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_pass_and_loss_match_official(net_train, name, dtype):
    """The block-causal training forward (pyramid of area-downsampled latents, bicubic/area inputs) and FlowAR's
    loss Σ s²/256·MSE_s with injected times and noise."""
    gen = fixture_gen(net_train, name, dtype)
    tr = net_train["train"]
    tag = "32" if dtype == torch.float32 else "64"
    tokens = gen.layout.from_grids(tr["latents"].to(dtype))
    with torch.no_grad():
        z, mask = gen.training_outputs(LABELS, tokens)
        per = gen.head.scale_losses(z, tokens, tr["t"].to(dtype), tr["noise"].to(dtype))
    assert mask is None
    if dtype == torch.float32:
        torch.testing.assert_close(z, tr[f"z_{name}32"], rtol=0, atol=NET_ATOL[dtype])
    loss = (per * gen.head.scale_weights().to(per)).sum()
    torch.testing.assert_close(loss, tr[f"loss_{name}{tag}"].to(dtype), rtol=LOSS_RTOL[dtype], atol=0)


@pytest.mark.parametrize("index", [0, 1, pytest.param(2, marks=pytest.mark.slow), 3])  # 2: 50 steps, ~10 s
def test_ancestral_sampler_matches_official_sample_tokens(samples, index):
    """Every scale of FlowAR's sample_tokens: S's 25-step two-piece grid at cfg 4.3 / interval 0.9, L's 25 / 2.4 / 0.9,
    H's 50 uniform steps / 2.4 / 0.7 and cfg 1 (where the official code needed its z_sample fix), FlowAR's per-scale
    CFG ramp being varkit's linear schedule."""
    case = samples["sample"][index]
    gen = fixture_gen(samples, case["model"])
    res = sample_with_noise(gen, case["noise"], cfg=case["cfg"], cfg_schedule="linear", head_steps=case["steps"],
                            guidance_interval=case["guidance"])
    ref = case["tokens32"]
    assert res.tokens.dtype == torch.float32 and res.tokens.shape == ref.shape
    assert res.stats.forward_passes == 5
    torch.testing.assert_close(res.tokens, ref, rtol=0, atol=SAMPLE_RTOL * ref.abs().max().item())
    if case["cfg"] == 1.0:  # no CFG rows at all: the very arithmetic of the official run (measured bit-identical)
        torch.testing.assert_close(res.tokens, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_first_scales_and_conditions_match_official(samples):
    """The first scales of the S case at cfg 4.3 (quick version of the slow whole-run test): the conditions z the
    head gets under CFG (doubled batch, null class 1000) and the tokens of scales 1, 2, 4."""
    case = samples["sample"][0]
    gen = fixture_gen(samples, "s")
    cond = torch.cat([LABELS, gen.null_condition(LABELS)])
    assert gen.null_condition(LABELS).tolist() == [1000, 1000]
    cache = gen.new_cache(4)
    noise = case["noise"].split(list(gen.layout.step_sizes), 1)
    params = SamplingParams(cfg=4.3, cfg_schedule="linear", head_steps=25, guidance_interval=0.9)
    zs, toks = [], []
    with torch.no_grad():
        out, state = gen.prefill(cond, cache)
        for k in range(3):
            if k:
                out = gen(torch.cat([toks[-1], toks[-1]]), k, cache, state)
            zs.append(out)
            toks.append(gen.head.sample(out, case["cfg_scale"][k], noise[k], params))
    torch.testing.assert_close(torch.cat(zs, 1), case["z32_first3"], rtol=0, atol=NET_ATOL[torch.float32])
    ref = case["tokens32"][:, :21]
    torch.testing.assert_close(torch.cat(toks, 1), ref, rtol=0, atol=SAMPLE_RTOL * ref.abs().max().item())


def test_synthetic_recipe_buffers_are_flowars():
    """The builder's derived buffers: FlowAR's block-causal additive mask and its RoPE frequencies."""
    sd = flowar_state_dict([("mask", (1, 1, 21, 21)), ("a.rope.freqs", (8,)), ("w.weight", (3, 4))], 0)
    m = sd["mask"][0, 0]
    step = torch.tensor([0] + [1] * 4 + [2] * 16)
    assert torch.equal(m == 0, step[None, :] <= step[:, None]) and torch.isinf(m[m != 0]).all()
    # fp32 pow / reciprocal of the same inputs: <= 2 ulp on any CPU; default rtol 1.3e-6 is 10 ulp
    torch.testing.assert_close(sd["a.rope.freqs"], 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    with pytest.raises(ValueError):
        flowar_state_dict([("mask", (1, 1, 20, 20))], 0)


# -- the flow head's math ---------------------------------------------------------------------------------
def test_time_grids():
    g25 = time_grid(25)
    assert g25.dtype == torch.float64 and len(g25) == 25  # FlowAR's 25 points: 24 Euler steps
    # the same linspace calls in fp64: identical on any CPU
    torch.testing.assert_close(g25, torch.cat([torch.linspace(1, 0.3, 12, dtype=torch.float64),
                                               torch.linspace(0.25, 0, 13, dtype=torch.float64)]), rtol=0, atol=0)
    torch.testing.assert_close(time_grid(50), torch.linspace(1, 0, 51, dtype=torch.float64), rtol=0, atol=0)
    assert len(time_grid(7)) == 8 and time_grid(1).tolist() == [1.0, 0.0]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="head_steps"):
            time_grid(bad)


def test_euler_cfg_applies_only_inside_the_interval():
    """A velocity field constant per row: conditional rows a, unconditional rows b. The exact result is
    x1 + Σ dt·d with d = b + w·(a − b) on steps whose t <= interval and a elsewhere; the unconditional rows are
    only evaluated inside the interval."""
    B, n, D = 2, 4, 3
    a, b = 0.7, -1.3
    calls = []

    def net(x, t, cond):
        calls.append((x.shape[0], float(t[0])))
        return cond[..., :D].clone()

    cond = torch.cat([torch.full((B, n, D), a, dtype=torch.float64), torch.full((B, n, D), b, dtype=torch.float64)])
    x1 = torch.randn(B, n, D, dtype=torch.float64)
    grid, w, g = time_grid(10), 3.0, 0.55
    x = euler_sample(net, x1, cond, torch.full((n,), w), grid, g)
    want = x1.clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        want = want + (t1 - t0) * (b + w * (a - b) if t0 <= g else a)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-12)  # fp64 sums of 24 Euler steps of O(1): ~1e-15
    assert [c for c, t in calls] == [2 * B if t <= g else B for _, t in calls]
    # weight 1 everywhere (FlowAR's first scale) or interval 0: no unconditional evaluation at all
    calls.clear()
    euler_sample(net, x1, cond, torch.ones(n), grid, 1.0)
    euler_sample(net, x1, cond, w, grid, 0.0)
    assert {c for c, _ in calls} == {B}


def test_time_input_is_flowars_floor_in_fp32():
    """FlowAR feeds (t·1000).long() computed in the sampler's fp32: t = 0.3 of the 25-step grid is step 300
    (fp64 arithmetic would floor 0.29999999999999993·1000 to 299); the head does the same."""
    seen = []
    gen = create_model("flowar-tiny")
    real = gen.head.net.time_embed.forward

    def spy(steps):
        seen.append(steps.tolist())
        return real(steps)

    gen.head.net.time_embed.forward = spy
    with torch.no_grad():
        gen.head.sample(torch.randn(1, 4, 32), None, torch.randn(1, 4, 4), SamplingParams(head_steps=25))
    grid = time_grid(25)
    assert [s[0] for s in seen] == [int(t) for t in (grid[:-1].float() * 1000).long()]
    assert 300 in [s[0] for s in seen]


def test_cfg_ramp_is_the_linear_schedule():
    """FlowAR's per-scale CFG (cfg − 1)·k/(K − 1) + 1 (scale 1 unguided) is varkit's linear schedule on scales."""
    gen = create_model("flowar-tiny", patch_nums=(1, 2, 4, 8, 16))
    run = GuidedRunner(gen, SamplingParams(cfg=4.3, cfg_schedule="linear"), torch.tensor([0, 1]))
    K = 5
    per_step = [run.token_weights[gen.layout.step_starts[k]].item() for k in range(K)]
    want = [(4.3 - 1) * k / (K - 1) + 1 for k in range(K)]
    torch.testing.assert_close(torch.tensor(per_step, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-7, atol=0)  # the runner keeps weights in fp32
    assert per_step[0] == 1.0


def test_head_settings_it_refuses():
    head = create_model("flowar-tiny").head
    out, noise = torch.randn(1, 4, 32), torch.randn(1, 4, 4)
    for params, match in ((SamplingParams(temperature=0.9), "temperature"), (SamplingParams(top_k=5), "top_k")):
        with pytest.raises(InvalidArgumentError, match=match):
            head.check_params(params)
    with pytest.raises(InvalidArgumentError, match="no density"):
        head.log_prob(out, None, noise, SamplingParams())
    with pytest.raises(InvalidArgumentError, match="injected noise"):
        head.sample(out, None, torch.randn(1, 5, 4), SamplingParams())
    with pytest.raises(InvalidArgumentError, match="square"):
        head.sample(torch.randn(1, 3, 32), None, torch.randn(1, 3, 4), SamplingParams())
    with pytest.raises(InvalidArgumentError, match="CFG needs"):
        head.sample(out, torch.full((4,), 2.0), noise, SamplingParams())


def test_loss_is_flowars_weighted_sum_and_training_steps_reduce_it():
    torch.manual_seed(0)
    gen = create_model("flowar-tiny").train()
    head = gen.head
    assert head.scale_weights().tolist() == [1 / 16, 4 / 16, 1.0]
    cond = torch.tensor([0, 1, 2, 3] * 4)
    latents = torch.randn(16, 4, 4, 4) * 0.5 + torch.arange(4).view(1, 1, 1, 4) * 0.3
    tokens = gen.layout.from_grids(latents)
    t, noise = torch.rand(16, 3), torch.randn(16, 21, 4)

    def fixed_loss():
        with torch.no_grad():
            out, _ = gen.training_outputs(cond, tokens)
            return float((head.scale_losses(out, tokens, t, noise) * head.scale_weights()).sum())

    torch.manual_seed(1)
    out, mask = gen.training_outputs(cond, tokens)
    loss, metrics = head.loss(out, tokens, mask)
    torch.manual_seed(1)
    t1, n1 = torch.rand(16, 3), torch.randn(tokens.shape)
    # fp32 losses ~1 summed in another order: ulps; the default rtol 1.3e-6 / atol 1e-5 hold on any CPU
    torch.testing.assert_close(loss, (head.scale_losses(out, tokens, t1, n1) * head.scale_weights()).sum())
    assert set(metrics) == {"loss_s1", "loss_s2", "loss_s4"}
    full = torch.ones(16, 21, dtype=torch.bool)
    torch.testing.assert_close(head.scale_losses(out, tokens, t, noise, full), head.scale_losses(out, tokens, t, noise))
    before = fixed_loss()
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    for _ in range(15):
        out, mask = gen.training_outputs(cond, tokens)
        loss, _ = head.loss(out, tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


# -- the generator --------------------------------------------------------------------------------------
def test_same_seed_same_image_at_any_batch_position():
    """Each image's noise comes from its own generator: image 2 alone equals image 2 in a batch of 3 (fp64, where
    only batch-size-dependent GEMM rounding (1e-16) remains, amplified at most ~1e4 by the chain)."""
    gen = tiny().double()
    params = SamplingParams(cfg=2.5, cfg_schedule="linear", guidance_interval=0.8)
    labels = torch.tensor([0, 1, 2])
    gens = image_generators(7, 3)
    batch = get_sampler("ancestral", params).sample(gen, labels, gens).tokens
    alone = get_sampler("ancestral", params).sample(gen, labels[2:], image_generators(7, 3)[2:]).tokens
    # fp64 sampling, batch of 3 vs 1 (other GEMM shapes): ~1e-15 relative per op; 1e-9 on tokens ~1
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-9)
    assert batch.dtype == torch.float64 and not torch.allclose(batch[0], batch[1])


def test_guidance_interval_zero_is_no_guidance():
    gen = tiny().double()
    labels, noise = torch.tensor([1, 3]), torch.randn(2, 21, 4)
    off = sample_with_noise(gen, noise, labels, cfg=3.0, cfg_schedule="linear", guidance_interval=0.0)
    plain = sample_with_noise(gen, noise, labels, cfg=1.0)
    on = sample_with_noise(gen, noise, labels, cfg=3.0, cfg_schedule="linear", guidance_interval=1.0)
    torch.testing.assert_close(off.tokens, plain.tokens, rtol=0, atol=1e-9)  # fp64: batch-size rounding only
    assert (on.tokens[:, 1:] - plain.tokens[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(on.tokens[:, :1], plain.tokens[:, :1], rtol=0, atol=1e-9)  # scale 1: weight 1


def test_decoding_contract_errors():
    gen = create_model("flowar-tiny")
    cache = gen.new_cache(2)
    with torch.no_grad():
        out, state = gen.prefill(torch.tensor([0, 1]), cache)
        assert out.shape == (2, 1, 32) and cache.length == 1
        with pytest.raises(InvalidArgumentError, match="one scale a step"):
            gen(torch.zeros(2, 4, 4), 2, cache, state)
        with pytest.raises(InvalidArgumentError, match="shape"):
            gen(torch.zeros(2, 4, 4), 1, cache, state)
        with pytest.raises(InvalidArgumentError, match="empty KVCache"):
            gen.prefill(torch.tensor([0, 1]), cache)
    for bad in (torch.tensor([0.5]), torch.tensor([5]), torch.tensor([-1])):
        with pytest.raises(InvalidArgumentError):
            gen.check_condition(bad)
    with pytest.raises(InvalidArgumentError, match="logits"):
        gen.teacher_forcing_logits(torch.tensor([0]), torch.zeros(1, 21, 4))
    for kw, match in ((dict(patch_nums=(2, 4)), "start at 1"), (dict(head="diffusion"), "flow head"),
                      (dict(token_dim=0), "continuous"), (dict(dim=30, n_head=2), "divisible by 4"),
                      (dict(guidance_interval=1.5), r"\[0, 1\]"), (dict(head_steps=0), "head_steps")):
        with pytest.raises(InvalidArgumentError, match=match):
            create_model("flowar-tiny", **kw)


def test_bf16_generator_samples_fp32_tokens():
    gen = tiny().to(torch.bfloat16)
    res = get_sampler("ancestral", SamplingParams(cfg=2.0, cfg_schedule="linear")).sample(
        gen, torch.tensor([0, 1]), image_generators(0, 2))
    assert res.tokens.dtype == torch.float32 and torch.isfinite(res.tokens).all()


def test_latent_pyramid_layout():
    gen = create_model("flowar-tiny")
    lat = torch.randn(2, 4, 4, 4)
    tokens = gen.layout.from_grids(lat)
    assert tokens.shape == (2, 21, 4) and gen.layout.kind == "scales"
    torch.testing.assert_close(tokens[:, 0], lat.mean((1, 2)))  # area-down to 1x1: the mean
    torch.testing.assert_close(gen.layout.to_tokenizer_ids(tokens), lat, rtol=0, atol=0)  # the finest scale is a copy
    assert torch.equal(gen.layout.from_grids(gen.layout.to_grids(tokens)), tokens)
    with pytest.raises(InvalidArgumentError, match="finest scale is 4x4"):
        gen.layout.from_grids(torch.randn(2, 8, 8, 4))


# -- tokenizers and bad input -----------------------------------------------------------------------------
def test_tokenizers_it_refuses():
    kl = create_tokenizer("digits-kl")
    assert FlowARGenerator.config_for_tokenizer(kl, 32) == {"token_dim": 4, "patch_nums": (1, 2, 4, 8)}
    with pytest.raises(InvalidArgumentError, match="power of two"):
        FlowARGenerator.config_for_tokenizer(kl, 48)  # a 12x12 latent: 1, 2, 4, 8, ... never makes 12
    with pytest.raises(InvalidArgumentError, match="multiple"):
        FlowARGenerator.config_for_tokenizer(kl, 30)
    assert doubling_scales(16) == (1, 2, 4, 8, 16)
    vq = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                              codebook_dim=4, norm_groups=4))
    with pytest.raises(InvalidArgumentError, match="continuous \\(KL\\) tokenizer"):
        FlowARGenerator.config_for_tokenizer(vq, 16)
    with pytest.raises(InvalidArgumentError, match="continuous \\(KL\\) tokenizer"):
        Pipeline(vq, create_model("flowar-tiny"))


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    return Pipeline(create_tokenizer("digits-kl"), tiny(num_classes=4),
                    {"cfg": 2.0, "cfg_schedule": "linear", "guidance_interval": 0.9, "head_steps": 4})


def test_pipeline_api_and_bad_settings(tiny_pipe):
    out = tiny_pipe([0, 3], head_steps=3, cfg=1.5, guidance_interval=0.5, seed=4)
    assert out.tokens.shape == (2, 21, 4) and out.images[0].size == (16, 16)
    assert tiny_pipe.sampling_params().guidance_interval == 0.9
    again = tiny_pipe([3], head_steps=3, cfg=1.5, guidance_interval=0.5, image_seeds=None, seed=4)
    assert again.tokens.shape == (1, 21, 4)
    for kw, match in ((dict(head_steps=0), "head_steps"), (dict(guidance_interval=1.5), "guidance_interval"),
                      (dict(guidance_interval=-0.1), "guidance_interval"), (dict(temperature=0.5), "temperature"),
                      (dict(num_iter=4), "num_iter")):
        with pytest.raises(InvalidArgumentError, match=match):
            tiny_pipe([0], **kw)


def test_cli_guidance_interval(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    assert cli_main(["generate", "--model", str(tmp_path / "pipe"), "--classes", "0", "1", "--guidance-interval", "0.7",
                     "--head-steps", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert cli_main(["generate", "--model", str(tmp_path / "pipe"), "--classes", "0", "--guidance-interval", "2",
                     "--out", str(tmp_path / "h.png")]) == 2
    assert "guidance_interval must be in [0, 1]" in capsys.readouterr().err


def test_save_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.generator.save_pretrained(tmp_path / "g")
    g = load_module(tmp_path / "g")
    assert isinstance(g, FlowARGenerator) and g.config == tiny_pipe.generator.config
    noise = torch.randn(2, 21, 4)
    a = sample_with_noise(tiny_pipe.generator, noise, torch.tensor([1, 2]), cfg=2.0, cfg_schedule="linear", head_steps=3)
    b = sample_with_noise(g, noise, torch.tensor([1, 2]), cfg=2.0, cfg_schedule="linear", head_steps=3)
    assert torch.equal(a.tokens, b.tokens)


# -- the converter -----------------------------------------------------------------------------------------
def stand_in_vae(path: Path) -> Path:
    """A readable file in the VAE's place (its weights come from ``vae16``)."""
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    return path


@pytest.fixture
def vae16(monkeypatch):
    """MAR's KL-16 loader replaced by a small KL tokenizer with 16-channel latents (the real one is 266 MB)."""
    torch.manual_seed(0)
    tok = create_tokenizer("digits-kl", latent_dim=16).eval()
    monkeypatch.setattr(mar_vae, "load_mar_vae", lambda path: tok)
    return tok


def flowar_file(meta, path: Path, name="s") -> Path:
    torch.save(official_weights(meta, name), path)
    return path


def test_convert_round_trip_and_folder(net_train, tmp_path, vae16):
    stand_in_vae(tmp_path / "kl16.ckpt")
    raw = official_weights(net_train, "l")
    torch.save(raw, tmp_path / "FlowAR-tiny.pth")
    out = convert_flowar(tmp_path / "kl16.ckpt", tmp_path / "FlowAR-tiny.pth", tmp_path / "pipe", heads=4)
    pipe = load_pipeline(out)
    g = pipe.generator
    assert (g.config.dim, g.config.n_head, g.config.patch_nums, g.config.head_cross) == (64, 4, (1, 2, 4, 8, 16), True)
    conv = json.loads((out / "convert.json").read_text())
    assert conv["family"] == "flowar" and conv["image_size"] == 64 and conv["flowar"]["weights"] == "top level"
    assert pipe.defaults["cfg_schedule"] == "linear" and pipe.defaults["guidance_interval"] == 0.9
    back = flowar_state_dict_to_official(g.state_dict())
    derived = {k for k in raw if k == "mask" or k.endswith("rope.freqs")}
    assert set(back) == set(raw) - derived and derived
    assert all(torch.equal(back[k], raw[k]) for k in back)
    assert torch.equal(load_flowar(tmp_path / "FlowAR-tiny.pth", heads=4).state_dict()["head.net.input_proj.weight"],
                       raw["flownet.input_proj.weight"])
    img = pipe([3], head_steps=2, seed=0).images[0]
    assert img.size == (64, 64)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        convert_flowar(tmp_path / "kl16.ckpt", tmp_path / "FlowAR-tiny.pth", out, heads=4)


def test_published_settings_become_the_folder_defaults(net_train, tmp_path, vae16, monkeypatch):
    """A file of a published size gets the README's settings (here the fixture's size stands in for each)."""
    stand_in_vae(tmp_path / "kl16.ckpt")
    path = flowar_file(net_train, tmp_path / "f.pth")
    for i, (size, want) in enumerate(FLOWAR_DEFAULTS.items()):
        monkeypatch.setitem(FLOWAR_SIZES, (64, 2, 2, 2, 128, False), (size, 4))
        out = convert_flowar(tmp_path / "kl16.ckpt", path, tmp_path / f"p{i}")
        pipe = load_pipeline(out)
        assert pipe.defaults == {**pipe.defaults, **want, "cfg_schedule": "linear", "temperature": 1.0}
        assert (pipe.generator.config.head_steps, pipe.generator.config.guidance_interval) == \
            (want["head_steps"], want["guidance_interval"])
    assert FLOWAR_DEFAULTS == {"flowar_small": {"head_steps": 25, "cfg": 4.3, "guidance_interval": 0.9},
                               "flowar_large": {"head_steps": 25, "cfg": 2.4, "guidance_interval": 0.9},
                               "flowar_huge": {"head_steps": 50, "cfg": 2.4, "guidance_interval": 0.7}}


@pytest.mark.parametrize("size, params, head", [("small", 171.718072e6, 42.005176e6), ("large", 586.862912e6, 281.495552e6),
                                                ("huge", 1913.31688e6, 633.043984e6)])
def test_published_sizes_are_inferred(size, params, head):
    """FlowAR-S/L/H's key sets (built on the meta device) convert to the named configs; parameter counts are the
    official models' (counted on FlowAR's code)."""
    with torch.device("meta"):
        g = create_model(f"flowar-{size}")
    sd = g.state_dict()
    assert sum(v.numel() for v in sd.values()) == round(params)
    assert sum(v.numel() for k, v in sd.items() if k.startswith("head.")) == round(head)
    official = flowar_state_dict_to_official(sd)
    assert "flownet.input_proj.weight" in official and "encoder_blocks.0.attn.qkv.weight" in official
    cfg, name = flowar_config_from_state_dict(flowar_state_dict_from_official(official))
    assert name == f"flowar_{size}" and cfg == g.config


def test_bad_files_fail_with_one_clear_line(net_train, tmp_path, vae16):
    stand_in_vae(tmp_path / "kl16.ckpt")
    good = flowar_file(net_train, tmp_path / "f.pth")

    def fails(vae, flowar, match, **kw):
        with pytest.raises(CheckpointError, match=match) as e:
            convert_flowar(vae, flowar, tmp_path / "o", **kw)
        assert "\n" not in str(e.value)

    fails(tmp_path / "kl16.ckpt", good, "unknown size.*flowar_small.*heads=")
    torch.save({"fake_latent": torch.zeros(1, 4), "diffloss.net.input_proj.weight": torch.zeros(2, 2)}, tmp_path / "mar.pth")
    fails(tmp_path / "kl16.ckpt", tmp_path / "mar.pth", "varkit convert mar")
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1), "quant_conv.weight": torch.zeros(1)}},
               tmp_path / "vae_as_flowar.ckpt")
    fails(tmp_path / "kl16.ckpt", tmp_path / "vae_as_flowar.ckpt", "KL-16 VAE.*--vae")
    fails(good, good, "FlowAR generator checkpoint, not MAR's KL-16 VAE", heads=4)
    torch.save([1, 2], tmp_path / "list.pth")
    fails(tmp_path / "kl16.ckpt", tmp_path / "list.pth", "not a state dict")
    sd = torch.load(good, weights_only=True)
    del sd["decoder_blocks.1.attn.proj.bias"]
    torch.save(sd, tmp_path / "cut.pth")
    fails(tmp_path / "kl16.ckpt", tmp_path / "cut.pth", "do not fit", heads=4)
    sd = torch.load(good, weights_only=True)
    sd["encoder_pos_embed_learned"] = sd["diffusion_pos_embed_learned"] = torch.zeros(1, 300, 64)
    torch.save(sd, tmp_path / "odd.pth")
    fails(tmp_path / "kl16.ckpt", tmp_path / "odd.pth", "300 positions", heads=4)
    assert not (tmp_path / "o").exists()


def test_not_a_pair_and_training_checkpoints(net_train, tmp_path, monkeypatch):
    stand_in_vae(tmp_path / "kl16.ckpt")
    monkeypatch.setattr(mar_vae, "load_mar_vae", lambda path: create_tokenizer("digits-kl"))
    with pytest.raises(CheckpointError, match="not a FlowAR pair.*16-channel"):
        convert_flowar(tmp_path / "kl16.ckpt", flowar_file(net_train, tmp_path / "f.pth"), tmp_path / "o", heads=4)
    ema, model = official_weights(net_train, "s"), official_weights(net_train, "s", seed=5)
    torch.save({"model": model, "model_ema": ema, "epoch": 3}, tmp_path / "ckpt.pth")
    key = "flownet.final_layer.linear.weight"
    assert torch.equal(load_flowar(tmp_path / "ckpt.pth", heads=4).state_dict()["head.net.final_layer.linear.weight"], ema[key])
    assert torch.equal(load_flowar(tmp_path / "ckpt.pth", heads=4, ema=False).state_dict()["head.net.final_layer.linear.weight"],
                       model[key])


def test_cli_convert_flowar(net_train, tmp_path, vae16, capsys):
    stand_in_vae(tmp_path / "kl16.ckpt")
    good = flowar_file(net_train, tmp_path / "FlowAR-x.pth")
    assert cli_main(["convert", "flowar", "--vae", str(tmp_path / "kl16.ckpt"), "--flowar", str(good), "--out",
                     str(tmp_path / "p"), "--heads", "4"]) == 0
    assert "flow head 2x128" in capsys.readouterr().out
    assert cli_main(["convert", "flowar", "--vae", str(tmp_path / "kl16.ckpt"), "--flowar", str(good), "--out",
                     str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "unknown size" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_generator_command(tmp_path):
    """`varkit train generator --config flowar-tiny` over a KL tokenizer: the scales come from the tokenizer's grid,
    the flow loss falls, and the saved pipeline samples."""
    torch.manual_seed(0)
    create_tokenizer("digits-kl").save_pretrained(tmp_path / "tok")
    assert cli_main(["train", "generator", "--data", "digits", "--tokenizer", str(tmp_path / "tok"), "--config",
                     "flowar-tiny", "--out", str(tmp_path / "out"), "--resolution", "16", "--steps", "24",
                     "--batch-size", "32", "--lr", "3e-3", "--warmup", "2", "--log-every", "4",
                     "--default", "guidance_interval=0.8"]) == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "train-generator" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"] and {"loss_s1", "loss_s2", "loss_s4"} <= set(log[-1])
    pipe = load_pipeline(tmp_path / "out")
    assert pipe.generator.config.patch_nums == (1, 2, 4) and pipe.defaults["guidance_interval"] == 0.8
    assert pipe([0, 9], head_steps=3).tokens.shape == (2, 21, 4)
    assert math.isfinite(log[-1]["loss"])
