"""Per-image randomness: the one place samplers and heads draw uniforms, normals and orders from.

Image *i* owns a CPU ``torch.Generator`` seeded from ``(seed, i)`` (or from ``image_seeds[i]``), and
every draw is made image by image from it. An image's draws therefore never depend on the batch
size, on its position in the batch, or on the device, so the same seed gives the same image
whether it is sampled alone or among 64, discrete or continuous.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgumentError


MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes (and numpy's SeedSequence words)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2**64 - 1]; a one-line error for None, floats, bools, strings and out-of-range
    values (never silently truncated or wrapped)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise InvalidArgumentError(f"{name} must be an integer in [0, 2**64 - 1], got {seed!r}")
    return int(seed)


def image_generators(seed: int, count: int, image_seeds: list[int] | None = None) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded from (seed, index) or from ``image_seeds``."""
    if image_seeds is not None:
        if len(image_seeds) != count:
            raise InvalidArgumentError(f"got {len(image_seeds)} image_seeds for {count} images")
        seeds = [check_seed(s, "image_seeds entry") for s in image_seeds]
    else:
        seed = check_seed(seed)
        seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1) for i in range(count)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def to_device(draws: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """CPU draws moved to ``device``; to a GPU through pinned memory without waiting, so that the host keeps
    queueing decode steps while the GPU runs (a pageable copy would wait for every step queued before it)."""
    device = torch.device(device)
    if device.type == "cuda":
        draws = draws.pin_memory().to(device, dtype=dtype, non_blocking=True)
        return draws
    return draws.to(device=device, dtype=dtype)


def uniforms(gens: list[torch.Generator], n: int, device: torch.device) -> torch.Tensor:
    """(B, n) float64 uniforms, row b drawn from ``gens[b]``."""
    return to_device(torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens]), device)


class Randomness:
    """The per-image generators of one batch and the draws samplers and heads make from them."""

    def __init__(self, gens: list[torch.Generator], device: torch.device | str = "cpu"):
        self.gens = list(gens)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.gens)

    def subset(self, rows: list[int]) -> "Randomness":
        """The randomness of the images ``rows`` (speculative samplers draw for unfinished images only)."""
        return Randomness([self.gens[i] for i in rows], self.device)

    def uniforms(self, n: int) -> torch.Tensor:
        """(B, n) float64 uniforms in [0, 1)."""
        return uniforms(self.gens, n, self.device)

    def normals(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normals (drawn in float32 on the CPU, then cast and moved)."""
        return to_device(torch.stack([torch.randn(shape, generator=g) for g in self.gens]), self.device, dtype)

    def permutations(self, n: int) -> torch.Tensor:
        """(B, n) one random permutation of ``0..n-1`` per image (generation orders)."""
        return to_device(torch.stack([torch.randperm(n, generator=g) for g in self.gens]), self.device)
