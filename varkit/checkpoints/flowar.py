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
from ..io import atomic_directory, write_json
from ..models.flowar import FlowARConfig, FlowARGenerator
from .common import load_checkpoint, module_from_state_dict, strip_prefixes

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
_ATTN = re.compile(r"^((?:encoder|decoder)_blocks\.\d+\.attn\.)(qkv|proj)\.(weight|bias)$")
_ATTN_BACK = re.compile(r"^((?:encoder|decoder)_blocks\.\d+\.attn\.)(wqkv|wo)\.(weight|bias)$")
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
def _tensors(m: Mapping) -> dict[str, Tensor]:
    return strip_prefixes({k: v for k, v in m.items() if isinstance(k, str) and isinstance(v, Tensor)})


def _foreign(keys: set[str]) -> str | None:
    """What a non-FlowAR state dict is, when recognisable, with what to do."""
    if "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys and not any(k.startswith("quantize.") for k in keys):
        return "MAR's KL-16 VAE (kl16.ckpt); pass it as --vae and the FlowAR file as --flowar"
    if "fake_latent" in keys or any(k.startswith("diffloss.") for k in keys):
        return "a MAR checkpoint; convert it with `varkit convert mar`"
    if any(k.startswith("medusa_") for k in keys):
        return "a NAR (next-neighbour) checkpoint; convert it with `varkit convert nar`"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") and ".attention." in k for k in keys):
        return "a LlamaGen GPT checkpoint; convert it with `varkit convert llamagen`"
    if any(k.startswith("quantize.") for k in keys):
        return "a VQ tokenizer checkpoint (LlamaGen's or VAR's), not a FlowAR generator"
    if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "a VAR transformer checkpoint; convert it with `varkit convert var`"
    if any(k.startswith(HEAD) for k in keys) and "class_emb.weight" in keys:
        return "already in varkit's format (a FlowARGenerator state dict); load it with varkit.load_pipeline"
    return None


def select_flowar_state_dict(ckpt: Any, source: str, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """(FlowAR weights, which entry they came from) of a loaded file: the file's top level (the published raw
    state dicts), else a training checkpoint's ``model_ema`` (with ``ema``) or ``model``."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {WHAT}")
    order = ("model_ema", "model") if ema else ("model",)
    cands = [("top level", ckpt)] + [(k, ckpt[k]) for k in (*order, "state_dict", "module")
                                     if isinstance(ckpt.get(k), Mapping)]
    for entry, cand in cands:
        sd = _tensors(cand)
        if all(k in sd for k in _REQUIRED):
            return sd, entry
    for _, cand in cands:
        what = _foreign(set(_tensors(cand)))
        if what is not None:
            raise CheckpointError(f"{source} is not a {WHAT}: it is {what}")
    sd = _tensors(cands[-1][1])
    if not sd:
        raise CheckpointError(f"{source} holds no tensors (top-level keys {sorted(map(str, ckpt))[:6]}); it is not a {WHAT}")
    missing = [k for k in _REQUIRED if k not in sd]
    raise CheckpointError(f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(sd)[:3]})")


# -- key mapping ---------------------------------------------------------------------------------------
def flowar_state_dict_from_official(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """FlowAR state dict → :class:`FlowARGenerator` state dict (see the module docstring's table)."""
    sd = strip_prefixes(sd)
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        what = _foreign(set(sd))
        raise CheckpointError(f"{source} is not a {WHAT}: " + (f"it is {what}" if what else f"it lacks {missing[:3]}"))
    out = {}
    for k, v in sd.items():
        if _DERIVED.match(k):
            continue
        if k.startswith(OFFICIAL_HEAD):
            out[HEAD + k[len(OFFICIAL_HEAD):]] = v
            continue
        m = _ATTN.match(k)
        out[f"{m.group(1)}{'wqkv' if m.group(2) == 'qkv' else 'wo'}.{m.group(3)}" if m else k] = v
    return out


def flowar_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`FlowARGenerator` state dict → FlowAR's (without the derived ``mask``/``rope.freqs`` buffers)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(HEAD):
            out[OFFICIAL_HEAD + k[len(HEAD):]] = v
            continue
        m = _ATTN_BACK.match(k)
        out[f"{m.group(1)}{'qkv' if m.group(2) == 'wqkv' else 'proj'}.{m.group(3)}" if m else k] = v
    return out


def _count(sd: Mapping[str, Tensor], prefix: str, source: str) -> int:
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {prefix}* has indices {idx[:6]}…; expected 0..n-1, the file is incomplete")
    return len(idx)


def _shape(sd: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: {WHAT} lacks {key}; the file is incomplete")
    return tuple(sd[key].shape)


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
    V, C = _shape(sd, "class_emb.weight", source)
    _, D = _shape(sd, "z_proj.weight", source)
    Cd, Ce = _shape(sd, "decoder_embed.weight", source)
    _, N, _ = _shape(sd, "encoder_pos_embed_learned", source)
    _, Nd, _ = _shape(sd, "diffusion_pos_embed_learned", source)
    hw, _ = _shape(sd, HEAD + "input_proj.weight", source)
    hidden = _shape(sd, "encoder_blocks.0.mlp.fc1_g.weight", source)[0]
    enc, dec = _count(sd, "encoder_blocks.", source), _count(sd, "decoder_blocks.", source)
    hd = _count(sd, HEAD + "res_blocks.", source)
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
    if heads is None:
        if table is None:
            raise CheckpointError(
                f"{source} is a FlowAR of unknown size ({found}); the published sizes are "
                + ", ".join(f"{v[0]} (width {k[0]}, depth {k[1]}+{k[2]}, head {k[3]}x{k[4]})" for k, v in FLOWAR_SIZES.items())
                + "; pass heads= (attention heads) to convert another size")
        heads = table[1]
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
    from ..pipeline import Pipeline
    from .mar_vae import load_mar_vae

    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) loading
        raise InvalidArgumentError(f"{out} already exists; choose a new --out folder or pass --overwrite")
    sd, cfg, size_name, entry = _read_flowar(flowar, ema, heads)
    _refuse_flowar_as_vae(vae)
    tokenizer = load_mar_vae(vae)
    if tuple(tokenizer.token_shape) != (cfg.token_dim,):
        raise CheckpointError(
            f"{Path(vae).name} and {Path(flowar).name} are not a FlowAR pair: FlowAR takes {cfg.token_dim}-channel "
            f"tokens but the VAE's latents have {tokenizer.token_shape[0]}")
    generator = generator_from_flowar_state_dict(sd, cfg, str(flowar))
    px = cfg.patch_nums[-1] * tokenizer.downsample
    defaults = {**_COMMON, **FLOWAR_DEFAULTS.get(size_name, _CUSTOM)}
    pipe = Pipeline(tokenizer, generator, defaults, name=name or f"{size_name.replace('_', '-')}-{px}")
    with atomic_directory(out, overwrite) as tmp:
        pipe.save_pretrained(tmp)
        write_json(tmp / "convert.json", {
            "family": "flowar",
            "vae": {"file": Path(vae).name, "bytes": Path(vae).stat().st_size},
            "flowar": {"file": Path(flowar).name, "bytes": Path(flowar).stat().st_size, "weights": entry},
            "flowar_model": size_name,
            "image_size": px,
            "patch_nums": list(cfg.patch_nums),
            "generator_config": dataclasses.asdict(cfg),
            "defaults": defaults,
        })
    return out


def _refuse_flowar_as_vae(path) -> None:
    """One clear line when a FlowAR file is given as the VAE (the file is memory-mapped: cheap)."""
    ckpt = load_checkpoint(path, "MAR KL-16 VAE checkpoint (kl16.ckpt)")
    if isinstance(ckpt, Mapping) and all(k in _tensors(ckpt) for k in ("z_proj.weight", "flownet.input_proj.weight")):
        raise CheckpointError(f"{path} is a FlowAR generator checkpoint, not MAR's KL-16 VAE; pass it as --flowar "
                              "and kl16.ckpt as --vae")


def add_convert_flowar_arguments(p) -> None:
    """The arguments of ``varkit convert flowar``."""
    p.add_argument("--vae", required=True, help="MAR's KL-16 VAE file (kl16.ckpt), which FlowAR uses")
    p.add_argument("--flowar", required=True, help="FlowAR file (FlowAR-S.pth, FlowAR-L.pth or FlowAR-H.pth)")
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, unless --overwrite)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="for a training checkpoint: its 'model' weights instead of 'model_ema' (published files are raw)")
    p.add_argument("--heads", type=int, default=None, help="attention heads, for a FlowAR of a non-published size")
    p.add_argument("--name", default=None, help="pipeline name stored in config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete)")


def cmd_convert_flowar(args) -> None:
    """``varkit convert flowar``: see :func:`convert_flowar`."""
    out = convert_flowar(args.vae, args.flowar, args.out, ema=args.ema, heads=args.heads, name=args.name,
                         overwrite=args.overwrite)
    import json

    from ..modeling import read_config

    g = read_config(out / "generator")
    conv = json.loads((out / "convert.json").read_text())
    d = conv["defaults"]
    print(f"wrote {out}/ ({conv['flowar_model']}: {g['dim']}d x {g['encoder_depth']}+{g['decoder_depth']} blocks, "
          f"flow head {g['head_depth']}x{g['head_width']}{' (cross)' if g['head_cross'] else ''}, scales "
          f"{'-'.join(map(str, g['patch_nums']))} of {g['token_dim']} channels ({conv['image_size']} px); defaults "
          f"{d['head_steps']} steps, cfg {d['cfg']} linear, guidance interval {d['guidance_interval']}); "
          f"load it with varkit.load_pipeline({str(out)!r})")
