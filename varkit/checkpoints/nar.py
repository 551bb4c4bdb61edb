"""Convert NAR's published class-conditional checkpoints (``NAR-imagenet-256-B`` … ``-XL``).

NAR (ThisisBillhe/NAR, ``NAR-images/``) is LlamaGen's GPT with ``medusa_attention_num`` extra
layers (``layers.{n_layer…}``) and a second head (``medusa_norm`` + ``medusa_output``).
:class:`~varkit.models.neighbors.NeighborsGenerator` keeps NAR's parameter names, so the
weights map 1:1. The files hold the weights raw or under ``"model"`` (both accepted, as NAR's
sampler does); the tokenizer is LlamaGen's VQ (``vq_ds16_c2i.pt``).

What the weights do not say: the number of extra layers (1 in every published NAR model;
``medusa_layers`` to override) and the token grid (NAR's class-conditional models are all
256 px, 16x16 tokens; NAR's README asks users to rename downloads to LlamaGen-style names such
as ``c2i_L_384.pt``, so the file name is deliberately not used). Reading and unwrapping files is
:mod:`varkit.checkpoints.common`'s; the LlamaGen-side checks, the condition and FFN-width inference and
the pipeline writing are :mod:`varkit.checkpoints.llamagen`'s.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..models.neighbors import NeighborsConfig, NeighborsGenerator
from .arguments import add_nar_arguments  # noqa: F401 (public: defined without torch for the CLI)
from .common import (load_checkpoint, module_from_state_dict,
                     select_state_dict, strip_prefixes)
from .llamagen import condition_fields, convert_gpt_pair, ffn_multiple_of, gpt_state_dict_from_llamagen

__all__ = [
    "NAR_C2I_DEFAULTS",
    "NAR_SIZES",
    "add_nar_arguments",
    "cmd_convert_nar",
    "convert_nar",
    "generator_from_nar_state_dict",
    "load_nar_gpt",
    "nar_config_from_state_dict",
    "nar_state_dict_from_official",
    "nar_state_dict_to_official",
]

WHAT = "NAR GPT checkpoint"
MEDUSA_KEYS = ("medusa_norm.weight", "medusa_output.weight")

# NAR's sample_c2i.py argparse defaults (the same as LlamaGen's): CFG 4, top-k 2000, temperature 1: the ``demo``
# preset of a converted c2i folder. Its defaults are the FID protocol of scripts/autoregressive/sample_c2i.sh →
# sample_c2i_ddp.py: CFG 2.0, top-k 0 (off), top-p 1, temperature 1, evaluated at 256 px (--image-size-eval).
NAR_FID_CFG = 2.0
NAR_C2I_DEFAULTS = {"cfg": 4.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 2000, "top_p": None}
NAR_T2I_DEFAULTS = {"cfg": 7.5, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 1000, "top_p": None}

# (dim, n_layer without the extra layers) → (NAR's GPT_models name, n_head, varkit config name)
NAR_SIZES = {
    (768, 12): ("GPT-B", 12, "nar-b"),
    (1024, 18): ("GPT-M", 16, "nar-m"),
    (1024, 24): ("GPT-L", 16, "nar-l"),
    (1280, 36): ("GPT-XL", 20, "nar-xl"),
    (1536, 48): ("GPT-XXL", 24, "nar-xxl"),
}
DEFAULT_C2I_IMAGE_SIZE = 256


# -- state dicts --------------------------------------------------------------------------------
def nar_state_dict_from_official(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """NAR GPT state dict → :class:`NeighborsGenerator` state dict (same names).

    Strips ``module.``/``_orig_mod.`` prefixes and derived tensors (``freqs_cis``, KV-cache
    buffers). Raises :class:`CheckpointError` for a plain LlamaGen (raster) GPT, other families'
    files, and unknown keys.
    """
    sd = strip_prefixes(sd)
    medusa = {k: sd[k] for k in MEDUSA_KEYS if k in sd}
    rest = {k: v for k, v in sd.items() if k not in MEDUSA_KEYS}
    # LlamaGen's checks: foreign families (VAR, MAR, VQ files), missing and unknown keys
    out = gpt_state_dict_from_llamagen(rest, source)
    if not medusa:
        raise CheckpointError(
            f"{source} is a LlamaGen raster GPT checkpoint, not a {WHAT}: it has no medusa_norm / "
            "medusa_output (NAR's vertical head); convert it with `varkit convert llamagen`"
        )
    if len(medusa) != len(MEDUSA_KEYS):
        missing = [k for k in MEDUSA_KEYS if k not in medusa]
        raise CheckpointError(f"{source}: {WHAT} lacks {missing}; the file is incomplete")
    out.update(medusa)
    return out


def nar_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`NeighborsGenerator` state dict → NAR's (the names are the same; a copy)."""
    return {k: v for k, v in sd.items()}


def _square_grid(grid: int | tuple[int, int] | None, source: str) -> int | None:
    if grid is None or isinstance(grid, int):
        return grid
    h, w = grid
    if h != w:
        raise InvalidArgumentError(
            f"{source}: NAR's neighbors layout (fronts of equal Manhattan distance) needs a square token grid, "
            f"got {h}x{w}; NAR's class-conditional models use 16x16 (256 px)"
        )
    return int(h)


def nar_config_from_state_dict(
    sd: Mapping[str, Tensor],
    grid: int | tuple[int, int] | None = None,
    *,
    config: str | None = None,
    medusa_layers: int = 1,
    n_head: int | None = None,
    source: str = "state dict",
    freqs_cis: Tensor | None = None,
) -> NeighborsConfig:
    """Infer the :class:`NeighborsConfig` of a converted NAR state dict from its shapes.

    ``grid``: tokens per side (an int, or (h, w), which must be square). Default: from
    ``freqs_cis`` when the file carries one, else 16 for class-conditional models. Heads: from
    the named ``config``, ``n_head``, NAR's size table, or head_dim 64 (every published size).
    """
    if medusa_layers < 1:
        raise InvalidArgumentError(f"medusa_layers must be >= 1, got {medusa_layers}")
    grid = _square_grid(grid, source)
    cls_rows = 1
    if "cls_embedding.cap_proj.fc1.weight" in sd and "cls_embedding.uncond_embedding" in sd:
        cls_rows = int(sd["cls_embedding.uncond_embedding"].shape[0])
    if freqs_cis is not None and freqs_cis.dim() == 3:
        cells = freqs_cis.shape[0] - cls_rows
        side = round(max(cells, 0) ** 0.5)
        if side * side != cells or side == 0:
            raise InvalidArgumentError(
                f"{source} carries a RoPE table for {cells} tokens, which is not a square grid; NAR's neighbors "
                "layout needs a square token grid"
            )
        if grid is not None and grid != side:
            raise InvalidArgumentError(f"{source} carries a RoPE table for a {side}x{side} grid but {grid}x{grid} was asked for")
        grid = side
    text = "cls_embedding.cap_proj.fc1.weight" in sd
    if grid is None:
        if text:
            raise InvalidArgumentError(f"{source}: a text-to-image NAR model needs its image size (--image-size)")
        grid = DEFAULT_C2I_IMAGE_SIZE // 16
    f = _shape_fields(sd, source)
    dim, total = f["dim"], f.pop("total_layers")
    n_layer = total - medusa_layers
    if n_layer < 1:
        raise CheckpointError(f"{source} has {total} layers, too few for {medusa_layers} extra NAR layer(s)")
    if config is not None:
        named = _named_config(config)
        if (named.dim, named.n_layer, named.medusa_layers) != (dim, n_layer, medusa_layers):
            raise CheckpointError(
                f"{source} has dim {dim}, {n_layer} + {medusa_layers} layers but config {config!r} has dim "
                f"{named.dim}, {named.n_layer} + {named.medusa_layers}; drop --config to infer it"
            )
        heads = named.n_head
    elif n_head is not None:
        heads = n_head
    elif (dim, n_layer) in NAR_SIZES:
        heads = NAR_SIZES[(dim, n_layer)][1]
    elif dim % 64 == 0:
        heads = dim // 64  # head_dim 64, as every NAR and LlamaGen size
    else:
        raise CheckpointError(
            f"{source}: dim {dim} with {n_layer} + {medusa_layers} layers is not a NAR size and not a multiple of 64, "
            "so the number of heads cannot be inferred; pass a named config or n_head"
        )
    if dim % heads or (dim // heads) % 4:
        raise InvalidArgumentError(f"dim {dim} with {heads} heads: the head size must be a multiple of 4 (2-D RoPE)")
    return NeighborsConfig(n_layer=n_layer, n_head=heads, grid=int(grid), medusa_layers=medusa_layers, **f)


def _shape_fields(sd: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """Config fields readable from a converted NAR state dict's shapes (``total_layers`` counts all)."""
    try:
        vocab, dim = sd["tok_embeddings.weight"].shape
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        heads_out = {k: tuple(sd[k].shape) for k in ("output.weight", "medusa_output.weight")}
        norms = {k: tuple(sd[k].shape) for k in ("norm.weight", "medusa_norm.weight")}
    except KeyError as exc:
        raise CheckpointError(f"{source}: {WHAT} lacks {exc.args[0]}; the file is incomplete") from None
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {WHAT} has layer indices {idx[:5]}…; expected 0..n-1")
    for i in idx:
        if f"layers.{i}.attention.wqkv.weight" not in sd:
            raise CheckpointError(f"{source}: {WHAT} lacks layers.{i}.attention.wqkv.weight; the file is incomplete")
    if tuple(sd["layers.0.attention.wqkv.weight"].shape) != (3 * dim, dim):
        raise CheckpointError(f"{source}: wqkv has shape {tuple(sd['layers.0.attention.wqkv.weight'].shape)}, "
                              f"expected {(3 * dim, dim)}; grouped-query models are not supported")
    for k, shape in heads_out.items():
        if shape != (vocab, dim):
            raise CheckpointError(f"{source}: {k} has shape {shape}, expected {(vocab, dim)}")
    for k, shape in norms.items():
        if shape != (dim,):
            raise CheckpointError(f"{source}: {k} has shape {shape}, expected {(dim,)}")
    cond = condition_fields(sd, dim, source, WHAT)
    m = ffn_multiple_of(dim, hidden, source)
    return dict(vocab_size=int(vocab), dim=int(dim), total_layers=len(idx), multiple_of=m, **cond)


def _named_config(name: str) -> NeighborsConfig:
    from ..models.registry import _REGISTRY

    table = {v[0]: v[2] for v in NAR_SIZES.values()}
    key = table.get(name.upper().replace("_", "-"), name)
    cfg = _REGISTRY[key][1]() if key in _REGISTRY else None
    if not isinstance(cfg, NeighborsConfig):
        known = sorted(n for n in _REGISTRY if isinstance(_REGISTRY[n][1](), NeighborsConfig)) if _REGISTRY else []
        raise InvalidArgumentError(f"unknown NAR config {name!r}; choose one of {', '.join(known + sorted(table)) or 'GPT-B'}")
    return cfg


def generator_from_nar_state_dict(sd: Mapping[str, Tensor], config: NeighborsConfig,
                                  source: str = "state dict") -> NeighborsGenerator:
    """A :class:`NeighborsGenerator` holding the converted weights ``sd`` (strict, fp32, no second copy)."""
    return module_from_state_dict(NeighborsGenerator, config, sd, source)


def _read_gpt(path, image_size, downsample, config, medusa_layers, use_ema):
    """(converted state dict, config, notes) of a NAR file; nothing written."""
    raw = strip_prefixes(select_state_dict(load_checkpoint(path, WHAT), str(path), WHAT, use_ema))
    freqs = raw.get("freqs_cis")
    sd = nar_state_dict_from_official(raw, str(path))
    notes: dict[str, Any] = {}
    grid = None
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if any(s <= 0 or s % downsample for s in hw):
            raise InvalidArgumentError(
                f"image size {'x'.join(map(str, hw))} is not a positive multiple of the tokenizer's downsample "
                f"factor {downsample}"
            )
        grid = (hw[0] // downsample, hw[1] // downsample)
    elif freqs is None and "cls_embedding.cap_proj.fc1.weight" not in sd:
        notes["image_size_from"] = f"default ({DEFAULT_C2I_IMAGE_SIZE} px, NAR's class-conditional models)"
        grid = DEFAULT_C2I_IMAGE_SIZE // downsample
    cfg = nar_config_from_state_dict(sd, grid, config=config, medusa_layers=medusa_layers, source=str(path),
                                     freqs_cis=freqs)
    return sd, cfg, notes


def load_nar_gpt(path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None, downsample: int = 16,
                 config: str | None = None, medusa_layers: int = 1, use_ema: bool = False) -> NeighborsGenerator:
    """Load a NAR GPT ``.pt`` (raw or ``"model"``-wrapped) as a :class:`NeighborsGenerator`."""
    sd, cfg, _ = _read_gpt(path, image_size, downsample, config, medusa_layers, use_ema)
    return generator_from_nar_state_dict(sd, cfg, str(path))


# -- the whole pipeline -----------------------------------------------------------------------
def convert_nar(
    vq: str | os.PathLike,
    gpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    medusa_layers: int = 1,
    use_ema: bool = False,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a LlamaGen VQ + NAR GPT pair into a varkit pipeline folder ``out``.

    Both files are read and checked before anything is written; the folder is built next to
    ``out`` and renamed into place, so an error leaves no partial output. Defaults are NAR's
    the FID protocol of ``sample_c2i_ddp.py`` (CFG 2.0, no top-k, 256 px); the ``demo``
    preset is ``sample_c2i.py``'s (CFG 4.0, top-k 2000, temperature 1).
    """
    return convert_gpt_pair(
        "nar", vq, gpt, out, what=WHAT,
        read_gpt=lambda downsample: _read_gpt(gpt, image_size, downsample, config, medusa_layers, use_ema),
        build=generator_from_nar_state_dict, sizes=NAR_SIZES, defaults=(NAR_C2I_DEFAULTS, NAR_T2I_DEFAULTS), fid_cfg=NAR_FID_CFG,
        name=name, use_ema=use_ema, overwrite=overwrite,
    )


def parse_image_size(text: str | None) -> int | tuple[int, int] | None:
    """``"256"`` → 256, ``"256x384"`` → (256, 384) (rejected later: NAR needs a square grid)."""
    if text is None:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise InvalidArgumentError(f"--image-size must be a number (256) or HxW (256x256), got {text!r}") from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return (vals[0], vals[1])
    raise InvalidArgumentError(f"--image-size must be a number (256) or HxW (256x256), got {text!r}")


def cmd_convert_nar(args) -> None:
    """``varkit convert nar``: see :func:`convert_nar`."""
    out = convert_nar(args.vq, args.gpt, args.out, config=args.config, image_size=parse_image_size(args.image_size),
                      medusa_layers=args.medusa_layers, use_ema=args.ema, name=args.name, overwrite=args.overwrite)
    from ..modeling import read_config

    g = read_config(out / "generator")
    kind = "t2i" if g["caption_dim"] else f"c2i, {g['num_classes']} classes"
    print(f"wrote {out}/ (NAR {g['dim']}d x {g['n_layer']}+{g['medusa_layers']} layers, {g['n_head']} heads, "
          f"{g['grid']}x{g['grid']} tokens in {2 * g['grid'] - 1} fronts, {kind}); "
          f"load it with varkit.load_pipeline({str(out)!r})")
