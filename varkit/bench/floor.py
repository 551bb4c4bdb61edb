"""``varkit bench floor``: what this machine allows, so that every speed figure is a fraction of it.

A decode step has to read every weight it uses and the keys/values it attends to, and to do its FLOPs; the
machine's memory bandwidth and GEMM rate bound how fast. Measured here, at the thread count the benches use:

- bandwidth: best-of reads (``sum``, or a matrix-vector product over the bytes: a decode step's pattern) and
  copies (STREAM's copy, read + write counted) of fp32 tensors from a few MiB (caches) to hundreds of MiB
  (DRAM), GB/s;
- GEMM rates in fp32 and bf16 at decode shapes, ``m`` rows times a ``d``x``d`` weight (``m`` = 1: the
  GEMV of a batch-1 step, 8 and 64: small batches and CFG), each the best of ``F.linear``, varkit's prepacked
  oneDNN path and (bf16) the weight-major product, as :class:`varkit.nn.layers.Linear` picks among them; and
  square ``d``³ and ``(d/4)``³ products (the peak, from DRAM and from the caches);
- the CPU's model and flags (AMX, AVX-512-BF16, AVX2...; :func:`varkit.device.cpu_info`), or the GPU's name.

At one CPU thread every time is process CPU time (time slices lost to other processes on a shared machine do not
count), as the benches' ``fraction_of_floor`` uses their CPU seconds there; at more threads, or on a GPU, wall time.

The result is written to ``bench/results/floor.json`` and to a per-machine cache
(``$VARKIT_CACHE/floor/<key>.json``, keyed by CPU model, bf16 ISA and thread count) that other benches and
``dtype="auto"`` reuse without measuring again.

A bench's floor of a run is the sum over its forward passes of ``max(bytes / bandwidth, FLOPs / GEMM rate)``,
bytes being the weights the pass used plus the keys/values it read, FLOPs those of its GEMMs, convolutions and
attention (:func:`trace_work` counts them on one batch-1 run; they scale with the batch, the weights do not).
The bandwidth is the one measured at the largest size not above the pass's bytes (small models run from the
caches), the GEMM rate the best measured in that dtype. ``fraction_of_floor`` = floor / measured seconds: 1.0 is
as fast as the machine allows, 0.5 twice as slow.

A shared host's DRAM read rate drifts while this measurement stays cached, so the benches also probe the host right
before each timed run (:class:`HostReadProbe`) and report ``fraction_of_live_floor``: the run against the floor at
the read rate the host gave while it ran (:func:`live_floor`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import add_device_argument
from ..errors import InvalidArgumentError

#: GEMM shapes: rows m against a d x d weight; ``square``: a d x d x d product
GEMM_ROWS = {"m1": 1, "m8": 8, "m64": 64}
DECODE_SHAPES = ("m1", "m8")  # the shapes whose rates decide dtype="auto"
CPU_SIZES_MIB = (4, 32, 256)
CUDA_SIZES_MIB = (64, 1024, 4096)


# -- timing ---------------------------------------------------------------------------------------------------
def best_seconds(fn: Callable[[], Any], *, budget_s: float = 0.5, min_runs: int = 2, max_runs: int = 30,
                 sync: Callable[[], None] | None = None, sample_s: float = 0.002,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest time of one call of ``fn`` on ``clock``: calls repeated so that each timed sample lasts ``sample_s``
    (short calls are timed in loops), samples taken until ``min_runs`` and ``budget_s`` (wall) are reached (best of
    them: other processes on a shared machine only ever slow a sample down)."""
    sync = sync or (lambda: None)
    fn()  # warm-up (allocations, oneDNN primitive creation)
    sync()
    t0 = clock()
    fn()
    sync()
    inner = max(1, min(1000, int(sample_s / max(clock() - t0, 1e-7))))
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < min_runs or (runs < max_runs and time.perf_counter() - start < budget_s):
        t0 = clock()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (clock() - t0) / inner)
        runs += 1
    return best


def _sync_for(dev: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if dev.type == "cuda" else None


def clock_for(dev: torch.device) -> Callable[[], float]:
    """One CPU thread: process CPU time, which time slices lost to other processes on a shared machine do not
    inflate (the benches compare their CPU seconds with these floors); else wall time."""
    return time.process_time if dev.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


# -- measurements ------------------------------------------------------------------------------------------------
#: how the CPU bandwidth buffers are paged: a cached CPU floor measured otherwise (4 KiB pages, before session 27)
#: is measured again by :func:`get_floor`
BANDWIDTH_PAGES = "huge"


def bandwidth_buffer(n: int, device: torch.device) -> torch.Tensor:
    """``n`` fp32 values for the bandwidth measurements: on a CPU in transparent huge pages
    (:func:`varkit.nn.weight_arena.huge_buffer`), where the machine reads fastest (one Zen 4 core, ``sum`` over 256
    MiB: 30-31 GB/s against 19.6-27 in 4 KiB pages), as varkit's kernels read their weight copies."""
    if device.type != "cpu":
        return torch.empty(n, device=device)
    from ..nn.weight_arena import huge_buffer

    return huge_buffer(n * 4).view(torch.float32)


def measure_bandwidth(nbytes: int, device: torch.device, budget_s: float = 0.5) -> dict[str, float]:
    """Bytes/s of reading ``nbytes`` (the better of a ``sum`` and of a matrix-vector product over them, the
    decode step's own access pattern, which BLAS prefetches better) and of a copy of ``nbytes`` into as many
    (2 x ``nbytes`` moved); on a CPU both buffers in huge pages (:func:`bandwidth_buffer`)."""
    n = max(nbytes // 4 // 1024, 1) * 1024
    kw = {"budget_s": budget_s, "sync": _sync_for(device), "clock": clock_for(device)}
    src = bandwidth_buffer(n, device).fill_(1)
    x = torch.ones(1024, device=device)
    mat = src.view(-1, 1024)
    read_sum = n * 4 / best_seconds(lambda: src.sum(), **kw)
    read_gemv = n * 4 / best_seconds(lambda: torch.mv(mat, x), **kw)
    dst = bandwidth_buffer(n, device)
    copy = 2 * n * 4 / best_seconds(lambda: dst.copy_(src), **kw)
    return {"bytes": n * 4, "read_Bps": max(read_sum, read_gemv), "read_sum_Bps": read_sum,
            "read_gemv_Bps": read_gemv, "copy_Bps": copy}


def _gemm_paths(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The ways varkit's Linear can compute ``x @ w.T`` here (see :class:`varkit.nn.layers.Linear`)."""
    from ..nn.layers import Linear, packable_dtypes

    paths = {"linear": lambda: F.linear(x, w)}
    cpu = x.device.type == "cpu"
    if cpu and w.dtype == torch.bfloat16 and x.shape[0] <= Linear.small_rows:
        paths["weight_major"] = lambda: (w @ x.t()).t()
    if cpu and w.dtype in packable_dtypes() and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        paths["prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return paths


def measure_gemm(dtype: torch.dtype, dim: int, device: torch.device, budget_s: float = 0.4) -> dict[str, dict]:
    """FLOP/s of ``dtype`` GEMMs: ``m`` rows x a ``dim`` x ``dim`` weight (:data:`GEMM_ROWS`), best of the paths
    varkit's Linear can take, and a ``dim``³ square product."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(dim, dim, generator=g).to(device, dtype)
    sync, clock = _sync_for(device), clock_for(device)
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for name, m in GEMM_ROWS.items():
            x = torch.randn(m, dim, generator=g).to(device, dtype)
            rates = {p: 2 * m * dim * dim / best_seconds(fn, budget_s=budget_s, sync=sync, clock=clock)
                     for p, fn in _gemm_paths(x, w).items()}
            best = max(rates, key=rates.get)
            out[name] = {"m": m, "k": dim, "n": dim, "flops_per_s": rates[best], "path": best, "paths": rates}
        for name, d in (("square", dim), ("square_quarter", max(dim // 4, 64))):  # the peak: in DRAM, in cache
            a, b = torch.randn(d, d, generator=g).to(device, dtype), w[:d, :d].contiguous()
            t = best_seconds(lambda: a @ b, budget_s=budget_s, sync=sync, clock=clock)
            out[name] = {"m": d, "k": d, "n": d, "flops_per_s": 2 * d ** 3 / t, "path": "matmul"}
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "unknown"


def machine_key(device: str | torch.device = "cpu", threads: int | None = None) -> str:
    """The per-machine cache key: CPU model + its bf16 ISA + thread count (a VM's model name can be as vague as
    "Intel Xeon Processor"), or the GPU's name."""
    from ..device import cpu_info, resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda":
        return f"cuda-{slug(torch.cuda.get_device_name(dev))}"
    info = cpu_info()
    return f"cpu-{slug(info['model'])}-{info['bf16_isa']}-t{threads or torch.get_num_threads()}"


def measure_floor(device: str | torch.device = "cpu", threads: int | None = None, *, sizes_mib: Iterable[int] | None = None,
                  dim: int | None = None, dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16),
                  budget_s: float = 0.4, quick: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Measure this machine's bandwidths and GEMM rates (at ``threads`` torch threads on a CPU).

    ``quick``: a rougher measurement in a second or two (two sizes, d = 512, short repeats) for a bench JSON that
    needs one when none is cached; marked ``"quick": true`` and replaced by the next full measurement."""
    from ..device import cpu_dtype_choice, cpu_info, resolve_device
    from ..nn.layers import packable_dtypes

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    cuda = dev.type == "cuda"
    if quick:
        sizes_mib, dim, budget_s = sizes_mib or (4, 64), dim or 512, min(budget_s, 0.05)
    sizes = tuple(sizes_mib or (CUDA_SIZES_MIB if cuda else CPU_SIZES_MIB))
    if not sizes or min(sizes) < 1:
        raise InvalidArgumentError(f"--sizes-mib must be positive sizes in MiB, got {list(sizes)}")
    dim = dim or (8192 if cuda else 2048)
    if dim < 64:
        raise InvalidArgumentError(f"--dim must be >= 64, got {dim}")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"key": machine_key(dev, threads), "device": dev.type, "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "cpu": cpu_info(), "gemm_dim": dim, "quick": quick,
                              "clock": "process_time" if clock_for(dev) is time.process_time else "perf_counter",
                              "bandwidth_pages": BANDWIDTH_PAGES if not cuda else "device"}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(dev)
    try:
        result["loadavg_start"] = os.getloadavg()[0]
    except OSError:
        pass
    bw = []
    for mib in sorted(sizes):
        bw.append(measure_bandwidth(mib << 20, dev, budget_s))
        if verbose:
            print(f"  {mib} MiB: read {bw[-1]['read_Bps'] / 1e9:.1f} GB/s, copy {bw[-1]['copy_Bps'] / 1e9:.1f} GB/s",
                  flush=True)
    result["bandwidth"] = bw
    gemm = {}
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        gemm[name] = measure_gemm(dt, dim, dev, budget_s)
        if verbose:
            print(f"  {name}: " + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.0f}" for k, v in gemm[name].items())
                  + " GFLOP/s", flush=True)
    result["gemm"] = gemm
    result["peak_gemm_flops"] = {k: max(v["flops_per_s"] for v in s.values()) for k, s in gemm.items()}
    if not cuda:
        result["auto_dtype"] = str(cpu_dtype_choice(result["cpu"], torch.bfloat16 in packable_dtypes(), result)
                                   ).replace("torch.", "")
    try:
        result["loadavg_end"] = os.getloadavg()[0]
    except OSError:
        pass
    result["seconds"] = time.perf_counter() - t0
    return result


# -- the per-machine cache --------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$VARKIT_CACHE/floor`` (default ``~/.cache/varkit/floor``)."""
    root = os.environ.get("VARKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "varkit")
    return Path(root) / "floor"


def cached_floor(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any] | None:
    """This machine's cached floor at ``threads`` (default: torch's current count), or None if never measured."""
    path = cache_dir() / f"{machine_key(device, threads)}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "gemm" in data and "bandwidth" in data else None


def save_floor(result: dict[str, Any]) -> Path:
    """Write ``result`` into the per-machine cache; returns the path."""
    from ..io import write_json

    path = cache_dir() / f"{result['key']}.json"
    write_json(path, result)
    return path


def get_floor(device: str | torch.device = "cpu", threads: int | None = None, measure: bool = True,
              quick: bool = False, verbose: bool = False) -> dict[str, Any] | None:
    """The cached floor of this machine, measured (and cached) first if there is none and ``measure``; a
    ``quick`` cached one only serves ``quick`` requests (a full request measures again)."""
    got = cached_floor(device, threads)
    stale = got is not None and got.get("device") == "cpu" and got.get("bandwidth_pages") != BANDWIDTH_PAGES
    if measure and (got is None or stale or (got.get("quick") and not quick)):
        if verbose:
            print(f"measuring this machine's floor ({'quick; ' if quick else ''}varkit bench floor), cached for "
                  "the next benches ...", flush=True)
        got = measure_floor(device, threads, quick=quick, verbose=verbose)
        save_floor(got)
    return got


def merge_floors(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with every rate the better of the two measurements (each rate was reached on this machine, so the
    faster one is the truer floor; other processes on a shared machine only ever slow a measurement down)."""
    if not old or old.get("key") != new.get("key") or old.get("quick") != new.get("quick"):
        return new
    out = json.loads(json.dumps(new))
    before = {r["bytes"]: r for r in old["bandwidth"]}
    for r in out["bandwidth"]:
        o = before.get(r["bytes"])
        if o:
            r["read_Bps"], r["copy_Bps"] = max(r["read_Bps"], o["read_Bps"]), max(r["copy_Bps"], o["copy_Bps"])
    for dt, shapes in out["gemm"].items():
        for name, r in shapes.items():
            o = old["gemm"].get(dt, {}).get(name)
            if o and o.get("m") == r.get("m") and o.get("k") == r.get("k") and o["flops_per_s"] > r["flops_per_s"]:
                shapes[name] = o
    out["peak_gemm_flops"] = {k: max(v["flops_per_s"] for v in s.values()) for k, s in out["gemm"].items()}
    out["measurements"] = old.get("measurements", 1) + 1
    if "auto_dtype" in out:
        from ..device import cpu_dtype_choice
        from ..nn.layers import packable_dtypes

        out["auto_dtype"] = str(cpu_dtype_choice(out["cpu"], torch.bfloat16 in packable_dtypes(), out)).replace("torch.", "")
    return out


def decode_gemm_score(floor: dict[str, Any], dtype: str) -> float | None:
    """Geometric mean of the ``dtype`` GEMM rates at :data:`DECODE_SHAPES` (None if not measured)."""
    rates = [floor.get("gemm", {}).get(dtype, {}).get(s, {}).get("flops_per_s") for s in DECODE_SHAPES]
    if not all(rates):
        return None
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


def path_gain(floor: dict[str, Any] | None, dtype: str, path: str,
              rivals: tuple[str, ...] | None = None) -> float | None:
    """Geometric mean over :data:`DECODE_SHAPES` of the ``path`` GEMM's rate (``prepacked``, ``weight_major``...)
    over the best of its ``rivals`` (default: every other measured path) in ``dtype``: > 1 when that path pays at
    decode shapes on this machine; None if not measured."""
    ratios = []
    for s in DECODE_SHAPES:
        paths = (floor or {}).get("gemm", {}).get(dtype, {}).get(s, {}).get("paths") or {}
        others = [v for k, v in paths.items() if k != path and (rivals is None or k in rivals) and v]
        if not paths.get(path) or not others:
            return None
        ratios.append(paths[path] / max(others))
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


# -- floors --------------------------------------------------------------------------------------------------------
def bandwidth_for(floor: dict[str, Any], nbytes: float) -> float:
    """Bytes/s for a pass over a working set of ``nbytes`` (the best of read and copy at each measured size).

    Sets no larger than the smallest size get its rate (they live in the caches). Above it, a pass's time runs
    through the measured times (size over rate) linearly, and past the largest size it grows at the last segment's
    per-byte cost (what bytes beyond those the caches keep cost: DRAM's). Why not the rate of the largest size
    below a set: a pass reads the same bytes in the same order every time, and no cache keeps more of such a stream
    than its own size, so a 196 MB pass with 32 and 256 MiB measured streams most of its bytes at the DRAM rate, not
    at the 32 MiB measurement's (an L3-resident rate on a 32 MB L3: 50 against 30 GB/s on AMD Zen 4).
    Continuous in ``nbytes``, and equal to the measured rate at each measured size."""
    rows = sorted(floor["bandwidth"], key=lambda r: r["bytes"])
    sizes = [float(r["bytes"]) for r in rows]
    times = [r["bytes"] / max(r["read_Bps"], r["copy_Bps"]) for r in rows]
    if nbytes <= sizes[0]:
        return sizes[0] / times[0]
    i = 0  # the segment [sizes[i], sizes[i + 1]] that holds nbytes (past the largest: the last one, extended)
    while i + 2 < len(sizes) and sizes[i + 1] < nbytes:
        i += 1
    if len(sizes) == 1:
        return sizes[0] / times[0]
    per_byte = (times[i + 1] - times[i]) / (sizes[i + 1] - sizes[i])
    if per_byte <= 0:  # a noisy larger measurement faster than the smaller: its own rate
        per_byte = times[i + 1] / sizes[i + 1]
    return nbytes / (times[i] + (nbytes - sizes[i]) * per_byte)


def peak_rate(floor: dict[str, Any], dtype: torch.dtype | str) -> float:
    """The best measured GEMM FLOP/s in ``dtype`` (dtypes not measured: the best of any)."""
    name = str(dtype).replace("torch.", "")
    peaks = floor["peak_gemm_flops"]
    return peaks.get(name) or max(peaks.values())


def floor_seconds(weight_bytes: float, kv_bytes: float, flops: float | dict[str, float],
                  dtype: torch.dtype | str = "float32", floor: dict[str, Any] | None = None) -> float:
    """Lower bound of one pass: ``max((weight + KV bytes) / bandwidth, FLOPs / GEMM rate)``.

    ``flops``: a number (in ``dtype``) or FLOPs per dtype name; ``floor``: a measurement (default: this machine's
    cached one, measured first if missing)."""
    floor = floor or get_floor()
    nbytes = weight_bytes + kv_bytes
    by_dtype = flops if isinstance(flops, dict) else {str(dtype).replace("torch.", ""): flops}
    compute = sum(f / peak_rate(floor, d) for d, f in by_dtype.items())
    return max(nbytes / bandwidth_for(floor, nbytes) if nbytes else 0.0, compute)


@dataclass
class PassWork:
    """What one forward pass of a batch-1 run reads and computes."""

    weight_bytes: int = 0  # parameters of the GEMMs/convolutions it ran (each module once per pass)
    kv_bytes: int = 0  # cached keys and values attention read
    flops: dict[str, float] = field(default_factory=dict)  # GEMM, convolution and attention FLOPs per dtype
    seen: set = field(default_factory=set, repr=False)

    def add_weights(self, module: nn.Module) -> None:
        if id(module) not in self.seen:
            self.seen.add(id(module))
            self.weight_bytes += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))

    def add_flops(self, dtype: torch.dtype, flops: float) -> None:
        name = str(dtype).replace("torch.", "")
        self.flops[name] = self.flops.get(name, 0.0) + flops


@dataclass
class WorkTrace:
    """Per-pass work of one batch-1 run (:func:`trace_work`); ``other``: work outside the generator's passes
    (the tokenizer's decode)."""

    passes: list[PassWork]
    other: PassWork
    batch: int = 1

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (benches whose runs live in worker processes send it back)."""
        def one(p: PassWork) -> dict:
            return {"weight_bytes": p.weight_bytes, "kv_bytes": p.kv_bytes, "flops": p.flops}
        return {"batch": self.batch, "passes": [one(p) for p in self.passes], "other": one(self.other)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WorkTrace":
        def one(d: dict) -> PassWork:
            return PassWork(int(d["weight_bytes"]), int(d["kv_bytes"]), dict(d["flops"]))
        return cls([one(d) for d in data["passes"]], one(data["other"]), int(data.get("batch", 1)))

    def totals(self, batch: int) -> dict[str, float]:
        """Bytes and FLOPs of the run at ``batch`` images (weights once per pass; KV and FLOPs per image)."""
        s = batch / self.batch
        every = [*self.passes, self.other]
        return {"passes": len(self.passes), "weight_bytes": sum(p.weight_bytes for p in every),
                "kv_bytes": s * sum(p.kv_bytes for p in every),
                "flops": s * sum(sum(p.flops.values()) for p in every)}

    def floor(self, batch: int, floor: dict[str, Any] | None = None) -> dict[str, Any]:
        """``floor_s`` of the run at ``batch`` images, and which bound dominated (bandwidth or compute)."""
        floor = floor or get_floor()
        s = batch / self.batch
        total, by_bw = 0.0, 0.0
        for p in [*self.passes, self.other]:
            nbytes = p.weight_bytes + s * p.kv_bytes
            t_bw = nbytes / bandwidth_for(floor, nbytes) if nbytes else 0.0
            t_c = sum(s * f / peak_rate(floor, d) for d, f in p.flops.items())
            total += max(t_bw, t_c)
            by_bw += max(t_bw, t_c) if t_bw >= t_c else 0.0
        return {"floor_s": total, "floor_bound": "bandwidth" if by_bw >= total / 2 else "compute",
                **{f"floor_{k}": v for k, v in self.totals(batch).items()}}


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


PASS_METHODS = ("prefill", "prefill_steps", "forward", "forward_rows", "teacher_forcing_logits", "dd_forward")
HEAD_NET_METHODS = ("forward", "step")


def pass_points(models: Iterable[nn.Module]) -> list[tuple[Any, str]]:
    """``(object, method name)`` of every call :func:`trace_work` counts as a pass: the generators'
    :data:`PASS_METHODS` and their heads' networks' :data:`HEAD_NET_METHODS` (a diffusion or flow head calls its
    network many times a token, each call reading its weights again)."""
    points = []
    for m in models:
        points += [(m, n) for n in PASS_METHODS if callable(getattr(m, n, None))]
        net = getattr(getattr(m, "head", None), "net", None)
        if isinstance(net, nn.Module):
            points += [(net, n) for n in HEAD_NET_METHODS if callable(getattr(net, n, None))]
    return points


@contextlib.contextmanager
def trace_work(gen: nn.Module, *others: nn.Module, drafts: Sequence[nn.Module] = ()) -> Iterator[WorkTrace]:
    """Count the work of whatever runs inside the block: every call of a :func:`pass_points` method of ``gen`` and
    of the ``drafts`` (draft models of speculative samplers) that is not inside another is one pass; GEMMs,
    convolutions and attention in these and ``others`` (a tokenizer) outside those calls go to ``other``. Eager
    only: a compiled decode step is set aside meanwhile, and so are the fused C++ block steps (the same work on the
    module path, where the hooks see it).

    Counted: ``2·rows·in·out`` per linear, ``2·out·in/groups·kernel`` per convolution output (a quarter of that,
    Winograd F(4x4, 3x3)'s products, for the 3x3 convolutions :func:`varkit.nn.winograd.eligible` takes on a CPU,
    whichever path runs them), ``4·q·keys·dim``
    per attention call (rows of every image), the parameters of each linear/convolution once per pass, and
    ``2·keys·dim`` cached keys/values read per attention call (with a KV cache).
    """
    from ..nn import winograd
    from ..nn.attention import Attention
    from ..nn.layers import Linear

    trace = WorkTrace(passes=[], other=PassWork())
    state = {"depth": 0}
    roots = (gen, *drafts, *others)
    mods = {id(m) for root in roots for m in root.modules()}

    def current() -> PassWork:
        return trace.passes[-1] if state["depth"] > 0 else trace.other

    def on_linear(module: nn.Module, x: torch.Tensor) -> None:
        if id(module) in mods:
            w = module.weight
            current().add_weights(module)
            current().add_flops(w.dtype, 2.0 * (x.numel() // w.shape[1]) * w.shape[0] * w.shape[1])

    def linear_hook(module, args, out):
        if not isinstance(module, Linear):  # varkit's Linear counts itself in .linear (wqkv is called there)
            on_linear(module, args[0])

    def conv_hook(module, args, out):
        w = module.weight
        current().add_weights(module)
        flops = 2.0 * out.numel() * w[0].numel()
        if isinstance(module, nn.Conv2d) and winograd.eligible(module, args[0]):
            # the least arithmetic varkit has for it, whichever path the run itself takes
            flops = winograd.flops(module, out)
        current().add_flops(w.dtype, flops)

    def attention_hook(module, args, kwargs):
        x = args[0]
        cache = args[3] if len(args) > 3 else kwargs.get("cache")
        B, n = x.shape[0], x.shape[1]
        dim = module.n_head * module.head_dim
        past = getattr(cache, "length", 0) if cache is not None else 0
        keys = past + n
        current().add_flops(x.dtype, 4.0 * B * n * keys * dim)
        if cache is not None:
            current().kv_bytes += 2 * B * keys * dim * getattr(cache, "dtype", x.dtype).itemsize

    plain_linear = Linear.linear

    def counting_linear(self, x, bias, activation=None):
        on_linear(self, x)
        return plain_linear(self, x, bias, activation)

    def pass_method(fn):
        def run(*args, **kwargs):
            if state["depth"] == 0:
                trace.passes.append(PassWork())
            state["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state["depth"] -= 1
        return run

    handles = []
    for root in roots:
        for m in root.modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, Attention):
                handles.append(m.register_forward_pre_hook(attention_hook, with_kwargs=True))
    compiled = {id(m): (m, m.__dict__.pop("_compiled_step")) for m in (gen, *drafts) if "_compiled_step" in m.__dict__}
    try:
        with contextlib.ExitStack() as stack:
            # blocks run on the module path, whose linears and attention calls the hooks see; the fused C++ steps
            # (decode_layers, front_layers) do the same work in one call the hooks would miss
            stack.enter_context(_environ("VARKIT_FUSED_DECODE", "0"))
            stack.enter_context(_patched(Linear, "linear", counting_linear))
            for obj, name in pass_points((gen, *drafts)):
                stack.enter_context(_patched(obj, name, pass_method(getattr(obj, name))))
            yield trace
    finally:
        for h in handles:
            h.remove()
        for m, step in compiled.values():
            m.__dict__["_compiled_step"] = step


def sampler_models(gen: nn.Module, sampler: Any) -> list[nn.Module]:
    """``gen`` and the models a sampler runs beside it (a speculative sampler's ``draft``, a distilled one's
    ``teacher``, a collaborative one's ``refiner``), if any: the models whose passes a run of ``sampler`` on ``gen``
    does (:func:`run_floor`'s ``models``)."""
    beside = [getattr(sampler, name, None) for name in ("draft", "teacher", "refiner")]
    return [gen] + [m for m in beside if isinstance(m, nn.Module) and m is not gen]


def replay_calls(sampler: Any, gen: nn.Module, labels: torch.Tensor, seeds: list[int],
                 batch: int = 1) -> Callable[[], None]:
    """A sampler bench's timed calls again, for :func:`run_floor`: ``sampler`` on ``gen`` over ``labels`` in calls of
    ``batch`` images, each image drawing from a generator seeded with its entry of ``seeds`` as the timed call did."""
    def run() -> None:
        for i in range(0, len(labels), batch):
            sampler.sample(gen, labels[i:i + batch], [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]])
    return run


def floor_basis(device: str | torch.device = "cpu") -> str:
    """Which seconds a row's ``fraction_of_floor`` divides by: process CPU seconds on a CPU at one thread (steadier
    than wall time on a shared machine), wall seconds otherwise."""
    return "cpu_s" if torch.device(device).type == "cpu" and torch.get_num_threads() == 1 else "wall_s"


def run_floor(run: Callable[[], Any], models: Sequence[nn.Module], images: int, wall_s: float | None,
              floor: dict[str, Any] | None = None, others: Sequence[nn.Module] = (),
              cpu_s: float | None = None) -> dict[str, Any]:
    """A timed bench row's floor: ``run()``, the timed work done again with the same seeds (so the same passes),
    under :func:`trace_work` of ``models`` (the generator, then any draft models) and ``others`` (a tokenizer whose
    decode was timed too). Returns the row's fields: the timed run's ``wall_s`` (and ``cpu_s`` where the bench
    measured them), ``floor_s`` of those ``images`` images against ``floor`` (default: the cached measurement of the
    models' device, a quick one made first if there is none), ``floor_bound``, the work totals and
    ``fraction_of_floor``: ``floor_s`` over ``cpu_s`` where :func:`floor_basis` says so and the bench measured them,
    else over ``wall_s`` (None without either); ``fraction_of_floor_basis`` names which."""
    gen, *drafts = models
    with torch.inference_mode(), trace_work(gen, *others, drafts=drafts) as tr:
        run()
    tr.batch = images
    device = next(gen.parameters()).device
    out = {"wall_s": wall_s, **({} if cpu_s is None else {"cpu_s": cpu_s}),
           **tr.floor(images, floor if floor is not None else get_floor(device, quick=True, verbose=True))}
    basis = "cpu_s" if cpu_s is not None and floor_basis(device) == "cpu_s" else "wall_s"
    seconds = cpu_s if basis == "cpu_s" else wall_s
    out["fraction_of_floor"] = out["floor_s"] / seconds if seconds else None
    out["fraction_of_floor_basis"] = basis
    return out


def trace_sampling(gen: nn.Module, params, num_classes: int | None = None, sampler: str = "ancestral") -> WorkTrace:
    """The work of one batch-1 sampling run of ``gen`` with ``params`` (``SamplingParams``), under no-grad."""
    from ..samplers import get_sampler
    from ..samplers.logits import image_generators

    dev = next(gen.parameters()).device
    cond = torch.zeros(1, dtype=torch.long, device=dev)
    with torch.inference_mode(), trace_work(gen) as tr:
        get_sampler(sampler, params).sample(gen, cond, image_generators(0, 1))
    return tr


def dram_bandwidth(floor: dict[str, Any]) -> dict[str, Any]:
    """The floor's bandwidth measurement at its largest size (DRAM's): what :class:`HostReadProbe` reads again."""
    return max(floor["bandwidth"], key=lambda r: r["bytes"])


class HostReadProbe:
    """The host's DRAM read rate measured next to each timed run, in the same process.

    A shared machine's memory bandwidth drifts (22-35 GB/s within one session on one Zen 4 core) while the floor is
    measured once and cached, so a run's ``fraction_of_floor`` moves with the phase of the host it ran in. A bench
    calls the probe right before each timed run under the row's key; :meth:`best` is the fastest read of the
    row's runs (the rows' times are best-of runs too: best against best), and :func:`attach_floor` turns it into
    ``fraction_of_live_floor``, the run against the floor the host allowed while it ran. Each probe is a ``sum``
    over the floor's largest size (DRAM; a few reads, ~0.1 s) at the floor's thread count and on its clock."""

    def __init__(self, floor: dict[str, Any], device: str | torch.device = "cpu", budget_s: float = 0.1) -> None:
        dev = torch.device(device)
        self.enabled = dev.type == "cpu" and floor.get("device", "cpu") == "cpu"
        self.nbytes = dram_bandwidth(floor)["bytes"]
        self.device, self.budget_s = dev, budget_s
        self.threads = int(floor.get("threads") or torch.get_num_threads())
        self.clock = time.process_time if floor.get("clock") == "process_time" else time.perf_counter
        self.rates: dict[Any, list[float]] = {}
        self._buffer: torch.Tensor | None = None

    def __call__(self, key: Any) -> float | None:
        """Measure now; the rate (bytes/s) is kept under ``key`` (a row's label)."""
        if not self.enabled:
            return None
        if self._buffer is None:
            self._buffer = bandwidth_buffer(self.nbytes // 4, self.device).fill_(1)
        buf, threads = self._buffer, torch.get_num_threads()
        torch.set_num_threads(self.threads)  # as the floor measured it (a bench's parent may run more threads)
        try:
            rate = buf.numel() * 4 / best_seconds(lambda: buf.sum(), budget_s=self.budget_s, min_runs=3,
                                                  clock=self.clock)
        finally:
            torch.set_num_threads(threads)
        self.rates.setdefault(key, []).append(rate)
        return rate

    def best(self, key: Any) -> float | None:
        """The fastest read probed under ``key`` (None if none)."""
        got = self.rates.get(key)
        return max(got) if got else None

    def row_fields(self, key: Any) -> dict[str, float]:
        """``{"host_read_GBps": best(key) in GB/s}`` for a row (:func:`attach_floor` reads it), or ``{}`` if nothing
        was probed under ``key``."""
        best = self.best(key)
        return {"host_read_GBps": best / 1e9} if best else {}

    def close(self) -> None:
        """Free the probe's buffer (the floor's largest size)."""
        self._buffer = None


def live_floor(floor: dict[str, Any], read_Bps: float) -> dict[str, Any]:
    """``floor`` with its DRAM-sized bandwidths (the largest measured size) scaled by ``read_Bps`` over the read
    rate it measured there: the floor of a host that reads ``read_Bps`` now. Cache-sized rates stay as measured."""
    top = dram_bandwidth(floor)["bytes"]
    out = dict(floor)
    rows = []
    for r in floor["bandwidth"]:
        if r["bytes"] == top:
            f = read_Bps / r["read_Bps"]
            r = {**r, "read_Bps": r["read_Bps"] * f, "copy_Bps": r["copy_Bps"] * f}
        rows.append(r)
    out["bandwidth"] = rows
    return out


def attach_floor(rows: list[dict[str, Any]], traces: WorkTrace | dict[Any, WorkTrace],
                 floor: dict[str, Any] | None = None, seconds_key: str = "wall_s",
                 key: Callable[[dict], Any] | None = None) -> list[dict[str, Any]]:
    """Add ``floor_s``, ``fraction_of_floor`` (floor / ``row[seconds_key]``), ``floor_bound`` and the work totals
    to every row that has a trace: ``traces`` is one trace for all rows, or a dict looked up by ``key(row)``.
    Every row needs ``batch`` (images of the run) and ``seconds_key`` (seconds of the whole run).

    A row with ``host_read_GBps`` (:class:`HostReadProbe`: the host's read rate while it ran) also gets
    ``floor_live_s`` and ``fraction_of_live_floor``: the same against :func:`live_floor` at that rate, and
    ``host_vs_floor_read``, that rate over the floor's."""
    floor = floor or get_floor()
    top = dram_bandwidth(floor)
    for r in rows:
        tr = traces if isinstance(traces, WorkTrace) else traces.get(key(r) if key else r.get("model"))
        if tr is None or not r.get(seconds_key):
            continue
        r.update(tr.floor(int(r["batch"]), floor))
        r["fraction_of_floor"] = r["floor_s"] / r[seconds_key]
        if r.get("host_read_GBps"):
            live = live_floor(floor, r["host_read_GBps"] * 1e9)
            r["host_vs_floor_read"] = r["host_read_GBps"] * 1e9 / top["read_Bps"]
            r["floor_live_s"] = tr.floor(int(r["batch"]), live)["floor_s"]
            r["fraction_of_live_floor"] = r["floor_live_s"] / r[seconds_key]
    return rows


def floor_summary(floor: dict[str, Any]) -> str:
    """One line: the rates a bench's floors use."""
    bw = ", ".join(f"{r['bytes'] >> 20} MiB {max(r['read_Bps'], r['copy_Bps']) / 1e9:.1f}" for r in floor["bandwidth"])
    gemm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in floor["peak_gemm_flops"].items())
    where = floor.get("gpu") or floor["cpu"]["model"]
    return (f"floor of {where} at {floor['threads']} thread(s): bandwidth GB/s {bw}; peak GEMM GFLOP/s {gemm}")


# -- the command -------------------------------------------------------------------------------------------------------
COLUMNS = ["what", "shape", "dtype", "GB_per_s", "GFLOP_per_s", "path"]


def floor_rows(floor: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurement as table rows."""
    rows = []
    for r in floor["bandwidth"]:
        for kind in ("read", "copy"):
            rows.append({"what": f"{kind} bandwidth", "shape": f"{r['bytes'] >> 20} MiB", "dtype": "float32",
                         "GB_per_s": r[f"{kind}_Bps"] / 1e9})
    for dt, shapes in floor["gemm"].items():
        for name, s in shapes.items():
            rows.append({"what": "GEMM", "shape": f"{name} ({s['m']}x{s['k']}x{s['n']})", "dtype": dt,
                         "GFLOP_per_s": s["flops_per_s"] / 1e9, "path": s["path"]})
    return rows


def cmd_bench_floor(args) -> None:
    from ..device import resolve_device, resolve_dtype
    from .report import print_table, save_results

    dev = resolve_device(args.device)
    names = args.dtype
    if names is None:  # fp32, and bf16 where the device has it
        from ..device import _cuda_bf16

        names = ["float32"] + (["bfloat16"] if dev.type == "cpu" or _cuda_bf16(dev) else [])
    dtypes = []
    for name in names:
        if name.lower() == "auto":
            raise InvalidArgumentError("--dtype names the GEMM dtypes to measure: float32, bfloat16 or float16, not auto")
        dtypes.append(resolve_dtype(name, dev))
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {args.threads}")
    cached = None if args.force else cached_floor(dev, args.threads)
    if cached is not None and not cached.get("quick"):
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"cached measurement {cache_dir() / (cached['key'] + '.json')} (--force measures again)")
        floor = cached
        now = HostReadProbe(floor, dev)("now")  # how far the host has drifted since (None on a GPU)
        if now:
            top = dram_bandwidth(floor)
            print(f"the host reads {top['bytes'] >> 20} MiB at {now / 1e9:.1f} GB/s now, {now / top['read_Bps']:.2f} of "
                  f"the cached {top['read_Bps'] / 1e9:.1f} (benches report fraction_of_live_floor against the rate "
                  "while they ran)")
    else:
        floor = measure_floor(dev, args.threads, sizes_mib=args.sizes_mib, dim=args.dim, dtypes=dtypes,
                              budget_s=args.budget, verbose=True)
        if not args.fresh:
            floor = merge_floors(cached_floor(dev, args.threads), floor)
        print(f"wrote {save_floor(floor)}" + (f" (best of {floor['measurements']} measurements)"
                                              if floor.get("measurements", 1) > 1 else ""))
    print_table(floor_rows(floor), COLUMNS)
    cpu = floor["cpu"]
    print(f"{floor.get('gpu') or cpu['model']}: flags {' '.join(cpu['flags']) or '-'} (bf16: {cpu['bf16_isa']}), "
          f"{floor['threads']} thread(s); dtype='auto' picks {floor.get('auto_dtype', '-')}")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    print(f"wrote {save_results(args.name, floor_rows(floor), settings, args.out_dir, floor=floor)}")


def add_floor_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add ``varkit bench floor`` to the ``bench`` sub-commands."""
    p = bench_subparsers.add_parser("floor", help="this machine's memory bandwidth and GEMM rates: every bench's floor",
                                    description=__doc__.split("\n\n")[0])
    add_device_argument(p)  # default auto, as every command
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); part of the cache key")
    p.add_argument("--dtype", nargs="+", default=None,
                   help="GEMM dtypes to measure (default: float32 and, where the device has it, bfloat16)")
    p.add_argument("--dim", type=int, default=None, help="GEMM weight size d (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--sizes-mib", type=int, nargs="+", default=None,
                   help=f"bandwidth sizes in MiB (default {' '.join(map(str, CPU_SIZES_MIB))} on CPU)")
    p.add_argument("--budget", type=float, default=0.4, help="seconds of repeats per measurement (best is kept)")
    p.add_argument("--force", action="store_true",
                   help="measure again even if this machine's floor is cached (each rate: the best of both)")
    p.add_argument("--fresh", action="store_true", help="with --force: forget the cached rates instead of keeping the best")
    from .report import add_output_args

    add_output_args(p, "floor")
    p.set_defaults(func=cmd_bench_floor)
    return p
