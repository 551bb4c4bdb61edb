"""``varkit bench llamagen --official PATH``: LlamaGen's own ``generate`` vs varkit on the same GPT-B weights.

The comparison imports LlamaGen's code from the user's checkout, so it is not part of the package: it is the script
``bench/side_by_side/llamagen.py`` of varkit's repository, which this command runs from a source checkout
(:mod:`varkit.bench.scripts`). varkit's own decode rows (KV cache vs re-encoding, bundled and GPT-B random) are
``varkit bench decode``.
"""
from __future__ import annotations

import argparse

from .report import add_output_args


def add_llamagen_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``varkit bench llamagen`` and of ``bench/side_by_side/llamagen.py``."""
    p.add_argument("--official", required=True, help="path of a LlamaGen checkout (FoundationVision/LlamaGen)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000, help="top-k of the timed (sampling) runs; LlamaGen's demo default")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 varkit runs")
    p.add_argument("--compile", action="store_true",
                   help="also time varkit with its compiled decode step (torch.compile; the compile run is not timed)")
    p.add_argument("--prepack", action="store_true",
                   help="also time varkit's eager rows on oneDNN-prepacked weights (load_pipeline's default on GPT-B)")
    p.add_argument("--inductor", action="store_true",
                   help="cuda: also time varkit bf16 with CUDA graphs over inductor's fused step "
                        "(compile_decoding(inductor=True); its compile run is not timed)")
    p.add_argument("--greedy-batch", type=int, default=None,
                   help="images for the greedy agreement check (0 = skip; default 8 on cpu, 2 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; the best counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (default) or cuda: both loops on the GPU, LlamaGen's in bf16 (its sample_c2i.py default "
                        "--precision bf16), varkit's in bf16 and fp32 (and compiled: CUDA graphs, with --compile); "
                        "--prepack is CPU-only (ignored on cuda)")
    add_output_args(p, "llamagen_side_by_side")
    p.set_defaults(name=None)  # llamagen_side_by_side, + "_cuda" on --device cuda


def cmd_bench_llamagen(args) -> None:
    from .scripts import load_script

    load_script("llamagen").cmd_side_by_side(args)


def add_side_by_side_parser(bench_subparsers) -> None:
    """Add ``varkit bench llamagen`` to the ``bench`` sub-parsers."""
    p = bench_subparsers.add_parser("llamagen", help="LlamaGen's generate vs varkit on the same GPT-B weights (CPU; "
                                    "runs bench/side_by_side/llamagen.py of a source checkout)")
    add_llamagen_arguments(p)
    p.set_defaults(func=cmd_bench_llamagen)
