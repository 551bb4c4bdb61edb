"""Generation orders: which token positions exist and how they group into steps.

A generator is built on one layout; samplers read it. Tokens always travel in *layout
order*: the concatenation of the steps, each step's tokens in a fixed order. ``coords``
gives each token's (row, col, scale) so generators can place positional encodings and the
tokenizer can receive its id maps.

- ``raster``: one token a step, row-major (LlamaGen).
- ``scales``: one whole scale a step, coarse to fine (VAR, FlowAR).
- ``neighbors``: one anti-diagonal front a step, ordered by row (NAR).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidArgumentError


@dataclass
class Layout:
    """Step groups and coordinates of a token sequence.

    ``step_sizes[s]`` tokens form step s; ``coords[i] = (row, col, scale)`` of token i.
    ``scale_sizes[k] = (h, w)`` of each scale (one entry for single-grid layouts).
    """

    kind: str
    step_sizes: list[int]
    coords: torch.Tensor
    scale_sizes: list[tuple[int, int]]
    step_starts: list[int] = field(init=False)
    step_of: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        starts = [0]
        for n in self.step_sizes:
            starts.append(starts[-1] + n)
        self.step_starts = starts
        self.step_of = torch.repeat_interleave(
            torch.arange(len(self.step_sizes), device="cpu"), torch.tensor(self.step_sizes, device="cpu"),
            output_size=starts[-1],
        )
        if self.coords.shape[0] != self.num_tokens:
            raise ValueError("coords do not match the step sizes")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.step_starts[-1]

    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the final (finest) token grid."""
        return self.scale_sizes[-1]

    @property
    def single_token_steps(self) -> bool:
        return all(n == 1 for n in self.step_sizes)

    def step_slice(self, step: int, num_steps: int = 1) -> slice:
        """Positions of steps ``step .. step + num_steps - 1`` in layout order."""
        return slice(self.step_starts[step], self.step_starts[step + num_steps])

    # -- conversion to and from the tokenizer's id maps --------------------------------------
    def to_grids(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Layout-order tokens (B, N) → one (B, h, w) id map per scale."""
        B = tokens.shape[0]
        out = []
        for k, (h, w) in enumerate(self.scale_sizes):
            sel = (self.coords[:, 2] == k).nonzero().squeeze(1)
            grid = tokens.new_zeros(B, h * w)
            rc = self.coords[sel]
            grid[:, rc[:, 0] * w + rc[:, 1]] = tokens[:, sel.to(tokens.device)]
            out.append(grid.view(B, h, w))
        return out

    def from_grids(self, grids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One (B, h, w) id map per scale (or one map) → layout-order tokens (B, N)."""
        if isinstance(grids, torch.Tensor):
            grids = [grids]
        if len(grids) != len(self.scale_sizes):
            raise InvalidArgumentError(f"expected {len(self.scale_sizes)} id maps, got {len(grids)}")
        B = grids[0].shape[0]
        tokens = grids[0].new_zeros(B, self.num_tokens)
        for k, (h, w) in enumerate(self.scale_sizes):
            if tuple(grids[k].shape[1:]) != (h, w):
                raise InvalidArgumentError(
                    f"id map {k} has shape {tuple(grids[k].shape[1:])}, the layout needs {(h, w)}"
                )
            sel = (self.coords[:, 2] == k).nonzero().squeeze(1)
            rc = self.coords[sel]
            tokens[:, sel.to(tokens.device)] = grids[k].reshape(B, -1)[:, rc[:, 0] * w + rc[:, 1]]
        return tokens

    def to_tokenizer_ids(self, tokens: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """What the tokenizer's ``decode`` takes: one map, or a list of maps for multi-scale."""
        grids = self.to_grids(tokens)
        return grids[0] if len(grids) == 1 else grids

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale_sizes": [list(s) for s in self.scale_sizes]}


def raster(h: int, w: int | None = None) -> Layout:
    """One token a step in row-major order over an h×w grid."""
    w = h if w is None else w
    _check_grid(h, w)
    rows = torch.arange(h, device="cpu").repeat_interleave(w)
    cols = torch.arange(w, device="cpu").repeat(h)
    coords = torch.stack([rows, cols, torch.zeros_like(rows)], 1)
    return Layout("raster", [1] * (h * w), coords, [(h, w)])


def neighbors(h: int, w: int | None = None) -> Layout:
    """Fronts of equal Manhattan distance from the top-left token, each ordered by row.

    An n×n grid takes 2n−1 steps. NAR decodes this way.
    """
    w = h if w is None else w
    _check_grid(h, w)
    if h != w:
        raise InvalidArgumentError(f"the neighbors layout needs a square grid, got {h}×{w}")
    coords, sizes = [], []
    for d in range(h + w - 1):
        front = [(r, d - r, 0) for r in range(h) if 0 <= d - r < w]
        coords += front
        sizes.append(len(front))
    return Layout("neighbors", sizes, torch.tensor(coords, device="cpu"), [(h, w)])


def scales(patch_nums: list[int] | tuple[int, ...]) -> Layout:
    """One whole scale a step, coarse to fine; scale k is a row-major pn_k×pn_k map."""
    patch_nums = list(patch_nums)
    if not patch_nums or any(p < 1 for p in patch_nums) or patch_nums != sorted(set(patch_nums)):
        raise InvalidArgumentError(
            f"a scale schedule must be strictly increasing positive sizes, got {patch_nums}"
        )
    coords = []
    for k, p in enumerate(patch_nums):
        rows = torch.arange(p, device="cpu").repeat_interleave(p)
        cols = torch.arange(p, device="cpu").repeat(p)
        coords.append(torch.stack([rows, cols, torch.full_like(rows, k)], 1))
    return Layout("scales", [p * p for p in patch_nums], torch.cat(coords), [(p, p) for p in patch_nums])


def _check_grid(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise InvalidArgumentError(f"a token grid needs positive sides, got {h}×{w}")


def build_layout(kind: str, grid: tuple[int, int] | None = None, patch_nums=None) -> Layout:
    """Build a layout by name ("raster", "neighbors", "scales")."""
    if kind == "raster":
        return raster(*grid)
    if kind == "neighbors":
        return neighbors(*grid)
    if kind == "scales":
        return scales(patch_nums)
    raise InvalidArgumentError(f"unknown layout {kind!r}; choose raster, neighbors or scales")
