"""VQTokenizer (LlamaGen-style VQ on the LDM autoencoder in diffusers' VQModel layout): shapes, lookup, persistence, gradients."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from varkit.errors import InvalidArgumentError
from varkit.modeling import load_module
from varkit.tokenizers.vq import VQConfig, VQOutput, VQTokenizer

from numerics import assert_as_accurate

TINY = VQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=64, codebook_dim=4, norm_groups=8)


@pytest.fixture(scope="module")
def tok() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(TINY).eval()


def images(b=2, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_attributes(tok):
    assert tok.kind == "discrete"
    assert tok.downsample == 4
    assert tok.codebook_size == 64 and tok.codebook_dim == 4
    from varkit.nn.ldm import VQAutoencoder

    assert isinstance(tok.model, VQAutoencoder)  # diffusers' VQModel layout (tests/test_ldm.py)
    assert "model.quantize.embedding.weight" in tok.state_dict()


def test_default_config_is_llamagen_vq16():
    with torch.device("meta"):
        model = VQTokenizer()
    assert model.downsample == 16
    # LlamaGen VQ-16 has 71,883,403 parameters (plus the training buffer codebook_used)
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert VQTokenizer.__name__ in __import__("varkit.modeling", fromlist=["x"])._MODULE_CLASSES


def test_encode_decode_shapes(tok):
    x = images()
    ids = tok.encode(x)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    y = tok.decode(ids)
    assert y.shape == (2, 3, 32, 32) and y.dtype == torch.float32
    # non-square images work too
    assert tok.encode(torch.zeros(1, 3, 16, 24)).shape == (1, 4, 6)


def test_codebook_is_l2_normalised_and_ids_are_argmax_cosine():
    torch.manual_seed(3)
    tok = VQTokenizer(TINY).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.mul_(torch.linspace(0.5, 3.0, 64)[:, None])  # non-unit rows
    cb = tok.codebook()
    assert cb.shape == (64, 4)
    torch.testing.assert_close(cb.norm(dim=-1), torch.ones(64))  # fp32 norms of normalised rows: ulps; default tol
    x = images(seed=1)
    with torch.no_grad():
        z = tok.encode_latents(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        cos = F.normalize(z, dim=-1) @ F.normalize(tok.quantize.embedding.weight, dim=-1).t()
    assert torch.equal(tok.encode(x), cos.argmax(dim=-1))


def test_decode_looks_up_normalised_codes(tok):
    ids = torch.randint(0, 64, (1, 4, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z_q = F.normalize(tok.quantize.embedding.weight, dim=-1)[ids].permute(0, 3, 1, 2)
        expected = tok.model.decoder(tok.model.post_quant_conv(z_q))
        m64 = copy.deepcopy(tok.model).double()
        exact = m64.decoder(m64.post_quant_conv(z_q.double()))
        # the same decoder on codes normalised by another path: fp32 noise only, measured against fp64
        assert_as_accurate(tok.decode(ids), expected, exact)


def test_euclidean_lookup_without_l2_norm():
    torch.manual_seed(1)
    model = VQTokenizer(dataclasses.replace(TINY, codebook_l2_norm=False)).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
        x = images(seed=2)
        z = model.encode_latents(x).permute(0, 2, 3, 1)
        d = ((z[..., None, :] - model.quantize.embedding.weight) ** 2).sum(-1)
    assert torch.equal(model.encode(x), d.argmin(-1))
    assert torch.equal(model.codebook(), model.quantize.embedding.weight)


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "vq")
    loaded = load_module(tmp_path / "vq")
    assert isinstance(loaded, VQTokenizer) and loaded.config == tok.config
    assert VQTokenizer.from_pretrained(tmp_path / "vq").config == tok.config
    for (k, a), (k2, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = images(b=1, size=16, seed=4)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    with torch.no_grad():
        # the same weights through the same kernels in one process: bit-identical on any CPU
        torch.testing.assert_close(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)), rtol=0, atol=0)


def test_forward_straight_through_and_losses():
    torch.manual_seed(2)
    model = VQTokenizer(dataclasses.replace(TINY, entropy_loss_ratio=0.1)).train()
    x = images(size=16, seed=5)
    out = model(x)
    assert isinstance(out, VQOutput)
    assert out.recon.shape == x.shape and out.ids.shape == (2, 4, 4)
    assert torch.equal(out.ids, model.encode(x))
    # codebook and commitment losses measure the same distance; commit is weighted by beta
    torch.testing.assert_close(out.commit_loss, 0.25 * out.codebook_loss)  # the same fp32 mean, x 0.25: exact
    assert out.entropy_loss.ndim == 0 and torch.isfinite(out.entropy_loss)

    # the reconstruction alone reaches the encoder (straight-through) but not the codebook
    out.recon.square().mean().backward()
    enc_grad = model.model.encoder.conv_in.weight.grad
    assert enc_grad is not None and enc_grad.abs().sum() > 0
    assert model.model.decoder.conv_out.weight.grad.abs().sum() > 0
    emb_grad = model.quantize.embedding.weight.grad
    assert emb_grad is None or emb_grad.abs().sum() == 0

    # the codebook loss trains the codebook only; the commit loss trains the encoder only
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.codebook_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.model.encoder.conv_in.weight.grad is None
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.commit_loss.backward()
    assert model.quantize.embedding.weight.grad is None
    assert model.model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_entropy_loss_is_zero_by_default(tok):
    out = tok(images(b=1, size=16))
    assert float(out.entropy_loss) == 0.0
    assert torch.isfinite(out.vq_loss)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.encode(torch.zeros(1, 1, 32, 32)),  # wrong channels
        lambda t: t.encode(torch.zeros(3, 32, 32)),  # missing batch dim
        lambda t: t.encode(torch.zeros(1, 3, 30, 32)),  # not a multiple of downsample
        lambda t: t.decode(torch.full((1, 2, 2), 64)),  # id out of range
        lambda t: t.decode(torch.full((1, 2, 2), -1)),
        lambda t: t.decode(torch.zeros(1, 2, 2)),  # float ids
        lambda t: t.decode(torch.zeros(4, dtype=torch.long)),  # wrong rank
    ],
)
def test_bad_inputs_raise(tok, call):
    with pytest.raises(InvalidArgumentError):
        call(tok)


@pytest.mark.parametrize(
    "change",
    [dict(norm_groups=7), dict(ch_mult=(2, 2)), dict(ch_mult=()), dict(codebook_size=0)],
)
def test_bad_config_raises(change):
    with pytest.raises(InvalidArgumentError):
        VQTokenizer(dataclasses.replace(TINY, **change))


def test_training_loss_is_reconstruction_plus_quantizer_losses(tok):
    """The tokenizer owns its training loss: mse + l1 + vq_loss, with the batch's distinct codes as a metric;
    ``out`` reuses a forward already run (DDP / adversarial wrapper) and gives the same loss."""
    x = images()
    with torch.no_grad():
        out = tok(x)
        loss, metrics = tok.training_loss(x, out)
        again, _ = tok.training_loss(x)  # runs the forward itself (deterministic in eval mode)
    recon = F.mse_loss(out.recon, x) + F.l1_loss(out.recon, x)
    assert torch.equal(loss, recon + out.vq_loss) and torch.equal(again, loss)  # the same ops on the same values
    assert set(metrics) == {"recon", "vq", "codes_in_batch"}
    assert metrics["codes_in_batch"] == out.ids.unique().numel()
