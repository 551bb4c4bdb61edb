"""Convert MAR's published checkpoints (LTH14/mar: MAR-B/L/H ``checkpoint-last.pth`` + ``kl16.ckpt``).

MAR's training script saves ``{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}``
(``util/misc.py: save_model``); the published files keep ``model`` and ``model_ema``, and MAR's demo and
evaluation sample with the EMA weights, so those are taken (``ema=False``: ``model``).
:class:`~varkit.models.mar.MARGenerator` keeps MAR's parameter names except the diffusion MLP:

=======================  ====================
MAR                      varkit
=======================  ====================
``diffloss.net.*``       ``head.net.*``
=======================  ====================

Everything else (``class_emb``, ``fake_latent``, ``z_proj``, ``encoder_blocks.{i}.attn.qkv`` …) maps 1:1.
The size (base/large/huge) is read from the widths and depths; heads come from MAR's size table
(``heads=`` for a MAR of another size). The VAE is :func:`varkit.checkpoints.mar_vae.load_mar_vae`'s.
The folder's sampling defaults are MAR's published evaluation settings (README): CFG 2.9 / 3.0 / 3.2
on the linear schedule, temperature 1.0, 100 diffusion steps; 64 decode steps (MAR's default
``num_iter``; its FID runs use 256).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import refuse_existing
from ..models.mar import MARConfig, MARGenerator
from .arguments import add_convert_mar_arguments  # noqa: F401 (public: defined without torch for the CLI)
from .common import (TOP_LEVEL, converted_record, count_indexed,
                     describe_other_generator, file_record, load_checkpoint, module_from_state_dict, published_heads,
                     read_converted, require_keys, save_converted_pipeline, select_required_state_dict, shape_of)

__all__ = [
    "MAR_DEFAULTS",
    "MAR_SIZES",
    "EncoderDecoderShapes",
    "encoder_decoder_shapes",
    "add_convert_mar_arguments",
    "cmd_convert_mar",
    "convert_mar",
    "generator_from_mar_state_dict",
    "load_mar",
    "mar_config_from_state_dict",
    "mar_state_dict_from_official",
    "mar_state_dict_to_official",
    "select_mar_state_dict",
]

WHAT = "MAR checkpoint (checkpoint-last.pth)"
OFFICIAL_HEAD, HEAD = "diffloss.net.", "head.net."
_REQUIRED = ("fake_latent", "class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "mask_token",
             "decoder_embed.weight", "diffusion_pos_embed_learned", "diffloss.net.input_proj.weight")

# (width, encoder depth, decoder depth) -> (MAR's model name, heads, DiffLoss depth, DiffLoss width)
MAR_SIZES = {
    (768, 12, 12): ("mar_base", 12, 6, 1024),
    (1024, 16, 16): ("mar_large", 16, 8, 1280),
    (1280, 20, 20): ("mar_huge", 16, 12, 1536),
}
# README evaluation commands (cfg per size, linear schedule, temperature 1.0, 100 diffusion steps);
# num_iter 64 is main_mar.py's default and the README's fast setting (its FID runs use 256)
_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}
MAR_DEFAULTS = {name: {"cfg": cfg, "cfg_schedule": "linear", "temperature": 1.0, "num_iter": 64, "head_steps": 100}
                for name, cfg in _CFG.items()}
_CUSTOM_DEFAULTS = {"cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0, "num_iter": 64, "head_steps": 100}


# -- reading files -----------------------------------------------------------------------------------
def _foreign(keys: set[str]) -> str | None:
    """What a non-MAR state dict is, when recognisable, with what to do."""
    if "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys and not any(k.startswith("quantize.") for k in keys):
        return "MAR's KL-16 VAE (kl16.ckpt); pass it as --vae and the MAR file (checkpoint-last.pth) as --mar"
    other = describe_other_generator(keys, "MAR")
    if other is not None:
        return other
    if any(k.startswith("head.net.") for k in keys) and "fake_latent" in keys:
        return "already in varkit's format (a MARGenerator state dict); load it with varkit.load_pipeline"
    return None


def select_mar_state_dict(ckpt: Any, source: str, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """(MAR weights, which entry they came from) of a loaded file: ``model_ema`` (with ``ema``, when present
    and not None), else ``model``, else the file's top level (a raw state dict)."""
    order = ("model_ema", "model") if ema else ("model",)
    return select_required_state_dict(ckpt, source, WHAT, (*order, "state_dict", "module", TOP_LEVEL), _REQUIRED,
                                      _foreign, hint="; pass MAR's checkpoint-last.pth (mar_base, mar_large or "
                                      "mar_huge) as --mar")


# -- key mapping ---------------------------------------------------------------------------------------
def mar_state_dict_from_official(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """MAR state dict → :class:`MARGenerator` state dict (``diffloss.net.`` → ``head.net.``)."""
    sd = require_keys(sd, source, WHAT, _REQUIRED, _foreign)
    out = {}
    for k, v in sd.items():
        if k.startswith(OFFICIAL_HEAD):
            out[HEAD + k[len(OFFICIAL_HEAD):]] = v
        elif k.startswith("diffloss."):
            raise CheckpointError(f"{source}: unexpected key {k!r} in MAR's diffusion loss (only diffloss.net.* holds weights)")
        else:
            out[k] = v
    return out


def mar_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`MARGenerator` state dict → MAR's (``head.net.`` → ``diffloss.net.``)."""
    return {(OFFICIAL_HEAD + k[len(HEAD):] if k.startswith(HEAD) else k): v for k, v in sd.items()}


class EncoderDecoderShapes(NamedTuple):
    """The sizes of MAR's encoder-decoder layout (which FlowAR keeps), read off a converted state dict."""

    classes: int
    width: int
    token_dim: int
    decoder_width: int
    decoder_in: int
    encoder_positions: int
    head_positions: int
    head_width: int
    mlp_hidden: int
    encoder_depth: int
    decoder_depth: int
    head_depth: int


def encoder_decoder_shapes(sd: Mapping[str, Tensor], source: str, what: str,
                           mlp: str = "encoder_blocks.0.mlp.fc1.weight") -> EncoderDecoderShapes:
    """:class:`EncoderDecoderShapes` of ``sd`` (varkit names; ``mlp`` is the first MLP layer's weight); a
    :class:`CheckpointError` naming the incomplete ``what`` when a key is missing."""
    V, E = shape_of(sd, "class_emb.weight", source, what)
    _, D = shape_of(sd, "z_proj.weight", source, what)
    Dd, E2 = shape_of(sd, "decoder_embed.weight", source, what)
    _, N, _ = shape_of(sd, "diffusion_pos_embed_learned", source, what)
    _, L, _ = shape_of(sd, "encoder_pos_embed_learned", source, what)
    hw, _ = shape_of(sd, HEAD + "input_proj.weight", source, what)
    hidden = shape_of(sd, mlp, source, what)[0]
    return EncoderDecoderShapes(V, E, D, Dd, E2, L, N, hw, hidden, count_indexed(sd, "encoder_blocks.", source),
                                count_indexed(sd, "decoder_blocks.", source), count_indexed(sd, HEAD + "res_blocks.", source))


def mar_config_from_state_dict(sd: Mapping[str, Tensor], source: str = "state dict", *, size: str | None = None,
                               heads: int | None = None) -> tuple[MARConfig, str]:
    """The :class:`MARConfig` of a converted MAR state dict (``head.net.*`` names) and its MAR size name.

    Widths, depths, grid, buffer, token and DiffLoss sizes come from the shapes; the attention heads from
    MAR's size table, or ``heads`` for a MAR of another size (else :class:`CheckpointError` naming the
    shapes found). ``size`` ("base", "mar_large", "mar-huge" …) must agree with the weights.
    """
    V, E, D, Dd, E2, L, N, hw, hidden, enc, dec, hd = encoder_decoder_shapes(sd, source, WHAT)
    grid = math.isqrt(N)
    if grid * grid != N:
        raise CheckpointError(f"{source}: diffusion_pos_embed_learned has {N} positions, not a square token grid")
    if E2 != E or L <= N or hidden % E:
        raise CheckpointError(f"{source}: inconsistent MAR shapes (class_emb {E} wide, decoder_embed {(Dd, E2)}, "
                              f"{L} encoder positions for {N} tokens, MLP hidden {hidden})")
    found = f"width {E}/{Dd}, depth {enc}+{dec}, DiffLoss {hd}x{hw}"
    table = MAR_SIZES.get((E, enc, dec)) if E == Dd else None
    if size is not None:
        want = size.lower().replace("-", "_")
        want = want if want.startswith("mar_") else f"mar_{want}"
        named = {v[0]: k for k, v in MAR_SIZES.items()}
        if want not in named:
            raise InvalidArgumentError(f"unknown MAR size {size!r}; choose base, large or huge")
        if table is None or table[0] != want:
            raise CheckpointError(f"{source} has {found}, which is not {want} (width {named[want][0]}, depth "
                                  f"{named[want][1]}+{named[want][2]}); drop --size to infer it")
    heads = published_heads(heads, table, source, "MAR", found, ", ".join(
        f"{v[0]} (width {k[0]}, depth {k[1]}+{k[2]})" for k, v in MAR_SIZES.items()))
    if E % heads or Dd % heads:
        raise InvalidArgumentError(f"{heads} attention heads do not divide the widths {E}/{Dd}")
    cfg = MARConfig(token_dim=int(D), grid=grid, num_classes=int(V), encoder_dim=int(E), encoder_depth=enc,
                    encoder_heads=heads, decoder_dim=int(Dd), decoder_depth=dec, decoder_heads=heads,
                    mlp_ratio=hidden / E, buffer_size=int(L - N), head_depth=hd, head_width=int(hw),
                    num_iter=min(64, N))
    return cfg, (table[0] if table else f"mar_w{E}_d{enc}")


def generator_from_mar_state_dict(sd: Mapping[str, Tensor], config: MARConfig, source: str = "state dict") -> MARGenerator:
    """A :class:`MARGenerator` holding the converted weights ``sd`` (strict, fp32, no second copy)."""
    return module_from_state_dict(MARGenerator, config, sd, source)


def _read_mar(path, ema: bool, size: str | None, heads: int | None):
    """(converted state dict, config, size name, entry used) of a MAR file; nothing written."""
    raw, entry = select_mar_state_dict(load_checkpoint(path, WHAT), str(path), ema)
    sd = mar_state_dict_from_official(raw, str(path))
    cfg, name = mar_config_from_state_dict(sd, str(path), size=size, heads=heads)
    return sd, cfg, name, entry


def load_mar(path: str | os.PathLike, *, ema: bool = True, size: str | None = None,
             heads: int | None = None) -> MARGenerator:
    """Load a MAR ``checkpoint-last.pth`` (EMA weights by default) as a :class:`MARGenerator`."""
    sd, cfg, _, _ = _read_mar(path, ema, size, heads)
    return generator_from_mar_state_dict(sd, cfg, str(path))


# -- the whole pipeline ------------------------------------------------------------------------------
def convert_mar(
    vae: str | os.PathLike,
    mar: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: str | None = None,
    ema: bool = True,
    heads: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert MAR's KL-16 VAE + a MAR checkpoint into a varkit pipeline folder ``out``.

    Both files are read and checked before anything is written; the folder is built next to ``out``
    and renamed into place, so an error leaves no partial output. Defaults: :data:`MAR_DEFAULTS`.
    """
    from . import mar_vae

    out = refuse_existing(out, overwrite)
    sd, cfg, size_name, entry = _read_mar(mar, ema, size, heads)
    tokenizer = mar_vae.load_mar_vae_for(vae, mar, cfg.token_dim, family="MAR", model="the MAR model",
                                         generator_keys=("fake_latent", "z_proj.weight"),
                                         entries=(None, "model", "model_ema"),
                                         note=" (MAR with patch_size > 1 is not supported)")
    generator = generator_from_mar_state_dict(sd, cfg, str(mar))
    px = cfg.grid * tokenizer.downsample
    defaults = dict(MAR_DEFAULTS.get(size_name, {**_CUSTOM_DEFAULTS, "num_iter": cfg.num_iter}))
    return save_converted_pipeline(out, overwrite, tokenizer, generator, defaults,
                                   name or f"{size_name.replace('_', '-')}-{px}",
                                   converted_record("mar", {"vae": file_record(vae), "mar": file_record(mar, weights=entry)},
                                                    size_name, px, cfg, defaults, grid=cfg.grid))


def cmd_convert_mar(args) -> None:
    """``varkit convert mar``: see :func:`convert_mar`."""
    out = convert_mar(args.vae, args.mar, args.out, size=args.size, ema=args.ema, heads=args.heads, name=args.name,
                      overwrite=args.overwrite)
    g, conv = read_converted(out)
    print(f"wrote {out}/ ({conv['mar_model']}: {g['encoder_dim']}d x {g['encoder_depth']}+{g['decoder_depth']} blocks, "
          f"DiffLoss {g['head_depth']}x{g['head_width']}, {g['grid']}x{g['grid']} tokens of {g['token_dim']} channels "
          f"({conv['image_size']} px), {conv['mar']['weights']} weights); "
          f"load it with varkit.load_pipeline({str(out)!r})")
