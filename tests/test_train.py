"""Training: DDP over 2 gloo processes, SIGKILL + resume bit-exact, data errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from varkit.errors import DataError, InvalidArgumentError
from varkit.models import create_model
from varkit.train.data import load_dataset
from varkit.train.generator import TeacherForcing, make_generator_loss
from varkit.train.loop import Trainer, TrainConfig, batch_indices
from varkit.tokenizers import VQConfig, VQTokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_ok(cmd: list[str]) -> None:
    """Run a training command; a failure shows the command's own stderr (a CalledProcessError hides it)."""
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, f"exit {r.returncode}: {' '.join(map(str, cmd))}\n{r.stderr[-4000:]}"


def _tiny_tokenizer(path: Path) -> Path:
    torch.manual_seed(0)
    VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                         codebook_dim=4, norm_groups=4)).save_pretrained(path)
    return path


def _ddp_worker(rank, world, init_file, out_dir, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    gen = create_model("raster-tiny", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    data = torch.randint(0, 16, (64, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 4
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup=1, log_every=1, ckpt_every=1000, seed=0)
    losses = []

    def loss_fn(model, batch):
        loss, m = make_generator_loss(gen, 0.0)(model, batch)
        losses.append(float(loss))
        return loss, m

    t = Trainer(TeacherForcing(gen), loss_fn, lambda idx: (data[idx], labels[idx]), 64, cfg,
                Path(out_dir) / f"rank{rank}", torch.device("cpu"), kind="generator:test")
    t.fit()
    torch.save({"state": gen.state_dict(), "losses": losses}, Path(out_dir) / f"result{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, tmp_path / "init", tmp_path, 2), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "result0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "result1.pt", weights_only=True)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ranks hold identical weights
    (tmp_path / "single").mkdir()
    mp.spawn(_ddp_worker, args=(1, tmp_path / "init1", tmp_path / "single", 2), nprocs=1, join=True)
    r = torch.load(tmp_path / "single" / "result0.pt", weights_only=True)
    # the mean of the two half-batch losses is the loss over the same global batch
    # fp32 cross-entropies ~2.8 over 8 rows vs 2 x 4 rows: a few ulp (2.4e-7) apart, after the first update
    # also the weights' difference below times the gradient (~1e-7); 1e-5 on any CPU
    for step in range(2):
        assert abs((r0["losses"][step] + r1["losses"][step]) / 2 - r["losses"][step]) < 1e-5
    # weights after 2 AdamW steps (lr 1e-2): gradients summed in another order (all-reduce of half batches)
    # differ by fp32 noise, but Adam divides by sqrt(v), so a gradient that is mostly cancellation passes
    # its relative noise on to an update of size lr: 4.2e-6 (4e-4 lr) measured on AMX and AVX2; 1e-4 (1% of
    # lr) holds on any CPU and still catches a wrong split or average (errors of order lr)
    for k in r["state"]:
        torch.testing.assert_close(r0["state"][k], r["state"][k], rtol=1e-4, atol=1e-4)


def _train_cmd(tok, out, steps, *extra):
    return [sys.executable, "-m", "varkit.cli", "train", "generator", "--data", "digits", "--tokenizer", str(tok),
            "--config", "raster-tiny", "--resolution", "16", "--steps", str(steps), "--batch-size", "32",
            "--ckpt-every", "5", "--log-every", "1", "--warmup", "3", "--ema", "0.9", "--out", str(out), *extra]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "generator" / "model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    tok = _tiny_tokenizer(tmp_path / "tok")
    steps = 60
    run_ok(_train_cmd(tok, tmp_path / "full", steps))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tok, out, steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "train-generator" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = out / "train-generator" / "log.jsonl"
        if ckpt.exists() and log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; raise steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "generator").exists()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < steps
    run_ok(_train_cmd(tok, out, steps, "--resume", str(ckpt)))
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log = [json.loads(x) for x in (out / "train-generator" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert (out / "train-generator" / "loss.png").stat().st_size > 0


def test_resume_from_another_model_is_refused(tmp_path):
    tok = _tiny_tokenizer(tmp_path / "tok")
    run_ok(_train_cmd(tok, tmp_path / "a", 5))
    cmd = _train_cmd(tok, tmp_path / "b", 5, "--resume", str(tmp_path / "a" / "train-generator" / "checkpoint.pt"))
    cmd[cmd.index("raster-tiny")] = "digits-raster"
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_batch_indices_cover_epochs_without_repeats():
    seen = torch.cat([batch_indices(s, 10, 4, seed=0) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_trainer_refuses_batch_not_divisible_by_processes(monkeypatch):
    monkeypatch.setattr("varkit.train.loop.dist_info", lambda: (0, 3))
    with pytest.raises(InvalidArgumentError, match="not divisible"):
        Trainer(torch.nn.Linear(2, 2), None, None, 10, TrainConfig(batch_size=8), "/tmp/x", torch.device("cpu"))


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(str(tmp_path / "empty"), 32)
    (tmp_path / "noimg" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path / "noimg"), 32)
    (tmp_path / "bad" / "cats").mkdir(parents=True)
    (tmp_path / "bad" / "cats" / "x.png").write_bytes(b"not a png")
    ds = load_dataset(str(tmp_path / "bad"), 32)
    with pytest.raises(DataError, match="x.png"):
        ds.item(0)


def test_folder_dataset_resizes_and_crops(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / c / "1.png")
    ds = load_dataset(str(tmp_path), 16, flip=True)
    x, y = ds.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1] and ds.num_classes == 2
    assert torch.allclose(x[:, 0], torch.ones(2, 16, 16))  # red 255 -> 1.0 through a resize of a flat image: ulps


def test_resolution_not_divisible_by_downsampling(tmp_path):
    from varkit.train.generator import train_generator

    tok = _tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(InvalidArgumentError, match="not divisible"):
        train_generator("digits", tok, "raster-tiny", tmp_path / "o", TrainConfig(steps=1), resolution=18)


def test_adversarial_tokenizer_losses_move_only_their_own_player():
    from varkit.train.tokenizer import AdversarialTokenizer, tokenizer_loss

    torch.manual_seed(0)
    tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                               codebook_dim=4, norm_groups=4))
    model = AdversarialTokenizer(tok, weight=0.5, start=0).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out, g_loss, d_loss = model(x)
    g_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in model.disc.parameters())  # the generator term leaves D alone
    assert tok.model.decoder.conv_out.weight.grad.abs().sum() > 0
    tok.zero_grad()
    d_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tok.parameters())  # D's loss leaves G alone
    assert model.disc.net[0].weight.grad.abs().sum() > 0
    loss, metrics = tokenizer_loss(AdversarialTokenizer(tok, 0.5, start=10), (x, None))
    assert metrics["g_loss"] == 0.0 and "d_loss" in metrics  # before disc_start


def test_train_tokenizer_with_adversarial_loss_runs(tmp_path):
    from varkit.cli import main

    assert main(["train", "tokenizer", "--data", "digits", "--config", "digits-vq", "--resolution", "16",
                 "--steps", "2", "--batch-size", "4", "--adversarial", "0.1", "--out", str(tmp_path)]) == 0
    log = [json.loads(x) for x in (tmp_path / "train-tokenizer" / "log.jsonl").read_text().splitlines()]
    assert "d_loss" in log[-1]
    from varkit.modeling import load_module

    assert type(load_module(tmp_path / "tokenizer")).__name__ == "VQTokenizer"


def test_torchrun_two_processes_train_a_loadable_model(tmp_path):
    tok = _tiny_tokenizer(tmp_path / "tok")
    cmd = _train_cmd(tok, tmp_path / "ddp", 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "varkit.train", *cmd[cmd.index("generator"):]]
    run_ok(cmd)
    import varkit

    assert varkit.load_pipeline(tmp_path / "ddp")([0], seed=0).tokens.shape == (1, 16)
    # the --nproc shortcut re-launches the same thing
    short = _train_cmd(tok, tmp_path / "short", 2, "--nproc", "2")
    run_ok(short)
    assert (tmp_path / "short" / "generator" / "model.safetensors").exists()


# -- distillation (--teacher) ---------------------------------------------------------------------
def _tiny_teacher(tmp_path: Path, tok_dir: Path, seed: int = 0) -> Path:
    """A random-weight tiny raster teacher over the tokenizer in ``tok_dir`` (10 digit classes), CFG 2 by default."""
    from conftest import randomize
    from varkit.modeling import load_module
    from varkit.pipeline import Pipeline

    gen = randomize(create_model("raster-tiny", num_classes=10), std=0.5, seed=seed)
    out = tmp_path / f"teacher{seed}"
    Pipeline(load_module(tok_dir), gen, {"cfg": 2.0}, name="teacher").save_pretrained(out)
    return out


def _kl_to_teacher(teacher_dir: Path, student, n: int = 64) -> float:
    """Mean per-position KL(teacher || student) on sequences the teacher samples, cond and null rows."""
    import varkit
    from varkit.samplers import get_sampler
    from varkit.samplers.logits import image_generators

    pipe = varkit.load_pipeline(teacher_dir)
    labels = torch.arange(n) % 10
    toks = get_sampler("ancestral", pipe.sampling_params()).sample(pipe.generator, labels, image_generators(5, n)).tokens
    cond = torch.cat([labels, student.null_condition(labels)])
    with torch.no_grad():
        p = pipe.generator.teacher_forcing_logits(cond, torch.cat([toks, toks])).log_softmax(-1)
        q = student.eval().teacher_forcing_logits(cond, torch.cat([toks, toks])).log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_distilled_student_gets_closer_to_its_teacher(tmp_path):
    from varkit.train.generator import train_generator

    tok = _tiny_tokenizer(tmp_path / "tok")
    teacher = _tiny_teacher(tmp_path, tok)
    cfg = TrainConfig(steps=80, batch_size=32, lr=1e-2, warmup=2, log_every=5, ckpt_every=1000)
    before = create_model("raster-tiny", num_classes=10)  # the student at initialisation (zero head: uniform)
    plain = train_generator("digits", tok, "raster-tiny", tmp_path / "plain", cfg, resolution=16).generator
    student = train_generator("digits", tok, "raster-tiny", tmp_path / "student", cfg, resolution=16, teacher=teacher,
                              class_dropout=0.5, teacher_samples_count=256).generator
    kl0, kl_plain, kl = _kl_to_teacher(teacher, before), _kl_to_teacher(teacher, plain), _kl_to_teacher(teacher, student)
    assert kl < 0.6 * kl0 and kl < 0.5 * kl_plain, (kl0, kl_plain, kl)
    log = [json.loads(x) for x in (tmp_path / "student" / "train-generator" / "log.jsonl").read_text().splitlines()]
    assert {"kl", "ce"} <= set(log[-1]) and log[-1]["kl"] < log[0]["kl"]


def test_distillation_resumes_bit_exactly_and_refuses_other_settings(tmp_path, monkeypatch):
    from varkit.errors import CheckpointError
    from varkit.train.generator import train_generator

    tok = _tiny_tokenizer(tmp_path / "tok")
    teacher = _tiny_teacher(tmp_path, tok)
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-2, warmup=2, log_every=1, ckpt_every=5)
    opts = dict(resolution=16, teacher=teacher, class_dropout=0.5, teacher_samples_count=64, ce_weight=0.5,
                distill_cfg=2.0)
    full = train_generator("digits", tok, "raster-tiny", tmp_path / "full", cfg, **opts).generator

    class Crash(Exception):
        pass

    real_save = Trainer.save

    def save_then_crash(self):  # the process dies right after its step-5 checkpoint
        real_save(self)
        raise Crash

    monkeypatch.setattr(Trainer, "save", save_then_crash)
    with pytest.raises(Crash):
        train_generator("digits", tok, "raster-tiny", tmp_path / "cut", cfg, **opts)
    monkeypatch.setattr(Trainer, "save", real_save)
    ckpt = tmp_path / "cut" / "train-generator" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    for other in (dict(opts, teacher=None, ce_weight=0.0, teacher_samples_count=0, distill_cfg=None),
                  dict(opts, ce_weight=1.0), dict(opts, distill_cfg=None),
                  dict(opts, teacher=_tiny_teacher(tmp_path, tok, seed=1))):
        with pytest.raises(CheckpointError, match="other training settings"):
            train_generator("digits", tok, "raster-tiny", tmp_path / "cut", cfg, resume=str(ckpt), **other)
    resumed = train_generator("digits", tok, "raster-tiny", tmp_path / "cut", cfg, resume=str(ckpt), **opts).generator
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed distillation differs from the uninterrupted one"
    log = [json.loads(x) for x in (tmp_path / "cut" / "train-generator" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11)) and {"kl", "kl_cfg", "ce"} <= set(log[-1])


def test_distillation_and_init_errors(tmp_path):
    from varkit.train.generator import train_generator

    tok = _tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(1)
    other_tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                                     codebook_dim=4, norm_groups=4))
    other_tok.save_pretrained(tmp_path / "other_tok")
    teacher = _tiny_teacher(tmp_path, tmp_path / "other_tok")
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(InvalidArgumentError, match="another tokenizer"):
        train_generator("digits", tok, "raster-tiny", tmp_path / "o", cfg, resolution=16, teacher=teacher)
    with pytest.raises(InvalidArgumentError, match="only apply with --teacher"):
        train_generator("digits", tok, "raster-tiny", tmp_path / "o", cfg, resolution=16, ce_weight=1.0)
    with pytest.raises(InvalidArgumentError, match="has no field widht"):
        train_generator("digits", tok, "raster-tiny", tmp_path / "o", cfg, resolution=16, widht=3)
    with pytest.raises(InvalidArgumentError, match="no parameter"):
        train_generator("digits", tok, "raster-tiny", tmp_path / "o", cfg, resolution=16, init_from=teacher,
                        dim=48, n_head=2)


def test_init_from_copies_the_matching_weights(tmp_path):
    import varkit
    from varkit.train.generator import init_from_generator

    tok = _tiny_tokenizer(tmp_path / "tok")
    teacher = _tiny_teacher(tmp_path, tok)
    src = varkit.load_pipeline(teacher).generator.state_dict()
    student = create_model("raster-tiny", num_classes=10, n_layer=1)
    copied = init_from_generator(student, teacher)
    own = student.state_dict()
    assert "layers.0.attention.wqkv.weight" in copied and not any(k.startswith("layers.1") for k in own)
    assert all(torch.equal(own[k], src[k]) for k in copied) and set(copied) == set(own)


def test_teacher_samples_are_reproducible_and_never_the_evaluation_images(tmp_path):
    import varkit
    from varkit.samplers import get_sampler
    from varkit.samplers.logits import image_generators
    from varkit.train.generator import teacher_samples

    pipe = varkit.load_pipeline(_tiny_teacher(tmp_path, _tiny_tokenizer(tmp_path / "tok")))
    toks, labels = teacher_samples(pipe, 20, 0, torch.device("cpu"), batch=8)
    again, _ = teacher_samples(pipe, 20, 0, torch.device("cpu"), batch=20)
    assert torch.equal(toks, again) and labels.tolist() == [i % 10 for i in range(20)]
    # `generate --seed 0` / the benches draw image i from (0, i): a student must not train on those
    evaluated = get_sampler("ancestral", pipe.sampling_params()).sample(pipe.generator, labels, image_generators(0, 20)).tokens
    assert (toks != evaluated).any(1).all()
