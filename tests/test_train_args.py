"""train_generator checks its settings itself (the same checks ``varkit train generator`` runs, one shared
validator): a bad value through the Python API is a one-line InvalidArgumentError before anything loads."""
from __future__ import annotations

import dataclasses

import pytest

from varkit.cli import main
from varkit.errors import InvalidArgumentError
from varkit.train.generator import check_generator_args, train_generator
from varkit.train.loop import TrainConfig

MISSING = "/nonexistent/tokenizer"  # never read: the argument errors come first


def changed(**fields) -> TrainConfig:
    """A TrainConfig whose fields were changed after construction (which checked them)."""
    cfg = TrainConfig(steps=1)
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("cfg, kwargs, message", [
    (changed(steps=0), {}, "--steps must be an integer >= 1"),
    (changed(lr=0.0), {}, "--lr must be a finite number > 0"),
    (changed(lr=float("nan")), {}, "--lr must be a finite number > 0"),
    (changed(batch_size=-2), {}, "--batch-size must be an integer >= 1"),
    (changed(grad_accum=0), {}, "--grad-accum must be an integer >= 1"),
    (changed(warmup=-1), {}, "--warmup must be an integer >= 0"),
    (changed(ema=1.0), {}, "--ema must be a decay"),
    (TrainConfig(steps=1), {"resolution": 0}, "--resolution must be an integer >= 1"),
    (TrainConfig(steps=1), {"resolution": 16.0}, "--resolution must be an integer >= 1"),
    (TrainConfig(steps=1), {"class_dropout": 1.5}, r"--class-dropout must be a probability in \[0, 1\]"),
    (TrainConfig(steps=1), {"defaults": {"cfgg": 3.0}}, "--default cfgg: not a sampling setting"),
    (TrainConfig(steps=1), {"defaults": {"cfg": -1.0}}, "cfg must be >= 0"),
    (TrainConfig(steps=1), {"ce_weight": 1.0}, "only apply with --teacher"),
    ({"steps": 1}, {}, "cfg must be a varkit.train.loop.TrainConfig"),
])
def test_bad_settings_raise_one_line_through_the_api(tmp_path, cfg, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as exc:
        train_generator("digits", MISSING, "raster-tiny", tmp_path / "o", cfg, **kwargs)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_good_settings_pass_the_validator():
    check_generator_args(TrainConfig(steps=1), 16, 0.0, {"cfg": 3.0, "num_iter": 16, "head_steps": "50:5"})
    check_generator_args(dataclasses.replace(TrainConfig(), grad_accum=4), 32, 1.0, None)


def test_cli_runs_the_same_validator(tmp_path, capsys):
    """The command line gives the API's one line for a setting only the shared validator checks (exit 2)."""
    code = main(["train", "generator", "--data", "digits", "--tokenizer", "digits", "--config", "raster-tiny",
                 "--out", str(tmp_path / "o"), "--steps", "1", "--default", "cfg=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cfg must be >= 0" in err and len(err.splitlines()) == 1
