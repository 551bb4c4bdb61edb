"""``varkit bench quality``: digits-FID and accuracy of the bundled models, per sampler.

Each model samples at its stored defaults (CFG, schedule, temperature, ``num_iter``, ``head_steps``)
unless ``--cfg`` overrides the scale, so the table shows what ``varkit generate`` gives. Cost is
reported per image: generator forward passes one image needs (passes of one batch: every image
of a batch advances together) and wall seconds over the whole run divided by the images made; and against the
floor of that run's work (:func:`varkit.bench.floor.run_floor`).
"""
from __future__ import annotations

import math
import time

from ..cli import add_device_argument
from ..eval.digits import digits_fid
from ..pipeline import bundled_models, load_pipeline
from .floor import run_floor
from .report import add_output_args, print_table, save_results

COLUMNS = ["model", "dtype", "sampler", "cfg", "cfg_schedule", "num_iter", "head_steps", "temperature", "images", "passes_per_image",
           "digits_fid", "accuracy", "s_per_image", "fraction_of_floor"]


def settings_used(pipe, sampler: str, cfg: float | None) -> dict:
    """The sampling settings a run of ``pipe`` at its defaults (``cfg`` overriding) uses, for the table."""
    p, gen = pipe.sampling_params(cfg=cfg), pipe.generator
    steps_for = getattr(gen.head, "steps_for", None)  # continuous heads: denoising steps per token
    return {"sampler": sampler, "cfg": p.cfg, "cfg_schedule": p.cfg_schedule, "temperature": p.temperature,
            "num_iter": p.num_iter or getattr(gen.config, "num_iter", None) or "",
            "head_steps": steps_for(p) if steps_for is not None else ""}


def cmd_bench_quality(args) -> None:
    rows = []
    runs = [(name, dt) for name in args.models or [m for m in bundled_models() if m.startswith("digits")]
            for dt in args.dtype or [None]]
    for name, dtype in runs:
        pipe = load_pipeline(name, device=args.device, dtype=dtype)
        labels = [c for c in range(pipe.num_classes) for _ in range(args.per_class)]
        def generate():
            return pipe(labels, sampler=args.sampler, cfg=args.cfg, seed=args.seed, batch_size=args.batch_size)

        t0, c0 = time.perf_counter(), time.process_time()
        out = generate()
        t1, cpu = time.perf_counter(), time.process_time() - c0
        m = digits_fid(out.images, labels)
        batches = math.ceil(len(labels) / (args.batch_size or len(labels)))
        rows.append({"model": name, "dtype": str(next(pipe.generator.parameters()).dtype).replace("torch.", ""),
                     **settings_used(pipe, pipe.sampler_choice(args.sampler)[0], args.cfg), "images": len(labels),
                     "forward_passes": out.stats.forward_passes, "passes_per_image": out.stats.forward_passes / batches,
                     "digits_fid": m["fid"], "accuracy": m["accuracy"], "generate_s": t1 - t0,
                     "s_per_image": (t1 - t0) / len(labels), "eval_s": time.perf_counter() - t1,
                     # the floor of the timed call (sampling and decoding), replayed with the same seeds
                     **run_floor(generate, [pipe.generator], len(labels), t1 - t0, others=[pipe.tokenizer], cpu_s=cpu)})
    print_table(rows, COLUMNS)
    print(f"wrote {save_results(args.name, rows, {k: v for k, v in vars(args).items() if k != 'func'}, args.out_dir)}")


def add_quality_bench_parser(bs) -> None:
    q = bs.add_parser("quality", help="digits-FID and classifier accuracy of the bundled digits models")
    q.add_argument("--models", nargs="*", default=None, help="default: every bundled digits model")
    q.add_argument("--sampler", default=None, help="default: each model's own (ancestral; distilled for a DD student)")
    q.add_argument("--cfg", type=float, default=None, help="CFG scale for every model (default: each model's own)")
    q.add_argument("--per-class", type=int, default=50)
    q.add_argument("--batch-size", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    add_device_argument(q)  # default auto, as every command
    q.add_argument("--dtype", nargs="+", default=None,
                   help="generator dtypes, a row each (float32, bfloat16, auto); default: each model's stored dtype")
    add_output_args(q, "quality")
    q.set_defaults(func=cmd_bench_quality)
