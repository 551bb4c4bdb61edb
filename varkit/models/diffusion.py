"""MAR's diffusion head math: the denoising MLP and its cosine DDPM with learned-range variance.

MAR (LTH14/mar, ``models/diffloss.py`` + ``diffusion/``) predicts each continuous token with a
small MLP (SimpleMLPAdaLN) that denoises it from Gaussian noise, conditioned on the transformer's
vector z. This module is that math only; :class:`~varkit.models.heads.DiffusionHead` wires it into
generators and samplers.

- :class:`DiffusionMLP`: the network, parameter names identical to MAR's ``diffloss.net.*`` so a
  published checkpoint loads by stripping the ``diffloss.net.`` prefix. Output ``(N, 2D)``: ε, then
  the variance interpolation v in [-1, 1] (``LEARNED_RANGE``).
- :class:`GaussianDiffusion`: the 1000-step cosine schedule, its training loss (ε-MSE + VB, as MAR's
  ``training_losses`` with ``LossType.MSE``) and respaced sampling schedules (MAR's ``space_timesteps``).
- :class:`RespacedSchedule`: the ancestral ``p_sample`` loop with *injected* noise, returning the last
  step's Gaussian and the trajectory's Σ log σ (what continuous speculative decoding records).
- :class:`DiffusionChain` (:meth:`DiffusionMLP.prepare`) and :class:`ChainFn`: what the network derives from
  the condition and the timesteps alone (``cond_embed(c)``, the timestep embeddings, every step's adaLN
  modulations) computed once per chain, in a few large GEMMs, instead of at every denoising step (same ops).

Schedule coefficients are computed in float64 (as the official numpy code) and cast to the working
dtype, so an fp32 run reproduces the official fp32 arithmetic; fp64 runs stay fp64 throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from ..nn.layers import Linear

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- network

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps, cos half first then sin (MAR/GLIDE).

    MAR computes it in fp32 (``dtype`` default); fp64 networks compute it in fp64 so that their
    outputs are reference-grade (fp32 sinusoids of t up to 999 carry ~1e-7 relative rounding).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half).to(t.device)
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's ``x·(1 + scale) + shift`` (MAR's and FlowAR's order of operations)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Timestep → vector: sinusoidal features through Linear, SiLU, Linear (MAR/DiT)."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(Linear(frequency_dim, hidden), nn.SiLU(), Linear(hidden, hidden))
        self.frequency_dim = frequency_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        wdtype = self.mlp[0].weight.dtype
        fdtype = torch.float64 if wdtype == torch.float64 else torch.float32
        return self.mlp(timestep_embedding(t, self.frequency_dim, dtype=fdtype).to(wdtype))


def init_linears_and_timestep(net: nn.Module, time_embed: TimestepEmbedder) -> None:
    """The init MAR's and FlowAR's heads start with, in this order of RNG draws: xavier-uniform weights and zero
    biases for every linear of ``net``, then N(0, 0.02) for the weights of ``time_embed``'s MLP."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(time_embed.mlp[2].weight, std=0.02)


class ResBlock(nn.Module):
    """``x + gate · MLP(LN(x)·(1+scale) + shift)`` with (shift, scale, gate) from the conditioning y."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(Linear(channels, channels), nn.SiLU(), Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The block given its modulation ``adaLN_modulation(y)`` (N, 3·channels), computed elsewhere."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Affine-free LN (or ``norm``), adaLN (shift, scale) from y, then the output projection (DiT's final layer)."""

    def __init__(self, channels: int, out_channels: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm_final = norm if norm is not None else nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The layer given its modulation ``adaLN_modulation(y)`` (N, 2·channels), computed elsewhere."""
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionMLP(nn.Module):
    """MAR's SimpleMLPAdaLN: denoiser of one token x (N, D) at timestep t given the condition c.

    Arguments in MAR's order (``in_channels, model_channels, out_channels, z_channels,
    num_res_blocks``). Submodules are registered and initialised in MAR's order, so under the same
    seed the initial weights are MAR's (xavier-uniform, timestep MLP N(0, 0.02), adaLN and output zero).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width), ("out_channels", out_channels),
                            ("z_channels", z_channels)):
            if value < 1:
                raise InvalidArgumentError(f"DiffusionMLP needs {name} >= 1, got {value}")
        if depth < 0:
            raise InvalidArgumentError(f"DiffusionMLP needs depth >= 0, got {depth}")
        self.in_channels, self.width, self.out_channels = in_channels, width, out_channels
        self.z_channels, self.depth = z_channels, depth
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = Linear(z_channels, width)
        self.input_proj = Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's ``initialize_weights`` (same order of RNG draws)."""
        init_linears_and_timestep(self, self.time_embed)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Output (N, out_channels) for tokens x (N, D), original timesteps t (N,) in 0..T-1, condition c (N, C)."""
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)

    def prepare(self, c: torch.Tensor, timesteps) -> "DiffusionChain":
        """The x-independent work of a sampling chain over ``timesteps`` (original indices, in the order the
        loop visits them) for conditions c (N, C): see :class:`DiffusionChain`."""
        return DiffusionChain(self, c, timesteps)

    def step(self, x: torch.Tensor, chain: "DiffusionChain", k: int) -> torch.Tensor:
        """:meth:`forward` at the chain's k-th timestep, with its precomputed modulations (same ops)."""
        mods = chain.modulations(k)
        h = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods):
            h = block.modulated(h, mod)
        return self.final_layer.modulated(h, mods[-1])


# modulation elements a chain holds at once (64 MiB in fp32): steps are precomputed in chunks of this size
CHAIN_MODULATION_ELEMENTS = 1 << 24


class DiffusionChain:
    """What :class:`DiffusionMLP` derives from the condition c and the timesteps alone, for one sampling chain.

    The conditioning y = time_embed(t) + cond_embed(c) and every adaLN modulation Linear(SiLU(y)) do not depend
    on the token x, so instead of recomputing them at each of the S steps (S small GEMMs per layer, each
    re-reading its weights: the bulk of the head's time at small batches), ``cond_embed(c)`` and the S timestep
    embeddings are computed once and the modulations of many steps at a time, in one GEMM per layer over
    (steps·N) rows. At most :data:`CHAIN_MODULATION_ELEMENTS` are held (a chunk of consecutive steps).
    """

    def __init__(self, net: DiffusionMLP, c: torch.Tensor, timesteps):
        self.cond = net.cond_embed(c)  # (N, W)
        t = torch.as_tensor(list(timesteps), dtype=torch.long, device=c.device)
        self.temb = net.time_embed(t)  # (S, W)
        self.num_steps, rows = t.shape[0], c.shape[0]
        self._layers = [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]
        per_step = max(1, rows * sum(lin.out_features for lin in self._layers))
        self.chunk = max(1, min(self.num_steps, CHAIN_MODULATION_ELEMENTS // per_step))
        self._start, self._mods = -1, []

    def modulations(self, k: int) -> list[torch.Tensor]:
        """Step k's modulation (N, ·) of every residual block, then the final layer's."""
        if not 0 <= k < self.num_steps:
            raise InvalidArgumentError(f"step {k} is outside this {self.num_steps}-step chain")
        start = k - k % self.chunk
        if start != self._start:
            end = min(start + self.chunk, self.num_steps)
            y = self.temb[start:end, None] + self.cond[None]  # (steps, N, W): y of every row at every step
            s = F.silu(y).reshape(-1, y.shape[-1])
            self._mods = [lin(s).view(end - start, y.shape[1], -1) for lin in self._layers]
            self._start = start
        return [m[k - start] for m in self._mods]


class ChainFn:
    """A denoiser bound to one chain: ``fn(x, k)`` is the network output (N, 2D) at the loop's k-th step
    (k = 0: the largest timestep), so per-chain work happens once (:class:`DiffusionChain`)."""

    def __init__(self, fn: Callable[[torch.Tensor, int], torch.Tensor]):
        self.fn = fn


def guide_eps(out: torch.Tensor, scale: torch.Tensor | float, channels: int) -> torch.Tensor:
    """CFG as MAR's ``forward_with_cfg``: out (2N, 2D) = [cond; uncond] rows → (N, 2D).

    ε = u + s·(c − u) on the first ``channels`` columns; the variance columns are the conditional
    rows' (unguided). ``scale``: a number or a tensor broadcasting over (N, 1).
    """
    n = out.shape[0] // 2
    cond, uncond = out[:n], out[n:2 * n]
    eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([eps, cond[:, channels:]], dim=1)


# --------------------------------------------------------------------------------------------- schedules

def cosine_betas(num_steps: int, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal's cosine schedule (``betas_for_alpha_bar``), float64, clipped at ``max_beta``."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]


SCHEDULES: dict[str, Callable[[int], list[float]]] = {"cosine": cosine_betas}


def space_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """The original timesteps (ascending) MAR keeps for ``timestep_respacing=str(steps)``.

    One section: ``steps`` indices spread evenly over 0..T-1 with a fractional stride, rounded with
    Python's ``round`` on the running float sum (bit-for-bit the official rule; 100 of 1000 gives
    0, 10, 20, 30, 40, 50, 61, ..., 989, 999).
    """
    if not 1 <= steps <= num_train_steps:
        raise InvalidArgumentError(f"diffusion steps must be in 1..{num_train_steps}, got {steps}")
    stride = 1 if steps <= 1 else (num_train_steps - 1) / (steps - 1)
    cur, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class SampleOut:
    """Result of one denoising chain, all (N, D) in the working dtype.

    ``x0``: the token (the last step's mean: no noise is added at t = 0, as MAR). ``mean``, ``std``:
    that last step's Gaussian N(μ, (σ·τ)²). ``log_std_sum``: Σ log σ_i over the other steps (no τ),
    CSpD's trajectory factor.
    """

    x0: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_std_sum: torch.Tensor


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of x (N, D) under the diagonal Gaussian N(mean, std²), summed over the last dim."""
    z = (x - mean) / std
    return (-0.5 * z * z - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


class _Coefficients:
    """A schedule's per-step coefficients cast to one (dtype, device), each a (S, 1) column."""

    NAMES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
             "posterior_log_variance_clipped", "log_betas")

    def __init__(self, table: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        for name in self.NAMES:
            setattr(self, name, table[name].to(device=device, dtype=dtype)[:, None])


class RespacedSchedule:
    """A DDPM over a subset of the training timesteps (MAR's ``SpacedDiffusion``), learned-range variance.

    ``timesteps``: the original timesteps kept, ascending; the network always sees these original
    indices (MAR's ``_WrappedModel``). Coefficients live in float64 and are cast once per dtype/device.
    """

    def __init__(self, alphas_cumprod: list[float], timesteps: list[int]):
        self.timesteps = tuple(timesteps)
        if len(self.timesteps) < 2:
            raise InvalidArgumentError(f"a diffusion schedule needs at least 2 steps, got {len(self.timesteps)}")
        betas, last = [], 1.0
        for t in self.timesteps:
            betas.append(1 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        b = torch.tensor(betas, dtype=torch.float64)
        if not bool(((b > 0) & (b <= 1)).all()):
            raise InvalidArgumentError("diffusion betas must lie in (0, 1]; check the schedule")
        ac = torch.cumprod(1.0 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.betas, self.alphas_cumprod = b, ac
        self._table = {
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac),
            # the posterior variance is 0 at the first step: its log is clipped to the second step's
            "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "log_betas": b.log(),
        }
        self.posterior_variance = post_var
        self._cast: dict[tuple[torch.dtype, torch.device], _Coefficients] = {}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def coefficients(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> _Coefficients:
        """The per-step coefficients in ``dtype`` on ``device`` (cached)."""
        key = (dtype, torch.device(device))
        if key not in self._cast:
            self._cast[key] = _Coefficients(self._table, dtype, key[1])
        return self._cast[key]

    # One step: index i is the respaced step (0 = the last, t_orig = timesteps[0]); i is an int or an (N,) tensor.
    def q_sample(self, co: _Coefficients, x0: torch.Tensor, i, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) with the given noise."""
        return co.sqrt_alphas_cumprod[i] * x0 + co.sqrt_one_minus_alphas_cumprod[i] * noise

    def q_posterior(self, co: _Coefficients, x0: torch.Tensor, xt: torch.Tensor,
                    i) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = co.posterior_mean_coef1[i] * x0 + co.posterior_mean_coef2[i] * xt
        return mean, co.posterior_log_variance_clipped[i].expand_as(mean)

    def p_mean_log_var(self, co: _Coefficients, xt: torch.Tensor, i, eps: torch.Tensor,
                       v: torch.Tensor, x0_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from ε and the range interpolation v (official order).

        ``x0_clip``: clamp the predicted x0 to [-x0_clip, x0_clip] (ADM's ``clip_denoised`` with a latent
        range; MAR passes False, so None, the default, is MAR exactly)."""
        min_log, max_log = co.posterior_log_variance_clipped[i], co.log_betas[i]
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0_pred = co.sqrt_recip_alphas_cumprod[i] * xt - co.sqrt_recipm1_alphas_cumprod[i] * eps
        if x0_clip is not None:
            x0_pred = x0_pred.clamp(-x0_clip, x0_clip)
        mean, _ = self.q_posterior(co, x0_pred, xt, i)
        return mean, log_var

    @torch.no_grad()
    def sample(self, model_fn: ModelFn | ChainFn, x_T: torch.Tensor, noises: torch.Tensor,
               temperature: float = 1.0, x0_clip: float | None = None) -> SampleOut:
        """MAR's ``p_sample_loop`` (``clip_denoised=False``) from x_T (N, D) with injected per-step noise.

        ``model_fn(x (N, D), t (N,) original timesteps) -> (N, 2D)`` (apply CFG inside it, e.g. with
        :func:`guide_eps`), or a :class:`ChainFn` called with the step number k instead of t. ``noises`` (N, S, D): index k is consumed by the k-th reverse step (k = 0 is the
        largest t); the last one (t = 0) is unused since no noise is added there. ``temperature`` scales
        the per-step noise only.
        """
        if x_T.dim() != 2:
            raise InvalidArgumentError(f"x_T must be (N, D), got shape {tuple(x_T.shape)}")
        N, D = x_T.shape
        S = self.num_steps
        if tuple(noises.shape) != (N, S, D):
            raise InvalidArgumentError(
                f"per-step noise must be (N, S, D) = {(N, S, D)} for this {S}-step schedule, got {tuple(noises.shape)}")
        dtype, device = x_T.dtype, x_T.device
        co = self.coefficients(dtype, device)
        noises = noises.to(dtype)
        x, log_std_sum = x_T, torch.zeros_like(x_T)
        for k in range(S):
            i = S - 1 - k
            if isinstance(model_fn, ChainFn):
                out = model_fn.fn(x, k).to(dtype)
            else:
                out = model_fn(x, torch.full((N,), self.timesteps[i], dtype=torch.long, device=device)).to(dtype)
            if tuple(out.shape) != (N, 2 * D):
                raise InvalidArgumentError(
                    f"the diffusion network must return (N, 2D) = {(N, 2 * D)}, got {tuple(out.shape)}")
            mean, log_var = self.p_mean_log_var(co, x, i, out[:, :D], out[:, D:], x0_clip)
            std = torch.exp(0.5 * log_var)
            if i > 0:  # no noise at t = 0: the token is the last step's mean
                x = mean + std * noises[:, k] * temperature
                log_std_sum = log_std_sum + 0.5 * log_var
        return SampleOut(x0=mean, mean=mean, std=std * temperature, log_std_sum=log_std_sum)


# --------------------------------------------------------------------------------------------- losses

def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (the official formula)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability of the 1/255-wide bin around x (data in [-1, 1]), as ADM's decoder term."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """The training diffusion (``num_train_steps``, named beta schedule) and its respaced samplers."""

    def __init__(self, num_train_steps: int = 1000, schedule: str = "cosine"):
        if schedule not in SCHEDULES:
            raise InvalidArgumentError(
                f"unknown noise schedule {schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}")
        if num_train_steps < 2:
            raise InvalidArgumentError(f"a diffusion needs at least 2 training steps, got {num_train_steps}")
        self.num_train_steps, self.schedule = num_train_steps, schedule
        betas = SCHEDULES[schedule](num_train_steps)
        self.alphas_cumprod: list[float] = []  # ᾱ_t, t = 0..T-1, float64 like the official np.cumprod
        acc = 1.0
        for b in betas:
            acc *= 1.0 - b
            self.alphas_cumprod.append(acc)
        self._respaced: dict[int, RespacedSchedule] = {}
        self.full = self.respaced(num_train_steps)

    def respaced(self, steps: int) -> RespacedSchedule:
        """The ``steps``-step sampling schedule (MAR's ``timestep_respacing=str(steps)``), cached."""
        steps = int(steps)
        if steps not in self._respaced:
            if steps < 2:
                raise InvalidArgumentError(f"diffusion sampling needs at least 2 steps, got {steps}")
            self._respaced[steps] = RespacedSchedule(self.alphas_cumprod, space_timesteps(self.num_train_steps, steps))
        return self._respaced[steps]

    def sample_training_t(self, n: int, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
        """n uniform training timesteps in 0..T-1 (MAR's ``torch.randint``)."""
        return torch.randint(0, self.num_train_steps, (n,), generator=generator, device=device)

    def training_loss(self, net_fn: NetFn, x0: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (N,): ε-MSE (mean over dims) + VB in bits (MAR's ``training_losses``, LossType.MSE).

        The VB term sees ε detached (it trains only the variance channels: "frozen mean"); at t = 0 it is the
        discretized decoder NLL, elsewhere KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).
        """
        if x0.dim() != 2 or noise.shape != x0.shape or t.shape != (x0.shape[0],):
            raise InvalidArgumentError(
                f"training_loss takes x0 and noise (N, D) and t (N,), "
                f"got {tuple(x0.shape)}, {tuple(noise.shape)}, {tuple(t.shape)}")
        sched, D = self.full, x0.shape[1]
        co = sched.coefficients(x0.dtype, x0.device)
        xt = sched.q_sample(co, x0, t, noise)
        out = net_fn(xt, t, c).to(x0.dtype)
        if tuple(out.shape) != (x0.shape[0], 2 * D):
            raise InvalidArgumentError(
                f"the diffusion network must return (N, 2D) = {(x0.shape[0], 2 * D)}, got {tuple(out.shape)}")
        eps, v = out[:, :D], out[:, D:]
        true_mean, true_log_var = sched.q_posterior(co, x0, xt, t)
        mean, log_var = sched.p_mean_log_var(co, xt, t, eps.detach(), v)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(1)
        return mse + vb
