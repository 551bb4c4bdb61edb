"""``varkit bench var``: varkit's VAR pipeline on random VAR weights, one whole call (sampling + decode) at a time.

The weights are random in VAR's own format (VAR's ``init_weights`` recipe plus perturbations that make the AdaLN
gates O(1), the recipes of the golden fixtures: :mod:`varkit.checkpoints.synthetic`), written once and converted
with ``convert_var``, so the run is the one a converted checkpoint gets. Labels are VAR's demo classes, CFG on VAR's
ramp, top-k, top-p, fp32, on the CPU. Each batch size gets one untimed warm-up call (which also reads the size of
varkit's preallocated :class:`~varkit.cache.KVCache`) and ``--repeats`` timed calls.

Images/s = batch / wall seconds of one whole call (sampling + VQVAE decode + PIL images), best of the timed calls;
``cpu_s_per_image`` from process CPU seconds (less sensitive to other processes on a shared machine). ``--profile``
adds one ``torch.profiler`` run per batch size: seconds per op category (GEMM, conv, attention, ...). ``floor_s``:
the least time this machine allows for the work of the call (VAR's transformer passes and the VQVAE decode, counted
on one batch-1 call), ``fraction_of_floor`` = floor_s / CPU seconds at one thread (wall seconds at more);
:mod:`varkit.bench.floor`.

``--dtype`` (one or more of float32, bfloat16, auto: the generator's dtype; the VQVAE stays fp32 as in
:class:`~varkit.pipeline.Pipeline`) and ``--compile`` (each dtype also with compiled scale steps,
:meth:`~varkit.models.scales.ScalesGenerator.compile_decoding`; the warm-up call compiles and is not timed, its CPU
seconds are ``warmup_cpu_s``) give one set of rows per (dtype, compiled). VAR's own loop (``--official``) always
runs in fp32, as its code does on the CPU.

``--official PATH`` (a FoundationVision/VAR checkout) times VAR's own ``autoregressive_infer_cfg`` side by side on
the same weights instead: that comparison is the script ``bench/side_by_side/var.py`` of varkit's repository
(:mod:`varkit.bench.scripts`).

``--device cuda``: the same on the GPU. varkit's dtypes default to bf16 and fp32 there (``--compile``: compiled scale
steps, which CUDA graphs capture), never prepacked; VAR's own loop runs as its ``demo_sample.ipynb`` does on a GPU:
fp32 weights under ``torch.autocast('cuda', dtype=torch.float16)``, tf32 on (``--official-autocast``). Every timer
synchronizes the GPU, varkit returns tensors (``output_type="pt"``, on the GPU, as VAR's call does) instead of PIL
images, ``fraction_of_floor`` is on wall seconds against the GPU's floor and ``achieved_GBps`` = (weight + KV bytes
the floor counts) / wall seconds. The result file gets ``_cuda`` appended unless ``--name`` is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .report import add_output_args

LABELS = [980, 437, 22, 562, 207, 360, 388, 88, 979, 417, 279, 971, 1, 130, 94, 33]
COLUMNS = ["impl", "dtype", "compiled", "batch", "images_per_s", "s_per_image", "best_s", "mean_s", "cpu_s_per_image", "runs",
           "kv_peak_bytes", "kv_transient_bytes", "speedup", "speedup_mean", "speedup_cpu", "floor_s", "fraction_of_floor",
           "host_read_GBps", "fraction_of_live_floor", "warmup_cpu_s"]
CUDA_COLUMNS = [c for c in COLUMNS if c not in ("cpu_s_per_image", "speedup_cpu", "warmup_cpu_s", "host_read_GBps",
                                                "fraction_of_live_floor")] + ["achieved_GBps"]
#: varkit's dtypes when --dtype is not given
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}
#: op-name prefixes of each category of ``--profile`` (the rest is "other")
PROFILE_CATEGORIES = {
    "gemm": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkl::_mkl_linear", "mkldnn::_linear_pointwise"),
    "conv": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::_nnpack", "mkldnn::_convolution"),
    "attention": ("aten::_scaled_dot_product",),
    "norms": ("aten::native_group_norm", "aten::native_layer_norm", "aten::linalg_vector_norm"),
    "activations": ("aten::gelu", "aten::silu"),
    "sampling": ("aten::topk", "aten::sort", "aten::_softmax", "aten::cumsum", "aten::multinomial", "aten::exponential_",
                 "aten::searchsorted", "aten::masked_fill", "aten::scatter", "aten::argmax", "aten::uniform_", "aten::gather"),
    "resampling": ("aten::upsample", "aten::_upsample", "aten::avg_pool2d", "aten::_adaptive_avg_pool2d"),
    "copies": ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_", "aten::clone", "aten::index", "aten::repeat"),
    "elementwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::rsub", "aten::addcmul", "aten::clamp",
                    "aten::exp", "aten::where", "aten::lt", "aten::le", "aten::ge", "aten::round", "aten::neg"),
}



def bench_labels(batch: int, num_classes: int) -> list[int]:
    """The class labels of a batch (VAR's demo classes first), the same on both sides."""
    return [LABELS[i % len(LABELS)] % num_classes for i in range(batch)]


def write_random_pair(config: str, work: Path, seed: int, **vae_overrides: Any) -> tuple[Path, Path, dict]:
    """VAR-format ``vae.pth`` + ``var.pth`` with random weights for the named varkit config, built with the
    recipes of the golden fixtures (:mod:`varkit.checkpoints.synthetic`).

    The VQVAE is VAR's ``vae_ch160v4096z32`` architecture (``vae_overrides`` change it, for tests; the official
    worker needs the default ``ch_mult``)."""
    from ..checkpoints.synthetic import items_of, var_state_dict, var_vae_state_dict
    from ..checkpoints.var import var_state_dict_to_var
    from ..checkpoints.var_vae import msvq_state_dict_to_var
    from ..modeling import params_on_meta
    from ..models.registry import _REGISTRY
    from ..models.scales import ScalesGenerator
    from ..tokenizers.msvq import MSVQConfig, MultiScaleVQTokenizer

    if config not in _REGISTRY or _REGISTRY[config][0] is not ScalesGenerator:
        names = sorted(n for n, v in _REGISTRY.items() if v[0] is ScalesGenerator)
        raise InvalidArgumentError(f"--config must be a VAR config ({', '.join(names)}), got {config!r}")
    with params_on_meta():
        gen = ScalesGenerator(_REGISTRY[config][1]())
        tok = MultiScaleVQTokenizer(MSVQConfig(codebook_size=gen.config.vocab_size, z_channels=gen.config.vae_dim,
                                               patch_nums=gen.config.patch_nums, **vae_overrides))
    var_items = items_of(var_state_dict_to_var(gen.state_dict(), gen.config))
    vae_items = items_of(msvq_state_dict_to_var(tok.state_dict(), tok.config))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(var_vae_state_dict(vae_items, seed + 100), work / "vae.pth")
    torch.save(var_state_dict(var_items, seed, gen.config.patch_nums), work / "var.pth")
    return work / "vae.pth", work / "var.pth", {"depth": gen.config.depth, "patch_nums": list(gen.config.patch_nums),
                                                  "shared_aln": gen.config.shared_aln}


def _timed(fn, profile: bool, sync: bool = False) -> tuple[Any, float, float, dict[str, float] | None]:
    """Run ``fn``; its wall and process CPU seconds, and with ``profile`` its profiler seconds per category.
    ``sync``: the GPU is synchronized before the clocks start and before they stop."""
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        prof = torch_profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    if sync:
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cats = None
    if prof is not None:
        prof.__exit__(None, None, None)
        cats = {k: 0.0 for k in [*PROFILE_CATEGORIES, "other"]}
        for e in prof.key_averages():
            cat = next((k for k, pre in PROFILE_CATEGORIES.items() if e.key.startswith(pre)), "other")
            cats[cat] += e.self_cpu_time_total / 1e6
    return out, wall, cpu, cats


def work_of_one_call(pipe, req: dict) -> dict:
    """The work of one batch-1 call of ``pipe`` with ``req``'s settings (VAR's passes + the VQVAE decode), as
    :meth:`varkit.bench.floor.WorkTrace.to_json`: what the floors of both sides' rows are made of."""
    from .floor import trace_work

    with torch.inference_mode(), trace_work(pipe.generator, pipe.tokenizer) as tr:
        pipe(class_labels=bench_labels(1, pipe.num_classes), seed=req["seed"], cfg=req["cfg"], cfg_schedule="var",
             top_k=req["top_k"], top_p=req["top_p"])
    return tr.to_json()


def varkit_variants(args) -> list[tuple[str, bool]]:
    """(dtype name, compiled) of each set of varkit rows: every ``--dtype`` (``auto`` resolved for this CPU, repeats
    dropped), eager, and compiled too with ``--compile``."""
    from ..device import resolve_dtype

    device = bench_device(args)
    names: list[str] = []
    for d in args.dtype or DEFAULT_DTYPES[device]:
        name = str(resolve_dtype(d, device)).replace("torch.", "")  # an unknown name: one InvalidArgumentError line
        if name not in names:
            names.append(name)
    return [(n, c) for n in names for c in ((False, True) if args.compile else (False,))]


def bench_device(args) -> str:
    """``--device`` checked: "cpu", or "cuda" where a GPU is (else one :class:`~varkit.errors.DeviceError` line)."""
    from ..device import resolve_device

    return resolve_device(getattr(args, "device", None) or "cpu").type


def official_precision(args) -> dict[str, Any]:
    """How VAR's own loop runs (``official_dtype`` and where that comes from), as the settings record it."""
    if bench_device(args) != "cuda":
        return {"official_dtype": "float32"}
    amp = getattr(args, "official_autocast", "float16")
    return {"official_dtype": "float32" if amp == "off" else f"{amp} autocast (fp32 weights)",
            "official_precision": "as VAR's demo_sample.ipynb on a GPU: torch.autocast('cuda', enabled=True, "
                                  "dtype=torch.float16, cache_enabled=True) around autoregressive_infer_cfg under "
                                  "torch.inference_mode(), tf32 on, cudnn deterministic, parameters requires_grad "
                                  f"False; here autocast {amp} (--official-autocast)"}


def variant_label(dtype: str, compiled: bool) -> str:
    return f"{dtype}{' compiled' if compiled else ''}"


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def prepare_pipeline(args, work: Path) -> tuple[Path, dict[str, Any]]:
    """The random VAR-format pair in ``work`` (reused if there) and its converted pipeline folder; the settings
    every row of the run shares."""
    from ..checkpoints.var import convert_var

    device = bench_device(args)
    settings: dict[str, Any] = {"config": args.config, "cfg": args.cfg, "cfg_schedule": "var", "top_k": args.top_k,
                                "top_p": args.top_p, "dtype": [d for d, c in varkit_variants(args) if not c],
                                "dtype_requested": list(args.dtype or DEFAULT_DTYPES[device]),
                                **official_precision(args),
                                "compile": bool(args.compile), "device": device, "threads": args.threads,
                                "repeats": args.repeats, "seed": args.seed,
                                "varkit_prepacked_weights": bool(args.prepack) and device == "cpu"}
    if device == "cuda":
        settings.update(gpu=torch.cuda.get_device_name(), fraction_of_floor_basis="wall_s",
                        timing="torch.cuda.synchronize() before and after each timed call; one untimed warm-up call "
                               "per side and batch size; varkit returns output_type='pt' tensors on the GPU")
    t0 = time.perf_counter()
    if not ((work / "vae.pth").is_file() and (work / "var.pth").is_file()):
        write_random_pair(args.config, work, args.seed)
    settings["weights_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe_dir = work / "pipeline"
    if not (pipe_dir / "config.json").is_file():
        convert_var(work / "vae.pth", work / "var.pth", pipe_dir, overwrite=True)
    settings["convert_s"] = time.perf_counter() - t0
    return pipe_dir, settings


def run_call(pipe, req: dict) -> dict:
    """One whole call of ``pipe`` with ``req``'s settings (``batch``, ``seed``, ``cfg``, ``top_k``, ``top_p``,
    ``profile``): wall and CPU seconds, KV cache bytes, output shape, seconds per op category or None."""
    labels = bench_labels(req["batch"], pipe.num_classes)
    cuda = pipe.device.type == "cuda"
    kw = {"output_type": "pt"} if cuda else {}  # on a GPU, images stay there (as VAR's own call returns them)
    out, wall, cpu, cats = _timed(lambda: pipe(class_labels=labels, seed=req["seed"], cfg=req["cfg"], cfg_schedule="var",
                                               top_k=req["top_k"], top_p=req["top_p"], **kw), req.get("profile", False),
                                  sync=cuda)
    shape = list(out.images.shape) if cuda else [len(out.images), *out.images[0].size]
    return {"wall_s": wall, "cpu_s": cpu, "kv_peak_bytes": out.stats.cache_bytes, "kv_transient_bytes": out.stats.cache_bytes,
            "shape": shape, "profile": cats}


def make_row(impl: str, batch: int, times: list[float], cpu: list[float], kv: dict[str, Any],
             dtype: str = "float32", compiled: bool = False) -> dict[str, Any]:
    """The row of one implementation (in ``dtype``, compiled or not) at one batch size, from its timed calls."""
    return {"impl": impl, "dtype": dtype, "compiled": compiled, "batch": batch, "images_per_s": batch / min(times), "s_per_image": min(times) / batch,
            "best_s": min(times), "wall_s": min(times), "cpu_s": min(cpu), "mean_s": sum(times) / len(times),
            "runs": len(times), "cpu_s_per_image": min(cpu) / batch, "cpu_times_s": cpu,
            "kv_peak_bytes": kv.get("kv_peak_bytes"), "kv_transient_bytes": kv.get("kv_transient_bytes"), "times_s": times}


def check_args(args) -> None:
    bench_device(args)  # --device cuda without a GPU: one line
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise InvalidArgumentError("--batch sizes and --repeats must be >= 1")
    varkit_variants(args)  # --dtype names


def add_achieved_bandwidth(row: dict[str, Any]) -> dict[str, Any]:
    """``achieved_GBps``: the bytes the row's floor counts (weights of every pass + KV read) per wall second."""
    if "floor_weight_bytes" in row and row.get("wall_s"):
        row["achieved_GBps"] = (row["floor_weight_bytes"] + row["floor_kv_bytes"]) / row["wall_s"] / 1e9
    return row


def load_variant(pipe_dir: Path, dtype: str, compiled: bool, prepack: bool, device: str = "cpu"):
    """The converted pipeline on ``device`` with its generator in ``dtype``, prepacked (CPU) and/or compiled as
    asked."""
    from ..pipeline import load_pipeline

    if device == "cpu":
        return load_pipeline(pipe_dir, dtype=dtype, compile=compiled, prepack=prepack)
    return load_pipeline(pipe_dir, device=device, dtype=dtype, compile=compiled, prepack=False)


def run_varkit(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """varkit's rows: one per (dtype, compiled) and batch size (see the module docstring); (rows, settings with
    ``floor``)."""
    from .floor import HostReadProbe, WorkTrace, attach_floor, get_floor

    check_args(args)
    device = bench_device(args)
    tmp = None
    work = Path(args.work_dir) if args.work_dir else Path(tmp := tempfile.mkdtemp(prefix="varkit-bench-var-"))
    try:
        pipe_dir, settings = prepare_pipeline(args, work)
        req = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
        if device == "cuda":
            floor, basis = get_floor("cuda", verbose=True), "wall_s"
        else:
            floor = get_floor(threads=args.threads, verbose=args.verbose)
            # one thread: CPU seconds (other processes on a shared machine inflate them far less than wall time)
            basis = "cpu_s" if (args.threads or torch.get_num_threads()) == 1 else "wall_s"
        settings["fraction_of_floor_basis"] = basis
        settings["loadavg_start"] = _load()
        settings["load_s"] = {}
        rows, loads = [], []
        probe = HostReadProbe(floor, device)  # the host's read rate before each timed run: fraction_of_live_floor
        for dtype, compiled in varkit_variants(args):
            label = variant_label(dtype, compiled)
            t0 = time.perf_counter()
            pipe = load_variant(pipe_dir, dtype, compiled, args.prepack, device)
            settings["load_s"][f"varkit {label}"] = time.perf_counter() - t0
            trace = WorkTrace.from_json(work_of_one_call(pipe, {**req, "seed": args.seed}))  # eager: the work done
            for B in args.batch:
                kv = run_call(pipe, {**req, "batch": B, "seed": 10_000 + B})  # warm-up (compiles), reads the KV cache
                times, cpu = [], []
                for rep in range(args.repeats):
                    loads.append(_load())
                    probe((label, B))
                    r = run_call(pipe, {**req, "batch": B, "seed": args.seed + rep})
                    times.append(r["wall_s"])
                    cpu.append(r["cpu_s"])
                    if args.verbose:
                        print(f"[run] varkit {label} batch {B} rep {rep}: {r['wall_s']:.2f}s", file=sys.stderr)
                rows.append({**make_row("varkit", B, times, cpu, kv, dtype, compiled), "warmup_cpu_s": kv["cpu_s"]})
                rows[-1].update(probe.row_fields((label, B)))
                if args.profile:  # one more (untimed) call under the profiler
                    settings.setdefault("profile_s", {})[f"{B} {label}"] = {
                        "varkit": run_call(pipe, {**req, "batch": B, "seed": args.seed, "profile": True})["profile"]}
                attach_floor(rows[-1:], trace, floor, seconds_key=basis)
                if device == "cuda":
                    add_achieved_bandwidth(rows[-1])
            del pipe
        probe.close()
        settings["loadavg_runs"] = [x for x in loads if x is not None]
        settings["loadavg_end"] = _load()
        settings["floor"] = floor
        return rows, settings
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def report(args, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Print the table (and profiles) and write the JSON."""
    from .report import print_table, save_results

    print_table(rows, CUDA_COLUMNS if settings.get("device") == "cuda" else COLUMNS)
    for B, prof in settings.get("profile_s", {}).items():
        print(f"profile, batch {B} (seconds per op category, one run each):")
        impls = list(prof)
        print_table([{"category": k, **{i: prof[i][k] for i in impls}} for k in prof[impls[0]]], ["category", *impls])
    la = settings.get("loadavg_runs") or []
    if la:
        print(f"load average during the runs: {min(la):.2f} .. {max(la):.2f} (machine has {os.cpu_count()} CPUs)")
    floor = settings.pop("floor")
    path = save_results(args.name, rows, settings, args.out_dir, floor=floor)
    print(f"wrote {path}")


def cmd_bench_var(args) -> None:
    cuda = bench_device(args) == "cuda"  # --device cuda without a GPU: one line, before anything runs
    args.name = args.name or ("var_side_by_side" if args.official else "var") + ("_cuda" if cuda else "")
    if args.official:
        from .scripts import load_script

        load_script("var").cmd_side_by_side(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, settings = run_varkit(args)
    report(args, rows, settings)


def add_var_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``varkit bench var`` (and of ``bench/side_by_side/var.py``, which requires --official)."""
    p.add_argument("--official", default=None,
                   help="a checkout of github.com/FoundationVision/VAR: time VAR's own loop side by side (the script "
                        "bench/side_by_side/var.py of varkit's repository)")
    p.add_argument("--config", default="var-d16", help="VAR config whose random weights are run")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side and batch size (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (of each worker with --official; default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the random weights and converted pipeline here (reused)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="varkit without prepacked GEMM weights (load_pipeline(prepack=False); its default is \"auto\")")
    p.add_argument("--profile", action="store_true", help="also profile one run per side: seconds per op category")
    p.add_argument("--dtype", nargs="+", default=None,
                   help="varkit's generator dtypes, one set of rows each: float32, bfloat16, auto (this CPU's choice); "
                        "default float32 (on cuda: bfloat16 float32); VAR's own loop stays fp32 on the CPU")
    p.add_argument("--compile", action="store_true",
                   help="also time varkit with compiled scale steps (ScalesGenerator.compile_decoding; the warm-up "
                        "call of each batch size compiles and is not timed)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (default) or cuda: every run on the GPU (varkit's --dtype default there: bfloat16 float32; "
                        "no prepacking; VAR's own loop under autocast, see --official-autocast)")
    p.add_argument("--official-autocast", choices=["float16", "bfloat16", "off"], default="float16",
                   help="with --device cuda: the autocast dtype of VAR's own loop (default float16, as VAR's "
                        "demo_sample.ipynb; off: fp32 with tf32)")
    add_output_args(p, None)  # default: "var", or "var_side_by_side" with --official (+ "_cuda" on --device cuda)


def add_var_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench var`` to the ``bench`` sub-subparsers."""
    p = bench_subparsers.add_parser(
        "var", help="VAR: varkit's pipeline on random VAR weights (CPU; --dtype, --compile); --official: vs VAR's own loop",
        description=__doc__.split("\n\n")[0])
    add_var_arguments(p)
    p.set_defaults(func=cmd_bench_var)
    return p
