"""Samplers: pluggable decoding algorithms over any generator that fits the contract."""
from __future__ import annotations

from ..errors import InvalidArgumentError
from ..registry import Registry
from .ancestral import AncestralSampler
from .base import Sampler, SampleResult, SamplerStats
from .collaborative import CollaborativeSampler
from .distilled import DistilledSampler
from .logits import SamplingParams
from .sjd import SJDSampler
from .speculative import SpeculativeSampler

SAMPLERS: Registry[type[Sampler]] = Registry("sampler", InvalidArgumentError)
for _cls in (AncestralSampler, SJDSampler, SpeculativeSampler, DistilledSampler, CollaborativeSampler):
    SAMPLERS.register(_cls.name, _cls)


def get_sampler(name: str, params: SamplingParams | None = None, **options) -> Sampler:
    """Build sampler ``name`` with sampling ``params`` and its own ``options`` (e.g. window)."""
    cls = SAMPLERS.lookup(name)
    try:
        return cls(params, **options)
    except TypeError:
        raise InvalidArgumentError(
            f"sampler {name!r} does not take option(s) {sorted(options)}"
        ) from None


__all__ = ["SAMPLERS", "get_sampler", "Sampler", "SampleResult", "SamplerStats", "SamplingParams", "AncestralSampler", "SJDSampler"]
