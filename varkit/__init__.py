"""varkit: visual autoregressive image generation in one toolkit.

The public names load on first use (PEP 562 ``__getattr__``), as do the subpackages
(``varkit.models``, ``varkit.eval``...): ``import varkit`` and ``varkit --help`` then cost
milliseconds instead of the seconds torch and the model code take to import.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import VarkitError

__version__ = "0.1.0"
__all__ = ["VarkitError", "create_model", "list_models", "load_pipeline", "Pipeline", "PipelineOutput", "bundled_models"]

_LAZY = {"create_model": "models", "list_models": "models", "load_pipeline": "pipeline", "Pipeline": "pipeline",
         "PipelineOutput": "pipeline", "bundled_models": "pipeline"}

if TYPE_CHECKING:
    from .models import create_model, list_models
    from .pipeline import Pipeline, PipelineOutput, bundled_models, load_pipeline


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a subpackage, as `import varkit` once loaded
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
