"""``varkit train generator``: teacher forcing through the generator, class dropout for CFG.

The tokenizer is frozen; the tokens of the whole dataset are computed once: in memory at start-up, or
with ``codes_dir`` (``--extract-codes DIR``) written to disk once, sharded over the ranks, and read
back by batch (:mod:`varkit.train.codes`). With ``--flip`` both orientations are tokenized.

**Distillation** (``teacher=``, e.g. a drafter for speculative decoding): the loss is
``KL(teacher ‖ student)`` of the next-token distributions at every position, both models
teacher-forced on the same tokens under the same (possibly dropped-to-null) condition, so the
unconditional rows that CFG mixes in are matched too; ``ce_weight`` adds the ordinary
cross-entropy on the tokens. ``teacher_samples`` adds that many sequences sampled from the
teacher (at its default sampling settings, e.g. its CFG) to the training tokens: these are the
prefixes a speculative sampler visits. ``init_from`` copies every parameter whose name and
shape match from another generator (e.g. the target's embeddings, first layers and head).
"""
from __future__ import annotations

import dataclasses
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
from .codes import CodesStore, MemoryCodes, TokenBatches, encode_codes, extract_codes
from .data import load_dataset
from .loop import Trainer, TrainConfig, dist_info, init_distributed

SAMPLE_ROWS = 4  # sample grids: this many images (seeds) per class column


def encode_dataset(tokenizer, dataset, layout, device, batch: int = 256) -> torch.Tensor:
    """Layout-order token ids (N, L) of every image (unflipped), computed once with the frozen tokenizer."""
    out = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x, _ = dataset.batch(torch.arange(i, min(i + batch, len(dataset))))
            out.append(layout.from_grids(tokenizer.encode(x.to(device))).cpu())
    return torch.cat(out)


def dataset_tokens(tokenizer, dataset, layout, device, flip: bool = False, codes_dir: str | Path | None = None,
                   workers: int = 0) -> TokenBatches:
    """The dataset's tokens by batch: from ``codes_dir`` (extracted there first if it holds none yet) or
    tokenized in memory now (each rank the whole dataset)."""
    if codes_dir is not None:
        extract_codes(tokenizer, dataset, codes_dir, device, flip=flip, workers=workers)
        return TokenBatches(CodesStore(codes_dir), layout)
    codes, scales = encode_codes(tokenizer, dataset, torch.arange(len(dataset)), device, flip, batch=256,
                                 workers=workers)
    return TokenBatches(MemoryCodes(codes, dataset.labels(), scales), layout)


def sample_grid_fn(tokenizer, defaults: dict[str, Any] | None, num_classes: int, rows: int = SAMPLE_ROWS):
    """``fn(model) -> PIL grid`` for the loop's ``sample_every``: up to 10 classes (spread over all of them) as
    columns, ``rows`` seeds down, at the model's default sampling settings, seed 0 (the same images each time)."""
    from ..pipeline import image_grid

    classes = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long().tolist()
    labels = [c for _ in range(rows) for c in classes]

    def sample(model) -> Any:
        gen = model.gen if isinstance(model, TeacherForcing) else model
        out = Pipeline(tokenizer, gen, defaults)(labels, seed=0)
        return image_grid(out.images, cols=len(classes))

    return sample


class TeacherForcing(nn.Module):
    """Makes the generator's training pass a module's ``forward`` so DistributedDataParallel can wrap it:
    outputs (B, N, C) for every token given the ground truth, and the mask of positions the loss counts."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.gen.training_outputs(cond, tokens)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p ‖ q) from log-probabilities (..., V)."""
    V = log_p.shape[-1]
    return F.kl_div(log_q.reshape(-1, V), log_p.reshape(-1, V), reduction="batchmean", log_target=True)


def make_generator_loss(gen, class_dropout: float, teacher=None, ce_weight: float = 0.0,
                        distill_cfg: float | None = None):
    """The head's loss on every token (cross-entropy for ids, the diffusion loss for latents; only the
    positions the generator's training pass masks, for MAR), with the condition dropped to null at
    ``class_dropout``.

    With a ``teacher`` generator: ``KL(teacher ‖ student)`` per position (mean over positions)
    plus ``ce_weight`` × the cross-entropy, the teacher seeing the same dropped conditions.
    ``distill_cfg`` W: every row is also run under the null condition, and the KL of the
    CFG-mixed distributions ``u + W·(c − u)`` (what a CFG'd drafter proposes and a CFG'd target
    verifies) is added: the student may then trade errors between its two branches.
    """
    from ..samplers.logits import mix_cfg

    def generator_loss(model, batch):
        tokens, labels = batch
        drop = torch.rand(labels.shape[0], device=labels.device) < class_dropout
        cond = gen.drop_condition(labels, drop)
        if teacher is not None and distill_cfg is not None:
            cond, tokens = torch.cat([cond, gen.null_condition(labels)]), torch.cat([tokens, tokens])
        logits, mask = model(cond, tokens)
        B = labels.shape[0]
        if teacher is None:
            return gen.head.loss(logits, tokens, mask)
        ce = F.cross_entropy(logits[:B].reshape(-1, logits.shape[-1]), tokens[:B].reshape(-1))
        with torch.no_grad():
            t_logits = teacher.teacher_forcing_logits(cond, tokens).float()
        kl = _kl(t_logits.log_softmax(-1), logits.float().log_softmax(-1))
        metrics = {"kl": float(kl.detach()), "ce": float(ce.detach())}
        loss = kl + ce_weight * ce
        if distill_cfg is not None:
            kl_cfg = _kl(mix_cfg(t_logits, distill_cfg).log_softmax(-1), mix_cfg(logits.float(), distill_cfg).log_softmax(-1))
            metrics["kl_cfg"] = float(kl_cfg.detach())
            loss = loss + kl_cfg
        return loss, metrics

    return generator_loss


def load_teacher(teacher: str | Path, tokenizer, gen, device: torch.device):
    """The teacher pipeline (bundled name or pipeline folder), frozen, checked against the
    student: same codebook, vocabulary, layout and conditions."""
    from ..pipeline import load_pipeline
    from ..samplers.speculative import check_same_tokens

    pipe = load_pipeline(teacher, device=device)
    t = pipe.generator.eval().requires_grad_(False)
    check_same_tokens(gen, t, tokenizer, pipe.tokenizer, roles=("student", "teacher"))
    return pipe


TEACHER_SAMPLES_STREAM = 0x7EAC4E5  # a third seed word: teacher samples never share an evaluation seed


def teacher_samples(pipe, count: int, seed: int, device: torch.device, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences (layout order) sampled from the teacher at its default sampling
    settings, classes cycling 0, 1, …, so a resumed run regenerates the same set. Image i is
    seeded from (seed, i, ``TEACHER_SAMPLES_STREAM``): never the (seed, i) of ``generate`` or
    the benches, which would otherwise evaluate the student on its own training sequences."""
    import numpy as np

    from ..samplers import get_sampler
    from ..samplers.logits import image_generators

    labels = torch.arange(count) % pipe.num_classes
    seeds = [int(np.random.SeedSequence([int(seed), i, TEACHER_SAMPLES_STREAM]).generate_state(1, np.uint64)[0] >> 1)
             for i in range(count)]
    gens = image_generators(seed, count, image_seeds=seeds)
    sampler = get_sampler("ancestral", pipe.sampling_params())
    out = [sampler.sample(pipe.generator, labels[i:i + batch].to(device), gens[i:i + batch]).tokens.cpu()
           for i in range(0, count, batch)]
    return (torch.cat(out) if out else torch.zeros(0, pipe.generator.layout.num_tokens, dtype=torch.long)), labels


def init_from_generator(gen, source: str | Path) -> list[str]:
    """Copy into ``gen`` every parameter of the generator in ``source`` (pipeline, generator
    folder or bundled name) with the same name and shape; returns the names copied."""
    from ..samplers.speculative import resolve_draft

    src, _ = resolve_draft(source, role="--init-from")
    theirs = src.state_dict()
    own = gen.state_dict()
    copied = [k for k, v in own.items() if k in theirs and theirs[k].shape == v.shape]
    if not copied:
        raise InvalidArgumentError(
            f"--init-from {source}: no parameter of that generator has a name and shape of this one "
            "(same architecture and width needed)"
        )
    with torch.no_grad():
        for k in copied:
            own[k].copy_(theirs[k].to(own[k]))
    return copied


def _fingerprint(module: nn.Module) -> float:
    """A number that changes with any weight: identifies a teacher across a resume."""
    with torch.no_grad():
        return float(sum(p.double().square().sum() + p.double().sum() for p in module.parameters()))


def check_generator_args(cfg: TrainConfig, resolution: int = 32, class_dropout: float = 0.1,
                         defaults: dict[str, Any] | None = None, teacher: str | Path | None = None,
                         ce_weight: float = 0.0, teacher_samples_count: int = 0,
                         distill_cfg: float | None = None) -> None:
    """The checks of :func:`train_generator`'s settings that need nothing loaded, shared by the API and
    ``varkit train generator`` (which runs them before it starts any process): one-line
    ``InvalidArgumentError`` naming the command-line option."""
    from ..pipeline import SAMPLING_KEYS
    from ..samplers import SamplingParams

    if not isinstance(cfg, TrainConfig):
        raise InvalidArgumentError(f"cfg must be a varkit.train.loop.TrainConfig, got {type(cfg).__name__}")
    cfg.check()  # steps, batch size, lr, grad accumulation ... (fields may have changed since construction)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise InvalidArgumentError(f"--resolution must be an integer >= 1, got {resolution!r}")
    if isinstance(class_dropout, bool) or not isinstance(class_dropout, (int, float)) or not 0 <= class_dropout <= 1:
        raise InvalidArgumentError(f"--class-dropout must be a probability in [0, 1], got {class_dropout!r}")
    if defaults is not None and not isinstance(defaults, dict):
        raise InvalidArgumentError(f"defaults must be a dict of sampling settings, got {type(defaults).__name__}")
    unknown = set(defaults or {}) - set(SAMPLING_KEYS)
    if unknown:
        raise InvalidArgumentError(f"--default {', '.join(sorted(unknown))}: not a sampling setting; "
                                   f"choose from {', '.join(SAMPLING_KEYS)}")
    SamplingParams(**{k: v for k, v in (defaults or {}).items() if v is not None})  # a bad value: its own one line
    if teacher is None and (ce_weight or teacher_samples_count or distill_cfg is not None):
        raise InvalidArgumentError("--ce-weight, --teacher-samples and --distill-cfg only apply with --teacher (distillation)")
    if distill_cfg is not None and distill_cfg < 0:
        raise InvalidArgumentError(f"--distill-cfg must be >= 0 (a CFG scale), got {distill_cfg}")
    if ce_weight < 0 or teacher_samples_count < 0:
        raise InvalidArgumentError("--ce-weight and --teacher-samples must be >= 0")


def train_generator(data: str, tokenizer_dir: str | Path, config: str, out: str | Path, cfg: TrainConfig,
                    resolution: int = 32, device: str | None = None, resume: str | None = None,
                    class_dropout: float = 0.1, defaults: dict[str, Any] | None = None, flip: bool = False,
                    teacher: str | Path | None = None, ce_weight: float = 0.0, teacher_samples_count: int = 0,
                    init_from: str | Path | None = None, distill_cfg: float | None = None,
                    codes_dir: str | Path | None = None, **overrides) -> Pipeline:
    """Train generator ``config`` on ``data`` tokenized by ``tokenizer_dir``; save a pipeline to ``out``.

    ``teacher``: distil from that pipeline (see the module docstring) with ``ce_weight``,
    ``teacher_samples_count`` and ``distill_cfg``; ``init_from``: start from another generator's
    matching weights; ``codes_dir``: the dataset's tokens on disk (extracted there once).
    """
    check_generator_args(cfg, resolution, class_dropout, defaults, teacher, ce_weight, teacher_samples_count, distill_cfg)
    dev = init_distributed(resolve_device(device))
    torch.manual_seed(cfg.seed)
    tok = load_module(tokenizer_dir).to(dev).eval().requires_grad_(False)
    if resolution % tok.downsample:
        raise InvalidArgumentError(
            f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {tok.downsample}"
        )
    ds = load_dataset(data, resolution, flip)
    known = {f.name for f in dataclasses.fields(model_class(config).config_class)}
    if set(overrides) - known:
        raise InvalidArgumentError(
            f"config {config} has no field {', '.join(sorted(set(overrides) - known))}; its fields: {', '.join(sorted(known))}"
        )
    overrides = {**model_class(config).config_for_tokenizer(tok, resolution), "num_classes": ds.num_classes, **overrides}
    gen = create_model(config, **overrides)
    gen.head.check_tokenizer(tok)
    gen.bind_tokenizer(tok)
    if init_from is not None:
        copied = init_from_generator(gen, init_from)
        if dist_info()[0] == 0:
            print(f"initialised {len(copied)} of {len(gen.state_dict())} tensors from {init_from}")
    batches = dataset_tokens(tok, ds, gen.layout, dev, flip, codes_dir, cfg.workers)
    meta: dict[str, Any] = {}
    tpipe = None
    if teacher is not None:
        tpipe = load_teacher(teacher, tok, gen, dev)
        meta = {"teacher_fingerprint": _fingerprint(tpipe.generator), "ce_weight": float(ce_weight),
                "teacher_samples": int(teacher_samples_count), "distill_cfg": distill_cfg}
        if teacher_samples_count:
            batches.extra, batches.extra_labels = teacher_samples(tpipe, teacher_samples_count, cfg.seed, dev)
    loss = make_generator_loss(gen, class_dropout, tpipe.generator if tpipe else None, ce_weight, distill_cfg)
    trainer = Trainer(TeacherForcing(gen), loss, batches, len(batches), cfg, Path(out) / "train-generator", dev,
                      kind=f"generator:{config}", meta=meta, flip=flip,
                      sample_fn=sample_grid_fn(tok, defaults, ds.num_classes))
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
