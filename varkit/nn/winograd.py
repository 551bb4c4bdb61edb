"""3x3 convolutions as Winograd F(4x4, 3x3) on a CPU: 4x fewer multiplications for the LDM decoders' feature maps.

Why: the VQ/KL decoders spend most of their time in 3x3, stride-1 convolutions at the full resolution (VAR's VQVAE:
~350 GFLOP an image, 2.3 s on one Xeon core, with oneDNN at ~0.92 of the fp32 GEMM rate: there is nothing left to win
in the direct product). Winograd's minimal filtering computes each 4x4 output tile from a 6x6 input tile with 36
multiplications per channel pair instead of 144: the input tiles are transformed (V = Bᵀ d B), multiplied position
by position with the transformed filters (U = G g Gᵀ, made once in float64) in 36 GEMMs (tiles x Cin) @ (Cin x Cout),
and transformed back (Y = Aᵀ M A). The transforms are the extension's C++ (``winograd_input``/``winograd_output``
over NCHW maps), the GEMMs ``torch.bmm``; the tiles are taken a few tile rows at a time so that V and M stay in cache.

Accuracy: the transforms' entries (up to 5 in Bᵀ, 8 in Aᵀ) amplify rounding: outputs are within ~1e-5 of the
direct product relative to their scale, not equal to it (tests/test_winograd.py bounds the error by first-order
floating-point analysis against float64). That is far below what a decoder's 8-bit image shows (1/255), so
pipelines turn it on (:func:`varkit.nn.ldm.use_fast_kernels`) and models built directly keep torch's convolution,
equal to the official code.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .cpu_kernels import cpu_kernels

__all__ = ["G", "BT", "AT", "MIN_CHANNELS", "MIN_PIXELS", "transform_weight", "conv3x3", "eligible", "flops"]

#: F(4x4, 3x3) with interpolation points 0, ±1, ±2 (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks")
BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
      (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

#: narrower convolutions keep torch's: the transforms cost ~(Cin + Cout) a tile, the GEMMs save ~Cin * Cout
MIN_CHANNELS = 32

#: smaller maps keep torch's: the transformed filters take 4x the filters' memory (59 MB a conv at VAR's 640-channel
#: 16 px level) for ~10 ms saved a conv there
MIN_PIXELS = 32 * 32

#: bytes of transformed tiles (V, then M) per chunk of tile rows: L2-sized, so that the GEMMs read V from cache
CHUNK_BYTES = 2 << 20


def transform_weight(weight: Tensor, kernels: Any = None) -> Tensor:
    """(Cout, Cin, 3, 3) filters -> (36, Cin, Cout) fp32 ``U = G g Gᵀ``, in float64 and rounded once: the extension's
    loop (55 ms at 512 channels, 3 ms at 128; torch's float64 einsum took 0.6 s, and the first image paid it for
    every conv), torch's ops where the extension cannot be built."""
    kernels = kernels or cpu_kernels()
    if kernels is not None:
        return kernels.winograd_filters(weight.detach().to(torch.float32).contiguous())
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ar,oirs,bs->abio", g, weight.detach().to(torch.float64), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def eligible(conv: torch.nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv(x)`` can run here: 3x3, stride 1, padding 1, no dilation or groups, at least
    :data:`MIN_CHANNELS` in and out, a map of at least :data:`MIN_PIXELS`, fp32 on the CPU (any layout: a
    channels-last one is copied), no autograd, and the extension built."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS and x.shape[-2] * x.shape[-1] >= MIN_PIXELS
            and x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and x.dim() == 4 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and cpu_kernels() is not None)


def flops(conv: torch.nn.Conv2d, out: Tensor) -> float:
    """The multiply-adds (x2) of ``conv``'s output ``out`` (B, Cout, H, W) as F(4x4, 3x3) computes it: 36 products a
    4x4 tile (tiles rounded up at the edges) and channel pair, where the direct product takes 144 (the benches'
    floors count this for the convolutions :func:`eligible` takes)."""
    b, _, h, w = out.shape
    return 2.0 * b * math.ceil(h / 4) * math.ceil(w / 4) * 36 * conv.in_channels * conv.out_channels


def conv3x3(x: Tensor, u: Tensor, bias: Tensor | None, kernels: Any = None) -> Tensor:
    """``conv2d(x, w, bias, padding=1)`` for ``u = transform_weight(w)``: fp32 NCHW in, contiguous NCHW out
    (``kernels``: another build of the extension, for the tests of other CPUs' code paths)."""
    kernels = kernels or cpu_kernels()
    x = x.contiguous()
    b, cin, h, w = x.shape
    cout = u.shape[2]
    th, tw = (h + 3) // 4, (w + 3) // 4
    y = torch.empty(b, cout, h, w, dtype=x.dtype)
    bias = bias.detach().contiguous() if bias is not None else torch.zeros(cout, dtype=x.dtype)
    # chunks of at least the filters' own size: each chunk's GEMMs read all of U, and U of 640 channels is 59 MB
    rows = max(1, max(CHUNK_BYTES, u.numel() * 4) // (36 * tw * max(cin, cout) * 4))
    for r0 in range(0, b * th, rows):
        r1 = min(b * th, r0 + rows)
        v = kernels.winograd_input(x, r0, r1)
        kernels.winograd_output(torch.bmm(v, u), bias, y, r0, r1)
    return y
