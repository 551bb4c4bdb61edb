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
from ..io import load_torch_checkpoint
from ..modeling import load_state_dict_strict
from ..tokenizers.vq import VQConfig, VQTokenizer

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

# Attention sub-module names: LlamaGen (1x1 convs) -> diffusers Attention (Linear).
_ATTN_TO_VARKIT = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_LLAMAGEN = {v: k for k, v in _ATTN_TO_VARKIT.items()}
_RES_TO_VARKIT = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_RES_TO_LLAMAGEN = {v: k for k, v in _RES_TO_VARKIT.items()}


# -- key renaming ------------------------------------------------------------------------------
def _res(sub: str, table: dict[str, str]) -> str | None:
    head, _, param = sub.partition(".")
    return f"{table[head]}.{param}" if head in table and param in ("weight", "bias") else None


def _attn(sub: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if sub.startswith(src + ".") and sub[len(src) + 1:] in ("weight", "bias"):
            return f"{dst}.{sub[len(src) + 1:]}"
    return None


def _llamagen_key_to_varkit(key: str) -> str | None:
    """The varkit name of a LlamaGen key (None if the key is not part of a LlamaGen VQ)."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m or key == "quantize.embedding.weight":
        return key
    m = re.fullmatch(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn)\.(\d+)\.(.+)", key)
    if m:
        part, lvl, kind, j, sub = m.groups()
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        new = _res(sub, _RES_TO_VARKIT) if kind == "res" else _attn(sub, _ATTN_TO_VARKIT)
        group = "resnets" if kind == "res" else "attentions"
        return f"{part}.{blocks}.{lvl}.{group}.{j}.{new}" if new else None
    m = re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{m[1]}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.([012])\.(.+)", key)
    if m:
        part, i, sub = m.groups()
        if i == "1":
            new = _attn(sub, _ATTN_TO_VARKIT)
            return f"{part}.mid_block.attentions.0.{new}" if new else None
        new = _res(sub, _RES_TO_VARKIT)
        return f"{part}.mid_block.resnets.{0 if i == '0' else 1}.{new}" if new else None
    return None


def _varkit_key_to_llamagen(key: str) -> str | None:
    """Inverse of :func:`_llamagen_key_to_varkit` (key without the ``model.`` prefix)."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m or key == "quantize.embedding.weight":
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, _, lvl, group, j, sub = m.groups()
        new = _res(sub, _RES_TO_LLAMAGEN) if group == "resnets" else _attn(sub, _ATTN_TO_LLAMAGEN)
        kind = "res" if group == "resnets" else "attn"
        return f"{part}.conv_blocks.{lvl}.{kind}.{j}.{new}" if new else None
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.conv_blocks.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.conv_blocks.{m[1]}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if m:
        part, group, i, sub = m.groups()
        if group == "attentions" and i == "0":
            new = _attn(sub, _ATTN_TO_LLAMAGEN)
            return f"{part}.mid.1.{new}" if new else None
        if group == "resnets" and i in "01":
            new = _res(sub, _RES_TO_LLAMAGEN)
            return f"{part}.mid.{0 if i == '0' else 2}.{new}" if new else None
    return None


def _is_attn_linear_weight(varkit_key: str) -> bool:
    return bool(re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", varkit_key))


# -- public conversion functions ---------------------------------------------------------------
def vq_state_dict_from_llamagen(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LlamaGen VQ state dict -> :class:`VQTokenizer` state dict.

    Attention 1x1-conv weights ``(C, C, 1, 1)`` become Linear weights ``(C, C)``; training-only
    buffers (``quantize.codebook_used``) are dropped. Raises :class:`CheckpointError` on keys
    that do not belong to a LlamaGen VQ.
    """
    sd = _unwrap_prefix(sd)
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
    sd = _unwrap_prefix(sd)
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
    """Load a LlamaGen VQ ``.pt`` (weights under ``"model"``, ``"ema"``, ``"state_dict"`` or raw).

    ``"model"`` is used when present, as LlamaGen's sampling scripts do; ``use_ema=True``
    prefers ``"ema"``. Raises :class:`CheckpointError` for unreadable, truncated or foreign files.
    """
    ckpt = load_torch_checkpoint(path, WHAT)
    sd = _select_state_dict(ckpt, use_ema, str(path))
    return tokenizer_from_llamagen_state_dict(sd, str(path), **overrides)


def convert_llamagen_vq(src: str | os.PathLike, dst: str | os.PathLike, *, use_ema: bool = False) -> VQTokenizer:
    """Convert a LlamaGen VQ ``.pt`` into a varkit folder (``config.json`` + ``model.safetensors``)."""
    model = load_llamagen_vq(src, use_ema=use_ema)
    model.save_pretrained(Path(dst))
    return model


# -- detection and helpers ---------------------------------------------------------------------
def _select_state_dict(ckpt, use_ema: bool, source: str) -> dict[str, Tensor]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {WHAT}")
    order = ("ema", "model", "state_dict", "module") if use_ema else ("model", "ema", "state_dict", "module")
    for name in order:
        if isinstance(ckpt.get(name), Mapping):
            sd = ckpt[name]
            break
    else:
        sd = ckpt
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(
            f"{source} holds no tensors under 'model', 'ema' or 'state_dict' (top-level keys "
            f"{sorted(map(str, ckpt))[:6]}); it is not a {WHAT}"
        )
    _check_llamagen_vq(_unwrap_prefix(sd), source)
    return sd


def _unwrap_prefix(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Strip a DDP ``module.`` prefix if every key has it."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


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
