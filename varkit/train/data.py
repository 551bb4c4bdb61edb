"""Datasets: scikit-learn's handwritten digits (offline) and class-per-subfolder image folders.

**Flips** are part of the index: with ``--flip`` the training loop draws *virtual* indices in
``[0, 2n)``, where ``i + n`` is image ``i`` mirrored (a fresh coin per image and epoch, decided
by the data order's seed: see :func:`varkit.train.loop.batch_indices`). A batch is then a pure
function of its indices, so worker processes, a resumed run and the extracted codes
(:mod:`varkit.train.codes`, which store both orientations) all agree.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError, InvalidArgumentError

DIGITS_LEVELS = 16.0  # load_digits pixels are integers in [0, 16]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def digits_images(resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as RGB images in [-1, 1] of size ``resolution``, and labels.

    The 8x8 originals are upsampled bilinearly; ink is white on black, as in the originals.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / DIGITS_LEVELS
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)
    return x, torch.tensor(digits.target, dtype=torch.long)


class ImageDataset:
    """Images in [-1, 1] at one resolution, with class labels; ``batch(indices)`` stacks them."""

    def __init__(self, name: str, num_classes: int, resolution: int, flip: bool = False):
        self.name, self.num_classes, self.resolution, self.flip = name, num_classes, resolution, flip

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def labels(self) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies these images (for the manifest of extracted codes)."""
        return {"data": self.name, "num_items": len(self), "num_classes": self.num_classes,
                "resolution": self.resolution}

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] and labels of ``indices``; index ``i + len(self)`` is image ``i``
        mirrored (the loop draws those only with ``--flip``)."""
        indices = torch.as_tensor(indices).long()
        base, flipped = indices % len(self), indices >= len(self)
        xs, ys = zip(*(self.item(int(i)) for i in base))
        x = torch.stack(xs)
        if bool(flipped.any()):
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, torch.tensor(ys)


class DigitsDataset(ImageDataset):
    def __init__(self, resolution: int = 32, flip: bool = False):
        super().__init__("digits", 10, resolution, flip)
        self.x, self.y = digits_images(resolution)

    def __len__(self) -> int:
        return len(self.y)

    def item(self, i: int):
        return self.x[i], int(self.y[i])

    def labels(self) -> torch.Tensor:
        return self.y


class FolderDataset(ImageDataset):
    """ImageFolder convention: ``root/<class name>/<image>``; classes sorted by name."""

    def __init__(self, root: str | Path, resolution: int, flip: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise DataError(f"{root} has no class subfolders; put images in {root}/<class name>/")
        self.files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
                      if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders")
        super().__init__(str(root), len(classes), resolution, flip)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.files])

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for f, c in self.files:
            h.update(f"{f.relative_to(self.name)}\t{c}\n".encode())
        return {**super().fingerprint(), "data": "image folder", "files_sha256": h.hexdigest()}

    def item(self, i: int):
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms import functional as TF

        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None
        im = TF.center_crop(TF.resize(im, self.resolution, antialias=True), [self.resolution, self.resolution])
        return TF.to_tensor(im) * 2 - 1, label


def load_dataset(spec: str, resolution: int, flip: bool = False) -> ImageDataset:
    """``"digits"`` or the path of a class-per-subfolder image folder."""
    if resolution < 1:
        raise InvalidArgumentError(f"resolution must be positive, got {resolution}")
    if spec == "digits":
        return DigitsDataset(resolution, flip)
    return FolderDataset(spec, resolution, flip)
