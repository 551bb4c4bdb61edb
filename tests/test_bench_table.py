"""``varkit bench table``: the README speed table from the speed benches' JSON."""
import json
import subprocess
import sys

import pytest

from varkit.bench.table import collect, markdown
from varkit.errors import InvalidArgumentError

FLOOR = {"device": "cpu", "threads": 1, "cpu": {"model": "Some CPU", "bf16_isa": "avx2"}}


def _write(d, stem, rows, settings=None):
    (d / f"{stem}.json").write_text(json.dumps({"benchmark": stem, "date": "2026-12-03 10:00:00", "rows": rows,
                                                "settings": settings or {}, "floor": FLOOR}))


def test_rows_are_normalised_per_image(tmp_path):
    _write(tmp_path, "nar_side_by_side", [
        {"impl": "varkit", "layout": "neighbors", "batch": 8, "cpu_s": 4.0, "cpu_vs_official": 2.5, "fraction_of_floor": 0.7,
         "fraction_of_live_floor": 0.8125},
        {"impl": "varkit", "layout": "raster", "batch": 8, "cpu_s": 9.0},  # NAR's raster comparison: not a NAR row
    ], {"dtype": "bfloat16"})
    _write(tmp_path, "flowar", [{"impl": "varkit", "dtype": "float32", "batch": 1, "cpu_s_per_image": 3.0, "x_floor": 2.0,
                                 "head_steps": "25:5", "prepacked": True}])
    rows = collect(tmp_path)
    assert len(rows) == 2
    nar, flow = rows
    assert nar["s/image"] == 0.5 and nar["dtype"] == "bfloat16" and nar["vs official"] == 2.5  # 4 s over 8 images
    assert flow["fraction of floor"] == 0.5 and "head_steps=25:5" in flow["notes"]  # 1 / x_floor
    assert nar["of live floor"] == 0.8125 and flow["of live floor"] is None  # probed rows only
    assert "Some CPU (avx2), 1 thread(s)" == nar["cpu"]
    table = markdown(rows)
    assert table.count("\n") == 3 and "| 0.5 s |" in table and "2.50×" in table and "| 0.70 | 0.81 |" in table


def test_decode_keeps_the_cached_rows_only(tmp_path):
    _write(tmp_path, "llamagen_side_by_side", [
        {"impl": "llamagen", "dtype": "float32", "compiled": "", "batch": 1, "cpu_s": 10.0, "cpu_vs_official": 1.0},
        {"impl": "varkit", "dtype": "float32", "compiled": "yes", "batch": 1, "cpu_s": 5.0, "cpu_vs_official": 2.0,
         "fraction_of_floor": 0.8}], {"compile": True})
    rows = collect(tmp_path)
    assert [r["compiled"] for r in rows] == ["", "yes"]  # the row's own flag wins over the run's settings


def test_bad_input(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no speed bench results"):
        collect(tmp_path)
    (tmp_path / "mar.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not a bench JSON"):
        collect(tmp_path)
    r = subprocess.run([sys.executable, "-m", "varkit.cli", "bench", "table", "--results-dir", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr


def test_suffix_reads_another_machines_runs(tmp_path):
    _write(tmp_path, "llamagen_side_by_side", [{"impl": "varkit", "dtype": "float32", "batch": 1, "cpu_s": 5.0}])
    _write(tmp_path, "llamagen_side_by_side_zen4", [
        {"impl": "varkit", "dtype": "bfloat16", "prepacked": "yes", "batch": 1, "cpu_s": 2.0}])
    (zen4,) = collect(tmp_path, suffix="_zen4")
    assert zen4["dtype"] == "bfloat16" and zen4["s/image"] == 2.0 and zen4["notes"] == "prepacked"
    assert [r["dtype"] for r in collect(tmp_path)] == ["float32"]
    r = subprocess.run([sys.executable, "-m", "varkit.cli", "bench", "table", "--results-dir", str(tmp_path),
                        "--suffix", "_none"], capture_output=True, text=True)
    assert r.returncode == 2 and "no speed bench results" in r.stderr and "Traceback" not in r.stderr
