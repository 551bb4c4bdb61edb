"""``varkit train distill``: a DD1 student from a teacher and its (noise, tokens) data.

The student starts as its teacher (:func:`varkit.models.dd.student_from_teacher`). Each training row draws a
timestep t from ``timesteps`` (layout steps; 0 trains one-step sampling, a later t the second pass of two-step
sampling and the end of the teacher-involved variant) and sees X_t = (codewords of the teacher's tokens before
step t, the row's noise from step t on); every position from step t on is trained to give the teacher's token:
cross-entropy on the logits plus ``mse_weight`` × the squared distance of the continuous output to the token's
codeword (the official training code is not public; its unused ``--loss_norm lpips`` flag suggests an LPIPS
term on decoded images, which varkit leaves out: it needs VGG weights). The loop is ``varkit.train.loop``'s
(AdamW, warm-up + cosine, EMA, checkpoints, resume, DDP under torchrun).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, InvalidArgumentError
from ..io import write_text
from .loop import Trainer, TrainConfig, init_distributed


class DDPass(nn.Module):
    """The student's one-pass prediction as a module's ``forward``, so DistributedDataParallel can wrap it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.dd_forward(x, cond, t)


def parse_timesteps(spec: str | list[int] | tuple[int, ...], num_steps: int) -> tuple[int, ...]:
    """``"0,20"`` → (0, 20): distinct layout steps in 0..num_steps-1, 0 first (one-step sampling needs it)."""
    if isinstance(spec, str):
        try:
            vals = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            vals = None
    else:
        vals = list(spec)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) for v in vals) or len(set(vals)) != len(vals) \
            or vals[0] != 0 or any(not 0 <= v < num_steps for v in vals):
        raise InvalidArgumentError(
            f"--timesteps must be distinct layout steps in 0..{num_steps - 1}, starting with 0 (e.g. 0,{num_steps // 3}), "
            f"got {spec!r}")
    return tuple(vals)


def make_dd_loss(student, codebook: torch.Tensor, timesteps: tuple[int, ...], mse_weight: float):
    """Loss of a batch (noise, tokens, labels): CE + mse_weight·‖ĉ − e‖² over the positions from step t on."""
    ts = torch.tensor(timesteps)

    def dd_loss(model, batch):
        noise, tokens, labels = batch
        B, N = tokens.shape
        t = ts[torch.randint(len(ts), (B,))].to(tokens.device)
        data = codebook[tokens]
        pred = torch.arange(N, device=tokens.device)[None] >= student.n_data(t)[:, None]  # (B, N) positions to predict
        x = torch.where(pred[..., None], noise, data)
        conti, logits = model(x, labels, t)
        ce = F.cross_entropy(logits[pred].float(), tokens[pred])
        mse = (conti[pred].float() - data[pred]).square().sum(-1).mean()
        acc = (logits[pred].argmax(-1) == tokens[pred]).float().mean()
        return ce + mse_weight * mse, {"ce": float(ce.detach()), "mse": float(mse.detach()), "token_acc": float(acc)}

    return dd_loss


def train_distill(teacher: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig,
                  timesteps: str | tuple[int, ...] = "0", mse_weight: float = 1.0, split: int | None = None,
                  device: str | None = None, resume: str | None = None):
    """Distil ``teacher`` (bundled name or pipeline folder) on the pairs in ``data`` into a student pipeline saved
    to ``out``; its folder samples with ``sampler="distilled"`` (one step) by default."""
    from ..device import resolve_device
    from ..distill.data import load_distill_data, same_setting, weights_fingerprint
    from ..models.dd import check_teacher, student_from_teacher, tokenizer_codebook
    from ..pipeline import Pipeline, load_pipeline

    if not mse_weight >= 0:
        raise InvalidArgumentError(f"--mse-weight must be >= 0, got {mse_weight}")
    dev = resolve_device(device)
    init_distributed(dev)
    torch.manual_seed(cfg.seed)
    tpipe = load_pipeline(teacher, device=dev)
    tgen = tpipe.generator.requires_grad_(False)
    check_teacher(tgen)
    layout = tgen.layout
    steps = parse_timesteps(timesteps, layout.num_steps)
    if split is not None and (isinstance(split, bool) or not 0 <= split <= layout.num_steps):
        raise InvalidArgumentError(f"--split must be a layout step in 0..{layout.num_steps}, got {split!r}")
    noise, tokens, labels, manifest = load_distill_data(data)
    codebook = tokenizer_codebook(tpipe.tokenizer).to(dev)
    want = {"num_tokens": layout.num_tokens, "codebook_dim": int(codebook.shape[1]), "vocab_size": tgen.vocab_size,
            "teacher_fingerprint": weights_fingerprint(tgen)}
    bad = sorted(k for k, v in want.items() if not same_setting(manifest.get(k), v))
    if bad:
        raise DataError(
            f"{data} was made by another teacher or tokenizer ({', '.join(bad)} differ from {teacher}'s); "
            f"make the data with `varkit distill data --teacher {teacher}`")
    student = student_from_teacher(tgen, tpipe.tokenizer, dd_timesteps=steps, dd_split=split)
    del tgen
    meta: dict[str, Any] = {"teacher_fingerprint": want["teacher_fingerprint"], "data_num": manifest["num"],
                            "data_seed": manifest["seed"], "timesteps": list(steps), "mse_weight": float(mse_weight)}
    loss = make_dd_loss(student, codebook, steps, mse_weight)
    trainer = Trainer(DDPass(student), loss,
                      lambda idx: (noise[idx].to(dev), tokens[idx].to(dev), labels[idx].to(dev)),
                      len(tokens), cfg, Path(out) / "train-distill", dev, kind="distill", meta=meta)
    if resume:
        trainer.resume(resume)
    student = trainer.fit().student
    defaults = {**tpipe.defaults, "sampler": "distilled", "sampler_options": {"steps": 1}}
    pipe = Pipeline(tpipe.tokenizer, student, defaults, name=Path(out).name)
    if trainer.rank == 0:
        pipe.save_pretrained(out)
        tdir = Path(tpipe_dir(teacher))
        for src, dst in ((tdir / "tokenizer" / "COMMAND.txt", Path(out) / "tokenizer" / "COMMAND.txt"),
                         (Path(data) / "COMMAND.txt", Path(out) / "generator" / "DATA_COMMAND.txt")):
            if src.is_file():
                write_text(dst, src.read_text())
    return pipe


def tpipe_dir(teacher: str | Path) -> Path:
    """The folder of a teacher given as a bundled name or a folder."""
    from ..hub import resolve_model_dir

    return resolve_model_dir(teacher, "teacher")
