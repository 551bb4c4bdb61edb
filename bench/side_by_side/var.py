"""varkit's VAR pipeline side by side with VAR's own ``autoregressive_infer_cfg`` (a FoundationVision/VAR checkout).

    python bench/side_by_side/var.py --official ../VAR --batch 1 8 --threads 1

(or ``varkit bench var --official ../VAR``, which runs this script from a source checkout of varkit).

Both run the same random weights (:func:`varkit.bench.var.write_random_pair`: VAR's ``init_weights`` recipe plus
perturbations that make the AdaLN gates O(1), written once in VAR's raw format and converted with ``convert_var``
for varkit), the same labels, CFG on VAR's ramp, top-k, top-p, fp32, on the CPU, each in its own worker process
(VAR's code patches torch globally) with the same thread count. Timed runs alternate between the two workers so
that load from other processes hits both alike; each batch size gets one untimed warm-up run per side, which also
measures the KV cache: varkit's preallocated :class:`~varkit.cache.KVCache`, and for VAR the largest total of its
per-layer ``cached_k``/``cached_v`` tensors (a ``torch.cat`` that grows every scale; ``kv_transient_bytes`` adds the
old tensor alive during the cat).

Rows as ``varkit bench var`` (:mod:`varkit.bench.var`) plus ``speedup`` = varkit/official images/s,
``speedup_mean`` the ratio of mean times and ``speedup_cpu`` the ratio of process CPU seconds; both sides share the
floor of the work of one varkit call (they do the same work; the official row takes the fp32 call's). ``--dtype`` and
``--compile`` add a varkit worker per (dtype, compiled), each compared with the one official (fp32) row; the timed
runs go round-robin over all workers.

``--device cuda``: every worker on the GPU. VAR's loop runs as its ``demo_sample.ipynb`` runs it on a GPU: the
``build_vae_var`` defaults (flash-attn / xformers / fused kernels where installed; the settings say which ran), fp32
weights with ``requires_grad`` off, tf32 on, ``torch.autocast('cuda', dtype=torch.float16)`` under
``torch.inference_mode()`` (``--official-autocast``); its floor is that of varkit's bf16 call (16-bit GEMMs).
varkit's dtypes default to bf16 and fp32 (``--compile``: CUDA graphs of the scale steps, captured in the warm-up
call). Timers synchronize the GPU, ``fraction_of_floor`` uses wall seconds, ``achieved_GBps`` = (weight + KV bytes
the floor counts) / wall seconds, and the file is ``var_side_by_side_cuda.json`` unless ``--name`` is given.
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

from varkit.bench.var import (_load, _timed, add_achieved_bandwidth, add_var_arguments, bench_device, bench_labels,
                              check_args, load_variant, make_row, prepare_pipeline, report, run_call, variant_label,
                              varkit_variants, work_of_one_call)
from varkit.bench.official import script_main
from varkit.errors import InvalidArgumentError

_TAG = "@@VARBENCH "


# -- workers (one process per implementation) -------------------------------------------------------
def _reply(obj: dict) -> None:
    sys.stdout.write(_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _official_worker(args) -> None:
    sys.path.insert(0, str(Path(args.official).resolve()))
    from torch import nn

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:  # demo_sample.ipynb's "run faster" and seed cells
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

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
              flash_if_available=cuda, fused_if_available=cuda)  # on a GPU: build_vae_var's defaults
    vae.load_state_dict(vae_sd, strict=True)
    var.load_state_dict(sd, strict=True)
    del sd, vae_sd
    vae.eval(), var.eval()
    if cuda:  # as demo_sample.ipynb: on the device, no gradients (autocast then casts the weights every call)
        vae.to(dev), var.to(dev)  # the VQVAE is no submodule of VAR (a proxy tuple)
        for p in (*vae.parameters(), *var.parameters()):
            p.requires_grad_(False)
    if var.rng.device.type != dev.type:  # VAR makes it on dist.get_device(): cuda wherever a GPU is
        var.rng = torch.Generator(device=dev)
        var.uniform_prob = var.uniform_prob.to(dev)
    amp = getattr(args, "official_autocast", "float16")
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp)
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

    def call(B, labels, req):
        return var.autoregressive_infer_cfg(B, labels, g_seed=req["seed"], cfg=req["cfg"], top_k=min(req["top_k"], var.V),
                                            top_p=req["top_p"], more_smooth=False)

    def call_cuda(B, labels, req):  # demo_sample.ipynb's sampling cell
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp_dtype is not None,
                                                    dtype=amp_dtype or torch.float16, cache_enabled=True):
            return call(B, labels, req)

    def run(req: dict) -> dict:
        B = req["batch"]
        labels = torch.tensor(bench_labels(B, var.num_classes), device=dev)
        kv.update(peak=0, transient=0)
        SelfAttention.forward = measured if req.get("kv") else plain
        img, wall, cpu, cats = _timed(lambda: (call_cuda if cuda else call)(B, labels, req), req.get("profile", False),
                                      sync=cuda)
        SelfAttention.forward = plain
        return {"wall_s": wall, "cpu_s": cpu, "kv_peak_bytes": kv["peak"] or None, "kv_transient_bytes": kv["transient"] or None,
                "shape": list(img.shape), "profile": cats}

    b0 = var.blocks[0]
    kernels = {"device": str(dev), "autocast": amp if cuda else "off",
               "using_flash": bool(getattr(b0.attn, "using_flash", False)),
               "using_xform": bool(getattr(b0.attn, "using_xform", False)),
               "fused_mlp": getattr(b0.ffn, "fused_mlp_func", None) is not None,
               "fused_add_norm": getattr(b0, "fused_add_norm_fn", None) is not None}
    _serve(t0, run, {"kernels": kernels})


def _varkit_worker(args) -> None:
    t0 = time.perf_counter()
    pipe = load_variant(Path(args.pipeline), args.dtype, args.compile, args.prepack, args.device)

    def run(req: dict) -> dict:
        if req.get("work"):
            return {"work": work_of_one_call(pipe, req)}
        return run_call(pipe, req)

    _serve(t0, run)


def _serve(t0: float, run, extra: dict | None = None) -> None:
    """A worker's protocol: say ready (with its load time), then answer one JSON request per stdin line."""
    _reply({"ready": True, "load_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), **(extra or {})})
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
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
            if self.verbose:
                print(f"[{self.kind}] {line.rstrip()}", file=sys.stderr)
        raise InvalidArgumentError(f"the {self.kind} worker exited with status {self.proc.wait()} (rerun with --verbose)")

    @classmethod
    def once(cls, argv: list[str], args, req: dict) -> dict:
        """The work of one batch-1 call from a varkit worker started for it alone."""
        w = cls("varkit", argv, args.threads, args.verbose)
        try:
            return w.ask(**req, batch=1, seed=args.seed, work=True)["work"]
        finally:
            w.close()

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


def check_official(path: str) -> Path:
    p = Path(path)
    if not (p / "models" / "var.py").is_file() or not (p / "models" / "__init__.py").is_file():
        raise InvalidArgumentError(
            f"--official {path} is not a checkout of FoundationVision/VAR (expected models/var.py and "
            "models/__init__.py); clone https://github.com/FoundationVision/VAR and pass its folder")
    return p


def run_side_by_side(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from varkit.bench.floor import HostReadProbe, WorkTrace, attach_floor, get_floor

    if not args.official:
        raise InvalidArgumentError("--official PATH (a FoundationVision/VAR checkout) is required")
    official = check_official(args.official)
    check_args(args)
    device = bench_device(args)
    cuda = device == "cuda"
    tmp = None
    work = Path(args.work_dir) if args.work_dir else Path(tmp := tempfile.mkdtemp(prefix="varkit-bench-var-"))
    workers: list[_Worker] = []
    try:
        pipe_dir, settings = prepare_pipeline(args, work)
        settings["official"] = str(official.resolve())
        try:
            commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], check=False,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            commit = ""
        settings["official_commit"] = commit or None
        common = ["--vae", str(work / "vae.pth"), "--var", str(work / "var.pth"), "--device", device]
        off = _Worker("official", common + ["--official", str(official)]
                      + (["--official-autocast", args.official_autocast] if cuda else []), args.threads, args.verbose)
        workers.append(off)
        variants = varkit_variants(args)
        for dtype, compiled in variants:
            w = _Worker("varkit", common + ["--pipeline", str(pipe_dir), "--dtype", dtype]
                        + (["--prepack"] if args.prepack else []) + (["--compile"] if compiled else []),
                        args.threads, args.verbose)
            w.label, w.dtype, w.compiled = f"varkit {variant_label(dtype, compiled)}", dtype, compiled
            workers.append(w)
        off.label, off.dtype, off.compiled = "official", "float32", False
        # whose work the official row's floor is: on a GPU its GEMMs run in 16 bits (autocast), as varkit's bf16 call
        off_trace = "bfloat16" if cuda and args.official_autocast != "off" else "float32"
        if cuda:
            off.dtype = "float32" if args.official_autocast == "off" else f"{args.official_autocast}-autocast"
            settings["official_kernels"] = off.info.get("kernels")
            settings["official_floor_trace"] = off_trace
        settings["load_s"] = {w.label: w.info["load_s"] for w in workers}
        settings["worker_threads"] = {w.label: w.info["threads"] for w in workers}
        req = {"op": "run", "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
        floor = get_floor("cuda", verbose=True) if cuda else get_floor(threads=args.threads, verbose=args.verbose)
        traces = {}  # the work of one batch-1 call per dtype (the official side: fp32's; on a GPU bf16's)
        for w in workers[1:]:
            if w.dtype not in traces:
                traces[w.dtype] = WorkTrace.from_json(w.ask(**req, batch=1, seed=args.seed, work=True)["work"])
        if off_trace not in traces:
            traces[off_trace] = WorkTrace.from_json(
                _Worker.once(common + ["--pipeline", str(pipe_dir), "--dtype", off_trace], args, req))
        # one thread: CPU seconds (other processes on a shared machine inflate them far less than wall time)
        basis = "wall_s" if cuda else "cpu_s" if (args.threads or torch.get_num_threads()) == 1 else "wall_s"
        settings["fraction_of_floor_basis"] = basis
        settings["loadavg_start"] = _load()
        rows, loads = [], []
        # the host's read rate before each timed run (fraction_of_live_floor); probed here, in the parent: the
        # host's memory is the workers' too
        probe = HostReadProbe(floor, "cuda" if cuda else "cpu")
        for B in args.batch:
            res: dict[str, dict] = {w.label: {"times": [], "cpu": []} for w in workers}
            for w in workers:  # warm-up (varkit's compiled steps compile here), also measures the KV cache
                r = w.ask(**req, batch=B, seed=10_000 + B, kv=True)
                res[w.label].update(kv_peak_bytes=r["kv_peak_bytes"], kv_transient_bytes=r["kv_transient_bytes"],
                                    warmup_cpu_s=r["cpu_s"])
                if args.verbose:
                    print(f"[warm-up] {w.label} batch {B}: {r['wall_s']:.2f}s", file=sys.stderr)
            for rep in range(args.repeats):
                k = rep % len(workers)  # round-robin: each repeat starts with the next worker
                for w in workers[k:] + workers[:k]:
                    loads.append(_load())
                    probe((w.label, B))
                    r = w.ask(**req, batch=B, seed=args.seed + rep)
                    res[w.label]["times"].append(r["wall_s"])
                    res[w.label]["cpu"].append(r["cpu_s"])
                    if args.verbose:
                        print(f"[run] {w.label} batch {B} rep {rep}: {r['wall_s']:.2f}s", file=sys.stderr)
            new = []
            for w in workers:
                x = res[w.label]
                row = make_row("official" if w is off else "varkit", B, x["times"], x["cpu"], x, w.dtype, w.compiled)
                new.append({**row, **({} if w is off else {"warmup_cpu_s": x["warmup_cpu_s"]})})
                new[-1].update(probe.row_fields((w.label, B)))
                attach_floor(new[-1:], traces[off_trace if w is off else w.dtype], floor, seconds_key=basis)
                if cuda:
                    add_achieved_bandwidth(new[-1])
            if args.profile:  # one more (untimed) run per side under the profiler
                settings.setdefault("profile_s", {})[str(B)] = {
                    w.label: w.ask(**req, batch=B, seed=args.seed, profile=True)["profile"] for w in workers}
            for row in new[1:]:
                row["speedup"] = row["images_per_s"] / new[0]["images_per_s"]
                row["speedup_mean"] = new[0]["mean_s"] / row["mean_s"]
                row["speedup_cpu"] = new[0]["cpu_s_per_image"] / row["cpu_s_per_image"]
            rows += new
        settings["loadavg_runs"] = [x for x in loads if x is not None]
        settings["loadavg_end"] = _load()
        settings["floor"] = floor
        return rows, settings
    finally:
        for w in workers:
            w.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_side_by_side(args) -> None:
    """Run the comparison, print the table, write ``bench/results/var_side_by_side.json`` (``--name``)."""
    cuda = bench_device(args) == "cuda"  # --device cuda without a GPU: one line, before anything runs
    args.name = args.name or "var_side_by_side" + ("_cuda" if cuda else "")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, settings = run_side_by_side(args)
    report(args, rows, settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/side_by_side/var.py", description=__doc__.split("\n\n")[0])
    add_var_arguments(p)
    return p


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["official", "varkit"], required=True)
    p.add_argument("--vae")
    p.add_argument("--var")
    p.add_argument("--official")
    p.add_argument("--pipeline")
    p.add_argument("--prepack", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--official-autocast", default="float16")
    args = p.parse_args(argv)
    (_official_worker if args.worker == "official" else _varkit_worker)(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker_main(argv)
        return 0
    return script_main(Path(__file__).name, build_parser(), cmd_side_by_side, argv)


if __name__ == "__main__":
    raise SystemExit(main())
