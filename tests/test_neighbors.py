"""NAR's generator: 2n-1 fronts, head combination, proximity mask, contract, training."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from varkit.errors import InvalidArgumentError
from varkit.layout import neighbors
from varkit.modeling import load_module
from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator
from varkit.models.registry import list_models, register_config
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators

# the named configs the lead registers in varkit/models/configs.py (registered here if absent)
_NAMED = {
    "nar-tiny": partial(NeighborsConfig, vocab_size=16, num_classes=4, dim=32, n_layer=2, n_head=2, grid=4,
                        multiple_of=16, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0),
    "digits-nar": partial(NeighborsConfig, vocab_size=128, num_classes=10, dim=128, n_layer=4, n_head=4, grid=8,
                          multiple_of=32),
}
for _name, _cfg in _NAMED.items():
    if _name not in list_models():
        register_config(_name, NeighborsGenerator, _cfg, "test registration")


def tiny(grid=5, medusa=1, seed=0, **kw) -> NeighborsGenerator:
    cfg = NeighborsConfig(vocab_size=32, num_classes=5, dim=32, n_layer=2, n_head=2, grid=grid, multiple_of=16,
                          medusa_layers=medusa, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, **kw)
    gen = NeighborsGenerator(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gen.named_parameters():
            x = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * x if "norm" in name else (x if "embedding" in name else x / p.shape[-1] ** 0.5))
    return gen.eval()


def greedy(gen, labels, cfg=1.0):
    return get_sampler("ancestral", SamplingParams(cfg=cfg, top_k=1)).sample(
        gen, torch.tensor(labels), image_generators(0, len(labels)))


def step_logits(gen, cond, tokens):
    """Logits of every front, one forward per front (the sampler's path)."""
    L = gen.layout
    cache = gen.new_cache(cond.shape[0])
    out = [gen.prefill(cond, cache)[0]]
    for s in range(1, L.num_steps):
        out.append(gen(tokens[:, L.step_slice(s - 1)], s, cache))
    return torch.cat(out, 1)


@pytest.mark.parametrize("grid", [4, 16])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_forward_passes_are_fronts(grid, cfg):
    gen = tiny(grid=grid)
    res = greedy(gen, [1, 2], cfg)
    assert res.stats.forward_passes == 2 * grid - 1 == res.stats.steps
    assert res.stats.accepted_per_pass == gen.layout.step_sizes
    assert res.tokens.shape == (2, grid * grid)


def test_parameter_names_are_nars():
    gen = tiny(medusa=2)
    keys = set(gen.state_dict())
    assert {"medusa_norm.weight", "medusa_output.weight", "output.weight", "norm.weight"} <= keys
    assert max(int(k.split(".")[1]) for k in keys if k.startswith("layers.")) == 2 + 2 - 1
    assert gen.cache_dims()[0] == 4
    assert type(gen.medusa_output) is type(gen.output)  # both heads take varkit's Linear decode paths
    fresh = NeighborsGenerator(gen.config)  # NAR's init: output zero, medusa_output not
    assert fresh.output.weight.abs().max() == 0 and fresh.medusa_output.weight.abs().max() > 0


def test_head_combination_rule():
    """Token (r,c) = mean(vertical(r-1,c), horizontal(r,c-1)); row 0 horizontal, column 0 vertical."""
    gen = tiny(grid=5)
    cond = torch.tensor([1, 3])
    tokens = torch.randint(0, 32, (2, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gen.teacher_forcing_logits(cond, tokens)
        L = gen.layout
        h = torch.cat([gen._cond_embeddings(cond), gen.tok_embeddings(tokens[:, :-1])], 1)
        steps = torch.cat([torch.tensor([-1]), gen.token_steps[:24]])
        hh = gen._run(h, slice(0, 25), steps[None, :] <= steps[:, None], None)
        R, B = gen.horizontal_logits(hh), gen.vertical_logits(hh)
    where = {(int(r), int(c)): i for i, (r, c, _) in enumerate(L.coords.tolist())}
    for (r, c), i in where.items():
        if (r, c) == (0, 0):
            want = (R[:, 0] + B[:, 0]) / 2
        elif r == 0:
            want = R[:, 1 + where[(r, c - 1)]]
        elif c == 0:
            want = B[:, 1 + where[(r - 1, c)]]
        else:
            want = (B[:, 1 + where[(r - 1, c)]] + R[:, 1 + where[(r, c - 1)]]) / 2
        # the same fp32 head outputs (|logit| ~3), averaged in another order: ulps (2.4e-7 measured); 1e-5
        torch.testing.assert_close(logits[:, i], want, rtol=0, atol=1e-5)


def test_proximity_mask_within_front():
    """A front's logits depend on every token of earlier fronts and on none of its own or later."""
    gen = tiny(grid=4)
    cond = torch.tensor([2])
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (1, 16), generator=g)
    base = gen.teacher_forcing_logits(cond, tokens).detach()
    L = gen.layout
    for i in range(16):
        t2 = tokens.clone()
        t2[0, i] = (t2[0, i] + 1) % 32
        diff = (gen.teacher_forcing_logits(cond, t2) - base).abs().amax(-1)[0]
        s = int(L.step_of[i])
        assert diff[: L.step_starts[s + 1]].max() == 0  # own front and before: untouched
        if s + 1 < L.num_steps:
            assert diff[L.step_starts[s + 1]:].max() > 0  # later fronts see it


def test_one_front_needs_no_mask():
    """A one-front input attends to everything (mask None, SDPA's fast path); two fronts need the mask."""
    gen = tiny(grid=4)
    starts = gen.layout.step_starts
    assert gen._mask(slice(starts[2], starts[3]), 5, "cpu") is None
    two = gen._mask(slice(starts[2], starts[4]), 5, "cpu")
    assert two.shape == (starts[4] - starts[2], 5 + starts[4] - starts[2])
    assert two[:, :5].all() and not two.all()  # the past is visible, the later front is not to the earlier one
    assert bool(two[-1].all())


@pytest.mark.parametrize("medusa", [1, 2])
def test_teacher_forcing_equals_decoding(medusa):
    gen = tiny(grid=5, medusa=medusa)
    cond = torch.tensor([0, 4])
    tokens = greedy(gen, [0, 4], 1.0).tokens.clone()
    with torch.no_grad():
        tf = gen.teacher_forcing_logits(cond, tokens)
        inc = step_logits(gen, cond, tokens)
    # fp32 logits (|logit| <= 3.5) through other GEMM shapes (whole layout vs one front): ~1e-6 on any CPU
    # (1.3e-6 measured, AMX and AVX2); 1e-4
    torch.testing.assert_close(tf, inc, rtol=0, atol=1e-4)
    # greedy path: smallest top-2 gap 5.2e-4 (medusa 2), 2.3e-3 (medusa 1): >> fp32 noise on any CPU
    assert torch.equal(tf.argmax(-1), tokens)
    # a prefix of the layout gives the prefix of the logits (another sequence length: ~1e-6 as above; 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gen.teacher_forcing_logits(cond, tokens[:, :9]), tf[:, :9], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_same_samples(dtype):
    """The prepacked-linear path (what ``varkit bench nar`` times) samples the tokens the plain path does."""
    from varkit.nn.layers import prepack_linears

    gen = tiny(grid=5).to(dtype)
    params = SamplingParams(cfg=4.0, top_k=8)
    plain = get_sampler("ancestral", params).sample(gen, torch.tensor([1, 3]), image_generators(0, 2)).tokens
    assert prepack_linears(gen) == 5 * 3 + 2  # wqkv, wo, w1, w2, w3 in 3 layers (2 + medusa), both heads
    packed = get_sampler("ancestral", params).sample(gen, torch.tensor([1, 3]), image_generators(0, 2)).tokens
    # sampled tokens: logits that differ by fp32 noise (or bf16 rounding) change a draw only if its uniform
    # falls that close to a CDF boundary, ~1e-6 (bf16: ~1e-2) per draw for these 50 draws; bf16 packs on
    # CPUs with oneDNN bf16 only (packable_dtypes): elsewhere both runs take the same path
    assert torch.equal(packed, plain)


def test_multistep_forward_and_rollback():
    gen = tiny(grid=6)
    cond = torch.tensor([1, 2])
    tokens = torch.randint(0, 32, (2, 36), generator=torch.Generator().manual_seed(5))
    L = gen.layout
    with torch.no_grad():
        ref = step_logits(gen, cond, tokens)
        cache = gen.new_cache(2)
        gen.prefill(cond, cache)
        out = gen(tokens[:, L.step_starts[0]:L.step_starts[5]], 1, cache)  # fronts 0..4 -> 1..5
        # fp32 logits (|logit| ~3) through other GEMM shapes: ~1e-6 (8.9e-7 measured, AMX and AVX2); 1e-5
        torch.testing.assert_close(out, ref[:, L.step_starts[1]:L.step_starts[6]], rtol=0, atol=1e-5)
        gen.rollback(cache, None, 3)  # back to just before feeding front 2
        assert cache.length == 1 + L.step_starts[2]
        out = gen(tokens[:, L.step_starts[2]:L.step_starts[10]], 3, cache)  # fronts 2..9 -> 3..10
        torch.testing.assert_close(out, ref[:, L.step_starts[3]:], rtol=0, atol=1e-5)  # as above
        with pytest.raises(InvalidArgumentError):
            gen(tokens[:, L.step_starts[10]:], 11, cache)  # front 11 does not exist


def test_sjd_drives_nar_and_matches_greedy():
    sjd = pytest.importorskip("varkit.samplers.sjd")
    gen = tiny(grid=5)
    want = greedy(gen, [1, 3], 2.0).tokens
    res = sjd.SJDSampler(SamplingParams(cfg=2.0, top_k=1), window=8).sample(
        gen, torch.tensor([1, 3]), image_generators(0, 2))
    assert torch.equal(res.tokens, want)


def test_sampling_is_per_image():
    gen = tiny(grid=4)
    p = SamplingParams(cfg=3.0, top_k=8)
    full = get_sampler("ancestral", p).sample(gen, torch.tensor([0, 1, 2]), image_generators(9, 3)).tokens
    one = get_sampler("ancestral", p).sample(gen, torch.tensor([1]), image_generators(9, 3)[1:2]).tokens
    assert torch.equal(full[1:2], one)


def test_bad_configs_and_conditions():
    with pytest.raises(InvalidArgumentError, match="square"):
        neighbors(4, 6)
    with pytest.raises(InvalidArgumentError, match="neighbors layout"):
        NeighborsGenerator(NeighborsConfig(vocab_size=8, num_classes=2, dim=16, n_layer=1, n_head=2, grid=2,
                                           multiple_of=16, layout="raster"))
    with pytest.raises(InvalidArgumentError, match="medusa"):
        NeighborsGenerator(NeighborsConfig(vocab_size=8, num_classes=2, dim=16, n_layer=1, n_head=2, grid=2,
                                           multiple_of=16, medusa_layers=0))
    gen = tiny(grid=3)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        greedy(gen, [7])
    with pytest.raises(InvalidArgumentError):
        gen.hidden_to_logits(torch.zeros(1, 1, 64))


def test_save_load_roundtrip(tmp_path):
    gen = tiny(grid=4, medusa=2)
    gen.save_pretrained(tmp_path / "g")
    back = load_module(tmp_path / "g")
    assert isinstance(back, NeighborsGenerator) and back.config == gen.config
    assert torch.equal(greedy(back, [1, 2], 3.0).tokens, greedy(gen, [1, 2], 3.0).tokens)


def test_named_configs_build():
    from varkit.models import create_model

    gen = create_model("nar-tiny")
    assert isinstance(gen, NeighborsGenerator) and gen.layout.num_steps == 7
    d = create_model("digits-nar", vocab_size=128, grid=8)
    assert (d.config.n_layer, d.config.dim, d.layout.num_steps) == (4, 128, 15)


def test_digits_nar_config_trains_through_teacher_forcing():
    """A 4-layer dim-128 8x8 model: NAR's loss (CE of the combined logits) goes down."""
    from varkit.models import create_model

    torch.manual_seed(0)
    gen = create_model("digits-nar", vocab_size=128, num_classes=10, grid=8).train()
    tokens = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        logits = gen.teacher_forcing_logits(gen.drop_condition(labels, torch.zeros(8, dtype=torch.bool)), tokens)
        loss = F.cross_entropy(logits.reshape(-1, 128), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert gen.medusa_output.weight.grad.abs().sum() > 0 and gen.output.weight.grad.abs().sum() > 0


def test_train_generator_command_builds_nar(tmp_path):
    from varkit.tokenizers import VQConfig, VQTokenizer
    from varkit.train.generator import train_generator
    from varkit.train.loop import TrainConfig

    torch.manual_seed(0)
    VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16, codebook_dim=4,
                         norm_groups=4)).save_pretrained(tmp_path / "tok")
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup=1, log_every=1, ckpt_every=1000, seed=0)
    pipe = train_generator("digits", tmp_path / "tok", "digits-nar", tmp_path / "out", cfg, resolution=16,
                           device="cpu", dim=32, n_layer=1, n_head=2)
    assert isinstance(pipe.generator, NeighborsGenerator) and pipe.generator.config.grid == 4
    out = pipe(class_labels=[0, 1], cfg=2.0, seed=0)
    assert out.stats.forward_passes == 7 and len(out.images) == 2


def test_bench_rows_and_official_path(tmp_path):
    from varkit.bench.nar import add_nar_bench_parser, bench_varkit
    from varkit.bench.scripts import load_script

    load_official = load_script("nar").load_official  # bench/side_by_side/nar.py of the source checkout

    row = bench_varkit(tiny(grid=4), "tiny", "neighbors", 2, SamplingParams(cfg=4.0, top_k=5), 1)
    assert row["forward_passes"] == 7 and row["images_per_s"] > 0 and row["cpu_s"] > 0
    with pytest.raises(InvalidArgumentError, match="NAR's source tree"):
        load_official(tmp_path)
    import argparse

    p = argparse.ArgumentParser()
    add_nar_bench_parser(p.add_subparsers())
    args = p.parse_args(["nar", "--official", "/x", "--batch", "1", "8"])
    assert args.batch == [1, 8] and args.cfg == 4.0 and args.func.__name__ == "cmd_bench_nar"
    (tmp_path / "NAR-images").mkdir()  # a checkout's root is searched for its NAR-images folder
    with pytest.raises(InvalidArgumentError, match="NAR-images is not NAR's source tree"):
        load_official(tmp_path)


def test_bench_times_round_robin():
    """Implementations are timed A B A B, each as many times as asked; the fastest call is kept."""
    from varkit.bench.nar import _interleaved

    calls = []
    out = _interleaved([lambda: calls.append("a") or "ra", lambda: calls.append("b") or "rb"], [2, 3])
    assert calls == ["a", "b", "a", "b", "b"]
    assert [o[0] for o in out] == ["ra", "rb"] and all(0 <= o[1] < float("inf") and o[2] >= 0 for o in out)
    calls.clear()  # before(i): untimed, right before each call of fns[i] (the host's read-rate probe)
    _interleaved([lambda: calls.append("a"), lambda: calls.append("b")], [2, 1], before=lambda i: calls.append(i))
    assert calls == [0, "a", 1, "b", 0, "a"]


OFFICIAL = "/work/ref/NAR/NAR-images"


@pytest.mark.skipif(not __import__("os").path.isdir(OFFICIAL), reason="NAR's source tree is not checked out")
def test_bench_official_loop_on_same_weights():
    """Development check: NAR's own generate, driven by the bench, gives varkit's greedy tokens."""
    from varkit.bench.scripts import load_script

    script = load_script("nar")
    bench_official, load_official, official_model = script.bench_official, script.load_official, script.official_model

    gen = tiny(grid=4)
    gpt, loop = load_official(OFFICIAL)
    model = official_model(gpt, gen)
    row = bench_official(loop, model, "tiny", 2, SamplingParams(cfg=4.0, top_k=5), 1)
    assert row["forward_passes"] == 7
    ref = loop.generate(model, torch.tensor([0, 1]), 16, cfg_scale=4.0, top_k=1, sample_logits=False).long()
    ours = greedy(gen, [0, 1], 4.0).tokens
    assert torch.equal(gen.layout.to_grids(ours)[0].reshape(2, -1), ref)
