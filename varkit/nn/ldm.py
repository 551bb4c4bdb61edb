"""The LDM-layout convolutional autoencoder (encoder, decoder and their blocks), with diffusers' names.

varkit's three tokenizers (LlamaGen's VQ, VAR's multi-scale VQ, MAR's KL-16) share the autoencoder of
latent diffusion (Rombach et al. 2022): ResNet blocks with GroupNorm, stride-2 convs down, nearest 2x +
conv up, one-head spatial self-attention at the lowest level and in the middle. diffusers hosts it as
``Encoder``/``Decoder`` (``diffusers.models.autoencoders.vae``); importing those pulls in most of diffusers
(its UNet blocks, transformers, ``torch._dynamo``, scipy): ~3 s of start-up for a few hundred lines.

This file is that autoencoder, for the configurations diffusers' ``VQModel`` / ``AutoencoderKL`` build
(group norm, ``DownEncoderBlock2D``/``AttnDownEncoderBlock2D``, ``UpDecoderBlock2D``/``AttnUpDecoderBlock2D``,
attention head width = block width), with exactly diffusers' module tree and parameter names, so every
saved varkit folder, diffusers ``AutoencoderKL`` file and converter keeps loading 1:1, and the same
operations in the same order, so outputs equal diffusers' for the same weights (tests/test_ldm.py).

Without autograd a ResNet block applies SiLU and its residual add in place (fewer full-resolution
passes in the decoder; the same values bit for bit).

:func:`use_fast_kernels` (what pipelines do on a CPU) switches a model's inference to the extension's kernels,
close to but not bit-equal with diffusers: 3x3 convolutions as Winograd F(4x4, 3x3) (:mod:`varkit.nn.winograd`)
and each GroupNorm + SiLU in one pass over the map (:func:`norm_silu`). Models built directly keep torch's ops.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check
from ..modeling import DerivedState
from . import winograd
from .cpu_kernels import cpu_kernels
from .layers import derived_copy

__all__ = [
    "ACTIVATIONS", "Attention", "Conv2d", "use_fast_kernels", "norm_silu", "ResnetBlock2D", "Downsample2D",
    "Upsample2D", "DownEncoderBlock2D",
    "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UNetMidBlock2D", "Encoder", "Decoder",
    "Codebook", "VQAutoencoder", "KLAutoencoder", "LOGVAR_RANGE", "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES",
]

#: diffusers' ``get_activation`` names (``act_fn``) -> module class.
ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU,
                                           "relu": nn.ReLU}
#: LDM clamps the posterior log-variance to this range (diffusers' ``DiagonalGaussianDistribution`` too).
LOGVAR_RANGE = (-30.0, 20.0)
_EPS = 1e-6  # every GroupNorm of the LDM autoencoder


def _activation(name: str) -> nn.Module:
    check(isinstance(name, str) and name.lower() in ACTIVATIONS,
          f"act_fn must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name.lower()]()


def norm_silu(norm: nn.GroupNorm, x: Tensor, fast: bool = False) -> Tensor:
    """``F.silu(norm(x))`` at inference. ``fast``, on a CPU, for an fp32 map: one C++ pass per group (its
    values stay in L2 between the statistics and the output: 17.6 -> 8.6 ms a call on a 128-channel 256 px map, one
    Xeon core; equal to torch's to fp32 rounding, not bit for bit); otherwise torch's GroupNorm and an in-place SiLU."""
    if (fast and x.device.type == "cpu" and x.dtype == torch.float32 and norm.affine
            and norm.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        kernels = cpu_kernels()
        if kernels is not None:  # a channels-last map (an attention block's output) is copied to NCHW first
            return kernels.group_norm_silu(x.contiguous(), norm.weight, norm.bias, norm.num_groups, norm.eps, True)
    return F.silu(norm(x), inplace=True)


class Conv2d(DerivedState, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) whose 3x3 inference runs as Winograd F(4x4, 3x3) when ``fast`` is
    set (:func:`use_fast_kernels`) and the call is eligible (:func:`varkit.nn.winograd.eligible`); otherwise, and
    always with autograd, torch's convolution."""

    fast = False
    derived_attrs = ("_winograd",)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and winograd.eligible(self, x):
            return winograd.conv3x3(x, self.winograd_filters(), self.bias)
        return super().forward(x)

    def winograd_filters(self) -> Tensor:
        """The transformed filters, made again whenever the weight changed."""
        return derived_copy(self, "_winograd", winograd.transform_weight)


def use_fast_kernels(module: nn.Module, enabled: bool = True) -> int:
    """Switch the CPU inference kernels of every LDM convolution, ResNet block and decoder in ``module`` (Winograd
    3x3 convolutions, fused GroupNorm + SiLU): outputs within ~1e-5 of torch's relative to their scale, 1.8x
    faster on VAR's decoder (tests/test_winograd.py). Returns how many modules were switched."""
    count = 0
    for m in module.modules():
        if isinstance(m, (Conv2d, ResnetBlock2D, Decoder)):
            m.fast = enabled
            if isinstance(m, Conv2d):  # transformed filters are made on first use: an encoder never pays them
                m.drop_derived()
            count += 1
    return count


class Attention(nn.Module):
    """One-head self-attention over the pixels of a feature map, with a residual (LDM's ``AttnBlock``).

    diffusers' ``Attention(..., _from_deprecated_attn_block=True)`` run by ``AttnProcessor2_0``: GroupNorm,
    ``to_q``/``to_k``/``to_v`` linears, SDPA, ``to_out.0`` linear (``to_out.1`` is diffusers' no-op dropout,
    kept so that the module tree is the same).
    """

    def __init__(self, channels: int, groups: int, eps: float = _EPS):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # the same views and transposes as diffusers' processor: the linears see the same memory layouts
        hs = x.view(b, c, h * w).transpose(1, 2)
        hs = self.group_norm(hs.transpose(1, 2)).transpose(1, 2)
        q = self.to_q(hs).view(b, -1, 1, c).transpose(1, 2)
        k = self.to_k(hs).view(b, -1, 1, c).transpose(1, 2)
        v = self.to_v(hs).view(b, -1, 1, c).transpose(1, 2)
        hs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        hs = hs.transpose(1, 2).reshape(b, -1, c).to(q.dtype)
        hs = self.to_out[1](self.to_out[0](hs))
        return hs.transpose(-1, -2).reshape(b, c, h, w) + x


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> 3x3 conv, twice, plus the input (through a 1x1 ``conv_shortcut`` when widths differ).

    diffusers' ``ResnetBlock2D`` without a time embedding and with output scale 1 (the LDM autoencoder's).
    """

    fast = False  # the fused GroupNorm + SiLU at inference (:func:`use_fast_kernels`)

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu",
                 eps: float = _EPS, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = _activation(act_fn)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
                              if in_channels != out_channels else None)

    def forward(self, x: Tensor, temb: None = None) -> Tensor:
        if not torch.is_grad_enabled() and isinstance(self.nonlinearity, nn.SiLU):
            # inference: the same values, with SiLU and the residual add done in place
            h = self.conv1(norm_silu(self.norm1, x, self.fast))
            h = self.conv2(self.dropout(norm_silu(self.norm2, h, self.fast)))
            skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
            # diffusers' `skip + h` takes skip's memory layout (an attention's output is channels-last), which
            # decides the algorithms of the convs downstream: add in place only when the layouts agree
            return h.add_(skip) if skip.stride() == h.stride() else skip + h
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x.contiguous() if self.training else x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero row and column at the bottom and right (LDM's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``output_size``) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


def _resnets(n: int, in_channels: int, out_channels: int, groups: int, act_fn: str) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                          for i in range(n)])


def _resnets_and_attentions(n: int, in_channels: int, out_channels: int, groups: int,
                            act_fn: str) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Built alternately (ResNet, attention, ...) as diffusers does, so a seeded init draws the same weights."""
    resnets, attentions = nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        resnets.append(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn))
        attentions.append(Attention(out_channels, groups))
    return resnets, attentions


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` ResNet blocks, then (except at the last level) a :class:`Downsample2D`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = _resnets(num_layers, in_channels, out_channels, groups, act_fn)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class AttnDownEncoderBlock2D(nn.Module):
    """As :class:`DownEncoderBlock2D`, with an :class:`Attention` after each ResNet block."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        resnets, self.attentions = _resnets_and_attentions(num_layers, in_channels, out_channels, groups, act_fn)
        self.resnets = resnets  # registered after attentions, as diffusers
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x))
        for down in self.downsamplers or ():
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` ResNet blocks, then (except at the last level) an :class:`Upsample2D`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = _resnets(num_layers, in_channels, out_channels, groups, act_fn)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, temb: None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class AttnUpDecoderBlock2D(nn.Module):
    """As :class:`UpDecoderBlock2D`, with an :class:`Attention` after each ResNet block."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        resnets, self.attentions = _resnets_and_attentions(num_layers, in_channels, out_channels, groups, act_fn)
        self.resnets = resnets  # registered after attentions, as diffusers
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, temb: None = None) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x))
        for up in self.upsamplers or ():
            x = up(x)
        return x


DOWN_BLOCK_TYPES: dict[str, type[nn.Module]] = {"DownEncoderBlock2D": DownEncoderBlock2D,
                                                "AttnDownEncoderBlock2D": AttnDownEncoderBlock2D}
UP_BLOCK_TYPES: dict[str, type[nn.Module]] = {"UpDecoderBlock2D": UpDecoderBlock2D,
                                              "AttnUpDecoderBlock2D": AttnUpDecoderBlock2D}


class UNetMidBlock2D(nn.Module):
    """ResNet block, attention (``None`` without it, as diffusers keeps the slot), ResNet block."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        super().__init__()
        first = ResnetBlock2D(channels, channels, groups, act_fn)  # built in diffusers' order (seeded inits)
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList([first, ResnetBlock2D(channels, channels, groups, act_fn)])

    def forward(self, x: Tensor, temb: None = None) -> Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


def _check_layout(kind: str, types: Sequence[str], widths: Sequence[int], known: dict, groups: int) -> None:
    check(len(widths) >= 1 and len(types) == len(widths),
          f"{kind} needs one block type per level: {len(types)} types for {len(widths)} block_out_channels")
    bad = [t for t in types if t not in known]
    check(not bad, f"unsupported {kind} block type(s) {bad}; the LDM autoencoder has {sorted(known)}")
    check(all(isinstance(c, int) and c >= 1 and c % groups == 0 for c in widths),
          f"every block_out_channels entry ({list(widths)}) must be a positive multiple of norm_num_groups={groups}")


class Encoder(nn.Module):
    """Images -> latent moments: ``conv_in``, down levels, middle block, GroupNorm, SiLU, ``conv_out``.

    diffusers' ``Encoder`` (``double_z``: ``2 * out_channels`` outputs, a KL posterior's mean and logvar).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu", double_z: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        widths = tuple(block_out_channels)
        _check_layout("down", tuple(down_block_types), widths, DOWN_BLOCK_TYPES, norm_num_groups)
        self.layers_per_block = layers_per_block
        self.conv_in = Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = widths[0]
        for i, kind in enumerate(down_block_types):
            self.down_blocks.append(DOWN_BLOCK_TYPES[kind](prev, widths[i], layers_per_block, norm_num_groups, act_fn,
                                                           add_downsample=i < len(widths) - 1))
            prev = widths[i]
        self.mid_block = UNetMidBlock2D(widths[-1], norm_num_groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=_EPS)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn is, as diffusers
        self.conv_out = Conv2d(widths[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents -> images: ``conv_in``, middle block, up levels (one more ResNet block each than the encoder's),
    GroupNorm, SiLU, ``conv_out``. diffusers' ``Decoder`` with ``norm_type="group"``; ``up_blocks[0]`` is the
    lowest resolution."""

    fast = False  # the fused GroupNorm + SiLU before ``conv_out`` at inference (:func:`use_fast_kernels`)

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu",
                 mid_block_add_attention: bool = True):
        super().__init__()
        widths = tuple(block_out_channels)
        _check_layout("up", tuple(up_block_types), widths, UP_BLOCK_TYPES, norm_num_groups)
        self.layers_per_block = layers_per_block
        self.conv_in = Conv2d(in_channels, widths[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as diffusers (same state-dict order)
        self.mid_block = UNetMidBlock2D(widths[-1], norm_num_groups, act_fn, mid_block_add_attention)
        reversed_widths = widths[::-1]
        prev = reversed_widths[0]
        for i, kind in enumerate(up_block_types):
            self.up_blocks.append(UP_BLOCK_TYPES[kind](prev, reversed_widths[i], layers_per_block + 1,
                                                       norm_num_groups, act_fn, add_upsample=i < len(widths) - 1))
            prev = reversed_widths[i]
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[0], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        if not torch.is_grad_enabled() and isinstance(self.conv_act, nn.SiLU):
            return self.conv_out(norm_silu(self.conv_norm_out, x, self.fast))
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Codebook(nn.Module):
    """``embedding``: ``num_embeddings`` vectors drawn uniformly in ``+-1/num_embeddings`` (diffusers'
    ``VectorQuantizer`` parameters and init; the lookup is the tokenizer's)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)


class VQAutoencoder(nn.Module):
    """diffusers' ``VQModel`` layout: ``encoder``, ``quant_conv`` (1x1), ``quantize``, ``post_quant_conv`` (1x1),
    ``decoder``. ``quantize`` is a :class:`Codebook`, built where ``VQModel`` builds its quantizer (so a seeded
    init draws the same weights); a tokenizer with its own lookup replaces it."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 3,
                 num_vq_embeddings: int = 256, norm_num_groups: int = 32, vq_embed_dim: int | None = None,
                 mid_block_add_attention: bool = True):
        super().__init__()
        embed = vq_embed_dim if vq_embed_dim is not None else latent_channels
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, double_z=False, mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(latent_channels, embed, 1)
        self.quantize: nn.Module = Codebook(num_vq_embeddings, embed)
        self.post_quant_conv = nn.Conv2d(embed, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, mid_block_add_attention=mid_block_add_attention)

    def encode(self, x: Tensor) -> Tensor:
        """Images -> pre-quantization latents ``[B, vq_embed_dim, h, w]`` (diffusers' ``encode(x).latents``)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z_q: Tensor) -> Tensor:
        """Quantized latents -> images (diffusers' ``decode(z_q, force_not_quantize=True).sample``)."""
        return self.decoder(self.post_quant_conv(z_q))


class KLAutoencoder(nn.Module):
    """diffusers' ``AutoencoderKL`` layout: ``encoder`` (doubled outputs), ``decoder``, and the optional 1x1
    ``quant_conv`` / ``post_quant_conv`` (``None`` when absent, as diffusers)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4,
                 norm_num_groups: int = 32, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, double_z=True, mid_block_add_attention=mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> posterior ``(mean, logvar)``, each ``[B, latent, h, w]``; logvar clamped to
        :data:`LOGVAR_RANGE` (diffusers' ``DiagonalGaussianDistribution``)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.clamp(logvar, *LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images (diffusers' ``decode(z).sample``)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
