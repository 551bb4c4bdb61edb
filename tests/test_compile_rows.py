"""Compiled per-row steps: NAR's fronts (padded to the widest) and fixed-width ``forward_rows`` windows (the
speculative verify step) through one graph each; the same tokens as eager, no recompiles on later images."""
import pytest
import torch

from varkit.models import create_model
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators

from conftest import randomize
from test_compile import inductor_cache_per_isa  # noqa: F401  (autouse: this module's graphs cached per ISA)

pytest.importorskip("torch._inductor")


def frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def jacobi_rows(gen, cond, n, keep, noise=None):
    """Decode whole images through ``forward_rows`` alone, as a speculative verifier does: every call feeds each
    row's window of n tokens (its last accepted step, then drafts: its earlier outputs), accepts the first step's
    tokens and every further step whose drafts the outputs confirm, at most ``keep[b]`` steps (rows advance at
    their own pace). Tokens: argmax of the logits, plus ``noise`` (B, N, V) Gumbel draws when sampling.
    Returns the tokens (B, N) and every valid output seen, for the comparison with eager."""
    L = gen.layout
    B, N, S = cond.shape[0], L.num_tokens, L.num_steps
    starts = L.step_starts
    noise = torch.zeros(B, N, 16) if noise is None else noise
    tokens = torch.zeros(B, N + n, dtype=torch.long)  # accepted tokens, then drafts (zeros past the end)
    cache = gen.new_cache(B)
    out, _ = gen.prefill(cond, cache)
    tokens[:, 0] = (out[:, 0] + noise[:, 0]).argmax(-1)
    steps = torch.ones(B, dtype=torch.long)
    outputs = []
    while (steps < S).any():
        run = steps.clamp(max=S - 1)
        fed = torch.stack([tokens[b, starts[int(s) - 1]:starts[int(s) - 1] + n] for b, s in enumerate(run)])
        out = gen.forward_rows(fed, run, cache)
        valid = gen.valid_row_outputs(run, n)
        outputs.append((out, valid))
        for b in range(B):
            s, a, v = int(run[b]), starts[int(run[b])], int(valid[b])
            if steps[b] >= S:
                continue
            new = (out[b, :v] + noise[b, a:a + v]).argmax(-1)
            drafts = tokens[b, a:a + v].clone()
            tokens[b, a:a + v] = new  # accepted where confirmed; drafts for the next window elsewhere
            done = s + 1  # step s's inputs were accepted tokens: its outputs stand
            while (done - s < keep[b] and done < S and starts[done + 1] <= a + v
                   and torch.equal(drafts[:starts[done] - a], new[:starts[done] - a])):
                done += 1  # step done's inputs (steps < done) were drafts that the outputs confirmed
            steps[b] = done
    return tokens[:, :N], outputs


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [("raster-tiny", 3), ("nar-tiny", 5)])
def test_compiled_rows_match_eager_and_compile_once(name, n):
    """Fixed-width windows at per-row steps: greedy and sampled tokens equal eager's (fp32), one graph for both."""
    torch._dynamo.reset()
    gen = randomize(create_model(name, n_layer=1), std=0.3)
    conds = [torch.tensor([0, 1, 3]), torch.tensor([2, 2, 0])]
    noise = -torch.log(-torch.log(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))))  # Gumbel
    keep = [1, 2, 100]
    with torch.inference_mode():
        eager = [jacobi_rows(gen, c, n, keep, z) for c in conds for z in (None, noise)]
        gen.compile_decoding()
        torch._dynamo.utils.counters.clear()
        compiled = [jacobi_rows(gen, c, n, keep, z) for c in conds for z in (None, noise)]
    assert frames() == 1  # one graph for the (3, n) window of every call of all four images
    for (want, want_out), (got, got_out) in zip(eager, compiled):
        # fp32 logits ~1e-6 apart (other kernels, same maths): a greedy or Gumbel-max token moves only where two
        # scores lie within that of each other, a chance of ~1e-6 per token on any CPU
        assert torch.equal(got, want)
        for (o, v), (p, w) in zip(got_out, want_out):
            assert torch.equal(v, w)
            for b in range(o.shape[0]):
                # the logits themselves: LOGIT_RTOL's reasoning (tests/numerics.py), 1e-5 of the largest logit
                torch.testing.assert_close(o[b, :v[b]], p[b, :v[b]], rtol=0, atol=1e-5 * float(p.abs().max()))


def test_jacobi_rows_is_greedy_ancestral_decoding():
    """The per-row window loop above decodes what the ancestral sampler does (greedy, eager): the verify step is right."""
    for name, n in (("raster-tiny", 3), ("nar-tiny", 5)):
        gen = randomize(create_model(name, n_layer=1), std=0.3)
        cond = torch.tensor([0, 1, 3])
        with torch.inference_mode():
            got, _ = jacobi_rows(gen, cond, n, [1, 2, 100])
        want = get_sampler("ancestral", SamplingParams(cfg=1.0, top_k=1)).sample(gen, cond, image_generators(0, 3))
        # fp32 logits through two paths ~1e-6 apart: greedy tokens flip only at a near-tie (none at these weights'
        # margins, >1e-2); any CPU
        assert torch.equal(got, want.tokens)


@pytest.mark.slow
def test_compiled_nar_sampling_matches_eager_and_compiles_once():
    """NAR's ancestral fronts through one graph (padded to the widest front): the tokens of eager, greedy and
    sampled (fp32), and no recompile on a second image."""
    torch._dynamo.reset()
    gen = randomize(create_model("nar-tiny", n_layer=1), std=0.3)
    cond = torch.tensor([1, 2])
    samplers = [get_sampler("ancestral", SamplingParams(cfg=2.0, top_k=1)),
                get_sampler("ancestral", SamplingParams(cfg=2.0, top_k=8))]
    eager = [s.sample(gen, cond, image_generators(0, 2)).tokens for s in samplers]
    assert gen.compile_decoding() is gen and gen.compiled_decoding
    torch._dynamo.utils.counters.clear()
    for s, want in zip(samplers, eager):
        got = s.sample(gen, cond, image_generators(0, 2)).tokens
        # fp32 logits ~1e-6 apart: a greedy or sampled token moves only at a near-tie / a uniform within ~1e-6 of
        # a CDF boundary (probability ~1e-6 per draw): holds on any CPU
        assert torch.equal(got, want)
    assert frames() == 1, dict(torch._dynamo.utils.counters["frames"])  # every front of both runs: one graph


def test_compiled_nar_front_matches_the_eager_front():
    """Without compiling: the padded one-front step (the compiled path run eagerly) gives forward's logits."""
    gen = randomize(create_model("nar-tiny"), std=0.3)
    L = gen.layout
    cond = torch.tensor([0, 3])
    tokens = torch.randint(0, 16, (2, L.num_tokens), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = gen.new_cache(2), gen.new_cache(2)
        gen.prefill(cond, a), gen.prefill(cond, b)
        for s in range(1, L.num_steps):
            want = gen(tokens[:, L.step_slice(s - 1)], s, a)
            got = gen._compiled_front(gen.decode_rows, tokens[:, L.step_slice(s - 1)], s, b)
            assert a.length == b.length
            # the masked full-cache attention reduces in another order: LOGIT_RTOL (tests/numerics.py)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
