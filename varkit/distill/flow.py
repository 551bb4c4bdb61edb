"""DD1's flow map: Gaussian noise → a token through the teacher's categorical, deterministically.

For one token with (processed) distribution p over codewords e_v, the rectified flow from ε ~ N(0, I) to the
mixture Σ_v p_v δ(e_v) has the closed-form velocity (Distilled Decoding 1, Liu et al., ICLR 2025)

    v(x, t) = (Σ_v w_v e_v − x) / (1 − t),   w_v ∝ p_v · N(x; t·e_v, (1 − t)² I).

Integrating it from ε with Euler steps lands on (next to) one codeword; its id is the token. The map is a
function of ε and p only, and with ε ~ N(0, I) the ids follow p up to the Euler error (continuous.md §5: ≥ 32
steps for ~1 % total variation). Applied along a generator's layout (token i's p given the tokens already
mapped, one layout step at a time; tokens of one step independently given the prefix), it turns a noise
sequence (B, N, d) into a token sequence: the pairs DD's student learns to jump along.

Codewords live where the tokenizer's lookup puts them (``tokenizer.codebook()``): LlamaGen's VQ (and the
digits VQ) l2-normalises its 8-d codebook, VAR's multi-scale VQ uses its raw Cvae-d embedding, as the official
DD code does (``F.normalize`` of LlamaGen's codebook when ``l2_norm``; ``vae_quant_proxy[0].embedding.weight``).
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

DEFAULT_FLOW_STEPS = 32


def posterior_logits(x: torch.Tensor, t: float, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """log w (…, V) up to a constant per token: log p_v − ‖x − t·e_v‖² / (2(1 − t)²).

    ``‖x‖²`` is the same for every v and is left out, so the distance costs one (…, d) × (d, V) product.
    """
    scale = 1.0 / (1.0 - t) ** 2
    cross = x @ codebook.T  # (…, V)
    sq = codebook.square().sum(-1)  # (V,)
    return log_p + (t * cross - 0.5 * t * t * sq) * scale


def velocity(x: torch.Tensor, t: float, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """DD1's velocity (Σ_v w_v e_v − x)/(1 − t) at ``x`` (…, d), time ``t`` in [0, 1)."""
    w = posterior_logits(x, t, log_p, codebook).softmax(-1)
    return (w @ codebook - x) / (1.0 - t)


def nearest_codeword(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Ids (…) of the codewords nearest to ``x`` (…, d) in Euclidean distance."""
    return (x @ codebook.T - 0.5 * codebook.square().sum(-1)).argmax(-1)


def flow_map(noise: torch.Tensor, log_p: torch.Tensor, codebook: torch.Tensor, steps: int = DEFAULT_FLOW_STEPS,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Token ids (…) that ``noise`` (…, d) flows to under log-probabilities ``log_p`` (…, V) (−inf allowed).

    ``steps`` Euler steps on the uniform grid t_k = k/steps. The last step lands on the posterior mean
    E[e | x_t] (the velocity's 1/(1−t) cancels the step), and the id is the codeword nearest to it. Computed in
    ``dtype`` (float64 by default: the weights' exponents reach ‖e‖²/(2(1−t)²)·steps² ≈ 10³ at the last step, so
    the map stays the same function of the noise on any CPU or GPU).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"flow steps must be an integer >= 1 (Euler steps per token), got {steps!r}")
    if noise.shape[-1] != codebook.shape[-1] or log_p.shape[-1] != codebook.shape[0] or noise.shape[:-1] != log_p.shape[:-1]:
        raise InvalidArgumentError(
            f"flow map: noise {tuple(noise.shape)}, log-probabilities {tuple(log_p.shape)} and codebook "
            f"{tuple(codebook.shape)} do not fit (noise (…, d), log_p (…, V), codebook (V, d))")
    x = noise.to(dtype)
    lp = log_p.to(dtype)
    e = codebook.to(device=x.device, dtype=dtype)
    dt = 1.0 / steps
    for k in range(steps):
        x = x + dt * velocity(x, k * dt, lp, e)
    return nearest_codeword(x, e)


# -- along a generator's layout --------------------------------------------------------------------------------
def teacher_flow(gen, cond: torch.Tensor, noise: torch.Tensor, params, codebook: torch.Tensor,
                 steps: int = DEFAULT_FLOW_STEPS, tokens: torch.Tensor | None = None, start: int = 0,
                 stop: int | None = None) -> tuple[torch.Tensor, int]:
    """The teacher ``gen``'s tokens (B, N) for ``noise`` (B, N, d): layout steps ``start … stop-1`` mapped by
    :func:`flow_map` from the teacher's processed conditional (CFG, temperature, top-k/top-p of ``params``),
    given ``tokens``' steps before ``start`` (the teacher-involved DD sampler hands over the student's prefix).

    Returns (tokens, generator passes). Tokens of one layout step (VAR: a whole scale) are mapped
    independently given the prefix, as the teacher samples them.
    """
    from ..samplers.base import GuidedRunner
    from ..samplers.logits import processed_probs

    layout, head = gen.layout, gen.head
    B, N = cond.shape[0], layout.num_tokens
    stop = layout.num_steps if stop is None else stop
    if not 0 <= start <= stop <= layout.num_steps:
        raise InvalidArgumentError(f"teacher steps {start}..{stop} are outside the layout's 0..{layout.num_steps}")
    if tuple(noise.shape) != (B, N, codebook.shape[-1]):
        raise InvalidArgumentError(
            f"noise must have shape (B, N, d) = ({B}, {N}, {codebook.shape[-1]}) for this teacher, got {tuple(noise.shape)}")
    if tokens is None:
        if start > 0:
            raise InvalidArgumentError("teacher_flow from a later step needs the tokens of the earlier steps")
        tokens = torch.zeros(B, N, dtype=torch.long, device=cond.device)
    else:
        tokens = tokens.clone()
    if start == stop:
        return tokens, 0
    run = GuidedRunner(gen, params, cond)
    out, w = run.prefill()
    if start > 0:  # feed the given prefix: in one call where the generator takes several steps at once
        if gen.supports_multistep:
            out, w = run.forward(tokens[:, :layout.step_starts[start]], 1)
            n = layout.step_sizes[start]
            out, w = out[:, out.shape[1] - n:], (None if w is None else w[w.shape[0] - n:])
        else:
            for s in range(1, start + 1):
                out, w = run.forward(layout.read(tokens, s - 1), s)
    for step in range(start, stop):
        if step > start:
            out, w = run.forward(layout.read(tokens, step - 1), step)
        log_p = processed_probs(head.mix(out, w).float(), params.at_step(step, layout.num_steps)).log()
        sl = layout.step_slice(step)
        layout.write(tokens, step, flow_map(noise[:, sl], log_p, codebook, steps).to(tokens.device))
    return tokens, run.passes
