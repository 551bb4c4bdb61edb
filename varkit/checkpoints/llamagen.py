"""Convert LlamaGen's published GPT checkpoints (``c2i_B_256.pt`` … ``c2i_3B_384.pt``, t2i).

:class:`~varkit.models.raster.RasterGenerator` uses LlamaGen's own parameter names, so the
GPT weights map 1:1; what this module adds is reading the files (weights under ``"model"``,
``"module"``, ``"state_dict"``, ``"ema"`` or a raw FSDP dict; ``module.``/``_orig_mod.``
prefixes; a stray ``freqs_cis``), telling LlamaGen apart from VAR/NAR/MAR files, inferring the
config from the shapes, and writing a whole pipeline folder (VQ tokenizer + generator + LlamaGen's
sampling defaults) atomically.

The RoPE grid is not stored in the weights: it comes from ``image_size / downsample`` (the
VQ's), from a ``freqs_cis`` tensor when the file carries one, or from the file name
(``c2i_L_384.pt`` → 384).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import refuse_existing
from ..models.raster import RasterConfig, RasterGenerator
from ..nn.layers import swiglu_hidden_dim
from .common import (file_record, load_checkpoint, module_from_state_dict, save_converted_pipeline,
                     select_state_dict, strip_prefixes)

__all__ = [
    "LLAMAGEN_C2I_DEFAULTS",
    "LLAMAGEN_T2I_DEFAULTS",
    "cmd_convert_llamagen",
    "convert_llamagen",
    "generator_from_llamagen_state_dict",
    "gpt_config_from_llamagen_state_dict",
    "gpt_state_dict_from_llamagen",
    "gpt_state_dict_to_llamagen",
    "load_llamagen_gpt",
]

WHAT = "LlamaGen GPT checkpoint"

# ``sample_c2i.py`` / ``sample_t2i.py`` argparse defaults (top_p 1.0 = off, cfg_interval -1 = always): the
# demo settings, kept as the ``demo`` preset of a converted c2i folder and as the defaults of a t2i one.
LLAMAGEN_C2I_DEFAULTS = {"cfg": 4.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 2000, "top_p": None}
LLAMAGEN_T2I_DEFAULTS = {"cfg": 7.5, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 1000, "top_p": None}

# The paper's FID protocol (LlamaGen README / paper Table, scripts/autoregressive/sample_c2i.sh → sample_c2i_ddp.py):
# no top-k (``--top-k 0``), top-p 1, temperature 1, CFG by size, 384 px models resized (bicubic) to 256 for
# evaluation (``--image-size-eval 256``); 50 000 samples.
LLAMAGEN_FID_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
FID_IMAGE_SIZE = 256
FID_NUM_SAMPLES = 50_000


def c2i_protocol(cfg: float, image_size: int) -> dict:
    """FID-protocol defaults shared by LlamaGen-format c2i models (LlamaGen, NAR): ``sample_c2i_ddp.py``'s."""
    d = {"cfg": cfg, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None, "top_p": None,
         "fid_num_samples": FID_NUM_SAMPLES}
    if image_size != FID_IMAGE_SIZE:
        d["fid_image_size"] = FID_IMAGE_SIZE
    return d

# (dim, n_layer) → (LlamaGen name, n_head) for every entry of LlamaGen's ``GPT_models``.
# head_dim is 64 except GPT-3B (3200/32 = 100) and GPT-7B (4096/32 = 128).
LLAMAGEN_SIZES = {
    (768, 12): ("GPT-B", 12),
    (1024, 24): ("GPT-L", 16),
    (1280, 36): ("GPT-XL", 20),
    (1536, 48): ("GPT-XXL", 24),
    (2560, 48): ("GPT-XXXL", 40),
    (2048, 22): ("GPT-1B", 32),
    (3200, 24): ("GPT-3B", 32),
    (4096, 32): ("GPT-7B", 32),
}
_VARKIT_NAMES = {"GPT-B": "llamagen-b", "GPT-L": "llamagen-l", "GPT-XL": "llamagen-xl", "GPT-XXL": "llamagen-xxl",
                 "GPT-3B": "llamagen-3b"}

_LAYER_PARAMS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                 "attention_norm", "ffn_norm")
_KEY_RX = re.compile(
    r"(tok_embeddings|norm|output)\.weight"
    r"|cls_embedding\.(embedding_table\.weight|cap_proj\.fc[12]\.weight|uncond_embedding)"
    r"|layers\.\d+\.(" + "|".join(re.escape(p) for p in _LAYER_PARAMS) + r")\.weight"
)
# Not weights: LlamaGen's RoPE table (a plain attribute some files carry) and KV-cache buffers.
_DERIVED_RX = re.compile(r"freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache")


# -- reading files ----------------------------------------------------------------------------
def _foreign(keys: set[str]) -> str | None:
    """What a non-LlamaGen-GPT state dict is, when recognisable, with the command to use."""
    if any(k.startswith("medusa_") for k in keys):
        return "a NAR (next-neighbour) checkpoint (it has medusa_* heads); convert it with `varkit convert nar`"
    if any(k.startswith(("blocks.", "word_embed.", "class_emb.", "pos_1LC", "lvl_embed.", "head_nm.")) for k in keys):
        if any(k.startswith(("encoder_blocks.", "decoder_blocks.", "diffloss.")) for k in keys):
            return "a MAR checkpoint; convert it with `varkit convert mar`"
        return "a VAR transformer checkpoint; convert it with `varkit convert var`"
    if any(k.startswith(("encoder_blocks.", "diffloss.")) for k in keys):
        return "a MAR checkpoint; convert it with `varkit convert mar`"
    if any(k.startswith(("quantize.quant_resi", "encoder.down.", "decoder.up.")) for k in keys):
        return "a VAR/taming-style VQ-VAE, not a LlamaGen GPT"
    if "quantize.embedding.weight" in keys or any(k.startswith("encoder.conv_blocks.") for k in keys):
        return "a LlamaGen VQ tokenizer checkpoint; pass it as --vq, and the GPT file (e.g. c2i_B_256.pt) as --gpt"
    if any(k.startswith(("model.encoder.", "model.decoder.")) for k in keys):
        return "a varkit tokenizer state dict, not a LlamaGen GPT"
    return None


def gpt_state_dict_from_llamagen(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """LlamaGen GPT state dict → :class:`RasterGenerator` state dict (same names).

    Strips ``module.``/``_orig_mod.`` prefixes, drops derived tensors (``freqs_cis``, KV-cache
    buffers) and rejects files of other families and unknown keys with a :class:`CheckpointError`.
    """
    sd = strip_prefixes(sd)
    keys = set(sd)
    what = _foreign(keys)
    if what is not None:
        raise CheckpointError(f"{source} is {what}")
    required = ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention.wqkv.weight")
    missing = [k for k in required if k not in keys]
    if missing:
        raise CheckpointError(
            f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(keys)[:3]}); "
            "pass the GPT file (e.g. c2i_B_256.pt) as --gpt"
        )
    out, unknown = {}, []
    for k, v in sd.items():
        if _DERIVED_RX.fullmatch(k):
            continue
        if not _KEY_RX.fullmatch(k):
            unknown.append(k)
            continue
        out[k] = v
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys are not part of a {WHAT} (e.g. {sorted(unknown)[:3]}); "
            + ("it is a Distilled Decoding student: convert it with `varkit convert dd`" if "n_d_embed.weight" in unknown
               else "the file is from another model or a modified LlamaGen")
        )
    return out


def gpt_state_dict_to_llamagen(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`RasterGenerator` state dict → LlamaGen's (the names are the same; a copy)."""
    return {k: v for k, v in sd.items()}


# -- config inference -------------------------------------------------------------------------
def _layer_count(keys, source: str) -> int:
    idx = sorted({int(m[1]) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))})
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {WHAT} has layer indices {idx[:5]}…; expected 0..n-1")
    per_layer = {f"layers.{i}.{p}.weight" for i in idx for p in _LAYER_PARAMS}
    missing = sorted(per_layer - set(keys))
    if missing:
        raise CheckpointError(f"{source}: {WHAT} lacks {len(missing)} layer weights (e.g. {missing[:2]}); "
                              "the file is incomplete")
    return len(idx)


def _named_config(name: str) -> RasterConfig:
    """A registered raster config by varkit name (``llamagen-b``) or LlamaGen name (``GPT-B``)."""
    from ..models.registry import _REGISTRY

    key = _VARKIT_NAMES.get(name.upper().replace("_", "-"), name) if name.upper().startswith("GPT") else name
    if key not in _REGISTRY:
        known = sorted(n for n in _REGISTRY if n.startswith("llamagen")) + sorted(_VARKIT_NAMES)
        raise InvalidArgumentError(f"unknown config {name!r} for a LlamaGen GPT; choose one of {', '.join(known)}")
    cfg = _REGISTRY[key][1]()
    if not isinstance(cfg, RasterConfig):
        raise InvalidArgumentError(f"config {name!r} is not a raster (LlamaGen) config")
    return cfg


def _grid_from_freqs(freqs: Tensor | None, cls_token_num: int) -> int | None:
    if freqs is None or freqs.dim() != 3:
        return None
    n = freqs.shape[0] - cls_token_num
    g = round(n ** 0.5)
    return g if g * g == n and g > 0 else None


def condition_fields(sd: Mapping[str, Tensor], dim: int, source: str, what: str) -> dict[str, int]:
    """``num_classes``, ``cls_token_num`` and ``caption_dim`` of a LlamaGen-format GPT (LlamaGen's, NAR's),
    from its class embedding (c2i) or caption projection and null caption (t2i)."""
    if "cls_embedding.embedding_table.weight" in sd:
        rows, d = sd["cls_embedding.embedding_table.weight"].shape
        if d != dim or rows < 2:
            raise CheckpointError(f"{source}: class embedding has shape {(rows, d)}; expected (num_classes + 1, {dim})")
        return {"num_classes": int(rows) - 1, "cls_token_num": 1, "caption_dim": 0}
    elif "cls_embedding.cap_proj.fc1.weight" in sd:
        d, caption_dim = sd["cls_embedding.cap_proj.fc1.weight"].shape
        unc = sd.get("cls_embedding.uncond_embedding")
        if unc is None or unc.dim() != 2 or unc.shape[1] != caption_dim or d != dim:
            raise CheckpointError(
                f"{source}: text-to-image {what} needs cls_embedding.uncond_embedding of shape (tokens, {caption_dim}) "
                f"and cap_proj.fc1 of shape ({dim}, {caption_dim})"
            )
        if "cls_embedding.cap_proj.fc2.weight" not in sd:
            raise CheckpointError(f"{source}: text-to-image {what} lacks cls_embedding.cap_proj.fc2.weight")
        return {"num_classes": 0, "cls_token_num": int(unc.shape[0]), "caption_dim": int(caption_dim)}
    raise CheckpointError(
        f"{source}: {what} has neither a class embedding (cls_embedding.embedding_table) nor a caption "
        "projection (cls_embedding.cap_proj); the file is incomplete"
    )


def ffn_multiple_of(dim: int, hidden: int, source: str) -> int:
    """The ``multiple_of`` (256 … 8) with which LlamaGen's SwiGLU rule gives the stored FFN width ``hidden``."""
    for m in (256, 128, 64, 32, 16, 8):
        if swiglu_hidden_dim(dim, m, None) == hidden:
            return m
    raise CheckpointError(
        f"{source}: FFN width {hidden} does not follow LlamaGen's rule for dim {dim} "
        f"({swiglu_hidden_dim(dim, 256)}); the file is from a modified model"
    )


def gpt_config_from_llamagen_state_dict(
    sd: Mapping[str, Tensor],
    grid: int | None = None,
    config: str | None = None,
    source: str = "state dict",
    freqs_cis: Tensor | None = None,
) -> RasterConfig:
    """Infer the :class:`RasterConfig` of a LlamaGen GPT from its shapes.

    ``sd`` is already converted (:func:`gpt_state_dict_from_llamagen`). dim, vocabulary,
    layers, FFN width, class count / caption width and condition tokens come from the
    shapes; heads from LlamaGen's size table (head_dim 64, except 3B: 100 and 7B: 128) or
    from the named ``config``; ``grid`` (tokens per side) from the caller, or from
    ``freqs_cis`` when the file carried LlamaGen's RoPE table.
    """
    try:
        vocab, dim = sd["tok_embeddings.weight"].shape
        n_layer = _layer_count(sd, source)
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        qkv = sd["layers.0.attention.wqkv.weight"].shape
        out_shape = tuple(sd["output.weight"].shape)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot read the {WHAT} shapes ({exc}); the file is incomplete") from None
    if tuple(qkv) != (3 * dim, dim):
        raise CheckpointError(
            f"{source}: wqkv has shape {tuple(qkv)}, expected {(3 * dim, dim)}; grouped-query (n_kv_head) "
            "models are not supported"
        )
    if out_shape != (vocab, dim):
        raise CheckpointError(f"{source}: output head {out_shape} does not match tok_embeddings {(vocab, dim)}")
    cond = condition_fields(sd, dim, source, WHAT)

    if config is not None:
        named = _named_config(config)
        if (named.dim, named.n_layer) != (dim, n_layer):
            raise CheckpointError(
                f"{source} has dim {dim} and {n_layer} layers but config {config!r} has dim {named.dim} and "
                f"{named.n_layer} layers; drop --config to infer it, or pass the matching one"
            )
        n_head, multiple_of, ffn_mult = named.n_head, named.multiple_of, named.ffn_dim_multiplier
    elif (dim, n_layer) in LLAMAGEN_SIZES:
        n_head, multiple_of, ffn_mult = LLAMAGEN_SIZES[(dim, n_layer)][1], 256, None
    elif dim % 64 == 0:
        n_head, multiple_of, ffn_mult = dim // 64, 256, None
    else:
        raise CheckpointError(
            f"{source}: dim {dim} with {n_layer} layers is not a LlamaGen size and not a multiple of 64, so the "
            "number of heads cannot be inferred; pass --config"
        )
    if swiglu_hidden_dim(dim, multiple_of, ffn_mult) != hidden:  # a non-standard width
        multiple_of, ffn_mult = ffn_multiple_of(dim, hidden, source), None
    if grid is None:
        grid = _grid_from_freqs(freqs_cis, cond["cls_token_num"])
    if grid is None:
        raise InvalidArgumentError(
            f"{source}: the token grid is not stored in LlamaGen's weights; pass the image size "
            "(--image-size 256 or 384)"
        )
    fg = _grid_from_freqs(freqs_cis, cond["cls_token_num"])
    if fg is not None and fg != grid:
        raise InvalidArgumentError(
            f"{source} carries a RoPE table for a {fg}x{fg} grid but a {grid}x{grid} grid was asked for; "
            "pass the image size the model was trained at"
        )
    return RasterConfig(vocab_size=int(vocab), dim=int(dim), n_layer=n_layer, n_head=int(n_head), grid=int(grid),
                        multiple_of=multiple_of, ffn_dim_multiplier=ffn_mult, **cond)


# -- building the generator -------------------------------------------------------------------
def generator_from_llamagen_state_dict(
    sd: Mapping[str, Tensor], config: RasterConfig, source: str = "state dict"
) -> RasterGenerator:
    """Build a :class:`RasterGenerator` holding the converted weights ``sd`` (strict, fp32, no second copy,
    so even GPT-3B fits)."""
    return module_from_state_dict(RasterGenerator, config, sd, source)


def _grid_hint_from_name(path: str | os.PathLike) -> int | None:
    m = re.search(r"(?:^|[_\-.])(256|384|512)(?:[_\-.]|$)", Path(path).name)
    return int(m[1]) if m else None


def load_llamagen_gpt(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    downsample: int = 16,
    config: str | None = None,
    use_ema: bool = False,
) -> RasterGenerator:
    """Load a LlamaGen GPT ``.pt`` as a :class:`RasterGenerator` (grid = image_size / downsample)."""
    sd, cfg, _ = _read_gpt(path, image_size, downsample, config, use_ema)
    return generator_from_llamagen_state_dict(sd, cfg, str(path))


def _read_gpt(path, image_size, downsample, config, use_ema) -> tuple[dict[str, Tensor], RasterConfig, dict]:
    """(converted state dict, inferred config, notes) of a GPT file; nothing written."""
    raw = strip_prefixes(select_state_dict(load_checkpoint(path, WHAT), str(path), WHAT, use_ema))
    freqs = raw.get("freqs_cis")
    sd = gpt_state_dict_from_llamagen(raw, str(path))
    notes: dict[str, Any] = {}
    if image_size is None and freqs is None:
        image_size = _grid_hint_from_name(path)
        if image_size is None:
            raise InvalidArgumentError(
                f"{path}: the image size is not stored in LlamaGen's weights and not in the file name; "
                "pass --image-size (256 or 384)"
            )
        notes["image_size_from"] = "file name"
    grid = None
    if image_size is not None:
        if image_size <= 0 or image_size % downsample:
            raise InvalidArgumentError(
                f"image size {image_size} is not a positive multiple of the tokenizer's downsample factor {downsample}"
            )
        grid = image_size // downsample
    cfg = gpt_config_from_llamagen_state_dict(sd, grid, config, str(path), freqs)
    return sd, cfg, notes


# -- the whole pipeline -----------------------------------------------------------------------
def convert_llamagen(
    vq: str | os.PathLike,
    gpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | None = None,
    image_size: int | None = None,
    use_ema: bool = False,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a LlamaGen VQ + GPT pair into a varkit pipeline folder ``out``.

    Both files are read and checked (families, truncation, codebook size vs vocabulary, grid)
    before anything is written; the folder is built next to ``out`` and renamed into place, so
    an error leaves no partial output. A c2i folder's defaults are the paper's FID protocol (CFG 2.0 for B/L,
    1.75 XL/XXL, 1.65 3B; no top-k; 384 px evaluated at 256) and its ``demo`` preset ``sample_c2i.py``'s
    (CFG 4.0, top-k 2000); a t2i folder's defaults are ``sample_t2i.py``'s (CFG 7.5, top-k 1000).
    """
    return convert_gpt_pair(
        "llamagen", vq, gpt, out, what=WHAT,
        read_gpt=lambda downsample: _read_gpt(gpt, image_size, downsample, config, use_ema),
        build=generator_from_llamagen_state_dict, sizes=LLAMAGEN_SIZES,
        defaults=(LLAMAGEN_C2I_DEFAULTS, LLAMAGEN_T2I_DEFAULTS), name=name, use_ema=use_ema, overwrite=overwrite,
        fid_cfg=LLAMAGEN_FID_CFG,
    )


def convert_gpt_pair(
    family: str,
    vq: str | os.PathLike,
    gpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    what: str,
    read_gpt: Callable[[int], tuple[dict[str, Tensor], Any, dict]],
    build: Callable[[dict[str, Tensor], Any, str], torch.nn.Module],
    sizes: Mapping[tuple[int, int], tuple],
    defaults: tuple[dict, dict],
    name: str | None,
    use_ema: bool,
    overwrite: bool,
    fid_cfg: Mapping[str, float] | float | None = None,
) -> Path:
    """Convert a LlamaGen VQ + a LlamaGen-format GPT (LlamaGen's own, NAR's) into a pipeline folder ``out``.

    ``read_gpt(downsample)`` reads the GPT file (converted state dict, config, notes; nothing written),
    ``build(sd, config, source)`` makes the generator, ``sizes`` names it by (dim, n_layer), ``defaults`` are
    the (c2i, t2i) demo-script settings. A c2i folder's defaults are the paper's FID protocol (``fid_cfg``: CFG by
    size name, or one value; :func:`c2i_protocol`) and its ``demo`` preset the demo script's. Both files are read and checked before anything is written and the
    folder is built next to ``out`` and renamed into place, so an error leaves no partial output;
    ``convert.json`` records the source files and the inferred config.
    """
    from .llamagen_vq import WHAT as VQ_WHAT
    from .llamagen_vq import load_llamagen_vq

    out = refuse_existing(out, overwrite)
    tokenizer = load_llamagen_vq(vq)  # the sampling scripts use the VQ's "model" weights
    sd, cfg, notes = read_gpt(tokenizer.downsample)
    if cfg.vocab_size != tokenizer.codebook_size:
        raise CheckpointError(
            f"the {what} {gpt} predicts {cfg.vocab_size} token ids but the {VQ_WHAT} {vq} has "
            f"{tokenizer.codebook_size} codes; pass the tokenizer the GPT was trained with"
        )
    generator = build(sd, cfg, str(gpt))
    size = sizes.get((cfg.dim, cfg.n_layer), (f"GPT-d{cfg.dim}x{cfg.n_layer}",))[0]
    kind = "t2i" if cfg.caption_dim else "c2i"
    px = cfg.grid * tokenizer.downsample
    c2i_defaults, t2i_defaults = defaults
    presets = {}
    if cfg.caption_dim:
        pipe_defaults = dict(t2i_defaults)
    elif fid_cfg is None:
        pipe_defaults = dict(c2i_defaults)
    else:
        scale = fid_cfg if isinstance(fid_cfg, (int, float)) else fid_cfg.get(size, 2.0)
        pipe_defaults, presets = c2i_protocol(float(scale), px), {"demo": dict(c2i_defaults)}
    return save_converted_pipeline(
        out, overwrite, tokenizer, generator, pipe_defaults,
        name or f"{family}-{size}-{kind}-{px}", {
            "family": family,
            "vq": file_record(vq),
            "gpt": file_record(gpt, weights="ema" if use_ema else "model"),
            f"{family}_model": size,
            "model_type": kind,
            "image_size": px,
            "grid": cfg.grid,
            "generator_config": dataclasses.asdict(cfg),
            "defaults": pipe_defaults, "presets": presets,
            **notes,
        }, presets=presets)


def cmd_convert_llamagen(args) -> None:
    """``varkit convert llamagen``: see :func:`convert_llamagen`."""
    out = convert_llamagen(args.vq, args.gpt, args.out, config=args.config, image_size=args.image_size,
                           use_ema=args.ema, name=args.name, overwrite=args.overwrite)
    from ..modeling import read_config

    g = read_config(out / "generator")
    kind = "t2i" if g["caption_dim"] else f"c2i, {g['num_classes']} classes"
    print(f"wrote {out}/ (LlamaGen {g['dim']}d x {g['n_layer']} layers, {g['n_head']} heads, "
          f"{g['grid']}x{g['grid']} tokens, {kind}); load it with varkit.load_pipeline({str(out)!r})")
