"""The bundled models load offline and make recognisable digits."""
import pytest

import varkit
from varkit.eval.digits import digits_accuracy

BUNDLED = ["digits", "digits-var", "digits-nar"]
RECORDED = BUNDLED + ["digits-draft"]


@pytest.mark.parametrize("name", RECORDED)
def test_bundled_model_is_listed_and_recorded(name):
    assert name in varkit.bundled_models()
    from varkit.pipeline import ASSETS

    for part in ("tokenizer", "generator"):
        cmd = (ASSETS / name / part / "COMMAND.txt").read_text()
        assert cmd.startswith("varkit train ") and "--data digits" in cmd


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_makes_recognisable_digits(name):
    pipe = varkit.load_pipeline(name)
    labels = [c for c in range(10) for _ in range(10)]
    out = pipe(labels, cfg=2.0, seed=0)
    acc = digits_accuracy(out.images, labels)
    assert acc >= 0.8, f"{name}: only {acc:.0%} of cfg=2 samples classified as the requested digit"


def test_default_model_generates_from_the_cli(tmp_path):
    from varkit.cli import main

    assert main(["generate", "--model", "digits", "--classes", "0", "1", "2", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_bench_quality_writes_a_table_and_json(tmp_path, capsys):
    import json

    from varkit.cli import main

    assert main(["bench", "quality", "--models", "digits", "--per-class", "2", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert rows[0]["model"] == "digits" and rows[0]["images"] == 20 and rows[0]["forward_passes"] == 64
    assert "digits_fid" in capsys.readouterr().out
