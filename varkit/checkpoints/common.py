"""What every converter does to a published file, written once: read it (training files may carry an
``argparse.Namespace``), find the weights inside the training wrapper, drop DDP/compile prefixes, and
build the varkit module on the meta device with the file's tensors assigned (no second copy)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .arguments import add_output_arguments, add_pair_arguments  # noqa: F401 (re-exported)
from ..io import atomic_directory, load_torch_checkpoint, write_json
from ..modeling import load_state_dict_strict, params_on_meta, read_config

M = TypeVar("M", bound=nn.Module)

WRAPPERS = ("model", "module", "state_dict", "ema")  # DDP, DeepSpeed, plain, EMA (LlamaGen's train scripts)


def load_checkpoint(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` that also rebuilds the ``"args"`` Namespace LlamaGen's and NAR's
    training scripts store next to the weights (plain attributes; nothing executes)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_torch_checkpoint(path, what)


def select_state_dict(ckpt: Any, source: str, what: str, use_ema: bool = False,
                      wrappers: Sequence[str] = WRAPPERS) -> dict[str, Tensor]:
    """The tensors under the first of ``wrappers`` the file has (``"ema"`` first with ``use_ema``), or the
    file's own top level (FSDP ``consolidated.pth``, raw files); a :class:`CheckpointError` when there are none."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {what}")
    order = ("ema", *(w for w in wrappers if w != "ema")) if use_ema else tuple(wrappers)
    sd = next((ckpt[w] for w in order if isinstance(ckpt.get(w), Mapping)), ckpt)
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not sd:
        names = ", ".join(f"'{w}'" for w in wrappers)
        raise CheckpointError(
            f"{source} holds no tensors under {names} (top-level keys {sorted(map(str, ckpt))[:6]}); it is not a {what}"
        )
    return sd


def strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes carried by every key."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def tensors_of(m: Mapping) -> dict[str, Tensor]:
    """The string-keyed tensors of a mapping, DDP/compile prefixes dropped."""
    return strip_prefixes({k: v for k, v in m.items() if isinstance(k, str) and isinstance(v, Tensor)})


TOP_LEVEL = "top level"


def select_required_state_dict(ckpt: Any, source: str, what: str, entries: Sequence[str], required: Sequence[str],
                               describe: Callable[[set[str]], str | None], *, fallback: int = 0,
                               hint: str = "") -> tuple[dict[str, Tensor], str]:
    """(weights, entry) of a training file: the first of ``entries`` (wrapper keys, or :data:`TOP_LEVEL` for the
    file itself) that the file has and that holds every ``required`` key. Otherwise one :class:`CheckpointError`
    line: what ``describe`` recognises the file as, else what the ``fallback``-th entry found lacks (+ ``hint``)."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not a state dict; it is not a {what}")
    cands = [(e, ckpt if e == TOP_LEVEL else ckpt[e]) for e in entries
             if e == TOP_LEVEL or isinstance(ckpt.get(e), Mapping)]
    for entry, cand in cands:
        sd = tensors_of(cand)
        if all(k in sd for k in required):
            return sd, entry
    for _, cand in cands:
        found = describe(set(tensors_of(cand)))
        if found is not None:
            raise CheckpointError(f"{source} is not a {what}: it is {found}")
    sd = tensors_of(cands[fallback][1])
    if not sd:
        raise CheckpointError(f"{source} holds no tensors (top-level keys {sorted(map(str, ckpt))[:6]}); it is not a {what}")
    missing = [k for k in required if k not in sd]
    raise CheckpointError(f"{source} is not a {what}: it lacks {missing[:3]} (found e.g. {sorted(sd)[:3]}){hint}")


def describe_other_generator(keys: set[str], this: str) -> str | None:
    """What a state dict of another family that varkit converts is (not ``this`` family's), with what to do."""
    if any(k.startswith("medusa_") for k in keys):
        return "a NAR (next-neighbour) checkpoint; convert it with `varkit convert nar`"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") and ".attention." in k for k in keys):
        return "a LlamaGen GPT checkpoint; convert it with `varkit convert llamagen`"
    if any(k.startswith("quantize.") for k in keys):
        return f"a VQ tokenizer checkpoint (LlamaGen's or VAR's), not a {this} generator"
    if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "a VAR transformer checkpoint; convert it with `varkit convert var`"
    return None


def converted_record(family: str, sources: Mapping[str, Any], model: str, image_size: int, config: Any,
                     defaults: Mapping[str, Any], **layout: Any) -> dict[str, Any]:
    """``convert.json`` of a converted pair: its family, source files, model name, image size, ``layout``
    (grid or scales), generator config and sampling defaults."""
    return {"family": family, **sources, f"{family}_model": model, "image_size": image_size, **layout,
            "generator_config": dataclasses.asdict(config), "defaults": dict(defaults)}


def require_keys(sd: Mapping[str, Tensor], source: str, what: str, required: Sequence[str],
                 describe: Callable[[set[str]], str | None]) -> dict[str, Tensor]:
    """``sd`` without DDP/compile prefixes, once it holds every ``required`` key (else one line saying what it is)."""
    sd = strip_prefixes(sd)
    missing = [k for k in required if k not in sd]
    if missing:
        found = describe(set(sd))
        raise CheckpointError(f"{source} is not a {what}: " + (f"it is {found}" if found else f"it lacks {missing[:3]}"))
    return sd


def count_indexed(sd: Mapping[str, Tensor], prefix: str, source: str) -> int:
    """How many ``{prefix}{i}.`` blocks ``sd`` holds (indices must run 0..n-1)."""
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{source}: {prefix}* has indices {idx[:6]}…; expected 0..n-1, the file is incomplete")
    return len(idx)


def shape_of(sd: Mapping[str, Tensor], key: str, source: str, what: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``; a :class:`CheckpointError` naming the incomplete ``what`` when it is missing."""
    if key not in sd:
        raise CheckpointError(f"{source}: {what} lacks {key}; the file is incomplete")
    return tuple(sd[key].shape)


def published_heads(heads: int | None, row: tuple[str, int] | None, source: str, family: str, found: str,
                    published: str) -> int:
    """``heads`` when given, else those of the published size ``row`` (name, heads) the weights matched; one
    :class:`CheckpointError` line with what was ``found`` and the ``published`` sizes when they matched none."""
    if heads is not None:
        return heads
    if row is None:
        raise CheckpointError(f"{source} is a {family} of unknown size ({found}); the published sizes are {published}"
                              "; pass heads= (attention heads) to convert another size")
    return row[1]


def file_record(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """What ``convert.json`` says of a source file: its name and size (and ``extra``)."""
    return {"file": Path(path).name, "bytes": Path(path).stat().st_size, **extra}


def save_converted_pipeline(out: Path, overwrite: bool, tokenizer: nn.Module, generator: nn.Module,
                            defaults: Mapping[str, Any], name: str, record: Mapping[str, Any],
                            presets: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the pipeline folder ``out`` with ``record`` as its ``convert.json``, atomically (no partial output).

    ``defaults`` are the paper's FID-protocol settings; ``presets`` named others (``demo``: the demo script's)."""
    from ..pipeline import Pipeline

    pipe = Pipeline(tokenizer, generator, dict(defaults), name=name,
                    presets={k: dict(v) for k, v in (presets or {}).items()})
    with atomic_directory(out, overwrite) as tmp:
        pipe.save_pretrained(tmp)
        write_json(tmp / "convert.json", dict(record))
    return out


def read_converted(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generator config, ``convert.json``) of a converted folder, for the converters' one-line summaries."""
    return read_config(out / "generator"), json.loads((out / "convert.json").read_text())


def module_from_state_dict(cls: type[M], config: Any, sd: Mapping[str, Tensor], source: str) -> M:
    """``cls(config)`` holding the converted weights ``sd`` (strict; floats as fp32), in eval mode.

    Parameters are created on the meta device and then assigned the tensors of ``sd``, so even a
    multi-billion-parameter model costs no second copy of its weights."""
    with params_on_meta():
        module = cls(config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    load_state_dict_strict(module, state, source, assign=True)
    return module.eval()
