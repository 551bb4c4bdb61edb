"""``prepack="auto"`` (load_pipeline's default): which weights it packs, when it declines, and that outputs stay."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.models import create_model
from varkit.nn.layers import AUTO_PREPACK_MIN_NUMEL, Linear, prepack_linears, prepacked_numel
from varkit.pipeline import auto_prepack, load_pipeline

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _floor(packed: float, linear: float) -> dict:
    """A ``varkit bench floor`` result whose fp32 decode-shape GEMMs ran at these path rates."""
    shapes = {s: {"paths": {"prepacked": packed, "linear": linear}} for s in ("m1", "m8")}
    return {"gemm": {"float32": shapes}}


def _wide_model():
    """A raster generator whose output layer (4096 x 64) is above the auto threshold and the rest below."""
    gen = create_model("llamagen-b", dim=64, n_layer=1, n_head=2, grid=4, num_classes=10, vocab_size=4096).eval()
    torch.nn.init.normal_(gen.output.weight, std=0.02, generator=torch.Generator().manual_seed(1))  # LlamaGen zeroes it
    assert gen.output.weight.numel() >= AUTO_PREPACK_MIN_NUMEL > gen.layers[0].attention.wqkv.weight.numel()
    return gen


def test_prepack_linears_min_numel_packs_only_large_weights():
    gen = _wide_model()
    n = prepack_linears(gen, True, AUTO_PREPACK_MIN_NUMEL)
    on = [m for m in gen.modules() if isinstance(m, Linear) and m.prepacked]
    assert n == len(on) == 1 and on[0] is gen.output
    assert prepacked_numel(gen) == gen.output.weight.numel()
    prepack_linears(gen, False)
    assert prepacked_numel(gen) == 0


@needs_onednn
def test_auto_prepack_rules():
    gen = _wide_model()
    m = AUTO_PREPACK_MIN_NUMEL
    assert auto_prepack(gen, m, available=1 << 40, floor={})  # no floor measured: pack
    assert auto_prepack(gen, m, available=1 << 40, floor=_floor(2e10, 1e10))
    assert not auto_prepack(gen, m, available=1 << 40, floor=_floor(1e10, 2e10))  # measured slower here
    nbytes = gen.output.weight.numel() * 4
    assert not auto_prepack(gen, m, available=4 * nbytes - 4)  # the copy would take over a quarter of memory
    assert auto_prepack(gen, m, available=4 * nbytes, floor={})
    assert not auto_prepack(gen, 1 << 40, available=1 << 40, floor={})  # nothing large enough
    with torch.device("meta"):
        meta = create_model("llamagen-b", dim=64, n_layer=1, n_head=2, grid=4, num_classes=10, vocab_size=4096)
    assert not auto_prepack(meta, m, available=1 << 40, floor={})  # not on a CPU


def test_load_pipeline_auto_leaves_small_models_unpacked_and_same_images():
    auto = load_pipeline("digits")
    assert prepacked_numel(auto.generator) == 0  # digits' weights are all far below the threshold
    off = load_pipeline("digits", prepack=False)
    a, b = auto([1, 2], seed=3, output_type="pt"), off([1, 2], seed=3, output_type="pt")
    assert torch.equal(a.tokens, b.tokens)
    assert load_pipeline("digits", compile=False, prepack=True).generator.output.prepacked


@needs_onednn
def test_auto_prepacked_large_model_gives_the_same_logits():
    gen = _wide_model()
    cond = torch.tensor([1, 2])
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gen.teacher_forcing_logits(cond, tokens)
        prepack_linears(gen, auto_prepack(gen, AUTO_PREPACK_MIN_NUMEL, available=1 << 40, floor={}),
                        AUTO_PREPACK_MIN_NUMEL)
        assert gen.output.prepacked
        got = gen.teacher_forcing_logits(cond, tokens)
    # fp32, oneDNN's packed GEMM vs MKL's sgemm: K = 64 products of O(0.02) weights and O(1) inputs in another
    # order, a few ulps of O(0.1) outputs (~1e-8); 1e-5 holds on any x86-64 kernel and fails on a wrong weight
    assert float(ref.abs().max()) > 1e-2  # the check compares real logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_prepack_bad_values():
    pipe = load_pipeline("digits", prepack=False)
    with pytest.raises(InvalidArgumentError, match="prepack must be True, False or 'auto'"):
        pipe.prepack("yes")
    with pytest.raises(InvalidArgumentError, match="prepack must be"):
        pipe.prepack(1)


def test_cli_prepack_choices(tmp_path):
    out = tmp_path / "g.png"
    ok = subprocess.run([sys.executable, "-m", "varkit.cli", "generate", "--model", "digits", "--classes", "1",
                         "--prepack", "off", "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.exists()
    bad = subprocess.run([sys.executable, "-m", "varkit.cli", "generate", "--model", "digits", "--prepack", "maybe",
                          "--out", str(tmp_path / "h.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--prepack" in bad.stderr and "Traceback" not in bad.stderr


def test_prepacked_linear_built_under_inference_mode():
    """A model copied under ``torch.inference_mode`` has inference-tensor weights (no version counter)."""
    import copy

    torch.manual_seed(0)
    with torch.inference_mode():
        lin = copy.deepcopy(Linear(64, 32))
        assert lin.weight.is_inference()
        prepack_linears(lin)
        x = torch.randn(3, 64)
        # fp32 packed vs MKL, K = 64: a few ulps (see test_nn), 1e-5 on any x86-64 kernel
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_weight_major_follows_the_floor(monkeypatch):
    """bf16 at few rows: the weight-major product only where the machine's floor measured it faster."""
    import varkit.nn.layers as L

    def floor(wm: float, lin: float) -> dict:
        shapes = {s: {"paths": {"weight_major": wm, "linear": lin, "prepacked": 1.0}} for s in ("m1", "m8")}
        return {"gemm": {"bfloat16": shapes}}

    assert L.weight_major_faster(None) and L.weight_major_faster({})  # not measured: as before
    assert L.weight_major_faster(floor(185e9, 125e9))  # the AMX Xeon
    assert not L.weight_major_faster(floor(45e9, 102e9))  # AMD Zen 4
    lin = Linear(64, 32).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(L, "weight_major_pays", lambda threads: False)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))  # F.linear itself
        monkeypatch.setattr(L, "weight_major_pays", lambda threads: True)
        # the weight-major product: the same products summed in another order, bf16 rounding apart (|y| ~ 1,
        # bf16 ulp 2^-8 at 1): a few ulps at most
        torch.testing.assert_close(lin(x).float(), torch.nn.functional.linear(x, lin.weight, lin.bias).float(),
                                   rtol=0, atol=4 * 2**-8 * 4)
