"""The bundled DD1 student digits-dd: one pass by default, recognisable digits, how it was made."""
from __future__ import annotations

import json

import pytest

import varkit
from varkit.eval.digits import digits_accuracy


def test_digits_dd_samples_in_one_pass_by_default():
    pipe = varkit.load_pipeline("digits-dd")
    labels = [c for c in range(10) for _ in range(10)]
    out = pipe(class_labels=labels)
    assert out.stats.forward_passes == 1 and out.tokens.shape == (100, 64)
    # bench/results/dd.json: 100 % of 500 one-step samples classified as asked (the teacher: 95.6 %); 0.9 on 100
    # leaves room for another CPU's argmax ties without hiding a broken student (an untrained one scores ~10 %)
    assert digits_accuracy(out.images, labels) >= 0.9
    two = pipe(class_labels=labels[:20], steps=2)
    assert two.stats.forward_passes == 2


def test_digits_var_dd_samples_in_one_pass_by_default():
    pipe = varkit.load_pipeline("digits-var-dd")
    assert pipe.generator.layout.kind == "scales"
    labels = [c for c in range(10) for _ in range(5)]
    out = pipe(class_labels=labels)
    assert out.stats.forward_passes == 1 and out.tokens.shape == (50, 130)
    # bench/results/dd-var.json: 100 % of 500 one-step samples; 0.9 on 50 as for digits-dd
    assert digits_accuracy(out.images, labels) >= 0.9


def test_digits_dd_records_how_it_was_made():
    from varkit.pipeline import ASSETS

    gen = ASSETS / "digits-dd" / "generator"
    assert (gen / "COMMAND.txt").read_text().startswith("varkit train distill --teacher digits ")
    assert (gen / "DATA_COMMAND.txt").read_text().startswith("varkit distill data --teacher digits ")
    cfg = json.loads((ASSETS / "digits-dd" / "config.json").read_text())
    assert cfg["defaults"]["sampler"] == "distilled" and cfg["defaults"]["sampler_options"] == {"steps": 1}


def test_generate_cli_uses_the_students_sampler(tmp_path, capsys):
    from varkit.cli import main

    assert main(["generate", "--model", "digits-dd", "--classes", "3", "7", "--out", str(tmp_path / "s.png")]) == 0
    assert "(1 forward passes" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_dd_writes_speed_and_quality_rows(tmp_path):
    from varkit.cli import main

    assert main(["bench", "dd", "--batch", "1", "--batches", "1", "--repeats", "1", "--per-class", "2",
                 "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dd.json").read_text())["rows"]
    speed = [r for r in rows if "speedup" in r]
    assert [r["mode"] for r in speed] == ["ancestral", "dd 1-step", "dd 2-step"]
    assert [r["forward_passes"] for r in speed] == [64, 1, 2]
    for r in speed:  # each row's floor: the work of its own sampling calls, replayed (one call an image here)
        assert r["floor_passes"] == r["forward_passes"] * r["images"], r
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
    assert {r["mode"] for r in rows if "accuracy" in r} == {"ancestral", "dd 1-step", "dd 2-step"}
