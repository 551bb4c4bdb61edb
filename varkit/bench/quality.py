"""``varkit bench quality``: digits-FID and accuracy of the bundled models, per sampler."""
from __future__ import annotations

import time

from ..eval.digits import digits_fid
from ..pipeline import bundled_models, load_pipeline
from .report import add_output_args, print_table, save_results

COLUMNS = ["model", "sampler", "cfg", "images", "forward_passes", "digits_fid", "accuracy", "generate_s", "eval_s"]


def cmd_bench_quality(args) -> None:
    rows = []
    for name in args.models or [m for m in bundled_models() if m.startswith("digits")]:
        pipe = load_pipeline(name, device=args.device)
        labels = [c for c in range(pipe.num_classes) for _ in range(args.per_class)]
        t0 = time.perf_counter()
        out = pipe(labels, sampler=args.sampler, cfg=args.cfg, seed=args.seed, batch_size=args.batch_size)
        t1 = time.perf_counter()
        m = digits_fid(out.images, labels)
        rows.append({"model": name, "sampler": args.sampler, "cfg": args.cfg, "images": len(labels),
                     "forward_passes": out.stats.forward_passes, "digits_fid": m["fid"], "accuracy": m["accuracy"],
                     "generate_s": t1 - t0, "eval_s": time.perf_counter() - t1})
    print_table(rows, COLUMNS)
    print(f"wrote {save_results(args.name, rows, {k: v for k, v in vars(args).items() if k != 'func'}, args.out_dir)}")


def add_quality_bench_parser(bs) -> None:
    q = bs.add_parser("quality", help="digits-FID and classifier accuracy of the bundled digits models")
    q.add_argument("--models", nargs="*", default=None, help="default: every bundled digits model")
    q.add_argument("--sampler", default="ancestral")
    q.add_argument("--cfg", type=float, default=2.0)
    q.add_argument("--per-class", type=int, default=50)
    q.add_argument("--batch-size", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    add_output_args(q, "quality")
    q.set_defaults(func=cmd_bench_quality)
