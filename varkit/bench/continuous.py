"""Continuous batching rows of ``varkit bench sjd`` / ``speculative`` / ``cspd``: passes per image at batch 1,
at batch B in lockstep (B images a call, the batch at its slowest image's pace) and at batch B with B slots
refilled from the queue (``sample(..., max_batch=B)``; :mod:`varkit.samplers.slots`).

Per row: ``passes_per_image`` (the target passes an image took part in: its batch's passes in lockstep, its
own under continuous batching; ``SamplerStats.passes_per_image``), ``tokens_per_pass`` (tokens per image over
that), ``vs_batch1`` (passes per image against batch 1: the target is <= 1.2 at batch 8), ``slot_passes_per_image``
(batch passes x B / images: what the batch cost per image, idle slots at the tail of the queue included),
``calls`` (target calls, admissions included), CPU milliseconds per image, images per wall second and
``fraction_of_floor`` (the floor of the row's calls, :func:`varkit.bench.floor.run_floor`, over its wall seconds).
The same images (labels, per-image seeds) in every mode.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..device import resolve_device
from ..io import write_json
from ..samplers.logits import image_generators
from .floor import get_floor
from .report import machine, print_table

COLUMNS = ["model", "sampler", "mode", "batch", "images", "passes_per_image", "tokens_per_pass", "vs_batch1",
           "slot_passes_per_image", "calls", "cpu_ms_per_image", "images_per_s", "fraction_of_floor"]


def continuous_rows(model: str, label: str, make: Callable, gen, images: int, batch: int, seed: int = 0,
                    floor: dict | None = None) -> list[dict]:
    """Rows for batch 1, batch ``batch`` lockstep and batch ``batch`` continuous; ``make()`` builds the sampler. Each
    row has the floor of its calls (:func:`varkit.bench.floor.run_floor`, replayed with the same draws)."""
    from .floor import run_floor, sampler_models

    dev = next(gen.parameters()).device
    labels = torch.arange(images, device=dev) % gen.num_classes
    T = gen.sampling_layout(getattr(make(), "params").num_iter).num_tokens
    make().sample(gen, labels[:2], image_generators(seed + 1, 2))  # warm-up
    models = sampler_models(gen, make())

    def run(mode: str, b: int):
        """(stats, target calls, slot passes) of all the images in ``mode`` at batch ``b``."""
        gens = image_generators(seed, images)
        if mode == "continuous":
            stats = make().sample(gen, labels, gens, max_batch=b).stats
            return stats, stats.forward_passes, stats.rounds * b
        parts = [make().sample(gen, labels[i:i + b], gens[i:i + b]).stats for i in range(0, images, b)]
        stats = parts[0]
        for p in parts[1:]:
            stats = stats.merge(p)
        return stats, stats.forward_passes, stats.forward_passes * b

    rows = []
    for mode, b in (("alone", 1), ("lockstep", batch), ("continuous", batch)):
        w0, c0 = time.perf_counter(), time.process_time()
        stats, calls, slot_passes = run(mode, b)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        ppi = stats.mean_passes_per_image
        rows.append({"model": model, "sampler": label, "mode": mode, "batch": b, "images": images,
                     "passes_per_image": ppi, "tokens_per_pass": T / ppi, "vs_batch1": "",
                     "slot_passes_per_image": slot_passes / images, "calls": calls,
                     "cpu_ms_per_image": 1000 * cpu / images, "images_per_s": images / wall,
                     **run_floor(lambda: run(mode, b), models, images, wall, floor, cpu_s=cpu)})
    for r in rows:
        r["vs_batch1"] = r["passes_per_image"] / rows[0]["passes_per_image"]
    return rows


def write_continuous(args, rows: list[dict]) -> Path:
    """Print the rows and write ``<out-dir>/<name>-continuous.json``."""
    print_table(rows, COLUMNS)
    path = Path(args.out_dir) / f"{args.name}-continuous.json"
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    write_json(path, {"benchmark": f"{args.name}-continuous", "machine": machine(), "settings": settings, "rows": rows,
                      "floor": get_floor(resolve_device(getattr(args, "device", "cpu")), quick=True),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {path}")
    return path


def add_continuous_args(parser) -> None:
    """The continuous-batching options every speculative bench takes."""
    parser.add_argument("--continuous-images", type=int, default=64,
                        help="images for the continuous-batching rows on the bundled model (0: skip them)")
    parser.add_argument("--continuous-batch", type=int, default=8, help="slots of the continuous-batching rows")
    parser.add_argument("--continuous-only", action="store_true", help="only the continuous-batching rows")
