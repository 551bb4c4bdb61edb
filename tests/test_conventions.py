"""Conventions users bring from diffusers and timm, and the clean-up promises of the command line:
``pipe.to(...)``, ``output_type``, ``list_models(pattern)``, ``create_model(name, pretrained=...)``, grids with
gutters and labels, ``generate --add/--overwrite``, SIGTERM, and stale temporaries of killed writers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import varkit
from varkit.cli import main
from varkit.errors import InvalidArgumentError, ModelNotFoundError
from varkit.io import atomic_path, check_output_path, clean_stale_temporaries
from varkit.pipeline import image_grid


def test_pipe_to_takes_a_device_a_dtype_or_both(tiny_pipeline):
    pipe = tiny_pipeline
    assert pipe.to(torch.bfloat16) is pipe
    assert next(pipe.generator.parameters()).dtype == torch.bfloat16
    assert next(pipe.tokenizer.parameters()).dtype == torch.float32  # the tokenizer stays fp32
    assert pipe.device.type == "cpu"  # a dtype alone does not move
    assert pipe.to("cpu", torch.float32) is pipe and next(pipe.generator.parameters()).dtype == torch.float32
    pipe.to(device="cpu", dtype="bf16")
    assert next(pipe.generator.parameters()).dtype == torch.bfloat16
    pipe.to("auto", "float32")
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to("cpu")
    with pytest.raises(InvalidArgumentError, match="one device"):
        pipe.to("cpu", "cuda")


def test_output_types(tiny_pipeline):
    pil = tiny_pipeline([0, 1], seed=3).images
    arr = tiny_pipeline([0, 1], seed=3, output_type="np").images
    pt = tiny_pipeline([0, 1], seed=3, output_type="pt").images
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (2, 16, 16, 3)
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    assert np.array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    # the 8-bit images are the float ones rounded: (x+1)*127.5 and (x+1)/2*255 may differ by an fp32 ulp,
    # which can move a value sitting on a .5 boundary by one level, never more
    assert np.abs(np.asarray(pil[1], dtype=np.float64) - arr[1] * 255).max() <= 1.0


def test_list_models_filters_with_shell_patterns():
    mar = varkit.list_models("mar-*")
    assert mar and all(n.startswith("mar-") for n in mar)
    assert varkit.list_models("no-such-*") == []
    assert set(varkit.list_models("*")) == set(varkit.list_models())


def test_create_model_pretrained_is_the_bundled_generator():
    gen = varkit.create_model("digits-var", pretrained=True)
    ref = varkit.load_pipeline("digits-var").generator
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), ref.state_dict().values()))
    assert type(varkit.create_model("raster-tiny", pretrained=False)).__name__ == "RasterGenerator"
    with pytest.raises(ModelNotFoundError, match=r"varkit convert llamagen .*load_pipeline"):
        varkit.create_model("llamagen-b", pretrained=True)
    with pytest.raises(ModelNotFoundError, match=r"bundled model, not a config.*pretrained=True"):
        varkit.create_model("digits")


def test_image_grid_gutters_and_labels():
    ims = [Image.new("L", (8, 6), c) for c in (0, 50, 100, 150, 200)]
    g = image_grid(ims, cols=2)
    assert g.size == (2 * 8 + 3 * 2, 3 * 6 + 4 * 2) and g.mode == "RGB"
    assert g.getpixel((0, 0)) == (255, 255, 255) and g.getpixel((2, 2)) == (0, 0, 0)  # gutter, first image
    assert image_grid(ims, cols=5, gutter=0).size == (40, 6)
    labelled = image_grid(ims, cols=2, labels=[str(i) for i in range(5)])
    assert labelled.width == g.width and labelled.height > g.height  # a band under each row of images


def test_generate_into_a_folder_adds_or_overwrites_only_when_asked(tiny_pipeline, tmp_path, capsys):
    tiny_pipeline.save_pretrained(tmp_path / "m")
    run = ["generate", "--model", str(tmp_path / "m"), "--classes", "0", "1", "--out", str(tmp_path / "d")]
    assert main(run) == 0
    assert main(run) == 2 and "not empty" in capsys.readouterr().err
    assert main([*run, "--add"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "00000_class0.png", "00001_class1.png", "00002_class0.png", "00003_class1.png"]
    assert main([*run, "--overwrite", "--seed", "5"]) == 0
    assert len(list((tmp_path / "d").iterdir())) == 4
    assert main([*run[:-2], "--out", str(tmp_path / "g.png"), "--labels"]) == 0
    assert main([*run[:-2], "--out", str(tmp_path / "h.png")]) == 0
    assert Image.open(tmp_path / "g.png").height > Image.open(tmp_path / "h.png").height


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    with atomic_path(tmp_path / "checkpoint.pt") as tmp:
        assert str(os.getpid()) in tmp.name  # the writer's pid is in the name
        live = tmp_path / tmp.name
        live.write_bytes(b"x")
        stale = tmp_path / f".checkpoint.pt.{_dead_pid()}.abcd1234.tmp"
        stale.write_bytes(b"half a checkpoint")
        other = tmp_path / ".notes.tmp"  # not a varkit temporary: left alone
        other.write_text("keep")
        assert clean_stale_temporaries(tmp_path) == [stale]
        assert live.exists() and other.exists()
    assert not live.exists() and (tmp_path / "checkpoint.pt").is_file()


def test_check_output_path_probes_without_leaving_anything(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "x.png") == tmp_path / "a" / "b" / "x.png"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidArgumentError, match="is a file, not a folder"):
        check_output_path(tmp_path / "f" / "x.png")


@pytest.mark.slow  # a fresh interpreter imports torch and loads a model: 5-20 s with the CPU's load
def test_sigterm_ends_with_one_line_and_removes_temporaries(tmp_path):
    # the grid's write blocks half-way (a temporary file written, not yet renamed) until the signal comes
    code = ("import sys, time, varkit.cli as c, varkit.io as io\n"
            "def slow(image, path):\n"
            "    with io.atomic_path(path) as tmp:\n"
            "        tmp.write_bytes(b'partial')\n"
            "        print('writing', file=sys.stderr, flush=True)\n"
            "        time.sleep(60)\n"
            "io.save_image = slow\n"
            f"sys.exit(c.main(['generate', '--model', 'digits', '--out', {str(tmp_path / 'grid.png')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in proc.stderr:
        if "writing" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("varkit: terminated (SIGTERM)")
    assert list(tmp_path.iterdir()) == []  # neither the grid nor its temporary


@pytest.mark.slow  # trains one step of the digits VQ tokenizer (a few seconds)
def test_a_new_training_run_removes_a_killed_runs_temporaries(tmp_path, capsys):
    folder = tmp_path / "run" / "train-tokenizer"
    folder.mkdir(parents=True)
    stale = folder / f".checkpoint.pt.{_dead_pid()}.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 1000)
    assert main(["train", "tokenizer", "--data", "digits", "--config", "digits-vq", "--resolution", "16", "--steps", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert not stale.exists() and (folder / "checkpoint.pt").is_file()
    assert "removed 1 temporary file" in capsys.readouterr().err


def test_kid_on_digits_features_is_meaningful():
    """KID on the digits CNN's features: real digits against the real set ~0, noise far above (it printed
    -146 to -3780 before the features were scaled for KID's cubic kernel)."""
    from varkit.eval import features as FE
    from varkit.eval import fid as FID

    real = FE.real_digits_uint8()
    g = torch.Generator().manual_seed(0)
    kw = dict(features="digits", metrics=["kid"], progress=False, device="cpu")
    same = FID.compute_metrics(real[torch.randperm(len(real), generator=g)[:200]], "digits", **kw)
    noise = FID.compute_metrics(torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8), "digits", **kw)
    # measured: real 0.03 +- 0.03, noise 2.4 +- 0.06 (subset std over 100 subsets): bounds far from both
    assert abs(same["kid_mean"]) < 0.2 and noise["kid_mean"] > 1.0
    assert same["settings"]["kid_feature_scale"] == pytest.approx(FE.kid_feature_scale())
