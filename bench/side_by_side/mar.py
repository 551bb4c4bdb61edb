"""``varkit bench mar`` with MAR's own ``sample_tokens`` + VAE decode added (an LTH14/mar checkout), same weights.

    python bench/side_by_side/mar.py --official ../mar --batch 1 8 --dtype float32 bfloat16

(or ``varkit bench mar --official ../mar``, which runs this script from a source checkout of varkit).

One process, the same random-init weights on every side: the generator's weights, drawn in MAR's key names by
:func:`varkit.bench.mar.random_weights`, are loaded into MAR's ``MAR``; one random KL-16 VAE in LDM names
(:func:`varkit.checkpoints.synthetic.mar_vae_state_dict`) is loaded into MAR's ``AutoencoderKL`` and, converted,
into :class:`~varkit.tokenizers.kl.KLTokenizer` for varkit's rows. Rows added to :mod:`varkit.bench.mar`'s:

- ``official``: MAR's ``sample_tokens`` + ``vae.decode`` (fp32; MAR's code calls ``.cuda()``, which is made the
  identity while it runs, and only then); ``--official-autocast`` adds a row under ``torch.autocast("cpu",
  bfloat16)``, as MAR's ``engine_mar.py`` samples under autocast on GPUs.

Each run is split into the same parts (transformer, head, decode) by wrappers around MAR's calls, and ``vs_official``
/ ``cpu_vs_official`` compare every row with MAR's fp32 loop.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from varkit.bench.mar import Side, Split, add_mar_arguments, bench_labels, chain_constant_numel, cmd_bench_mar, \
    linear_numel
from varkit.bench.partwise import instrument
from varkit.bench.official import cuda_as_identity, import_checkout, script_main
from varkit.errors import InvalidArgumentError


def load_official(root: str | os.PathLike):
    """MAR's ``models.mar`` and ``models.vae`` modules, imported from the checkout ``root``."""
    mar, vae = import_checkout(root, "models/mar.py", ["models.mar", "models.vae"], "a LTH14/mar checkout",
                               "clone https://github.com/LTH14/mar and pass its folder")
    return mar, vae


def official_mar(mar_module, cfg, sd: dict[str, torch.Tensor], head_steps: int) -> nn.Module:
    """MAR's ``MAR`` for the varkit config ``cfg`` holding the MAR-format weights ``sd`` (strict), eval mode."""
    if cfg.encoder_heads != cfg.decoder_heads:
        raise InvalidArgumentError("MAR's code has one head count for encoder and decoder; pick a config where they agree")
    model = mar_module.MAR(
        img_size=cfg.grid * 16, vae_stride=16, patch_size=1, encoder_embed_dim=cfg.encoder_dim,
        encoder_depth=cfg.encoder_depth, encoder_num_heads=cfg.encoder_heads, decoder_embed_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), vae_embed_dim=cfg.token_dim, class_num=cfg.num_classes,
        buffer_size=cfg.buffer_size, diffloss_d=cfg.head_depth, diffloss_w=cfg.head_width,
        num_sampling_steps=str(head_steps))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def official_side(model: nn.Module, vae: nn.Module, settings: dict[str, Any], autocast: bool) -> Side:
    """MAR's loop: ``sample_tokens`` then ``vae.decode(tokens / 0.2325)`` under ``no_grad`` (as its engine)."""
    split = Split()
    instrument(model, "forward_mae_encoder", split.timed("transformer"))
    instrument(model, "forward_mae_decoder", split.timed("transformer"))
    instrument(model.diffloss, "sample", split.timed("head"))
    instrument(model.diffloss.net, "forward", split.count_rows())

    def run(batch: int):
        split.reset()
        torch.manual_seed(settings["seed"])
        np.random.seed(settings["seed"])
        labels = bench_labels(batch, model.num_classes)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.no_grad(), cuda_as_identity():
            with amp:
                tokens = model.sample_tokens(batch, num_iter=settings["num_iter"], cfg=settings["cfg"],
                                             cfg_schedule=settings["cfg_schedule"], labels=labels,
                                             temperature=settings["temperature"])
            with split.part("decode"):
                return vae.decode(tokens / settings["vae_scale"])

    dt = "bfloat16" if autocast else "float32"
    net = model.diffloss.net
    return Side("official", "float32+autocast-bf16" if autocast else "float32", run, split, linear_numel(net),
                2 if autocast else 4, chain_constant_numel(net), sum(p.numel() for n, p in model.named_parameters() if not n.startswith("diffloss.")),
                2 if autocast else 4, dt, False, head_gemm_dtype=dt)


def official_sides(root: str | os.PathLike, autocast: bool = False):
    """The hook :func:`varkit.bench.mar.run_bench` takes (:data:`varkit.bench.mar.OfficialSides`): MAR's loop on the
    generator's weights, and one random KL-16 VAE (LDM names) for both sides. MAR's code is imported first, so a
    wrong path fails before any weights are drawn."""
    mar_module, vae_module = load_official(root)

    def build(gen, mar_sd: dict, seed: int, settings: dict[str, Any]):
        from varkit.checkpoints.common import module_from_state_dict
        from varkit.checkpoints.mar_vae import MAR_KL16_CONFIG, kl_state_dict_from_ldm
        from varkit.checkpoints.synthetic import items_of, mar_vae_state_dict
        from varkit.tokenizers.kl import KLTokenizer

        cfg = gen.config
        if cfg.token_dim != 16:
            raise InvalidArgumentError("the official side decodes with MAR's KL-16 VAE: its config needs token_dim 16")
        off_gen = official_mar(mar_module, cfg, mar_sd, settings["head_steps"])
        off_vae = vae_module.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()
        vae_sd = mar_vae_state_dict(items_of(off_vae.state_dict()), seed + 100)
        off_vae.load_state_dict(vae_sd, strict=True)
        tok = module_from_state_dict(KLTokenizer, MAR_KL16_CONFIG, kl_state_dict_from_ldm(vae_sd), "random KL-16")
        settings["vae"] = "MAR KL-16 (random weights)"
        settings["official"] = str(Path(root).resolve())
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except OSError:
            commit = ""
        settings["official_commit"] = commit or None
        sides = [official_side(off_gen, off_vae, settings, False)]
        if autocast:
            sides.append(official_side(copy.deepcopy(off_gen), copy.deepcopy(off_vae), settings, True))
        return tok, sides

    return build


def cmd_side_by_side(args) -> None:
    if not args.official:
        raise InvalidArgumentError("--official PATH (an LTH14/mar checkout) is required")
    cmd_bench_mar(args, official_sides(args.official, args.official_autocast))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/side_by_side/mar.py", description=__doc__.split("\n\n")[0])
    add_mar_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return script_main(Path(__file__).name, build_parser(), cmd_side_by_side, argv)


if __name__ == "__main__":
    raise SystemExit(main())
