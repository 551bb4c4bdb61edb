"""Samplers: pluggable decoding algorithms over any generator that fits the contract."""
from __future__ import annotations

from ..errors import InvalidArgumentError
from ..registry import Registry
from .ancestral import AncestralSampler
from .base import Sampler, SampleResult, SamplerStats
from .collaborative import CollaborativeSampler
from .cspd import CSpDSampler
from .distilled import DistilledSampler
from .logits import SamplingParams
from .sjd import SJDSampler
from .speculative import SpeculativeSampler

SAMPLERS: Registry[type[Sampler]] = Registry("sampler", InvalidArgumentError)
for _cls in (AncestralSampler, SJDSampler, SpeculativeSampler, DistilledSampler, CollaborativeSampler, CSpDSampler):
    SAMPLERS.register(_cls.name, _cls)


def get_sampler(name: str, params: SamplingParams | None = None, **options) -> Sampler:
    """Build sampler ``name`` with sampling ``params`` and its own ``options`` (e.g. window)."""
    cls = SAMPLERS.lookup(name)
    accepted = sampler_options(cls)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:  # name only the wrong ones, and what it does take
        raise InvalidArgumentError(f"sampler {name!r} does not take option(s) {unknown}; its options: "
                                   f"{', '.join(sorted(accepted)) or 'none'}")
    try:
        return cls(params, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"sampler {name!r}: bad option(s) {sorted(options)}: {exc}") from None


def sampler_options(cls: type[Sampler]) -> set[str] | None:
    """The keyword options a sampler class takes besides ``params`` (None: it takes any, ``**kwargs``)."""
    import inspect

    sig = inspect.signature(cls.__init__)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if n not in ("self", "params")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


__all__ = ["SAMPLERS", "get_sampler", "Sampler", "SampleResult", "SamplerStats", "SamplingParams", "AncestralSampler", "SJDSampler"]
