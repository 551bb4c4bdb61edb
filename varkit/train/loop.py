"""The one training loop: AdamW, warm-up + cosine, clipping, EMA, checkpoints, logs, DDP or FSDP.

Tokenizer and generator training differ only in their ``loss_fn`` and data; this loop does the rest.
Batches are drawn from a per-epoch permutation seeded by (seed, epoch), so the data position is a
function of the step and a resumed run sees exactly the batches it would have had. A
``DataLoader`` (``workers`` processes per rank) fetches them through :class:`StepSampler`.

Under torchrun (see :mod:`varkit.train.distributed`) every rank works on its own device, takes its
contiguous share of every global batch, and draws its own random numbers (dropout, class dropout,
noise: rank 0 keeps a one-process run's stream, rank r > 0 is reseeded from (seed, r)); the initial
weights are rank 0's on every rank. ``grad_accum`` splits each rank's share into micro-batches whose
gradients add up before one optimizer step (``no_sync`` on all but the last), so the global batch
stays ``batch_size``: N processes see the micro-batches one process sees with ``grad_accum`` N.
Every logged value is the mean over micro-batches and ranks: the global batch's loss.
``fsdp`` shards parameters, gradients and optimizer state with torch's FSDP (``fully_shard``, one
group per block of each top-level ``nn.ModuleList`` plus the root) instead of replicating them (DDP).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
import sys
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
from ..io import atomic_path, load_torch_checkpoint, torch_save, write_text
from .distributed import all_reduce_mean, dist_info, gather_objects, init_distributed, seed_rank

__all__ = ["TrainConfig", "Trainer", "StepSampler", "batch_indices", "lr_at", "plot_loss", "record_command",
           "dist_info", "init_distributed", "fsdp_blocks"]

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]
RESUME_STREAM = 0x2E5E  # reseeds a rank whose random state the checkpoint does not hold
RUN_COMMAND: str | None = None  # set by the CLI: the loop records it in out/COMMAND.txt when training starts


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global, over all processes and accumulation steps
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
    grad_accum: int = 1  # micro-batches per optimizer step (the global batch stays batch_size)
    workers: int = 0  # DataLoader worker processes per rank (0: batches are made in the training process)
    fsdp: bool = False  # shard the model over the processes (torch FSDP) instead of replicating it (DDP)
    sample_every: int = 0  # write a sample grid every N steps (when the run can sample; 0 = never)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Bad settings fail here (at construction, and again when a run starts: fields may have been changed
        since), before anything is loaded, naming the command-line option."""
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "grad_accum"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "workers", "sample_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name, lo in (("lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0), ("min_lr_ratio", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
                    or (name == "lr" and v == 0):
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be a finite number "
                                           f"{'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 <= self.ema < 1:
            raise InvalidArgumentError(f"--ema must be a decay in [0, 1) (0 = off), got {self.ema!r}")


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InvalidArgumentError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, flip: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2 ** 64)  # seeds up to 2**64 - 1 are accepted
    perm = torch.randperm(n, generator=g)
    if flip:  # a coin per image and epoch, drawn after the permutation (which stays that of a run without flips)
        perm = perm + n * torch.randint(0, 2, (n,), generator=g)[perm]
    return perm


def batch_indices(step: int, n: int, batch: int, seed: int, flip: bool = False) -> torch.Tensor:
    """Global batch ``step`` as indices into a dataset of ``n`` items (epoch-wise permutations).

    With ``flip`` an index ``i + n`` stands for item ``i`` mirrored (see :mod:`varkit.train.data`).
    """
    out, pos, end = [], step * batch, (step + 1) * batch
    while pos < end:
        epoch, off = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch, flip)[off: off + end - pos])
        pos += len(out[-1])
    return torch.cat(out)


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches (index tensors) of the global steps ``start`` … ``cfg.steps - 1``.

    It plays ``DistributedSampler``'s part (every rank a disjoint share of one shuffle that all ranks
    agree on) but starts at any step, so a resumed run continues mid-epoch, and gives rank r the r-th
    contiguous slice of each global batch, so the micro-batches do not depend on how the global batch is
    split between processes and accumulation steps.
    """

    def __init__(self, n: int, cfg: TrainConfig, rank: int, world: int, start: int = 0, flip: bool = False):
        self.n, self.cfg, self.rank, self.world, self.start, self.flip = n, cfg, rank, world, start, flip

    def __len__(self) -> int:
        return max(self.cfg.steps - self.start, 0) * self.cfg.grad_accum

    def __iter__(self):
        cfg = self.cfg
        local = cfg.batch_size // self.world
        micro = local // cfg.grad_accum
        for step in range(self.start, cfg.steps):
            idx = batch_indices(step, self.n, cfg.batch_size, cfg.seed, self.flip)[self.rank * local:(self.rank + 1) * local]
            for j in range(cfg.grad_accum):
                yield idx[j * micro:(j + 1) * micro]


class _Call(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: ``fn(indices)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, indices):
        return self.fn(indices)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as one group each: the items of every outermost ``nn.ModuleList``
    (transformer blocks, residual MLP blocks of a head)."""
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    return blocks


class Trainer:
    """Train ``model`` with ``loss_fn(model, batch)`` on ``get_batch(indices)``.

    ``out`` receives ``checkpoint.pt`` (everything needed to resume), ``log.jsonl``, ``loss.png`` and,
    with ``cfg.sample_every`` and a ``sample_fn(model) -> PIL image``, ``samples/step_NNNNNNN.png``.
    Returns the trained model (the EMA copy if EMA is on). ``meta``: settings outside the model and
    the ``TrainConfig`` that shape the loss (e.g. a distillation teacher); saved in the checkpoint,
    and a resume with other settings is refused. ``flip``: draw mirrored items too (indices
    ``i + dataset_size``). With ``cfg.workers`` > 0, ``get_batch`` runs in worker processes and must
    return CPU tensors; the loop moves batches to ``device`` itself.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, get_batch: Callable[[torch.Tensor], Any],
                 dataset_size: int, cfg: TrainConfig, out: str | Path, device: torch.device,
                 kind: str = "model", meta: dict[str, Any] | None = None, *, flip: bool = False,
                 sample_fn: Callable[[nn.Module], Any] | None = None):
        self.rank, self.world = dist_info()
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise InvalidArgumentError(
                f"batch size {cfg.batch_size} is not divisible by the {self.world} processes x {cfg.grad_accum} "
                f"accumulation steps; choose a multiple of {self.world * cfg.grad_accum}"
            )
        if cfg.fsdp and not dist.is_initialized():
            raise InvalidArgumentError("--fsdp shards the model over processes: launch with --nproc N (or torchrun)")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.loss_fn, self.get_batch = cfg, loss_fn, get_batch
        self.n, self.device, self.kind, self.meta = dataset_size, device, kind, dict(meta or {})
        self.flip, self.sample_fn = flip, sample_fn
        self.out = Path(out)
        self._plain: nn.Module | None = None  # FSDP: rank 0's unsharded copy that receives the full weights
        if cfg.fsdp and self.rank == 0:
            self._plain = copy.deepcopy(model).cpu()
        self.model = model.to(device)
        self.ema: nn.Module | None = None
        self.ema_params: list[torch.Tensor] = []
        if cfg.fsdp:
            self._shard()
            if cfg.ema > 0:
                self.ema_params = [p.detach().clone() for p in self.model.parameters()]
        elif cfg.ema > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )
        if self.world > 1 and not cfg.fsdp:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, output_device=ids[0] if ids else None)
        else:
            self.ddp = self.model
        if self.world > 1 and self.rank > 0:
            seed_rank(cfg.seed, self.rank)  # own dropout/noise draws; rank 0 keeps a 1-process run's stream
        nparams = sum(p.numel() for p in model.parameters())
        if self.rank == 0 and self.world > 1 and not cfg.fsdp and nparams > 1e9:
            print(f"note: {nparams / 1e9:.1f} B parameters replicated on every process; --fsdp shards them",
                  file=sys.stderr)
        self.step = 0
        self.history: list[dict] = []
        self._resumed = False

    def _shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # every rank starts from rank 0's weights (FSDP, unlike DDP, does not broadcast)
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t.data, 0)
        try:
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in fsdp_blocks(self.model):
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
            raise InvalidArgumentError(f"--fsdp is not supported here ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}); train without --fsdp") from None

    # -- checkpoints ----------------------------------------------------------------------------
    def _full_states(self) -> tuple[dict, dict | None]:
        """(model, EMA) state dicts with full tensors: on rank 0 under FSDP (a collective: every rank calls it)."""
        if not self.cfg.fsdp:
            return self.model.state_dict(), (self.ema.state_dict() if self.ema is not None else None)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model_sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ema_params:
            return model_sd, None
        ema_sd = dict(model_sd)  # buffers as the model's (the DDP path's EMA copies them each step too)
        for (name, _), e in zip(self.model.named_parameters(), self.ema_params):
            full = e.full_tensor() if hasattr(e, "full_tensor") else e
            if self.rank == 0:
                ema_sd[name] = full.detach().cpu()
        return model_sd, (ema_sd if self.rank == 0 else {})

    def state(self) -> dict:
        """Everything a resume needs (on rank 0; every rank must call it: it gathers the ranks' random states)."""
        rngs = gather_objects(_rng_state(self.device))
        model_sd, ema_sd = self._full_states()
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_sd = get_optimizer_state_dict(self.model, self.opt,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_sd = self.opt.state_dict()
        return {
            "kind": self.kind,
            "meta": self.meta,
            "step": self.step,
            "model": model_sd,
            "ema": ema_sd,
            "optimizer": opt_sd,
            "fsdp": bool(self.cfg.fsdp),
            "train_config": asdict(self.cfg),
            "rng": rngs[0],
            "rng_ranks": rngs if self.world > 1 else None,
            "history": self.history,
        }

    def save(self) -> None:
        st = self.state()
        if self.rank == 0:
            torch_save(st, self.out / "checkpoint.pt")

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
        if bool(ck.get("fsdp", False)) != bool(self.cfg.fsdp):
            raise CheckpointError(f"{path} was written {'with' if ck.get('fsdp') else 'without'} --fsdp; "
                                  f"resume {'with' if ck.get('fsdp') else 'without'} it")
        own = self.model.state_dict()
        if set(own) != set(ck["model"]) or any(tuple(own[k].shape) != tuple(ck["model"][k].shape) for k in own):
            raise CheckpointError(f"{path} was written for a different model configuration; resume with the same config")
        if self.cfg.fsdp:
            self._load_fsdp(ck)
        else:
            self.model.load_state_dict(ck["model"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["optimizer"])
        self.step = int(ck["step"])
        self._resumed = True
        self.history = list(ck.get("history", []))
        if self.rank == 0:  # drop log lines the interrupted run wrote after this checkpoint
            with atomic_path(self.out / "log.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        ranks = ck.get("rng_ranks")
        written_by = len(ranks) if ranks else 1
        if written_by == self.world:
            _set_rng_state(ranks[self.rank] if ranks else ck["rng"], self.device)
        else:  # the data order is global and continues exactly; each rank's random draws start afresh
            if self.rank == 0:
                _set_rng_state(ck["rng"], self.device)
            else:
                seed_rank(self.cfg.seed * 1_000_003 + RESUME_STREAM + self.step, self.rank)
            if self.rank == 0:
                print(f"note: {path} was written by {written_by} process(es), this run has {self.world}: the batches "
                      "continue exactly, the random draws (dropout, noise) of ranks > 0 start afresh", file=sys.stderr)

    def _load_fsdp(self, ck: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.tensor import distribute_tensor

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ck["model"], options=opts)
        set_optimizer_state_dict(self.model, self.opt, ck["optimizer"], options=opts)
        if self.ema_params and ck["ema"] is not None:
            with torch.no_grad():
                for (name, _), e in zip(self.model.named_parameters(), self.ema_params):
                    full = ck["ema"][name].to(self.device, e.dtype)
                    e.copy_(distribute_tensor(full, e.device_mesh, e.placements) if hasattr(e, "device_mesh") else full)

    # -- the loop ----------------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        sampler = StepSampler(self.n, cfg, self.rank, self.world, self.step, self.flip)
        return torch.utils.data.DataLoader(
            _Call(self.get_batch), sampler=sampler, batch_size=None, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda" and cfg.workers > 0,
            generator=torch.Generator(),  # worker seeds come from here, never from the training RNG
        )

    def _sync(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of a step."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def _update_ema(self) -> None:
        d = 1 - self.cfg.ema
        with torch.no_grad():
            if self.ema_params:
                for pe, pm in zip(self.ema_params, self.model.parameters()):
                    pe.lerp_(pm.detach(), d)
            elif self.ema is not None:
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm.detach(), d)
                for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                    be.copy_(bm)

    def _final(self) -> nn.Module | None:
        """The model to sample from and return (EMA if on), unsharded; None on ranks > 0 under FSDP.
        A collective under FSDP: every rank calls it."""
        if not self.cfg.fsdp:
            return self.ema if self.ema is not None else self.model
        model_sd, ema_sd = self._full_states()
        if self.rank != 0:
            return None
        self._plain.load_state_dict(ema_sd if ema_sd is not None else model_sd)
        return self._plain

    def _sample(self) -> None:
        model = self._final()
        if self.rank != 0 or model is None or self.sample_fn is None:
            return
        rng, was_training = _rng_state(self.device), model.training
        dev = next(model.parameters()).device
        try:
            model.to(self.device).eval()
            with torch.no_grad():
                image = self.sample_fn(model)
            path = self.out / "samples" / f"step_{self.step:07d}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="png")
        finally:
            model.to(dev).train(was_training)
            _set_rng_state(rng, self.device)  # sampling never changes the training's random draws

    def fit(self) -> nn.Module:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # temporary files of checkpoint writes that were killed
            for tmp in self.out.glob(".checkpoint.pt.*.tmp"):
                tmp.unlink(missing_ok=True)
            global RUN_COMMAND
            if RUN_COMMAND:  # once: a later run in this process records its own
                record_command(self.out / "COMMAND.txt", RUN_COMMAND, resumed=self._resumed)
                RUN_COMMAND = None
        autocast = cfg.bf16 and self.device.type == "cuda"
        A = cfg.grad_accum
        batches = iter(self._loader())
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0, desc=f"train {self.kind}")
        t0, seen = time.perf_counter(), 0
        self.model.train()
        while self.step < cfg.steps:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, cfg)
            self.opt.zero_grad(set_to_none=True)
            loss_sum: torch.Tensor | float = 0.0
            sums: dict[str, Any] = {}
            for j in range(A):
                batch = _to_device(next(batches), self.device)
                with self._sync(j == A - 1):
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss, metrics = self.loss_fn(self.ddp, batch)
                    (loss / A if A > 1 else loss).backward()
                loss_sum = loss_sum + loss.detach().double()  # fp64: the mean of the micro-batches as the ranks'
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach().double() if isinstance(v, torch.Tensor) else v)
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            self.opt.step()
            self._update_ema()
            self.step += 1
            seen += cfg.batch_size
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                keys = sorted(sums)
                vals = all_reduce_mean([float(loss_sum) / A, *(float(sums[k]) / A for k in keys)], self.device)
                rec = {"step": self.step, "loss": vals[0], "lr": lr_at(self.step - 1, cfg),
                       "images_per_s": seen / (time.perf_counter() - t0), **dict(zip(keys, vals[1:]))}
                if gnorm is not None:  # of the synchronised gradients: the same on every rank
                    rec["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
                self.history.append(rec)
                if self.rank == 0:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            bar.update(1)
            if cfg.sample_every and self.sample_fn is not None and (
                    self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                self._sample()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.rank == 0:
            plot_loss(self.history, self.out / "loss.png")
        final = self._final()
        if final is None:  # FSDP, rank > 0: the weights live on rank 0
            return self.model.eval()
        return final.to(self.device).eval()


# -- plots and records ---------------------------------------------------------------------------
NOT_PLOTTED = {"step", "lr", "images_per_s"}


def _readable_axis(ax, values: list[float]) -> None:
    """Log scale for a positive component spanning more than a decade after its start, else linear with
    the first tenth of the run (the initial drop) allowed to leave the top of the frame."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    tail = finite[len(finite) // 10:] or finite
    if min(finite) > 0 and max(tail) / min(tail) > 10:
        ax.set_yscale("log")
        return
    lo, hi = min(finite), max(tail)
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
    ax.set_ylim(lo - pad, hi + pad)


def plot_loss(history: list[dict], path: Path) -> None:
    """One panel per logged component (loss, its parts, gradient norm), each on its own readable scale."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["loss"] + sorted({k for h in history for k, v in h.items()
                               if k not in NOT_PLOTTED and k != "loss" and isinstance(v, (int, float))})
    cols = min(len(names), 3)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(h["step"], float(h[name])) for h in history if isinstance(h.get(name), (int, float))]
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1)
        _readable_axis(ax, [v for _, v in pts])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def record_command(path: str | Path, command: str, resumed: bool) -> str:
    """Keep the commands that made a run in ``path``: a fresh run starts the record, a resumed one appends
    its command line (which names the checkpoint it resumed). Returns the record."""
    path = Path(path)
    before = path.read_text() if resumed and path.is_file() else ""
    text = before + command.rstrip("\n") + "\n"
    write_text(path, text)
    return text


# RNG states as plain tensors/lists so weights_only loading accepts them.
def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(_np_unpack(st["numpy"]))
    random.setstate(_py_unpack(st["python"]))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"], device)


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
