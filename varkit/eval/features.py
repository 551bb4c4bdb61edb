"""The digits feature extractor: a tiny CNN trained on scikit-learn's digits, shipped with varkit.

It gives a *domain* FID (Fréchet distance between its penultimate features of generated and
real digits) and per-class accuracy, without Inception weights, in seconds on a CPU. It is also
registered with torch-fidelity as the feature extractor ``varkit-digits`` so that IS, KID and
precision/recall go through torch-fidelity's own code.

The shipped weights live in ``varkit/assets/digits_features/`` and were made by::

    python -m varkit.eval.features --train --out varkit/assets/digits_features

(fixed seed, one thread: bit-identical on any machine with the same torch; ~10-15 s on a CPU). ``config.json`` records the training settings and the
held-out accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, InvalidArgumentError, ModelNotFoundError
from ..modeling import SavableModule, load_module, register_module

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_features"
TRAIN_COMMAND = "python -m varkit.eval.features --train --out varkit/assets/digits_features"
FEATURE_LAYER = "64"        # penultimate features, used for FID, precision/recall (and KID, scaled)
LOGITS_LAYER = "logits"     # used for the Inception-Score analogue and accuracy
KID_LAYER = "64-kid"        # the penultimate features / kid_feature_scale(): what torch-fidelity's KID gets
INPUT_SIZE = 32
TORCH_FIDELITY_NAME = "varkit-digits"


@dataclasses.dataclass
class DigitsNetConfig:
    channels: tuple = (16, 32, 32)
    hidden: int = 64
    num_classes: int = 10
    input_size: int = INPUT_SIZE


@register_module
class DigitsFeatureNet(SavableModule):
    """conv(3x3)x3 with max-pooling, then fc → ReLU (the 64-d features) → fc (10 logits).

    Input: grey images in [-1, 1], shape (B, 1, 32, 32).
    """

    config_class = DigitsNetConfig

    def __init__(self, config: DigitsNetConfig):
        super().__init__(config)
        c1, c2, c3 = config.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        side = config.input_size // 8
        self.fc = nn.Linear(c3 * side * side, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes)
        self.training_info: dict = {}

    def config_dict(self) -> dict:
        out = super().config_dict()
        if self.training_info:
            out["_training"] = self.training_info
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


# -- preprocessing ---------------------------------------------------------------------------------
def prepare(images, size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, 1, size, size) grey float in [-1, 1] from uint8 tensors (B,3,H,W), float tensors in
    [-1, 1] (B,C,H,W), or a sequence of PIL images (all of one size)."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.dim() != 4:
            raise InvalidArgumentError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    else:
        images = list(images)
        if not images:
            raise InvalidArgumentError("no images given")
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise DataError(f"images of mixed sizes {sorted(sizes)[:4]}: resize them to one size first")
        arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) for im in images])
        x = torch.from_numpy(arr)[:, None] / 127.5 - 1
    x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        down = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return x.clamp(-1, 1)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels a PNG holds, so training sees what eval sees."""
    return torch.round((x + 1) * 127.5) / 127.5 - 1


# -- the shipped model -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_digits_features(directory: str | None = None) -> DigitsFeatureNet:
    """The shipped digits feature network (or one saved in ``directory``), in eval mode on CPU."""
    directory = Path(directory) if directory is not None else ASSET_DIR
    if not (directory / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"digits feature weights not found in {directory}; the varkit install is incomplete. "
            f"Recreate them with `{TRAIN_COMMAND}`"
        )
    net = load_module(directory)
    if not isinstance(net, DigitsFeatureNet):
        raise ModelNotFoundError(f"{directory} holds a {type(net).__name__}, not the digits feature network")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def extract(images, batch_size: int = 512, net: DigitsFeatureNet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 64), logits (N, 10)) of images (see :func:`prepare` for accepted forms)."""
    net = net or load_digits_features()
    x = prepare(images, net.config.input_size)
    feats, logits = [], []
    for chunk in x.split(batch_size):
        f, l = net(chunk)
        feats.append(f)
        logits.append(l)
    return torch.cat(feats), torch.cat(logits)


@functools.lru_cache(maxsize=1)
def real_digits_uint8() -> torch.Tensor:
    """All 1797 real digits as uint8 RGB (N, 3, 32, 32): the reference set for ``--features digits``."""
    from ..train.data import digits_images

    x, _ = digits_images(INPUT_SIZE)
    return torch.round((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1)
def real_digits_features() -> torch.Tensor:
    """Penultimate features (1797, 64) of the real digits with the shipped network (cached)."""
    return extract(real_digits_uint8())[0]


@functools.lru_cache(maxsize=1)
def _real_reference() -> dict:
    return _stats(real_digits_features())


@functools.lru_cache(maxsize=1)
def kid_feature_scale() -> float:
    """The RMS of the real digits' features (~7.7): KID divides the digits features by it, so that its cubic
    kernel sees values of the size it was made for (Inception's); FID keeps the raw features."""
    return float(real_digits_features().double().pow(2).mean().sqrt())


def _stats(features: torch.Tensor) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double())


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """FID from two {'mu', 'sigma'} dicts, through torch-fidelity's own formula."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items() if k in ("mu", "sigma")}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items() if k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def per_class_accuracy(logits: torch.Tensor, labels: Sequence[int]) -> tuple[float, dict[int, float]]:
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    if labels_t.numel() != logits.shape[0]:
        raise InvalidArgumentError(f"{logits.shape[0]} images but {labels_t.numel()} labels")
    correct = logits.argmax(1) == labels_t
    per_class = {int(c): float(correct[labels_t == c].float().mean()) for c in labels_t.unique().tolist()}
    return float(correct.float().mean()), per_class


def digits_fid(images, labels: Sequence[int] | None = None) -> dict:
    """Domain FID of generated digits against the 1797 real ones, and accuracy.

    ``images``: PIL images, float tensors in [-1, 1] or uint8 tensors, any square size
    (resized to 32x32). Returns ``{'fid', 'accuracy', 'per_class', 'n'}``; the accuracies are
    ``None`` without ``labels``. Needs at least 2 images.
    """
    n = len(images)
    if n < 2:
        raise InvalidArgumentError(f"digits FID needs at least 2 images, got {n}")
    feats, logits = extract(images)
    fid = frechet_distance(_stats(feats), _real_reference())
    out = {"fid": fid, "accuracy": None, "per_class": None, "n": n}
    if labels is not None:
        out["accuracy"], out["per_class"] = per_class_accuracy(logits, labels)
    return out


# -- torch-fidelity feature extractor --------------------------------------------------------------
def _fidelity_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper: uint8 (B, 3, H, W) → '64' features and 'logits'."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            net = load_digits_features(str(feature_extractor_weights_path) if feature_extractor_weights_path else None)
            # a private copy so .cuda() here never moves the cached CPU model
            self.net = DigitsFeatureNet(net.config)
            self.net.load_state_dict(net.state_dict())
            self.requires_grad_(False)
            self.eval()

        def forward(self, x):
            f, logits = self.net(prepare(x, self.net.config.input_size).to(next(self.net.parameters()).device))
            out = {FEATURE_LAYER: f, LOGITS_LAYER: logits}
            if KID_LAYER in self.features_list:
                out[KID_LAYER] = f / kid_feature_scale()
            return tuple(out[a] for a in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return FEATURE_LAYER, LOGITS_LAYER, KID_LAYER

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": LOGITS_LAYER, "fid": FEATURE_LAYER, "kid": KID_LAYER, "prc": FEATURE_LAYER}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    return DigitsFeatureExtractor


@functools.lru_cache(maxsize=1)
def fidelity_extractor_class():
    """The torch-fidelity ``FeatureExtractorBase`` subclass, registered as ``varkit-digits``."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    cls = _fidelity_extractor_class()
    if TORCH_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TORCH_FIDELITY_NAME, cls)
    return FEATURE_EXTRACTORS_REGISTRY[TORCH_FIDELITY_NAME]


# -- training --------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (±2 px), scale (0.9–1.1) and rotation (±10°), one per image."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) - 0.5) * (20 * np.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(b, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * (4 / INPUT_SIZE * 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train(out: str | Path, seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
          val_size: int = 297, threads: int = 1, verbose: bool = True) -> DigitsFeatureNet:
    """Train the digits feature network with a fixed seed and save it into ``out``.

    One thread by default: the result is then bit-identical on any machine with the same torch
    (the reduction order of multi-threaded kernels depends on the thread count).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(out, seed, epochs, batch_size, lr, val_size, threads, verbose)
    finally:
        torch.set_num_threads(previous)


def _train(out, seed, epochs, batch_size, lr, val_size, threads, verbose) -> DigitsFeatureNet:
    from ..train.data import digits_images

    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = digits_images(INPUT_SIZE)
    x = _quantize(x).mean(1, keepdim=True)
    perm = torch.randperm(len(x), generator=gen)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    xt, yt, xv, yv = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    net = DigitsFeatureNet(DigitsNetConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i:i + batch_size]
            xb = _augment(xt[idx], gen)
            loss = F.cross_entropy(net(xb)[1], yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 5 == 0:
            with torch.no_grad():
                acc = (net.eval()(xv)[1].argmax(1) == yv).float().mean().item()
            print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  val acc {acc:.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        val_acc = (net(xv)[1].argmax(1) == yv).float().mean().item()
        train_acc = (net(xt)[1].argmax(1) == yt).float().mean().item()
    net.training_info = {
        "command": TRAIN_COMMAND,
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "threads": threads,
        "data": f"sklearn.datasets.load_digits, bilinear to {INPUT_SIZE}x{INPUT_SIZE}, "
                f"{len(xt)} train / {len(xv)} held out (randperm seed {seed})",
        "augmentation": "shift ±2px, scale 0.9-1.1, rotation ±10°",
        "held_out_accuracy": round(val_acc, 4), "train_accuracy": round(train_acc, 4),
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    net.save_pretrained(out)
    if verbose:
        print(f"saved to {out}: held-out accuracy {val_acc:.4f}, {time.time() - t0:.1f} s")
    return net


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m varkit.eval.features", description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="train the digits feature network")
    p.add_argument("--out", default=str(ASSET_DIR), help="output folder (default: the shipped asset folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights used 1)")
    args = p.parse_args(argv)
    if not args.train:
        p.error("nothing to do: pass --train")
    train(args.out, seed=args.seed, epochs=args.epochs, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
