"""argparse wiring of ``varkit eval {fid,stats,recon}``; every handler is a thin call into varkit.eval.

Hook into the main CLI with ``add_eval_parser(subparsers)``; each leaf parser sets
``func=handler``, and ``handler(args)`` returns the exit status (0). Failures raise
``VarkitError``, which the main CLI prints as one line (exit 2).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from ..errors import InvalidArgumentError

FEATURES_HELP = ("inception: torch-fidelity's InceptionV3 from --inception-weights (papers' FID); "
                 "digits: varkit's shipped digits CNN (bundled digits models, no weights needed)")


def parse_sampler_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["window=16", "name=foo"]`` → ``{"window": 16, "name": "foo"}`` (values parsed as JSON if they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _sampler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    opts = parse_sampler_args(args.option)
    if args.window is not None:
        opts["window"] = args.window
    return opts


def _device(args: argparse.Namespace) -> str | None:
    return None if args.device == "auto" else args.device


def _metrics(text: str) -> list[str]:
    from .fid import ALL_METRICS

    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL_METRICS]
    if bad or not names:
        raise InvalidArgumentError(f"--metrics takes a comma-separated subset of {','.join(ALL_METRICS)}, got {text!r}")
    return names


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", choices=("inception", "digits"), default="inception", help=FEATURES_HELP)
    p.add_argument("--inception-weights", metavar="PATH",
                   help="local InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth, or pytorch-fid's "
                        "identical pt_inception-2015-12-05-6726825d.pth); default: torch-fidelity's cache folder")
    from ..cli import add_device_argument

    add_device_argument(p)  # "auto" reaches the eval functions as None (their auto: per-rank GPUs under torchrun)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` with the subcommands ``fid``, ``stats`` and ``recon`` to ``subparsers``."""
    from ..cli import POSITIVE, SEED
    ev = subparsers.add_parser("eval", help="FID/IS/KID/precision/recall, reference statistics, tokenizer reconstruction",
                               description="Evaluate generators and tokenizers (torch-fidelity, offline).")
    sub = ev.add_subparsers(dest="eval_command", metavar="{fid,stats,recon}")
    sub.required = True

    f = sub.add_parser("fid", help="generate samples and compute FID, IS, KID, precision and recall",
                       description="Generate --num-samples samples (balanced over classes, resumable, sharded over "
                                   "torchrun ranks) and score them against --ref with torch-fidelity. Sampling "
                                   "settings left unset take the model's published defaults; the JSON records all.")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="bundled model name or pipeline folder")
    src.add_argument("--samples", metavar="FOLDER", help="score an existing image folder instead of generating")
    f.add_argument("--ref", help="reference: image folder, STATS.npz (varkit eval stats), ADM reference batch "
                                 ".npz (VIRTUAL_imagenet256_labeled.npz layout), or `digits` (default with "
                                 "--features digits)")
    _add_feature_args(f)
    f.add_argument("--num-samples", type=int, help="number of samples (default: the model's, 50 per class)")
    f.add_argument("--sampler", help="sampler name (default: the model's, else ancestral)")
    f.add_argument("--cfg", type=float)
    f.add_argument("--cfg-schedule", choices=("constant", "linear", "var"))
    f.add_argument("--top-k", type=int, help="0 = off")
    f.add_argument("--top-p", type=float, help="1 = off")
    f.add_argument("--temperature", type=float)
    f.add_argument("--head-steps", type=str, help="continuous heads (MAR, FlowAR): denoising steps per token, or START:END (annealed, e.g. 50:5)")
    f.add_argument("--num-iter", type=int, help="sets layouts (MAR): decoding steps")
    f.add_argument("--guidance-interval", type=float, help="flow heads (FlowAR): CFG only while t <= this, in [0, 1]")
    f.add_argument("--window", type=int, help="SJD window length")
    f.add_argument("--option", "--sampler-arg", dest="option", action="append", metavar="KEY=VALUE",
                   help="extra sampler option, repeatable (as in `varkit generate`)")
    f.add_argument("--preset", help="a named settings preset of the model (converted LlamaGen/NAR: `demo`, the demo "
                                    "script's); default: the model's paper FID protocol")
    f.add_argument("--image-size", type=int, help="evaluate samples at this size, resized bicubic (default: the "
                                                  "protocol's, e.g. 256 for LlamaGen's 384 px models)")
    f.add_argument("--dtype", default="auto",
                   help="generator dtype: auto (default: bfloat16 where the CPU has AMX/AVX-512-BF16 or the GPU bf16, "
                        "else float32), float32 or bfloat16; part of the samples folder's settings")
    f.add_argument("--compile", action="store_true", help="decode through a torch.compile'd step (raster models)")
    f.add_argument("--prepack", action="store_true", help="CPU inference GEMMs on prepacked weights")
    f.add_argument("--nproc", type=int, default=1,
                   help="generate with N processes on this machine (torchrun; one GPU each when there are GPUs)")
    f.add_argument("--export-npz", metavar="SAMPLES.npz",
                   help="also write the samples as the ADM evaluator's batch (arr_0, uint8 N x H x W x 3)")
    f.add_argument("--seed", type=SEED, default=0, help="sample i uses seed*1000003+i")
    f.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    f.add_argument("--metric-batch-size", type=POSITIVE, default=None, help="feature-extraction batch size")
    f.add_argument("--out", metavar="FOLDER", help="samples folder (default: eval/<model>-<sampler>-<settings hash>)")
    f.add_argument("--json", metavar="PATH", help="result JSON (default: <out>/metrics_<features>.json)")
    f.add_argument("--metrics", type=_metrics, default=["fid", "isc", "kid", "prc"],
                   help="comma-separated subset of fid,isc,kid,prc")
    f.add_argument("--kid-subset-size", type=POSITIVE, default=1000)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=run_fid)

    s = sub.add_parser("stats", help="reference statistics of an image folder, computed once, reusable as --ref",
                       description="Write mu, sigma and features of FOLDER (or `digits`) to an .npz for --ref.")
    s.add_argument("folder", metavar="FOLDER")
    s.add_argument("--out", required=True, metavar="STATS.npz")
    _add_feature_args(s)
    s.add_argument("--batch-size", type=POSITIVE, default=None)
    s.add_argument("--no-features", action="store_true",
                   help="store only mu/sigma (smaller; then --ref gives FID and IS only, no KID/precision/recall)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_stats)

    r = sub.add_parser("recon", help="PSNR, SSIM, rFID and codebook usage of a tokenizer's encode→decode",
                       description="Reconstruct every image of --images through --tokenizer and score it.")
    r.add_argument("--tokenizer", required=True, help="bundled model name, pipeline folder or tokenizer folder")
    r.add_argument("--images", required=True, metavar="FOLDER")
    _add_feature_args(r)
    r.add_argument("--resolution", type=int, help="resize (shorter side) and centre-crop images to this size first")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--max-images", type=POSITIVE)
    r.add_argument("--save-recon", metavar="FOLDER", help="also write the reconstructions as PNGs")
    r.add_argument("--json", metavar="PATH")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_recon)
    return ev


def _spawn_ranks(nproc: int) -> None:
    """``--nproc N`` re-launches this command under torchrun with N processes, then exits with its status."""
    from ..cli import relaunch_under_torchrun

    if nproc < 1:
        raise InvalidArgumentError(f"--nproc must be >= 1, got {nproc}")
    relaunch_under_torchrun(nproc, "varkit.cli", 0)


def run_fid(args: argparse.Namespace) -> int:
    from .fid import eval_fid, eval_folder

    if args.samples is not None and (args.nproc != 1 or args.export_npz):
        raise InvalidArgumentError("--nproc and --export-npz apply when generating (--model), not to --samples")
    _spawn_ranks(args.nproc)
    common = dict(features=args.features, inception_weights=args.inception_weights, metrics=args.metrics,
                  device=_device(args), kid_subset_size=args.kid_subset_size, progress=not args.no_progress)
    if args.samples is not None:
        eval_folder(args.samples, args.ref, json_path=args.json, batch_size=args.metric_batch_size, **common)
        return 0
    eval_fid(args.model, ref=args.ref, num_samples=args.num_samples, sampler=args.sampler, cfg=args.cfg,
             cfg_schedule=args.cfg_schedule, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
             head_steps=args.head_steps, num_iter=args.num_iter, guidance_interval=args.guidance_interval, sampler_kwargs=_sampler_kwargs(args), seed=args.seed, batch_size=args.batch_size,
             out_dir=args.out, json_path=args.json, metric_batch_size=args.metric_batch_size, preset=args.preset,
             image_size=args.image_size, dtype=args.dtype, compile=args.compile, prepack=args.prepack,
             export_npz_path=args.export_npz, **common)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from .stats import compute_stats

    res = compute_stats(args.folder, args.out, features=args.features, inception_weights=args.inception_weights,
                        device=_device(args), batch_size=args.batch_size, progress=not args.no_progress,
                        save_features=not args.no_features)
    print(f"wrote {res['out']}: {res['features']} statistics ({res['dim']}-d) of {res['num_images']} images")
    return 0


def run_recon(args: argparse.Namespace) -> int:
    from .recon import eval_recon

    eval_recon(args.tokenizer, args.images, features=args.features, inception_weights=args.inception_weights,
               device=_device(args), batch_size=args.batch_size, resolution=args.resolution,
               max_images=args.max_images, save_dir=args.save_recon, json_path=args.json,
               progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m varkit.eval.cli_commands eval fid ...``), for tests and before wiring."""
    parser = argparse.ArgumentParser(prog="varkit")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
