"""Named configs (timm-style): ``create_model("llamagen-b")``, ``list_models()``."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..errors import ModelNotFoundError
from .base import Generator

_REGISTRY: dict[str, tuple[type[Generator], Callable[[], Any], str]] = {}


def register_config(name: str, cls: type[Generator], config: Callable[[], Any], description: str = "") -> None:
    """Register ``name`` → ``cls(config())``."""
    _REGISTRY[name] = (cls, config, description)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type[Generator]:
    """The generator class a named config builds."""
    if name not in _REGISTRY:
        raise ModelNotFoundError(f"unknown model config {name!r}; known configs: {', '.join(list_models())}")
    return _REGISTRY[name][0]


def create_model(name: str, **overrides: Any) -> Generator:
    """Build a generator from a named config with random weights; ``overrides`` replace config fields."""
    cls = model_class(name)
    _, config, _ = _REGISTRY[name]
    return cls(replace(config(), **overrides))
