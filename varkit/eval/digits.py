"""Digits accuracy: the share of generated digits that the shipped digits CNN classifies as the digit asked for.

One classifier defines "digits accuracy" everywhere: this module, ``varkit eval fid --features digits``,
``varkit bench quality/sjd/speculative`` and the tests all use the logits of the digits feature network of
:mod:`varkit.eval.features` (98 % on held-out real digits, trained and shipped with varkit). Before, a
logistic regression on 8x8 grey levels judged some of them; its numbers were up to 6 points lower on the
same images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def predict_digits(images: torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """Predicted class of each image (PIL images, float tensors in [-1, 1] or uint8 tensors, any square size)."""
    from .features import extract

    return extract(images)[1].argmax(1).numpy()


def digits_accuracy(images: torch.Tensor | Sequence[Image.Image], labels: Sequence[int]) -> float:
    """Share of images classified as the digit they were generated for."""
    from .features import extract, per_class_accuracy

    return per_class_accuracy(extract(images)[1], labels)[0]


def digits_fid(images: torch.Tensor | Sequence[Image.Image], labels: Sequence[int] | None = None) -> dict:
    """Domain FID against the 1797 real digits and CNN accuracy: ``{'fid', 'accuracy', 'per_class', 'n'}``.

    Uses the shipped digits feature network (:mod:`varkit.eval.features`); see there for details.
    """
    from .features import digits_fid as _digits_fid

    return _digits_fid(images, labels)
