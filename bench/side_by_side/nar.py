"""``varkit bench nar`` with NAR's own sampling loop added (a ThisisBillhe/NAR checkout), on the same weights.

    python bench/side_by_side/nar.py --official ../NAR --batch 1 8 --threads 1

(or ``varkit bench nar --official ../NAR``, which runs this script from a source checkout of varkit).

The rows are :mod:`varkit.bench.nar`'s plus ``official``/``neighbors``: NAR's own ``generate``
(``autoregressive/models/generate.py`` of the source tree) on the weights of varkit's NAR generator, loaded into
NAR's ``Transformer`` (the names are the same), in the same dtype (NAR's ``--precision``), with the same sampling
settings, timed round-robin with varkit's rows; ``vs_official`` and ``cpu_vs_official`` compare every row with it.

``--device cuda``: both loops on the GPU, in bf16 unless ``--dtype`` says otherwise (NAR's
``autoregressive/sample/sample_c2i.py`` casts the model to ``--precision``, default bf16); see :mod:`varkit.bench.nar`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from varkit.bench.nar import add_nar_arguments, cmd_bench_nar
from varkit.bench.official import import_checkout, script_main
from varkit.errors import InvalidArgumentError


def load_official(path: str | Path):
    """NAR's ``gpt`` and ``generate`` modules, imported from the source tree ``path`` (NAR-images, or the checkout)."""
    root = Path(path)
    if (root / "NAR-images").is_dir() and not (root / "autoregressive").is_dir():
        root = root / "NAR-images"  # the checkout's root: its image code is in NAR-images
    gpt, gen = import_checkout(root, "autoregressive/models/generate.py",
                               ["autoregressive.models.gpt", "autoregressive.models.generate"], "NAR's source tree",
                               "pass the NAR-images folder of a ThisisBillhe/NAR checkout")
    gen.tqdm = lambda it, **kw: it  # its progress bar only
    return gpt, gen


def official_model(gpt_module, nar_gen) -> torch.nn.Module:
    """NAR's ``Transformer`` holding ``nar_gen``'s weights (the names are the same)."""
    from varkit.checkpoints.nar import nar_state_dict_to_official

    c = nar_gen.config
    args = gpt_module.ModelArgs(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, multiple_of=c.multiple_of,
                                ffn_dim_multiplier=c.ffn_dim_multiplier, norm_eps=c.norm_eps, vocab_size=c.vocab_size,
                                num_classes=c.num_classes, block_size=c.grid ** 2, cls_token_num=c.cls_token_num,
                                model_type="c2i", medusa_attention_num=c.medusa_layers)
    model = gpt_module.Transformer(args)
    model.load_state_dict(nar_state_dict_to_official(nar_gen.state_dict()), strict=True)
    return model.eval()


def official_runner(gen_module, model, batch: int, params):
    """A call that samples ``batch`` images with NAR's own ``generate``; it returns the forward passes."""
    grid = model.grid_size
    cond = torch.arange(batch, device=next(model.parameters()).device) % model.num_classes
    calls = {"n": 0}
    forward = type(model).forward

    def counting(*a, **kw):
        calls["n"] += 1
        return forward(model, *a, **kw)

    def run():
        calls["n"] = 0
        torch.manual_seed(0)
        model.forward = counting
        try:
            gen_module.generate(model, cond, grid * grid, cfg_scale=params.cfg, cfg_interval=-1,
                                temperature=params.temperature, top_k=params.top_k or 0,
                                top_p=params.top_p if params.top_p is not None else 1.0, sample_logits=True)
        finally:
            del model.forward
        return calls["n"]

    return run


def bench_official(gen_module, model, name: str, batch: int, params, repeats: int) -> dict:
    """One row of NAR's own loop (the fastest of ``repeats`` calls)."""
    from varkit.bench.nar import _best, _row

    return _row(name, "official", "neighbors", batch, _best(official_runner(gen_module, model, batch, params), repeats))


def official_loop(path: str | Path, device: str | torch.device = "cpu"):
    """The hook :func:`varkit.bench.nar.run_bench` takes: NAR's loop on each class-conditional NAR generator (on
    ``device``, as sample_c2i.py puts it: ``.to(device=device, dtype=precision)``)."""
    gpt, loop = load_official(path)
    dev = torch.device(device)

    def for_generator(nar_gen, dtype: torch.dtype):
        if nar_gen.config.caption_dim:  # NAR's c2i loop only
            return None
        model = official_model(gpt, nar_gen)
        model = model.to(device=dev, dtype=dtype) if dev.type == "cuda" else model.to(dtype)
        return lambda batch, params: official_runner(loop, model, batch, params)

    return for_generator


def cmd_side_by_side(args) -> None:
    from varkit.device import resolve_device

    dev = resolve_device(getattr(args, "device", None) or "cpu")  # cuda without a GPU: one line, before anything runs
    if not args.official:
        raise InvalidArgumentError("--official PATH (NAR's source tree: a ThisisBillhe/NAR checkout) is required")
    cmd_bench_nar(args, official_loop(args.official, dev))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/side_by_side/nar.py", description=__doc__.split("\n\n")[0])
    add_nar_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return script_main(Path(__file__).name, build_parser(), cmd_side_by_side, argv)


if __name__ == "__main__":
    raise SystemExit(main())
