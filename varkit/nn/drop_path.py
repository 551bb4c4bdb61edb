"""Stochastic depth: drop a residual branch for whole samples during training.

Our own few lines instead of ``timm.layers.DropPath``: importing timm (and the torchvision it
pulls in) cost seconds at every start-up for this one layer. Same semantics and the same random
draws as timm's (one ``bernoulli_`` of shape (B, 1, ..., 1) per call), so training runs are
bit-identical to those made with it.
"""
from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> torch.Tensor:
    """Zero the whole of ``x[i]`` with probability ``drop_prob`` (training only); survivors are scaled
    by ``1 / (1 - drop_prob)`` unless ``scale_by_keep`` is False, so the expectation is unchanged."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """:func:`drop_path` as a module (VAR's blocks use it on both residual branches)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
