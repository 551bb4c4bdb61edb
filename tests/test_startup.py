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


# what `varkit generate` and loading a bundled pipeline need none of: the LDM autoencoder is varkit.nn.ldm (diffusers
# pulled its UNet blocks, torch._dynamo and scipy.stats: ~3 s), image grids are numpy (torchvision.utils pulled
# torchvision.models and torch._dynamo: ~2 s)
NEVER_TO_GENERATE = NEVER_AT_STARTUP + ("diffusers", "torchvision", "scipy", "transformers", "sympy")


@pytest.mark.slow  # a fresh interpreter imports torch and samples: 3-20 s with the CPU's load
def test_generate_imports_no_evaluation_or_plotting_code(tmp_path):
    code = (f"from varkit.cli import main\nassert main(['generate', '--model', 'digits', '--classes', '0', '1', "
            f"'--out', {str(tmp_path / 's.png')!r}]) == 0\n"
            "import sys\nassert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported (~1 s)'")
    loaded = _modules_after(code)
    assert "torch" in loaded and (tmp_path / "s.png").is_file()
    assert not loaded & set(NEVER_TO_GENERATE), sorted(loaded & set(NEVER_TO_GENERATE))


def test_importing_the_pipeline_imports_no_diffusers():
    loaded = _modules_after("import varkit.pipeline, varkit.tokenizers")
    assert not loaded & set(NEVER_TO_GENERATE), sorted(loaded & set(NEVER_TO_GENERATE))


@pytest.mark.slow  # three bundled pipelines in a fresh interpreter: 5-30 s with the CPU's load
def test_bundled_pipelines_of_every_tokenizer_family_run_without_diffusers():
    """digits (VQ), digits-var (multi-scale VQ) and digits-mar (KL-VAE): load and sample one image each."""
    code = ("import torch\ntorch.set_num_threads(1)\nfrom varkit.pipeline import load_pipeline\n"
            "for name, kw in (('digits', {}), ('digits-var', {}), ('digits-mar', {'num_iter': 2, 'head_steps': 2})):\n"
            "    out = load_pipeline(name, device='cpu')([0], seed=0, **kw)\n"
            "    assert len(out.images) == 1, name")
    loaded = _modules_after(code)
    assert not loaded & set(NEVER_TO_GENERATE), sorted(loaded & set(NEVER_TO_GENERATE))


@pytest.mark.parametrize("argv", [["convert", "--help"], ["convert", "var", "--help"], ["convert", "mar", "--help"],
                                  ["convert", "llamagen", "--help"]])
def test_convert_help_imports_nothing_heavy(argv):
    """The converters' arguments live in varkit.checkpoints.arguments: no torch, converters or models to parse."""
    loaded = _modules_after(f"import varkit.cli\ntry:\n    varkit.cli.main({argv!r})\nexcept SystemExit:\n    pass")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_generate_timing_report(tmp_path, tiny_pipeline, capsys, monkeypatch):
    """VARKIT_TIMING=1: one stderr line with start-up (from the process start), sampling and writing."""
    from varkit.cli import main

    tiny_pipeline.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("VARKIT_TIMING", "1")
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "0", "--out", str(tmp_path / "g.png")]) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("varkit timing:")]
    assert len(line) == 1 and all(k in line[0] for k in ("start-up", "sampling", "writing", "s CPU"))
    monkeypatch.setenv("VARKIT_TIMING", "0")
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "0", "--out", str(tmp_path / "g.png")]) == 0
    assert "varkit timing" not in capsys.readouterr().err


def test_image_grid_is_torchvisions_make_grid():
    """image_grid tiles in numpy what torchvision's make_grid gave, pixel for pixel."""
    import numpy as np
    from PIL import Image

    from varkit.pipeline import image_grid

    make_grid = pytest.importorskip("torchvision.utils").make_grid
    rng = np.random.default_rng(0)
    for n, cols, gutter, background in ((1, 3, 2, 255), (2, 1, 0, 0), (5, 2, 2, 255), (7, 3, 3, 128), (4, 10, 1, 9)):
        ims = [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)) for _ in range(n)]
        x = torch.stack([torch.from_numpy(np.array(t)).permute(2, 0, 1) for t in ims]).float() / 255
        want = make_grid(x, nrow=min(cols, n), padding=gutter, pad_value=background / 255)
        want = (want * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(image_grid(ims, cols=cols, gutter=gutter, background=background)), want)


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
