"""``varkit train tokenizer``: reconstruction + codebook + commitment (+ entropy) losses."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import InvalidArgumentError
from ..tokenizers import create_tokenizer
from .data import load_dataset
from .loop import Trainer, TrainConfig, init_distributed


def tokenizer_loss(model, batch):
    x, _ = batch
    out = model(x)
    recon = F.mse_loss(out.recon, x) + F.l1_loss(out.recon, x)
    loss = recon + out.vq_loss
    ids = out.ids if isinstance(out.ids, list) else [out.ids]
    used = torch.cat([i.flatten() for i in ids]).unique().numel()
    return loss, {"recon": float(recon), "vq": float(out.vq_loss), "codes_in_batch": used}


def codebook_usage(tokenizer, dataset, device, batch: int = 256) -> float:
    """Share of codebook entries used when encoding the whole dataset."""
    seen = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x, _ = dataset.batch(torch.arange(i, min(i + batch, len(dataset))))
            ids = tokenizer.encode(x.to(device))
            for t in ids if isinstance(ids, list) else [ids]:
                seen[t.flatten().cpu()] = True
    return float(seen.float().mean())


def train_tokenizer(data: str, config: str, out: str | Path, cfg: TrainConfig, resolution: int = 32,
                    device: str | None = None, resume: str | None = None, flip: bool = False, **overrides):
    """Train tokenizer ``config`` on ``data`` (``digits`` or an image folder); save it to ``out/tokenizer``."""
    dev = resolve_device(device)
    init_distributed(dev)
    torch.manual_seed(cfg.seed)
    tok = create_tokenizer(config, **overrides)
    if resolution % tok.downsample:
        raise InvalidArgumentError(
            f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {tok.downsample}"
        )
    ds = load_dataset(data, resolution, flip)
    trainer = Trainer(tok, tokenizer_loss, lambda idx: tuple(t.to(dev) for t in ds.batch(idx)),
                      len(ds), cfg, Path(out) / "train-tokenizer", dev, kind=f"tokenizer:{config}")
    if resume:
        trainer.resume(resume)
    tok = trainer.fit()
    if trainer.rank == 0:
        usage = codebook_usage(tok, ds, dev)
        print(f"codebook usage: {usage:.1%} of {tok.codebook_size} codes")
        tok.save_pretrained(Path(out) / "tokenizer")
    return tok
