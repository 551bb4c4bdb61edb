"""``varkit bench cspd``: continuous speculative decoding, exact and relaxed, against the target alone.

Two settings:

- ``digits-mar`` (target) drafted by the bundled ``digits-mar-draft``, at each model's stored defaults
  (CFG 3 linear, 16 steps, 50 head steps): speed at batch 1 and digits quality.
- a MAR-L-sized target drafted by a MAR-B-sized one, both on random weights in MAR's format
  (:func:`varkit.bench.mar.random_weights`), with fewer steps (``--large-num-iter``, ``--large-head-steps``) so
  that it fits a CPU: acceptance there says nothing about quality, it gives passes and time.

Methods: ``target alone`` (the ancestral sampler: MAR's own loop), ``cspd exact`` (``--gamma`` drafted steps per
target pass, ``--prefill``), the official relaxations one by one (``cspd T=42``: ``inner_temperature=42``;
``cspd merged``: ``merged_window=True``) and together (``cspd official``).

Reported per method (speed at batch 1, every method on the same images, interleaved image by image):

- ``target_passes`` per image (prefill included, CFG pair once), ``pass_reduction`` = target alone's / this,
  ``draft_passes`` per image; ``target_prefixes`` per image: step outputs the target computed (an exact MAR
  window pass runs one encoder/decoder prefix per verified step: one pass in latency, several in compute);
- ``token_accept`` / ``step_accept``: drafted tokens / drafted steps accepted (all positions); the same by
  window position in the JSON (``acceptance_by_position``); ``shift_sigmas``: how far apart the two last-step
  Gaussians are, |μ_p − μ_q| / σ_p per channel averaged over verified tokens (what exact acceptance hinges on);
- ``s_per_image`` (wall) and ``cpu_s_per_image`` (this process's CPU time: the machine may be shared);
- ``accuracy`` and ``digits_fid`` (digits only): from ``--quality-per-class`` images per class sampled in
  batches (an image is the same at any batch size), decoded by the pipeline, scored by the digits CNN;
- ``met``: exact CSpD at ≥ 2× fewer target passes than the target alone (issue 16's target).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..cli import add_device_argument
from ..io import write_json
from ..samplers import SamplingParams
from ..samplers.ancestral import AncestralSampler
from ..samplers.cspd import CSpDSampler
from ..samplers.random import image_generators
from .continuous import add_continuous_args
from .floor import get_floor, replay_calls, run_floor, sampler_models
from .report import add_output_args, machine, print_table

COLUMNS = ["model", "method", "images", "target_passes", "pass_reduction", "draft_passes", "target_prefixes",
           "token_accept", "step_accept", "shift_sigmas", "s_per_image", "cpu_s_per_image", "fraction_of_floor", "accuracy",
           "digits_fid", "met"]
TARGET_REDUCTION = 2.0  # issue 16: exact mode, batch 1

RELAXED = {"cspd T=42": {"inner_temperature": 42.0}, "cspd merged": {"merged_window": True},
           "cspd official": {"inner_temperature": 42.0, "merged_window": True}}


def make_methods(params: SamplingParams, draft, gamma: int, prefill: float, relaxed: list[str]) -> dict:
    """Name → sampler: the target alone, exact CSpD, and the ``relaxed`` variants named in :data:`RELAXED`."""
    m = {"target alone": AncestralSampler(params),
         "cspd exact": CSpDSampler(params, draft=draft, gamma=gamma, prefill=prefill)}
    for name in relaxed:
        m[name] = CSpDSampler(params, draft=draft, gamma=gamma, prefill=prefill, **RELAXED[name])
    return m


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_batch1(gen, methods: dict, n: int, seed: int, floor: dict | None = None) -> dict[str, dict]:
    """Sample ``n`` images one at a time with every method, interleaved; per-method means and acceptance counts, and
    the floor of each method's timed calls (:func:`varkit.bench.floor.run_floor`: target, drafter and diffusion
    head passes, against ``floor``)."""
    dev = next(gen.parameters()).device
    labels = torch.arange(n, device=dev) % gen.num_classes
    gens = image_generators(seed, n)
    seeds = [g.initial_seed() for g in gens]
    keys = ("tokens_verified", "tokens_accepted", "steps_verified", "steps_accepted")
    acc = {k: {"wall": 0.0, "cpu": 0.0, "passes": 0, "draft": 0, "prefixes": 0, "shift": 0.0,
               **{c: None for c in keys}} for k in methods}
    for i in range(n):
        for k, smp in methods.items():
            g = [torch.Generator().manual_seed(seeds[i])]
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            res = smp.sample(gen, labels[i:i + 1], g)
            _sync(dev)
            a = acc[k]
            a["wall"] += time.perf_counter() - t0
            a["cpu"] += time.process_time() - c0
            a["passes"] += res.stats.forward_passes
            a["draft"] += res.stats.draft_passes
            tr = getattr(smp, "trace", {}) if isinstance(smp, CSpDSampler) else {}
            a["prefixes"] += tr.get("target_prefixes", res.stats.forward_passes)
            a["shift"] += tr.get("mean_shift_sigmas", 0.0)
            for c in keys:
                if c in tr:
                    v = torch.tensor(tr[c])
                    a[c] = v if a[c] is None else a[c] + v
        print(f"  image {i + 1}/{n}: " + ", ".join(f"{k} {acc[k]['passes'] / (i + 1):.1f} passes" for k in methods), flush=True)
    out = {}
    for k, a in acc.items():
        r = {"images": n, "target_passes": a["passes"] / n, "draft_passes": a["draft"] / n,
             "target_prefixes": a["prefixes"] / n, "s_per_image": a["wall"] / n, "cpu_s_per_image": a["cpu"] / n,
             **run_floor(replay_calls(methods[k], gen, labels, seeds), sampler_models(gen, methods[k]), n, a["wall"],
                         floor, cpu_s=a["cpu"]),
             "token_accept": "", "step_accept": "", "shift_sigmas": "", "by_position": None}
        if a["tokens_verified"] is not None:
            tv, ta, sv, sa = (a[c].double() for c in keys)
            r["token_accept"] = float(ta.sum() / tv.sum().clamp(min=1))
            r["step_accept"] = float(sa.sum() / sv.sum().clamp(min=1))
            r["shift_sigmas"] = a["shift"] / n
            r["by_position"] = {"token_accept": (ta / tv.clamp(min=1)).tolist(), "step_accept": (sa / sv.clamp(min=1)).tolist(),
                                "tokens_verified": tv.tolist(), "steps_verified": sv.tolist()}
        out[k] = r
    return out


def quality(pipe, methods: dict, per_class: int, batch: int, seed: int) -> dict[str, dict]:
    """Digits accuracy and FID of every method on ``per_class`` images per class, sampled ``batch`` at a time."""
    from ..eval.digits import digits_fid

    labels = [c for c in range(pipe.num_classes) for _ in range(per_class)]
    cond = torch.tensor(labels, device=pipe.device)
    gens = image_generators(seed, len(labels))
    out = {}
    for k, smp in methods.items():
        if hasattr(smp, "bind_tokenizer"):
            smp.bind_tokenizer(pipe.tokenizer)
        images = []
        for i in range(0, len(labels), batch):
            images += pipe.decode(smp.sample(pipe.generator, cond[i:i + batch], gens[i:i + batch]).tokens)
        m = digits_fid(images, labels)
        out[k] = {"accuracy": m["accuracy"], "digits_fid": m["fid"], "quality_images": len(labels)}
        print(f"  quality {k}: accuracy {m['accuracy']:.3f}, digits FID {m['fid']:.2f}", flush=True)
    return out


def rows_for(model: str, speed: dict, qual: dict | None = None) -> list[dict]:
    base = speed["target alone"]["target_passes"]
    rows = []
    for k, r in speed.items():
        row = {"model": model, "method": k, **{c: v for c, v in r.items() if c != "by_position"},
               "pass_reduction": base / r["target_passes"], "accuracy": "", "digits_fid": "", "met": ""}
        if qual is not None:
            row |= qual[k]
        if k == "cspd exact":
            row["met"] = "yes" if row["pass_reduction"] >= TARGET_REDUCTION else "no"
        rows.append(row)
    return rows


def continuous_cspd_rows(args, pipe, dpipe, params) -> list[dict]:
    """Continuous-batching rows (:mod:`.continuous`) of exact CSpD and of the official inner temperature alone (the
    merged window has no per-row steps: it takes ``max_batch`` images at a time)."""
    from .continuous import continuous_rows

    rows = []
    for label in ("cspd exact", "cspd T=42"):
        extra = RELAXED.get(label, {})

        def make(extra=extra):
            smp = CSpDSampler(params, draft=dpipe, gamma=args.gamma, prefill=args.prefill, **extra)
            smp.bind_tokenizer(pipe.tokenizer)
            return smp

        print(f"{args.bundled}: {label}, {args.continuous_images} images at batch 1, lockstep "
              f"{args.continuous_batch} and continuous {args.continuous_batch}", flush=True)
        rows += continuous_rows(args.bundled, label, make, pipe.generator, args.continuous_images,
                                args.continuous_batch, args.seed)
    return rows


def cmd_bench_cspd(args) -> None:
    from ..device import resolve_device, resolve_dtype
    from ..errors import InvalidArgumentError
    from ..pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.gamma, args.images, args.large_images, args.quality_per_class, args.quality_batch) < 1:
        raise InvalidArgumentError("--gamma, --images, --large-images, --quality-per-class and --quality-batch must be >= 1")
    if args.continuous_images < 0 or args.continuous_batch < 1:
        raise InvalidArgumentError("--continuous-images must be >= 0 (0: no continuous rows) and --continuous-batch >= 1")
    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or torch.float32
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"dtype": str(dtype)}
    rows, by_position = [], {}
    floor = None if args.continuous_only else get_floor(dev, quick=True, verbose=True)
    if not args.skip_bundled:
        pipe = load_pipeline(args.bundled, device=dev)
        pipe.generator.to(dtype)
        dpipe = load_pipeline(args.draft, device=dev)
        dpipe.generator.to(dtype)
        params = pipe.sampling_params()
        settings["bundled_params"] = {k: v for k, v in vars(params).items()}
        if args.continuous_images:  # continuous batching: passes per image, batch 1 vs lockstep B vs continuous B
            from .continuous import write_continuous

            write_continuous(args, continuous_cspd_rows(args, pipe, dpipe, params))
        if args.continuous_only:
            return
        methods = make_methods(params, dpipe, args.gamma, args.prefill, list(RELAXED))
        for smp in methods.values():
            if hasattr(smp, "bind_tokenizer"):
                smp.bind_tokenizer(pipe.tokenizer)
        print(f"{args.bundled} drafted by {args.draft}: {len(methods)} methods x {args.images} images at batch 1", flush=True)
        speed = run_batch1(pipe.generator, methods, args.images, args.seed, floor)
        qual = None
        if not args.skip_quality:
            print(f"{args.bundled}: quality, {args.quality_per_class} images per class", flush=True)
            qual = quality(pipe, methods, args.quality_per_class, args.quality_batch, args.seed + 1)
        rows += rows_for(args.bundled, speed, qual)
        by_position[args.bundled] = {k: r["by_position"] for k, r in speed.items() if r["by_position"]}
        print_table(rows, COLUMNS)
    if not args.skip_large:
        from .mar import random_weights

        gen = random_weights(args.large, args.seed, None)[0].to(dev, dtype)
        draft = random_weights(args.large_draft, args.seed + 1, None)[0].to(dev, dtype)
        params = SamplingParams(cfg=args.large_cfg, cfg_schedule="linear", num_iter=args.large_num_iter,
                                head_steps=args.large_head_steps)
        methods = make_methods(params, draft, args.large_gamma, args.prefill, ["cspd official"])
        name = f"{args.large}-random (draft {args.large_draft}-random)"
        print(f"{name}: {len(methods)} methods x {args.large_images} images at batch 1", flush=True)
        speed = run_batch1(gen, methods, args.large_images, args.seed, floor)
        rows += rows_for(name, speed)
        by_position[name] = {k: r["by_position"] for k, r in speed.items() if r["by_position"]}
    print_table(rows, COLUMNS)
    path = Path(args.out_dir) / f"{args.name}.json"
    write_json(path, {"benchmark": args.name, "machine": machine(), "settings": settings, "rows": rows,
                      "acceptance_by_position": by_position, "floor": floor, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")


def add_cspd_bench_parser(bench_subparsers) -> None:
    """``varkit bench cspd``; ``bench_subparsers`` is the ``varkit bench`` subparsers object."""
    s = bench_subparsers.add_parser(
        "cspd", help="continuous speculative decoding (exact and the official relaxations) vs the target alone: "
                     "target passes, acceptance by position, time at batch 1, digits accuracy/FID")
    s.add_argument("--bundled", default="digits-mar", help="bundled continuous pipeline (digits: accuracy and FID too)")
    s.add_argument("--draft", default="digits-mar-draft", help="its drafter (bundled name or folder)")
    s.add_argument("--gamma", type=int, default=8, help="drafted steps per target pass")
    s.add_argument("--prefill", type=float, default=0.15, help="share of the steps done by the target alone")
    s.add_argument("--images", type=int, default=20, help="images per method at batch 1 (speed)")
    s.add_argument("--quality-per-class", type=int, default=30, help="images per class for accuracy / FID")
    s.add_argument("--quality-batch", type=int, default=100, help="batch size of the quality runs")
    s.add_argument("--skip-quality", action="store_true")
    s.add_argument("--large", default="mar-large", help="MAR config of the random-weight target")
    s.add_argument("--large-draft", default="mar-base", help="MAR config of its random-weight drafter")
    s.add_argument("--large-num-iter", type=int, default=16, help="decode steps of the large pair")
    s.add_argument("--large-head-steps", type=int, default=10, help="denoising steps per token of the large pair")
    s.add_argument("--large-gamma", type=int, default=4, help="drafted steps per target pass, large pair")
    s.add_argument("--large-cfg", type=float, default=3.0)
    s.add_argument("--large-images", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_argument(s)  # default auto, as every command
    s.add_argument("--dtype", default=None)
    s.add_argument("--skip-bundled", action="store_true")
    s.add_argument("--skip-large", action="store_true")
    add_continuous_args(s)
    add_output_args(s, "cspd")
    s.set_defaults(func=cmd_bench_cspd)
