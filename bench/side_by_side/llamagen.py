"""LlamaGen's own ``generate`` vs varkit on the same GPT-B weights (a FoundationVision/LlamaGen checkout).

    python bench/side_by_side/llamagen.py --official ../LlamaGen --batch 1 8 --compile

(or ``varkit bench llamagen --official ../LlamaGen``, which runs this script from a source checkout of varkit;
varkit's own decode rows, KV cache vs none, are ``varkit bench decode``).

Given a checkout of the official source, one run builds its GPT-B
(LlamaGen's init, with a random ``output`` head and norms, since LlamaGen zero-inits the head),
hands the very same tensors to a varkit :class:`RasterGenerator` (and a bf16 copy), and times a
full 16x16 image (256 tokens, CFG 4) at each batch size: LlamaGen's ``generate`` (fp32, no
compile), varkit's ancestral sampler in fp32, and in bf16; with ``--compile`` also varkit with its
compiled decode step (``Generator.compile_decoding``; the compile is timed apart, in a warm-up run); with
``--prepack`` also varkit's eager rows on oneDNN-prepacked weights (what ``load_pipeline``'s default
``prepack="auto"`` does for GPT-B's weights on a CPU).
On a CPU both loops run in this process with varkit's caching allocator installed (:mod:`varkit.nn.cpu_allocator`,
as ``load_pipeline`` does). Both sample with LlamaGen's demo settings (top-k 2000, temperature 1). It also decodes greedily
(top-k 1) with varkit fp32 and bf16 and reports the share of identical tokens, and checks varkit
fp32 greedy tokens against the official greedy tokens.

``--device cuda`` runs everything on the GPU: LlamaGen's loop in bf16 (the model cast to bf16, as its
``autoregressive/sample/sample_c2i.py`` does by default, ``--precision bf16``; the tf32 switches that script sets do
not touch bf16 GEMMs), varkit's in bf16 and fp32, and with ``--compile`` through ``compile_decoding`` (CUDA graphs
of the decode steps; captured in an untimed run). Every timer synchronizes the GPU; each implementation gets an
untimed warm-up run per batch size; ``fraction_of_floor`` is on wall seconds, against the GPU's floor, and
``achieved_GBps`` = (weight + KV bytes the floor counts) / wall seconds. The greedy checks default to 2 images,
comparing varkit fp32 with LlamaGen's loop in fp32 and varkit bf16 with LlamaGen's in bf16. The result file is
``llamagen_side_by_side_cuda.json`` unless ``--name`` says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import torch

from varkit.bench.llamagen_side_by_side import add_llamagen_arguments
from varkit.bench.official import import_checkout, script_main

DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # sample_c2i.py
COLUMNS = ["impl", "dtype", "compiled", "prepacked", "batch", "tokens", "wall_s", "cpu_s", "ms_per_step", "image_tokens_per_s", "vs_official",
           "cpu_vs_official", "floor_s", "fraction_of_floor", "host_read_GBps", "fraction_of_live_floor", "target", "met"]
CUDA_COLUMNS = [c for c in COLUMNS if c not in ("prepacked", "target", "met", "host_read_GBps", "fraction_of_live_floor")] + ["achieved_GBps"]
#: LlamaGen's loop on the GPU: autoregressive/sample/sample_c2i.py casts the model to --precision, default bf16
OFFICIAL_CUDA_PRECISION = ("bfloat16: the model cast to bf16, as LlamaGen's autoregressive/sample/sample_c2i.py does "
                           "by default (--precision bf16, .to(device=device, dtype=precision)); its tf32 switches do "
                           "not affect bf16 GEMMs")
TARGETS = {("varkit", "float32", 1): 1.2, ("varkit", "float32", 8): 1.5, ("varkit", "bfloat16", 1): 2.0}


def import_official(path: str | os.PathLike):
    """LlamaGen's ``GPT_models`` and ``generate`` from a checkout at ``path``."""
    gpt, gen = import_checkout(path, "autoregressive/models/gpt.py",
                               ["autoregressive.models.gpt", "autoregressive.models.generate"], "a LlamaGen checkout",
                               "pass the folder of git clone https://github.com/FoundationVision/LlamaGen")
    return gpt.GPT_models, gen.generate


def build_models(gpt_models, seed: int = 0):
    """(official GPT-B fp32, varkit fp32 on the same tensors, varkit bf16 copy)."""
    from varkit.checkpoints.llamagen import (
        generator_from_llamagen_state_dict,
        gpt_config_from_llamagen_state_dict,
        gpt_state_dict_from_llamagen,
    )

    torch.manual_seed(seed)
    official = gpt_models["GPT-B"](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                   model_type="c2i").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        official.output.weight.normal_(0, 0.02, generator=g)  # LlamaGen zero-inits the head
        for name, p in official.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    sd = gpt_state_dict_from_llamagen(official.state_dict())
    fp32 = generator_from_llamagen_state_dict(sd, gpt_config_from_llamagen_state_dict(sd, grid=16))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    return official, fp32, bf16


def _sync(labels) -> None:
    """Wait for the GPU (the labels' device) to finish: a CUDA timer starts and stops on an idle GPU."""
    if labels.device.type == "cuda":
        torch.cuda.synchronize(labels.device)


def _official_run(generate, model, labels, cfg, top_k, greedy=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync(labels)
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(model, labels, 256, cfg_scale=cfg, cfg_interval=-1, temperature=1.0,
                       top_k=1 if greedy else top_k, top_p=1.0, sample_logits=not greedy)
        _sync(labels)
        return out.long(), (time.perf_counter() - t0, time.process_time() - c0)


def _varkit_run(gen, labels, cfg, top_k, seed=0, greedy=False):
    from varkit.samplers import SamplingParams, get_sampler
    from varkit.samplers.logits import image_generators

    sampler = get_sampler("ancestral", SamplingParams(cfg=cfg, top_k=1 if greedy else top_k))
    gens = image_generators(seed, labels.shape[0])
    _sync(labels)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sampler.sample(gen, labels, gens)
    _sync(labels)
    return res.tokens, (time.perf_counter() - t0, time.process_time() - c0)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = a.cpu() == b.cpu()
    first = [int(r.logical_not().float().argmax()) if not r.all() else a.shape[1] for r in same]
    return {"identical_token_share": float(same.float().mean()), "identical_images": int(same.all(1).sum()),
            "images": a.shape[0], "mean_identical_prefix": sum(first) / len(first)}


@torch.inference_mode()
def run_side_by_side(official_path, batches=(1, 8), cfg: float = 4.0, top_k: int = 2000, bf16: bool = True,
                     greedy_batch: int = 8, seed: int = 0, repeats: int = 1, compile: bool = False,
                     log=None, prepack: bool = False, device: str | torch.device = "cpu",
                     inductor: bool = False, warmup: bool = True) -> tuple[list[dict], dict]:
    """Rows of the timing table and the greedy-agreement summary (with ``compile``: compile times too).

    Times are the best of ``repeats`` runs, wall and process CPU seconds (CPU: steadier on a shared machine);
    ``floor_s`` is the machine's floor for the run (:mod:`varkit.bench.floor`, the same work for both loops:
    the same GPT-B weights and steps) and ``fraction_of_floor`` its share of the CPU seconds at one thread
    (of the wall seconds at more). ``device`` cuda: see the module docstring (wall seconds, bf16 official loop)."""
    from varkit.bench.floor import HostReadProbe, attach_floor, get_floor, trace_sampling
    from varkit.device import resolve_device
    from varkit.samplers import SamplingParams

    log = log or (lambda msg: print(msg, flush=True))
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        basis = "wall_s"
        floor = get_floor(dev, verbose=True)
        prepack = False  # oneDNN packing is a CPU path
    else:
        basis = "cpu_s" if torch.get_num_threads() == 1 else "wall_s"
        floor = get_floor(threads=torch.get_num_threads())
        # varkit's caching allocator, as load_pipeline installs it on a CPU (bench nar does the same); LlamaGen's
        # loop runs in this process and gets it too
        from varkit.nn import cpu_allocator

        cpu_allocator.install()
    gpt_models, generate = import_official(official_path)
    torch.manual_seed(seed)
    official, fp32, bf = build_models(gpt_models, seed)
    off_dt = "float32"
    official_fp32 = official  # the greedy check's reference
    if cuda:  # as sample_c2i.py: the model on the GPU in --precision (bf16); an fp32 copy for the greedy check
        fp32, bf = fp32.to(dev), bf.to(dev)
        official_fp32 = official.to(dev)
        official = copy.deepcopy(official_fp32).to(torch.bfloat16)
        off_dt = "bfloat16"
    models = {("float32", False, False): fp32}
    if bf16:
        models[("bfloat16", False, False)] = bf
    plain = list(models.items())
    if prepack:  # copies whose linears run on oneDNN-packed weights (load_pipeline's prepack="auto" on GPT-B)
        from varkit.nn.layers import prepack_linears

        for (dt, _, _), m in plain:
            packed = copy.deepcopy(m)
            prepack_linears(packed)
            models[(dt, False, True)] = packed
    if compile:  # copies, so the eager rows stay eager
        for (dt, _, _), m in plain:
            models[(dt, True, False)] = copy.deepcopy(m).compile_decoding()
    if inductor and cuda:  # CUDA graphs over inductor's fused kernels (compile_decoding(inductor=True))
        models[("bfloat16", "inductor", False)] = copy.deepcopy(bf).compile_decoding(inductor=True)
    traces = {dt: trace_sampling(m, SamplingParams(cfg=cfg, top_k=top_k)) for (dt, compiled, packed), m in models.items()
              if not compiled and not packed}  # the official fp32 loop does the work of varkit's fp32 one
    if off_dt not in traces:  # cuda with --no-bf16: the official bf16 loop does the work of varkit's bf16 one
        traces[off_dt] = trace_sampling(bf, SamplingParams(cfg=cfg, top_k=top_k))
    rows, compile_s = [], {}
    probe = HostReadProbe(floor, dev)  # the host's read rate before each timed run: fraction_of_live_floor
    for b in batches:
        labels = torch.tensor([DEMO_LABELS[i % len(DEMO_LABELS)] for i in range(b)], device=dev)
        for (dt, compiled, _), m in models.items():
            if compiled:  # the first run compiles (one graph per batch size); it is not timed
                compile_s[f"{dt}_batch{b}"] = _varkit_run(m, labels, cfg, top_k, seed)[1][0]  # wall seconds
        impls = [("llamagen", off_dt, False, False)] + [("varkit", dt, c, p) for dt, c, p in models]
        # an untimed warm-up of each: on a GPU cuBLAS and allocator start-up; on a CPU prepacked linears pack their
        # weights on first use and oneDNN makes its kernels per shape (a cold run pays both)
        if warmup:
            for k in impls:
                if k[0] == "llamagen":
                    torch.manual_seed(seed)
                    _official_run(generate, official, labels, cfg, top_k)
                elif not k[2]:  # compiled ones just ran
                    _varkit_run(models[k[1:]], labels, cfg, top_k, seed)
        best = {k: (float("inf"), float("inf")) for k in impls}
        for r in range(repeats):  # interleaved and rotated, best of each: fair under a varying machine load
            for k in impls[r % len(impls):] + impls[: r % len(impls)]:
                probe((b, k))
                if k[0] == "llamagen":
                    torch.manual_seed(seed)
                    _, t = _official_run(generate, official, labels, cfg, top_k)
                else:
                    _, t = _varkit_run(models[k[1:]], labels, cfg, top_k, seed)
                best[k] = tuple(min(x, y) for x, y in zip(best[k], t))
        t_off, c_off = best[("llamagen", off_dt, False, False)]
        for (impl, dt, compiled, packed), (t, c) in best.items():
            target = None if cuda else TARGETS.get((impl, dt, b))  # the targets are the CPU's
            ratio = t_off / t
            row = {"impl": impl, "dtype": dt, "compiled": (compiled if isinstance(compiled, str) else "yes") if compiled else "",
                   "prepacked": "yes" if packed else "", "batch": b, "tokens": 256,
                   "wall_s": t, "cpu_s": c, "ms_per_step": 1000 * t / 256,
                   "image_tokens_per_s": b * 256 / t, "vs_official": ratio, "cpu_vs_official": c_off / c, "repeats": repeats,
                   "target": f">={target}x" if target else "", "met": ("yes" if ratio >= target else "NO") if target else ""}
            row.update(probe.row_fields((b, (impl, dt, compiled, packed))))
            rows.append(attach_floor([row], traces[dt], floor, seconds_key=basis)[0])
            if cuda and "floor_weight_bytes" in row:  # the bytes the floor counts, per wall second
                row["achieved_GBps"] = (row["floor_weight_bytes"] + row["floor_kv_bytes"]) / t / 1e9
            log(f"  batch {b} {impl:8s} {dt:8s}{' compiled' if compiled else '         '}"
                f"{' prepacked' if packed else '          '} {1000 * t / 256:7.1f} ms/step"
                f"  {b * 256 / t:7.1f} tok/s  x{ratio:.2f}")
    probe.close()
    greedy = {}
    if greedy_batch is None:
        greedy_batch = 2 if cuda else 8
    if greedy_batch:
        labels = torch.tensor([DEMO_LABELS[i % len(DEMO_LABELS)] for i in range(greedy_batch)], device=dev)
        ref, _ = _official_run(generate, official_fp32, labels, cfg, top_k, greedy=True)
        tok32, _ = _varkit_run(fp32, labels, cfg, top_k, greedy=True)
        greedy["varkit_fp32_vs_official_fp32"] = _agreement(tok32, ref)
        if cuda and bf16:  # the timed pair: both loops in bf16
            ref16, _ = _official_run(generate, official, labels, cfg, top_k, greedy=True)
            greedy["varkit_bf16_vs_official_bf16"] = _agreement(_varkit_run(bf, labels, cfg, top_k, greedy=True)[0], ref16)
        for (dt, compiled, packed), m in models.items():
            if dt == "float32" and not compiled and not packed:
                continue
            tok, _ = _varkit_run(m, labels, cfg, top_k, greedy=True)
            name = "bf16" if dt == "bfloat16" else "fp32"
            tag = (f"_{compiled}" if isinstance(compiled, str) else "_compiled" if compiled else "") + ("_prepacked" if packed else "")
            greedy[f"varkit_{name}{tag}_vs_varkit_fp32"] = _agreement(tok, tok32)
        log(f"  greedy agreement (batch {greedy_batch}): {greedy}")
    return rows, greedy, compile_s, floor


def cmd_side_by_side(args) -> None:
    """Run, print the table, write ``bench/results/llamagen_side_by_side.json`` (``--name``)."""
    from varkit.bench.report import print_table, save_results
    from varkit.device import resolve_device

    device = getattr(args, "device", "cpu") or "cpu"
    dev = resolve_device(device)  # cuda without a GPU: one DeviceError line, before anything runs
    cuda = dev.type == "cuda"
    args.name = args.name or ("llamagen_side_by_side" + ("_cuda" if cuda else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.time()
    rows, greedy, compile_s, floor = run_side_by_side(args.official, args.batch, args.cfg, args.top_k, not args.no_bf16,
                                               args.greedy_batch, args.seed, args.repeats, args.compile,
                                               prepack=args.prepack, device=dev, inductor=args.inductor)
    load_after = os.getloadavg()
    print_table(rows, CUDA_COLUMNS if cuda else COLUMNS)
    for k, v in greedy.items():
        print(f"greedy {k}: {100 * v['identical_token_share']:.1f}% identical tokens, "
              f"{v['identical_images']}/{v['images']} identical images, mean identical prefix "
              f"{v['mean_identical_prefix']:.1f}/256")
    settings = {"official": str(args.official), "batches": args.batch, "cfg": args.cfg, "top_k": args.top_k,
                "temperature": 1.0, "model": "GPT-B c2i 16x16 (LlamaGen init, random output head and norms)",
                "device": "cpu", "compile": args.compile, "inductor": args.inductor, "prepack": args.prepack, "compile_run_s": compile_s, "seed": args.seed, "repeats": args.repeats,
                "threads": torch.get_num_threads(), "greedy": greedy,
                "loadavg_before": load_before, "loadavg_after": load_after, "total_s": time.time() - t0}
    if cuda:
        settings.update(device=str(dev), gpu=torch.cuda.get_device_name(dev), prepack=False,
                        official_dtype="bfloat16", official_precision=OFFICIAL_CUDA_PRECISION,
                        varkit_dtypes=["float32"] + ([] if args.no_bf16 else ["bfloat16"]),
                        compiled_means="compile_decoding(): decode steps captured into CUDA graphs",
                        fraction_of_floor_basis="wall_s", timing="torch.cuda.synchronize() before and after each "
                        "timed run; one untimed warm-up run of each implementation per batch size")
    for k, v in compile_s.items():
        print(f"compile run (compile + one image, not timed above) {k}: {v:.1f} s")
    path = save_results(args.name, rows, settings, args.out_dir, floor=floor)
    print(f"wrote {path} (load average before {load_before[0]:.2f}, after {load_after[0]:.2f})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/side_by_side/llamagen.py", description=__doc__.split("\n\n")[0])
    add_llamagen_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return script_main(Path(__file__).name, build_parser(), cmd_side_by_side, argv)


if __name__ == "__main__":
    raise SystemExit(main())
