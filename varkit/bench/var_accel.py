"""``varkit bench var-accel``: collaborative decoding (CoDe) and KV budgets (ScaleKV, HACK) against the plain
next-scale path, on the bundled digits-var and on a random-weight VAR-d16.

Methods, every one sampling the same labels with the same per-image seeds as the plain path:

- ``plain``: ancestral sampling, the reference;
- ``code-kK``: the model drafts the first K scales, the refiner the rest (``sampler="collaborative"``). CoDe's
  K = 6, 8, 9 of VAR's 10 scales; digits-var has 6 scales (1,2,3,4,6,8), so K = 3, 4, 5 there: the same
  order, the refiner making the last 3, 2, 1 scales (VAR: 4, 2, 1), and a drafted share of the tokens close to
  VAR's (11/23/51 % vs 13/38/62 %). Refiners: the bundled ``digits-var-refiner-d1`` (a quarter of digits-var's
  depth) and ``digits-var-refiner`` (half), both distilled from it; for VAR-d16 a random VAR of depth 8 and
  width 512 over the same VQVAE; ``--large-drafter var-d30``: CoDe's own pair, a random d30 drafting over the
  random d16 at batch 1 in bf16 (speed and bytes only);
- ``scalekv-B`` / ``hack-B``: ancestral sampling on a KV cache within budget B (``cache_policy``);
- ``oracle-B`` (digits, ``--oracle-budgets``): ScaleKV's budgets per layer and scale, but each (layer, head) keeps
  the keys that the plain run's *later* queries attend to most (summed attention, read from a plain pass over the
  same batch): no policy that decides from what it has seen can know this, so it is the reference for what key
  selection can reach at that budget (its timings are not a method's and are left out);
- ``plain-bf16`` (digits): the plain path with the generator in bf16, untimed: the drift rounding alone causes.

Columns: ``s_per_image`` (wall) and ``cpu_s_per_image`` (process CPU seconds, steadier on a shared machine) of
the sampling calls (VQVAE decode excluded), best of ``--repeats`` rounds, methods interleaved round by round;
``speedup_cpu`` = plain's CPU time / this; ``cache_bytes`` the peak KV bytes held (plain: its preallocated
cache; CoDe: the larger of the two models' caches, the drafter's being freed first; budgets: the most held at
any moment), ``cache_ratio`` = / plain's; ``transient_ratio`` (budgets) the most held while a layer attends
(its kept keys joined with the scale's new ones) / plain's cache; ``psnr_db`` the mean per-image PSNR of the
decoded 8-bit images against the plain path's (identical images count as 100 dB); ``tokens_same`` the share
of tokens equal to the plain path's; ``accuracy`` the digits classifier's and ``accuracy_drop`` in points
(digits only). Policies calibrate once per model before timing (``calibration_cpu_s``).

Targets (issue #19, digits-var): CoDe >= 1.5x with at most 2 points of accuracy lost; ScaleKV at 10 % with at
most 15 % of the plain cache bytes and PSNR >= 30 dB (``met``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..samplers import get_sampler
from ..samplers.random import image_generators
from .floor import get_floor, run_floor, sampler_models
from .report import add_output_args, machine, print_table

COLUMNS = ["model", "method", "images", "s_per_image", "cpu_s_per_image", "speedup_cpu", "fraction_of_floor",
           "drafter_passes", "refiner_passes", "cache_bytes", "cache_ratio", "transient_ratio", "psnr_db", "tokens_same",
           "accuracy", "accuracy_drop", "met"]
CODE_SPEEDUP, CODE_ACCURACY_DROP = 1.5, 2.0  # issue #19: >= 1.5x at <= 2 points of digits accuracy
SCALEKV_BYTES, SCALEKV_PSNR = 0.15, 30.0  # issue #19: ScaleKV at 10 %: <= 15 % of the bytes, PSNR >= 30 dB
PSNR_IDENTICAL = 100.0


VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256-px schedule, where CoDe's k are set


def code_scales(patch_nums: list[int] | tuple[int, ...], paper_k: list[int]) -> list[int]:
    """CoDe's k of VAR's 10 scales for another schedule: the k whose drafted share of the tokens is closest to VAR's
    at that k, then made distinct keeping the order (digits-var's 1,2,3,4,6,8: 6, 8, 9 → 3, 4, 5)."""
    def shares(pn):
        cum = np.cumsum([p * p for p in pn])
        return cum / cum[-1]

    if tuple(patch_nums) == VAR_SCALES:
        return sorted(paper_k)
    var, mine = shares(VAR_SCALES), shares(patch_nums)
    out: list[int] = []
    for k in sorted(paper_k, reverse=True):
        best = min(range(1, len(patch_nums)), key=lambda j: abs(mine[j - 1] - var[k - 1]))
        if out and best >= out[-1]:
            best = out[-1] - 1
        if best >= 1:
            out.append(best)
    return sorted(out)


def psnr(a: list, b: list) -> float:
    """Mean per-image PSNR (dB) of two lists of 8-bit PIL images; identical images count as 100 dB."""
    vals = []
    for x, y in zip(a, b):
        d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
        mse = float((d * d).mean())
        vals.append(PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * np.log10(255.0 ** 2 / mse)))
    return float(np.mean(vals))


class Method:
    """One row: a sampler, its options, and what its runs measured."""

    def __init__(self, name: str, sampler: str, **options: Any):
        self.name, self.sampler, self.options = name, sampler, options
        self.wall = self.cpu = float("inf")
        self.tokens = self.stats = None
        self.transient = 0

    def run(self, pipe, cond: torch.Tensor, seed: int, batch: int, params) -> None:
        smp = get_sampler(self.sampler, params, **self.options)
        if hasattr(smp, "bind_tokenizer"):
            smp.bind_tokenizer(pipe.tokenizer)
        gens = image_generators(seed, cond.shape[0])
        tokens, stats, wall, cpu = [], None, 0.0, 0.0
        for i in range(0, cond.shape[0], batch):
            t, c = time.perf_counter(), time.process_time()
            res = smp.sample(pipe.generator, cond[i:i + batch], gens[i:i + batch])
            wall, cpu = wall + time.perf_counter() - t, cpu + time.process_time() - c
            tokens.append(res.tokens)
            stats = res.stats if stats is None else stats.merge(res.stats)
            policy = getattr(smp, "cache_policy", None)
            if policy is not None:
                self.transient = max(self.transient, policy.last_trace.get("transient_bytes", 0))
        self.wall, self.cpu = min(self.wall, wall), min(self.cpu, cpu)
        self.tokens, self.stats = torch.cat(tokens), stats

        def replay() -> None:  # the timed calls again, same draws: the work the row's floor counts
            again = image_generators(seed, cond.shape[0])
            for i in range(0, cond.shape[0], batch):
                smp.sample(pipe.generator, cond[i:i + batch], again[i:i + batch])

        self.replay, self.models = replay, sampler_models(pipe.generator, smp)


def oracle_policy(budget: float):
    """A ScaleKV policy whose cache keeps, per (layer, head), the keys the plain run's later queries attend to most.

    Use: ``policy.future = None`` and sample at budget 1.0 (nothing evicted: the plain path) to fill ``policy.log``
    with, per (step, layer), the attention each key gets from that step's queries, (B, H, T); then
    ``policy.future = future_attention(policy.log, ...)`` and sample the same batch again under ``budget``."""
    import torch.nn.functional as F

    from ..cache_policies import BudgetedKVCache, ScaleKV

    class _Cache(BudgetedKVCache):
        def attend(self, layer, q, k, v, mask, scale):
            n, start = k.shape[2], self.length
            step = int(self.layout.step_of[start + n - 1])
            pos_all = self.__dict__.setdefault("pos", {})
            out = q.new_empty(q.shape)
            for gi, (g, budget) in enumerate(zip(self.groups[layer], self.plan.budgets[step][layer])):
                idx = slice(None) if g.idx is None else g.idx
                qg, kn, vn = q[:, idx], k[:, idx], v[:, idx]
                keys, vals = torch.cat([g.k, kn], 2), torch.cat([g.v, vn], 2)
                new = torch.arange(start, start + n, device=k.device).expand(*kn.shape[:2], n)
                pos = torch.cat([pos_all[layer, gi], new], 2) if (layer, gi) in pos_all else new
                out[:, idx] = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=scale)
                if self.policy.future is None:  # record: attention each key receives from this step's queries
                    sc = scale if scale is not None else keys.shape[-1] ** -0.5
                    self.policy.log[step, layer] = (qg @ keys.transpose(-1, -2) * sc).float().softmax(-1).sum(2)
                elif keys.shape[2] > budget:
                    keep = self.policy.future[step, layer].gather(2, pos).topk(budget, -1).indices.sort(-1).values
                    keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1]))
                    vals = vals.gather(2, keep[..., None].expand(-1, -1, -1, vals.shape[-1]))
                    pos, self.evicted = pos.gather(2, keep), True
                g.k, g.v, pos_all[layer, gi] = keys, vals, pos
                self._account()
            return out

    policy = ScaleKV(budget)
    policy.cache_class, policy.future, policy.log = _Cache, None, {}
    return policy


def future_attention(log: dict, steps: int, layers: int, tokens: int) -> dict:
    """``(step, layer)`` → (B, H, tokens): attention each key position gets from the queries of every later step."""
    out = {}
    for layer in range(layers):
        acc = None
        for s in range(steps - 1, -1, -1):
            out[s, layer] = torch.zeros_like(log[s, layer][..., :1]).expand(-1, -1, tokens).clone() if acc is None \
                else acc.clone()
            a = log[s, layer]
            a = torch.nn.functional.pad(a, (0, tokens - a.shape[-1]))
            acc = a if acc is None else acc + a
    return out


class Bf16Method(Method):
    """``plain-bf16``: the plain path with the generator in bf16: how far rounding alone moves the sampled images
    (the scale against which a PSNR target for lossy methods reads)."""

    def run(self, pipe, cond, seed, batch, params) -> None:
        import copy

        gen = copy.deepcopy(pipe.generator).to(torch.bfloat16)
        smp = get_sampler("ancestral", params)
        gens = image_generators(seed, cond.shape[0])
        res = [smp.sample(gen, cond[i:i + batch], gens[i:i + batch]) for i in range(0, cond.shape[0], batch)]
        self.stats = res[0].stats
        for r in res[1:]:
            self.stats = self.stats.merge(r.stats)
        self.wall = self.cpu = float("nan")
        self.tokens = torch.cat([r.tokens for r in res])


class OracleMethod(Method):
    """``oracle-B``: per batch, a recording plain pass, then the oracle's pass under budget B."""

    def run(self, pipe, cond, seed, batch, params) -> None:
        from ..samplers.ancestral import AncestralSampler

        gen = pipe.generator
        layers, _, _ = gen.cache_dims()
        gens = image_generators(seed, cond.shape[0])
        tokens, stats = [], None
        for i in range(0, cond.shape[0], batch):
            policy = oracle_policy(self.options["budget"])
            full = oracle_policy(1.0)
            replay = image_generators(seed, cond.shape[0])[i:i + batch]  # the same draws: the plain path, recorded
            AncestralSampler(params, cache_policy=full).sample(gen, cond[i:i + batch], replay)
            policy.future = future_attention(full.log, gen.layout.num_steps, layers, gen.layout.num_tokens)
            res = AncestralSampler(params, cache_policy=policy).sample(gen, cond[i:i + batch], gens[i:i + batch])
            tokens.append(res.tokens)
            stats = res.stats if stats is None else stats.merge(res.stats)
        self.wall = self.cpu = float("nan")
        self.tokens, self.stats = torch.cat(tokens), stats


def bench_model(model: str, pipe, refiner, labels: list[int], args, code_ks: list[int], digits: bool,
                floor: dict | None = None) -> list[dict]:
    """Every method on one pipeline; rows as :data:`COLUMNS`, each timed one with the floor of its calls
    (:func:`varkit.bench.floor.run_floor` against ``floor``; a KV budget's floor counts the keys the cache holds)."""
    from ..cache_policies import calibrate

    params = pipe.sampling_params(cfg=args.cfg)
    cond = torch.tensor(labels, device=pipe.device)
    methods = [Method("plain", "ancestral")]
    refiners = refiner if isinstance(refiner, list) else [refiner]
    for i, r in enumerate(refiners):  # the first refiner's rows are code-kK, the others' code-kK-<refiner>
        methods += [Method(f"code-k{k}" + (f"-{r}" if i else ""), "collaborative", refiner=r, k=k) for k in code_ks]
    methods += [Method(f"{p}-{b:g}", "ancestral", cache_policy=f"{p}:{b:g}") for p in args.policies for b in args.budgets]
    oracles: list[Method] = [OracleMethod(f"oracle-{b:g}", "ancestral", budget=b)
                             for b in (args.oracle_budgets if digits else [])]
    oracles += [Bf16Method("plain-bf16", "ancestral")] if digits else []
    c = time.process_time()
    if args.policies or oracles:
        calibrate(pipe.generator, params)  # once per model and settings, before any timing
    calib_s = time.process_time() - c
    for r in range(args.repeats):
        for m in methods if r % 2 == 0 else methods[::-1]:  # alternate the order: load hits every method alike
            m.run(pipe, cond, args.seed, args.batch, params)
            print(f"  {model} round {r + 1}/{args.repeats} {m.name}: {m.cpu / len(labels):.3f} CPU s/image", flush=True)
    for m in oracles:  # untimed: once
        m.run(pipe, cond, args.seed, args.batch, params)
    methods += oracles
    plain = methods[0]
    ref_images = pipe.decode(plain.tokens)
    acc0 = None
    if digits:
        from ..eval.digits import digits_accuracy

        acc0 = 100 * digits_accuracy(ref_images, labels)
    rows = []
    for m in methods:
        images = ref_images if m is plain else pipe.decode(m.tokens)
        timed = m not in oracles
        row = {"model": model, "method": m.name, "images": len(labels),
               "s_per_image": m.wall / len(labels) if timed else None,
               "cpu_s_per_image": m.cpu / len(labels) if timed else None,
               "speedup_cpu": plain.cpu / m.cpu if timed else None,
               "speedup_wall": plain.wall / m.wall if timed else None, "forward_passes": m.stats.forward_passes,
               "drafter_passes": getattr(m.stats, "drafter_passes", None),
               "refiner_passes": getattr(m.stats, "refiner_passes", None),
               "cache_bytes": m.stats.cache_bytes, "cache_ratio": m.stats.cache_bytes / plain.stats.cache_bytes,
               "transient_ratio": m.transient / plain.stats.cache_bytes if m.transient else None,
               "psnr_db": psnr(ref_images, images), "tokens_same": float((m.tokens == plain.tokens).float().mean())}
        if timed:
            row |= run_floor(m.replay, m.models, len(labels), m.wall, floor, cpu_s=m.cpu)
        if m.sampler == "collaborative":
            row |= {"drafter_cache_bytes": m.stats.drafter_cache_bytes, "refiner_cache_bytes": m.stats.refiner_cache_bytes}
        if m.name.startswith(("scalekv", "hack")):
            row["calibration_cpu_s"] = calib_s
        if digits:
            acc = 100 * digits_accuracy(images, labels)
            row |= {"accuracy": acc, "accuracy_drop": acc0 - acc}
            if m.name.startswith("code"):
                row["met"] = row["speedup_cpu"] >= CODE_SPEEDUP and row["accuracy_drop"] <= CODE_ACCURACY_DROP
            if m.name.startswith("scalekv") and abs(float(m.name.split("-")[1]) - 0.1) < 1e-9:
                row["met"] = row["cache_ratio"] <= SCALEKV_BYTES and row["psnr_db"] >= SCALEKV_PSNR
        rows.append(row)
    return rows


def random_var_pipeline(config: str, work: Path, seed: int):
    """A random-weight VAR pipeline (VAR's init with O(1) AdaLN gates, as ``varkit bench var``) in ``work``."""
    from ..checkpoints.var import convert_var
    from ..pipeline import load_pipeline
    from .var import write_random_pair

    pipe_dir = work / f"{config}-random"
    if not (pipe_dir / "config.json").is_file():
        vae, var, _ = write_random_pair(config, work, seed)
        convert_var(vae, var, pipe_dir, overwrite=True)
        vae.unlink(), var.unlink()
    return load_pipeline(pipe_dir)


def random_refiner(pipe, depth: int, dim: int, seed: int):
    """A random VAR of ``depth`` × ``dim`` over ``pipe``'s tokenizer (same scales, vocabulary and classes), with the
    AdaLN gates made O(1) so that its attention is not trivial."""
    from ..models import create_model

    c = pipe.generator.config
    torch.manual_seed(seed)
    gen = create_model("var-d16", depth=depth, dim=dim, n_head=dim // 64, drop_path=0.0, vocab_size=c.vocab_size,
                       num_classes=c.num_classes, vae_dim=c.vae_dim, patch_nums=tuple(c.patch_nums)).eval()
    with torch.no_grad():
        for b in gen.blocks:
            torch.nn.init.normal_(b.ada_lin[-1].weight, std=0.02)
    gen.bind_tokenizer(pipe.tokenizer)
    return gen


def random_generator(config: str, dtype: torch.dtype, seed: int):
    """A random VAR of ``config`` made directly in ``dtype`` (VAR-d30: 2.0 B parameters, 4 GB in bf16, never the 8 GB
    of an fp32 copy): weight matrices N(0, 0.02), vectors zero (speed only: its images mean nothing)."""
    from ..modeling import params_on_meta
    from ..models import create_model

    from ..errors import InvalidArgumentError
    from ..models.scales import ScalesGenerator

    with params_on_meta():
        gen = create_model(config)
    if not isinstance(gen, ScalesGenerator):
        raise InvalidArgumentError(f"--large-drafter must be a VAR config (e.g. var-d30), got {config!r} "
                                   f"({type(gen).__name__})")
    g = torch.Generator().manual_seed(seed)
    for mod in gen.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                t = torch.empty(p.shape, dtype=dtype)
                t.normal_(0.0, 0.02, generator=g) if p.dim() >= 2 else t.zero_()
                mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    return gen.eval()


def peak_rss_gb() -> float:
    """The process's peak resident memory (GB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cmd_bench_var_accel(args) -> None:
    import tempfile

    from ..io import write_json
    from ..pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    notes: dict[str, str] = {}
    floor = get_floor(quick=True, verbose=True)
    if not args.skip_bundled:
        pipe = load_pipeline(args.bundled)
        labels = [i % pipe.num_classes for i in range(args.images)]
        ks = code_scales(pipe.generator.config.patch_nums, args.code_k)
        notes["digits_k"] = (f"{args.bundled} has {pipe.generator.layout.num_steps} scales: CoDe's k = {args.code_k} of 10 "
                             f"become {ks} (the refiner makes the last {[pipe.generator.layout.num_steps - k for k in ks]})")
        rows += bench_model(args.bundled, pipe, args.refiner, labels, args, ks, digits=True, floor=floor)
    if not args.skip_large:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            pipe = random_var_pipeline(args.large, Path(tmp), args.seed)
            refiner = random_refiner(pipe, args.refiner_depth, args.refiner_dim, args.seed + 1)
            labels = [i % pipe.num_classes for i in range(args.large_images)]
            small = argparse_copy(args, batch=min(args.batch, args.large_images), repeats=args.large_repeats,
                                  budgets=args.large_budgets)
            notes["large"] = LARGE_NOTE
            rows += bench_model(f"{args.large}-random", pipe, refiner, labels, small,
                                code_scales(pipe.generator.config.patch_nums, args.code_k), digits=False, floor=floor)
            del pipe, refiner
    if args.large_drafter:  # CoDe's own pair: a random large drafter over the random large model as the refiner
        from ..pipeline import Pipeline

        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.large_dtype]
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            pipe = random_var_pipeline(args.large, Path(tmp), args.seed).to(dtype=dtype)
            c = time.process_time()
            drafter = random_generator(args.large_drafter, dtype, args.seed + 2)
            big = Pipeline(pipe.tokenizer, drafter, defaults=pipe.defaults, name=f"{args.large_drafter}-random")
            build_s = time.process_time() - c
            labels = [i % big.num_classes for i in range(args.large_images)]
            pair = argparse_copy(args, batch=1, repeats=args.large_repeats, policies=[])
            model = f"{args.large_drafter}-random/{args.large}-refiner-{args.large_dtype}"
            rows += bench_model(model, big, pipe.generator, labels, pair,
                                code_scales(big.generator.config.patch_nums, args.code_k), digits=False, floor=floor)
            params = sum(p.numel() for p in drafter.parameters())
            notes["large_pair"] = (f"{model}: a random {args.large_drafter} drafter ({params / 1e9:.2f} B parameters, "
                                   f"{args.large_dtype}, made in {build_s:.0f} CPU s) over a random {args.large} refiner, "
                                   f"batch 1, {args.large_images} images; process peak RSS {peak_rss_gb():.1f} GB")
            del pipe, drafter, big
    print_table(rows, COLUMNS)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    path = Path(args.out_dir) / f"{args.name}.json"
    runs = [{"models": sorted({r["model"] for r in rows}), "settings": settings, "machine": machine(),
             "floor": floor, "date": time.strftime("%Y-%m-%d %H:%M:%S")}]
    if args.update and path.is_file():  # keep the rows (and their run's record) of the models not run this time
        import json

        old = json.loads(path.read_text())
        ran = set(runs[0]["models"])
        rows = [r for r in old.get("rows", []) if r["model"] not in ran] + rows
        runs = [r for r in old.get("runs", []) if not ran & set(r["models"])] + runs
        notes = old.get("notes", {}) | notes
    write_json(path, {"benchmark": args.name, "notes": notes, "rows": rows, "runs": runs})
    print(f"wrote {path}")


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**(vars(args) | changes))


LARGE_NOTE = ("the random VAR (--large) drafts over a random depth-8 width-512 refiner (speed only: random weights make "
              "the two models' images unrelated, so PSNR is no quality measure); CoDe's own pair, d30 over d16: "
              "--large-drafter var-d30 (rows var-d30-random/...)")


def add_var_accel_bench_parser(bench_subparsers) -> None:
    """``varkit bench var-accel``; ``bench_subparsers`` is the ``varkit bench`` subparsers object."""
    s = bench_subparsers.add_parser(
        "var-accel", help="CoDe (collaborative decoding) and ScaleKV/HACK KV budgets vs the plain next-scale path: "
                          "s/image, peak cache bytes, PSNR and digits accuracy against the same seeds")
    s.add_argument("--bundled", default="digits-var", help="bundled next-scale pipeline (digits: classifier accuracy)")
    s.add_argument("--refiner", nargs="+", default=["digits-var-refiner-d1", "digits-var-refiner"],
                   help="its CoDe refiner(s) (names or folders; rows code-kK for the first, code-kK-<name> for others)")
    s.add_argument("--large", default="var-d16", help="a VAR config built with random weights")
    s.add_argument("--refiner-depth", type=int, default=8, help="depth of the large model's random refiner")
    s.add_argument("--refiner-dim", type=int, default=512, help="width of the large model's random refiner")
    s.add_argument("--code-k", type=int, nargs="+", default=[6, 8, 9], help="CoDe's drafted scales of VAR's 10")
    s.add_argument("--policies", nargs="*", default=["scalekv", "hack"])
    s.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.3, 0.5])
    s.add_argument("--large-budgets", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    s.add_argument("--oracle-budgets", type=float, nargs="*", default=[0.1, 0.15, 0.2, 0.3],
                   help="budgets of the oracle rows on the bundled model (none: skip them)")
    s.add_argument("--cfg", type=float, default=None, help="CFG scale (default: each model's own)")
    s.add_argument("--images", type=int, default=100, help="images per method on the bundled model")
    s.add_argument("--large-images", type=int, default=2, help="images per method on the large model")
    s.add_argument("--batch", type=int, default=20)
    s.add_argument("--repeats", type=int, default=3, help="timing rounds on the bundled model (best kept)")
    s.add_argument("--large-repeats", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--work-dir", default=None, help="where the random VAR pipeline is written (default: the temp dir)")
    s.add_argument("--skip-bundled", action="store_true")
    s.add_argument("--skip-large", action="store_true")
    s.add_argument("--update", action="store_true",
                   help="keep the rows of the models not run this time from an existing result file (one model a run)")
    s.add_argument("--large-drafter", default=None, help="a VAR config (var-d30) drafting over --large as the refiner, "
                   "both random, batch 1 (CoDe's own pair; ~4 GB for d30 in bf16)")
    s.add_argument("--large-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the --large-drafter pair")
    add_output_args(s, "var_accel")
    s.set_defaults(func=cmd_bench_var_accel)
