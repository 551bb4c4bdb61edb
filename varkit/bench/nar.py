"""``varkit bench nar``: NAR (2n-1 fronts) vs raster (n² tokens) in varkit; ``--official``: also NAR's own loop.

Rows, at every batch size (CFG 4 by default, so the generator sees twice the batch):

- ``varkit``/``nar``: varkit's ancestral sampler on a :class:`NeighborsGenerator`, with plain
  linears and/or (``--prepack``) with weights prepacked for oneDNN (:func:`varkit.nn.layers.prepack_linears`),
  and/or (``--compile``) through ``compile_decoding`` (every front one static-shape graph; compiled untimed first);
- ``varkit``/``raster``: the ancestral sampler on a LlamaGen raster generator of the same size;
- with ``--official PATH``: ``official``/``nar``, NAR's own ``generate`` on the *same weights*. That comparison
  is the script ``bench/side_by_side/nar.py`` of varkit's repository (:mod:`varkit.bench.scripts`), which runs
  this bench with its official rows added.

Models: B-sized random ones (NAR GPT-B and LlamaGen GPT-B, NAR's init with perturbed norms and
non-zero heads) and, when bundled, ``digits-nar`` vs ``digits``. Both NAR implementations use the
same sampling settings (temperature, top-k), dtype (``--dtype``, as NAR's ``--precision``) and
number of threads; wall time is the best of ``--repeats`` runs of a whole sampling call (NAR's
includes its cache setup, as its ``generate`` does it per call), ``cpu_s`` the process CPU time of
that run (steadier than wall time when other processes share the cores). The implementations are
timed round-robin, so that load from other processes falls on all of them alike. ``floor_s``: the least time
this machine allows for the run's work (:mod:`varkit.bench.floor`; the official loop does NAR's work, so it
shares varkit's floor), ``fraction_of_floor`` = floor_s / cpu_s at one thread (wall_s at more).

``--device cuda``: every model on the GPU, in bf16 unless ``--dtype`` says otherwise (NAR's
``autoregressive/sample/sample_c2i.py`` casts its model to ``--precision``, default bf16), no prepacked rows
(oneDNN packing is a CPU path; ``--compile on|both``: CUDA graphs of the fronts, captured in an untimed run).
Every timer synchronizes the GPU, every implementation gets an untimed warm-up call per batch size,
``fraction_of_floor`` uses wall seconds against the GPU's floor, and ``achieved_GBps`` = (weight + KV bytes the
floor counts) / wall seconds. The result file gets ``_cuda`` appended unless ``--name`` is given.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import torch

from ..nn.layers import prepack_linears
from .report import add_output_args

COLUMNS = ["model", "impl", "layout", "prepacked", "compiled", "batch", "forward_passes", "wall_s", "cpu_s", "images_per_s", "vs_raster",
           "vs_official", "cpu_vs_official", "floor_s", "fraction_of_floor", "host_read_GBps", "fraction_of_live_floor"]
CUDA_COLUMNS = [c for c in COLUMNS if c not in ("prepacked", "cpu_vs_official", "host_read_GBps",
                                                "fraction_of_live_floor")] + ["achieved_GBps"]
#: NAR's loop on the GPU: autoregressive/sample/sample_c2i.py casts the model to --precision, default bf16
OFFICIAL_CUDA_PRECISION = ("the model in --dtype (default bfloat16 on cuda, as NAR's autoregressive/sample/sample_c2i.py "
                           "--precision default bf16, .to(device=device, dtype=precision)); its tf32 switches do not "
                           "affect bf16 GEMMs")

# NAR GPT-B and LlamaGen GPT-B (class-conditional, 16x16 tokens, vocabulary 16384)
B_FIELDS = {"vocab_size": 16384, "num_classes": 1000, "dim": 768, "n_layer": 12, "n_head": 12, "grid": 16}


def randomize_like_nar(gen: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """NAR's init (normal 0.02) with perturbed norms and non-zero output heads (logits that vary)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gen.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("output.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return gen.eval()


def b_models(seed: int = 0):
    """(NAR GPT-B, LlamaGen GPT-B) with random weights, in eval mode."""
    from ..models.neighbors import NeighborsConfig, NeighborsGenerator
    from ..models.raster import RasterConfig, RasterGenerator

    torch.manual_seed(seed)
    nar = randomize_like_nar(NeighborsGenerator(NeighborsConfig(**B_FIELDS)), seed)
    raster = randomize_like_nar(RasterGenerator(RasterConfig(**B_FIELDS)), seed + 1)
    return nar, raster


def _best(fn, repeats: int):
    """(result, wall seconds, CPU seconds of this process) of the fastest of ``repeats`` calls."""
    return _interleaved([fn], [repeats])[0]


def _interleaved(fns: list, repeats: list[int], sync: bool = False,
                 before: Callable[[int], Any] | None = None) -> list[tuple[Any, float, float]]:
    """(result, wall s, CPU s) of the fastest call of each of ``fns``, called round-robin.

    Round-robin (A B C A B C, not A A B B C C) so that a burst of load from other processes on
    a shared machine hits every implementation alike; CPU seconds are less sensitive than wall
    time to other processes sharing the cores. ``sync``: the GPU is synchronized before each clock
    starts and before it stops. ``before(i)``: called untimed before each call of ``fns[i]`` (a
    :class:`~varkit.bench.floor.HostReadProbe`).
    """
    best = [(None, float("inf"), float("inf")) for _ in fns]
    for r in range(max(max(repeats), 1)):
        for i, fn in enumerate(fns):
            if r >= max(repeats[i], 1):
                continue
            if before is not None:
                before(i)
            if sync:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if sync:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < best[i][1]:
                best[i] = (out, wall, cpu)
    return best


def varkit_runner(gen, batch: int, params):
    """A call that samples ``batch`` images with varkit's ancestral sampler; it returns the forward passes."""
    from ..samplers import get_sampler
    from ..samplers.logits import image_generators

    cond = torch.arange(batch, device=next(gen.parameters()).device) % gen.num_classes
    sampler = get_sampler("ancestral", params)
    return lambda: sampler.sample(gen, cond, image_generators(0, batch)).stats.forward_passes


def _row(name: str, impl: str, layout: str, batch: int, timed: tuple[Any, float, float]) -> dict[str, Any]:
    passes, t, cpu = timed
    return {"model": name, "impl": impl, "layout": layout, "batch": batch, "forward_passes": passes,
            "wall_s": t, "cpu_s": cpu, "images_per_s": batch / t}


def bench_varkit(gen, name: str, layout: str, batch: int, params, repeats: int) -> dict[str, Any]:
    return _row(name, "varkit", layout, batch, _best(varkit_runner(gen, batch, params), repeats))


#: ``official(nar_generator, dtype)`` -> ``runner(batch, params)`` (a call like :func:`varkit_runner`'s) or None:
#: how a side-by-side script adds the official loop's rows on the same weights
OfficialLoop = Callable[[torch.nn.Module, torch.dtype], Callable[[int, Any], Callable[[], int]] | None]


def run_bench(args, official: OfficialLoop | None = None) -> list[dict[str, Any]]:
    from ..device import resolve_device
    from ..pipeline import bundled_models, load_pipeline
    from ..samplers import SamplingParams

    dev = resolve_device(getattr(args, "device", None) or "cpu")
    cuda = dev.type == "cuda"
    if not cuda:  # as load_pipeline does on a CPU; the official loop, in this process, gets it too
        from ..nn import cpu_allocator

        cpu_allocator.install()

    params = SamplingParams(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k or None)
    rows: list[dict[str, Any]] = []
    targets = []
    if not args.skip_bundled:
        have = bundled_models()
        if args.bundled_nar in have and args.bundled_raster in have:
            targets.append((f"{args.bundled_nar} vs {args.bundled_raster}",
                            load_pipeline(args.bundled_nar).generator, load_pipeline(args.bundled_raster).generator))
        else:
            print(f"skipping bundled models: {args.bundled_nar!r} and {args.bundled_raster!r} are not both bundled "
                  f"(bundled: {', '.join(have) or 'none'})")
    if not args.skip_large:
        nar, raster = b_models(args.seed)
        targets.append(("GPT-B random", nar, raster))
    from .floor import HostReadProbe, attach_floor, get_floor, trace_sampling

    dtype = resolve_dtype_for(args, dev)  # on a GPU, as NAR's sample_c2i.py default --precision: bf16
    if cuda:
        floor = get_floor(dev, verbose=True)
        basis = "wall_s"
    else:
        floor = get_floor(verbose=True)
        # one thread: CPU seconds (other processes on a shared machine inflate them far less than wall time)
        basis = "cpu_s" if torch.get_num_threads() == 1 else "wall_s"
    prepack = "off" if cuda else args.prepack  # oneDNN packing is a CPU path
    for name, nar, raster in targets:
        off_runner = official(nar, dtype) if official is not None else None
        # as NAR's sample_c2i.py --precision: the whole model (and so its KV cache) in that dtype
        nar, raster = (nar.to(dev, dtype), raster.to(dev, dtype)) if cuda else (nar.to(dtype), raster.to(dtype))
        # varkit's NAR with plain linears and/or with prepacked weights (a copy of the model: its own packed cache)
        # the work of one batch-1 run of each layout (the official loop runs NAR's algorithm: the same work)
        traces = {"neighbors": trace_sampling(nar, params)}
        if not args.skip_raster:
            traces["raster"] = trace_sampling(raster, params)
        nars = []  # (prepacked, compiled, generator)
        if prepack in ("off", "both") and args.compile in ("off", "both"):
            nars.append((False, False, nar))
        if prepack in ("on", "both") and args.compile in ("off", "both"):
            packed = copy.deepcopy(nar)
            prepack_linears(packed)
            nars.append((True, False, packed))
        if args.compile in ("on", "both"):  # on plain linears: inductor packs (bf16) or fuses around MKL (fp32)
            nars.append((False, True, copy.deepcopy(nar).compile_decoding()))
        for b in args.batch:
            # (row label, call, repeats), timed round-robin
            runs = [(("varkit", "neighbors", p, c), varkit_runner(g, b, params), args.repeats) for p, c, g in nars]
            for (_, _, _, c), fn, _ in runs:
                if c:
                    fn()  # compiles this batch size's graph: untimed
            if off_runner is not None:
                runs.append((("official", "neighbors", False, False), off_runner(b, params), args.official_repeats))
            if not args.skip_raster:
                runs.append((("varkit", "raster", False, False), varkit_runner(raster, b, params), 1))
            # an untimed warm-up of each (on a GPU cuBLAS and allocator start-up; on a CPU oneDNN's bf16 kernels are
            # made per shape on first use: a lone timed run of NAR's loop once took 25.0 s at batch 8, its second 13.7)
            for (_, _, _, c), fn, _ in runs:
                if not c:  # compiled ones just ran
                    fn()
            probe = HostReadProbe(floor, dev)  # the host's read rate before each timed run (fraction_of_live_floor)
            timed = _interleaved([fn for _, fn, _ in runs], [n for _, _, n in runs], sync=cuda, before=probe)
            group = [_row(name, impl, layout, b, t) | {"prepacked": p, "compiled": c}
                     for ((impl, layout, p, c), _, _), t in zip(runs, timed)]
            for i, r in enumerate(group):
                r.update(probe.row_fields(i))
            probe.close()
            ras = next((r for r in group if r["layout"] == "raster"), None)
            off = next((r for r in group if r["impl"] == "official"), None)
            for r in group:
                if ras is not None:
                    r["vs_raster"] = r["images_per_s"] / ras["images_per_s"]
                if off is not None:
                    r["vs_official"] = r["images_per_s"] / off["images_per_s"]
                    r["cpu_vs_official"] = off["cpu_s"] / r["cpu_s"]
            attach_floor(group, traces, floor, seconds_key=basis, key=lambda r: r["layout"])
            if cuda:
                for r in group:
                    if "floor_weight_bytes" in r:  # the bytes the floor counts, per wall second
                        r["achieved_GBps"] = (r["floor_weight_bytes"] + r["floor_kv_bytes"]) / r["wall_s"] / 1e9
            rows += group
            for r in group:
                print({k: r.get(k) for k in (CUDA_COLUMNS if cuda else COLUMNS)}, flush=True)
    return rows


def cmd_bench_nar(args, official: OfficialLoop | None = None) -> None:
    """Run, print the table, write the JSON. ``--official``: the side-by-side script does it, with ``official``."""
    import os

    from ..device import resolve_device
    from .report import print_table, save_results

    dev = resolve_device(getattr(args, "device", None) or "cpu")  # cuda without a GPU: one line, before anything runs
    cuda = dev.type == "cuda"
    if args.official and official is None:
        from .scripts import load_script

        load_script("nar").cmd_side_by_side(args)
        return
    args.name = args.name or ("nar" + ("_cuda" if cuda else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = run_bench(args, official)
    print_table(rows, CUDA_COLUMNS if cuda else COLUMNS)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = vars(args) | {"func": None, "loadavg_start": load_start, "loadavg_end": load, "threads_used": torch.get_num_threads(),
                             "fraction_of_floor_basis": "cpu_s" if torch.get_num_threads() == 1 else "wall_s"}
    if cuda:
        used = str(resolve_dtype_for(args, dev)).replace("torch.", "")
        settings.update(device=str(dev), gpu=torch.cuda.get_device_name(dev), fraction_of_floor_basis="wall_s",
                        dtype=used, dtype_requested=args.dtype, prepack_used="off",
                        timing="torch.cuda.synchronize() before and after each timed call; one untimed warm-up "
                               "call of each implementation per batch size")
        if args.official:
            settings["official_precision"] = OFFICIAL_CUDA_PRECISION
    path = save_results(args.name, rows, settings, args.out_dir)
    print(f"wrote {path}")


def resolve_dtype_for(args, dev: torch.device) -> torch.dtype:
    """The dtype every model runs in: ``--dtype``, else fp32 on a CPU and bf16 on a GPU (NAR's default precision)."""
    from ..device import resolve_dtype

    return resolve_dtype(args.dtype, dev) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def add_nar_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench nar`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser("nar", help="NAR vs raster in varkit; --official: also NAR's own sampling loop")
    add_nar_arguments(p)
    p.set_defaults(func=cmd_bench_nar)
    return p


def add_nar_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``varkit bench nar`` (and of ``bench/side_by_side/nar.py``)."""
    p.add_argument("--official", default=None,
                   help="NAR's source tree (a ThisisBillhe/NAR checkout or its NAR-images folder) to time its own loop "
                        "(the script bench/side_by_side/nar.py of varkit's repository)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2000, help="top-k for both loops (NAR's sample_c2i default; 0 = off)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs for varkit's NAR")
    p.add_argument("--official-repeats", type=int, default=2, help="best of this many runs for NAR's own loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default=None, help="float32 (default; bfloat16 on cuda) or bfloat16 (NAR's --precision "
                                                 "bf16), for every model")
    p.add_argument("--prepack", choices=["off", "on", "both"], default="both",
                   help="varkit's NAR with plain linears (off), prepacked oneDNN weights (on), or a row for each")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="varkit's NAR eager (off), through compile_decoding (on: one graph for every front, compiled "
                        "before timing), or a row for each")
    p.add_argument("--seed", type=int, default=0, help="seed of the random B-sized weights")
    p.add_argument("--bundled-nar", default="digits-nar")
    p.add_argument("--bundled-raster", default="digits")
    p.add_argument("--skip-bundled", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--skip-raster", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (default) or cuda: every model on the GPU, in bf16 unless --dtype says otherwise (NAR's "
                        "sample_c2i.py default precision), no prepacked rows; --compile on|both: CUDA graphs")
    add_output_args(p, "nar")
    p.set_defaults(name=None)  # "nar", + "_cuda" on --device cuda
