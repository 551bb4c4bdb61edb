"""Published-format checkpoints with random weights, for tests and benchmarks (nothing may be downloaded).

Each builder takes the key list of a published file, as ``(key, shape)`` pairs in the file's order, and a
seed, and returns a state dict in that family's raw format (what the official repository's ``state_dict()``
holds) whose weights are seeded normal draws scaled so that the network is far from degenerate: norm gains
near 1, matrices scaled by their fan-in, sharp logits. The draws are made key by key from one
``torch.Generator`` in the given order, so the same key list and seed always give the same tensors.

The golden fixtures under ``tests/fixtures/`` hold the official code's outputs on exactly these weights
(see their READMEs), so the recipes must not change: the golden tests fail if one does. Derived buffers
(VAR's ``lvl_1L``/``attn_bias_for_masking``, LlamaGen's ``codebook_used``) are exact, as in real files.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .var import _attn_bias, _lvl_1L

__all__ = [
    "flowar_state_dict",
    "items_of",
    "llamagen_gpt_state_dict",
    "llamagen_vq_state_dict",
    "mar_state_dict",
    "mar_vae_state_dict",
    "perturb_var",
    "var_init_like",
    "var_state_dict",
    "var_vae_state_dict",
]

Items = Iterable[tuple[str, Sequence[int]]]
LLAMAGEN_CODEBOOK_USED = 65536  # LlamaGen's VectorQuantizer keeps a (65536,) usage buffer in every file


def items_of(sd: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(key, shape)`` list of a state dict (real or on the meta device), for the builders below."""
    return [(k, tuple(v.shape)) for k, v in sd.items()]


# -- LlamaGen (and NAR, which is LlamaGen's GPT with extra layers and a second head) ----------------
def llamagen_gpt_state_dict(items: Items, seed: int) -> dict[str, Tensor]:
    """A LlamaGen (or NAR) GPT state dict: norm gains ``1 + 0.2·x``, token and class embeddings ``x``,
    every other tensor (Linear weights, the t2i null caption) ``x / sqrt(shape[1])``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in items:
        x = torch.randn(tuple(shape), generator=g)
        if key.endswith("norm.weight"):
            sd[key] = 1.0 + 0.2 * x
        elif key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
            sd[key] = x
        else:
            sd[key] = x / math.sqrt(shape[1])
    return sd


def llamagen_vq_state_dict(items: Items, seed: int, codebook_used: bool = True) -> dict[str, Tensor]:
    """A LlamaGen VQ tokenizer state dict: biases ``0.1·x``, norm gains ``1 + 0.2·x``, codebook ``x``, other
    weights ``x / sqrt(fan_in)``; plus the zero ``quantize.codebook_used`` training buffer real files carry
    (``codebook_used=False`` leaves it out)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in items:
        if key == "quantize.codebook_used":
            continue
        x = torch.randn(tuple(shape), generator=g)
        if key.endswith(".bias"):
            sd[key] = 0.1 * x
        elif "norm" in key:
            sd[key] = 1.0 + 0.2 * x
        elif key == "quantize.embedding.weight":
            sd[key] = x
        else:
            sd[key] = x / math.sqrt(math.prod(shape[1:]))
    if codebook_used:
        sd["quantize.codebook_used"] = torch.zeros(LLAMAGEN_CODEBOOK_USED)
    return sd


# -- VAR ---------------------------------------------------------------------------------------------
def var_vae_state_dict(items: Items, seed: int, emb_scale: float = 0.2) -> dict[str, Tensor]:
    """A VAR VQVAE state dict with a working decoder: 1-D weights ``1 + 0.1·x``, biases ``0.05·x``, codebook
    ``emb_scale·x``, other weights ``x / sqrt(fan_in)``, ``ema_vocab_hit_SV`` zero (its draw still made)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in items:
        shape = tuple(shape)
        t = torch.randn(shape, generator=g)
        if key == "quantize.ema_vocab_hit_SV":
            t = torch.zeros(shape)
        elif key == "quantize.embedding.weight":
            t = t * emb_scale
        elif key.endswith(".weight") and len(shape) == 1:
            t = 1 + 0.1 * t
        elif key.endswith(".bias"):
            t = 0.05 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        out[key] = t
    return out


def var_init_like(items: Items, seed: int, patch_nums: Sequence[int]) -> dict[str, Tensor]:
    """VAR's ``init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)`` key by key
    (``randn·std``, std = sqrt(1/(3C)); the ±2 truncation of ``trunc_normal_`` is inactive at these stds);
    the derived buffers ``lvl_1L``, ``attn_bias_for_masking`` and the zero biases exact."""
    items = [(k, tuple(s)) for k, s in items]
    shapes = dict(items)
    C = shapes["class_emb.weight"][1]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    std = math.sqrt(1 / C / 3)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in items:
        if key == "lvl_1L":
            out[key] = _lvl_1L(patch_nums)
        elif key == "attn_bias_for_masking":
            out[key] = _attn_bias(patch_nums).reshape(shape)
        elif key.endswith(("zero_k_bias", "q_bias", "v_bias", ".bias")):
            out[key] = torch.zeros(shape)
        elif key.endswith("scale_mul_1H11"):
            out[key] = torch.full(shape, 4.0).log()
        elif key.endswith("ada_gss"):
            t = torch.randn(shape, generator=g) / C ** 0.5
            t[:, :, 2:] *= 0.5
            t[:, :, :2] *= 1e-5
            out[key] = t
        else:
            t = torch.randn(shape, generator=g) * std
            if key == "head.weight":
                t *= 0.02
            elif key == "head_nm.ada_lin.1.weight":
                t *= 0.5
            elif key.endswith(("attn.proj.weight", "ffn.fc2.weight")):
                t /= math.sqrt(2 * depth)
            elif key.startswith("blocks.") and key.endswith("ada_lin.1.weight"):
                t[2 * C:] *= 0.5
                t[:2 * C] *= 1e-5
            out[key] = t
    return out


def perturb_var(sd: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Make a freshly initialised VAR non-degenerate, in place (a VAR-d30 holds 8 GB): O(1) AdaLN gates,
    unit-std class embeddings, a sharp head, noisy biases and attention temperatures."""
    C = sd["class_emb.weight"].shape[1]
    std = math.sqrt(1 / C / 3)
    g = torch.Generator().manual_seed(seed)

    def n(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=g)

    for key in list(sd):
        t = sd[key]
        if key == "class_emb.weight":
            t = t / std
        elif key == "head.weight":
            t = t / 0.02 * 2
        elif key == "word_embed.weight":
            t = t * 5
        elif key.startswith("blocks.") and key.endswith("ada_lin.1.weight"):
            t[:2 * C] *= 1e5
        elif key.startswith("blocks.") and key.endswith("ada_lin.1.bias"):
            t = t + 0.2 * n(t)
            t[:2 * C] += 0.5
        elif key.endswith("ada_gss"):
            t[:, :, :2] = 0.5 + 0.2 * n(t[:, :, :2])
            t[:, :, 2:] += 0.2 * n(t[:, :, 2:])
        elif key in ("head_nm.ada_lin.1.bias", "shared_ada_lin.1.bias") or key.endswith(("q_bias", "v_bias")):
            t = t + 0.2 * n(t)
        elif key.endswith("scale_mul_1H11"):
            t = t + 0.5 * n(t)
        elif key.endswith(".bias"):
            t = t + 0.05 * n(t)
        sd[key] = t
    return sd


def var_state_dict(items: Items, seed: int, patch_nums: Sequence[int]) -> dict[str, Tensor]:
    """A VAR transformer state dict: :func:`var_init_like` (``seed``) then :func:`perturb_var` (``seed + 1``)."""
    return perturb_var(var_init_like(items, seed, patch_nums), seed + 1)


# -- MAR ---------------------------------------------------------------------------------------------
def mar_vae_state_dict(items: Items, seed: int) -> dict[str, Tensor]:
    """MAR's KL-VAE (the ``"model"`` of ``kl16.ckpt``) state dict: the recipe of :func:`var_vae_state_dict`
    (same LDM layout, no codebook): 1-D weights ``1 + 0.1·x``, biases ``0.05·x``, other weights
    ``x / sqrt(fan_in)``."""
    return var_vae_state_dict(items, seed)


MAR_LEARNED_TOKENS = ("fake_latent", "mask_token", "encoder_pos_embed_learned", "decoder_pos_embed_learned",
                      "diffusion_pos_embed_learned")


def mar_state_dict(items: Items, seed: int) -> dict[str, Tensor]:
    """A MAR generator state dict (what ``MAR.state_dict()`` holds, ``diffloss.net.*`` included), with the
    zero-initialised tensors made non-zero: norm gains ``1 + 0.1·x``, biases ``0.05·x``, class embeddings
    ``x``, ``fake_latent``/``mask_token``/position embeddings ``0.5·x``, every other weight (Linear,
    DiffLoss's adaLN and output layers included) ``x / sqrt(fan_in)``."""
    return _scaled_randn_state_dict(items, seed, MAR_LEARNED_TOKENS)


def _scaled_randn_state_dict(items: Items, seed: int, learned: Sequence[str],
                             exact: Callable[[str, tuple[int, ...]], Tensor | None] | None = None) -> dict[str, Tensor]:
    """The recipe MAR's and FlowAR's synthetic weights share: one ``randn`` per key in order (keys ``exact``
    gives a tensor for draw nothing), biases ``0.05·x``, other 1-D tensors ``1 + 0.1·x``, class embeddings
    ``x``, ``learned`` tokens ``0.5·x``, every other weight ``x / sqrt(fan_in)``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in items:
        shape = tuple(shape)
        fixed = exact(key, shape) if exact is not None else None
        if fixed is not None:
            sd[key] = fixed
            continue
        x = torch.randn(shape, generator=g)
        if key.endswith(".bias"):
            sd[key] = 0.05 * x
        elif len(shape) == 1:
            sd[key] = 1.0 + 0.1 * x
        elif key == "class_emb.weight":
            sd[key] = x
        elif key in learned:
            sd[key] = 0.5 * x
        else:
            sd[key] = x / math.sqrt(math.prod(shape[1:]))
    return sd


# -- FlowAR ------------------------------------------------------------------------------------------
FLOWAR_LEARNED_TOKENS = ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "diffusion_pos_embed_learned")


def _flowar_rope_freqs(n: int) -> Tensor:
    """FlowAR's ``VisionRotaryEmbeddingFast.freqs`` buffer of ``n`` entries (dim = 2n: half a head's width)."""
    dim = 2 * n
    return 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


def _flowar_mask(n: int) -> Tensor:
    """FlowAR's ``mask`` buffer (1, 1, n, n): 0 where a token sees a key (same or earlier scale), -inf elsewhere."""
    from .flowar import scales_for_tokens

    sides = scales_for_tokens(n)
    if sides is None:
        raise ValueError(f"{n} tokens are not FlowAR's doubling scales")
    step = torch.repeat_interleave(torch.arange(len(sides)), torch.tensor([p * p for p in sides]))
    mask = torch.zeros(n, n).masked_fill(step[None, :] > step[:, None], float("-inf"))
    return mask[None, None]


def flowar_state_dict(items: Items, seed: int) -> dict[str, Tensor]:
    """A FlowAR state dict (what ``FlowAR.state_dict()`` holds, ``flownet.*`` included). FlowAR's derived buffers
    (``mask``, ``*.rope.freqs``) are exact and draw nothing; every other key one ``randn`` in order: biases
    ``0.05·x``, other 1-D tensors (RMSNorm gains) ``1 + 0.1·x``, class embeddings ``x``, position embeddings
    ``0.5·x``, every other weight (the zero-initialised output layer included) ``x / sqrt(fan_in)``."""
    return _scaled_randn_state_dict(items, seed, FLOWAR_LEARNED_TOKENS, _flowar_buffer)


def _flowar_buffer(key: str, shape: tuple[int, ...]) -> Tensor | None:
    """FlowAR's derived buffers, exact; None for a key that is drawn."""
    if key == "mask":
        return _flowar_mask(shape[-1])
    if key.endswith("rope.freqs"):
        return _flowar_rope_freqs(shape[0])
    return None
