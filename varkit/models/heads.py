"""Heads: how a generator's per-position output becomes a token.

The token type belongs to the head, not to the layout or the generator: any layout (raster, scales,
neighbors, sets) carries any head, and samplers, the pipeline and training talk to tokens only
through the head (``token_shape``, ``draw_noise``, ``sample``, ``log_prob``, ``loss``).

- :class:`CategoricalHead`: the output is logits; tokens are ids. Temperature, top-k, top-p.
- :class:`DiffusionHead`: MAR's diffusion loss. The output is a conditioning vector z; a small MLP
  (``net``) denoises a D-dim token from Gaussian noise over a respaced cosine schedule.

A head applies CFG itself (``weights``: None without CFG, else the CFG weight of each position and
the output holds the conditional rows then the unconditional ones): the categorical head mixes
logits, the diffusion head mixes only ε inside its loop, as MAR (mixing conditioning vectors would
be wrong). Heads take their randomness as *injected noise* (``draw_noise``), so two models can share
one draw (continuous speculative decoding) and a seed reproduces an image at any batch position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..registry import Registry
from ..nn.layers import Linear


class Head(nn.Module):
    """Base class: the token type and everything that depends on it (see the module docstring)."""

    kind: ClassVar[str] = ""
    token_shape: tuple[int, ...] = ()
    token_dtype: torch.dtype = torch.long

    def input_embedding(self, dim: int) -> nn.Module:
        """A fresh module embedding tokens (B, n, *token_shape) into ``dim`` (the generator owns it)."""
        raise NotImplementedError

    def output_layer(self, dim: int) -> nn.Module:
        """A fresh module turning the generator's final hidden ``dim`` into this head's input."""
        raise NotImplementedError

    def check_params(self, params) -> None:
        """Raise ``InvalidArgumentError`` for sampling settings this head cannot honour."""

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ``InvalidArgumentError`` unless ``tokenizer``'s tokens are this head's tokens."""
        shape = tuple(getattr(tokenizer, "token_shape", ()))
        if shape != tuple(self.token_shape):
            have = f"{shape[0]}-dim latents (a continuous KL tokenizer)" if shape else "ids (a discrete VQ tokenizer)"
            want = (f"{self.token_shape[0]}-dim latents: it needs a continuous (KL) tokenizer" if self.token_shape
                    else "ids: it needs a discrete (VQ) tokenizer")
            raise InvalidArgumentError(f"the tokenizer gives {have}, but this {self.kind}-head generator takes {want}")
        size = getattr(self, "vocab_size", None)
        if size is not None and getattr(tokenizer, "codebook_size", size) != size:
            raise InvalidArgumentError(
                f"the tokenizer has {tokenizer.codebook_size} codes, the generator {size}; use the tokenizer it was trained with")

    def draw_noise(self, rng, n: int, params) -> Any:
        """This head's randomness for ``n`` positions of every image, drawn from ``rng`` (Randomness)."""
        raise NotImplementedError

    def sample(self, out: torch.Tensor, weights: torch.Tensor | float | None, noise: Any, params) -> torch.Tensor:
        """Tokens (B, n, *token_shape) from outputs (B or 2B, n, C) with the injected ``noise``."""
        raise NotImplementedError

    def log_prob(self, out: torch.Tensor, weights, tokens: torch.Tensor, params, noise: Any = None) -> torch.Tensor:
        """Log-probability (B, n) of ``tokens`` under the distribution :meth:`sample` draws from."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss of outputs (B, N, C) against tokens (B, N, ...) on ``mask`` (B, N) (None: all)."""
        raise NotImplementedError


def _expand_weights(weights: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Per-position CFG weights (n,) → a tensor broadcasting over (B, n, C); numbers pass through."""
    if isinstance(weights, torch.Tensor):
        return weights.to(like.device, like.dtype).view(1, -1, *([1] * (like.dim() - 2)))
    return weights


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


class CategoricalHead(Head):
    """Tokens are ids of a ``vocab_size`` codebook; the output is logits (no parameters of its own)."""

    kind = "categorical"

    def __init__(self, vocab_size: int):
        super().__init__()
        if vocab_size < 2:
            raise InvalidArgumentError(f"a categorical head needs vocab_size >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def input_embedding(self, dim: int) -> nn.Module:
        return nn.Embedding(self.vocab_size, dim)

    def output_layer(self, dim: int) -> nn.Module:
        return Linear(dim, self.vocab_size, bias=False)

    def check_params(self, params) -> None:
        if params.head_steps is not None:
            raise InvalidArgumentError("head_steps applies to continuous heads (MAR, FlowAR); this model's tokens are ids")

    def mix(self, out: torch.Tensor, weights) -> torch.Tensor:
        """Guided logits (B, n, V): ``u + w·(c − u)`` per position; the output itself without CFG."""
        from ..samplers.logits import mix_cfg

        return out if weights is None else mix_cfg(out, _expand_weights(weights, out))

    def draw_noise(self, rng, n: int, params) -> torch.Tensor | None:
        return None if params.greedy else rng.uniforms(n)

    def sample(self, out, weights, noise, params) -> torch.Tensor:
        from ..samplers.logits import sample_logits

        return sample_logits(self.mix(out, weights), params, noise)

    def log_prob(self, out, weights, tokens, params, noise=None) -> torch.Tensor:
        from ..samplers.logits import processed_probs

        probs = processed_probs(self.mix(out, weights).float(), params)
        return probs.gather(-1, tokens[..., None]).squeeze(-1).log()

    def loss(self, out, tokens, mask=None):
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), tokens.reshape(-1), reduction="none")
        loss = _masked_mean(ce.view(tokens.shape), mask)
        return loss, {}


@dataclass
class DiffusionNoise:
    """A diffusion head's randomness for n positions: x_T (B, n, D) and one normal per step (B, n, S, D)."""

    x_T: torch.Tensor
    steps: torch.Tensor
    final: torch.Tensor | None = None  # (B, n, D): noise of the final step, only when it adds noise


class LatentEmbedding(nn.Linear):
    """``nn.Linear`` (same parameters) over token latents, cast to its weights' dtype first: sampled latents are
    fp32, a bf16 generator's embedding is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class ContinuousHead(Head):
    """What MAR's diffusion head and FlowAR's flow head share: tokens of ``token_dim`` channels embedded by a
    linear, outputs that are the ``cond_dim``-channel condition itself, ``head_steps`` (else ``default_steps``)
    steps per token, and no top-k/top-p."""

    token_dim: int
    cond_dim: int
    default_steps: int

    def input_embedding(self, dim: int) -> nn.Module:
        return LatentEmbedding(self.token_dim, dim)

    def output_layer(self, dim: int) -> nn.Module:
        if dim != self.cond_dim:
            raise InvalidArgumentError(f"{self.kind} head conditions on {self.cond_dim} channels, the generator gives {dim}")
        return nn.Identity()

    def steps_for(self, params) -> int:
        return params.head_steps or self.default_steps

    def check_params(self, params) -> None:
        if params.top_k or (params.top_p is not None and params.top_p < 1):
            raise InvalidArgumentError("top_k / top_p apply to categorical heads; this model's tokens are continuous")


class DiffusionHead(ContinuousHead):
    """MAR's diffusion loss head: an MLP (``net``, MAR's SimpleMLPAdaLN) denoising one token from z.

    Sampling: ancestral DDPM over the cosine schedule respaced to ``head_steps`` (default
    ``default_steps``), learned-range variance, ε-prediction; ``temperature`` scales the per-step
    noise only and x_T is not scaled (as MAR). CFG mixes ε between the conditional and unconditional
    rows; the variance comes from the conditional rows. ``x0_clip`` (None: MAR exactly) clamps the predicted
    x0 while sampling: with the cosine schedule's ᾱ = 2.4e-9 at t = 999 the first step multiplies an ε error
    by ~2e4, which a small, briefly trained head cannot afford (the bundled digits models use 4: their
    latents lie within ±2.7). ``final_noise``: MAR adds no noise at the last
    step (the token is that step's mean); with it the token is a real draw from the last step's
    Gaussian, whose density :meth:`log_prob` gives (what exact speculative acceptance needs).
    Training: ε-MSE + VB on ``batch_mul`` noised copies of every token (MAR's ``diffusion_batch_mul``).
    """

    kind = "diffusion"

    def __init__(self, token_dim: int, cond_dim: int, depth: int = 3, width: int = 1024, batch_mul: int = 4,
                 train_steps: int = 1000, schedule: str = "cosine", default_steps: int = 100,
                 x0_clip: float | None = None):
        super().__init__()
        from .diffusion import DiffusionMLP, GaussianDiffusion

        if x0_clip is not None and not x0_clip > 0:
            raise InvalidArgumentError(f"x0_clip must be > 0 (a latent range) or None, got {x0_clip}")
        self.x0_clip = x0_clip

        if token_dim < 1:
            raise InvalidArgumentError(f"a diffusion head needs token_dim >= 1, got {token_dim}")
        self.token_dim, self.cond_dim = token_dim, cond_dim
        self.token_shape = (token_dim,)
        self.token_dtype = torch.float32
        self.batch_mul, self.default_steps = batch_mul, default_steps
        self.net = DiffusionMLP(token_dim, width, 2 * token_dim, cond_dim, depth)
        self.diffusion = GaussianDiffusion(train_steps, schedule)

    def draw_noise(self, rng, n: int, params, final_noise: bool = False) -> DiffusionNoise:
        S, D = self.steps_for(params), self.token_dim
        return DiffusionNoise(rng.normals(n, D), rng.normals(n, S, D), rng.normals(n, D) if final_noise else None)

    def _model_fn(self, z: torch.Tensor, weights, timesteps) -> Any:
        """The guided network call of the sampling loop over ``timesteps`` (ascending) on flattened rows (N, ·).

        For MAR's MLP a :class:`~varkit.models.diffusion.ChainFn` whose condition-only work is done once for the
        chain; any other ``net(x, t, z)`` (e.g. a test's analytic denoiser) is called per step with t."""
        from .diffusion import ChainFn, DiffusionMLP

        net, D = self.net, self.token_dim
        dt = next(net.parameters()).dtype  # the MLP's own dtype (a bf16 generator may feed it fp32 z, or the reverse)
        z = z.to(dt)
        if isinstance(net, DiffusionMLP):
            chain = net.prepare(z, list(timesteps)[::-1])  # in the loop's order: largest t first

            def call(x: torch.Tensor, k: int) -> torch.Tensor:
                return net.step(x, chain, k)
        else:
            def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return net(x, t.repeat(x.shape[0] // t.shape[0]), z)
        wrap = ChainFn if isinstance(net, DiffusionMLP) else (lambda f: f)
        if weights is None:
            return wrap(lambda x, k: call(x.to(dt), k).to(x.dtype))
        N = z.shape[0] // 2
        w = weights  # (N,) tensor or a number

        def guided(x: torch.Tensor, k) -> torch.Tensor:
            out = call(torch.cat([x, x]).to(dt), k).to(x.dtype)
            cond, uncond = out[:N], out[N:]
            eps = uncond[:, :D] + (cond[:, :D] - uncond[:, :D]) * w
            return torch.cat([eps, cond[:, D:]], 1)

        return wrap(guided)

    def run(self, out: torch.Tensor, weights, noise: DiffusionNoise, params):
        """The whole denoising chain: the schedule's ``SampleOut`` on rows (B·n, D)."""
        B, n = noise.x_T.shape[:2]
        z = out.reshape(-1, out.shape[-1])
        if weights is not None and isinstance(weights, torch.Tensor):
            weights = weights.to(torch.float32).view(1, -1, 1).expand(B, n, 1).reshape(B * n, 1)
        sched = self.diffusion.respaced(self.steps_for(params))
        if noise.steps.shape[2] != len(sched.timesteps):
            raise InvalidArgumentError(
                f"injected noise has {noise.steps.shape[2]} steps, the head samples with {len(sched.timesteps)}"
            )
        # the chain runs in fp32 (fp64 for an fp64 head): bf16 would lose the schedule's small coefficients
        dtype = torch.promote_types(next(self.net.parameters()).dtype, torch.float32)
        x_T = noise.x_T.reshape(B * n, -1).to(dtype)
        steps = noise.steps.reshape(B * n, noise.steps.shape[2], -1).to(dtype)
        return sched.sample(self._model_fn(z, weights, sched.timesteps), x_T, steps, params.temperature, self.x0_clip)

    def sample(self, out, weights, noise: DiffusionNoise, params) -> torch.Tensor:
        B, n = noise.x_T.shape[:2]
        res = self.run(out, weights, noise, params)
        x = res.x0 if noise.final is None else res.mean + res.std * noise.final.reshape(B * n, -1).to(res.mean)
        return x.view(B, n, self.token_dim).to(torch.promote_types(self.token_dtype, x.dtype))

    def log_prob(self, out, weights, tokens, params, noise: DiffusionNoise | None = None) -> torch.Tensor:
        """Log-density (B, n) of ``tokens`` under the final step's Gaussian N(μ, (σ·τ)²) of the chain
        driven by ``noise`` (its x_T and per-step normals): the distribution a ``final_noise`` draw comes from."""
        if noise is None:
            raise InvalidArgumentError("a diffusion head's density depends on its trajectory: pass the noise it sampled with")
        B, n = noise.x_T.shape[:2]
        res = self.run(out, weights, noise, params)
        from .diffusion import normal_log_prob

        return normal_log_prob(tokens.reshape(B * n, -1).to(res.mean.dtype), res.mean, res.std).view(B, n)

    def loss(self, out, tokens, mask=None):
        D, k = self.token_dim, self.batch_mul
        z = out.reshape(-1, out.shape[-1]).repeat(k, 1)
        x0 = tokens.reshape(-1, D).to(z.dtype).repeat(k, 1)
        t = torch.randint(0, self.diffusion.num_train_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        per = self.diffusion.training_loss(self.net, x0, z, t, noise)
        m = None if mask is None else mask.reshape(-1).repeat(k)
        return _masked_mean(per, m), {}


class FlowHead(ContinuousHead):
    """FlowAR's flow-matching head: the tokens of a whole scale are sampled *jointly* by an Euler ODE.

    The generator's output is the per-token condition z (B, n, C) of one scale (FlowAR's decoder output
    + ``diffusion_pos_embed``); the head's network (``net``, FlowAR's SimpleTransformerAdaLN) attends
    across the n = s² tokens of that scale. Its cross-attention variant (``cross=True``, FlowAR-L/H) attends
    from the tokens to "the AR tokens", which in FlowAR are exactly these z of the same scale: so ``out``
    already carries all the context and no extra input travels with it. The head therefore needs whole,
    square, row-major scales (what the ``scales`` layout gives per step); it knows the scale sizes
    (``patch_nums``) to split a training sequence and weight each scale's loss by s²/G² (G = the finest
    side: FlowAR's s²/256).

    Sampling: Gaussian noise (``draw_noise``: one (n, D) draw per image and scale) integrated from t = 1 to 0
    in float64 over ``head_steps`` (default ``default_steps``; 25 is FlowAR's two-piece grid), CFG on the
    velocity only while t <= ``guidance_interval`` (``SamplingParams.guidance_interval``, default the
    model's). The ODE is deterministic given its noise: ``temperature`` does not apply and there is no
    density (:meth:`log_prob` refuses).
    """

    kind = "flow"

    def __init__(self, token_dim: int, cond_dim: int, patch_nums: tuple[int, ...], depth: int = 2, width: int = 1024,
                 cross: bool = False, default_steps: int = 25, guidance_interval: float = 1.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        from .flow import FlowNet, time_grid

        if token_dim < 1:
            raise InvalidArgumentError(f"a flow head needs token_dim >= 1, got {token_dim}")
        patch_nums = tuple(int(p) for p in patch_nums)
        if not patch_nums or any(p < 1 for p in patch_nums):
            raise InvalidArgumentError(f"a flow head needs positive scale sides, got {patch_nums}")
        time_grid(default_steps)  # a clear error for a bad default
        _check_interval(guidance_interval, "guidance_interval")
        self.token_dim, self.cond_dim, self.patch_nums = token_dim, cond_dim, patch_nums
        self.token_shape = (token_dim,)
        self.default_steps, self.guidance_interval = default_steps, float(guidance_interval)
        self.net = FlowNet(token_dim, width, cond_dim, depth, cross, patch_nums[-1], grad_checkpointing)

    @property
    def token_dtype(self) -> torch.dtype:
        """fp32 tokens (FlowAR's ``.float()``), fp64 under an fp64 network (reference-grade runs stay fp64)."""
        return torch.promote_types(torch.float32, next(self.net.parameters()).dtype)

    def interval_for(self, params) -> float:
        g = getattr(params, "guidance_interval", None)
        return self.guidance_interval if g is None else float(g)

    def check_params(self, params) -> None:
        super().check_params(params)
        if params.temperature != 1.0:
            raise InvalidArgumentError(
                f"temperature {params.temperature} does not apply to a flow head (its Euler ODE is deterministic given "
                "its noise); leave it at 1")

    def draw_noise(self, rng, n: int, params) -> torch.Tensor:
        """The initial noise x₁ (B, n, D) of one scale, one draw per image."""
        return rng.normals(n, self.token_dim)

    def sample(self, out, weights, noise: torch.Tensor, params) -> torch.Tensor:
        from .flow import euler_sample, time_grid

        if tuple(noise.shape[1:]) != (out.shape[1], self.token_dim):
            raise InvalidArgumentError(
                f"injected noise has shape {tuple(noise.shape)}, the head samples {out.shape[1]} tokens of {self.token_dim}")
        out = out.to(next(self.net.parameters()).dtype)  # the network's own dtype (a bf16 generator may feed fp32 z)
        x = euler_sample(self.net, noise.to(out.device), self.net.prepare(out), weights,
                         time_grid(self.steps_for(params)), self.interval_for(params))
        return x.to(torch.promote_types(self.token_dtype, out.dtype))

    def log_prob(self, out, weights, tokens, params, noise=None) -> torch.Tensor:
        raise InvalidArgumentError("a flow head's tokens are a deterministic function of its noise: they have no density")

    def scale_losses(self, out: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-scale flow-matching losses (K,) with injected times t (B, K) and noise (B, N, D)."""
        from .flow import flow_matching_loss

        N = sum(p * p for p in self.patch_nums)
        if out.shape[1] != N or tokens.shape[1] != N:
            raise InvalidArgumentError(
                f"the flow head trains on whole sequences of scales {self.patch_nums} ({N} tokens), got {tokens.shape[1]}")
        out = out.to(next(self.net.parameters()).dtype)
        losses, start = [], 0
        for k, p in enumerate(self.patch_nums):
            sl = slice(start, start + p * p)
            start += p * p
            per = flow_matching_loss(self.net, tokens[:, sl], out[:, sl], t[:, k], noise[:, sl])
            losses.append(_masked_mean(per, None if mask is None else mask[:, sl]))
        return torch.stack(losses)

    def scale_weights(self) -> torch.Tensor:
        """FlowAR's per-scale loss weights s²/G² (G: the finest side; s²/256 at 16×16)."""
        return torch.tensor([p * p / self.patch_nums[-1] ** 2 for p in self.patch_nums])

    def loss(self, out, tokens, mask=None):
        """FlowAR's loss: Σ_k (s_k²/G²)·MSE_k, one time t ~ U(0, 1) per image and scale, noise per token.

        ``mask`` (B, N): the positions each scale's mean counts (None: all)."""
        B, K = tokens.shape[0], len(self.patch_nums)
        t = torch.rand(B, K, device=tokens.device)
        noise = torch.randn(tokens.shape, device=tokens.device)
        per = self.scale_losses(out, tokens, t, noise, mask)
        total = (per * self.scale_weights().to(per)).sum()
        return total, {f"loss_s{p}": float(v) for p, v in zip(self.patch_nums, per.detach())}


def _check_interval(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidArgumentError(f"{name} must be a number in [0, 1] (CFG applies while t <= it), got {value!r}")


HEADS: Registry[type[Head]] = Registry("head", InvalidArgumentError)
for _cls in (CategoricalHead, DiffusionHead, FlowHead):
    HEADS.register(_cls.kind, _cls)


def create_head(kind: str, **config: Any) -> Head:
    """Build head ``kind`` ("categorical", "diffusion", "flow") from its config fields."""
    cls = HEADS.lookup(kind)
    try:
        return cls(**config)
    except TypeError as e:
        raise InvalidArgumentError(f"bad settings for a {kind} head: {e}") from None


@dataclass
class HeadConfig:
    """The head fields every generator config carries (mixed into its dataclass).

    ``head``: "categorical" (ids of ``vocab_size`` codes) or "diffusion" (``token_dim``-dim latents,
    an MLP of ``head_depth`` blocks of ``head_width``, ``head_batch_mul`` noised copies per token in
    training, ``head_steps`` denoising steps by default).
    """

    # fields added after the first model folders were saved: a config.json without them means their defaults
    # (any other missing field is an error, see varkit.modeling.SavableModule.from_config_dict)
    optional_fields: ClassVar[tuple[str, ...]] = ("head", "token_dim", "head_depth", "head_width", "head_batch_mul",
                                                  "head_steps", "x0_clip")

    head: str = "categorical"
    token_dim: int = 0
    head_depth: int = 3
    head_width: int = 1024
    head_batch_mul: int = 4
    head_steps: int = 100
    x0_clip: float | None = None  # diffusion: clamp predicted x0 to ±x0_clip while sampling (None = MAR exactly)


def head_from_config(config: Any, cond_dim: int) -> Head:
    """The head a generator config describes (its ``head`` fields), conditioned on ``cond_dim`` channels."""
    kind = getattr(config, "head", "categorical")
    if kind == "categorical":
        return create_head(kind, vocab_size=config.vocab_size)
    if kind == "diffusion":
        return create_head(kind, token_dim=config.token_dim, cond_dim=cond_dim, depth=config.head_depth,
                           width=config.head_width, batch_mul=config.head_batch_mul, default_steps=config.head_steps,
                           x0_clip=getattr(config, "x0_clip", None))
    if kind == "flow":
        return create_head(kind, token_dim=config.token_dim, cond_dim=cond_dim, patch_nums=tuple(config.patch_nums),
                           depth=config.head_depth, width=config.head_width, cross=getattr(config, "head_cross", False),
                           default_steps=config.head_steps, guidance_interval=getattr(config, "guidance_interval", 1.0),
                           grad_checkpointing=getattr(config, "grad_checkpointing", False))
    HEADS.lookup(kind)  # unknown kind: the registry's error
    raise InvalidArgumentError(f"head {kind!r} has no config fields in HeadConfig yet")
