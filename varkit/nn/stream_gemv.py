"""A weight-streaming product ``x @ W.T`` for the few rows of a CPU decode step (batch 1, CFG: 1-4 rows).

Why: such a step reads every weight once and is bound by how fast one core streams them from DRAM. torch's paths
read them far below that: on one AMD EPYC Zen 4 core (DRAM read 27.9 GB/s, ``varkit bench floor``) ``F.linear``
reads fp32 weights at ~11 GB/s at one row and bf16 ones at 6-8 GB/s (oneDNN-packed: 10-13 GB/s). This kernel walks
``W`` row after row, one sequential stream the hardware prefetchers follow, and keeps the rows of ``x`` in L1: one
fused multiply-add per weight element and row, accumulated in fp32 (bf16 weights are widened exactly; bf16 rows
times bf16 weights use AVX-512-BF16's dot-product instruction where the CPU has it).

It is C++ (AVX-512, else AVX2 + FMA, else plain loops: whatever ``-march=native`` gives), built once per machine
with ``torch.utils.cpp_extension`` into torch's extension cache (about 40 s) the first time a prepacked linear
decodes a step; where it cannot be built (no compiler), :func:`stream_kernel` is None and the linears keep their
other paths. Results equal ``F.linear``'s up to the order of the fp32 sums (and, for bf16 weights, up to the one
rounding of the output to bf16).
"""
from __future__ import annotations

import functools
import hashlib
import sys
import warnings
from typing import Any

import torch

#: the most rows the kernel takes (beyond that the products are compute-bound and oneDNN's GEMMs win)
MAX_ROWS = 4
#: the most rows prepacked linears stream (one Zen 4 core, GB/s read, kernel / oneDNN-packed: fp32 21.8/13.9 at one
#: row, 16.6/11.5 at two, 15.5/16.1 at three; bf16 23.1/13.6, 16.2/11.4, 11.6/13.8)
STREAM_MAX_ROWS = 2

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int W = 1;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vload(const float* p) { return *p; }
inline vec vload(const uint16_t* p) { uint32_t u = (uint32_t)(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline float vsum(vec a) { return a; }
#endif

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }

// y[m, n] = sum_k x[m, k] * w[n, k] for n in [n0, n1): two accumulators per row of x (latency), W rows in order
template <int M, typename T>
void rows(const float* x, const T* w, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    vec a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = vzero(); a1[m] = vzero(); }
    int64_t k = 0;
    for (; k + 2 * W <= K; k += 2 * W) {
      vec w0 = vload(wr + k), w1 = vload(wr + k + W);
      for (int m = 0; m < M; ++m) {
        a0[m] = vfma(w0, vload(x + m * K + k), a0[m]);
        a1[m] = vfma(w1, vload(x + m * K + k + W), a1[m]);
      }
    }
    for (; k + W <= K; k += W) {
      vec w0 = vload(wr + k);
      for (int m = 0; m < M; ++m) a0[m] = vfma(w0, vload(x + m * K + k), a0[m]);
    }
    for (int m = 0; m < M; ++m) {
      float s = vsum(vadd(a0[m], a1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += scalar(wr[kk]) * x[m * K + kk];
      y[m * N + n] = s;
    }
  }
}

template <int M, typename T>
void run(const float* x, const T* w, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) { rows<M, T>(x, w, y, n0, n1, N, K); });
}

#if defined(__AVX512BF16__)
// bf16 rows times bf16 weights with the dot-product instruction: 32 products a row per instruction, no widening
template <int M>
void rows_dp(const uint16_t* x, const uint16_t* w, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k), w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
        a1[m] = _mm512_dpbf16_ps(a1[m], w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
      }
    }
    for (; k + 32 <= K; k += 32) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < M; ++m) a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += scalar(wr[kk]) * scalar(x[m * K + kk]);
      y[m * N + n] = s;
    }
  }
}

void dispatch_dp(int64_t M, const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
  auto go = [&](auto rows_m) { at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) { rows_m(x, w, y, n0, n1, N, K); }); };
  switch (M) {
    case 1: go(rows_dp<1>); break;
    case 2: go(rows_dp<2>); break;
    case 3: go(rows_dp<3>); break;
    case 4: go(rows_dp<4>); break;
    default: TORCH_CHECK(false, "stream_gemv takes 1-4 rows, got ", M);
  }
}
#endif

template <typename T>
void dispatch(int64_t M, const float* x, const T* w, float* y, int64_t N, int64_t K) {
  switch (M) {
    case 1: run<1, T>(x, w, y, N, K); break;
    case 2: run<2, T>(x, w, y, N, K); break;
    case 3: run<3, T>(x, w, y, N, K); break;
    case 4: run<4, T>(x, w, y, N, K); break;
    default: TORCH_CHECK(false, "stream_gemv takes 1-4 rows, got ", M);
  }
}

}  // namespace

// (M, K) rows (any float dtype) times the (N, K) weight (fp32 or bf16, contiguous) -> (M, N) fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "stream_gemv: shapes ", x.sizes(), " ", w.sizes());
  TORCH_CHECK(w.is_contiguous() && !x.is_cuda() && !w.is_cuda(), "stream_gemv: a contiguous CPU weight");
#if defined(__AVX512BF16__)
  if (x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16) {
    auto xb = x.contiguous();
    int64_t M = xb.size(0), K = xb.size(1), N = w.size(0);
    auto y = torch::empty({M, N}, xb.options().dtype(torch::kFloat32));
    dispatch_dp(M, reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), y.data_ptr<float>(), N, K);
    return y;
  }
#endif
  auto xf = x.to(torch::kFloat32).contiguous();
  int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xf.options());
  if (w.scalar_type() == torch::kFloat32) {
    dispatch<float>(M, xf.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), N, K);
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "stream_gemv: fp32 or bf16 weights");
    dispatch<uint16_t>(M, xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                       y.data_ptr<float>(), N, K);
  }
  return y;
}
"""


def _build_name(march: str = "native") -> str:
    """One build per source, torch version, ``-march`` and CPU (``-march=native`` binaries are the CPU's own)."""
    from ..device import cpu_info

    info = cpu_info()
    key = "|".join([SOURCE, torch.__version__, march, info.get("model", ""), ",".join(info.get("flags", []))])
    return "varkit_stream_gemv_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _built(cpp_extension: Any, name: str) -> bool:
    """Whether torch's extension cache already holds this build (then loading it takes a moment)."""
    try:
        from pathlib import Path

        return any(Path(cpp_extension._get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # a private helper of torch's: if it moves, the message is merely shown again
        return False


def stream_kernel() -> Any | None:
    """The built kernel module (``.gemv(x, w)``), or None where it cannot be built here (said once, as a warning)."""
    return build_kernel("native")


@functools.cache
def build_kernel(march: str = "native") -> Any | None:
    """The kernel built with ``-march=<march>``: ``native`` for use; the tests also build ``x86-64-v3`` (AVX2 + FMA)
    and ``x86-64`` (plain loops) to check the code paths other CPUs compile."""
    try:
        from torch.utils import cpp_extension

        name = _build_name(march)
        if not _built(cpp_extension, name):
            print(f"varkit: building the streaming GEMV kernel for this CPU (once, ~40 s; cached as {name})",
                  file=sys.stderr, flush=True)
        return cpp_extension.load_inline(name, cpp_sources=[SOURCE], functions=["gemv"],
                                         extra_cflags=["-O3", f"-march={march}"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the other paths stay
        warnings.warn(f"varkit: the streaming GEMV kernel could not be built ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); decoding uses torch's GEMMs", stacklevel=2)
        return None


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the kernel, for at most :data:`MAX_ROWS` rows on a CPU; None where the
    kernel is not available."""
    kernel = stream_kernel()
    if kernel is None:
        return None
    K = x.shape[-1]
    y = kernel.gemv(x.reshape(-1, K), weight)
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
