"""Convert LlamaGen VQ tokenizer checkpoints (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``, ...).

LlamaGen names its modules after taming-transformers (``encoder.conv_blocks.{lvl}.res.{j}``,
``mid.{0,1,2}``, attention as 1x1 convs ``q/k/v/proj_out``); varkit's :class:`VQTokenizer`
holds a diffusers ``VQModel`` (``model.encoder.down_blocks.{lvl}.resnets.{j}``, ``mid_block``,
attention as Linear ``to_q/to_k/to_v/to_out.0``). LlamaGen's decoder ``conv_blocks`` are in
generation order (0 = lowest resolution), the same order as diffusers' ``up_blocks``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError, VarkitError
from ..modeling import load_state_dict_strict
from ..tokenizers.vq import VQConfig, VQTokenizer
from .common import load_checkpoint, select_state_dict, strip_prefixes

__all__ = [
    "vq_config_from_llamagen_state_dict",
    "vq_state_dict_from_llamagen",
    "vq_state_dict_to_llamagen",
    "load_llamagen_vq",
    "convert_llamagen_vq",
]

WHAT = "LlamaGen VQ tokenizer checkpoint"
_PREFIX = "model."  # VQTokenizer.model is the diffusers VQModel
_TRAINING_ONLY = ("quantize.codebook_used",)
_REQUIRED = (
    "encoder.conv_in.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
    "quantize.embedding.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)

# Sub-module names inside a block: LlamaGen's -> varkit's (attention: 1x1 convs -> diffusers' Linear layers).
_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# The one key mapping, read in both directions: (LlamaGen key, varkit key without the ``model.`` prefix).
_RULES = [
    ("{part}.conv_in.{p}", "{part}.conv_in.{p}"),
    ("{part}.conv_out.{p}", "{part}.conv_out.{p}"),
    ("{part}.norm_out.{p}", "{part}.conv_norm_out.{p}"),
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
    ("quantize.embedding.weight", "quantize.embedding.weight"),
    ("encoder.conv_blocks.{lvl}.res.{j}.{res}.{p}", "encoder.down_blocks.{lvl}.resnets.{j}.{res}.{p}"),
    ("encoder.conv_blocks.{lvl}.attn.{j}.{attn}.{p}", "encoder.down_blocks.{lvl}.attentions.{j}.{attn}.{p}"),
    ("encoder.conv_blocks.{lvl}.downsample.conv.{p}", "encoder.down_blocks.{lvl}.downsamplers.0.conv.{p}"),
    ("decoder.conv_blocks.{lvl}.res.{j}.{res}.{p}", "decoder.up_blocks.{lvl}.resnets.{j}.{res}.{p}"),
    ("decoder.conv_blocks.{lvl}.attn.{j}.{attn}.{p}", "decoder.up_blocks.{lvl}.attentions.{j}.{attn}.{p}"),
    ("decoder.conv_blocks.{lvl}.upsample.conv.{p}", "decoder.up_blocks.{lvl}.upsamplers.0.conv.{p}"),
    ("{part}.mid.0.{res}.{p}", "{part}.mid_block.resnets.0.{res}.{p}"),
    ("{part}.mid.1.{attn}.{p}", "{part}.mid_block.attentions.0.{attn}.{p}"),
    ("{part}.mid.2.{res}.{p}", "{part}.mid_block.resnets.1.{res}.{p}"),
]


def _compile(template: str, names: dict[str, dict[str, str]]) -> re.Pattern:
    fields = {"part": "encoder|decoder", "lvl": r"\d+", "j": r"\d+", "p": "weight|bias",
              **{f: "|".join(map(re.escape, table)) for f, table in names.items()}}
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(x) if i % 2 == 0 else f"(?P<{x}>{fields[x]})" for i, x in enumerate(parts)))


def _direction(to_varkit: bool) -> list[tuple[re.Pattern, str, dict[str, dict[str, str]]]]:
    """(pattern of a source key, target template, sub-module renames) for one direction of :data:`_RULES`."""
    names = {"res": _RES_NAMES, "attn": _ATTN_NAMES}
    if not to_varkit:
        names = {f: {v: k for k, v in table.items()} for f, table in names.items()}
    return [(_compile(src, names), dst, names) for src, dst in (r if to_varkit else r[::-1] for r in _RULES)]


_TO_VARKIT, _TO_LLAMAGEN = _direction(True), _direction(False)


def _rename(key: str, rules: list[tuple[re.Pattern, str, dict[str, dict[str, str]]]]) -> str | None:
    """``key`` renamed by the first rule that matches it, or None when none does."""
    for rx, template, names in rules:
        m = rx.fullmatch(key)
        if m:
            vals = m.groupdict()
            return template.format(**{f: names[f][v] if f in names else v for f, v in vals.items()})
    return None


def _llamagen_key_to_varkit(key: str) -> str | None:
    """The varkit name of a LlamaGen key (None if the key is not part of a LlamaGen VQ)."""
    return _rename(key, _TO_VARKIT)


def _varkit_key_to_llamagen(key: str) -> str | None:
    """Inverse of :func:`_llamagen_key_to_varkit` (key without the ``model.`` prefix)."""
    return _rename(key, _TO_LLAMAGEN)


def _is_attn_linear_weight(varkit_key: str) -> bool:
    return bool(re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", varkit_key))


# -- public conversion functions ---------------------------------------------------------------
def vq_state_dict_from_llamagen(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LlamaGen VQ state dict -> :class:`VQTokenizer` state dict.

    Attention 1x1-conv weights ``(C, C, 1, 1)`` become Linear weights ``(C, C)``; training-only
    buffers (``quantize.codebook_used``) are dropped. Raises :class:`CheckpointError` on keys
    that do not belong to a LlamaGen VQ.
    """
    sd = strip_prefixes(sd)
    _check_llamagen_vq(sd, "state dict")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _TRAINING_ONLY:
            continue
        new = _llamagen_key_to_varkit(key)
        if new is None:
            unknown.append(key)
            continue
        if _is_attn_linear_weight(new):
            if value.ndim != 4 or tuple(value.shape[2:]) != (1, 1):
                raise CheckpointError(
                    f"LlamaGen attention weight {key} has shape {tuple(value.shape)}; expected a 1x1 conv (C, C, 1, 1)"
                )
            value = value[:, :, 0, 0]
        out[_PREFIX + new] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not part of a LlamaGen VQ tokenizer (e.g. {sorted(unknown)[:3]}); "
            "the file is from another model or another LlamaGen version"
        )
    return out


def vq_state_dict_to_llamagen(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`VQTokenizer` state dict -> LlamaGen's names and shapes (inverse of the above).

    The training buffer ``quantize.codebook_used`` is not written.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        new = _varkit_key_to_llamagen(bare)
        if new is None:
            raise CheckpointError(f"{key} is not a VQTokenizer parameter; cannot write it in LlamaGen's format")
        if _is_attn_linear_weight(bare):
            value = value[:, :, None, None]
        out[new] = value
    return out


def vq_config_from_llamagen_state_dict(sd: Mapping[str, Tensor], **overrides) -> VQConfig:
    """Infer the :class:`VQConfig` of a LlamaGen VQ state dict from its shapes.

    ``codebook_l2_norm`` cannot be read from weights; it defaults to True as in every
    published LlamaGen tokenizer. ``overrides`` set any other field (losses, l2 norm).
    """
    sd = strip_prefixes(sd)
    _check_llamagen_vq(sd, "state dict")
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = _indices(sd, r"encoder\.conv_blocks\.(\d+)\.")
        n = len(levels)
        if n == 0 or levels != list(range(n)):
            raise CheckpointError(f"{WHAT} has encoder levels {levels}; expected 0..n-1")
        ch_mult = []
        for lvl in range(n):
            width = sd[f"encoder.conv_blocks.{lvl}.res.0.conv1.weight"].shape[0]
            if width % ch:
                raise CheckpointError(f"{WHAT}: encoder level {lvl} width {width} is not a multiple of ch={ch}")
            ch_mult.append(width // ch)
        res = _indices(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
        dec_levels = _indices(sd, r"decoder\.conv_blocks\.(\d+)\.")
        dec_res = _indices(sd, r"decoder\.conv_blocks\.0\.res\.(\d+)\.")
        dec_mult = [
            sd[f"decoder.conv_blocks.{k}.res.0.conv1.weight"].shape[0] // ch for k in range(len(dec_levels))
        ]
        z_channels = sd["encoder.conv_out.weight"].shape[0]
        codebook_size, codebook_dim = sd["quantize.embedding.weight"].shape
        out_channels = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{WHAT} lacks {exc.args[0]}; the file is incomplete or from another model") from None
    if len(dec_levels) != n or dec_mult != ch_mult[::-1]:
        raise CheckpointError(
            f"{WHAT}: decoder widths {dec_mult[::-1]} differ from encoder widths {ch_mult}; "
            "varkit supports LlamaGen tokenizers with a symmetric encoder and decoder"
        )
    if len(dec_res) != len(res) + 1:
        raise CheckpointError(
            f"{WHAT}: decoder has {len(dec_res)} res blocks per level, encoder {len(res)}; "
            "LlamaGen's decoder has one more than its encoder"
        )
    if out_channels != in_channels:
        raise CheckpointError(f"{WHAT}: {in_channels} input but {out_channels} output channels; expected equal")
    fields = dict(
        in_channels=int(in_channels),
        ch=int(ch),
        ch_mult=tuple(int(m) for m in ch_mult),
        num_res_blocks=len(res),
        z_channels=int(z_channels),
        codebook_size=int(codebook_size),
        codebook_dim=int(codebook_dim),
        codebook_l2_norm=True,
        norm_groups=32,  # LlamaGen hard-codes GroupNorm(32)
    )
    fields.update(overrides)
    return VQConfig(**fields)


def tokenizer_from_llamagen_state_dict(sd: Mapping[str, Tensor], source: str = "state dict", **overrides) -> VQTokenizer:
    """Build a :class:`VQTokenizer` from an in-memory LlamaGen VQ state dict (strict)."""
    cfg = vq_config_from_llamagen_state_dict(sd, **overrides)
    try:
        model = VQTokenizer(cfg)
    except VarkitError as exc:
        raise CheckpointError(f"{source}: the inferred tokenizer config is invalid: {exc}") from None
    state = vq_state_dict_from_llamagen(sd)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    load_state_dict_strict(model, state, source)
    return model.eval()


def load_llamagen_vq(path: str | os.PathLike, *, use_ema: bool = False, **overrides) -> VQTokenizer:
    """Load a LlamaGen VQ ``.pt`` (weights under ``"model"``, ``"module"``, ``"state_dict"``, ``"ema"`` or raw).

    ``"model"`` is used when present, as LlamaGen's sampling scripts do; ``use_ema=True``
    prefers ``"ema"``. Raises :class:`CheckpointError` for unreadable, truncated or foreign files.
    """
    sd = select_state_dict(load_checkpoint(path, WHAT), str(path), WHAT, use_ema)
    _check_llamagen_vq(strip_prefixes(sd), str(path))
    return tokenizer_from_llamagen_state_dict(sd, str(path), **overrides)


def convert_llamagen_vq(src: str | os.PathLike, dst: str | os.PathLike, *, use_ema: bool = False) -> VQTokenizer:
    """Convert a LlamaGen VQ ``.pt`` into a varkit folder (``config.json`` + ``model.safetensors``)."""
    model = load_llamagen_vq(src, use_ema=use_ema)
    model.save_pretrained(Path(dst))
    return model


# -- detection and helpers ---------------------------------------------------------------------
_FOREIGN: list[tuple[Callable[[set], bool], str]] = [
    (lambda ks: "tok_embeddings.weight" in ks or any(k.startswith("layers.") and ".attention.wqkv" in k for k in ks),
     "a LlamaGen GPT (generator) checkpoint"),
    (lambda ks: any(k.startswith(("word_embed.", "class_emb.")) for k in ks) or any(k.startswith("blocks.0.") for k in ks),
     "a transformer (VAR-style blocks.*) checkpoint"),
    (lambda ks: any(k.startswith(("quantize.quant_resi", "encoder.down.", "decoder.up.")) for k in ks),
     "a taming/VAR-style VQ-VAE (encoder.down.*), not LlamaGen's (encoder.conv_blocks.*)"),
    (lambda ks: any(k.startswith(("model.encoder.down_blocks", "model.decoder.up_blocks")) for k in ks),
     "already a varkit VQTokenizer state dict (load it with varkit.modeling.load_module)"),
]


def _check_llamagen_vq(sd: Mapping[str, Tensor], source: str) -> None:
    keys = set(sd)
    if all(k in keys for k in _REQUIRED) and any(k.startswith("encoder.conv_blocks.") for k in keys):
        return
    for test, what in _FOREIGN:
        if test(keys):
            raise CheckpointError(
                f"{source} is {what}, not a {WHAT}; pass the VQ file (e.g. vq_ds16_c2i.pt)"
            )
    missing = [k for k in _REQUIRED if k not in keys]
    raise CheckpointError(
        f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(map(str, keys))[:3]}); "
        "pass the VQ file (e.g. vq_ds16_c2i.pt)"
    )


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in sd if (m := rx.match(k))})
