"""``varkit bench nar``: NAR (2n-1 fronts) vs raster (n² tokens), and varkit vs NAR's own loop.

Rows, at every batch size (CFG 4 by default, so the generator sees twice the batch):

- ``varkit``/``nar``: varkit's ancestral sampler on a :class:`NeighborsGenerator`;
- ``official``/``nar``: NAR's own ``generate`` (``autoregressive/models/generate.py`` of the
  source tree given by ``--official``) on the *same weights*, loaded into NAR's ``Transformer``;
- ``varkit``/``raster``: the ancestral sampler on a LlamaGen raster generator of the same size.

Models: B-sized random ones (NAR GPT-B and LlamaGen GPT-B, NAR's init with perturbed norms and
non-zero heads) and, when bundled, ``digits-nar`` vs ``digits``. Both NAR implementations use the
same sampling settings (temperature, top-k), dtype (``--dtype``, as NAR's ``--precision``) and
number of threads; wall time is the best of ``--repeats`` runs of a whole sampling call (NAR's
includes its cache setup, as its ``generate`` does it per call), ``cpu_s`` the process CPU time of
that run (steadier than wall time when other processes share the cores).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError

COLUMNS = ["model", "impl", "layout", "batch", "forward_passes", "wall_s", "cpu_s", "images_per_s", "vs_raster",
           "vs_official", "cpu_vs_official"]

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


def load_official(path: str | Path):
    """NAR's ``gpt`` and ``generate`` modules, imported from the source tree ``path`` (NAR-images)."""
    root = Path(path)
    if not (root / "autoregressive" / "models" / "generate.py").is_file():
        raise InvalidArgumentError(
            f"{root} is not NAR's source tree: it has no autoregressive/models/generate.py "
            "(pass the NAR-images folder of a ThisisBillhe/NAR checkout)"
        )
    sys.path.insert(0, str(root))
    try:
        gpt = importlib.import_module("autoregressive.models.gpt")
        gen = importlib.import_module("autoregressive.models.generate")
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import NAR's code from {root}: {exc}") from None
    finally:
        sys.path.remove(str(root))
    gen.tqdm = lambda it, **kw: it  # its progress bar only
    return gpt, gen


def official_model(gpt_module, nar_gen) -> torch.nn.Module:
    """NAR's ``Transformer`` holding ``nar_gen``'s weights (the names are the same)."""
    from ..checkpoints.nar import nar_state_dict_to_official

    c = nar_gen.config
    args = gpt_module.ModelArgs(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, multiple_of=c.multiple_of,
                                ffn_dim_multiplier=c.ffn_dim_multiplier, norm_eps=c.norm_eps, vocab_size=c.vocab_size,
                                num_classes=c.num_classes, block_size=c.grid ** 2, cls_token_num=c.cls_token_num,
                                model_type="c2i", medusa_attention_num=c.medusa_layers)
    model = gpt_module.Transformer(args)
    model.load_state_dict(nar_state_dict_to_official(nar_gen.state_dict()), strict=True)
    return model.eval()


def _best(fn, repeats: int):
    """(result, wall seconds, CPU seconds of this process) of the fastest of ``repeats`` calls.

    CPU seconds are less sensitive than wall time to other processes sharing the cores.
    """
    best = (None, float("inf"), float("inf"))
    for _ in range(max(repeats, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best[1]:
            best = (out, wall, cpu)
    return best


def bench_varkit(gen, name: str, layout: str, batch: int, params, repeats: int) -> dict[str, Any]:
    from ..samplers import get_sampler
    from ..samplers.logits import image_generators

    cond = torch.arange(batch) % gen.num_classes
    sampler = get_sampler("ancestral", params)
    res, t, cpu = _best(lambda: sampler.sample(gen, cond, image_generators(0, batch)), repeats)
    return {"model": name, "impl": "varkit", "layout": layout, "batch": batch,
            "forward_passes": res.stats.forward_passes, "wall_s": t, "cpu_s": cpu, "images_per_s": batch / t}


def bench_official(gen_module, model, name: str, batch: int, params, repeats: int) -> dict[str, Any]:
    grid = model.grid_size
    cond = torch.arange(batch) % model.num_classes
    calls = {"n": 0}
    forward = model.forward

    def counting(*a, **kw):
        calls["n"] += 1
        return forward(*a, **kw)

    def run():
        calls["n"] = 0
        torch.manual_seed(0)
        return gen_module.generate(model, cond, grid * grid, cfg_scale=params.cfg, cfg_interval=-1,
                                   temperature=params.temperature, top_k=params.top_k or 0,
                                   top_p=params.top_p if params.top_p is not None else 1.0, sample_logits=True)

    model.forward = counting
    try:
        _, t, cpu = _best(run, repeats)
    finally:
        del model.forward
    return {"model": name, "impl": "official", "layout": "neighbors", "batch": batch,
            "forward_passes": calls["n"], "wall_s": t, "cpu_s": cpu, "images_per_s": batch / t}


def run_bench(args) -> list[dict[str, Any]]:
    from ..device import resolve_dtype
    from ..pipeline import bundled_models, load_pipeline
    from ..samplers import SamplingParams

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
    official = load_official(args.official) if args.official else None
    dtype = resolve_dtype(args.dtype) or torch.float32
    for name, nar, raster in targets:
        off_model = official_model(official[0], nar) if official is not None and nar.config.caption_dim == 0 else None
        # as NAR's sample_c2i.py --precision: the whole model (and so its KV cache) in that dtype
        nar, raster = nar.to(dtype), raster.to(dtype)
        off_model = off_model.to(dtype) if off_model is not None else None
        for b in args.batch:
            group = [bench_varkit(nar, name, "neighbors", b, params, args.repeats)]
            if off_model is not None:
                group.append(bench_official(official[1], off_model, name, b, params, args.official_repeats))
            if not args.skip_raster:
                group.append(bench_varkit(raster, name, "raster", b, params, 1))
            ras = next((r for r in group if r["layout"] == "raster"), None)
            off = next((r for r in group if r["impl"] == "official"), None)
            for r in group:
                if ras is not None:
                    r["vs_raster"] = r["images_per_s"] / ras["images_per_s"]
                if off is not None:
                    r["vs_official"] = r["images_per_s"] / off["images_per_s"]
                    r["cpu_vs_official"] = off["cpu_s"] / r["cpu_s"]
            rows += group
            for r in group:
                print({k: r.get(k) for k in COLUMNS}, flush=True)
    return rows


def cmd_bench_nar(args) -> None:
    import os

    from .report import print_table, save_results

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = run_bench(args)
    print_table(rows, COLUMNS)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = vars(args) | {"func": None, "loadavg_start": load_start, "loadavg_end": load, "threads_used": torch.get_num_threads()}
    path = save_results(args.name, rows, settings, args.out_dir)
    print(f"wrote {path}")


def add_nar_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench nar`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser("nar", help="NAR vs raster, and varkit's NAR vs NAR's own sampling loop")
    p.add_argument("--official", default=None,
                   help="NAR's source tree (the NAR-images folder of a ThisisBillhe/NAR checkout) to time its own loop")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2000, help="top-k for both loops (NAR's sample_c2i default; 0 = off)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs for varkit's NAR")
    p.add_argument("--official-repeats", type=int, default=2, help="best of this many runs for NAR's own loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16 (NAR's --precision bf16), for every model")
    p.add_argument("--seed", type=int, default=0, help="seed of the random B-sized weights")
    p.add_argument("--bundled-nar", default="digits-nar")
    p.add_argument("--bundled-raster", default="digits")
    p.add_argument("--skip-bundled", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--skip-raster", action="store_true")
    p.add_argument("--name", default="nar")
    p.add_argument("--out-dir", default="bench/results")
    p.set_defaults(func=cmd_bench_nar)
    return p
