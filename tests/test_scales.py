import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

from conftest import randomize


@pytest.fixture
def var_pair():
    tok = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                           patch_nums=(1, 2, 4), norm_num_groups=4)).eval()
    gen = randomize(create_model("var-tiny"), std=0.3)
    gen.bind_tokenizer(tok)
    return tok, gen


def test_incremental_decode_equals_teacher_forcing(var_pair):
    tok, gen = var_pair
    cond = torch.tensor([0, 3])
    tokens = torch.randint(0, 16, (2, gen.layout.num_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tf = gen.teacher_forcing_logits(cond, tokens)
        cache = gen.new_cache(2)
        logits, state = gen.prefill(cond, cache)
        outs = [logits]
        for s in range(1, gen.layout.num_steps):
            outs.append(gen(tokens[:, gen.layout.step_slice(s - 1)], s, cache, state))
    # fp32 logits of a 1-2 layer VAR (K <= 64) through other GEMM shapes: ~1e-6 on any CPU (1.3e-6
    # measured, AMX and AVX2); 1e-4
    torch.testing.assert_close(torch.cat(outs, 1), tf, rtol=1e-4, atol=1e-4)
    assert cache.length == gen.layout.num_tokens


def test_ancestral_drives_var_one_scale_a_step(var_pair):
    tok, gen = var_pair
    params = SamplingParams(cfg=1.5, cfg_schedule="var", top_k=5, top_p=0.9)
    res = get_sampler("ancestral", params).sample(gen, torch.tensor([1, 2]), image_generators(0, 2))
    assert res.stats.forward_passes == 3 and res.stats.steps == 3
    assert res.tokens.shape == (2, 1 + 4 + 16) and int(res.tokens.max()) < 16
    pipe = Pipeline(tok, gen, {"cfg": 1.5, "cfg_schedule": "var"})
    out = pipe([0, 1], seed=0)
    assert out.images[0].size == (16, 16)


def test_var_greedy_is_deterministic_and_cfg_ramp_starts_unguided(var_pair):
    tok, gen = var_pair
    a = get_sampler("ancestral", SamplingParams(cfg=3, cfg_schedule="var", top_k=1)).sample(gen, torch.tensor([2]), image_generators(0, 1))
    b = get_sampler("ancestral", SamplingParams(cfg=1, top_k=1)).sample(gen, torch.tensor([2]), image_generators(0, 1))
    assert torch.equal(a.tokens[:, :1], b.tokens[:, :1])  # scale 0: weight 1 under VAR's ramp


def test_mismatched_tokenizer_and_rollback_refused(var_pair):
    tok, gen = var_pair
    other = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
                                             codebook_size=32, patch_nums=(1, 2, 4), norm_num_groups=4))
    with pytest.raises(InvalidArgumentError, match="does not match"):
        gen.bind_tokenizer(other)
    with pytest.raises(InvalidArgumentError, match="cannot roll back"):
        gen.rollback(gen.new_cache(1), None, 1)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gen.check_condition(torch.tensor([9]))


def test_var_configs_match_published_parameter_counts():
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("var-d16").parameters()) == 310_283_520
        assert sum(p.numel() for p in create_model("var-d36").parameters()) == 2_353_893_904
        assert sum(p.numel() for p in create_model("llamagen-b").parameters()) == 110_888_448


def test_inference_gemms_on_packed_weights_match_plain(var_pair):
    """VAR's Linear layers (qkv with q/v bias, ffn, head) run fp32 CPU inference on prepacked weights:
    the same logits as plain F.linear, weights re-packed when they change, nothing packed under autograd."""
    from varkit.nn.layers import Linear, prepack_linears

    tok, gen = var_pair
    lin = {n: m for n, m in gen.named_modules() if isinstance(m, Linear)}
    assert {"output", "blocks.0.attn.wqkv", "blocks.0.attn.wo", "blocks.0.ffn.fc1", "blocks.0.ffn.fc2"} <= set(lin)
    assert prepack_linears(gen) == len(lin)
    cond = torch.tensor([1, 2, 3, 4])
    tokens = torch.randint(0, 16, (4, gen.layout.num_tokens), generator=torch.Generator().manual_seed(0))

    def decode():
        with torch.inference_mode():
            cache = gen.new_cache(4)
            logits, state = gen.prefill(cond, cache)
            outs = [logits] + [gen(tokens[:, gen.layout.step_slice(s - 1)], s, cache, state)
                               for s in range(1, gen.layout.num_steps)]
        return torch.cat(outs, 1)

    packed = decode()
    if torch.backends.mkldnn.is_available():
        # a packed copy of each weight (oneDNN's, or the panel kernel's at these 4-64 rows)
        assert all({"_packed", "_panels"} & set(lin[n].__dict__) for n in ("output", "blocks.0.attn.wqkv", "blocks.0.ffn.fc1"))
    with torch.no_grad():
        gen.output.weight.mul_(2)   # an in-place update must re-pack
    repacked = decode()
    prepack_linears(gen, enabled=False)
    assert all(not m.prepacked and not set(Linear.derived_attrs) & set(m.__dict__) for m in lin.values())
    # fp32, oneDNN's packed GEMMs (or varkit's kernels) vs MKL's: another summation order over K <= 64 on logits ~1: ~1e-6
    # (1.9e-6 measured, AMX and AVX2); 1e-5 (+1e-5 relative)
    torch.testing.assert_close(repacked, decode(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        gen.output.weight.div_(2)
    torch.testing.assert_close(packed, decode(), atol=1e-5, rtol=1e-5)  # as above
    prepack_linears(gen)
    gen.train()
    gen.teacher_forcing_logits(cond, tokens).sum().backward()   # autograd: plain F.linear, gradients flow
    assert all(not set(Linear.derived_attrs) & set(m.__dict__) for m in lin.values()) and gen.output.weight.grad is not None
