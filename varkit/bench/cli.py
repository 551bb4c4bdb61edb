"""``varkit bench``: run the benchmarks, print a table, write JSON under ``bench/results/``."""
from __future__ import annotations


from ..cli import add_device_argument
from ..device import resolve_device, resolve_dtype
from .report import add_output_args

COLUMNS = ["model", "mode", "batch", "tokens", "tokens_per_s", "ms_per_step", "forward_passes", "cache_bytes", "peak_rss_mb",
           "floor_s", "fraction_of_floor", "host_read_GBps", "fraction_of_live_floor"]


def cmd_bench_decode(args) -> None:
    import torch

    from ..models import create_model
    from ..pipeline import load_pipeline
    from ..samplers import SamplingParams
    from .decode import bench_decode, decode_traces
    from .floor import HostReadProbe, attach_floor, floor_basis, floor_summary, get_floor
    from .report import print_table, save_results

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or torch.float32
    rows = []
    targets = []
    if not args.skip_bundled:
        targets.append((args.bundled, load_pipeline(args.bundled, device=dev).generator.to(dtype)))
    if not args.skip_large:
        torch.manual_seed(0)
        gen = create_model(args.large).to(dev, dtype).eval()
        torch.nn.init.normal_(gen.output.weight, std=0.02)  # LlamaGen zero-inits the head; give it logits
        targets.append((args.large + "-random", gen))
    floor = get_floor(dev, verbose=True)
    # one thread: CPU seconds, which other processes on a shared machine inflate far less than wall time
    basis = floor_basis(dev)
    probe = HostReadProbe(floor, dev)  # the host's read rate before each timed run: fraction_of_live_floor
    for name, gen in targets:
        params = SamplingParams(cfg=args.cfg, top_k=args.top_k)
        traces = decode_traces(gen, params, args.nocache_steps)  # floors' work; warms the model up
        for b in args.batch:
            rows += attach_floor(bench_decode(gen, name, b, params, args.nocache_steps, probe=probe), traces, floor,
                                 seconds_key=basis, key=lambda r: r["mode"])
    probe.close()
    print_table(rows, COLUMNS)
    print(floor_summary(floor))
    print(f"fraction_of_floor = floor_s / {basis}")
    path = save_results(args.name, rows, vars(args) | {"func": None, "dtype": str(dtype), "fraction_of_floor_basis": basis},
                        args.out_dir, floor=floor)
    print(f"wrote {path}")


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: a table on stdout, JSON under bench/results/")
    bs = b.add_subparsers(dest="bench", required=True)
    d = bs.add_parser("decode", help="raster decode with the KV cache vs re-encoding the prefix")
    d.add_argument("--bundled", default="digits")
    d.add_argument("--large", default="llamagen-b", help="a generator config built with random weights")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    d.add_argument("--cfg", type=float, default=4.0)
    d.add_argument("--top-k", type=int, default=None)
    d.add_argument("--nocache-steps", type=int, default=32, help="tokens decoded by the no-cache baseline")
    add_device_argument(d)  # default auto, as every command
    d.add_argument("--dtype", default=None)
    d.add_argument("--skip-bundled", action="store_true")
    d.add_argument("--skip-large", action="store_true")
    add_output_args(d, "decode")
    d.set_defaults(func=cmd_bench_decode)

    from .sjd import add_sjd_bench_parser

    add_sjd_bench_parser(bs)

    from .nar import add_nar_bench_parser

    add_nar_bench_parser(bs)

    from .quality import add_quality_bench_parser

    add_quality_bench_parser(bs)

    from .var import add_var_bench_parser

    add_var_bench_parser(bs)

    from .llamagen_side_by_side import add_side_by_side_parser

    add_side_by_side_parser(bs)

    from .speculative import add_speculative_bench_parser

    add_speculative_bench_parser(bs)

    from .mar import add_mar_bench_parser

    add_mar_bench_parser(bs)

    from .dd import add_dd_bench_parser

    add_dd_bench_parser(bs)

    from .floor import add_floor_bench_parser

    add_floor_bench_parser(bs)

    from .flowar import add_flowar_bench_parser

    add_flowar_bench_parser(bs)

    from .var_accel import add_var_accel_bench_parser

    add_var_accel_bench_parser(bs)

    from .annealing import add_annealing_bench_parser

    add_annealing_bench_parser(bs)

    from .cspd import add_cspd_bench_parser

    add_cspd_bench_parser(bs)

    from .table import add_table_bench_parser

    add_table_bench_parser(bs)
