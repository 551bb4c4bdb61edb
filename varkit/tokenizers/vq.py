"""LlamaGen-style VQ tokenizer: the LDM autoencoder in diffusers' ``VQModel`` layout plus an l2-normalised
codebook lookup.

The convolutional encoder/decoder (with attention at the lowest resolution and in the middle
block), ``quant_conv`` and ``post_quant_conv`` are :class:`varkit.nn.ldm.VQAutoencoder`, which has
diffusers' ``VQModel`` module tree and parameter names (so folders saved when it was a ``VQModel``
load unchanged) without importing diffusers. The quantizer is :class:`L2VectorQuantizer`: LlamaGen
looks codes up in an l2-normalised codebook (cosine similarity), which diffusers' ``VectorQuantizer``
does not do (same parameter name: ``quantize.embedding.weight``).

Images are ``[-1, 1]``, ``[B, C, H, W]``; tokens are ``LongTensor[B, h, w]`` with
``h = H / downsample``. ``decode`` returns unclamped pixels, as LlamaGen's ``decode_code``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check
from ..modeling import SavableModule, register_module
from ..nn.ldm import VQAutoencoder

__all__ = ["VQConfig", "VQOutput", "VQTokenizer", "L2VectorQuantizer", "entropy_loss"]


@dataclass
class VQConfig:
    """Architecture and loss settings. Defaults are LlamaGen's VQ-16 (``vq_ds16_c2i.pt``)."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more, as in LlamaGen
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    norm_groups: int = 32
    commit_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01


@dataclass
class VQOutput:
    """What :meth:`VQTokenizer.forward` returns (LlamaGen's losses, already weighted)."""

    recon: Tensor  # [B, C, H, W], decoded from the straight-through quantized latents
    ids: Tensor  # LongTensor [B, h, w]
    codebook_loss: Tensor  # mean((z_q - sg(z))^2): moves the codebook towards the encoder
    commit_loss: Tensor  # beta * mean((sg(z_q) - z)^2): moves the encoder towards the codebook
    entropy_loss: Tensor  # entropy_loss_ratio * (sample entropy - batch-average entropy)

    @property
    def vq_loss(self) -> Tensor:
        """Sum of the three quantizer losses (add a reconstruction loss to train)."""
        return self.codebook_loss + self.commit_loss + self.entropy_loss


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """LlamaGen's codebook entropy loss on ``affinity = -distance`` ([N, V]).

    Low per-sample entropy (confident assignments) and high entropy of the batch-average
    assignment (all codes used): ``mean_i H(p_i) - H(mean_i p_i)``.
    """
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class L2VectorQuantizer(nn.Module):
    """Nearest-code lookup, optionally in the l2-normalised (cosine) metric."""

    def __init__(self, codebook_size: int, codebook_dim: int, l2_norm: bool = True):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))

    def codebook(self) -> Tensor:
        """``[V, D]`` code vectors as the lookup sees them (unit norm when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def project(self, z: Tensor) -> Tensor:
        """Map encoder vectors (last dim ``D``) into the lookup metric."""
        return F.normalize(z, p=2, dim=-1) if self.l2_norm else z

    @staticmethod
    def distances(z_flat: Tensor, codebook: Tensor) -> Tensor:
        """Squared euclidean distances ``[N, V]``, computed as LlamaGen does."""
        return (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * z_flat @ codebook.t()
        )

    def lookup(self, ids: Tensor) -> Tensor:
        """``ids[...]`` -> code vectors ``[..., D]``."""
        return self.codebook()[ids]


@register_module
class VQTokenizer(SavableModule):
    """Discrete image tokenizer with LlamaGen's VQ-GAN architecture.

    ``self.model`` is a :class:`varkit.nn.ldm.VQAutoencoder` (diffusers' ``VQModel`` layout) whose
    ``quantize`` is an :class:`L2VectorQuantizer`.
    """

    config_class: ClassVar[type] = VQConfig
    kind: ClassVar[str] = "discrete"
    token_shape: ClassVar[tuple[int, ...]] = ()  # one token is a codebook id

    def __init__(self, config: VQConfig | None = None):
        config = config if config is not None else VQConfig()
        _validate(config)
        super().__init__(config)
        n = len(config.ch_mult)
        channels = tuple(config.ch * m for m in config.ch_mult)
        self.model = VQAutoencoder(
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
            block_out_channels=channels,
            layers_per_block=config.num_res_blocks,
            act_fn="silu",
            latent_channels=config.z_channels,
            num_vq_embeddings=config.codebook_size,
            norm_num_groups=config.norm_groups,
            vq_embed_dim=config.codebook_dim,
            mid_block_add_attention=True,
        )
        self.model.quantize = L2VectorQuantizer(  # built after the decoder, as always (seeded inits unchanged)
            config.codebook_size, config.codebook_dim, config.codebook_l2_norm
        )

    # -- attributes samplers and generators read ---------------------------------------------
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def quantize(self) -> L2VectorQuantizer:
        return self.model.quantize

    def codebook(self) -> Tensor:
        """``[V, D]`` embeddings in the lookup's metric (unit rows when ``codebook_l2_norm``)."""
        return self.quantize.codebook()

    # -- tokenizer API -----------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """Pre-quantization latents ``[B, D, h, w]`` (encoder + ``quant_conv``)."""
        self._check_images(images)
        return self.model.encode(images)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> token ids ``LongTensor[B, h, w]``."""
        z = self.encode_latents(images)
        b, d, h, w = z.shape
        z = self.quantize.project(z.permute(0, 2, 3, 1).reshape(-1, d))
        ids = self.quantize.distances(z, self.codebook()).argmin(dim=1)
        return ids.view(b, h, w)

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantized latents ``[B, D, h, w]`` -> pixels (``post_quant_conv`` + decoder)."""
        return self.model.decode(z_q)

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids ``[B, h, w]`` -> images ``[B, C, H, W]``, unclamped (nominally [-1, 1])."""
        check(
            isinstance(ids, Tensor) and ids.ndim == 3,
            f"decode expects token ids of shape [B, h, w]; got {_describe(ids)}",
        )
        check(
            not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool,
            f"decode expects integer token ids; got dtype {ids.dtype}",
        )
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            check(
                lo >= 0 and hi < self.codebook_size,
                f"token ids must lie in [0, {self.codebook_size}); got values in [{lo}, {hi}]",
            )
        z_q = self.quantize.lookup(ids.long()).permute(0, 3, 1, 2).contiguous()
        return self.decode_latents(z_q.to(self.model.post_quant_conv.weight.dtype))

    def forward(self, images: Tensor) -> VQOutput:
        """Training pass: quantize with a straight-through estimator and reconstruct.

        Losses are LlamaGen's (``VectorQuantizer.forward`` in training mode), computed in the
        lookup metric (after l2 normalisation when ``codebook_l2_norm``).
        """
        cfg = self.config
        z = self.encode_latents(images)
        b, d, h, w = z.shape
        z = self.quantize.project(z.permute(0, 2, 3, 1))  # [B, h, w, D]
        z_flat = z.reshape(-1, d)
        codebook = self.codebook()
        dist = self.quantize.distances(z_flat, codebook)
        ids = dist.argmin(dim=1)
        z_q = codebook[ids].view(z.shape)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        commit_loss = cfg.commit_beta * torch.mean((z_q.detach() - z) ** 2)
        if cfg.entropy_loss_ratio > 0:
            ent = cfg.entropy_loss_ratio * entropy_loss(-dist, cfg.entropy_temperature)
        else:
            ent = z.new_zeros(())
        z_st = z + (z_q - z).detach()
        recon = self.decode_latents(z_st.permute(0, 3, 1, 2).contiguous())
        return VQOutput(recon, ids.view(b, h, w), codebook_loss, commit_loss, ent)

    def training_loss(self, images: Tensor, out: VQOutput | None = None) -> tuple[Tensor, dict[str, float]]:
        """``mse + l1`` reconstruction plus the quantizer losses (codebook, commitment, entropy), and metrics.

        ``out``: the result of ``self(images)`` when the caller has already run the forward (through DDP or
        an adversarial wrapper). ``codes_in_batch``: distinct codes the batch used (collapse shows here first).
        """
        out = self(images) if out is None else out
        recon = F.mse_loss(out.recon, images) + F.l1_loss(out.recon, images)
        used = out.ids.unique().numel()
        return recon + out.vq_loss, {"recon": recon.item(), "vq": out.vq_loss.item(), "codes_in_batch": used}

    # -- helpers -----------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        c, f = self.config.in_channels, self.downsample
        check(
            isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] == c,
            f"expected images of shape [B, {c}, H, W] in [-1, 1]; got {_describe(images)}",
        )
        check(
            images.shape[2] % f == 0 and images.shape[3] % f == 0,
            f"image height and width must be multiples of the tokenizer's downsample factor "
            f"{f}; got {tuple(images.shape[2:])}",
        )


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    return type(x).__name__


def _validate(cfg: VQConfig) -> None:
    check(len(cfg.ch_mult) >= 1, "ch_mult must name at least one level")
    check(
        cfg.ch_mult[0] == 1,
        f"ch_mult must start with 1 (LlamaGen's layout: conv_in outputs ch channels); got {cfg.ch_mult}",
    )
    for name in ("in_channels", "ch", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim", "norm_groups"):
        value = getattr(cfg, name)
        check(isinstance(value, int) and value >= 1, f"{name} must be a positive integer; got {value!r}")
    bad = [cfg.ch * m for m in cfg.ch_mult if (cfg.ch * m) % cfg.norm_groups]
    check(
        not bad,
        f"every level width ch*ch_mult ({[cfg.ch * m for m in cfg.ch_mult]}) must be divisible "
        f"by norm_groups={cfg.norm_groups}",
    )
    check(cfg.commit_beta >= 0 and cfg.entropy_loss_ratio >= 0, "loss weights must be >= 0")
    check(
        cfg.entropy_temperature > 0 and math.isfinite(cfg.entropy_temperature),
        "entropy_temperature must be > 0",
    )

