"""VAR's multi-scale residual VQ tokenizer (next-scale prediction, Tian et al. 2024).

An image is encoded to a latent ``f`` of shape (B, Cvae, h, w) with ``h = w = patch_nums[-1]``.
The latent is then quantised coarse to fine: at scale ``si`` the residual ``f - f_hat`` is
area-downsampled to ``pn x pn``, each vector is replaced by its nearest codebook entry (Euclidean),
the code map is bicubic-upsampled back to ``h x w`` (not at the last scale), passed through a
residual conv ``Phi`` (``(1 - r) * x + r * conv(x)``, a few convs shared across scales) and added to
``f_hat``. The tokens of an image are the list of per-scale index maps.

Encoder and decoder are :mod:`varkit.nn.ldm`'s ``Encoder``/``Decoder`` (the LDM layout with diffusers'
parameter names), which host VAR's VQVAE weights exactly (see :mod:`varkit.checkpoints.var_vae`); the
quantiser is varkit's own.

Every operation of the quantiser follows VAR's order and memory layout (``f_hat`` is kept contiguous,
as VAR's in-place buffer is), so ids, ``f_hat`` and the transformer inputs are bit-identical to VAR's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check
from ..modeling import SavableModule, register_module
from ..nn import winograd
from ..nn.ldm import Decoder, Encoder, Upsample2D

__all__ = ["MSVQConfig", "MSVQOutput", "MultiScaleVQTokenizer", "phi_schedule", "VAR_PATCH_NUMS"]

#: VAR's published scale schedules, by image resolution (the VQVAE downsamples 16x).
VAR_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class MSVQConfig:
    """Architecture of a multi-scale VQ tokenizer; the defaults are VAR's ``vae_ch160v4096z32``."""

    in_channels: int = 3
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2               # per encoder level; the decoder has one more
    z_channels: int = 32                  # Cvae, the codebook dimension
    codebook_size: int = 4096
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    quant_resi: float = 0.5               # Phi(x) = (1 - |r|) x + |r| conv(x); |r| <= 1e-6: identity
    share_quant_resi: int = 4             # 0: one Phi per scale, 1: one Phi for all, K: K shared Phis
    num_phi: int = 0                      # with share_quant_resi=0: number of Phis (0: one per scale)
    beta: float = 0.25                    # commitment loss weight
    quant_conv_ks: int = 3                # kernel of quant_conv / post_quant_conv
    norm_num_groups: int = 32
    using_sa: bool = True                 # self-attention after each res block of the lowest level
    using_mid_sa: bool = True             # self-attention in the middle blocks


@dataclass
class MSVQOutput:
    """What :meth:`MultiScaleVQTokenizer.forward` returns (for a training loop)."""

    recon: Tensor          # (B, 3, H, W) decoder output, not clamped; straight-through gradient to the encoder
    ids: list[Tensor]      # per scale, LongTensor (B, pn, pn)
    vq_loss: Tensor        # scalar: mean over scales of beta*|sg(f_hat)-f|^2 + |f_hat-sg(f)|^2
    f_hat: Tensor          # (B, Cvae, h, w) quantised latent (straight-through)
    usage: Tensor          # scalar, fraction of codebook entries used in this batch (no grad)


def phi_schedule(num_scales: int, share_quant_resi: int, num_phi: int = 0) -> tuple[int, ...]:
    """Index of the Phi conv used at each scale, exactly as VAR picks it.

    With K Phis, scale ``si`` of ``S`` uses the one whose tick is nearest to ``si / (S - 1)``; ticks are
    ``linspace(1/(3K), 1 - 1/(3K), K)`` for K = 4 and ``linspace(1/(2K), 1 - 1/(2K), K)`` otherwise.
    For VAR's 10 scales and K = 4 this gives (0, 0, 1, 1, 1, 2, 2, 3, 3, 3).
    """
    check(num_scales >= 2, f"a multi-scale schedule needs at least 2 scales, got {num_scales}")
    if share_quant_resi == 1:
        return (0,) * num_scales
    k = (num_phi or num_scales) if share_quant_resi == 0 else share_quant_resi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1))).item()) for si in range(num_scales))


class _Phi(nn.Conv2d):
    """3x3 conv blended with its input: ``(1 - r) * x + r * conv(x)``."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


def upsample2x_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x), padding=1)`` computed on the low-resolution grid.

    Output pixel (2i+a, 2j+b) reads input rows i-1..i (a=0) or i..i+1 (a=1), and likewise columns, so each
    of the four output phases is a 2x2 conv whose taps are sums of the 3x3 taps that land on the same input
    pixel. One conv with the four phase kernels stacked (4*Cout outputs, padding 1) then an interleave: 4/9
    of the multiply-adds and no 4x upsampled copy; equal to the direct form up to fp32 rounding (~1e-6).
    """
    w = weight
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2), torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    kernels = []
    for r in rows:  # phase a (rows), then b (columns)
        kernels += [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1), torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1)]
    y = F.conv2d(x, torch.cat(kernels), None if bias is None else bias.repeat(4), padding=1)
    B, O, h, wd = x.shape[0], w.shape[0], x.shape[2], x.shape[3]
    y = y.view(B, 2, 2, O, h + 1, wd + 1)
    out = y.new_empty(B, O, h, 2, wd, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + wd]
    return out.view(B, O, 2 * h, 2 * wd)


class _UpsampleConv(nn.Module):
    """The decoder's nearest 2x upsampling + 3x3 conv (``ldm.Upsample2D``, same ``conv`` parameter).

    Without autograd and on grids of at least ``min_side``, it runs :func:`upsample2x_conv3x3` (~1.7x faster
    at the 64 and 128 px levels of VAR's decoder); below that the stacked 2x2 conv is not faster. With the fast
    kernels on, the upsampled map's conv is a Winograd one instead. Training keeps the direct form.
    """

    min_side = 32

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, output_size: int | None = None) -> Tensor:
        # where the conv on the upsampled map would run as Winograd F(4x4, 3x3) (fast kernels on, an eligible conv:
        # the upsampled map has 4x x's pixels), that is faster than the stacked 2x2 form at every level of VAR's
        # decoder (160 ch, 128 -> 256 px: 104 vs 118 ms)
        if (output_size is None and not torch.is_grad_enabled() and min(x.shape[-2:]) >= self.min_side
                and not (getattr(self.conv, "fast", False) and winograd.eligible(self.conv, x))):
            return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias)
        if output_size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=output_size, mode="nearest"))


def _fast_upsamplers(decoder: Decoder) -> None:
    """Swap the decoder's :class:`Upsample2D` (nearest + 3x3 conv) for :class:`_UpsampleConv`; keys unchanged."""
    for block in decoder.up_blocks:
        for i, up in enumerate(block.upsamplers or []):
            if isinstance(up, Upsample2D):
                block.upsamplers[i] = _UpsampleConv(up.conv)


class _ResidualQuantizer(nn.Module):
    """Shared codebook + Phi convs; the per-scale logic lives in the tokenizer's methods."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.z_channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        n = len(cfg.patch_nums)
        if abs(cfg.quant_resi) <= 1e-6:
            count, self.schedule = 0, (-1,) * n           # every Phi is the identity
        else:
            self.schedule = phi_schedule(n, cfg.share_quant_resi, cfg.num_phi)
            count = 1 if cfg.share_quant_resi == 1 else (
                (cfg.num_phi or n) if cfg.share_quant_resi == 0 else cfg.share_quant_resi)
        self.phis = nn.ModuleList([_Phi(cfg.z_channels, cfg.quant_resi) for _ in range(count)])

    def phi(self, si: int, h: Tensor) -> Tensor:
        idx = self.schedule[si]
        return h if idx < 0 else self.phis[idx](h)


def _validate(cfg: MSVQConfig) -> None:
    pns = tuple(cfg.patch_nums)
    check(len(pns) >= 2, f"patch_nums needs at least 2 scales (VAR's Phi schedule divides by S-1), got {pns}")
    check(all(isinstance(p, int) and p >= 1 for p in pns), f"patch_nums must be positive integers, got {pns}")
    check(all(a < b for a, b in zip(pns, pns[1:])), f"patch_nums must be strictly increasing, got {pns}")
    check(len(cfg.ch_mult) >= 1 and cfg.ch_mult[0] == 1,
          f"ch_mult must start with 1 (VAR's conv_in outputs `ch` channels), got {tuple(cfg.ch_mult)}")
    widths = [cfg.ch * m for m in cfg.ch_mult]
    check(all(w % cfg.norm_num_groups == 0 for w in widths),
          f"every level width {widths} must be divisible by norm_num_groups={cfg.norm_num_groups}")
    check(cfg.z_channels >= 1 and cfg.codebook_size >= 1, "z_channels and codebook_size must be >= 1")
    check(cfg.share_quant_resi >= 0 and cfg.num_phi >= 0, "share_quant_resi and num_phi must be >= 0")
    check(cfg.quant_conv_ks % 2 == 1, f"quant_conv_ks must be odd, got {cfg.quant_conv_ks}")


@register_module
class MultiScaleVQTokenizer(SavableModule):
    """VAR's multi-scale residual VQ tokenizer (discrete; tokens are a list of per-scale maps)."""

    config_class = MSVQConfig
    kind = "discrete"
    token_shape: tuple[int, ...] = ()  # one token is a codebook id

    def __init__(self, config: MSVQConfig | None = None):
        config = config if config is not None else MSVQConfig()
        config = dataclasses.replace(config, ch_mult=tuple(config.ch_mult), patch_nums=tuple(config.patch_nums))
        _validate(config)
        super().__init__(config)
        widths = tuple(config.ch * m for m in config.ch_mult)
        n = len(widths)
        down = ["DownEncoderBlock2D"] * n
        up = ["UpDecoderBlock2D"] * n
        if config.using_sa:
            down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
        self.encoder = Encoder(
            in_channels=config.in_channels, out_channels=config.z_channels, down_block_types=tuple(down),
            block_out_channels=widths, layers_per_block=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups, act_fn="silu", double_z=False,
            mid_block_add_attention=config.using_mid_sa,
        )
        self.decoder = Decoder(
            in_channels=config.z_channels, out_channels=config.in_channels, up_block_types=tuple(up),
            block_out_channels=widths, layers_per_block=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups, act_fn="silu", mid_block_add_attention=config.using_mid_sa,
        )
        _fast_upsamplers(self.decoder)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, stride=1, padding=ks // 2)
        self.quantizer = _ResidualQuantizer(config)

    # -- attributes --------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid (= the last scale)."""
        return self.config.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.config.patch_nums[-1] * self.downsample

    @property
    def num_tokens(self) -> int:
        """Total tokens over all scales (680 for VAR at 256px)."""
        return sum(p * p for p in self.config.patch_nums)

    @property
    def phi_schedule(self) -> tuple[int, ...]:
        """Index of the Phi conv used at each scale (-1: identity)."""
        return self.quantizer.schedule

    def codebook(self) -> Tensor:
        """The shared codebook, (V, Cvae)."""
        return self.quantizer.embedding.weight

    # -- image <-> latent --------------------------------------------------------------------
    def encode_latent(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> continuous latent ``f`` (B, Cvae, h, w) before quantisation."""
        check(images.dim() == 4 and images.shape[1] == self.config.in_channels,
              f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        size = self.image_size
        check(images.shape[-2] == size and images.shape[-1] == size,
              f"this tokenizer's scale schedule {self.patch_nums} ends at {self.latent_size}x{self.latent_size}, "
              f"so images must be {size}x{size}; got {images.shape[-2]}x{images.shape[-1]} (resize the images, "
              "or build the tokenizer with patch_nums ending at side/downsample)")
        return self.quant_conv(self.encoder(images))

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Accumulated latent ``f_hat`` (B, Cvae, h, w) -> images in [-1, 1] (clamped, as VAR's ``fhat_to_img``)."""
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))).clamp(-1, 1)

    # -- tokens ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """Images in [-1, 1], (B, 3, H, W) -> one LongTensor (B, pn, pn) per scale."""
        return self.latent_to_ids(self.encode_latent(images))

    @torch.no_grad()
    def latent_to_ids(self, f: Tensor) -> list[Tensor]:
        """Quantise a latent (B, Cvae, h, w) scale by scale -> one LongTensor (B, pn, pn) per scale."""
        ids, _ = self._quantize(f.detach(), want_fhat=False)
        return ids

    def decode(self, ids: Sequence[Tensor]) -> Tensor:
        """Per-scale ids (each (B, pn, pn) or (B, pn*pn)) -> images (B, 3, H, W) in [-1, 1].

        A prefix of the scales (the first k) decodes the coarser reconstruction VAR shows after k steps.
        """
        return self.decode_fhat(self.ids_to_fhat(ids))

    def ids_to_fhat(self, ids: Sequence[Tensor]) -> Tensor:
        """Per-scale ids (all scales, or a prefix of them) -> accumulated latent ``f_hat`` (B, Cvae, h, w)."""
        pns = self.patch_nums
        check(1 <= len(ids) <= len(pns), f"expected 1..{len(pns)} scales of ids, got {len(ids)}")
        emb = self.quantizer.embedding
        B, C, H = ids[0].shape[0], self.codebook_dim, pns[-1]
        f_hat = None
        for si, idx in enumerate(ids):
            idx = self._check_ids(si, idx, B)
            h = emb(idx).transpose(1, 2).reshape(B, C, pns[si], pns[si])
            if si < len(pns) - 1:
                h = F.interpolate(h, size=(H, H), mode="bicubic")
            h = self.quantizer.phi(si, h)
            h = h.float()
            f_hat = (h if f_hat is None else f_hat + h).contiguous()
        return f_hat.float()

    # -- generator-side helpers (VAR's transformer) ------------------------------------------
    def next_scale_input(self, si: int, ids_si: Tensor, f_hat: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Add scale ``si``'s tokens to ``f_hat`` and return ``(f_hat_new, next_input)``.

        ``ids_si``: LongTensor (B, pn_si**2) (or (B, pn, pn)), or float embeddings (B, pn_si**2, Cvae)
        (VAR's soft ``more_smooth`` path). ``f_hat``: (B, Cvae, h, w), or None before the first scale.
        ``next_input``: area-downsampled ``f_hat_new`` at scale si+1 as (B, pn_{si+1}**2, Cvae), None after the
        last scale. Same computation as VAR's ``get_next_autoregressive_input``; ``f_hat`` is not modified.
        """
        pns, C, H = self.patch_nums, self.codebook_dim, self.patch_nums[-1]
        check(0 <= si < len(pns), f"scale index {si} out of range for {len(pns)} scales")
        pn = pns[si]
        if ids_si.is_floating_point():
            check(ids_si.dim() == 3 and ids_si.shape[1:] == (pn * pn, C),
                  f"embeddings for scale {si} must be (B, {pn * pn}, {C}), got {tuple(ids_si.shape)}")
            h = ids_si
        else:
            h = self.quantizer.embedding(self._check_ids(si, ids_si, ids_si.shape[0]))
        B = h.shape[0]
        h = h.transpose(1, 2).reshape(B, C, pn, pn)
        if si != len(pns) - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        h = self.quantizer.phi(si, h)
        h = h.float()
        f_hat = (h if f_hat is None else f_hat + h).contiguous()
        if si == len(pns) - 1:
            return f_hat, None
        nxt = pns[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area").view(B, C, -1).transpose(1, 2)

    def teacher_forcing_inputs(self, ids: Sequence[Tensor]) -> Tensor:
        """Training inputs of scales 1..S-1: (B, L - pn_0**2, Cvae), as VAR's ``idxBl_to_var_input``.

        ``ids``: per-scale ids (each (B, pn, pn) or (B, pn*pn)); all S scales or the first S-1 (the last one is
        not needed).
        """
        pns, C, H = self.patch_nums, self.codebook_dim, self.patch_nums[-1]
        check(len(ids) in (len(pns) - 1, len(pns)), f"expected {len(pns)} (or {len(pns) - 1}) scales of ids, got {len(ids)}")
        B = ids[0].shape[0]
        f_hat, out = None, []
        for si in range(len(pns) - 1):
            idx = self._check_ids(si, ids[si], B)
            h = self.quantizer.embedding(idx).transpose(1, 2).reshape(B, C, pns[si], pns[si])
            h = self.quantizer.phi(si, F.interpolate(h, size=(H, H), mode="bicubic"))
            h = h.float()
            f_hat = (h if f_hat is None else f_hat + h).contiguous()
            nxt = pns[si + 1]
            out.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(out, dim=1)

    # -- training ----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> MSVQOutput:
        """Encode, quantise with straight-through gradients, decode; returns losses for training.

        The quantiser runs in fp32 with autocast off, as VAR's. ``vq_loss`` averages over scales the loss of
        each scale's partial ``f_hat`` (VAR's ``VectorQuantizer2.forward``); the codebook and the Phi convs get
        their gradient from it, the encoder gets the commitment term plus the straight-through reconstruction.
        """
        f = self.encode_latent(images)
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            ids, partial = self._quantize(f, want_fhat=True)
            f_ng = f.detach()
            beta = self.config.beta
            loss = sum(beta * F.mse_loss(fh.detach(), f) + F.mse_loss(fh, f_ng) for fh in partial) / len(partial)
            f_hat = (partial[-1].detach() - f_ng) + f      # straight-through
        recon = self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype)))
        with torch.no_grad():
            hit = torch.zeros(self.codebook_size, device=f.device)
            for idx in ids:
                hit += torch.bincount(idx.reshape(-1), minlength=self.codebook_size).to(hit.dtype)
            usage = (hit > 0).float().mean()
        return MSVQOutput(recon=recon, ids=ids, vq_loss=loss, f_hat=f_hat, usage=usage)

    def training_loss(self, images: Tensor, out: MSVQOutput | None = None) -> tuple[Tensor, dict[str, float]]:
        """``mse + l1`` reconstruction plus the scale-averaged quantizer loss ``vq_loss``, and metrics.

        ``out``: the result of ``self(images)`` when the caller has already run the forward (through DDP or
        an adversarial wrapper). ``codes_in_batch``: distinct codes used over all scales of the batch.
        """
        out = self(images) if out is None else out
        recon = F.mse_loss(out.recon, images) + F.l1_loss(out.recon, images)
        used = torch.cat([i.flatten() for i in out.ids]).unique().numel()
        return recon + out.vq_loss, {"recon": recon.item(), "vq": out.vq_loss.item(), "codes_in_batch": used}

    # -- internals ---------------------------------------------------------------------------
    def _quantize(self, f: Tensor, want_fhat: bool) -> tuple[list[Tensor], list[Tensor]]:
        """VAR's residual quantisation; returns per-scale ids (B, pn, pn) and, if asked, per-scale f_hat."""
        f = f.float()
        B, C, H, W = f.shape
        pns = self.patch_nums
        check(H == pns[-1] and W == pns[-1], f"latent must be {pns[-1]}x{pns[-1]} for patch_nums {pns}, got {H}x{W}")
        weight = self.quantizer.embedding.weight
        w_ng = weight.detach().float()
        w_sq = w_ng.square().sum(dim=1)
        f_rest = f.detach().clone()
        f_hat: Tensor | None = None
        ids: list[Tensor] = []
        partial: list[Tensor] = []
        last = len(pns) - 1
        for si, pn in enumerate(pns):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            d = z.square().sum(dim=1, keepdim=True) + w_sq
            d.addmm_(z, w_ng.T, alpha=-2, beta=1)
            idx = d.argmin(dim=1).view(B, pn, pn)
            ids.append(idx)
            h = self.quantizer.embedding(idx).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode="bicubic").contiguous() if si != last else h.contiguous()
            h = self.quantizer.phi(si, h)
            h = h.float()
            f_hat = (h if f_hat is None else f_hat + h).contiguous()
            f_rest.sub_(h.detach())
            if want_fhat:
                partial.append(f_hat)
        return ids, partial

    def _check_ids(self, si: int, idx: Tensor, batch: int) -> Tensor:
        pn = self.patch_nums[si]
        check(not idx.is_floating_point(), f"ids of scale {si} must be integer, got {idx.dtype}")
        check(idx.shape[0] == batch and idx.numel() == batch * pn * pn,
              f"ids of scale {si} must be (B, {pn}, {pn}) or (B, {pn * pn}) with B={batch}, got {tuple(idx.shape)}")
        return idx.reshape(batch, pn * pn)
