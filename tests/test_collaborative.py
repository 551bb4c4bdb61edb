"""Collaborative decoding (CoDe): a drafter's first scales, a refiner's last ones.

A refiner identical to the drafter must reproduce ancestral sampling image for image (its one-pass prefill of
the drafted scales is the same computation as feeding them one at a time); the stats count each model; bad
input gets one clear line.
"""
from __future__ import annotations

import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.collaborative import CollaborativeStats, default_draft_scales
from varkit.samplers.random import image_generators
from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

from conftest import randomize

PATCH_NUMS = (1, 2, 3, 4, 6)
PARAMS = SamplingParams(cfg=1.5, cfg_schedule="var", top_k=8)
COND = torch.tensor([0, 3, 1])


def msvq(seed: int = 0, patch_nums=PATCH_NUMS) -> MultiScaleVQTokenizer:
    torch.manual_seed(seed)
    return MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                            patch_nums=patch_nums, norm_num_groups=4)).eval()


def var(tok, seed: int, **kw):
    gen = randomize(create_model("var-tiny", **(dict(depth=2, dim=32, n_head=4, patch_nums=tok.config.patch_nums) | kw)),
                    std=0.3, seed=seed)
    gen.bind_tokenizer(tok)
    return gen


@pytest.fixture(scope="module")
def pair():
    """A tokenizer, a 3-layer drafter and a 1-layer refiner over it."""
    tok = msvq()
    return tok, var(tok, 0, depth=3), var(tok, 1, depth=1)


def collab(gen, refiner, k=None, cond=COND, params=PARAMS, **kw):
    return get_sampler("collaborative", params, refiner=refiner, k=k, **kw).sample(gen, cond, image_generators(0, len(cond)))


def ancestral(gen, cond=COND, params=PARAMS):
    return get_sampler("ancestral", params).sample(gen, cond, image_generators(0, len(cond)))


# -- the plain path ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_refiner_equal_to_drafter_is_ancestral(pair, k):
    # the refiner's one block-causal pass over the drafted scales and the drafter's scale-by-scale passes give the
    # same logits up to fp32 rounding (~1e-6 relative, other GEMM shapes); a sampled token changes only where its
    # uniform falls that close to a boundary of the top-8 CDF, which these few draws do not
    _, drafter, _ = pair
    want = ancestral(drafter)
    got = collab(drafter, drafter, k)
    assert torch.equal(got.tokens, want.tokens)
    assert got.stats.forward_passes == want.stats.forward_passes == len(PATCH_NUMS)


def test_prefill_steps_equals_feeding_the_scales(pair):
    tok, drafter, _ = pair
    lay = drafter.layout
    tokens = torch.randint(0, 16, (2, lay.num_tokens), generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1, 2])
    with torch.no_grad():
        cache = drafter.new_cache(2)
        out, state = drafter.prefill(cond, cache)
        for s in range(1, 4):
            out = drafter(tokens[:, lay.step_slice(s - 1)], s, cache, state)
        cache2 = drafter.new_cache(2)
        got, state2 = drafter.prefill_steps(cond, cache2, tokens[:, :lay.step_starts[3]], 3)
        # fp32 logits of a 3-layer VAR through other GEMM shapes (K <= 128): ~1e-6 on any CPU; 1e-4
        torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state2.f_hat, state.f_hat, rtol=1e-5, atol=1e-5)  # tokenizer-side sums: exact-ish
        assert cache2.length == cache.length == lay.step_starts[4]
        nxt = drafter(tokens[:, lay.step_slice(3)], 4, cache, state)
        torch.testing.assert_close(drafter(tokens[:, lay.step_slice(3)], 4, cache2, state2), nxt, rtol=1e-4, atol=1e-4)


def test_flowar_refiner_prefill_equals_feeding_the_scales():
    gen = randomize(create_model("flowar-tiny", patch_nums=(1, 2, 4, 8)), std=0.2)
    lay = gen.layout
    tokens = torch.randn(2, lay.num_tokens, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 3])
    with torch.no_grad():
        cache = gen.new_cache(2)
        out, state = gen.prefill(cond, cache)
        for s in range(1, 3):
            out = gen(tokens[:, lay.step_slice(s - 1)], s, cache, state)
        got, _ = gen.prefill_steps(cond, gen.new_cache(2), tokens[:, :lay.step_starts[2]], 2)
    # fp32 conditions of a 2-block FlowAR through other GEMM shapes: ~1e-6 on any CPU; 1e-4
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-4)


def test_flowar_collaborative_with_itself_is_ancestral():
    gen = randomize(create_model("flowar-tiny"), std=0.2).to(torch.float64)
    params = SamplingParams(cfg=2.0, head_steps=3)
    cond = torch.tensor([1, 2])
    want = get_sampler("ancestral", params).sample(gen, cond, image_generators(0, 2))
    got = get_sampler("collaborative", params, refiner=gen, k=1).sample(gen, cond, image_generators(0, 2))
    # continuous tokens, fp64: one block-causal pass vs one scale a call differ by summation order only (1e-15)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-9, atol=1e-9)


def test_without_prefill_steps_the_refiner_is_fed_scale_by_scale(pair, monkeypatch):
    _, drafter, _ = pair
    refiner = var(pair[0], 0, depth=3)  # the drafter's weights, another object
    monkeypatch.setattr(refiner, "prefill_steps", lambda *a, **k: None)
    got = collab(drafter, refiner, k=2)
    assert torch.equal(got.tokens, ancestral(drafter).tokens)  # as above: fp32 rounding only
    assert got.stats.drafter_passes == 2 and got.stats.refiner_passes == 1 + 2 + (len(PATCH_NUMS) - 3)


# -- stats and the real pair ----------------------------------------------------------------------------
def test_stats_count_each_model_and_the_drafters_short_cache(pair):
    _, drafter, refiner = pair
    res = collab(drafter, refiner, k=3)
    st = res.stats
    assert isinstance(st, CollaborativeStats)
    assert (st.drafter_passes, st.refiner_passes, st.forward_passes) == (3, 2, 5)
    rows = 2 * len(COND)
    assert st.drafter_cache_bytes == drafter.new_cache(rows, drafter.layout.step_starts[3]).nbytes
    assert st.refiner_cache_bytes == refiner.new_cache(rows).nbytes
    assert st.cache_bytes == max(st.drafter_cache_bytes, st.refiner_cache_bytes)
    assert default_draft_scales(10) == 8 and default_draft_scales(6) == 4 and default_draft_scales(2) == 1
    assert collab(drafter, refiner).stats.drafter_passes == len(PATCH_NUMS) - 2


def test_pipeline_batches_merge_stats_and_cache_policy_composes(pair):
    tok, drafter, refiner = pair
    pipe = Pipeline(tok, drafter, {"cfg": 1.5, "cfg_schedule": "var"})
    out = pipe([0, 1, 2], sampler="collaborative", refiner=Pipeline(tok, refiner), k=2, batch_size=2)
    assert isinstance(out.stats, CollaborativeStats)
    assert (out.stats.drafter_passes, out.stats.refiner_passes) == (4, 6)  # two batches
    plain = pipe([0, 1, 2], sampler="collaborative", refiner=refiner, k=2)
    assert torch.equal(plain.tokens, out.tokens)  # the same images whatever the batch size
    small = pipe([0, 1, 2], sampler="collaborative", refiner=refiner, k=2, cache_policy="scalekv:0.2")
    assert small.stats.refiner_cache_bytes <= 0.2 * plain.stats.refiner_cache_bytes


@pytest.mark.parametrize("name", ["digits-var-refiner", "digits-var-refiner-d1"])
def test_bundled_refiner_makes_digits(name):
    import varkit
    from varkit.eval.digits import digits_accuracy
    from varkit.pipeline import load_pipeline

    from varkit.pipeline import ASSETS

    assert name in varkit.bundled_models()
    cmd = (ASSETS / name / "generator" / "COMMAND.txt").read_text()
    assert cmd.startswith("varkit train generator") and f"--config {name} " in cmd  # made by varkit's commands
    pipe = load_pipeline("digits-var")
    labels = list(range(10))
    out = pipe(labels, seed=0, sampler="collaborative", refiner=name)  # the default k: 4 of 6 scales
    assert out.stats.drafter_passes == 4 and out.stats.refiner_passes == 2
    assert digits_accuracy(out.images, labels) >= 0.8


def test_bench_maps_codes_k_and_measures_psnr():
    from PIL import Image

    from varkit.bench.var_accel import VAR_SCALES, code_scales, psnr

    assert code_scales(VAR_SCALES, [6, 8, 9]) == [6, 8, 9]
    assert code_scales((1, 2, 3, 4, 6, 8), [6, 8, 9]) == [3, 4, 5]  # by drafted token share, distinct, in order
    a = Image.new("L", (4, 4), 100)
    b = Image.new("L", (4, 4), 110)  # MSE 100: 10·log10(255²/100) = 28.13 dB
    assert psnr([a], [a]) == 100.0 and abs(psnr([a], [b]) - 28.13) < 0.01


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_k_refused(pair):
    _, drafter, refiner = pair
    for k in (0, len(PATCH_NUMS), -1):
        with pytest.raises(InvalidArgumentError, match=r"k \(scales the drafter makes\) must be in 1..4 for these 5 scales"):
            collab(drafter, refiner, k)
    with pytest.raises(InvalidArgumentError, match="must be an integer"):
        collab(drafter, refiner, 2.5)
    with pytest.raises(InvalidArgumentError, match="k and draft_scales name the same setting"):
        collab(drafter, refiner, 2, draft_scales=3)
    with pytest.raises(InvalidArgumentError, match="needs a refiner"):
        get_sampler("collaborative", PARAMS)


def test_different_scale_schedules_refused(pair):
    _, drafter, _ = pair
    tok2 = msvq(patch_nums=(1, 2, 4, 6, 8))
    with pytest.raises(InvalidArgumentError, match=r"different scale schedules \(\[1, 2, 3, 4, 6\] vs \[1, 2, 4, 6, 8\]\)"):
        collab(drafter, var(tok2, 1))


def test_different_tokenizers_refused(pair):
    tok, drafter, refiner = pair
    other = msvq(seed=1)  # same architecture, other weights
    pipe = Pipeline(tok, drafter, {"cfg": 1.5})
    with pytest.raises(InvalidArgumentError, match="different tokenizers"):
        pipe([0], sampler="collaborative", refiner=Pipeline(other, var(other, 1, depth=1)))
    with pytest.raises(InvalidArgumentError, match="different tokens"):
        collab(drafter, _other_vocab(tok))


def _other_vocab(tok):
    tok32 = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=32,
                                             patch_nums=PATCH_NUMS, norm_num_groups=4)).eval()
    return var(tok32, 1, depth=1, vocab_size=32)


def test_non_scales_generators_refused(pair):
    _, drafter, _ = pair
    raster = randomize(create_model("raster-tiny"))
    with pytest.raises(InvalidArgumentError, match="the refiner RasterGenerator decodes a raster layout"):
        collab(drafter, raster)
    with pytest.raises(InvalidArgumentError, match="the drafter RasterGenerator decodes a raster layout"):
        collab(raster, drafter, cond=torch.tensor([0]))


def test_bench_large_drafter_is_a_random_var_in_its_dtype():
    from varkit.bench.var_accel import random_generator
    from varkit.errors import InvalidArgumentError

    gen = random_generator("var-tiny", torch.bfloat16, seed=0)
    assert {p.dtype for p in gen.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in gen.parameters())
    assert float(gen.blocks[0].attn.wo.weight.float().std()) > 0.01  # N(0, 0.02) matrices, not zeros
    with pytest.raises(InvalidArgumentError, match="--large-drafter must be a VAR config .*'raster-tiny'"):
        random_generator("raster-tiny", torch.bfloat16, seed=0)


def test_bench_var_accel_rows_carry_floors(tmp_path):
    """Every timed row of ``varkit bench var-accel`` has the floor of its own calls, replayed with the same draws:
    the drafter's passes and the refiner's (one ``prefill_steps`` pass, then its own scales) both counted."""
    import json

    from varkit.cli import main

    assert main(["bench", "var-accel", "--skip-large", "--images", "4", "--batch", "4", "--repeats", "1",
                 "--oracle-budgets", "--budgets", "0.5", "--out-dir", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "var_accel.json").read_text())["rows"]}
    code = [r for k, r in rows.items() if k.startswith("code-k")]
    assert code and all(r["refiner_passes"] > 0 for r in code)
    for k, r in rows.items():
        if r["s_per_image"] is None:  # untimed (plain-bf16): no floor
            assert "floor_s" not in r, k
            continue
        assert r["floor_passes"] == r["forward_passes"], (k, r)  # one call of 4 images
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
