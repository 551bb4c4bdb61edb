"""File I/O that never leaves a half-written file, and safe checkpoint loading."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError, InvalidArgumentError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a Path; an error when it exists and ``overwrite`` is off (converters call it before their
    slow loading, :func:`atomic_directory` again before writing)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; choose a new --out folder or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; rename it onto ``out`` on success.

    On any error the temporary folder is removed and ``out`` is untouched. An existing
    ``out`` is replaced only with ``overwrite=True`` (and only once the new one is complete).
    """
    out = refuse_existing(out, overwrite)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / out.name, out)  # put the previous folder back
                raise
            finally:
                if not (old / out.name).exists():
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_image(image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically; the format comes from the suffix of ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=_pil_format(path))


def _pil_format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}.get(ext, "PNG")


def load_torch_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a pickled ``.pt/.pth`` file with ``weights_only=True``, with clear errors.

    ``what`` names the expected file in messages ("LlamaGen GPT checkpoint", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} (pass the path of the downloaded file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, IndexError, ValueError,
            KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"{path} is not a weights-only {what}: it pickles objects other than tensors and plain "
                "containers, which varkit never unpickles (nothing in it was run). Re-save its state dict "
                "with torch.save(model.state_dict(), ...) or pass the right file"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read {what} {path}: {first[:200]}. The file may be truncated or not a "
            "PyTorch checkpoint; download it again and check its size"
        ) from None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False
