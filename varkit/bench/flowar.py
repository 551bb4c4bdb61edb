"""``varkit bench flowar``: varkit's FlowAR side by side with FlowAR's own ``sample_tokens`` + VAE decode.

One process, the same random-init weights on every side: FlowAR-S by default, drawn in FlowAR's key names
(:func:`varkit.checkpoints.synthetic.flowar_state_dict`), loaded into FlowAR's ``FlowAR`` and, converted with
:func:`varkit.checkpoints.flowar.flowar_state_dict_from_official`, into varkit's generator; one random KL-16 VAE
in LDM names, loaded into FlowAR's ``AutoencoderKL`` (MAR's) and, converted, into
:class:`~varkit.tokenizers.kl.KLTokenizer`. The same labels, settings (Euler steps, CFG on FlowAR's per-scale
ramp, guidance interval) and initial noise (each image's draws from varkit's per-image generators, handed to
FlowAR's ``torch.randn``), on the CPU at ``--threads`` threads (1 by default). Rows:

- ``official``: FlowAR's ``sample_tokens`` + ``vae.decode(tokens / 0.2325)`` in fp32 (FlowAR's code calls
  ``.cuda()``, which is made the identity while it runs, and only then); ``--official-autocast`` adds a row under
  ``torch.autocast("cpu", bfloat16)``, as FlowAR's ``engine.py`` samples under autocast on GPUs;
- ``varkit``: the ancestral sampler + ``KLTokenizer.decode``, at each ``--dtype`` (generator and flow head in that
  dtype, the Euler state in fp64 as FlowAR; the VAE stays fp32 as in :class:`~varkit.pipeline.Pipeline`), on
  oneDNN-prepacked linears (``--prepack``); ``--anneal`` adds fp32 rows with annealed head steps (DiSA).

Every run is split into AR (the transformer: encoder + decoder stacks), head (the Euler loops of the flow head),
decode (VAE) and the rest, timed by wrappers around those calls, and each part is set against its floor on this
machine, measured at the same thread count (:mod:`varkit.bench.partwise`): weight bytes over the bandwidth of a
copy of that many bytes, FLOPs over the rate of a large GEMM (AR, head) or of the VAE's dominant 3x3 convolution
(decode). FLOPs are counted from the work each side actually did (the head's network calls and their rows,
recorded while it runs). Sides run round-robin, ``cpu_s`` is the process CPU time of a run, ``x_floor`` CPU seconds
over the floor; of ``--repeats`` runs per side the one with the least CPU time is reported. ``images_max_abs_diff``: the largest
pixel difference of each row's images from the official fp32 row's (same weights, same noise).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .official import cuda_as_identity, import_checkout
from .partwise import PartTimer, batch_saver, floor_cache_rates, instrument, print_report, rate_measurer
from .report import add_output_args

COLUMNS = ["impl", "dtype", "head_steps", "batch", "s_per_image", "cpu_s_per_image", "vs_official", "cpu_vs_official",
           "ar_cpu_s", "head_cpu_s", "decode_cpu_s", "other_cpu_s", "floor_s", "x_floor", "fraction_of_floor",
           "images_max_abs_diff"]
PART_COLUMNS = ["impl", "dtype", "head_steps", "batch", "part", "seconds", "cpu_s", "floor_s", "x_floor", "bound", "share"]
PARTS = ("ar", "head", "decode")
VAE_SCALE = 0.2325  # FlowAR's (MAR's) KL-16 latent scale: sample_tokens' output is divided by it before decoding
OFFICIAL_GRID, OFFICIAL_CHANNELS, OFFICIAL_CLASSES = 16, 16, 1000  # what FlowAR's code hard-codes


# -- timing ------------------------------------------------------------------------------------------------------
class Split(PartTimer):
    """Wall and process-CPU seconds per part of one run; the flow network's calls ``(rows, tokens)`` and the
    condition preparations (varkit computes a scale's condition-only work once, FlowAR at every call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.prepares: list[tuple[int, int]] = []
        super().__init__(PARTS)

    def reset(self) -> None:
        super().reset()
        self.calls.clear()  # in place: the counting wrappers hold these lists
        self.prepares.clear()

    def count_shapes(self, into: list) -> Callable[[Callable], Callable]:
        """A wrapper for :func:`instrument` that records each call's ``(rows, tokens)`` in ``into``."""
        return self.counted(into, lambda x: (int(x.shape[0]), int(x.shape[1])))


# -- work: FLOPs of FlowAR's algorithm ------------------------------------------------------------------------------
def ar_flops(cfg, rows: int) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of the transformer over one whole decode (every scale with the KV cache) for
    ``rows`` sequences (the CFG-doubled batch): qkv, attention over the positions so far, output projection, gated
    MLP, ``decoder_embed``, ``z_proj``; the per-image adaLN of every block once (varkit; FlowAR's per-step recompute
    of one row is noise)."""
    from ..models.flow import gated_hidden

    C, D, H = cfg.dim, cfg.token_dim, gated_hidden(cfg.dim, cfg.mlp_ratio)
    depth = cfg.encoder_depth + cfg.decoder_depth
    gemm = attn = 0.0
    seen = 0
    for k, p in enumerate(cfg.patch_nums):
        n = p * p
        seen += n
        gemm += depth * (2 * n * C * 3 * C + 2 * n * C * C + 2 * n * 3 * C * H) + 2 * n * C * C
        gemm += 2 * n * D * C if k > 0 else 0
        attn += depth * 4 * n * seen * C
    gemm += depth * 2 * C * 6 * C  # adaLN modulations from the class embedding, once per image
    return rows * gemm, rows * attn


def head_call_flops(net, rows: int, n: int) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of one flow-network call on ``rows`` × ``n`` tokens, without the condition-only work
    (:func:`head_prepare_flops`): input projection, timestep MLP, each block's adaLN, self-attention and MLP (and
    for cross blocks the query and output projections and the cross-attention), the final layer."""
    from ..models.flow import FlowCrossBlock, gated_hidden

    W, D, H = net.width, net.token_dim, gated_hidden(net.width)
    freq = net.time_embed.mlp[0].in_features
    gemm = 2 * n * D * W  # input projection
    per_row = 2 * (freq * W + W * W)  # timestep MLP: once per row
    attn = 0.0
    for block in net.res_blocks:
        core = 2 * n * W * 3 * W + 2 * n * W * W + 2 * n * 3 * W * H
        if isinstance(block, FlowCrossBlock):
            per_row += 2 * W * 3 * W  # self-attention's adaLN from t alone
            gemm += core + 2 * n * W * 3 * W + 2 * n * W * W * 2  # MLP's adaLN; cross q and proj
            attn += 8 * n * n * W
        else:
            gemm += core + 2 * n * W * 6 * W
            attn += 4 * n * n * W
    gemm += 2 * n * W * 2 * W + 2 * n * W * D  # final layer: adaLN (shift, scale) and the velocity projection
    return rows * (gemm + per_row), rows * attn


def head_prepare_flops(net, rows: int, n: int) -> float:
    """GEMM FLOPs of the condition-only work on ``rows`` × ``n`` conditions: ``cond_embed`` and each cross block's
    key/value projection."""
    from ..models.flow import FlowCrossBlock

    W, Cz = net.width, net.cond_dim
    flops = 2 * n * Cz * W
    flops += sum(2 * n * Cz * 2 * W for b in net.res_blocks if isinstance(b, FlowCrossBlock))
    return rows * flops


def head_numel(net) -> int:
    """Weights of the flow network's linear layers (what each call reads)."""
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))


def ar_numel(gen) -> int:
    """Parameters an AR step reads: everything but the head and the embeddings' unused rows."""
    return sum(p.numel() for n, p in gen.named_parameters() if not n.startswith("head.") and n != "class_emb.weight")


# -- the official side -----------------------------------------------------------------------------------------------
@dataclass
class Official:
    """FlowAR's modules imported from a checkout."""

    flowar: Any
    sampler: Any
    vae: Any
    root: Path


def load_official(root: str | os.PathLike) -> Official:
    """FlowAR's ``models.flowar``, ``models.sampler`` and ``models.vae`` from the checkout ``root``.

    FlowAR's package is called ``models`` (as MAR's): any ``models`` already imported is set aside for the import and
    put back afterwards, so the modules returned are this checkout's."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")}
    try:
        flowar, sampler, vae = import_checkout(
            root, "models/flowar.py", ["models.flowar", "models.sampler", "models.vae"], "a wangqiang9/FlowAR checkout",
            "clone https://github.com/wangqiang9/FlowAR and pass its folder")
    finally:
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return Official(flowar, sampler, vae, Path(root).resolve())


def check_official_config(cfg) -> None:
    """FlowAR's code hard-codes a 16x16 finest scale, 16 latent channels and 1000 classes."""
    if cfg.patch_nums[-1] != OFFICIAL_GRID or cfg.token_dim != OFFICIAL_CHANNELS or cfg.num_classes != OFFICIAL_CLASSES:
        raise InvalidArgumentError(
            "FlowAR's code hard-codes a 16x16 finest scale, 16 latent channels and 1000 classes: with --official use a "
            f"config with those (e.g. flowar-small), got scales {tuple(cfg.patch_nums)}, {cfg.token_dim} channels, "
            f"{cfg.num_classes} classes")


def official_flowar(off: Official, cfg, sd: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """FlowAR's ``FlowAR`` for the varkit config ``cfg`` (weights ``sd`` loaded strictly when given), eval mode."""
    check_official_config(cfg)
    model = off.flowar.FlowAR(
        img_size=cfg.patch_nums[-1] * 16, vae_stride=16, patch_size=1, encoder_embed_dim=cfg.dim,
        encoder_depth=cfg.encoder_depth, encoder_num_heads=cfg.n_head, decoder_embed_dim=cfg.dim,
        decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.n_head, mlp_ratio=cfg.mlp_ratio,
        vae_embed_dim=cfg.token_dim, class_num=cfg.num_classes, buffer_size=0, diffloss_d=cfg.head_depth,
        diffloss_w=cfg.head_width, scale=tuple(cfg.patch_nums), cross=cfg.head_cross)
    if sd is not None:
        model.load_state_dict(sd, strict=True)
    return model.eval()


# -- weights ---------------------------------------------------------------------------------------------------------
def random_weights(config: str, seed: int, official: Official | None = None, tokenizer: str = "mar-kl16",
                   overrides: dict[str, Any] | None = None):
    """(varkit generator, KL tokenizer, official FlowAR or None, official VAE or None) on shared random weights.

    The generator's weights are drawn in FlowAR's format (FlowAR's own key list when ``official`` is given, else
    varkit's converted back) and converted; the VAE's in LDM's format from FlowAR's ``AutoencoderKL`` (KL-16) when
    ``official`` is given, else the named tokenizer config's own random init."""
    from ..checkpoints.common import module_from_state_dict
    from ..checkpoints.flowar import (flowar_state_dict_from_official, flowar_state_dict_to_official,
                                      generator_from_flowar_state_dict)
    from ..checkpoints.synthetic import flowar_state_dict, items_of, mar_vae_state_dict
    from ..modeling import params_on_meta
    from ..models import create_model
    from ..models.flowar import FlowARGenerator
    from ..tokenizers import create_tokenizer
    from ..tokenizers.kl import KLTokenizer

    with params_on_meta():
        meta = create_model(config, **(overrides or {}))
    if not isinstance(meta, FlowARGenerator):
        raise InvalidArgumentError(f"--config must name a FlowAR config (e.g. flowar-small), got {config!r}")
    off_gen = off_vae = None
    if official is not None:
        with params_on_meta():
            off_meta = official_flowar(official, meta.config)
        sd = flowar_state_dict(items_of(off_meta.state_dict()), seed)
        off_gen = official_flowar(official, meta.config, sd)
    else:
        sd = flowar_state_dict(items_of(flowar_state_dict_to_official(meta.state_dict())), seed)
    gen = generator_from_flowar_state_dict(flowar_state_dict_from_official(sd, "random FlowAR weights"), meta.config)
    if official is not None:
        from ..checkpoints.mar_vae import MAR_KL16_CONFIG, kl_state_dict_from_ldm

        off_vae = official.vae.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()
        vae_sd = mar_vae_state_dict(items_of(off_vae.state_dict()), seed + 100)
        off_vae.load_state_dict(vae_sd, strict=True)
        tok = module_from_state_dict(KLTokenizer, MAR_KL16_CONFIG, kl_state_dict_from_ldm(vae_sd), "random KL-16")
    else:
        torch.manual_seed(seed + 100)
        tok = create_tokenizer(tokenizer).eval()
        if not isinstance(tok, KLTokenizer):
            raise InvalidArgumentError(f"--tokenizer must name a KL tokenizer config (e.g. mar-kl16), got {tokenizer!r}")
    if tuple(tok.token_shape) != tuple(gen.head.token_shape):
        raise InvalidArgumentError(
            f"the VAE's latents {tok.token_shape} do not match the generator's tokens {gen.head.token_shape}: pick a "
            "--tokenizer with as many channels as the config's token_dim")
    return gen.eval(), tok, off_gen, off_vae


def draw_noise(gen, seed: int, batch: int) -> list[torch.Tensor]:
    """Each scale's initial noise (B, n_k, D), exactly as varkit's ancestral sampler draws it for ``seed``."""
    from ..samplers.random import Randomness, image_generators

    rng = Randomness(image_generators(seed, batch))
    return [gen.head.draw_noise(rng, n, None) for n in gen.layout.step_sizes]


# -- sides: one call = one whole batch (sampling + decode) ----------------------------------------------------------
@dataclass
class Side:
    """One implementation at one setting: its run function, its split, what its floors need."""

    impl: str
    dtype: str
    head_steps: str
    run: Callable[[int], torch.Tensor]
    split: Split
    head_numel: int
    ar_numel: int
    bytes_per: int
    gemm_dtype: str
    prepare_per_call: bool  # FlowAR recomputes cond_embed (and cross K/V) at every network call
    prepacked: bool = False
    warmup: Callable[[], Any] | None = None


def bench_labels(batch: int, num_classes: int) -> torch.Tensor:
    from .mar import bench_labels as labels

    return labels(batch, num_classes)


def official_side(off: Official, model: nn.Module, vae: nn.Module, gen, settings: dict[str, Any],
                  autocast: bool) -> Side:
    """FlowAR's loop: ``sample_tokens`` then ``vae.decode(tokens / 0.2325)`` under ``no_grad`` (as its engine), its
    ``torch.randn`` replaced by varkit's draws for the same seed (both CFG halves get the conditional draw: FlowAR
    never lets the unconditional half's reach the output)."""
    split = Split()
    instrument(model, "forward_mae_encoder", split.timed("ar"))
    instrument(model, "forward_mae_decoder", split.timed("ar"))
    instrument(model.flownet, "forward", split.count_shapes(split.calls))
    euler = split.timed("head")(off.sampler.euler_sampler)

    def run(batch: int) -> torch.Tensor:
        split.reset()
        noise = iter(draw_noise(gen, settings["seed"], batch))
        labels = bench_labels(batch, model.num_classes)
        real_randn, real_euler = torch.randn, off.sampler.euler_sampler

        def randn(shape, *a, **kw):
            x = next(noise)
            x = torch.cat([x, x]) if shape[0] == 2 * x.shape[0] else x
            if tuple(x.shape) != tuple(shape):
                raise RuntimeError(f"FlowAR drew noise {tuple(shape)}, the bench has {tuple(x.shape)}")
            return x.clone()

        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        torch.randn, off.sampler.euler_sampler = randn, euler
        try:
            with torch.no_grad(), cuda_as_identity():
                with amp:
                    tokens = model.sample_tokens(num_steps=settings["head_steps"], guidance=settings["guidance_interval"],
                                                 cfg=settings["cfg"], labels=labels)
                torch.randn = real_randn
                with split.part("decode"):
                    return vae.decode(tokens / VAE_SCALE)
        finally:
            torch.randn, off.sampler.euler_sampler = real_randn, real_euler

    dt = "bfloat16" if autocast else "float32"
    return Side("official", "float32+autocast-bf16" if autocast else "float32", str(settings["head_steps"]), run, split,
                head_numel(model.flownet), ar_numel(gen), 2 if autocast else 4, dt, True)


def parse_dtype(name: str) -> torch.dtype:
    from ..device import resolve_dtype

    try:
        dt = resolve_dtype(name)
    except InvalidArgumentError:
        dt = None
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"--dtype takes float32, bfloat16 or float16, got {name!r}")
    return dt


def varkit_side(gen, tok, settings: dict[str, Any], dtype: torch.dtype, prepack: bool, head_steps) -> Side:
    """varkit's ancestral sampler on ``gen`` in ``dtype`` with ``head_steps`` (an int or "A:B"), then ``tok.decode``
    in fp32 on the decoder's CPU kernels (as a pipeline's on a CPU)."""
    from ..nn.layers import prepack_linears
    from ..nn.ldm import use_fast_kernels
    from ..samplers import SamplingParams
    from .mar import ancestral_run

    gen = copy.deepcopy(gen).to(dtype).eval()
    if prepack:
        prepack_linears(gen)
    tok = copy.deepcopy(tok)
    use_fast_kernels(tok)  # the decoder's CPU kernels, as load_pipeline's on a CPU (Winograd convs, fused norms)
    split = Split()
    instrument(gen, "_run", split.timed("ar"))
    instrument(gen.head, "sample", split.timed("head"))
    instrument(gen.head.net, "forward", split.count_shapes(split.calls))
    instrument(gen.head.net, "prepare", split.count_shapes(split.prepares))
    params = SamplingParams(cfg=settings["cfg"], cfg_schedule="linear", head_steps=head_steps,
                            guidance_interval=settings["guidance_interval"])
    small = SamplingParams(cfg=settings["cfg"], cfg_schedule="linear", head_steps=1,  # warmup: 1 head step
                           guidance_interval=settings["guidance_interval"])
    run, warmup = ancestral_run(gen, tok, split, params, small, settings["seed"])

    name = str(dtype).replace("torch.", "")
    size = torch.tensor([], dtype=dtype).element_size()
    hs = head_steps if isinstance(head_steps, str) else str(head_steps)
    return Side("varkit", name, hs, run, split, head_numel(gen.head.net), ar_numel(gen), size, name, False, prepack,
                warmup)


# -- one batch size: round-robin runs, rows with floors ------------------------------------------------------------------
@dataclass
class Result:
    """The run with the least CPU time of one side at one batch size."""

    images: torch.Tensor
    wall: float
    cpu: float
    seconds: dict[str, float]
    cpu_parts: dict[str, float]
    calls: list[tuple[int, int]]
    prepares: list[tuple[int, int]]


def run_round_robin(sides: list[Side], batch: int, repeats: int, verbose: bool = True,
                    loads: list | None = None) -> list[Result]:
    """Each side's least-CPU run of ``repeats`` (:func:`varkit.bench.mar.least_cpu_round_robin`)."""
    from .mar import least_cpu_round_robin

    return least_cpu_round_robin(
        sides, batch, repeats, lambda s: f"[flowar bench] {s.impl} {s.dtype} head_steps {s.head_steps}",
        lambda s, images, wall, cpu: Result(images.detach().float(), wall, cpu, dict(s.split.seconds),
                                            dict(s.split.cpu), list(s.split.calls), list(s.split.prepares)),
        verbose, loads)


def make_rows(sides: list[Side], results: list[Result], batch: int, gen, tok, machine: dict[str, Any],
              settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The table rows (one per side) and the part rows (one per side and part) of one batch size."""
    from .mar import decoder_flops

    cfg, net = gen.config, gen.head.net
    rows_cfg = 2 * batch if settings["cfg"] != 1.0 else batch
    a_gemm, a_attn = ar_flops(cfg, rows_cfg)
    dec_flops = decoder_flops(tok, batch) * (cfg.patch_nums[-1] / 16) ** 2
    bw = machine["bandwidth_Bps"]
    ref = next((r for s, r in zip(sides, results) if s.impl == "official" and s.dtype == "float32"), None)
    rows, parts = [], []
    for side, res in zip(sides, results):
        gemm = machine["gemm_flops"][side.gemm_dtype]
        a_bytes = side.ar_numel * side.bytes_per * len(cfg.patch_nums)
        a_flops = a_gemm + a_attn
        h_calls = [head_call_flops(net, r, n) for r, n in res.calls]
        prepares = res.calls if side.prepare_per_call else res.prepares
        h_flops = sum(g + a for g, a in h_calls) + sum(head_prepare_flops(net, r, n) for r, n in prepares)
        h_bytes = side.head_numel * side.bytes_per * len(res.calls)
        h_bw = bw.get(f"head_{side.bytes_per}", bw["large"])
        floors = {"ar": (max(a_flops / gemm, a_bytes / bw["large"]), "compute" if a_flops / gemm >= a_bytes / bw["large"] else "bandwidth"),
                  "head": (max(h_flops / gemm, h_bytes / h_bw), "compute" if h_flops / gemm >= h_bytes / h_bw else "bandwidth"),
                  "decode": (dec_flops / machine["conv_flops"], "compute")}
        floor = sum(f for f, _ in floors.values())
        row = {"impl": side.impl, "dtype": side.dtype, "head_steps": side.head_steps, "prepacked": side.prepacked,
               "batch": batch, "s_per_image": res.wall / batch, "cpu_s_per_image": res.cpu / batch, "wall_s": res.wall,
               "cpu_s": res.cpu, "images_per_s": batch / res.wall, **{f"{p}_s": res.seconds[p] for p in PARTS},
               "other_s": max(res.wall - sum(res.seconds.values()), 0.0),
               **{f"{p}_cpu_s": res.cpu_parts[p] for p in PARTS},
               "other_cpu_s": max(res.cpu - sum(res.cpu_parts.values()), 0.0),
               **{f"{p}_floor_s": floors[p][0] for p in PARTS}, "floor_s": floor, "x_floor": res.cpu / floor,
               "fraction_of_floor": floor / res.cpu,  # as every bench reports it (varkit.bench.floor): 1 / x_floor
               "head_calls": len(res.calls), "head_rows": sum(r * n for r, n in res.calls),
               "head_prepares": len(prepares), "head_flops": h_flops, "head_weight_bytes_per_call": side.head_numel * side.bytes_per,
               "ar_flops": a_flops, "ar_weight_bytes": side.ar_numel * side.bytes_per, "decode_flops": dec_flops,
               "image_px": cfg.patch_nums[-1] * tok.downsample,
               "images_max_abs": res.images.abs().max().item(),
               "images_max_abs_diff": (res.images - ref.images).abs().max().item() if ref is not None else None}
        rows.append(row)
        for p in PARTS:
            parts.append({"impl": side.impl, "dtype": side.dtype, "head_steps": side.head_steps, "batch": batch,
                          "part": p, "seconds": res.seconds[p], "cpu_s": res.cpu_parts[p], "floor_s": floors[p][0],
                          "x_floor": res.cpu_parts[p] / floors[p][0] if floors[p][0] else None, "bound": floors[p][1],
                          "share": res.cpu_parts[p] / res.cpu if res.cpu else None})
    if ref is not None:
        for r in rows:
            r["vs_official"] = ref.wall / r["wall_s"]
            r["cpu_vs_official"] = ref.cpu / r["cpu_s"]
    return rows, parts


def run_bench(config: str = "flowar-small", batches: tuple[int, ...] = (1, 8), *, official: str | None = None,
              dtypes: tuple[str, ...] = ("float32", "bfloat16"), prepack: bool = True, official_autocast: bool = False,
              head_steps: int = 25, anneal: tuple[str, ...] = ("25:5",), cfg: float = 4.3, guidance_interval: float = 0.9,
              repeats: int | tuple[int, ...] = 1, seed: int = 0, tokenizer: str = "mar-kl16",
              overrides: dict[str, Any] | None = None, big_copy_bytes: int = 256 << 20, gemm_size: int = 2048,
              use_floor_cache: bool = True, verbose: bool = True, on_batch: Callable[[list[dict], list[dict], dict[str, Any]], None] | None = None,
              ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Run the side-by-side benchmark; (table rows, part rows, settings + machine measurements).

    ``official``: a FlowAR checkout (None: varkit's rows only). ``anneal``: extra varkit fp32 rows at these head-step
    schedules. ``use_floor_cache``: also take the rates of ``varkit bench floor``'s per-machine cache (a quick
    measurement first if none). ``on_batch(rows, parts, settings)`` is called after each batch size with everything
    so far."""
    from ..samplers import SamplingParams
    from .mar import cpu_model

    reps = (repeats,) * len(batches) if isinstance(repeats, int) else tuple(repeats)
    if len(reps) == 1:
        reps = reps * len(batches)
    if not batches or any(b < 1 for b in batches) or any(r < 1 for r in reps) or len(reps) != len(batches):
        raise InvalidArgumentError("--batch sizes and --repeats must be >= 1, with one --repeats or one per batch size")
    torch_dtypes = [parse_dtype(d) for d in dtypes]
    for spec in (head_steps, *anneal):
        SamplingParams(head_steps=spec, guidance_interval=guidance_interval, cfg=cfg)  # one clear line for bad input
    if official and tokenizer != "mar-kl16":
        raise InvalidArgumentError("with --official both sides decode with MAR's KL-16 VAE: drop --tokenizer")
    off = load_official(official) if official else None
    if off is None and verbose:
        print("[flowar bench] official side skipped: no --official checkout of wangqiang9/FlowAR given", flush=True)
    t0 = time.perf_counter()
    gen, tok, off_gen, off_vae = random_weights(config, seed, off, tokenizer, overrides)
    settings: dict[str, Any] = {
        "config": config, "overrides": overrides or {}, "batch": list(batches), "head_steps": head_steps,
        "anneal": list(anneal), "cfg": cfg, "cfg_schedule": "linear (FlowAR's per-scale ramp)",
        "guidance_interval": guidance_interval, "seed": seed, "varkit_dtypes": list(dtypes), "prepack": prepack,
        "official_autocast": official_autocast,
        "vae": "MAR KL-16 (random weights)" if off_vae is not None else f"{tokenizer} (random weights)",
        "vae_scale": VAE_SCALE, "device": "cpu", "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_model": cpu_model(), "torch": torch.__version__,
        "weights_s": time.perf_counter() - t0, "official": str(off.root) if off else None,
        "floors_from": "the best of this run's rates timed in process CPU time (copy bandwidth, fp32/bf16 GEMM, the "
                       "VAE's 3x3 conv) and varkit bench floor's cached measurement (bandwidth, peak GEMM)",
    }
    if off is not None:
        try:
            commit = subprocess.run(["git", "-C", str(off.root), "rev-parse", "HEAD"], check=False, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except OSError:
            commit = ""
        settings["official_commit"] = commit or None
    sides: list[Side] = []
    if off_gen is not None:
        sides.append(official_side(off, off_gen, off_vae, gen, settings, False))
        if official_autocast:
            sides.append(official_side(off, copy.deepcopy(off_gen), copy.deepcopy(off_vae), gen, settings, True))
    for dt in torch_dtypes:
        sides.append(varkit_side(gen, tok, settings, dt, prepack, head_steps))
    for spec in anneal:
        sides.append(varkit_side(gen, tok, settings, torch.float32, prepack, spec))
    for side in sides:
        if side.warmup is not None:
            side.warmup()
    head_sizes = {f"head_{s.bytes_per}": s.head_numel * s.bytes_per for s in sides}
    gemm_dtypes = {getattr(torch, s.gemm_dtype) for s in sides}

    from .mar import run_batch_sizes

    measure = rate_measurer(settings, head_sizes, gemm_dtypes, big_copy_bytes,
                            min(256, tok.downsample * gen.config.patch_nums[-1]), gemm_size,
                            floor_cache_rates(settings, use_floor_cache, verbose))
    return run_batch_sizes(batches, reps, settings, measure,
                           lambda B, R, loads: run_round_robin(sides, B, R, verbose, loads),
                           lambda results, b: make_rows(sides, results, b, gen, tok, settings["machine"], settings),
                           on_batch, t0)


def cmd_bench_flowar(args) -> None:
    torch.set_num_threads(args.threads)

    rows, parts, settings = run_bench(
        args.config, tuple(args.batch), official=args.official, dtypes=tuple(args.dtype), prepack=args.prepack == "on",
        official_autocast=args.official_autocast, head_steps=args.head_steps, anneal=tuple(args.anneal), cfg=args.cfg,
        guidance_interval=args.guidance_interval, repeats=tuple(args.repeats), seed=args.seed, tokenizer=args.tokenizer,
        big_copy_bytes=args.copy_mib << 20, gemm_size=args.gemm_size,
        on_batch=batch_saver(args.name, args.out_dir))
    print_report(rows, parts, settings, COLUMNS, PART_COLUMNS)


def _head_steps_arg(text: str):
    return int(text) if text.strip().isdigit() else text


def add_flowar_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench flowar`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser(
        "flowar", help="FlowAR: varkit vs FlowAR's own sample_tokens + VAE decode on the same random weights (CPU)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--official", default=None,
                   help="a checkout of github.com/wangqiang9/FlowAR (its python files) to time its loop; without it "
                        "only varkit's rows run")
    p.add_argument("--config", default="flowar-small", help="FlowAR config whose random weights every side runs")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"],
                   help="varkit's generator + flow head dtypes, one row each (the VAE stays fp32)")
    p.add_argument("--prepack", choices=["off", "on"], default="on",
                   help="varkit's linears on weights prepacked once for oneDNN (as load_pipeline(prepack=True))")
    p.add_argument("--official-autocast", action="store_true",
                   help="also time FlowAR's loop under torch.autocast('cpu', bfloat16), as its engine samples on GPUs")
    p.add_argument("--head-steps", type=_head_steps_arg, default=25, help="Euler steps per scale (25: FlowAR's grid)")
    p.add_argument("--anneal", nargs="*", default=["25:5"],
                   help="extra varkit fp32 rows at these annealed head steps (DiSA, 'START:END'); none: no rows")
    p.add_argument("--cfg", type=float, default=4.3)
    p.add_argument("--guidance-interval", type=float, default=0.9)
    p.add_argument("--repeats", type=int, nargs="+", default=[1],
                   help="timed runs per side (the least CPU time is reported): one number, or one per --batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (every side and every floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="mar-kl16",
                   help="KL tokenizer config of a varkit-only run (with --official: MAR's KL-16 always)")
    p.add_argument("--copy-mib", type=int, default=256, help="size of the copy that measures memory bandwidth")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n x n matmul that measures the GEMM rate")
    add_output_args(p, "flowar")
    p.set_defaults(func=cmd_bench_flowar)
    return p
