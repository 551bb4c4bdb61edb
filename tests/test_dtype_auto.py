"""dtype="auto": bf16 where the hardware multiplies bf16 natively, fp32 elsewhere; clear errors on bad input.

The CPU rule is tested on fake /proc/cpuinfo texts (an Intel Xeon with AMX, an AMD EPYC with AVX2 only), so
the tests hold on either kind of machine; the real machine's choice is only checked to be consistent.
"""
from __future__ import annotations

import pytest
import torch

from varkit.device import (auto_dtype, bf16_isa, cpu_dtype_choice, cpu_info, native_bf16, parse_cpuinfo,
                           resolve_dtype)
from varkit.errors import DeviceError, InvalidArgumentError

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
COOPER_LAKE = "model name\t: Intel(R) Xeon(R) Platinum 8380H\nflags\t\t: avx2 avx512f avx512bw avx512vl avx512_bf16\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 fma avx512f avx512bw avx512vl avx512dq\n"


def test_parse_cpuinfo_reads_the_first_cpu():
    info = parse_cpuinfo(INTEL_AMX)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["vendor"] == "GenuineIntel"
    assert "amx_bf16" in info["flags"] and "avx512_bf16" in info["flags"]


@pytest.mark.parametrize("text, isa, dtype", [
    (INTEL_AMX, "amx", torch.bfloat16),
    (COOPER_LAKE, "avx512_bf16", torch.bfloat16),
    (SKYLAKE, "avx512", torch.float32),  # AVX-512 without bf16 instructions: conversions, no gain
    (AMD_AVX2, "none", torch.float32),
    ("", "none", torch.float32),  # no /proc/cpuinfo (macOS, containers): the safe choice
])
def test_cpu_flags_decide(text, isa, dtype):
    info = cpu_info(text)
    assert info["bf16_isa"] == isa == bf16_isa(parse_cpuinfo(text)["flags"])
    assert native_bf16(info) == (dtype == torch.bfloat16)
    assert cpu_dtype_choice(info) == dtype


def test_cpu_info_keeps_the_relevant_flags_only():
    info = cpu_info(AMD_AVX2)
    assert info["model"] == "AMD EPYC 7B12" and info["flags"] == ["avx2", "fma", "f16c"]


def _floor(f32: float, b16: float) -> dict:
    return {"gemm": {"float32": {"m1": {"flops_per_s": f32}, "m8": {"flops_per_s": f32}},
                     "bfloat16": {"m1": {"flops_per_s": b16}, "m8": {"flops_per_s": b16}}}}


def test_measured_floor_backs_the_choice():
    amx = cpu_info(INTEL_AMX)
    assert cpu_dtype_choice(amx, floor=_floor(1e10, 3e10)) == torch.bfloat16
    assert cpu_dtype_choice(amx, floor=_floor(3e10, 1e10)) == torch.float32  # measured slower: fp32
    assert cpu_dtype_choice(amx, floor={"gemm": {}}) == torch.bfloat16  # not measured: the flags decide
    assert cpu_dtype_choice(amx, onednn_bf16=False) == torch.float32  # this torch has no oneDNN bf16 kernels
    # on an AVX2-only CPU a (noisy) measurement never switches bf16 on
    assert cpu_dtype_choice(cpu_info(AMD_AVX2), floor=_floor(1e10, 3e10)) == torch.float32


def test_small_models_stay_fp32_off_amx():
    """A generator without a linear weight worth prepacking lives in the caches: bf16 only pays with AMX there."""
    from varkit.models import create_model
    from varkit.nn.layers import has_large_linear
    from varkit.pipeline import load_pipeline

    amx, avx512bf16 = cpu_info(INTEL_AMX), cpu_info(COOPER_LAKE)
    assert cpu_dtype_choice(avx512bf16, small_model=True) == torch.float32
    assert cpu_dtype_choice(avx512bf16, small_model=False) == torch.bfloat16
    assert cpu_dtype_choice(amx, small_model=True) == torch.bfloat16
    assert cpu_dtype_choice(cpu_info(AMD_AVX2), small_model=False) == torch.float32
    small = load_pipeline("digits", prepack=False).generator
    assert not has_large_linear(small)
    with torch.device("meta"):
        assert has_large_linear(create_model("llamagen-b"))
    got = auto_dtype("cpu", small)
    assert got == (auto_dtype("cpu") if cpu_info()["bf16_isa"] == "amx" else torch.float32)
    assert resolve_dtype("auto", "cpu", small) == got


def test_auto_on_this_machine_is_consistent():
    from varkit.nn.layers import packable_dtypes

    got = resolve_dtype("auto")
    assert got in (torch.float32, torch.bfloat16)
    if got == torch.bfloat16:  # only where the CPU has native bf16 and oneDNN can prepack it
        assert native_bf16(cpu_info()) and torch.bfloat16 in packable_dtypes()
    assert resolve_dtype("AUTO", "cpu") == got == auto_dtype("cpu")


def test_names_and_passthrough():
    assert resolve_dtype(None) is None
    assert resolve_dtype("bf16") == resolve_dtype("BFloat16") == torch.bfloat16
    assert resolve_dtype(torch.float32, "cpu") == torch.float32


def test_unknown_dtype_is_one_clear_line():
    with pytest.raises(InvalidArgumentError, match=r"unknown dtype 'float8'; choose one of auto, float32") as e:
        resolve_dtype("float8")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_clear_line():
    with pytest.raises(DeviceError, match="no usable CUDA GPU.*--device cpu"):
        resolve_dtype("auto", "cuda")
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        resolve_dtype("bfloat16", "cuda")


def test_cuda_without_bf16_auto_picks_fp32_and_explicit_bf16_fails(monkeypatch):
    """A GPU without native bf16 (pre-Ampere): auto is fp32 with a one-line warning; bfloat16 asked for is a clear
    error."""
    import varkit.device as D

    monkeypatch.setattr(D, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(D, "_cuda_bf16", lambda dev: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Tesla V100-SXM2-16GB")
    with pytest.warns(UserWarning, match=r"V100.*no native bf16.*float32") as record:
        assert D.resolve_dtype("auto", "cuda") == torch.float32
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert D.resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(DeviceError, match="V100.*no native bf16.*--dtype float32") as e:
        D.resolve_dtype("bfloat16", "cuda")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(D, "_cuda_bf16", lambda dev: True)
    assert D.resolve_dtype("auto", "cuda") == torch.bfloat16


def test_cli_prints_varkit_warnings_as_one_line(monkeypatch, capsys):
    """The command line shows varkit's warnings (such as auto's fp32 on a GPU without bf16) as one line."""
    import sys
    import warnings

    import varkit.cli as C

    def command(args):
        warnings.warn("varkit: something happened; do X")
        warnings.warn("another library's warning")

    monkeypatch.setattr(C, "cmd_models", command)
    with warnings.catch_warnings():  # pytest records warnings: show them through formatwarning as Python does
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        assert C.main(["models"]) == 0
        assert warnings.formatwarning is not C.one_line_warning  # restored after the command
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "varkit: warning: something happened; do X"
    assert "UserWarning: another library's warning" in err[1]


def test_generate_defaults_to_auto(tmp_path, capsys):
    from varkit.cli import build_parser, main

    assert build_parser("generate").parse_args(["generate"]).dtype == "auto"
    assert main(["generate", "--model", "digits", "--classes", "0", "--out", str(tmp_path / "a.png")]) == 0
    from varkit.pipeline import load_pipeline

    want = str(resolve_dtype("auto", "cpu", load_pipeline("digits").generator)).replace("torch.", "")
    assert capsys.readouterr().out.strip().endswith(f"{want})")


@pytest.mark.parametrize("argv, pattern", [
    (["--dtype", "float8"], r"dtype.*'float8'"),
    (["--device", "cuda"], r"no usable CUDA GPU"),
])
def test_generate_bad_dtype_or_device_is_one_line(tmp_path, capsys, argv, pattern):
    import re

    from varkit.cli import main

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["generate", "--model", "digits", "--classes", "0", *argv, "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_eval_fid_defaults_to_auto():
    import argparse

    from varkit.eval.cli_commands import add_eval_parser

    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers(dest="command"))
    assert p.parse_args(["eval", "fid", "--model", "digits"]).dtype == "auto"
    assert p.parse_args(["eval", "fid", "--model", "digits", "--dtype", "float32"]).dtype == "float32"


def test_samples_folder_records_a_non_fp32_dtype(tmp_path, tiny_pipeline):
    """A bf16 run is another run: its folder's manifest says so, and fp32 samples are not resumed in bf16."""
    import json

    from varkit.eval.fid import generate_samples, generator_dtype

    assert generator_dtype(tiny_pipeline) == "float32"
    generate_samples(tiny_pipeline, tmp_path / "a", 2, batch_size=2, progress=False)
    manifest = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert "dtype" not in manifest  # fp32 manifests (and folder hashes) as before
    tiny_pipeline.generator.to(torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="other settings.*dtype"):
        generate_samples(tiny_pipeline, tmp_path / "a", 2, batch_size=2, progress=False)
    generate_samples(tiny_pipeline, tmp_path / "b", 2, batch_size=2, progress=False)
    assert json.loads(next((tmp_path / "b").glob("*.json")).read_text())["dtype"] == "bfloat16"


def _bundled():
    from varkit.pipeline import bundled_models

    return bundled_models()


@pytest.mark.parametrize("name", _bundled())
def test_every_bundled_model_generates_in_bf16(name):
    """What `varkit generate --model NAME` does by default on an AMX / AVX-512-BF16 CPU (bf16 runs on any CPU,
    slower on AVX2-only ones): tokens come out for every bundled model (VAR's AdaLN head and the continuous
    heads' latent embedding take bf16 weights)."""
    from varkit.pipeline import load_pipeline

    pipe = load_pipeline(name, dtype="bfloat16")
    assert next(pipe.generator.parameters()).dtype == torch.bfloat16
    fast = {"head_steps": 2} if hasattr(pipe.generator.head, "steps_for") else {}  # continuous heads: 2 steps
    out = pipe([1], seed=0, **fast)
    assert len(out.images) == 1 and out.tokens.shape[0] == 1
    if out.tokens.is_floating_point():
        assert torch.isfinite(out.tokens).all()
