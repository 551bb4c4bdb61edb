"""Raster decoding with the KV cache vs. the same model re-encoding its prefix every step."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..models.base import Generator
from ..samplers import SamplingParams, get_sampler
from ..samplers.logits import image_generators, mix_cfg, sample_logits, uniforms
from .report import peak_rss_mb, timed

if TYPE_CHECKING:
    from .floor import HostReadProbe


@torch.inference_mode()
def decode_without_cache(gen: Generator, cond: torch.Tensor, params: SamplingParams, gens, steps: int | None = None) -> torch.Tensor:
    """Sample like the ancestral sampler, but re-run the whole prefix at every step (no KV cache).

    Only for layouts with one token a step. ``steps`` stops early (for timing).
    """
    n = gen.layout.num_tokens if steps is None else steps
    cfg = params.uses_cfg(gen.layout.num_steps)
    c = torch.cat([cond, gen.null_condition(cond)]) if cfg else cond
    tokens = torch.zeros(cond.shape[0], gen.layout.num_tokens, dtype=torch.long, device=cond.device)
    for i in range(n):
        t = torch.cat([tokens, tokens]) if cfg else tokens
        # teacher forcing over tokens[:, :i] (+ one ignored slot) gives the logits of token i
        logits = gen.teacher_forcing_logits(c, t[:, : i + 1])[:, i : i + 1]
        if cfg:
            logits = mix_cfg(logits, params.guidance(i, gen.layout.num_steps))
        u = None if params.greedy else uniforms(gens, 1, logits.device)
        tokens[:, i : i + 1] = sample_logits(logits, params, u)
    return tokens[:, :n]


def bench_decode(gen: Generator, name: str, batch: int, params: SamplingParams, nocache_steps: int,
                 repeats: int = 1, probe: HostReadProbe | None = None) -> list[dict]:
    """Rows: cached decode over the whole grid, uncached decode over ``nocache_steps`` tokens; ``wall_s`` and
    ``cpu_s`` (process CPU seconds, mean over ``repeats``) of the whole run. ``probe``: the host's read rate,
    measured right before each mode's timed run and kept as the row's ``host_read_GBps``."""
    dev = next(gen.parameters()).device
    cond = torch.arange(batch, device=dev) % gen.num_classes
    gens = image_generators(0, batch)
    sampler = get_sampler("ancestral", params)

    def read_rate(mode: str) -> dict[str, float]:
        if probe is None:
            return {}
        probe(mode)
        return probe.row_fields(mode)

    read = read_rate("kv-cache")
    c0 = time.process_time()
    res, t_cache = timed(lambda: sampler.sample(gen, cond, gens), repeats=repeats, sync=dev.type == "cuda")
    cpu_cache = (time.process_time() - c0) / repeats
    n = gen.layout.num_tokens
    rows = [{"model": name, "mode": "kv-cache", "batch": batch, "tokens": n, "wall_s": t_cache, "cpu_s": cpu_cache,
             "tokens_per_s": batch * n / t_cache, "ms_per_step": 1000 * t_cache / n,
             "forward_passes": res.stats.forward_passes, "cache_bytes": res.stats.cache_bytes,
             "peak_rss_mb": peak_rss_mb(), **read}]
    read = read_rate("no-cache")
    c0 = time.process_time()
    _, t_nc = timed(lambda: decode_without_cache(gen, cond, params, gens, nocache_steps), sync=dev.type == "cuda")
    cpu_nc = time.process_time() - c0
    rows.append({"model": name, "mode": "no-cache", "batch": batch, "tokens": nocache_steps, "wall_s": t_nc, "cpu_s": cpu_nc,
                 "tokens_per_s": batch * nocache_steps / t_nc, "ms_per_step": 1000 * t_nc / nocache_steps,
                 "forward_passes": nocache_steps, "cache_bytes": 0, "peak_rss_mb": peak_rss_mb(), **read})
    return rows


def decode_traces(gen: Generator, params: SamplingParams, nocache_steps: int) -> dict[str, "WorkTrace"]:
    """The work of each mode at batch 1 (:func:`varkit.bench.floor.trace_work`), for the rows' floors; the
    cached run also warms the model up before it is timed."""
    from .floor import trace_sampling, trace_work

    dev = next(gen.parameters()).device
    traces = {"kv-cache": trace_sampling(gen, params)}
    with trace_work(gen) as tr:
        decode_without_cache(gen, torch.zeros(1, dtype=torch.long, device=dev), params, image_generators(0, 1),
                             nocache_steps)
    traces["no-cache"] = tr
    return traces
