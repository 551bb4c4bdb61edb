"""VAR transformer converter: golden greedy tokens/pixels of the official code, raw-format round trip,
config inference (depth, shared AdaLN, scale schedule), bad inputs. See fixtures/var_gpt/README.md."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from varkit.checkpoints.synthetic import items_of, var_state_dict, var_vae_state_dict
from varkit.checkpoints.var import (
    VAR_DEFAULTS,
    add_convert_var_arguments,
    cmd_convert_var,
    convert_var,
    load_var,
    var_config_from_state_dict,
    var_state_dict_from_var,
    var_state_dict_to_var,
)
from varkit.checkpoints.var_vae import msvq_state_dict_to_var
from varkit.errors import CheckpointError, InvalidArgumentError, VarkitError
from varkit.models import create_model
from varkit.models.scales import ScalesConfig, ScalesGenerator
from varkit.pipeline import load_pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators

from numerics import assert_greedy_tokens_match

FIXTURE = Path(__file__).parent / "fixtures" / "var_gpt"


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx():
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    ref = load_file(str(FIXTURE / "official_outputs.safetensors"))
    return meta, ref


@pytest.fixture(scope="module")
def files(fx, tmp_path_factory):
    """The official tiny pair in VAR's raw format, rebuilt from the recipes (varkit.checkpoints.synthetic)."""
    meta, _ = fx
    d = tmp_path_factory.mktemp("var_files")
    vae = var_vae_state_dict(meta["vae_state_dict_keys"], **meta["vae"]["recipe"])
    var = var_state_dict(meta["var_state_dict_keys"], meta["var"]["recipe"]["seed"], meta["var"]["patch_nums"])
    torch.save(vae, d / "vae.pth")
    torch.save(var, d / "var.pth")
    return {"dir": d, "vae": d / "vae.pth", "var": d / "var.pth", "vae_sd": vae, "var_sd": var}


@pytest.fixture(scope="module")
def pipe(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "pipe"
    convert_var(files["vae"], files["var"], out)
    return load_pipeline(out)


def _params(cfg: float) -> SamplingParams:
    return SamplingParams(cfg=cfg, cfg_schedule="var", top_k=1)


def _greedy(pipe, labels, cfg=1.5):
    res = get_sampler("ancestral", _params(cfg)).sample(pipe.generator, labels, image_generators(0, len(labels)))
    return res.tokens


def _assert_greedy_matches(pipe, labels, cfg, got, want):
    """Made on another CPU: equal wherever the logits decide it (fixture's smallest top-2 gap 1.7e-3)."""
    assert_greedy_tokens_match(pipe.generator, labels, _params(cfg), got, want)


# -- identical outputs ----------------------------------------------------------------------------
def test_greedy_tokens_match_official_autoregressive_infer_cfg(fx, pipe):
    meta, ref = fx
    labels = ref["labels"]
    tokens = _greedy(pipe, labels, meta["sampling"]["cfg"])
    want = torch.cat([ref[f"tokens.{si}"] for si in range(len(pipe.generator.config.patch_nums))], 1)
    _assert_greedy_matches(pipe, labels, meta["sampling"]["cfg"], tokens, want)


def test_decoded_images_match_official_within_1e_4(fx, pipe):
    _, ref = fx
    tokens = torch.cat([ref[f"tokens.{si}"] for si in range(len(pipe.generator.config.patch_nums))], 1)
    with torch.no_grad():
        img = pipe.tokenizer.decode(pipe.generator.layout.to_tokenizer_ids(tokens))
    # VAR returns [0, 1], varkit [-1, 1]. fp32 conv decoder with attention (K <= 64·9 = 576 per conv):
    # 4.1e-6 measured against the fixture (README); 1e-4 holds on any CPU's kernels.
    assert ((img + 1) / 2 - ref["images"]).abs().max().item() < 1e-4


def test_pipeline_call_uses_var_defaults_and_matches(fx, pipe):
    _, ref = fx
    assert pipe.defaults == {**pipe.defaults, **VAR_DEFAULTS}
    out = pipe(class_labels=ref["labels"].tolist(), top_k=1)  # cfg 1.5 on VAR's ramp from the defaults
    expected = torch.cat([ref[f"tokens.{si}"] for si in range(len(pipe.generator.config.patch_nums))], 1)
    assert_greedy_tokens_match(pipe.generator, ref["labels"], pipe.sampling_params(top_k=1), out.tokens, expected)
    assert len(out.images) == len(ref["labels"]) and out.images[0].size == (32, 32)


def test_shared_adaln_d36_architecture_matches_official(fx, files, tmp_path):
    """VAR-d36's shared AdaLN (shared_ada_lin + per-block ada_gss), tiny, at cfg 4: same greedy tokens/images."""
    meta, _ = fx
    s = meta["saln"]
    ref = load_file(str(FIXTURE / "official_outputs_saln.safetensors"))
    var = var_state_dict(s["var_state_dict_keys"], s["var"]["recipe"]["seed"], s["var"]["patch_nums"])
    torch.save(var, tmp_path / "var_saln.pth")
    pipe = load_pipeline(convert_var(files["vae"], tmp_path / "var_saln.pth", tmp_path / "pipe"))
    assert pipe.generator.config.shared_aln and pipe.generator.config.depth == 3
    tokens = _greedy(pipe, ref["labels"], s["sampling"]["cfg"])
    expected = torch.cat([ref[f"tokens.{si}"] for si in range(len(s["var"]["patch_nums"]))], 1)
    _assert_greedy_matches(pipe, ref["labels"], s["sampling"]["cfg"], tokens, expected)
    with torch.no_grad():
        img = pipe.tokenizer.decode(pipe.generator.layout.to_tokenizer_ids(expected))
    assert ((img + 1) / 2 - ref["images"]).abs().max().item() < 1e-4  # as above
    raw = var_state_dict_to_var(pipe.generator.state_dict(), pipe.generator.config)
    assert list(raw) == list(var) and all(torch.equal(raw[k], var[k]) for k in var)


# -- raw format round trip and config inference -----------------------------------------------------
def test_round_trip_in_var_raw_format(files, pipe):
    raw = files["var_sd"]
    back = var_state_dict_to_var(pipe.generator.state_dict(), pipe.generator.config)
    assert list(back) == list(raw)  # VAR's own state_dict order, derived buffers included
    for k in raw:
        assert back[k].dtype == raw[k].dtype and torch.equal(back[k], raw[k]), k
    conv, notes = var_state_dict_from_var(back)
    assert notes["patch_nums"] == (1, 2, 3, 4, 6, 8)
    assert set(conv) == set(pipe.generator.state_dict())
    # the VQVAE too
    vae_back = msvq_state_dict_to_var(pipe.tokenizer.state_dict(), pipe.tokenizer.config)
    assert all(torch.equal(vae_back[k], files["vae_sd"][k]) for k in files["vae_sd"])


def test_convert_json_and_loaded_generator(files, pipe, tmp_path):
    c = pipe.generator.config
    assert (c.depth, c.dim, c.n_head, c.vocab_size, c.vae_dim, c.num_classes, c.shared_aln) == (2, 64, 2, 64, 8, 10, False)
    gen = load_var(files["var"])
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), pipe.generator.state_dict().values()))


def _raw(cfg: ScalesConfig, seed=0):
    gen = ScalesGenerator(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gen, var_state_dict_to_var(gen.state_dict(), cfg)


@pytest.mark.parametrize("shared", [False, True])
def test_config_inference_depth_shared_adaln_schedule(shared):
    cfg = ScalesConfig(vocab_size=32, num_classes=7, depth=3, dim=48, n_head=3, vae_dim=4, patch_nums=(1, 2, 3, 5),
                       shared_aln=shared)
    _, raw = _raw(cfg)
    assert ("shared_ada_lin.1.weight" in raw) == shared and ("blocks.0.ada_gss" in raw) == shared
    sd, notes = var_state_dict_from_var(raw)
    got = var_config_from_state_dict(sd, stored_patch_nums=notes["patch_nums"])
    assert (got.depth, got.dim, got.n_head, got.shared_aln, got.patch_nums, got.num_classes, got.vocab_size) == \
        (3, 48, 3, shared, (1, 2, 3, 5), 7, 32)
    # the mask alone also gives the schedule
    no_lvl = {k: v for k, v in raw.items() if k != "lvl_1L"}
    assert var_state_dict_from_var(no_lvl)[1]["patch_nums"] == (1, 2, 3, 5)
    # neither buffer and a non-VAR schedule: ask for it
    bare = {k: v for k, v in no_lvl.items() if k != "attn_bias_for_masking"}
    sd2, notes2 = var_state_dict_from_var(bare)
    assert notes2["patch_nums"] is None
    with pytest.raises(InvalidArgumentError, match="--patch-nums"):
        var_config_from_state_dict(sd2)
    assert var_config_from_state_dict(sd2, patch_nums=(1, 2, 3, 5)).patch_nums == (1, 2, 3, 5)


def test_var_256_schedule_inferred_from_token_count():
    cfg = ScalesConfig(vocab_size=16, num_classes=2, depth=1, dim=16, n_head=1, vae_dim=4)
    _, raw = _raw(cfg)
    bare = {k: v for k, v in raw.items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    sd, _ = var_state_dict_from_var(bare)
    assert var_config_from_state_dict(sd).patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with pytest.raises(InvalidArgumentError, match="680 tokens"):
        var_config_from_state_dict(sd, resolution=512)


@pytest.mark.parametrize("name", ["var-d16", "var-d20", "var-d24", "var-d30", "var-d36"])
def test_published_layouts_on_meta(name):
    from varkit.modeling import params_on_meta
    from varkit.models.registry import _REGISTRY

    with params_on_meta():
        gen = ScalesGenerator(_REGISTRY[name][1]())
    raw = var_state_dict_to_var(gen.state_dict(), gen.config)
    depth = int(name[5:])
    assert sum(k.startswith("blocks.0.") for k in raw) == (12 if depth == 36 else 13)
    assert len(raw) == (446 if depth == 36 else 8 + 13 * depth + 4)  # 220 for d16, as VAR's state_dict
    assert tuple(raw["attn_bias_for_masking"].shape[-1:]) == ((2240,) if depth == 36 else (680,))
    sd, notes = var_state_dict_from_var(raw)
    assert var_config_from_state_dict(sd, stored_patch_nums=notes["patch_nums"]) == gen.config


def test_wrappers_and_prefixes_are_unwrapped(files, tmp_path):
    raw = files["var_sd"]
    torch.save({"trainer": {"var_wo_ddp": {"module." + k: v for k, v in raw.items()}, "vae_local": files["vae_sd"]},
                "epoch": 3}, tmp_path / "ar-ckpt-last.pth")
    gen = load_var(tmp_path / "ar-ckpt-last.pth")
    assert gen.config.depth == 2


# -- bad input: one clear error each, no partial output --------------------------------------------
def _no_leftovers(parent: Path, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_llamagen_file_given_as_var_is_refused(files, tmp_path):
    torch.save({"model": create_model("raster-tiny").state_dict()}, tmp_path / "c2i_B_256.pt")
    with pytest.raises(CheckpointError, match="LlamaGen GPT.*varkit convert llamagen"):
        convert_var(files["vae"], tmp_path / "c2i_B_256.pt", tmp_path / "out")
    _no_leftovers(tmp_path)


def test_swapped_files_are_refused(files, tmp_path):
    with pytest.raises(CheckpointError, match="VQVAE.*--vae"):
        convert_var(files["var"], files["vae"], tmp_path / "out")
    with pytest.raises(CheckpointError, match="VAR transformer"):
        convert_var(files["var"], files["var"], tmp_path / "out")
    _no_leftovers(tmp_path)


def test_mismatched_vae_is_refused(files, tmp_path):
    vae = dict(files["vae_sd"])
    vae["quantize.embedding.weight"] = torch.randn(32, 8)  # 32 codes, the transformer predicts 64
    torch.save(vae, tmp_path / "vae32.pth")
    with pytest.raises(CheckpointError, match="64 token ids but the VQVAE has 32 codes"):
        convert_var(tmp_path / "vae32.pth", files["var"], tmp_path / "out")
    vae = dict(files["vae_sd"])
    vae["quantize.ema_vocab_hit_SV"] = torch.zeros(10, 64)  # trained with 10 scales, the transformer with 6
    torch.save(vae, tmp_path / "vae10.pth")
    with pytest.raises(CheckpointError, match="10 scales but the transformer with 6"):
        convert_var(tmp_path / "vae10.pth", files["var"], tmp_path / "out")
    _no_leftovers(tmp_path)


def test_latent_channel_mismatch_is_refused(files, tmp_path):
    var = dict(files["var_sd"])
    var["word_embed.weight"] = torch.randn(64, 16)
    torch.save(var, tmp_path / "var16.pth")
    with pytest.raises(CheckpointError, match="16-channel latents but the VQVAE's are 8"):
        convert_var(files["vae"], tmp_path / "var16.pth", tmp_path / "out")
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("resolution,match", [(384, "cannot build a scale schedule for resolution 384"),
                                               (300, "not a multiple of"),
                                               (512, r"trained with the scale schedule \(1, 2, 3, 4, 6, 8\)")])
def test_unbuildable_resolution_is_refused(files, tmp_path, resolution, match):
    with pytest.raises(InvalidArgumentError, match=match):
        convert_var(files["vae"], files["var"], tmp_path / "out", resolution=resolution)
    _no_leftovers(tmp_path)


def test_bad_patch_nums_are_refused(files, tmp_path):
    with pytest.raises(InvalidArgumentError, match="lvl_1L"):
        convert_var(files["vae"], files["var"], tmp_path / "out", patch_nums=(1, 2, 3, 5, 6, 8))
    bare = {k: v for k, v in files["var_sd"].items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    torch.save(bare, tmp_path / "bare.pth")
    with pytest.raises(InvalidArgumentError, match="6 scales and 130 tokens"):
        convert_var(files["vae"], tmp_path / "bare.pth", tmp_path / "out", patch_nums=(1, 2, 3, 4, 5, 8))
    _no_leftovers(tmp_path)


def test_truncated_and_incomplete_files_are_refused(files, tmp_path):
    data = files["var"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_var(files["vae"], tmp_path / "cut.pth", tmp_path / "out")
    vae_bytes = files["vae"].read_bytes()
    (tmp_path / "vae_cut.pth").write_bytes(vae_bytes[: len(vae_bytes) - 100])
    with pytest.raises(CheckpointError, match="VAR VQVAE checkpoint .* truncated"):
        convert_var(tmp_path / "vae_cut.pth", files["var"], tmp_path / "out")
    part = {k: v for k, v in files["var_sd"].items() if not k.startswith("blocks.1.ffn")}
    torch.save(part, tmp_path / "part.pth")
    with pytest.raises(CheckpointError, match="incomplete"):
        convert_var(files["vae"], tmp_path / "part.pth", tmp_path / "out")
    bad = dict(files["var_sd"])
    bad["blocks.0.attn.zero_k_bias"] = torch.ones_like(bad["blocks.0.attn.zero_k_bias"])
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="zero_k_bias is not zero"):
        convert_var(files["vae"], tmp_path / "bad.pth", tmp_path / "out")
    _no_leftovers(tmp_path)


def test_error_while_writing_leaves_nothing(files, tmp_path, monkeypatch):
    from varkit.pipeline import Pipeline

    def boom(self, directory):
        (Path(directory) / "tokenizer").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(Pipeline, "save_pretrained", boom)
    with pytest.raises(OSError):
        convert_var(files["vae"], files["var"], tmp_path / "out")
    _no_leftovers(tmp_path)


def test_existing_out_and_class_out_of_range(files, pipe, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        convert_var(files["vae"], files["var"], tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old")
    convert_var(files["vae"], files["var"], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    with pytest.raises(InvalidArgumentError, match="class id 10 is out of range"):
        pipe(class_labels=[10])


def test_command_writes_a_loadable_pipeline(files, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_convert_var_arguments(p)
    args = p.parse_args(["--vae", str(files["vae"]), "--var", str(files["var"]), "--out", str(tmp_path / "pipe")])
    cmd_convert_var(args)
    msg = capsys.readouterr().out
    assert "VAR-d2" in msg and "32 px" in msg
    info = json.loads((tmp_path / "pipe" / "convert.json").read_text())
    assert info["patch_nums"] == [1, 2, 3, 4, 6, 8] and info["defaults"] == VAR_DEFAULTS
    assert isinstance(CheckpointError("x"), VarkitError)
    assert sorted(os.listdir(tmp_path / "pipe")) == ["config.json", "convert.json", "generator", "tokenizer"]


# -- the side-by-side bench (the official code itself is not needed here) ---------------------------
def test_bench_recipe_is_the_fixture_recipe(tmp_path):
    """The bench's random pair is written with the recipes the golden fixture was made with."""
    from varkit.bench.var import write_random_pair

    vae, var, info = write_random_pair("var-tiny", tmp_path, seed=7, ch=32, ch_mult=(1, 2, 2))
    got = torch.load(var, weights_only=True)
    want = var_state_dict(items_of(got), 7, info["patch_nums"])
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    got = torch.load(vae, weights_only=True)
    want = var_vae_state_dict(items_of(got), 7 + 100)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_bench_random_pair_converts(tmp_path):
    from varkit.bench.var import bench_labels, write_random_pair

    vae, var, info = write_random_pair("var-tiny", tmp_path, seed=0, ch=32, ch_mult=(1, 2, 2))
    assert info["patch_nums"] == [1, 2, 4]
    pipe = load_pipeline(convert_var(vae, var, tmp_path / "pipe"))
    assert pipe.defaults["top_k"] == 900 and bench_labels(3, pipe.num_classes) == [0, 1, 2]
    out = pipe(class_labels=bench_labels(2, pipe.num_classes), seed=0)
    assert out.tokens.shape == (2, 21) and out.stats.cache_bytes > 0 and out.images[0].size == (16, 16)


def test_bench_parser_and_bad_official_path(tmp_path):
    """``varkit bench var --official`` runs bench/side_by_side/var.py of the source checkout; a wrong path is one
    clear error before anything is written."""
    from varkit.bench.scripts import load_script
    from varkit.bench.var import add_var_bench_parser

    p = argparse.ArgumentParser()
    add_var_bench_parser(p.add_subparsers())
    args = p.parse_args(["var", "--official", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert (args.batch, args.cfg, args.top_k, args.top_p, args.config) == ([1, 8], 1.5, 900, 0.96, "var-d16")
    assert not args.profile and p.parse_args(["var", "--official", "x", "--profile"]).profile
    assert p.parse_args(["var"]).official is None  # varkit's own rows need no checkout
    with pytest.raises(InvalidArgumentError, match="not a checkout of FoundationVision/VAR"):
        load_script("var").run_side_by_side(args)
    with pytest.raises(InvalidArgumentError, match="not a checkout of FoundationVision/VAR"):
        args.func(args)
    assert not (tmp_path / "w").exists()


def test_bench_varkit_rows_without_a_checkout(tmp_path):
    """``varkit bench var`` alone: varkit's rows on random weights of a tiny config, with floors."""
    from varkit.bench import var as bench_var

    bench_var.write_random_pair("var-tiny", tmp_path / "w", seed=0, ch=32, ch_mult=(1, 2, 2))  # a small VQVAE, reused
    p = argparse.ArgumentParser()
    bench_var.add_var_bench_parser(p.add_subparsers())
    args = p.parse_args(["var", "--config", "var-tiny", "--batch", "1", "--repeats", "1", "--threads", "1",
                         "--work-dir", str(tmp_path / "w"), "--out-dir", str(tmp_path)])
    rows, settings = bench_var.run_varkit(args)
    assert [(r["impl"], r["batch"]) for r in rows] == [("varkit", 1)]
    assert rows[0]["images_per_s"] > 0 and rows[0]["kv_peak_bytes"] > 0 and rows[0]["floor_s"] > 0
    # the host's read rate probed before the run, and the floor at that rate
    assert rows[0]["host_read_GBps"] > 0 and rows[0]["floor_live_s"] > 0
    assert rows[0]["fraction_of_live_floor"] == pytest.approx(rows[0]["floor_live_s"] / rows[0]["cpu_s"], rel=1e-12)
    assert "official" not in settings and settings["fraction_of_floor_basis"] == "cpu_s"
    assert (tmp_path / "w" / "pipeline" / "config.json").is_file()


def test_bench_profile_sums_op_time_by_category():
    from varkit.bench.var import PROFILE_CATEGORIES, _timed

    x = torch.randn(64, 64)
    out, wall, cpu, cats = _timed(lambda: torch.nn.functional.gelu(x @ x), True)
    assert out.shape == (64, 64) and wall > 0 and cpu > 0
    assert set(cats) == {*PROFILE_CATEGORIES, "other"} and cats["gemm"] > 0 and cats["activations"] > 0
    assert cats["conv"] == 0 and _timed(lambda: 1, False)[3] is None
