"""A digits classifier that judges generated digits without Inception.

Logistic regression on the real 8x8 scikit-learn digits; generated images are reduced to
8x8 grey levels in [0, 16] the same way the data was made, then classified.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..train.data import DIGITS_LEVELS


@functools.lru_cache(maxsize=1)
def _classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    clf = LogisticRegression(max_iter=2000)
    clf.fit(digits.data, digits.target)
    return clf


def to_digit_features(images: torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """(N, 64) grey levels in [0, 16] from images in [-1, 1] (tensor) or PIL images."""
    if not isinstance(images, torch.Tensor):
        arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr)[:, None]
    else:
        x = (images.float().mean(1, keepdim=True) + 1) / 2
    x = F.adaptive_avg_pool2d(x.clamp(0, 1), 8)
    return (x.flatten(1) * DIGITS_LEVELS).numpy()


def predict_digits(images: torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """Predicted class of each image."""
    return _classifier().predict(to_digit_features(images))


def digits_accuracy(images: torch.Tensor | Sequence[Image.Image], labels: Sequence[int]) -> float:
    """Share of images classified as the digit they were generated for."""
    pred = predict_digits(images)
    return float((pred == np.asarray(list(labels))).mean())


def digits_fid(images: torch.Tensor | Sequence[Image.Image], labels: Sequence[int] | None = None) -> dict:
    """Domain FID against the 1797 real digits and CNN accuracy: ``{'fid', 'accuracy', 'per_class', 'n'}``.

    Uses the shipped digits feature network (:mod:`varkit.eval.features`); see there for details.
    """
    from .features import digits_fid as _digits_fid

    return _digits_fid(images, labels)
