"""Saveable modules: a dataclass config plus weights, stored as ``config.json`` + ``model.safetensors``.

Every tokenizer and generator subclasses :class:`SavableModule` and registers itself with
:func:`register_module`, so ``load_module(dir)`` can rebuild any of them offline from its folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterator, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, ModelNotFoundError, VarkitError
from .io import atomic_path, write_json
from .registry import Registry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_MODULE_CLASSES: Registry[type["SavableModule"]] = Registry("module class", ModelNotFoundError)
T = TypeVar("T", bound="SavableModule")


def register_module(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` loadable by name from a config.json."""
    _MODULE_CLASSES.register(cls.__name__, cls)
    return cls


class DerivedState:
    """Mixin for modules that keep objects derived from their weights outside the module tree
    (a prepacked weight, a compiled step): ``_apply`` (``.to()``, ``.float()``) drops them, since
    they would be stale, and copies and pickles leave them out. Name them in ``derived_attrs``.
    """

    derived_attrs: ClassVar[tuple[str, ...]] = ()

    def drop_derived(self) -> None:
        for name in self.derived_attrs:
            self.__dict__.pop(name, None)

    def _apply(self, fn, recurse=True):
        self.drop_derived()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # nn.Module returns its live __dict__: never edit that
        for name in self.derived_attrs:
            state.pop(name, None)
        return state


class SavableModule(nn.Module):
    """An ``nn.Module`` built from a dataclass config, saved as a diffusers-style folder."""

    config_class: ClassVar[type]
    legacy_keys: ClassVar[dict[str, str]] = {}  # old parameter name -> current name, applied when loading

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # -- persistence -------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"_class": type(self).__name__, **dataclasses.asdict(self.config)}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp))
        write_json(directory / CONFIG_NAME, self.config_dict())

    @classmethod
    def from_config_dict(cls: type[T], cfg: dict, source: str = "config") -> T:
        """Build from a saved config: every field present (but the config class's ``optional_fields``, added
        later) and of its declared type, else a one-line :class:`CheckpointError` naming ``source``."""
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
        unknown = set(cfg) - set(fields)
        if unknown:
            raise CheckpointError(
                f"{source}: {cls.__name__} has no fields {sorted(unknown)}; "
                "it was written by another varkit version or another model class"
            )
        optional = set(getattr(cls.config_class, "optional_fields", ()))
        missing = sorted(n for n, f in fields.items() if n not in cfg and n not in optional)
        if missing:
            raise CheckpointError(f"{source} lacks the field(s) {missing} that {cls.__name__} needs; "
                                  "re-save the folder (save_pretrained) or restore them")
        hints = _type_hints(cls.config_class)
        for name, value in cfg.items():
            if name in hints and not _fits(value, hints[name]):
                raise CheckpointError(f"{source}: field {name!r} = {value!r} is not of type {_hint_name(hints[name])}")
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        try:
            return cls(cls.config_class(**cfg))
        except VarkitError:
            raise
        except (ValueError, TypeError, AssertionError, KeyError, ZeroDivisionError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{source} does not describe a valid {cls.__name__}: {first[:200]}") from None

    @classmethod
    def from_pretrained(cls: type[T], directory: str | Path) -> T:
        """Load a folder written by :meth:`save_pretrained` (no network access)."""
        module = load_module(directory)
        if not isinstance(module, cls):
            raise CheckpointError(
                f"{directory} holds a {type(module).__name__}, not a {cls.__name__}"
            )
        return module


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def read_config(directory: str | Path) -> dict:
    """The parsed ``config.json`` of a saved module (a JSON object), with clear errors."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if directory.exists() and not directory.is_dir():
        raise ModelNotFoundError(f"{directory} is a file, not a model folder (one with {CONFIG_NAME})")
    if not directory.is_dir():
        raise ModelNotFoundError(f"model directory not found: {directory}")
    if not path.is_file():
        raise ModelNotFoundError(
            f"{directory} has no {CONFIG_NAME}; a varkit model folder holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (write one with save_pretrained or `varkit convert`)"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the folder is corrupt, re-save it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({{...}}), not a {type(cfg).__name__}; "
                              "the folder is corrupt, re-save it")
    return cfg


def _type_hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation this Python cannot evaluate: no type checks for that class
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (bool is no int; int fits float; list fits tuple).
    Annotations it does not know are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args)))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def load_module(directory: str | Path) -> SavableModule:
    """Rebuild whichever registered module ``directory`` holds and load its weights strictly."""
    directory = Path(directory)
    cfg = read_config(directory)
    name = cfg.get("_class")
    _import_module_packages()
    if not isinstance(name, str) or name not in _MODULE_CLASSES:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} names class {name!r}, which this varkit does not know "
            f"(known: {sorted(_MODULE_CLASSES)})"
        )
    module = _MODULE_CLASSES[name].from_config_dict(cfg, str(directory / CONFIG_NAME))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelNotFoundError(f"{directory} has no {WEIGHTS_NAME}; the folder is incomplete, re-save it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}; the file is corrupt, re-save it") from None
    load_state_dict_strict(module, state, str(weights))
    return module.eval()


def _import_module_packages() -> None:
    """Import the packages whose classes register themselves (tokenizers, generators)."""
    import importlib

    for pkg in ("varkit.tokenizers", "varkit.models"):
        importlib.import_module(pkg)


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                           assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected keys; ``assign=True``
    keeps the given tensors instead of copying them (for modules built with :func:`params_on_meta`)."""
    legacy = getattr(module, "legacy_keys", {})
    if legacy:  # folders saved under older parameter names still load
        state = {legacy.get(k, k) if legacy.get(k, k) not in state else k: v for k, v in state.items()}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"weights in {source} do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=assign)
