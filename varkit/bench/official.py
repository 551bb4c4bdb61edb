"""Import an official repository's modules from a local checkout, for side-by-side benchmarks.

The official code is never vendored: the user passes the folder of their own clone, and its
modules are imported from there for the duration of the import only.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from pathlib import Path
from collections.abc import Iterator
from types import ModuleType

from ..errors import InvalidArgumentError, VarkitError


@contextlib.contextmanager
def cuda_as_identity() -> Iterator[None]:
    """Official code (MAR, FlowAR) calls ``.cuda()`` on new tensors: make it the identity (CPU run) while it runs.

    torch is imported here only when the context is entered, so importing this module stays light."""
    import torch

    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **kw: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = orig  # type: ignore[method-assign]


def import_checkout(root: str | os.PathLike, marker: str, modules: list[str], what: str, hint: str) -> list[ModuleType]:
    """``modules`` imported from ``root``, which must hold the file ``marker``; clear errors otherwise.

    ``what`` names the source tree in messages ("a LlamaGen checkout"); ``hint`` says what to pass instead.
    """
    root = Path(root)
    if not (root / marker).is_file():
        raise InvalidArgumentError(f"{root} is not {what} (no {marker}); {hint}")
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import {what}'s code from {root}: {exc}") from None
    finally:
        sys.path.remove(str(root))


def script_main(script: str, parser, run, argv: list[str] | None = None) -> int:
    """A side-by-side script's entry point: parse ``argv``, call ``run(args)``; a varkit error is one line, exit 2."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except VarkitError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return 2
    return 0
