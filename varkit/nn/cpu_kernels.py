"""varkit's C++ CPU kernels for decode steps: one extension, built once per machine on first use.

Why: a batch-1 decode step reads every weight and every cached key/value once, and is bound by how fast one core
streams them from DRAM; torch's CPU paths for these shapes read far below that (one AMD EPYC Zen 4 core, DRAM read
27.9 GB/s in ``varkit bench floor``: ``F.linear`` reads fp32 weights at ~11 GB/s at one row, bf16 at 6-8 GB/s,
oneDNN-packed 10-14 GB/s; SDPA reads a one-query KV cache at ~7 GB/s). Three kernels:

- ``gemv(x, w)``: ``x @ w.T`` for 1-4 rows of ``x`` over a plain (N, K) weight, walked row after row (one
  sequential stream the hardware prefetchers follow), the rows of ``x`` kept in L1.
- ``gemv_blocked(x, wb, N)``: the same product over the weight in :func:`varkit.nn.stream_gemv.block_weight`'s
  layout: blocks of ``BLOCK_ROWS`` weight rows, each cut into 64-byte chunks stored one row's chunk after the
  other's. Still one sequential stream, but each chunk of ``x`` is loaded once for four weight rows: at two rows of
  ``x`` (batch 1 with CFG) the plain walk spends more instructions than bytes allow and reads ~20 GB/s on a Zen 4
  core, the blocked one reads at the core's ``sum`` rate (~24-26 GB/s, the same run).
- ``attend_one(q, k, v, scale)``: softmax attention of one query a row over (B, H, L, D) keys/values (any strides
  with unit stride over D, e.g. a static cache's filled prefix): scores, a vector exp (a degree-7 polynomial after
  range reduction: truncation below fp32's rounding, as the softmax kernels of SIMD libraries), and the
  weighted sum of values, reading each key and value once.
- ``attend_front(qkv, cos, sin, kc, vc, pos, scale)``: a front of n new tokens a row (NAR's one-front steps): the
  rotary of q and k, the cache write and the attention over every cached key and the front, in one call a layer,
  keys in vector lanes for the scores and head dimensions for the values' sums (no horizontal sums, each query
  paying for itself only); bf16 scores and values' sums through AVX-512-BF16's dot product where it exists.
- ``gemm_panels`` / ``linear_panels``: 3-128 rows times a weight in panel layout (register-blocked; bf16 weights in
  k pairs through the dot-product instruction where AVX-512-BF16 exists without AMX).
- ``front_layers(...)``: whole LLaMA blocks for such a front (NAR's fronts at 3-128 rows), one after another:
  RMSNorm, the five linears on the panel kernel, ``attend_front``, the SwiGLU gate and the residual sums (added in
  the linears' tile stores), one call from Python for one block or a step's blocks, the module path's roundings.
- ``decode_layers(...)``: whole LLaMA blocks (:class:`varkit.models.raster.TransformerBlock`), one after another,
  for one new token a row over a static cache, on the kernels above, in one call from Python with no tensor made
  between the layers: a GPT-B step through the module path spends ~4 ms of its ~25 in Python and small ops (norms,
  rotary, cache writes, gating) on a Zen 4 core, a call a layer still ~0.1 ms a layer.
- ``rms_norm_rows(x, g, eps)``: :class:`varkit.nn.RMSNorm` in one call (torch's CPU path is seven ops, ~24 us at
  a decode step's two rows on a Zen 4 core, of which the work is well under a microsecond).
- ``topk(x, k)``: the k largest of each fp32 row, sorted (:func:`varkit.samplers.topk.top_k`): a threshold from a
  strided sample, one vectorized pass collecting the candidates, a radix sort (34 us a row of 16384 words at k 2000
  against torch.topk's 257 us, one thread of an AVX-512 Xeon).

Every sum is accumulated in fp32; bf16 weights/keys are widened exactly; bf16 rows times bf16 weights use
AVX-512-BF16's dot-product instruction where the CPU has it. Built with ``-march=native`` (AVX-512, else AVX2 + FMA,
else plain loops) through ``torch.utils.cpp_extension`` into torch's extension cache (about 40 s, once); where it
cannot be built (no compiler), :func:`cpu_kernels` is None and callers keep torch's paths.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import warnings
from typing import Any

import torch

#: weight rows per block of the blocked layout (4: the accumulators of 4 rows of x fit AVX2's 16 registers)
BLOCK_ROWS = 4
#: bytes of one chunk of a blocked weight row (a cache line)
CHUNK_BYTES = 64

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <climits>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int NR = 4;            // BLOCK_ROWS
constexpr int CHUNK = 64;        // CHUNK_BYTES

#if defined(__AVX512F__)
constexpr int W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float a) { return _mm512_set1_ps(a); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(vec a) { return _mm512_reduce_max_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float a) { return _mm256_set1_ps(a); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int W = 1;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vset(float a) { return a; }
inline vec vload(const float* p) { return *p; }
inline vec vload(const uint16_t* p) { uint32_t u = (uint32_t)(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void vstore(float* p, vec a) { *p = a; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vmin(vec a, vec b) { return a < b ? a : b; }
inline vec vdiv(vec a, vec b) { return a / b; }
inline vec vround(vec a) { return std::nearbyint(a); }
inline vec vpow2(vec n) { return std::ldexp(1.f, (int)n); }
inline float vsum(vec a) { return a; }
inline float vhmax(vec a) { return a; }
#endif

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = c10::BFloat16(v).x; }
inline float round_as(float v, bool bf16) { return bf16 ? (float)c10::BFloat16(v) : v; }

// exp(x): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-7 Taylor polynomial (truncation < 6e-9
// relative there, under fp32's rounding); x is clamped to [-87, 88] (exp(-87) = 1.6e-38 is nothing next to a
// softmax's largest term 1, or to silu's 1 + exp(-x); exp(88) = 1.7e38 stays finite)
inline vec vexp(vec x) {
  x = vmin(vmax(x, vset(-87.f)), vset(88.f));
  vec n = vround(vmul(x, vset(1.44269504088896341f)));
  vec r = vfma(n, vset(-0.693145751953125f), x);  // ln2 split in two for an exact first product
  r = vfma(n, vset(-1.428606765330187045e-06f), r);
  vec p = vset(1.f / 5040);
  p = vfma(p, r, vset(1.f / 720));
  p = vfma(p, r, vset(1.f / 120));
  p = vfma(p, r, vset(1.f / 24));
  p = vfma(p, r, vset(1.f / 6));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.f));
  p = vfma(p, r, vset(1.f));
  return vmul(p, vpow2(n));
}

// silu(v) = v / (1 + exp(-v)): SwiGLU's gate, the decoders' GroupNorm + SiLU
inline vec vsilu(vec v) { return vdiv(v, vadd(vset(1.f), vexp(vmul(v, vset(-1.f))))); }
inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// (a, b) rotated by the angle of (c, s): an interleaved rotary pair (varkit.nn.rope.apply_rope)
inline void rotate(float a, float b, float c, float s, float& x, float& y) { x = a * c - b * s; y = a * s + b * c; }

// ---- plain weight: y[m, n] = sum_k x[m, k] * w[n, k], W rows in order (any K) --------------------------------
template <int M, typename T>
__attribute__((noinline)) void rows(const float* x, const T* w, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
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

// ---- blocked weight [ceil(N/NR)][K/E][NR][E], E = CHUNK / sizeof(T) (K a multiple of E) -----------------------
template <int M, typename T>
__attribute__((noinline)) void blocked(const float* x, const T* wb, float* y, int64_t b0, int64_t b1, int64_t N, int64_t K) {
  constexpr int E = CHUNK / sizeof(T);
  constexpr int V = E / W;  // vectors per chunk
  const int64_t chunks = K / E;
  for (int64_t b = b0; b < b1; ++b) {
    const T* wc = wb + b * chunks * NR * E;
    vec acc[NR][M];
    for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = vzero();
    for (int64_t c = 0; c < chunks; ++c, wc += NR * E) {
      vec xv[M][V];
      for (int m = 0; m < M; ++m) for (int v = 0; v < V; ++v) xv[m][v] = vload(x + m * K + c * E + v * W);
      for (int r = 0; r < NR; ++r) for (int v = 0; v < V; ++v) {
        vec wv = vload(wc + r * E + v * W);
        for (int m = 0; m < M; ++m) acc[r][m] = vfma(wv, xv[m][v], acc[r][m]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      if (b * NR + r >= N) break;
      for (int m = 0; m < M; ++m) y[m * N + b * NR + r] = vsum(acc[r][m]);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 rows times bf16 weights with the dot-product instruction: 32 products a row per instruction, no widening
template <int M>
__attribute__((noinline)) void rows_dp(const uint16_t* x, const uint16_t* w, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
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

template <int M>
__attribute__((noinline)) void blocked_dp(const uint16_t* x, const uint16_t* wb, float* y, int64_t b0, int64_t b1, int64_t N, int64_t K) {
  const int64_t chunks = K / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* wc = wb + b * chunks * NR * 32;
    __m512 acc[NR][M];
    for (int r = 0; r < NR; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, wc += NR * 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + c * 32);
      for (int r = 0; r < NR; ++r) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(wc + r * 32);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      if (b * NR + r >= N) break;
      for (int m = 0; m < M; ++m) y[m * N + b * NR + r] = _mm512_reduce_add_ps(acc[r][m]);
    }
  }
}
#endif

const uint16_t* bf16_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

// ---- panels: weight [ceil(N/NB)][K][NB], NB = 2W (zero columns pad the last panel) -------------------------------
// y[m, n] = sum_k x[m, k] w[n, k] for a few dozen rows (NAR's fronts, batches with CFG): rows go in groups of at most
// MR_MAX, each group's x packed as [K][mr] fp32; per k, two vectors of weight times one broadcast x per row (the
// register-blocked form of a GEMM micro-kernel, no horizontal sums). Each panel (K x NB) is read once from DRAM and
// reused from L2 by every group; while the groups run, they prefetch the thread's next panel into L2 (one line in G
// rows of k each), so that DRAM streams under the arithmetic instead of before it.
constexpr int NB = 2 * W;
constexpr int PF_AHEAD = 1;  // panels ahead that the groups prefetch (2: no better; none: 10-30 % slower than oneDNN)
#if defined(__AVX512F__)
constexpr int MR_MAX = 12;   // 24 accumulators + 2 weight vectors + 1 broadcast of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int MR_MAX = 6;    // 12 + 2 + 1 of 16
#else
constexpr int MR_MAX = 4;
#endif

// a tile's MR x NB sums, plus the bias (padded to whole panels; null: none), into y (rows ldy apart, fp32 or bf16
// rounded once), the first `valid` columns. res (rows ldy apart, y's dtype; null: none): a residual stream added to
// the rounded result and rounded again (y = x + linear(...) as two ops in the model dtype: torch's rounding)
template <int MR, typename O>
inline void store_tile(const vec* a0, const vec* a1, O* y, int64_t ldy, int64_t valid, const float* bias, const O* res) {
  constexpr bool BF = std::is_same_v<O, uint16_t>;
  for (int m = 0; m < MR; ++m) {
    vec v0 = a0[m], v1 = a1[m];
    if (bias != nullptr) { v0 = vadd(v0, vload(bias)); v1 = vadd(v1, vload(bias + W)); }
    O* row = y + m * ldy;
    const O* rrow = res == nullptr ? nullptr : res + m * ldy;
    if constexpr (!BF) {
      if (valid == NB) {
        if (rrow != nullptr) { v0 = vadd(v0, vload(rrow)); v1 = vadd(v1, vload(rrow + W)); }
        vstore(row, v0);
        vstore(row + W, v1);
        continue;
      }
    }
#if defined(__AVX512BF16__)
    if constexpr (BF) {
      if (valid == NB) {  // round to nearest even, as c10::BFloat16
        __m256i h0 = (__m256i)_mm512_cvtneps_pbh(v0), h1 = (__m256i)_mm512_cvtneps_pbh(v1);
        if (rrow != nullptr) {
          const auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
          h0 = (__m256i)_mm512_cvtneps_pbh(vadd(widen(h0), vload(rrow)));
          h1 = (__m256i)_mm512_cvtneps_pbh(vadd(widen(h1), vload(rrow + W)));
        }
        _mm256_storeu_si256((__m256i*)row, h0);
        _mm256_storeu_si256((__m256i*)(row + W), h1);
        continue;
      }
    }
#endif
    float tmp[NB];
    vstore(tmp, v0);
    vstore(tmp + W, v1);
    if (rrow != nullptr) for (int64_t i = 0; i < valid; ++i) store(row + i, round_as(tmp[i], BF) + scalar(rrow[i]));
    else for (int64_t i = 0; i < valid; ++i) store(row + i, tmp[i]);
  }
}

// where a tile's sums go: y's element (row, col) at y + (row * ldy + col) * size, bf16 or fp32, plus the bias
// (fp32, padded to whole panels; null: none), plus the residual res (y's dtype and strides; null: none; may be y)
struct PanelOut {
  char* y;
  int64_t ldy;
  bool bf16;
  const float* bias;
  const char* res = nullptr;
  template <int MR>
  void put(const vec* a0, const vec* a1, int64_t row, int64_t col, int64_t valid) const {
    const float* b = bias == nullptr ? nullptr : bias + col;
    const int64_t at = row * ldy + col;
    if (bf16)
      store_tile<MR>(a0, a1, reinterpret_cast<uint16_t*>(y) + at, ldy, valid, b,
                     res == nullptr ? nullptr : reinterpret_cast<const uint16_t*>(res) + at);
    else
      store_tile<MR>(a0, a1, reinterpret_cast<float*>(y) + at, ldy, valid, b,
                     res == nullptr ? nullptr : reinterpret_cast<const float*>(res) + at);
  }
};

template <int MR, typename T>
__attribute__((noinline)) void panel_tile(const float* __restrict xt, const T* __restrict wp, const PanelOut& out, int64_t row, int64_t col,
                                          int64_t K, int64_t valid, const char* pf, int g, int G) {
  constexpr int64_t LINE = NB * sizeof(T);  // bytes of one k of a panel: 128 (fp32) or 64 (bf16) on AVX-512
  vec a0[MR], a1[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = vzero(); a1[m] = vzero(); }
  // k in steps of G, so that the loop of products has no branch; group g prefetches row k0 + g of the next panel
  // per step (the G groups together prefetch every row once)
  for (int64_t k0 = 0; k0 < K; k0 += G) {
    const int64_t k1 = std::min<int64_t>(K, k0 + G);
    for (int64_t k = k0; k < k1; ++k) {
      const T* wk = wp + k * NB;
      vec w0 = vload(wk), w1 = vload(wk + W);
      const float* xk = xt + k * MR;
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        vec b = vset(xk[m]);
        a0[m] = vfma(w0, b, a0[m]);
        a1[m] = vfma(w1, b, a1[m]);
      }
    }
    if (pf != nullptr && k0 + g < K)
      for (int64_t off = 0; off < LINE; off += 64) _mm_prefetch(pf + (k0 + g) * LINE + off, _MM_HINT_T1);
  }
  out.put<MR>(a0, a1, row, col, valid);
}

#if defined(__AVX512BF16__)
constexpr bool PANEL_PAIRS = true;
// bf16 rows times bf16 weights in the pair layout [ceil(N/NB)][ceil(K/2)][NB][2] (each output's k and k+1 adjacent):
// per k pair, two weight vectors times one broadcast pair (x[m, 2k], x[m, 2k+1]) per row through the dot-product
// instruction (32 products per instruction and no widening, where the fp32 tile does 16); sums in fp32
template <int MR>
__attribute__((noinline)) void panel_tile_pairs(const uint32_t* __restrict xt, const uint16_t* __restrict wp, const PanelOut& out, int64_t row,
                                                int64_t col, int64_t K2, int64_t valid, const char* pf, int g, int G) {
  constexpr int64_t LINE = 2 * NB * sizeof(uint16_t);  // bytes of one k pair of a panel: 128
  __m512 a0[MR], a1[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
  for (int64_t k0 = 0; k0 < K2; k0 += G) {
    const int64_t k1 = std::min<int64_t>(K2, k0 + G);
    for (int64_t k = k0; k < k1; ++k) {
      const uint16_t* wk = wp + k * 2 * NB;
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + NB);
      const uint32_t* xk = xt + k * MR;
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512bh b = (__m512bh)_mm512_set1_epi32((int)xk[m]);
        a0[m] = _mm512_dpbf16_ps(a0[m], w0, b);
        a1[m] = _mm512_dpbf16_ps(a1[m], w1, b);
      }
    }
    if (pf != nullptr && k0 + g < K2)
      for (int64_t off = 0; off < LINE; off += 64) _mm_prefetch(pf + (k0 + g) * LINE + off, _MM_HINT_T1);
  }
  out.put<MR>(a0, a1, row, col, valid);
}
#else
constexpr bool PANEL_PAIRS = false;
#endif

// panel_tile<mr> (or, for x in bf16 pairs, panel_tile_pairs<mr>) for a run-time mr in 1..MR_MAX
template <typename X, typename T, int MR = MR_MAX>
void tile_rows(int mr, const X* xt, const T* wp, const PanelOut& out, int64_t row, int64_t col, int64_t K, int64_t valid,
               const char* pf, int g, int G) {
  if (mr == MR) {
    if constexpr (std::is_same_v<X, float>) panel_tile<MR, T>(xt, wp, out, row, col, K, valid, pf, g, G);
#if defined(__AVX512BF16__)
    else panel_tile_pairs<MR>(xt, wp, out, row, col, K, valid, pf, g, G);
#endif
  } else if constexpr (MR > 1) {
    tile_rows<X, T, MR - 1>(mr, xt, wp, out, row, col, K, valid, pf, g, G);
  }
}

// x's rows packed for the tiles: groups of at most MR_MAX rows of balanced sizes (rows [r0[g], r0[g+1])), group g
// at r0[g] * KS as [KS][mr]; X = uint32_t: bf16 k pairs (the pair tile), float: fp32 (bf16 rows widened)
template <typename X>
struct PanelRows {
  using value_type = X;
  int64_t M = 0, K = 0, KS = 0;
  int G = 0;
  std::vector<int64_t> r0;
  std::vector<X> xt;
};

template <typename X>
PanelRows<X> pack_panel_rows(const torch::Tensor& x) {
  constexpr bool PAIRS = std::is_same_v<X, uint32_t>;
  PanelRows<X> p;
  p.M = x.size(0);
  p.K = x.size(1);
  p.KS = PAIRS ? (p.K + 1) / 2 : p.K;  // steps of k: single k, or k pairs
  p.G = (int)((p.M + MR_MAX - 1) / MR_MAX);
  p.r0.assign(p.G + 1, 0);
  for (int g = 0; g < p.G; ++g) p.r0[g + 1] = p.r0[g] + p.M / p.G + (g < p.M % p.G);
  auto xc = x.to(PAIRS ? torch::kBFloat16 : torch::kFloat32).contiguous();
  const int64_t K = p.K, KS = p.KS;
  p.xt.resize(p.M * KS);
  for (int g = 0; g < p.G; ++g) {
    const int64_t mr = p.r0[g + 1] - p.r0[g];
    X* dst = p.xt.data() + p.r0[g] * KS;
    for (int64_t m = 0; m < mr; ++m) {
      if constexpr (PAIRS) {
        const uint16_t* xs = bf16_ptr(xc) + (p.r0[g] + m) * K;
        for (int64_t k = 0; k < KS; ++k)
          dst[k * mr + m] = (uint32_t)xs[2 * k] | (2 * k + 1 < K ? (uint32_t)xs[2 * k + 1] << 16 : 0u);
      } else {
        const float* xs = xc.data_ptr<float>() + (p.r0[g] + m) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * mr + m] = xs[k];
      }
    }
  }
  return p;
}

// the packed rows times the N columns of a weight in panel layout (wp: [P][K][NB], or pairs [P][KS][NB][2]) into out
template <typename X, typename T>
void run_panels(const PanelRows<X>& rows, const T* wp, int64_t N, const PanelOut& out) {
  constexpr bool PAIRS = std::is_same_v<X, uint32_t>;
  const int64_t P = (N + NB - 1) / NB, KS = rows.KS;
  const int64_t stride = (PAIRS ? 2 * KS : KS) * NB;  // elements of one panel
  const int G = rows.G;
  // bf16 pairs at 2-4 rows: the hardware prefetchers alone stream the panels faster (60 NAR-B-shaped products, one
  // Zen 4 core, GB/s with / without the software prefetch: 2 rows 21.5 / 30.2, 3 rows 18.0-21.5 / 21.7-28.3, 4 rows
  // 14.3-21.2 / 18.5-27.5; from 5 rows, and in fp32 from 3, it pays: 5 rows 23.6 / 19.9, fp32 4 rows 23.0 / 17.5)
  const bool prefetch = !(PAIRS && rows.M <= 4);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* w = wp + p * stride;
      const char* pf = prefetch && p + PF_AHEAD < p1 ? reinterpret_cast<const char*>(w + PF_AHEAD * stride) : nullptr;
      const int64_t valid = std::min<int64_t>(NB, N - p * NB);
      for (int g = 0; g < G; ++g)
        tile_rows<X, T>((int)(rows.r0[g + 1] - rows.r0[g]), rows.xt.data() + rows.r0[g] * KS, w, out, rows.r0[g],
                        p * NB, KS, valid, pf, g, G);
    }
  });
}

// one product of packed rows over a weight in panel layout: y (M, N) = x @ w.T, each output rounded once to y's dtype
// (fp32 or bf16) after the bias (fp32 or bf16 (N), or undefined) and then, where res is defined (y's dtype and
// shape, contiguous; may be y itself: each output reads its residual just before it is written), rounded again
// after adding res
struct PanelJob {
  const torch::Tensor& wp;
  torch::Tensor& y;
  const torch::Tensor& bias;
  const torch::Tensor& res;
};

// the jobs' products of x (M, K) with their weights of N columns each (wp: 3-d [P][K][NB] of fp32/bf16, or 4-d bf16
// pairs, one layout for all), x packed once
void panels_into(const torch::Tensor& x, int64_t N, std::initializer_list<PanelJob> jobs) {
  const int64_t P = (N + NB - 1) / NB, K = x.size(1);
  const bool pairs = jobs.begin()->wp.dim() == 4;
  for (const PanelJob& j : jobs) {
    if (pairs) {
      TORCH_CHECK(PANEL_PAIRS, "varkit gemm_panels: the pair layout needs AVX-512-BF16 (panel_pairs() is false here)");
      TORCH_CHECK(j.wp.dim() == 4 && j.wp.scalar_type() == torch::kBFloat16 && j.wp.size(0) == P
                  && j.wp.size(1) == (K + 1) / 2 && j.wp.size(2) == NB && j.wp.size(3) == 2,
                  "varkit gemm_panels: a bf16 weight in the pair layout of (", N, ", ", K, ")");
    } else {
      TORCH_CHECK(j.wp.dim() == 3 && j.wp.numel() == P * NB * K,
                  "varkit gemm_panels: a weight in the panel layout of (", N, ", ", K, ")");
    }
  }
  const auto run = [&](const auto& rows) {
    for (const PanelJob& j : jobs) {
      std::vector<float> b;  // the bias in fp32, zero-padded to whole panels
      if (j.bias.defined()) {
        auto bf = j.bias.to(torch::kFloat32).contiguous();
        b.assign(P * NB, 0.0f);
        std::memcpy(b.data(), bf.data_ptr<float>(), N * sizeof(float));
      }
      const PanelOut out{static_cast<char*>(j.y.data_ptr()), N, j.y.scalar_type() == torch::kBFloat16,
                         b.empty() ? nullptr : b.data(), j.res.defined() ? static_cast<const char*>(j.res.data_ptr()) : nullptr};
      if (j.wp.scalar_type() == torch::kFloat32) {
        if constexpr (std::is_same_v<typename std::decay_t<decltype(rows)>::value_type, float>)
          run_panels(rows, j.wp.data_ptr<float>(), N, out);
      } else {
        run_panels(rows, bf16_ptr(j.wp), N, out);
      }
    }
  };
  if (pairs) {
    if constexpr (PANEL_PAIRS) run(pack_panel_rows<uint32_t>(x));
  } else {
    run(pack_panel_rows<float>(x));
  }
}

void check_panel_args(const torch::Tensor& x, const torch::Tensor& wp, int64_t N, const torch::Tensor& bias,
                      at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && !x.is_cuda() && !wp.is_cuda() && wp.is_contiguous()
              && (wp.scalar_type() == torch::kFloat32 || wp.scalar_type() == torch::kBFloat16)
              && (out_dtype == torch::kFloat32 || out_dtype == torch::kBFloat16),
              "varkit gemm_panels: 2-d CPU rows, an fp32/bf16 weight in a panel layout, fp32/bf16 output");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == N), "varkit gemm_panels: a bias of ", N, " values");
}

// y = x @ w.T (+ bias) over w's panel layout (wp), into a new (M, N) tensor of `out_dtype`
torch::Tensor panel_product(torch::Tensor x, torch::Tensor wp, int64_t N, const torch::Tensor& bias, at::ScalarType out_dtype) {
  check_panel_args(x, wp, N, bias, out_dtype);
  auto y = torch::empty({x.size(0), N}, x.options().dtype(out_dtype));
  const torch::Tensor none;
  panels_into(x, N, {{wp, y, bias, none}});
  return y;
}

// one call per row count M (1-4): fn<M>(range begin, range end) over `count` items
template <template <int> class F, typename... A>
void by_rows(int64_t M, int64_t count, int64_t grain, A... args) {
  auto go = [&](auto tag) {
    constexpr int m = decltype(tag)::value;
    at::parallel_for(0, count, grain, [&](int64_t i0, int64_t i1) { F<m>::run(i0, i1, args...); });
  };
  switch (M) {
    case 1: go(std::integral_constant<int, 1>{}); break;
    case 2: go(std::integral_constant<int, 2>{}); break;
    case 3: go(std::integral_constant<int, 3>{}); break;
    case 4: go(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "varkit cpu_kernels: gemv takes 1-4 rows, got ", M);
  }
}

template <typename T> struct Rows {
  template <int M> struct F {
    static void run(int64_t i0, int64_t i1, const float* x, const T* w, float* y, int64_t N, int64_t K) {
      rows<M, T>(x, w, y, i0, i1, N, K);
    }
  };
};
template <typename T> struct Blocked {
  template <int M> struct F {
    static void run(int64_t i0, int64_t i1, const float* x, const T* w, float* y, int64_t N, int64_t K) {
      blocked<M, T>(x, w, y, i0, i1, N, K);
    }
  };
};
#if defined(__AVX512BF16__)
template <int M> struct RowsDp {
  static void run(int64_t i0, int64_t i1, const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
    rows_dp<M>(x, w, y, i0, i1, N, K);
  }
};
template <int M> struct BlockedDp {
  static void run(int64_t i0, int64_t i1, const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
    blocked_dp<M>(x, w, y, i0, i1, N, K);
  }
};
#endif

// the product for (M, K) rows; blocked: w in the blocked layout of an (N, K) weight
torch::Tensor product(torch::Tensor x, torch::Tensor w, int64_t N, bool is_blocked) {
  TORCH_CHECK(x.dim() == 2 && !x.is_cuda() && !w.is_cuda() && w.is_contiguous(), "varkit gemv: 2-d CPU rows, a contiguous CPU weight");
  const int64_t M = x.size(0), K = x.size(1);
  auto w_type = w.scalar_type();
  TORCH_CHECK(w_type == torch::kFloat32 || w_type == torch::kBFloat16, "varkit gemv: fp32 or bf16 weights");
  const int64_t E = CHUNK / (w_type == torch::kFloat32 ? 4 : 2);
  if (is_blocked) {
    TORCH_CHECK(K % E == 0 && w.numel() == (N + NR - 1) / NR * NR * K, "varkit gemv_blocked: weight of ", w.numel(),
                " elements is not the blocked layout of (", N, ", ", K, ")");
  } else {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.size(0) == N, "varkit gemv: shapes ", x.sizes(), " ", w.sizes());
  }
  const int64_t count = is_blocked ? (N + NR - 1) / NR : N, grain = is_blocked ? 64 : 256;
#if defined(__AVX512BF16__)
  if (x.scalar_type() == torch::kBFloat16 && w_type == torch::kBFloat16) {
    auto xb = x.contiguous();
    auto y = torch::empty({M, N}, xb.options().dtype(torch::kFloat32));
    if (is_blocked) by_rows<BlockedDp>(M, count, grain, bf16_ptr(xb), bf16_ptr(w), y.data_ptr<float>(), N, K);
    else by_rows<RowsDp>(M, count, grain, bf16_ptr(xb), bf16_ptr(w), y.data_ptr<float>(), N, K);
    return y;
  }
#endif
  auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (w_type == torch::kFloat32) {
    if (is_blocked) by_rows<Blocked<float>::F>(M, count, grain, xp, w.data_ptr<float>(), yp, N, K);
    else by_rows<Rows<float>::F>(M, count, grain, xp, w.data_ptr<float>(), yp, N, K);
  } else {
    if (is_blocked) by_rows<Blocked<uint16_t>::F>(M, count, grain, xp, bf16_ptr(w), yp, N, K);
    else by_rows<Rows<uint16_t>::F>(M, count, grain, xp, bf16_ptr(w), yp, N, K);
  }
  return y;
}

// ---- one-query attention ------------------------------------------------------------------------------------
// out[d] = sum_l softmax(scale * q.k_l)_l v_l[d] for one (batch, head); k_l at k + l * ks, v_l at v + l * vs
template <typename T>
void attend_head(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t L, int64_t D,
                 float* s, float* out) {
  float best = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    const T* kl = k + l * ks;
    vec a = vzero();
    int64_t d = 0;
    for (; d + W <= D; d += W) a = vfma(vload(q + d), vload(kl + d), a);
    float t = vsum(a);
    for (; d < D; ++d) t += q[d] * scalar(kl[d]);
    s[l] = t;
    best = t > best ? t : best;
  }
  vec total = vzero();
  int64_t l = 0;
  for (; l + W <= L; l += W) {
    vec e = vexp(vadd(vload(s + l), vset(-best)));
    vstore(s + l, e);
    total = vadd(total, e);
  }
  float sum = vsum(total);
  for (; l < L; ++l) { s[l] = std::exp(s[l] - best); sum += s[l]; }
  const float inv = 1.f / sum;
  constexpr int R = 8;  // accumulators of R vectors of out at a time
  for (int64_t d0 = 0; d0 < D; d0 += R * W) {
    const int nv = (int)std::min<int64_t>(R, (D - d0) / W);
    vec acc[R];
    for (int i = 0; i < R; ++i) acc[i] = vzero();
    for (int64_t j = 0; j < L; ++j) {
      const vec p = vset(s[j]);
      const T* vl = v + j * vs + d0;
      for (int i = 0; i < nv; ++i) acc[i] = vfma(p, vload(vl + i * W), acc[i]);
    }
    for (int i = 0; i < nv; ++i) vstore(out + d0 + i * W, vmul(acc[i], vset(inv)));
    if (nv < R) {  // a scalar tail of D (D not a multiple of W)
      for (int64_t d = d0 + (int64_t)nv * W; d < std::min<int64_t>(D, d0 + R * W); ++d) {
        float t = 0.f;
        for (int64_t j = 0; j < L; ++j) t += s[j] * scalar(v[j * vs + d]);
        out[d] = t * inv;
      }
      break;
    }
  }
}

// every (row, head) of q (B, H, D) fp32 already scaled: out (B, H, D) fp32; head (b, h)'s keys at
// k + (b * kb + h * kh) elements, key l at l * kl from there (values likewise with v's strides)
template <typename T>
void attend_heads(const float* q, const T* k, const T* v, const int64_t* ks, const int64_t* vs, int64_t B, int64_t H,
                  int64_t L, int64_t D, float* out) {
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(L + W);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      attend_head(q + i * D, k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1], ks[2], vs[2], L, D, s.data(),
                  out + i * D);
    }
  });
}

// q (B, H, 1, D); k, v (B, H, L, D) with unit stride over D -> (B, H, 1, D) in q's dtype
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "varkit attend_one: q (B, H, 1, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "varkit attend_one: k, v (B, H, L, D) matching q");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type() && !k.is_cuda(),
              "varkit attend_one: CPU keys/values with unit stride over D");
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16, "varkit attend_one: fp32 or bf16");
  const int64_t B = q.size(0), H = q.size(1), L = k.size(2), D = q.size(3);
  auto qf = (q.to(torch::kFloat32) * scale).contiguous();
  auto out = torch::empty({B, H, 1, D}, qf.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (k.scalar_type() == torch::kBFloat16)
    attend_heads(qf.data_ptr<float>(), bf16_ptr(k), bf16_ptr(v), ks, vs, B, H, L, D, out.data_ptr<float>());
  else
    attend_heads(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), ks, vs, B, H, L, D, out.data_ptr<float>());
  return out.to(q.scalar_type());
}

// ---- a front of n new tokens a row: rotary, cache write and attention in one pass per (row, head) -------------
// qkv (B, n, 3 H hd) in the model dtype T (fp32 or bf16), the fused projection's output; cos, sin (n, hd / 2) fp32
// rotary tables of the n positions (interleaved pairs, as varkit.nn.rope.apply_rope); kc, vc (B, H, max_len, hd)
// this layer's cache, written at [pos, pos + n); every query attends to every key in [0, pos + n) (no mask: a front
// sees itself and everything before it). Rotated q and k are rounded to T, as the module path rounds them.
// Keys sit in the W lanes of a vector: per (row, head) the keys are transposed once (16 x 16 blocks on AVX-512; bf16
// keys as k pairs for AVX-512-BF16's dot product, else fp32), so a query's scores against W keys are a sum over d
// of its broadcast d-th element times a row of the transposed keys; the softmax runs along each query's scores; the
// values' weighted sums have the head's dimensions in lanes (values widened to fp32 once). No horizontal sums in
// the products, and each query costs its own work only (queries in lanes paid for 16 whatever the front: 2-4x more
// at NAR's 2-8 token fronts). Returns (B, n, H hd) in T.

#if defined(__AVX512F__)
// r[0..15] (16 rows of 16 fp32 or 32-bit values) transposed in place
inline void transpose_lanes(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  const auto hi = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  for (int i = 0; i < 4; ++i) {  // r[4i + k]: in 128-bit lane j, rows 4i..4i+3 at column 4j + k
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
    r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xdd);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// r[0..7] (8 rows of 8 fp32) transposed in place
inline void transpose_lanes(__m256* r) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 2; ++i) {  // rows 4i..4i+3 of each lane's columns 0-3
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(s[k], s[4 + k], 0x20);
    r[4 + k] = _mm256_permute2f128_ps(s[k], s[4 + k], 0x31);
  }
}
#endif

// the L keys (rows ks apart) transposed into kt [KR][Lp]: PAIRS (bf16 keys, KR = hd / 2): each entry the 32-bit pair
// (k[2r], k[2r + 1]); else (KR = hd): k[r] widened to fp32. Lanes [L, Lp) are zero.
template <bool PAIRS, typename T>
void transpose_keys(const T* k, int64_t ks, int64_t L, int64_t Lp, int64_t KR, float* kt) {
  const auto entry = [&](int64_t l, int64_t r) -> float {
    if constexpr (PAIRS) {
      float f;
      std::memcpy(&f, reinterpret_cast<const uint32_t*>(k + l * ks) + r, 4);
      return f;
    } else {
      return scalar(k[l * ks + r]);
    }
  };
  int64_t l0 = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // W x W blocks (element-wise, the strided reads cost ~0.4 ms a NAR-B layer at 240 keys on a Zen 3 core)
  for (; l0 + W <= L; l0 += W) {
    int64_t r0 = 0;
    for (; r0 + W <= KR; r0 += W) {
      vec rows[W];
      for (int i = 0; i < W; ++i) {
        const T* src = k + (l0 + i) * ks;
        if constexpr (PAIRS) rows[i] = vload(reinterpret_cast<const float*>(reinterpret_cast<const uint32_t*>(src) + r0));
        else rows[i] = vload(src + r0);
      }
      transpose_lanes(rows);
      for (int i = 0; i < W; ++i) vstore(kt + (r0 + i) * Lp + l0, rows[i]);
    }
    for (; r0 < KR; ++r0)
      for (int64_t l = l0; l < l0 + W; ++l) kt[r0 * Lp + l] = entry(l, r0);
  }
#endif
  for (int64_t r = 0; r < KR; ++r) {
    for (int64_t l = l0; l < L; ++l) kt[r * Lp + l] = entry(l, r);
    for (int64_t l = L; l < Lp; ++l) kt[r * Lp + l] = 0.f;
  }
}

// scores sc[i][l] (rows Lp apart) of queries [i0, i0 + QG) against the keys of one block of W lanes at l0: a sum over
// the KR rows of kt of the query's broadcast entry times the row (PAIRS: bf16 pairs through the dot product)
template <bool PAIRS, int QG>
__attribute__((noinline)) void front_scores(const float* qs, int64_t KR, const float* kt, int64_t Lp, int64_t l0, float* sc) {
  vec a[QG];
  for (int i = 0; i < QG; ++i) a[i] = vzero();
  for (int64_t r = 0; r < KR; ++r) {
#if defined(__AVX512BF16__)
    if constexpr (PAIRS) {
      const __m512bh kv = (__m512bh)_mm512_castps_si512(_mm512_loadu_ps(kt + r * Lp + l0));
#pragma GCC unroll 16
      for (int i = 0; i < QG; ++i) {
        int32_t pair;
        std::memcpy(&pair, qs + i * KR + r, 4);
        a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32(pair), kv);
      }
      continue;
    }
#endif
    if constexpr (!PAIRS) {
      const vec kv = vload(kt + r * Lp + l0);
#pragma GCC unroll 16
      for (int i = 0; i < QG; ++i) a[i] = vfma(vset(qs[i * KR + r]), kv, a[i]);
    }
  }
  for (int i = 0; i < QG; ++i) vstore(sc + i * Lp + l0, a[i]);
}

// f(std::integral_constant<int, n>) for a run-time n in 1..N: a kernel templated on its group size, called for the
// group at hand (the attention's query groups)
template <int N, typename F>
void with_count(int n, F&& f) {
  if (n == N) f(std::integral_constant<int, N>{});
  else if constexpr (N > 1) with_count<N - 1>(n, f);
}

// o[i][d] = sum_l p[i][l] v[l][d] for QP queries (p rows Lp apart), v fp32 [L][DV W]: the head's dimensions in the
// lanes of DV vectors, one broadcast weight per (query, key)
template <int DV, int QP>
__attribute__((noinline)) void front_values(const float* p, int64_t Lp, const float* vf, int64_t L, float* o) {
  vec a[QP][DV];
  for (int i = 0; i < QP; ++i)
    for (int d = 0; d < DV; ++d) a[i][d] = vzero();
  for (int64_t l = 0; l < L; ++l) {
    vec v[DV];
    for (int d = 0; d < DV; ++d) v[d] = vload(vf + (l * DV + d) * W);
#pragma GCC unroll 16
    for (int i = 0; i < QP; ++i) {
      const vec w = vset(p[i * Lp + l]);
      for (int d = 0; d < DV; ++d) a[i][d] = vfma(w, v[d], a[i][d]);
    }
  }
  for (int i = 0; i < QP; ++i)
    for (int d = 0; d < DV; ++d) vstore(o + (i * DV + d) * W, a[i][d]);
}

// accumulators the value sums may hold in registers: 24 of AVX-512's 32, 12 of AVX2's 16
constexpr int VALUE_REGS = W >= 16 ? 24 : 12;

// values(qp, i0) over n queries in groups of as many as the registers hold at DV vectors a value row (qp a
// compile-time count, i0 the group's first query)
template <int DV, typename F>
void value_groups(int64_t n, F&& values) {
  constexpr int QP = VALUE_REGS / DV > 0 ? VALUE_REGS / DV : 1;
  for (int64_t i0 = 0; i0 < n; i0 += QP)
    with_count<QP>((int)std::min<int64_t>(QP, n - i0), [&](auto qp) { values(qp, i0); });
}

template <int DV>
void values_rows(int64_t n, const float* p, int64_t Lp, const float* vf, int64_t L, float* o) {
  value_groups<DV>(n, [&](auto qp, int64_t i0) { front_values<DV, decltype(qp)::value>(p + i0 * Lp, Lp, vf, L, o + i0 * DV * W); });
}

// any DV (wide heads on narrow vectors): the same sums, one query and one vector at a time
void values_any(int64_t n, int64_t DV, const float* p, int64_t Lp, const float* vf, int64_t L, float* o) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < DV; ++d) {
      vec a = vzero();
      for (int64_t l = 0; l < L; ++l) a = vfma(vset(p[i * Lp + l]), vload(vf + (l * DV + d) * W), a);
      vstore(o + (i * DV + d) * W, a);
    }
}

#if defined(__AVX512BF16__)
// the value sums with bf16 weights (as SDPA's bf16 CPU kernel rounds them before its second product): per pair of
// keys m, the weights (p[2m], p[2m + 1]) of a query broadcast against DV vectors of the values' pairs
// vp [ceil(L/2)][DV][16][2] (v[2m][d], v[2m + 1][d]) through the dot product; pb rows of bf16 weights, Lh2 pairs apart
template <int DV, int QP>
__attribute__((noinline)) void front_values_pairs(const uint32_t* pb, int64_t Lh2, const uint16_t* vp, int64_t Lh, float* o) {
  __m512 a[QP][DV];
  for (int i = 0; i < QP; ++i)
    for (int d = 0; d < DV; ++d) a[i][d] = _mm512_setzero_ps();
  for (int64_t m = 0; m < Lh; ++m) {
    __m512bh v[DV];
    for (int d = 0; d < DV; ++d) v[d] = (__m512bh)_mm512_loadu_si512(vp + (m * DV + d) * 32);
#pragma GCC unroll 16
    for (int i = 0; i < QP; ++i) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pb[i * Lh2 + m]);
      for (int d = 0; d < DV; ++d) a[i][d] = _mm512_dpbf16_ps(a[i][d], w, v[d]);
    }
  }
  for (int i = 0; i < QP; ++i)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o + (i * DV + d) * 16, a[i][d]);
}

template <int DV>
void values_pairs_rows(int64_t n, const uint32_t* pb, int64_t Lh2, const uint16_t* vp, int64_t Lh, float* o) {
  value_groups<DV>(n, [&](auto qp, int64_t i0) {
    front_values_pairs<DV, decltype(qp)::value>(pb + i0 * Lh2, Lh2, vp, Lh, o + i0 * DV * 16);
  });
}

// values of keys 2m and 2m + 1 (rows vs apart; the second absent when 2m + 1 = L: zeros) interleaved into the pair
// layout, DV chunks of 16 dimensions (zero past hd)
inline void pair_values(const uint16_t* vc, int64_t vs, int64_t L, int64_t hd, int64_t DV, uint16_t* vp) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t m = 0; 2 * m < L; ++m) {
    const uint16_t* a = vc + 2 * m * vs;
    const uint16_t* b = 2 * m + 1 < L ? a + vs : nullptr;
    uint16_t* dst = vp + m * DV * 32;
    int64_t d = 0;
    for (; d + 16 <= hd; d += 16) {
      const __m512i va = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(a + d)));
      const __m512i vb = b ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b + d))) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(va, idx, vb));
    }
    for (; d < DV * 16; ++d) {
      dst[2 * d] = d < hd ? a[d] : 0;
      dst[2 * d + 1] = d < hd && b ? b[d] : 0;
    }
  }
}
#endif

// src (n values, fp32 or bf16) into fp32 dst
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t d = 0;
  for (; d + W <= n; d += W) vstore(dst + d, vload(src + d));
  for (; d < n; ++d) dst[d] = scalar(src[d]);
}

template <typename T>
void front_head(const T* qkv, int64_t n, int64_t H, int64_t hd, int64_t h, const float* cos, const float* sin,
                T* kc, T* vc, int64_t ks, int64_t vs, int64_t pos, float scale, T* out, std::vector<float>& buf) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  constexpr bool PAIRS = bf16 && PANEL_PAIRS;  // bf16 scores through the dot product
  const int64_t D = H * hd, L = pos + n, half = hd / 2;
  const int64_t Lp = (L + W - 1) / W * W;     // keys padded to whole vectors
  // the values' products on bf16 pairs too where a value row fits 8 vectors (vectors of a row: 1-4 or 8, zero-padded)
  const bool VP = PAIRS && hd <= 8 * W;
  const int64_t DV = VP && hd > 4 * W ? 8 : (hd + W - 1) / W;  // vectors of one value row (zero-padded)
  const int64_t KR = PAIRS ? half : hd;       // rows of the transposed keys (k pairs, or dimensions)
  const int64_t Lh = (L + 1) / 2;            // pairs of keys (PAIRS: the values' products take key pairs)
  const size_t need = KR * Lp + L * DV * W + n * KR + n * Lp + n * DV * W + (VP ? n * Lh : 0);
  if (buf.size() < need) buf.resize(need);
  float* kt = buf.data();      // keys transposed, [KR][Lp]
  float* vf = kt + KR * Lp;    // values: fp32 [L][DV W]; VP: bf16 key pairs [Lh][DV W][2] (fewer bytes)
  float* qs = vf + L * DV * W; // queries rotated and rounded to T, [n][KR] (PAIRS: bf16 pairs in 32 bits)
  float* sc = qs + n * KR;     // scores, then weights, [n][Lp]
  float* o = sc + n * Lp;      // value sums, [n][DV W]
  float* pw = o + n * DV * W;  // VP: the weights in bf16, [n][Lh] key pairs
  for (int64_t i = 0; i < n; ++i) {  // rotate q and k; write k and v at pos + i
    const T* src = qkv + i * 3 * D + h * hd;
    T* kd = kc + (pos + i) * ks;
    T* vd = vc + (pos + i) * vs;
    for (int64_t j = 0; j < half; ++j) {
      const float* cs = cos + i * half + j;
      const float* sn = sin + i * half + j;
      float x, y;
      rotate(scalar(src[D + 2 * j]), scalar(src[D + 2 * j + 1]), *cs, *sn, x, y);
      store(kd + 2 * j, x);
      store(kd + 2 * j + 1, y);
      rotate(scalar(src[2 * j]), scalar(src[2 * j + 1]), *cs, *sn, x, y);
      if constexpr (PAIRS) {
        const uint32_t pair = (uint32_t)c10::BFloat16(x).x | ((uint32_t)c10::BFloat16(y).x << 16);
        std::memcpy(qs + i * KR + j, &pair, 4);
      } else {
        qs[i * KR + 2 * j] = round_as(x, bf16);
        qs[i * KR + 2 * j + 1] = round_as(y, bf16);
      }
    }
    for (int64_t d = 0; d < hd; ++d) vd[d] = src[2 * D + d];
  }
  transpose_keys<PAIRS>(kc, ks, L, Lp, KR, kt);
#if defined(__AVX512BF16__)
  if (VP) pair_values(reinterpret_cast<const uint16_t*>(vc), vs, L, hd, DV, reinterpret_cast<uint16_t*>(vf));
  else
#endif
  for (int64_t l = 0; l < L; ++l) {
    float* row = vf + l * DV * W;
    widen(vc + l * vs, row, hd);
    std::fill(row + hd, row + DV * W, 0.f);
  }
  constexpr int QG = W >= 16 ? 16 : 8;  // queries a score tile holds in registers
  for (int64_t l0 = 0; l0 < Lp; l0 += W)
    for (int64_t i0 = 0; i0 < n; i0 += QG)
      with_count<QG>((int)std::min<int64_t>(QG, n - i0),
                     [&](auto qg) { front_scores<PAIRS, decltype(qg)::value>(qs + i0 * KR, KR, kt, Lp, l0, sc + i0 * Lp); });
  const vec sv = vset(scale);
  std::vector<float> inv(n);
  for (int64_t i = 0; i < n; ++i) {  // weights exp(scale * (s - max)), scale > 0, and their sum
    float* s = sc + i * Lp;
    float best = -INFINITY;
    int64_t l = 0;
    vec m = vset(-INFINITY);
    for (; l + W <= L; l += W) m = vmax(m, vload(s + l));
    best = vhmax(m);
    for (; l < L; ++l) best = std::max(best, s[l]);
    const vec shift = vset(-scale * best);
    vec total = vzero();
    for (l = 0; l + W <= L; l += W) {
      const vec e = vexp(vfma(vload(s + l), sv, shift));
      vstore(s + l, e);
      total = vadd(total, e);
    }
    float t = vsum(total);
    for (; l < L; ++l) {
      float e[W];
      vstore(e, vexp(vfma(vset(s[l]), sv, shift)));  // a broadcast's lane: the same exp as the vector loop
      s[l] = e[0];
      t += e[0];
    }
    inv[i] = 1.f / t;
    if (VP) {  // the weights rounded to bf16 (the sum above is of the unrounded ones), a zero pad
      uint16_t* row = reinterpret_cast<uint16_t*>(pw + i * Lh);
      for (l = 0; l < L; ++l) row[l] = c10::BFloat16(s[l]).x;
      if (L % 2) row[L] = 0;
    }
  }
#if defined(__AVX512BF16__)
  if (VP) {
    const auto* pb = reinterpret_cast<const uint32_t*>(pw);
    const auto* vp = reinterpret_cast<const uint16_t*>(vf);
    switch (DV) {
      case 1: values_pairs_rows<1>(n, pb, Lh, vp, Lh, o); break;
      case 2: values_pairs_rows<2>(n, pb, Lh, vp, Lh, o); break;
      case 3: values_pairs_rows<3>(n, pb, Lh, vp, Lh, o); break;
      case 4: values_pairs_rows<4>(n, pb, Lh, vp, Lh, o); break;
      default: values_pairs_rows<8>(n, pb, Lh, vp, Lh, o);  // DV = 8 (VP: hd <= 8 W)
    }
  } else
#endif
  switch (DV) {
    case 1: values_rows<1>(n, sc, Lp, vf, L, o); break;
    case 2: values_rows<2>(n, sc, Lp, vf, L, o); break;
    case 3: values_rows<3>(n, sc, Lp, vf, L, o); break;
    case 4: values_rows<4>(n, sc, Lp, vf, L, o); break;
    case 8: values_rows<8>(n, sc, Lp, vf, L, o); break;
    default: values_any(n, DV, sc, Lp, vf, L, o);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < hd; ++d) store(out + i * D + h * hd + d, o[i * DV * W + d] * inv[i]);
}

torch::Tensor front_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                              int64_t pos, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && kc.dim() == 4 && vc.dim() == 4 && kc.sizes() == vc.sizes() && !qkv.is_cuda() && !kc.is_cuda(),
              "varkit front_attention: qkv (B, n, 3 H hd), caches (B, H, max_len, hd) on the CPU");
  const int64_t B = qkv.size(0), n = qkv.size(1), H = kc.size(1), hd = kc.size(3), D = H * hd;
  TORCH_CHECK(kc.size(0) == B && qkv.size(2) == 3 * D && hd % 2 == 0 && pos >= 0 && pos + n <= kc.size(2),
              "varkit front_attention: qkv (", B, ", n, ", 3 * D, ") and room for ", n, " positions after ", pos);
  TORCH_CHECK(qkv.scalar_type() == kc.scalar_type() && kc.scalar_type() == vc.scalar_type()
              && (kc.scalar_type() == torch::kFloat32 || kc.scalar_type() == torch::kBFloat16),
              "varkit front_attention: qkv and caches of one dtype, fp32 or bf16");
  TORCH_CHECK(kc.stride(3) == 1 && vc.stride(3) == 1, "varkit front_attention: caches with unit stride over hd");
  auto c = cos.to(torch::kFloat32).contiguous(), sn = sin.to(torch::kFloat32).contiguous();
  TORCH_CHECK(c.numel() == n * hd / 2 && sn.numel() == n * hd / 2, "varkit front_attention: cos, sin (n, hd / 2)");
  auto x = qkv.contiguous();
  auto out = torch::empty({B, n, D}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const int64_t es = x.element_size();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      char* kp = static_cast<char*>(kc.data_ptr()) + (b * kc.stride(0) + h * kc.stride(1)) * es;
      char* vp = static_cast<char*>(vc.data_ptr()) + (b * vc.stride(0) + h * vc.stride(1)) * es;
      if (bf16)
        front_head<uint16_t>(bf16_ptr(x) + b * n * 3 * D, n, H, hd, h, c.data_ptr<float>(), sn.data_ptr<float>(),
                             reinterpret_cast<uint16_t*>(kp), reinterpret_cast<uint16_t*>(vp), kc.stride(2), vc.stride(2), pos,
                             (float)scale, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + b * n * D, buf);
      else
        front_head<float>(x.data_ptr<float>() + b * n * 3 * D, n, H, hd, h, c.data_ptr<float>(), sn.data_ptr<float>(),
                          reinterpret_cast<float*>(kp), reinterpret_cast<float*>(vp), kc.stride(2), vc.stride(2), pos,
                          (float)scale, out.data_ptr<float>() + b * n * D, buf);
    }
  });
  return out;
}

// ---- SwiGLU's gate at inference: a = round(round(silu(a)) * b) in place (torch's silu_ then mul_, one pass) -----
template <typename T>
void silu_mul_rows(T* a, const T* b, int64_t n) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  int64_t i = 0;
  if constexpr (!bf16) {
    for (; i + W <= n; i += W) {
      const vec v = vload(a + i);
      vstore(a + i, vmul(vsilu(v), vload(b + i)));
    }
  }
#if defined(__AVX512BF16__)
  if constexpr (bf16) {
    for (; i + 16 <= n; i += 16) {
      const __m512 s = vsilu(vload(a + i));
      const __m512 sr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s)), 16));
      _mm256_storeu_si256((__m256i*)(a + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sr, vload(b + i))));
    }
  }
#endif
  for (; i < n; ++i) {
    store(a + i, round_as(silu(scalar(a[i])), bf16) * scalar(b[i]));
  }
}

void silu_mul_inplace(torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous()
              && !a.is_cuda() && !b.is_cuda() && (a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kBFloat16),
              "varkit silu_mul_: two contiguous CPU tensors of one shape, fp32 or bf16");
  const int64_t n = a.numel();
  const bool bf16 = a.scalar_type() == torch::kBFloat16;
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    if (bf16) silu_mul_rows(reinterpret_cast<uint16_t*>(a.data_ptr()) + i0, bf16_ptr(b) + i0, i1 - i0);
    else silu_mul_rows(a.data_ptr<float>() + i0, b.data_ptr<float>() + i0, i1 - i0);
  });
}

// ---- RMS norm: (x * rsqrt(mean(x^2) + eps)) rounded to x's dtype, times the gain (as varkit.nn.RMSNorm) ----------
template <typename T>
void rms_rows(const T* x, const T* g, T* y, int64_t R, int64_t D, float eps) {
  for (int64_t i = 0; i < R; ++i) {
    const T* xr = x + i * D;
    T* yr = y + i * D;
    vec a = vzero();
    int64_t d = 0;
    for (; d + W <= D; d += W) { vec v = vload(xr + d); a = vfma(v, v, a); }
    float ss = vsum(a);
    for (; d < D; ++d) ss += scalar(xr[d]) * scalar(xr[d]);
    const float r = 1.f / std::sqrt(ss / (float)D + eps);
    for (d = 0; d < D; ++d) {
      if constexpr (std::is_same<T, float>::value) {
        yr[d] = (xr[d] * r) * g[d];
      } else {  // bf16: the normalized value rounded to bf16, then the product with the gain rounded again
        const float t = (float)c10::BFloat16(scalar(xr[d]) * r);
        yr[d] = c10::BFloat16(t * scalar(g[d])).x;
      }
    }
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor g, double eps) {
  TORCH_CHECK(!x.is_cuda() && x.scalar_type() == g.scalar_type() && g.dim() == 1 && x.size(-1) == g.size(0),
              "varkit rms_norm: CPU rows (..., D) and a gain (D) of the same dtype");
  auto xc = x.contiguous();
  auto gc = g.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t D = xc.size(-1), R = D ? xc.numel() / D : 0;
  if (xc.scalar_type() == torch::kFloat32) {
    rms_rows(xc.data_ptr<float>(), gc.data_ptr<float>(), y.data_ptr<float>(), R, D, (float)eps);
  } else {
    TORCH_CHECK(xc.scalar_type() == torch::kBFloat16, "varkit rms_norm: fp32 or bf16");
    rms_rows(bf16_ptr(xc), bf16_ptr(gc), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), R, D, (float)eps);
  }
  return y;
}

// ---- a whole LLaMA decode layer (varkit.models.raster.TransformerBlock) for one token a row -------------------

// x (R, D) in the model dtype (fp32 or bf16); weights in gemv_blocked's layout; kc, vc this layer's cache
// (R, H, max_len, hd), written at `pos`; cos, sin (hd / 2) fp32 rotary tables of the position. Every value is
// rounded to the model dtype where varkit's module path rounds it (each linear's output, the rotated q and k, the
// attention output, silu, the gated product, each residual sum), so bf16 agrees with it up to fp32 sum order.
template <typename T>
void split_qkv(const float* qkv, T* q, T* kc, T* vc, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
               int64_t R, int64_t H, int64_t hd, int64_t pos, const float* c, const float* s, bool bf16) {
  const int64_t D = H * hd;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      const float* src[3] = {qkv + r * 3 * D + h * hd, qkv + r * 3 * D + D + h * hd, qkv + r * 3 * D + 2 * D + h * hd};
      T* dst[3] = {q + (r * H + h) * hd,
                   kc + r * k_cache.stride(0) + h * k_cache.stride(1) + pos * k_cache.stride(2),
                   vc + r * v_cache.stride(0) + h * v_cache.stride(1) + pos * v_cache.stride(2)};
      for (int part = 0; part < 2; ++part) {  // q and k: interleaved pairs rotated by the position's angles
        for (int64_t i = 0; i < hd / 2; ++i) {
          const float a = round_as(src[part][2 * i], bf16), b = round_as(src[part][2 * i + 1], bf16);
          float x, y;
          rotate(a, b, c[i], s[i], x, y);
          store(dst[part] + 2 * i, x);
          store(dst[part] + 2 * i + 1, y);
        }
      }
      for (int64_t d = 0; d < hd; ++d) store(dst[2] + d, src[2][d]);
    }
  }
}

// out = x + round(y) rounded (a residual sum in the model dtype)
template <typename T>
void residual(const T* x, const float* y, T* out, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; ++i) store(out + i, scalar(x[i]) + round_as(y[i], bf16));
}

// g = round(round(silu(round(a))) * round(b)), silu(v) = v / (1 + exp(-v))
template <typename T>
void silu_gate(float* a, const float* b, T* g, int64_t n, bool bf16) {
  if (bf16) for (int64_t i = 0; i < n; ++i) a[i] = round_as(a[i], true);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(a + i, vsilu(vload(a + i)));
  for (; i < n; ++i) a[i] = silu(a[i]);
  for (i = 0; i < n; ++i) store(g + i, round_as(a[i], bf16) * round_as(b[i], bf16));
}

template <typename T>
T* data_as(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// y (M, N) fp32 = x (M, K) w^T with w in gemv_blocked's layout of (N, K) and x contiguous in w's dtype T: gemv_blocked's
// kernels and order of sums (bf16 rows go through fp32 where the build has no AVX-512-BF16, as gemv_blocked's x.to())
template <typename T>
void blocked_product(const T* x, int64_t M, int64_t K, const torch::Tensor& w, int64_t N, float* y, float* xf) {
  const int64_t count = (N + NR - 1) / NR;
  TORCH_CHECK(w.is_contiguous() && K % (CHUNK / (int64_t)sizeof(T)) == 0 && w.numel() == count * NR * K
              && w.element_size() == (int64_t)sizeof(T), "varkit decode_layers: a weight of ", w.numel(),
              " elements is not the blocked layout of (", N, ", ", K, ") in the rows' dtype");
  if constexpr (std::is_same<T, float>::value) {
    by_rows<Blocked<float>::F>(M, count, 64, x, w.data_ptr<float>(), y, N, K);
  } else {
#if defined(__AVX512BF16__)
    by_rows<BlockedDp>(M, count, 64, x, bf16_ptr(w), y, N, K);
#else
    for (int64_t i = 0; i < M * K; ++i) xf[i] = scalar(x[i]);
    by_rows<Blocked<uint16_t>::F>(M, count, 64, (const float*)xf, bf16_ptr(w), y, N, K);
#endif
  }
}

// y (M, N) fp32 = x (M, K) w^T over w's panel layout (gemm_panels' kernel and order of sums), x contiguous in T
template <typename T>
void panel_rows_product(const T* x, int64_t M, int64_t K, const torch::Tensor& wp, int64_t N, float* y) {
  const auto dt = std::is_same<T, float>::value ? torch::kFloat32 : torch::kBFloat16;
  const auto xt = torch::from_blob(const_cast<T*>(x), {M, K}, torch::TensorOptions().dtype(dt));
  auto yt = torch::from_blob(y, {M, N}, torch::TensorOptions().dtype(torch::kFloat32));
  const torch::Tensor none;
  check_panel_args(xt, wp, N, none, torch::kFloat32);
  panels_into(xt, N, {{wp, yt, none, none}});
}

// one layer's weights: the two RMSNorm gains and the five linears in the blocked layout (or the panel layout)
struct LayerWeights {
  const torch::Tensor *g_attn, *g_ffn, *wqkv, *wo, *w1, *w3, *w2;
};

// the scratch of one layer call, in floats and in the model dtype T, sized for R rows once per stack
template <typename T>
struct LayerScratch {
  torch::Tensor fbuf, tbuf;
  float *qkv, *qf, *att_f, *o, *a, *b, *d, *xf;
  T *h, *q, *att, *x1, *h2, *g;
  LayerScratch(int64_t R, int64_t D, int64_t hidden, const torch::TensorOptions& opts) {
    const int64_t nf[8] = {R * 3 * D, R * D, R * D, R * D, R * hidden, R * hidden, R * D, R * std::max(D, hidden)};
    const int64_t nt[6] = {R * D, R * D, R * D, R * D, R * D, R * hidden};
    int64_t tf = 0, tt = 0;
    for (int64_t n : nf) tf += n;
    for (int64_t n : nt) tt += n;
    fbuf = torch::empty({tf}, opts.dtype(torch::kFloat32));
    tbuf = torch::empty({tt}, opts);
    float* pf = fbuf.data_ptr<float>();
    float** fs[8] = {&qkv, &qf, &att_f, &o, &a, &b, &d, &xf};
    for (int i = 0; i < 8; ++i) { *fs[i] = pf; pf += nf[i]; }
    T* pt = data_as<T>(tbuf);
    T** ts[6] = {&h, &q, &att, &x1, &h2, &g};
    for (int i = 0; i < 6; ++i) { *ts[i] = pt; pt += nt[i]; }
  }
};

// out (R, D) = the layer on x (R, D), both in T, the cache written at `pos` (see decode_layers)
template <typename T>
void llama_layer_rows(const T* x, T* out, const LayerWeights& lw, float eps, int64_t hidden, const torch::Tensor& kc,
                      const torch::Tensor& vc, int64_t pos, const float* c, const float* s, int64_t R, int64_t D,
                      LayerScratch<T>& ws, bool panels) {
  constexpr bool bf16 = !std::is_same<T, float>::value;
  const int64_t H = kc.size(1), hd = kc.size(3);
  const auto product = [&](const T* in, int64_t K, const torch::Tensor& w, int64_t N, float* y) {
    if (panels) panel_rows_product(in, R, K, w, N, y);
    else blocked_product(in, R, K, w, N, y, ws.xf);
  };
  rms_rows(x, data_as<T>(*lw.g_attn), ws.h, R, D, eps);
  product(ws.h, D, *lw.wqkv, 3 * D, ws.qkv);
  split_qkv<T>(ws.qkv, ws.q, data_as<T>(kc), data_as<T>(vc), kc, vc, R, H, hd, pos, c, s, bf16);
  // attend_one's steps: q in fp32 times the scale (a float, as torch's mul by a double), heads in fp32, rounded to T
  const float scale = (float)(1.0 / std::sqrt((double)hd));
  for (int64_t i = 0; i < R * D; ++i) ws.qf[i] = scalar(ws.q[i]) * scale;
  const int64_t ks[3] = {kc.stride(0), kc.stride(1), kc.stride(2)}, vs[3] = {vc.stride(0), vc.stride(1), vc.stride(2)};
  attend_heads(ws.qf, (const T*)data_as<T>(kc), (const T*)data_as<T>(vc), ks, vs, R, H, pos + 1, hd, ws.att_f);
  for (int64_t i = 0; i < R * D; ++i) store(ws.att + i, ws.att_f[i]);
  product(ws.att, D, *lw.wo, D, ws.o);
  residual<T>(x, ws.o, ws.x1, R * D, bf16);
  rms_rows(ws.x1, data_as<T>(*lw.g_ffn), ws.h2, R, D, eps);
  product(ws.h2, D, *lw.w1, hidden, ws.a);
  product(ws.h2, D, *lw.w3, hidden, ws.b);
  silu_gate<T>(ws.a, ws.b, ws.g, R * hidden, bf16);
  product(ws.g, hidden, *lw.w2, D, ws.d);
  residual<T>(ws.x1, ws.d, out, R * D, bf16);
}

// x (R, D) in the model dtype (fp32 or bf16); weights: per layer its attention and FFN gains and wqkv, wo, w1, w3, w2
// in gemv_blocked's layout (1-4 rows) or, with `panels`, in the panel layout gemm_panels takes (any rows), 7 a layer;
// kc, vc: per layer its cache (R, H, max_len, D / H), written at `pos`; cos, sin (hd / 2) fp32 rotary tables of the
// position. The layers one after another in one call, with no tensor made between them (but the panel kernel's
// packed rows): every value is rounded to the model dtype where varkit's module path rounds it (each linear's
// output, the rotated q and k, the attention output, silu, the gated product, each residual sum), so bf16 agrees
// with it up to fp32 sum order (and bit for bit with panels, the module path's own kernel at those rows).
torch::Tensor decode_stack(torch::Tensor x, const std::vector<torch::Tensor>& weights, double eps, int64_t hidden,
                           const std::vector<torch::Tensor>& kcs, const std::vector<torch::Tensor>& vcs, int64_t pos,
                           torch::Tensor cos, torch::Tensor sin, bool panels) {
  const int64_t n = (int64_t)kcs.size();
  TORCH_CHECK(n >= 1 && (int64_t)vcs.size() == n && (int64_t)weights.size() == 7 * n,
              "varkit decode_layers: 7 weights and a key and value cache a layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && !x.is_cuda()
              && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "varkit decode_layers: x (R, D) contiguous fp32 or bf16 CPU rows");
  const int64_t R = x.size(0), D = x.size(1);
  TORCH_CHECK(R >= 1 && (panels || R <= 4), "varkit decode_layers: 1-4 rows over blocked weights, got ", R);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous()
              && sin.is_contiguous() && sin.numel() == cos.numel(), "varkit decode_layers: fp32 rotary tables");
  for (int64_t l = 0; l < n; ++l) {
    const auto &kc = kcs[l], &vc = vcs[l];
    TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) == R && kc.size(1) * kc.size(3) == D
                && kc.stride(3) == 1 && vc.stride(3) == 1 && kc.scalar_type() == x.scalar_type()
                && vc.scalar_type() == x.scalar_type() && !kc.is_cuda() && !vc.is_cuda() && 0 <= pos && pos < kc.size(2)
                && cos.numel() == kc.size(3) / 2 && kc.size(3) % 2 == 0,
                "varkit decode_layers: caches (R, H, max_len, D / H) of x's dtype with a position inside them, "
                "rotary tables of D / H / 2");
    for (int i = 0; i < 2; ++i) {
      const auto& g = weights[7 * l + i];
      TORCH_CHECK(g.dim() == 1 && g.numel() == D && g.is_contiguous() && g.scalar_type() == x.scalar_type(),
                  "varkit decode_layers: RMSNorm gains (D) of x's dtype");
    }
    for (int i = 2; i < 7; ++i)
      TORCH_CHECK(!weights[7 * l + i].is_cuda() && weights[7 * l + i].scalar_type() == x.scalar_type(),
                  "varkit decode_layers: CPU weights of x's dtype");
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    LayerScratch<T> ws(R, D, hidden, x.options());
    auto out = torch::empty_like(x);
    auto tmp = n > 1 ? torch::empty_like(x) : out;
    const T* src = data_as<T>(x);
    for (int64_t l = 0; l < n; ++l) {
      // ping-pong so that the last layer writes `out`
      T* dst = data_as<T>(((n - 1 - l) % 2 == 0) ? out : tmp);
      const LayerWeights lw{&weights[7 * l], &weights[7 * l + 1], &weights[7 * l + 2], &weights[7 * l + 3],
                            &weights[7 * l + 4], &weights[7 * l + 5], &weights[7 * l + 6]};
      llama_layer_rows<T>(src, dst, lw, (float)eps, hidden, kcs[l], vcs[l], pos, cos.data_ptr<float>(),
                          sin.data_ptr<float>(), R, D, ws, panels);
      src = dst;
    }
    return out;
  };
  if (x.scalar_type() == torch::kFloat32) return run(float{});
  return run(uint16_t{});
}


// ---- a whole LLaMA block for a front of n >= 2 new tokens a row (NAR's one-front steps) -------------------------
// x (B, n, D) contiguous in the model dtype (fp32 or bf16); the five weights in the panel layout (pairs where
// panel_pairs()), without biases; kc, vc this layer's cache (B, H, max_len, hd), written at pos .. pos + n - 1;
// cos, sin (n, hd / 2). The module path's ops (RMSNorm, the linears, attend_front, silu_mul_, the residual sums) in
// one call, with the same roundings; x for w1 and w3 packed once. Returns a new (B, n, D) tensor.
torch::Tensor llama_front_layer(torch::Tensor x, torch::Tensor g_attn, torch::Tensor g_ffn, double eps,
                                torch::Tensor wqkv, torch::Tensor wo, torch::Tensor w1, torch::Tensor w3, torch::Tensor w2,
                                int64_t hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                                int64_t pos, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && !x.is_cuda()
              && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "varkit front_layer: x (B, n, D) contiguous on the CPU, fp32 or bf16");
  const int64_t B = x.size(0), n = x.size(1), D = x.size(2), R = B * n;
  const auto dt = x.scalar_type();
  const torch::Tensor none;
  auto x2 = x.view({R, D});
  for (const torch::Tensor* w : {&wqkv, &wo, &w1, &w3, &w2}) check_panel_args(x2, *w, 1, none, dt);
  auto a = rms_norm(x2, g_attn, eps);
  auto qkv = torch::empty({R, 3 * D}, x.options());
  panels_into(a, 3 * D, {{wqkv, qkv, none, none}});
  auto att = front_attention(qkv.view({B, n, 3 * D}), cos, sin, kc, vc, pos, scale);
  auto h = torch::empty({R, D}, x.options());
  panels_into(att.view({R, D}), D, {{wo, h, none, x2}});  // h = x + wo(att)
  auto b = rms_norm(h, g_ffn, eps);
  auto g = torch::empty({R, hidden}, x.options()), u = torch::empty({R, hidden}, x.options());
  panels_into(b, hidden, {{w1, g, none, none}, {w3, u, none, none}});
  silu_mul_inplace(g, u);
  panels_into(g, D, {{w2, h, none, h}});  // h += w2(g), in place
  return h.view({B, n, D});
}

// ---- top-k: the k largest of each row, sorted descending (ties: the lower index first) --------------------------
// torch.topk on a CPU spends ~200 us a row of a 16384-word vocabulary (a selection by comparisons). Here: a
// threshold from an evenly strided sample of the row that at least k words reach (almost always: the sample's rank
// has a margin of three standard deviations; where fewer reach it, every word is a candidate), one vectorized pass
// that collects the candidates' indices, and a stable radix sort of the candidates. Exact whatever the sample:
// the sample only decides how many candidates the sort sees. Comparisons are on integer keys in float order, NaN
// above +inf (as torch.topk), -0 below +0.
inline int32_t signed_key(float f) {  // signed int order = float order (negative floats: all bits but the sign flipped)
  int32_t b;
  std::memcpy(&b, &f, 4);
  return b ^ ((b >> 31) & 0x7fffffff);
}

// the kept words as (~key << 32 | index), key unsigned in float order: ascending order = largest first, ties in
// index order
inline uint64_t item(int32_t key, uint32_t i) { return ((uint64_t)~((uint32_t)key ^ 0x80000000u) << 32) | i; }

void sort_items(std::vector<uint64_t>& items, std::vector<uint64_t>& tmp) {
  if (items.size() < 256) {
    std::sort(items.begin(), items.end());
    return;
  }
  // three stable passes over the key half, least significant digit (11 + 11 + 10 bits) first: the candidates come
  // in index order, so equal keys keep it
  constexpr int SHIFT[3] = {32, 43, 54};
  constexpr uint64_t MASK[3] = {0x7ff, 0x7ff, 0x3ff};
  tmp.resize(items.size());
  std::vector<uint32_t> count(3 * 2048, 0);  // the three digits' counts in one pass
  for (const uint64_t it : items)
    for (int pass = 0; pass < 3; ++pass) ++count[pass * 2048 + ((it >> SHIFT[pass]) & MASK[pass])];
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* c = count.data() + pass * 2048;
    uint32_t at = 0;
    for (int b = 0; b < 2048; ++b) { const uint32_t n = c[b]; c[b] = at; at += n; }
    for (const uint64_t it : items) tmp[c[(it >> SHIFT[pass]) & MASK[pass]]++] = it;
    items.swap(tmp);
  }
}

// indices of the words of x[0:V) whose key is >= thr, in order, into idx (room for V + 16); returns how many
int64_t collect_at_least(const float* x, int64_t V, int32_t thr, uint32_t* idx) {
  int64_t n = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i lower = _mm512_set1_epi32(0x7fffffff), t = _mm512_set1_epi32(thr);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= V; i += 16) {
    const __m512i b = _mm512_loadu_si512(x + i);
    const __m512i key = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), lower));
    const __mmask16 m = _mm512_cmpge_epi32_mask(key, t);
    // compress in a register, then a full store (a compressing store to memory is slow on AMD Zen 4)
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(_mm512_set1_epi32((int)i), iota)));
    n += __builtin_popcount((unsigned)m);
  }
#elif defined(__AVX2__)
  if (thr != INT32_MIN) {  // key >= thr  <=>  key > thr - 1
    const __m256i lower = _mm256_set1_epi32(0x7fffffff), t = _mm256_set1_epi32(thr - 1);
    for (; i + 8 <= V; i += 8) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(x + i));
      const __m256i key = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), lower));
      unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, t)));
      for (; m; m &= m - 1) idx[n++] = (uint32_t)(i + __builtin_ctz(m));
    }
  }
#endif
  for (; i < V; ++i) {  // no branch: every index is written, the count advances where it belongs
    idx[n] = (uint32_t)i;
    n += signed_key(x[i]) >= thr;
  }
  return n;
}

struct TopkScratch { std::vector<int32_t> sample; std::vector<uint32_t> idx; std::vector<uint64_t> items, tmp; };

void topk_row(const float* x, int64_t V, int64_t k, float* vals, int64_t* ids, TopkScratch& t) {
  // the threshold: the r-th largest of S evenly strided words, r = k S / V plus three standard deviations of a
  // binomial count and 8 (a sample rank that at least k words of the row reach unless the row's order is adversarial)
  const int64_t stride = std::max<int64_t>(1, V / 1024), S = (V + stride - 1) / stride;
  int32_t thr = INT32_MIN;
  if (stride > 1 && 2 * k < V) {
    const double expect = (double)k * S / V;
    const int64_t r = std::min<int64_t>(S, (int64_t)std::ceil(expect + 3.0 * std::sqrt(expect) + 8.0));
    t.sample.resize(S);
    for (int64_t j = 0; j < S; ++j) t.sample[j] = signed_key(x[j * stride]);
    std::nth_element(t.sample.begin(), t.sample.begin() + (r - 1), t.sample.end(), std::greater<int32_t>());
    thr = t.sample[r - 1];
  }
  t.idx.resize(V + 16);
  int64_t n = collect_at_least(x, V, thr, t.idx.data());
  if (n < k) n = collect_at_least(x, V, INT32_MIN, t.idx.data());  // too few reached the sample's threshold
  t.items.resize(n);
  for (int64_t j = 0; j < n; ++j) t.items[j] = item(signed_key(x[t.idx[j]]), t.idx[j]);
  sort_items(t.items, t.tmp);
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t i = (uint32_t)t.items[j];
    ids[j] = i;
    vals[j] = x[i];
  }
}

// (values, indices) of the k largest of each row of x (..., V), fp32, sorted descending
std::vector<torch::Tensor> topk_sorted(torch::Tensor x, int64_t k) {
  TORCH_CHECK(!x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.dim() >= 1 && 0 < k && k <= x.size(-1),
              "varkit topk: fp32 CPU rows (..., V) and 0 < k <= V");
  auto xc = x.contiguous();
  const int64_t V = xc.size(-1), R = xc.numel() / V;
  auto shape = xc.sizes().vec();
  shape.back() = k;
  auto vals = torch::empty(shape, xc.options());
  auto ids = torch::empty(shape, xc.options().dtype(torch::kInt64));
  const float* xp = xc.data_ptr<float>();
  float* vp = vals.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    TopkScratch scratch;
    for (int64_t r = r0; r < r1; ++r) topk_row(xp + r * V, V, k, vp + r * k, ip + r * k, scratch);
  });
  return {vals, ids};
}

// ---- GroupNorm, optionally followed by SiLU, over contiguous (B, C, *) fp32 --------------------------------------
// One (b, group) at a time: its cg * HW values are contiguous (1.3 MB at VAR's 256 px level: L2-resident), so the mean
// pass reads DRAM and the variance and output passes read L2; torch's CPU path (GroupNorm, then an in-place SiLU)
// reads and writes the whole map twice more. Statistics as torch's: biased variance, two passes (no E[x^2] - mean^2
// cancellation), fp32 partial sums over 1024 values added in double.
double chunked_sum(const float* x, int64_t n, float shift, bool squares) {
  double total = 0.0;
  const vec sh = vset(shift);
  for (int64_t c0 = 0; c0 < n; c0 += 1024) {
    const int64_t c1 = std::min<int64_t>(n, c0 + 1024);
    vec a0 = vzero(), a1 = vzero();
    int64_t i = c0;
    for (; i + 2 * W <= c1; i += 2 * W) {
      vec d0 = vadd(vload(x + i), sh), d1 = vadd(vload(x + i + W), sh);
      a0 = squares ? vfma(d0, d0, a0) : vadd(a0, d0);
      a1 = squares ? vfma(d1, d1, a1) : vadd(a1, d1);
    }
    float t = vsum(vadd(a0, a1));
    for (; i < c1; ++i) { const float d = x[i] + shift; t += squares ? d * d : d; }
    total += t;
  }
  return total;
}

// act: SiLU after the norm
torch::Tensor group_norm_act(const torch::Tensor& x, const torch::Tensor& gamma, const torch::Tensor& beta, int64_t G,
                             double eps, bool act) {
  TORCH_CHECK(x.dim() >= 2 && !x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && G > 0
              && x.size(1) % G == 0 && gamma.scalar_type() == torch::kFloat32 && beta.scalar_type() == torch::kFloat32
              && gamma.is_contiguous() && beta.is_contiguous() && gamma.numel() == x.size(1) && beta.numel() == x.size(1),
              "varkit group_norm_act: contiguous fp32 (B, C, ...) CPU input with C divisible by the groups, fp32 "
              "weight and bias of C values");
  const int64_t B = x.size(0), C = x.size(1), cg = C / G, HW = C > 0 && B > 0 ? x.numel() / (B * C) : 0;
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = gamma.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / G, g = i % G, n = cg * HW;
      const float* xs = xp + (b * C + g * cg) * HW;
      float* ys = yp + (b * C + g * cg) * HW;
      if (n == 0) continue;
      const float mean = (float)(chunked_sum(xs, n, 0.f, false) / n);
      const double var = chunked_sum(xs, n, -mean, true) / n;
      const float rstd = (float)(1.0 / std::sqrt(var + eps));
      for (int64_t c = 0; c < cg; ++c) {
        const float scale = gp[g * cg + c] * rstd, shift = bp[g * cg + c] - mean * scale;
        const float* xc = xs + c * HW;
        float* yc = ys + c * HW;
        const vec vs = vset(scale), vb = vset(shift);
        int64_t j = 0;
        for (; j + W <= HW; j += W) {
          vec v = vfma(vload(xc + j), vs, vb);
          if (act) v = vsilu(v);
          vstore(yc + j, v);
        }
        for (; j < HW; ++j) {
          float v = xc[j] * scale + shift;
          yc[j] = act ? silu(v) : v;
        }
      }
    }
  });
  return y;
}

// ---- Winograd F(4x4, 3x3): the transforms around a batched GEMM (varkit/nn/winograd.py says why) ------------------
// A 3x3, stride-1, padding-1 convolution's output in 4x4 tiles: V = B^T d B over each 6x6 input tile (d), one GEMM per
// of the 36 positions (V[k] (tiles, Cin) @ U[k] (Cin, Cout), U = G g G^T made once in float64), Y = A^T M A. The
// transforms take and give plain NCHW maps: a tile row's 6 input rows are first copied channel-innermost into a
// buffer that stays in L2, so that every transform runs over vectors of channels.
template <typename T> inline void winograd_bt(const T* d, T* t, int64_t ds, int64_t ts) {
  const T d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds], d4 = d[4 * ds], d5 = d[5 * ds];
  t[0] = d0 * 4.f - d2 * 5.f + d4;
  t[ts] = d3 + d4 - (d1 + d2) * 4.f;
  t[2 * ts] = (d1 - d2) * 4.f - d3 + d4;
  t[3 * ts] = (d3 - d1) * 2.f - d2 + d4;
  t[4 * ts] = (d1 - d3) * 2.f - d2 + d4;
  t[5 * ts] = d1 * 4.f - d3 * 5.f + d5;
}

template <typename T> inline void winograd_at(const T* m, T* y, int64_t ms, int64_t ys) {
  const T a = m[ms] + m[2 * ms], b = m[ms] - m[2 * ms], c = m[3 * ms] + m[4 * ms], e = m[3 * ms] - m[4 * ms];
  y[0] = m[0] + a + c;
  y[ys] = b + e * 2.f;
  y[2 * ys] = a + c * 4.f;
  y[3 * ys] = b + e * 8.f + m[5 * ms];
}

// dst[j * ds + i] = src[i * ss + j] for i < ni, j < nj, in 16 x 16 blocks (each block's lines stay in L1); the blocks
// of the far-strided side (a map's channel rows, a page or more apart) outermost: 16 streams at a time, not hundreds
inline void transpose_block(const float* src, int64_t ss, float* dst, int64_t ds, int64_t i0, int64_t i1, int64_t j0,
                            int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t i = i0; i < i1; ++i) dst[j * ds + i] = src[i * ss + j];
}
inline void transpose_blocks(const float* src, int64_t ss, float* dst, int64_t ds, int64_t ni, int64_t nj) {
  if (ss >= ds) {
    for (int64_t i0 = 0; i0 < ni; i0 += 16)
      for (int64_t j0 = 0; j0 < nj; j0 += 16)
        transpose_block(src, ss, dst, ds, i0, std::min(ni, i0 + 16), j0, std::min(nj, j0 + 16));
  } else {
    for (int64_t j0 = 0; j0 < nj; j0 += 16)
      for (int64_t i0 = 0; i0 < ni; i0 += 16)
        transpose_block(src, ss, dst, ds, i0, std::min(ni, i0 + 16), j0, std::min(nj, j0 + 16));
  }
}

template <typename T> inline T winograd_load(const float* p) {
  if constexpr (std::is_same<T, float>::value) return *p; else return vload(p);
}
template <typename T> inline void winograd_store(float* p, T v) {
  if constexpr (std::is_same<T, float>::value) *p = v; else vstore(p, v);
}

// one 6x6 tile of channels [c, c + lanes) from six channel-innermost rows -> its 36 transformed values
template <typename T> inline void winograd_tile_in(const float* const* rows, int64_t C, int64_t col, int64_t c,
                                                   float* V, int64_t stride_k) {
  T d[36], t[36], v[36];
  for (int s = 0; s < 6; ++s)
    for (int q = 0; q < 6; ++q) d[s * 6 + q] = winograd_load<T>(rows[s] + (col + q) * C + c);
  for (int q = 0; q < 6; ++q) winograd_bt(d + q, t + q, 6, 6);
  for (int s = 0; s < 6; ++s) winograd_bt(t + s * 6, v + s * 6, 1, 1);
  for (int k = 0; k < 36; ++k) winograd_store<T>(V + k * stride_k, v[k]);
}

// one tile's 36 products of channels [c, c + lanes) -> its 4x4 outputs plus the bias, channel-innermost rows
template <typename T> inline void winograd_tile_out(const float* M, int64_t stride_k, const float* bias, float* buf,
                                                    int64_t Q, int64_t C, int64_t col, int64_t c) {
  T m[36], s[24], o[16];
  for (int k = 0; k < 36; ++k) m[k] = winograd_load<T>(M + k * stride_k);
  for (int b = 0; b < 6; ++b) winograd_at(m + b, s + b, 6, 6);
  for (int y = 0; y < 4; ++y) winograd_at(s + y * 6, o + y * 4, 1, 1);
  const T bc = winograd_load<T>(bias + c);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 4; ++x) winograd_store<T>(buf + ((int64_t)y * Q + col + x) * C + c, o[y * 4 + x] + bc);
}

// U (36, Cin, Cout) = G g G^T of every 3x3 filter of w (Cout, Cin, 3, 3), in double and rounded once to fp32
torch::Tensor winograd_filter_transform(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && !w.is_cuda() && w.scalar_type() == torch::kFloat32
              && w.is_contiguous(), "varkit winograd_filters: contiguous fp32 (Cout, Cin, 3, 3) CPU filters");
  const int64_t O = w.size(0), I = w.size(1);
  auto U = torch::empty({36, I, O}, w.options());
  const float* wp = w.data_ptr<float>();
  float* up = U.data_ptr<float>();
  static const double G[6][3] = {{1. / 4, 0, 0}, {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                                 {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  at::parallel_for(0, I, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t o = 0; o < O; ++o) {
        const float* g = wp + (o * I + i) * 9;
        double t[6][3];
        for (int a = 0; a < 6; ++a)
          for (int c = 0; c < 3; ++c) t[a][c] = G[a][0] * g[c] + G[a][1] * g[3 + c] + G[a][2] * g[6 + c];
        for (int a = 0; a < 6; ++a)
          for (int b = 0; b < 6; ++b)
            up[((a * 6 + b) * I + i) * O + o] = (float)(t[a][0] * G[b][0] + t[a][1] * G[b][1] + t[a][2] * G[b][2]);
      }
  });
  return U;
}

// V (36, tiles, C) for the tile rows [r0, r1) of x (B, C, H, W); tile row r is image r / th, rows 4 (r % th) - 1 ...
// Each thread keeps six input rows channel-innermost (zero-padded by a column each side) and moves down by four.
torch::Tensor winograd_input_tiles(const torch::Tensor& x, int64_t r0, int64_t r1) {
  TORCH_CHECK(x.dim() == 4 && !x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "varkit winograd_input: a contiguous fp32 (B, C, H, W) CPU map");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3), th = (H + 3) / 4, tw = (Wd + 3) / 4;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= B * th, "varkit winograd_input: tile rows out of range");
  const int64_t P = (r1 - r0) * tw, Q = 4 * tw + 2;
  auto V = torch::empty({36, P, C}, x.options());
  const float* xp = x.data_ptr<float>();
  float* vp = V.data_ptr<float>();
  at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t e) {
    std::vector<float> ring(6 * Q * C);
    float* rows[6];
    int64_t have = -1;  // the tile row whose input rows the ring holds
    auto fill = [&](float* row, int64_t b, int64_t ih) {
      if (ih < 0 || ih >= H) { std::fill(row, row + Q * C, 0.f); return; }
      std::fill(row, row + C, 0.f);  // column -1
      std::fill(row + (Wd + 1) * C, row + Q * C, 0.f);  // columns W ...
      transpose_blocks(xp + (b * C * H + ih) * Wd, H * Wd, row + C, C, C, Wd);
    };
    for (int64_t r = a; r < e; ++r) {
      const int64_t b = r / th, i = r % th;
      if (have == r - 1 && i > 0) {  // the next tile row down: its rows 0-1 are the last one's 4-5
        float* free_rows[4] = {rows[0], rows[1], rows[2], rows[3]};
        rows[0] = rows[4], rows[1] = rows[5];
        for (int s = 2; s < 6; ++s) { fill(free_rows[s - 2], b, 4 * i - 1 + s); rows[s] = free_rows[s - 2]; }
      } else {
        for (int s = 0; s < 6; ++s) { float* row = ring.data() + s * Q * C; fill(row, b, 4 * i - 1 + s); rows[s] = row; }
      }
      have = r;
      for (int64_t j = 0; j < tw; ++j) {
        float* dst = vp + ((r - r0) * tw + j) * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) winograd_tile_in<vec>(rows, C, 4 * j, c, dst + c, P * C);
        for (; c < C; ++c) winograd_tile_in<float>(rows, C, 4 * j, c, dst + c, P * C);
      }
    }
  });
  return V;
}

// y (B, C, H, W) rows of the tile rows [r0, r1) from M (36, tiles, C), plus the bias
void winograd_output_tiles(const torch::Tensor& M, const torch::Tensor& bias, torch::Tensor& y, int64_t r0, int64_t r1) {
  TORCH_CHECK(y.dim() == 4 && !y.is_cuda() && y.scalar_type() == torch::kFloat32 && y.is_contiguous()
              && M.scalar_type() == torch::kFloat32 && M.is_contiguous() && M.dim() == 3 && M.size(0) == 36
              && M.size(2) == y.size(1) && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous()
              && bias.numel() == y.size(1), "varkit winograd_output: contiguous fp32 tiles (36, P, C), bias (C), map");
  const int64_t B = y.size(0), C = y.size(1), H = y.size(2), Wd = y.size(3), th = (H + 3) / 4, tw = (Wd + 3) / 4;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= B * th && M.size(1) == (r1 - r0) * tw,
              "varkit winograd_output: tile rows do not match the tiles");
  const int64_t P = M.size(1), Q = 4 * tw;
  const float* mp = M.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t e) {
    std::vector<float> buf(4 * Q * C);
    for (int64_t r = a; r < e; ++r) {
      const int64_t b = r / th, i = r % th;
      for (int64_t j = 0; j < tw; ++j) {
        const float* src = mp + ((r - r0) * tw + j) * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) winograd_tile_out<vec>(src + c, P * C, bp, buf.data(), Q, C, 4 * j, c);
        for (; c < C; ++c) winograd_tile_out<float>(src + c, P * C, bp, buf.data(), Q, C, 4 * j, c);
      }
      for (int64_t yy = 0; yy < 4 && 4 * i + yy < H; ++yy)
        transpose_blocks(buf.data() + yy * Q * C, C, yp + (b * C * H + 4 * i + yy) * Wd, H * Wd, Wd, C);
    }
  });
}
}  // namespace

torch::Tensor gemv(torch::Tensor x, torch::Tensor w) { return product(x, w, w.size(0), false); }
torch::Tensor gemv_blocked(torch::Tensor x, torch::Tensor wb, int64_t N) { return product(x, wb, N, true); }
torch::Tensor gemm_panels(torch::Tensor x, torch::Tensor wp, int64_t N) {
  return panel_product(x, wp, N, torch::Tensor(), torch::kFloat32);
}
// F.linear(x, w, bias) over w's panel layout: x's dtype out, sum and bias rounded once
torch::Tensor linear_panels(torch::Tensor x, torch::Tensor wp, int64_t N, std::optional<torch::Tensor> bias) {
  return panel_product(x, wp, N, bias.has_value() ? *bias : torch::Tensor(), x.scalar_type());
}
int64_t panel_width() { return NB; }
bool panel_pairs() { return PANEL_PAIRS; }
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) { return attend_one(q, k, v, scale); }
torch::Tensor rms_norm_rows(torch::Tensor x, torch::Tensor g, double eps) { return rms_norm(x, g, eps); }
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> weights, double eps, int64_t hidden,
                            std::vector<torch::Tensor> kcs, std::vector<torch::Tensor> vcs, int64_t pos, torch::Tensor cos,
                            torch::Tensor sin, bool panels) {
  return decode_stack(x, weights, eps, hidden, kcs, vcs, pos, cos, sin, panels);
}
std::vector<torch::Tensor> topk(torch::Tensor x, int64_t k) { return topk_sorted(x, k); }
void silu_mul_(torch::Tensor a, torch::Tensor b) { silu_mul_inplace(a, b); }
torch::Tensor attend_front(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                           int64_t pos, double scale) {
  return front_attention(qkv, cos, sin, kc, vc, pos, scale);
}
// llama_front_layer over one or several blocks one after another (a block, or the blocks of a step, without Python
// between them): weights 7 a layer (its two gains, its five panel copies), kc, vc a layer
torch::Tensor front_layers(torch::Tensor x, std::vector<torch::Tensor> weights, double eps, int64_t hidden,
                           torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> kcs,
                           std::vector<torch::Tensor> vcs, int64_t pos, double scale) {
  const size_t n = kcs.size();
  TORCH_CHECK(n >= 1 && vcs.size() == n && weights.size() == 7 * n,
              "varkit front_layers: 7 weights and a key and value cache a layer");
  for (size_t l = 0; l < n; ++l)
    x = llama_front_layer(x, weights[7 * l], weights[7 * l + 1], eps, weights[7 * l + 2], weights[7 * l + 3],
                          weights[7 * l + 4], weights[7 * l + 5], weights[7 * l + 6], hidden, cos, sin, kcs[l], vcs[l],
                          pos, scale);
  return x;
}
torch::Tensor group_norm_silu(torch::Tensor x, torch::Tensor gamma, torch::Tensor beta, int64_t groups, double eps,
                              bool silu) {
  return group_norm_act(x, gamma, beta, groups, eps, silu);
}
torch::Tensor winograd_filters(torch::Tensor w) { return winograd_filter_transform(w); }
torch::Tensor winograd_input(torch::Tensor x, int64_t r0, int64_t r1) { return winograd_input_tiles(x, r0, r1); }
void winograd_output(torch::Tensor m, torch::Tensor bias, torch::Tensor y, int64_t r0, int64_t r1) {
  winograd_output_tiles(m, bias, y, r0, r1);
}
"""

#: the caching allocator's C++ (:mod:`varkit.nn.cpu_allocator` says why), built into the same extension
ALLOCATOR_SOURCE = r"""
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace varkit_alloc {
constexpr size_t MIN_CACHED = 1u << 20;
constexpr size_t HUGE_BYTES = 2u << 20;

// size classes: multiples of 256 KiB below 4 MiB, of 2 MiB from there (a request reuses a block of its class)
size_t size_class(size_t n) {
  const size_t g = n >= (4u << 20) ? HUGE_BYTES : (256u << 10);
  return (n + g - 1) / g * g;
}

struct Cache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // class -> free blocks of it
  std::unordered_map<void*, size_t> owned;                      // every block of ours, in use or free -> class
  size_t cached = 0, cap = 0;
  int64_t hits = 0, misses = 0, released = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors freed at exit still find it
  return *c;
}

c10::DeleterFnPtr base_deleter = nullptr;  // the allocator we replaced: its blocks come back through ours

void release(void* p) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.owned.find(p);
    if (it == c.owned.end()) {  // a small block of the base allocator (raw_deallocate comes here too)
      if (base_deleter != nullptr) base_deleter(p);
      return;
    }
    const size_t s = it->second;
    if (c.cached + s <= c.cap) {
      c.free_blocks[s].push_back(p);
      c.cached += s;
      return;
    }
    c.owned.erase(it);
    c.released++;
  }
  std::free(p);
}

// frees every cached block; the caller holds the lock
void drop_all(Cache& c) {
  for (auto& kv : c.free_blocks)
    for (void* p : kv.second) { c.owned.erase(p); std::free(p); }
  c.free_blocks.clear();
  c.cached = 0;
}

struct CachingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;

  c10::DataPtr allocate(size_t n) override {
    if (n < MIN_CACHED) return base->allocate(n);
    const size_t s = size_class(n);
    Cache& c = cache();
    {
      std::lock_guard<std::mutex> g(c.mu);
      auto it = c.free_blocks.find(s);
      if (it != c.free_blocks.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        c.cached -= s;
        c.hits++;
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
      }
      c.misses++;
    }
    const size_t align = s >= HUGE_BYTES ? HUGE_BYTES : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, s) != 0) {
      { std::lock_guard<std::mutex> g(c.mu); drop_all(c); }
      TORCH_CHECK(posix_memalign(&p, align, s) == 0, "varkit's CPU allocator: out of memory (", s, " bytes)");
    }
#ifdef MADV_HUGEPAGE
    if (align == HUGE_BYTES) madvise(p, s, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
    { std::lock_guard<std::mutex> g(c.mu); c.owned[p] = s; }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingAllocator* instance = nullptr;

// a fork while another thread holds the lock would leave it held in the child: hold it across fork
void lock_for_fork() { cache().mu.lock(); }
void unlock_after_fork() { cache().mu.unlock(); }
}  // namespace varkit_alloc

using namespace varkit_alloc;

bool allocator_install(int64_t cap) {
  Cache& c = cache();
  { std::lock_guard<std::mutex> g(c.mu); c.cap = (size_t)std::max<int64_t>(cap, 0); if (c.cached > c.cap) drop_all(c); }
  if (instance != nullptr) return false;
  instance = new CachingAllocator();
  instance->base = c10::GetCPUAllocator();
  base_deleter = instance->base->raw_deleter();
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
  c10::SetCPUAllocator(instance, /*priority=*/1);
  return true;
}

bool allocator_installed() { return instance != nullptr && c10::GetCPUAllocator() == instance; }

void allocator_empty_cache() { Cache& c = cache(); std::lock_guard<std::mutex> g(c.mu); drop_all(c); }

std::vector<int64_t> allocator_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  int64_t blocks = 0;
  for (auto& kv : c.free_blocks) blocks += (int64_t)kv.second.size();
  return {(int64_t)c.cached, blocks, (int64_t)c.owned.size(), c.hits, c.misses, c.released, (int64_t)c.cap};
}
"""


#: GCC flags besides ``-march``
CFLAGS = ["-O3"]
#: flags of the threaded build, tried first: without ``-fopenmp`` ``at::parallel_for`` in the extension runs on one
#: thread whatever ``torch.set_num_threads`` says (torch's own libgomp serves it at run time); a compiler without
#: OpenMP gets the one-thread build instead
OPENMP_FLAGS = ["-fopenmp"]


#: the extension's functions
FUNCTIONS = ("gemv", "gemv_blocked", "gemm_panels", "linear_panels", "panel_width", "panel_pairs", "attend", "attend_front", "silu_mul_", "rms_norm_rows", "decode_layers", "front_layers", "topk",
             "group_norm_silu", "winograd_filters", "winograd_input", "winograd_output",
             "allocator_install", "allocator_installed", "allocator_empty_cache", "allocator_stats")


def fused_decode_enabled() -> bool:
    """Whether eligible decode layers run in one ``decode_layers`` call (``VARKIT_FUSED_DECODE=0``: the module path,
    for benches and checks)."""
    return os.environ.get("VARKIT_FUSED_DECODE", "1") != "0"


def _build_name(march: str = "native", flags: tuple[str, ...] = ()) -> str:
    """One build per source, flags, torch version, ``-march`` and CPU (``-march=native`` binaries are the CPU's own)."""
    from ..device import cpu_info

    info = cpu_info()
    key = "|".join([SOURCE, ALLOCATOR_SOURCE, *CFLAGS, *flags, torch.__version__, march, info.get("model", ""), ",".join(info.get("flags", []))])
    return "varkit_cpu_kernels_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _built(cpp_extension: Any, name: str) -> bool:
    """Whether torch's extension cache already holds this build (then loading it takes a moment)."""
    try:
        from pathlib import Path

        return any(Path(cpp_extension._get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # a private helper of torch's: if it moves, the message is merely shown again
        return False


def cpu_kernels() -> Any | None:
    """The built extension (:data:`FUNCTIONS`), or None where it cannot be built here (said
    once, as a warning)."""
    return build_kernels("native")


def _import_cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, without the warning it logs on import on a machine without CUDA ("No CUDA
    runtime is found, using CUDA_HOME=..."), which says nothing about these CPU kernels."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


@functools.cache
def build_kernels(march: str = "native") -> Any | None:
    """The extension built with ``-march=<march>``: ``native`` for use; the tests also build ``x86-64-v3`` (AVX2 + FMA)
    and ``x86-64`` (plain loops) to check the code paths other CPUs compile."""
    try:
        cpp_extension = _import_cpp_extension()
    except Exception as exc:  # pragma: no cover - torch without its extension tools
        warnings.warn(f"varkit: the CPU decode kernels cannot be built here ({exc}); decoding uses torch's kernels",
                      stacklevel=2)
        return None
    failure = None
    for flags in (OPENMP_FLAGS, []):
        try:
            name = _build_name(march, tuple(flags))
            if not _built(cpp_extension, name):
                print(f"varkit: building the CPU decode kernels for this CPU (once, ~40 s; cached as {name})",
                      file=sys.stderr, flush=True)
            return cpp_extension.load_inline(name, cpp_sources=[SOURCE + ALLOCATOR_SOURCE], functions=list(FUNCTIONS),
                                             extra_cflags=[*CFLAGS, *flags, f"-march={march}"], extra_ldflags=flags,
                                             verbose=False)
        except Exception as exc:  # no compiler, no ninja, no OpenMP, a read-only cache: try without, then give up
            failure = exc
    warnings.warn(f"varkit: the CPU decode kernels could not be built ({type(failure).__name__}: "
                  f"{str(failure).splitlines()[0] if str(failure) else ''}); decoding uses torch's kernels", stacklevel=2)
    return None
