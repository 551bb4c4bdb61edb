"""``varkit convert <family>``: one sub-subcommand per published checkpoint family.

Each family is one entry of :data:`CONVERTERS`: its help line, the function adding its
arguments (a callable, or a ``"module:function"`` string imported when the parser is built),
and the ``"module:function"`` that runs it (imported only when the command runs, so
``varkit --help`` stays fast). The argument functions live in :mod:`varkit.checkpoints.arguments`, which
imports no torch, so ``varkit convert [FAMILY] --help`` is as fast. To add a family, add an entry.
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


CONVERTERS: dict[str, Converter] = {
    "llamagen": Converter(
        "LlamaGen VQ + GPT checkpoints (c2i and t2i) -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_convert_llamagen_arguments",
        "varkit.checkpoints.llamagen:cmd_convert_llamagen",
    ),
    "var": Converter(
        "VAR VQVAE + transformer (var_d16 ... var_d30, 512-px var_d36) -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_convert_var_arguments",
        "varkit.checkpoints.var:cmd_convert_var",
    ),
    "nar": Converter(
        "NAR (next-neighbour) GPT + LlamaGen VQ checkpoints -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_nar_arguments",
        "varkit.checkpoints.nar:cmd_convert_nar",
    ),
    "mar": Converter(
        "MAR (masked AR, diffusion loss) checkpoint + its KL-16 VAE (mar_base/large/huge) -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_convert_mar_arguments",
        "varkit.checkpoints.mar:cmd_convert_mar",
    ),
    "flowar": Converter(
        "FlowAR (next-scale, flow-matching head) FlowAR-S/L/H.pth + MAR's KL-16 VAE -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_convert_flowar_arguments",
        "varkit.checkpoints.flowar:cmd_convert_flowar",
    ),
    "dd": Converter(
        "Distilled Decoding students (LlamaGen-DD B/L, VAR-DD d16/d20/d24) + the teacher's tokenizer -> a varkit pipeline folder",
        "varkit.checkpoints.arguments:add_convert_dd_arguments",
        "varkit.checkpoints.dd:cmd_convert_dd",
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
