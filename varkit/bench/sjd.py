"""``varkit bench sjd``: speculative Jacobi decoding against ancestral sampling.

On the bundled ``digits`` pipeline and on a random-weight LlamaGen-B, at each batch size,
every method samples the same images (same labels, same per-image seeds), chunk by chunk and
interleaved so machine load hits all methods alike. Reported per method:

- ``passes``: forward passes per sampling call (one call = one batch), i.e. the sequential
  passes each image waits for; ``pass_reduction`` = ancestral's / this;
- ``accepted_per_pass``: tokens committed per pass per image (``SamplerStats.mean_accepted``);
- ``images_per_s``: images over the wall-clock seconds of the sampling calls (decoding
  excluded), ``speedup`` against ancestral; ``cpu_ms_per_image``: process CPU time, steadier
  than the wall clock on a shared machine;
- ``accuracy``: the digits classifier's accuracy on the decoded images (digits only).

Writes the table to stdout, ``<out-dir>/<name>.json`` and ``<out-dir>/<name>_accepted.png``
(tokens committed per pass against the position where the pass started, batch 1).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..io import atomic_path, write_json
from ..samplers import SamplingParams, get_sampler
from ..samplers.logits import image_generators
from ..samplers.sjd import SJDSampler
from .continuous import add_continuous_args
from .floor import get_floor, replay_calls, run_floor
from .report import add_output_args, add_sampler_run_args, machine, print_table

COLUMNS = ["model", "sampler", "batch", "images", "passes", "pass_reduction", "accepted_per_pass", "images_per_s",
           "speedup", "cpu_ms_per_image", "fraction_of_floor", "accuracy"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_sjd(gen, name: str, batch: int, params: SamplingParams, windows: list[int], images: int,
              init: str = "repeat_horizon", decode=None, score=None, seed: int = 0,
              coupling: bool = False, floor: dict | None = None) -> tuple[list[dict], dict]:
    """Rows for ancestral and SJD at each window (and with ``coupling``, MC-SJD too, "mc"),
    and the per-pass traces of the SJD runs.

    ``decode`` (tokens → images) and ``score`` (images, labels → accuracy) are optional. Each row's floor
    (:func:`varkit.bench.floor.run_floor` against ``floor``, this machine's measurement by default) is the work of
    its sampling calls, counted in a run of the same calls after the timed ones.
    """
    dev = next(gen.parameters()).device
    n = max(images, batch)
    n -= n % batch
    labels = torch.arange(n, device=dev) % gen.num_classes
    seeds = [g.initial_seed() for g in image_generators(seed, n)]
    methods = {"ancestral": get_sampler("ancestral", params)}
    methods |= {f"sjd w{w}": SJDSampler(params, window=w, init=init) for w in windows}
    if coupling:
        methods |= {f"sjd w{w} mc": SJDSampler(params, window=w, init=init, coupling=True) for w in windows}
    acc = {k: {"wall": 0.0, "cpu": 0.0, "passes": 0, "accepted": [], "tokens": [], "starts": [], "commits": []}
           for k in methods}
    for smp in methods.values():  # warm-up
        smp.sample(gen, labels[:batch], image_generators(seed + 1, batch))
    for i in range(0, n, batch):
        for k, smp in methods.items():
            g = [torch.Generator().manual_seed(sd) for sd in seeds[i:i + batch]]  # the same draws for every method
            _sync(dev)
            w0, c0 = time.perf_counter(), time.process_time()
            res = smp.sample(gen, labels[i:i + batch], g)
            _sync(dev)
            a = acc[k]
            a["wall"] += time.perf_counter() - w0
            a["cpu"] += time.process_time() - c0
            a["passes"] += res.stats.forward_passes
            a["accepted"].append(res.stats.mean_accepted)
            a["tokens"].append(res.tokens.cpu())
            if isinstance(smp, SJDSampler):
                a["starts"].append(smp.trace["start"])
                a["commits"].append(smp.trace["accepted"])
    calls = n // batch
    base = acc["ancestral"]
    rows, traces = [], {}
    for k, a in acc.items():
        row = {"model": name, "sampler": k, "batch": batch, "images": n,
               "passes": a["passes"] / calls, "pass_reduction": base["passes"] / a["passes"],
               "accepted_per_pass": sum(a["accepted"]) / calls, "images_per_s": n / a["wall"],
               "speedup": base["wall"] / a["wall"], "cpu_ms_per_image": 1000 * a["cpu"] / n,
               **run_floor(replay_calls(methods[k], gen, labels, seeds, batch), [gen], n, a["wall"], floor,
                           cpu_s=a["cpu"]),
               "accuracy": ""}
        if decode is not None and score is not None:
            row["accuracy"] = score(decode(torch.cat(a["tokens"]).to(dev)), labels.tolist())
        rows.append(row)
        if a["starts"]:
            traces[k] = (torch.cat([s.flatten() for s in a["starts"]]), torch.cat([c.flatten() for c in a["commits"]]))
    return rows, traces


def accepted_by_position(starts: torch.Tensor, commits: torch.Tensor, num_tokens: int, bins: int = 32) -> dict:
    """Mean tokens committed per pass, binned by the position where the pass started."""
    width = max(1, -(-num_tokens // bins))
    keep = starts < num_tokens
    b = (starts[keep] // width).long()
    nb = -(-num_tokens // width)
    total = torch.zeros(nb, dtype=torch.float64).index_add_(0, b, commits[keep].double())
    count = torch.zeros(nb, dtype=torch.float64).index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    ok = count > 0
    return {"position": (torch.arange(nb)[ok] * width).tolist(), "accepted": (total[ok] / count[ok]).tolist()}


def plot_accepted(curves: dict[str, dict[str, dict]], path: Path) -> None:
    """One panel per model: accepted tokens per pass against the sequence position (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (model, per) in zip(axes[0], curves.items()):
        for k, cur in per.items():
            ax.plot(cur["position"], cur["accepted"], marker="o", ms=3, label=k)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="ancestral")
        ax.set_title(f"{model}, batch 1")
        ax.set_xlabel("token position at the start of the pass")
        ax.set_ylabel("tokens accepted per pass")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def cmd_bench_sjd(args) -> None:
    from ..device import resolve_device, resolve_dtype
    from ..errors import InvalidArgumentError
    from ..models import create_model
    from ..pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(w < 1 for w in args.windows):
        raise InvalidArgumentError(f"--windows must be >= 1, got {args.windows}")
    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or torch.float32
    targets = []
    if not args.skip_bundled:
        from ..eval.digits import digits_accuracy

        pipe = load_pipeline(args.bundled, device=dev)
        pipe.generator.to(dtype)
        score = digits_accuracy if Path(args.bundled).name.startswith("digits") else None
        targets.append((args.bundled, pipe.generator, pipe.decode, score, args.images))
    if not args.skip_large:
        torch.manual_seed(0)
        gen = create_model(args.large).to(dev, dtype).eval()
        torch.nn.init.normal_(gen.output.weight, std=0.02)  # LlamaGen zero-inits the head; give it logits
        targets.append((args.large + "-random", gen, None, None, args.large_images))
    params = SamplingParams(cfg=args.cfg, top_k=args.top_k, temperature=args.temperature)
    if args.continuous_images and not args.skip_bundled:  # continuous batching: passes per image, batch 1 vs B
        from .continuous import continuous_rows, write_continuous

        name, gen = targets[0][0], targets[0][1]
        w = args.windows[0]
        write_continuous(args, continuous_rows(name, f"sjd w{w}", lambda: SJDSampler(params, window=w, init=args.init),
                                               gen, args.continuous_images, args.continuous_batch, args.seed))
    if args.continuous_only:
        return
    rows, curves = [], {}
    floor = get_floor(dev, quick=True, verbose=True)
    for name, gen, decode, score, images in targets:
        for b in args.batch:
            r, traces = bench_sjd(gen, name, b, params, args.windows, images, args.init, decode, score, args.seed,
                                  args.coupling, floor)
            rows += r
            if b == min(args.batch):
                curves[name] = {k: accepted_by_position(*t, gen.layout.num_tokens) for k, t in traces.items()}
    print_table(rows, COLUMNS)
    out = Path(args.out_dir)
    path = out / f"{args.name}.json"
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"dtype": str(dtype)}
    write_json(path, {"benchmark": args.name, "machine": machine(), "settings": settings, "rows": rows,
                      "accepted_by_position": curves, "floor": floor, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    png = out / f"{args.name}_accepted.png"
    plot_accepted(curves, png)
    print(f"wrote {path} and {png}")


def add_sjd_bench_parser(bench_subparsers) -> None:
    """``varkit bench sjd``; ``bench_subparsers`` is the ``varkit bench`` subparsers object."""
    s = bench_subparsers.add_parser(
        "sjd", help="speculative Jacobi decoding vs ancestral: passes, images/s, accepted tokens per pass, accuracy")
    s.add_argument("--bundled", default="digits", help="bundled pipeline (digits: classifier accuracy too)")
    s.add_argument("--large", default="llamagen-b", help="a generator config built with random weights")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    s.add_argument("--windows", type=int, nargs="+", default=[16], help="SJD windows to compare")
    s.add_argument("--init", default="repeat_horizon", choices=["random", "repeat_horizon", "sample_horizon"])
    s.add_argument("--coupling", action="store_true", help="also run SJD with maximal coupling (MC-SJD)")
    s.add_argument("--cfg", type=float, default=2.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--images", type=int, default=100, help="images per batch size on the bundled model")
    s.add_argument("--large-images", type=int, default=2, help="images per batch size on the large model (>= batch)")
    add_sampler_run_args(s)
    add_continuous_args(s)
    add_output_args(s, "sjd")
    s.set_defaults(func=cmd_bench_sjd)
