"""Shared building blocks: one attention (SDPA + RoPE + KVCache), norms, MLPs."""
from .attention import Attention, block_causal_mask
from .layers import RMSNorm, SwiGLU
from .rope import RotaryTable, apply_rope

__all__ = ["Attention", "block_causal_mask", "RMSNorm", "SwiGLU", "RotaryTable", "apply_rope"]
