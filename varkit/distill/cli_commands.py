"""argparse wiring of ``varkit distill data`` and ``varkit train distill`` (no torch at import: the CLI's start-up
stays light); the handlers are thin calls into :mod:`varkit.distill.data` and :mod:`varkit.train.distill`."""
from __future__ import annotations

import os
import sys

from ..cli import add_device_argument, relaunch_under_torchrun

DISTILL_HELP = "Distilled Decoding (DD1): (noise, tokens) pairs from a teacher's flow map"


def _spawn(args, module: str, skip_first: int) -> None:
    """``--nproc N`` re-launches this command under torchrun with N processes (``python -m module …``), then exits."""
    relaunch_under_torchrun(args.nproc, module, skip_first)


def cmd_distill_data(args) -> None:
    from ..cli import _record_command
    from .data import dist_env, make_distill_data

    _spawn(args, "varkit.distill", skip_first=1)  # drop "distill": the module below is varkit.distill
    out = make_distill_data(args.teacher, args.num, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                            seed=args.seed, flow_steps=args.flow_steps, device=args.device)
    if dist_env()[0] == 0:
        _record_command(str(out), "COMMAND.txt")
        print(f"wrote {args.num} (noise, tokens, class) samples of {args.teacher} in {out}/")


def add_distill_parser(sub) -> None:
    d = sub.add_parser("distill", help=DISTILL_HELP).add_subparsers(dest="distill", required=True)
    p = d.add_parser("data", help="(noise, tokens, class) pairs made by a teacher through DD1's flow map "
                                  "(batched, resumable, sharded over torchrun ranks)")
    p.add_argument("--teacher", required=True, help="bundled model name or pipeline folder (raster or scales, ids)")
    p.add_argument("--num", type=int, required=True, help="samples to make (classes cycle 0, 1, ...)")
    p.add_argument("--out", required=True, help="data folder; an interrupted run resumes into it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    p.add_argument("--flow-steps", type=int, default=32, help="Euler steps of the per-token flow (>= 32: ~1%% TV)")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)  # default auto, as every command
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) on this machine, each makes its shards")
    p.set_defaults(func=cmd_distill_data)


def cmd_train_distill(args) -> None:
    from ..cli import _record_command, _train_config
    from ..train.distill import train_distill

    _spawn(args, "varkit.train", skip_first=1)  # drop "train": the module below is varkit.train
    train_distill(args.teacher, args.data, args.out, _train_config(args), timesteps=args.timesteps,
                  mse_weight=args.mse_weight, split=args.split, device=args.device, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        _record_command(args.out, "generator/COMMAND.txt")


def add_train_distill_parser(t) -> None:
    p = t.add_parser("distill", help="a DD1 student (one/two-step sampler) from a teacher and `varkit distill data` pairs")
    p.add_argument("--teacher", required=True, help="the teacher the data was made with (bundled name or folder)")
    p.add_argument("--data", required=True, help="a `varkit distill data` folder")
    p.add_argument("--out", required=True, help="output pipeline folder (samples with sampler=distilled by default)")
    p.add_argument("--timesteps", default="0", help="layout steps trained as the data/noise boundary: 0 (one-step), "
                                                   "0,T (also two-step from T; official t_list)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="weight of the continuous output's squared error")
    p.add_argument("--split", type=int, default=None,
                   help="stored default: layout step from which sampling uses the continuous output (official split_t)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    add_device_argument(p)  # default auto, as every command
    p.add_argument("--resume", default=None, help="checkpoint.pt of an interrupted run")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun DDP) on this machine")
    p.set_defaults(func=cmd_train_distill)
    add_train_distill_dd2_parser(t)


def cmd_train_distill_dd2(args) -> None:
    from ..cli import _record_command
    from .dd2 import train_dd2

    train_dd2(args.teacher, args.data, args.out, init=args.init, gts_steps=args.gts_steps, steps=args.steps,
              guidance_updates=args.guidance_updates, batch_size=args.batch_size, gen_lr=args.gen_lr,
              gui_lr=args.gui_lr, warmup=args.warmup, ema=args.ema, noise_samples=args.noise_samples,
              head_width=args.head_width, head_depth=args.head_depth, seed=args.seed, log_every=args.log_every,
              eval_every=args.eval_every, device=args.device)
    _record_command(args.out, "generator/COMMAND.txt")


def add_train_distill_dd2_parser(t) -> None:
    p = t.add_parser("distill-dd2", help="a DD2 one-step generator (conditional score distillation, docs/dd2.md) "
                                         "from a raster teacher and its `varkit distill data` sequences")
    p.add_argument("--teacher", required=True, help="the teacher (bundled name or folder; raster, ids)")
    p.add_argument("--data", required=True, help="a `varkit distill data` folder of that teacher (GTS tuning)")
    p.add_argument("--out", required=True, help="output pipeline folder (samples with sampler=distilled, one step)")
    p.add_argument("--init", default=None, help="a DD1 student folder to start the generator from (default: the "
                                                "teacher's transformer with fresh input/output layers)")
    p.add_argument("--gts-steps", type=int, default=300, help="GTS tuning steps of the guidance network (Eq. 6)")
    p.add_argument("--steps", type=int, default=500, help="generator updates (Eq. 4)")
    p.add_argument("--guidance-updates", type=int, default=2, help="guidance updates (Eq. 5) per generator update")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gen-lr", type=float, default=1e-4)
    p.add_argument("--gui-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100, help="generator steps of linear warm-up from 1e-6")
    p.add_argument("--ema", type=float, default=0.9999, help="cap of the progressive EMA rate (iter+1)/(iter+10)")
    p.add_argument("--noise-samples", type=int, default=4, help="noisy copies per token in the guidance losses")
    p.add_argument("--head-width", type=int, default=256)
    p.add_argument("--head-depth", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="log one-step digits accuracy/FID of 200 samples every N steps")
    add_device_argument(p)  # default auto, as every command
    p.set_defaults(func=cmd_train_distill_dd2)


def main_module(argv: list[str] | None = None) -> int:
    """``python -m varkit.distill …`` (what torchrun launches): ``varkit distill …``."""
    from ..cli import main

    return main(["distill", *(sys.argv[1:] if argv is None else argv)])

