"""Convert Distilled Decoding (DD1) students: LlamaGen-DD (``llamagen-B.pt``, ``llamagen-L.pt``) and VAR-DD
(``var-d16.pth``, ``var-d20.pth``, ``var-d24.pth``) from microsoft/distilled_decoding.

Both students keep their teacher's names, so the weights map onto :class:`~varkit.models.dd.DDRasterGenerator`
and :class:`~varkit.models.dd.DDScalesGenerator` as the teachers' do (LlamaGen 1:1; VAR through
:mod:`varkit.checkpoints.var`'s attention renames), plus DD's ``n_d_embed``, ``layerwise_n_d_embed.*`` (VAR) and
``final_layer_conti.*``. What the files do not hold comes from elsewhere:

- the codebook the student reads and writes (official ``config.codebook``, a constructor argument): the
  tokenizer's, as its lookup sees it (LlamaGen: l2-normalised, as ``eval_fewstep.py`` does; VAR: the raw
  VQVAE codebook, ``vae_quant_proxy[0].embedding.weight``), so the converter takes the tokenizer file;
- the image size of a LlamaGen-DD student (its RoPE grid): 256 for both published ones (``--image-size``);
- the sampling settings of the README's commands, by size: LlamaGen-DD ``--t_list 0,80`` with ``--split_t 80``
  (B) or ``130`` (L); VAR-DD ``--t_list 0,5 --loss_split_t 5`` (d16) or ``0,4``/``4`` (d20, d24). A student of
  another size needs ``--timesteps`` and ``--split``.

A VAR-DD file is VAR's trainer checkpoint: the EMA weights under ``trainer.ema_parameters`` (``sample.py``'s
default) or the raw ones under ``trainer.var_wo_ddp``; its ``lvl_1L`` and mask cover a class "scale" 0 before
the schedule, so ``pos_1LC``/``lvl_embed`` have one more row than the teacher's. A LlamaGen-DD file holds
``"ema"`` (the README's ``--ema``) and/or ``"model"``. The folder's default sampler is ``distilled`` (one step;
preset ``two-step``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import refuse_existing
from .arguments import add_convert_dd_arguments  # noqa: F401 (public: defined without torch for the CLI)
from .common import (count_indexed, describe_other_generator, file_record, load_checkpoint, module_from_state_dict,
                     read_converted, save_converted_pipeline, shape_of, strip_prefixes, tensors_of)

__all__ = [
    "DD_DEFAULTS",
    "DD_LLAMAGEN_PUBLISHED",
    "DD_PRESETS",
    "DD_VAR_PUBLISHED",
    "add_convert_dd_arguments",
    "cmd_convert_dd",
    "convert_dd",
    "dd_family",
    "llamagen_dd_from_state_dict",
    "load_dd",
    "read_dd_file",
    "var_dd_from_state_dict",
]

WHAT = "Distilled Decoding (DD1) checkpoint"

#: (timesteps, split) of the README's few-step commands: LlamaGen-DD by GPT size (``--t_list``, ``--split_t``) ...
DD_LLAMAGEN_PUBLISHED = {"GPT-B": ((0, 80), 80), "GPT-L": ((0, 80), 130)}
#: ... and VAR-DD by depth (``--t_list``, ``--loss_split_t``; width 64·depth, VAR's 256-px schedule).
DD_VAR_PUBLISHED = {16: ((0, 5), 5), 20: ((0, 4), 4), 24: ((0, 4), 4)}
DD_IMAGE_SIZE = 256  # both published LlamaGen-DD students (``--image-size 256``)
#: The README's FID numbers: 50 000 one-step samples (two-step: the preset).
DD_DEFAULTS = {"sampler": "distilled", "sampler_options": {"steps": 1}, "fid_num_samples": 50_000}
DD_PRESETS = {"two-step": {"sampler_options": {"steps": 2}}}

_DD_EXTRA_RX = re.compile(r"n_d_embed\.weight|layerwise_n_d_embed\.\d+\.(weight|bias)"
                          r"|final_layer_conti\.(linear\.weight|linear\.bias|scale_shift_table)")
_LLAMAGEN_DD_RX = re.compile(
    r"(tok_embeddings\.(weight|bias)|norm\.weight|output\.weight|cls_embedding\.embedding_table\.weight)"
    r"|layers\.\d+\.(attention\.wqkv|attention\.wo|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight")
_LLAMAGEN_DERIVED_RX = re.compile(r"freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache")
_DD_REQUIRED = ("n_d_embed.weight", "final_layer_conti.linear.weight", "final_layer_conti.linear.bias",
                "final_layer_conti.scale_shift_table")


# -- reading files ----------------------------------------------------------------------------
def dd_family(keys: set[str]) -> str | None:
    """``"llamagen"`` or ``"var"`` when ``keys`` are a DD student's in the official names, else None."""
    if "n_d_embed.weight" not in keys or "final_layer_conti.linear.weight" not in keys:
        return None
    if "codebook" in keys or any(".attn.wqkv." in k for k in keys):
        return None  # varkit's own names: refused by _describe
    if "tok_embeddings.weight" in keys and any(k.startswith("layers.") for k in keys):
        return "llamagen"
    if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "var"
    return None


def _describe(keys: set[str]) -> str | None:
    """What a state dict that is not an official DD student is, with what to do."""
    if "codebook" in keys and "n_d_embed.weight" in keys:
        return "a varkit DD student state dict, already converted (load its folder with varkit.load_pipeline)"
    if "tok_embeddings.weight" in keys and "n_d_embed.weight" not in keys and any(k.startswith("layers.") for k in keys):
        if any(k.startswith("medusa_") for k in keys):
            return "a NAR (next-neighbour) checkpoint; convert it with `varkit convert nar`"
        return "a LlamaGen GPT checkpoint (a teacher, not a DD student); convert it with `varkit convert llamagen`"
    if "class_emb.weight" in keys and "n_d_embed.weight" not in keys and any(k.startswith("blocks.") for k in keys):
        if any(k.startswith(("encoder_blocks.", "diffloss.")) for k in keys):
            return "a MAR checkpoint; convert it with `varkit convert mar`"
        return "a VAR transformer checkpoint (a teacher, not a DD student); convert it with `varkit convert var`"
    if any(k.startswith(("encoder_blocks.", "diffloss.")) for k in keys):
        return "a MAR checkpoint; convert it with `varkit convert mar`"
    if any(k.startswith(("quantize.", "encoder.", "decoder.")) for k in keys):
        return "a VQ tokenizer checkpoint; pass it as --tokenizer and the DD student (llamagen-B.pt, var-d16.pth) as --dd"
    return describe_other_generator(keys, "DD")


def read_dd_file(path: str | os.PathLike, ema: bool = True) -> tuple[dict[str, Tensor], str, str]:
    """(weights in the official names, family ``"llamagen"``/``"var"``, where in the file they were) of a DD
    checkpoint. With ``ema`` the EMA weights come first (the official sampling default: ``trainer.ema_parameters``,
    ``"ema"``), else the raw ones (``trainer.var_wo_ddp``, ``"model"``); a file without the preferred kind gives the
    other. Anything else is one :class:`CheckpointError` line saying what the file is."""
    source = str(path)
    ckpt = load_checkpoint(path, WHAT)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {WHAT}")
    cands: list[tuple[str, Mapping]] = []
    trainer = ckpt.get("trainer")
    if isinstance(trainer, Mapping):
        for k in ("ema_parameters", "var_wo_ddp") if ema else ("var_wo_ddp", "ema_parameters"):
            if isinstance(trainer.get(k), Mapping):
                cands.append((f"trainer.{k}", trainer[k]))
    for k in ("ema", "model", "module", "state_dict") if ema else ("model", "module", "state_dict", "ema"):
        if isinstance(ckpt.get(k), Mapping):
            cands.append((k, ckpt[k]))
    cands.append(("top level", ckpt))
    for entry, cand in cands:
        sd = tensors_of(cand)
        family = dd_family(set(sd))
        if family is not None:
            return sd, family, entry
    for _, cand in cands:
        what = _describe(set(tensors_of(cand)))
        if what is not None:
            raise CheckpointError(f"{source} is not a {WHAT}: it is {what}")
    found = sorted({k for _, cand in cands for k in tensors_of(cand)})
    if not found:
        raise CheckpointError(f"{source} holds no tensors (top-level keys {sorted(map(str, ckpt))[:6]}); "
                              f"it is not a {WHAT}")
    raise CheckpointError(
        f"{source} is not a {WHAT}: it lacks DD's n_d_embed / final_layer_conti or the transformer (found e.g. "
        f"{found[:3]}); pass LlamaGen-DD's llamagen-B.pt / llamagen-L.pt or VAR-DD's var-d16.pth ... var-d24.pth as --dd")


def _check_dd_extra(sd: Mapping[str, Tensor], dim: int, out_dim: int, source: str) -> None:
    missing = [k for k in _DD_REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: the DD student lacks {missing[:3]}; the file is incomplete")
    want = {"n_d_embed.weight": (2, dim), "final_layer_conti.linear.weight": (out_dim, dim),
            "final_layer_conti.linear.bias": (out_dim,), "final_layer_conti.scale_shift_table": (2, dim)}
    bad = [f"{k} {tuple(sd[k].shape)} (expected {v})" for k, v in want.items() if tuple(sd[k].shape) != v]
    if bad:
        raise CheckpointError(f"{source}: {bad[0]}; the file is corrupt or from a modified DD")


# -- LlamaGen-DD ------------------------------------------------------------------------------
def llamagen_dd_from_state_dict(sd: Mapping[str, Tensor], grid: int, source: str = "state dict",
                                timesteps: Sequence[int] | None = None, split: int | None = None):
    """(:class:`DDRasterGenerator` state dict without its codebook, config, LlamaGen size name) of an official
    ``DDTransformer`` state dict; ``timesteps``/``split`` default to the published size's."""
    from ..models.dd import DDRasterConfig
    from ..nn.layers import swiglu_hidden_dim
    from .llamagen import LLAMAGEN_SIZES, condition_fields, ffn_multiple_of

    sd = strip_prefixes(sd)
    what = "LlamaGen-DD student"
    unknown = sorted(k for k in sd if not (_LLAMAGEN_DD_RX.fullmatch(k) or _DD_EXTRA_RX.fullmatch(k)
                                         or _LLAMAGEN_DERIVED_RX.fullmatch(k)))
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not part of a {what} (e.g. {unknown[:3]}); the file "
                              "is from another model or a modified DD")
    state = {k: v for k, v in sd.items() if not _LLAMAGEN_DERIVED_RX.fullmatch(k)}
    tok = shape_of(state, "tok_embeddings.weight", source, what)
    if len(tok) != 2 or "tok_embeddings.bias" not in state:
        raise CheckpointError(f"{source}: tok_embeddings is not DD's Linear(codebook_dim -> dim) (weight {tok}); "
                              "the file is corrupt")
    dim, codebook_dim = tok
    vocab = shape_of(state, "output.weight", source, what)[0]
    n_layer = count_indexed(state, "layers.", source)
    per_layer = [f"layers.{i}.{p}.weight" for i in range(n_layer) for p in
                 ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                  "attention_norm", "ffn_norm")]
    missing = [k for k in per_layer + ["norm.weight"] if k not in state]
    if not n_layer or missing:
        raise CheckpointError(f"{source}: the {what} lacks {len(missing) or 'all'} layer weights (e.g. {missing[:2]}); "
                              "the file is incomplete")
    if tuple(state["layers.0.attention.wqkv.weight"].shape) != (3 * dim, dim):
        raise CheckpointError(f"{source}: wqkv has shape {tuple(state['layers.0.attention.wqkv.weight'].shape)}, "
                              f"expected {(3 * dim, dim)}; grouped-query models are not supported")
    if tuple(state["output.weight"].shape) != (vocab, dim):
        raise CheckpointError(f"{source}: output head {tuple(state['output.weight'].shape)} does not match width {dim}")
    if "cls_embedding.embedding_table.weight" not in state:
        raise CheckpointError(f"{source}: the {what} has no class embedding (cls_embedding.embedding_table); DD's "
                              "LlamaGen code samples class-conditional models only")
    cond = condition_fields(state, dim, source, what)
    _check_dd_extra(state, dim, codebook_dim, source)
    row = LLAMAGEN_SIZES.get((dim, n_layer))
    size = row[0] if row else f"GPT-d{dim}x{n_layer}"
    if row is not None:
        n_head = row[1]
    elif dim % 64 == 0:
        n_head = dim // 64
    else:
        raise CheckpointError(f"{source}: width {dim} is not a LlamaGen size nor a multiple of 64 (head_dim 64), so "
                              "the number of heads cannot be inferred")
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    multiple_of = 256 if swiglu_hidden_dim(dim, 256, None) == hidden else ffn_multiple_of(dim, hidden, source)
    timesteps, split = _published_or_given(
        DD_LLAMAGEN_PUBLISHED.get(size) if grid == DD_IMAGE_SIZE // 16 else None, timesteps, split, source,
        f"a LlamaGen-DD student of unknown size ({size}, {grid}x{grid} tokens)",
        "LlamaGen-DD-B and -L (GPT-B/GPT-L at 256 px)", grid * grid)
    cfg = DDRasterConfig(vocab_size=int(vocab), dim=int(dim), n_layer=n_layer, n_head=int(n_head), grid=int(grid),
                         multiple_of=multiple_of, codebook_dim=int(codebook_dim), dd_timesteps=timesteps,
                         dd_split=split, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, **cond)
    return state, cfg, size


# -- VAR-DD -----------------------------------------------------------------------------------
def _dd_var_mask(full: Sequence[int]) -> Tensor:
    """The official DD_Model's ``attn_bias_for_masking`` for the schedule ``full`` = (1,) + patch_nums."""
    from .var import _lvl_1L

    d = _lvl_1L(full).view(1, -1, 1)
    bias = torch.where(d >= d.transpose(1, 2) + 1, 0.0, -torch.inf).reshape(1, 1, d.shape[1], d.shape[1])
    bias[0, 0].fill_diagonal_(0)
    return bias


def var_dd_from_state_dict(sd: Mapping[str, Tensor], source: str = "state dict",
                           timesteps: Sequence[int] | None = None, split: int | None = None):
    """(:class:`DDScalesGenerator` state dict without its codebook, config) of an official ``DD_Model`` state dict;
    ``timesteps``/``split`` default to the published depth's."""
    from ..models.dd import DDScalesConfig
    from ..tokenizers.msvq import VAR_PATCH_NUMS
    from .var import _schedule_from_levels, var_config_from_state_dict, var_state_dict_from_var

    sd = strip_prefixes(sd)
    extra = {k: v for k, v in sd.items() if _DD_EXTRA_RX.fullmatch(k)}
    rest = {k: v for k, v in sd.items() if k not in extra and k not in ("lvl_1L", "attn_bias_for_masking")}
    full = None
    if "lvl_1L" in sd:
        full = _schedule_from_levels(sd["lvl_1L"])
        if full is None or len(full) < 2 or full[0] != 1:
            raise CheckpointError(f"{source}: lvl_1L {tuple(sd['lvl_1L'].shape)} is not DD's scale index (a 1x1 class "
                                  "level, then VAR's scales); the file is corrupt")
    vsd, _ = var_state_dict_from_var(rest, source)
    for k in ("pos_1LC", "lvl_embed.weight"):
        if vsd[k].shape[-2 if k == "pos_1LC" else 0] < 2:
            raise CheckpointError(f"{source}: {k} {tuple(vsd[k].shape)} is too short for a DD student")
    # DD's tables have a row for the class level before the schedule: the teacher's shapes are one row less
    view = {**vsd, "pos_1LC": vsd["pos_1LC"][:, 1:], "lvl_embed.weight": vsd["lvl_embed.weight"][1:]}
    cfg = var_config_from_state_dict(view, None, None, source, full[1:] if full else None)
    pns = tuple(cfg.patch_nums)
    if "attn_bias_for_masking" in sd:
        mask = sd["attn_bias_for_masking"]
        want = _dd_var_mask((1,) + pns)
        if tuple(mask.shape) != tuple(want.shape) or not torch.equal(torch.isfinite(mask), torch.isfinite(want)):
            raise CheckpointError(f"{source}: attn_bias_for_masking {tuple(mask.shape)} is not DD's mask for the scales "
                                  f"{pns}; the file is corrupt")
    _check_dd_extra(extra, cfg.dim, cfg.vae_dim, source)
    n_lw = count_indexed(extra, "layerwise_n_d_embed.", source)
    if n_lw not in (0, cfg.depth + 1):
        raise CheckpointError(f"{source}: {n_lw} layerwise_n_d_embed layers for depth {cfg.depth} (expected "
                              f"{cfg.depth + 1}); the file is incomplete")
    lw_missing = [f"layerwise_n_d_embed.{i}.{p}" for i in range(n_lw) for p in ("weight", "bias")
                  if f"layerwise_n_d_embed.{i}.{p}" not in extra]
    if lw_missing:
        raise CheckpointError(f"{source}: the DD student lacks {lw_missing[:2]}; the file is incomplete")
    published = cfg.dim == 64 * cfg.depth and pns == VAR_PATCH_NUMS[256] and not cfg.shared_aln
    timesteps, split = _published_or_given(
        DD_VAR_PUBLISHED.get(cfg.depth) if published else None, timesteps, split, source,
        f"a VAR-DD student of unknown size (depth {cfg.depth}, width {cfg.dim}, scales {pns})",
        "VAR-DD d16, d20 and d24 (256 px)", len(pns))
    dcfg = DDScalesConfig(**dataclasses.asdict(cfg), layerwise_n_d_embed=n_lw > 0, dd_timesteps=timesteps,
                          dd_split=split)
    return {**vsd, **extra}, dcfg


def _published_or_given(published, timesteps, split, source, unknown: str, sizes: str,
                        num_steps: int) -> tuple[tuple[int, ...], int]:
    """The sampling steps of a student: given, else the published size's; one line when neither."""
    from ..train.distill import parse_timesteps

    if published is None and (timesteps is None or split is None):
        raise InvalidArgumentError(
            f"{source} is {unknown}: the published DD students are {sizes}; pass --timesteps (the steps it was "
            "trained from, e.g. 0,80) and --split (the step from which its continuous output is used) to convert it")
    ts = parse_timesteps(timesteps, num_steps) if timesteps is not None else published[0]
    sp = split if split is not None else published[1]
    if isinstance(sp, bool) or not isinstance(sp, int) or not 0 <= sp <= num_steps:
        raise InvalidArgumentError(f"--split must be a layout step in 0..{num_steps}, got {sp!r}")
    return tuple(ts), sp


# -- the tokenizer ----------------------------------------------------------------------------
def _load_tokenizer(spec: str | os.PathLike, family: str, patch_nums: Sequence[int] | None):
    """The teacher's tokenizer: LlamaGen's VQ / VAR's VQVAE file, or a varkit tokenizer or pipeline folder."""
    from ..modeling import load_module, read_config
    from ..models.base import Generator

    path = Path(spec)
    if path.is_dir():
        if read_config(path).get("_class") == "Pipeline":
            path = path / "tokenizer"
        tok = load_module(path)
        if isinstance(tok, Generator):
            raise InvalidArgumentError(f"--tokenizer {spec} holds a {type(tok).__name__} (a generator), not a tokenizer")
        return tok
    if family == "llamagen":
        from .llamagen_vq import load_llamagen_vq

        return load_llamagen_vq(path)
    from .var_vae import load_var_vae

    try:
        return load_var_vae(path, patch_nums=patch_nums)
    except CheckpointError:
        _refuse_llamagen_vq(path)
        raise


def _refuse_llamagen_vq(path: Path) -> None:
    """One line when a VAR-DD student was given LlamaGen's VQ (its files carry an ``args`` Namespace, which the
    VQVAE loader refuses without saying what the file is)."""
    try:
        ckpt = load_checkpoint(path, "tokenizer checkpoint")
    except CheckpointError:
        return
    if isinstance(ckpt, Mapping):
        inner = ckpt.get("model") if isinstance(ckpt.get("model"), Mapping) else ckpt
        keys = set(tensors_of(inner))
        if any(k.startswith("encoder.conv_blocks.") for k in keys) or "quantize.codebook_used" in keys:
            raise CheckpointError(f"{path} is LlamaGen's VQ tokenizer (for LlamaGen-DD); a VAR-DD student needs VAR's "
                                  "VQVAE (vae_ch160v4096z32.pth) as --tokenizer")


def _codebook(tokenizer, spec, dd, vocab: int, dim: int) -> Tensor:
    from ..models.dd import tokenizer_codebook

    book = tokenizer_codebook(tokenizer)
    if tuple(book.shape) != (vocab, dim):
        raise CheckpointError(
            f"{Path(spec).name} has a {book.shape[0]}x{book.shape[1]} codebook but the DD student {Path(dd).name} "
            f"reads {vocab} codewords of dim {dim}; pass its teacher's tokenizer (vq_ds16_c2i.pt for LlamaGen-DD, "
            "vae_ch160v4096z32.pth for VAR-DD)")
    return book


# -- the whole pipeline -----------------------------------------------------------------------
def load_dd(tokenizer: str | os.PathLike, dd: str | os.PathLike, *, image_size: int | None = None,
            timesteps: Sequence[int] | str | None = None, split: int | None = None, ema: bool = True):
    """(tokenizer, student generator, record) of a DD file and its teacher's tokenizer; nothing written."""
    from ..models.dd import DDRasterGenerator, DDScalesGenerator

    sd, family, entry = read_dd_file(dd, ema)
    source = str(dd)
    if family == "llamagen":
        tok = _load_tokenizer(tokenizer, family, None)
        down = int(getattr(tok, "downsample", 16))
        px = DD_IMAGE_SIZE if image_size is None else image_size
        if isinstance(px, bool) or not isinstance(px, int) or px <= 0 or px % down:
            raise InvalidArgumentError(f"--image-size {px} is not a positive multiple of the tokenizer's downsampling "
                                       f"factor {down}")
        state, cfg, size = llamagen_dd_from_state_dict(sd, px // down, source, timesteps, split)
        book = _codebook(tok, tokenizer, dd, cfg.vocab_size, cfg.codebook_dim)
        gen = module_from_state_dict(DDRasterGenerator, cfg, {**state, "codebook": book.detach()}, source)
        label = f"llamagen-dd-{size.removeprefix('GPT-').lower()}-{px}"
    else:
        state, cfg = var_dd_from_state_dict(sd, source, timesteps, split)
        tok = _load_tokenizer(tokenizer, family, cfg.patch_nums)
        book = _codebook(tok, tokenizer, dd, cfg.vocab_size, cfg.vae_dim)
        px = cfg.patch_nums[-1] * int(getattr(tok, "downsample", 16))
        if image_size is not None and image_size != px:
            raise InvalidArgumentError(f"--image-size {image_size} does not match the VAR-DD student, whose scales "
                                       f"end at {cfg.patch_nums[-1]}x{cfg.patch_nums[-1]} ({px} px); drop --image-size")
        gen = module_from_state_dict(DDScalesGenerator, cfg, {**state, "codebook": book.detach()}, source)
        size = f"d{cfg.depth}"
        label = f"var-dd-d{cfg.depth}" + ("" if px == 256 else f"-{px}")
    tok_record = ({"folder": Path(tokenizer).name} if Path(tokenizer).is_dir() else file_record(tokenizer))
    record = {"family": "dd", "dd_family": family, "tokenizer": tok_record, "dd": file_record(dd, weights=entry),
              "dd_model": size, "image_size": px, "dd_timesteps": list(cfg.dd_timesteps), "dd_split": cfg.dd_split,
              "generator_config": dataclasses.asdict(cfg), "defaults": dict(DD_DEFAULTS), "presets": dict(DD_PRESETS),
              "name": label}
    return tok, gen, record


def convert_dd(tokenizer: str | os.PathLike, dd: str | os.PathLike, out: str | os.PathLike, *,
               image_size: int | None = None, timesteps: Sequence[int] | str | None = None, split: int | None = None,
               ema: bool = True, name: str | None = None, overwrite: bool = False) -> Path:
    """Convert a published DD1 student and its teacher's tokenizer into a varkit pipeline folder ``out``.

    ``tokenizer``: LlamaGen's VQ (``vq_ds16_c2i.pt``) for LlamaGen-DD, VAR's VQVAE (``vae_ch160v4096z32.pth``) for
    VAR-DD, or a varkit tokenizer / pipeline folder holding one. The family comes from the DD file. Both are read and
    checked before anything is written; the folder is built next to ``out`` and renamed into place. Its defaults:
    ``sampler="distilled"`` (one step; preset ``two-step``), the student's timesteps and split recorded in its
    config (:data:`DD_LLAMAGEN_PUBLISHED`, :data:`DD_VAR_PUBLISHED`, or ``timesteps``/``split``).
    """
    out = refuse_existing(out, overwrite)
    tok, gen, record = load_dd(tokenizer, dd, image_size=image_size, timesteps=timesteps, split=split, ema=ema)
    return save_converted_pipeline(out, overwrite, tok, gen, DD_DEFAULTS, name or record["name"], record,
                                   presets=DD_PRESETS)


def cmd_convert_dd(args) -> None:
    """``varkit convert dd``: see :func:`convert_dd`."""
    out = convert_dd(args.tokenizer, args.dd, args.out, image_size=args.image_size, timesteps=args.timesteps,
                     split=args.split, ema=args.ema, name=args.name, overwrite=args.overwrite)
    g, conv = read_converted(out)
    kind = "LlamaGen-DD" if conv["dd_family"] == "llamagen" else "VAR-DD"
    print(f"wrote {out}/ ({kind} {conv['dd_model']}, {conv['image_size']} px, {g['num_classes']} classes, "
          f"{conv['dd']['weights']} weights; timesteps {','.join(map(str, conv['dd_timesteps']))}, continuous output "
          f"from step {conv['dd_split']}); load it with varkit.load_pipeline({str(out)!r}) (one step; preset 'two-step')")
