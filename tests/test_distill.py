"""DD1 students, the distilled sampler, the data folder and `train distill`, and their one-line refusals."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from varkit.distill.data import load_distill_data, make_distill_data, shard_name
from varkit.distill.flow import teacher_flow
from varkit.errors import DataError, InvalidArgumentError, VarkitError
from varkit.models import create_model
from varkit.models.dd import DDRasterGenerator, DDScalesGenerator, check_teacher, student_from_teacher
from varkit.pipeline import Pipeline, load_pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer, VQConfig, VQTokenizer

from conftest import randomize
from test_compile import inductor_cache_per_isa  # noqa: F401  (autouse: compiled graphs cached per ISA, as the compile tests)


def _vq(seed=0):
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                                codebook_dim=4, norm_groups=4)).eval()


def _raster_teacher():
    return Pipeline(_vq(), randomize(create_model("raster-tiny"), std=0.3), {"cfg": 2.0}, name="tiny")


def _scales_teacher():
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                           patch_nums=(1, 2, 4), norm_num_groups=4)).eval()
    return Pipeline(tok, randomize(create_model("var-tiny"), std=0.3), {"cfg": 2.0}, name="tiny-var")


def _student_pipe(teacher: Pipeline, **kw) -> Pipeline:
    s = randomize(student_from_teacher(teacher.generator, teacher.tokenizer, dd_timesteps=(0, 2)), std=0.1, seed=3)
    with torch.no_grad():  # randomize overwrote the codebook buffer too: put the tokenizer's back
        s.codebook.copy_(teacher.tokenizer.codebook().detach())
    return Pipeline(teacher.tokenizer, s, {**teacher.defaults, "sampler": "distilled", "sampler_options": {"steps": 1}, **kw})


@pytest.fixture(params=["raster", "scales"])
def teacher(request):
    return _raster_teacher() if request.param == "raster" else _scales_teacher()


# -- the students: official structure, initialisation, what each position sees -----------------------------------
def test_raster_student_has_the_official_ddtransformer_parts_and_the_teachers_weights():
    t = _raster_teacher()
    s = student_from_teacher(t.generator, t.tokenizer)
    c = t.generator.config
    assert isinstance(s, DDRasterGenerator)
    assert isinstance(s.tok_embeddings, torch.nn.Linear) and s.tok_embeddings.in_features == 4
    assert tuple(s.n_d_embed.weight.shape) == (2, c.dim)
    assert {n for n, _ in s.final_layer_conti.named_parameters()} == {"linear.weight", "linear.bias", "scale_shift_table"}
    assert tuple(s.final_layer_conti.linear.weight.shape) == (4, c.dim)
    theirs = t.generator.state_dict()
    for k, v in s.state_dict().items():
        if k.startswith(("layers.", "cls_embedding.", "norm.", "output.")):
            assert torch.equal(v, theirs[k]), k
    assert torch.equal(s.codebook, t.tokenizer.codebook())


def test_scales_student_has_the_official_dd_model_parts_and_shifted_tables():
    t = _scales_teacher()
    s = student_from_teacher(t.generator, t.tokenizer)
    g, c = t.generator, t.generator.config
    L, S = g.layout.num_tokens, len(c.patch_nums)
    assert isinstance(s, DDScalesGenerator)
    assert tuple(s.pos_1LC.shape) == (1, L + 1, c.dim) and tuple(s.lvl_embed.weight.shape) == (S + 1, c.dim)
    assert len(s.layerwise_n_d_embed) == c.depth + 1
    assert torch.equal(s.lvl_embed.weight[0], g.lvl_embed.weight[0]) and torch.equal(s.lvl_embed.weight[2:], g.lvl_embed.weight[1:])
    assert torch.equal(s.pos_1LC[:, 0], g.pos_1LC[:, 0]) and torch.equal(s.pos_1LC[:, 2:], g.pos_1LC[:, 1:])
    assert torch.equal(s.word_embed.weight, g.word_embed.weight)
    assert torch.equal(s.blocks[1].attn.wqkv.weight, g.blocks[1].attn.wqkv.weight)


def test_each_position_sees_what_the_official_masks_allow(teacher):
    s = _student_pipe(teacher).generator
    lay = s.layout
    N, d = lay.num_tokens, s.codebook.shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, d, generator=g)
    cond, t0 = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    j = lay.step_starts[1]  # the first token of step 1
    y = x.clone()
    y[:, j] += 1.0
    with torch.no_grad():
        (ca, la), (cb, lb) = s.dd_forward(x, cond, t0), s.dd_forward(y, cond, t0)
    changed = (la - lb).abs().amax(-1) > 1e-5  # fp32 outputs of a 2-layer model: untouched ones agree to ~1e-7
    if lay.kind == "raster":  # causal: token j moves itself and later tokens only
        assert not changed[:, :j].any() and changed[:, j].all()
    else:  # VAR-DD: a token sees earlier scales and itself, not the rest of its own scale
        same_scale = torch.zeros(N, dtype=torch.bool)
        same_scale[lay.step_slice(1)] = True
        same_scale[j] = False
        assert not changed[:, :lay.step_starts[1]].any() and not changed[:, same_scale].any() and changed[:, j].all()
        assert changed[:, lay.step_starts[2]:].any()
    # the data/noise flag: the same inputs read as data (t = 2) give other outputs at the data positions
    with torch.no_grad():
        _, l2 = s.dd_forward(x, cond, torch.full((2,), 2))
    assert (l2 - la).abs().amax() > 1e-4


def test_students_refuse_the_ar_contract_and_bad_inputs(teacher):
    s = _student_pipe(teacher).generator
    with pytest.raises(InvalidArgumentError, match="sampler='distilled'"):
        s.prefill(torch.tensor([0]), None)
    with pytest.raises(InvalidArgumentError, match="sampler='distilled'"):
        get_sampler("ancestral").sample(s, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="takes inputs"):
        s.dd_forward(torch.zeros(1, 3, 4), torch.tensor([0]), torch.zeros(1, dtype=torch.long))


# -- the sampler ------------------------------------------------------------------------------------------------
def test_one_step_pipeline_and_its_saved_folder(teacher, tmp_path):
    pipe = _student_pipe(teacher)
    out = pipe([0, 1, 2])
    assert out.stats.forward_passes == 1 and out.tokens.shape == (3, pipe.generator.layout.num_tokens)
    pipe.save_pretrained(tmp_path / "dd")
    again = load_pipeline(tmp_path / "dd")
    assert again.sampler_choice(None) == ("distilled", {"steps": 1})
    out2 = again([0, 1, 2])
    # fp32 logits of the same weights; argmax ties are measure-zero for random weights
    assert torch.equal(out2.tokens, out.tokens) and out2.stats.forward_passes == 1


def test_noise_makes_draws_reproducible_and_batch_independent(teacher):
    pipe = _student_pipe(teacher)
    N, d = pipe.generator.layout.num_tokens, pipe.generator.codebook.shape[1]
    noise = torch.randn(4, N, d, generator=torch.Generator().manual_seed(9))
    a = pipe([0, 1, 2, 3], noise=noise).tokens
    b = pipe([0, 1, 2, 3], noise=noise, batch_size=3).tokens  # rows used in order across batches
    c = pipe([0, 1, 2, 3], seed=4).tokens
    d_ = pipe([0, 1, 2, 3], seed=4, batch_size=1).tokens
    # one pass of fp32 attention over batch 3/4 vs 1/4 rows: ~1e-7 apart, argmax/nearest ties measure-zero
    assert torch.equal(a, b) and torch.equal(c, d_) and not torch.equal(a, c)


def test_two_steps_keep_the_first_pass_prefix_and_reuse_the_noise(teacher):
    pipe = _student_pipe(teacher)
    s = pipe.generator
    N, d = s.layout.num_tokens, s.codebook.shape[1]
    noise = torch.randn(3, N, d, generator=torch.Generator().manual_seed(1))
    one = pipe([0, 1, 2], noise=noise)
    two = pipe([0, 1, 2], noise=noise, steps=2)
    m = s.layout.step_starts[2]  # dd_timesteps (0, 2): the second pass starts at layout step 2
    assert two.stats.forward_passes == 2 and two.stats.accepted_per_pass == [float(m), float(N - m)]
    assert torch.equal(two.tokens[:, :m], one.tokens[:, :m])
    # the second pass sees the first pass's codewords before step 2 and the same noise after it
    book = s.codebook
    x = torch.cat([book[one.tokens[:, :m]], noise[:, m:]], 1)
    with torch.no_grad():
        _, logits = s.dd_forward(x, torch.tensor([0, 1, 2]), torch.full((3,), 2))
    assert torch.equal(two.tokens[:, m:], logits.argmax(-1)[:, m:])


def test_split_takes_the_continuous_output_after_it(teacher):
    pipe = _student_pipe(teacher)
    s = pipe.generator
    N, d = s.layout.num_tokens, s.codebook.shape[1]
    noise = torch.randn(2, N, d, generator=torch.Generator().manual_seed(2))
    out = pipe([1, 3], noise=noise, split=1)
    with torch.no_grad():
        conti, logits = s.dd_forward(noise, torch.tensor([1, 3]), torch.zeros(2, dtype=torch.long))
    k = s.layout.step_starts[1]
    near = torch.cdist(conti, s.codebook[None].expand(2, -1, -1)).argmin(-1)
    assert torch.equal(out.tokens[:, :k], logits.argmax(-1)[:, :k])
    assert torch.equal(out.tokens[:, k:], near[:, k:])


def test_teacher_involved_steps_come_from_the_teachers_flow(teacher):
    pipe = _student_pipe(teacher)
    s = pipe.generator
    N, d = s.layout.num_tokens, s.codebook.shape[1]
    noise = torch.randn(2, N, d, generator=torch.Generator().manual_seed(3))
    cond = torch.tensor([0, 2])
    out = pipe([0, 2], noise=noise, teacher=teacher, teacher_from=1)
    first = pipe([0, 2], noise=noise).tokens
    k, mid = s.layout.step_starts[1], s.layout.step_starts[2]
    assert torch.equal(out.tokens[:, :k], first[:, :k])
    with torch.no_grad():
        ids, _ = teacher_flow(teacher.generator, cond, noise, pipe.sampling_params(), s.codebook, tokens=first, start=1, stop=2)
    assert torch.equal(out.tokens[:, k:mid], ids[:, k:mid])
    assert out.stats.forward_passes >= 3


def test_sampler_refusals(teacher, tmp_path):
    pipe = _student_pipe(teacher)
    N, d = pipe.generator.layout.num_tokens, pipe.generator.codebook.shape[1]
    with pytest.raises(InvalidArgumentError, match="steps must be 1 or 2"):
        pipe([0], steps=3)
    with pytest.raises(InvalidArgumentError, match=f"noise must have shape \\(B, {N}, {d}\\)"):
        pipe([0], noise=torch.zeros(1, N, d + 1))
    with pytest.raises(InvalidArgumentError, match="noise has 1 rows but 2 images"):
        pipe([0, 1], noise=torch.zeros(1, N, d))
    with pytest.raises(InvalidArgumentError, match="not one"):
        get_sampler("distilled").sample(teacher.generator, torch.tensor([0]), image_generators(0, 1))
    with pytest.raises(InvalidArgumentError, match="teacher_from needs teacher"):
        pipe([0], teacher_from=1)
    with pytest.raises(InvalidArgumentError, match="exclude each other"):
        pipe([0], steps=2, teacher=teacher)


def test_student_whose_tokenizer_differs_from_its_teachers_is_refused():
    t = _raster_teacher()
    s = _student_pipe(t).generator
    other = _vq(seed=7)
    with pytest.raises(InvalidArgumentError, match="trained on another tokenizer"):
        Pipeline(other, s)
    other_teacher = Pipeline(other, t.generator, {"cfg": 2.0})
    pipe = Pipeline(t.tokenizer, s, {"sampler": "distilled"})
    with pytest.raises(InvalidArgumentError, match="trained on another tokenizer"):
        pipe([0], teacher=other_teacher, teacher_from=1)


def test_unsupported_teachers_are_refused_in_one_line(tmp_path):
    for gen in (create_model("raster-tiny", layout="neighbors"), create_model("raster-tiny", caption_dim=8)):
        with pytest.raises(InvalidArgumentError, match="raster \\(LlamaGen\\) or scales \\(VAR\\) teacher of token ids"):
            check_teacher(gen)
    nar = Pipeline(_vq(), create_model("raster-tiny", layout="neighbors"), name="nar")
    nar.save_pretrained(tmp_path / "nar")
    with pytest.raises(InvalidArgumentError, match="teacher of token ids"):
        make_distill_data(str(tmp_path / "nar"), 4, tmp_path / "data", progress=False)


# -- data folders and training ------------------------------------------------------------------------------------
def test_data_is_resumable_sharded_by_rank_and_checked(tmp_path, monkeypatch):
    t = _raster_teacher()
    t.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "data"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    make_distill_data(str(tmp_path / "teacher"), 10, out, batch_size=3, shard_size=4, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(1)]
    with pytest.raises(DataError, match="is partial: 1 of 3 shards"):
        load_distill_data(out)
    monkeypatch.setenv("RANK", "0")
    make_distill_data(str(tmp_path / "teacher"), 10, out, batch_size=3, shard_size=4, progress=False)
    noise, tokens, labels, m = load_distill_data(out)
    assert noise.shape == (10, 16, 4) and tokens.shape == (10, 16) and labels.tolist() == [i % 4 for i in range(10)]
    # the pairs are the teacher's flow map of the noise, under its default CFG
    with torch.no_grad():
        want, _ = teacher_flow(t.generator, labels, noise, t.sampling_params(), t.tokenizer.codebook().detach())
    assert torch.equal(tokens, want)
    # resume: a lost shard is remade identically, the rest is kept
    (out / shard_name(1)).unlink()
    monkeypatch.setenv("WORLD_SIZE", "1")
    make_distill_data(str(tmp_path / "teacher"), 10, out, batch_size=5, shard_size=4, progress=False)
    assert torch.equal(load_distill_data(out)[1], tokens)
    with pytest.raises(DataError, match="other settings \\(num\\)"):
        make_distill_data(str(tmp_path / "teacher"), 12, out, shard_size=4, progress=False)


def test_empty_or_foreign_data_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty: not a `varkit distill data` folder"):
        load_distill_data(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_distill_data(tmp_path / "nothing")


def test_train_distill_end_to_end_and_its_refusals(tmp_path):
    from varkit.cli import main
    from varkit.train.distill import train_distill
    from varkit.train.loop import TrainConfig

    t = _raster_teacher()
    t.save_pretrained(tmp_path / "teacher")
    assert main(["distill", "data", "--teacher", str(tmp_path / "teacher"), "--num", "16", "--out",
                 str(tmp_path / "data"), "--batch-size", "8", "--shard-size", "8"]) == 0
    assert (tmp_path / "data" / "COMMAND.txt").read_text().startswith("varkit ")
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=2, log_every=2, ckpt_every=6)
    pipe = train_distill(str(tmp_path / "teacher"), tmp_path / "data", tmp_path / "dd", cfg, timesteps="0,2")
    assert pipe.generator.config.dd_timesteps == (0, 2)
    log = (tmp_path / "dd" / "train-distill" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3 and "ce" in log[0] and "mse" in log[0]
    loaded = load_pipeline(tmp_path / "dd")
    assert loaded([0, 1]).stats.forward_passes == 1 and loaded([0, 1], steps=2).stats.forward_passes == 2
    assert (tmp_path / "dd" / "generator" / "DATA_COMMAND.txt").is_file()
    # another teacher's data, bad timesteps, a partial folder
    other = Pipeline(t.tokenizer, randomize(create_model("raster-tiny"), std=0.3, seed=5), {"cfg": 2.0})
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DataError, match="made by another teacher"):
        train_distill(str(tmp_path / "other"), tmp_path / "data", tmp_path / "dd2", cfg)
    with pytest.raises(InvalidArgumentError, match="--timesteps must be distinct layout steps"):
        train_distill(str(tmp_path / "teacher"), tmp_path / "data", tmp_path / "dd2", cfg, timesteps="2,0")
    (tmp_path / "data" / shard_name(1)).unlink()
    with pytest.raises(DataError, match="is partial"):
        train_distill(str(tmp_path / "teacher"), tmp_path / "data", tmp_path / "dd2", cfg)
    # the CLI prints the refusal as one line and exits 2
    assert main(["train", "distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "dd3"), "--steps", "1"]) == 2


@pytest.mark.slow
def test_compiled_raster_student_matches_eager_and_compiles_once():
    """compile_decoding on a raster DD student: the same 1- and 2-step tokens as eager (fp32: logits ~1e-6
    apart, the argmax / nearest-codeword ties they could flip are measure-zero for random weights) and one graph
    per batch size for every pass of both runs."""
    pytest.importorskip("torch._inductor")
    pipe = _student_pipe(_raster_teacher())
    gen = pipe.generator
    N, d = gen.layout.num_tokens, gen.codebook.shape[1]
    noise = torch.randn(3, N, d, generator=torch.Generator().manual_seed(5))
    want = [pipe([0, 1, 2], noise=noise, steps=s).tokens for s in (1, 2)]
    torch._dynamo.reset()
    assert gen.compile_decoding() is gen and gen.compiled_decoding
    torch._dynamo.utils.counters.clear()
    got = [pipe([0, 1, 2], noise=noise, steps=s).tokens for s in (1, 2)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == 1, dict(frames)  # t is a tensor input: both passes of the 2-step run share the graph
    gen.to(torch.float32)
    assert not gen.compiled_decoding  # .to() drops the frozen graph
