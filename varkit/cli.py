"""``varkit`` command line: generate, train, eval, convert, bench, models.

Every subcommand is a thin call into the package. A ``VarkitError`` is printed as one line
and the process exits with status 2.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import warnings
from pathlib import Path

from .errors import InvalidArgumentError, VarkitError


def _sampler_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings → dict, values parsed as int, float, bool or str."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidArgumentError(f"sampler option {pair!r} must look like KEY=VALUE (e.g. window=16)")
        k, v = pair.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        else:
            v = {"true": True, "false": False}.get(v.lower(), v)
        out[k.replace("-", "_")] = v
    return out


# -- argument types: a bad value is an argparse error (usage + one line, exit 2) before anything runs -------
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto, CUDA if available, else CPU)"
MAX_SEED = 2**64 - 1


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """The one ``--device`` of every command (default ``auto``)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def int_at_least(low: int, high: int | None = None):
    """argparse ``type``: an integer >= ``low`` (and <= ``high``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {'2**64 - 1' if high == MAX_SEED else high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def number_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """argparse ``type``: a finite float in [low, high] (``*_open``: that end excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {lo}{low:g}, {high:g}{hi}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


SEED = int_at_least(0, MAX_SEED)
POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampler choice and sampling settings; unset values fall back to the model's defaults."""
    p.add_argument("--sampler", default=None,
                   help="ancestral, sjd, speculative, distilled, ... (default: the model's own, else ancestral)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-schedule", default=None, choices=["constant", "linear", "var"])
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--head-steps", type=str, default=None,
                   help="continuous heads (MAR, FlowAR): denoising steps per token (default: the model's), or START:END "
                        "to anneal them linearly over the AR steps (DiSA, e.g. 50:5)")
    p.add_argument("--num-iter", type=int, default=None,
                   help="sets layouts (MAR): decoding steps over the random order (default: the model's)")
    p.add_argument("--guidance-interval", type=float, default=None,
                   help="flow heads (FlowAR): CFG only while the ODE time t <= this, in [0, 1] (default: the model's)")
    p.add_argument("--preset", default=None,
                   help="a named settings preset of the model (converted LlamaGen/NAR: demo; digits-mar: cspd); default: its FID protocol")
    p.add_argument("--window", type=int, default=None, help="SJD window length")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sampler option, repeatable")


def sampling_kwargs(args) -> dict:
    opts = _sampler_options(args.option)
    if args.window is not None:
        opts["window"] = args.window
    return dict(sampler=args.sampler, cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, head_steps=args.head_steps, num_iter=args.num_iter,
                guidance_interval=args.guidance_interval, preset=args.preset, **opts)


# -- generate ------------------------------------------------------------------------------------
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _generate_destination(args) -> tuple[Path, bool, int]:
    """(``--out``, whether it is a grid file, the index of the first image file), all checked before the model
    loads: a suffix varkit cannot write (``x.gif``, ``x.txt``), a file or folder in the way, no permission,
    or a non-empty folder without ``--add``/``--overwrite`` (two runs into one folder would lose images)."""
    from .io import check_output_path

    dest = Path(args.out)
    grid = dest.suffix.lower() in GRID_SUFFIXES
    if dest.suffix and not grid and not dest.is_dir():
        raise InvalidArgumentError(f"--out {dest}: varkit writes {', '.join(GRID_SUFFIXES)} grids; give one of those, "
                                   "or a folder (no suffix) for one PNG per image")
    if args.add and args.overwrite:
        raise InvalidArgumentError("--add and --overwrite exclude each other: add after the folder's images, or replace them")
    if grid and (args.add or args.overwrite):
        raise InvalidArgumentError("--add/--overwrite apply to an output folder; a grid file is replaced anyway")
    if args.labels and not grid:
        raise InvalidArgumentError("--labels writes each image's class under it in a grid: give --out a "
                                   f"{'/'.join(GRID_SUFFIXES)} file")
    check_output_path(dest, "file" if grid else "folder")
    first = 0
    if not grid and dest.is_dir() and any(dest.iterdir()):
        if not (args.add or args.overwrite):
            raise InvalidArgumentError(f"--out {dest}/ is not empty: pass --add to write the new images after its own, "
                                       "or --overwrite to replace same-named ones")
        if args.add:
            first = 1 + max((int(p.name.split("_", 1)[0]) for p in dest.glob("[0-9]*_class*.png")
                             if p.name.split("_", 1)[0].isdigit()), default=-1)
    return dest, grid, first


class _Timing:
    """``VARKIT_TIMING=1``: wall and CPU seconds of a command's phases on stderr, the first one counted from the
    process start (so it includes the interpreter and every import)."""

    def __init__(self) -> None:
        import os
        import time

        self.on = os.environ.get("VARKIT_TIMING", "") not in ("", "0")
        self.wall, self.cpu, self.parts = time.perf_counter() - _process_age(), 0.0, []

    def mark(self, name: str) -> None:
        import time

        if self.on:
            wall, cpu = time.perf_counter(), time.process_time()
            self.parts.append(f"{name} {wall - self.wall:.2f} s wall / {cpu - self.cpu:.2f} s CPU")
            self.wall, self.cpu = wall, cpu

    def report(self) -> None:
        if self.on:
            print("varkit timing: " + ", ".join(self.parts), file=sys.stderr)


def _process_age() -> float:
    """Wall seconds since this process started (Linux: /proc/self/stat), 0.0 where unknown."""
    import os

    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, clock ticks
        return max(float(Path("/proc/uptime").read_text().split()[0]) - start / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def cmd_generate(args) -> None:
    timing = _Timing()
    from .io import save_image
    from .pipeline import image_grid, load_pipeline

    dest, grid, first = _generate_destination(args)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                         prepack={"on": True, "off": False}.get(args.prepack, "auto"),
                         fast_tokenizer=not args.exact_tokenizer)
    timing.mark("start-up (process start to pipeline loaded)")
    classes = args.classes if args.classes is not None else list(range(min(pipe.num_classes, 10)))
    labels = [c for c in classes for _ in range(args.per_class)]
    out = pipe(labels, seed=args.seed, batch_size=args.batch_size, progress=True, **sampling_kwargs(args))
    timing.mark("sampling")
    if grid:
        save_image(image_grid(out.images, cols=args.per_class if args.per_class > 1 else len(out.images),
                              labels=[str(c) for c in labels] if args.labels else None), dest)
        written = str(dest)
    else:
        for i, (im, c) in enumerate(zip(out.images, labels)):
            save_image(im, dest / f"{first + i:05d}_class{c}.png")
        written = f"{len(out.images)} images in {dest}/"
    timing.mark("writing")
    s = out.stats
    dtype = str(next(pipe.generator.parameters()).dtype).replace("torch.", "")
    print(f"wrote {written} ({s.forward_passes} forward passes, {s.wall_s:.2f} s, {dtype})")
    timing.report()


# -- train -----------------------------------------------------------------------------------------
def _train_config(args):
    from .train.loop import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema=args.ema, seed=args.seed,
                       log_every=args.log_every, ckpt_every=args.ckpt_every, bf16=not args.no_bf16,
                       grad_accum=getattr(args, "grad_accum", 1), workers=getattr(args, "workers", 0),
                       fsdp=getattr(args, "fsdp", False), sample_every=getattr(args, "sample_every", 0))


def _command_line() -> str:
    """This command as typed (a ``--nproc`` run's workers get it from their launcher)."""
    import os

    argv = sys.argv[1:]
    if Path(sys.argv[0]).parent.name == "train":  # python -m varkit.train … (torchrun)
        argv = ["train", *argv]
    return os.environ.get("VARKIT_COMMAND") or "varkit " + " ".join(shlex.quote(a) for a in argv)


def _record_command(out: str, name: str, history: str | None = None) -> None:
    """Write ``out/name``: the record kept in ``out/history`` (the original command and each resume), if any,
    else this command."""
    from .io import write_text

    src = Path(out) / history if history else None
    write_text(Path(out) / name, src.read_text() if src is not None and src.is_file() else _command_line() + "\n")


def _start_record(args, train_dir: str) -> str:
    """The training loop starts (or, resuming, extends) ``out/train_dir/COMMAND.txt`` with this command once
    everything loaded; returns that record's name."""
    from .train import loop

    loop.RUN_COMMAND = _command_line()
    return f"{train_dir}/COMMAND.txt"


def relaunch_under_torchrun(nproc: int, module: str, skip_first: int, env: dict | None = None) -> None:
    """``--nproc N``: re-launch this command as ``python -m torch.distributed.run --nproc_per_node=N -m module …``
    (the arguments after the first ``skip_first`` words, without ``--nproc``), then exit with its status. A no-op
    for one process or inside torchrun already (``RANK`` set)."""
    import os
    import subprocess

    if nproc <= 1 or "RANK" in os.environ:
        return
    argv, skip = [], False
    for a in sys.argv[1 + skip_first:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    raise SystemExit(subprocess.call(cmd, env=env))


def _maybe_spawn(args) -> None:
    """``--nproc N`` re-launches this training command under torchrun with N processes, then exits."""
    import os

    # drop "train": the module below is varkit.train
    relaunch_under_torchrun(args.nproc, "varkit.train", 1, {**os.environ, "VARKIT_COMMAND": _command_line()})


def _check_train_inputs(args, kind: str) -> None:
    """What a training run reads and writes, checked before any process starts or anything loads: ``--out``
    (a folder that can be written), ``--config``, ``--tokenizer`` (a tokenizer folder of the config's family)
    and ``--resume`` (a varkit training checkpoint of this kind of run). Temporary files that killed runs left
    in the output folders are removed."""
    from .io import check_output_path, clean_stale_temporaries

    out = check_output_path(args.out, "folder")
    if kind == "tokenizer":
        from .tokenizers import TOKENIZER_CONFIGS

        TOKENIZER_CONFIGS.lookup(args.config)
    else:
        from .models.base import check_tokenizer_family
        from .models.registry import model_class

        gen_cls = model_class(args.config)
        args.tokenizer, tok_cfg = _tokenizer_folder(args.tokenizer)
        check_tokenizer_family(gen_cls, tok_cfg)
    if args.resume is not None:
        _check_resume(args.resume, kind)
    removed = [p for d in (out, out / f"train-{kind}", out / kind) for p in clean_stale_temporaries(d)]
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by killed runs in {out}", file=sys.stderr)


def _tokenizer_folder(spec: str) -> tuple[str, dict]:
    """``--tokenizer``: a tokenizer folder, or a bundled model name (its ``tokenizer/``); its config. A pipeline
    folder or a generator folder is refused with the folder to pass instead."""
    from .hub import ASSETS, bundled_models
    from .modeling import _MODULE_CLASSES, _import_module_packages, read_config
    from .models.base import Generator

    path = Path(spec)
    if not path.exists() and spec in bundled_models():
        path = ASSETS / spec / "tokenizer"
    cfg = read_config(path)
    if cfg.get("_class") == "Pipeline":
        raise InvalidArgumentError(f"--tokenizer {spec} is a pipeline folder; pass its tokenizer subfolder: "
                                   f"{path / 'tokenizer'}")
    _import_module_packages()
    cls = _MODULE_CLASSES.get(cfg.get("_class"))
    if cls is not None and issubclass(cls, Generator):
        raise InvalidArgumentError(f"--tokenizer {spec} holds a {cls.__name__} (a generator), not a tokenizer; pass "
                                   f"the tokenizer/ folder next to it ({path.parent / 'tokenizer'})")
    return str(path), cfg


def _check_resume(path: str, kind: str) -> None:
    """``--resume``: a checkpoint ``varkit train {kind}`` wrote, else one line saying what the file is."""
    from collections.abc import Mapping

    from .checkpoints.common import WRAPPERS, describe_other_generator, tensors_of
    from .errors import CheckpointError
    from .io import load_torch_checkpoint

    ck = load_torch_checkpoint(path, "varkit training checkpoint")
    run = ck.get("kind") if isinstance(ck, Mapping) else None
    if isinstance(run, str):
        if run.split(":", 1)[0] != kind:
            raise CheckpointError(f"--resume {path} is a checkpoint of a {run} run, not of a {kind} run; pass "
                                  f"OUT/train-{kind}/checkpoint.pt of the run to continue")
        return
    what = None
    if isinstance(ck, Mapping):
        for cand in [ck, *(ck[w] for w in WRAPPERS if isinstance(ck.get(w), Mapping))]:
            what = what or describe_other_generator(set(tensors_of(cand)), "varkit")
    found = f"it is {what}" if what else (f"it holds a {type(ck).__name__}" + (
        f" with keys {sorted(map(str, ck))[:4]}" if isinstance(ck, Mapping) else ""))
    raise CheckpointError(f"--resume {path} is not a varkit training checkpoint: {found}; pass the "
                          f"checkpoint.pt that `varkit train {kind}` wrote in OUT/train-{kind}/")


def cmd_train_tokenizer(args) -> None:
    from .train.tokenizer import train_tokenizer

    _check_train_inputs(args, "tokenizer")
    _maybe_spawn(args)
    cfg = _train_config(args)
    record = _start_record(args, "train-tokenizer")
    train_tokenizer(args.data, args.config, args.out, cfg, resolution=args.resolution,
                    device=args.device, resume=args.resume, flip=args.flip, adversarial=args.adversarial,
                    disc_start=args.disc_start)
    _record_command(args.out, "tokenizer/COMMAND.txt", record)


def cmd_train_generator(args) -> None:
    from .train.generator import check_generator_args, train_generator

    _check_train_inputs(args, "generator")
    defaults = _sampler_options(args.default)
    defaults.update({k: v for k, v in dict(cfg=args.default_cfg, top_k=args.default_top_k).items() if v is not None})
    cfg = _train_config(args)
    check_generator_args(cfg, args.resolution, args.class_dropout, defaults, args.teacher, args.ce_weight,
                         args.teacher_samples, args.distill_cfg)  # the API's checks, before any process starts
    _maybe_spawn(args)
    record = _start_record(args, "train-generator")
    train_generator(args.data, args.tokenizer, args.config, args.out, cfg,
                    resolution=args.resolution, device=args.device, resume=args.resume,
                    class_dropout=args.class_dropout, defaults=defaults, flip=args.flip, teacher=args.teacher,
                    ce_weight=args.ce_weight, teacher_samples_count=args.teacher_samples, init_from=args.init_from,
                    distill_cfg=args.distill_cfg, codes_dir=args.extract_codes, **_sampler_options(args.model_option))
    _record_command(args.out, "generator/COMMAND.txt", record)


def _add_train_common(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--data", required=True, help="'digits' or an image folder (one subfolder per class)")
    p.add_argument("--config", required=True, help="named config (see `varkit models`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=POSITIVE, default=32)
    p.add_argument("--steps", type=POSITIVE, default=1000)
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="global batch over all processes")
    p.add_argument("--lr", type=number_in(0, low_open=True), default=lr)
    p.add_argument("--warmup", type=NON_NEGATIVE, default=50)
    p.add_argument("--weight-decay", type=number_in(0), default=0.05)
    p.add_argument("--grad-clip", type=number_in(0), default=1.0)
    p.add_argument("--ema", type=number_in(0, 1, high_open=True), default=0.0, help="EMA decay (0 = off)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--log-every", type=POSITIVE, default=10)
    p.add_argument("--ckpt-every", type=POSITIVE, default=200)
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    add_device_argument(p)
    p.add_argument("--resume", default=None, help="checkpoint.pt of an interrupted run")
    p.add_argument("--nproc", type=POSITIVE, default=1, help="processes (torchrun DDP) on this machine")
    p.add_argument("--grad-accum", type=POSITIVE, default=1, metavar="N",
                   help="micro-batches per optimizer step (the global batch stays --batch-size)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=0, metavar="N",
                   help="DataLoader worker processes per rank (e.g. 4-8 for image folders; 0 = in process)")


# -- models ---------------------------------------------------------------------------------------
def cmd_models(args) -> None:
    from .models import list_models
    from .pipeline import bundled_models
    from .tokenizers import TOKENIZER_CONFIGS

    print("bundled pipelines:  " + ", ".join(bundled_models()))
    print("generator configs:  " + ", ".join(list_models()))
    print("tokenizer configs:  " + ", ".join(TOKENIZER_CONFIGS.names()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``varkit`` parser. With ``command`` (the subcommand on the command line, "" for none), the
    other commands of :data:`_EXTRA_COMMANDS` get a one-line stub instead of their full parser, whose
    builder imports their code (torch, converters, benches): ``varkit --help`` and ``varkit generate``
    then start in a fraction of the time. ``None`` builds everything."""
    parser = argparse.ArgumentParser(prog="varkit", description="visual autoregressive image generation")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with a bundled or saved model")
    g.add_argument("--model", default="digits", help="bundled model name or model folder")
    g.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: the first 10)")
    g.add_argument("--per-class", type=POSITIVE, default=1, help="images per class")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--batch-size", type=POSITIVE, default=None)
    add_device_argument(g)
    g.add_argument("--dtype", default="auto",
                   help="generator dtype: auto (default: bfloat16 where the CPU has AMX/AVX-512-BF16 or the GPU bf16, "
                        "else float32), float32 or bfloat16")
    g.add_argument("--prepack", nargs="?", choices=["auto", "on", "off"], const="on", default="auto",
                   help="CPU inference GEMMs on weights packed once for oneDNN (faster; one more copy of those "
                        "weights): auto (default: large weights, memory to spare, not with --compile), on, off")
    g.add_argument("--exact-tokenizer", action="store_true",
                   help="decode images with torch's convolutions, equal to the official tokenizers' (default on a CPU: "
                        "Winograd convolutions, ~1.8x faster on VAR's decoder, within ~1e-5 of them)")
    g.add_argument("--compile", action="store_true",
                   help="decode through a compiled step (raster, NAR, VAR, DD students): torch.compile on a CPU (the "
                        "first image compiles, tens of seconds), CUDA graphs on a GPU (captured on the first image)")
    g.add_argument("--out", default="samples.png",
                   help="a .png/.jpg/.webp grid (replaced if it exists), or a folder for one PNG per image")
    g.add_argument("--labels", action="store_true", help="write each image's class id under it in the grid")
    g.add_argument("--add", action="store_true",
                   help="into a non-empty --out folder: number the new images after the folder's own")
    g.add_argument("--overwrite", action="store_true",
                   help="into a non-empty --out folder: replace its images of the same names")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a tokenizer or a generator").add_subparsers(dest="what", required=True)
    tt = t.add_parser("tokenizer", help="train a tokenizer (VQ, multi-scale VQ or KL-VAE, by --config)")
    _add_train_common(tt, lr=2e-3)
    tt.add_argument("--adversarial", type=number_in(0), default=0.0,
                    help="weight of the hinge GAN loss from a small PatchGAN discriminator (0 = off)")
    tt.add_argument("--disc-start", type=NON_NEGATIVE, default=0, help="step at which the adversarial term switches on")
    tt.set_defaults(func=cmd_train_tokenizer)
    tg = t.add_parser("generator", help="train a generator over a frozen tokenizer")
    _add_train_common(tg, lr=1e-3)
    tg.add_argument("--tokenizer", required=True, help="tokenizer folder (from `varkit train tokenizer`)")
    tg.add_argument("--class-dropout", type=number_in(0, 1), default=0.1)
    tg.add_argument("--default-cfg", type=number_in(0), default=None, help="CFG scale stored as the model's default")
    tg.add_argument("--default-top-k", type=NON_NEGATIVE, default=None)
    tg.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                    help="another default sampling setting stored with the model (cfg_schedule=linear, num_iter=16, "
                         "head_steps=50, temperature=0.9 ...), repeatable")
    tg.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the named config (e.g. dim=128), repeatable")
    tg.add_argument("--teacher", default=None, metavar="MODEL",
                    help="distil from this pipeline (bundled name or folder, same tokenizer): loss = KL(teacher || student) "
                         "per position (e.g. a drafter for speculative decoding)")
    tg.add_argument("--ce-weight", type=number_in(0), default=0.0,
                    help="with --teacher: weight of the cross-entropy on the training tokens added to the KL")
    tg.add_argument("--teacher-samples", type=NON_NEGATIVE, default=0, metavar="N",
                    help="with --teacher: add N sequences sampled from the teacher (its default CFG) to the data")
    tg.add_argument("--distill-cfg", type=number_in(0), default=None, metavar="W",
                    help="with --teacher: run every row under the null condition too and add the KL of the "
                         "CFG-mixed (scale W) distributions, what speculative decoding compares")
    tg.add_argument("--init-from", default=None, metavar="MODEL",
                    help="copy every same-named, same-shaped weight from this generator (e.g. the target's first layers)")
    tg.add_argument("--extract-codes", default=None, metavar="DIR",
                    help="tokenize the dataset once into DIR (sharded over the processes; both orientations with "
                         "--flip) and train from those codes; a later run with the same DIR reuses them")
    tg.add_argument("--fsdp", action="store_true",
                    help="shard the generator over the processes (torch FSDP) instead of replicating it (DDP): "
                         "for generators over 1 B parameters")
    tg.add_argument("--sample-every", type=NON_NEGATIVE, default=0, metavar="N",
                    help="write a sample grid (up to 10 classes x 4 seeds) to train-generator/samples/ every N steps")
    tg.set_defaults(func=cmd_train_generator)
    from .distill.cli_commands import add_train_distill_parser

    add_train_distill_parser(t)

    m = sub.add_parser("models", help="list bundled models and named configs")
    m.set_defaults(func=cmd_models)

    for name, (help_text, add) in _EXTRA_COMMANDS.items():
        if command is None or command == name:
            add(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _add_eval(sub) -> None:
    from .eval.cli_commands import add_eval_parser

    add_eval_parser(sub)


def _add_convert(sub) -> None:
    from .checkpoints.cli_commands import add_convert_parser

    add_convert_parser(sub)


def _add_distill(sub) -> None:
    from .distill.cli_commands import add_distill_parser

    add_distill_parser(sub)


def _add_bench(sub) -> None:
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)


# Commands whose parsers live with their code: name -> (the help line `varkit --help` shows, builder).
# The help lines repeat the builders' own (tests/test_startup.py checks they agree).
_EXTRA_COMMANDS = {
    "eval": ("FID/IS/KID/precision/recall, reference statistics, tokenizer reconstruction", _add_eval),
    "convert": ("convert published checkpoints into varkit model folders", _add_convert),
    "bench": ("benchmarks: a table on stdout, JSON under bench/results/", _add_bench),
    "distill": ("Distilled Decoding (DD1): (noise, tokens) pairs from a teacher's flow map", _add_distill),
}


def _command_in(argv: list[str]) -> str:
    """The subcommand named on the command line ("" for none): the first argument that is not an option
    (``varkit`` itself takes no option but ``-h``)."""
    return next((a for a in argv if not a.startswith("-")), "")


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so every ``finally`` (atomic writes' temporaries) runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the command line: varkit's own warnings (``"varkit: ..."``) as one line,
    ``varkit: warning: ...``, without the source location and line Python adds; others as Python formats them."""
    text = str(message)
    if text.startswith("varkit: "):
        return f"varkit: warning: {text[len('varkit: '):]}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


_python_formatwarning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        args.func(args)
    except VarkitError as exc:
        print(f"varkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("varkit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("varkit: terminated (SIGTERM); files being written were removed, finished ones kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.formatwarning = previous_format
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
