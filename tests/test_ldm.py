"""varkit.nn.ldm is diffusers' LDM autoencoder: same module tree, parameter names, seeded init and outputs.

For each tokenizer family (LlamaGen's VQ-16 layout, VAR's VQVAE, MAR's KL-16, at small widths) diffusers'
module and ours are built, their state dicts loaded into each other strictly, and the encode/decode outputs
compared in fp32, without and with autograd (the in-place inference path and the training path).

Tolerance: both sides run the same ATen ops in the same order on the same shapes, strides and dtypes in one
process (so the same kernels and the same thread split); ours only does SiLU and the residual add in place
without autograd and skips diffusers' divisions by 1.0 (exact). That gives identical bits (it does on this
machine); 4 ulp of the output's largest magnitude leaves room for an elementwise kernel that would vectorise
the in-place variant differently on another x86-64 CPU (AVX2 or AVX-512/AMX), and is far below any real
difference (a wrong op or order moves fp32 results by >= 1e-5 relative here).
"""
from __future__ import annotations

import copy

import pytest
import torch

from varkit.nn import ldm
from varkit.tokenizers.kl import KLConfig, KLTokenizer
from varkit.tokenizers.msvq import MSVQConfig, MultiScaleVQTokenizer
from varkit.tokenizers.vq import L2VectorQuantizer, VQConfig, VQTokenizer

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, VQModel  # noqa: E402
from diffusers.models.autoencoders.vae import Decoder as DDecoder, Encoder as DEncoder  # noqa: E402

FP32_EPS = torch.finfo(torch.float32).eps


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to 4 ulp of the largest magnitude (see the module docstring)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = got.detach(), want.detach()
    atol = 4 * FP32_EPS * float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= atol, f"max |diff| {err:.3g} > {atol:.3g}"


def load_both_ways(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Same key sets (strict load both ways) and the same module tree; ours gets diffusers' weights."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # same names in the same order
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    theirs.load_state_dict(copy.deepcopy(a), strict=True)
    ours.load_state_dict(b, strict=True)  # diffusers' weights (its own seeded init) back into ours
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


def images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def both_grad_modes():
    return pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])


# -- LlamaGen's VQ layout (VQTokenizer.model) --------------------------------------------------------------
VQ_CFG = VQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=64, codebook_dim=8,
                  norm_groups=8)


def diffusers_vq(cfg: VQConfig) -> VQModel:
    """What VQTokenizer.model was before varkit.nn.ldm: a VQModel with LlamaGen's quantizer swapped in."""
    n = len(cfg.ch_mult)
    m = VQModel(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                act_fn="silu", latent_channels=cfg.z_channels, num_vq_embeddings=cfg.codebook_size,
                norm_num_groups=cfg.norm_groups, vq_embed_dim=cfg.codebook_dim, scaling_factor=1.0,
                norm_type="group", mid_block_add_attention=True)
    m.quantize = L2VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.codebook_l2_norm)
    return m


def test_vq_seeded_init_is_the_diffusers_vqmodels():
    torch.manual_seed(0)
    ours = VQTokenizer(VQ_CFG).model
    torch.manual_seed(0)
    theirs = diffusers_vq(VQ_CFG)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@both_grad_modes()
def test_vq_layout_outputs_equal_diffusers(grad):
    torch.manual_seed(1)
    tok = VQTokenizer(VQ_CFG).eval()
    theirs = diffusers_vq(VQ_CFG).eval()
    load_both_ways(tok.model, theirs)
    x = images()
    with torch.set_grad_enabled(grad):
        z = tok.encode_latents(x)
        assert_same(z, theirs.encode(x).latents)
        assert_same(tok.decode_latents(z), theirs.decode(z, force_not_quantize=True).sample)
    ids = tok.encode(x)  # the lookup on our latents = the lookup on diffusers' latents (same latents)
    with torch.no_grad():
        z_q = tok.quantize.lookup(ids).permute(0, 3, 1, 2).contiguous()
        assert_same(tok.decode(ids), theirs.decode(z_q, force_not_quantize=True).sample)


# -- VAR's VQVAE layout (MultiScaleVQTokenizer.encoder / .decoder) -----------------------------------------
@pytest.mark.parametrize("using_sa,using_mid_sa", [(True, True), (False, False), (True, False)])
@both_grad_modes()
def test_var_layout_outputs_equal_diffusers(using_sa, using_mid_sa, grad):
    cfg = MSVQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=8, codebook_size=32,
                     patch_nums=(1, 2, 4, 8), norm_num_groups=8, using_sa=using_sa, using_mid_sa=using_mid_sa)
    torch.manual_seed(2)
    tok = MultiScaleVQTokenizer(cfg).eval()
    down = ["DownEncoderBlock2D"] * 3
    up = ["UpDecoderBlock2D"] * 3
    if using_sa:
        down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
    enc = DEncoder(in_channels=3, out_channels=8, down_block_types=tuple(down), block_out_channels=(16, 32, 32),
                   layers_per_block=2, norm_num_groups=8, act_fn="silu", double_z=False,
                   mid_block_add_attention=using_mid_sa).eval()
    dec = DDecoder(in_channels=8, out_channels=3, up_block_types=tuple(up), block_out_channels=(16, 32, 32),
                   layers_per_block=2, norm_num_groups=8, act_fn="silu", mid_block_add_attention=using_mid_sa).eval()
    load_both_ways(tok.encoder, enc)
    # msvq's decoder swaps Upsample2D for its fast form (same `conv` key; equal on grids < 32 px, as here)
    a, b = tok.decoder.state_dict(), dec.state_dict()
    assert list(a) == list(b)
    dec.load_state_dict(copy.deepcopy(a), strict=True)
    tok.decoder.load_state_dict(b, strict=True)
    x = images()
    with torch.set_grad_enabled(grad):
        f = tok.encoder(x)
        assert_same(f, enc(x))
        assert_same(tok.decoder(f), dec(f))


def test_decoder_keeps_diffusers_memory_layouts():
    """An attention's output is channels-last; diffusers' residual add keeps that layout, which picks the algorithms
    of the convs after it. Ours must too (an in-place add on the other layout changed results by ~30 ulp)."""
    kw = dict(in_channels=4, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D",
              "UpDecoderBlock2D"), block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, act_fn="silu")
    torch.manual_seed(4)
    ours, theirs = ldm.Decoder(**kw).eval(), DDecoder(**kw).eval()
    load_both_ways(ours, theirs)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        block_in = ours.mid_block(ours.conv_in(z))
        a = ours.up_blocks[0].resnets[1](ours.up_blocks[0].attentions[0](block_in))
        b = theirs.up_blocks[0].resnets[1](theirs.up_blocks[0].attentions[0](block_in), None)
        assert a.stride() == b.stride()
        assert_same(ours(z), theirs(z))


# -- MAR's KL-16 layout and diffusers AutoencoderKL folders (KLTokenizer.model) ----------------------------
KL_CFGS = {
    "mar-kl16-small": KLConfig(block_out_channels=(16, 32, 32), layers_per_block=2, latent_dim=4, norm_groups=8,
                               down_block_types=("DownEncoderBlock2D",) * 2 + ("AttnDownEncoderBlock2D",),
                               up_block_types=("UpDecoderBlock2D",) * 3),
    # what from_diffusers can meet: attention in the decoder, no quant convs, no mid attention, another act_fn
    "sd-like": KLConfig(block_out_channels=(16, 32), layers_per_block=1, latent_dim=4, norm_groups=8,
                        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), use_quant_conv=False,
                        use_post_quant_conv=False, mid_attention=False, act_fn="gelu"),
}


def diffusers_kl(cfg: KLConfig) -> AutoencoderKL:
    return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                         down_block_types=cfg.down_block_types, up_block_types=cfg.up_block_types,
                         block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         act_fn=cfg.act_fn, latent_channels=cfg.latent_dim, norm_num_groups=cfg.norm_groups,
                         use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
                         mid_block_add_attention=cfg.mid_attention)


@pytest.mark.parametrize("name", list(KL_CFGS))
def test_kl_seeded_init_is_the_diffusers_autoencoderkls(name):
    torch.manual_seed(0)
    ours = KLTokenizer(KL_CFGS[name]).model
    torch.manual_seed(0)
    theirs = diffusers_kl(KL_CFGS[name])
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(KL_CFGS))
@both_grad_modes()
def test_kl_layout_outputs_equal_diffusers(name, grad):
    torch.manual_seed(3)
    tok = KLTokenizer(KL_CFGS[name]).eval()
    theirs = diffusers_kl(KL_CFGS[name]).eval()
    load_both_ways(tok.model, theirs)
    with torch.no_grad():  # a wide posterior, so that the clamp of logvar is exercised on both sides
        conv = tok.model.quant_conv if tok.model.quant_conv is not None else tok.model.encoder.conv_out
        conv.bias[tok.latent_dim:] += 40.0
        theirs.load_state_dict(tok.model.state_dict())
    x = images()
    with torch.set_grad_enabled(grad):
        mean, logvar = tok.encode_moments(x)
        post = theirs.encode(x).latent_dist
        assert_same(mean, post.mean)
        assert_same(logvar, post.logvar)
        assert float(logvar.detach().max()) == ldm.LOGVAR_RANGE[1]
        assert_same(tok.decode_latents(mean), theirs.decode(mean).sample)


def test_training_gradients_reach_every_parameter():
    tok = KLTokenizer(KL_CFGS["mar-kl16-small"]).train()
    out = tok(images(), generator=torch.Generator().manual_seed(0))
    tok.training_loss(images(), out)[0].backward()
    missing = [n for n, p in tok.named_parameters() if p.grad is None]
    assert not missing, missing


# -- building blocks ---------------------------------------------------------------------------------------
def test_downsample_pads_bottom_right_then_strides():
    down = ldm.Downsample2D(2)
    x = torch.randn(1, 2, 5, 6)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias,
                                      stride=2)
    assert torch.equal(down(x), want) and down(x).shape == (1, 2, 2, 3)  # 5x6 -> pad 6x7 -> 2x3


def test_upsample_output_size():
    up = ldm.Upsample2D(2)
    assert up(torch.randn(1, 2, 3, 4)).shape == (1, 2, 6, 8)
    assert up(torch.randn(1, 2, 3, 4), output_size=(7, 9)).shape == (1, 2, 7, 9)


def test_bad_layouts_are_one_line_errors():
    from varkit.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unsupported down block"):
        ldm.Encoder(down_block_types=("CrossAttnDownBlock2D",), block_out_channels=(32,))
    with pytest.raises(InvalidArgumentError, match="one block type per level"):
        ldm.Decoder(up_block_types=("UpDecoderBlock2D",), block_out_channels=(32, 32))
    with pytest.raises(InvalidArgumentError, match="multiple of norm_num_groups"):
        ldm.Encoder(block_out_channels=(48,), norm_num_groups=32)
    with pytest.raises(InvalidArgumentError, match="act_fn"):
        ldm.ResnetBlock2D(32, 32, 8, act_fn="tanh")
    with pytest.raises(InvalidArgumentError, match="act_fn"):
        KLTokenizer(KLConfig(act_fn="tanh"))
