"""Convert FlowAR's published checkpoints (wangqiang9/FlowAR: ``FlowAR-S/L/H.pth`` + MAR's ``kl16.ckpt``).

The published files are raw fp32 state dicts of ``models/flowar.py: FlowAR`` (``eval.py`` calls
``load_state_dict(torch.load(...))``); a training checkpoint's ``model_ema`` / ``model`` entries are read
too. :class:`~varkit.models.flowar.FlowARGenerator` keeps FlowAR's names except:

===================================  ====================================
FlowAR                               varkit
===================================  ====================================
``flownet.*``                        ``head.net.*`` (the flow head)
``{encoder,decoder}_blocks.i.attn.qkv``  ``….attn.wqkv`` (varkit's Attention)
``{encoder,decoder}_blocks.i.attn.proj`` ``….attn.wo``
``mask``, ``*.rope.freqs``           dropped (buffers derived from the sizes)
===================================  ====================================

The size (S/L/H) is read from the widths and depths (heads from FlowAR's size table, or ``heads=`` for another
size); the scales from the position embeddings (1, 2, 4, … up to the latent side). The folder's sampling
defaults are FlowAR's README evaluation settings: S 25 steps, CFG 4.3, guidance interval 0.9; L 25, 2.4, 0.9;
H 50, 2.4, 0.7; on the ``linear`` CFG schedule, which on the scales layout is FlowAR's per-scale ramp
``(cfg − 1)·k/(K − 1) + 1`` (scale 1 unguided).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import refuse_existing
from ..models.flowar import FlowARConfig, FlowARGenerator
from .arguments import add_convert_flowar_arguments  # noqa: F401 (public: defined without torch for the CLI)
from .common import (TOP_LEVEL, converted_record, describe_other_generator,
                     file_record, load_checkpoint, module_from_state_dict, published_heads, read_converted,
                     require_keys, save_converted_pipeline, select_required_state_dict)
from .mar import encoder_decoder_shapes

__all__ = [
    "FLOWAR_DEFAULTS",
    "FLOWAR_SIZES",
    "add_convert_flowar_arguments",
    "cmd_convert_flowar",
    "convert_flowar",
    "flowar_config_from_state_dict",
    "flowar_state_dict_from_official",
    "flowar_state_dict_to_official",
    "generator_from_flowar_state_dict",
    "load_flowar",
    "select_flowar_state_dict",
]

WHAT = "FlowAR checkpoint (FlowAR-S.pth, FlowAR-L.pth or FlowAR-H.pth)"
OFFICIAL_HEAD, HEAD = "flownet.", "head.net."
_REQUIRED = ("class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "decoder_embed.weight",
             "diffusion_pos_embed_learned", "flownet.input_proj.weight")
_ATTN = {"qkv": "wqkv", "proj": "wo"}  # FlowAR's attention projections -> varkit's Attention
_DERIVED = re.compile(r"^(mask|.*\.rope\.freqs)$")

# (width, encoder depth, decoder depth, head depth, head width, cross) -> (name, attention heads)
FLOWAR_SIZES = {
    (768, 6, 6, 2, 1024, False): ("flowar_small", 12),
    (1024, 8, 8, 12, 1024, True): ("flowar_large", 16),
    (1536, 15, 15, 12, 1536, True): ("flowar_huge", 16),
}
# README evaluation commands (eval.sh differs: S cfg 4.2, H cfg 2.8; the README's are the published ones)
FLOWAR_DEFAULTS = {
    "flowar_small": {"head_steps": 25, "cfg": 4.3, "guidance_interval": 0.9},
    "flowar_large": {"head_steps": 25, "cfg": 2.4, "guidance_interval": 0.9},
    "flowar_huge": {"head_steps": 50, "cfg": 2.4, "guidance_interval": 0.7},
}
_COMMON = {"cfg_schedule": "linear", "temperature": 1.0}
_CUSTOM = {"head_steps": 25, "cfg": 2.4, "guidance_interval": 0.9}  # sizes FlowAR did not publish: L's settings


# -- reading files -----------------------------------------------------------------------------------
def _foreign(keys: set[str]) -> str | None:
    """What a non-FlowAR state dict is, when recognisable, with what to do."""
    if "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys and not any(k.startswith("quantize.") for k in keys):
        return "MAR's KL-16 VAE (kl16.ckpt); pass it as --vae and the FlowAR file as --flowar"
    if "fake_latent" in keys or any(k.startswith("diffloss.") for k in keys):
        return "a MAR checkpoint; convert it with `varkit convert mar`"
    other = describe_other_generator(keys, "FlowAR")
    if other is not None:
        return other
    if any(k.startswith(HEAD) for k in keys) and "class_emb.weight" in keys:
        return "already in varkit's format (a FlowARGenerator state dict); load it with varkit.load_pipeline"
    return None


def select_flowar_state_dict(ckpt: Any, source: str, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """(FlowAR weights, which entry they came from) of a loaded file: the file's top level (the published raw
    state dicts), else a training checkpoint's ``model_ema`` (with ``ema``) or ``model``."""
    order = ("model_ema", "model") if ema else ("model",)
    return select_required_state_dict(ckpt, source, WHAT, (TOP_LEVEL, *order, "state_dict", "module"), _REQUIRED,
                                      _foreign, fallback=-1)


# -- key mapping ---------------------------------------------------------------------------------------
def flowar_state_dict_from_official(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """FlowAR state dict → :class:`FlowARGenerator` state dict (see the module docstring's table)."""
    sd = require_keys(sd, source, WHAT, _REQUIRED, _foreign)
    return _renamed(sd, OFFICIAL_HEAD, HEAD, _ATTN, skip=_DERIVED)


def flowar_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`FlowARGenerator` state dict → FlowAR's (without the derived ``mask``/``rope.freqs`` buffers)."""
    return _renamed(sd, HEAD, OFFICIAL_HEAD, {v: k for k, v in _ATTN.items()})


def _renamed(sd: Mapping[str, Tensor], head_from: str, head_to: str, attn: Mapping[str, str],
             skip: re.Pattern | None = None) -> dict[str, Tensor]:
    """``sd`` with the head's prefix ``head_from`` → ``head_to``, the blocks' attention projections renamed by
    ``attn`` and the keys ``skip`` matches dropped: the one renaming both directions share."""
    pattern = re.compile(r"^((?:encoder|decoder)_blocks\.\d+\.attn\.)(" + "|".join(attn) + r")\.(weight|bias)$")
    out = {}
    for k, v in sd.items():
        if skip is not None and skip.match(k):
            continue
        if k.startswith(head_from):
            out[head_to + k[len(head_from):]] = v
            continue
        m = pattern.match(k)
        out[f"{m.group(1)}{attn[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def scales_for_tokens(n: int) -> tuple[int, ...] | None:
    """FlowAR's doubling scales 1, 2, 4, …, G whose squares sum to ``n`` tokens (341 → up to 16); None if none."""
    sides, total, s = [], 0, 1
    while total < n:
        sides.append(s)
        total += s * s
        s *= 2
    return tuple(sides) if total == n else None


def flowar_config_from_state_dict(sd: Mapping[str, Tensor], source: str = "state dict", *,
                                  heads: int | None = None) -> tuple[FlowARConfig, str]:
    """The :class:`FlowARConfig` of a converted FlowAR state dict (varkit names) and its FlowAR size name.

    Widths, depths, scales, token and head sizes come from the shapes; the attention heads from FlowAR's size
    table, or ``heads`` for a FlowAR of another size (else one :class:`CheckpointError` line naming what was found).
    """
    V, C, D, Cd, Ce, N, Nd, hw, hidden, enc, dec, hd = encoder_decoder_shapes(
        sd, source, WHAT, mlp="encoder_blocks.0.mlp.fc1_g.weight")
    cross = HEAD + "res_blocks.0.crossattn.q.weight" in sd
    if Ce != C or Cd != C:
        raise CheckpointError(f"{source}: encoder width {C} and decoder width {Cd} differ; varkit's FlowAR needs one width")
    if Nd != N:
        raise CheckpointError(f"{source}: {N} encoder positions but {Nd} head positions (FlowAR's buffer_size > 0 "
                              "is not supported)")
    patch_nums = scales_for_tokens(N)
    if patch_nums is None:
        raise CheckpointError(f"{source}: {N} positions are not FlowAR's scales 1, 2, 4, ... (341 for 1-16)")
    ratio = hidden / (C * 2 / 3)
    found = f"width {C}, depth {enc}+{dec}, flow head {hd}x{hw}{' with cross-attention' if cross else ''}"
    table = FLOWAR_SIZES.get((C, enc, dec, hd, hw, cross))
    heads = published_heads(heads, table, source, "FlowAR", found, ", ".join(
        f"{v[0]} (width {k[0]}, depth {k[1]}+{k[2]}, head {k[3]}x{k[4]})" for k, v in FLOWAR_SIZES.items()))
    if heads < 1 or C % heads or (C // heads) % 4:
        raise InvalidArgumentError(f"{heads} attention heads do not split width {C} into heads of a multiple of 4")
    cfg = FlowARConfig(token_dim=int(D), num_classes=int(V) - 1, patch_nums=patch_nums, dim=int(C), n_head=heads,
                       encoder_depth=enc, decoder_depth=dec, mlp_ratio=_mlp_ratio(hidden, C, ratio),
                       head_depth=hd, head_width=int(hw), head_cross=cross)
    name = table[0] if table else f"flowar_w{C}_d{enc}"
    settings = FLOWAR_DEFAULTS.get(name, _CUSTOM)
    return dataclasses.replace(cfg, head_steps=settings["head_steps"], guidance_interval=settings["guidance_interval"]), name


def _mlp_ratio(hidden: int, dim: int, guess: float) -> float:
    """The mlp_ratio whose ``int(dim·r·2/3)`` is ``hidden`` (4.0 for every published size)."""
    for r in (4.0, round(guess, 6), guess):
        if int(dim * r * 2 / 3.0) == hidden:
            return r
    raise CheckpointError(f"MLP hidden width {hidden} at width {dim} is not FlowAR's int(dim * ratio * 2/3) for any ratio")


def generator_from_flowar_state_dict(sd: Mapping[str, Tensor], config: FlowARConfig,
                                     source: str = "state dict") -> FlowARGenerator:
    """A :class:`FlowARGenerator` holding the converted weights ``sd`` (strict, fp32, no second copy)."""
    return module_from_state_dict(FlowARGenerator, config, sd, source)


def _read_flowar(path, ema: bool, heads: int | None):
    """(converted state dict, config, size name, entry used) of a FlowAR file; nothing written."""
    raw, entry = select_flowar_state_dict(load_checkpoint(path, WHAT), str(path), ema)
    sd = flowar_state_dict_from_official(raw, str(path))
    cfg, name = flowar_config_from_state_dict(sd, str(path), heads=heads)
    return sd, cfg, name, entry


def load_flowar(path: str | os.PathLike, *, ema: bool = True, heads: int | None = None) -> FlowARGenerator:
    """Load a FlowAR ``.pth`` (raw state dict, or a training checkpoint's EMA weights) as a :class:`FlowARGenerator`."""
    sd, cfg, _, _ = _read_flowar(path, ema, heads)
    return generator_from_flowar_state_dict(sd, cfg, str(path))


# -- the whole pipeline ------------------------------------------------------------------------------
def convert_flowar(
    vae: str | os.PathLike,
    flowar: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ema: bool = True,
    heads: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert MAR's KL-16 VAE + a FlowAR checkpoint into a varkit pipeline folder ``out``.

    Both files are read and checked before anything is written; the folder is built next to ``out`` and
    renamed into place, so an error leaves no partial output. Defaults: :data:`FLOWAR_DEFAULTS`.
    """
    from . import mar_vae

    out = refuse_existing(out, overwrite)
    sd, cfg, size_name, entry = _read_flowar(flowar, ema, heads)
    tokenizer = mar_vae.load_mar_vae_for(vae, flowar, cfg.token_dim, family="FlowAR", model="FlowAR",
                                         generator_keys=("z_proj.weight", "flownet.input_proj.weight"))
    generator = generator_from_flowar_state_dict(sd, cfg, str(flowar))
    px = cfg.patch_nums[-1] * tokenizer.downsample
    defaults = {**_COMMON, **FLOWAR_DEFAULTS.get(size_name, _CUSTOM)}
    return save_converted_pipeline(out, overwrite, tokenizer, generator, defaults,
                                   name or f"{size_name.replace('_', '-')}-{px}",
                                   converted_record("flowar", {"vae": file_record(vae),
                                                               "flowar": file_record(flowar, weights=entry)},
                                                    size_name, px, cfg, defaults, patch_nums=list(cfg.patch_nums)))


def cmd_convert_flowar(args) -> None:
    """``varkit convert flowar``: see :func:`convert_flowar`."""
    out = convert_flowar(args.vae, args.flowar, args.out, ema=args.ema, heads=args.heads, name=args.name,
                         overwrite=args.overwrite)
    g, conv = read_converted(out)
    d = conv["defaults"]
    print(f"wrote {out}/ ({conv['flowar_model']}: {g['dim']}d x {g['encoder_depth']}+{g['decoder_depth']} blocks, "
          f"flow head {g['head_depth']}x{g['head_width']}{' (cross)' if g['head_cross'] else ''}, scales "
          f"{'-'.join(map(str, g['patch_nums']))} of {g['token_dim']} channels ({conv['image_size']} px); defaults "
          f"{d['head_steps']} steps, cfg {d['cfg']} linear, guidance interval {d['guidance_interval']}); "
          f"load it with varkit.load_pipeline({str(out)!r})")
