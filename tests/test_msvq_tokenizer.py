"""MultiScaleVQTokenizer (VAR's multi-scale residual VQ) on a tiny config."""
from __future__ import annotations

import copy

import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.modeling import load_module
from varkit.tokenizers.msvq import MSVQConfig, MultiScaleVQTokenizer, phi_schedule

from numerics import assert_as_accurate

# the size of the bundled digits-var tokenizer (the golden test in test_var_vae_convert.py uses ch=32)
CFG = MSVQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=64,
                 patch_nums=(1, 2, 3, 4, 6, 8), norm_num_groups=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiScaleVQTokenizer(CFG).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():   # codebook at the scale of the latent, so quantisation is meaningful
        m.quantizer.embedding.weight.normal_(0, m.encode_latent(x).std().item())
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1


def test_attributes(model):
    assert model.kind == "discrete"
    assert model.patch_nums == (1, 2, 3, 4, 6, 8)
    assert model.codebook_size == 64 and model.codebook_dim == 8 and model.downsample == 4
    assert model.image_size == 32 and model.latent_size == 8 and model.num_tokens == 1 + 4 + 9 + 16 + 36 + 64
    assert model.codebook().shape == (64, 8)


def test_phi_schedule_matches_var():
    assert phi_schedule(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_schedule(10, 1) == (0,) * 10
    assert phi_schedule(6, 0) == tuple(range(6))


def test_encode_shapes_and_range(model, images):
    ids = model.encode(images)
    assert len(ids) == len(CFG.patch_nums)
    for idx, pn in zip(ids, CFG.patch_nums):
        assert idx.shape == (3, pn, pn) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < CFG.codebook_size
    assert len(torch.cat([i.flatten() for i in ids]).unique()) > 5


def test_decode_shape_range_and_flat_ids(model, images):
    ids = model.encode(images)
    with torch.no_grad():
        out = model.decode(ids)
        flat = model.decode([i.reshape(3, -1) for i in ids])
    assert out.shape == (3, 3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, flat)


def _prefix_errors(m, images):
    with torch.no_grad():
        f = m.encode_latent(images)
        ids = m.latent_to_ids(f)
        lat = [(m.ids_to_fhat(ids[:k]) - f).pow(2).mean().item() for k in range(1, len(ids) + 1)]
        target = m.decode_fhat(f)
        img = [(m.decode(ids[:k]) - target).pow(2).mean().item() for k in range(1, len(ids) + 1)]
    return lat, img


def test_more_scales_reconstruct_better(model, images):
    # with random Phi convs only the overall trend is guaranteed
    lat, img = _prefix_errors(model, images)
    assert lat[-1] < lat[0] and img[-1] < img[0], (lat, img)
    # with identity Phis (quant_resi=0) each added scale lowers the latent error
    torch.manual_seed(0)
    m = MultiScaleVQTokenizer(MSVQConfig(**{**CFG.__dict__, "quant_resi": 0.0})).eval()
    assert len(m.quantizer.phis) == 0 and m.phi_schedule == (-1,) * 6
    with torch.no_grad():
        m.quantizer.embedding.weight.normal_(0, m.encode_latent(images).std().item())
    lat, img = _prefix_errors(m, images)
    # non-increasing up to fp32 round-off of mean squares of latents ~1 (~1e-7 relative; 1e-6 allowed)
    assert all(b <= a + 1e-6 for a, b in zip(lat, lat[1:])), lat
    assert lat[-1] < 0.7 * lat[0] and img[-1] < 0.8 * img[0], (lat, img)


def test_generator_helpers_consistent(model, images):
    ids = model.encode(images)
    B, S = 3, len(CFG.patch_nums)
    with torch.no_grad():
        tf = model.teacher_forcing_inputs(ids)
        assert tf.shape == (B, model.num_tokens - 1, CFG.z_channels)
        assert torch.equal(tf, model.teacher_forcing_inputs(ids[:-1]))
        f_hat, chunks = None, []
        for si in range(S):
            before = None if f_hat is None else f_hat.clone()
            new, nxt = model.next_scale_input(si, ids[si].reshape(B, -1), f_hat)
            if before is not None:
                assert torch.equal(f_hat, before), "f_hat must not be modified in place"
            # soft-embedding path (VAR's more_smooth) with one-hot weights gives the same result
            emb = model.codebook()[ids[si].reshape(B, -1)]
            new2, nxt2 = model.next_scale_input(si, emb, f_hat)
            torch.testing.assert_close(new2, new)  # the same rows gathered two ways: exact; default fp32 tolerances
            f_hat = new
            if si < S - 1:
                assert nxt.shape == (B, CFG.patch_nums[si + 1] ** 2, CFG.z_channels)
                chunks.append(nxt)
            else:
                assert nxt is None
        # the same interpolations / 1x1 convs / sums on latents ~1 (K <= 8), batched or scale by scale: a few
        # ulp (~1e-7); 1e-6 holds on any CPU (exact measured on AMX and AVX2)
        torch.testing.assert_close(torch.cat(chunks, 1), tf, atol=1e-6, rtol=0)
        torch.testing.assert_close(f_hat, model.ids_to_fhat(ids), atol=1e-6, rtol=0)
        # then the same decoder on those latents: its fp32 error (~1e-6 of pixels <= 1) on top; 1e-5
        torch.testing.assert_close(model.decode_fhat(f_hat), model.decode(ids), atol=1e-5, rtol=0)


def test_save_load_roundtrip(model, images, tmp_path):
    model.save_pretrained(tmp_path / "msvq")
    loaded = load_module(tmp_path / "msvq")
    assert isinstance(loaded, MultiScaleVQTokenizer)
    assert loaded.config == model.config and loaded.patch_nums == model.patch_nums
    a, b = model.encode(images), loaded.encode(images)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(model.decode(a), loaded.decode(b))


def test_gradients_flow(images):
    torch.manual_seed(0)
    m = MultiScaleVQTokenizer(CFG).train()
    out = m(images)
    assert out.recon.shape == images.shape and len(out.ids) == len(CFG.patch_nums)
    assert out.f_hat.shape == (3, 8, 8, 8) and 0 < out.usage.item() <= 1
    loss = (out.recon - images).pow(2).mean() + out.vq_loss
    loss.backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                 "quantizer.embedding.weight", "quantizer.phis.0.weight", "quantizer.phis.3.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_inputs(model):
    with pytest.raises(InvalidArgumentError, match="images must be 32x32"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidArgumentError, match="ids of scale 1"):
        model.decode([torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long)])
    with pytest.raises(InvalidArgumentError, match="scale index"):
        model.next_scale_input(6, torch.zeros(1, 1, dtype=torch.long), None)
    with pytest.raises(InvalidArgumentError, match="strictly increasing"):
        MultiScaleVQTokenizer(MSVQConfig(**{**CFG.__dict__, "patch_nums": (1, 3, 2)}))
    with pytest.raises(InvalidArgumentError, match="ch_mult must start with 1"):
        MultiScaleVQTokenizer(MSVQConfig(**{**CFG.__dict__, "ch_mult": (2, 2)}))


# -- the decoder's inference paths ----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_upsample2x_conv3x3_equals_upsample_then_conv(bias):
    from varkit.tokenizers.msvq import upsample2x_conv3x3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g)
    w = torch.randn(4, 6, 3, 3, generator=g)
    b = torch.randn(4, generator=g) if bias else None
    def plain(x, w, b):
        return torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)

    want = plain(x, w, b)
    got = upsample2x_conv3x3(x, w, b)
    assert got.shape == want.shape == (2, 4, 10, 14)
    # other sums of the same 54 products (pre-summed taps): as accurate as the plain conv, against fp64
    assert_as_accurate(got, want, plain(x.double(), w.double(), None if b is None else b.double()))


def test_decoder_inference_paths_match_diffusers_forward(monkeypatch):
    """The fast upsampler and the in-place ResNet path give diffusers' decoder results without autograd, and the
    upsampler keeps diffusers' Upsample2D math in training."""
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.vae import Decoder as DiffusersDecoder
    from diffusers.models.upsampling import Upsample2D
    import varkit.tokenizers.msvq as msvq

    torch.manual_seed(0)
    cfg = MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                     patch_nums=(1, 2, 4, 32), norm_num_groups=4)
    m = MultiScaleVQTokenizer(cfg).eval()
    ups = [u for b in m.decoder.up_blocks for u in (b.upsamplers or [])]
    assert ups and all(isinstance(u, msvq._UpsampleConv) for u in ups)
    ref = DiffusersDecoder(in_channels=4, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D",
                           "UpDecoderBlock2D"), block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                           act_fn="silu").eval()
    ref.load_state_dict(m.decoder.state_dict(), strict=True)
    monkeypatch.setattr(msvq._UpsampleConv, "min_side", 1)   # every level takes the low-resolution form
    f_hat = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        fast = m.decode_fhat(f_hat)
        z = m.post_quant_conv(f_hat)
        plain = ref(z).clamp(-1, 1)
        exact = copy.deepcopy(ref).double()(z.double()).clamp(-1, 1)
    # other sums of the same products through the whole decoder: as accurate as diffusers' own path (fp64)
    assert_as_accurate(fast, plain, exact)
    assert not torch.equal(fast, torch.zeros_like(fast))
    monkeypatch.setattr(msvq._UpsampleConv, "min_side", 10**9)
    with torch.no_grad():  # without the low-resolution form: the in-place ResNet path gives diffusers' values
        direct = m.decode_fhat(f_hat)
    # the same ops on the same memory layouts (tests/test_ldm.py): equal here; 4 ulp of the largest value leaves
    # room for an elementwise kernel that vectorises the in-place SiLU/add differently on another x86-64 CPU
    assert float((direct - plain).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(plain.abs().max())
    # with autograd: the direct form (diffusers' Upsample2D math), gradients reach the upsampler's conv
    up = ups[0]
    ref = Upsample2D(up.conv.in_channels, use_conv=True, out_channels=up.conv.out_channels)
    ref.conv = up.conv
    x = torch.randn(1, up.conv.in_channels, 4, 4, requires_grad=True)
    y = up(x)
    assert torch.equal(y, ref(x))
    y.sum().backward()
    assert up.conv.weight.grad is not None and x.grad is not None


def test_training_loss_is_reconstruction_plus_quantizer_loss(model, images):
    """The tokenizer owns its training loss: mse + l1 + the scale-averaged vq_loss, with the distinct codes over
    all scales as a metric; ``out`` reuses a forward already run and gives the same loss."""
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(images)
        loss, metrics = model.training_loss(images, out)
        again, _ = model.training_loss(images)  # runs the forward itself (deterministic in eval mode)
    recon = F.mse_loss(out.recon, images) + F.l1_loss(out.recon, images)
    assert torch.equal(loss, recon + out.vq_loss) and torch.equal(again, loss)  # the same ops on the same values
    assert set(metrics) == {"recon", "vq", "codes_in_batch"}
    assert metrics["codes_in_batch"] == torch.cat([i.flatten() for i in out.ids]).unique().numel()
