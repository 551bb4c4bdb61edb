"""KLTokenizer (continuous tokens on the LDM KL-VAE, in diffusers' AutoencoderKL layout) and the MAR KL-16 converter.

The golden fixture (tests/fixtures/mar_vae/, see its README) holds MAR's official ``models/vae.py`` outputs,
computed in fp64 on synthetic weights that the test regenerates from the stored key list.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from varkit.checkpoints.mar_vae import kl_state_dict_from_ldm, load_mar_vae
from varkit.checkpoints.synthetic import mar_vae_state_dict
from varkit.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError
from varkit.modeling import load_module
from varkit.tokenizers import (KLConfig, KLTokenizer, MultiScaleVQTokenizer, TOKENIZER_CONFIGS, VQTokenizer,
                               create_tokenizer)

FIXTURE = Path(__file__).parent / "fixtures" / "mar_vae"


def _tiny(**kw) -> KLTokenizer:
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, latent_dim=3, norm_groups=4,
               down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.5, kl_weight=1e-3)
    cfg.update(kw)
    return KLTokenizer(KLConfig(**cfg)).eval()


# -- MAR KL-16: golden outputs of the official code ---------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    meta = json.loads((FIXTURE / "keys.json").read_text())
    return meta, load_file(str(FIXTURE / "official_fp64.safetensors"))


@pytest.fixture(scope="module")
def mar_file(golden, tmp_path_factory):
    """A kl16.ckpt-format file ({"model": LDM state dict}) with the fixture's synthetic weights (266 MB)."""
    meta, _ = golden
    path = tmp_path_factory.mktemp("mar") / "kl16.ckpt"
    torch.save({"model": mar_vae_state_dict(meta["keys"], meta["weights_seed"])}, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converted_kl16_matches_official_vae(golden, mar_file, dtype):
    _, ref = golden
    tok = load_mar_vae(mar_file)
    assert tok.config == TOKENIZER_CONFIGS["mar-kl16"][1]
    assert tok.token_shape == (16,) and tok.downsample == 16 and tok.scaling_factor == 0.2325
    assert sum(p.numel() for p in tok.parameters()) == 66_456_019
    tok = tok.to(dtype)
    with torch.no_grad():
        mean, logvar = tok.encode_moments(ref["images"].to(dtype))
        latents = tok.encode(ref["images"].to(dtype))
        decoded = tok.decode(ref["tokens"].to(dtype).permute(0, 2, 3, 1))  # official: decode(tokens / 0.2325)
        recon = tok.decode_latents(ref["mean"].to(dtype))
    outs = {"mean": mean, "logvar": logvar, "decode": decoded, "recon": recon}
    # fp64: summation-order differences only (diffusers' SDPA vs LDM's bmm attention, conv algorithms): each
    # output is ~30 layers of dot products of at most 512*9 terms, bound ~30 * 4608 * 2.2e-16 ~ 3e-11 relative;
    # 1e-9 is far above that and far below the O(0.1) a wrong key mapping gives.
    # fp32 (reference still fp64): the same bound with eps 1.2e-7 is ~2e-2 worst case, but rounding errors
    # add like a random walk (sqrt(4608) ~ 68 per layer, GroupNorm renormalising between layers), ~3e-4; 1e-3
    # of the output's magnitude holds on any CPU's summation order and still catches any mapping error.
    rtol = 1e-9 if dtype == torch.float64 else 1e-3
    for name, got in outs.items():
        want = ref[name]
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= rtol * want.abs().max(), name
    scaled = (ref["mean"] * 0.2325).permute(0, 2, 3, 1)
    assert latents.shape == (2, 2, 2, 16)
    assert (latents.double() - scaled).abs().max() <= rtol * scaled.abs().max()


def test_fixture_key_list_is_mar_kl16_layout(golden):
    meta, ref = golden
    keys = [k for k, _ in meta["keys"]]
    assert len(keys) == 312 and "encoder.down.4.attn.1.q.weight" in keys  # the level-4 attention LDM's converter misses
    shapes = {k: tuple(s) for k, s in meta["keys"]}
    sd = kl_state_dict_from_ldm({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    own = {k: tuple(v.shape) for k, v in KLTokenizer(KLConfig()).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == own  # a 1:1 mapping, shapes included


# -- converter: wrong files ---------------------------------------------------------------------------
def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_load_mar_vae_refuses_other_files(tmp_path):
    t = torch.zeros(2, 2)
    llamagen = {"model": {"encoder.conv_in.weight": t, "encoder.conv_blocks.0.res.0.conv.0.weight": t,
                          "quantize.embedding.weight": t, "quantize.codebook_used": torch.zeros(4)}}
    mar_gen = {"model": {"z_proj.weight": t, "encoder_blocks.0.attn.qkv.weight": t, "diffloss.net.input_proj.weight": t},
               "model_ema": {"z_proj.weight": t}}
    var_vae = {"encoder.conv_in.weight": t, "encoder.down.0.block.0.conv1.weight": t, "quantize.embedding.weight": t,
               "quant_conv.weight": t, "decoder.conv_out.weight": t}
    cases = {
        "llamagen.pt": (llamagen, "LlamaGen VQ tokenizer"),
        "checkpoint-last.pth": (mar_gen, "MAR generator"),
        "vae_ch160v4096z32.pth": (var_vae, "VQ autoencoder"),
        "list.pt": ([1, 2], "not a state dict"),
        "empty.pt": ({"model": {}}, "holds no tensors"),
    }
    for name, (obj, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_mar_vae(_save(tmp_path / name, obj))
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"MAR KL-16 VAE checkpoint \(kl16.ckpt\)"):  # what it expected
        load_mar_vae(tmp_path / "garbage.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_mar_vae(tmp_path / "missing.ckpt")


def test_load_mar_vae_names_other_kl_vaes_and_missing_keys(tmp_path, golden):
    meta, _ = golden
    shapes = {k: tuple(s) for k, s in meta["keys"]}
    # an LDM KL-VAE of another size (e.g. SD's kl-f8: latent 4): described by its shapes
    small = {k: torch.zeros(s) for k, s in shapes.items() if k.startswith(("encoder.conv_in", "decoder.conv_out",
                                                                            "encoder.down.0.block.0"))}
    small["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(CheckpointError, match="latent dim 4, ch 128"):
        load_mar_vae(_save(tmp_path / "kl8.ckpt", {"model": small}))
    # the right layout with one tensor gone: strict loading names it
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # one-element storages: small files
    del sd["encoder.down.4.attn.1.q.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*down_blocks\.4\.attentions\.1\.to_q"):
        load_mar_vae(_save(tmp_path / "cut.ckpt", {"model": sd}))
    sd = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    sd["encoder.down.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key 'encoder.down.0.extra.weight'"):
        load_mar_vae(_save(tmp_path / "extra.ckpt", {"model": sd}))


# -- the tokenizer --------------------------------------------------------------------------------------
def test_token_conventions_and_shapes():
    tok = _tiny()
    assert tok.token_shape == (3,) and tok.downsample == 2 and tok.kind == "continuous"
    assert VQTokenizer.token_shape == () and MultiScaleVQTokenizer.token_shape == ()
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        z = tok.encode(x)
        mean, _ = tok.encode_moments(x)
        img = tok.decode(z)
    assert z.shape == (2, 4, 6, 3) and img.shape == x.shape
    torch.testing.assert_close(z, mean.permute(0, 2, 3, 1) * 0.5, rtol=0, atol=0)  # the same ops, x 0.5: exact
    # decode divides by the factor before post_quant_conv + decoder
    assert torch.equal(img, tok.decode_latents(mean.contiguous()))  # 0.5 is a power of 2: the same values
    with pytest.raises(InvalidArgumentError, match="channels last"):
        tok.decode(z.permute(0, 3, 1, 2))
    with pytest.raises(InvalidArgumentError, match="multiples"):
        tok.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(InvalidArgumentError, match="block_out_channels"):
        _tiny(block_out_channels=(8, 10))


def test_posterior_sampling_is_seeded():
    tok = _tiny()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        a = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        mean = tok.encode(x)
        mu, logvar = tok.encode_moments(x)
    per_image = tok.sample_posterior(mu, logvar, [torch.Generator().manual_seed(i) for i in (5, 6)])
    alone = tok.sample_posterior(mu[1:], logvar[1:], [torch.Generator().manual_seed(6)])
    assert torch.equal(a, b) and not torch.equal(a, mean)
    assert torch.equal(per_image[1:], alone)  # an image's draw does not depend on its batch


def test_training_loss_has_gradients_and_kl():
    tok = _tiny().train()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    loss, metrics = tok.training_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) >= {"recon", "kl", "latent_std"}
    assert abs(loss.item() - (metrics["recon"] + 1e-3 * metrics["kl"])) < 1e-5 * loss.item()  # fp32 sum of 2 terms
    assert tok.model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_save_pretrained_round_trip_is_exact(tmp_path):
    tok = create_tokenizer("digits-kl")
    tok.save_pretrained(tmp_path / "tok")
    back = load_module(tmp_path / "tok")
    assert isinstance(back, KLTokenizer) and back.config == tok.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.encode(x), tok.eval().encode(x))
        z = torch.randn(2, 8, 8, 4)
        assert torch.equal(back.decode(z), tok.decode(z))


def test_named_configs():
    mar = TOKENIZER_CONFIGS["mar-kl16"][1]
    assert mar.block_out_channels == (128, 128, 256, 256, 512) and mar.latent_dim == 16
    digits = create_tokenizer("digits-kl")
    assert digits.downsample == 4 and digits.token_shape == (4,)


# -- diffusers folders ----------------------------------------------------------------------------------
def test_from_diffusers_loads_a_folder_and_its_factors(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    ref = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.3, shift_factor=0.1).eval()
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    tok = KLTokenizer.from_diffusers(tmp_path / "pipe")
    assert tok.scaling_factor == 0.3 and tok.shift_factor == 0.1
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        assert torch.equal(tok.encode(x), ((mean - 0.1) * 0.3).permute(0, 2, 3, 1))
        assert torch.equal(tok.decode_latents(mean), ref.decode(mean).sample)
    # files written before diffusers renamed the attention projections still load
    weights = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    save_file(sd, str(weights))
    assert torch.equal(KLTokenizer.from_diffusers(tmp_path / "pipe" / "vae").decode_latents(mean),
                       tok.decode_latents(mean))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        KLTokenizer.from_diffusers(tmp_path)


# -- training -------------------------------------------------------------------------------------------
def test_train_tokenizer_digits_kl_calibrates_the_scaling_factor(tmp_path, capsys):
    from varkit.cli import main

    assert main(["train", "tokenizer", "--data", "digits", "--config", "digits-kl", "--resolution", "16",
                 "--steps", "2", "--batch-size", "4", "--adversarial", "0.1", "--out", str(tmp_path)]) == 0
    log = [json.loads(x) for x in (tmp_path / "train-tokenizer" / "log.jsonl").read_text().splitlines()]
    assert {"kl", "recon", "d_loss"} <= set(log[-1])
    assert (tmp_path / "tokenizer" / "COMMAND.txt").is_file() and (tmp_path / "train-tokenizer" / "loss.png").is_file()
    tok = load_module(tmp_path / "tokenizer")
    assert isinstance(tok, KLTokenizer) and f"scaling_factor {tok.scaling_factor}" in capsys.readouterr().out
    from varkit.train.data import digits_images

    with torch.no_grad():
        z = tok.encode(digits_images(16)[0])
    # the factor is 1/std over exactly these latents, rounded to 4 significant digits (relative error <= 5e-4)
    assert abs(float(z.double().std()) - 1) < 1e-3


def test_eval_recon_takes_a_continuous_tokenizer(tmp_path, capsys):
    from varkit.eval.cli_commands import main
    from varkit.io import save_image
    from varkit.train.data import digits_images
    from varkit.pipeline import to_pil

    for i, im in enumerate(to_pil(digits_images(16)[0][:6])):
        save_image(im, tmp_path / "imgs" / f"{i}.png")
    _tiny().save_pretrained(tmp_path / "tok")
    assert main(["eval", "recon", "--tokenizer", str(tmp_path / "tok"), "--images", str(tmp_path / "imgs"),
                 "--features", "digits", "--device", "cpu", "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "codebook" not in out
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["psnr"] > 0 and m["rfid"] >= 0 and "codebook_size" not in m


def test_bundled_digits_kl_tokenizer_reconstructs_and_is_unit_scaled():
    from varkit.eval.recon import psnr
    from varkit.pipeline import ASSETS
    from varkit.train.data import digits_images

    tok = load_module(ASSETS / "digits-mar" / "tokenizer")
    assert isinstance(tok, KLTokenizer) and tok.token_shape == (4,) and tok.downsample == 4
    x = digits_images(32)[0][::9]  # 200 of the 1797 digits
    with torch.no_grad():
        z = tok.encode(x)
        rec = tok.decode(z).clamp(-1, 1)
    # measured at training time: 46.6 dB over all digits, scaled std 1.000 over all of them; the bounds below
    # leave room for the subset and are far from fp32 differences between CPUs (~1e-6 relative)
    assert float(psnr((x + 1) / 2, (rec + 1) / 2).mean()) > 40
    assert abs(float(z.std()) - 1) < 0.1
