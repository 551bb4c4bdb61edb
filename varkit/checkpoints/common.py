"""What every converter does to a published file, written once: read it (training files may carry an
``argparse.Namespace``), find the weights inside the training wrapper, drop DDP/compile prefixes, and
build the varkit module on the meta device with the file's tensors assigned (no second copy)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import load_torch_checkpoint
from ..modeling import load_state_dict_strict, params_on_meta

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


def module_from_state_dict(cls: type[M], config: Any, sd: Mapping[str, Tensor], source: str) -> M:
    """``cls(config)`` holding the converted weights ``sd`` (strict; floats as fp32), in eval mode.

    Parameters are created on the meta device and then assigned the tensors of ``sd``, so even a
    multi-billion-parameter model costs no second copy of its weights."""
    with params_on_meta():
        module = cls(config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    load_state_dict_strict(module, state, source, assign=True)
    return module.eval()
