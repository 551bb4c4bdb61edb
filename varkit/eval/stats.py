"""Features and reference statistics for FID-style metrics, on torch-fidelity's extractors.

Two feature extractors:

* ``inception``: torch-fidelity's ``inception-v3-compat`` (the TF-FID Inception, bit-compatible
  with the ADM evaluation suite), built from a **local** weights file; nothing is downloaded.
* ``digits``: varkit's shipped digits CNN (:mod:`varkit.eval.features`).

A *reference* (``--ref``) is one of

* a folder of images (png/jpg/jpeg, not recursive, all of one size);
* ``digits``: the 1797 real scikit-learn digits at 32x32;
* a ``STATS.npz`` written by :func:`compute_stats` (``varkit eval stats``): ``mu``, ``sigma``,
  ``features`` and the name of the extractor that made them;
* an ADM reference batch (guided-diffusion's ``VIRTUAL_imagenet256_labeled.npz`` layout):
  ``mu``/``sigma`` (Inception pool features) used directly for FID, ``arr_0`` (N, H, W, 3) uint8
  images for KID and precision/recall.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, DataError, InvalidArgumentError
from ..io import atomic_path, load_torch_checkpoint

FEATURES = ("inception", "digits")
IMAGE_EXTS = "png,jpg,jpeg"

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's hash suffix of the published file
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_LAYERS = ("64", "192", "768", "2048", "logits_unbiased")


class InceptionWeightsError(CheckpointError):
    """The Inception weights file is missing, unreadable, or not torch-fidelity's InceptionV3."""


def torch_fidelity_inception_url() -> str:
    """The URL torch-fidelity (the installed version) downloads its Inception weights from."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_cache_dir() -> Path:
    """Where torch-fidelity (through ``torch.hub``) keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _how_to_get_weights() -> str:
    url = torch_fidelity_inception_url()
    tf_file = url.rsplit("/", 1)[-1]
    return (
        f"torch-fidelity's InceptionV3 weights are the file {tf_file} from {url} (the same file pytorch-fid "
        f"publishes as {PYTORCH_FID_FILE} at {PYTORCH_FID_URL}). On a machine with internet, download either, "
        f"then pass it with --inception-weights PATH (inception_weights=PATH in Python) or put it into "
        f"{inception_cache_dir()}/. For the bundled digits models, --features digits needs no Inception weights"
    )


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local Inception weights file: ``path``, else one found in torch-fidelity's cache folder.

    Never downloads; raises :class:`InceptionWeightsError` saying which file is needed and where
    it comes from.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {p}. " + _how_to_get_weights())
        return p
    cache = inception_cache_dir()
    for name in (torch_fidelity_inception_url().rsplit("/", 1)[-1], PYTORCH_FID_FILE):
        if (cache / name).is_file():
            return cache / name
    raise InceptionWeightsError(
        f"no Inception weights given and none in torch-fidelity's cache folder {cache}; varkit never downloads "
        "them. " + _how_to_get_weights()
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class Extractor:
    """A torch-fidelity feature extractor plus what the metrics need to know about it."""

    module: torch.nn.Module
    name: str                 # "inception" | "digits"
    fid_layer: str            # features for FID, KID, precision/recall
    isc_layer: str            # logits for IS (and digits accuracy)
    device: torch.device
    info: dict                # recorded in the JSON (weights file, sha256, ...)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([self.fid_layer, self.isc_layer]))


def _load_inception_module(path: Path, layers: list[str]):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        state = load_torch_checkpoint(path, "Inception weights")
    except CheckpointError:
        size = path.stat().st_size if path.is_file() else 0
        raise InceptionWeightsError(
            f"cannot read {path} ({size:,} bytes) as Inception weights: it is not a PyTorch state-dict file or it is "
            "truncated (the published file is about 95 MB). " + _how_to_get_weights()
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        keys = list(state)[:3] if isinstance(state, dict) else []
        raise InceptionWeightsError(
            f"{path} holds a {kind}{f' with keys {keys}' if keys else ''}, not an InceptionV3 state dict "
            "(name → tensor). " + _how_to_get_weights()
        )
    # torch-fidelity loads its file with weights_only=False; we hand it the tensors we loaded with
    # weights_only=True, re-serialised, so no pickle from the user's file is ever executed.
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        return FeatureExtractorInceptionV3(INCEPTION_NAME, layers, feature_extractor_weights_path=buf)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise InceptionWeightsError(
            f"{path} is not torch-fidelity's InceptionV3 weights: {first}. " + _how_to_get_weights()
        ) from None


@functools.lru_cache(maxsize=2)
def _inception_cached(path: str, mtime_ns: int, size: int, device: str):
    """One Inception module per (file version, device) per process: repeated evaluations reuse it."""
    module = _load_inception_module(Path(path), list(INCEPTION_LAYERS))
    return module.to(device).eval().requires_grad_(False), sha256_file(path)


def load_extractor(features: str = "inception", inception_weights: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, fid_layer: str | None = None) -> Extractor:
    """Build the ``inception`` (from a local weights file) or ``digits`` feature extractor.

    ``fid_layer`` picks the Inception features for FID/KID/precision/recall (default ``2048``, the
    pool features every paper uses; ``64``/``192``/``768`` are cheaper, for experiments and tests).
    """
    from ..device import resolve_device

    dev = resolve_device(device)
    if features == "inception":
        path = find_inception_weights(inception_weights).resolve()
        st = path.stat()
        module, sha = _inception_cached(str(path), st.st_mtime_ns, st.st_size, str(dev))
        published = sha.startswith(INCEPTION_SHA256_PREFIX)
        if not published:
            print(f"warning: {path} (sha256 {sha[:12]}…) is not the published Inception weights file; "
                  "FID/IS from it are not comparable with published numbers", file=sys.stderr)
        layer = fid_layer or "2048"
        if layer not in INCEPTION_LAYERS[:-1]:
            raise InvalidArgumentError(f"unknown Inception layer {layer!r}; choose one of {INCEPTION_LAYERS[:-1]}")
        info = {"name": "inception", "torch_fidelity_extractor": INCEPTION_NAME, "weights": str(path),
                "weights_sha256": sha, "published_weights": published, "fid_layer": layer}
        ext = Extractor(module, "inception", layer, "logits_unbiased", dev, info)
    elif features == "digits":
        from . import features as digits_features

        if fid_layer not in (None, digits_features.FEATURE_LAYER):
            raise InvalidArgumentError(f"the digits features have one layer, {digits_features.FEATURE_LAYER!r}")

        cls = digits_features.fidelity_extractor_class()
        module = cls(digits_features.TORCH_FIDELITY_NAME, [digits_features.FEATURE_LAYER, digits_features.LOGITS_LAYER])
        weights = digits_features.ASSET_DIR / "model.safetensors"
        info = {"name": "digits", "torch_fidelity_extractor": digits_features.TORCH_FIDELITY_NAME,
                "weights": str(weights), "weights_sha256": sha256_file(weights)}
        ext = Extractor(module, "digits", digits_features.FEATURE_LAYER, digits_features.LOGITS_LAYER, dev, info)
    else:
        raise InvalidArgumentError(f"unknown features {features!r}; choose one of {', '.join(FEATURES)}")
    ext.module.to(dev).eval().requires_grad_(False)
    return ext


# -- image sources ---------------------------------------------------------------------------------
def list_images(folder: str | os.PathLike, what: str = "image folder") -> list[str]:
    """Image files (png/jpg/jpeg) directly in ``folder``, in torch-fidelity's order (sorted real paths)."""
    from torch_fidelity.utils import glob_samples_paths

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} not found: {folder} (pass a folder of .png/.jpg images)")
    return glob_samples_paths(str(folder), False, IMAGE_EXTS, None, verbose=False)


def check_count(n: int, needed: int, what: str, why: str) -> None:
    if n < needed:
        raise DataError(f"{what} has {n} image{'s' if n != 1 else ''}; {why} needs at least {needed}")


class _FileImages(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors from files, as torch-fidelity reads them (PIL → RGB)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {self.files[i]}: {exc}; remove or replace it") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i


class _SameSize:
    """Collate that refuses images of mixed sizes with a message naming two of them."""

    def __init__(self, files: Sequence[str], size: tuple[int, int]):
        self.files, self.size = files, size

    def __call__(self, batch):
        for x, i in batch:
            if tuple(x.shape[1:]) != self.size:
                raise DataError(
                    f"images of mixed sizes: {self.files[0]} is {self.size[1]}x{self.size[0]} but {self.files[i]} is "
                    f"{x.shape[2]}x{x.shape[1]}; resize/crop them all to one size first"
                )
        return torch.stack([x for x, _ in batch])


def _iter_batches(images, batch_size: int):
    """Yield uint8 (B, 3, H, W) batches from file paths, a uint8 tensor, or an NHWC uint8 array."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
        return
    files = list(images)
    with Image.open(files[0]) as im:
        w, h = im.size
    workers = 0 if len(files) < 2000 else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_FileImages(files), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_SameSize(files, (h, w)))
    yield from loader


def num_images(images) -> int:
    return len(images)


@torch.no_grad()
def extract_features(images, extractor: Extractor, batch_size: int = 64, progress: bool = False,
                     desc: str = "features", layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Features of every image, per layer, as float32 CPU tensors (torch-fidelity's extraction).

    ``images``: a list of files (one size), a uint8 tensor (N, 3, H, W), or a uint8 array (N, H, W, 3).
    """
    from tqdm import tqdm

    layers = list(layers or extractor.layers)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    n = num_images(images)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False, file=sys.stderr) as bar:
        for batch in _iter_batches(images, batch_size):
            if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
                raise DataError(f"expected uint8 RGB images (B, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
            feats = extractor.module.convert_features_tuple_to_dict(extractor.module(batch.to(extractor.device)))
            for k in layers:
                out[k].append(feats[k].float().cpu())
            bar.update(batch.shape[0])
    return {k: torch.cat(v) for k, v in out.items()}


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` exactly as torch-fidelity computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


# -- references ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
    """A resolved ``--ref``: what it is, and whatever of stats/features/images it provides."""

    kind: str                                  # folder | digits | varkit-stats | adm-npz
    source: str
    n: int
    images: Any = None                         # file list / uint8 tensor / NHWC array, or None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    features: torch.Tensor | None = None       # fid-layer features, if known
    extractor: str | None = None               # the extractor that made mu/sigma/features
    layer: str | None = None                   # and its layer
    fid_from: str = ""                         # where the FID statistics came from


    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.source, "num_images": self.n, "features": self.extractor,
                "layer": self.layer, "fid_statistics_from": self.fid_from}


def open_reference(ref: str | os.PathLike) -> Reference:
    """Resolve ``--ref`` without computing anything (cheap; call it before generating)."""
    if str(ref) == "digits":
        from .features import real_digits_uint8

        imgs = real_digits_uint8()
        return Reference("digits", "digits (1797 real scikit-learn digits, 32x32)", len(imgs), images=imgs)
    path = Path(ref).expanduser()
    if path.is_dir():
        files = list_images(path, "reference folder")
        check_count(len(files), 1, f"reference folder {path}", "a reference")
        return Reference("folder", str(path.resolve()), len(files), images=files)
    if not path.is_file():
        raise DataError(f"reference not found: {path}; --ref takes an image folder, a STATS.npz from "
                        "`varkit eval stats`, an ADM reference batch (.npz) or `digits`")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read reference {path} as .npz: {exc}") from None
    if "varkit_features" in keys:
        need = {"mu", "sigma", "num_images"}
        if not need <= keys:
            raise DataError(f"{path} is an incomplete varkit stats file (missing {sorted(need - keys)}); recompute it "
                            "with `varkit eval stats`")
        feats = torch.from_numpy(data["features"]) if "features" in keys else None
        return Reference("varkit-stats", str(path.resolve()), int(data["num_images"]), mu=data["mu"],
                         sigma=data["sigma"], features=feats, extractor=str(data["varkit_features"]),
                         layer=str(data["feature_layer"]) if "feature_layer" in keys else None)
    if "mu" in keys or "arr_0" in keys:
        ref = Reference("adm-npz", str(path.resolve()), 0)
        if "mu" in keys:
            if "sigma" not in keys:
                raise DataError(f"{path} has mu but no sigma; an ADM reference batch holds both")
            # ADM's mu/sigma are Inception pool features (2048-d); the dimension names the layer
            ref.mu, ref.sigma, ref.extractor = data["mu"], data["sigma"], "inception"
            ref.layer = str(ref.mu.shape[0]) if ref.mu.ndim == 1 else None
        if "arr_0" in keys:
            arr = data["arr_0"]
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise DataError(f"{path}: arr_0 must be uint8 images (N, H, W, 3) as in the ADM suite, got "
                                f"{arr.dtype} {arr.shape}")
            ref.images, ref.n = arr, arr.shape[0]
        return ref
    raise DataError(f"{path} has keys {sorted(keys)[:8]}; expected a varkit stats file (from `varkit eval stats`) "
                    "or an ADM reference batch (arr_0 images and/or mu, sigma)")


def _same_features(ref: Reference, extractor: Extractor) -> bool:
    return ref.extractor == extractor.name and ref.layer in (None, extractor.fid_layer)


def _check_stats_extractor(ref: Reference, extractor: Extractor) -> None:
    if ref.extractor == extractor.name and ref.layer not in (None, extractor.fid_layer):
        raise InvalidArgumentError(
            f"reference {ref.source} holds {ref.extractor} layer-{ref.layer} statistics but the metrics use layer "
            f"{extractor.fid_layer}; recompute the reference with the same layer"
        )
    if ref.extractor is not None and ref.extractor != extractor.name:
        raise InvalidArgumentError(
            f"reference {ref.source} holds {ref.extractor} statistics but the metrics use {extractor.name} features; "
            f"pass --features {ref.extractor}, or a reference made with --features {extractor.name}"
        )


def reference_stats(ref: Reference, extractor: Extractor, batch_size: int = 64, progress: bool = False) -> Reference:
    """Fill ``mu``/``sigma`` (and ``features`` when images are at hand) for ``extractor``."""
    if ref.mu is not None and ref.extractor is not None and not _same_features(ref, extractor):
        if ref.images is None:
            _check_stats_extractor(ref, extractor)
        ref.mu = ref.sigma = ref.features = None  # other features' stats: recompute from the images
    if ref.features is not None and ref.extractor is not None:
        _check_stats_extractor(ref, extractor)
    if ref.features is None and ref.kind == "digits" and extractor.name == "digits" \
            and extractor.info.get("weights_sha256") == _shipped_digits_sha():
        from .features import real_digits_features

        ref.features = real_digits_features()
    if ref.features is None and ref.images is not None:
        cached = _cache_path(ref, extractor)
        if cached is not None and cached.is_file():
            ref.features = _read_cached_features(cached)
        if ref.features is None:
            ref.features = extract_features(ref.images, extractor, batch_size, progress, "reference",
                                            layers=[extractor.fid_layer])[extractor.fid_layer]
            if cached is not None:
                _write_cached_features(cached, ref.features)
        elif progress:
            print(f"reference features of {ref.source}: cached in {cached}", file=sys.stderr)
    if ref.mu is None:
        if ref.features is None:
            raise DataError(f"reference {ref.source} has neither statistics nor images")
        st = fid_statistics(ref.features)
        ref.mu, ref.sigma = st["mu"], st["sigma"]
        ref.fid_from = "features of the reference images"
    else:
        ref.fid_from = "mu/sigma stored in the file"
    ref.extractor, ref.layer = extractor.name, extractor.fid_layer
    return ref


# -- the reference-feature cache: a reference's features are computed once per (files, extractor) ----------
def reference_cache_dir() -> Path:
    """Where reference features are cached: ``$VARKIT_CACHE/fid_refs`` (default ``~/.cache/varkit/fid_refs``)."""
    root = os.environ.get("VARKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "varkit")
    return Path(root) / "fid_refs"


def _cache_key(ref: Reference, extractor: Extractor) -> str | None:
    """A key that changes when any reference file or the extractor changes (paths, sizes, mtimes, weights hash)."""
    if os.environ.get("VARKIT_NO_REF_CACHE"):
        return None
    if ref.kind == "folder":
        files = [(f, *(lambda st: (st.st_size, st.st_mtime_ns))(os.stat(f))) for f in ref.images]
    elif ref.kind == "adm-npz":
        st = os.stat(ref.source)
        files = [(ref.source, st.st_size, st.st_mtime_ns)]
    else:
        return None  # digits: shipped features; tensors given in memory: nothing stable to key on
    blob = json.dumps({"files": files, "extractor": extractor.name, "layer": extractor.fid_layer,
                       "weights": extractor.info.get("weights_sha256")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_path(ref: Reference, extractor: Extractor) -> Path | None:
    key = _cache_key(ref, extractor)
    return None if key is None else reference_cache_dir() / f"{extractor.name}-{extractor.fid_layer}-{key}.npy"


def _read_cached_features(path: Path) -> torch.Tensor | None:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None  # unreadable: recompute (and rewrite)


def _write_cached_features(path: Path, features: torch.Tensor) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, features.numpy().astype(np.float32))
    except OSError as exc:  # a read-only home folder must not fail the evaluation
        print(f"warning: could not cache reference features in {path}: {exc}", file=sys.stderr)


@functools.lru_cache(maxsize=1)
def _shipped_digits_sha() -> str:
    from .features import ASSET_DIR

    return sha256_file(ASSET_DIR / "model.safetensors")


def default_batch_size(features: str) -> int:
    return 500 if features == "digits" else 64


def compute_stats(folder: str | os.PathLike, out: str | os.PathLike, features: str = "inception",
                  inception_weights: str | os.PathLike | None = None, device: str | None = None,
                  batch_size: int | None = None, progress: bool = True, save_features: bool = True,
                  fid_layer: str | None = None) -> dict:
    """Reference statistics of ``folder`` (or ``digits``) written atomically to ``out`` (.npz).

    The file holds ``mu``, ``sigma`` (float64), ``features`` (float32, for KID and precision/recall;
    omit with ``save_features=False``), ``num_images`` and the extractor's name and weights hash.
    """
    ref = open_reference(folder)
    if ref.kind not in ("folder", "digits"):
        raise InvalidArgumentError(f"`eval stats` takes an image folder (or `digits`), not {ref.kind} {folder}")
    check_count(ref.n, 2, f"{ref.kind} {ref.source}", "a covariance (FID statistics)")
    extractor = load_extractor(features, inception_weights, device, fid_layer)
    reference_stats(ref, extractor, batch_size or default_batch_size(features), progress)
    arrays = {
        "mu": np.asarray(ref.mu, dtype=np.float64), "sigma": np.asarray(ref.sigma, dtype=np.float64),
        "num_images": np.asarray(ref.n), "varkit_features": np.asarray(extractor.name),
        "feature_layer": np.asarray(extractor.fid_layer), "weights_sha256": np.asarray(extractor.info["weights_sha256"]),
        "source": np.asarray(ref.source),
    }
    if save_features:
        arrays["features"] = ref.features.numpy().astype(np.float32)
    out = Path(out)
    if out.suffix != ".npz":
        raise InvalidArgumentError(f"--out must end in .npz, got {out}")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return {"out": str(out), "num_images": ref.n, "features": extractor.name, "dim": int(arrays["mu"].shape[0])}
