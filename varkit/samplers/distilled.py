"""``sampler="distilled"``: Distilled Decoding (DD1) — a whole image in one or two student passes.

The student (``varkit train distill``; :mod:`varkit.models.dd`) maps noise ε (B, N, d) to every token at once.
One step: X_0 = ε, one pass. Two steps: keep the tokens of the first ``mid`` layout steps, put the **same**
noise back after them and run a second pass from t = ``mid`` (official ``t_list 0,mid``). Positions before
layout step ``split`` take the argmax-logit codeword, later ones the codeword nearest to the continuous
prediction (official ``split_t``; the official code decodes that continuous vector as it is, varkit's tokens are
ids). Known tokens stay as they are.

Teacher-involved (``teacher=``, ``teacher_from=k``): a student pass gives the first k steps (skipped for k = 0),
the teacher maps the same noise through DD1's flow map for steps k … ``mid``−1 (deterministic, so the image is
still a function of the noise; the official code samples these steps ancestrally), and a last student pass
from t = ``mid`` gives the rest (official ``combine_sample.py`` / ``eval_combine_sample.py``).

Guarantee: none beyond the teacher's. The student approximates the teacher's flow map under the sampling
settings its data was made with (the teacher's CFG is baked in; cfg/top-k/top-p here only steer the
teacher-involved part). ``noise`` (B, N, d) makes a draw reproducible; rows are used in order across the
batches of one pipeline call. Without it, image i's noise comes from its own generator (same image at any
batch size). ``stats.forward_passes`` counts student and teacher passes.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgumentError
from .base import SampleResult, Sampler, SamplerStats
from .logits import SamplingParams
from .random import Randomness


def _int_option(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgumentError(f"distilled sampler: {name} must be an integer in {lo}..{hi}, got {v!r}")
    return v


class DistilledSampler(Sampler):
    """DD1 sampling; ``steps`` 1 or 2, ``mid``/``split`` (layout steps; default: the student's), ``noise``,
    ``teacher``/``teacher_from`` (teacher-involved), ``flow_steps`` (the teacher's Euler steps)."""

    name = "distilled"
    lossless = False

    def __init__(self, params: SamplingParams | None = None, steps: int = 1, noise: torch.Tensor | None = None,
                 mid: int | None = None, split: int | None = None, teacher: Any = None,
                 teacher_from: int | None = None, flow_steps: int = 32):
        super().__init__(params)
        if isinstance(steps, bool) or steps not in (1, 2):
            raise InvalidArgumentError(f"distilled sampler: steps must be 1 or 2 (student passes), got {steps!r}")
        if noise is not None and not isinstance(noise, torch.Tensor):
            raise InvalidArgumentError(f"distilled sampler: noise must be a tensor (B, N, d), got {type(noise).__name__}")
        if teacher is None and teacher_from is not None:
            raise InvalidArgumentError("distilled sampler: teacher_from needs teacher= (the model the student was distilled from)")
        if teacher is not None and steps == 2:
            raise InvalidArgumentError(
                "distilled sampler: steps=2 and teacher= exclude each other; the teacher-involved variant's passes "
                "are set by teacher_from (and the student's mid step)")
        _int_option("flow_steps", flow_steps, 1, 10**6)
        self.steps, self.noise, self.mid, self.split = steps, noise, mid, split
        self.teacher_from, self.flow_steps = teacher_from, flow_steps
        self.teacher = self.teacher_tokenizer = None
        if teacher is not None:
            from ..models.dd import check_teacher
            from .speculative import resolve_draft

            self.teacher, self.teacher_tokenizer = resolve_draft(teacher, role="teacher")
            check_teacher(self.teacher)
            self.teacher.eval()
            if self.teacher_tokenizer is not None:
                self.teacher.bind_tokenizer(self.teacher_tokenizer)  # VAR builds its inputs with it
        self._cursor = 0  # rows of ``noise`` used by earlier batches of this call

    def bind_tokenizer(self, tokenizer) -> None:
        """The student pipeline's tokenizer: a teacher given without one (a bare generator) decodes with it."""
        if self.teacher is not None and self.teacher_tokenizer is None:
            self.teacher.bind_tokenizer(tokenizer)

    def check_generator(self, gen) -> None:
        if not getattr(gen, "is_dd_student", False):
            raise InvalidArgumentError(
                f"sampler='distilled' drives a distilled-decoding student (made by `varkit train distill`); "
                f"{type(gen).__name__} is not one (use sampler='ancestral')")
        if self.teacher is not None:
            from .speculative import check_same_tokens

            check_same_tokens(gen, self.teacher, None, None, roles=("student", "teacher"))
            if self.teacher_tokenizer is not None:
                gen.bind_codebook(self.teacher_tokenizer)

    # -- settings that depend on the student ----------------------------------------------------------------------
    def _mid(self, gen) -> int:
        S = gen.layout.num_steps
        if self.mid is not None:
            return _int_option("mid", self.mid, 1, S - 1)
        trained = [t for t in gen.config.dd_timesteps if t > 0]
        if not trained:
            raise InvalidArgumentError(
                "distilled sampler: this student was trained for one step only (dd_timesteps has no step > 0); "
                "pass mid= (a layout step) or sample with steps=1")
        return max(trained)

    def _split(self, gen) -> int:
        S = gen.layout.num_steps
        v = self.split if self.split is not None else gen.config.dd_split
        return S if v is None else _int_option("split", v, 0, S)

    def _noise(self, gen, rng: Randomness, B: int, device) -> torch.Tensor:
        N, d = gen.layout.num_tokens, gen.codebook.shape[1]
        if self.noise is None:
            return rng.normals(N, d).to(device)
        z = self.noise
        if z.dim() != 3 or tuple(z.shape[1:]) != (N, d):
            raise InvalidArgumentError(
                f"distilled sampler: noise must have shape (B, {N}, {d}) for this model ({N} tokens of dim {d}), "
                f"got {tuple(z.shape)}")
        if z.shape[0] < self._cursor + B:
            raise InvalidArgumentError(
                f"distilled sampler: noise has {z.shape[0]} rows but {self._cursor + B} images were asked for; "
                "pass one row per image")
        out = z[self._cursor:self._cursor + B]
        self._cursor += B
        return out.to(device=device, dtype=torch.float32)

    # -- sampling ----------------------------------------------------------------------------------------------------
    def _student_pass(self, gen, cond, x, noise, ids, t: int, split_at: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass from X_t (data = ``x`` before step t, ``noise`` after); returns the new (x, ids)."""
        layout = gen.layout
        N = layout.num_tokens
        pos = torch.arange(N, device=cond.device)
        n_t, n_split = layout.step_starts[t], layout.step_starts[split_at]
        xt = torch.where((pos < n_t)[None, :, None], x, noise)
        conti, logits = gen.dd_forward(xt, cond, torch.full((cond.shape[0],), t, device=cond.device))
        from ..distill.flow import nearest_codeword

        book = gen.codebook.float()
        arg = logits.argmax(-1)
        if n_split >= N:  # the default: every new token is the argmax codeword
            new_ids, new_x = arg, book[arg]
        else:
            new_ids = torch.where(pos[None] < n_split, arg, nearest_codeword(conti, book))
            new_x = torch.where((pos < n_split)[None, :, None], book[arg], conti)
        keep = (pos < n_t)[None]
        return torch.where(keep[..., None], x, new_x), torch.where(keep, ids, new_ids)

    def _sample(self, gen, cond, gens, progress) -> SampleResult:
        rng = Randomness(gens, cond.device) if isinstance(gens, (list, tuple)) else gens
        gen.check_condition(cond)
        layout = gen.layout
        B, N, S = cond.shape[0], layout.num_tokens, layout.num_steps
        split_at = self._split(gen)
        noise = self._noise(gen, rng, B, cond.device)
        x = noise.clone()
        ids = torch.zeros(B, N, dtype=torch.long, device=cond.device)
        passes, committed = 0, []
        if self.teacher is None:
            plan = [0] if self.steps == 1 else [0, self._mid(gen)]
            for i, t in enumerate(plan):
                x, ids = self._student_pass(gen, cond, x, noise, ids, t, split_at)
                passes += 1
                end = plan[i + 1] if i + 1 < len(plan) else S
                committed.append(float(layout.step_starts[end] - layout.step_starts[t]))
        else:
            from ..distill.flow import teacher_flow

            mid = self._mid(gen)
            k = _int_option("teacher_from", 0 if self.teacher_from is None else self.teacher_from, 0, mid)
            if k > 0:
                x, ids = self._student_pass(gen, cond, x, noise, ids, 0, split_at)
                passes += 1
                committed.append(float(layout.step_starts[k]))
            ids, tp = teacher_flow(self.teacher, cond, noise, self.params, gen.codebook.float(), self.flow_steps,
                                   tokens=ids, start=k, stop=mid)
            passes += tp  # prefill and prefix feeding commit nothing; then one layout step a pass
            committed += [0.0] * (tp - (mid - k)) + [float(n) for n in layout.step_sizes[k:mid]]
            x = gen.codebook.float()[ids]
            x, ids = self._student_pass(gen, cond, x, noise, ids, mid, split_at)
            passes += 1
            committed.append(float(N - layout.step_starts[mid]))
        stats = SamplerStats(forward_passes=passes, steps=passes, accepted_per_pass=committed, cache_bytes=0)
        return SampleResult(ids, stats)
