"""Continuous batching (varkit/samplers/slots.py): B slots over a queue of N images, each at its own step.

Two kinds of checks. *Same image*: an image's tokens under continuous batching (any capacity, any slot,
refilled mid-run) equal its tokens sampled alone at batch 1, greedy and sampled, fp32. Tokens are discrete:
they can only differ if a float difference between batched and unbatched kernels (fp32 sums in another
order: relative ~1e-6 on these logits) moves a probability across the uniform it is compared with, which
for the ~10^3 decisions here has a probability of order 10^-3 · 10^-6 on any x86-64 CPU: exact equality
is the right assertion. *Same law*: χ² of 20k sequences against the toy model's enumerated joint
(tests/stats_helpers.py, the harness of test_sjd / test_speculative), sampled with slots refilled
throughout; p > 0.01 (a statistical threshold, not a numeric tolerance).
"""
import pytest
import torch
from conftest import randomize
from stats_helpers import CFG, N_SAMPLES, NOCFG, gof_pvalue, seeded_generators

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator
from varkit.pipeline import Pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.samplers.sjd import SJDSampler
from varkit.samplers.slots import Slots
from varkit.samplers.speculative import SpeculativeSampler
from varkit.tokenizers import VQConfig, VQTokenizer

LABELS = torch.tensor([3, 1, 0, 2, 1, 3, 0, 2, 1, 1, 0])
SAMPLED = SamplingParams(cfg=2.0, temperature=0.7)
GREEDY = SamplingParams(cfg=3.0, top_k=1)


@pytest.fixture(scope="module")
def gen():
    return randomize(create_model("raster-tiny"))


@pytest.fixture(scope="module")
def draft():
    return randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)


@pytest.fixture(scope="module")
def nar():
    small = {"multiple_of": 16, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0, "n_head": 2}
    return randomize(NeighborsGenerator(NeighborsConfig(vocab_size=16, num_classes=4, dim=32, n_layer=2, grid=4,
                                                        **small)), std=0.3, seed=2)


def alone(make, gen, labels, seed=7):
    """Each image sampled on its own (batch 1)."""
    gens = image_generators(seed, len(labels))
    return torch.stack([make().sample(gen, labels[i:i + 1], [gens[i]]).tokens[0] for i in range(len(labels))])


def sjd(params, **kw):
    return lambda: SJDSampler(params, **kw)


# -- the same image whatever the capacity and the slot ----------------------------------------------------
@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_sjd_same_image_as_alone(gen, params):
    make = sjd(params, window=5)
    ref = alone(make, gen, LABELS)
    for cap in (1, 3, 8, 64):
        res = make().sample(gen, LABELS, image_generators(7, len(LABELS)), max_batch=cap)
        assert torch.equal(res.tokens, ref), cap
    lock = make().sample(gen, LABELS, image_generators(7, len(LABELS)))  # lockstep (no max_batch): the same too
    assert torch.equal(lock.tokens, ref)


@pytest.mark.parametrize("params", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_speculative_same_image_as_alone(gen, draft, params):
    def make():
        return SpeculativeSampler(params, draft=draft, gamma=3)

    ref = alone(make, gen, LABELS)
    for cap in (1, 4, 64):
        assert torch.equal(make().sample(gen, LABELS, image_generators(7, len(LABELS)), max_batch=cap).tokens, ref)


def test_sjd_on_nar_fronts_same_image(nar):
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 0])
    make = sjd(SAMPLED, window=6, init="sample_horizon")
    ref = alone(make, nar, labels)
    for cap in (2, 5):
        assert torch.equal(make().sample(nar, labels, image_generators(7, len(labels)), max_batch=cap).tokens, ref)


def test_greedy_continuous_equals_ancestral(gen):
    ref = get_sampler("ancestral", GREEDY).sample(gen, LABELS, image_generators(0, len(LABELS))).tokens
    assert torch.equal(SJDSampler(GREEDY, window=4).sample(gen, LABELS, image_generators(0, len(LABELS)),
                                                           max_batch=3).tokens, ref)


# -- the same law ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sjd_continuous_is_exact(toy):
    labels = torch.arange(N_SAMPLES) % 2
    res = SJDSampler(CFG, window=2).sample(toy, labels, seeded_generators(31, N_SAMPLES), max_batch=256)  # slots refilled ~80 times each
    assert gof_pvalue(toy, res.tokens, labels, CFG) > 0.01
    assert sum(res.stats.accepted_per_pass) == pytest.approx(toy.layout.num_tokens)  # integer counts: exact


@pytest.mark.slow
def test_speculative_continuous_is_exact(toy):
    from conftest import toy_model

    labels = torch.arange(N_SAMPLES) % 2
    smp = SpeculativeSampler(NOCFG, draft=toy_model(7), gamma=2)
    res = smp.sample(toy, labels, seeded_generators(32, N_SAMPLES), max_batch=256)  # slots refilled ~80 times each
    assert gof_pvalue(toy, res.tokens, labels, NOCFG) > 0.01


# -- stats -------------------------------------------------------------------------------------------------
def test_passes_per_image(gen):
    make = sjd(SAMPLED, window=5)
    gens = image_generators(7, len(LABELS))
    own = [make().sample(gen, LABELS[i:i + 1], [gens[i]]).stats.forward_passes for i in range(len(LABELS))]
    res = make().sample(gen, LABELS, image_generators(7, len(LABELS)), max_batch=4)
    assert res.stats.passes_per_image == own  # an image's passes do not depend on its neighbours
    assert res.stats.rounds >= max(own) and res.stats.rounds * 4 >= sum(own)
    lock = make().sample(gen, LABELS[:4], image_generators(7, 4))  # lockstep: every image takes every pass
    assert lock.stats.passes_per_image == [lock.stats.forward_passes] * 4 and lock.stats.rounds == 0
    merged = lock.stats.merge(res.stats)
    assert merged.passes_per_image == lock.stats.passes_per_image + res.stats.passes_per_image


def test_slots_queue():
    s = Slots(5, 2)
    slots, images = s.refill()
    assert slots.tolist() == [0, 1] and images == [0, 1]
    s.count_round()
    s.release(torch.tensor([1]))
    slots, images = s.refill()
    assert slots.tolist() == [1] and images == [2]
    s.count_round()
    assert s.passes.tolist() == [2, 1, 1, 0, 0] and s.refill()[1] == []


def test_other_samplers_take_max_batch_images_at_a_time(gen):
    """Samplers without slots (ancestral) and generators without per-row steps sample max_batch at a time."""
    anc = get_sampler("ancestral", SAMPLED)
    full = anc.sample(gen, LABELS, image_generators(3, len(LABELS)))
    chunked = anc.sample(gen, LABELS, image_generators(3, len(LABELS)), max_batch=4)
    assert torch.equal(full.tokens, chunked.tokens) and len(chunked.stats.passes_per_image) == len(LABELS)


def test_pipeline_batch_size_uses_slots(tmp_path):
    tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                               codebook_dim=4, norm_groups=4)).eval()
    pipe = Pipeline(tok, randomize(create_model("raster-tiny")), {"cfg": 1.5}, name="tiny")
    a = pipe(LABELS.tolist(), sampler="sjd", seed=4, output_type="pt")
    b = pipe(LABELS.tolist(), sampler="sjd", seed=4, batch_size=3, output_type="pt")
    assert torch.equal(a.tokens, b.tokens) and b.stats.rounds > 0 and len(b.images) == len(LABELS)
    from varkit.eval.fid import _continuous

    assert _continuous(pipe, {"sampler": "sjd"}) and not _continuous(pipe, {"sampler": "ancestral"})


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_max_batch(gen, bad):
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        SJDSampler(SAMPLED).sample(gen, LABELS, image_generators(0, len(LABELS)), max_batch=bad)
