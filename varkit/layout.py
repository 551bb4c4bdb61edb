"""Generation orders: which token positions exist and how they group into steps.

A generator is built on one layout; samplers read it. Tokens always travel in *layout
order*: the concatenation of the steps, each step's tokens in a fixed order. ``coords``
gives each token's (row, col, scale) so generators can place positional encodings and the
tokenizer can receive its id maps.

- ``raster``: one token a step, row-major (LlamaGen).
- ``scales``: one whole scale a step, coarse to fine (VAR, FlowAR).
- ``neighbors``: one anti-diagonal front a step, ordered by row (NAR).
- ``sets``: a random order per image, revealed in sets of growing size (MAR's cosine mask
  schedule); tokens are stored row-major and each step's positions come from the order.

Tokens may be ids (B, N) or vectors (B, N, D): every conversion keeps trailing dimensions.
"""
from __future__ import annotations

import math

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
    random_order: bool = False  # True: each image has its own order (``sets``); see :meth:`index`
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

    def progress(self, step: int) -> float:
        """How far decoding is after ``step``, in [0, 1]: what a ``linear`` CFG schedule ramps on.

        Fixed orders ramp by step (``step / (S-1)``: LlamaGen, VAR); ``sets`` by the share of tokens
        known once the step is done (MAR's ``(N - mask_len) / N``).
        """
        if self.kind == "sets":  # MAR counts at least one token as still masked, even after the last step
            return min(self.step_starts[step + 1], self.num_tokens - 1) / self.num_tokens
        return step / (self.num_steps - 1) if self.num_steps > 1 else 1.0

    # -- where a step's tokens are --------------------------------------------------------------
    def index(self, step: int, order: torch.Tensor | None = None) -> slice | torch.Tensor:
        """Storage positions of step ``step``: a slice for fixed orders; for random orders a (B, n)
        index from the per-image permutations ``order`` (B, N), sorted within the step (MAR
        gathers a step's tokens in grid order)."""
        sl = self.step_slice(step)
        if not self.random_order:
            return sl
        if order is None:
            raise InvalidArgumentError(f"the {self.kind} layout decodes in a random order per image: pass order=")
        return order[:, sl].sort(dim=1).values

    def read(self, tokens: torch.Tensor, step: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens (B, n, ...) of step ``step`` out of ``tokens`` (B, N, ...)."""
        idx = self.index(step, order)
        if isinstance(idx, slice):
            return tokens[:, idx]
        return tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], idx.to(tokens.device)]

    def write(self, tokens: torch.Tensor, step: int, values: torch.Tensor, order: torch.Tensor | None = None) -> None:
        """Store ``values`` (B, n, ...) as step ``step`` of ``tokens`` (B, N, ...), in place."""
        idx = self.index(step, order)
        if isinstance(idx, slice):
            tokens[:, idx] = values
        else:
            tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], idx.to(tokens.device)] = values

    # -- conversion to and from the tokenizer's id maps --------------------------------------
    def to_grids(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Layout-order tokens (B, N, ...) → one (B, h, w, ...) map per scale."""
        B, rest = tokens.shape[0], tuple(tokens.shape[2:])
        out = []
        for k, (h, w) in enumerate(self.scale_sizes):
            sel = (self.coords[:, 2] == k).nonzero().squeeze(1)
            grid = tokens.new_zeros(B, h * w, *rest)
            rc = self.coords[sel]
            grid[:, rc[:, 0] * w + rc[:, 1]] = tokens[:, sel.to(tokens.device)]
            out.append(grid.view(B, h, w, *rest))
        return out

    def from_grids(self, grids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One (B, h, w, ...) map per scale (or one map) → layout-order tokens (B, N, ...)."""
        if isinstance(grids, torch.Tensor):
            grids = [grids]
        if len(grids) != len(self.scale_sizes):
            raise InvalidArgumentError(f"expected {len(self.scale_sizes)} id maps, got {len(grids)}")
        B, rest = grids[0].shape[0], tuple(grids[0].shape[3:])
        tokens = grids[0].new_zeros(B, self.num_tokens, *rest)
        for k, (h, w) in enumerate(self.scale_sizes):
            if tuple(grids[k].shape[1:3]) != (h, w):
                raise InvalidArgumentError(
                    f"token map {k} has shape {tuple(grids[k].shape[1:3])}, the layout needs {(h, w)}"
                )
            sel = (self.coords[:, 2] == k).nonzero().squeeze(1)
            rc = self.coords[sel]
            tokens[:, sel.to(tokens.device)] = grids[k].reshape(B, h * w, *rest)[:, rc[:, 0] * w + rc[:, 1]]
        return tokens

    def to_tokenizer_ids(self, tokens: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """What the tokenizer's ``decode`` takes: one map, or a list of maps for multi-scale."""
        grids = self.to_grids(tokens)
        return grids[0] if len(grids) == 1 else grids

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale_sizes": [list(s) for s in self.scale_sizes]}


def mask_schedule(num_tokens: int, num_iter: int) -> list[int]:
    """Tokens revealed at each of ``num_iter`` steps under MAR's (MaskGIT's) cosine schedule.

    After step k, ``floor(N·cos(π/2·(k+1)/num_iter))`` tokens stay masked, clamped so that every
    step reveals at least one and leaves at least one; the last step reveals the rest.
    """
    if not 1 <= num_iter <= num_tokens:
        raise InvalidArgumentError(f"num_iter must be in 1..{num_tokens} (the token count), got {num_iter}")
    sizes, masked = [], num_tokens
    for k in range(num_iter):
        if k == num_iter - 1:
            sizes.append(masked)
            break
        keep = math.floor(num_tokens * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
        keep = max(1, min(masked - 1, keep))
        sizes.append(masked - keep)
        masked = keep
    return sizes


def sets(h: int, w: int | None = None, num_iter: int = 64) -> Layout:
    """Random per-image order over an h×w grid, revealed by MAR's cosine schedule in ``num_iter`` steps.

    Tokens are stored row-major; :meth:`Layout.index` maps a step to each image's positions.
    """
    w = h if w is None else w
    _check_grid(h, w)
    rows = torch.arange(h, device="cpu").repeat_interleave(w)
    cols = torch.arange(w, device="cpu").repeat(h)
    coords = torch.stack([rows, cols, torch.zeros_like(rows)], 1)
    return Layout("sets", mask_schedule(h * w, num_iter), coords, [(h, w)], random_order=True)


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


def build_layout(kind: str, grid: tuple[int, int] | None = None, patch_nums=None, num_iter: int = 64) -> Layout:
    """Build a layout by name ("raster", "neighbors", "scales", "sets")."""
    if kind == "sets":
        return sets(*grid, num_iter=num_iter)
    if kind == "raster":
        return raster(*grid)
    if kind == "neighbors":
        return neighbors(*grid)
    if kind == "scales":
        return scales(patch_nums)
    raise InvalidArgumentError(f"unknown layout {kind!r}; choose raster, neighbors, scales or sets")
