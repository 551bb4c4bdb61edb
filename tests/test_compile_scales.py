"""Compiled VAR decoding (``ScalesGenerator.compile_decoding``): one graph per scale, the same tokens as eager, no
recompiles on later images; the shared compile helper (:mod:`varkit.compiled`) keeps each compiled step's graphs
to itself."""
import copy

import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

from conftest import randomize
from test_compile import inductor_cache_per_isa  # noqa: F401  (autouse: this module's graphs cached per ISA)

pytest.importorskip("torch._inductor")


def var_pair(patch_nums=(1, 2, 4), depth=1, seed=0):
    tok = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                           patch_nums=patch_nums, norm_num_groups=4)).eval()
    gen = randomize(create_model("var-tiny", depth=depth, patch_nums=patch_nums), std=0.3, seed=seed)
    gen.bind_tokenizer(tok)
    return tok, gen


def frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def test_static_scale_step_matches_forward_in_eager():
    """The per-scale static step (fixed cache prefix) is the eager step, without compiling anything."""
    tok, gen = var_pair(depth=2)
    cond = torch.tensor([0, 3])
    tokens = torch.randint(0, 16, (2, gen.layout.num_tokens), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = gen.new_cache(2), gen.new_cache(2)
        want, state = gen.prefill(cond, a)
        gen._decode_mods(state)
        got = gen.decode_scale_static(0, state.cond_emb, state.cond_emb, state.block_mods, state.head_mods, b.k, b.v)
        f_hat = None
        for s in range(1, gen.layout.num_steps + 1):
            # the same ops on the same shapes (exact prefix, no mask): equal up to nothing but kernel choice
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            if s == gen.layout.num_steps:
                break
            b.advance(gen.layout.step_sizes[s - 1])
            scale = tokens[:, gen.layout.step_slice(s - 1)]
            want = gen(scale, s, a, state)
            f_hat, nxt = tok.next_scale_input(s - 1, scale, f_hat)
            got = gen.decode_scale_static(s, nxt, state.cond_emb, state.block_mods, state.head_mods, b.k, b.v)
        torch.testing.assert_close(b.k[0][:, :, :a.length], a.k[0][:, :, :a.length], rtol=0, atol=0)  # same writes


@pytest.mark.slow
def test_compiled_sampling_matches_eager_and_compiles_each_scale_once():
    """Greedy and sampled tokens equal eager's (fp32, CFG doubling the batch); 9 scales (more than dynamo's default
    recompile limit of 8) compile 9 graphs on the first image and nothing on the next ones."""
    torch._dynamo.reset()
    tok, gen = var_pair(patch_nums=(1, 2, 3, 4, 5, 6, 7, 8, 9))
    cond = torch.tensor([1, 2])
    samplers = [get_sampler("ancestral", SamplingParams(cfg=2.0, cfg_schedule="var", top_k=1)),
                get_sampler("ancestral", SamplingParams(cfg=2.0, cfg_schedule="var", top_k=8, top_p=0.9))]
    eager = [s.sample(gen, cond, image_generators(0, 2)).tokens for s in samplers]
    assert gen.compile_decoding() is gen and gen.compiled_decoding
    torch._dynamo.utils.counters.clear()
    for i, (s, want) in enumerate(zip(samplers, eager)):
        got = s.sample(gen, cond, image_generators(0, 2)).tokens
        # fp32 logits ~1e-6 apart (fused kernels vs eager's): greedy's smallest top-2 gap at std 0.3 is orders larger,
        # and a sampled draw moves only if its uniform lies within ~1e-6 of a CDF boundary (probability ~1e-6 a
        # draw, 285 draws): holds on any CPU
        assert torch.equal(got, want)
        assert frames() == gen.layout.num_steps, dict(torch._dynamo.utils.counters["frames"])  # first image only


def test_compiled_bf16_matches_eager_and_models_keep_their_own_graphs():
    """bf16 takes the frozen path (weights folded into the graph). Its logits match the eager step's; a second
    model of the same shapes compiles graphs of its own (dynamo would otherwise serve it the first one's frozen
    weights: each compile_step traces its own code object)."""
    torch._dynamo.reset()
    models = [var_pair(seed=s)[1].to(torch.bfloat16) for s in (0, 1)]
    refs = [copy.deepcopy(g) for g in models]
    cond = torch.tensor([1, 2])
    tokens = torch.randint(0, 16, (2, models[0].layout.num_tokens), generator=torch.Generator().manual_seed(2))
    torch._dynamo.utils.counters.clear()
    for gen, ref in zip(models, refs):
        gen.compile_decoding(max_autotune=False)
        ref.bind_tokenizer(gen.tokenizer)
        with torch.inference_mode():
            a, b = gen.new_cache(2), ref.new_cache(2)
            (got, sa), (want, sb) = gen.prefill(cond, a), ref.prefill(cond, b)
            for s in range(1, gen.layout.num_steps + 1):
                # bf16 (rounding 2^-9 relative) through other kernels (inductor's fused / oneDNN GEMMs vs eager):
                # activations re-rounded at every op, K <= 128, 1 block: a few bf16 ulp (2^-8 each) of the largest
                # logit; 5% of it, ~6 ulp, holds on any CPU. Two models' logits differ by O(1) (other weights)
                torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
                assert a.length == b.length
                if s < gen.layout.num_steps:
                    scale = tokens[:, gen.layout.step_slice(s - 1)]
                    got, want = gen(scale, s, a, sa), ref(scale, s, b, sb)
    assert frames() == 2 * models[0].layout.num_steps  # every scale of both models compiled (and ran)


def test_moving_drops_and_students_refuse_compiled_steps():
    tok, gen = var_pair()
    gen.compile_decoding()  # nothing compiles until a call
    assert gen.compiled_decoding and not copy.deepcopy(gen).compiled_decoding
    gen.to(torch.float64)
    assert not gen.compiled_decoding
    from varkit.models.dd import DDScalesGenerator

    student = DDScalesGenerator.from_teacher(gen.float(), torch.randn(16, 4))
    with pytest.raises(InvalidArgumentError, match="has no compiled decode step"):
        student.compile_decoding()


def test_prepacked_generator_compiles_one_graph_per_scale():
    """``load_pipeline(prepack=True, compile=True)``: prepacked Linears step aside while compiling (no graph break,
    the same greedy tokens as the eager prepacked decode)."""
    from varkit.nn.layers import prepack_linears

    torch._dynamo.reset()
    tok, gen = var_pair()
    prepack_linears(gen)
    sampler = get_sampler("ancestral", SamplingParams(cfg=2.0, cfg_schedule="var", top_k=1))
    want = sampler.sample(gen, torch.tensor([1, 2]), image_generators(0, 2)).tokens
    gen.compile_decoding(max_autotune=False)
    torch._dynamo.utils.counters.clear()
    # fp32, packed GEMMs vs inductor's: logits ~1e-6 apart, far below greedy's top-2 gaps at std 0.3 (any CPU)
    assert torch.equal(sampler.sample(gen, torch.tensor([1, 2]), image_generators(0, 2)).tokens, want)
    assert frames() == gen.layout.num_steps  # one graph a scale: no graph break split a step


def test_a_graph_break_in_a_compiled_step_is_an_error():
    """A step that breaks the graph would resume in frames shared by every step (served under tensor-only guards):
    compile_step refuses it."""
    from varkit.compiled import compile_step

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            x = self.lin(x)
            torch._dynamo.graph_break()
            return x * 2

    with pytest.raises(Exception, match="graph_break"):
        compile_step(Broken())(torch.ones(1, 2))


def test_bench_var_dtype_and_compile_options():
    """``varkit bench var --dtype ... --compile``: one set of rows per (dtype, compiled), auto resolved for this CPU;
    an unknown dtype is one clear line."""
    import argparse

    from varkit.bench.var import add_var_bench_parser, check_args, varkit_variants
    from varkit.device import auto_dtype

    p = argparse.ArgumentParser()
    add_var_bench_parser(p.add_subparsers())
    assert varkit_variants(p.parse_args(["var"])) == [("float32", False)]  # the default: fp32 eager, as before
    auto = str(auto_dtype("cpu")).replace("torch.", "")
    args = p.parse_args(["var", "--dtype", "float32", "auto", "--compile"])
    want = [("float32", False), ("float32", True)] + ([(auto, False), (auto, True)] if auto != "float32" else [])
    assert varkit_variants(args) == want
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'fp64'"):
        check_args(p.parse_args(["var", "--dtype", "fp64"]))
