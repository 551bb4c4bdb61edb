"""Distilled Decoding 2 (DD2, Liu et al., NeurIPS 2025): a one-step generator by conditional score distillation.

The teacher AR model's categorical p over codewords c_j, read as a flow from N(0, I) at t = 1 to Σ_j p_j δ(c_j)
at t = 0 on RectFlow's path x_t = (1 − t)·x_0 + t·ε, has the closed-form score (the paper's Eq. 1)

    s(x, t) = ((1 − t)·ĉ − x) / t²,   ĉ = Σ_j w_j c_j,   w_j ∝ p_j · exp(−‖x − (1 − t) c_j‖² / (2t²)),

at every token position, given the previous tokens (:func:`teacher_score`). A guidance network ψ (the teacher's
transformer plus an MLP velocity head) learns the same conditional score for the *generator's* samples
(:func:`fcs_loss`, Eq. 5), after a first tuning towards the teacher's exact score (:func:`gts_loss`, Eq. 6). The
generator is trained with the conditional score distillation loss (:func:`csd_loss`, Eq. 4: SiD's loss with
α = 1 at every position, the prefix under stop-gradient); ψ and the generator alternate.

The generator is a DD1 student (:class:`varkit.models.dd.DDRasterGenerator`: noise in, continuous tokens out,
sampled unchanged by ``sampler="distilled"`` with ``dd_split = 0``). Time runs the paper's way here (t = 1 noise,
t = 0 data), the reverse of DD1's flow in :mod:`varkit.distill.flow`. What is the paper's and what is varkit's
choice: docs/dd2.md.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DataError, InvalidArgumentError

T_MIN, T_MAX = 0.02, 0.98  # range of the noise levels t drawn in every loss (not in the decoded paper text: docs/dd2.md)
TIME_SCALE = 1000.0  # the MLP head's timestep embedding takes t in MAR's 0..999 units


# -- the teacher's conditional score (Eq. 1) -------------------------------------------------------------------------
def _t_last(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``t`` (…) or a number → (…, 1) in ``like``'s dtype, broadcasting against x (…, d)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t[..., None] if t.dim() else t.reshape(1)


def mixture_denoiser(x: torch.Tensor, t: torch.Tensor | float, log_p: torch.Tensor,
                     codebook: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x_t = x] (…, d) under x_0 ~ Σ_j p_j δ(c_j), x_t = (1 − t)x_0 + tε: Σ_j w_j c_j with
    log w_j = log p_j − ‖x − (1 − t)c_j‖²/(2t²) + const (``‖x‖²`` cancels in the softmax)."""
    tt = _t_last(t, x)
    a = 1.0 - tt
    book = codebook.to(x.dtype)
    logits = log_p.to(x.dtype) + (a * (x @ book.T) - 0.5 * a * a * book.square().sum(-1)) / (tt * tt)
    return logits.softmax(-1) @ book


def teacher_score(x: torch.Tensor, t: torch.Tensor | float, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """∇_x log Σ_j p_j N(x; (1 − t)c_j, t²I) = ((1 − t)ĉ − x)/t² (the paper's Eq. 1)."""
    tt = _t_last(t, x)
    return ((1.0 - tt) * mixture_denoiser(x, t, log_p, codebook) - x) / (tt * tt)


def teacher_velocity(x: torch.Tensor, t: torch.Tensor | float, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """E[ε − x_0 | x_t = x] = −(t·s + x)/(1 − t) = (x − ĉ)/t: the velocity the networks are trained on (App. E.1)."""
    return (x - mixture_denoiser(x, t, log_p, codebook)) / _t_last(t, x)


# -- losses ------------------------------------------------------------------------------------------------------------
def draw_times(shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels t ~ U(T_MIN, T_MAX), one per entry of ``shape``."""
    return T_MIN + (T_MAX - T_MIN) * torch.rand(shape, device=device, generator=generator)


def csd_loss(x_g: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, log_p: torch.Tensor, codebook: torch.Tensor,
             fake_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Conditional score distillation (Eq. 4) with SiD's d at α = 1 (Eq. 3), summed over positions.

    ``x_g`` (B, N, d) the generator's tokens (with gradient), ``eps``/``t`` their noise (B, N, d) / (B, N),
    ``log_p`` (B, N, V) the teacher's conditionals given the (stop-gradient) prefix, ``fake_velocity(x_t, t)``
    the guidance network's velocity at the same positions (its parameters frozen by the caller; the gradient
    flows through x_t). In denoiser form y = x_t − t·v: ``(y_real − y_fake)·(y_fake − x_g) / mean|x_g − y_real|``
    per sample, SiD's loss and weighting."""
    tt = t[..., None].to(x_g.dtype)
    x_t = (1.0 - tt) * x_g + tt * eps
    y_real = mixture_denoiser(x_t, t, log_p, codebook)
    y_fake = x_t - tt * fake_velocity(x_t, t)
    with torch.no_grad():
        weight = (x_g - y_real).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-5)
    per = (y_real - y_fake) * (y_fake - x_g) / weight
    loss = per.sum(dim=(1, 2)).mean()
    gap = (y_real - y_fake).detach().square().sum(-1).mean()
    return loss, {"csd": float(loss.detach()), "score_gap": float(gap)}


def _noisy_copies(x0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m noisy copies of every token of ``x0`` (B, N, d) (App. C.2): (x_t, t, ε), shapes (B, N, m, d)/(B, N, m)."""
    x0 = x0[:, :, None].expand(-1, -1, m, -1)
    t = draw_times(x0.shape[:3], x0.device)
    eps = torch.randn_like(x0)
    tt = t[..., None]
    return (1.0 - tt) * x0 + tt * eps, t, eps


def fcs_loss(guidance: "GuidanceNet", feats: torch.Tensor, x0: torch.Tensor, m: int) -> torch.Tensor:
    """Eq. (5), velocity form: the guidance learns the generator's conditional score from its tokens ``x0``
    (B, N, d) (no gradient to the generator), target ε − x_0, ``m`` noisy copies per token."""
    x_t, t, eps = _noisy_copies(x0.detach(), m)
    v = guidance.velocity(x_t, t, feats[:, :, None].expand(-1, -1, m, -1))
    return (v - (eps - x0.detach()[:, :, None])).square().sum(-1).mean()


def gts_loss(guidance: "GuidanceNet", feats: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor,
             codebook: torch.Tensor, m: int) -> torch.Tensor:
    """Eq. (6), the Ground Truth Score loss: Eq. (5) with the Monte-Carlo target replaced by the teacher's exact
    conditional velocity (from Eq. 1) at the noisy copies of the teacher's tokens ``ids`` (B, N)."""
    x_t, t, _ = _noisy_copies(codebook[ids], m)
    target = teacher_velocity(x_t, t, log_p[:, :, None].expand(-1, -1, m, -1), codebook)
    v = guidance.velocity(x_t, t, feats[:, :, None].expand(-1, -1, m, -1))
    return (v - target).square().sum(-1).mean()


# -- the networks --------------------------------------------------------------------------------------------------
class GuidanceNet(nn.Module):
    """The conditional guidance network ψ (§3.2.3): a causal transformer (a copy of the teacher's, reading token
    ids) gives f_i from the tokens before i; MAR's MLP head maps (x_t, t, f_i) to a velocity."""

    def __init__(self, backbone: nn.Module, token_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        from ..models.diffusion import DiffusionMLP

        self.backbone = backbone
        self.head = DiffusionMLP(token_dim, width, token_dim, backbone.config.dim, depth)

    def features(self, cond: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, N, dim): position i's feature sees the condition and ``ids[:, :i]`` (the teacher's teacher-forcing
        pass, normed hidden states instead of logits)."""
        from ..nn.attention import block_causal_mask

        g = self.backbone
        h = torch.cat([g._cond_embeddings(cond), g.tok_embeddings(ids[:, :-1])], 1)
        steps = torch.cat([torch.arange(g.cond_len, device=h.device) - g.cond_len, g.token_steps[:ids.shape[1] - 1]])
        h = g._run(h, slice(0, h.shape[1]), block_causal_mask(steps, steps), None)
        return g.norm(h[:, g.cond_len - 1:])

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """v_ψ (…, d) at noisy tokens ``x_t`` (…, d), levels ``t`` (…), features ``feats`` (…, dim)."""
        shape = x_t.shape
        out = self.head(x_t.reshape(-1, shape[-1]), (t.reshape(-1) * TIME_SCALE).to(x_t.dtype),
                        feats.reshape(-1, feats.shape[-1]))
        return out.view(shape)


def teacher_log_probs(teacher, params, cond: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p_Φ(· | ids_<i) (B, N, V) for every position, under the teacher's sampling settings ``params`` (CFG by
    its schedule, temperature, top-k/top-p: −inf outside), in one teacher-forcing pass (two with CFG)."""
    from ..samplers.logits import mix_cfg, processed_probs

    layout = teacher.layout
    S = layout.num_steps
    w = torch.tensor([params.guidance(s, S) for s in range(S)], device=ids.device)[layout.step_of.to(ids.device)]
    with torch.no_grad():
        if bool((w == 1).all()):
            logits = teacher.teacher_forcing_logits(cond, ids)
        else:
            both = teacher.teacher_forcing_logits(torch.cat([cond, teacher.null_condition(cond)]), torch.cat([ids, ids]))
            logits = mix_cfg(both, w[None, :, None])
        return processed_probs(logits.float(), params).log()


def generate(student, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The generator's continuous tokens (B, N, d) for ``noise`` (B, N, d): one DD pass from t = 0."""
    return student.dd_forward(noise, cond, torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device))[0]


def nearest_ids(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    from .flow import nearest_codeword

    return nearest_codeword(x.detach().float(), codebook)


# -- training -------------------------------------------------------------------------------------------------------
def _check(name: str, value: Any, kind: type, lo: float, hi: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) \
        and math.isfinite(value) and value >= lo and (hi is None or value <= hi)
    if not ok:
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise InvalidArgumentError(f"--{name} must be {'a number' if kind is float else 'an integer'} {span}, got {value!r}")


def check_dd2_options(gts_steps: int, steps: int, guidance_updates: int, batch_size: int, gen_lr: float,
                      gui_lr: float, warmup: int, ema: float, noise_samples: int, head_width: int, head_depth: int,
                      eval_every: int, log_every: int = 1) -> None:
    """One clear line for any bad setting, before anything is loaded."""
    for name, v, lo in (("gts-steps", gts_steps, 0), ("steps", steps, 1), ("guidance-updates", guidance_updates, 1),
                        ("batch-size", batch_size, 1), ("warmup", warmup, 0), ("noise-samples", noise_samples, 1),
                        ("head-width", head_width, 1), ("head-depth", head_depth, 0), ("eval-every", eval_every, 0),
                        ("log-every", log_every, 1)):
        _check(name, v, int, lo)
    for name, v in (("gen-lr", gen_lr), ("gui-lr", gui_lr)):
        _check(name, v, float, 0.0)
        if v == 0:
            raise InvalidArgumentError(f"--{name} must be > 0, got {v!r}")
    _check("ema", ema, float, 0.0, 1.0)
    if ema == 1:
        raise InvalidArgumentError("--ema must be < 1 (the cap of the progressive EMA rate), got 1")


def load_generator_init(init: str | Path, teacher_tokenizer, device):
    """A DD1 student folder's generator as a one-step DD2 generator (continuous output for every token)."""
    from ..models.dd import DDRasterGenerator
    from ..pipeline import load_pipeline

    g = load_pipeline(init, device=device).generator
    if type(g) is not DDRasterGenerator:
        raise InvalidArgumentError(
            f"--init must be a DD1 student of a raster teacher (made by `varkit train distill`); {init} holds a "
            f"{type(g).__name__}")
    g.bind_codebook(teacher_tokenizer)  # refuses a student of another tokenizer
    student = DDRasterGenerator(replace(g.config, dd_timesteps=(0,), dd_split=0))
    student.load_state_dict(g.state_dict())
    return student.to(device)


def _sample_eval(student, pipe_tok, noise, labels):
    """Accuracy and digits-FID of one-step samples (monitoring only)."""
    from ..eval.digits import digits_fid
    from ..pipeline import Pipeline

    with torch.no_grad():
        ids = nearest_ids(generate(student, noise, labels), student.codebook.float())
    imgs = Pipeline(pipe_tok, student, {}).decode(ids)
    m = digits_fid(imgs, labels.tolist())
    return {"acc": float(m["accuracy"]), "fid": float(m["fid"])}


def train_dd2(teacher: str | Path, data: str | Path, out: str | Path, *, init: str | Path | None = None,
              gts_steps: int = 300, steps: int = 500, guidance_updates: int = 2, batch_size: int = 32,
              gen_lr: float = 1e-4, gui_lr: float = 2e-4, warmup: int = 100, ema: float = 0.9999,
              noise_samples: int = 4, head_width: int = 256, head_depth: int = 3, seed: int = 0,
              log_every: int = 10, eval_every: int = 0, device: str | None = None):
    """DD2 of a raster teacher: GTS tuning of the guidance network on the teacher sequences in ``data`` (a
    `varkit distill data` folder), then alternating guidance (Eq. 5) and generator (Eq. 4) updates. Saves a
    pipeline to ``out`` that samples in one pass with ``sampler="distilled"``; logs in ``out/train-dd2``."""
    from ..device import resolve_device
    from ..io import torch_save, write_text
    from ..models.dd import check_teacher, student_from_teacher, tokenizer_codebook
    from ..models.raster import RasterGenerator
    from ..pipeline import Pipeline, load_pipeline
    from ..train.loop import plot_loss
    from .data import load_distill_data, same_setting, weights_fingerprint

    check_dd2_options(gts_steps, steps, guidance_updates, batch_size, gen_lr, gui_lr, warmup, ema, noise_samples,
                      head_width, head_depth, eval_every, log_every)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    tpipe = load_pipeline(teacher, device=dev)
    tgen = tpipe.generator.eval().requires_grad_(False)
    check_teacher(tgen)
    if type(tgen) is not RasterGenerator:
        raise InvalidArgumentError(
            f"varkit's DD2 takes a raster (LlamaGen) teacher; {teacher} is a {type(tgen).__name__} (VAR DD2 is not "
            "implemented)")
    params = tpipe.sampling_params()
    book = tokenizer_codebook(tpipe.tokenizer).to(dev)
    _, tokens, labels, manifest = load_distill_data(data)
    want = {"num_tokens": tgen.layout.num_tokens, "codebook_dim": int(book.shape[1]), "vocab_size": tgen.vocab_size,
            "teacher_fingerprint": weights_fingerprint(tgen)}
    bad = sorted(k for k, v in want.items() if not same_setting(manifest.get(k), v))
    if bad:
        raise DataError(f"{data} was made by another teacher or tokenizer ({', '.join(bad)} differ from {teacher}'s); "
                        f"make the data with `varkit distill data --teacher {teacher}`")
    if init is not None:
        student = load_generator_init(init, tpipe.tokenizer, dev)
    else:
        student = student_from_teacher(tgen, tpipe.tokenizer, dd_timesteps=(0,), dd_split=0)
    student.eval()  # no dropout; gradients still flow
    guidance = GuidanceNet(copy.deepcopy(tgen).requires_grad_(True), int(book.shape[1]), head_width, head_depth).to(dev)
    guidance.eval()
    N, d, C = tgen.layout.num_tokens, int(book.shape[1]), tgen.num_classes
    run_dir = Path(out) / "train-dd2"
    history: list[dict] = []
    t0 = time.process_time()

    def log(row: dict) -> None:
        row = {**row, "cpu_s": round(time.process_time() - t0, 1)}
        history.append(row)
        print(json.dumps(row), flush=True)

    eval_gen = torch.Generator().manual_seed(seed + 1)
    eval_labels = torch.arange(C).repeat_interleave(20).to(dev)
    eval_noise = torch.randn(len(eval_labels), N, d, generator=eval_gen).to(dev)
    if eval_every:
        log({"phase": "init", "step": 0, "loss": 0.0, **_sample_eval(student, tpipe.tokenizer, eval_noise, eval_labels)})

    # stage 1: GTS tuning (Eq. 6) of the guidance network towards the teacher's exact conditional score
    opt_psi = torch.optim.Adam(guidance.parameters(), lr=gui_lr, betas=(0.9, 0.95))
    tokens, labels = tokens.to(dev), labels.to(dev)
    for step in range(1, gts_steps + 1):
        idx = torch.randint(len(tokens), (batch_size,))
        ids, cond = tokens[idx], labels[idx]
        log_p = teacher_log_probs(tgen, params, cond, ids)
        loss = gts_loss(guidance, guidance.features(cond, ids), ids, log_p, book, noise_samples)
        opt_psi.zero_grad(set_to_none=True)
        loss.backward()
        opt_psi.step()
        if step % log_every == 0 or step == gts_steps:
            log({"phase": "gts", "step": step, "loss": float(loss.detach())})

    # stage 2: alternate K guidance updates (Eq. 5) and one generator update (Eq. 4)
    ema_model = copy.deepcopy(student).requires_grad_(False)
    opt_g = torch.optim.Adam(student.parameters(), lr=gen_lr, betas=(0.9, 0.95))
    opt_psi = torch.optim.Adam(guidance.parameters(), lr=gui_lr, betas=(0.9, 0.95))

    def draw(B: int):
        return torch.randn(B, N, d, device=dev), torch.randint(C, (B,), device=dev)

    for step in range(1, steps + 1):
        for _ in range(guidance_updates):
            noise, cond = draw(batch_size)
            with torch.no_grad():
                x_g = generate(student, noise, cond)
            feats = guidance.features(cond, nearest_ids(x_g, book))
            l_psi = fcs_loss(guidance, feats, x_g, noise_samples)
            opt_psi.zero_grad(set_to_none=True)
            l_psi.backward()
            opt_psi.step()
        lr = gen_lr if warmup == 0 else 1e-6 + (gen_lr - 1e-6) * min(1.0, step / warmup)
        for g in opt_g.param_groups:
            g["lr"] = lr
        noise, cond = draw(batch_size)
        x_g = generate(student, noise, cond)
        ids = nearest_ids(x_g, book)  # the prefix is stop-gradient: its ids are all the teacher and ψ need
        log_p = teacher_log_probs(tgen, params, cond, ids)
        guidance.requires_grad_(False)
        with torch.no_grad():
            feats = guidance.features(cond, ids)
        t = draw_times((batch_size, N), dev)
        loss, stats = csd_loss(x_g, torch.randn_like(x_g), t, log_p, book, lambda x, s: guidance.velocity(x, s, feats))
        guidance.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        rate = min(ema, (step + 1) / (step + 10))  # the paper's progressive EMA (App. E.3), capped at --ema
        with torch.no_grad():
            for pe, p in zip(ema_model.parameters(), student.parameters()):
                pe.lerp_(p, 1.0 - rate)
        if step % log_every == 0 or step == steps:
            row = {"phase": "csd", "step": step, "loss": stats["csd"], "fcs": float(l_psi.detach()),
                   "score_gap": stats["score_gap"], "gen_lr": lr}
            if eval_every and (step % eval_every == 0 or step == steps):
                row.update(_sample_eval(ema_model, tpipe.tokenizer, eval_noise, eval_labels))
            log(row)

    defaults = {**tpipe.defaults, "sampler": "distilled", "sampler_options": {"steps": 1}}
    pipe = Pipeline(tpipe.tokenizer, ema_model, defaults, name=Path(out).name)
    pipe.save_pretrained(out)
    write_text(run_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_loss([h for h in history if h["phase"] == "csd"], run_dir / "loss.png")
    torch_save({"generator": student.state_dict(), "ema": ema_model.state_dict(), "guidance": guidance.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_psi": opt_psi.state_dict(), "step": steps}, run_dir / "checkpoint.pt")
    from ..train.distill import tpipe_dir

    tdir = tpipe_dir(teacher)
    for src, dst in ((tdir / "tokenizer" / "COMMAND.txt", Path(out) / "tokenizer" / "COMMAND.txt"),
                     (Path(data) / "COMMAND.txt", Path(out) / "generator" / "DATA_COMMAND.txt")):
        if src.is_file():
            write_text(dst, src.read_text())
    if init is not None:
        init_cmd = Path(init if Path(init).is_dir() else tpipe_dir(init)) / "generator" / "COMMAND.txt"
        if init_cmd.is_file():
            write_text(Path(out) / "generator" / "INIT_COMMAND.txt", init_cmd.read_text())
    return pipe
