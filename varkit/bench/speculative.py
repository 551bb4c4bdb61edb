"""``varkit bench speculative``: draft-model speculative decoding and LANTERN against ancestral and SJD.

Methods, on the bundled ``digits`` pipeline (drafter: the bundled ``digits-draft``) and on a
random-weight LlamaGen-B (drafter: a random 2-layer raster model over the same vocabulary;
LlamaGen's zero-initialised ``output`` heads are given N(0, 0.02) weights, and LANTERN a random
unit-norm 16384×8 codebook like LlamaGen's VQ):

``ancestral``, ``sjd`` (window ``--window``), ``speculative`` (``--gamma`` drafts),
``sjd+lantern`` and ``speculative+lantern`` at ``--delta`` (default bound: TV ≤ δ per position),
and with ``--paper`` the same two under the official per-draft rule (``bound="draft"``).

Every method samples the same images (same labels, same per-image seeds) one at a time
(batch 1), interleaved image by image so machine load hits all methods alike. Reported:

- ``target_passes``: target forward passes per image (prefill included, CFG pair counted once),
  ``pass_reduction`` = ancestral's / this; ``draft_passes``: drafter calls per image;
- ``accepted_len``: mean accepted length, tokens per target pass (``SamplerStats.mean_accepted``);
- ``images_per_s``: images over the wall-clock seconds of the sampling calls (decoding excluded);
- ``accuracy``: the digits classifier's accuracy on the decoded images (digits only);
- ``met``: issue #7's target, ``pass_reduction`` ≥ 3 with accuracy at most 5 points below
  ancestral's (digits only);
- ``draft_tv``: the drafter's mean per-position total-variation distance to the target, both
  CFG'd and processed as the samplers see them, teacher-forced on the ancestral samples
  (:func:`draft_tv`; a draft at per-position TV ``t`` is accepted with probability ``1 − t``).

A δ sweep (``--deltas``) on the bundled model gives target passes and accuracy of both LANTERN
variants against δ: ``<out-dir>/lantern_delta.png``. Everything lands in ``<out-dir>/<name>.json``.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from ..io import atomic_path, write_json
from ..samplers import SamplingParams, get_sampler
from ..samplers.logits import image_generators, mix_cfg, processed_probs
from ..samplers.sjd import SJDSampler
from ..samplers.speculative import SpeculativeSampler
from .continuous import add_continuous_args
from .floor import get_floor, replay_calls, run_floor, sampler_models
from .report import add_output_args, add_sampler_run_args, machine, print_table

COLUMNS = ["model", "method", "images", "target_passes", "pass_reduction", "draft_passes", "accepted_len",
           "images_per_s", "fraction_of_floor", "accuracy", "met"]
TARGET_REDUCTION, TARGET_ACCURACY_DROP = 3.0, 0.05  # issue #7


def sjd_relaxes() -> bool:
    """Whether this SJD takes LANTERN's ``relax=`` option."""
    return "relax" in inspect.signature(SJDSampler.__init__).parameters


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_methods(params: SamplingParams, draft, codebook, gamma: int, window: int, k: int, delta: float,
                 paper: bool = False) -> dict:
    """Name → sampler; SJD + LANTERN only where SJD has the relax hook."""
    lantern = {"relax": "lantern", "k": k, "delta": delta, "codebook": codebook}
    m = {"ancestral": get_sampler("ancestral", params),
         "sjd": SJDSampler(params, window=window),
         "speculative": SpeculativeSampler(params, draft=draft, gamma=gamma)}
    bounds = ["position"] + (["draft"] if paper else [])
    for b in bounds:
        tag = "" if b == "position" else " (paper)"
        if sjd_relaxes():
            m[f"sjd+lantern{tag}"] = SJDSampler(params, window=window, bound=b, **lantern)
        m[f"speculative+lantern{tag}"] = SpeculativeSampler(params, draft=draft, gamma=gamma, bound=b, **lantern)
    return m


def run_methods(gen, methods: dict, n: int, seed: int = 0, decode=None, score=None,
                tokens_out: dict | None = None, floor: dict | None = None) -> dict[str, dict]:
    """Sample ``n`` images at batch 1 with every method, interleaved; per-method totals, with the floor of each
    method's timed calls (:func:`varkit.bench.floor.run_floor`: target and draft passes, against ``floor``).
    ``tokens_out`` (if given) receives every method's (labels, sampled tokens)."""
    dev = next(gen.parameters()).device
    labels = torch.arange(n, device=dev) % gen.num_classes
    seeds = [g.initial_seed() for g in image_generators(seed, n)]
    acc = {k: {"wall": 0.0, "cpu": 0.0, "passes": 0, "draft": 0, "accepted": 0.0, "tokens": []} for k in methods}
    for smp in methods.values():  # warm-up
        smp.sample(gen, labels[:1], image_generators(seed + 1, 1))
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
            a["draft"] += smp.trace["draft_passes"] if isinstance(smp, SpeculativeSampler) else 0
            a["accepted"] += res.stats.mean_accepted
            a["tokens"].append(res.tokens.cpu())
    out = {}
    for k, a in acc.items():
        if tokens_out is not None:
            tokens_out[k] = (labels, torch.cat(a["tokens"]).to(dev))
        r = {"images": n, "target_passes": a["passes"] / n, "draft_passes": a["draft"] / n,
             "accepted_len": a["accepted"] / n, "images_per_s": n / a["wall"],
             **run_floor(replay_calls(methods[k], gen, labels, seeds), sampler_models(gen, methods[k]), n, a["wall"],
                         floor, cpu_s=a["cpu"]),
             "accuracy": ""}
        if decode is not None and score is not None:
            r["accuracy"] = score(decode(torch.cat(a["tokens"]).to(dev)), labels.tolist())
        out[k] = r
    return out


def rows_for(model: str, results: dict[str, dict]) -> list[dict]:
    """Table rows; ``met`` where accuracy is known: ≥ 3x fewer target passes, ≤ 5 points less accurate."""
    base = results["ancestral"]
    rows = []
    for k, r in results.items():
        row = {"model": model, "method": k} | r | {"pass_reduction": base["target_passes"] / r["target_passes"], "met": ""}
        if k != "ancestral" and isinstance(r["accuracy"], float) and isinstance(base["accuracy"], float):
            ok = row["pass_reduction"] >= TARGET_REDUCTION and r["accuracy"] >= base["accuracy"] - TARGET_ACCURACY_DROP - 1e-9
            row["met"] = "yes" if ok else "no"
        rows.append(row)
    return rows


@torch.inference_mode()
def draft_tv(gen, draft, params: SamplingParams, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position TV (B, N) between target and drafter distributions given the prefixes of ``tokens``:
    CFG-mixed with each position's weight, then temperature / top-k / top-p, as the samplers see them."""
    steps = gen.layout.step_of.tolist()
    w = torch.tensor([params.guidance(int(s), gen.layout.num_steps) for s in steps], device=tokens.device)[:, None]
    probs = []
    for g in (gen, draft):
        if params.uses_cfg(gen.layout.num_steps):
            logits = g.teacher_forcing_logits(torch.cat([labels, g.null_condition(labels)]), torch.cat([tokens, tokens]))
            logits = mix_cfg(logits, w)
        else:
            logits = g.teacher_forcing_logits(labels, tokens)
        probs.append(processed_probs(logits.float(), params))
    return 0.5 * (probs[0] - probs[1]).abs().sum(-1)


def delta_sweep(gen, draft, codebook, params, gamma, window, k, deltas, n, seed, decode, score) -> dict:
    """Target passes per image and accuracy against δ for the LANTERN variants (batch 1)."""
    variants = {"speculative+lantern": ("speculative", "position"), "speculative+lantern (paper)": ("speculative", "draft")}
    if sjd_relaxes():
        variants |= {"sjd+lantern": ("sjd", "position"), "sjd+lantern (paper)": ("sjd", "draft")}
    curves = {v: {"delta": [], "target_passes": [], "accuracy": [], "accepted_len": []} for v in variants}
    for d in deltas:
        methods = {}
        for v, (kind, bound) in variants.items():
            opts = {"relax": "lantern", "k": k, "delta": d, "bound": bound, "codebook": codebook}
            methods[v] = (SpeculativeSampler(params, draft=draft, gamma=gamma, **opts) if kind == "speculative"
                          else SJDSampler(params, window=window, **opts))
        res = run_methods(gen, methods, n, seed, decode, score)
        for v, r in res.items():
            c = curves[v]
            c["delta"].append(d)
            c["target_passes"].append(r["target_passes"])
            c["accuracy"].append(r["accuracy"])
            c["accepted_len"].append(r["accepted_len"])
        print(f"  delta {d}: " + ", ".join(f"{v} {r['target_passes']:.1f} passes acc {r['accuracy']}" for v, r in res.items()),
              flush=True)
    return curves


def plot_sweep(curves: dict, reference: dict, path: Path, title: str) -> None:
    """Target passes per image (left) and accuracy (right) against δ; ancestral / lossless levels dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for v, c in curves.items():
        style = "--" if "paper" in v else "-"
        ax.plot(c["delta"], c["target_passes"], style, marker="o", ms=4, label=v)
        if all(isinstance(a, float) for a in c["accuracy"]):
            bx.plot(c["delta"], [100 * a for a in c["accuracy"]], style, marker="o", ms=4, label=v)
    anc = reference.get("ancestral", {})
    if anc:
        ax.axhline(anc["target_passes"], color="grey", lw=0.8, ls=":", label="ancestral")
        ax.axhline(anc["target_passes"] / 3, color="red", lw=0.8, ls=":", label="3× fewer than ancestral")
        if isinstance(anc.get("accuracy"), float):
            bx.axhline(100 * anc["accuracy"], color="grey", lw=0.8, ls=":", label="ancestral")
            bx.axhline(100 * anc["accuracy"] - 5, color="red", lw=0.8, ls=":", label="ancestral − 5 points")
    ax.set_xlabel("LANTERN delta")
    ax.set_ylabel("target forward passes per image (batch 1)")
    ax.set_title(f"{title}: speed")
    ax.legend(fontsize=7)
    bx.set_xlabel("LANTERN delta")
    bx.set_ylabel("digit classifier accuracy (%)")
    bx.set_title(f"{title}: quality")
    bx.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _random_large(name: str, draft_layers: int, draft_dim: int, dev, dtype):
    from ..models import create_model

    torch.manual_seed(0)
    gen = create_model(name).to(dev, dtype).eval()
    c = gen.config
    draft = create_model(name, n_layer=draft_layers, dim=draft_dim, n_head=max(1, draft_dim // 64)).to(dev, dtype).eval()
    for g in (gen, draft):  # LlamaGen zero-inits the head; give it logits
        torch.nn.init.normal_(g.output.weight, std=0.02)
    codebook = torch.nn.functional.normalize(torch.randn(c.vocab_size, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    return gen, draft, codebook


def cmd_bench_speculative(args) -> None:
    from ..device import resolve_device, resolve_dtype
    from ..errors import InvalidArgumentError
    from ..pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gamma < 1 or args.window < 1 or args.images < 1 or args.large_images < 1:
        raise InvalidArgumentError("--gamma, --window, --images and --large-images must be >= 1")
    if args.delta < 0 or any(d < 0 for d in args.deltas):
        raise InvalidArgumentError("LANTERN deltas must be >= 0")
    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or torch.float32
    params = SamplingParams(cfg=args.cfg, top_k=args.top_k, temperature=args.temperature)
    rows, curves, settings = [], {}, {k: v for k, v in vars(args).items() if k != "func"} | {"dtype": str(dtype)}
    floor = get_floor(dev, quick=True, verbose=True)
    if not sjd_relaxes():
        print("note: this SJD has no relax= hook: SJD + LANTERN rows are skipped", flush=True)
    reference, tv_report = {}, None
    if not args.skip_bundled:
        from ..eval.digits import digits_accuracy

        pipe = load_pipeline(args.bundled, device=dev)
        pipe.generator.to(dtype)
        dpipe = load_pipeline(args.draft, device=dev)
        dpipe.generator.to(dtype)
        score = digits_accuracy if Path(args.bundled).name.startswith("digits") else None
        if args.continuous_images:  # continuous batching: passes per image, batch 1 vs B
            from .continuous import continuous_rows, write_continuous

            write_continuous(args, continuous_rows(
                args.bundled, f"speculative g{args.gamma} ({args.draft})",
                lambda: SpeculativeSampler(params, draft=dpipe.generator, gamma=args.gamma),
                pipe.generator, args.continuous_images, args.continuous_batch, args.seed))
        if args.continuous_only:
            return
        methods = make_methods(params, dpipe, pipe.tokenizer, args.gamma, args.window, args.k, args.delta, args.paper)
        for smp in methods.values():
            if hasattr(smp, "bind_tokenizer"):
                smp.bind_tokenizer(pipe.tokenizer)
        print(f"{args.bundled}: {len(methods)} methods x {args.images} images at batch 1", flush=True)
        sampled: dict = {}
        reference = run_methods(pipe.generator, methods, args.images, args.seed, pipe.decode, score, sampled, floor)
        rows += rows_for(args.bundled, reference)
        print_table(rows, COLUMNS)
        tv = draft_tv(pipe.generator, dpipe.generator, params, *sampled["ancestral"])
        tv_report = {"model": args.bundled, "draft": args.draft, "mean": float(tv.mean()),
                     "by_position": tv.mean(0).tolist()}
        print(f"drafter {args.draft}: mean per-position TV to {args.bundled} {tv_report['mean']:.3f} "
              f"(acceptance ~{1 - tv_report['mean']:.2f}) on the ancestral samples", flush=True)
        if args.deltas:
            print(f"{args.bundled}: delta sweep {args.deltas} x {args.sweep_images} images", flush=True)
            curves[args.bundled] = delta_sweep(pipe.generator, dpipe, pipe.tokenizer, params, args.gamma, args.window,
                                               args.k, args.deltas, args.sweep_images, args.seed, pipe.decode, score)
    if not args.skip_large:
        gen, draft, codebook = _random_large(args.large, args.large_draft_layers, args.large_draft_dim, dev, dtype)
        methods = make_methods(params, draft, codebook, args.gamma, args.window, args.k, args.delta, args.paper)
        print(f"{args.large}-random: {len(methods)} methods x {args.large_images} images at batch 1", flush=True)
        rows += rows_for(args.large + "-random", run_methods(gen, methods, args.large_images, args.seed, floor=floor))
    print_table(rows, COLUMNS)
    out = Path(args.out_dir)
    path = out / f"{args.name}.json"
    write_json(path, {"benchmark": args.name, "machine": machine(), "settings": settings, "rows": rows,
                      "delta_sweep": curves, "sjd_lantern": sjd_relaxes(), "draft_tv": tv_report, "floor": floor,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")
    if curves:
        png = out / "lantern_delta.png"
        model = next(iter(curves))
        plot_sweep(curves[model], reference, png, model)
        print(f"wrote {png}")


def add_speculative_bench_parser(bench_subparsers) -> None:
    """``varkit bench speculative``; ``bench_subparsers`` is the ``varkit bench`` subparsers object."""
    s = bench_subparsers.add_parser(
        "speculative", help="draft-model speculative decoding and LANTERN vs ancestral and SJD: target passes, "
                            "images/s, accepted length, accuracy; a delta sweep plot")
    s.add_argument("--bundled", default="digits", help="bundled pipeline (digits: classifier accuracy too)")
    s.add_argument("--draft", default="digits-draft", help="drafter for the bundled pipeline (name or folder)")
    s.add_argument("--large", default="llamagen-b", help="a raster generator config built with random weights")
    s.add_argument("--large-draft-layers", type=int, default=2, help="layers of the large model's random drafter")
    s.add_argument("--large-draft-dim", type=int, default=256, help="width of the large model's random drafter")
    s.add_argument("--gamma", type=int, default=8,
                   help="drafts per target pass (speculative); target passes fall with gamma, draft passes grow")
    s.add_argument("--window", type=int, default=16, help="SJD window")
    s.add_argument("--k", type=int, default=1000, help="LANTERN neighbours per token (clamped to V-1)")
    s.add_argument("--delta", type=float, default=0.1, help="LANTERN total-variation budget for the table")
    s.add_argument("--deltas", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
                   help="deltas of the sweep on the bundled model (none: no sweep)")
    s.add_argument("--paper", action="store_true", help="also LANTERN with the official per-draft bound")
    s.add_argument("--cfg", type=float, default=2.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--images", type=int, default=100, help="images per method on the bundled model")
    s.add_argument("--sweep-images", type=int, default=100, help="images per delta and variant in the sweep")
    s.add_argument("--large-images", type=int, default=2, help="images per method on the large model")
    add_continuous_args(s)
    add_sampler_run_args(s)
    add_output_args(s, "speculative")
    s.set_defaults(func=cmd_bench_speculative)
