"""``varkit bench mar``: varkit's MAR (sampling + VAE decode) on random MAR weights, split into parts with floors.

Random-init weights: MAR-B by default, drawn in MAR's key names (:func:`varkit.checkpoints.synthetic.mar_state_dict`)
and converted with :func:`varkit.checkpoints.mar.mar_state_dict_from_official` into varkit's generator; a random
KL tokenizer (``--tokenizer``, MAR's KL-16 by default). The same labels and settings (``num_iter``, diffusion
steps, CFG on the linear schedule, temperature) for every row, on the CPU at ``--threads`` threads (1 by default).
Rows: ``varkit``, the ancestral sampler + ``KLTokenizer.decode``, at each ``--dtype`` (the generator, its diffusion
head included, in that dtype; ``bfloat16/float32`` keeps the head's network in fp32; the VAE stays fp32 as in
:class:`~varkit.pipeline.Pipeline`), on oneDNN-prepacked linears (``--prepack``, default on).

``--official PATH`` (an LTH14/mar checkout) adds MAR's own ``sample_tokens`` + VAE decode on the same weights
(``official`` rows; both sides then decode with one random KL-16 VAE drawn in LDM's names): that comparison is the
script ``bench/side_by_side/mar.py`` of varkit's repository (:mod:`varkit.bench.scripts`), which runs this bench
with its sides added (:class:`Side`, :func:`run_bench`'s ``official``).

Every run is split into transformer (encoder + decoder), head (the diffusion sampling loops), decode (VAE) and the
rest, timed by wrappers around those calls, and each part is set against its floor on this machine, measured at the
same thread count (:mod:`varkit.bench.partwise`, in process CPU time): weight bytes over the bandwidth of a copy of
that many bytes, FLOPs over the rate of a large GEMM (transformer, head) or of the VAE's dominant 3x3 convolution
(decode). Sides are timed round-robin so that load from other processes falls on all of them alike; ``cpu_s`` is the
process CPU time of a run (steadier than wall time on a shared machine), and ``x_floor`` is CPU seconds over the
floor. Of ``--repeats`` runs per side, the one with the least CPU time is reported (its wall and CPU seconds); the
parts' seconds and floors are per run (the whole batch), ``s_per_image`` and ``cpu_s_per_image`` per image.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .partwise import PartTimer, batch_saver, floor_cache_rates, instrument, print_report, rate_measurer
from .report import add_output_args

COLUMNS = ["impl", "dtype", "prepacked", "batch", "s_per_image", "cpu_s_per_image", "vs_official", "cpu_vs_official",
           "transformer_cpu_s", "head_cpu_s", "decode_cpu_s", "other_cpu_s", "floor_s", "x_floor", "fraction_of_floor"]
PART_COLUMNS = ["impl", "dtype", "prepacked", "batch", "part", "seconds", "cpu_s", "floor_s", "x_floor", "bound", "share"]
PARTS = ("transformer", "head", "decode")
LABELS = [207, 360, 388, 113, 355, 980, 323, 979, 88, 22, 437, 562, 1, 130, 94, 33]  # MAR's demo classes first


# -- work: FLOPs and bytes of MAR's algorithm -------------------------------------------------------------
def _block_flops(tokens: int, dim: int, hidden: int, queries: int | None = None) -> float:
    """FLOPs of one ViT block over ``tokens`` positions; with ``queries`` only that many rows leave it
    (k/v still for all): qkv + attention + proj + MLP."""
    q = tokens if queries is None else queries
    return 2 * tokens * dim * 3 * dim + 4 * q * tokens * dim + 2 * q * dim * dim + 4 * q * dim * hidden


def transformer_flops(cfg, known: list[int], rows: int, read: list[int] | None = None) -> float:
    """GEMM + attention FLOPs of MAR's encoder/decoder over a decode whose step s sees ``known[s]`` tokens, for
    ``rows`` sequences (the CFG-doubled batch). ``read[s]``: positions whose output is kept at step s (varkit's
    last decoder block computes only those; None: MAR's full decoder)."""
    S, N = cfg.buffer_size, cfg.grid * cfg.grid
    E, Dd = cfg.encoder_dim, cfg.decoder_dim
    he, hd = int(E * cfg.mlp_ratio), int(Dd * cfg.mlp_ratio)
    total = 0.0
    for s, k in enumerate(known):
        enc = 2 * k * cfg.token_dim * E + cfg.encoder_depth * _block_flops(S + k, E, he)
        dec = 2 * (S + k) * E * Dd + (cfg.decoder_depth - 1) * _block_flops(S + N, Dd, hd)
        dec += _block_flops(S + N, Dd, hd, None if read is None else read[s])
        total += rows * (enc + dec)
    return total


def linear_numel(module: nn.Module) -> int:
    """Weights of the linear layers of ``module`` (what a GEMM reads; norms and biases are noise)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def chain_constant_numel(module: nn.Module) -> int:
    """Linear weights of a diffusion MLP that see only the condition and the timestep (``cond_embed``, the timestep
    MLP, every adaLN modulation): a sampling chain needs them once, not at every step (varkit computes them once per
    chain, :class:`varkit.models.diffusion.DiffusionChain`), so the floor reads them once per chain."""
    const = ("cond_embed", "time_embed")
    return sum(m.weight.numel() for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and (n.startswith(const) or "adaLN_modulation" in n))


def transformer_numel(gen) -> int:
    """Parameters a transformer pass reads: everything but the head's network."""
    return sum(p.numel() for n, p in gen.named_parameters() if not n.startswith("head."))


# -- timing wrappers ---------------------------------------------------------------------------------------
class Split(PartTimer):
    """Wall and process-CPU seconds per part of one run, and the diffusion network calls (rows of each)."""

    def __init__(self) -> None:
        self.net_rows: list[int] = []
        super().__init__(PARTS)

    def reset(self) -> None:
        super().reset()
        self.net_rows.clear()  # in place: the counting wrappers hold this list

    def count_rows(self) -> Callable[[Callable], Callable]:
        """A wrapper for :func:`instrument` that records each call's rows in ``net_rows``."""
        return self.counted(self.net_rows, lambda x: int(x.shape[0]))


# -- weights ---------------------------------------------------------------------------------------------------
def random_weights(config: str, seed: int, tokenizer: str | None = "mar-kl16"):
    """(varkit generator, KL tokenizer or None, the generator's weights in MAR's names) on random weights.

    The generator's weights are drawn in MAR's format and converted (the converter's key mapping); the tokenizer
    is the named KL config's own random init (None: ``tokenizer`` None, for a caller that brings its own)."""
    from ..checkpoints.mar import generator_from_mar_state_dict, mar_state_dict_from_official, mar_state_dict_to_official
    from ..checkpoints.synthetic import items_of, mar_state_dict
    from ..modeling import params_on_meta
    from ..models import create_model
    from ..models.mar import MARGenerator
    from ..tokenizers import create_tokenizer
    from ..tokenizers.kl import KLTokenizer

    with params_on_meta():
        meta = create_model(config)
    if not isinstance(meta, MARGenerator) or meta.head.kind != "diffusion":
        raise InvalidArgumentError(f"--config must name a MAR config with a diffusion head (e.g. mar-base), got {config!r}")
    sd = mar_state_dict(items_of(mar_state_dict_to_official(meta.state_dict())), seed)
    gen = generator_from_mar_state_dict(mar_state_dict_from_official(sd, "random MAR weights"), meta.config)
    tok = None
    if tokenizer is not None:
        torch.manual_seed(seed + 100)
        tok = create_tokenizer(tokenizer).eval()
        if not isinstance(tok, KLTokenizer):
            raise InvalidArgumentError(f"--tokenizer must name a KL tokenizer config (e.g. mar-kl16), got {tokenizer!r}")
        check_tokens(tok, gen)
    return gen.eval(), tok, sd


def check_tokens(tok, gen) -> None:
    if tuple(tok.token_shape) != tuple(gen.head.token_shape):
        raise InvalidArgumentError(
            f"the VAE's latents {tok.token_shape} do not match the generator's tokens {gen.head.token_shape}")


# -- runners: one call = one whole batch (sampling + decode) ------------------------------------------------------
@dataclass
class Side:
    """One implementation at one dtype: its run function, its split, what its floors need."""

    impl: str
    dtype: str
    run: Callable[[int], Any]
    split: Split
    head_numel: int
    head_bytes_per: int
    head_const_numel: int  # of head_numel, the chain-constant weights (chain_constant_numel)
    transformer_numel: int
    transformer_bytes_per: int
    gemm_dtype: str
    last_block_rows: bool
    prepacked: bool = False
    head_gemm_dtype: str = ""
    warmup: Callable[[], Any] | None = None  # untimed: packs prepacked weights before the first timed run


def bench_labels(batch: int, num_classes: int) -> torch.Tensor:
    return torch.tensor([LABELS[i % len(LABELS)] % num_classes for i in range(batch)])


def ancestral_run(gen, tok, split: PartTimer, params, warm_params,
                  seed: int) -> tuple[Callable[[int], torch.Tensor], Callable[[], None]]:
    """A varkit side's ``run(batch)`` and ``warmup()`` in the MAR and FlowAR benches: the ancestral sampler with
    ``params`` on :func:`bench_labels` and per-image seeds, then ``tok.decode`` timed as the part ``decode``; the
    warmup samples one image with ``warm_params`` (every linear sees a no-grad call: prepacked weights get packed)."""
    from ..samplers import get_sampler
    from ..samplers.random import image_generators

    sampler = get_sampler("ancestral", params)

    def run(batch: int) -> torch.Tensor:
        split.reset()
        res = sampler.sample(gen, bench_labels(batch, gen.num_classes), image_generators(seed, batch))
        with torch.inference_mode(), split.part("decode"):
            return tok.decode(gen.layout.to_tokenizer_ids(res.tokens))

    def warmup() -> None:
        get_sampler("ancestral", warm_params).sample(gen, bench_labels(1, gen.num_classes), image_generators(0, 1))
        split.reset()

    return run, warmup


def parse_dtype_spec(spec: str) -> tuple[torch.dtype, torch.dtype]:
    """``"bfloat16"`` (generator and head) or ``"bfloat16/float32"`` (generator / head) → torch dtypes."""
    from ..device import resolve_dtype

    gen_name, _, head_name = spec.partition("/")
    try:
        g = resolve_dtype(gen_name)
        h = resolve_dtype(head_name) if head_name else g
    except InvalidArgumentError:
        g = h = None
    if g is None or h is None:
        raise InvalidArgumentError(
            f"--dtype takes DTYPE or GENERATOR_DTYPE/HEAD_DTYPE (e.g. bfloat16/float32), got {spec!r}")
    return g, h


def varkit_side(gen, tok, settings: dict[str, Any], dtype: torch.dtype, prepack: bool,
                head_dtype: torch.dtype | None = None) -> Side:
    """varkit's ancestral sampler on ``gen`` in ``dtype`` (its head's network in ``head_dtype``, default the same),
    then ``tok.decode`` in fp32 on the decoder's CPU kernels (as a pipeline's on a CPU)."""
    from ..nn.layers import prepack_linears
    from ..nn.ldm import use_fast_kernels
    from ..samplers import SamplingParams

    head_dtype = head_dtype or dtype
    gen = copy.deepcopy(gen).to(dtype).eval()
    gen.head.net.to(head_dtype)
    if prepack:
        prepack_linears(gen)
    tok = copy.deepcopy(tok)
    use_fast_kernels(tok)  # the decoder's CPU kernels, as load_pipeline's on a CPU (Winograd convs, fused norms)
    split = Split()
    instrument(gen, "encode", split.timed("transformer"))
    instrument(gen, "decode", split.timed("transformer"))
    instrument(gen.head, "sample", split.timed("head"))
    instrument(gen.head.net, "forward", split.count_rows())
    instrument(gen.head.net, "step", split.count_rows())  # sampling calls step (condition work hoisted)
    params = SamplingParams(cfg=settings["cfg"], cfg_schedule=settings["cfg_schedule"], temperature=settings["temperature"],
                            head_steps=settings["head_steps"], num_iter=settings["num_iter"])
    # warmup: one 1-step, 2-diffusion-step image
    small = SamplingParams(cfg=settings["cfg"], cfg_schedule=settings["cfg_schedule"], head_steps=2, num_iter=1)
    run, warmup = ancestral_run(gen, tok, split, params, small, settings["seed"])

    name, hname = (str(d).replace("torch.", "") for d in (dtype, head_dtype))
    size = torch.tensor([], dtype=dtype).element_size()
    hsize = torch.tensor([], dtype=head_dtype).element_size()
    side = Side("varkit", name if hname == name else f"{name}/head-{hname}", run, split, linear_numel(gen.head.net),
                hsize, chain_constant_numel(gen.head.net), transformer_numel(gen), size, name, True, prepack)
    side.head_gemm_dtype = hname
    side.warmup = warmup
    return side


# -- one batch size: round-robin runs, rows with floors ------------------------------------------------------------
def _known_and_read(gen, num_iter: int) -> tuple[list[int], list[int]]:
    layout = gen.sampling_layout(num_iter)
    return list(layout.step_starts[:-1]), list(layout.step_sizes)


def decoder_flops(tok, batch: int) -> float:
    """FLOPs of one VAE decode of ``batch`` latents (torch's FLOP counter on a batch-1 decode, times the batch), the
    3x3 convolutions :func:`varkit.nn.winograd.eligible` takes counted at Winograd F(4x4, 3x3)'s products (a quarter
    of the direct product's), as :func:`varkit.bench.floor.trace_work` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..nn import winograd

    g = tok.config.latent_dim
    side = 16  # a 16x16 latent grid (MAR's and FlowAR's); callers scale by the area
    z = torch.zeros(1, side, side, g)
    saved = []  # FLOPs the eligible convolutions save against the direct product

    def hook(module, args, out):
        if winograd.eligible(module, args[0]):
            saved.append(2.0 * out.numel() * module.weight[0].numel() - winograd.flops(module, out))

    handles = [m.register_forward_hook(hook) for m in tok.model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            tok.model.post_quant_conv(z.permute(0, 3, 1, 2))
            tok.model.decoder(z.permute(0, 3, 1, 2).contiguous())
    finally:
        for h in handles:
            h.remove()
    return (float(fc.get_total_flops()) - sum(saved)) * batch


def make_rows(sides: list[Side], results: list[tuple[Any, float, float, dict, list[int]]], batch: int, gen, tok,
              machine: dict[str, Any], settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The table rows (one per side) and the part rows (one per side and part) of one batch size."""
    cfg = gen.config
    known, read = _known_and_read(gen, settings["num_iter"])
    rows_cfg = 2 * batch if settings["cfg"] != 1.0 else batch
    side_px = cfg.grid * tok.downsample
    dec_flops = decoder_flops(tok, batch) * (cfg.grid / 16) ** 2
    bw = machine["bandwidth_Bps"]
    rows, parts = [], []
    for side, (_, wall, cpu, seconds, cpu_parts, net_rows) in zip(sides, results):
        gemm = machine["gemm_flops"][side.gemm_dtype]
        # transformer: compute vs reading every weight once per pass
        t_flops = transformer_flops(cfg, known, rows_cfg, read if side.last_block_rows else None)
        t_bytes = side.transformer_numel * side.transformer_bytes_per * len(known)
        t_floor = max(t_flops / gemm, t_bytes / bw["large"])
        # head: every network call reads the weights on x's path; the chain-constant ones (condition, timestep,
        # adaLN modulations) once per chain of head_steps calls; FLOPs from the rows actually sent
        h_bytes_one = side.head_numel * side.head_bytes_per
        chains = len(net_rows) / max(int(settings["head_steps"]), 1)
        h_bytes = side.head_bytes_per * ((side.head_numel - side.head_const_numel) * len(net_rows)
                                         + side.head_const_numel * chains)
        h_bw = bw.get(f"head_{side.head_bytes_per}", bw["large"])
        h_flops = 2.0 * side.head_numel * sum(net_rows)
        h_gemm = machine["gemm_flops"][side.head_gemm_dtype or side.gemm_dtype]
        h_floor = max(h_bytes / h_bw, h_flops / h_gemm)
        d_floor = dec_flops / machine["conv_flops"]
        floors = {"transformer": (t_floor, "compute" if t_flops / gemm >= t_bytes / bw["large"] else "bandwidth"),
                  "head": (h_floor, "bandwidth" if h_bytes / h_bw >= h_flops / h_gemm else "compute"),
                  "decode": (d_floor, "compute")}
        other = max(wall - sum(seconds.values()), 0.0)
        floor = sum(f for f, _ in floors.values())
        row = {"impl": side.impl, "dtype": side.dtype, "prepacked": side.prepacked, "batch": batch,
               "s_per_image": wall / batch, "cpu_s_per_image": cpu / batch, "wall_s": wall, "cpu_s": cpu,
               "images_per_s": batch / wall, **{f"{p}_s": seconds[p] for p in PARTS}, "other_s": other,
               **{f"{p}_cpu_s": cpu_parts[p] for p in PARTS}, "other_cpu_s": max(cpu - sum(cpu_parts.values()), 0.0),
               **{f"{p}_floor_s": floors[p][0] for p in PARTS}, "floor_s": floor, "x_floor": cpu / floor,
               "fraction_of_floor": floor / cpu,  # as every bench reports it (varkit.bench.floor): 1 / x_floor
               "head_calls": len(net_rows), "head_rows_min": min(net_rows, default=0),
               "head_rows_max": max(net_rows, default=0), "head_rows_mean": sum(net_rows) / max(len(net_rows), 1),
               "head_weight_bytes": h_bytes_one, "head_flops": h_flops, "transformer_flops": t_flops,
               "transformer_weight_bytes": side.transformer_numel * side.transformer_bytes_per,
               "decode_flops": dec_flops, "image_px": side_px}
        rows.append(row)
        for p in PARTS:
            parts.append({"impl": side.impl, "dtype": side.dtype, "prepacked": side.prepacked, "batch": batch,
                          "part": p, "seconds": seconds[p], "cpu_s": cpu_parts[p], "floor_s": floors[p][0],
                          "x_floor": cpu_parts[p] / floors[p][0] if floors[p][0] else None,
                          "bound": floors[p][1], "share": cpu_parts[p] / cpu if cpu else None})
    off = next((r for r in rows if r["impl"] == "official" and r["dtype"] == "float32"), None)
    if off is not None:
        for r in rows:
            r["vs_official"] = off["wall_s"] / r["wall_s"]
            r["cpu_vs_official"] = off["cpu_s"] / r["cpu_s"]
    return rows, parts


def least_cpu_round_robin(sides: list, batch: int, repeats: int, describe: Callable[[Any], str],
                          keep: Callable[[Any, Any, float, float], Any], verbose: bool = True,
                          loads: list | None = None) -> list:
    """For each side, ``keep(side, output, wall s, CPU s)`` of its run with the least CPU time of ``repeats`` runs,
    the sides called round-robin in alternating order (A B C, C B A, ...) so drifting load hits them alike.
    ``describe(side)`` names a side in the progress lines; ``loads`` collects the load average before each run."""
    best: list[Any] = [None] * len(sides)
    best_cpu = [float("inf")] * len(sides)
    for rep in range(repeats):
        order = list(range(len(sides)))
        for i in (order if rep % 2 == 0 else order[::-1]):
            side = sides[i]
            if loads is not None:
                loads.append(_load())
            t0, c0 = time.perf_counter(), time.process_time()
            out = side.run(batch)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if verbose:
                print(f"{describe(side)} batch {batch} run {rep + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU, split "
                      + ", ".join(f"{k} {v:.1f}" for k, v in side.split.seconds.items()), flush=True)
            if cpu < best_cpu[i]:
                best[i], best_cpu[i] = keep(side, out, wall, cpu), cpu
    return best


def run_round_robin(sides: list[Side], batch: int, repeats: int, verbose: bool = True, loads: list | None = None):
    """(output shape, wall s, CPU s, split wall s, split CPU s, net rows) of each side's least-CPU run
    (:func:`least_cpu_round_robin`)."""
    return least_cpu_round_robin(
        sides, batch, repeats, lambda s: f"[mar bench] {s.impl} {s.dtype}{' prepacked' if s.prepacked else ''}",
        lambda s, out, wall, cpu: (tuple(out.shape), wall, cpu, dict(s.split.seconds), dict(s.split.cpu),
                                   list(s.split.net_rows)), verbose, loads)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


#: ``official(generator, mar_state_dict, seed, settings)`` -> ``(tokenizer, sides)``: how a side-by-side script adds
#: the official loop's :class:`Side` objects on the same weights (``mar_state_dict``: the generator's, in MAR's names),
#: with the KL tokenizer holding the VAE weights both sides decode with; it records what it runs in ``settings``.
OfficialSides = Callable[[Any, dict, int, dict], tuple[Any, list[Side]]]


def run_bench(config: str = "mar-base", batches: tuple[int, ...] = (1, 8), *, official: OfficialSides | None = None,
              dtypes: tuple[str, ...] = ("float32", "bfloat16"), prepack: str = "on", official_autocast: bool = False,
              num_iter: int = 64, head_steps: int = 100, cfg: float = 4.0, cfg_schedule: str = "linear",
              temperature: float = 1.0, repeats: int | tuple[int, ...] = 1, seed: int = 0, tokenizer: str = "mar-kl16",
              big_copy_bytes: int = 1 << 30, gemm_size: int = 2048, use_floor_cache: bool = True, verbose: bool = True,
              on_batch: Callable[[list[dict], list[dict], dict[str, Any]], None] | None = None,
              ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Run the benchmark; (table rows, part rows, settings + machine measurements). ``official``: see
    :data:`OfficialSides` (the side-by-side script). ``use_floor_cache``: also take the rates of ``varkit bench
    floor``'s per-machine cache (:func:`floor_cache_rates`).

    ``on_batch(rows, parts, settings)`` is called after each batch size with everything so far (long runs
    keep their finished batch sizes)."""
    reps = (repeats,) * len(batches) if isinstance(repeats, int) else tuple(repeats)
    if len(reps) == 1:
        reps = reps * len(batches)
    if any(b < 1 for b in batches) or any(r < 1 for r in reps) or len(reps) != len(batches):
        raise InvalidArgumentError("--batch sizes and --repeats must be >= 1, with one --repeats or one per batch size")
    if not dtypes and not official:
        raise InvalidArgumentError("nothing to run: give --dtype for varkit and/or --official")
    if prepack not in ("off", "on", "both"):
        raise InvalidArgumentError(f"prepack must be off, on or both, got {prepack!r}")
    packs = {"off": [False], "on": [True], "both": [False, True]}[prepack]
    torch_dtypes = [parse_dtype_spec(d) for d in dtypes]
    if official and tokenizer != "mar-kl16":
        raise InvalidArgumentError("with --official both sides decode with MAR's KL-16 VAE: drop --tokenizer")
    t0 = time.perf_counter()
    gen, tok, mar_sd = random_weights(config, seed, None if official else tokenizer)
    settings: dict[str, Any] = {
        "config": config, "batch": list(batches), "num_iter": num_iter, "head_steps": head_steps, "cfg": cfg,
        "cfg_schedule": cfg_schedule, "temperature": temperature, "repeats": repeats, "seed": seed,
        "varkit_dtypes": list(dtypes), "prepack": prepack, "official_autocast": official_autocast,
        "vae": f"{tokenizer} (random weights)", "device": "cpu", "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "torch": torch.__version__, "official": None,
    }
    gen.sampling_layout(num_iter)  # a clear error for a bad num_iter before anything runs
    sides: list[Side] = []
    if official is not None:
        tok, sides = official(gen, mar_sd, seed, settings)
        check_tokens(tok, gen)
    settings["vae_scale"] = tok.config.scaling_factor
    settings["weights_s"] = time.perf_counter() - t0
    for dt, hdt in torch_dtypes:
        for pk in packs:
            sides.append(varkit_side(gen, tok, settings, dt, pk, hdt))
    for side in sides:
        if side.warmup is not None:
            side.warmup()
    head_sizes = {f"head_{s.head_bytes_per}": s.head_numel * s.head_bytes_per for s in sides}
    gemm_dtypes = {getattr(torch, n) for s in sides for n in (s.gemm_dtype, s.head_gemm_dtype) if n}

    measure = rate_measurer(settings, head_sizes, gemm_dtypes, big_copy_bytes,
                            min(256, tok.downsample * gen.config.grid), gemm_size,
                            floor_cache_rates(settings, use_floor_cache, verbose))
    return run_batch_sizes(batches, reps, settings, measure,
                           lambda B, R, loads: run_round_robin(sides, B, R, verbose, loads),
                           lambda results, b: make_rows(sides, results, b, gen, tok, settings["machine"], settings),
                           on_batch)


def run_batch_sizes(batches, reps, settings: dict[str, Any], measure: Callable[[], None],
                    run_batch: Callable[[int, int, list], Any], make_rows_for: Callable[[Any, int], tuple],
                    on_batch: Callable | None = None, t0: float | None = None) -> tuple[list, list, dict]:
    """A side-by-side bench's outer loop: for each batch size ``run_batch(B, repeats, loads)``, re-``measure()`` the
    machine's rates, rebuild every batch size's (rows, part rows) with the best rates so far (``make_rows_for``),
    record the load averages (and ``bench_s`` since ``t0``) and hand the partial results to ``on_batch``."""
    measure()
    settings["loadavg_start"] = _load()
    settings["repeats"] = list(reps)
    rows: list[dict] = []
    parts: list[dict] = []
    loads: list = []
    done = []
    for B, R in zip(batches, reps):
        done.append((B, run_batch(B, R, loads)))
        measure()
        rows, parts = [], []
        for b, results in done:
            r, p = make_rows_for(results, b)
            rows += r
            parts += p
        settings["loadavg_runs"] = [x for x in loads if x is not None]
        settings["loadavg_end"] = _load()
        if t0 is not None:
            settings["bench_s"] = time.perf_counter() - t0
        if on_batch is not None:
            on_batch(rows, parts, settings)
    return rows, parts, settings


def cmd_bench_mar(args, official: OfficialSides | None = None) -> None:
    """Run, print the tables, write the JSON. ``--official``: the side-by-side script does it, with ``official``."""
    if args.official and official is None:
        from .scripts import load_script

        load_script("mar").cmd_side_by_side(args)
        return
    torch.set_num_threads(args.threads)

    rows, parts, settings = run_bench(
        args.config, tuple(args.batch), official=official, dtypes=tuple(args.dtype), prepack=args.prepack,
        official_autocast=args.official_autocast, num_iter=args.num_iter, head_steps=args.head_steps, cfg=args.cfg,
        cfg_schedule=args.cfg_schedule, temperature=args.temperature, repeats=tuple(args.repeats), seed=args.seed,
        tokenizer=args.tokenizer, big_copy_bytes=args.copy_mib << 20, gemm_size=args.gemm_size,
        on_batch=batch_saver(args.name, args.out_dir))
    print_report(rows, parts, settings, COLUMNS, PART_COLUMNS)


def add_mar_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench mar`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser(
        "mar", help="MAR: varkit's sampling + VAE decode on random weights, with floors (CPU); --official: vs MAR's loop",
        description=__doc__.split("\n\n")[0])
    add_mar_arguments(p)
    p.set_defaults(func=cmd_bench_mar)
    return p


def add_mar_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``varkit bench mar`` (and of ``bench/side_by_side/mar.py``)."""
    p.add_argument("--official", default=None,
                   help="a checkout of github.com/LTH14/mar (its python files) to time its loop side by side (the "
                        "script bench/side_by_side/mar.py of varkit's repository)")
    p.add_argument("--config", default="mar-base", help="MAR config whose random weights every side runs")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"],
                   help="varkit's generator dtypes, one row each (the VAE stays fp32)")
    p.add_argument("--prepack", choices=["off", "on", "both"], default="on",
                   help="varkit's linears (transformer and head) on weights prepacked once for oneDNN (on, as "
                        "load_pipeline(prepack=True)), plain (off), or a row for each")
    p.add_argument("--official-autocast", action="store_true",
                   help="also time MAR's loop under torch.autocast('cpu', bfloat16), as its engine samples on GPUs")
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--head-steps", type=int, default=100, help="diffusion steps per token (MAR's num_sampling_steps)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, nargs="+", default=[1],
                   help="timed runs per side (the one with the least CPU time is reported): one number, or one per "
                        "--batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (every side and every floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="mar-kl16",
                   help="KL tokenizer config of the varkit-only run (with --official: MAR's KL-16 always)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures memory bandwidth")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n x n matmul that measures the GEMM rate")
    add_output_args(p, "mar")
    return p
