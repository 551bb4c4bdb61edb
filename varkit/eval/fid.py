"""``varkit eval fid``: generate samples, then FID, IS, KID, precision and recall via torch-fidelity.

Generation writes one PNG per sample, ``{index:06d}_c{class}.png``, atomically, into a folder;
samples already there are skipped, so an interrupted run resumes. Classes are balanced
(sample ``i`` has class ``i % num_classes``) and sample ``i`` is drawn with its own seed
``seed * 1_000_003 + i``, so the set of images is the same whatever the batch size, the number of
``torchrun`` ranks (rank ``r`` of ``W`` makes the samples ``i ≡ r mod W``) or interruptions.

Metrics are computed by torch-fidelity's own functions (``fid_statistics_to_metric``,
``isc_features_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``) on features
from its ``inception-v3-compat`` extractor loaded from a local weights file, or from varkit's digits
CNN (``features="digits"``). With a folder reference the numbers equal
``torch_fidelity.calculate_metrics(input1=samples, input2=ref, ...)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError, InvalidArgumentError
from ..io import save_image, write_json
from . import stats as S

SEED_STRIDE = 1_000_003
SAMPLING_KEYS = ("cfg", "cfg_schedule", "temperature", "top_k", "top_p", "head_steps", "num_iter",
                 "guidance_interval")  # = Pipeline's
CONTINUOUS_KEYS = ("head_steps", "num_iter", "guidance_interval")  # settings only continuous heads / sets layouts read
MANIFEST = "varkit_samples.json"
_LABEL_RE = re.compile(r"_c(\d+)\.[A-Za-z]+$")
ALL_METRICS = ("fid", "isc", "kid", "prc")


# -- generation ------------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` (independent of batching and sharding)."""
    return seed * SEED_STRIDE + index


def sample_name(index: int, label: int) -> str:
    return f"{index:06d}_c{label}.png"


def sample_label(path: str | os.PathLike) -> int | None:
    m = _LABEL_RE.search(str(path))
    return int(m.group(1)) if m else None


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment (0, 1 outside torchrun)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(f"bad torchrun environment RANK={rank} WORLD_SIZE={world}")
    return rank, world


def resolve_settings(pipe, sampler: str | None = None, preset: str | None = None,
                     image_size: int | None = None, **overrides: Any) -> dict:
    """Sampling settings: explicit values, else the named ``preset``'s, else the model's published defaults
    (``pipe.defaults``: a converted model's paper FID protocol). ``image_size``: the size samples are evaluated
    at (default: the protocol's ``fid_image_size``, e.g. 256 for LlamaGen's 384 px models; None = as decoded)."""
    if preset is not None and hasattr(pipe, "settings"):
        defaults = pipe.settings(preset)
    else:
        defaults = dict(getattr(pipe, "defaults", None) or {})
    out = {"sampler": sampler or defaults.get("sampler") or "ancestral"}
    for k in SAMPLING_KEYS:
        v = overrides.get(k)
        out[k] = v if v is not None else defaults.get(k)
    for k in CONTINUOUS_KEYS:  # continuous heads only: unset, they leave earlier folders' manifests and hashes as they were
        if out.get(k) is None:
            out.pop(k, None)
    size = image_size if image_size is not None else defaults.get("fid_image_size")
    if size is not None:  # only when set: earlier folders' manifests and hashes stay as they were
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(f"--image-size must be a positive number of pixels, got {size!r}")
        out["image_size"] = size
    if preset is not None:
        out["preset"] = preset
    return out


def default_num_samples(pipe) -> int:
    """The model's published FID sample count (e.g. VAR: 50 per class), else 50 per class."""
    d = dict(getattr(pipe, "defaults", None) or {})
    for key in ("fid_num_samples", "num_samples"):
        if d.get(key):
            return int(d[key])
    return int(d.get("images_per_class") or 50) * int(pipe.num_classes)


def _check_manifest(folder: Path, manifest: dict, rank: int) -> None:
    path = folder / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != manifest:
            diff = [f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in sorted(set(old) | set(manifest))
                    if old.get(k) != manifest.get(k)]
            raise InvalidArgumentError(
                f"{folder} holds samples made with other settings ({'; '.join(diff[:3])}); pass another --out "
                "folder, or delete this one to regenerate"
            )
    elif rank == 0:
        write_json(path, manifest)


QUEUE_BATCHES = 8  # batches handed to a continuous-batching sampler per call (written to disk after each call)


def _continuous(pipe, settings: dict) -> bool:
    """Whether the run's sampler keeps slots over a queue of images (continuous batching) on this generator."""
    from ..samplers import SAMPLERS

    cls = SAMPLERS.get(settings.get("sampler") or "ancestral")  # (an unknown name fails in the pipeline)
    return bool(getattr(cls, "continuous_batching", False)) and \
        bool(getattr(getattr(pipe, "generator", None), "supports_rows", False))


def generate_samples(pipe, out_dir: str | os.PathLike, num_samples: int, *, settings: dict | None = None,
                     seed: int = 0, batch_size: int = 32, sampler_kwargs: dict | None = None,
                     model: str | None = None, rank: int | None = None, world_size: int | None = None,
                     progress: bool = True) -> dict:
    """Write this rank's missing samples of ``0..num_samples-1`` into ``out_dir``.

    ``settings`` comes from :func:`resolve_settings`. Returns ``{'generated', 'skipped', 'seconds'}``
    for this rank.
    """
    from tqdm import tqdm

    if num_samples < 2:
        raise InvalidArgumentError(f"--num-samples must be at least 2 (FID needs a covariance), got {num_samples}")
    if batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        rank, world_size = dist_info()
    settings = settings or resolve_settings(pipe)
    sampler_kwargs = dict(sampler_kwargs or {})
    num_classes = int(pipe.num_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"model": model, "num_classes": num_classes, "seed": seed, "seed_rule": f"seed * {SEED_STRIDE} + index",
                "label_rule": "index % num_classes", **settings, "sampler_kwargs": sampler_kwargs}
    if generator_dtype(pipe) != "float32":  # only then: fp32 folders keep their manifests (a bf16 run is another run)
        manifest["dtype"] = generator_dtype(pipe)
    _check_manifest(out_dir, manifest, rank)

    mine = range(rank, num_samples, world_size)
    todo = [i for i in mine if not (out_dir / sample_name(i, i % num_classes)).is_file()]
    call = {k: v for k, v in settings.items() if v is not None and k != "preset"}
    t0 = time.perf_counter()
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"generating (rank {rank})" if world_size > 1
              else "generating", unit="img", disable=not progress or rank != 0, file=sys.stderr) as bar:
        # speculative samplers get QUEUE_BATCHES batches per pipeline call and refill a finished image's slot
        # from that queue (continuous batching); the others decode batch_size images a call
        queue = _continuous(pipe, settings)
        per_call = batch_size * QUEUE_BATCHES if queue else batch_size
        for start in range(0, len(todo), per_call):
            idx = todo[start:start + per_call]
            labels = [i % num_classes for i in idx]
            out = pipe(class_labels=labels, image_seeds=[image_seed(seed, i) for i in idx],
                       **({"batch_size": batch_size} if queue else {}), **call, **sampler_kwargs)
            if len(out.images) != len(idx):
                raise RuntimeError(f"pipeline returned {len(out.images)} images for {len(idx)} labels")
            for i, lab, im in zip(idx, labels, out.images):
                save_image(im.convert("RGB"), out_dir / sample_name(i, lab))
            bar.update(len(idx))
    return {"generated": len(todo), "skipped": len(mine) - len(todo), "seconds": time.perf_counter() - t0}


def sample_files(out_dir: str | os.PathLike, num_samples: int, num_classes: int) -> list[str]:
    """Paths of samples ``0..num_samples-1`` (in index order = torch-fidelity's sorted order)."""
    out_dir = Path(out_dir)
    return [str((out_dir / sample_name(i, i % num_classes)).resolve()) for i in range(num_samples)]


def init_distributed(world_size: int, device: torch.device | str | None = None) -> bool:
    """Under torchrun (``world_size > 1``): join the process group (NCCL on CUDA, gloo on the CPU) if no one did.

    The timeout is long (12 h): ranks meet at a barrier once their share of the samples is written, and
    shares differ when a run resumes. Returns whether this call created the group (then it destroys it)."""
    import datetime

    dist = torch.distributed
    if world_size <= 1 or not dist.is_available() or dist.is_initialized() or "MASTER_ADDR" not in os.environ:
        return False  # one process, a group someone else made, or ranks simulated without torchrun (tests)
    backend = "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return True


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_samples(files: Sequence[str]) -> None:
    """After the barrier: every rank's samples must exist (a rank that failed leaves gaps)."""
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{len(missing)} samples (e.g. {missing[0]}) are missing after all ranks finished; "
                        "a rank failed: rerun the same command to resume")


def export_npz(files: Sequence[str], path: str | os.PathLike, progress: bool = True) -> Path:
    """Write the samples as the ADM evaluator's sample batch: ``arr_0``, uint8 (N, H, W, 3), atomically.

    The array is filled image by image in a memory-mapped file and stored uncompressed in the .npz, so
    50 000 ImageNet samples need no more memory than one image (the file is N·H·W·3 bytes, 9.8 GB at 256 px)."""
    import zipfile

    from PIL import Image
    from tqdm import tqdm

    from ..io import atomic_path

    path = Path(path)
    if path.suffix != ".npz":
        raise InvalidArgumentError(f"--export-npz must end in .npz (the ADM evaluator's format), got {path}")
    if not files:
        raise InvalidArgumentError("no samples to export")
    with Image.open(files[0]) as im0:
        w, h = im0.size
    with atomic_path(path) as tmp:
        npy = tmp.with_name(tmp.name + ".npy")
        try:
            arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(files), h, w, 3))
            for i, f in enumerate(tqdm(files, desc="export npz", unit="img", disable=not progress, file=sys.stderr)):
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
                if a.shape != (h, w, 3):
                    raise DataError(f"{f} is {a.shape[1]}x{a.shape[0]}, the first sample {w}x{h}: samples must share a size")
                arr[i] = a
            arr.flush()
            del arr
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
                z.write(npy, "arr_0.npy")
        finally:
            npy.unlink(missing_ok=True)
    return path


# -- metrics ---------------------------------------------------------------------------------------
def _same_dtype(a: dict, b: dict) -> tuple[dict, dict]:
    if a["mu"].dtype != b["mu"].dtype or a["sigma"].dtype != b["sigma"].dtype:
        a = {k: np.asarray(a[k], dtype=np.float64) for k in ("mu", "sigma")}
        b = {k: np.asarray(b[k], dtype=np.float64) for k in ("mu", "sigma")}
    return a, b


def compute_metrics(samples, ref: str | os.PathLike | S.Reference, *, features: str = "inception",
                    inception_weights: str | os.PathLike | None = None, extractor: S.Extractor | None = None,
                    labels: Sequence[int] | None = None, metrics: Sequence[str] = ALL_METRICS,
                    device: str | None = None, batch_size: int | None = None, kid_subset_size: int = 1000,
                    kid_subsets: int = 100, isc_splits: int = 10, prc_neighborhood: int = 3,
                    rng_seed: int = 2020, fid_layer: str | None = None, progress: bool = True) -> dict:
    """FID, IS, KID, precision/recall of ``samples`` against ``ref``, by torch-fidelity's functions.

    ``samples``: an image folder, a list of image files, or a uint8 tensor (N, 3, H, W).
    ``ref``: see :func:`varkit.eval.stats.open_reference`. ``labels`` (or class ids parsed from
    ``*_c{class}.png`` names) add accuracy and per-class accuracy with ``features="digits"``.
    KID's subset size is reduced to the smaller set when needed, IS splits to N/2.
    Returns a flat dict of metrics plus ``settings`` (what was actually used).
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    unknown = set(metrics) - set(ALL_METRICS)
    metrics = [m for m in ALL_METRICS if m in set(metrics)]
    if unknown or not metrics:
        raise InvalidArgumentError(f"metrics must be a non-empty subset of {ALL_METRICS}")
    if isinstance(samples, (str, os.PathLike)):
        samples = S.list_images(samples, "samples folder")
    n = len(samples)
    S.check_count(n, 2, "the samples", "FID (a covariance)")
    if labels is None and isinstance(samples, list):
        parsed = [sample_label(f) for f in samples]
        labels = parsed if all(p is not None for p in parsed) else None
    reference = ref if isinstance(ref, S.Reference) else S.open_reference(ref)
    need_ref = max(2, prc_neighborhood + 1 if "prc" in metrics else 2)
    if reference.n or reference.kind != "adm-npz":
        S.check_count(reference.n, need_ref, f"reference {reference.source}",
                      f"FID with precision/recall (k={prc_neighborhood})" if "prc" in metrics else "FID")
    ext = extractor or S.load_extractor(features, inception_weights, device, fid_layer)
    batch_size = batch_size or S.default_batch_size(ext.name)

    t0 = time.perf_counter()
    gen = S.extract_features(samples, ext, batch_size, progress, "samples")
    S.reference_stats(reference, ext, batch_size, progress)
    t_feat = time.perf_counter() - t0
    fgen = gen[ext.fid_layer]
    if reference.mu.shape[0] != fgen.shape[1]:
        raise InvalidArgumentError(
            f"reference {reference.source} has {reference.mu.shape[0]}-d statistics but {ext.name} features are "
            f"{fgen.shape[1]}-d; compute the reference with the same --features"
        )
    # IS with one image per split is always 1: keep at least 2 images per split for small N
    kw = dict(verbose=False, rng_seed=rng_seed, samples_shuffle=True, isc_splits=max(1, min(isc_splits, n // 2)),
              kid_subsets=kid_subsets, prc_neighborhood=prc_neighborhood, prc_batch_size=10000,
              save_cpu_ram=max(n, reference.n) > 20000)
    out: dict[str, Any] = {"num_samples": n, "num_ref": reference.n}
    skipped: dict[str, str] = {}
    if "fid" in metrics:
        s_gen, s_ref = _same_dtype(S.fid_statistics(fgen), {"mu": reference.mu, "sigma": reference.sigma})
        out["fid"] = fid_statistics_to_metric(s_gen, s_ref, False)["frechet_inception_distance"]
    if "isc" in metrics:
        r = isc_features_to_metric(gen[ext.isc_layer], kw["isc_splits"], True, rng_seed)
        out["isc_mean"], out["isc_std"] = r["inception_score_mean"], r["inception_score_std"]
    fref = reference.features
    for m in ("kid", "prc"):
        if m in metrics and fref is None:
            skipped[m] = "the reference has no images or features (only mu/sigma)"
    kid_scale = None
    if "kid" in metrics and fref is not None:
        kw["kid_subset_size"] = min(kid_subset_size, n, len(fref))
        fg, fr = fgen, fref
        if ext.name == "digits":
            # KID's kernel (x.y/d + 1)^3 assumes Inception-sized features (x.y/d ~ 0.3); the digits CNN's are ~8x
            # larger per dimension (x.y/d ~ 32), so the kernel reached ~4e4 and KID printed -146 to -3780 (noise).
            # Both sets are divided by the real digits' RMS feature (one fixed number): real vs real ~0, noise ~2.4.
            from .features import kid_feature_scale

            kid_scale = kid_feature_scale()
            fg, fr = fgen / kid_scale, fref / kid_scale
        r = kid_features_to_metric(fg, fr, **kw)
        out["kid_mean"], out["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
    if "prc" in metrics and fref is not None:
        if n <= prc_neighborhood:
            skipped["prc"] = f"needs more than k={prc_neighborhood} samples"
        else:
            dev = ext.device
            r = prc_features_to_metric(fgen.to(dev), fref.to(dev), **kw)
            out["precision"], out["recall"], out["f_score"] = r["precision"], r["recall"], r["f_score"]
    if ext.name == "digits" and labels is not None:
        from .features import per_class_accuracy

        out["accuracy"], out["per_class_accuracy"] = per_class_accuracy(gen[ext.isc_layer], labels)
    out["seconds"] = {"features": round(t_feat, 3), "total": round(time.perf_counter() - t0, 3)}
    out["settings"] = {
        "features": ext.info, "fid_layer": ext.fid_layer, "isc_layer": ext.isc_layer,
        "isc_splits": kw["isc_splits"], "kid_subsets": kid_subsets, "kid_subset_size": kw.get("kid_subset_size"),
        "kid_feature_scale": kid_scale,
        "prc_neighborhood": prc_neighborhood, "rng_seed": rng_seed, "ref": reference.describe(),
        "skipped": skipped,
    }
    return out


def versions() -> dict:
    import torchvision
    import torch_fidelity

    from .. import __version__

    return {"varkit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def format_table(result: dict) -> str:
    """A plain-text table of the metrics in ``result`` (from :func:`compute_metrics` / :func:`eval_fid`)."""
    m = result.get("metrics", result)
    settings = result.get("metric_settings") or m.get("settings") or {}
    feats = (result.get("features") or settings.get("features") or {}).get("name", "")
    rows = []

    def add(name, key, std=None, fmt="{:.4f}"):
        if m.get(key) is not None:
            v = fmt.format(0.0 if -1e-4 < m[key] <= 0 else m[key]) + (f" ± {fmt.format(m[std])}" if std and m.get(std) is not None else "")
            rows.append((name, v))

    tag = " (digits features)" if feats == "digits" else ""
    add("FID" + tag, "fid")
    add("IS" + tag, "isc_mean", "isc_std", "{:.3f}")
    add("KID" + tag, "kid_mean", "kid_std", "{:.5f}")
    add("precision", "precision")
    add("recall", "recall")
    add("accuracy", "accuracy")
    rows.append(("samples / reference", f"{m.get('num_samples')} / {m.get('num_ref')}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 16}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    for k, why in (settings.get("skipped") or {}).items():
        lines.append(f"({k} skipped: {why})")
    return "\n".join(lines)


def generator_dtype(pipe) -> str:
    """The dtype name of ``pipe``'s generator weights (float32 for pipelines without a generator module)."""
    try:
        return str(next(pipe.generator.parameters()).dtype).replace("torch.", "")
    except (AttributeError, StopIteration, TypeError):
        return "float32"


def _settings_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def eval_fid(model, *, ref: str | os.PathLike | None = None, num_samples: int | None = None,
             sampler: str | None = None, cfg: float | None = None, cfg_schedule: str | None = None,
             top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
             head_steps: int | None = None, num_iter: int | None = None, guidance_interval: float | None = None,
             sampler_kwargs: dict | None = None, seed: int = 0, batch_size: int = 32,
             out_dir: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
             features: str = "inception", inception_weights: str | os.PathLike | None = None,
             metrics: Sequence[str] = ALL_METRICS, device: str | None = None, metric_batch_size: int | None = None,
             kid_subset_size: int = 1000, fid_layer: str | None = None, progress: bool = True,
             print_table: bool = True, preset: str | None = None, image_size: int | None = None,
             dtype: str | torch.dtype | None = None, compile: bool = False, prepack: bool = False,
             export_npz_path: str | os.PathLike | None = None) -> dict | None:
    """Generate ``num_samples`` samples of ``model`` and score them; write and return the JSON record.

    ``model``: a bundled name, a pipeline folder, or a pipeline object. Unset sampling settings
    come from the model's published defaults (``pipe.defaults``); ``num_samples`` defaults to
    the model's FID count (50 per class). Under torchrun every rank generates its share, all meet at a
    ``torch.distributed`` barrier; rank 0 computes the metrics and returns the record, other ranks None.
    ``preset``: a named settings preset of the model (``demo``). ``image_size``: evaluate at this size
    (default: the protocol's). ``dtype``/``compile``/``prepack``: as :func:`varkit.load_pipeline`.
    ``export_npz_path``: also write the samples as the ADM evaluator's ``arr_0`` batch.
    """
    rank, world = dist_info()
    if features not in S.FEATURES:
        raise InvalidArgumentError(f"unknown --features {features!r}; choose one of {', '.join(S.FEATURES)}")
    if ref is None:
        if features != "digits":
            raise InvalidArgumentError(
                "--ref is required with Inception features: an image folder, a STATS.npz from `varkit eval stats`, "
                "or an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz"
            )
        ref = "digits"
    if num_samples is not None and num_samples < 2:
        raise InvalidArgumentError(f"--num-samples must be at least 2 (FID needs a covariance), got {num_samples}")
    # fail fast, before any generation: weights and reference must be usable
    weights = S.find_inception_weights(inception_weights) if features == "inception" else None
    if rank == 0:
        reference = S.open_reference(ref)  # (an ADM batch's images are loaded here, on rank 0 only)
    elif str(ref) != "digits" and not Path(ref).exists():
        raise DataError(f"reference not found: {ref}")

    if isinstance(model, (str, os.PathLike)):
        from ..pipeline import load_pipeline

        model_name = str(Path(model).resolve()) if Path(model).exists() else str(model)
        if device is None and world > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
        pipe = load_pipeline(model, device=device or "auto", dtype=dtype, compile=compile, prepack=prepack)
    else:
        pipe, model_name = model, getattr(model, "name", "") or type(model).__name__
    if export_npz_path is not None and Path(export_npz_path).suffix != ".npz":
        raise InvalidArgumentError(f"--export-npz must end in .npz (the ADM evaluator's format), got {export_npz_path}")
    owns_group = init_distributed(world, getattr(pipe, "device", None))
    settings = resolve_settings(pipe, sampler, preset=preset, image_size=image_size, cfg=cfg, cfg_schedule=cfg_schedule, top_k=top_k, top_p=top_p,
                                temperature=temperature, head_steps=head_steps, num_iter=num_iter,
                                guidance_interval=guidance_interval)
    n = int(num_samples) if num_samples is not None else default_num_samples(pipe)
    if n < 2:
        raise InvalidArgumentError(f"--num-samples must be at least 2 (FID needs a covariance), got {n}")
    sampler_kwargs = dict(sampler_kwargs or {})
    if out_dir is None:
        dt = {} if generator_dtype(pipe) == "float32" else {"dtype": generator_dtype(pipe)}  # fp32 tags unchanged
        tag = _settings_hash({"model": model_name, "seed": seed, **settings, **sampler_kwargs, **dt})
        out_dir = Path("eval") / f"{Path(model_name).name}-{settings['sampler']}-{tag}"
    out_dir = Path(out_dir)
    gen_info = generate_samples(pipe, out_dir, n, settings=settings, seed=seed, batch_size=batch_size,
                                sampler_kwargs=sampler_kwargs, model=model_name, rank=rank, world_size=world,
                                progress=progress)
    barrier()
    if rank != 0:
        if owns_group:
            torch.distributed.destroy_process_group()
        return None
    files = sample_files(out_dir, n, int(pipe.num_classes))
    check_samples(files)
    if export_npz_path is not None:
        export_npz(files, export_npz_path, progress)
    labels = [i % int(pipe.num_classes) for i in range(n)]
    res = compute_metrics(files, reference, features=features, inception_weights=weights, labels=labels,
                          metrics=metrics, device=device, batch_size=metric_batch_size,
                          kid_subset_size=kid_subset_size, fid_layer=fid_layer, progress=progress)
    record = {
        "model": model_name, "model_defaults": dict(getattr(pipe, "defaults", None) or {}),
        **settings, "sampler_kwargs": sampler_kwargs, "dtype": generator_dtype(pipe),
        "seed": seed, "image_seeds": f"seed * {SEED_STRIDE} + index (index 0..{n - 1})",
        "labels": "index % num_classes (balanced)", "num_classes": int(pipe.num_classes),
        "num_samples": n, "batch_size": batch_size, "world_size": world, "samples_dir": str(out_dir.resolve()),
        "ref": res["settings"]["ref"], "features": res["settings"]["features"],
        "metrics": {k: v for k, v in res.items() if k not in ("settings", "seconds")},
        "metric_settings": {k: v for k, v in res["settings"].items() if k not in ("ref", "features")},
        "seconds": {"generation_this_rank": round(gen_info["seconds"], 3), "generated_this_rank": gen_info["generated"],
                    **res["seconds"]},
        "versions": versions(),
    }
    if export_npz_path is not None:
        record["export_npz"] = str(Path(export_npz_path).resolve())
    if owns_group:
        torch.distributed.destroy_process_group()
    json_path = Path(json_path) if json_path is not None else out_dir / f"metrics_{features}.json"
    write_json(json_path, record)
    record["json"] = str(json_path)
    if print_table:
        print(format_table(record))
        print(f"wrote {json_path}")
    return record


def eval_folder(samples: str | os.PathLike, ref: str | os.PathLike | None = None, *, features: str = "inception",
                json_path: str | os.PathLike | None = None, print_table: bool = True, **kwargs) -> dict:
    """Score an existing folder of images (no generation); optionally write the JSON record."""
    if ref is None:
        if features != "digits":
            raise InvalidArgumentError("--ref is required with Inception features")
        ref = "digits"
    res = compute_metrics(samples, ref, features=features, **kwargs)
    record = {"samples_dir": str(Path(samples).resolve()), "ref": res["settings"]["ref"],
              "features": res["settings"]["features"],
              "metrics": {k: v for k, v in res.items() if k not in ("settings", "seconds")},
              "metric_settings": {k: v for k, v in res["settings"].items() if k not in ("ref", "features")},
              "seconds": res["seconds"], "versions": versions()}
    if json_path is not None:
        write_json(json_path, record)
        record["json"] = str(json_path)
    if print_table:
        print(format_table(record))
    return record
