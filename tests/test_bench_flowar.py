"""``varkit bench flowar`` and ``varkit bench annealing`` end to end on tiny models (no FlowAR checkout needed: the
official side is skipped with a message; with one at ``$VARKIT_FLOWAR_OFFICIAL`` or /work/ref/flowar a slow test
runs it on a small FlowAR), the FLOP counts the floors use, and one clear line for each bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from varkit.bench.flowar import ar_flops, head_call_flops, head_prepare_flops, run_bench
from varkit.cli import main
from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.random import image_generators
from varkit.tokenizers import create_tokenizer

TINY = ["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--copy-mib", "4", "--gemm-size", "128"]
OFFICIAL = Path(os.environ.get("VARKIT_FLOWAR_OFFICIAL", "/work/ref/flowar"))


@pytest.fixture(autouse=True)
def floor_cache(tmp_path, monkeypatch):
    """A private floor cache: the benches read (and here measure, quickly) the machine's floor there."""
    monkeypatch.setenv("VARKIT_CACHE", str(tmp_path / "cache"))


def tiny_flowar(seed: int = 0, **kw):
    """flowar-tiny with every weight N(0, 0.3²) (FlowAR's zero-initialised output layer would give tokens = noise)."""
    gen = create_model("flowar-tiny", **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return gen.eval()


def test_bench_flowar_tiny_without_official(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "flowar", *TINY, "--batch", "1", "2", "--head-steps", "3", "--anneal", "3:1",
                 "--dtype", "float32", "bfloat16", "--repeats", "2", "1", "--out-dir", str(out), "--name", "t"]) == 0
    text = capsys.readouterr().out
    assert "official side skipped" in text and "wrote" in text
    data = json.loads((out / "t.json").read_text())
    rows, settings = data["rows"], data["settings"]
    assert [(r["impl"], r["dtype"], r["head_steps"], r["batch"]) for r in rows] == [
        ("varkit", "float32", "3", 1), ("varkit", "bfloat16", "3", 1), ("varkit", "float32", "3:1", 1),
        ("varkit", "float32", "3", 2), ("varkit", "bfloat16", "3", 2), ("varkit", "float32", "3:1", 2)]
    for r in rows:
        for key in ("s_per_image", "cpu_s_per_image", "ar_s", "head_s", "decode_s", "ar_cpu_s", "head_cpu_s",
                    "decode_cpu_s", "ar_floor_s", "head_floor_s", "decode_floor_s", "floor_s", "x_floor", "head_flops",
                    "ar_flops", "decode_flops"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, key
        assert r["floor_s"] > 0 and r["images_max_abs_diff"] is None and "vs_official" not in r
        assert r["fraction_of_floor"] == pytest.approx(1 / r["x_floor"], rel=1e-12)
        B = r["batch"]
        if r["head_steps"] == "3":
            # scales 1, 2, 4 at 3 Euler steps (t = 1, 2/3, 1/3; interval 0.9): scale 0 unguided (its CFG weight is 1),
            # on the others t = 1 runs the conditional rows only, the two guided steps both halves
            assert r["head_calls"] == 9 and r["head_prepares"] == 3
            assert r["head_rows"] == B * (3 * 1 + (1 + 2 + 2) * 4 + (1 + 2 + 2) * 16)
        else:  # 3:1 over 3 scales: 3, 2, 1 steps; t = 1 unguided each time, then 0.5 guided for the 2-step scale
            assert r["head_calls"] == 3 + 2 + 1
            assert r["head_rows"] == B * (3 * 1 + (1 + 2) * 4 + 1 * 16)
    parts = settings["parts"]
    assert {(p["part"], p["batch"]) for p in parts} == {(p, b) for p in ("ar", "head", "decode") for b in (1, 2)}
    assert all(p["floor_s"] > 0 for p in parts)
    m = settings["machine"]
    assert set(m["gemm_flops"]) == {"float32", "bfloat16"} and m["conv_flops"] > 0 and m["bandwidth_Bps"]["large"] > 0
    assert settings["official"] is None and settings["repeats"] == [2, 1] and settings["threads"] >= 1
    assert len(settings["machine_measurements"]) == 3  # before the runs and after each batch size


@pytest.mark.parametrize("cross", [False, True])
def test_head_flops_are_the_counted_gemms(cross):
    """The analytic GEMM FLOPs of a flow-network call and of its per-scale preparation are what torch's FLOP counter
    counts (it counts matmuls, not CPU attention: the attention term is checked by its formula)."""
    net = create_model("flowar-tiny", head_cross=cross, head_depth=2).head.net.eval()
    R, n = 3, 16
    x, t, z = torch.randn(R, n, net.token_dim), torch.rand(R), torch.randn(R, n, net.cond_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        cond = net.prepare(z)
    assert fc.get_total_flops() == head_prepare_flops(net, R, n)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t, cond)
    gemm, attn = head_call_flops(net, R, n)
    assert fc.get_total_flops() == gemm
    assert attn == R * 4 * n * n * net.width * (2 if cross else 1) * len(net.res_blocks)


def test_ar_flops_are_the_counted_gemms():
    """A whole tiny decode without CFG at one Euler step: everything torch counts is the AR's GEMMs plus the head's."""
    gen = tiny_flowar()
    B = 2
    params = SamplingParams(cfg=1.0, head_steps=1)
    with FlopCounterMode(display=False) as fc:
        get_sampler("ancestral", params).sample(gen, torch.tensor([0, 1]), image_generators(0, B))
    net = gen.head.net
    head = sum(head_call_flops(net, B, p * p)[0] + head_prepare_flops(net, B, p * p) for p in gen.config.patch_nums)
    assert fc.get_total_flops() == ar_flops(gen.config, B)[0] + head


@pytest.mark.slow
@pytest.mark.skipif(not (OFFICIAL / "models" / "flowar.py").is_file(), reason="no wangqiang9/FlowAR checkout")
def test_bench_flowar_official_side_same_images(tmp_path):
    """FlowAR's own loop on a small FlowAR (scales 1-16 as its code hard-codes, narrow widths) against varkit's, same
    weights and noise: the images agree, and both sides did the same head work but for the rows varkit skips."""
    rows, parts, settings = run_bench(
        "flowar-small", (1,), official=str(OFFICIAL), dtypes=("float32",), anneal=(), big_copy_bytes=4 << 20,
        gemm_size=128, verbose=False, overrides=dict(dim=64, n_head=4, encoder_depth=1, decoder_depth=1, head_depth=1,
                                                     head_width=128))
    off, vk = rows
    assert off["impl"] == "official" and vk["impl"] == "varkit" and off["images_max_abs_diff"] == 0.0
    # fp32 on both sides, the same arithmetic but for GEMMs over other row counts (varkit skips the unguided steps'
    # unconditional rows): the golden fixture's tokens agree to 3.5e-4 of their scale with CFG 4.3 amplifying the
    # rounding; 1e-2 of the images' scale leaves a 30x margin for the VAE, and a wrong weight or noise moves it by O(1)
    assert vk["images_max_abs_diff"] <= 1e-2 * off["images_max_abs"]
    assert off["head_calls"] == vk["head_calls"] == 5 * 24 and vk["head_rows"] < off["head_rows"]
    assert off["head_prepares"] == off["head_calls"] and vk["head_prepares"] == 5
    assert settings["official_commit"] is None or len(settings["official_commit"]) == 40


def _tiny_pipe_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    pipe = Pipeline(create_tokenizer("digits-kl"), tiny_flowar(num_classes=4),
                    {"cfg": 2.0, "cfg_schedule": "linear", "guidance_interval": 0.9, "head_steps": 4})
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_bench_annealing_tiny(tmp_path, capsys, monkeypatch):
    import varkit.hub

    assets = tmp_path / "assets"
    (assets / "digits-training").mkdir(parents=True)  # a bundled model still training: no config.json yet
    monkeypatch.setattr(varkit.hub, "ASSETS", assets)
    folder = _tiny_pipe_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", "annealing", "--models", str(folder), "digits-training", "--head-steps", "4", "4:1", "2",
                 "--per-class", "2", "--out-dir", str(out), "--name", "a"]) == 0
    text = capsys.readouterr().out
    assert "digits-training: not bundled yet" in text
    data = json.loads((out / "a.json").read_text())
    rows = data["rows"]
    assert [r["head_steps"] for r in rows] == ["4", "4:1", "2"] and (out / "a.png").stat().st_size > 0
    assert [r["per_step"] for r in rows] == [[4, 4, 4], [4, 2, 1], [2, 2, 2]]
    ref = rows[0]
    assert ref["is_default"] and ref["speedup"] == 1.0 and ref["head_work"] == 1.0 and ref["reference"] == "4"
    assert rows[1]["head_work"] < 1 and rows[2]["head_work"] < 1
    for r in rows:
        assert r["images"] == 8 and 0 <= r["accuracy"] <= 1 and r["digits_fid"] >= 0 and r["cpu_s_per_image"] > 0
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
    # each row's floor counts its own head steps: fewer steps, fewer head-network passes and FLOPs; per scale
    # 4+4+4 steps, 4+2+1 (one step on the largest scale) and 2+2+2, the largest scale's tokens weighing most
    passes, flops = [r["floor_passes"] for r in rows], [r["floor_flops"] for r in rows]
    assert passes[0] - passes[1] == 5 and passes[0] - passes[2] == 6
    assert flops[0] > flops[2] > flops[1]
    assert data["settings"]["skipped"] == ["digits-training"]


@pytest.mark.parametrize("argv, message", [
    (["--config", "llamagen-b"], "FlowAR config"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-vq"], "KL tokenizer"),
    (["--config", "flowar-tiny", "--tokenizer", "mar-kl16"], "token_dim"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--head-steps", "0"], "head_steps"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--anneal", "5:x"], "head_steps"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--guidance-interval", "1.5"], "guidance_interval"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--dtype", "int8"], "--dtype"),
    (["--config", "flowar-tiny", "--tokenizer", "digits-kl", "--batch", "0"], "--batch"),
    (["--official", "/nonexistent"], "wangqiang9/FlowAR"),
])
def test_bench_flowar_bad_input(tmp_path, capsys, argv, message):
    """One clear line, exit status 2, nothing written."""
    rc = main(["bench", "flowar", *argv, "--out-dir", str(tmp_path / "out"), "--copy-mib", "4", "--gemm-size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "digits", "--head-steps", "5"], "continuous head"),
    (["--models", "/nonexistent/model"], "no such folder"),
    (["--head-steps", "0"], "head_steps"),
    (["--per-class", "0"], "--per-class"),
])
def test_bench_annealing_bad_input(tmp_path, capsys, argv, message):
    rc = main(["bench", "annealing", *argv, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fp32_prepacked_linear_hands_large_row_counts_to_mkl():
    """Past ``packed_max_rows_fp32`` rows an fp32 prepacked Linear takes F.linear (MKL's sgemm was as fast or faster
    there, e.g. FlowAR-S's flow head at batch 8): the very same numbers as F.linear, and no packed copy made."""
    from varkit.nn.layers import Linear, prepack_linears

    lin = Linear(16, 8)
    prepack_linears(lin)
    x = torch.randn(Linear.packed_max_rows_fp32 + 1, 16)
    with torch.no_grad():
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert "_packed" not in lin.__dict__
