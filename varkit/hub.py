"""Where models are: the one place that turns "a bundled name or a folder" into a folder.

The pipeline, the speculative samplers' drafters, training's teachers and ``eval recon`` all take
a model as a bundled name (``digits``) or a folder; they resolve it here, so they agree on what
exists and say the same thing when it does not. Depends on nothing but ``errors``.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InvalidArgumentError, ModelNotFoundError

ASSETS = Path(__file__).parent / "assets"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "generator").is_dir()) if ASSETS.is_dir() else []


def resolve_model_dir(name_or_dir: str | Path, role: str = "model") -> Path:
    """The folder of a bundled model name or of an existing folder; ``role`` names it in errors."""
    if name_or_dir is None or not isinstance(name_or_dir, (str, Path)) or not str(name_or_dir):
        raise InvalidArgumentError(
            f"{role} must be a bundled model name ({', '.join(bundled_models()) or 'none'}) or a model folder, "
            f"got {name_or_dir!r}")
    path = Path(name_or_dir)
    if not path.exists() and (ASSETS / str(name_or_dir) / "config.json").is_file():
        return ASSETS / str(name_or_dir)
    if not path.exists():
        raise ModelNotFoundError(
            f"unknown {role} {str(name_or_dir)!r}: not a bundled model ({', '.join(bundled_models()) or 'none'}) "
            "and no such folder"
        )
    return path
