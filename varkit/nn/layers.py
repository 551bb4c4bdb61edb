"""Norms and feed-forward blocks shared by the generators."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..modeling import DerivedState
from . import weight_arena
from .cpu_kernels import cpu_kernels
from .stream_gemv import (STREAM_MAX_ROWS, block_weight, blockable, panel_dtypes, panel_linear, panel_max_rows,
                          panel_pairs, panel_rows, panel_weight, stream_linear)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the gain (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            kernels = cpu_kernels()  # one C++ call instead of seven ops (the same maths: cpu_kernels.rms_norm_rows)
            if kernels is not None:
                return kernels.rms_norm_rows(x, self.weight, self.eps)
        xf = x.float()
        if x.is_cuda:  # one fused kernel instead of five (GPU decode steps are kernel-count bound); same maths
            return F.rms_norm(xf, xf.shape[-1:], eps=self.eps).type_as(x) * self.weight
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


@functools.cache
def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN can prepack on this CPU: fp32 everywhere; bf16 only where oneDNN has bf16
    kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; not on AVX2-only CPUs such as AMD Zen 2/3, where
    its reorder raises). Other dtypes take the unpacked path."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


def weight_major_faster(floor: dict | None) -> bool:
    """Whether a ``varkit bench floor`` result has the bf16 weight-major product at least as fast as ``F.linear``
    at the decode shapes (1 and 8 rows); True when not measured (what the Intel AMX Xeon measured: 185 against
    125 GFLOP/s at 8 rows; AMD Zen 4 measured the opposite, 45 against 102)."""
    from ..bench.floor import path_gain

    gain = path_gain(floor, "bfloat16", "weight_major", rivals=("linear",))
    return gain is None or gain >= 1.0


@functools.cache
def weight_major_pays(threads: int) -> bool:
    """:func:`weight_major_faster` on this machine's cached floor at ``threads`` (read once per thread count)."""
    from ..bench.floor import cached_floor

    return weight_major_faster(cached_floor(threads=threads))


def stream_enabled() -> bool:
    """Whether prepacked linears stream 1-2 row products through :mod:`varkit.nn.stream_gemv` (``VARKIT_STREAM_GEMV=0``
    turns it off: its benches time both)."""
    return os.environ.get("VARKIT_STREAM_GEMV", "1") != "0"


#: activations :meth:`Linear.linear` can apply after the product, and their oneDNN post-op (name, scalars, algorithm)
ACTIVATIONS = {"gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}
ONEDNN_POST_OPS = {"gelu_tanh": ("gelu", [], "tanh")}


class Linear(DerivedState, nn.Linear):
    """``nn.Linear`` (same parameters and state dict) with faster CPU paths for decoding.

    With few rows (decode steps: batch x CFG), PyTorch's bf16 ``x @ W.T`` on the CPU runs well
    below memory bandwidth; the weight-major product ``(W @ x.T).T`` reads the same bytes about
    1.6x faster on the Intel AMX Xeon (and 2x slower on AMD Zen 4: :func:`weight_major_pays` follows the
    machine's floor). Results are the same up to bf16 rounding of the accumulation order.

    Opt-in (:func:`prepack_linears`): the weight reordered once into oneDNN's blocked layout and
    kept next to it (one more copy of the weight in memory). Plain ``F.linear`` re-lays the weight
    out on every bf16 call and uses MKL's unpacked sgemm in fp32, both far from the memory / AMX
    roofline at 4-256 rows (NAR's fronts: 2-32 rows at batch 1 with CFG); the packed product is
    1.2-2x faster there, and in bf16 gives the same numbers as ``F.linear``. In fp32 past
    ``packed_max_rows_fp32`` rows MKL's sgemm is as fast or faster, and ``F.linear`` is used. At 1-2 rows
    (``STREAM_MAX_ROWS``: batch-1 decode steps with CFG) a prepacked linear streams a blocked copy of its weight
    through :mod:`varkit.nn.stream_gemv` instead, which reads DRAM 1.5-2x faster than the packed GEMM on a Zen 4
    core; at 3-128 rows (:func:`~varkit.nn.stream_gemv.panel_max_rows`, 1024 on AVX2: NAR's fronts, batches with
    CFG, VAR's scales) it runs varkit's panel kernel (``gemm_panels``) on a copy in panel layout, 1.1-1.4x faster
    than the packed GEMM (fp32; bf16 on CPUs without bf16 arithmetic, and with AVX-512-BF16 but no AMX through its
    dot-product instruction, 1.1-1.9x faster at 4-12 rows: :func:`~varkit.nn.stream_gemv.panel_dtypes`). Each copy
    is made on first use: a model decoding 1-2, 3-128 (or 1024) and more rows holds three extra copies. On second
    use the blocked and panel copies of all linears are moved end to end into one buffer of huge pages
    (:mod:`varkit.nn.weight_arena`: one run for the core's prefetchers; bf16 streams 22 -> 30 GB/s on a Zen 4 core).
    """

    # an opaque oneDNN tensor, the streaming kernel's blocked copy and the panel kernel's copy: stale after .to(),
    # never pickled or copied
    derived_attrs = ("_packed", "_blocked", "_panels")
    small_rows = 32  # NAR's fronts at batch 1 with CFG reach 32 rows; bit-identical to F.linear up to here
    # fp32 beyond this many rows: MKL's sgemm (F.linear) catches up with the packed GEMM and passes it (FlowAR-S's
    # flow head at batch 8 with CFG, 4096 rows: packed 5-11 % slower per GEMM, 8 % per network call; AMX Xeon, 1 thread)
    packed_max_rows_fp32 = 2048
    prepacked = False  # set per module by prepack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> torch.Tensor:
        """``F.linear(x, self.weight, bias)`` through the fastest CPU path that applies (see the class), followed by
        ``activation`` if given (:data:`ACTIVATIONS`): on oneDNN's packed path as the GEMM's post-op (no second
        pass over the output; oneDNN's tanh agrees with torch's to a few ulp), elsewhere as torch's function."""
        if activation is None:
            return self._linear(x, bias)
        fn = ACTIVATIONS.get(activation)
        if fn is None:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self._takes_onednn(x):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, *ONEDNN_POST_OPS[activation])
        return fn(self._linear(x, bias))

    def _takes_onednn(self, x: torch.Tensor) -> bool:
        """Whether :meth:`_linear` would hand ``x`` to oneDNN's packed GEMM (more rows than the C++ kernels take)."""
        if not (self.prepacked and self._can_use_packed(x)):
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        return rows > panel_max_rows() or (rows > STREAM_MAX_ROWS and self.weight.dtype not in panel_dtypes())

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.prepacked and self._can_use_packed(x):
            rows = x.numel() // max(x.shape[-1], 1)
            if rows <= STREAM_MAX_ROWS and self.weight.is_contiguous() and stream_enabled():  # 1-2 rows: stream the weight
                y = stream_linear(x, self.weight, bias, self._blocked_weight())
                if y is not None:
                    return y
            elif rows <= panel_max_rows() and self.weight.dtype in panel_dtypes():  # 3-128 rows (AVX2: 1024): panels
                panels = self._panel_weight()
                if panels is not None:
                    y = panel_linear(x, self.weight, bias, panels)
                    if y is not None:
                        return y
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, "none", [], "")
        # under torch.compile the plain linear is what inductor's freezing replaces by its own prepacked GEMM
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= self.small_rows * x.shape[-1]
                and not torch.compiler.is_compiling() and weight_major_pays(torch.get_num_threads())):
            y = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t()
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, bias)

    def panels_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The panel kernel's copy of the weight where :meth:`_linear` would hand ``x`` (without a bias) to the panel
        kernel, else None: for callers that run several products in one C++ call with the same numbers."""
        if not (self.prepacked and self._can_use_packed(x)):
            return None
        rows = x.numel() // max(x.shape[-1], 1)
        if not panel_rows(rows) or self.weight.dtype not in panel_dtypes():
            return None
        return self._panel_weight()

    def _can_use_packed(self, x: torch.Tensor) -> bool:
        # compiling first: packable_dtypes() is a graph break, and inductor packs its own weights
        if torch.compiler.is_compiling():
            return False
        w = self.weight
        if w.dtype == torch.float32 and x.numel() > self.packed_max_rows_fp32 * x.shape[-1]:
            return False
        return (x.device.type == "cpu" and x.dtype == w.dtype and w.dtype in packable_dtypes()
                and not (torch.is_grad_enabled() and w.requires_grad))

    def _packed_weight(self) -> torch.Tensor:
        """The oneDNN-packed weight, re-packed whenever the weight changed (new storage or in-place edit)."""
        return derived_copy(self, "_packed", lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach()))

    def _blocked_weight(self) -> torch.Tensor | None:
        """The streaming kernel's blocked copy of the weight (None where the weight has no blocked layout), made
        again whenever the weight changed."""
        if not blockable(self.weight):
            return None
        return derived_copy(self, "_blocked", block_weight, gathered=True)

    def _panel_weight(self) -> torch.Tensor | None:
        """The panel kernel's copy of the weight (None where the kernels cannot be built), made again whenever the
        weight changed."""
        kernel = cpu_kernels()
        if kernel is None:
            return None
        return derived_copy(self, "_panels", lambda w: panel_weight(w, kernel.panel_width(), panel_pairs(w.dtype)),
                            gathered=True)


def weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's values for its derived copies: storage, version counter (in-place edits) and dtype.
    An inference tensor (a model built or copied under torch.inference_mode) has no version counter: its storage and
    dtype are the key then (in-place edits under inference mode are not seen)."""
    return (w.data_ptr(), None if w.is_inference() else w._version, w.dtype)


def derived_copy(module: nn.Module, attr: str, make: Callable[[torch.Tensor], torch.Tensor],
                 gathered: bool = False) -> torch.Tensor:
    """``make(module.weight)``, cached in ``module.__dict__[attr]`` until the weight changes (new storage or in-place
    edit): the kernels' own layouts of a weight (packed, blocked, panels, Winograd-transformed). ``gathered``: the
    copies of this kind that the kernels stream are moved end to end into one buffer of huge pages when first asked
    for again (:mod:`varkit.nn.weight_arena`)."""
    w = module.weight
    key = weight_key(w)
    cached = module.__dict__.get(attr)
    if cached is None or cached[0] != key:
        cached = (key, make(w))
        module.__dict__[attr] = cached
        if gathered:
            weight_arena.note_new(module, attr)
    elif gathered and weight_arena.is_pending(module, attr):
        weight_arena.gather(attr, lambda m: weight_key(m.weight))
        cached = module.__dict__[attr]
    return cached[1]


#: ``prepack="auto"`` packs a weight from this many elements (1 MiB in fp32): below it a oneDNN call's fixed cost
#: outweighs what packing saves (digits, dim 128: 74 ms/image plain, 117 packed at batch 1, AMD Zen 4); above it
#: the packed GEMM reads the weight 1.7-2x faster at decode shapes (LlamaGen-B-sized steps, same machine)
AUTO_PREPACK_MIN_NUMEL = 1 << 18


def prepack_linears(module: nn.Module, enabled: bool = True, min_numel: int = 0) -> int:
    """Switch the prepacked CPU inference path of every :class:`Linear` in ``module`` whose weight has at least
    ``min_numel`` elements (the others are switched off); returns how many are on (``enabled``) or off.

    Why: decode steps that feed 1-256 rows per GEMM (batch-1 steps with CFG, NAR's fronts, batches) run
    1.2-2x faster on a weight packed once for oneDNN (AMX in bf16), and on AMD CPUs, where MKL's sgemm takes a
    slow path, 1.7x faster in fp32 already at 2 rows. Costs one extra copy of those weights in memory, made on
    the first no-grad CPU call; training and grad-enabled calls are unchanged. bf16 weights stay unpacked on
    CPUs without oneDNN bf16 kernels (:func:`packable_dtypes`).
    """
    if enabled and not torch.backends.mkldnn.is_available():
        raise InvalidArgumentError("prepacked linears need PyTorch built with oneDNN (mkldnn)")
    count = 0
    for m in module.modules():
        if isinstance(m, Linear):
            on = enabled and m.weight.numel() >= min_numel
            m.prepacked = on
            if not on:
                m.drop_derived()
            count += on if enabled else 1
    return count


def has_large_linear(module: nn.Module, min_numel: int = AUTO_PREPACK_MIN_NUMEL) -> bool:
    """Whether ``module`` has a linear weight of at least ``min_numel`` elements (one ``prepack="auto"`` packs):
    a model without one lives in the CPU's caches, and its speed is per-op cost, not weight bytes."""
    return any(isinstance(m, nn.Linear) and m.weight.numel() >= min_numel for m in module.modules())


def prepacked_numel(module: nn.Module) -> int:
    """Weight elements of the :class:`Linear` layers of ``module`` that run prepacked (their extra copy)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, Linear) and m.prepacked)


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's hidden size rule: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))
        # inference: the gate in place in w1's output (the same values; no two fresh (rows, hidden) tensors a call)
        a, b = self.w1(x), self.w3(x)
        if not _gate_in_kernel(a, b):
            a = F.silu(a, inplace=True).mul_(b)
        return self.dropout(self.w2(a))


def _gate_in_kernel(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a = silu(a) * b`` in place in one C++ pass (``cpu_kernels.silu_mul_``: silu rounded to the dtype, then the
    product rounded, as torch's two ops) where it applies: CPU, fp32, or bf16 on a build with AVX-512-BF16 (its
    conversions vectorize the roundings; elsewhere torch's ops are faster). Whether it ran. bf16, 32 rows x 2048
    (NAR-B's widest front with CFG), one Zen 4 core: silu_ then mul_ 56 us, the kernel 31; NAR-B's batch-1 image
    1-2 % faster."""
    if (a.device.type != "cpu" or a.dtype not in (torch.float32, torch.bfloat16) or b.dtype != a.dtype
            or a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()) or torch.compiler.is_compiling()):
        return False
    kernel = cpu_kernels()
    if kernel is None or not gate_kernel_serves(a.dtype, kernel):
        return False
    kernel.silu_mul_(a, b)
    return True


def gate_kernel_serves(dtype: torch.dtype, kernel) -> bool:
    """Whether SwiGLU's gate runs in ``kernel.silu_mul_`` for ``dtype`` at inference (:func:`_gate_in_kernel`): fp32;
    bf16 where the build has AVX-512-BF16 (``panel_pairs()``: the same instructions round bf16 there)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and kernel.panel_pairs())
