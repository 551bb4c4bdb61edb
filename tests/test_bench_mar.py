"""``varkit bench mar`` on a tiny MAR (varkit side only: no official checkout needed): it runs end to end
and its JSON holds the rows, the per-part split and floors, and the machine measurements."""
from __future__ import annotations

import json

import pytest

from varkit.cli import main


def test_bench_mar_tiny_writes_rows_and_floors(tmp_path, capsys):
    main(["bench", "mar", "--config", "mar-tiny", "--tokenizer", "digits-kl", "--batch", "1", "2", "--num-iter", "2",
          "--head-steps", "3", "--dtype", "float32", "bfloat16/float32", "--repeats", "2", "1", "--copy-mib", "4",
          "--gemm-size", "128", "--out-dir", str(tmp_path), "--name", "mar_tiny"])
    data = json.loads((tmp_path / "mar_tiny.json").read_text())
    rows, settings = data["rows"], data["settings"]
    assert [(r["impl"], r["dtype"], r["batch"]) for r in rows] == [
        ("varkit", "float32", 1), ("varkit", "bfloat16/head-float32", 1),
        ("varkit", "float32", 2), ("varkit", "bfloat16/head-float32", 2)]
    for r in rows:
        for key in ("s_per_image", "cpu_s_per_image", "transformer_s", "head_s", "decode_s", "other_s",
                    "transformer_cpu_s", "head_cpu_s", "decode_cpu_s", "transformer_floor_s", "head_floor_s",
                    "decode_floor_s", "floor_s", "x_floor", "head_weight_bytes", "transformer_flops", "decode_flops"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, key
        assert r["floor_s"] > 0 and r["s_per_image"] > 0
        # 2 decode steps x 3 diffusion steps; CFG doubles the rows; 16 tokens over 2 steps
        assert r["head_calls"] == 2 * 3
        assert r["head_rows_mean"] * r["head_calls"] == 2 * r["batch"] * 16 * 3
    parts = settings["parts"]
    assert {(p["part"], p["batch"]) for p in parts} == {(p, b) for p in ("transformer", "head", "decode") for b in (1, 2)}
    assert all(p["floor_s"] > 0 for p in parts)
    m = settings["machine"]
    assert set(m["gemm_flops"]) == {"float32", "bfloat16"} and m["conv_flops"] > 0
    assert m["bandwidth_Bps"]["large"] > 0 and "head_4" in m["bandwidth_Bps"]
    for key in ("cpu_model", "torch", "threads", "num_iter", "head_steps", "cfg", "cfg_schedule"):
        assert key in settings, key
    assert settings["threads"] == 1 and settings["official"] is None and settings["repeats"] == [2, 1]
    assert len(settings["machine_measurements"]) == 3  # before the runs and after each batch size
    # every rate the best of the bench's own measurements and varkit bench floor's cached one (a quick one here),
    # so a part's floor is never below the floor the other benches use
    peaks = settings["floor_cache"]["peak_gemm_flops"]
    for dt, rate in m["gemm_flops"].items():
        assert rate == max([peaks[dt]] + [x["gemm_flops"][dt] for x in settings["machine_measurements"]])
    out = capsys.readouterr().out
    assert "transformer" in out and "wrote" in out


@pytest.mark.parametrize("argv, message", [
    (["--config", "mar-tiny", "--tokenizer", "digits-kl", "--num-iter", "17"], "num_iter"),
    (["--config", "llamagen-b"], "MAR config"),
    (["--config", "mar-tiny", "--tokenizer", "digits-vq"], "KL tokenizer"),
    (["--config", "mar-tiny", "--dtype", "float32/int7"], "--dtype"),
    (["--official", "/nonexistent"], "LTH14/mar"),
])
def test_bench_mar_bad_input(tmp_path, capsys, argv, message):
    """One clear line, exit status 2, nothing written."""
    rc = main(["bench", "mar", *argv, "--out-dir", str(tmp_path), "--copy-mib", "4", "--gemm-size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_chain_constant_weights_are_those_off_x_path():
    """The head floor reads x's weights every call and the condition/timestep/adaLN weights once per chain."""
    from torch import nn

    from varkit.bench.mar import chain_constant_numel, linear_numel
    from varkit.models import create_model

    net = create_model("mar-tiny").head.net
    on_x = sum(m.weight.numel() for n, m in net.named_modules() if isinstance(m, nn.Linear)
               and (n.startswith("input_proj") or ".mlp." in f".{n}." and n.startswith("res_blocks") or n == "final_layer.linear"))
    assert chain_constant_numel(net) > 0 and chain_constant_numel(net) + on_x == linear_numel(net)
