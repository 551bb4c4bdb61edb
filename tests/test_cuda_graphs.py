"""CUDA-graph decode steps (:mod:`varkit.cuda_graphs`): the binding of in-place buffers (KV caches) on any
machine, and on a GPU the captured raster, NAR and VAR steps against eager (skipped without CUDA)."""
import copy

import pytest
import torch

from varkit.compiled import _own_forward
from varkit.cuda_graphs import GraphSet, StaticBuffers, mutated_positions
from varkit.models import create_model
from varkit.models.raster import _StaticRowsStep
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators

from conftest import randomize
from test_compile_scales import var_pair

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_binding_keeps_two_live_caches_apart_and_frees_dead_ones():
    buffers = StaticBuffers()
    a = [torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]
    static = buffers.bind(a)
    assert all(x is y for x, y in zip(a, static))  # the first list's tensors become the static ones
    b = [torch.full((2, 3), 5.0), torch.full((2, 3), 6.0)]
    assert buffers.bind(b) is static and b[0] is static[0]  # b now writes into the static tensors...
    assert a[0] is not static[0] and float(a[0][0, 0]) == 1.0 and float(a[1][0, 0]) == 2.0  # ...a kept its content
    static[0].fill_(7.0)  # a graph writes b's cache
    assert float(buffers.bind(a)[0][0, 0]) == 1.0 and float(b[0][0, 0]) == 7.0  # a is back, b keeps the write
    del b
    c = [torch.full((2, 3), 3.0), torch.zeros(2, 3)]
    before = a[0]
    buffers.bind(c)
    assert a[0] is not before and float(a[0][0, 0]) == 1.0  # a is alive: its own copy again
    assert c[0] is static[0] and float(static[0][0, 0]) == 3.0
    other = buffers.bind([torch.zeros(4)])  # another signature: a set of its own
    assert other[0].shape == (4,) and buffers.nbytes == 4 * (2 * 6 + 4)


def test_a_dead_cache_is_not_copied():
    buffers = StaticBuffers()
    buffers.bind([torch.ones(3)])  # nobody else holds this list
    new = [torch.zeros(3)]
    static = buffers.bind(new)
    assert new[0] is static[0] and float(static[0][0]) == 0.0


def test_mutated_positions_follow_the_step_signature():
    assert mutated_positions(_StaticRowsStep.forward) == (2, 3)


def test_bound_steps_decode_two_interleaved_caches_like_eager():
    """The CPU stand-in of the CUDA path (bind and key, call eagerly): two images decoded step by step in turns
    through one set of bound buffers give eager's logits, since each cache keeps its own content."""
    gen = randomize(create_model("raster-tiny", n_layer=2), std=0.3)
    ref = copy.deepcopy(gen)
    graphs = GraphSet(capture=False)
    gen._set_compiled_step(graphs.wrap(_own_forward(_StaticRowsStep(gen)), _StaticRowsStep.forward))
    conds = [torch.tensor([0]), torch.tensor([3])]
    toks = torch.randint(0, 16, (2, gen.layout.num_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        caches = [gen.new_cache(1) for _ in conds]
        ref_caches = [ref.new_cache(1) for _ in conds]
        for c, cache, rc in zip(conds, caches, ref_caches):
            gen.prefill(c, cache)
            ref.prefill(c, rc)
        for step in range(1, gen.layout.num_steps):
            for i in range(2):
                got = gen(toks[i:i + 1, step - 1:step], step, caches[i])
                want = ref(toks[i:i + 1, step - 1:step], step, ref_caches[i])
                # the same fp32 ops, the static step masking the full cache instead of slicing it: ~1e-6
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphs.steps[0].graphs) == 1  # one (batch, width) signature, one "graph"


# -- on a GPU ----------------------------------------------------------------------------------------------------
def _sample_twice(gen, cond, sampler):
    return [sampler.sample(gen, cond, image_generators(seed, cond.shape[0])).tokens for seed in (0, 1)]


@cuda
@pytest.mark.parametrize("name", ["raster-tiny", "nar-tiny"])
def test_cuda_graph_rows_match_eager_and_capture_once(name):
    gen = randomize(create_model(name, n_layer=2), std=0.3).cuda()
    cond = torch.tensor([1, 2], device="cuda")
    sampler = get_sampler("ancestral", SamplingParams(cfg=2.0, top_k=8))
    with torch.inference_mode():
        eager = _sample_twice(gen, cond, sampler)
        gen.compile_decoding()
        got = _sample_twice(gen, cond, sampler)
        captures = gen._compiled_step.captures
        again = _sample_twice(gen, cond, sampler)
    # a replay runs the kernels eager ran on the same inputs: the same logits, so the same draws
    for g, w in zip(got + again, eager + eager):
        assert torch.equal(g, w)
    assert captures == 1 and gen._compiled_step.captures == 1  # one graph, reused by every later image


@cuda
def test_cuda_graph_scales_match_eager_and_capture_each_scale_once():
    tok, gen = var_pair(patch_nums=(1, 2, 3, 4))
    tok, gen = tok.cuda(), gen.cuda()
    gen.bind_tokenizer(tok)
    cond = torch.tensor([1, 2], device="cuda")
    sampler = get_sampler("ancestral", SamplingParams(cfg=2.0, cfg_schedule="var", top_k=8))
    with torch.inference_mode():
        eager = _sample_twice(gen, cond, sampler)
        gen.compile_decoding()
        got = _sample_twice(gen, cond, sampler)
    for g, w in zip(got, eager):
        assert torch.equal(g, w)
    assert sum(s.captures for s in gen._compiled_step) == gen.layout.num_steps


@cuda
def test_cuda_graph_bf16_step_matches_eager():
    gen = randomize(create_model("raster-tiny", n_layer=2), std=0.3).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(gen)
    gen.compile_decoding()
    toks = torch.randint(0, 16, (2, gen.layout.num_tokens), device="cuda")
    cond = torch.tensor([0, 3], device="cuda")
    with torch.inference_mode():
        a, b = gen.new_cache(2), ref.new_cache(2)
        gen.prefill(cond, a)
        ref.prefill(cond, b)
        for step in range(1, gen.layout.num_steps):
            got, want = gen(toks[:, step - 1:step], step, a), ref(toks[:, step - 1:step], step, b)
            # bf16: the static step attends over the masked full cache (other reduction order than the eager
            # slice): a few bf16 ulps of logits of size ~1 (2^-8 each)
            torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))


def _bound(gen):
    """``gen`` decoding through its static row step wrapped as on a GPU, without the capture (any machine)."""
    from varkit.compiled import compile_step

    gen._set_compiled_step(compile_step(_StaticRowsStep(gen), inductor=False, graphs=GraphSet(capture=False)))
    return gen


@pytest.mark.parametrize("sampler", ["sjd", "speculative"])
def test_bound_steps_under_continuous_batching_give_eager_tokens(sampler):
    """Speculative samplers over a queue (slots refilled mid-run, verify windows through ``forward_rows``), target
    and draft each with bound buffers: every image's tokens equal the plain eager run's (fp32, the same kernels
    up to the masked full-cache attention: ~1e-6 on logits, far below any sampled decision here)."""
    gen = randomize(create_model("raster-tiny"))
    draft = randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)
    params = SamplingParams(cfg=2.0, temperature=0.7)
    labels = torch.tensor([3, 1, 0, 2, 1, 3, 0])

    def run(g, d):
        s = get_sampler(sampler, params, **({"draft": d} if sampler == "speculative" else {}))
        return s.sample(g, labels, image_generators(7, len(labels)), max_batch=3).tokens

    want = run(gen, draft)
    bound = _bound(copy.deepcopy(gen)), _bound(copy.deepcopy(draft))
    got = run(*bound)
    assert torch.equal(got, want)
    # the bound steps served the decoding: the target's verify windows (and the draft's steps) went through them
    assert bound[0]._compiled_step.graphs and (sampler == "sjd" or bound[1]._compiled_step.graphs)
