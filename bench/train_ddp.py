"""Loss curves of the same training on 1 process, on 2 gloo processes (``--nproc 2``) and on 1 process with
``--grad-accum 2``: the same global batch, the same data order, so the curves agree up to the random draws
(class dropout, dropout) that ranks > 0 make from their own seeds.

    nice -n 10 python bench/train_ddp.py --steps 300 --out bench/results/train_ddp.json

Each run is ``varkit train generator`` on the digits with the bundled digits tokenizer; the JSON records every
logged loss, the mean over the last 50 steps, wall time and the CPU time of the run's processes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {"1 process": [], "2 processes (gloo)": ["--nproc", "2"], "1 process, --grad-accum 2": ["--grad-accum", "2"]}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--config", default="digits-raster")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench/results/train_ddp.json")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            cmd = ["varkit", "train", "generator", "--data", "digits", "--tokenizer", "varkit/assets/digits/tokenizer",
                   "--config", args.config, "--resolution", "32", "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--lr", "1e-3", "--warmup", "50", "--log-every", "10", "--ckpt-every",
                   str(args.steps), "--device", "cpu", "--out", str(out), *extra]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "varkit.cli", *cmd[1:]], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            log = [json.loads(x) for x in (out / "train-generator" / "log.jsonl").read_text().splitlines()]
            tail = [r["loss"] for r in log if r["step"] > args.steps - 50]
            rows.append({"run": name, "command": " ".join(cmd), "wall_s": round(wall, 1),
                         "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                         "final_loss_mean_last_50_steps": round(sum(tail) / len(tail), 4),
                         "loss": {r["step"]: round(r["loss"], 4) for r in log}})
            print(f"{name}: last-50 mean loss {rows[-1]['final_loss_mean_last_50_steps']}, {wall:.0f} s", flush=True)
    ref = rows[0]["loss"]
    for r in rows[1:]:
        diffs = [abs(r["loss"][s] - ref[s]) for s in ref]
        r["max_abs_diff_vs_1_process"] = round(max(diffs), 4)
        r["mean_abs_diff_vs_1_process"] = round(sum(diffs) / len(diffs), 4)
    result = {"benchmark": "train_ddp", "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
              "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "note": "same global batch and data order in every run; the 2-process run's rank 1 draws its own class "
                      "dropout / dropout, so its curve matches in distribution, not bit for bit",
              "config": args.config, "global_batch": args.batch_size, "steps": args.steps, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
