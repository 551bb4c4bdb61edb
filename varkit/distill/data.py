"""``varkit distill data``: (noise, tokens, class) pairs made by a teacher through DD1's flow map, in shards.

Sample i has class ``i % num_classes`` and noise drawn from its own generator seeded from (seed, i,
``NOISE_STREAM``), so a shard is a function of the teacher and the settings alone: an interrupted run resumes by
skipping the shards already written (each is written to a temporary name and renamed), and ranks of a torchrun
launch (``RANK``/``WORLD_SIZE``) split the shards between them (shard j goes to rank j mod world). The folder's
``data.json`` records the settings; a run with other settings into the same folder is refused. The teacher
samples under its default sampling settings (its CFG, temperature, top-k/top-p): the student learns that
distribution, guidance included.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InvalidArgumentError
from ..io import atomic_path, write_json
from .flow import DEFAULT_FLOW_STEPS

MANIFEST = "data.json"
FORMAT = "varkit-dd-data"
NOISE_STREAM = 0xDD1DA7A  # a third seed word: DD noise never shares a generation or evaluation seed


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def weights_fingerprint(module: torch.nn.Module) -> float:
    """A number that changes with any weight: ties a data folder and a training run to one teacher."""
    with torch.no_grad():
        return float(sum(p.detach().cpu().double().square().sum() + p.detach().cpu().double().sum()
                         for p in module.parameters()))


def same_setting(a: Any, b: Any) -> bool:
    """Manifest values equal; floats (the fingerprint) to 1e-9 relative, since a sum's order, and so its last
    bits, may differ between CPUs."""
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)
    return a == b


def sample_noise(indices: range | list[int], seed: int, num_tokens: int, dim: int) -> torch.Tensor:
    """(n, N, d) standard normals, sample i's from its own generator seeded from (seed, i, NOISE_STREAM)."""
    out = []
    for i in indices:
        s = int(np.random.SeedSequence([int(seed), int(i), NOISE_STREAM]).generate_state(1, np.uint64)[0] >> 1)
        out.append(torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(s)))
    return torch.stack(out) if out else torch.zeros(0, num_tokens, dim)


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise InvalidArgumentError("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    return rank, world


def _manifest(pipe, teacher: str, num: int, shard_size: int, seed: int, flow_steps: int) -> dict[str, Any]:
    from ..models.dd import tokenizer_codebook

    gen = pipe.generator
    params = pipe.sampling_params()
    return {
        "format": FORMAT, "version": 1, "teacher": str(teacher), "teacher_fingerprint": weights_fingerprint(gen),
        "teacher_class": type(gen).__name__, "layout": gen.layout.kind, "num_tokens": gen.layout.num_tokens,
        "vocab_size": gen.vocab_size, "codebook_dim": int(tokenizer_codebook(pipe.tokenizer).shape[1]),
        "num_classes": gen.num_classes, "num": num, "shard_size": shard_size,
        "num_shards": -(-num // shard_size), "seed": seed, "flow_steps": flow_steps,
        "sampling": {k: getattr(params, k) for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p")},
    }


def make_distill_data(teacher: str | Path, num: int, out: str | Path, batch_size: int = 64, shard_size: int = 256,
                      seed: int = 0, flow_steps: int = DEFAULT_FLOW_STEPS, device: str | None = None,
                      progress: bool = True) -> Path:
    """Write ``num`` (noise, tokens, class) samples of ``teacher`` (bundled name or pipeline folder) into ``out``;
    this rank's missing shards only. Returns ``out``."""
    from tqdm.auto import tqdm

    from ..device import resolve_device
    from ..models.dd import check_teacher, tokenizer_codebook
    from ..pipeline import load_pipeline
    from .flow import teacher_flow

    for name, v, lo in (("--num", num, 1), ("--batch-size", batch_size, 1), ("--shard-size", shard_size, 1),
                        ("--flow-steps", flow_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {v!r}")
    rank, world = dist_env()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    pipe = load_pipeline(teacher, device=dev)
    check_teacher(pipe.generator)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out} exists and is not a folder")
    manifest = _manifest(pipe, str(teacher), num, shard_size, seed, flow_steps)
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(out)
        diff = sorted(k for k in manifest if k != "teacher" and not same_setting(old.get(k), manifest[k]))
        if diff:
            raise DataError(
                f"{out} holds DD data made with other settings ({', '.join(diff)}); "
                "choose a new --out folder or rerun with the options it was started with")
    else:
        write_json(path, manifest)  # ranks starting together all write the same content, atomically
    gen, params = pipe.generator, pipe.sampling_params()
    codebook = tokenizer_codebook(pipe.tokenizer).to(dev)
    N, d, C = gen.layout.num_tokens, codebook.shape[1], gen.num_classes
    mine = [j for j in range(manifest["num_shards"]) if j % world == rank and not (out / shard_name(j)).is_file()]
    total = sum(min(shard_size, num - j * shard_size) for j in mine)
    bar = tqdm(total=total, disable=not progress, desc=f"distill data (rank {rank}/{world})", unit="sample")
    with torch.inference_mode():
        for j in mine:
            lo, hi = j * shard_size, min((j + 1) * shard_size, num)
            noise_all, tok_all = [], []
            for b in range(lo, hi, batch_size):
                idx = range(b, min(b + batch_size, hi))
                noise = sample_noise(idx, seed, N, d)
                labels = torch.tensor([i % C for i in idx], device=dev)
                tokens, _ = teacher_flow(gen, labels, noise.to(dev), params, codebook, flow_steps)
                noise_all.append(noise)
                tok_all.append(tokens.cpu())
                bar.update(len(idx))
            _write_shard(out / shard_name(j), torch.cat(noise_all), torch.cat(tok_all),
                         torch.tensor([i % C for i in range(lo, hi)]))
    bar.close()
    return out


def _write_shard(path: Path, noise: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"noise": noise.float().contiguous(), "tokens": tokens.to(torch.int32).contiguous(),
                   "labels": labels.to(torch.int64).contiguous()}, str(tmp))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``data.json`` of a DD data folder, with one clear error when there is none."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"DD data folder not found: {folder} (make one with `varkit distill data`)")
    path = folder / MANIFEST
    if not path.is_file():
        what = "is empty" if not any(folder.iterdir()) else f"has no {MANIFEST}"
        raise DataError(f"{folder} {what}: not a `varkit distill data` folder (make one with `varkit distill data --out {folder}`)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; the folder is corrupt, make it again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path} is not a DD data manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    return m


def load_distill_data(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(noise (n, N, d) float32, tokens (n, N) long, labels (n,) long, manifest) of a complete data folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    m = read_manifest(folder)
    missing = [j for j in range(m["num_shards"]) if not (folder / shard_name(j)).is_file()]
    if missing:
        raise DataError(
            f"{folder} is partial: {m['num_shards'] - len(missing)} of {m['num_shards']} shards present "
            f"(missing {shard_name(missing[0])}{' …' if len(missing) > 1 else ''}); rerun `varkit distill data` "
            "with the same options to finish it")
    noise, tokens, labels = [], [], []
    for j in range(m["num_shards"]):
        path = folder / shard_name(j)
        try:
            s = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise DataError(f"cannot read {path}: {exc}; delete it and rerun `varkit distill data` to remake it") from None
        n = min(m["shard_size"], m["num"] - j * m["shard_size"])
        want = {"noise": (n, m["num_tokens"], m["codebook_dim"]), "tokens": (n, m["num_tokens"]), "labels": (n,)}
        if set(s) != set(want) or any(tuple(s[k].shape) != v for k, v in want.items()):
            raise DataError(f"{path} does not hold {n} samples of this folder's shape; delete it and rerun `varkit distill data`")
        noise.append(s["noise"])
        tokens.append(s["tokens"].long())
        labels.append(s["labels"].long())
    return torch.cat(noise), torch.cat(tokens), torch.cat(labels), m
