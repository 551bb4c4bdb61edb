"""Neighboring autoregression (NAR): one anti-diagonal front a step, dimension-oriented heads.

NAR's backbone is LlamaGen's (:class:`~varkit.models.raster.RasterGenerator`, same parameter
names) on the ``neighbors`` layout, plus ``medusa_layers`` extra transformer layers. Every input
token (r, c) has two heads:

- the *horizontal* head (``norm`` + ``output`` on the hidden state after layer ``n_layer - 1``)
  predicts its right neighbour (r, c+1);
- the *vertical* head (the extra layers, then ``medusa_norm`` + ``medusa_output``) predicts the
  token below it (r+1, c).

Token (r, c) is predicted from ``(vertical(r-1, c) + horizontal(r, c-1)) / 2``; row 0 uses the
horizontal head alone, column 0 the vertical head alone, and token (0, 0) the mean of both heads
at the last condition token, exactly as NAR's ``generate`` and training forward do. Attention is
NAR's proximity mask: a token on front d sees the condition and every token of fronts <= d,
which is the block-causal mask of the ``neighbors`` layout. RoPE uses each token's (row, col), so
the cache order (layout order) differs from NAR's raster cache slots without changing the maths.

The logits of front s depend only on the hidden states of front s-1, which are the inputs of the
same call, so the generator keeps no state beyond the KV cache: multi-step forward (several
fronts at once, block-causal among themselves) and rollback (cache truncation) are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KVCache
from ..errors import InvalidArgumentError
from ..modeling import register_module
from ..nn import RMSNorm, block_causal_mask
from ..nn.layers import Linear
from .raster import RasterConfig, RasterGenerator, TransformerBlock


@dataclass
class NeighborsConfig(RasterConfig):
    layout: str = "neighbors"
    medusa_layers: int = 1  # NAR's ``medusa_attention_num``: extra layers under the vertical head


@dataclass
class _Plan:
    """How the logits of targets [t0, t1) come from input rows starting at layout index ``i0``."""

    r_rows: Any  # input rows whose horizontal head is used (one per target with a left neighbour)
    b_rows: Any  # input rows whose vertical head is used (one per target with an upper neighbour)
    r_only: Any  # targets predicted by the horizontal head alone, and their rows in the horizontal logits
    r_only_src: Any
    b_only: Any
    b_only_src: Any
    both: Any  # targets predicted by the mean of both heads, and their rows in either head's logits
    both_r: Any
    both_b: Any


def _index(t: torch.Tensor, device) -> Any:
    """``t`` (1-D, CPU) as a slice when it is a run of consecutive integers, else on ``device``."""
    if t.numel() == 0:
        return None
    first = int(t[0])
    if torch.equal(t, torch.arange(first, first + t.numel())):
        return slice(first, first + t.numel())
    return t.to(device)


@register_module
class NeighborsGenerator(RasterGenerator):
    """NAR: LlamaGen backbone on the neighbors layout with horizontal and vertical heads."""

    config_class = NeighborsConfig
    supports_rows = True

    def __init__(self, config: NeighborsConfig):
        if config.layout != "neighbors":
            raise InvalidArgumentError(f"NeighborsGenerator needs the neighbors layout, got {config.layout!r}")
        if config.medusa_layers < 1:
            raise InvalidArgumentError(f"medusa_layers must be >= 1 (NAR's vertical head), got {config.medusa_layers}")
        super().__init__(config)
        for _ in range(config.medusa_layers):
            self.layers.append(TransformerBlock(config))
        self.medusa_norm = RMSNorm(config.dim, config.norm_eps)
        # varkit's Linear (same parameters as NAR's nn.Linear): its CPU decode path, as ``output`` has
        self.medusa_output = Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()
        # left / upper neighbour (layout index, -1 at the border) of every token
        n = config.grid
        coords = self.layout.coords
        index = torch.full((n, n), -1, dtype=torch.long)
        index[coords[:, 0], coords[:, 1]] = torch.arange(coords.shape[0])
        padded = torch.full((n + 1, n + 1), -1, dtype=torch.long)
        padded[1:, 1:] = index
        r, c = coords[:, 0], coords[:, 1]
        self.register_buffer("left_of", padded[r + 1, c], persistent=False)
        self.register_buffer("up_of", padded[r, c + 1], persistent=False)
        self._plans: dict[tuple[int, int, int, str], _Plan] = {}

    def reset_parameters(self) -> None:
        """NAR's init: LlamaGen's (normal 0.02, zero ``output``); ``medusa_output`` is not zeroed."""
        if hasattr(self, "medusa_output"):  # skip the call from RasterGenerator.__init__
            super().reset_parameters()

    def cache_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer + c.medusa_layers, c.n_head, c.dim // c.n_head

    # -- the transformer ---------------------------------------------------------------------------
    def _mask(self, token_idx: slice, past: int, device) -> torch.Tensor | None:
        """None (attend to every key) when the inputs are one front, else the block-causal mask.

        Every token of a front sees the whole front and everything before it, so the ancestral
        sampler's one-front calls need no mask (SDPA is faster without one, and no mask is built).
        """
        steps = self.token_steps[token_idx]
        if int(steps[0]) == int(steps[-1]):
            return None
        return super()._mask(token_idx, past, device)

    def _run(self, h: torch.Tensor, positions: slice, mask, cache: KVCache | None) -> torch.Tensor:
        """Run every layer; return ``[horizontal hidden | vertical hidden]`` (B, n, 2·dim)."""
        h = self.tok_dropout(h)
        rope = self.rope(positions)
        n_main = self.config.n_layer
        main = self._run_blocks(h, rope, mask, cache, 0, n_main)
        h = self._run_blocks(main, rope, mask, cache, n_main, len(self.layers))
        if cache is not None:
            cache.advance(h.shape[1])
        return torch.cat([main, h], -1)

    def horizontal_logits(self, hh: torch.Tensor) -> torch.Tensor:
        """Logits of the right neighbour of each row of ``hh`` (from :meth:`_run`)."""
        return self.output(self.norm(hh[..., : self.config.dim])).float()

    def vertical_logits(self, hh: torch.Tensor) -> torch.Tensor:
        """Logits of the token below each row of ``hh`` (from :meth:`_run`)."""
        return self.medusa_output(self.medusa_norm(hh[..., self.config.dim:])).float()

    def hidden_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        raise InvalidArgumentError(
            "NAR's logits for a token combine the hidden states of its left and upper neighbours; "
            "use prefill/forward, or horizontal_logits/vertical_logits on the hidden states"
        )

    def _plan(self, i0: int, t0: int, t1: int, device) -> _Plan:
        """Which input rows (inputs start at layout index ``i0``) feed targets [t0, t1)."""
        key = (i0, t0, t1, str(device))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        left = self.left_of[t0:t1].cpu()
        up = self.up_of[t0:t1].cpu()
        has_l, has_u = left >= 0, up >= 0
        if bool((left[has_l] < i0).any() or (up[has_u] < i0).any()):
            raise InvalidArgumentError("internal: a target's neighbour precedes the input block")
        r_rows, b_rows = left[has_l] - i0, up[has_u] - i0
        r_pos = torch.cumsum(has_l.long(), 0) - 1  # index into r_rows of each target with a left neighbour
        b_pos = torch.cumsum(has_u.long(), 0) - 1
        t = torch.arange(t1 - t0)
        both = has_l & has_u
        r_only, b_only = has_l & ~has_u, has_u & ~has_l
        plan = _Plan(*(_index(x, device) for x in (r_rows, b_rows, t[r_only], r_pos[r_only], t[b_only],
                                                     b_pos[b_only], t[both], r_pos[both], b_pos[both])))
        self._plans[key] = plan
        return plan

    def _combine(self, hh: torch.Tensor, i0: int, t0: int, t1: int) -> torch.Tensor:
        """Logits (B, t1-t0, V) of targets [t0, t1) from hidden rows ``hh`` of inputs from ``i0``.

        On one front at a time every index is a contiguous range (slices, no gathers): a growing
        front is [horizontal only | both | vertical only], a shrinking one [both].
        """
        p = self._plan(i0, t0, t1, hh.device)
        lr = self.horizontal_logits(hh[:, p.r_rows]) if p.r_rows is not None else None
        lb = self.vertical_logits(hh[:, p.b_rows]) if p.b_rows is not None else None
        out = hh.new_empty(hh.shape[0], t1 - t0, self.vocab_size, dtype=torch.float32)
        if p.both is not None:
            # (vertical + horizontal) / 2, in NAR's order
            if isinstance(p.both, slice):
                dst = out[:, p.both]
                torch.add(lb[:, p.both_b], lr[:, p.both_r], out=dst)
                dst.div_(2)
            else:
                out[:, p.both] = (lb[:, p.both_b] + lr[:, p.both_r]) / 2
        if p.r_only is not None:
            out[:, p.r_only] = lr[:, p.r_only_src]
        if p.b_only is not None:
            out[:, p.b_only] = lb[:, p.b_only_src]
        return out

    # -- contract: decoding ----------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cache: KVCache, order=None, layout=None) -> tuple[torch.Tensor, Any]:
        hh = self.prefill_hidden(cond, cache)
        return (self.vertical_logits(hh) + self.horizontal_logits(hh)) / 2, None

    def forward(self, tokens: torch.Tensor, step: int, cache: KVCache, state: Any = None) -> torch.Tensor:
        """Tokens of fronts ``step-1 …`` → logits of fronts ``step …`` (as many fronts as were fed)."""
        if step < 1:
            raise InvalidArgumentError(f"forward needs step >= 1 (step 0 comes from prefill), got {step}")
        k = self.num_steps_in(tokens.shape[1], step)
        if step - 1 + k > self.layout.num_steps - 1:
            raise InvalidArgumentError(
                f"fronts {step}..{step + k - 1} do not exist: the {self.config.grid}x{self.config.grid} grid has "
                f"fronts 0..{self.layout.num_steps - 1}"
            )
        compiled = self.__dict__.get("_compiled_step")
        if compiled is not None and k == 1 and not self.training and not torch.is_grad_enabled():
            return self._compiled_front(compiled, tokens, step, cache)
        hh = self.forward_hidden(tokens, step, cache)
        starts = self.layout.step_starts
        return self._combine(hh, starts[step - 1], starts[step], starts[step + k])

    def _compiled_front(self, compiled, tokens: torch.Tensor, step: int, cache: KVCache) -> torch.Tensor:
        """One front through the compiled per-row step: inputs padded to the widest front (one static shape for
        every step), all rows at ``step``; the padding's cache writes lie past the front and are never read."""
        self._check_cache_at(step, cache)
        B, m = tokens.shape[:2]
        width = max(self.layout.step_sizes)
        if m < width:
            tokens = torch.cat([tokens, tokens[:, :1].expand(B, width - m)], 1)
        out = compiled(tokens, torch.full((B,), step, device=tokens.device), cache.k, cache.v)
        cache.advance(m)
        return out[:, : self.layout.step_sizes[step]]

    def _rows_outputs(self, hh: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Logits of targets ``step_starts[steps] + j`` from the hidden rows ``hh`` (B, n, 2·dim) of inputs from
        ``step_starts[steps - 1]``: :meth:`_combine`'s rule with per-row gathers (static shapes). A target whose
        neighbour lies past the inputs gets garbage (``valid_row_outputs`` counts the valid ones)."""
        B, n = hh.shape[:2]
        d = self.config.dim
        targets = (self.step_starts[steps][:, None] + torch.arange(n, device=hh.device)).clamp(
            max=self.layout.num_tokens - 1)
        first = self.step_starts[steps - 1][:, None]
        left, up = self.left_of[targets], self.up_of[targets]
        h_left = hh[..., :d].gather(1, (left - first).clamp(0, n - 1)[..., None].expand(B, n, d))
        h_up = hh[..., d:].gather(1, (up - first).clamp(0, n - 1)[..., None].expand(B, n, d))
        lr = self.output(self.norm(h_left)).float()
        lb = self.medusa_output(self.medusa_norm(h_up)).float()
        has_l, has_u = (left >= 0)[..., None], (up >= 0)[..., None]
        # (vertical + horizontal) / 2 where both neighbours exist, in NAR's order; else the one head there is
        return torch.where(has_l & has_u, (lb + lr) / 2, torch.where(has_l, lr, lb))

    # -- training ------------------------------------------------------------------------------------
    def teacher_forcing_logits(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """NAR's training forward: logits (B, n, V) of tokens 0..n-1 (layout order) in one pass.

        Inputs are ``[cond] + tokens[:, :-1]`` under the proximity mask; token 0 takes the mean of
        both heads at the last condition token, the others combine their neighbours' heads as in
        decoding. Cross-entropy against ``tokens`` is NAR's loss. ``tokens`` may be a prefix.
        """
        n = tokens.shape[1]
        h = torch.cat([self._cond_embeddings(cond), self.tok_embeddings(tokens[:, :-1])], 1)
        L = h.shape[1]
        steps = torch.cat([torch.arange(self.cond_len, device=h.device) - self.cond_len,
                           self.token_steps[: n - 1].to(h.device)])
        hh = self._run(h, slice(0, L), block_causal_mask(steps, steps), None)
        first = hh[:, self.cond_len - 1: self.cond_len]
        out = [(self.vertical_logits(first) + self.horizontal_logits(first)) / 2]
        if n > 1:
            out.append(self._combine(hh[:, self.cond_len:], 0, 1, n))
        return torch.cat(out, 1)
