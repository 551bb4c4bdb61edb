"""VAR VQVAE converter: golden outputs of the official code, raw-format round trip, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from varkit.checkpoints.synthetic import var_vae_state_dict
from varkit.checkpoints.var_vae import (
    load_var_vae,
    msvq_config_from_var_state_dict,
    msvq_state_dict_from_var,
    msvq_state_dict_to_var,
)
from varkit.errors import CheckpointError, InvalidArgumentError
from varkit.tokenizers.msvq import MSVQConfig, MultiScaleVQTokenizer

from numerics import assert_nearest_codes_match, squared_distances

FIXTURE = Path(__file__).parent / "fixtures" / "var_vae"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    ref = load_file(str(FIXTURE / "official_outputs.safetensors"))
    sd = var_vae_state_dict(meta["var_state_dict_keys"], meta["recipe"]["seed"], meta["recipe"]["emb_scale"])
    path = tmp_path_factory.mktemp("var") / "vae.pth"
    torch.save(sd, path)
    model = load_var_vae(path, patch_nums=meta["config"]["patch_nums"])
    return meta, ref, model


def _ids(ref, n):
    return [ref[f"ids.{si}"] for si in range(n)]


@torch.no_grad()
def _distances_along(m, images, ids):
    """distances(si) for assert_nearest_codes_match: VAR's residual at scale si after the golden ids of
    the earlier scales, (area-)downsampled, against every code."""
    f = m.encode_latent(images).float()
    pns = m.patch_nums

    def distances(si):
        f_hat = torch.zeros_like(f)
        for sj in range(si):
            f_hat, _ = m.next_scale_input(sj, ids[sj], None if sj == 0 else f_hat)
        rest = f - f_hat
        z = rest if si == len(pns) - 1 else torch.nn.functional.interpolate(rest, size=(pns[si], pns[si]), mode="area")
        d, scale = squared_distances(z.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), m.codebook())
        return d.view(f.shape[0], -1, d.shape[-1]), scale

    return distances


def test_golden_encode(golden):
    meta, ref, m = golden
    assert m.patch_nums == tuple(meta["config"]["patch_nums"])
    with torch.no_grad():
        # fp32 conv encoder with attention (K <= 64·9 = 576 per conv), latents ~1: ~1e-6 from exact;
        # 1e-4 holds on any CPU's kernels
        torch.testing.assert_close(m.encode_latent(ref["images"]), ref["latent"], atol=1e-4, rtol=0)
        ids = m.encode(ref["images"])
    want = _ids(ref, len(m.patch_nums))
    for si, a in enumerate(ids):
        assert a.shape == (2, m.patch_nums[si], m.patch_nums[si])
    # made on another CPU: equal wherever the distances decide it (a near-tie may flip, and the later scales)
    assert_nearest_codes_match([a.reshape(2, -1) for a in ids], want, _distances_along(m, ref["images"], want))


def test_golden_decode(golden):
    _, ref, m = golden
    ids = _ids(ref, len(m.patch_nums))
    with torch.no_grad():
        # fp32 conv decoder with attention (K <= 64·9 = 576 per conv, pixels <= 1): 1.4e-5 measured against
        # the fixture (AVX2), ~1e-5 on any CPU's kernels; 1e-4
        torch.testing.assert_close(m.decode(ids), ref["decode"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(ids[:4]), ref["decode_prefix.3"], atol=1e-4, rtol=0)


def test_golden_generator_helpers(golden):
    _, ref, m = golden
    ids = _ids(ref, len(m.patch_nums))
    with torch.no_grad():
        # code lookups, bicubic / area interpolation and 3x3 Phi convs (K = 8·9 = 72) of latents ~0.2: a few
        # ulp x sqrt(K) ~ 1e-7 (exact measured against the fixture on AMX and AVX2); 1e-6 on any CPU, here and below
        torch.testing.assert_close(m.teacher_forcing_inputs(ids), ref["teacher_forcing"], atol=1e-6, rtol=0)
        f_hat = None
        for si in range(len(m.patch_nums)):
            f_hat, nxt = m.next_scale_input(si, ids[si], f_hat)
            if si < len(m.patch_nums) - 1:
                torch.testing.assert_close(nxt, ref[f"next_input.{si}"], atol=1e-6, rtol=0)
            else:
                assert nxt is None
        torch.testing.assert_close(f_hat, ref["ar_fhat"], atol=1e-6, rtol=0)


def test_golden_training_forward(golden):
    _, ref, m = golden
    with torch.no_grad():
        out = m(ref["images"])
    if not all(torch.equal(a.reshape(2, -1), b) for a, b in zip(out.ids, _ids(ref, len(m.patch_nums)))):
        # the last scale has a near-tie (distance gap 6.6e-5 at scale 7.5, about 5x the fp32 noise): a CPU may
        # pick the other code there (test_golden_encode checks it is that near-tie), and the reconstruction
        # then differs from the fixture's by design
        pytest.skip("a near-tie code flipped on this CPU: the official forward is not comparable")
    # encoder + decoder in fp32 (K <= 576 per conv, pixels ~1): ~1e-5 at most; 1e-4 holds on any CPU
    torch.testing.assert_close(out.recon, ref["forward_recon"], atol=1e-4, rtol=0)
    # mean of squared latent residuals: each ~1e-6 relative from exact, the mean as well; 1e-5 relative
    # (+1e-6 absolute on a loss ~0.1-1) holds on any CPU
    torch.testing.assert_close(out.vq_loss.reshape(1), ref["forward_vq_loss"], atol=1e-6, rtol=1e-5)


TINY = MSVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, codebook_size=16, patch_nums=(1, 2, 4))


@pytest.mark.parametrize("share", [0, 1, 2, 4])
def test_roundtrip_raw_var_format(tmp_path, share):
    cfg = MSVQConfig(**{**TINY.__dict__, "share_quant_resi": share})
    model = MultiScaleVQTokenizer(cfg)
    raw = msvq_state_dict_to_var(model.state_dict(), cfg)
    assert raw["quantize.ema_vocab_hit_SV"].shape == (3, 16)
    assert "encoder.mid.attn_1.qkv.weight" in raw and raw["encoder.mid.attn_1.qkv.weight"].shape == (192, 64, 1, 1)
    torch.save(raw, tmp_path / "vae.pth")
    loaded = load_var_vae(tmp_path / "vae.pth", patch_nums=cfg.patch_nums)
    assert loaded.config == cfg
    own, back = model.state_dict(), loaded.state_dict()
    assert set(own) == set(back)
    for k in own:
        assert torch.equal(own[k], back[k]), k


def test_key_mapping_covers_published_file():
    """Every key of the published vae_ch160v4096z32.pth maps, and the config is VAR's default."""
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoint_keys" / "keys_var_vae_ch160v4096z32.txt"
    model = MultiScaleVQTokenizer(MSVQConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    raw = msvq_state_dict_to_var({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    if ref.is_file():
        published = {}
        for line in ref.read_text().splitlines():
            key, shape, _ = line.split("\t")
            published[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        assert {k: tuple(v.shape) for k, v in raw.items()} == published
    meta_sd = {k: torch.empty(v.shape, device="meta") for k, v in raw.items()}
    assert msvq_config_from_var_state_dict(meta_sd) == MSVQConfig()
    conv = msvq_state_dict_from_var(meta_sd)
    assert {k: tuple(v.shape) for k, v in conv.items()} == shapes


def test_not_a_var_file(tmp_path):
    llamagen = {"model": {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
                          "encoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                          "quantize.embedding.weight": torch.zeros(8, 2),
                          "quantize.codebook_used": torch.zeros(8)}}
    torch.save(llamagen, tmp_path / "vq_ds16_c2i.pt")
    with pytest.raises(CheckpointError, match="LlamaGen"):
        load_var_vae(tmp_path / "vq_ds16_c2i.pt")
    torch.save({"class_emb.weight": torch.zeros(3, 2), "blocks.0.attn.proj.weight": torch.zeros(2, 2)}, tmp_path / "var_d16.pth")
    with pytest.raises(CheckpointError, match="VAR transformer"):
        load_var_vae(tmp_path / "var_d16.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_var_vae(tmp_path / "tensor.pth")


def test_truncated_and_missing_file(tmp_path):
    model = MultiScaleVQTokenizer(TINY)
    torch.save(msvq_state_dict_to_var(model.state_dict(), TINY), tmp_path / "vae.pth")
    data = (tmp_path / "vae.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_var_vae(tmp_path / "cut.pth", patch_nums=TINY.patch_nums)
    with pytest.raises(CheckpointError, match="not found"):
        load_var_vae(tmp_path / "nope.pth")


def test_bad_schedule(tmp_path):
    model = MultiScaleVQTokenizer(TINY)
    torch.save(msvq_state_dict_to_var(model.state_dict(), TINY), tmp_path / "vae.pth")
    with pytest.raises(InvalidArgumentError, match="no scale schedule"):
        load_var_vae(tmp_path / "vae.pth", resolution=384)
    with pytest.raises(InvalidArgumentError, match="strictly increasing"):
        load_var_vae(tmp_path / "vae.pth", patch_nums=(1, 3, 2, 4))
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        load_var_vae(tmp_path / "vae.pth", patch_nums=(4,))
    with pytest.raises(InvalidArgumentError, match="trained with 3 scales"):
        load_var_vae(tmp_path / "vae.pth")   # 3-row ema buffer and no schedule given
    m = load_var_vae(tmp_path / "vae.pth", patch_nums=(1, 2, 3, 5))   # another schedule is fine
    with pytest.raises(InvalidArgumentError, match="images must be 10x10"):
        m.encode(torch.zeros(1, 3, 8, 8))


def test_var_training_checkpoint_wrapper(tmp_path):
    """VAR's ar-ckpt files keep the VQVAE under ['trainer']['vae_local']."""
    model = MultiScaleVQTokenizer(TINY)
    raw = msvq_state_dict_to_var(model.state_dict(), TINY)
    torch.save({"epoch": 1, "trainer": {"vae_local": raw, "var_wo_ddp": {}}}, tmp_path / "ar-ckpt-last.pth")
    loaded = load_var_vae(tmp_path / "ar-ckpt-last.pth", patch_nums=TINY.patch_nums)
    assert torch.equal(loaded.codebook(), model.codebook())
