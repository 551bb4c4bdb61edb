import pytest
import torch

from varkit.bench.decode import decode_without_cache
from varkit.errors import InvalidArgumentError
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.base import GuidedRunner
from varkit.samplers.logits import image_generators, processed_probs, sample_logits


def _sample(gen, labels, params, seed=0):
    gens = image_generators(seed, len(labels))
    return get_sampler("ancestral", params).sample(gen, torch.tensor(labels), gens)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_with_cache_equals_without_cache(tiny_gen, cfg):
    params = SamplingParams(cfg=cfg, top_k=1)
    res = _sample(tiny_gen, [0, 1, 2, 3], params)
    ref = decode_without_cache(tiny_gen, torch.tensor([0, 1, 2, 3]), params, image_generators(0, 4))
    # fp32 logits of two paths (~1e-6 apart on any CPU); the greedy path's smallest top-2 gap is 1.4e-3
    # (cfg 1) and 1.2e-2 (cfg 3), so no CPU's kernels can flip a token
    assert torch.equal(res.tokens, ref)
    assert res.stats.forward_passes == 16 and res.stats.steps == 16


def test_sampling_with_cache_equals_without_cache(tiny_gen):
    params = SamplingParams(cfg=2.0, top_k=8, top_p=0.9, temperature=0.9)
    res = _sample(tiny_gen, [0, 3], params, seed=5)
    ref = decode_without_cache(tiny_gen, torch.tensor([0, 3]), params, image_generators(5, 2))
    # sampled: logits ~1e-6 apart move a draw only if its uniform is that close to a CDF boundary
    # (probability ~1e-6 per draw, 32 draws)
    assert torch.equal(res.tokens, ref)


def test_top_k_1_is_argmax(tiny_gen):
    cond = torch.tensor([2])
    res = _sample(tiny_gen, [2], SamplingParams(top_k=1, temperature=0.7))
    c = tiny_gen.new_cache(1)
    logits, _ = tiny_gen.prefill(cond, c)
    toks = [logits.argmax(-1)]
    for s in range(1, 16):
        toks.append(tiny_gen(toks[-1], s, c).argmax(-1))
    assert torch.equal(res.tokens, torch.cat(toks, 1))


def test_cfg_scale_one_equals_no_cfg(tiny_gen, monkeypatch):
    params = SamplingParams(cfg=1.0, top_k=5)
    res = _sample(tiny_gen, [0, 1, 2], params, seed=3)
    plain, plain_bytes = res.tokens, res.stats.cache_bytes
    monkeypatch.setattr(SamplingParams, "uses_cfg", lambda self, n: True)  # force the doubled batch
    doubled = _sample(tiny_gen, [0, 1, 2], params, seed=3)
    assert doubled.stats.cache_bytes == 2 * plain_bytes
    assert torch.equal(doubled.tokens, plain)


def test_same_seed_same_image_whatever_batch_size_or_position(tiny_gen):
    params = SamplingParams(cfg=2.0)
    labels = [3, 1, 0, 2, 1, 3, 0, 2]
    gens8 = image_generators(7, 8)
    full = get_sampler("ancestral", params).sample(tiny_gen, torch.tensor(labels), gens8).tokens
    for i in (0, 5):
        single = get_sampler("ancestral", params).sample(
            tiny_gen, torch.tensor([labels[i]]), [image_generators(7, 8)[i]]).tokens
        assert torch.equal(single[0], full[i])
    # image 5 placed at position 0 of another batch
    gens = image_generators(7, 8)
    moved = get_sampler("ancestral", params).sample(
        tiny_gen, torch.tensor([labels[5], labels[0]]), [gens[5], gens[0]]).tokens
    assert torch.equal(moved[0], full[5]) and torch.equal(moved[1], full[0])


def test_sampled_marginal_matches_processed_probs():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 10) * 2
    p = SamplingParams(top_k=6, top_p=0.8, temperature=1.3)
    probs = processed_probs(logits, p)[0, 0]
    u = torch.rand(1, 20000, dtype=torch.float64)
    draws = sample_logits(logits.expand(1, 20000, 10), p, u)[0]
    freq = torch.bincount(draws, minlength=10).float() / 20000
    assert (freq - probs).abs().max() < 0.015  # statistical: sd of a frequency <= sqrt(0.25 / 20000) = 0.0035; 4.2 sd
    assert (probs > 0).sum() <= 6 and ((probs == 0) == (freq == 0)).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"cfg": -1.0}, "cfg"),
    ({"temperature": 0.0}, "temperature"), ({"top_k": -3}, "top_k"), ({"cfg_schedule": "cosine"}, "schedule"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SamplingParams(**kwargs)


def test_linear_and_var_schedules():
    assert SamplingParams(cfg=4, cfg_schedule="linear").guidance(0, 5) == 1.0
    assert SamplingParams(cfg=4, cfg_schedule="linear").guidance(4, 5) == 4.0
    assert SamplingParams(cfg=1.5, cfg_schedule="var").guidance(9, 10) == 2.5


def test_class_out_of_range_is_refused(tiny_gen):
    with pytest.raises(InvalidArgumentError, match="out of range"):
        GuidedRunner(tiny_gen, SamplingParams(), torch.tensor([7]))
