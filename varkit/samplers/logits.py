"""Turning logits into tokens: CFG mixing, temperature, top-k, top-p, per-image randomness.

Every sampler uses these functions, so "the target distribution" means the same thing for
ancestral sampling and for the speculative samplers that must reproduce it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

from ..errors import InvalidArgumentError
from .random import image_generators, uniforms  # noqa: F401  (re-exported: the one source of per-image draws)
from .topk import top_k

CFG_SCHEDULES = ("constant", "linear", "var")


@dataclass
class SamplingParams:
    """How logits become a distribution. ``None`` / 0 disable top-k, ``None`` / 1 disables top-p.

    CFG mixes ``uncond + w·(cond − uncond)`` with a weight ``w`` per layout step:
    ``constant``: w = cfg; ``linear``: w ramps from 1 at the first step to cfg at the last;
    ``var``: w = 1 + cfg·s/(S−1), VAR's ``(1+t)·cond − t·uncond`` ramp. The ramp variable is the
    layout's :meth:`~varkit.layout.Layout.progress` (s/(S−1); for MAR's ``sets``, the share of tokens
    known after the step, so ``linear`` is MAR's schedule there).

    Continuous heads read ``head_steps`` (denoising steps per token; None: the head's default; ``"50:5"``
    anneals them linearly from 50 at the first AR step to 5 at the last, DiSA's training-free schedule) and
    ``temperature`` (MAR: scales the per-step noise only). ``num_iter`` sets the step count of layouts
    whose steps are a sampling choice (``sets``); None keeps the model's default. ``guidance_interval``
    (flow heads, FlowAR): CFG applies to the velocity only while the ODE time t <= it, in [0, 1]; None
    keeps the model's default.
    """

    cfg: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    head_steps: int | tuple[int, int] | None = None  # (start, end): annealed over the AR steps (DiSA)
    num_iter: int | None = None
    guidance_interval: float | None = None

    def __post_init__(self) -> None:
        for name in ("cfg", "temperature", "top_p"):  # numbers, finite: a string, NaN or inf never reaches a step
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise InvalidArgumentError(f"{name} must be a finite number, got {v!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)):
            raise InvalidArgumentError(f"top_k must be an integer (0 = off), got {self.top_k!r}")
        if self.cfg is None or self.cfg < 0:
            raise InvalidArgumentError(f"cfg must be >= 0 (1 = no guidance), got {self.cfg}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise InvalidArgumentError(
                f"unknown cfg schedule {self.cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}"
            )
        if self.temperature is None or not self.temperature > 0:
            raise InvalidArgumentError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.head_steps, str):
            self.head_steps = parse_head_steps(self.head_steps)
        elif isinstance(self.head_steps, list):  # a schedule read back from a model folder's JSON defaults
            self.head_steps = tuple(self.head_steps)
        v = self.num_iter
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InvalidArgumentError(f"num_iter must be an integer >= 1, got {v!r}")
        v = self.head_steps
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1) and not (
                isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v)):
            raise InvalidArgumentError(f"head_steps must be an integer >= 1 or 'START:END' (annealed), got {v!r}")
        g = self.guidance_interval
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1):
            raise InvalidArgumentError(f"guidance_interval must be in [0, 1] (CFG applies while t <= it), got {g!r}")

    def at_step(self, step: int, num_steps: int) -> "SamplingParams":
        """These settings at AR step ``step`` of ``num_steps``: an annealed ``head_steps`` resolved to its integer."""
        if not isinstance(self.head_steps, tuple):
            return self
        a, b = self.head_steps
        frac = step / (num_steps - 1) if num_steps > 1 else 0.0
        return replace(self, head_steps=max(1, round(a + (b - a) * frac)))

    def guidance(self, step: int, num_steps: int) -> float:
        """CFG weight at layout step ``step`` of ``num_steps`` (a fixed-order layout)."""
        return self.guidance_at(step / (num_steps - 1) if num_steps > 1 else 1.0)

    def guidance_at(self, ramp: float) -> float:
        """CFG weight at decoding progress ``ramp`` in [0, 1] (see :meth:`Layout.progress`)."""
        if self.cfg_schedule == "linear":
            return 1.0 + (self.cfg - 1.0) * ramp
        if self.cfg_schedule == "var":
            return 1.0 + self.cfg * ramp
        return self.cfg

    def uses_cfg(self, num_steps: int) -> bool:
        """Whether any step needs the unconditional branch."""
        return any(self.guidance(s, num_steps) != 1.0 for s in range(num_steps))

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


def parse_head_steps(text: str) -> int | tuple[int, int]:
    """``"100"`` → 100; ``"50:5"`` → (50, 5), head steps annealed from 50 to 5 over the AR steps."""
    parts = text.strip().split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or any(n < 1 for n in nums):
        raise InvalidArgumentError(f"head_steps must be an integer >= 1 or 'START:END' like '50:5', got {text!r}")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


def mix_cfg(logits: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Rows [0:B] conditional, [B:2B] unconditional → ``u + w·(c − u)`` (B rows).

    ``weight``: a number, or one weight per position (a tensor broadcasting against (B, n, ...)).
    """
    cond, uncond = logits.chunk(2, dim=0)
    guided = cond - uncond  # then in place: the same three roundings as uncond + (cond - uncond) * weight, one tensor
    if torch.is_tensor(weight) and (not _fits(weight.shape, guided.shape)
                                    or torch.result_type(guided, weight) != guided.dtype or weight.requires_grad):
        return uncond + guided * weight  # a weight that widens or promotes the result, or needs its grad: out of place
    return guided.mul_(weight).add_(uncond)


def _fits(shape: torch.Size, into: torch.Size) -> bool:
    """Whether ``shape`` broadcasts against ``into`` without widening it (torch.broadcast_shapes would import sympy,
    which ``generate`` never loads)."""
    return len(shape) <= len(into) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(into)))


def _kept(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled logits of the kept candidates, sorted descending, and their vocabulary ids.

    With top-k only the k best are sorted (no full-vocabulary sort); ids is None when the
    candidates are the whole vocabulary in its own order (no top-k, no top-p).
    """
    if p.temperature != 1:  # x / 1 is x: no copy of the logits at the default temperature
        logits = logits / p.temperature
    V = logits.shape[-1]
    k = p.top_k if p.top_k and p.top_k < V else None
    top_p = p.top_p if p.top_p is not None and p.top_p < 1 else None
    if k is not None:
        vals, ids = top_k(logits, k)
    elif top_p is not None:
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        return logits, None
    if top_p is not None:
        probs = vals.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each candidate
        vals = vals.masked_fill(before >= top_p, float("-inf"))
    return vals, ids


def processed_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The target distribution over the full vocabulary (zeros outside top-k/top-p)."""
    vals, ids = _kept(logits, p)
    probs = vals.softmax(-1)
    if ids is None:
        return probs
    return torch.zeros_like(logits).scatter_(-1, ids, probs)


def sample_logits(logits: torch.Tensor, p: SamplingParams, u: torch.Tensor | None) -> torch.Tensor:
    """Draw tokens (…) from logits (…, V) with uniforms ``u`` (…) by inverse CDF; top_k=1 is argmax."""
    if p.greedy or u is None:
        return logits.argmax(-1)
    vals, ids = _kept(logits, p)
    j = sample_probs(vals.softmax(-1), u)
    return j if ids is None else ids.gather(-1, j[..., None]).squeeze(-1)


def sample_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from (possibly unnormalised) probs (…, V) with uniforms u (…)."""
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[..., -1])[..., None].contiguous())
    return j.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
