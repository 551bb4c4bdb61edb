"""Opt-in compiled decoding (``Generator.compile_decoding``): same results as eager, one graph for every step."""
import copy

import pytest
import torch

from varkit.cache import IndexedKV, KVCache
from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators

from conftest import randomize


@pytest.fixture(autouse=True, scope="module")
def inductor_cache_per_isa():
    """Inductor's on-disk cache keys a graph neither by the vector ISA ATen runs with nor by the thread
    count (torch 2.14): a graph cached under AVX-512 and served under ``ATEN_CPU_CAPABILITY=avx2``
    sampled other tokens here. This module compiles into a cache folder of its own per ISA and thread
    count, so reruns stay cached but a run on other kernels never reads another's graphs."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir, temporary_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    isa = torch.backends.cpu.get_cpu_capability()
    with temporary_cache_dir(os.path.join(base, f"varkit-tests-{isa}-threads{torch.get_num_threads()}")):
        yield


def test_indexed_writes_match_update():
    """IndexedKV writes where KVCache.update would and hands back the whole buffers."""
    a, b = KVCache(2, 1, 2, 6, 4), KVCache(2, 1, 2, 6, 4)
    k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    a.length = b.length = 3
    ka, va = a.update(1, k, v)
    kb, vb = IndexedKV(b.k, b.v, torch.tensor([3])).update(1, k, v)
    assert ka.shape[2] == 4 and kb.shape[2] == 6 and b.length == 3  # the owner advances, not the view
    torch.testing.assert_close(kb[:, :, :4], ka, rtol=0, atol=0)  # copies, no arithmetic: exact on any CPU
    torch.testing.assert_close(vb[:, :, :4], va, rtol=0, atol=0)


def test_decode_static_matches_forward_in_eager():
    """The static-shape step (full cache, masked) is the eager step, without compiling anything."""
    gen = randomize(create_model("raster-tiny"))
    cond, tokens = torch.tensor([0, 3]), torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = gen.new_cache(2), gen.new_cache(2)
        gen.prefill(cond, a), gen.prefill(cond, b)
        for s in range(1, 5):
            want = gen(tokens[:, s - 1:s], s, a)
            got = gen.decode_static(tokens[:, s - 1:s], torch.tensor([b.length]), b.k, b.v)
            b.advance(1)
            # fp32 logits (|logit| ~1) through a masked full-cache attention instead of the prefix: other
            # reduction lengths, ~1e-6 on any CPU's kernels; 1e-5 leaves 10x
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_sampling_matches_eager_and_compiles_once():
    """Greedy and sampled tokens equal eager's (fp32); one compile serves every step and a second image."""
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    gen = randomize(create_model("raster-tiny", n_layer=1), std=0.3)
    cond = torch.tensor([1, 2])
    samplers = [get_sampler("ancestral", SamplingParams(cfg=2.0, top_k=1)),
                get_sampler("ancestral", SamplingParams(cfg=2.0, top_k=8))]
    eager = [s.sample(gen, cond, image_generators(0, 2)).tokens for s in samplers]
    compiled = gen.compile_decoding()  # the default, max_autotune included
    assert compiled is gen and gen.compiled_decoding
    torch._dynamo.utils.counters.clear()
    for s, want in zip(samplers, eager):
        got = s.sample(gen, cond, image_generators(0, 2)).tokens
        # fp32 logits ~1e-6 apart: greedy's smallest top-2 gap is 5.7e-2, and a sampled draw moves only if its
        # uniform lies within ~1e-6 of a CDF boundary (probability ~1e-6 per draw): holds on any CPU
        assert torch.equal(got, want)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == 1, dict(frames)  # one graph for all steps of both runs (no recompiles)


def test_compiled_bf16_step_matches_eager_within_bf16_rounding():
    """bf16 on the CPU takes the frozen path (prepacked weights); its logits match the eager step's."""
    torch._dynamo.reset()
    gen = randomize(create_model("raster-tiny", n_layer=1), std=0.3).to(torch.bfloat16)
    ref = copy.deepcopy(gen)
    gen.compile_decoding(max_autotune=False)
    torch._dynamo.utils.counters.clear()
    cond, tokens = torch.tensor([1, 2]), torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = gen.new_cache(2), ref.new_cache(2)
        gen.prefill(cond, a), ref.prefill(cond, b)
        for s in range(1, 4):
            got, want = gen(tokens[:, s - 1:s], s, a), ref(tokens[:, s - 1:s], s, b)
            assert a.length == b.length
            # bf16 (8-bit mantissa, rounding 2^-9 relative) through other kernels (inductor's fused / oneDNN or
            # AMX GEMMs vs eager): activations re-rounded at every op, K <= 64, 1 layer: a few bf16 ulp (2^-8
            # each) of the largest logit; 5% of it, ~6 ulp, holds on any CPU (under 1% measured, AMX and AVX2)
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    assert torch._dynamo.utils.counters["frames"]["ok"] == 1  # the compiled step ran


def test_moving_copying_or_reloading_drops_the_compiled_step():
    """The compiled step froze the weights of this very module: nothing that changes or copies them keeps it."""
    gen = randomize(create_model("raster-tiny"))
    gen.compile_decoding(max_autotune=False)
    assert not copy.deepcopy(gen).compiled_decoding and gen.compiled_decoding
    gen.to(torch.float64)
    assert not gen.compiled_decoding
    gen.compile_decoding(max_autotune=False)
    gen.load_state_dict(gen.state_dict())
    assert not gen.compiled_decoding


def test_compile_decoding_refuses_other_layouts():
    gen = create_model("raster-tiny", layout="neighbors")
    with pytest.raises(InvalidArgumentError, match="raster layout"):
        gen.compile_decoding()
