"""Tokenizers: VQ (LlamaGen-style), multi-scale residual VQ (VAR), KL-VAE (MAR), and their named configs."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import ModelNotFoundError
from ..registry import Registry
from .kl import KLConfig, KLTokenizer
from .msvq import MSVQConfig, MultiScaleVQTokenizer
from .vq import VQConfig, VQTokenizer

# name -> (class, config); the bundled models' tokenizers are built from these.
TOKENIZER_CONFIGS: Registry[tuple[type, Any]] = Registry("tokenizer config", ModelNotFoundError)
for _name, _entry in {
    "llamagen-vq16": (VQTokenizer, VQConfig()),
    "llamagen-vq8": (VQTokenizer, VQConfig(ch_mult=(1, 2, 2, 4))),
    "var-vae-ch160v4096z32": (MultiScaleVQTokenizer, MSVQConfig()),
    "digits-msvq": (MultiScaleVQTokenizer, MSVQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                                                      codebook_size=128, patch_nums=(1, 2, 3, 4, 6, 8),
                                                      norm_num_groups=8)),
    "digits-vq": (VQTokenizer, VQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32,
                                        codebook_size=128, codebook_dim=8, norm_groups=8,
                                        entropy_loss_ratio=0.05)),
    "mar-kl16": (KLTokenizer, KLConfig()),
    # 32 px digits -> 8x8 latents of 4 channels; `varkit train tokenizer` sets scaling_factor from the data
    "digits-kl": (KLTokenizer, KLConfig(block_out_channels=(16, 32, 32), layers_per_block=1, latent_dim=4,
                                        norm_groups=8, down_block_types=("DownEncoderBlock2D",) * 2
                                        + ("AttnDownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",) * 3,
                                        scaling_factor=1.0, kl_weight=1e-4)),
}.items():
    TOKENIZER_CONFIGS.register(_name, _entry)


def create_tokenizer(name: str, **overrides: Any):
    """Build a tokenizer from a named config with random weights."""
    cls, cfg = TOKENIZER_CONFIGS.lookup(name)
    return cls(replace(cfg, **overrides))


__all__ = ["VQConfig", "VQTokenizer", "MSVQConfig", "MultiScaleVQTokenizer", "KLConfig", "KLTokenizer", "TOKENIZER_CONFIGS", "create_tokenizer"]
