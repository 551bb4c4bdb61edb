"""Shared fixtures: tiny random models that run in milliseconds."""
from __future__ import annotations

import pytest
import torch

from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.tokenizers import VQConfig, VQTokenizer


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference-feature caches (varkit eval) go to a per-session folder, never the user's home."""
    import os

    old = os.environ.get("VARKIT_CACHE")
    os.environ["VARKIT_CACHE"] = str(tmp_path_factory.mktemp("varkit-cache"))
    yield
    if old is None:
        os.environ.pop("VARKIT_CACHE", None)
    else:
        os.environ["VARKIT_CACHE"] = old


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random weights large enough that logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def toy_model(seed: int, std: float = 1.0, **kw) -> torch.nn.Module:
    """2×2 grid, 4 tokens, 2 classes: 4^4 = 256 sequences per class, far from uniform; small enough that
    exactness tests enumerate its whole distribution (tests/stats_helpers.py)."""
    cfg = {"grid": 2, "vocab_size": 4, "num_classes": 2, "dim": 16, "n_layer": 1, "n_head": 2} | kw
    return randomize(create_model("raster-tiny", **cfg), std=std, seed=seed)


@pytest.fixture(scope="module")
def toy():
    return toy_model(1)


@pytest.fixture
def tiny_gen():
    return randomize(create_model("raster-tiny"))


@pytest.fixture
def tiny_pipeline(tmp_path):
    tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                               codebook_dim=4, norm_groups=4)).eval()
    gen = randomize(create_model("raster-tiny"))
    return Pipeline(tok, gen, {"cfg": 1.0}, name="tiny")
