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

    On any exception (SIGTERM included, see :func:`varkit.cli.main`) the temporary file is removed and
    ``path`` is left untouched. The temporary name carries this process's id, so a later run can tell a
    killed writer's leftovers (:func:`clean_stale_temporaries`) from a live one's.
    """
    path = Path(path)
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {path}: {_reason(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        try:
            os.replace(tmp_path, path)
        except IsADirectoryError:
            raise InvalidArgumentError(f"cannot write {path}: it is a folder") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


TMP_SUFFIX = ".tmp"


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def make_parent(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` goes in; a one-line error when a file is in the way or it cannot be made."""
    path = Path(path)
    blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InvalidArgumentError(f"cannot write {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {path}: cannot create {path.parent} ({_reason(exc)})") from None
    return path.parent


def check_output_path(path: str | os.PathLike, kind: str = "file") -> Path:
    """Fail now, before any work, if ``path`` (a ``"file"`` or a ``"folder"`` to be written) cannot be written:
    a file in the way of its folders, a folder (file expected) or file (folder expected) already there, or no
    write permission where it would go. Creates nothing: permission is probed with a temporary file in the
    nearest existing folder, removed at once."""
    path = Path(path)
    if path.exists() and kind == "file" and path.is_dir():
        raise InvalidArgumentError(f"{path} is a folder; give a file name to write the {path.suffix or 'output'} file")
    if path.exists() and kind == "folder" and not path.is_dir():
        raise InvalidArgumentError(f"{path} exists and is a file, not a folder; choose another output folder")
    existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if existing == path and kind == "file":
        existing = path.parent
    if not existing.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".varkit-write-probe.", dir=existing)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {path}: {existing} is not writable ({_reason(exc)})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (``.NAME.PID.XXXX.tmp`` of
    :func:`atomic_path` whose process is gone); returns what was removed. A live process's are kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        pid = _writer_pid(p.name)
        if pid is not None and pid != os.getpid() and not _alive(pid) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _writer_pid(name: str) -> int | None:
    parts = name[:-len(TMP_SUFFIX)].split(".")
    return int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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
    make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=out.parent))
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {out}: {_reason(exc)}") from None
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

    ``what`` names the expected file in messages ("LlamaGen GPT checkpoint", ...). torch's own message for
    a refused file suggests re-running with ``weights_only=False``; varkit never does, and says instead
    whether the file is no checkpoint at all, or a pickle of objects other than tensors (nothing in it ran).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} (pass the path of the downloaded file)")
    head = _first_bytes(path)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a {what}; download or save it again")
    is_zip = _is_zip(path)
    if not is_zip and head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"cannot read {what} {path}: a truncated or damaged zip archive; download it again "
                              "and check its size")
    if not is_zip and head[:1] != b"\x80":  # torch.save writes a zip archive; its legacy format, a pickle
        raise CheckpointError(
            f"cannot read {what} {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts "
            f"with {head!r}); pass the {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
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


def _first_bytes(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_reason(exc)}") from None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False
