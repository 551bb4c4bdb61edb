"""MAR: the generator against LTH14/mar's official code, the converter, and bad input.

The golden fixture (tests/fixtures/mar/official_outputs.pt) holds the official code's outputs on a tiny
MAR whose weights the tests rebuild from ``keys``/``shapes``/``seed`` with
``varkit.checkpoints.synthetic.mar_state_dict``; tests/fixtures/mar/README.md says how it was made.
These tests need no MAR code.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from varkit.checkpoints import mar_vae
from varkit.checkpoints.mar import (
    MAR_DEFAULTS,
    convert_mar,
    load_mar,
    mar_config_from_state_dict,
    mar_state_dict_from_official,
    mar_state_dict_to_official,
)
from varkit.checkpoints.synthetic import items_of, mar_state_dict
from varkit.cli import main as cli_main
from varkit.errors import CheckpointError, InvalidArgumentError
from varkit.modeling import load_module, params_on_meta
from varkit.models import create_model
from varkit.models.mar import MARConfig, MARGenerator
from varkit.pipeline import load_pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.random import image_generators
from varkit.tokenizers import create_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "mar"

# Tolerances. z = the decoder's output, |z| <= 5 in the fixture. Measured when the fixture was made:
# official fp32 vs official fp64 differ by <= 2.3e-6 (~20 ulp of |z|, from 4 blocks of <= 192-term dot
# products), and varkit reproduces the official arithmetic op by op. Two fp32 implementations on any
# x86-64 CPU (different GEMM blocking, AVX2 or AMX) are each within that of the exact value, so 2e-5
# (~30 eps32 x max|z|) leaves a 4x margin; in fp64 the same growth gives ~1e-13, so 1e-11.
Z_ATOL = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "official_outputs.pt", map_location="cpu", weights_only=True)


def official_weights(golden, seed=None):
    return mar_state_dict(zip(golden["keys"], golden["shapes"]), golden["seed"] if seed is None else seed)


def tiny_config(golden) -> MARConfig:
    c = golden["config"]
    return MARConfig(token_dim=c["vae_embed_dim"], grid=c["img_size"] // c["vae_stride"], num_classes=c["class_num"],
                     encoder_dim=c["encoder_embed_dim"], encoder_depth=c["encoder_depth"],
                     encoder_heads=c["encoder_num_heads"], decoder_dim=c["decoder_embed_dim"],
                     decoder_depth=c["decoder_depth"], decoder_heads=c["decoder_num_heads"],
                     buffer_size=c["buffer_size"], head_depth=c["diffloss_d"], head_width=c["diffloss_w"], num_iter=4)


@pytest.fixture(scope="module")
def gen(golden):
    """The fixture's MAR, converted by key rename only."""
    g = MARGenerator(tiny_config(golden)).eval()
    g.load_state_dict(mar_state_dict_from_official(official_weights(golden)))
    return g


def _cfg_rows(gen, labels, cfg, *tensors):
    """The CFG-doubled batch MAR builds: conditional rows, then the null class (fake_latent)."""
    if not cfg:
        return (labels, *tensors)
    return (torch.cat([labels, gen.null_condition(labels)]), *(torch.cat([t, t]) for t in tensors))


# -- the network against the official code ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_decoder_match_official(golden, gen, dtype):
    """forward_mae_encoder + forward_mae_decoder for fixed masks (10 of 16 hidden, all, none), with and
    without the CFG-doubled batch."""
    g = gen.to(dtype)
    try:
        for case in golden["mae"]:
            cond, tokens, mask = _cfg_rows(g, golden["labels"], case["cfg"], golden["tokens"].to(dtype), case["mask"])
            with torch.no_grad():
                z = g.outputs_for_mask(cond, tokens, mask)
            ref = case["z64" if dtype == torch.float64 else "z32"]
            assert z.dtype == dtype
            torch.testing.assert_close(z, ref.to(dtype), rtol=0, atol=Z_ATOL[dtype], msg=case["name"])
    finally:
        gen.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_steps_match_official_sample_tokens(golden, gen, dtype):
    """prefill/forward give, step by step, the z that MAR's sample_tokens hands its DiffLoss, for MAR's orders
    (varkit's order is MAR's reversed: MAR keeps order[:mask_len] hidden, varkit reveals order[start:end])."""
    tag = "64" if dtype == torch.float64 else "32"
    g = gen.to(dtype)
    try:
        for case in golden["sample"]:
            layout = g.sampling_layout(case["num_iter"])
            assert layout.step_sizes == case["sizes"]
            cfg = case["cfg"] != 1.0
            cond, order = _cfg_rows(g, golden["labels"], cfg, case["orders"].flip(1))
            with torch.no_grad():
                out, state = g.prefill(cond, None, order=order, layout=layout)
                for step in range(layout.num_steps):
                    if step:
                        (tokens,) = _cfg_rows(g, golden["labels"], cfg, case["step_tokens" + tag][step - 1])[1:]
                        out = g(tokens.to(dtype), step, None, state)
                    ref = case["z" + tag][step]  # MAR's z[mask_to_pred.nonzero()]: image-major, grid order
                    torch.testing.assert_close(out.reshape(ref.shape), ref.to(dtype), rtol=0, atol=Z_ATOL[dtype])
    finally:
        gen.float()


class InjectedRandomness:
    """Stands in for the sampler's per-image Randomness: returns the fixture's orders and normals in draw order."""

    def __init__(self, order: torch.Tensor, normals: list[torch.Tensor]):
        self.order, self.normals_left = order, list(normals)

    def permutations(self, n: int) -> torch.Tensor:
        assert n == self.order.shape[1]
        return self.order.clone()

    def normals(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.normals_left.pop(0)
        assert tuple(t.shape[1:]) == shape, (tuple(t.shape), shape)
        return t.to(dtype)


# Whole-chain tokens: the fixture's random DiffLoss is far from a trained one, so its ancestral chains grow
# tokens to |x| ~ 1.5e5 (1/sqrt(alpha) ~ 30 at the first respaced step). Official fp32 vs official fp64 differ
# by <= 4.3e-6 x max|x| (measured); two fp32 implementations are each within that of exact, so
# 4e-5 x max|x| leaves a ~5x margin. (The head samples in fp32 even for fp64 weights: fp32 only.)
SAMPLE_RTOL_OF_MAX = 4e-5


# cases 1 and 2 (linear CFG) check MAR's last-step weight 1 + (cfg-1)(N-1)/N (its mask_len is clamped to >= 1)
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_ancestral_sampler_matches_official_sample_tokens(golden, gen, index):
    """The whole of MAR's sample_tokens (cosine mask schedule, CFG, temperature on the per-step noise, 25-step
    respaced DiffLoss) given the same orders, x_T and per-step noises: the ancestral sampler's tokens."""
    case = golden["sample"][index]
    draws = [t for pair in zip(case["x_T"], case["noise"]) for t in pair]  # per step: x_T, then the step noises
    fake = InjectedRandomness(case["orders"].flip(1), draws)
    params = SamplingParams(cfg=case["cfg"], cfg_schedule=case["schedule"], temperature=case["temperature"],
                            num_iter=case["num_iter"], head_steps=int(case["steps"]))
    labels = golden["labels"]
    with torch.no_grad():
        res = get_sampler("ancestral", params).sample(gen, labels, fake)  # the recorded draws, injected
    assert not fake.normals_left and res.stats.forward_passes == case["num_iter"]
    ref = case["final32"]
    torch.testing.assert_close(res.tokens, ref, rtol=0, atol=SAMPLE_RTOL_OF_MAX * float(ref.abs().max()))


def test_synthetic_recipe_is_the_fixture_script(golden):
    """The fixture script writes the recipe out; the test's weights are the fixture's."""
    sd = official_weights(golden)
    g = torch.Generator().manual_seed(golden["seed"])
    first = golden["keys"][0]
    assert first == "fake_latent" and torch.equal(sd[first], 0.5 * torch.randn(tuple(golden["shapes"][0]), generator=g))


# -- decoding contract and training -------------------------------------------------------------------
def test_sampling_layout_and_contract_errors():
    g = create_model("mar-tiny").eval()
    N = g.layout.num_tokens
    assert g.sampling_layout(None) is g.layout and g.sampling_layout(N).step_sizes == [1] * N
    assert g.new_cache(2) is None and g.supports_multistep and g.supports_rollback and g.cond_len == 4
    for bad in (0, N + 1, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="num_iter"):
            g.sampling_layout(bad)
    labels = torch.tensor([1, 2])
    with pytest.raises(InvalidArgumentError, match="order="):
        g.prefill(labels, None)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        g.check_condition(torch.tensor([5]))
    order = torch.stack([torch.randperm(N) for _ in range(2)])
    with torch.no_grad():
        out, state = g.prefill(labels, None, order=order)
        assert out.shape == (2, g.layout.step_sizes[0], 48)
        with pytest.raises(InvalidArgumentError, match="one step at a time"):
            g(torch.zeros(2, g.layout.step_sizes[1], 4), 2, None, state)
        with pytest.raises(InvalidArgumentError, match="shape"):
            g(torch.zeros(2, 1, 4), 1, None, state)
    with pytest.raises(InvalidArgumentError, match="training_outputs"):
        g.teacher_forcing_logits(labels, torch.zeros(2, N, 4))


def test_multistep_forward_is_each_steps_own_prefix_and_rolls_back():
    """Several steps in one call (the prefixes batched, padding masked out) give what one call per step gives,
    and rollback returns to an earlier step. fp64: the two paths differ only by the masked padding's
    summation order, ~1e-15 (fp64 eps 2.2e-16 x a few dozen terms); 1e-12 leaves room for any CPU."""
    torch.manual_seed(0)
    g = create_model("mar-tiny").double().eval()
    lay, B = g.layout, 3
    order = torch.stack([torch.randperm(lay.num_tokens) for _ in range(B)])
    cond, toks = torch.tensor([0, 1, 4]), torch.randn(B, lay.num_tokens, 4, dtype=torch.float64)
    with torch.no_grad():
        _, st = g.prefill(cond, None, order=order)
        seq = [g(lay.read(toks, s - 1, order), s, None, st) for s in range(1, lay.num_steps)]
        _, st2 = g.prefill(cond, None, order=order)
        multi = g(torch.cat([lay.read(toks, j, order) for j in range(lay.num_steps - 1)], 1), 1, None, st2)
        torch.testing.assert_close(multi, torch.cat(seq, 1), rtol=0, atol=1e-12)
        g.rollback(None, st2, 2)
        torch.testing.assert_close(g(lay.read(toks, 1, order), 2, None, st2), seq[1], rtol=0, atol=1e-12)
        with pytest.raises(InvalidArgumentError, match="whole steps"):
            g(toks[:, :1], 3, None, st2)
        with pytest.raises(InvalidArgumentError, match="rolls back"):
            g.rollback(None, st2, lay.num_steps + 1)


def test_null_class_is_fake_latent():
    g = create_model("mar-tiny")
    emb = g.class_embedding(torch.tensor([0, 4, 3]))
    assert torch.equal(emb[1], g.fake_latent[0]) and torch.equal(emb[2], g.class_emb.weight[3])
    assert torch.equal(g.null_condition(torch.tensor([1, 2])), torch.tensor([4, 4]))


def test_training_outputs_mask_and_label_drop():
    g = create_model("mar-tiny", label_drop_prob=1.0)
    N = g.layout.num_tokens
    tokens, labels = torch.randn(3, N, 4), torch.tensor([0, 1, 2])
    g.train()
    torch.manual_seed(0)
    out, mask = g.training_outputs(labels, tokens)
    torch.manual_seed(0)
    out2, mask2 = g.training_outputs(labels, tokens)
    assert out.shape == (3, N, 48) and mask.shape == (3, N) and mask.dtype == torch.bool
    assert torch.equal(mask, mask2) and torch.equal(out, out2)  # reproducible under torch.manual_seed
    counts = mask.sum(1)
    assert bool((counts == counts[0]).all()) and math.ceil(0.7 * N) <= int(counts[0]) <= N
    # every label dropped (probability 1): the outputs are the null class's
    null = g.outputs_for_mask(g.null_condition(labels), tokens, mask)
    torch.testing.assert_close(out, null, rtol=0, atol=0)
    loss, _ = g.head.loss(out, tokens, mask)
    loss.backward()
    assert g.z_proj.weight.grad is not None and g.head.net.input_proj.weight.grad is not None


def test_mask_ratio_follows_the_truncated_normal():
    """MAR draws the mask ratio from normal(1, 0.25) truncated to [0.7, 1] (mean 1 + 0.25·(φ(a) − φ(0))/(Φ(0) − Φ(a)))."""
    g = create_model("mar-tiny", grid=16)
    torch.manual_seed(1)
    ratios = torch.tensor([float(g.random_mask(1)[0].sum()) / 256 for _ in range(400)])
    a = (0.7 - 1) / 0.25
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (0.5 - Phi(a))
    # ceil(256·r)/256 shifts the mean by < 1/256; the standard error of 400 draws is ~0.075/20 ≈ 0.004
    assert ratios.min() >= 0.7 and ratios.max() <= 1 and abs(float(ratios.mean()) - mean) < 0.02


def test_same_seed_same_latents_at_any_batch_position():
    g = create_model("mar-tiny", head_steps=5).eval()
    g.load_state_dict(mar_state_dict(items_of(g.state_dict()), 3))  # a head that reads z (MAR's init zeroes it out)
    params = SamplingParams(cfg=2.0, cfg_schedule="linear", num_iter=3)
    with torch.no_grad():
        both = get_sampler("ancestral", params).sample(g, torch.tensor([1, 2]), image_generators(0, 2)).tokens
        alone = get_sampler("ancestral", params).sample(g, torch.tensor([2]), image_generators(0, 2)[1:]).tokens
    assert both.shape == (2, 16, 4)
    # rows are computed independently; only GEMM blocking may differ with the batch size (fp32 rounding)
    torch.testing.assert_close(alone[0], both[1], rtol=1e-4, atol=1e-4 * float(both.abs().max()))


def test_categorical_head_is_maskgit_from_the_same_class():
    g = create_model("digits-maskgit", grid=4, encoder_dim=32, decoder_dim=32, encoder_depth=1, decoder_depth=1,
                     num_iter=4).eval()
    assert g.head.kind == "categorical" and isinstance(g.z_proj, torch.nn.Embedding) and g.vocab_size == 128
    with torch.no_grad():
        res = get_sampler("ancestral", SamplingParams(cfg=3.0, cfg_schedule="linear", top_k=20)).sample(
            g, torch.tensor([3, 5]), image_generators(0, 2))
    assert res.tokens.shape == (2, 16) and res.tokens.dtype == torch.long and res.stats.forward_passes == 4
    tokens = res.tokens.clone()  # the sampler's tokens are inference-mode tensors
    out, mask = g.train().training_outputs(torch.tensor([3, 5]), tokens)
    assert out.shape == (2, 16, 128)
    g.head.loss(out, tokens, mask)[0].backward()


def test_config_for_tokenizer_refuses_the_wrong_token_type():
    kl, vq = create_tokenizer("digits-kl"), create_tokenizer("digits-vq")
    fields = MARGenerator.config_for_tokenizer(kl, 32)
    assert fields == {"vocab_size": 0, "token_dim": 4, "grid": 8}
    assert create_model("digits-mar", **fields).head.token_shape == (4,)
    assert create_model("digits-maskgit", **MARGenerator.config_for_tokenizer(vq, 32)).vocab_size == 128
    with pytest.raises(InvalidArgumentError, match=r"needs a continuous \(KL\) tokenizer"):
        create_model("digits-mar", **MARGenerator.config_for_tokenizer(vq, 32))
    with pytest.raises(InvalidArgumentError, match=r"needs a discrete \(VQ\) tokenizer"):
        create_model("digits-maskgit", **fields)
    with pytest.raises(InvalidArgumentError, match="multiple"):
        MARGenerator.config_for_tokenizer(kl, 30)


def test_save_pretrained_round_trip(tmp_path, gen, golden):
    gen.save_pretrained(tmp_path / "g")
    back = load_module(tmp_path / "g")
    assert isinstance(back, MARGenerator) and back.config == gen.config
    case = golden["mae"][1]
    cond, tokens, mask = _cfg_rows(gen, golden["labels"], True, golden["tokens"], case["mask"])
    with torch.no_grad():
        assert torch.equal(back.outputs_for_mask(cond, tokens, mask), gen.outputs_for_mask(cond, tokens, mask))


# -- the converter ----------------------------------------------------------------------------------------
def mar_file(golden, path, *, ema=True, wrap=True, model_seed=99):
    """A file in MAR's save_model format: model + model_ema (the fixture's weights) + optimizer, epoch, args."""
    ema_sd = official_weights(golden)
    if not wrap:
        torch.save(ema_sd, path)
        return path
    torch.save({"model": official_weights(golden, model_seed), "model_ema": ema_sd if ema else None,
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mar_tiny", buffer_size=4)}, path)
    return path


def stand_in_vae(path: Path) -> Path:
    """A readable file in the VAE's place (its weights come from ``tiny_vae``)."""
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    return path


@pytest.fixture
def tiny_vae(monkeypatch):
    """MAR's KL-16 loader replaced by a small KL tokenizer with 4-channel latents (the real one is 266 MB)."""
    tok = create_tokenizer("digits-kl").eval()
    calls = []

    def load(path):
        calls.append(path)
        return tok

    monkeypatch.setattr(mar_vae, "load_mar_vae", load)
    return calls


def test_convert_takes_ema_weights_and_round_trips(golden, tmp_path, tiny_vae):
    stand_in_vae(tmp_path / "kl16.ckpt")
    path = mar_file(golden, tmp_path / "checkpoint-last.pth")
    out = convert_mar(tmp_path / "kl16.ckpt", path, tmp_path / "pipe", heads=2)
    pipe = load_pipeline(out)
    g = pipe.generator
    # the fixture's decoder has its own width and 3 heads; the converter gives both sides `heads`
    assert (g.config.encoder_dim, g.config.decoder_dim, g.config.buffer_size, g.config.grid) == (32, 48, 4, 4)
    assert pipe.defaults["num_iter"] == 16 and pipe.defaults["cfg_schedule"] == "linear"
    conv = (out / "convert.json").read_text()
    assert '"weights": "model_ema"' in conv
    ref = MARGenerator(g.config).eval()
    ref.load_state_dict(mar_state_dict_from_official(official_weights(golden)))
    case = golden["mae"][1]
    cond, tokens, mask = _cfg_rows(g, golden["labels"], True, golden["tokens"], case["mask"])
    with torch.no_grad():
        assert torch.equal(g.outputs_for_mask(cond, tokens, mask), ref.outputs_for_mask(cond, tokens, mask))
    # the inverse mapping gives MAR's state dict back exactly
    back = mar_state_dict_to_official(g.state_dict())
    official = official_weights(golden)
    assert list(back) == list(official) or set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_convert_without_ema(golden, tmp_path):
    """``ema=False`` takes ``model``; so does a file whose ``model_ema`` is None (MAR saved without EMA); a raw
    state dict is taken as it is."""
    model_weights = mar_state_dict_from_official(official_weights(golden, 99))
    for ema_in_file, ema in ((True, False), (False, True)):
        g = load_mar(mar_file(golden, tmp_path / "c.pth", ema=ema_in_file), ema=ema, heads=2)
        assert all(torch.equal(v, model_weights[k]) for k, v in g.state_dict().items() if k in model_weights)
    g = load_mar(mar_file(golden, tmp_path / "raw.pth", wrap=False), heads=2)
    assert torch.equal(g.fake_latent, official_weights(golden)["fake_latent"])


def _published_keys(size: str = "base") -> dict[str, torch.Tensor]:
    """MAR-B's key list (tests/fixtures/mar/keys_mar_base.txt), or L/H built from varkit's config, on meta."""
    if size == "base":
        shapes = {}
        for line in (FIXTURES / "keys_mar_base.txt").read_text().splitlines():
            k, shape, _ = line.split("\t")
            shapes[k] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with params_on_meta():
        g = create_model(f"mar-{size}")
    return {k: torch.empty(v.shape, device="meta") for k, v in mar_state_dict_to_official(g.state_dict()).items()}


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_published_sizes_are_inferred(size):
    sd = mar_state_dict_from_official(_published_keys(size))
    cfg, name = mar_config_from_state_dict(sd)
    assert name == f"mar_{size}" and MAR_DEFAULTS[name]["cfg"] == {"base": 2.9, "large": 3.0, "huge": 3.2}[size]
    with params_on_meta():
        named = create_model(f"mar-{size}")
    assert cfg == named.config
    own = {k: tuple(v.shape) for k, v in named.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in sd.items()}  # MAR-B: exactly the published key list
    assert mar_config_from_state_dict(sd, size=f"mar-{size}")[0] == cfg == mar_config_from_state_dict(sd, size=size)[0]
    with pytest.raises(InvalidArgumentError, match="unknown MAR size"):
        mar_config_from_state_dict(sd, size="giant")


def test_bad_files_fail_with_one_clear_line(golden, tmp_path, tiny_vae):
    stand_in_vae(tmp_path / "kl16.ckpt")
    good = mar_file(golden, tmp_path / "good.pth")
    # kl16.ckpt passed as --mar
    vae_like = {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "quant_conv.weight": torch.zeros(32, 32, 1, 1),
                "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)}
    torch.save({"model": vae_like}, tmp_path / "vae_as_mar.ckpt")
    with pytest.raises(CheckpointError, match="KL-16 VAE.*pass it as --vae"):
        convert_mar(tmp_path / "kl16.ckpt", tmp_path / "vae_as_mar.ckpt", tmp_path / "o1")
    # unknown size: the shapes found are named
    with pytest.raises(CheckpointError, match=r"unknown size \(width 32/48, depth 2\+2, DiffLoss 2x64\)"):
        convert_mar(tmp_path / "kl16.ckpt", good, tmp_path / "o2")
    with pytest.raises(CheckpointError, match="not mar_large"):
        load_mar(mar_file(golden, tmp_path / "x.pth"), size="large", heads=2)
    # truncated and foreign files
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read"):
        convert_mar(tmp_path / "kl16.ckpt", tmp_path / "cut.pth", tmp_path / "o3")
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 4), "layers.0.attention.wqkv.weight": torch.zeros(1)}},
               tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="LlamaGen GPT"):
        load_mar(tmp_path / "gpt.pt")
    sd = official_weights(golden)
    del sd["decoder_blocks.1.mlp.fc2.weight"]
    torch.save({"model_ema": sd}, tmp_path / "holey.pth")
    with pytest.raises(CheckpointError, match="missing 1 keys"):
        load_mar(tmp_path / "holey.pth", heads=2)
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())  # nothing written
    # an existing output folder
    (tmp_path / "exists").mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        convert_mar(tmp_path / "kl16.ckpt", good, tmp_path / "exists", heads=2)


def test_cli_convert_mar(golden, tmp_path, tiny_vae, capsys):
    stand_in_vae(tmp_path / "kl16.ckpt")
    good = mar_file(golden, tmp_path / "good.pth")
    assert cli_main(["convert", "mar", "--vae", str(tmp_path / "kl16.ckpt"), "--mar", str(good), "--out",
                     str(tmp_path / "pipe"), "--heads", "2"]) == 0
    assert "mar_w32_d2" in capsys.readouterr().out
    assert cli_main(["convert", "mar", "--vae", str(tmp_path / "kl16.ckpt"), "--mar", str(good), "--out",
                     str(tmp_path / "pipe2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("varkit: error:") and "unknown size" in err and "\n" not in err
    assert not (tmp_path / "pipe2").exists()


@pytest.mark.slow
def test_convert_with_a_kl16_file(golden, tmp_path):
    """The real loader on a kl16.ckpt-format file (266 MB of synthetic weights): a MAR with 16-channel tokens
    converts; the fixture's 4-channel MAR is refused as not a pair; a MAR file given as --vae is named."""
    from varkit.checkpoints.synthetic import mar_vae_state_dict

    keys = (Path(__file__).parent / "fixtures" / "mar_vae" / "keys.json")
    import json

    meta = json.loads(keys.read_text())
    torch.save({"model": mar_vae_state_dict(meta["keys"], 0)}, tmp_path / "kl16.ckpt")
    g16 = create_model("mar-tiny", token_dim=16)
    torch.save({"model_ema": mar_state_dict_to_official(g16.state_dict())}, tmp_path / "m16.pth")
    pipe = load_pipeline(convert_mar(tmp_path / "kl16.ckpt", tmp_path / "m16.pth", tmp_path / "pipe", heads=2))
    assert pipe.tokenizer.token_shape == (16,) and pipe.generator.config.token_dim == 16
    with pytest.raises(CheckpointError, match="not a MAR pair.*4-channel"):
        convert_mar(tmp_path / "kl16.ckpt", mar_file(golden, tmp_path / "m4.pth"), tmp_path / "o", heads=2)
    with pytest.raises(CheckpointError, match="MAR generator"):
        convert_mar(tmp_path / "m16.pth", tmp_path / "m16.pth", tmp_path / "o", heads=2)
    assert not (tmp_path / "o").exists()
