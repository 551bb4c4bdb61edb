"""The named configs of every published family, plus tiny ones for tests."""
from __future__ import annotations

from functools import partial

from .flowar import FlowARConfig, FlowARGenerator
from .mar import MARConfig, MARGenerator
from .neighbors import NeighborsConfig, NeighborsGenerator
from .raster import RasterConfig, RasterGenerator
from .scales import ScalesConfig, ScalesGenerator
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
register_config(
    "digits-draft",
    RasterGenerator,
    partial(RasterConfig, vocab_size=128, num_classes=10, dim=64, n_layer=2, n_head=2, grid=8, multiple_of=32),
    "a small drafter for the bundled digits generator (speculative decoding)",
)

# VAR: width 64·depth, heads = depth (head_dim 64); d36 is the 512-px shared-AdaLN model.
for _depth in (16, 20, 24, 30):
    register_config(
        f"var-d{_depth}",
        ScalesGenerator,
        partial(ScalesConfig, depth=_depth, dim=64 * _depth, n_head=_depth, drop_path=0.1 * _depth / 24),
        f"VAR-d{_depth}, 256 px, 10 scales over the ch160 multi-scale VQVAE",
    )
register_config(
    "var-d36",
    ScalesGenerator,
    partial(ScalesConfig, depth=36, dim=64 * 36, n_head=36, shared_aln=True, drop_path=0.1 * 36 / 24,
            patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
    "VAR-d36-s, 512 px, shared AdaLN",
)
register_config(
    "var-tiny",
    ScalesGenerator,
    partial(ScalesConfig, vocab_size=16, num_classes=4, depth=2, dim=32, n_head=2, vae_dim=4, patch_nums=(1, 2, 4)),
    "tiny next-scale generator for tests",
)
register_config(
    "digits-var",
    ScalesGenerator,
    partial(ScalesConfig, vocab_size=128, num_classes=10, depth=4, dim=128, n_head=4, vae_dim=8,
            patch_nums=(1, 2, 3, 4, 6, 8)),
    "the bundled digits next-scale generator over the digits-msvq tokenizer",
)
register_config(
    "digits-var-refiner",
    ScalesGenerator,
    partial(ScalesConfig, vocab_size=128, num_classes=10, depth=2, dim=128, n_head=4, vae_dim=8,
            patch_nums=(1, 2, 3, 4, 6, 8)),
    # digits-var's width (so --init-from digits-var copies its first blocks), half its depth
    "a small refiner for digits-var's last scales (collaborative decoding, CoDe)",
)
register_config(
    "digits-var-refiner-d1",
    ScalesGenerator,
    partial(ScalesConfig, vocab_size=128, num_classes=10, depth=1, dim=128, n_head=4, vae_dim=8,
            patch_nums=(1, 2, 3, 4, 6, 8)),
    # a quarter of digits-var's depth: CoDe at the default k (4 of 6) needs a refiner this cheap for 1.5x
    "a one-block refiner for digits-var's last scales (collaborative decoding at the default k)",
)

# NAR: LlamaGen's backbone + 1 extra layer under the vertical head (medusa_layers=1), 16x16 tokens in 31 fronts.
_NAR = {"b": (12, 12, 768), "m": (18, 16, 1024), "l": (24, 16, 1024), "xl": (36, 20, 1280), "xxl": (48, 24, 1536)}
for _name, (_layers, _heads, _dim) in _NAR.items():
    register_config(
        f"nar-{_name}",
        NeighborsGenerator,
        partial(NeighborsConfig, n_layer=_layers, n_head=_heads, dim=_dim, grid=16),
        f"NAR GPT-{_name.upper()} class-conditional, 16x16 tokens in 31 fronts (256 px with VQ-16)",
    )
register_config(
    "nar-tiny",
    NeighborsGenerator,
    partial(NeighborsConfig, vocab_size=16, num_classes=4, dim=32, n_layer=2, n_head=2, grid=4, multiple_of=16,
            token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0),
    "tiny neighbors (NAR) generator for tests",
)
register_config(
    "digits-nar",
    NeighborsGenerator,
    partial(NeighborsConfig, vocab_size=128, num_classes=10, dim=128, n_layer=4, n_head=4, grid=8, multiple_of=32),
    "the bundled digits NAR generator: 8x8 tokens in 15 fronts over the digits-vq tokenizer",
)

# MAR: encoder = decoder (dim, depth, heads), DiffLoss MLP (depth, width) as the published checkpoints;
# 256 px over the KL-16 VAE (16x16 latents of 16 channels), 64 buffer slots, 64 decode steps by default.
_MAR = {"base": (768, 12, 12, 6, 1024), "large": (1024, 16, 16, 8, 1280), "huge": (1280, 20, 16, 12, 1536)}
for _name, (_dim, _depth, _heads, _hd, _hw) in _MAR.items():
    register_config(
        f"mar-{_name}",
        MARGenerator,
        partial(MARConfig, encoder_dim=_dim, encoder_depth=_depth, encoder_heads=_heads, decoder_dim=_dim,
                decoder_depth=_depth, decoder_heads=_heads, head_depth=_hd, head_width=_hw, token_dim=16, grid=16),
        f"MAR-{_name[0].upper()} class-conditional, 16x16 continuous tokens (256 px with MAR's KL-16 VAE)",
    )
register_config(
    "mar-tiny",
    MARGenerator,
    partial(MARConfig, token_dim=4, grid=4, num_classes=4, encoder_dim=32, encoder_depth=2, encoder_heads=2,
            decoder_dim=48, decoder_depth=2, decoder_heads=3, buffer_size=4, head_depth=2, head_width=64,
            num_iter=4, head_steps=10, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0),
    "tiny MAR (sets layout + diffusion head) for tests",
)
register_config(
    "digits-mar",
    MARGenerator,
    partial(MARConfig, token_dim=4, grid=8, num_classes=10, encoder_dim=128, encoder_depth=2, encoder_heads=4,
            decoder_dim=128, decoder_depth=2, decoder_heads=4, buffer_size=8, head_depth=3, head_width=128,
            head_batch_mul=2, num_iter=16, head_steps=50, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0,
            x0_clip=4.0),
    # class dropout: `train generator --class-dropout`; sized for ~15 min of 1 CPU thread (the head's rows dominate)
    "the bundled digits MAR: 8x8 latents over the digits-kl tokenizer (token_dim from it), diffusion head",
)
register_config(
    "digits-mar-draft",
    MARGenerator,
    partial(MARConfig, token_dim=4, grid=8, num_classes=10, encoder_dim=128, encoder_depth=1, encoder_heads=4,
            decoder_dim=128, decoder_depth=1, decoder_heads=4, buffer_size=8, head_depth=2, head_width=128,
            head_batch_mul=2, num_iter=16, head_steps=50, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0,
            x0_clip=4.0),
    # digits-mar's widths with 1 of its 2 encoder/decoder blocks and 2 of its 3 head blocks (trained with
    # --init-from digits-mar): a drafter for continuous speculative decoding (sampler="cspd")
    "a small drafter for digits-mar (continuous speculative decoding): same tokenizer, layout and head steps",
)
register_config(
    "digits-maskgit",
    MARGenerator,
    partial(MARConfig, head="categorical", vocab_size=128, token_dim=0, grid=8, num_classes=10, encoder_dim=128,
            encoder_depth=2, encoder_heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4, buffer_size=8,
            num_iter=16, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0),  # sized for ~15 min of 1 CPU thread
    "MaskGIT-style digits generator: MAR's sets layout + a categorical head over the digits-vq tokenizer",
)

# MAR's causal "AR" variant: the raster generator carrying the diffusion head (no per-combination code)
register_config(
    "digits-ar-diffusion",
    RasterGenerator,
    partial(RasterConfig, head="diffusion", token_dim=4, num_classes=10, dim=128, n_layer=4, n_head=4, grid=8,
            multiple_of=32, head_depth=3, head_width=128, head_batch_mul=2, head_steps=50, x0_clip=4.0, token_dropout=0.0,
            resid_dropout=0.0, ffn_dropout=0.0),  # sized for ~15 min of 1 CPU thread, as digits-mar
    "raster (next-token) generator with MAR's diffusion head over the digits KL tokenizer's 8x8x4 latents",
)

# FlowAR: encoder + decoder stacks of equal width, flow head (depth, width, cross-attention) and the README's
# evaluation head steps / guidance interval; 256 px over MAR's KL-16 VAE (scales 1, 2, 4, 8, 16 of 16 channels).
_FLOWAR = {"small": (768, 12, 6, 2, 1024, False, 25, 0.9), "large": (1024, 16, 8, 12, 1024, True, 25, 0.9),
           "huge": (1536, 16, 15, 12, 1536, True, 50, 0.7)}
for _name, (_dim, _heads, _depth, _hd, _hw, _cross, _steps, _g) in _FLOWAR.items():
    register_config(
        f"flowar-{_name}",
        FlowARGenerator,
        partial(FlowARConfig, dim=_dim, n_head=_heads, encoder_depth=_depth, decoder_depth=_depth, head_depth=_hd,
                head_width=_hw, head_cross=_cross, head_steps=_steps, guidance_interval=_g),
        f"FlowAR-{_name[0].upper()} class-conditional, scales 1-16 of 16-channel latents (256 px with MAR's KL-16 VAE)",
    )
register_config(
    "flowar-tiny",
    FlowARGenerator,
    partial(FlowARConfig, token_dim=4, num_classes=4, patch_nums=(1, 2, 4), dim=32, n_head=2, encoder_depth=1,
            decoder_depth=1, head_depth=1, head_width=64, head_steps=4, guidance_interval=1.0),
    "tiny FlowAR (scales layout + flow head) for tests",
)
register_config(
    "digits-flowar",
    FlowARGenerator,
    partial(FlowARConfig, token_dim=4, num_classes=10, patch_nums=(1, 2, 4, 8), dim=128, n_head=4, encoder_depth=3,
            decoder_depth=3, head_depth=2, head_width=128, head_steps=25, guidance_interval=1.0),
    "digits FlowAR: scales 1-8 over the digits KL tokenizer's 8x8 latents (token_dim from it), flow head",
)
