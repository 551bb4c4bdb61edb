"""`varkit convert dd`: the official DD students' outputs (golden fixtures dd_llamagen / dd_var: dd forward,
1- and 2-step sampling), round trip, EMA/raw weights, the published sizes' settings, and bad inputs.
See tests/fixtures/dd_llamagen/README.md and tests/fixtures/dd_var/README.md."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from varkit.checkpoints.dd import (DD_DEFAULTS, convert_dd, llamagen_dd_from_state_dict, load_dd, read_dd_file,
                                   var_dd_from_state_dict)
from varkit.checkpoints.llamagen_vq import load_llamagen_vq
from varkit.checkpoints.synthetic import llamagen_vq_state_dict, var_vae_state_dict
from varkit.cli import main
from varkit.errors import CheckpointError, InvalidArgumentError, VarkitError
from varkit.hub import ASSETS
from varkit.modeling import params_on_meta
from varkit.models.dd import DDRasterConfig, DDRasterGenerator, DDScalesConfig, DDScalesGenerator
from varkit.pipeline import load_pipeline

from numerics import LOGIT_RTOL

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("dd_llamagen", "dd_var")


def _fixture(name: str) -> tuple[dict, dict, dict]:
    d = FIXTURES / name
    return (json.loads((d / "fixture.json").read_text()), load_file(str(d / "official_weights.safetensors")),
            load_file(str(d / "official_outputs.safetensors")))


def _raw_weights(official: dict) -> dict:
    """Another set of weights of the same student, for the file's non-default entry ('model', var_wo_ddp)."""
    derived = ("attn_bias_for_masking", "zero_k_bias")
    return {k: v + 0.05 if v.is_floating_point() and not k.endswith(derived) else v for k, v in official.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The fixtures' students in the published files' layouts, with their teachers' tokenizers."""
    d = tmp_path_factory.mktemp("dd_files")
    meta, w, _ = _fixture("dd_llamagen")
    vq = llamagen_vq_state_dict(zip(meta["vq_keys"], meta["vq_shapes"]), meta["vq_seed"])
    torch.save({"model": vq, "args": argparse.Namespace(vq_model="VQ-16")}, d / "vq.pt")
    # LlamaGen's training scripts' layout: "model" and "ema" (eval_fewstep.py --ema reads the latter)
    torch.save({"model": _raw_weights(w), "ema": w, "optimizer": {"state": {}}, "steps": 100,
                "args": argparse.Namespace(gpt_model="GPT-B")}, d / "llamagen-dd.pt")
    meta, w, _ = _fixture("dd_var")
    vae = var_vae_state_dict([(k, tuple(s)) for k, s in meta["vae_state_dict_keys"]], **meta["vae"]["recipe"])
    torch.save(vae, d / "vae.pth")
    # VAR's trainer checkpoint: sample.py reads trainer.ema_parameters (default --ema) or trainer.var_wo_ddp
    torch.save({"epoch": 3, "trainer": {"config": {"prog_it": 0}, "var_wo_ddp": _raw_weights(w), "ema_parameters": w}},
               d / "var-dd.pth")
    return {"dir": d, "vq": d / "vq.pt", "llamagen": d / "llamagen-dd.pt", "vae": d / "vae.pth", "var": d / "var-dd.pth"}


# the fixtures' students are of no published size: their sampling steps are given (README: t_list, split_t)
ARGS = {"dd_llamagen": dict(image_size=16, timesteps="0,8", split=12), "dd_var": dict(timesteps="0,3", split=4)}


def _sources(files, name):
    return (files["vq"], files["llamagen"]) if name == "dd_llamagen" else (files["vae"], files["var"])


@pytest.fixture(scope="module")
def pipes(files, tmp_path_factory) -> dict:
    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp("dd_conv") / name
        convert_dd(*_sources(files, name), folder, **ARGS[name])
        out[name] = load_pipeline(folder)
        out[name + "_dir"] = folder
    return out


# -- the official outputs -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_dd_forward_matches_official(name, pipes):
    """fp32 on both sides, same weights and inputs. Tolerance: LOGIT_RTOL (1e-5, tests/numerics.py) of the largest
    output: these are <= 2-layer nets with reductions of <= 192 terms, whose fp32 results on any x86-64 kernel are
    within ~1e-6 relative of exact (bit-equal to the fixture on the CPU that made it, 1.2e-6 absolute for VAR's
    logits of size 4.9), so 1e-5 leaves a 5x margin for another CPU's summation order."""
    _, _, ref = _fixture(name)
    gen = pipes[name].generator
    with torch.no_grad():
        conti, logits = gen.dd_forward(ref["x_t"], ref["labels"], ref["t"])
    for got, want in ((conti, ref["conti"]), (logits, ref["logits"])):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_RTOL * float(want.abs().max()))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset,key,passes", [(None, "step1", 1), ("two-step", "step2", 2)])
def test_distilled_sampling_matches_official(name, preset, key, passes, pipes):
    """The folder's default sampler (distilled, one step; preset two-step) on the fixture's noise gives the official
    loop's sequence: codewords of the argmax before the split, and after it the codewords nearest to the official
    continuous predictions (varkit's tokens are ids). Exact: the fixtures' smallest top-2 logit gaps (>= 3e-3 on
    logits <= 12) and nearest-code distance gaps (>= 4e-4 on squared distances of O(1) vectors) are far above the
    ~1e-5 fp32 differences between CPUs (test above), so no decision can flip."""
    meta, _, ref = _fixture(name)
    pipe = pipes[name]
    gen = pipe.generator
    out = pipe(ref["labels"].tolist(), noise=ref["noise"], preset=preset, output_type="pt")
    assert out.stats.forward_passes == passes
    ids, want = out.tokens, ref[key]
    split = gen.layout.step_starts[gen.config.dd_split]
    book = gen.codebook.float()
    assert torch.equal(book[ids[:, :split]], want[:, :split])
    nearest = (want[:, split:, None, :] - book).square().sum(-1).argmin(-1)
    assert torch.equal(ids[:, split:], nearest)
    assert torch.equal(ids[:, :split], ref[key + "_argmax"][:, :split])


# -- the folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip(name, files, pipes, tmp_path):
    """convert -> save -> load gives the same state (weights and codebook, bit for bit); saving the loaded
    pipeline again and loading that gives it once more."""
    tok, gen, record = load_dd(*_sources(files, name), **ARGS[name])
    pipe = pipes[name]
    for a, b in ((gen, pipe.generator), (tok, pipe.tokenizer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pipe.save_pretrained(tmp_path / "again")
    again = load_pipeline(tmp_path / "again")
    sa, sb = gen.state_dict(), again.generator.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert type(again.generator) is (DDRasterGenerator if name == "dd_llamagen" else DDScalesGenerator)
    assert again.defaults["sampler"] == "distilled" and again.defaults["sampler_options"] == {"steps": 1}


@pytest.mark.parametrize("name", FAMILIES)
def test_folder_records_sampler_settings_and_source(name, pipes):
    meta, _, _ = _fixture(name)
    pipe, folder = pipes[name], pipes[name + "_dir"]
    conv = json.loads((folder / "convert.json").read_text())
    cfg = pipe.generator.config
    t_list = meta["t_list"]
    split = meta.get("split_t", meta.get("loss_split_t"))
    assert tuple(cfg.dd_timesteps) == tuple(t_list) and cfg.dd_split == split
    assert conv["family"] == "dd" and conv["dd_timesteps"] == t_list and conv["dd_split"] == split
    assert conv["dd"]["weights"] == ("ema" if name == "dd_llamagen" else "trainer.ema_parameters")
    assert pipe.sampler_choice(None) == ("distilled", {"steps": 1})
    assert pipe.sampler_choice(None, "two-step") == ("distilled", {"steps": 2})
    assert {k: pipe.defaults[k] for k in DD_DEFAULTS} == DD_DEFAULTS


@pytest.mark.parametrize("name", FAMILIES)
def test_no_ema_takes_the_raw_weights(name, files):
    """Default: the EMA weights (the official sampling default); --no-ema: 'model' / trainer.var_wo_ddp."""
    _, w, _ = _fixture(name)
    path = _sources(files, name)[1]
    ema_sd, fam, entry = read_dd_file(path)
    raw_sd, _, raw_entry = read_dd_file(path, ema=False)
    assert fam == name.removeprefix("dd_")
    assert entry in ("ema", "trainer.ema_parameters") and raw_entry in ("model", "trainer.var_wo_ddp")
    assert torch.equal(ema_sd["n_d_embed.weight"], w["n_d_embed.weight"])
    assert torch.equal(raw_sd["n_d_embed.weight"], w["n_d_embed.weight"] + 0.05)
    _, gen, record = load_dd(*_sources(files, name), ema=False, **ARGS[name])
    assert record["dd"]["weights"] == raw_entry
    assert torch.equal(gen.n_d_embed.weight, w["n_d_embed.weight"] + 0.05)


def test_tokenizer_folder_instead_of_the_file(files, pipes, tmp_path):
    """--tokenizer may be a varkit tokenizer folder, or a pipeline folder (its tokenizer)."""
    load_llamagen_vq(files["vq"]).save_pretrained(tmp_path / "tok")
    want = pipes["dd_llamagen"].generator.state_dict()
    for spec in (tmp_path / "tok", pipes["dd_llamagen_dir"]):
        _, gen, record = load_dd(spec, files["llamagen"], **ARGS["dd_llamagen"])
        assert all(torch.equal(v, want[k]) for k, v in gen.state_dict().items())
        assert "folder" in record["tokenizer"]


def test_cli_converts(files, tmp_path, capsys):
    assert main(["convert", "dd", "--vae", str(files["vae"]), "--dd", str(files["var"]), "--out", str(tmp_path / "o"),
                 "--timesteps", "0,3", "--split", "4"]) in (0, None)
    line = capsys.readouterr().out
    assert "VAR-DD d2" in line and "load_pipeline" in line
    assert load_pipeline(tmp_path / "o").defaults["sampler"] == "distilled"


# -- the published sizes (shapes only, on the meta device) -------------------------------------------
def _official_names_var(sd: dict) -> dict:
    from varkit.checkpoints.var import _ATTN_TO_VAR

    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(.+)", k)
        if m and m[2] in _ATTN_TO_VAR:
            k = f"blocks.{m[1]}.attn.{_ATTN_TO_VAR[m[2]]}"
        out[{"output.weight": "head.weight", "output.bias": "head.bias"}.get(k, k)] = v
    return out


@pytest.mark.parametrize("size,dim,layers,heads,split", [("GPT-B", 768, 12, 12, 80), ("GPT-L", 1024, 24, 16, 130)])
def test_published_llamagen_dd_settings(size, dim, layers, heads, split):
    """LlamaGen-DD B/L: the README's --t_list 0,80 and --split_t 80 (B) / 130 (L), 16x16 tokens at 256 px."""
    with params_on_meta():
        student = DDRasterGenerator(DDRasterConfig(vocab_size=16384, dim=dim, n_layer=layers, n_head=heads, grid=16,
                                                   num_classes=1000, codebook_dim=8))
    sd = {k: v for k, v in student.state_dict().items() if k != "codebook"}
    _, cfg, name = llamagen_dd_from_state_dict(sd, 16, "llamagen-x.pt")
    assert (name, cfg.n_head, cfg.dd_timesteps, cfg.dd_split) == (size, heads, (0, 80), split)
    with pytest.raises(InvalidArgumentError, match="unknown size"):
        llamagen_dd_from_state_dict(sd, 24, "llamagen-x.pt")  # a 384-px student was not published


@pytest.mark.parametrize("depth,timesteps,split", [(16, (0, 5), 5), (20, (0, 4), 4), (24, (0, 4), 4)])
def test_published_var_dd_settings(depth, timesteps, split):
    """VAR-DD d16/d20/d24: the README's --t_list / --loss_split_t; the schedule from the tables' lengths (EMA
    weights may hold no buffers)."""
    with params_on_meta():
        student = DDScalesGenerator(DDScalesConfig(vocab_size=4096, num_classes=1000, depth=depth, dim=64 * depth,
                                                   n_head=depth, vae_dim=32))
    sd = _official_names_var({k: v for k, v in student.state_dict().items() if k != "codebook"})
    _, cfg = var_dd_from_state_dict(sd, "var-dx.pth")
    assert (cfg.depth, cfg.n_head, tuple(cfg.patch_nums)) == (depth, depth, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert (cfg.dd_timesteps, cfg.dd_split, cfg.layerwise_n_d_embed) == (timesteps, split, True)


# -- bad input ----------------------------------------------------------------------------------
def _one_line_exit_2(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and lines and lines[-1].startswith("varkit"), err
    return lines[-1]


@pytest.fixture(scope="module")
def bad(files) -> dict:
    d = files["dir"]
    (d / "garbage.pt").write_bytes(b"not a checkpoint" * 64)
    _, w, _ = _fixture("dd_llamagen")
    teacher = {k: v for k, v in w.items() if not k.startswith(("n_d_embed", "final_layer_conti", "tok_embeddings"))}
    torch.save({"model": {**teacher, "tok_embeddings.weight": torch.zeros(64, 64)}}, d / "llamagen-teacher.pt")
    _, wv, _ = _fixture("dd_var")
    torch.save({k: v for k, v in wv.items() if not k.startswith(("n_d_embed", "layerwise", "final_layer"))},
               d / "var-teacher.pth")
    torch.save({"ema": {k: v for k, v in w.items() if k != "layers.1.ffn_norm.weight"}}, d / "incomplete.pt")
    return {p.stem: str(p) for p in d.iterdir()}


BAD = [  # (id, argv after `convert dd`, regex of the one line)
    ("garbage-dd", ["--tokenizer", "{vq}", "--dd", "{garbage}"], "not a (PyTorch|varkit).*checkpoint|cannot read"),
    ("missing-dd", ["--tokenizer", "{vq}", "--dd", "{dir}/none.pt"], "not found"),
    ("teacher-llamagen", ["--tokenizer", "{vq}", "--dd", "{llamagen-teacher}"], "LlamaGen GPT.*varkit convert llamagen"),
    ("teacher-var", ["--tokenizer", "{vae}", "--dd", "{var-teacher}"], "VAR transformer.*varkit convert var"),
    ("tokenizer-as-dd", ["--tokenizer", "{vq}", "--dd", "{vq}"], "VQ tokenizer.*--tokenizer"),
    ("var-vae-for-llamagen-dd", ["--tokenizer", "{vae}", "--dd", "{llamagen-dd}", "--image-size", "16",
                                 "--timesteps", "0,8", "--split", "12"], "VAR|taming"),
    ("llamagen-vq-for-var-dd", ["--tokenizer", "{vq}", "--dd", "{var-dd}", "--timesteps", "0,3", "--split", "4"],
     "LlamaGen|not a VAR"),
    ("no-codebook", ["--tokenizer", str(ASSETS / "digits-mar" / "tokenizer"), "--dd", "{llamagen-dd}", "--image-size",
                     "16", "--timesteps", "0,8", "--split", "12"], "codebook"),
    ("other-codebook", ["--tokenizer", str(ASSETS / "digits"), "--dd", "{llamagen-dd}", "--image-size", "16",
                        "--timesteps", "0,8", "--split", "12"], "codebook.*teacher's tokenizer"),
    ("unknown-size", ["--tokenizer", "{vq}", "--dd", "{llamagen-dd}", "--image-size", "16"], "unknown size.*--timesteps"),
    ("unknown-size-var", ["--tokenizer", "{vae}", "--dd", "{var-dd}", "--split", "4"], "unknown size.*--timesteps"),
    ("bad-timesteps", ["--tokenizer", "{vq}", "--dd", "{llamagen-dd}", "--image-size", "16", "--timesteps", "0,16",
                       "--split", "12"], "--timesteps"),
    ("bad-split", ["--tokenizer", "{vae}", "--dd", "{var-dd}", "--timesteps", "0,3", "--split", "7"], "--split"),
    ("image-size", ["--tokenizer", "{vq}", "--dd", "{llamagen-dd}", "--image-size", "18", "--timesteps", "0,8",
                    "--split", "12"], "--image-size"),
    ("image-size-var", ["--tokenizer", "{vae}", "--dd", "{var-dd}", "--image-size", "256", "--timesteps", "0,3",
                        "--split", "4"], "--image-size"),
    ("incomplete", ["--tokenizer", "{vq}", "--dd", "{incomplete}", "--image-size", "16", "--timesteps", "0,8",
                    "--split", "12"], "incomplete"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_exit_2(case, bad, tmp_path, capsys):
    _, argv, match = case
    names = {**bad, "dir": str(Path(bad["vq"]).parent)}
    argv = [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in argv]
    line = _one_line_exit_2(["convert", "dd", *argv, "--out", str(tmp_path / "o")], capsys)
    assert re.search(match, line, re.IGNORECASE), line
    assert not (tmp_path / "o").exists()


def test_bad_input_api_raises_varkit_errors(files, bad, tmp_path):
    with pytest.raises(CheckpointError, match="LlamaGen GPT"):
        convert_dd(files["vq"], bad["llamagen-teacher"], tmp_path / "o")
    with pytest.raises(InvalidArgumentError, match="unknown size"):
        convert_dd(files["vae"], files["var"], tmp_path / "o")
    with pytest.raises(VarkitError):
        convert_dd(files["vq"], files["llamagen"], tmp_path / "o", image_size=16, timesteps=(1, 8), split=12)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_converters_point_dd_files_to_convert_dd(name):
    """A DD student handed to its teacher's state-dict converter says which command converts it."""
    from varkit.checkpoints.llamagen import gpt_state_dict_from_llamagen
    from varkit.checkpoints.var import var_state_dict_from_var
    from varkit.errors import CheckpointError

    _, w, _ = _fixture(name)
    convert = gpt_state_dict_from_llamagen if name == "dd_llamagen" else var_state_dict_from_var
    with pytest.raises(CheckpointError, match="varkit convert dd"):
        convert(w)
