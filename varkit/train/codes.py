"""Token codes of a dataset, written once to disk (``--extract-codes DIR``) or held in memory, read by batch.

Generator training sees its images only through the frozen tokenizer, so the tokens can be computed
once (LlamaGen's ``extract_codes_c2i``): each rank encodes its share of fixed-size shards
(``codes-00000.npy`` …, each written atomically), rank 0 writes ``labels.npy`` and, last, the
manifest ``codes.json`` that marks the folder complete. A killed extraction resumes: shards already
on disk under the same ``codes.partial.json`` fingerprint are kept. With ``--flip`` both orientations
are stored (rows ``[original, mirrored]``), as LlamaGen's ``--ten-crop``-less flip augmentation does.

Codes are stored in the *tokenizer's* order (each scale's map row-major, scales concatenated), so one
folder serves every generator layout over the same tokenizer; :class:`TokenBatches` turns them into
the generator's layout order per batch. Shards are memory-mapped ``.npy`` files (no pickle): a
DataLoader worker reads only the rows of its batch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InvalidArgumentError
from ..io import atomic_path, write_json
from .distributed import barrier, dist_info

CODES_FORMAT = 1
MANIFEST = "codes.json"
PARTIAL = "codes.partial.json"
LABELS = "labels.npy"


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 of the tokenizer's class and every tensor of its state: codes of another tokenizer differ."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for name, t in sorted(tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def token_maps(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Encode ``images``; the token maps flattened in the tokenizer's order (B, T, *token_shape) and their (h, w)."""
    grids = tokenizer.encode(images)
    grids = grids if isinstance(grids, (list, tuple)) else [grids]
    return torch.cat([g.flatten(1, 2) for g in grids], 1), [tuple(int(v) for v in g.shape[1:3]) for g in grids]


def _storage_dtype(tokenizer, codes: torch.Tensor) -> torch.dtype:
    if codes.dtype.is_floating_point:
        return codes.dtype
    size = getattr(tokenizer, "codebook_size", None)
    return torch.int16 if size is not None and size <= 2 ** 15 - 1 else torch.int32


@torch.no_grad()
def encode_codes(tokenizer, dataset, indices: torch.Tensor, device: torch.device, flip: bool, batch: int = 64,
                 workers: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Codes (k, F, T, *token_shape) on the CPU of the images ``indices`` (F = 2 with ``flip``: the mirrored
    image second), in the tokenizer's order, stored compactly (int16 ids for codebooks up to 32767)."""
    chunks = list(torch.as_tensor(indices).long().split(batch))
    loader = torch.utils.data.DataLoader(_Call(dataset.batch), sampler=chunks, batch_size=None, num_workers=workers,
                                         generator=torch.Generator())
    out, scales = [], []
    for x, _ in loader:
        x = x.to(device)
        views = [x, x.flip(-1)] if flip else [x]
        coded = [token_maps(tokenizer, v) for v in views]
        scales = coded[0][1]
        c = torch.stack([c for c, _ in coded], 1).cpu()
        out.append(c.to(_storage_dtype(tokenizer, c)))
    if not out:
        raise DataError("the dataset is empty; nothing to tokenize")
    return torch.cat(out), scales


class _Call(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: ``fn(indices)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, indices):
        return self.fn(indices)


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--extract-codes {out} is a file; pass a folder for the codes")
    if out.is_dir():
        ours = {MANIFEST, PARTIAL, LABELS}
        other = [p.name for p in out.iterdir() if p.name not in ours and not (p.name.startswith("codes-") and
                 p.name.endswith(".npy")) and not p.name.startswith(".")]
        if other:
            raise InvalidArgumentError(
                f"--extract-codes {out} holds other files ({', '.join(sorted(other)[:3])}); pass an empty or new folder"
            )


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def extract_codes(tokenizer, dataset, out: str | Path, device: torch.device, flip: bool = False, batch: int = 64,
                  shard_size: int = 4096, workers: int = 0) -> Path:
    """Write the codes of every image of ``dataset`` under ``out`` (every rank its share), unless the folder
    already holds them; returns ``out``. Codes of another tokenizer, dataset, resolution or flip setting
    already there are refused, never overwritten."""
    out = Path(out)
    rank, world = dist_info()
    fp = {"format": CODES_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), **dataset.fingerprint(),
          "flip": bool(flip)}
    _check_folder(out)
    if (out / MANIFEST).is_file():
        have = json.loads((out / MANIFEST).read_text()).get("fingerprint", {})
        if _differing(have, fp):
            raise DataError(
                f"{out} holds codes of another {', '.join(_differing(have, fp))} than this run's; "
                "pass a new --extract-codes folder (or delete that one)"
            )
        return out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        partial = json.loads((out / PARTIAL).read_text()) if (out / PARTIAL).is_file() else None
        if partial != fp:  # shards of an interrupted extraction of something else: start over
            for p in out.glob("codes-*.npy"):
                p.unlink()
            write_json(out / PARTIAL, fp)
    barrier()
    n = len(dataset)
    shards = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    scales = None
    for k in range(rank, len(shards), world):
        path = out / f"codes-{k:05d}.npy"
        if path.is_file():
            continue
        codes, scales = encode_codes(tokenizer, dataset, torch.arange(*shards[k]), device, flip, batch, workers)
        _save_npy(path, codes)
    barrier()
    if rank == 0:
        first = np.load(out / "codes-00000.npy", mmap_mode="r")
        if scales is None:
            _, scales = token_maps(tokenizer, dataset.batch(torch.arange(1))[0].to(device))
        _save_npy(out / LABELS, dataset.labels().to(torch.int64))
        write_json(out / MANIFEST, {
            "fingerprint": fp, "num_items": n, "scales": [list(s) for s in scales],
            "token_shape": list(first.shape[3:]), "dtype": str(first.dtype), "flips": int(first.shape[1]),
            "shards": [{"file": f"codes-{k:05d}.npy", "start": s, "count": e - s} for k, (s, e) in enumerate(shards)],
        })
        (out / PARTIAL).unlink(missing_ok=True)
    barrier()
    return out


def _save_npy(path: Path, t: torch.Tensor) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, t.numpy(), allow_pickle=False)


class MemoryCodes:
    """Codes (n, F, T, *token_shape) held in memory, with their labels and token-map sizes."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, scales: list[tuple[int, int]]):
        self.codes, self.labels, self.scales = codes, labels, [tuple(s) for s in scales]
        self.flips = codes.shape[1]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def rows(self, base: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        return self.codes[base, flip]


class CodesStore:
    """Codes extracted by :func:`extract_codes`, memory-mapped (each process maps the shards itself)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise DataError(f"{self.path} holds no extracted codes ({MANIFEST} missing); extract them with --extract-codes")
        m = json.loads((self.path / MANIFEST).read_text())
        self.manifest: dict[str, Any] = m
        self.scales = [tuple(s) for s in m["scales"]]
        self.flips = int(m["flips"])
        self.labels = torch.from_numpy(np.load(self.path / LABELS, allow_pickle=False))
        self.starts = np.array([s["start"] for s in m["shards"]])
        self.shard_size = m["shards"][0]["count"]
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def __getstate__(self):  # workers map the files themselves
        return {**self.__dict__, "_maps": None}

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(self.path / s["file"], mmap_mode="r", allow_pickle=False)
                          for s in self.manifest["shards"]]
        return self._maps

    def rows(self, base: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        shards = self._shards()
        b, f = base.numpy(), flip.numpy()
        k = b // self.shard_size
        first = shards[0]
        out = np.empty((len(b), *first.shape[2:]), dtype=first.dtype)
        for s in np.unique(k):
            sel = np.nonzero(k == s)[0]
            out[sel] = shards[s][b[sel] - self.starts[s], f[sel]]
        return torch.from_numpy(out)


class TokenBatches:
    """``(tokens, labels)`` of virtual indices, in the generator's layout order, on the CPU.

    Index ``v`` of ``n = len(codes) + len(extra)`` items: ``v % n`` is the item, ``v // n`` its flip
    (images only; ``extra``, e.g. teacher samples already in layout order, are never mirrored).
    """

    def __init__(self, codes: MemoryCodes | CodesStore, layout, extra: torch.Tensor | None = None,
                 extra_labels: torch.Tensor | None = None):
        self.codes, self.layout = codes, layout
        self.extra, self.extra_labels = extra, extra_labels
        self.n_images = len(codes)
        try:  # the layout takes the tokenizer's maps its own way (FlowAR: a pyramid of one latent map)
            self.to_layout(codes.rows(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)))
        except InvalidArgumentError as exc:
            raise DataError(
                f"the codes are token maps of sizes {list(codes.scales)}, which this generator's layout does not "
                f"take ({exc}); extract codes with this generator's tokenizer and resolution"
            ) from None

    def __len__(self) -> int:
        return self.n_images + (0 if self.extra is None else len(self.extra))

    def to_layout(self, flat: torch.Tensor) -> torch.Tensor:
        """Tokenizer-order codes (B, T, ...) → layout-order tokens (B, N, ...), ids as int64."""
        grids, o = [], 0
        for h, w in self.codes.scales:
            grids.append(flat[:, o:o + h * w].reshape(flat.shape[0], h, w, *flat.shape[2:]))
            o += h * w
        tokens = self.layout.from_grids(grids)
        return tokens if tokens.dtype.is_floating_point else tokens.long()

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.as_tensor(indices).long()
        n = len(self)
        base, flip = v % n, v // n
        img = base < self.n_images
        if bool((flip[img] >= self.codes.flips).any()):
            raise DataError("a mirrored image was asked for but the codes hold one orientation; extract them with --flip")
        if bool(img.all()):
            return self.to_layout(self.codes.rows(base, flip)), self.codes.labels[base]
        tokens = torch.empty(len(v), *self.extra.shape[1:], dtype=self.extra.dtype)
        labels = torch.empty(len(v), dtype=torch.long)
        if bool(img.any()):
            tokens[img] = self.to_layout(self.codes.rows(base[img], flip[img])).to(tokens.dtype)
            labels[img] = self.codes.labels[base[img]]
        rest = base[~img] - self.n_images
        tokens[~img], labels[~img] = self.extra[rest], self.extra_labels[rest].long()
        return tokens, labels
