"""Part-wise floors, shared by ``varkit bench mar`` and ``varkit bench flowar``: a run's time split into named parts
(transformer, head, decode) and the machine rates each part's floor divides by.

Both benches compare process CPU seconds (steadier than wall time on a shared machine), so the rates are timed in
process CPU time too, best of several calls: other processes on the host lower them as little as possible.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


# -- a run split into parts ---------------------------------------------------------------------------------------------
@dataclass
class PartTimer:
    """Wall and process-CPU seconds of each named part of one run, summed over the calls wrapped by :meth:`timed`."""

    parts: tuple[str, ...]
    seconds: dict[str, float] = field(init=False)
    cpu: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds, self.cpu = dict.fromkeys(self.parts, 0.0), dict.fromkeys(self.parts, 0.0)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0

    def timed(self, part: str) -> Callable[[Callable], Callable]:
        """A wrapper for :func:`instrument` that adds every call's time to ``part``."""
        def wrap(fn: Callable) -> Callable:
            def wrapper(*a, **kw):
                with self.part(part):
                    return fn(*a, **kw)
            return wrapper
        return wrap

    @staticmethod
    def counted(into: list, key: Callable[[torch.Tensor], Any]) -> Callable[[Callable], Callable]:
        """A wrapper for :func:`instrument` that appends ``key(x)`` of every call's first argument to ``into`` (a list
        the caller clears in place between runs: the wrapper holds it)."""
        def wrap(fn: Callable) -> Callable:
            def wrapper(x, *a, **kw):
                into.append(key(x))
                return fn(x, *a, **kw)
            return wrapper
        return wrap


def instrument(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``obj.name`` by ``wrap(obj.name)`` as an instance attribute (the class stays untouched)."""
    setattr(obj, name, wrap(getattr(obj, name)))


# -- the machine's rates at this thread count ---------------------------------------------------------------------------
def best_cpu_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Least process CPU time of ``repeats`` calls (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes``-byte fp32 tensors, counting the read and the write (STREAM's copy);
    both in huge pages, as ``varkit bench floor`` reads (:func:`varkit.bench.floor.bandwidth_buffer`)."""
    from .floor import bandwidth_buffer

    n = max(nbytes // 4, 1024)
    src, dst = bandwidth_buffer(n, torch.device("cpu")).fill_(1), bandwidth_buffer(n, torch.device("cpu"))
    return 2 * src.nbytes / best_cpu_seconds(lambda: dst.copy_(src), repeats)


def gemm_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a ``size``³ matmul in ``dtype``."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2 * size ** 3 / best_cpu_seconds(lambda: a @ b, repeats)


def conv_rate(dtype: torch.dtype = torch.float32, channels: int = 128, hw: int = 256, repeats: int = 4) -> float:
    """FLOP/s of a 3x3 ``channels``→``channels`` convolution on a ``hw``² map: a VAE decoder's dominant layer."""
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
    x = torch.randn(1, channels, hw, hw).to(dtype)
    with torch.inference_mode():
        t = best_cpu_seconds(lambda: conv(x), repeats)
    return 2 * 9 * channels * channels * hw * hw / t


def measure_machine(sizes: dict[str, int], dtypes: list[torch.dtype], big_bytes: int = 1 << 30,
                    conv_hw: int = 256, gemm_size: int = 2048) -> dict[str, Any]:
    """Copy bandwidths (a ``big_bytes`` copy; one the size of each ``sizes`` entry, e.g. a head's weights in a
    dtype), GEMM rates per dtype (the best of an n³ and an (n/2)³ matmul), the conv rate (the best at two map sizes):
    the denominators of every part's floor."""
    bw = {"large": copy_bandwidth(big_bytes, repeats=8)}
    for name, nbytes in sizes.items():
        bw[name] = copy_bandwidth(nbytes, repeats=20)
    return {
        "bandwidth_Bps": bw,
        "gemm_flops": {str(dt).replace("torch.", ""): max(gemm_rate(dt, gemm_size), gemm_rate(dt, max(gemm_size // 2, 64)))
                       for dt in dtypes},
        "gemm_size": gemm_size,
        "conv_flops": max(conv_rate(hw=conv_hw), conv_rate(hw=max(conv_hw // 2, 8))),
        "big_copy_bytes": big_bytes,
        "clock": "process_time",
    }


def best_machine(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The faster of two measurements of every rate (each is a lower bound of what the machine can do)."""
    if a is None:
        return b
    out = dict(b)
    for key in ("bandwidth_Bps", "gemm_flops"):
        out[key] = {k: max(a[key].get(k, 0.0), v) for k, v in b[key].items()}
    out["conv_flops"] = max(a["conv_flops"], b["conv_flops"])
    return out


def machine_rates(own: dict[str, Any], floor: dict[str, Any] | None, sizes: dict[str, int]) -> dict[str, Any]:
    """The best of a bench's own rates (:func:`measure_machine`) and ``varkit bench floor``'s measurement (each a
    lower bound of what the machine can do): the denominators of every floor."""
    from .floor import bandwidth_for, peak_rate

    if floor is None:
        return own
    bw = dict(own["bandwidth_Bps"])
    bw["large"] = max(bw["large"], bandwidth_for(floor, own["big_copy_bytes"]))
    for k, v in sizes.items():
        bw[k] = max(bw[k], bandwidth_for(floor, v))
    gemm = {k: max(v, peak_rate(floor, k)) for k, v in own["gemm_flops"].items()}
    return {**own, "bandwidth_Bps": bw, "gemm_flops": gemm}


def floor_cache_rates(settings: dict[str, Any], use: bool, verbose: bool) -> dict[str, Any] | None:
    """``varkit bench floor``'s per-machine measurement (a quick one made first if none is cached) where ``use``, noted
    in ``settings["floor_cache"]``: :func:`machine_rates` takes the better of its rates and a bench's own, so every
    part-wise floor is at least as high as the floor the other benches use."""
    from .floor import get_floor

    floor = get_floor(quick=True, verbose=verbose) if use else None
    settings["floor_cache"] = None if floor is None else {
        "key": floor.get("key"), "date": floor.get("date"), "quick": floor.get("quick"),
        "peak_gemm_flops": floor.get("peak_gemm_flops")}
    return floor


def rate_measurer(settings: dict[str, Any], sizes: dict[str, int], dtypes: set[torch.dtype], big_bytes: int,
                  conv_hw: int, gemm_size: int, floor: dict[str, Any] | None) -> Callable[[], None]:
    """A ``measure()`` for a bench's outer loop: (re)measures the rates, appends the measurement to
    ``settings["machine_measurements"]`` and keeps the best so far, with ``floor``'s, in ``settings["machine"]``."""
    def measure() -> None:
        t0 = time.perf_counter()
        m = measure_machine(sizes, sorted(dtypes, key=str), big_bytes, conv_hw=conv_hw, gemm_size=gemm_size)
        settings.setdefault("machine_measurements", []).append(m)
        settings["machine"] = best_machine(settings.get("machine"), machine_rates(m, floor, sizes))
        settings["floors_s"] = settings.get("floors_s", 0.0) + time.perf_counter() - t0
    return measure


# -- a part-wise bench's output ------------------------------------------------------------------------------------------
def batch_saver(name: str, out_dir) -> Callable[[list, list, dict], None]:
    """An ``on_batch`` that writes the rows so far (the part rows in the settings) after every batch size, so that a
    long bench killed midway keeps what it measured."""
    from .report import save_results

    def save(rows: list, parts: list, settings: dict) -> None:
        path = save_results(name, rows, settings | {"parts": parts}, out_dir)
        print(f"wrote {path} (batch sizes {sorted({r['batch'] for r in rows})})", flush=True)
    return save


def print_report(rows: list, parts: list, settings: dict, columns: list[str], part_columns: list[str]) -> None:
    """The rows' table, the part rows' table, the rates the floors divide by and the load during the runs."""
    import os

    from .report import print_table

    print_table(rows, columns)
    print()
    print_table(parts, part_columns)
    m = settings["machine"]
    print(f"\nfloors at {settings['threads']} thread(s) on {settings['cpu_model']}: copy bandwidth "
          + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in m["bandwidth_Bps"].items())
          + "; GEMM " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in m["gemm_flops"].items())
          + f"; 3x3 conv {m['conv_flops'] / 1e9:.0f} GFLOP/s")
    la = settings.get("loadavg_runs") or []
    if la:
        print(f"load average during the runs: {min(la):.2f} .. {max(la):.2f} (machine has {os.cpu_count()} CPUs)")
