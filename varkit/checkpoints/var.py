"""Convert VAR's published transformer checkpoints (``var_d16.pth`` … ``var_d30.pth``, 512-px ``var_d36.pth``).

The files are raw ``state_dict``s of FoundationVision/VAR's ``VAR`` module, loaded there with
``strict=True``, so they also carry three derived buffers: ``lvl_1L`` (scale index of every token),
``attn_bias_for_masking`` (the L×L block-causal mask) and ``blocks.{i}.attn.zero_k_bias`` (zeros).
:class:`~varkit.models.scales.ScalesGenerator` keeps VAR's names except in attention:

=============================  ============================
VAR                            varkit
=============================  ============================
``blocks.{i}.attn.mat_qkv``    ``blocks.{i}.attn.wqkv``
``blocks.{i}.attn.proj``       ``blocks.{i}.attn.wo``
``blocks.{i}.attn.scale_mul_1H11``  ``blocks.{i}.attn.qk_scale``
=============================  ============================

The derived buffers are checked against the inferred scale schedule and dropped on the way in, and
rebuilt exactly on the way out (:func:`var_state_dict_to_var`). The scale schedule is read from
``lvl_1L`` (or the mask) when present, else matched against VAR's schedules by token count.
:func:`convert_var` writes a whole pipeline folder (VAR's VQVAE + transformer + VAR's FID sampling
defaults: CFG 1.5 on VAR's linear ramp, top-k 900, top-p 0.96), atomically.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import load_torch_checkpoint, refuse_existing
from ..models.scales import ScalesConfig, ScalesGenerator
from ..tokenizers.msvq import VAR_PATCH_NUMS
from .arguments import add_convert_var_arguments  # noqa: F401 (public: defined without torch for the CLI)
from .common import (file_record, module_from_state_dict, read_converted,
                     save_converted_pipeline, strip_prefixes, tensors_of)

__all__ = [
    "VAR_DEFAULTS",
    "VAR_DEPTH_RESOLUTION",
    "add_convert_var_arguments",
    "cmd_convert_var",
    "convert_var",
    "generator_from_var_state_dict",
    "is_var_state_dict",
    "load_var",
    "resolution_patch_nums",
    "select_var_state_dict",
    "var_config_from_state_dict",
    "var_state_dict_from_var",
    "var_state_dict_to_var",
]

WHAT = "VAR transformer checkpoint"
VAE_WHAT = "VAR VQVAE checkpoint"

#: VAR's README settings for its FID numbers (``more_smooth=False``, no temperature argument).
VAR_DEFAULTS = {"cfg": 1.5, "cfg_schedule": "var", "temperature": 1.0, "top_k": 900, "top_p": 0.96}
#: Published depths and the resolution each was trained at (d36 is the shared-AdaLN 512-px model).
VAR_DEPTH_RESOLUTION = {16: 256, 20: 256, 24: 256, 30: 256, 36: 512}

# VAR name -> varkit name (inside blocks.{i}.attn.)
_ATTN_TO_VARKIT = {"mat_qkv.weight": "wqkv.weight", "proj.weight": "wo.weight", "proj.bias": "wo.bias",
                   "scale_mul_1H11": "qk_scale", "q_bias": "q_bias", "v_bias": "v_bias"}
_ATTN_TO_VAR = {v: k for k, v in _ATTN_TO_VARKIT.items()}
_BLOCK_OTHER = ("ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
                "ada_lin.1.weight", "ada_lin.1.bias", "ada_gss")
_TOP = ("pos_start", "pos_1LC", "word_embed.weight", "word_embed.bias", "class_emb.weight", "lvl_embed.weight",
        "shared_ada_lin.1.weight", "shared_ada_lin.1.bias", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias",
        "head.weight", "head.bias")
_DERIVED_TOP = ("lvl_1L", "attn_bias_for_masking")
_BLOCK_RX = re.compile(r"blocks\.(\d+)\.(.+)")
_REQUIRED = ("class_emb.weight", "pos_1LC", "lvl_embed.weight", "word_embed.weight", "head.weight",
             "head_nm.ada_lin.1.weight", "blocks.0.attn.mat_qkv.weight")


# -- reading files ----------------------------------------------------------------------------
def is_var_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` has the keys of VAR's transformer (VAR names)."""
    return all(k in sd for k in _REQUIRED)


def _foreign(keys: set[str]) -> str | None:
    """What a non-VAR-transformer state dict is, when recognisable, with what to do."""
    if any(k.startswith(("encoder.down.", "decoder.up.", "quantize.quant_resi")) for k in keys) \
            or "quantize.embedding.weight" in keys and any(k.startswith("encoder.") for k in keys) \
            and not any(k.startswith("encoder.conv_blocks.") for k in keys):
        return "VAR's multi-scale VQVAE (vae_ch160v4096z32.pth); pass it as --vae and the transformer (var_d16.pth) as --var"
    if any(k.startswith("medusa_") for k in keys):
        return "a NAR (next-neighbour) checkpoint; convert it with `varkit convert nar`"
    if any(k.startswith(("encoder_blocks.", "decoder_blocks.", "diffloss.")) for k in keys):
        return "a MAR checkpoint; convert it with `varkit convert mar`"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") and ".attention." in k for k in keys):
        return "a LlamaGen GPT checkpoint; convert it with `varkit convert llamagen`"
    if any(k.startswith("encoder.conv_blocks.") for k in keys) or "quantize.codebook_used" in keys:
        return "a LlamaGen VQ tokenizer checkpoint; convert it with `varkit convert llamagen --vq ...`"
    if any(k.startswith("blocks.") and (".attn.wqkv." in k or ".attn.qk_scale" in k) for k in keys):
        return "already in varkit's format (a ScalesGenerator state dict); load it with varkit.load_pipeline"
    return None


def select_var_state_dict(ckpt: Any, source: str) -> dict[str, Tensor]:
    """The VAR transformer weights of a loaded file: the raw dict (published files), or a VAR
    training checkpoint's ``trainer.var_wo_ddp``, or ``model``/``state_dict``/``module``/``ema``."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {WHAT}")
    cands: list[Mapping] = [ckpt]
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get("var_wo_ddp"), Mapping):
        cands.insert(0, trainer["var_wo_ddp"])
    cands += [ckpt[k] for k in ("model", "state_dict", "module", "ema") if isinstance(ckpt.get(k), Mapping)]
    for cand in cands:
        sd = tensors_of(cand)
        if is_var_state_dict(sd):
            return sd
    for cand in cands:
        sd = tensors_of(cand)
        what = _foreign(set(sd))
        if what is not None:
            raise CheckpointError(f"{source} is not a {WHAT}: it is {what}")
    sd = tensors_of(ckpt)
    if not sd:
        raise CheckpointError(f"{source} holds no tensors (top-level keys {sorted(map(str, ckpt))[:6]}); it is not a {WHAT}")
    missing = [k for k in _REQUIRED if k not in sd]
    raise CheckpointError(
        f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(sd)[:3]}); "
        "pass VAR's transformer file (var_d16.pth ... var_d36.pth) as --var"
    )


# -- key mapping ------------------------------------------------------------------------------
def _lvl_1L(patch_nums: Sequence[int]) -> Tensor:
    return torch.cat([torch.full((p * p,), i, dtype=torch.long) for i, p in enumerate(patch_nums)]).view(1, -1)


def _attn_bias(patch_nums: Sequence[int]) -> Tensor:
    d = _lvl_1L(patch_nums).view(1, -1, 1)
    L = d.shape[1]
    return torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()


def _schedule_from_levels(lvl: Tensor) -> tuple[int, ...] | None:
    """patch_nums from VAR's ``lvl_1L`` buffer (scale index of each token), None if it is not one."""
    lvl = lvl.reshape(-1)
    if lvl.numel() == 0 or lvl.is_floating_point():
        return None
    counts = torch.bincount(lvl.long().clamp(min=0))
    pns = []
    for c in counts.tolist():
        p = math.isqrt(c)
        if c == 0 or p * p != c:
            return None
        pns.append(p)
    if not torch.equal(lvl.long(), _lvl_1L(pns).reshape(-1)):
        return None
    return tuple(pns)


def _schedule_from_mask(bias: Tensor) -> tuple[int, ...] | None:
    """patch_nums from ``attn_bias_for_masking`` (row i sees the tokens of every scale <= its own)."""
    if bias.dim() != 4 or bias.shape[-1] != bias.shape[-2]:
        return None
    visible = (bias[0, 0] == 0).sum(-1)
    ends = torch.unique(visible).tolist()
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
    pns = []
    for c in sizes:
        p = math.isqrt(c)
        if p * p != c:
            return None
        pns.append(p)
    return tuple(pns) if pns else None


def var_state_dict_from_var(sd: Mapping[str, Tensor], source: str = "state dict") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """VAR transformer state dict → (:class:`ScalesGenerator` state dict, notes).

    The derived buffers are dropped; ``notes["patch_nums"]`` is the schedule they encode (or None
    when the file carries neither ``lvl_1L`` nor ``attn_bias_for_masking``). Unknown keys, another
    family's file, or a non-zero ``zero_k_bias`` raise :class:`CheckpointError`.
    """
    sd = strip_prefixes(sd)
    what = _foreign(set(sd))
    if what is not None and not is_var_state_dict(sd):
        raise CheckpointError(f"{source} is not a {WHAT}: it is {what}")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(f"{source} is not a {WHAT}: it lacks {missing[:3]} (found e.g. {sorted(sd)[:3]}); "
                              "the file is incomplete or from another model")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    notes: dict[str, Any] = {"patch_nums": None}
    for k, v in sd.items():
        if k in _DERIVED_TOP:
            continue
        if k in _TOP:
            out[ScalesGenerator.legacy_keys.get(k, k)] = v
            continue
        m = _BLOCK_RX.fullmatch(k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attn."):
            sub = rest[len("attn."):]
            if sub == "zero_k_bias":
                if v.abs().max().item() != 0:
                    raise CheckpointError(f"{source}: {k} is not zero; VAR's k projection has no bias, the file is corrupt")
                continue
            if sub in _ATTN_TO_VARKIT:
                out[f"blocks.{i}.attn.{_ATTN_TO_VARKIT[sub]}"] = v
                continue
        elif rest in _BLOCK_OTHER:
            out[k] = v
            continue
        unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not part of a {WHAT} (e.g. {sorted(unknown)[:3]}); "
                              + ("it is a Distilled Decoding student: convert it with `varkit convert dd`"
                                 if "n_d_embed.weight" in unknown else "the file is from another model or a modified VAR"))
    from_lvl = _schedule_from_levels(sd["lvl_1L"]) if "lvl_1L" in sd else None
    from_mask = _schedule_from_mask(sd["attn_bias_for_masking"]) if "attn_bias_for_masking" in sd else None
    if "lvl_1L" in sd and from_lvl is None:
        raise CheckpointError(f"{source}: lvl_1L {tuple(sd['lvl_1L'].shape)} is not a VAR scale index; the file is corrupt")
    if "attn_bias_for_masking" in sd and from_mask is None:
        raise CheckpointError(f"{source}: attn_bias_for_masking {tuple(sd['attn_bias_for_masking'].shape)} is not VAR's "
                              "block-causal mask; the file is corrupt")
    if from_lvl and from_mask and from_lvl != from_mask:
        raise CheckpointError(f"{source}: lvl_1L encodes scales {from_lvl} but attn_bias_for_masking {from_mask}; "
                              "the file is corrupt")
    notes["patch_nums"] = from_lvl or from_mask
    return out, notes


def var_state_dict_to_var(sd: Mapping[str, Tensor], config: ScalesConfig) -> dict[str, Tensor]:
    """:class:`ScalesGenerator` state dict → a raw VAR state dict in ``VAR.state_dict()`` order, with the
    derived buffers ``lvl_1L``, ``attn_bias_for_masking`` and ``zero_k_bias`` rebuilt (loadable strictly by VAR)."""
    pns = tuple(config.patch_nums)
    derived = {"lvl_1L": _lvl_1L(pns), "attn_bias_for_masking": _attn_bias(pns)}
    order: list[tuple[str, str | None]] = [  # (VAR key, varkit key or None for a derived buffer)
        ("pos_start", "pos_start"), ("pos_1LC", "pos_1LC"), ("lvl_1L", None), ("attn_bias_for_masking", None),
        ("word_embed.weight", "word_embed.weight"), ("word_embed.bias", "word_embed.bias"),
        ("class_emb.weight", "class_emb.weight"), ("lvl_embed.weight", "lvl_embed.weight")]
    if config.shared_aln:
        order += [("shared_ada_lin.1.weight",) * 2, ("shared_ada_lin.1.bias",) * 2]
    for i in range(config.depth):
        p = f"blocks.{i}."
        if config.shared_aln:
            order.append((p + "ada_gss",) * 2)
        order += [(p + "attn.scale_mul_1H11", p + "attn.qk_scale"), (p + "attn.q_bias",) * 2, (p + "attn.v_bias",) * 2,
                  (p + "attn.zero_k_bias", None), (p + "attn.mat_qkv.weight", p + "attn.wqkv.weight"),
                  (p + "attn.proj.weight", p + "attn.wo.weight"), (p + "attn.proj.bias", p + "attn.wo.bias")]
        order += [(p + s,) * 2 for s in ("ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias")]
        if not config.shared_aln:
            order += [(p + "ada_lin.1.weight",) * 2, (p + "ada_lin.1.bias",) * 2]
    order += [(k,) * 2 for k in ("head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias")]
    order += [("head.weight", "output.weight"), ("head.bias", "output.bias")]
    wanted = {v for _, v in order if v is not None}
    missing = sorted(wanted - set(sd))
    unknown = sorted(set(sd) - wanted - {"lvl_1L"})
    if missing or unknown:
        raise CheckpointError(f"not a ScalesGenerator state dict of this config: missing {missing[:3]}, unexpected "
                              f"{unknown[:3]}")
    out: dict[str, Tensor] = {}
    for var_key, key in order:
        if key is not None:
            out[var_key] = sd[key]
        elif var_key in derived:
            out[var_key] = derived[var_key]
        else:  # zero_k_bias
            ref = sd[var_key.replace("zero_k_bias", "q_bias")]
            out[var_key] = torch.zeros(ref.shape, dtype=ref.dtype)
    return out


# -- config inference -------------------------------------------------------------------------
def _depth(keys, source: str) -> int:
    idx = sorted({int(m.group(1)) for k in keys if (m := _BLOCK_RX.fullmatch(k))})
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {WHAT} has block indices {idx[:5]}…; expected 0..depth-1")
    return len(idx)


def resolution_patch_nums(resolution: int) -> tuple[int, ...]:
    """VAR's scale schedule for an image resolution (256, 512, 1024), or a clear error."""
    if resolution not in VAR_PATCH_NUMS:
        hint = ("it is not a multiple of the VQVAE's 16x downsampling; " if resolution % 16 else "")
        raise InvalidArgumentError(
            f"cannot build a scale schedule for resolution {resolution}: {hint}VAR defines schedules only for "
            f"{', '.join(map(str, sorted(VAR_PATCH_NUMS)))} px (pass --patch-nums 1,2,...,N with N = resolution/16 "
            "to give one explicitly)")
    return VAR_PATCH_NUMS[resolution]


def _check_schedule(pns: Sequence[int], L: int, S: int, source: str, origin: str) -> tuple[int, ...]:
    pns = tuple(int(p) for p in pns)
    if not pns or any(p < 1 for p in pns) or any(a >= b for a, b in itertools.pairwise(pns)):
        raise InvalidArgumentError(f"scale schedule {pns} ({origin}) must be strictly increasing positive sizes")
    total = sum(p * p for p in pns)
    if len(pns) != S or total != L:
        raise InvalidArgumentError(
            f"cannot build the scale schedule {pns} ({origin}, {len(pns)} scales, {total} tokens) for {source}: the transformer was trained with {S} scales and {L} tokens"
            + "".join(f" (VAR's {r}-px schedule {s})" for r, s in VAR_PATCH_NUMS.items()
                      if len(s) == S and sum(p * p for p in s) == L))
    return pns


def var_config_from_state_dict(
    sd: Mapping[str, Tensor],
    patch_nums: Sequence[int] | None = None,
    resolution: int | None = None,
    source: str = "state dict",
    stored_patch_nums: Sequence[int] | None = None,
) -> ScalesConfig:
    """Infer the :class:`ScalesConfig` of a converted (varkit-named) VAR state dict from its shapes.

    depth = number of blocks, width = ``class_emb`` columns, heads = ``qk_scale`` size, shared AdaLN when
    ``shared_ada_lin`` is present; the scale schedule is ``patch_nums``, else VAR's schedule for
    ``resolution``, else ``stored_patch_nums`` (from the file's ``lvl_1L``), else the VAR schedule with
    the file's token count (``pos_1LC`` length) and scale count (``lvl_embed`` rows).
    """
    if patch_nums is not None and resolution is not None:
        raise InvalidArgumentError("pass either patch_nums or resolution, not both")
    try:
        rows, dim = sd["class_emb.weight"].shape
        depth = _depth(sd, source)
        n_head = int(sd["blocks.0.attn.qk_scale"].shape[1])
        hidden = int(sd["blocks.0.ffn.fc1.weight"].shape[0])
        vocab = int(sd["output.weight"].shape[0])
        vae_dim = int(sd["word_embed.weight"].shape[1])
        L = int(sd["pos_1LC"].shape[1])
        S = int(sd["lvl_embed.weight"].shape[0])
        first = int(sd["pos_start"].shape[1])
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{source}: cannot read the {WHAT} shapes ({exc}); the file is incomplete") from None
    shared = "shared_ada_lin.1.weight" in sd
    per_block = [f"blocks.{i}.{s}" for i in range(depth) for s in
                 ("attn.wqkv.weight", "attn.wo.weight", "attn.wo.bias", "attn.q_bias", "attn.v_bias", "attn.qk_scale",
                  "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias")
                 + (("ada_gss",) if shared else ("ada_lin.1.weight", "ada_lin.1.bias"))]
    missing = [k for k in per_block + ["pos_start", "word_embed.bias", "output.bias", "head_nm.ada_lin.1.bias"]
               + (["shared_ada_lin.1.bias"] if shared else []) if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: {WHAT} lacks {len(missing)} weights (e.g. {missing[:2]}); the file is incomplete")
    if dim % n_head:
        raise CheckpointError(f"{source}: width {dim} is not divisible by the {n_head} heads of qk_scale")
    if tuple(sd["pos_1LC"].shape) != (1, L, dim) or tuple(sd["output.weight"].shape) != (vocab, dim):
        raise CheckpointError(f"{source}: pos_1LC {tuple(sd['pos_1LC'].shape)} / head {tuple(sd['output.weight'].shape)} "
                              f"do not match width {dim}; the file is corrupt")
    if stored_patch_nums is not None and (patch_nums is not None or resolution is not None):
        given = tuple(patch_nums) if patch_nums is not None else resolution_patch_nums(resolution)
        if tuple(given) != tuple(stored_patch_nums):
            raise InvalidArgumentError(
                f"{source} was trained with the scale schedule {tuple(stored_patch_nums)} (stored in its "
                f"lvl_1L), not {tuple(given)}" + (f" ({resolution} px)" if resolution else "")
                + "; drop --resolution/--patch-nums to use the stored one")
    if patch_nums is not None:
        pns = _check_schedule(patch_nums, L, S, source, "--patch-nums")
    elif resolution is not None:
        pns = _check_schedule(resolution_patch_nums(resolution), L, S, source, f"VAR's {resolution}-px schedule")
    elif stored_patch_nums is not None:
        pns = _check_schedule(stored_patch_nums, L, S, source, "the file's lvl_1L")
    else:
        known = [s for s in VAR_PATCH_NUMS.values() if len(s) == S and sum(p * p for p in s) == L]
        if not known:
            raise InvalidArgumentError(
                f"{source}: {S} scales and {L} tokens match none of VAR's schedules and the file carries no lvl_1L; "
                "pass the scale schedule (--patch-nums 1,2,...)")
        pns = known[0]
    if pns[0] ** 2 != first:
        raise CheckpointError(f"{source}: pos_start has {first} tokens but the first scale is {pns[0]}x{pns[0]}")
    return ScalesConfig(
        vocab_size=vocab, num_classes=int(rows) - 1, depth=depth, dim=int(dim), n_head=n_head,
        mlp_ratio=hidden / dim, vae_dim=vae_dim, patch_nums=pns, shared_aln=shared,
        drop_path=0.1 * depth / 24,
    )


# -- building the generator -------------------------------------------------------------------
def generator_from_var_state_dict(sd: Mapping[str, Tensor], config: ScalesConfig,
                                  source: str = "state dict") -> ScalesGenerator:
    """A :class:`ScalesGenerator` holding the converted weights ``sd`` (strict; fp32; no second copy)."""
    return module_from_state_dict(ScalesGenerator, config, sd, source)


def _read_var(path, patch_nums=None, resolution=None) -> tuple[dict[str, Tensor], ScalesConfig]:
    ckpt = load_torch_checkpoint(path, WHAT)
    raw = select_var_state_dict(ckpt, str(path))
    sd, notes = var_state_dict_from_var(raw, str(path))
    cfg = var_config_from_state_dict(sd, patch_nums, resolution, str(path), notes["patch_nums"])
    return sd, cfg


def load_var(path: str | os.PathLike, *, patch_nums: Sequence[int] | None = None,
             resolution: int | None = None) -> ScalesGenerator:
    """Load a VAR transformer file as a :class:`ScalesGenerator` (no tokenizer bound; eval mode)."""
    sd, cfg = _read_var(path, patch_nums, resolution)
    return generator_from_var_state_dict(sd, cfg, str(path))


def _vae_scales(path) -> int | None:
    """Rows of the VQVAE's ``ema_vocab_hit_SV`` (the number of scales it was trained with), if stored."""
    from .var_vae import is_var_vae_state_dict

    obj = load_torch_checkpoint(path, VAE_WHAT)
    if isinstance(obj, Mapping) and is_var_vae_state_dict(obj):
        t = obj.get("quantize.ema_vocab_hit_SV")
        return int(t.shape[0]) if isinstance(t, Tensor) and t.dim() == 2 else None
    return None


def convert_var(
    vae: str | os.PathLike,
    var: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution: int | None = None,
    patch_nums: Sequence[int] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert VAR's VQVAE + transformer pair into a varkit pipeline folder ``out``.

    Both files are read and checked (family, truncation, codebook size, latent channels, number of
    scales, resolution) before anything is written; the folder is built next to ``out`` and renamed
    into place, so an error leaves no partial output. The scale schedule comes from the transformer
    file (``lvl_1L``) unless ``resolution`` or ``patch_nums`` is given. Defaults: :data:`VAR_DEFAULTS`.
    """
    from .var_vae import load_var_vae

    out = refuse_existing(out, overwrite)
    if patch_nums is not None and resolution is not None:
        raise InvalidArgumentError("pass either --resolution or --patch-nums, not both")
    if resolution is not None:
        resolution_patch_nums(resolution)  # a clear error before loading anything
    sd, cfg = _read_var(var, patch_nums, resolution)
    tokenizer = load_var_vae(vae, patch_nums=cfg.patch_nums)
    tc = tokenizer.config
    problems = []
    if tc.codebook_size != cfg.vocab_size:
        problems.append(f"the transformer predicts {cfg.vocab_size} token ids but the VQVAE has {tc.codebook_size} codes")
    if tc.z_channels != cfg.vae_dim:
        problems.append(f"the transformer's word_embed takes {cfg.vae_dim}-channel latents but the VQVAE's are {tc.z_channels}")
    n_vae = _vae_scales(vae)
    if n_vae is not None and n_vae != len(cfg.patch_nums):
        problems.append(f"the VQVAE was trained with {n_vae} scales but the transformer with {len(cfg.patch_nums)}")
    if problems:
        raise CheckpointError(f"{Path(vae).name} and {Path(var).name} are not a VAR pair: " + "; ".join(problems)
                              + ". Pass the VQVAE the transformer was trained with (vae_ch160v4096z32.pth)")
    generator = generator_from_var_state_dict(sd, cfg, str(var))
    px = cfg.patch_nums[-1] * tokenizer.downsample
    published = VAR_DEPTH_RESOLUTION.get(cfg.depth) == px and cfg.dim == 64 * cfg.depth
    label = f"var-d{cfg.depth}" + ("" if published else f"-{px}")
    return save_converted_pipeline(out, overwrite, tokenizer, generator, VAR_DEFAULTS, name or label, {
        "family": "var",
        "vae": file_record(vae),
        "var": file_record(var),
        "depth": cfg.depth,
        "shared_aln": cfg.shared_aln,
        "image_size": px,
        "patch_nums": list(cfg.patch_nums),
        "generator_config": dataclasses.asdict(cfg),
        "defaults": dict(VAR_DEFAULTS),
    })


def _parse_patch_nums(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise InvalidArgumentError(f"--patch-nums must be comma-separated integers (1,2,3,...), got {text!r}") from None


def cmd_convert_var(args) -> None:
    """``varkit convert var``: see :func:`convert_var`."""
    out = convert_var(args.vae, args.var, args.out, resolution=getattr(args, "resolution", None),
                      patch_nums=_parse_patch_nums(getattr(args, "patch_nums", None)),
                      name=getattr(args, "name", None), overwrite=getattr(args, "overwrite", False))
    g, conv = read_converted(out)
    px = conv["image_size"]
    print(f"wrote {out}/ (VAR-d{g['depth']}, {g['dim']} wide, {g['n_head']} heads, "
          f"{'shared' if g['shared_aln'] else 'per-block'} AdaLN, {len(g['patch_nums'])} scales to "
          f"{g['patch_nums'][-1]}x{g['patch_nums'][-1]} ({px} px), {g['num_classes']} classes); "
          f"load it with varkit.load_pipeline({str(out)!r})")
