"""User-facing errors.

Every failure a user can cause raises a ``VarkitError`` subclass whose message says what
was wrong and what to do about it. The CLI prints that single line and exits with status 2.
"""
from __future__ import annotations


class VarkitError(Exception):
    """Base class of every error varkit raises on purpose."""


class InvalidArgumentError(VarkitError, ValueError):
    """An argument is out of range or inconsistent with the model."""


class ModelNotFoundError(VarkitError, LookupError):
    """A model name is unknown, or a model directory is missing or incomplete."""


class CheckpointError(VarkitError):
    """A checkpoint file is unreadable, truncated, or belongs to another model family."""


class DeviceError(VarkitError):
    """The requested device is not available on this machine."""


class DataError(VarkitError):
    """A dataset folder is empty, unreadable, or inconsistent."""


class NumericalError(VarkitError, ArithmeticError):
    """A model produced NaN or infinite values (corrupt weights, or settings that overflow)."""


def check(condition: bool, message: str, kind: type[VarkitError] = InvalidArgumentError) -> None:
    """Raise ``kind(message)`` unless ``condition`` holds."""
    if not condition:
        raise kind(message)
