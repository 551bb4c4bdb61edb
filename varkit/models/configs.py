"""The named configs of every published family, plus tiny ones for tests."""
from __future__ import annotations

from functools import partial

from .raster import RasterConfig, RasterGenerator
from .registry import register_config

# LlamaGen GPT sizes (layers, heads, dim); FFN hidden follows Llama's rule.
_LLAMAGEN = {"b": (12, 12, 768), "l": (24, 16, 1024), "xl": (36, 20, 1280), "xxl": (48, 24, 1536), "3b": (24, 32, 3200)}

for _name, (_layers, _heads, _dim) in _LLAMAGEN.items():
    register_config(
        f"llamagen-{_name}",
        RasterGenerator,
        partial(RasterConfig, n_layer=_layers, n_head=_heads, dim=_dim, grid=16),
        f"LlamaGen GPT-{_name.upper()} class-conditional, 16x16 tokens (256 px with VQ-16)",
    )

register_config(
    "raster-tiny",
    RasterGenerator,
    partial(RasterConfig, vocab_size=16, num_classes=4, dim=32, n_layer=2, n_head=2, grid=4, multiple_of=16,
            token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0),
    "tiny raster generator for tests",
)

register_config(
    "digits-raster",
    RasterGenerator,
    partial(RasterConfig, vocab_size=128, num_classes=10, dim=128, n_layer=4, n_head=4, grid=8, multiple_of=32),
    "the bundled digits generator: 8x8 tokens over the digits-vq tokenizer",
)
