"""LlamaGen GPT conversion: golden outputs of the official code, round trips, bad files.

The golden fixture (tests/fixtures/llamagen_gpt/tiny_gpt.pt) was made with LlamaGen's own
``gpt.py`` / ``generate.py`` / ``vq_model.py``; see tests/fixtures/llamagen_gpt/README.md.
These tests need no LlamaGen code.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from varkit.checkpoints.cli_commands import CONVERTERS, add_convert_parser
from varkit.checkpoints.llamagen import (
    LLAMAGEN_C2I_DEFAULTS,
    LLAMAGEN_T2I_DEFAULTS,
    _named_config,
    convert_llamagen,
    generator_from_llamagen_state_dict,
    gpt_config_from_llamagen_state_dict,
    gpt_state_dict_from_llamagen,
    gpt_state_dict_to_llamagen,
    load_llamagen_gpt,
)
from varkit.checkpoints.synthetic import llamagen_gpt_state_dict, llamagen_vq_state_dict
from varkit.errors import CheckpointError, InvalidArgumentError, VarkitError
from varkit.models.raster import RasterConfig, RasterGenerator
from varkit.pipeline import load_pipeline

from numerics import assert_greedy_tokens_match

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen_gpt"
FIXTURE = FIXTURES / "tiny_gpt.pt"


def save_like_llamagen(path, gpt_sd, **extra):
    """The layout of LlamaGen's train_c2i.py checkpoints: model, optimizer, steps, args (+ ema)."""
    ckpt = {"model": gpt_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "steps": 1000, "args": argparse.Namespace(gpt_model="GPT-B", image_size=256, no_compile=False), **extra}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def files(fx, tmp_path_factory):
    """LlamaGen-layout files of the fixture's models (varkit.checkpoints.synthetic): c2i GPT, t2i GPT, tiny VQ."""
    d = tmp_path_factory.mktemp("llamagen")
    c2i = llamagen_gpt_state_dict(zip(fx["c2i_keys"], fx["c2i_shapes"]), fx["gpt_seed"])
    t2i = llamagen_gpt_state_dict(zip(fx["t2i_keys"], fx["t2i_shapes"]), fx["gpt_seed"])
    vq = llamagen_vq_state_dict(zip(fx["vq_keys"], fx["vq_shapes"]), fx["vq_seed"])  # with codebook_used, as real files
    torch.save({"model": vq, "args": argparse.Namespace(vq_model="VQ-16")}, d / "vq_tiny.pt")
    return {"dir": d, "c2i": c2i, "t2i": t2i, "vq": d / "vq_tiny.pt",
            "c2i_path": save_like_llamagen(d / "c2i_tiny.pt", c2i),
            "t2i_path": save_like_llamagen(d / "t2i_tiny.pt", t2i)}


@pytest.fixture(scope="module")
def c2i_pipe(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "c2i"
    convert_llamagen(files["vq"], files["c2i_path"], out, image_size=16)
    return load_pipeline(out)


@pytest.fixture(scope="module")
def t2i_pipe(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "t2i"
    convert_llamagen(files["vq"], files["t2i_path"], out, image_size=16)
    return load_pipeline(out)


def _captions(fx, padded):
    g = torch.Generator().manual_seed(fx["caption_seed"])
    caps = torch.randn(2, 120, fx["t2i_config"]["caption_dim"], generator=g)
    if padded:  # left padding, padded rows zeroed, as LlamaGen's sample_t2i.py
        mask = torch.zeros(2, 120)
        for i, v in enumerate(fx["t2i_valid"]):
            mask[i, 120 - v:] = 1
        caps = caps * mask[:, :, None]
    return caps


# -- golden outputs of the official code --------------------------------------------------------
def _assert_greedy_matches(pipe, cond, cfg, got, want):
    """Greedy tokens of the official code made on another CPU: equal wherever the logits decide it
    (the fixture's smallest top-2 gap is 1.4e-3 for c2i, 0.22 for t2i, far above fp32 noise)."""
    assert_greedy_tokens_match(pipe.generator, cond, pipe.sampling_params(cfg=cfg, top_k=1), got, want)


def test_greedy_tokens_match_official_generate(fx, c2i_pipe):
    out = c2i_pipe(fx["labels"].tolist(), cfg=fx["cfg_scale"], top_k=1)
    _assert_greedy_matches(c2i_pipe, fx["labels"], fx["cfg_scale"], out.tokens, fx["tokens"])


def test_decoded_pixels_match_official_decode_code(fx, c2i_pipe):
    pix = c2i_pipe.tokenizer.decode(fx["tokens"].view(-1, 4, 4))
    assert pix.shape == fx["pixels"].shape
    # fp32 conv decoder, pixels up to ~2.6, convs summing K <= 64·9 = 576 terms: a few ulp x sqrt(K) of
    # the terms ~ 1e-6 per layer over ~10 layers; the official code measured 2.7e-5 at full VQ-16 size
    # (README). 1e-4 covers any CPU's kernels at this size with 10x to spare.
    torch.testing.assert_close(pix, fx["pixels"], atol=1e-4, rtol=0)


def test_converted_c2i_defaults_are_the_fid_protocol_and_demo_is_a_preset(c2i_pipe, t2i_pipe):
    # defaults: sample_c2i_ddp.py's protocol (no top-k, CFG 2.0 for sizes outside the published table);
    # the demo script's settings (sample_c2i.py: CFG 4, top-k 2000) are the named preset "demo"
    p = c2i_pipe.sampling_params()
    assert (p.cfg, p.top_k, p.temperature, p.top_p) == (2.0, None, 1.0, None)
    assert c2i_pipe.defaults["fid_num_samples"] == 50_000
    for k, v in LLAMAGEN_C2I_DEFAULTS.items():
        assert c2i_pipe.presets["demo"][k] == v
    p = c2i_pipe.sampling_params(preset="demo")
    assert (p.cfg, p.top_k, p.temperature, p.top_p) == (4.0, 2000, 1.0, None)
    assert c2i_pipe.sampling_params(preset="demo", cfg=3.0).cfg == 3.0  # explicit values win over a preset
    assert (t2i_pipe.defaults["cfg"], t2i_pipe.defaults["top_k"]) == (LLAMAGEN_T2I_DEFAULTS["cfg"], 1000)
    with pytest.raises(InvalidArgumentError, match="no preset 'fast'"):
        c2i_pipe.sampling_params(preset="fast")


def test_llamagen_fid_cfg_by_published_size():
    from varkit.checkpoints.llamagen import LLAMAGEN_FID_CFG, c2i_protocol

    assert LLAMAGEN_FID_CFG == {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
    assert c2i_protocol(2.0, 384)["fid_image_size"] == 256 and "fid_image_size" not in c2i_protocol(2.0, 256)


def test_t2i_greedy_tokens_match_official(fx, t2i_pipe):
    caps = _captions(fx, padded=False)
    out = t2i_pipe(captions=caps, cfg=fx["cfg_scale"], top_k=1)
    _assert_greedy_matches(t2i_pipe, caps, fx["cfg_scale"], out.tokens, fx["t2i_tokens"])


def test_t2i_padded_captions_match_official_emb_masks(fx, t2i_pipe):
    caps = _captions(fx, padded=True)
    out = t2i_pipe(captions=caps, cfg=fx["cfg_scale"], top_k=1)
    _assert_greedy_matches(t2i_pipe, caps, fx["cfg_scale"], out.tokens, fx["t2i_tokens_padded"])


def fx_angles_fp64(rows: list[int], head_dim: int, grid: int) -> torch.Tensor:
    """fp64 angles of rows of LlamaGen's ``precompute_freqs_cis_2d(grid, head_dim, 10000, 1)``: row r >= 1 is
    grid cell r - 1 = (i, j), angles [i·f, j·f] with f_k = 10000^(-2k / (head_dim/2)); row 0 (the class token)
    is all zeros in the table (cos = sin = 0): the caller zeroes it."""
    half = head_dim // 2
    f = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)
    cell = torch.tensor(rows) - 1
    i, j = (cell // grid).double(), (cell % grid).double()
    return torch.cat([torch.outer(i, f), torch.outer(j, f)], -1)


@pytest.mark.parametrize("head_dim", [64, 100])
def test_rope_table_for_384px_grid_matches_official(fx, head_dim):
    """24x24 grid (384 px with VQ-16); head_dim 100 is GPT-3B's (25 row + 25 column frequencies)."""
    cfg = RasterConfig(vocab_size=8, num_classes=2, dim=2 * head_dim, n_layer=1, n_head=2, grid=24)
    gen = RasterGenerator(cfg)
    rows = fx["rope_rows"]
    ref = fx[f"rope_hd{head_dim}"]
    # Both tables are fp32 cos/sin of angles t·f (t <= 23): f = 10000^(-x) from a vectorised pow that
    # differs by an ulp between CPU kernels (SLEEF AVX2 / AVX-512), so the rounded angle can differ by
    # 1-2 ulp of its own scale (2^-23·16 = 1.9e-6 for angles in [16, 32): the 1.9e-6 seen on AVX2
    # against this fixture), and sin/cos add ~1 ulp of the result. 4·eps·max angle = 1.1e-5 covers it.
    atol = 4 * torch.finfo(torch.float32).eps * (cfg.grid - 1)
    torch.testing.assert_close(gen.rope.cos[rows], ref[..., 0], atol=atol, rtol=0)
    torch.testing.assert_close(gen.rope.sin[rows], ref[..., 1], atol=atol, rtol=0)
    # and both are the fp64 table to that accuracy: varkit's angles are the official ones, not shifted by a row
    ang = fx_angles_fp64(rows, head_dim, cfg.grid)
    cls_row = torch.tensor(rows) == 0
    for got, want in ((gen.rope.cos[rows], ang.cos()), (gen.rope.sin[rows], ang.sin())):
        want[cls_row] = 0
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


# -- round trips ----------------------------------------------------------------------------------
def _assert_same_params(gen, sd):
    own = gen.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_round_trip_parameters_and_config(fx, files, c2i_pipe, t2i_pipe):
    _assert_same_params(c2i_pipe.generator, files["c2i"])
    _assert_same_params(t2i_pipe.generator, files["t2i"])
    c = c2i_pipe.generator.config
    assert (c.dim, c.n_layer, c.n_head, c.grid, c.vocab_size, c.num_classes) == (128, 2, 2, 4, 64, 10)
    t = t2i_pipe.generator.config
    assert (t.caption_dim, t.cls_token_num, t.num_classes) == (32, 120, 0)
    assert gpt_state_dict_to_llamagen(c2i_pipe.generator.state_dict()).keys() == files["c2i"].keys()
    assert sorted(gpt_state_dict_to_llamagen(c2i_pipe.generator.state_dict())) == sorted(fx["c2i_keys"])


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "ema", "raw", "ddp-prefix", "compiled", "freqs"])
def test_every_llamagen_file_layout_loads(files, tmp_path, layout):
    sd = dict(files["c2i"])
    if layout == "ddp-prefix":
        ckpt = {"model": {"module." + k: v for k, v in sd.items()}}
    elif layout == "compiled":
        ckpt = {"model": {"_orig_mod." + k: v for k, v in sd.items()}}
    elif layout == "raw":  # FSDP consolidated.pth
        ckpt = sd
    elif layout == "freqs":  # some files carry the RoPE table; it also gives the grid
        from_official_shape = torch.zeros(1 + 16, 32, 2)
        ckpt = {"model": {**sd, "freqs_cis": from_official_shape}}
    elif layout == "ema":
        ckpt = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd}
    else:
        ckpt = {layout: sd, "steps": 5}
    path = tmp_path / "gpt.pt"
    torch.save(ckpt, path)
    gen = load_llamagen_gpt(path, image_size=None if layout == "freqs" else 16, downsample=4,
                            use_ema=layout == "ema")
    assert gen.config.grid == 4
    _assert_same_params(gen, sd)


def test_training_kv_cache_buffers_are_ignored(files):
    sd = dict(files["c2i"])
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 2, 24, 64)
    out = gpt_state_dict_from_llamagen(sd)
    assert "layers.0.attention.kv_cache.k_cache" not in out and len(out) == len(files["c2i"])


def _gpt_b_shapes():
    rows = (FIXTURES / "keys_GPT-B_c2i_256.txt").read_text().splitlines()
    return {k: tuple(int(x) for x in shape.strip("()").split(",") if x.strip()) for k, shape, _ in
            (r.split("\t") for r in rows if r.strip())}


def test_gpt_b_round_trip_on_meta(tmp_path):
    """The real GPT-B key list (from LlamaGen's model), saved as LlamaGen does, on the meta device."""
    shapes = _gpt_b_shapes()
    assert len(shapes) == 88
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    path = save_like_llamagen(tmp_path / "c2i_B_256.pt", sd)
    gen = load_llamagen_gpt(path)  # image size from the file name
    ref = _named_config("llamagen-b")
    c = gen.config
    assert (c.dim, c.n_layer, c.n_head, c.grid, c.vocab_size, c.num_classes, c.multiple_of) == \
        (ref.dim, ref.n_layer, ref.n_head, 16, 16384, 1000, 256)
    own = gen.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == shapes
    assert sum(p.numel() for p in gen.parameters()) == 110_888_448


@pytest.mark.parametrize("name,dims,heads", [("L", (1024, 24), 16), ("XL", (1280, 36), 20), ("XXL", (1536, 48), 24),
                                             ("3B", (3200, 24), 32)])
def test_config_inference_for_every_size(name, dims, heads):
    dim, n_layer = dims
    hidden = 256 * ((int(8 * dim / 3) + 255) // 256)
    sd = {"tok_embeddings.weight": torch.empty(16384, dim, device="meta"),
          "cls_embedding.embedding_table.weight": torch.empty(1001, dim, device="meta"),
          "norm.weight": torch.empty(dim, device="meta"), "output.weight": torch.empty(16384, dim, device="meta")}
    for i in range(n_layer):
        for p, s in [("attention.wqkv", (3 * dim, dim)), ("attention.wo", (dim, dim)), ("feed_forward.w1", (hidden, dim)),
                     ("feed_forward.w3", (hidden, dim)), ("feed_forward.w2", (dim, hidden)), ("attention_norm", (dim,)),
                     ("ffn_norm", (dim,))]:
            sd[f"layers.{i}.{p}.weight"] = torch.empty(s, device="meta")
    cfg = gpt_config_from_llamagen_state_dict(sd, grid=24)
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.grid) == (dim, n_layer, heads, 24)
    named = gpt_config_from_llamagen_state_dict(sd, grid=24, config=f"llamagen-{name.lower()}")
    assert named.n_head == heads
    with pytest.raises(CheckpointError, match="config"):
        gpt_config_from_llamagen_state_dict(sd, grid=24, config="llamagen-b")
    gen = generator_from_llamagen_state_dict(sd, cfg)  # meta tensors: checks every key and shape
    assert gen.config.n_head == heads


# -- the CLI command ------------------------------------------------------------------------------
def _cli(argv):
    parser = argparse.ArgumentParser(prog="varkit")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_convert_command_writes_a_loadable_pipeline(files, tmp_path, capsys):
    assert "llamagen" in CONVERTERS
    out = tmp_path / "model"
    _cli(["convert", "llamagen", "--vq", str(files["vq"]), "--gpt", str(files["c2i_path"]), "--out", str(out),
          "--image-size", "16"])
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "convert.json", "generator", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left
    pipe = load_pipeline(out)
    assert pipe.generator.config.grid == 4 and pipe.tokenizer.codebook_size == 64
    with pytest.raises(InvalidArgumentError, match="already exists"):
        _cli(["convert", "llamagen", "--vq", str(files["vq"]), "--gpt", str(files["c2i_path"]), "--out", str(out),
              "--image-size", "16"])
    _cli(["convert", "llamagen", "--vq", str(files["vq"]), "--gpt", str(files["t2i_path"]), "--out", str(out),
          "--image-size", "16", "--overwrite"])
    assert load_pipeline(out).generator.is_text_conditional
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- bad input: one clear error each, no output folder ----------------------------------------------
def _no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]


def test_var_file_is_refused(files, tmp_path):
    var = {"class_emb.weight": torch.zeros(1001, 8), "pos_1LC": torch.zeros(1, 680, 8),
           "blocks.0.attn.mat_qkv.weight": torch.zeros(24, 8), "head.weight": torch.zeros(16, 8)}
    torch.save(var, tmp_path / "var_d16.pth")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="VAR transformer.*varkit convert var"):
        convert_llamagen(files["vq"], tmp_path / "var_d16.pth", out, image_size=16)
    _no_output(tmp_path, out)


def test_nar_file_is_refused(files, tmp_path):
    sd = dict(files["c2i"])
    for k in [k for k in sd if k.startswith("layers.1.")]:  # n_layer + 1 layers
        sd[k.replace("layers.1.", "layers.2.")] = sd[k]
    sd["medusa_norm.weight"] = torch.ones(128)
    sd["medusa_output.weight"] = torch.zeros(64, 128)
    torch.save({"model": sd}, tmp_path / "nar_b.pt")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="NAR.*varkit convert nar"):
        convert_llamagen(files["vq"], tmp_path / "nar_b.pt", out, image_size=16)
    _no_output(tmp_path, out)


def test_truncated_file_is_refused(files, tmp_path):
    data = files["c2i_path"].read_bytes()
    (tmp_path / "c2i_cut.pt").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="truncated"):
        convert_llamagen(files["vq"], tmp_path / "c2i_cut.pt", out, image_size=16)
    _no_output(tmp_path, out)


def test_codebook_size_mismatch_is_refused(files, tmp_path):
    sd = dict(files["c2i"])
    sd["tok_embeddings.weight"] = torch.zeros(32, 128)
    sd["output.weight"] = torch.zeros(32, 128)
    save_like_llamagen(tmp_path / "c2i_v32.pt", sd)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="32 token ids.*64 codes"):
        convert_llamagen(files["vq"], tmp_path / "c2i_v32.pt", out, image_size=16)
    _no_output(tmp_path, out)


def test_swapped_files_are_refused(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="GPT"):
        convert_llamagen(files["c2i_path"], files["c2i_path"], out, image_size=16)
    with pytest.raises(CheckpointError, match="pass it as --vq"):
        convert_llamagen(files["vq"], files["vq"], out, image_size=16)
    _no_output(tmp_path, out)


def test_weights_that_do_not_fit_the_config_are_refused(files, c2i_pipe):
    """The last check before the weights are assigned (shared by every converter): one clear error."""
    cfg = c2i_pipe.generator.config
    sd = gpt_state_dict_from_llamagen(files["c2i"])
    del sd["layers.1.ffn_norm.weight"]
    sd["output.weight"] = torch.zeros(cfg.vocab_size + 1, cfg.dim)
    with pytest.raises(CheckpointError, match=r"src\.pt.*do not fit.*RasterGenerator.*missing 1 keys.*1 shape mismatches"):
        generator_from_llamagen_state_dict(sd, cfg, "src.pt")


def test_unknown_image_size_is_refused(files, tmp_path):
    path = save_like_llamagen(tmp_path / "gpt.pt", files["c2i"])
    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match="--image-size"):
        convert_llamagen(files["vq"], path, out)
    with pytest.raises(InvalidArgumentError, match="multiple"):
        convert_llamagen(files["vq"], path, out, image_size=18)
    _no_output(tmp_path, out)


def test_error_while_writing_leaves_nothing(files, tmp_path, monkeypatch):
    from varkit.pipeline import Pipeline

    def boom(self, directory):
        (Path(directory) / "tokenizer").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(Pipeline, "save_pretrained", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        convert_llamagen(files["vq"], files["c2i_path"], out, image_size=16)
    _no_output(tmp_path, out)


def test_class_id_out_of_range_at_generation(c2i_pipe):
    with pytest.raises(VarkitError, match="class id 10 is out of range.*0..9"):
        c2i_pipe([3, 10], top_k=1)
    with pytest.raises(VarkitError, match="out of range"):
        c2i_pipe([-1], top_k=1)


# -- the side-by-side bench's wiring (the timing itself needs LlamaGen's code) ---------------------
def test_side_by_side_bench_parser_and_bad_official_path(tmp_path):
    from varkit.bench.llamagen_side_by_side import add_side_by_side_parser
    from varkit.bench.scripts import load_script

    import_official = load_script("llamagen").import_official  # bench/side_by_side/llamagen.py

    parser = argparse.ArgumentParser(prog="varkit bench")
    add_side_by_side_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["llamagen", "--official", str(tmp_path), "--batch", "1", "8"])
    assert args.batch == [1, 8] and args.top_k == 2000 and args.cfg == 4.0 and callable(args.func)
    with pytest.raises(InvalidArgumentError, match="not a LlamaGen checkout"):
        import_official(tmp_path)
