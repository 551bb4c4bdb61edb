"""The one training loop: AdamW, warm-up + cosine, clipping, EMA, checkpoints, logs, DDP.

Tokenizer and generator training differ only in their ``loss_fn`` and data; this loop does
the rest. Batches are drawn from a per-epoch permutation seeded by (seed, epoch), so the data
position is a function of the step and a resumed run sees exactly the batches it would
have. Under torchrun each rank takes its slice of every global batch and
``DistributedDataParallel`` averages the gradients (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidArgumentError
from ..io import atomic_path, load_torch_checkpoint, torch_save

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay; 0 = no EMA
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    bf16: bool = True  # autocast where the device supports it (CUDA)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Global batch ``step`` as indices into a dataset of ``n`` items (epoch-wise permutations)."""
    out, pos, end = [], step * batch, (step + 1) * batch
    while pos < end:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perm[off: off + end - pos])
        pos += len(out[-1])
    return torch.cat(out)


class Trainer:
    """Train ``model`` with ``loss_fn(model, batch)`` on ``get_batch(indices)``.

    ``out`` receives ``checkpoint.pt`` (everything needed to resume), ``log.jsonl`` and
    ``loss.png``. Returns the trained model (the EMA copy if EMA is on). ``meta``: settings
    outside the model and the ``TrainConfig`` that shape the loss (e.g. a distillation
    teacher); saved in the checkpoint, and a resume with other settings is refused.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, get_batch: Callable[[torch.Tensor], Any],
                 dataset_size: int, cfg: TrainConfig, out: str | Path, device: torch.device,
                 kind: str = "model", meta: dict[str, Any] | None = None):
        self.rank, self.world = dist_info()
        if cfg.batch_size % self.world:
            raise InvalidArgumentError(
                f"batch size {cfg.batch_size} is not divisible by the {self.world} processes; "
                "choose a multiple of the process count"
            )
        self.cfg, self.loss_fn, self.get_batch = cfg, loss_fn, get_batch
        self.n, self.device, self.kind, self.meta = dataset_size, device, kind, dict(meta or {})
        self.out = Path(out)
        self.model = model.to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema > 0 else None
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model)
        self.step = 0
        self.history: list[dict] = []

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "kind": self.kind,
            "meta": self.meta,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "train_config": asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()},
            "history": self.history,
        }

    def save(self) -> None:
        if self.rank == 0:
            torch_save(self.state(), self.out / "checkpoint.pt")

    def resume(self, path: str | Path) -> None:
        ck = load_torch_checkpoint(path, "varkit training checkpoint")
        if not isinstance(ck, dict) or ck.get("kind") != self.kind:
            raise CheckpointError(
                f"{path} is not a checkpoint of this {self.kind} run (it holds "
                f"{ck.get('kind') if isinstance(ck, dict) else type(ck).__name__!r}); pass the checkpoint.pt of the same run"
            )
        if ck.get("meta", {}) != self.meta:
            raise CheckpointError(
                f"{path} was written with other training settings ({ck.get('meta', {})} vs {self.meta} now); "
                "resume with the options of the interrupted run"
            )
        own = self.model.state_dict()
        if set(own) != set(ck["model"]) or any(own[k].shape != ck["model"][k].shape for k in own):
            raise CheckpointError(f"{path} was written for a different model configuration; resume with the same config")
        self.model.load_state_dict(ck["model"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step = int(ck["step"])
        self.history = list(ck.get("history", []))
        if self.rank == 0:  # drop log lines the interrupted run wrote after this checkpoint
            with atomic_path(self.out / "log.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_np_unpack(rng["numpy"]))
        random.setstate(_py_unpack(rng["python"]))

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        local = cfg.batch_size // self.world
        autocast = cfg.bf16 and self.device.type == "cuda"
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0, desc=f"train {self.kind}")
        t0, seen = time.perf_counter(), 0
        self.model.train()
        while self.step < cfg.steps:
            idx = batch_indices(self.step, self.n, cfg.batch_size, cfg.seed)
            batch = self.get_batch(idx[self.rank * local:(self.rank + 1) * local])
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, cfg)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, metrics = self.loss_fn(self.ddp, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(pm.detach(), 1 - cfg.ema)
                    for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                        be.copy_(bm)
            self.step += 1
            seen += cfg.batch_size
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rec = {"step": self.step, "loss": float(loss), "lr": lr_at(self.step - 1, cfg),
                       "images_per_s": seen / (time.perf_counter() - t0), **metrics}
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                self.history.append(rec)
                if self.rank == 0:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.rank == 0:
            plot_loss(self.history, self.out / "loss.png")
        final = self.ema if self.ema is not None else self.model
        return final.eval()


def plot_loss(history: list[dict], path: Path) -> None:
    """Loss curve PNG next to the checkpoints."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# RNG states as plain tensors/lists so weights_only loading accepts them.
def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _np_unpack(s):
    return ("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"])


def _py_state():
    version, state, gauss = random.getstate()
    return {"version": version, "state": list(state), "gauss": gauss}


def _py_unpack(s):
    return (s["version"], tuple(s["state"]), s["gauss"])
