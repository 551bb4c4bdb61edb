"""CSpD on slots (continuous batching) and MAR's per-row steps (``MARGenerator.forward_rows``).

*Same image*: an image's latents under continuous batching (capacity 1, 3, 8: slots refilled mid-run) and in
a lockstep batch equal the image sampled alone. The models run in fp64: what differs between a batch and a
lone image is only the shape of the batched kernels (GEMM blocking, padded prefixes masked out of attention),
which moves fp64 results by a few ulp (~1e-15 relative); the diffusion head's chain multiplies that by at most
~1e3, and an acceptance decision flips only if its uniform falls within ~1e-12 of the ratio (probability
~1e-10 over the few hundred decisions here). So 1e-9 absolute on O(0.1) latents holds on any x86-64 CPU (AVX2
or AVX-512/AMX kernels alike), while any real difference (another draw, another prefix) is O(0.01) or more.
*Same law*: 20k samples with slots refilled throughout against the target alone (KS, as tests/test_cspd.py).
"""
from __future__ import annotations

import pytest
import torch
from test_cspd import ALPHA, N_SAMPLES, PARAMS, FastRandomness, min_ks_pvalue, pair, target_alone

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.samplers.cspd import CSpDSampler
from varkit.samplers.random import image_generators

LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2])
ATOL = 1e-9  # fp64; see the module docstring


@pytest.fixture(scope="module", params=["mar-tiny", "raster-tiny"])
def models(request):
    target, draft = pair(request.param, grid=3, **({"num_iter": 5} if request.param == "mar-tiny" else {}))
    return target.double(), draft.double()


def make(draft, **kw):
    return CSpDSampler(PARAMS, draft=draft, **{"gamma": 2, "prefill": 0.2, **kw})


def alone(smp, target, labels, seed=7):
    gens = image_generators(seed, len(labels))
    runs = [smp.sample(target, labels[i:i + 1], gens[i:i + 1]) for i in range(len(labels))]
    return torch.stack([r.tokens[0] for r in runs]), [r.stats.forward_passes for r in runs]


# -- the same image whatever the capacity ----------------------------------------------------------------------
def test_same_image_at_any_capacity(models):
    target, draft = models
    smp = make(draft)
    ref, own = alone(smp, target, LABELS)
    for cap in (1, 3, 8):
        res = smp.sample(target, LABELS, image_generators(7, len(LABELS)), max_batch=cap)
        torch.testing.assert_close(res.tokens, ref, rtol=0, atol=ATOL, msg=f"capacity {cap}")
        assert res.stats.passes_per_image == own  # an image's passes do not depend on its neighbours
        assert res.stats.rounds >= max(own) - 1 and sum(res.stats.accepted_per_pass) == pytest.approx(9)
    lock = smp.sample(target, LABELS, image_generators(7, len(LABELS)))  # lockstep: the same images too
    torch.testing.assert_close(lock.tokens, ref, rtol=0, atol=ATOL)
    assert lock.stats.passes_per_image == [lock.stats.forward_passes] * len(LABELS) and lock.stats.rounds == 0
    assert lock.stats.forward_passes >= max(own)


def test_capacity_one_is_the_lone_computation():
    """At capacity 1 a MAR slot runs exactly the lone image's prefixes (one per step, no padding): bit-equal."""
    target, draft = pair("mar-tiny", grid=3, num_iter=5)
    smp = make(draft, gamma=3, prefill=0.0)
    ref, _ = alone(smp, target, LABELS[:4], seed=3)
    assert torch.equal(smp.sample(target, LABELS[:4], image_generators(3, 4), max_batch=1).tokens, ref)


def test_continuous_counts_and_trace(models):
    """Every iteration over the slots makes an admission call, a round call, or both; each held image counts
    one pass per iteration; the trace agrees with the stats."""
    target, draft = models
    smp = make(draft)
    res = smp.sample(target, LABELS, image_generators(1, len(LABELS)), max_batch=3)
    st, tr = res.stats, smp.trace
    assert st.rounds <= st.forward_passes <= 2 * st.rounds
    assert sum(st.passes_per_image) <= 3 * st.rounds and min(st.passes_per_image) >= 2
    assert tr["target_passes"] == st.forward_passes and st.draft_passes == tr["draft_passes"] > 0
    assert sum(tr["steps_accepted"]) <= sum(tr["steps_verified"]) and tr["prefill_steps"] == 2


# -- the same law --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_continuous_cspd_matches_the_target_alone():
    """20k MAR samples with 256 slots refilled throughout (each slot ~80 images), γ = 2 over 4 steps, CFG linear,
    one residual proposal up front (the exact fallback runs too): no KS test rejects at family-wise 1e-3."""
    target, draft = pair("mar-tiny")
    cond = torch.arange(N_SAMPLES) % 4
    ref = target_alone(target, PARAMS, cond, FastRandomness(N_SAMPLES, 1))
    smp = CSpDSampler(PARAMS, draft=draft, gamma=2, prefill=0.0, residual_tries=1)
    res = smp.sample(target, cond, FastRandomness(N_SAMPLES, 2), max_batch=256)
    assert res.stats.rounds > 50 * 3 and smp.trace["fallback_rounds"] > 0
    acc = sum(smp.trace["tokens_accepted"]) / sum(smp.trace["tokens_verified"])
    assert 0.3 < acc < 0.7
    p, n = min_ks_pvalue(res.tokens, ref)
    assert p > ALPHA / n, f"continuous CSpD differs from the target alone: min KS p-value {p:.2e} over {n} tests"


# -- merged window, pipeline choice, bad input ---------------------------------------------------------------------
def test_merged_window_takes_max_batch_images_at_a_time():
    target, draft = pair("mar-tiny", grid=3, num_iter=5)
    target, draft = target.double(), draft.double()
    smp = make(draft, merged_window=True)
    assert not smp.continuous_for(target) and make(draft).continuous_for(target)
    full = smp.sample(target, LABELS, image_generators(5, len(LABELS)))
    chunked = smp.sample(target, LABELS, image_generators(5, len(LABELS)), max_batch=3)
    torch.testing.assert_close(chunked.tokens, full.tokens, rtol=0, atol=ATOL)
    assert chunked.stats.rounds == 0 and len(chunked.stats.passes_per_image) == len(LABELS)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "8", True])
def test_bad_max_batch(bad):
    target, draft = pair("mar-tiny")
    with pytest.raises(InvalidArgumentError, match="max_batch") as e:
        make(draft).sample(target, LABELS, image_generators(0, len(LABELS)), max_batch=bad)
    assert "\n" not in str(e.value)


# -- MAR's per-row steps -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mar():
    kw = dict(token_dim=2, grid=3, num_iter=5, head_steps=4, encoder_dim=8, encoder_depth=1, encoder_heads=1,
              decoder_dim=8, decoder_depth=1, decoder_heads=1, buffer_size=1, mlp_ratio=1.0)
    torch.manual_seed(0)
    return create_model("mar-tiny", **kw).eval().double()


def _setup(mar, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = mar.layout.num_tokens
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    cond = torch.arange(B) % 4
    grid_tokens = torch.randn(B, N, 2, generator=g, dtype=torch.float64)
    _, state = mar.prefill(cond, None, order=order)
    return order, cond, grid_tokens.gather(1, state.positions[..., None].expand(-1, -1, 2)), state


@torch.inference_mode()
def test_mar_rows_equal_the_lone_steps(mar):
    """Rows at steps 1, 2, 3 fed 5 tokens each: every valid output equals the same row decoded alone by forward
    (one prefix per step either way; fp64, batch of padded prefixes vs one row: a few ulp)."""
    lay, N = mar.layout, mar.layout.num_tokens
    order, cond, lt, state = _setup(mar)
    none = torch.zeros(3, dtype=torch.long)
    mar.forward_rows(lt, torch.ones(3, dtype=torch.long), None, state, wanted=(none, none))  # store every token
    steps, n = torch.tensor([1, 2, 3]), 5
    idx = (torch.tensor(lay.step_starts)[steps - 1, None] + torch.arange(n)).clamp(max=N - 1)
    out = mar.forward_rows(lt.gather(1, idx[..., None].expand(-1, -1, 2)), steps, None, state)
    valid = mar.valid_row_outputs(steps, n)
    for b in range(3):
        _, s1 = mar.prefill(cond[b:b + 1], None, order=order[b:b + 1])
        s, a = int(steps[b]), lay.step_starts[int(steps[b]) - 1]
        if s > 1:
            mar(lt[b:b + 1, :a], 1, None, s1)
        k = int(valid[b])
        fed = next(m for m in range(n, 0, -1) if a + m in lay.step_starts)  # whole steps within the n inputs
        ref = mar(lt[b:b + 1, a:a + fed], s, None, s1)[0]
        assert k >= 1
        torch.testing.assert_close(out[b, :k], ref[:k], rtol=0, atol=1e-12)


@torch.inference_mode()
def test_mar_rows_compute_only_what_is_wanted(mar):
    order, cond, lt, state = _setup(mar, seed=1)
    none = torch.zeros(3, dtype=torch.long)
    mar.forward_rows(lt, torch.ones(3, dtype=torch.long), None, state, wanted=(none, none))
    steps = torch.tensor([1, 2, 3])
    idx = (torch.tensor(mar.layout.step_starts)[steps - 1, None] + torch.arange(5)).clamp(max=8)
    toks = lt.gather(1, idx[..., None].expand(-1, -1, 2))
    full = mar.forward_rows(toks, steps, None, state)
    part = mar.forward_rows(toks, steps, None, state, wanted=(torch.tensor([1, 0, 2]), torch.tensor([2, 0, 3])))
    # sizes 1, 1, 2, 3, 2: row 0's column 1 is step 2 (columns 1-2), row 1 wants nothing, row 2's column 2 is step 3
    computed = (part != 0).any(-1)
    assert computed.tolist() == [[False, True, True, False, False], [False] * 5, [True, True, True, False, False]]
    # the same maths on fewer rows: BLAS may block the smaller GEMMs differently (AVX2 vs AVX-512 kernels), so
    # fp64 sums may reorder; values are O(1) through a few layers of width <= 64, so reordering moves them by
    # <= ~1e3 ulps (2e-13); 1e-12 still fails on any wrong row or step (those differ by O(1))
    torch.testing.assert_close(part[computed], full[computed], rtol=0, atol=1e-12)


def test_mar_state_copy_rows(mar):
    _, _, _, state = _setup(mar, B=3, seed=2)
    _, _, _, other = _setup(mar, B=1, seed=3)
    state.copy_rows(torch.tensor([1]), other)
    assert torch.equal(state.order[1], other.order[0]) and torch.equal(state.positions[1], other.positions[0])
    bad = mar.prefill(torch.tensor([0]), None, order=torch.randperm(9)[None], layout=mar.sampling_layout(3))[1]
    with pytest.raises(InvalidArgumentError, match="same layout"):
        state.copy_rows(torch.tensor([0]), bad)


@pytest.mark.parametrize("call,match", [
    (lambda m, s, t: m.forward_rows(t, torch.tensor([1, 1, 1]), None, None), "state prefill returned"),
    (lambda m, s, t: m.forward_rows(t, torch.tensor([0, 1, 1]), None, s), r"1\.\.4"),
    (lambda m, s, t: m.forward_rows(t, torch.tensor([1, 1, 5]), None, s), r"1\.\.4"),
    (lambda m, s, t: m.forward_rows(t, torch.tensor([1.0, 1.0, 1.0]), None, s), "integer tensor"),
    (lambda m, s, t: m.forward_rows(t[:2], torch.tensor([1, 1]), None, s), "B = 3"),
    (lambda m, s, t: m.forward_rows(t[..., :1], torch.tensor([1, 1, 1]), None, s), "tokens"),
])
def test_mar_rows_bad_input_is_one_line(mar, call, match):
    _, _, lt, state = _setup(mar)
    with pytest.raises(InvalidArgumentError, match=match) as e:
        call(mar, state, lt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags", [["--continuous-batch", "0"], ["--continuous-images", "-1"]])
def test_bench_continuous_flags_one_line(flags, capsys, tmp_path):
    from varkit.cli import main

    assert main(["bench", "cspd", "--continuous-only", "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "--continuous-batch" in err and "\n" not in err and not list(tmp_path.iterdir())


def test_bench_cspd_rows_carry_floors(tmp_path):
    """Every timed row of ``varkit bench cspd`` has the floor of its own calls, replayed with the same draws: the
    target's and the drafter's passes and every call of their diffusion heads' networks."""
    import json

    from varkit.cli import main

    assert main(["bench", "cspd", "--skip-large", "--skip-quality", "--images", "1", "--continuous-images", "0",
                 "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cspd.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert {"target alone", "cspd exact"} <= set(rows) and data["floor"]["peak_gemm_flops"]
    for r in rows.values():
        # more passes than the transformers' alone: each head network call is one
        assert r["floor_passes"] > r["images"] * (r["target_passes"] + r["draft_passes"]), r
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
        assert r["floor_flops"] > 0 and r["floor_weight_bytes"] > 0
