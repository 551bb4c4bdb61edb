"""``varkit train tokenizer``: reconstruction + the tokenizer's own regulariser (+ an optional GAN loss).

Every tokenizer owns its loss: ``training_loss(images, out)`` (the KL-VAE: reconstruction + KL; the VQ
tokenizers: reconstruction + codebook + commitment (+ entropy)) returns the loss and its metrics.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import InvalidArgumentError
from ..tokenizers import create_tokenizer
from .data import load_dataset
from .loop import Trainer, TrainConfig, init_distributed


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided 4x4 convs down to a map of real/fake logits."""

    def __init__(self, in_channels: int = 3, ch: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdversarialTokenizer(nn.Module):
    """A tokenizer and its discriminator, trained in one optimizer step with hinge losses.

    The discriminator learns from ``d_loss`` on detached reconstructions; the tokenizer's
    adversarial term runs the reconstruction through a *detached copy* of the discriminator's
    weights, so each loss only moves its own player. The tokenizer's term is switched on after
    ``start`` steps (counted in a buffer, so a resumed run agrees).
    """

    def __init__(self, tokenizer: nn.Module, weight: float, start: int):
        super().__init__()
        self.tokenizer, self.weight, self.start = tokenizer, weight, start
        self.disc = PatchDiscriminator(tokenizer.config.in_channels)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor):
        out = self.tokenizer(x)
        d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(out.recon.detach())).mean()
        frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
        g_loss = -torch.func.functional_call(self.disc, frozen, (out.recon,)).mean()
        w = self.weight if int(self.steps) >= self.start else 0.0
        if self.training:
            self.steps += 1
        return out, w * g_loss, d_loss


def _tokenizer_of(model: nn.Module) -> nn.Module:
    """The tokenizer inside DDP and the adversarial wrapper."""
    model = getattr(model, "module", model)
    return model.tokenizer if isinstance(model, AdversarialTokenizer) else model


def tokenizer_loss(model, batch):
    x, _ = batch
    res = model(x)  # through DDP's forward, so that gradients are synchronised
    out, g_loss, d_loss = res if isinstance(res, tuple) else (res, None, None)
    loss, metrics = _tokenizer_of(model).training_loss(x, out)
    if g_loss is not None:
        loss = loss + g_loss + d_loss
        metrics.update(g_loss=g_loss.item(), d_loss=d_loss.item())
    return loss, metrics


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


@torch.no_grad()
def calibrate_scaling(tokenizer, dataset, device, batch: int = 256) -> dict:
    """Set a continuous tokenizer's ``scaling_factor`` to 1 / std of its (shifted) posterior means over
    ``dataset``, so that its tokens have unit standard deviation (as MAR's 0.2325 does for KL-16 on
    ImageNet); 4 significant digits. Returns the statistics (per channel after scaling)."""
    zs = []
    for i in range(0, len(dataset), batch):
        x, _ = dataset.batch(torch.arange(i, min(i + batch, len(dataset))))
        mean, _ = tokenizer.encode_moments(x.to(device))
        zs.append((mean.double() - tokenizer.config.shift_factor).cpu())
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [D, N*h*w]
    factor = float(f"{1.0 / float(z.std()):.4g}")
    tokenizer.config.scaling_factor = factor
    return {"scaling_factor": factor, "std": [round(float(v), 4) for v in z.std(1) * factor],
            "mean": [round(float(v), 4) for v in z.mean(1) * factor]}


def train_tokenizer(data: str, config: str, out: str | Path, cfg: TrainConfig, resolution: int = 32,
                    device: str | None = None, resume: str | None = None, flip: bool = False,
                    adversarial: float = 0.0, disc_start: int = 0, **overrides):
    """Train tokenizer ``config`` on ``data`` (``digits`` or an image folder); save it to ``out/tokenizer``."""
    dev = init_distributed(resolve_device(device))
    torch.manual_seed(cfg.seed)
    tok = create_tokenizer(config, **overrides)
    if resolution % tok.downsample:
        raise InvalidArgumentError(
            f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {tok.downsample}"
        )
    ds = load_dataset(data, resolution, flip)
    model = AdversarialTokenizer(tok, adversarial, disc_start) if adversarial > 0 else tok
    if cfg.fsdp:
        raise InvalidArgumentError("--fsdp is for generators over 1 B parameters; train tokenizers without it")
    trainer = Trainer(model, tokenizer_loss, ds.batch, len(ds), cfg, Path(out) / "train-tokenizer", dev,
                      kind=f"tokenizer:{config}", flip=flip)
    if resume:
        trainer.resume(resume)
    tok = trainer.fit()
    tok = tok.tokenizer if isinstance(tok, AdversarialTokenizer) else tok
    if trainer.rank == 0:
        if tok.kind == "discrete":
            usage = codebook_usage(tok, ds, dev)
            print(f"codebook usage: {usage:.1%} of {tok.codebook_size} codes")
        else:
            st = calibrate_scaling(tok, ds, dev)
            print(f"scaling_factor {st['scaling_factor']} (1 / std of the latents); per channel after scaling: "
                  f"std {st['std']}, mean {st['mean']}")
        tok.save_pretrained(Path(out) / "tokenizer")
    return tok
