"""``varkit bench annealing``: step annealing (DiSA) of continuous heads, speed against quality.

DiSA (training-free): the head needs many denoising/Euler steps for the first tokens, whose condition says little,
and few for the last, so ``head_steps="START:END"`` anneals them linearly over the AR steps
(:meth:`varkit.samplers.SamplingParams.at_step`). For each model (a bundled name or a folder) and each head-step
setting, the same labels and seed are sampled at the model's other defaults and judged by the digits classifier and
the digits-FID (:func:`varkit.eval.digits.digits_fid`). Cost per image: process CPU seconds (steadier than wall
time on a shared machine; wall seconds are stored too) and head evaluations (tokens the head's network processed,
summed over its calls and steps: the machine-independent work). ``speedup`` is against the model's default
setting's row (its first row if the default was not run). The plot: digits-FID and accuracy against CPU s/image.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .report import add_output_args

COLUMNS = ["model", "head_steps", "per_step", "images", "cpu_s_per_image", "speedup", "head_evals_per_image",
           "head_work", "fraction_of_floor", "digits_fid", "accuracy"]
DEFAULT_MODELS = ("digits-mar", "digits-flowar")
DEFAULT_STEPS = ("50", "25", "50:5", "25:5", "10", "5")


def parse_steps(text: str) -> int | tuple[int, int]:
    """``"25"`` or ``"50:5"`` → what ``SamplingParams.head_steps`` takes (one clear error otherwise)."""
    from ..samplers.logits import parse_head_steps

    return parse_head_steps(str(text))


def steps_label(spec: int | tuple[int, int]) -> str:
    return f"{spec[0]}:{spec[1]}" if isinstance(spec, tuple) else str(spec)


def available(models: list[str]) -> tuple[list[str], list[str]]:
    """(models that can be loaded, bundled models not finished yet): a bundled model still training (its folder
    without ``config.json``) is skipped; an unknown name or folder is the usual error."""
    from ..errors import ModelNotFoundError
    from ..hub import ASSETS, resolve_model_dir

    ok, missing = [], []
    for m in models:
        try:
            resolve_model_dir(m)
            ok.append(m)
        except ModelNotFoundError:
            if not (ASSETS / str(m)).is_dir():  # a bundled model's folder exists while it trains
                raise
            missing.append(m)
    return ok, missing


def run_annealing(models: list[str], steps: list[str], per_class: int = 50, batch_size: int | None = 100,
                  seed: int = 0, verbose: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Rows (one per model and setting) and settings of the sweep."""
    from ..eval.digits import digits_fid
    from ..pipeline import load_pipeline
    from .floor import run_floor

    if per_class < 1:
        raise InvalidArgumentError(f"--per-class must be >= 1, got {per_class}")
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be >= 1, got {batch_size}")
    specs = [parse_steps(s) for s in steps]
    if not specs:
        raise InvalidArgumentError("--head-steps: give at least one setting (e.g. 50 25 50:5)")
    names, missing = available(list(models))
    for m in missing:
        print(f"[annealing] {m}: not bundled yet (still training?); skipped", flush=True)
    rows: list[dict] = []
    for name in names:
        pipe = load_pipeline(name)
        gen = pipe.generator
        head = gen.head
        if not hasattr(head, "steps_for"):
            raise InvalidArgumentError(f"{name} has a {head.kind} head: step annealing needs a continuous head "
                                       "(diffusion or flow)")
        evals = [0]

        def count(fn):
            def wrapper(x, *a, **kw):
                evals[0] += x.shape[:-1].numel()
                return fn(x, *a, **kw)
            return wrapper

        head.net.forward = count(head.net.forward)  # instance attribute: this pipeline's head only
        if hasattr(head.net, "step"):  # MAR's MLP samples through step (its chain's condition work hoisted)
            head.net.step = count(head.net.step)
        labels = [c for c in range(pipe.num_classes) for _ in range(per_class)]
        default = pipe.sampling_params().head_steps or head.steps_for(pipe.sampling_params())
        model_rows = []
        for spec in specs:
            evals[0] = 0
            t0, c0 = time.perf_counter(), time.process_time()
            out = pipe(labels, head_steps=spec, seed=seed, batch_size=batch_size)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            m = digits_fid(out.images, labels)
            row = {"model": name, "head_steps": steps_label(spec), "images": len(labels), "seed": seed,
                   "per_step": per_step(pipe, spec), "cpu_s_per_image": cpu / len(labels), "s_per_image": wall / len(labels),
                   "head_evals_per_image": evals[0] / len(labels), "forward_passes": out.stats.forward_passes,
                   "digits_fid": m["fid"], "accuracy": m["accuracy"], "is_default": spec == default}
            # the floor of the timed call (sampling and decoding), replayed with the same seeds
            row |= run_floor(lambda: pipe(labels, head_steps=spec, seed=seed, batch_size=batch_size), [gen],
                             len(labels), wall, others=[pipe.tokenizer], cpu_s=cpu)
            model_rows.append(row)
            if verbose:
                print(f"[annealing] {name} head_steps {row['head_steps']}: {row['cpu_s_per_image']:.4f} CPU s/image, "
                      f"FID {row['digits_fid']:.1f}, accuracy {row['accuracy']:.3f}", flush=True)
        ref = next((r for r in model_rows if r["is_default"]), model_rows[0])
        for r in model_rows:
            r["speedup"] = ref["cpu_s_per_image"] / r["cpu_s_per_image"]
            r["head_work"] = r["head_evals_per_image"] / ref["head_evals_per_image"] if ref["head_evals_per_image"] else None
            r["reference"] = ref["head_steps"]
        rows += model_rows
    settings = {"models": names, "skipped": missing, "head_steps": [steps_label(s) for s in specs],
                "per_class": per_class, "batch_size": batch_size, "seed": seed, "threads": torch.get_num_threads(),
                "note": "each model at its stored defaults except head_steps; speedup and head_work against the "
                        "model's default head_steps"}
    return rows, settings


def per_step(pipe, spec) -> list[int]:
    """The head steps each AR step gets under ``spec`` (the schedule an annealed setting resolves to)."""
    from ..samplers import SamplingParams

    gen = pipe.generator
    params = SamplingParams(head_steps=spec)
    num_iter = pipe.sampling_params().num_iter
    try:
        layout = gen.sampling_layout(num_iter) if num_iter else gen.layout
    except (InvalidArgumentError, AttributeError):
        layout = gen.layout
    n = layout.num_steps
    return [gen.head.steps_for(params.at_step(s, n)) for s in range(n)]


def plot_annealing(rows: list[dict], path: Path) -> None:
    """Two panels, one colour per model: digits-FID and accuracy against CPU seconds per image; the fixed head-step
    settings joined by a line (what fewer uniform steps buy), the annealed ones as stars (below that line: annealing
    gives more quality for the time), every point labelled by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        mine = [r for r in rows if r["model"] == model]
        fixed = sorted((r for r in mine if ":" not in r["head_steps"]), key=lambda r: r["cpu_s_per_image"])
        annealed = [r for r in mine if ":" in r["head_steps"]]
        for ax, key in zip(axes, ("digits_fid", "accuracy")):
            ax.plot([r["cpu_s_per_image"] for r in fixed], [r[key] for r in fixed], marker="o", color=color,
                    label=f"{model}, fixed steps")
            ax.scatter([r["cpu_s_per_image"] for r in annealed], [r[key] for r in annealed], marker="*", s=120,
                       color=color, label=f"{model}, annealed START:END", zorder=3)
            for r in mine:
                ax.annotate(r["head_steps"], (r["cpu_s_per_image"], r[key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=color)
    for ax, label in zip(axes, ("digits-FID (lower is better)", "digits classifier accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("CPU seconds per image (1 thread)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Step annealing (DiSA): head steps N per AR step, or START:END annealed linearly over the AR steps")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def cmd_bench_annealing(args) -> None:
    from .report import print_table, save_results

    torch.set_num_threads(args.threads)
    rows, settings = run_annealing(args.models, args.head_steps, args.per_class, args.batch_size, args.seed)
    if not rows:
        raise InvalidArgumentError(f"none of the models could be loaded ({', '.join(args.models)}): nothing measured")
    print_table(rows, COLUMNS)
    path = save_results(args.name, rows, settings, args.out_dir)
    png = Path(args.out_dir) / f"{args.name}.png"
    plot_annealing(rows, png)
    print(f"wrote {path} and {png}")


def add_annealing_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench annealing`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser(
        "annealing", help="step annealing (DiSA) of continuous heads: s/image against digits-FID and accuracy",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="bundled names or folders of continuous-head models (a bundled one not present is skipped)")
    p.add_argument("--head-steps", nargs="+", default=list(DEFAULT_STEPS),
                   help="settings to compare: N (fixed) or START:END (annealed linearly over the AR steps)")
    p.add_argument("--per-class", type=int, default=50, help="images per class and setting")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_output_args(p, "annealing")
    p.set_defaults(func=cmd_bench_annealing)
    return p
