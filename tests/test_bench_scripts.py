"""The side-by-side benches are scripts of the repository (bench/side_by_side/), not of the package.

``varkit bench llamagen|var|nar|mar --official PATH`` runs them from a source checkout; each runs on its own as
``python bench/side_by_side/NAME.py --official PATH``. The timings themselves need the official checkouts: here,
only the wiring and the errors.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from varkit.bench.scripts import SCRIPTS_DIR, load_script
from varkit.cli import main
from varkit.errors import InvalidArgumentError

SCRIPTS = ["llamagen", "var", "nar", "mar"]


def test_no_varkit_module_imports_an_official_checkout_but_flowar():
    """Only varkit/bench/official.py (the import helper) and the FlowAR bench (another change) use it."""
    from pathlib import Path

    import varkit

    users = sorted(p.name for p in Path(varkit.__file__).parent.joinpath("bench").glob("*.py")
                   if "import_checkout" in p.read_text() and p.name != "official.py")
    assert users == ["flowar.py"], users


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_refuses_a_folder_that_is_not_the_checkout(name, tmp_path, capsys):
    rc = load_script(name).main(["--official", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["var", "nar", "mar", "llamagen"])
def test_varkit_bench_official_runs_the_script(name, tmp_path, capsys):
    rc = main(["bench", name, "--official", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("varkit: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_script_says_where_it_lives(monkeypatch, tmp_path):
    """An installation without the repository's bench/ folder (a wheel) gets one line naming the script."""
    import varkit.bench.scripts as scripts

    monkeypatch.setattr(scripts, "SCRIPTS_DIR", tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"bench/side_by_side/var\.py of varkit's source repository"):
        scripts.load_script("var")


def test_a_script_runs_by_its_path():
    out = subprocess.run([sys.executable, str(SCRIPTS_DIR / "var.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--official" in out.stdout and "autoregressive_infer_cfg" in out.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["llamagen", "var", "nar"])
def test_device_cuda_without_a_gpu_is_one_line(name, tmp_path, capsys):
    """``--device cuda`` on a machine without CUDA: exit 2 with one line naming cuda, before the checkout is read
    or anything is written (here the checkout is not even one)."""
    rc = load_script(name).main(["--official", str(tmp_path), "--device", "cuda", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err.lower(), err
    assert not (tmp_path / "out").exists()
    rc = main(["bench", name, "--official", str(tmp_path), "--device", "cuda", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("varkit: error:") and len(err.strip().splitlines()) == 1 and "cuda" in err.lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["llamagen", "var", "nar"])
def test_device_defaults_to_cpu(name):
    """``--device`` is cpu unless asked (the file name is then the one it was: ``--name`` is resolved at run time,
    with ``_cuda`` appended only on ``--device cuda``)."""
    parser = load_script(name).build_parser()
    args = parser.parse_args(["--official", "x"])
    assert args.device == "cpu" and args.name is None
    args = parser.parse_args(["--official", "x", "--device", "cuda", "--name", "mine"])
    assert args.device == "cuda" and args.name == "mine"
    with pytest.raises(SystemExit):
        parser.parse_args(["--official", "x", "--device", "tpu"])
