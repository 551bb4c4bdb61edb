"""Multi-process training on the CPU (2 gloo processes): per-rank seeds, averaged logs, gradient accumulation,
FSDP, extracted codes; plus the loop's plots, command record and bad settings."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from varkit.errors import DataError, InvalidArgumentError
from varkit.models import create_model
from varkit.tokenizers import VQConfig, VQTokenizer
from varkit.train.generator import TeacherForcing, make_generator_loss
from varkit.train.loop import StepSampler, Trainer, TrainConfig, batch_indices

STEPS, BATCH = 3, 8


def _tiny_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                                codebook_dim=4, norm_groups=4)).eval()


def _data():
    data = torch.randint(0, 16, (64, 16), generator=torch.Generator().manual_seed(1))
    return data, torch.arange(64) % 4


def _train(out: Path, grad_accum: int = 1, fsdp: bool = False, ema: float = 0.0, workers: int = 0):
    """A few steps of a tiny raster generator (no dropout, no class dropout: the only randomness is the data
    order); returns (generator state, [(rank, micro-batch loss, one uniform draw)], Trainer)."""
    torch.manual_seed(0)
    gen = create_model("raster-tiny", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    data, labels = _data()
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup=1, log_every=1, ckpt_every=1000, seed=0,
                      grad_accum=grad_accum, fsdp=fsdp, ema=ema, workers=workers)
    seen = []
    base = make_generator_loss(gen, 0.0)
    rank = dist.get_rank() if dist.is_initialized() else 0

    def loss_fn(model, batch):
        loss, m = base(model, batch)
        seen.append((rank, float(loss.detach()), float(torch.rand(()))))
        return loss, {**m, "rank": float(rank)}

    t = Trainer(TeacherForcing(gen), loss_fn, lambda idx: (data[idx], labels[idx]), 64, cfg, out,
                torch.device("cpu"), kind="generator:test")
    final = t.fit()
    return {k: v.clone() for k, v in final.gen.state_dict().items()}, seen, t


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out_dir = Path(out_dir)
    state, seen, _ = _train(out_dir / "ddp")
    result = {"state": state, "seen": seen}
    # FSDP (torch's fully_shard over gloo) with EMA, then a checkpoint round trip: resume + 0 more steps
    fstate, _, t = _train(out_dir / "fsdp", fsdp=True, ema=0.9)
    result["fsdp_state"] = fstate if rank == 0 else None
    t2 = _train_fsdp_resumed(out_dir / "fsdp" / "checkpoint.pt", out_dir / "fsdp2")
    result["fsdp_resumed"] = t2 if rank == 0 else None
    # codes extracted by both ranks (shards of 500 images, 2 per rank) into one folder
    from varkit.train.codes import extract_codes
    from varkit.train.data import load_dataset

    extract_codes(_tiny_tokenizer(), load_dataset("digits", 16), out_dir / "codes2", torch.device("cpu"), flip=True,
                  shard_size=500)
    torch.save(result, out_dir / f"result{rank}.pt")
    dist.destroy_process_group()


def _train_fsdp_resumed(ckpt, out):
    torch.manual_seed(0)
    gen = create_model("raster-tiny", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    data, labels = _data()
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup=1, log_every=1, ckpt_every=1000, seed=0,
                      fsdp=True, ema=0.9)
    t = Trainer(TeacherForcing(gen), make_generator_loss(gen, 0.0), lambda idx: (data[idx], labels[idx]), 64, cfg,
                out, torch.device("cpu"), kind="generator:test")
    t.resume(ckpt)
    final = t.fit()  # every rank: gathering the full weights is a collective
    return {k: v.clone() for k, v in final.gen.state_dict().items()} if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process gloo run (spawned once for the tests below) and its results."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, tmp / "init", tmp), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"result{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_finish_with_identical_weights_and_own_random_draws(two_ranks):
    tmp, (r0, r1) = two_ranks
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # DDP: every rank applies the same update
    draws0 = [u for _, _, u in r0["seen"]]
    draws1 = [u for _, _, u in r1["seen"]]
    assert len(draws0) == STEPS and all(a != b for a, b in zip(draws0, draws1))  # per-rank seeds: own dropout/noise


@pytest.mark.slow
def test_logged_loss_and_metrics_are_the_mean_over_ranks(two_ranks):
    tmp, (r0, r1) = two_ranks
    log = [json.loads(x) for x in (tmp / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for step, rec in enumerate(log):
        # (a + b) / 2 of two fp32 losses ~2.8, summed in fp64 on both sides: exact; 1e-12 leaves room for nothing else
        assert abs(rec["loss"] - (r0["seen"][step][1] + r1["seen"][step][1]) / 2) < 1e-12
        assert rec["rank"] == 0.5  # every logged component is averaged too


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum_2(two_ranks, tmp_path):
    _, (r0, r1) = two_ranks
    state, seen, t = _train(tmp_path / "accum", grad_accum=2)
    # The same micro-batches (rank r's slice = micro-step r), so each gradient is g0/2 + g1/2 in both runs: DDP
    # all-reduces g0 + g1 over 2 ranks and divides by 2, accumulation back-propagates loss/2. Scaling by a power
    # of two is exact in IEEE arithmetic (no subnormals at these magnitudes, ~1e-3..1) and commutes with every
    # rounding of the backward pass, and a + b is commutative: bit-identical on any CPU, not just close.
    for k in state:
        assert torch.equal(state[k], r0["state"][k]), k
    logged = [h["loss"] for h in t.history]
    assert logged == [(r0["seen"][s][1] + r1["seen"][s][1]) / 2 for s in range(STEPS)]
    assert [l for _, l, _ in seen[0::2]] == [l for _, l, _ in r0["seen"]]


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes(two_ranks):
    tmp, (r0, _) = two_ranks
    ddp, fsdp = r0["state"], r0["fsdp_state"]  # FSDP returned the EMA (0.9) copy; compare its raw weights instead
    ck = torch.load(tmp / "fsdp" / "checkpoint.pt", weights_only=True)
    assert ck["fsdp"] and ck["step"] == STEPS and set(ck["model"]) == {"gen." + k for k in ddp}  # TeacherForcing's
    # reduce-scatter of 2 half-batch gradients vs DDP's all-reduce: the same sum a + b and the same /2; Adam then
    # sees equal gradients up to the fp32 rounding of another bucketing (a few ulp), amplified at most to
    # ~1e-6 x lr-sized updates: 1e-5 (0.1 % of lr 1e-2) holds on any CPU and catches a wrong shard or average
    for k in ddp:
        torch.testing.assert_close(ck["model"]["gen." + k], ddp[k], rtol=1e-5, atol=1e-5)
    for k in fsdp:  # the EMA differs from the raw weights, and is what fit() returned
        assert torch.equal(ck["ema"]["gen." + k], fsdp[k]), k
    resumed = r0["fsdp_resumed"]  # resumed at the last step: nothing more to train, same EMA weights back
    for k in fsdp:
        assert torch.equal(resumed[k], fsdp[k]), k


@pytest.mark.slow
def test_codes_extracted_by_two_ranks_equal_one_process(two_ranks, tmp_path):
    tmp, _ = two_ranks
    from varkit.train.codes import CodesStore, extract_codes
    from varkit.train.data import load_dataset

    extract_codes(_tiny_tokenizer(), load_dataset("digits", 16), tmp_path / "codes1", torch.device("cpu"), flip=True,
                  shard_size=500)
    a, b = CodesStore(tmp / "codes2"), CodesStore(tmp_path / "codes1")
    idx = torch.arange(len(a))
    for f in (0, 1):  # same images, same 64-image encode batches: the same computation on any CPU
        assert torch.equal(a.rows(idx, torch.full_like(idx, f)), b.rows(idx, torch.full_like(idx, f)))
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] and len(a.manifest["shards"]) == 4


# -- extracted codes --------------------------------------------------------------------------------
def test_extracted_codes_equal_tokenizing_on_the_fly(tmp_path):
    from varkit.train.codes import CodesStore, TokenBatches, extract_codes
    from varkit.train.data import load_dataset

    tok, ds = _tiny_tokenizer(), load_dataset("digits", 16)
    ds.x, ds.y = ds.x[:150], ds.y[:150]  # a few shards' worth is enough
    layout = create_model("raster-tiny").layout
    extract_codes(tok, ds, tmp_path / "codes", torch.device("cpu"), flip=True, batch=64, shard_size=100)
    batches = TokenBatches(CodesStore(tmp_path / "codes"), layout)
    assert len(batches) == len(ds) == 150 and len(batches.codes.manifest["shards"]) == 2
    n = len(ds)
    chunk = torch.arange(64)  # the first encode batch of the extraction: the same computation here
    with torch.no_grad():
        plain = layout.from_grids(tok.encode(ds.batch(chunk)[0]))
        mirrored = layout.from_grids(tok.encode(ds.batch(chunk + n)[0]))  # virtual index i + n = image i flipped
    v = torch.tensor([5, 63 + n, 0, 17 + n, 17])  # all in shard 0's first encode batch
    tokens, labels = batches(v)
    want = torch.stack([plain[5], mirrored[63], plain[0], mirrored[17], plain[17]])
    assert torch.equal(tokens, want) and tokens.dtype == torch.long
    assert labels.tolist() == ds.labels()[v % n].tolist()
    assert not torch.equal(plain[17], mirrored[17])
    # reused as they are (nothing rewritten); other settings are refused, never overwritten
    mtime = (tmp_path / "codes" / "codes-00000.npy").stat().st_mtime_ns
    extract_codes(tok, ds, tmp_path / "codes", torch.device("cpu"), flip=True)
    assert (tmp_path / "codes" / "codes-00000.npy").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="flip"):
        extract_codes(tok, ds, tmp_path / "codes", torch.device("cpu"), flip=False)
    with pytest.raises(DataError, match="tokenizer"):
        extract_codes(VQTokenizer(tok.config), ds, tmp_path / "codes", torch.device("cpu"), flip=True)
    with pytest.raises(DataError, match="layout does not take"):
        TokenBatches(CodesStore(tmp_path / "codes"), create_model("raster-tiny", grid=2).layout)


def test_extract_codes_folder_errors(tmp_path):
    from varkit.train.codes import CodesStore, extract_codes
    from varkit.train.data import load_dataset

    tok, ds = _tiny_tokenizer(), load_dataset("digits", 16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        extract_codes(tok, ds, tmp_path / "file", torch.device("cpu"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="other files"):
        extract_codes(tok, ds, tmp_path / "busy", torch.device("cpu"))
    with pytest.raises(DataError, match="no extracted codes"):
        CodesStore(tmp_path)


@pytest.mark.slow
def test_cli_extract_codes_accumulation_samples_and_command_record(tmp_path, monkeypatch):
    import sys

    from varkit.cli import main

    _tiny_tokenizer().save_pretrained(tmp_path / "tok")
    base = ["train", "generator", "--data", "digits", "--tokenizer", str(tmp_path / "tok"), "--config", "raster-tiny",
            "--resolution", "16", "--batch-size", "8", "--grad-accum", "2", "--log-every", "1", "--ckpt-every", "2",
            "--warmup", "1", "--flip", "--extract-codes", str(tmp_path / "codes"), "--sample-every", "2",
            "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["varkit", *base, "--steps", "2"])  # what COMMAND.txt records
    assert main([*base, "--steps", "2"]) == 0
    assert (tmp_path / "codes" / "codes.json").is_file()
    assert (tmp_path / "run" / "train-generator" / "samples" / "step_0000002.png").stat().st_size > 0
    ck = tmp_path / "run" / "train-generator" / "checkpoint.pt"
    monkeypatch.setattr(sys, "argv", ["varkit", *base, "--steps", "4", "--resume", str(ck)])
    assert main([*base, "--steps", "4", "--resume", str(ck)]) == 0
    record = (tmp_path / "run" / "generator" / "COMMAND.txt").read_text().splitlines()
    assert len(record) == 2 and "--resume" not in record[0] and "--resume" in record[1]
    assert all(r.startswith("varkit ") and "--extract-codes" in r for r in record)
    log = [json.loads(x) for x in (tmp_path / "run" / "train-generator" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "train-generator" / "samples" / "step_0000004.png").is_file()


def test_workers_give_the_same_training(tmp_path):
    a, _, _ = _train(tmp_path / "a")
    b, _, _ = _train(tmp_path / "b", workers=1)  # batches made in a worker process: the same batches
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- data order --------------------------------------------------------------------------------------
def test_flips_are_drawn_per_epoch_and_leave_the_order_alone():
    n = 10
    plain = torch.cat([batch_indices(s, n, 5, seed=3) for s in range(6)])
    flipped = torch.cat([batch_indices(s, n, 5, seed=3, flip=True) for s in range(6)])
    assert torch.equal(flipped % n, plain)  # the same permutations as a run without flips
    for e in range(3):  # each epoch: every image once, in one orientation
        assert sorted((flipped[e * n:(e + 1) * n] % n).tolist()) == list(range(n))
    coins = (flipped >= n).view(3, n).gather(1, plain.view(3, n).argsort(1))  # per image, per epoch
    assert (coins[0] != coins[1]).any() and 0 < int(coins.sum()) < 3 * n


def test_step_sampler_splits_global_batches_over_ranks_and_micro_steps():
    cfg = TrainConfig(steps=3, batch_size=8, seed=1, grad_accum=2)
    per_rank = [list(StepSampler(20, cfg, r, 2, start=1)) for r in range(2)]
    for i, step in enumerate(range(1, 3)):
        got = torch.cat([per_rank[0][2 * i], per_rank[0][2 * i + 1], per_rank[1][2 * i], per_rank[1][2 * i + 1]])
        assert torch.equal(got, batch_indices(step, 20, 8, 1))
    assert len(StepSampler(20, cfg, 0, 2, start=1)) == 4
    assert sorted(batch_indices(0, 10, 10, seed=2 ** 64 - 1).tolist()) == list(range(10))  # the CLI's largest seed


# -- bad settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("log_every", 0), ("ckpt_every", 0),
                                         ("grad_accum", 0), ("workers", -1), ("sample_every", -1), ("ema", 1.0),
                                         ("lr", float("nan")), ("steps", 2.5), ("grad_accum", True)])
def test_bad_train_settings_fail_at_the_door(field, value):
    with pytest.raises(InvalidArgumentError, match=f"--{field.replace('_', '-')}"):
        TrainConfig(**{field: value})


def test_batch_not_divisible_by_accumulation_and_fsdp_without_processes():
    with pytest.raises(InvalidArgumentError, match="not divisible.*multiple of 3"):
        Trainer(torch.nn.Linear(2, 2), None, None, 10, TrainConfig(batch_size=8, grad_accum=3), "/tmp/x",
                torch.device("cpu"))
    with pytest.raises(InvalidArgumentError, match="--fsdp"):
        Trainer(torch.nn.Linear(2, 2), None, None, 10, TrainConfig(batch_size=8, fsdp=True), "/tmp/x",
                torch.device("cpu"))


def test_cli_bad_accumulation_is_one_line_exit_2(tmp_path, capsys):
    from varkit.cli import main

    try:  # argparse's range check (exit 2 after its usage lines) or varkit's one-line error: both exit 2
        rc = main(["train", "generator", "--data", "digits", "--tokenizer", str(tmp_path), "--config", "raster-tiny",
                   "--grad-accum", "0", "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--grad-accum" in err[-1] and not (tmp_path / "o").exists()


# -- plots -----------------------------------------------------------------------------------------
def test_loss_plot_has_a_readable_panel_per_component(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from varkit.train.loop import _readable_axis, plot_loss

    hist = [{"step": s, "loss": 5.0 / s, "recon": 0.1 + 0.001 * s, "vq": -0.5 + 0.01 * s, "lr": 1e-3,
             "images_per_s": 10.0} for s in range(1, 101)]
    plot_loss(hist, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    fig, ax = plt.subplots()
    _readable_axis(ax, [h["loss"] for h in hist][10:] + [1e-3])  # positive over > a decade: log
    assert ax.get_yscale() == "log"
    fig, ax = plt.subplots()
    _readable_axis(ax, [100.0] + [1.0 + 0.01 * i for i in range(99)])  # an initial spike leaves the frame
    assert ax.get_yscale() == "linear" and ax.get_ylim()[1] < 3
    plt.close("all")
