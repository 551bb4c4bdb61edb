"""``varkit convert <family>``: one sub-subcommand per published checkpoint family.

Each family is one entry of :data:`CONVERTERS`: its help line, the function adding its
arguments (a callable, or a ``"module:function"`` string imported when the parser is built),
and the ``"module:function"`` that runs it (imported only when the command runs, so
``varkit --help`` stays fast). To add a family, add an entry; nothing else changes.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Converter:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str  # or "package.module:function"
    run: str  # "package.module:function", called with the parsed args


def _llamagen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", required=True, help="LlamaGen VQ tokenizer file (vq_ds16_c2i.pt, vq_ds8_c2i.pt, vq_ds16_t2i.pt)")
    p.add_argument("--gpt", required=True, help="LlamaGen GPT file (c2i_B_256.pt ... c2i_3B_384.pt, t2i_XL_stage1_256.pt)")
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, unless --overwrite)")
    p.add_argument("--config", default=None,
                   help="named config (llamagen-b|l|xl|xxl|3b or GPT-B ...); default: inferred from the weights")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size the GPT was trained at (256, 384, 512); default: from the file name "
                        "(c2i_L_384.pt -> 384) or a stored freqs_cis")
    p.add_argument("--ema", action="store_true", help="use the GPT file's 'ema' weights when it has them")
    p.add_argument("--name", default=None, help="pipeline name stored in config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete)")


CONVERTERS: dict[str, Converter] = {
    "llamagen": Converter(
        "LlamaGen VQ + GPT checkpoints (c2i and t2i) -> a varkit pipeline folder",
        _llamagen_arguments,
        "varkit.checkpoints.llamagen:cmd_convert_llamagen",
    ),
    "var": Converter(
        "VAR VQVAE + transformer (var_d16 ... var_d30, 512-px var_d36) -> a varkit pipeline folder",
        "varkit.checkpoints.var:add_convert_var_arguments",
        "varkit.checkpoints.var:cmd_convert_var",
    ),
    "nar": Converter(
        "NAR (next-neighbour) GPT + LlamaGen VQ checkpoints -> a varkit pipeline folder",
        "varkit.checkpoints.nar:add_nar_arguments",
        "varkit.checkpoints.nar:cmd_convert_nar",
    ),
    "mar": Converter(
        "MAR (masked AR, diffusion loss) checkpoint + its KL-16 VAE (mar_base/large/huge) -> a varkit pipeline folder",
        "varkit.checkpoints.mar:add_convert_mar_arguments",
        "varkit.checkpoints.mar:cmd_convert_mar",
    ),
    "flowar": Converter(
        "FlowAR (next-scale, flow-matching head) FlowAR-S/L/H.pth + MAR's KL-16 VAE -> a varkit pipeline folder",
        "varkit.checkpoints.flowar:add_convert_flowar_arguments",
        "varkit.checkpoints.flowar:cmd_convert_flowar",
    ),
}


def _resolve(target: str) -> Callable:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _runner(target: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        _resolve(target)(args)

    return run


def add_convert_parser(subparsers) -> None:
    """Add ``convert`` with one sub-subcommand per entry of :data:`CONVERTERS`."""
    c = subparsers.add_parser("convert", help="convert published checkpoints into varkit model folders")
    families = c.add_subparsers(dest="family", required=True, metavar="{" + ",".join(CONVERTERS) + "}")
    for name, conv in CONVERTERS.items():
        p = families.add_parser(name, help=conv.help, description=conv.help)
        add = _resolve(conv.add_arguments) if isinstance(conv.add_arguments, str) else conv.add_arguments
        add(p)
        p.set_defaults(func=_runner(conv.run))
