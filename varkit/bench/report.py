"""Benchmark bookkeeping: timing, peak memory, the table and the JSON file."""
from __future__ import annotations

import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ..io import write_json


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed(fn, *, repeats: int = 1, sync: bool = False):
    """(result of the last call, best wall seconds over ``repeats``)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


def add_output_args(parser, name: str) -> None:
    """``--name`` and ``--out-dir`` of every benchmark: where :func:`save_results` writes its JSON."""
    parser.add_argument("--name", default=name)
    parser.add_argument("--out-dir", default="bench/results")


def add_sampler_run_args(parser) -> None:
    """Options shared by the sampler benchmarks (bundled model + large random model, one table)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--skip-bundled", action="store_true")
    parser.add_argument("--skip-large", action="store_true")


def save_results(name: str, rows: list[dict[str, Any]], settings: dict[str, Any], out_dir: str | Path,
                 floor: dict[str, Any] | None = None) -> Path:
    """Write the bench JSON; ``floor``: this machine's bandwidth/GEMM measurement the rows' floors came from
    (default: the cached one at this thread count, a quick one measured first if there is none;
    :mod:`varkit.bench.floor`)."""
    from .floor import get_floor

    device = str(settings.get("device") or "cpu") if isinstance(settings, dict) else "cpu"
    if floor is None:
        floor = get_floor("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu", quick=True,
                          verbose=True)
    path = Path(out_dir) / f"{name}.json"
    write_json(path, {"benchmark": name, "machine": machine(), "settings": settings, "rows": rows,
                      "floor": floor, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path
