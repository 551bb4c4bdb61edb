"""Exactness harness for lossless samplers: a tiny generator's joint distribution enumerated by teacher
forcing, and one χ² goodness-of-fit of sampled sequences against it (the tests of SJD and of draft-model
speculative decoding share it, so both are held to the same statistic)."""
from __future__ import annotations

import itertools

import torch
from scipy.stats import chi2

from varkit.models.base import Generator
from varkit.samplers import SamplingParams
from varkit.samplers.logits import processed_probs

N_SAMPLES = 20000
NOCFG = SamplingParams(temperature=1.1)
CFG = SamplingParams(cfg=2.0, top_k=3, temperature=0.9)
CFG_LINEAR = SamplingParams(cfg=3.0, cfg_schedule="linear", top_p=0.9)


def seeded_generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per sample, seeded from (seed, index)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)]


@torch.no_grad()
def exact_joint(gen: Generator, label: int, params: SamplingParams) -> torch.Tensor:
    """P(sequence | label) for every sequence (base-V order), by teacher forcing."""
    T, V = gen.layout.num_tokens, gen.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    cond = torch.full((seqs.shape[0],), label)
    logits = gen.teacher_forcing_logits(cond, seqs)
    if params.uses_cfg(gen.layout.num_steps):
        unc = gen.teacher_forcing_logits(gen.null_condition(cond), seqs)
        w = torch.tensor([params.guidance(int(s), gen.layout.num_steps) for s in gen.layout.step_of])[:, None]
        logits = unc + (logits - unc) * w
    p = processed_probs(logits, params).double()
    joint = p.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return joint / joint.sum()


def seq_index(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """Each row's index in the base-V enumeration of :func:`exact_joint`."""
    return (tokens * V ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int] | None:
    """(χ², df) with cells of expected count < 5 pooled; None if an impossible cell was hit."""
    n = counts.sum()
    exp = probs * n
    if counts[probs == 0].sum() > 0:
        return None
    keep = exp >= 5
    obs_c, exp_c = counts[keep].tolist(), exp[keep].tolist()
    small_o, small_e = float(counts[~keep & (probs > 0)].sum()), float(exp[~keep].sum())
    if small_e >= 5:
        obs_c.append(small_o), exp_c.append(small_e)
    elif small_e > 0:  # fold the pool into the smallest kept cell
        j = min(range(len(exp_c)), key=exp_c.__getitem__)
        obs_c[j] += small_o
        exp_c[j] += small_e
    o, e = torch.tensor(obs_c, dtype=torch.float64), torch.tensor(exp_c, dtype=torch.float64)
    return float(((o - e) ** 2 / e).sum()), len(obs_c) - 1


def gof_pvalue(gen: Generator, tokens: torch.Tensor, labels: torch.Tensor, params: SamplingParams) -> float:
    """p-value of one χ² over all classes against ``gen``'s exact joint under ``params`` (per-class totals
    fixed: df = Σ (cells − 1)); 0 if a sequence of probability 0 was sampled."""
    V = gen.vocab_size
    stat, df = 0.0, 0
    for lab in labels.unique().tolist():
        rows = labels == lab
        counts = torch.bincount(seq_index(tokens[rows], V), minlength=V ** tokens.shape[1]).double()
        r = chi2_stat(counts, exact_joint(gen, lab, params))
        if r is None:
            return 0.0
        stat, df = stat + r[0], df + r[1]
    return float(chi2.sf(stat, df))
