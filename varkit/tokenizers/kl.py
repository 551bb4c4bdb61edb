"""Continuous tokenizer: a KL-regularised autoencoder (LDM's KL-VAE) in diffusers' ``AutoencoderKL`` layout.

MAR and FlowAR generate the latents of MAR's KL-16 VAE (16 channels, 16x downsampling), scaled by
0.2325 so that they have roughly unit standard deviation. ``self.model`` is a
:class:`varkit.nn.ldm.KLAutoencoder`, with diffusers' ``AutoencoderKL`` module tree and parameter names
(so any diffusers KL-VAE folder loads with :meth:`KLTokenizer.from_diffusers`, without diffusers, and
MAR's ``kl16.ckpt`` converts with :func:`varkit.checkpoints.mar_vae.load_mar_vae`); varkit adds the
token convention and the training loss.

Token maps are channels-last: ``encode`` turns images ``[B, C, H, W]`` in ``[-1, 1]`` into latents
``[B, h, w, D]`` already shifted and scaled (``(z - shift_factor) * scaling_factor``), ``decode``
takes the same and returns unclamped pixels.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError, ModelNotFoundError, check
from ..modeling import SavableModule, load_state_dict_strict, register_module
from ..nn.ldm import ACTIVATIONS, DOWN_BLOCK_TYPES, LOGVAR_RANGE, UP_BLOCK_TYPES, KLAutoencoder

__all__ = ["KLConfig", "KLOutput", "KLTokenizer", "LOGVAR_RANGE"]

_DOWN_TYPES = tuple(DOWN_BLOCK_TYPES)
_UP_TYPES = tuple(UP_BLOCK_TYPES)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class KLConfig:
    """Architecture, latent scaling and loss weight. Defaults are MAR's KL-16 (``kl16.ckpt``).

    The architecture fields are diffusers' ``AutoencoderKL`` arguments of the same names (``latent_dim`` is
    ``latent_channels``, ``norm_groups`` is ``norm_num_groups``). MAR's encoder attends at its last level
    (16x16 at 256 px) and in the middle block; its decoder attends only in the middle block.
    """

    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2  # per encoder level; diffusers' decoder has one more, as LDM's
    latent_dim: int = 16
    norm_groups: int = 32
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 5
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    act_fn: str = "silu"
    scaling_factor: float = 0.2325  # MAR's: latents * 0.2325 have std ~1 on ImageNet
    shift_factor: float = 0.0  # subtracted before scaling (SD3/Flux VAEs); 0 for LDM/MAR
    kl_weight: float = 1e-6  # training: weight of the per-element KL (see KLTokenizer.training_loss)


@dataclass
class KLOutput:
    """What :meth:`KLTokenizer.forward` returns (for a training loop); tensors are channels-first."""

    recon: Tensor  # [B, C, H, W] decoded from ``latents``, unclamped
    mean: Tensor  # [B, D, h, w] posterior mean (unscaled)
    logvar: Tensor  # [B, D, h, w] posterior log-variance, clamped to LOGVAR_RANGE
    latents: Tensor  # [B, D, h, w] what was decoded: a posterior sample (or the mean), unscaled

    def kl(self) -> Tensor:
        """KL(posterior || N(0, I)) averaged over every latent element (LDM sums it; see ``training_loss``)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean()


@register_module
class KLTokenizer(SavableModule):
    """Continuous image tokenizer: a KL-VAE whose latents (``[B, h, w, D]``) are the tokens."""

    config_class: ClassVar[type] = KLConfig
    kind: ClassVar[str] = "continuous"

    def __init__(self, config: KLConfig | None = None):
        config = config if config is not None else KLConfig()
        _validate(config)
        super().__init__(config)
        self.model = KLAutoencoder(
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            down_block_types=tuple(config.down_block_types),
            up_block_types=tuple(config.up_block_types),
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            act_fn=config.act_fn,
            latent_channels=config.latent_dim,
            norm_num_groups=config.norm_groups,
            use_quant_conv=config.use_quant_conv,
            use_post_quant_conv=config.use_post_quant_conv,
            mid_block_add_attention=config.mid_attention,
        )

    # -- attributes samplers and generators read ---------------------------------------------
    @property
    def token_shape(self) -> tuple[int, ...]:
        """Shape of one token: a ``latent_dim`` vector."""
        return (self.config.latent_dim,)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    # -- raw (channels-first, unscaled) latents ----------------------------------------------
    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mean, logvar)``, each ``[B, D, h, w]`` and unscaled; logvar clamped as LDM does."""
        self._check_images(images)
        return self.model.encode_moments(images)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Unscaled latents ``[B, D, h, w]`` -> pixels ``[B, C, H, W]`` (``post_quant_conv`` + decoder)."""
        return self.model.decode(z)

    @staticmethod
    def sample_posterior(mean: Tensor, logvar: Tensor,
                         generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """``mean + std * eps``; ``eps`` from ``generator`` (one for the batch, or one per image) on its
        own device, so the same seed gives the same draw on any device."""
        if isinstance(generator, Sequence):
            check(len(generator) == mean.shape[0],
                  f"got {len(generator)} generators for a batch of {mean.shape[0]} images; pass one per image")
            eps = torch.stack([_normal(mean.shape[1:], g, mean) for g in generator])
        else:
            eps = _normal(mean.shape, generator, mean)
        return mean + torch.exp(0.5 * logvar) * eps

    # -- tokenizer API -----------------------------------------------------------------------
    def encode(self, images: Tensor, sample: bool = False,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, h, w, D]``.

        The posterior mean by default (deterministic); ``sample=True`` draws from the posterior as MAR's
        training does (``generator`` makes the draw reproducible).
        """
        mean, logvar = self.encode_moments(images)
        z = self.sample_posterior(mean, logvar, generator) if sample else mean
        return self.scale(z).permute(0, 2, 3, 1).contiguous()

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, h, w, D]`` -> images ``[B, C, H, W]``, unclamped (nominally [-1, 1])."""
        d = self.config.latent_dim
        check(
            isinstance(latents, Tensor) and latents.ndim == 4 and latents.shape[-1] == d,
            f"decode expects latents of shape [B, h, w, {d}] (channels last); got {_describe(latents)}",
        )
        check(latents.is_floating_point(), f"decode expects floating-point latents; got dtype {latents.dtype}")
        z = self.unscale(latents.permute(0, 3, 1, 2))
        return self.decode_latents(z.to(self.model.decoder.conv_in.weight.dtype).contiguous())

    def scale(self, z: Tensor) -> Tensor:
        """Raw latents -> tokens' scale: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, tokens: Tensor) -> Tensor:
        """Inverse of :meth:`scale`."""
        return tokens / self.config.scaling_factor + self.config.shift_factor

    def forward(self, images: Tensor, sample: bool = True,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> KLOutput:
        """Training pass: encode, draw from the posterior (reparameterised), decode."""
        mean, logvar = self.encode_moments(images)
        z = self.sample_posterior(mean, logvar, generator) if sample else mean
        return KLOutput(self.decode_latents(z), mean, logvar, z)

    def training_loss(self, images: Tensor, out: KLOutput | None = None) -> tuple[Tensor, dict[str, float]]:
        """``mse + l1`` reconstruction (as the VQ tokenizers' training) ``+ kl_weight * KL``.

        The KL is averaged over latent elements, as the reconstruction terms are over pixels. LDM instead
        sums both per image; its ``kl_weight`` 1e-6 at 256 px and KL-16 corresponds to
        ``1e-6 * (16*16*16) / (3*256*256) ~ 2e-8`` here. ``out``: the result of ``self(images)`` when the
        caller has already run the forward (through DDP or an adversarial wrapper).
        """
        out = self(images) if out is None else out
        recon = F.mse_loss(out.recon, images) + F.l1_loss(out.recon, images)
        kl = out.kl()
        loss = recon + self.config.kl_weight * kl
        with torch.no_grad():
            std = float(self.scale(out.mean).std()) if out.mean.numel() > 1 else 0.0
            post_std = float(torch.exp(0.5 * out.logvar).mean() * abs(self.config.scaling_factor))
        return loss, {"recon": recon.item(), "kl": kl.item(), "latent_std": std, "posterior_std": post_std}

    # -- diffusers folders -------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, folder: str | os.PathLike, kl_weight: float | None = None) -> "KLTokenizer":
        """Load a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
        or ``.bin``) offline, strictly, with its scaling and shift factors. A pipeline folder (with
        ``model_index.json``) is read from its ``vae/`` subfolder."""
        folder = Path(folder)
        if (folder / "model_index.json").is_file() and (folder / "vae").is_dir():
            folder = folder / "vae"
        if not folder.is_dir():
            raise ModelNotFoundError(f"diffusers folder not found: {folder}")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"{folder} has no config.json; pass a diffusers AutoencoderKL folder")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
        config = config_from_diffusers(raw, str(cfg_path))
        if kl_weight is not None:
            config.kl_weight = kl_weight
        state = _read_diffusers_weights(folder)
        tok = cls(config)
        load_state_dict_strict(tok.model, _rename_deprecated_attention(state), str(folder))
        return tok.eval()

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


def config_from_diffusers(raw: dict, source: str = "config") -> KLConfig:
    """The :class:`KLConfig` of a diffusers ``AutoencoderKL`` config dict; refuses what varkit cannot host."""
    name = raw.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise CheckpointError(f"{source} describes a {name}, not an AutoencoderKL; varkit's KLTokenizer "
                              "hosts diffusers' AutoencoderKL only")
    if raw.get("latents_mean") is not None or raw.get("latents_std") is not None:
        raise CheckpointError(f"{source} normalises latents per channel (latents_mean/latents_std), which "
                              "KLTokenizer does not support; it scales by one scaling_factor")
    in_ch, out_ch = raw.get("in_channels", 3), raw.get("out_channels", 3)
    if in_ch != out_ch:
        raise CheckpointError(f"{source} has in_channels={in_ch} but out_channels={out_ch}; KLTokenizer "
                              "reconstructs the input's channels")
    defaults = KLConfig()
    try:
        return KLConfig(
            in_channels=int(in_ch),
            block_out_channels=tuple(int(c) for c in raw.get("block_out_channels", (64,))),
            layers_per_block=int(raw.get("layers_per_block", 1)),
            latent_dim=int(raw.get("latent_channels", 4)),
            norm_groups=int(raw.get("norm_num_groups", 32)),
            down_block_types=tuple(raw.get("down_block_types", ("DownEncoderBlock2D",))),
            up_block_types=tuple(raw.get("up_block_types", ("UpDecoderBlock2D",))),
            mid_attention=bool(raw.get("mid_block_add_attention", True)),
            use_quant_conv=bool(raw.get("use_quant_conv", True)),
            use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
            act_fn=str(raw.get("act_fn", "silu")),
            scaling_factor=float(raw.get("scaling_factor", 0.18215)),
            shift_factor=float(raw.get("shift_factor") or 0.0),
            kl_weight=defaults.kl_weight,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has a malformed AutoencoderKL field ({exc})") from None


def _read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..io import load_torch_checkpoint

    for name in _DIFFUSERS_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}; download it again") from None
        sd = load_torch_checkpoint(path, "diffusers AutoencoderKL weights")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
        return sd
    raise ModelNotFoundError(f"{folder} has none of {', '.join(_DIFFUSERS_WEIGHTS)} (sharded or variant-only "
                             "folders are not supported: save the VAE with save_pretrained first)")


def _rename_deprecated_attention(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old diffusers files name the attention projections query/key/value/proj_attn (diffusers renames them
    on load too)."""
    old = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for a, b in old.items():
                k = k.replace(a, b)
        out[k] = v
    return out


def _normal(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return eps.to(device=like.device, dtype=like.dtype)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    return type(x).__name__


def _validate(cfg: KLConfig) -> None:
    n = len(cfg.block_out_channels)
    check(n >= 1, "block_out_channels must name at least one level")
    for name in ("in_channels", "layers_per_block", "latent_dim", "norm_groups"):
        value = getattr(cfg, name)
        check(isinstance(value, int) and value >= 1, f"{name} must be a positive integer; got {value!r}")
    bad = [c for c in cfg.block_out_channels if not isinstance(c, int) or c < 1 or c % cfg.norm_groups]
    check(not bad, f"every block_out_channels entry ({list(cfg.block_out_channels)}) must be a positive "
                   f"multiple of norm_groups={cfg.norm_groups}")
    check(len(cfg.down_block_types) == n and all(t in _DOWN_TYPES for t in cfg.down_block_types),
          f"down_block_types must list {n} of {_DOWN_TYPES}; got {list(cfg.down_block_types)}")
    check(len(cfg.up_block_types) == n and all(t in _UP_TYPES for t in cfg.up_block_types),
          f"up_block_types must list {n} of {_UP_TYPES}; got {list(cfg.up_block_types)}")
    check(isinstance(cfg.act_fn, str) and cfg.act_fn.lower() in ACTIVATIONS,
          f"act_fn must be one of {sorted(ACTIVATIONS)}; got {cfg.act_fn!r}")
    check(isinstance(cfg.scaling_factor, (int, float)) and cfg.scaling_factor > 0,
          f"scaling_factor must be > 0; got {cfg.scaling_factor!r}")
    check(cfg.kl_weight >= 0, f"kl_weight must be >= 0; got {cfg.kl_weight}")
