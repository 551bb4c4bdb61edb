import json

import numpy as np
import pytest
import torch
from PIL import Image

import varkit
from varkit.cli import main
from varkit.errors import CheckpointError, DeviceError, InvalidArgumentError, ModelNotFoundError, VarkitError


def test_pipeline_returns_images_tokens_stats(tiny_pipeline):
    out = tiny_pipeline([0, 3, 1], seed=1, cfg=2.0)
    assert len(out.images) == 3 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (16, 16)
    assert out.tokens.shape == (3, 16)
    assert out.stats.forward_passes == 16 and out.stats.tokens == 48 and out.stats.wall_s > 0
    assert out.stats.cache_bytes > 0


def test_same_seed_same_image_across_batching(tiny_pipeline):
    labels = [1, 2, 3, 0, 1, 2, 3, 0]
    a = tiny_pipeline(labels, seed=4, cfg=2.0)
    b = tiny_pipeline(labels, seed=4, cfg=2.0, batch_size=3)
    assert torch.equal(a.tokens, b.tokens)
    d = tiny_pipeline([labels[5]], cfg=2.0, image_seeds=[_seed(4, 5)])
    assert torch.equal(d.tokens[0], a.tokens[5])


def _seed(seed, i):
    import numpy as np

    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1)


def test_save_and_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "generator", "tokenizer"]
    pipe = varkit.load_pipeline(tmp_path / "m")
    assert pipe.defaults["cfg"] == 1.0
    a = tiny_pipeline([0, 1], seed=0)
    b = pipe([0, 1], seed=0)
    assert torch.equal(a.tokens, b.tokens)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_bad_inputs_raise_varkit_errors(tiny_pipeline, tmp_path):
    with pytest.raises(InvalidArgumentError, match="out of range.*0..3"):
        tiny_pipeline([4])
    with pytest.raises(InvalidArgumentError, match="top_p"):
        tiny_pipeline([0], top_p=0.0)
    with pytest.raises(InvalidArgumentError, match="cfg"):
        tiny_pipeline([0], cfg=-1.0)
    with pytest.raises(InvalidArgumentError, match="unknown sampler"):
        tiny_pipeline([0], sampler="nope")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        varkit.load_pipeline("no-such-model")
    with pytest.raises(ModelNotFoundError, match="not found|no config"):
        varkit.load_pipeline(tmp_path)


def test_corrupt_model_folder(tiny_pipeline, tmp_path):
    d = tmp_path / "m"
    tiny_pipeline.save_pretrained(d)
    w = d / "generator" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        varkit.load_pipeline(d)
    tiny_pipeline.save_pretrained(d)
    (d / "generator" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        varkit.load_pipeline(d)
    tiny_pipeline.save_pretrained(d)
    cfg = json.loads((d / "generator" / "config.json").read_text())
    cfg["dim"] = 64
    (d / "generator" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        varkit.load_pipeline(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(tiny_pipeline):
    with pytest.raises(DeviceError, match="--device cpu"):
        tiny_pipeline.to("cuda")


def test_cli_generate_grid_and_folder(tiny_pipeline, tmp_path, capsys):
    tiny_pipeline.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "0", "1", "--per-class", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (38, 38)  # 2x2 images of 16 px, 2-px gutters between and around
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "2", "--out", str(tmp_path / "dir")]) == 0
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["00000_class2.png"]


@pytest.mark.parametrize("args, msg", [
    (["--classes", "9"], "out of range"),
    (["--top-p", "0"], "top_p"),
    (["--cfg", "-2"], "cfg"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--classes", "99"], "CUDA|out of range"),
])
def test_cli_errors_print_one_line_and_exit_2(tiny_pipeline, tmp_path, capsys, args, msg):
    tiny_pipeline.save_pretrained(tmp_path / "m")
    out = tmp_path / "never.png"
    code = main(["generate", "--model", str(tmp_path / "m"), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("varkit: error:")
    import re

    assert re.search(msg, err)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_cli_unknown_model(capsys):
    assert main(["generate", "--model", "nonexistent-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_all_errors_are_varkit_errors():
    for cls in (CheckpointError, DeviceError, InvalidArgumentError, ModelNotFoundError):
        assert issubclass(cls, VarkitError)


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    from varkit.io import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_compile_attaches_the_generators_compiled_step(tiny_pipeline):
    """Pipeline.compile delegates to the generator (the compile itself happens at the first decode step)."""
    assert tiny_pipeline.compile(max_autotune=False) is tiny_pipeline
    assert tiny_pipeline.generator.compiled_decoding
    tiny_pipeline.to("cpu", "float32")  # moving drops it: the frozen weights would be stale
    assert not tiny_pipeline.generator.compiled_decoding


def test_cpu_pipelines_decode_with_the_fast_kernels_unless_asked_for_exact_ones(tiny_pipeline, tmp_path, monkeypatch):
    """load_pipeline on a CPU switches the tokenizer's LDM modules to the extension's kernels; ``fast_tokenizer=False``
    and ``generate --exact-tokenizer`` keep torch's (equal to the official tokenizers')."""
    from varkit.nn import ldm

    tiny_pipeline.save_pretrained(tmp_path / "m")

    def switches(pipe):
        return {m.fast for m in pipe.tokenizer.modules() if isinstance(m, (ldm.Conv2d, ldm.ResnetBlock2D))}

    assert switches(varkit.load_pipeline(tmp_path / "m")) == {True}
    assert switches(varkit.load_pipeline(tmp_path / "m", fast_tokenizer=False)) == {False}
    seen = []
    real = varkit.pipeline.load_pipeline
    monkeypatch.setattr(varkit.pipeline, "load_pipeline",
                        lambda *a, **k: seen.append(k["fast_tokenizer"]) or real(*a, **k))
    for extra in ([], ["--exact-tokenizer"]):
        assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "1", "--out", str(tmp_path / "g.png"),
                     *extra]) == 0
    assert seen == [True, False]
