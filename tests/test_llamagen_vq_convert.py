"""LlamaGen VQ checkpoint conversion: golden outputs of the official code, round trips, bad files.

The golden fixture (tests/fixtures/llamagen_vq/tiny_vq.pt) was made with LlamaGen's own
``vq_model.py``; see tests/fixtures/llamagen_vq/README.md. These tests need no LlamaGen code.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from varkit.checkpoints.llamagen_vq import (
    convert_llamagen_vq,
    load_llamagen_vq,
    vq_config_from_llamagen_state_dict,
    vq_state_dict_from_llamagen,
    vq_state_dict_to_llamagen,
)
from varkit.checkpoints.synthetic import llamagen_vq_state_dict
from varkit.errors import CheckpointError
from varkit.modeling import load_module
from varkit.tokenizers.vq import VQConfig, VQTokenizer

from numerics import assert_nearest_codes_match, squared_distances

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen_vq" / "tiny_vq.pt"


@pytest.fixture(scope="module")
def golden():
    fx = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    sd = llamagen_vq_state_dict(zip(fx["keys"], fx["shapes"]), fx["seed"])  # + codebook_used, as real files
    cfg = fx["config"]
    tok = VQTokenizer(
        vq_config_from_llamagen_state_dict(sd, entropy_loss_ratio=cfg["entropy_loss_ratio"], commit_beta=cfg["commit_beta"])
    )
    tok.load_state_dict(vq_state_dict_from_llamagen(sd), strict=True)
    return fx, sd, tok.eval()


def test_config_inferred_from_shapes(golden):
    fx, sd, tok = golden
    cfg = fx["config"]
    assert tok.config.ch == cfg["ch"] and tok.config.ch_mult == tuple(cfg["ch_mult"])
    assert tok.config.num_res_blocks == cfg["num_res_blocks"] and tok.config.z_channels == cfg["z_channels"]
    assert (tok.config.codebook_size, tok.config.codebook_dim) == (cfg["codebook_size"], cfg["codebook_dim"])
    assert tok.config.norm_groups == 32 and tok.config.codebook_l2_norm and tok.downsample == 4


def test_inverse_mapping_gives_official_names_and_shapes(golden):
    fx, sd, tok = golden
    back = vq_state_dict_to_llamagen(tok.state_dict())
    assert sorted(back) == sorted(fx["keys"])  # exactly LlamaGen's names (less codebook_used)
    for k, shape in zip(fx["keys"], fx["shapes"]):
        assert list(back[k].shape) == shape and torch.equal(back[k], sd[k])


def _assert_official_ids(tok, images, got, want):
    """Made on another CPU: equal wherever the distances decide it (the fixture's smallest
    nearest-vs-second gap is 5.5e-3 on unit vectors, far above fp32 noise)."""
    def distances(si):
        with torch.no_grad():
            z = tok.encode_latents(images)
        z = tok.quantize.project(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        d, scale = squared_distances(z, tok.codebook())
        return d.view(len(images), -1, d.shape[-1]), scale

    assert_nearest_codes_match([got.flatten(1)], [want.flatten(1)], distances)


def test_encode_matches_official(golden):
    fx, _, tok = golden
    _assert_official_ids(tok, fx["images"], tok.encode(fx["images"]), fx["ids"])


def test_decode_matches_official(golden):
    fx, _, tok = golden
    with torch.no_grad():
        # fp32 conv decoder (K <= 128·9 = 1152 per conv, pixels ~2): a few ulp x sqrt(K) per layer, ~1e-5
        # over the net (2.7e-5 measured at full VQ-16 size, README); 1e-4 holds on any CPU's kernels
        torch.testing.assert_close(tok.decode(fx["ids"]), fx["decoded"], rtol=0, atol=1e-4)
        torch.testing.assert_close(tok.decode(fx["random_ids"]), fx["decoded_random"], rtol=0, atol=1e-4)


def test_forward_and_losses_match_official(golden):
    fx, _, tok = golden
    with torch.no_grad():
        out = tok(fx["images"])
    torch.testing.assert_close(out.recon, fx["recon"], rtol=0, atol=1e-4)  # encoder + decoder: as decode above
    _assert_official_ids(tok, fx["images"], out.ids, fx["ids"])
    # losses: means over 2·4·4 latents of squared differences of fp32 latents (relative error ~1e-6 each)
    # and an entropy of softmaxed distances: ~1e-6 relative; rtol 1e-4 holds on any CPU
    for name in ("codebook_loss", "commit_loss", "entropy_loss"):
        torch.testing.assert_close(getattr(out, name), fx[name], rtol=1e-4, atol=1e-6)


# -- round trip through a file written as LlamaGen writes it ------------------------------------
SMALL = VQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=64, codebook_dim=4, norm_groups=32)


@pytest.fixture(scope="module")
def random_tok():
    torch.manual_seed(0)
    tok = VQTokenizer(SMALL)
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok.eval()


def llamagen_file(tok, path, wrap="model", prefix=""):
    sd = {prefix + k: v.clone() for k, v in vq_state_dict_to_llamagen(tok.state_dict()).items()}
    sd[prefix + "quantize.codebook_used"] = torch.zeros(65536)
    if wrap is None:
        obj = sd
    else:
        obj = {wrap: sd, "steps": 100, "args": None}
        if wrap == "model":
            obj["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "wrap,prefix", [("model", ""), ("ema", ""), ("state_dict", ""), (None, ""), ("model", "module.")]
)
def test_round_trip_through_llamagen_file(random_tok, tmp_path, wrap, prefix):
    path = llamagen_file(random_tok, tmp_path / "vq.pt", wrap, prefix)
    loaded = load_llamagen_vq(path)
    assert loaded.config == random_tok.config
    own, new = random_tok.state_dict(), loaded.state_dict()
    assert list(own) == list(new)
    assert all(torch.equal(own[k], new[k]) for k in own)
    assert not loaded.training


def test_use_ema_prefers_ema(random_tok, tmp_path):
    sd = vq_state_dict_to_llamagen(random_tok.state_dict())
    ema = {k: v + 1.0 for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema}, tmp_path / "both.pt")
    w = "model.quantize.embedding.weight"
    assert torch.equal(load_llamagen_vq(tmp_path / "both.pt").state_dict()[w], sd["quantize.embedding.weight"])
    assert torch.equal(load_llamagen_vq(tmp_path / "both.pt", use_ema=True).state_dict()[w], ema["quantize.embedding.weight"])


def test_convert_writes_a_varkit_folder(random_tok, tmp_path):
    path = llamagen_file(random_tok, tmp_path / "vq.pt")
    convert_llamagen_vq(path, tmp_path / "out")
    loaded = load_module(tmp_path / "out")
    assert isinstance(loaded, VQTokenizer) and loaded.config == random_tok.config
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), random_tok.encode(x))


# -- bad inputs ---------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg
    return msg


def test_gpt_checkpoint_is_rejected(tmp_path):
    gpt = {
        "tok_embeddings.weight": torch.zeros(64, 16),
        "cls_embedding.embedding_table.weight": torch.zeros(11, 16),
        "layers.0.attention.wqkv.weight": torch.zeros(48, 16),
        "norm.weight": torch.zeros(16),
        "output.weight": torch.zeros(64, 16),
    }
    torch.save({"model": gpt}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError) as info:
        load_llamagen_vq(tmp_path / "gpt.pt")
    assert "GPT" in _one_line(info.value)


def test_var_checkpoint_is_rejected(tmp_path):
    var = {"word_embed.weight": torch.zeros(16, 32), "class_emb.weight": torch.zeros(11, 16),
           "blocks.0.attn.mat_qkv.weight": torch.zeros(48, 16)}
    torch.save(var, tmp_path / "var.pt")
    with pytest.raises(CheckpointError) as info:
        load_llamagen_vq(tmp_path / "var.pt")
    _one_line(info.value)
    msvq = {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3),
            "quantize.quant_resi.qresi_ls.0.weight": torch.zeros(4, 4, 3, 3)}
    torch.save(msvq, tmp_path / "msvq.pt")
    with pytest.raises(CheckpointError, match="taming"):
        load_llamagen_vq(tmp_path / "msvq.pt")


def test_truncated_file_is_rejected(random_tok, tmp_path):
    path = llamagen_file(random_tok, tmp_path / "vq.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_llamagen_vq(path)
    _one_line(info.value)


def test_incomplete_state_dict_is_rejected(random_tok, tmp_path):
    sd = vq_state_dict_to_llamagen(random_tok.state_dict())
    del sd["decoder.conv_blocks.0.attn.0.q.weight"]
    torch.save({"model": sd}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="missing 1 keys"):
        load_llamagen_vq(tmp_path / "part.pt")
    sd["decoder.conv_blocks.0.attn.0.q.weight"] = torch.zeros(64, 64, 1, 1)
    sd["encoder.extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="not part of a LlamaGen VQ"):
        load_llamagen_vq(tmp_path / "extra.pt")


def test_other_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_llamagen_vq(tmp_path / "missing.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError):
        load_llamagen_vq(tmp_path / "tensor.pt")
    torch.save({"model": {"steps": 3}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError):
        load_llamagen_vq(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        load_llamagen_vq(tmp_path / "text.pt")


def test_asymmetric_decoder_is_rejected(random_tok):
    sd = vq_state_dict_to_llamagen(random_tok.state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.conv_blocks.0.res.1.")}
    with pytest.raises(CheckpointError, match="one more"):
        vq_config_from_llamagen_state_dict(sd)


def test_varkit_state_dict_is_not_llamagen(random_tok):
    with pytest.raises(CheckpointError, match="varkit"):
        vq_state_dict_from_llamagen(random_tok.state_dict())
    with pytest.raises(CheckpointError):
        vq_state_dict_to_llamagen({"model.encoder.nonsense.weight": torch.zeros(1)})
