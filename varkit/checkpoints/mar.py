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

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import atomic_directory, write_json
from ..models.mar import MARConfig, MARGenerator
from .common import load_checkpoint, module_from_state_dict, strip_prefixes

__all__ = [
    "MAR_DEFAULTS",
    "MAR_SIZES",
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
def _tensors(m: Mapping) -> dict[str, Tensor]:
    return strip_prefixes({k: v for k, v in m.items() if isinstance(k, str) and isinstance(v, Tensor)})


def _foreign(keys: set[str]) -> str | None:
    """What a non-MAR state dict is, when recognisable, with what to do."""
    if "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys and not any(k.startswith("quantize.") for k in keys):
        return "MAR's KL-16 VAE (kl16.ckpt); pass it as --vae and the MAR file (checkpoint-last.pth) as --mar"
    if any(k.startswith("medusa_") for k in keys):
        return "a NAR (next-neighbour) checkpoint; convert it with `varkit convert nar`"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") and ".attention." in k for k in keys):
        return "a LlamaGen GPT checkpoint; convert it with `varkit convert llamagen`"
    if any(k.startswith("quantize.") for k in keys):
        return "a VQ tokenizer checkpoint (LlamaGen's or VAR's), not a MAR generator"
    if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "a VAR transformer checkpoint; convert it with `varkit convert var`"
    if any(k.startswith("head.net.") for k in keys) and "fake_latent" in keys:
        return "already in varkit's format (a MARGenerator state dict); load it with varkit.load_pipeline"
    return None


def select_mar_state_dict(ckpt: Any, source: str, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """(MAR weights, which entry they came from) of a loaded file: ``model_ema`` (with ``ema``, when present
    and not None), else ``model``, else the file's top level (a raw state dict)."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {WHAT}")
    order = ("model_ema", "model") if ema else ("model",)
    cands = [(k, ckpt[k]) for k in order if isinstance(ckpt.get(k), Mapping)]
    cands += [(k, ckpt[k]) for k in ("state_dict", "module") if isinstance(ckpt.get(k), Mapping)]
    cands.append(("top level", ckpt))
    for entry, cand in cands:
        sd = _tensors(cand)
        if all(k in sd for k in _REQUIRED):
            return sd, entry
    for _, cand in cands:
        what = _foreign(set(_tensors(cand)))
        if what is not None:
            raise CheckpointError(f"{source} is not a {WHAT}: it is {what}")
    sd = _tensors(cands[0][1])
    if not sd:
        raise CheckpointError(f"{source} holds no tensors (top-level keys {sorted(map(str, ckpt))[:6]}); it is not a {WHAT}")
    missing = [k for k in _REQUIRED if k not in sd]
    raise CheckpointError(f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(sd)[:3]}); "
                          "pass MAR's checkpoint-last.pth (mar_base, mar_large or mar_huge) as --mar")


# -- key mapping ---------------------------------------------------------------------------------------
def mar_state_dict_from_official(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """MAR state dict → :class:`MARGenerator` state dict (``diffloss.net.`` → ``head.net.``)."""
    sd = strip_prefixes(sd)
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        what = _foreign(set(sd))
        raise CheckpointError(f"{source} is not a {WHAT}: " + (f"it is {what}" if what else f"it lacks {missing[:3]}"))
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


def _count(sd: Mapping[str, Tensor], prefix: str, source: str) -> int:
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {prefix}* has indices {idx[:6]}…; expected 0..n-1, the file is incomplete")
    return len(idx)


def _shape(sd: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: {WHAT} lacks {key}; the file is incomplete")
    return tuple(sd[key].shape)


def mar_config_from_state_dict(sd: Mapping[str, Tensor], source: str = "state dict", *, size: str | None = None,
                               heads: int | None = None) -> tuple[MARConfig, str]:
    """The :class:`MARConfig` of a converted MAR state dict (``head.net.*`` names) and its MAR size name.

    Widths, depths, grid, buffer, token and DiffLoss sizes come from the shapes; the attention heads from
    MAR's size table, or ``heads`` for a MAR of another size (else :class:`CheckpointError` naming the
    shapes found). ``size`` ("base", "mar_large", "mar-huge" …) must agree with the weights.
    """
    V, E = _shape(sd, "class_emb.weight", source)
    _, D = _shape(sd, "z_proj.weight", source)
    Dd, E2 = _shape(sd, "decoder_embed.weight", source)
    _, N, _ = _shape(sd, "diffusion_pos_embed_learned", source)
    _, L, _ = _shape(sd, "encoder_pos_embed_learned", source)
    hw, _ = _shape(sd, HEAD + "input_proj.weight", source)
    hidden = _shape(sd, "encoder_blocks.0.mlp.fc1.weight", source)[0]
    enc, dec = _count(sd, "encoder_blocks.", source), _count(sd, "decoder_blocks.", source)
    hd = _count(sd, HEAD + "res_blocks.", source)
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
    if heads is None:
        if table is None:
            raise CheckpointError(
                f"{source} is a MAR of unknown size ({found}); the published sizes are "
                + ", ".join(f"{v[0]} (width {k[0]}, depth {k[1]}+{k[2]})" for k, v in MAR_SIZES.items())
                + "; pass heads= (attention heads) to convert another size")
        heads = table[1]
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
    from ..pipeline import Pipeline
    from .mar_vae import load_mar_vae

    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) loading
        raise InvalidArgumentError(f"{out} already exists; choose a new --out folder or pass --overwrite")
    sd, cfg, size_name, entry = _read_mar(mar, ema, size, heads)
    _refuse_mar_as_vae(vae)
    tokenizer = load_mar_vae(vae)
    if tuple(tokenizer.token_shape) != (cfg.token_dim,):
        raise CheckpointError(
            f"{Path(vae).name} and {Path(mar).name} are not a MAR pair: the MAR model takes {cfg.token_dim}-channel "
            f"tokens but the VAE's latents have {tokenizer.token_shape[0]} (MAR with patch_size > 1 is not supported)")
    generator = generator_from_mar_state_dict(sd, cfg, str(mar))
    px = cfg.grid * tokenizer.downsample
    defaults = dict(MAR_DEFAULTS.get(size_name, {**_CUSTOM_DEFAULTS, "num_iter": cfg.num_iter}))
    pipe = Pipeline(tokenizer, generator, defaults, name=name or f"{size_name.replace('_', '-')}-{px}")
    with atomic_directory(out, overwrite) as tmp:
        pipe.save_pretrained(tmp)
        write_json(tmp / "convert.json", {
            "family": "mar",
            "vae": {"file": Path(vae).name, "bytes": Path(vae).stat().st_size},
            "mar": {"file": Path(mar).name, "bytes": Path(mar).stat().st_size, "weights": entry},
            "mar_model": size_name,
            "image_size": px,
            "grid": cfg.grid,
            "generator_config": dataclasses.asdict(cfg),
            "defaults": defaults,
        })
    return out


def _refuse_mar_as_vae(path) -> None:
    """One clear line when a MAR generator file is given as the VAE (the file is memory-mapped: cheap)."""
    ckpt = load_checkpoint(path, "MAR KL-16 VAE checkpoint (kl16.ckpt)")
    if not isinstance(ckpt, Mapping):
        return
    for cand in (ckpt, ckpt.get("model"), ckpt.get("model_ema")):
        if isinstance(cand, Mapping) and all(k in _tensors(cand) for k in ("fake_latent", "z_proj.weight")):
            raise CheckpointError(f"{path} is a MAR generator checkpoint, not MAR's KL-16 VAE; pass it as --mar "
                                  "and kl16.ckpt as --vae")


def add_convert_mar_arguments(p) -> None:
    """The arguments of ``varkit convert mar``."""
    p.add_argument("--vae", required=True, help="MAR's KL-16 VAE file (kl16.ckpt)")
    p.add_argument("--mar", required=True, help="MAR file (checkpoint-last.pth of mar_base, mar_large or mar_huge)")
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, unless --overwrite)")
    p.add_argument("--size", default=None, help="base|large|huge; default: inferred from the weights")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the file's 'model' weights instead of its EMA weights ('model_ema', MAR's sampling default)")
    p.add_argument("--heads", type=int, default=None, help="attention heads, for a MAR of a non-published size")
    p.add_argument("--name", default=None, help="pipeline name stored in config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete)")


def cmd_convert_mar(args) -> None:
    """``varkit convert mar``: see :func:`convert_mar`."""
    out = convert_mar(args.vae, args.mar, args.out, size=args.size, ema=args.ema, heads=args.heads, name=args.name,
                      overwrite=args.overwrite)
    import json

    from ..modeling import read_config

    g = read_config(out / "generator")
    conv = json.loads((out / "convert.json").read_text())
    print(f"wrote {out}/ ({conv['mar_model']}: {g['encoder_dim']}d x {g['encoder_depth']}+{g['decoder_depth']} blocks, "
          f"DiffLoss {g['head_depth']}x{g['head_width']}, {g['grid']}x{g['grid']} tokens of {g['token_dim']} channels "
          f"({conv['image_size']} px), {conv['mar']['weights']} weights); "
          f"load it with varkit.load_pipeline({str(out)!r})")
