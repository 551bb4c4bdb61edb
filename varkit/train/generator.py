"""``varkit train generator``: teacher forcing through the generator, class dropout for CFG.

The tokenizer is frozen; the ids of the whole dataset are computed once at start-up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import InvalidArgumentError
from ..io import write_text
from ..modeling import load_module
from ..models import create_model
from ..models.registry import model_class
from ..pipeline import Pipeline
from .data import load_dataset
from .loop import Trainer, TrainConfig, init_distributed


def encode_dataset(tokenizer, dataset, layout, device, batch: int = 256) -> torch.Tensor:
    """Layout-order token ids (N, L) of every image, computed once with the frozen tokenizer."""
    out = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x, _ = dataset.batch(torch.arange(i, min(i + batch, len(dataset))))
            out.append(layout.from_grids(tokenizer.encode(x.to(device))).cpu())
    return torch.cat(out)


class TeacherForcing(nn.Module):
    """Makes teacher forcing a module's ``forward`` so DistributedDataParallel can wrap it."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.gen.teacher_forcing_logits(cond, tokens)


def make_generator_loss(gen, class_dropout: float):
    """Cross-entropy of every token, with the condition dropped to null at ``class_dropout``."""

    def generator_loss(model, batch):
        tokens, labels = batch
        drop = torch.rand(labels.shape[0], device=labels.device) < class_dropout
        logits = model(gen.drop_condition(labels, drop), tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)), {}

    return generator_loss


def train_generator(data: str, tokenizer_dir: str | Path, config: str, out: str | Path, cfg: TrainConfig,
                    resolution: int = 32, device: str | None = None, resume: str | None = None,
                    class_dropout: float = 0.1, defaults: dict[str, Any] | None = None, flip: bool = False,
                    **overrides) -> Pipeline:
    """Train generator ``config`` on ``data`` tokenized by ``tokenizer_dir``; save a pipeline to ``out``."""
    dev = resolve_device(device)
    init_distributed(dev)
    torch.manual_seed(cfg.seed)
    tok = load_module(tokenizer_dir).to(dev).eval().requires_grad_(False)
    if resolution % tok.downsample:
        raise InvalidArgumentError(
            f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {tok.downsample}"
        )
    ds = load_dataset(data, resolution, flip)
    overrides = {**model_class(config).config_for_tokenizer(tok, resolution), "num_classes": ds.num_classes, **overrides}
    gen = create_model(config, **overrides)
    gen.bind_tokenizer(tok)
    tokens = encode_dataset(tok, ds, gen.layout, dev)
    labels = ds.labels()
    trainer = Trainer(TeacherForcing(gen), make_generator_loss(gen, class_dropout),
                      lambda idx: (tokens[idx].to(dev), labels[idx].to(dev)),
                      len(ds), cfg, Path(out) / "train-generator", dev, kind=f"generator:{config}")
    if resume:
        trainer.resume(resume)
    gen = trainer.fit().gen
    pipe = Pipeline(tok, gen, defaults, name=Path(out).name)
    if trainer.rank == 0:
        pipe.save_pretrained(out)
        made_by = Path(tokenizer_dir) / "COMMAND.txt"  # keep the record of how the tokenizer was trained
        if made_by.is_file() and not (Path(out) / "tokenizer" / "COMMAND.txt").is_file():
            write_text(Path(out) / "tokenizer" / "COMMAND.txt", made_by.read_text())
    return pipe
