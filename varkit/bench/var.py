"""``varkit bench var``: varkit's VAR pipeline side by side with VAR's own ``autoregressive_infer_cfg``.

Both run the same random weights (VAR's ``init_weights`` recipe plus perturbations that make the AdaLN
gates O(1), written once in VAR's raw format and converted with ``convert_var`` for varkit), the same
labels, CFG on VAR's ramp, top-k, top-p, fp32, on the CPU, each in its own worker process (VAR's code
patches torch globally) with the same thread count. Timed runs alternate between the two workers so
that load from other processes hits both alike; each batch size gets one untimed warm-up run per side,
which also measures the KV cache: varkit's preallocated :class:`~varkit.cache.KVCache`, and for VAR the
largest total of its per-layer ``cached_k``/``cached_v`` tensors (a ``torch.cat`` that grows every scale;
``kv_transient_bytes`` adds the old tensor alive during the cat).

Images/s = batch / wall seconds of one whole call (sampling + VQVAE decode; varkit's also makes PIL images),
best of the timed runs; ``speedup`` = varkit/official images/s, ``speedup_mean`` the ratio of mean times and
``speedup_cpu`` the ratio of process CPU seconds (less sensitive to other processes on a shared machine).
``--profile`` adds one ``torch.profiler`` run per side and batch size: seconds per op category (GEMM, conv,
attention, ...), to show where the two sides differ. ``floor_s``: the least time this machine allows for the
work of the call (VAR's transformer passes and the VQVAE decode, counted on one batch-1 varkit call; both sides
do that work), ``fraction_of_floor`` = floor_s / CPU seconds at one thread (wall seconds at more);
:mod:`varkit.bench.floor`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .report import add_output_args

LABELS = [980, 437, 22, 562, 207, 360, 388, 88, 979, 417, 279, 971, 1, 130, 94, 33]
COLUMNS = ["impl", "batch", "images_per_s", "s_per_image", "best_s", "mean_s", "cpu_s_per_image", "runs",
           "kv_peak_bytes", "kv_transient_bytes", "speedup", "speedup_mean", "speedup_cpu", "floor_s", "fraction_of_floor"]
_TAG = "@@VARBENCH "
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


# -- workers (one process per implementation) -------------------------------------------------------
def _timed(fn, profile: bool) -> tuple[Any, float, float, dict[str, float] | None]:
    """Run ``fn``; its wall and process CPU seconds, and with ``profile`` its profiler seconds per category."""
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        prof = torch_profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cats = None
    if prof is not None:
        prof.__exit__(None, None, None)
        cats = {k: 0.0 for k in [*PROFILE_CATEGORIES, "other"]}
        for e in prof.key_averages():
            cat = next((k for k, pre in PROFILE_CATEGORIES.items() if e.key.startswith(pre)), "other")
            cats[cat] += e.self_cpu_time_total / 1e6
    return out, wall, cpu, cats


def _reply(obj: dict) -> None:
    sys.stdout.write(_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _official_worker(args) -> None:
    sys.path.insert(0, str(Path(args.official).resolve()))
    from torch import nn

    # as VAR's build_vae_var: skip the default init of every layer (the weights are loaded next); own process
    for clz in (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
                nn.ConvTranspose2d):
        clz.reset_parameters = lambda self: None
    from models.basic_var import SelfAttention
    from models.var import VAR
    from models.vqvae import VQVAE

    t0 = time.perf_counter()
    sd = torch.load(args.var, map_location="cpu", weights_only=True)
    vae_sd = torch.load(args.vae, map_location="cpu", weights_only=True)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pns = tuple(int(c) for c in torch.bincount(sd["lvl_1L"].reshape(-1)).sqrt().round().long().tolist())
    vae = VQVAE(vocab_size=vae_sd["quantize.embedding.weight"].shape[0], z_channels=vae_sd["quantize.embedding.weight"].shape[1],
                ch=vae_sd["encoder.conv_in.weight"].shape[0], test_mode=True, share_quant_resi=4, v_patch_nums=pns)
    var = VAR(vae_local=vae, num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth,
              embed_dim=sd["class_emb.weight"].shape[1], num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1],
              drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
              shared_aln="shared_ada_lin.1.weight" in sd, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=pns,
              flash_if_available=False, fused_if_available=False)
    vae.load_state_dict(vae_sd, strict=True)
    var.load_state_dict(sd, strict=True)
    del sd, vae_sd
    vae.eval(), var.eval()
    blocks = list(var.blocks)
    kv = {"peak": 0, "transient": 0}
    plain = SelfAttention.forward

    def measured(self, x, attn_bias):
        old = 0 if self.cached_k is None else self.cached_k.nbytes + self.cached_v.nbytes
        out = plain(self, x, attn_bias)
        if self.caching:
            total = sum(b.attn.cached_k.nbytes + b.attn.cached_v.nbytes for b in blocks if b.attn.cached_k is not None)
            kv["peak"] = max(kv["peak"], total)
            kv["transient"] = max(kv["transient"], total + old)
        return out

    def run(req: dict) -> dict:
        B = req["batch"]
        labels = torch.tensor(bench_labels(B, var.num_classes))
        kv.update(peak=0, transient=0)
        SelfAttention.forward = measured if req.get("kv") else plain
        img, wall, cpu, cats = _timed(lambda: var.autoregressive_infer_cfg(
            B, labels, g_seed=req["seed"], cfg=req["cfg"], top_k=min(req["top_k"], var.V), top_p=req["top_p"],
            more_smooth=False), req.get("profile", False))
        SelfAttention.forward = plain
        return {"wall_s": wall, "cpu_s": cpu, "kv_peak_bytes": kv["peak"] or None, "kv_transient_bytes": kv["transient"] or None,
                "shape": list(img.shape), "profile": cats}

    _serve(t0, run)


def _varkit_worker(args) -> None:
    from ..pipeline import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(args.pipeline, prepack=args.prepack)

    def run(req: dict) -> dict:
        labels = bench_labels(req["batch"], pipe.num_classes)
        if req.get("work"):
            return {"work": work_of_one_call(pipe, req)}
        out, wall, cpu, cats = _timed(lambda: pipe(class_labels=labels, seed=req["seed"], cfg=req["cfg"], cfg_schedule="var",
                                                   top_k=req["top_k"], top_p=req["top_p"]), req.get("profile", False))
        return {"wall_s": wall, "cpu_s": cpu, "kv_peak_bytes": out.stats.cache_bytes, "kv_transient_bytes": out.stats.cache_bytes,
                "shape": [len(out.images), *out.images[0].size], "profile": cats}

    _serve(t0, run)


def work_of_one_call(pipe, req: dict) -> dict:
    """The work of one batch-1 call of ``pipe`` with ``req``'s settings (VAR's passes + the VQVAE decode), as
    :meth:`varkit.bench.floor.WorkTrace.to_json`: what the floors of both sides' rows are made of."""
    from .floor import trace_work

    with torch.inference_mode(), trace_work(pipe.generator, pipe.tokenizer) as tr:
        pipe(class_labels=bench_labels(1, pipe.num_classes), seed=req["seed"], cfg=req["cfg"], cfg_schedule="var",
             top_k=req["top_k"], top_p=req["top_p"])
    return tr.to_json()


def _serve(t0: float, run) -> None:
    """A worker's protocol: say ready (with its load time), then answer one JSON request per stdin line."""
    _reply({"ready": True, "load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        _reply(run(req))


class _Worker:
    def __init__(self, kind: str, argv: list[str], threads: int | None, verbose: bool):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.kind, self.verbose = kind, verbose
        self.proc = subprocess.Popen([sys.executable, "-m", "varkit.bench.var", "--worker", kind, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
            if self.verbose:
                print(f"[{self.kind}] {line.rstrip()}", file=sys.stderr)
        raise InvalidArgumentError(f"the {self.kind} worker exited with status {self.proc.wait()} (rerun with --verbose)")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def _check_official(path: str) -> Path:
    p = Path(path)
    if not (p / "models" / "var.py").is_file() or not (p / "models" / "__init__.py").is_file():
        raise InvalidArgumentError(
            f"--official {path} is not a checkout of FoundationVision/VAR (expected models/var.py and "
            "models/__init__.py); clone https://github.com/FoundationVision/VAR and pass its folder")
    return p


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_side_by_side(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ..checkpoints.var import convert_var

    official = _check_official(args.official)
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise InvalidArgumentError("--batch sizes and --repeats must be >= 1")
    tmp = None
    work = Path(args.work_dir) if args.work_dir else Path(tmp := tempfile.mkdtemp(prefix="varkit-bench-var-"))
    settings: dict[str, Any] = {"config": args.config, "cfg": args.cfg, "cfg_schedule": "var", "top_k": args.top_k,
                                "top_p": args.top_p, "dtype": "float32", "device": "cpu", "threads": args.threads,
                                "repeats": args.repeats, "seed": args.seed, "official": str(official.resolve())}
    workers: list[_Worker] = []
    try:
        t0 = time.perf_counter()
        if not ((work / "vae.pth").is_file() and (work / "var.pth").is_file()):
            write_random_pair(args.config, work, args.seed)
        settings["weights_s"] = time.perf_counter() - t0
        try:
            commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], check=False,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            commit = ""
        settings["official_commit"] = commit or None
        t0 = time.perf_counter()
        pipe_dir = work / "pipeline"
        if not (pipe_dir / "config.json").is_file():
            convert_var(work / "vae.pth", work / "var.pth", pipe_dir, overwrite=True)
        settings["convert_s"] = time.perf_counter() - t0
        common = ["--vae", str(work / "vae.pth"), "--var", str(work / "var.pth")]
        off = _Worker("official", common + ["--official", str(official)], args.threads, args.verbose)
        workers.append(off)
        vk = _Worker("varkit", common + ["--pipeline", str(pipe_dir)] + (["--prepack"] if args.prepack else []),
                     args.threads, args.verbose)
        settings["varkit_prepacked_weights"] = bool(args.prepack)
        workers.append(vk)
        settings["load_s"] = {"official": off.info["load_s"], "varkit": vk.info["load_s"]}
        settings["worker_threads"] = {"official": off.info["threads"], "varkit": vk.info["threads"]}
        req = {"op": "run", "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
        from .floor import WorkTrace, attach_floor, get_floor

        floor = get_floor(threads=args.threads, verbose=args.verbose)
        work = WorkTrace.from_json(vk.ask(**req, batch=1, seed=args.seed, work=True)["work"])
        # one thread: CPU seconds (other processes on a shared machine inflate them far less than wall time)
        basis = "cpu_s" if (args.threads or torch.get_num_threads()) == 1 else "wall_s"
        settings["fraction_of_floor_basis"] = basis
        settings["loadavg_start"] = _load()
        rows = []
        loads = []
        for B in args.batch:
            res: dict[str, dict] = {"official": {"times": [], "cpu": []}, "varkit": {"times": [], "cpu": []}}
            for w in (off, vk):  # warm-up, also measures the KV cache
                r = w.ask(**req, batch=B, seed=10_000 + B, kv=True)
                res[w.kind].update(kv_peak_bytes=r["kv_peak_bytes"], kv_transient_bytes=r["kv_transient_bytes"])
                if args.verbose:
                    print(f"[warm-up] {w.kind} batch {B}: {r['wall_s']:.2f}s", file=sys.stderr)
            for rep in range(args.repeats):
                order = (off, vk) if rep % 2 == 0 else (vk, off)
                for w in order:
                    loads.append(_load())
                    r = w.ask(**req, batch=B, seed=args.seed + rep)
                    res[w.kind]["times"].append(r["wall_s"])
                    res[w.kind]["cpu"].append(r["cpu_s"])
                    if args.verbose:
                        print(f"[run] {w.kind} batch {B} rep {rep}: {r['wall_s']:.2f}s", file=sys.stderr)
            for kind in ("official", "varkit"):
                t, cpu = res[kind]["times"], res[kind]["cpu"]
                rows.append({"impl": kind, "batch": B, "images_per_s": B / min(t), "s_per_image": min(t) / B,
                             "best_s": min(t), "wall_s": min(t), "cpu_s": min(cpu), "mean_s": sum(t) / len(t), "runs": len(t),
                             "cpu_s_per_image": min(cpu) / B, "cpu_times_s": cpu,
                             "kv_peak_bytes": res[kind]["kv_peak_bytes"],
                             "kv_transient_bytes": res[kind]["kv_transient_bytes"], "times_s": t})
            if args.profile:  # one more (untimed) run per side under the profiler
                settings.setdefault("profile_s", {})[str(B)] = {
                    w.kind: w.ask(**req, batch=B, seed=args.seed, profile=True)["profile"] for w in (off, vk)}
            attach_floor(rows[-2:], work, floor, seconds_key=basis)
            rows[-1]["speedup"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
            rows[-1]["speedup_mean"] = rows[-2]["mean_s"] / rows[-1]["mean_s"]
            rows[-1]["speedup_cpu"] = rows[-2]["cpu_s_per_image"] / rows[-1]["cpu_s_per_image"]
        settings["loadavg_runs"] = [x for x in loads if x is not None]
        settings["loadavg_end"] = _load()
        settings["floor"] = floor
        return rows, settings
    finally:
        for w in workers:
            w.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_bench_var(args) -> None:
    from .report import print_table, save_results

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, settings = run_side_by_side(args)
    print_table(rows, COLUMNS)
    for B, prof in settings.get("profile_s", {}).items():
        print(f"profile, batch {B} (seconds per op category, one run each):")
        print_table([{"category": k, "official": prof["official"][k], "varkit": prof["varkit"][k]}
                     for k in prof["official"]], ["category", "official", "varkit"])
    la = settings.get("loadavg_runs") or []
    if la:
        print(f"load average during the runs: {min(la):.2f} .. {max(la):.2f} (machine has {os.cpu_count()} CPUs)")
    floor = settings.pop("floor")
    path = save_results(args.name, rows, settings, args.out_dir, floor=floor)
    print(f"wrote {path}")


def add_var_bench_parser(bench_subparsers) -> None:
    """Add ``varkit bench var`` to the ``bench`` sub-subparsers."""
    p = bench_subparsers.add_parser(
        "var", help="VAR: varkit vs the official autoregressive_infer_cfg on the same random weights (CPU, fp32)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a checkout of github.com/FoundationVision/VAR")
    p.add_argument("--config", default="var-d16", help="VAR config whose random weights both sides run")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side and batch size (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the random weights and converted pipeline here (reused)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="varkit without prepacked GEMM weights (load_pipeline(prepack=False), its default)")
    p.add_argument("--profile", action="store_true", help="also profile one run per side: seconds per op category")
    add_output_args(p, "var_side_by_side")
    p.set_defaults(func=cmd_bench_var)


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["official", "varkit"], required=True)
    p.add_argument("--vae")
    p.add_argument("--var")
    p.add_argument("--official")
    p.add_argument("--pipeline")
    p.add_argument("--prepack", action="store_true")
    args = p.parse_args(argv)
    (_official_worker if args.worker == "official" else _varkit_worker)(args)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
