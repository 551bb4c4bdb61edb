"""Device and dtype resolution with clear errors, and the CPU facts that pick ``dtype="auto"``."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from .errors import DeviceError, InvalidArgumentError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
AUTO = "auto"

#: /proc/cpuinfo flags that decide how fast bf16 weights run (and that ``varkit bench floor`` records)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" → CUDA if present else CPU; "cuda" without CUDA → ``DeviceError``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was requested but this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    return dev


# -- CPU facts -----------------------------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict:
    """``{"model": str, "vendor": str, "flags": [...]}`` from the text of ``/proc/cpuinfo`` (first CPU listed)."""
    info: dict = {"model": "", "vendor": "", "flags": []}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and not info["model"]:
            info["model"] = value
        elif key == "vendor_id" and not info["vendor"]:
            info["vendor"] = value
        elif key in ("flags", "features") and not info["flags"]:
            info["flags"] = sorted(set(value.split()))
    return info


@functools.cache
def _read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_info(text: str | None = None) -> dict:
    """This machine's CPU (``text``: a ``/proc/cpuinfo`` to parse instead): model, vendor, the flags of
    :data:`CPU_FLAGS` it has, its bf16 ISA (:func:`bf16_isa`) and torch's own capability string."""
    info = parse_cpuinfo(_read_cpuinfo() if text is None else text)
    if not info["model"]:
        import platform

        info["model"] = platform.processor() or platform.machine() or "unknown"
    have = set(info["flags"])
    info["flags"] = [f for f in CPU_FLAGS if f in have]
    info["bf16_isa"] = bf16_isa(have)
    if text is None:
        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def bf16_isa(flags) -> str:
    """How this CPU multiplies bf16: ``amx`` (AMX tiles), ``avx512_bf16`` (dot-product instructions),
    ``avx512`` (no bf16 instructions, but oneDNN's AVX-512 bf16 kernels), or ``none`` (AVX2 and below)."""
    flags = set(flags)
    if "amx_bf16" in flags and "amx_tile" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if {"avx512bw", "avx512vl"} <= flags or "avx512f" in flags:
        return "avx512"
    return "none"


def native_bf16(info: dict) -> bool:
    """Whether bf16 GEMMs have hardware support here (AMX or AVX-512-BF16): then bf16 weights halve the bytes
    each decode step reads at full speed; elsewhere bf16 runs through conversions and usually loses."""
    return info.get("bf16_isa") in ("amx", "avx512_bf16")


# -- dtypes -------------------------------------------------------------------------------------------------------
def _cuda_bf16(dev: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere or newer); emulation does not count."""
    with torch.cuda.device(dev):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation argument
            return bool(torch.cuda.is_bf16_supported())


def cpu_dtype_choice(info: dict, onednn_bf16: bool = True, floor: dict | None = None,
                     small_model: bool = False) -> torch.dtype:
    """The CPU rule of :func:`auto_dtype`, on given facts (tests feed fake ``/proc/cpuinfo`` texts).

    bf16 with AMX or AVX-512-BF16 (:func:`native_bf16`) and oneDNN bf16 kernels (``onednn_bf16``), unless
    ``floor`` (a ``varkit bench floor`` measurement) has bf16 GEMMs at decode shapes slower than fp32; fp32 on
    AVX2-only CPUs (AMD Zen 2/3...), where bf16 weights run slower and cannot be prepacked. ``small_model`` (no
    linear weight large enough to prepack, :func:`varkit.nn.layers.has_large_linear`): fp32 unless the CPU has
    AMX, since bf16 saves such a model no DRAM traffic and its conversions cost more than its AVX-512-BF16
    products save (AMD Zen 4, batch 1: digits 76 ms/image fp32 vs 120-165 bf16, digits-var 18 vs 22, digits-nar
    42 vs 55-66).
    """
    if not (native_bf16(info) and onednn_bf16):
        return torch.float32
    if small_model and info.get("bf16_isa") != "amx":
        return torch.float32
    if floor:
        from .bench.floor import decode_gemm_score

        f32, b16 = decode_gemm_score(floor, "float32"), decode_gemm_score(floor, "bfloat16")
        if f32 and b16 and b16 < f32:
            return torch.float32
    return torch.bfloat16


def auto_dtype(device: str | torch.device | None = "cpu", model: torch.nn.Module | None = None) -> torch.dtype:
    """The generator dtype ``"auto"`` picks: the fastest one whose arithmetic the hardware does natively.

    CUDA: bf16 where the GPU supports it natively (Ampere or newer), else fp32 with a one-line warning, never an
    error. CPU:
    :func:`cpu_dtype_choice` on this machine's CPU, this torch's oneDNN, the cached floor measurement of
    this machine at this thread count, if ``varkit bench floor`` made one, and the ``model``'s size (when given).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda":
        if _cuda_bf16(dev):
            return torch.bfloat16
        warnings.warn(f"varkit: {torch.cuda.get_device_name(dev)} has no native bf16, so dtype auto runs float32 "
                      "(pass --dtype float32 / dtype='float32' to choose it explicitly)", stacklevel=2)
        return torch.float32
    info = cpu_info()
    if not native_bf16(info):
        return torch.float32
    from .bench.floor import cached_floor
    from .nn.layers import has_large_linear, packable_dtypes

    small = model is not None and not has_large_linear(model)
    return cpu_dtype_choice(info, torch.bfloat16 in packable_dtypes(), cached_floor(), small_model=small)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None,
                  model: torch.nn.Module | None = None) -> torch.dtype | None:
    """A dtype name (or ``"auto"``: :func:`auto_dtype` for ``device``, CPU when None, and ``model``) → ``torch.dtype``.

    ``None`` stays None (keep the model's dtype). bfloat16 asked for on a GPU without bf16 → ``DeviceError``.
    """
    if isinstance(dtype, str) and dtype.lower() == AUTO:
        return auto_dtype(device if device is not None else "cpu", model)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {AUTO}, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    if dtype == torch.bfloat16 and device is not None:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if dev.type == "cuda" and not _cuda_bf16(dev):
            raise DeviceError(f"bfloat16 was requested but {torch.cuda.get_device_name(dev)} has no native bf16; "
                              "use --dtype float32 (or auto)")
    return dtype
