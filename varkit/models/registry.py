"""Named configs (timm-style): ``create_model("llamagen-b")``, ``list_models()``."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..errors import ModelNotFoundError
from ..registry import Registry
from .base import Generator

# name -> (class, config factory, description)
MODELS: Registry[tuple[type[Generator], Callable[[], Any], str]] = Registry("model config", ModelNotFoundError)
_REGISTRY = MODELS  # the name older code used


def register_config(name: str, cls: type[Generator], config: Callable[[], Any], description: str = "") -> None:
    """Register ``name`` → ``cls(config())``."""
    MODELS.register(name, (cls, config, description))


def list_models(pattern: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, optionally matching a shell pattern (``"mar-*"``)."""
    return MODELS.names(pattern)


def model_class(name: str) -> type[Generator]:
    """The generator class a named config builds."""
    return MODELS.lookup(name)[0]


def create_model(name: str, **overrides: Any) -> Generator:
    """Build a generator from a named config with random weights; ``overrides`` replace config fields."""
    cls = model_class(name)
    _, config, _ = MODELS.lookup(name)
    return cls(replace(config(), **overrides))
