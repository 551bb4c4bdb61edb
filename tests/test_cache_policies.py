"""KV-cache budgets (varkit.cache_policies): ScaleKV and HACK on next-scale generators.

Budget 1.0 must be the plain path; below it the cache must never hold more than its budget (at any moment,
not only between steps); bad input gets one clear line.
"""
from __future__ import annotations

import pytest
import torch

from varkit.cache_policies import (
    CACHE_POLICIES,
    BudgetedKVCache,
    coverage_fill,
    fit_in_order,
    make_cache_policy,
    water_fill,
)
from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.base import GuidedRunner
from varkit.samplers.random import image_generators
from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

from conftest import randomize

PATCH_NUMS = (1, 2, 3, 4, 6)
PARAMS = SamplingParams(cfg=1.5, cfg_schedule="var")
COND = torch.tensor([0, 3, 1])


def var_model(dtype=torch.float32, seed: int = 0, **kw):
    """A random 3-layer, 4-head VAR over 5 scales (66 tokens) and its tokenizer."""
    tok = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                           patch_nums=PATCH_NUMS, norm_num_groups=4)).eval()
    cfg = dict(depth=3, dim=32, n_head=4, patch_nums=PATCH_NUMS) | kw
    gen = randomize(create_model("var-tiny", **cfg), std=0.3, seed=seed).to(dtype)
    gen.bind_tokenizer(tok)
    return tok, gen


@pytest.fixture(scope="module")
def var32():
    return var_model()


def sample(gen, policy=None, cond=COND, params=PARAMS):
    return get_sampler("ancestral", params, cache_policy=policy).sample(gen, cond, image_generators(0, len(cond)))


# -- budget 1.0 is the plain path ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["scalekv:1.0", "hack:1"])
def test_full_budget_is_the_plain_path(var32, policy):
    # nothing is evicted: the same SDPA kernel sees the same keys and values in the same shapes (the cache's joined
    # tensors instead of the plain cache's buffer views; strides do not change its arithmetic), so equal bits
    _, gen = var32
    plain, budgeted = sample(gen), sample(gen, policy)
    assert torch.equal(plain.tokens, budgeted.tokens)
    assert budgeted.stats.cache_bytes == plain.stats.cache_bytes  # nothing evicted: the full prefix, once


def test_full_budget_on_flowar_is_the_plain_path():
    gen = randomize(create_model("flowar-tiny"), std=0.2).to(torch.float64)  # fp64: as above
    params = SamplingParams(cfg=2.0, head_steps=3)
    cond = torch.tensor([1, 2])
    plain = get_sampler("ancestral", params).sample(gen, cond, image_generators(0, 2))
    budgeted = get_sampler("ancestral", params, cache_policy="scalekv:1").sample(gen, cond, image_generators(0, 2))
    # continuous tokens through the same arithmetic in fp64 (the attention's summation order may differ): 1e-9
    torch.testing.assert_close(budgeted.tokens, plain.tokens, rtol=1e-9, atol=1e-9)


# -- budgets hold -----------------------------------------------------------------------------------------
VARIANTS = [(name, {}) for name in sorted(CACHE_POLICIES)] + [
    ("scalekv", {"allocation": "drafters"}), ("hack", {"structural": "score"})]


@pytest.mark.parametrize("name, options", VARIANTS)
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_policies_never_exceed_their_budget(var32, name, options, budget):
    _, gen = var32
    policy = make_cache_policy(f"{name}:{budget}", **options)
    rows = 2 * len(COND)  # CFG doubles the batch
    run = GuidedRunner(gen, PARAMS, COND, cache_policy=policy)
    cache = run.cache
    assert isinstance(cache, BudgetedKVCache)
    plan, (layers, heads, _) = cache.plan, gen.cache_dims()
    res = get_sampler("ancestral", PARAMS, cache_policy=policy).sample(gen, COND, image_generators(0, len(COND)))
    full = gen.new_cache(rows).nbytes
    assert res.stats.cache_bytes <= budget * full  # the peak over every moment of decoding (held_peak)
    # the plan itself: after every step, the kept keys fit the capacity and never exceed what exists
    lay = gen.layout
    for s in range(lay.num_steps):
        kept = sum(len(g) * b for l in range(layers) for g, b in zip(plan.groups[l], plan.budgets[s][l]))
        assert kept <= plan.capacity
        assert all(b <= lay.step_starts[s + 1] for l in range(layers) for b in plan.budgets[s][l])
    assert plan.capacity <= budget * layers * heads * lay.num_tokens


def test_kept_keys_follow_the_plan(var32):
    _, gen = var32
    policy = make_cache_policy("hack:0.2")
    run = GuidedRunner(gen, PARAMS, COND, cache_policy=policy)
    lay, cache = gen.layout, run.cache
    tokens = torch.zeros(len(COND), lay.num_tokens, dtype=torch.long)
    run.prefill()
    for s in range(1, lay.num_steps):
        run.forward(lay.read(tokens, s - 1), s)
        want = torch.zeros(gen.cache_dims()[0], gen.cache_dims()[1], dtype=torch.long)
        for l, (gs, bs) in enumerate(zip(cache.plan.groups, cache.plan.budgets[s])):
            for g, b in zip(gs, bs):
                want[l, g] = b
        assert torch.equal(cache.kept(), want)
        assert cache.held <= cache.plan.capacity * 2 * gen.cache_dims()[2] * 4 * cache.batch
    assert cache.evicted and cache.transient_bytes > cache.held


def test_hack_splits_heads_and_scalekv_layers(var32):
    _, gen = var32
    h = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("hack:0.2")).cache.plan
    kinds = {k for ks in h.kinds for k in ks}
    assert kinds == {"score", "recent"}  # half the heads each way: both kinds exist
    assert sum(len(g) for gs in h.groups for g in gs) == 3 * 4
    by_kind = {"score": [], "recent": []}  # structural ("recent") heads get the larger budgets
    for ks, bs in zip(h.kinds, h.budgets[-1]):
        for k, b in zip(ks, bs):
            by_kind[k].append(b)
    assert min(by_kind["recent"]) > max(by_kind["score"])
    s = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.2", allocation="drafters")).cache.plan
    assert all(len(gs) == 1 for gs in s.groups)
    last = [b[0] for b in s.budgets[-1]]
    assert max(last) > min(last)  # a drafter layer keeps more than the refiners
    score = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("hack:0.2", structural="score")).cache.plan
    assert {k for ks in score.kinds for k in ks} == {"score"}


def test_scalekv_coverage_budgets_keep_the_most_calibrated_attention(var32):
    # the coverage plan spends the capacity where the calibration's sorted attention is largest: no other split of
    # the same total keeps more of it (checked against every drafters plan's split at the same step)
    from varkit.cache_policies import calibrate

    _, gen = var32
    cov = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.2")).cache.plan
    dra = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.2", allocation="drafters")).cache.plan
    calib = calibrate(gen, PARAMS)
    layers, heads, _ = gen.cache_dims()
    lay = gen.layout
    for s in range(lay.num_steps):
        if layers * heads * lay.step_starts[s + 1] <= cov.capacity:
            continue
        curves = [p.mean(0).double() for p in calib.profile[s]]
        b = coverage_fill(curves, heads, lay.step_starts[s + 1], cov.capacity)
        kept = sum(float(c[:n].sum()) for c, n in zip(curves, b))
        other = sum(float(c[:x[0]].sum()) for c, x in zip(curves, dra.budgets[s]))
        assert kept >= other - 1e-12  # fp64 sums of at most 66 terms <= 1: far below 1e-12 apart when equal
        assert heads * sum(b) <= cov.capacity


def test_observation_window_is_spread_over_the_map(var32):
    _, gen = var32
    cache = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.5")).cache
    rows = lambda idx, w: sorted({int(i) // w for i in idx})  # noqa: E731
    cache.layout = type("L", (), {"scale_sizes": [(6, 6), (8, 8), (64, 64), (3, 3)]})()
    assert rows(cache._window(0), 6) == [0, 1, 3, 4]  # the official grid would take rows 0-3 (a corner)
    assert rows(cache._window(1), 8) == [0, 2, 4, 6]  # divisible sides: the official patch centres
    assert rows(cache._window(2), 64) == [7, 23, 39, 55]
    assert len(cache._window(3)) == 9  # a map no larger than the window: all of it


def test_window_kept_first_only_where_it_leaves_room(var32):
    _, gen = var32
    cache = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.5")).cache
    total = 40
    probs = torch.linspace(1, 0, total).expand(1, 1, 4, total).contiguous()  # earlier keys more attended
    window = torch.arange(total - 4, total)  # the window's own keys: the least attended
    small = cache._select("score", probs, window, budget=7)  # 7 < 2 x 4: scored like the rest
    assert small.tolist() == [[list(range(7))]]
    large = cache._select("score", probs, window, budget=8)  # 8 >= 2 x 4: the window first
    assert large.tolist() == [[list(range(4)) + list(range(36, 40))]]


def test_budgeted_pipeline_on_digits_var():
    from varkit.pipeline import load_pipeline

    pipe = load_pipeline("digits-var")
    plain = pipe([1, 7], seed=0)
    out = pipe([1, 7], seed=0, cache_policy="scalekv:0.3")
    assert out.stats.cache_bytes <= 0.3 * plain.stats.cache_bytes
    assert len(out.images) == 2


# -- the helpers --------------------------------------------------------------------------------------------
def test_water_fill_and_in_order_fit():
    assert water_fill([2, 2], [1.0, 3.0], cap=10, capacity=100) == [10, 10]  # everything fits
    b = water_fill([2, 2], [1.0, 3.0], cap=10, capacity=16)
    assert b == [2, 6] and 2 * sum(b) <= 16
    assert water_fill([1, 1], [1.0, 4.0], cap=5, capacity=7) == [2, 5]  # the capped unit leaves room to the other
    # growth of an early unit must wait for a later one's shrinking: every prefix fits
    assert fit_in_order([1, 1], old=[2, 6], new=[6, 2], capacity=8) == [2, 2]
    assert fit_in_order([1, 1], old=[6, 2], new=[2, 6], capacity=8) == [2, 6]
    # coverage: the 5 largest marginal gains of the two curves (3 heads each, capacity 15 or 16: 5 keys)
    curves = [torch.tensor([0.5, 0.2, 0.1, 0.05]), torch.tensor([0.3, 0.25, 0.2, 0.15])]
    assert coverage_fill(curves, count=3, cap=4, capacity=16) == [2, 3]  # 0.5 0.3 0.25 0.2 0.2
    assert coverage_fill(curves, count=3, cap=4, capacity=12) == [2, 2]  # 0.5 0.3 0.25, then the tie at 0.2: unit 0
    assert coverage_fill(curves, count=3, cap=2, capacity=30) == [2, 2]  # capped at what exists
    assert coverage_fill(curves, count=3, cap=4, capacity=2) == [0, 0]


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, msg", [
    ("scalekv:0", r"in \(0, 1\]"),
    ("scalekv:1.5", r"in \(0, 1\]"),
    ("hack:-0.1", r"in \(0, 1\]"),
    ("hack:half", "not a number"),
    ("scalekv", "NAME:BUDGET"),
    ("lru:0.5", "unknown cache policy 'lru'; known: hack, scalekv"),
    (0.5, "NAME:BUDGET"),
])
def test_bad_policy_spec(spec, msg):
    with pytest.raises(InvalidArgumentError, match=msg):
        make_cache_policy(spec)


def test_bad_policy_options():
    with pytest.raises(InvalidArgumentError, match="does not take option"):
        make_cache_policy("scalekv:0.5", colour="red")
    with pytest.raises(InvalidArgumentError, match="odd kernel"):
        make_cache_policy("scalekv:0.5", pool=2)
    with pytest.raises(InvalidArgumentError, match="contextual_share"):
        make_cache_policy("hack:0.5", contextual_share=2)
    with pytest.raises(InvalidArgumentError, match="scalekv allocation must be one of coverage, drafters, got 'even'"):
        make_cache_policy("scalekv:0.5", allocation="even")
    with pytest.raises(InvalidArgumentError, match="structural .* must be recent or score, got 'diagonal'"):
        make_cache_policy("hack:0.5", structural="diagonal")


def test_policy_on_a_generator_without_scales_refused():
    raster = randomize(create_model("raster-tiny"))
    with pytest.raises(InvalidArgumentError, match="needs a next-scale generator .*raster layout"):
        sample(raster, "scalekv:0.5", cond=torch.tensor([0]))
    mar = randomize(create_model("mar-tiny"), std=0.05)
    with pytest.raises(InvalidArgumentError, match="needs a next-scale generator .*sets layout"):
        get_sampler("ancestral", SamplingParams(), cache_policy="hack:0.5").sample(mar, torch.tensor([0]), image_generators(0, 1))


def test_policy_on_a_sampler_without_it_refused(var32):
    tok, gen = var32
    with pytest.raises(InvalidArgumentError, match=r"sampler 'sjd' does not take option\(s\) \['cache_policy'\]"):
        Pipeline(tok, gen)([0], sampler="sjd", cache_policy="scalekv:0.5")


def test_budgeted_cache_refuses_direct_writes_and_rollback(var32):
    _, gen = var32
    cache = GuidedRunner(gen, PARAMS, COND, cache_policy=make_cache_policy("scalekv:0.5")).cache
    k = torch.zeros(6, 4, 1, 8)
    with pytest.raises(InvalidArgumentError, match="budgets need varkit.nn.Attention"):
        cache.update(0, k, k)
    with pytest.raises(InvalidArgumentError, match="cannot roll back"):
        cache.truncate(0)


# -- the bench's oracle (varkit bench var-accel: what key selection can reach at a budget) -------------------
def test_oracle_records_the_plain_path_and_keeps_its_budget(var32):
    from varkit.bench.var_accel import future_attention, oracle_policy

    _, gen = var32
    full = oracle_policy(1.0)
    rec = sample(gen, full)
    assert torch.equal(rec.tokens, sample(gen).tokens)  # budget 1.0: nothing evicted, the same SDPA: equal bits
    layers, heads, _ = gen.cache_dims()
    lay = gen.layout
    assert set(full.log) == {(s, l) for s in range(lay.num_steps) for l in range(layers)}
    oracle = oracle_policy(0.2)
    oracle.future = future_attention(full.log, lay.num_steps, layers, lay.num_tokens)
    res = sample(gen, oracle)
    assert res.stats.cache_bytes <= 0.2 * gen.new_cache(2 * len(COND)).nbytes


def test_future_attention_sums_later_steps():
    log = {(0, 0): torch.tensor([[[1.0]]]), (1, 0): torch.tensor([[[2.0, 3.0]]]), (2, 0): torch.tensor([[[4.0, 5.0, 6.0]]])}
    fut = future_attention_of(log)
    assert fut[0, 0].tolist() == [[[6.0, 8.0, 6.0]]]  # steps 1 and 2, padded to every position
    assert fut[1, 0].tolist() == [[[4.0, 5.0, 6.0]]]
    assert fut[2, 0].tolist() == [[[0.0, 0.0, 0.0]]]  # nothing after the last step


def future_attention_of(log):
    from varkit.bench.var_accel import future_attention

    return future_attention(log, steps=3, layers=1, tokens=3)
