"""The arguments of each ``varkit convert`` family, in a module without torch.

``varkit convert --help`` and ``varkit convert var --help`` build every family's parser; importing the
converters for that (torch, the models, the tokenizers) cost seconds. The converters import these
functions from here, so each family's arguments are still defined once.
"""
from __future__ import annotations

import argparse

__all__ = ["add_pair_arguments", "add_output_arguments", "add_convert_llamagen_arguments",
           "add_convert_var_arguments", "add_nar_arguments", "add_convert_mar_arguments",
           "add_convert_flowar_arguments", "add_convert_dd_arguments"]


def add_pair_arguments(p: argparse.ArgumentParser, tokenizer: tuple[str, str], generator: tuple[str, str]) -> None:
    """The first arguments of a ``varkit convert`` command: its two source files as (flag, help) and ``--out``."""
    for flag, text in (tokenizer, generator):
        p.add_argument(flag, required=True, help=text)
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, unless --overwrite)")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """``--name`` and ``--overwrite``, the last arguments of every ``varkit convert`` command."""
    p.add_argument("--name", default=None, help="pipeline name stored in config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete)")


def add_convert_llamagen_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert llamagen``."""
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


def add_convert_var_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert var``."""
    add_pair_arguments(p, ("--vae", "VAR's VQVAE file (vae_ch160v4096z32.pth)"),
                       ("--var", "VAR transformer file (var_d16.pth ... var_d30.pth, var_d36.pth)"))
    p.add_argument("--resolution", type=int, default=None,
                   help="image size (256, 512); default: the schedule stored in the file (lvl_1L)")
    p.add_argument("--patch-nums", default=None, help="explicit scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16")
    add_output_arguments(p)


def add_nar_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert nar``."""
    add_pair_arguments(p, ("--vq", "LlamaGen VQ tokenizer file (vq_ds16_c2i.pt)"),
                       ("--gpt", "NAR GPT file (e.g. last_version.pt from NAR-imagenet-256-B)"))
    p.add_argument("--config", default=None, help="named config (nar-b|m|l|xl or GPT-B ...); default: inferred")
    p.add_argument("--image-size", default=None,
                   help="image size the GPT was trained at (default 256 for class-conditional NAR models)")
    p.add_argument("--medusa-layers", type=int, default=1,
                   help="extra layers under the vertical head (NAR's medusa_attention_num; 1 in every published model)")
    p.add_argument("--ema", action="store_true", help="use the file's 'ema' weights when it has them")
    add_output_arguments(p)


def add_convert_mar_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert mar``."""
    add_pair_arguments(p, ("--vae", "MAR's KL-16 VAE file (kl16.ckpt)"),
                       ("--mar", "MAR file (checkpoint-last.pth of mar_base, mar_large or mar_huge)"))
    p.add_argument("--size", default=None, help="base|large|huge; default: inferred from the weights")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the file's 'model' weights instead of its EMA weights ('model_ema', MAR's sampling default)")
    p.add_argument("--heads", type=int, default=None, help="attention heads, for a MAR of a non-published size")
    add_output_arguments(p)


def add_convert_flowar_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert flowar``."""
    add_pair_arguments(p, ("--vae", "MAR's KL-16 VAE file (kl16.ckpt), which FlowAR uses"),
                       ("--flowar", "FlowAR file (FlowAR-S.pth, FlowAR-L.pth or FlowAR-H.pth)"))
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="for a training checkpoint: its 'model' weights instead of 'model_ema' (published files are raw)")
    p.add_argument("--heads", type=int, default=None, help="attention heads, for a FlowAR of a non-published size")
    add_output_arguments(p)


def add_convert_dd_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``varkit convert dd``."""
    p.add_argument("--tokenizer", "--vq", "--vae", dest="tokenizer", required=True,
                   help="the teacher's tokenizer: LlamaGen's VQ (vq_ds16_c2i.pt) for LlamaGen-DD, VAR's VQVAE "
                        "(vae_ch160v4096z32.pth) for VAR-DD, or a varkit tokenizer or pipeline folder")
    p.add_argument("--dd", required=True, help="DD student file (llamagen-B.pt, llamagen-L.pt, var-d16.pth ... var-d24.pth)")
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, unless --overwrite)")
    p.add_argument("--image-size", type=int, default=None,
                   help="LlamaGen-DD: image size the student was trained at (default 256, as both published ones)")
    p.add_argument("--timesteps", default=None,
                   help="layout steps the student was trained from (official t_list), e.g. 0,80; default: the "
                        "published size's (needed for another size)")
    p.add_argument("--split", type=int, default=None,
                   help="layout step from which the continuous output is used (official split_t / loss_split_t); "
                        "default: the published size's")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the raw weights ('model', trainer.var_wo_ddp) instead of the EMA ones (the official default)")
    add_output_arguments(p)
