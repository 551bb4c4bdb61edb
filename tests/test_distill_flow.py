"""DD1's flow map: the per-token velocity, the endpoint distribution, and the map along raster and scales layouts."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from varkit.distill.flow import flow_map, nearest_codeword, posterior_logits, teacher_flow, velocity
from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators, processed_probs

from conftest import randomize, toy_model


def _toy(V=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    book = torch.nn.functional.normalize(torch.randn(V, d, generator=g, dtype=torch.float64), dim=-1)
    p = torch.softmax(1.5 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    return book, p, g


def _tv(ids: torch.Tensor, p: torch.Tensor) -> float:
    f = torch.bincount(ids.reshape(-1), minlength=p.numel()).double() / ids.numel()
    return 0.5 * float((f - p).abs().sum())


def test_velocity_is_the_closed_form_of_the_gaussian_posterior():
    book, p, g = _toy(V=6, d=3)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for t in (0.0, 0.3, 0.9):
        # brute force: w_v ∝ p_v · N(x; t e_v, (1-t)² I) with the full Gaussian density
        var = (1 - t) ** 2
        dens = torch.exp(-((x[:, None] - t * book[None]) ** 2).sum(-1) / (2 * var)) / (2 * math.pi * var) ** 1.5
        w = p * dens
        w = w / w.sum(-1, keepdim=True)
        want = (w @ book - x) / (1 - t)
        got = velocity(x, t, p.log().expand(5, 6), book)
        # fp64 on both sides, O(1) values: the two orders of summation agree to ~1e-15
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        # dropping ‖x‖² (the same for every codeword) changes the log-weights by a constant per row only
        lw = posterior_logits(x, t, p.log().expand(5, 6), book)
        full = p.log() - ((x[:, None] - t * book[None]) ** 2).sum(-1) / (2 * (1 - t) ** 2) if t < 1 else None
        diff = lw - full
        torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-10)


def test_endpoint_distribution_approaches_the_categorical_with_euler_steps():
    """The endpoint's frequencies vs p over 10⁵ noises (continuous.md §5's toy: V=16, d=8)."""
    book, p, g = _toy()
    n = 100_000
    noise = torch.randn(n, 8, generator=g, dtype=torch.float64)
    tv = {k: _tv(flow_map(noise, p.log().expand(n, 16), book, k), p) for k in (1, 4, 32)}
    # Monte-Carlo scale of a perfect sampler at n = 1e5: E[TV] = ½Σ E|f_v − p_v| ≈ ½Σ sqrt(2 p_v(1−p_v)/(π n))
    # (0.0035 for this p; sd ~0.001), so 0.02 is the ~1 % Euler error of 32 steps (0.0075 in continuous.md) plus
    # more than 10 sd of sampling noise; the 1- and 4-step errors (0.43, 0.069) are far above that scale
    mc = 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())
    assert mc < 0.005
    assert tv[1] > 0.2 and tv[4] > 0.04
    assert tv[1] > tv[4] > tv[32]
    assert tv[32] < 0.02


def test_flow_lands_on_codewords_it_can_reach_and_is_deterministic():
    book, p, g = _toy()
    p = p.clone()
    p[:8] = 0  # top-k style truncation: those codewords have weight 0 at every t
    p = p / p.sum()
    noise = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    ids = flow_map(noise, p.log().expand(2000, 16), book, 32)
    assert ids.min() >= 8
    assert torch.equal(ids, flow_map(noise, p.log().expand(2000, 16), book, 32))
    assert torch.equal(nearest_codeword(book, book), torch.arange(16))


def test_flow_map_refuses_bad_shapes_and_steps():
    book, p, _ = _toy()
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        flow_map(torch.zeros(3, 7), p.log().expand(3, 16), book)
    with pytest.raises(InvalidArgumentError, match="Euler steps"):
        flow_map(torch.zeros(3, 8), p.log().expand(3, 16), book, steps=0)


# -- along a layout -------------------------------------------------------------------------------------------
def _raster():
    return randomize(create_model("raster-tiny"), std=0.3)


def _scales():
    from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

    tok = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                           patch_nums=(1, 2, 4), norm_num_groups=4)).eval()
    gen = randomize(create_model("var-tiny"), std=0.3)
    gen.bind_tokenizer(tok)
    return gen


@pytest.mark.parametrize("make", [_raster, _scales], ids=["raster", "scales"])
def test_one_hot_conditionals_make_the_flow_the_greedy_sampler(make):
    """With top_k=1 every conditional is one codeword, so the flow must give exactly the greedy sequence:
    this pins the layout driver (prefix, steps, CFG) to ancestral decoding on both layouts."""
    gen = make()
    cond = torch.tensor([0, 1, 3])
    params = SamplingParams(cfg=2.0, top_k=1)
    book = torch.nn.functional.normalize(torch.randn(gen.vocab_size, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    noise = torch.randn(3, gen.layout.num_tokens, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ids, passes = teacher_flow(gen, cond, noise, params, book, steps=8)
        greedy = get_sampler("ancestral", params).sample(gen, cond, image_generators(0, 3))
    # the same logits through the same kernels; the flow's target is that argmax's one-hot
    assert torch.equal(ids, greedy.tokens)
    assert passes == gen.layout.num_steps


@pytest.mark.parametrize("make", [_raster, _scales], ids=["raster", "scales"])
def test_teacher_flow_from_a_prefix_continues_the_same_map(make):
    gen = make()
    cond = torch.tensor([2, 0])
    params = SamplingParams(cfg=1.5, top_k=6)
    book = torch.nn.functional.normalize(torch.randn(gen.vocab_size, 4, generator=torch.Generator().manual_seed(3)), dim=-1)
    noise = torch.randn(2, gen.layout.num_tokens, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = teacher_flow(gen, cond, noise, params, book)
        k = 2
        prefix = full.clone()
        prefix[:, gen.layout.step_starts[k]:] = 0
        rest, _ = teacher_flow(gen, cond, noise, params, book, tokens=prefix, start=k)
    # fp32 logits of a multi-step (raster) or step-by-step (scales) pass agree to ~1e-6; a flow endpoint moves
    # only if its noise lies within that of a Voronoi boundary of the final posterior mean (measure ~0 here)
    assert torch.equal(rest, full)


def test_flow_pairs_follow_the_teachers_joint_distribution():
    """(noise → tokens) along a 2×2 raster: the sequences' frequencies against the teacher's exact joint."""
    from stats_helpers import exact_joint, seq_index

    gen = toy_model(1)
    params = SamplingParams(cfg=2.0, temperature=0.9)
    book = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    n = 20_000
    noise = torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ids, _ = teacher_flow(gen, torch.zeros(n, dtype=torch.long), noise, params, book, steps=32)
    joint = exact_joint(gen, 0, params)
    freq = torch.bincount(seq_index(ids, 4), minlength=256).double() / n
    tv = 0.5 * float((freq - joint).abs().sum())
    # sampling noise of 2e4 draws over 256 sequences: E[TV] ≈ ½Σ sqrt(2p(1−p)/(πn)) (computed below, ~0.04);
    # the 32-step Euler error adds ≲ 1 % per token (4 tokens); 1.5·MC + 0.04 is far above both and far below
    # the TV of a wrong conditional (e.g. ignoring CFG: > 0.2 for this toy)
    mc = 0.5 * float(torch.sqrt(2 * joint * (1 - joint) / (math.pi * n)).sum())
    assert tv < 1.5 * mc + 0.04, (tv, mc)
    unguided = exact_joint(gen, 0, SamplingParams(temperature=0.9))
    assert 0.5 * float((freq - unguided).abs().sum()) > tv + 0.05
    assert list(itertools.islice(iter(ids.shape), 2)) == [n, 4]
