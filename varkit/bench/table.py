"""``varkit bench table``: the README's speed table, from the JSON the speed benches wrote.

Every speed bench (``decode``, ``llamagen``, ``var``, ``nar``, ``mar``, ``flowar``) stores its rows with their
floor (:mod:`varkit.bench.floor`) and the machine it ran on. This command reads the latest file of each and prints
one markdown table: per generator, implementation, dtype and batch, the seconds per image, the ratio to the
official loop measured in the same run, the fraction of the machine's floor and, where the bench probed the host's
read rate next to its runs (:class:`varkit.bench.floor.HostReadProbe`), the fraction of the floor at that rate (``of
live floor``). It measures nothing itself, so a table is only as recent as the runs it quotes: the ``date`` and
``cpu`` columns say which.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidArgumentError

#: file stem -> the generator it times (files absent from a results folder are skipped)
SPEED_FILES = {
    "llamagen_side_by_side": "raster (LlamaGen-B)",
    "var_side_by_side": "scales (VAR-d16)",
    "var_side_by_side_auto": "scales (VAR-d16)",
    "var_side_by_side_compiled_b1": "scales (VAR-d16)",
    "var_side_by_side_b8_auto": "scales (VAR-d16)",
    "nar_side_by_side": "neighbors (NAR-B)",
    "nar_side_by_side_auto": "neighbors (NAR-B)",
    "mar": "sets + diffusion head (MAR-B)",
    "mar_b8": "sets + diffusion head (MAR-B)",
    "flowar": "scales + flow head (FlowAR-S)",
}
COLUMNS = ["generator", "impl", "dtype", "compiled", "batch", "s/image", "vs official", "fraction of floor",
           "of live floor", "notes", "cpu", "date"]


def _first(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return None


def _cpu_name(floor: dict[str, Any] | None) -> str:
    if not floor:
        return "?"
    if floor.get("device", "cpu") != "cpu":
        return str(floor.get("gpu") or floor.get("device"))
    cpu = floor.get("cpu") or {}
    return f"{cpu.get('model', '?')} ({cpu.get('bf16_isa') or cpu.get('torch_capability', '?')}), " \
           f"{floor.get('threads', '?')} thread(s)"


def speed_rows(doc: dict[str, Any], generator: str) -> list[dict[str, Any]]:
    """The table rows of one bench JSON: its timed rows normalised to seconds per image (CPU seconds where the
    bench measured them), ratio to the official loop and fraction of floor."""
    settings = doc.get("settings") or {}
    gpu = (doc.get("floor") or {}).get("device", "cpu") != "cpu"  # a GPU run: wall seconds (CPU seconds mean nothing)
    out = []
    for r in doc.get("rows") or []:
        if r.get("mode") not in (None, "kv-cache") or r.get("layout") == "raster" and "neighbors" in generator:
            continue  # decode's no-cache baseline, NAR's raster comparison
        if r.get("part") is not None:
            continue
        batch = int(r.get("batch") or 1)
        per_image = _first(r, "s_per_image") if gpu else _first(r, "cpu_s_per_image", "s_per_image")
        if per_image is None:
            total = _first(r, "wall_s") if gpu else _first(r, "cpu_s", "wall_s")
            per_image = total / batch if total is not None else None
        fraction = r.get("fraction_of_floor")
        if fraction is None and r.get("x_floor"):
            fraction = 1 / r["x_floor"]
        dtype = str(_first(r, "dtype") or settings.get("dtype") or "float32").replace("torch.", "")
        compiled = r["compiled"] if "compiled" in r else ("yes" if settings.get("compile") and r.get("impl") == "varkit" else "")
        notes = [f"head_steps={r['head_steps']}" for _ in [0] if isinstance(r.get("head_steps"), str) and ":" in r["head_steps"]]
        notes += ["prepacked"] if r.get("prepacked") in (True, "yes") and r.get("impl") == "varkit" else []
        ratio = _first(r, "vs_official", "speedup") if gpu else _first(r, "cpu_vs_official", "speedup_cpu", "vs_official")
        out.append({"generator": generator, "impl": r.get("impl", "varkit"), "dtype": dtype,
                    "compiled": "yes" if compiled in (True, "yes") else (compiled if isinstance(compiled, str) else ""),
                    "batch": batch, "s/image": per_image, "vs official": ratio,
                    "fraction of floor": fraction, "of live floor": r.get("fraction_of_live_floor"),
                    "cpu": _cpu_name(doc.get("floor")),
                    "notes": ", ".join(notes), "date": str(doc.get("date", ""))[:10]})
    return out


def collect(results_dir: str | Path, stems: Iterable[str] = SPEED_FILES, suffix: str = "") -> list[dict[str, Any]]:
    """Rows of every speed bench JSON found in ``results_dir`` (``<stem><suffix>.json``: a suffix names another
    machine's runs, e.g. ``_zen4``)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise InvalidArgumentError(f"{d} is not a folder; pass --results-dir with the benches' JSON (bench/results)")
    rows = []
    for stem in stems:
        path = d / f"{stem}{suffix}.json"
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"{path} is not a bench JSON ({e}); re-run the bench that writes it") from None
        rows += speed_rows(doc, SPEED_FILES.get(stem, stem))
    if not rows:
        raise InvalidArgumentError(f"no speed bench results in {d}: run varkit bench llamagen|var|nar|mar|flowar first")
    return rows


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "–"
    if col == "s/image":
        return f"{v:.3g} s"
    if col == "vs official":
        return f"{v:.2f}×"
    if col in ("fraction of floor", "of live floor"):
        return f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def cmd_bench_table(args: argparse.Namespace) -> None:
    print(markdown(collect(args.results_dir, suffix=args.suffix)))


def add_table_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("table", help="the README speed table (s/image, ratio to the official loop, "
                                    "fraction of floor) from the speed benches' JSON; measures nothing")
    p.add_argument("--results-dir", default="bench/results")
    p.add_argument("--suffix", default="", help="read <bench><suffix>.json (another machine's runs, e.g. _zen4)")
    p.set_defaults(func=cmd_bench_table)
    return p
