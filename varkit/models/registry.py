"""Named configs (timm-style): ``create_model("llamagen-b")``, ``list_models()``."""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any, Callable

from ..errors import InvalidArgumentError, ModelNotFoundError
from ..hub import ASSETS, bundled_models
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


# the converter (``varkit convert FAMILY``) of each family of published weights, by config-name prefix
CONVERTERS = {"llamagen": "llamagen", "var": "var", "nar": "nar", "mar": "mar", "flowar": "flowar"}


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> Generator:
    """Build a generator from a named config with random weights; ``overrides`` replace config fields.

    ``pretrained=True`` (timm's convention): the generator of the bundled model ``name`` with its trained
    weights. varkit downloads nothing, so published weights (LlamaGen, VAR, ...) are converted once from a
    local file with ``varkit convert`` and loaded with ``varkit.load_pipeline(folder)``; the error says so.
    """
    if not isinstance(pretrained, bool):
        raise InvalidArgumentError(f"pretrained must be True or False, got {pretrained!r}")
    if pretrained:
        return _bundled_generator(name, overrides)
    if isinstance(name, str) and name not in MODELS and name in bundled_models():
        raise ModelNotFoundError(f"{name!r} is a bundled model, not a config: create_model({name!r}, pretrained=True) "
                                 f"for its trained generator, or varkit.load_pipeline({name!r}) for the pipeline")
    cls = model_class(name)
    _, config, _ = MODELS.lookup(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InvalidArgumentError(f"model config {name!r} has no field {', '.join(unknown)}; "
                                   f"its fields: {', '.join(sorted(fields))}")
    from ..modeling import _fits, _type_hints

    hints = _type_hints(cls.config_class)
    for key, value in overrides.items():
        if key in hints and not _fits(value, hints[key]):
            raise InvalidArgumentError(f"model config {name!r}: {key}={value!r} is not of type {hints[key]}")
    return cls(replace(config(), **overrides))


def _bundled_generator(name: str, overrides: dict) -> Generator:
    """The trained generator of bundled model ``name``, or an error saying how to get published weights."""
    from ..modeling import load_module

    if overrides:
        raise InvalidArgumentError(f"pretrained=True loads trained weights as they are; drop {sorted(overrides)}")
    if isinstance(name, str) and name in bundled_models():
        return load_module(ASSETS / name / "generator")
    family = next((f for p, f in CONVERTERS.items() if isinstance(name, str) and name.startswith(p + "-")), None)
    how = (f"convert the published checkpoint from a local file with `varkit convert {family} ... --out DIR`"
           if family else "convert published weights from a local file with `varkit convert FAMILY ... --out DIR`")
    raise ModelNotFoundError(
        f"no bundled weights for {name!r} (bundled: {', '.join(bundled_models()) or 'none'}); varkit downloads "
        f"nothing: {how}, then varkit.load_pipeline(DIR)")
