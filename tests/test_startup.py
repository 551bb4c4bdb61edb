"""Start-up cost: the command line imports only what the command it runs uses.

Each check runs in a fresh interpreter (``sys.modules`` of this one already holds everything).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

# imported by some commands only (evaluation, plots, benches, training data), never at start-up
NEVER_AT_STARTUP = ("timm", "torch_fidelity", "matplotlib", "sklearn")
# what `varkit --help` and `import varkit` need none of
HEAVY = NEVER_AT_STARTUP + ("torch", "torchvision", "diffusers", "scipy", "numpy", "PIL")


def _modules_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_varkit_cli_and_help_import_nothing_heavy():
    loaded = _modules_after("import varkit.cli\ntry:\n    varkit.cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("argv", [["bench", "--help"], ["eval", "--help"], ["convert", "--help"]])
def test_heavy_commands_still_build_their_full_parsers(argv, capsys):
    from varkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "positional arguments" in capsys.readouterr().out  # their sub-subcommands are listed


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers and samples: 5-20 s with the CPU's load
def test_generate_imports_no_evaluation_or_plotting_code(tmp_path):
    code = (f"from varkit.cli import main\nassert main(['generate', '--model', 'digits', '--classes', '0', "
            f"'--out', {str(tmp_path / 's.png')!r}]) == 0")
    loaded = _modules_after(code)
    assert "torch" in loaded and (tmp_path / "s.png").is_file()
    assert not loaded & set(NEVER_AT_STARTUP), sorted(loaded & set(NEVER_AT_STARTUP))


def test_stub_help_lines_are_the_full_parsers():
    """`varkit --help` shows stubs for eval/convert/bench: same help lines as their full parsers."""
    from varkit.cli import build_parser

    def helps(parser):
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        return {a.dest: a.help for a in sub._choices_actions}

    assert helps(build_parser("")) == helps(build_parser())


def test_lazy_public_names_and_subpackages():
    import varkit

    assert varkit.load_pipeline is varkit.pipeline.load_pipeline
    assert varkit.create_model is varkit.models.create_model
    assert {"load_pipeline", "Pipeline", "create_model"} <= set(dir(varkit))
    with pytest.raises(AttributeError):
        varkit.no_such_name


def test_drop_path_is_timms():
    """Our DropPath replaced timm's: same draws from the same generator state, same output, same repr."""
    from varkit.nn.drop_path import DropPath

    timm_layers = pytest.importorskip("timm.layers")
    x = torch.randn(8, 5, 4)
    for p, scale in ((0.3, True), (0.3, False), (1.0, True)):
        ours, theirs = DropPath(p, scale_by_keep=scale).train(), timm_layers.DropPath(p, scale_by_keep=scale).train()
        torch.manual_seed(0)
        a, after_a = ours(x), torch.rand(3)
        torch.manual_seed(0)
        b, after_b = theirs(x), torch.rand(3)
        assert torch.equal(a, b) and torch.equal(after_a, after_b)  # same draws: training runs unchanged
        assert repr(ours) == repr(theirs)


def test_drop_path_semantics():
    from varkit.nn.drop_path import DropPath

    x = torch.ones(1000, 3)
    layer = DropPath(0.25)
    assert layer.eval()(x) is x and DropPath(0.0).train()(x) is x  # identity at eval and at p = 0
    torch.manual_seed(1)
    y = layer.train()(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))  # survivors scaled by 1 / keep
    assert (y[~kept] == 0).all() and (y == y[:, :1]).all()  # whole samples dropped
    assert 0.7 < kept.float().mean() < 0.8  # keep rate 0.75 (1000 Bernoulli draws: sd 0.014)
