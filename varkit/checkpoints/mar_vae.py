"""Load MAR's KL-16 VAE (``kl16.ckpt``, LTH14/mar) as a :class:`~varkit.tokenizers.kl.KLTokenizer`.

The file holds ``{"model": state_dict}`` of MAR's ``models/vae.py: AutoencoderKL(embed_dim=16,
ch_mult=(1, 1, 2, 2, 4))``, in LDM's key names. diffusers' ``AutoencoderKL`` hosts it exactly: the mapping
below only renames keys and reshapes the attention's 1x1 convs to linears. diffusers' own LDM converter
(``convert_ldm_vae_checkpoint``) is not used: it drops the encoder's level-4 attention (``encoder.down.4.attn``).
Scaling factor 0.2325 is MAR's (``engine_mar.py``); FlowAR uses the same VAE and factor.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..tokenizers.kl import KLConfig, KLTokenizer
from .common import load_checkpoint, module_from_state_dict, select_state_dict, strip_prefixes, tensors_of
from .var_vae import ldm_prefix_to_diffusers

__all__ = ["MAR_KL16_CONFIG", "is_ldm_kl_vae_state_dict", "kl_state_dict_from_ldm", "load_mar_vae", "load_mar_vae_for"]

MAR_KL16_CONFIG = KLConfig()  # KLConfig's defaults are MAR's KL-16
_WHAT = "MAR KL-16 VAE checkpoint (kl16.ckpt)"
_TRAINING_ONLY = ("loss.",)  # LDM training files keep the LPIPS/discriminator under loss.*; not part of the VAE
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def is_ldm_kl_vae_state_dict(sd: Mapping[str, object]) -> bool:
    """True when ``sd`` has the keys of an LDM KL-VAE (encoder/decoder in LDM names, no VQ codebook)."""
    return ("encoder.conv_in.weight" in sd and "decoder.conv_out.weight" in sd and "quant_conv.weight" in sd
            and "encoder.down.0.block.0.conv1.weight" in sd and not any(k.startswith("quantize.") for k in sd))


def _describe(sd: Mapping[str, object]) -> str:
    keys = [k for k in sd if isinstance(k, str)]
    if any(k.startswith("encoder.conv_blocks.") for k in keys) or "quantize.codebook_used" in sd:
        return "it looks like a LlamaGen VQ tokenizer (load it with varkit.checkpoints.llamagen_vq)"
    if any(k.startswith("quantize.") for k in keys) and any(k.startswith("encoder.down.") for k in keys):
        return "it looks like a VQ autoencoder (VAR's VQVAE or a VQGAN), which has a codebook; not a KL-VAE"
    if any(k.startswith(("encoder_blocks.", "diffloss.", "decoder_blocks.")) for k in keys) or "z_proj.weight" in sd:
        return "it looks like a MAR generator (mar_*/checkpoint-last.pth), not the KL-16 VAE (kl16.ckpt)"
    if "class_emb.weight" in sd and any(k.startswith("blocks.") for k in keys):
        return "it looks like a VAR transformer, not a VAE"
    if any(k.startswith("first_stage_model.") for k in keys):
        return "it looks like a whole latent-diffusion checkpoint; extract its first_stage_model.* VAE first"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return ("it looks like a diffusers-format autoencoder; load its folder with "
                "KLTokenizer.from_diffusers instead")
    if is_ldm_kl_vae_state_dict(sd):
        cfg = _shape_summary(sd)
        return f"it is an LDM KL-VAE but not MAR's KL-16 ({cfg})"
    return f"its first keys are {keys[:4]}"


def _shape_summary(sd: Mapping[str, Tensor]) -> str:
    try:
        ch = int(sd["encoder.conv_in.weight"].shape[0])
        levels = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m)
        mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels))
        z = int(sd["quant_conv.weight"].shape[0]) // 2
        return f"latent dim {z}, ch {ch}, ch_mult {mult}; KL-16 has latent dim 16, ch 128, ch_mult (1, 1, 2, 2, 4)"
    except (KeyError, AttributeError, IndexError, ValueError):
        return "its shapes differ from KL-16's"


def _rename(key: str, n_levels: int) -> str | None:
    """LDM key -> diffusers ``AutoencoderKL`` key (without the tokenizer's ``model.`` prefix); None if unknown."""
    prefix, _, param = key.rpartition(".")
    base, _, part = prefix.rpartition(".")
    if part in _ATTN:
        mapped = ldm_prefix_to_diffusers(base, n_levels)
        if mapped is not None and mapped[0] == "attn":
            return f"{mapped[1]}.{_ATTN[part]}.{param}"
    mapped = ldm_prefix_to_diffusers(prefix, n_levels)
    return f"{mapped[1]}.{param}" if mapped is not None and mapped[0] == "plain" else None


def kl_state_dict_from_ldm(sd: Mapping[str, Tensor], n_levels: int = 5) -> dict[str, Tensor]:
    """An LDM/MAR KL-VAE state dict -> :class:`KLTokenizer` state dict (``model.``-prefixed diffusers names).

    Exact: renames, and the attention's 1x1 conv weights ``(C, C, 1, 1)`` become linear ``(C, C)``.
    Training-only ``loss.*`` entries are dropped; any other unknown key raises :class:`CheckpointError`.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_TRAINING_ONLY):
            continue
        new = _rename(key, n_levels)
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in an LDM KL-VAE state dict; is this MAR's kl16.ckpt?")
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[f"model.{new}"] = value
    return out


def load_mar_vae(path: str | os.PathLike) -> KLTokenizer:
    """Load MAR's ``kl16.ckpt`` as a :class:`KLTokenizer` (eval mode, fp32, scaling factor 0.2325).

    Reads the file with ``torch.load(weights_only=True)``, takes its ``"model"`` state dict (or a raw state
    dict) and loads it strictly; any other file raises :class:`CheckpointError` saying what it looks like.
    """
    ckpt = load_checkpoint(path, _WHAT)
    source = str(path)
    sd = strip_prefixes(select_state_dict(ckpt, source, _WHAT, wrappers=("model", "state_dict")))
    if not is_ldm_kl_vae_state_dict(sd):
        raise CheckpointError(f"{source} is not MAR's KL-16 VAE: {_describe(sd)}")
    try:
        state = kl_state_dict_from_ldm(sd, len(MAR_KL16_CONFIG.block_out_channels))
        return module_from_state_dict(KLTokenizer, MAR_KL16_CONFIG, state, source)
    except CheckpointError as exc:
        raise CheckpointError(f"{source} is not MAR's KL-16 VAE: {_describe(sd) if _differs(sd) else exc}") from None


def _differs(sd: Mapping[str, Tensor]) -> bool:
    """True when the file's shapes say it is another LDM KL-VAE (so the shape summary is the clearer message)."""
    try:
        return (int(sd["quant_conv.weight"].shape[0]) != 2 * MAR_KL16_CONFIG.latent_dim
                or int(sd["encoder.conv_in.weight"].shape[0]) != MAR_KL16_CONFIG.block_out_channels[0]
                or f"encoder.down.{len(MAR_KL16_CONFIG.block_out_channels)}.block.0.conv1.weight" in sd
                or f"encoder.down.{len(MAR_KL16_CONFIG.block_out_channels) - 1}.block.0.conv1.weight" not in sd)
    except (KeyError, AttributeError, IndexError):
        return False


def load_mar_vae_for(vae: str | os.PathLike, generator: str | os.PathLike, token_dim: int, *, family: str,
                     generator_keys: Sequence[str], entries: Sequence[str | None] = (None,),
                     model: str, note: str = "") -> KLTokenizer:
    """MAR's KL-16 VAE for a generator of ``family`` ("MAR", "FlowAR") that takes ``token_dim``-channel tokens.

    One clear line when the generator file was given as the VAE (it holds every ``generator_keys`` at the top
    level, or under one of ``entries``; the file is memory-mapped: cheap) and when the two are not a pair
    (``model`` names the generator in that line, ``note`` ends it)."""
    ckpt = load_checkpoint(vae, _WHAT)
    if isinstance(ckpt, Mapping):
        for cand in (ckpt.get(e) if e else ckpt for e in entries):
            if isinstance(cand, Mapping) and all(k in tensors_of(cand) for k in generator_keys):
                raise CheckpointError(f"{vae} is a {family} generator checkpoint, not MAR's KL-16 VAE; pass it as "
                                      f"--{family.lower()} and kl16.ckpt as --vae")
    tokenizer = load_mar_vae(vae)
    if tuple(tokenizer.token_shape) != (token_dim,):
        raise CheckpointError(
            f"{Path(vae).name} and {Path(generator).name} are not a {family} pair: {model} takes {token_dim}-channel "
            f"tokens but the VAE's latents have {tokenizer.token_shape[0]}{note}")
    return tokenizer
