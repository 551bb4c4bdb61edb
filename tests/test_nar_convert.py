"""NAR checkpoint conversion: golden outputs of NAR's official code, NAR's file format, bad files.

The golden fixture (tests/fixtures/nar/tiny_nar.pt) was made with NAR's own ``gpt.py``,
``generate.py`` and (LlamaGen's) ``vq_model.py``; see tests/fixtures/nar/README.md. These tests
need no NAR code.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from varkit.checkpoints.llamagen_vq import vq_state_dict_to_llamagen
from varkit.checkpoints.nar import (
    add_nar_arguments,
    cmd_convert_nar,
    convert_nar,
    load_nar_gpt,
    nar_config_from_state_dict,
    nar_state_dict_from_official,
    nar_state_dict_to_official,
)
from varkit.checkpoints.synthetic import llamagen_gpt_state_dict, llamagen_vq_state_dict
from varkit.errors import CheckpointError, InvalidArgumentError, VarkitError
from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator
from varkit.pipeline import load_pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.tokenizers import VQConfig, VQTokenizer

from numerics import assert_greedy_tokens_match

FIXTURE = Path(__file__).parent / "fixtures" / "nar" / "tiny_nar.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def vq_file(golden, tmp_path_factory):
    sd = llamagen_vq_state_dict(zip(golden["vq_keys"], golden["vq_shapes"]), golden["vq_seed"])
    path = tmp_path_factory.mktemp("vq") / "vq_ds4_tiny.pt"
    torch.save({"model": sd}, path)
    return path


def nar_file(golden, name, path, wrap="model", prefix=""):
    m = golden["models"][name]
    sd = llamagen_gpt_state_dict(zip(m["gpt_keys"], m["gpt_shapes"]), m["config"]["seed"])  # LlamaGen's GPT + medusa
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save(sd if wrap is None else {wrap: sd, "steps": 10}, path)
    return path


@pytest.fixture(scope="module")
def pipes(golden, vq_file, tmp_path_factory):
    """Each fixture model written in NAR's format ({"model": ...}) and converted with ``convert_nar``."""
    out = {}
    for name, m in golden["models"].items():
        c = m["config"]
        d = tmp_path_factory.mktemp(name)
        gpt = nar_file(golden, name, d / "last_version.pt")
        pipe = load_pipeline(convert_nar(vq_file, gpt, d / "pipe", image_size=4 * c["grid"], medusa_layers=c["medusa"]))
        g = pipe.generator.config
        assert (g.dim, g.n_layer, g.n_head, g.medusa_layers, g.grid) == (
            c["dim"], c["n_layer"], c["n_head"], c["medusa"], c["grid"])
        out[name] = pipe
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny_m2"])
def test_greedy_tokens_and_pixels_match_official(golden, pipes, name):
    m = golden["models"][name]
    pipe = pipes[name]
    gen, L = pipe.generator, pipe.generator.layout
    labels = torch.tensor(golden["labels"])
    for case in m["cases"]:
        params = SamplingParams(cfg=case["cfg"], top_k=1)
        res = get_sampler("ancestral", params).sample(gen, labels, image_generators(0, 2))
        assert res.stats.forward_passes == 2 * m["config"]["grid"] - 1
        # made on another CPU: equal wherever the logits decide it (fixture's smallest top-2 gap 3.3e-3)
        want = L.from_grids(case["tokens"].view(2, m["config"]["grid"], m["config"]["grid"]))
        assert_greedy_tokens_match(gen, labels, params, res.tokens, want)
        with torch.no_grad():
            img = pipe.tokenizer.decode(L.to_tokenizer_ids(want))
        # fp32 conv decoder (K <= 128·9 = 1152 per conv, pixels ~2): few ulp x sqrt(K) per layer, ~1e-5 over
        # the net; 6e-6 measured against the fixture (README). 1e-4 holds on any CPU's kernels.
        torch.testing.assert_close(img, case["images"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny_m2"])
def test_teacher_forcing_is_nars_training_forward(golden, pipes, name):
    """NAR's training logits (its loss is CE of these against the tokens) on the cfg-4 tokens."""
    m = golden["models"][name]
    gen = pipes[name].generator
    raster = m["cases"][-1]["tokens"]
    n, L = gen.config.grid, gen.layout
    tokens = L.from_grids(raster.view(2, n, n))
    with torch.no_grad():
        logits = gen.teacher_forcing_logits(torch.tensor(golden["labels"]), tokens)
    ref = m["tf_logits"][:, L.coords[:, 0] * n + L.coords[:, 1]]  # NAR's raster order → layout order
    # fp32 logits up to ~11 of a 2-layer net (K <= 512): ~1e-6 of them from exact (1.5e-6 measured when the
    # fixture was made, 1.4e-6 here on AMX and AVX2); 1e-4 holds on any CPU
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    # a mean of log-softmaxes of those logits: the logits' error, ~1e-6 on a loss ~3; 1e-5 on any CPU
    assert abs(float(loss) - m["tf_loss"]) < 1e-5


def test_named_sizes_infer_heads(golden):
    """Published sizes get NAR's heads from the table (GPT-B: 12 + 1 layers, 12 heads)."""
    shapes = {"tok_embeddings.weight": (16384, 768), "cls_embedding.embedding_table.weight": (1001, 768),
              "norm.weight": (768,), "output.weight": (16384, 768), "medusa_norm.weight": (768,),
              "medusa_output.weight": (16384, 768)}
    for i in range(13):
        shapes |= {f"layers.{i}.attention.wqkv.weight": (2304, 768), f"layers.{i}.attention.wo.weight": (768, 768),
                   f"layers.{i}.feed_forward.w1.weight": (2048, 768), f"layers.{i}.feed_forward.w3.weight": (2048, 768),
                   f"layers.{i}.feed_forward.w2.weight": (768, 2048), f"layers.{i}.attention_norm.weight": (768,),
                   f"layers.{i}.ffn_norm.weight": (768,)}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = nar_config_from_state_dict(nar_state_dict_from_official(sd))
    assert (cfg.n_layer, cfg.medusa_layers, cfg.n_head, cfg.dim, cfg.grid, cfg.num_classes) == (12, 1, 12, 768, 16, 1000)
    # and the key list is exactly NAR GPT-B's (tests/fixtures/nar/keys_nar_GPT-B_c2i_256.txt)
    ref = {}
    for line in (FIXTURE.parent / "keys_nar_GPT-B_c2i_256.txt").read_text().splitlines():
        k, shape, _ = line.split("\t")
        ref[k] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    from varkit.modeling import params_on_meta

    with params_on_meta():
        gen = NeighborsGenerator(cfg)
    own = {k: tuple(v.shape) for k, v in nar_state_dict_to_official(gen.state_dict()).items()}
    assert own == ref


# -- NAR's file format: raw or "model"-wrapped, round trip --------------------------------------
def small_nar(seed=0) -> NeighborsGenerator:
    cfg = NeighborsConfig(vocab_size=64, num_classes=10, dim=64, n_layer=2, n_head=1, grid=4, multiple_of=64)
    gen = NeighborsGenerator(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return gen.eval()


@pytest.mark.parametrize("wrap,prefix", [("model", ""), (None, ""), ("model", "module.")])
def test_roundtrip_through_nar_file(vq_file, tmp_path, wrap, prefix):
    gen = small_nar()
    sd = {prefix + k: v for k, v in nar_state_dict_to_official(gen.state_dict()).items()}
    sd[prefix + "freqs_cis"] = torch.zeros(17, 32, 2)  # NAR's RoPE table, when a file carries it (1 + 4x4 rows)
    path = tmp_path / "nar.pt"
    torch.save(sd if wrap is None else {wrap: sd}, path)
    out = convert_nar(vq_file, path, tmp_path / "out")
    pipe = load_pipeline(out)
    assert isinstance(pipe.generator, NeighborsGenerator) and pipe.generator.config == gen.config
    for k, v in gen.state_dict().items():
        assert torch.equal(pipe.generator.state_dict()[k], v), k
    # defaults: sample_c2i_ddp.py's FID protocol (CFG 2.0, no top-k); the demo script's are the "demo" preset
    assert pipe.defaults["cfg"] == 2.0 and pipe.defaults["top_k"] is None
    assert pipe.presets["demo"]["cfg"] == 4.0 and pipe.presets["demo"]["top_k"] == 2000
    res = pipe(class_labels=[1, 9], top_k=1, cfg=4.0)
    assert res.stats.forward_passes == 7 and len(res.images) == 2
    assert torch.equal(load_nar_gpt(path, image_size=16, downsample=4).state_dict()["medusa_output.weight"],
                       gen.medusa_output.weight)


def test_cli_command(vq_file, tmp_path, capsys):
    gen = small_nar(1)
    path = tmp_path / "last_version.pt"
    torch.save(nar_state_dict_to_official(gen.state_dict()), path)
    p = argparse.ArgumentParser()
    add_nar_arguments(p)
    cmd_convert_nar(p.parse_args(["--vq", str(vq_file), "--gpt", str(path), "--out", str(tmp_path / "o"),
                                  "--image-size", "16"]))
    assert "4x4 tokens in 7 fronts" in capsys.readouterr().out
    assert (tmp_path / "o" / "convert.json").is_file()


# -- bad input: one clear error each, nothing written -------------------------------------------
def no_output(tmp_path, out="out"):
    return not (tmp_path / out).exists() and not any(p.name.startswith(f".{out}.") for p in tmp_path.iterdir())


def test_plain_llamagen_file_is_refused(vq_file, tmp_path):
    sd = nar_state_dict_to_official(small_nar().state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith("medusa_") and not k.startswith("layers.2.")}
    torch.save({"model": sd}, tmp_path / "c2i_B_256.pt")
    with pytest.raises(CheckpointError, match="LlamaGen raster GPT.*varkit convert llamagen"):
        convert_nar(vq_file, tmp_path / "c2i_B_256.pt", tmp_path / "out")
    assert no_output(tmp_path)


def test_non_square_grid_is_refused(vq_file, tmp_path):
    path = tmp_path / "nar.pt"
    torch.save(nar_state_dict_to_official(small_nar().state_dict()), path)
    with pytest.raises(InvalidArgumentError, match="square"):
        convert_nar(vq_file, path, tmp_path / "out", image_size=(16, 24))
    sd = nar_state_dict_to_official(small_nar().state_dict())
    sd["freqs_cis"] = torch.zeros(1 + 12, 32, 2)  # a RoPE table for 12 cells: no square grid
    torch.save(sd, path)
    with pytest.raises(InvalidArgumentError, match="square"):
        convert_nar(vq_file, path, tmp_path / "out")
    assert no_output(tmp_path)


def test_class_id_out_of_range(vq_file, tmp_path):
    path = tmp_path / "nar.pt"
    torch.save({"model": nar_state_dict_to_official(small_nar().state_dict())}, path)
    pipe = load_pipeline(convert_nar(vq_file, path, tmp_path / "out", image_size=16))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        pipe(class_labels=[10])
    with pytest.raises(InvalidArgumentError, match="out of range"):
        get_sampler("ancestral").sample(pipe.generator, torch.tensor([11]), image_generators(0, 1))


def test_other_bad_files(vq_file, tmp_path):
    good = tmp_path / "nar.pt"
    torch.save(nar_state_dict_to_official(small_nar().state_dict()), good)
    # the VQ file as --gpt, and the GPT file as --vq
    with pytest.raises(CheckpointError, match="VQ"):
        convert_nar(vq_file, vq_file, tmp_path / "out")
    with pytest.raises(CheckpointError):
        convert_nar(good, good, tmp_path / "out")
    # truncated file
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_nar(vq_file, tmp_path / "cut.pt", tmp_path / "out")
    # a vocabulary that is not the tokenizer's codebook
    big = NeighborsGenerator(NeighborsConfig(vocab_size=80, num_classes=10, dim=64, n_layer=1, n_head=1, grid=4,
                                             multiple_of=32))
    torch.save(nar_state_dict_to_official(big.state_dict()), tmp_path / "v80.pt")
    with pytest.raises(CheckpointError, match="80 token ids"):
        convert_nar(vq_file, tmp_path / "v80.pt", tmp_path / "out")
    # an incomplete file (a layer missing)
    sd = nar_state_dict_to_official(small_nar().state_dict())
    del sd["layers.1.attention.wqkv.weight"]
    torch.save(sd, tmp_path / "holes.pt")
    with pytest.raises(CheckpointError):
        convert_nar(vq_file, tmp_path / "holes.pt", tmp_path / "out")
    assert no_output(tmp_path)
    # an existing output folder is kept
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidArgumentError, match="exists"):
        convert_nar(vq_file, good, tmp_path / "taken")
    assert issubclass(CheckpointError, VarkitError)


def test_tokenizer_used_in_file_tests_is_llamagen_format(vq_file):
    sd = torch.load(vq_file, weights_only=True)["model"]
    assert "encoder.conv_blocks.0.res.0.conv1.weight" in sd  # LlamaGen's names, not varkit's
    tok = VQTokenizer(VQConfig(ch=64, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32, codebook_size=64,
                               codebook_dim=4, norm_groups=32))
    assert set(vq_state_dict_to_llamagen(tok.state_dict())) == set(sd) - {"quantize.codebook_used"}
