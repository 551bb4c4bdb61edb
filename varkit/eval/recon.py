"""``varkit eval recon``: how well a tokenizer reconstructs images (encode → decode).

PSNR and SSIM per image (on the reconstruction rounded to 8 bits, as it would be saved),
rFID (FID between the originals and their reconstructions, through torch-fidelity with
Inception or the digits features), and, for discrete tokenizers, codebook usage (share of codebook
entries used over the whole folder, and the perplexity of their histogram; all scales for
multi-scale tokenizers). Continuous tokenizers (KL-VAE) decode their posterior means.
Features are accumulated batch by batch, so large folders never sit in memory.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError, InvalidArgumentError, ModelNotFoundError
from ..io import save_image, write_json
from . import stats as S


# -- tokenizer -------------------------------------------------------------------------------------
def load_tokenizer(name_or_dir):
    """A tokenizer module from a folder (tokenizer or pipeline folder) or a bundled model's name."""
    if isinstance(name_or_dir, torch.nn.Module):
        tok = name_or_dir
    else:
        from ..hub import resolve_model_dir
        from ..modeling import load_module

        path = resolve_model_dir(name_or_dir, "tokenizer")
        if (path / "tokenizer" / "config.json").is_file():
            path = path / "tokenizer"
        tok = load_module(path)
    # a continuous tokenizer declares its latent shape; anything else must be a discrete one (a codebook)
    needed = ("encode", "decode") if tuple(getattr(tok, "token_shape", ())) else ("encode", "decode", "codebook_size")
    for attr in needed:
        if not hasattr(tok, attr):
            raise ModelNotFoundError(
                f"{type(tok).__name__} is not a discrete tokenizer (it has no {attr!r}) nor a continuous one "
                "(no token_shape); pass a tokenizer or pipeline folder")
    return tok.eval()


def _continuous(tok) -> bool:
    """Continuous tokenizers (KL-VAE: a token is a vector) have no codebook statistics."""
    return tuple(getattr(tok, "token_shape", ())) != ()


# -- image metrics ---------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images; identical images give ``max_db``."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    db = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))
    return db.clamp(max=max_db)


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    c = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-c ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian 11x11 window, σ 1.5, K1 0.01, K2 0.03, valid
    region, mean over channels), of (B, C, H, W) images. Images smaller than the window use the
    largest odd window that fits."""
    x, y = x.double(), y.double()
    b, c, h, w = x.shape
    win = min(win_size, h, w)
    win -= 1 - win % 2
    k = _gaussian_window(win, sigma, x.dtype).to(x.device).expand(c, 1, win, win)

    def filt(t):
        return F.conv2d(t, k, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def codebook_usage(counts: torch.Tensor) -> dict:
    """Usage statistics from a histogram of token ids (length = codebook size)."""
    counts = counts.double()
    total = counts.sum().item()
    p = counts / max(total, 1)
    nz = p[p > 0]
    return {"codebook_size": int(counts.numel()), "used": int((counts > 0).sum()),
            "usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
            "tokens": int(total)}


# -- loading ---------------------------------------------------------------------------------------
class _Resized(torch.utils.data.Dataset):
    """uint8 (3, r, r): shorter side resized to r (bicubic, antialiased), then centre-cropped (ADM style)."""

    def __init__(self, files: Sequence[str], resolution: int):
        self.files, self.r = list(files), resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.r / min(w, h)
                im = im.resize((max(self.r, round(w * s)), max(self.r, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.r) // 2, (h - self.r) // 2
                arr = np.asarray(im.crop((left, top, left + self.r, top + self.r)))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {self.files[i]}: {exc}; remove or replace it") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _batches(files: list[str], batch_size: int, resolution: int | None):
    if resolution is None:
        yield from S._iter_batches(files, batch_size)
        return
    workers = 0 if len(files) < 2000 else min(4, os.cpu_count() or 1)
    yield from torch.utils.data.DataLoader(_Resized(files, resolution), batch_size=batch_size, num_workers=workers)


def _ids_list(ids) -> list[torch.Tensor]:
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


# -- the evaluation --------------------------------------------------------------------------------
@torch.inference_mode()
def eval_recon(tokenizer, images: str | os.PathLike, *, features: str = "inception",
               inception_weights: str | os.PathLike | None = None, device: str | None = None,
               batch_size: int = 32, resolution: int | None = None, max_images: int | None = None,
               save_dir: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
               progress: bool = True, print_table: bool = True) -> dict:
    """PSNR, SSIM, rFID and codebook usage of ``tokenizer`` (module, folder or name) on a folder."""
    from tqdm import tqdm
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from ..device import resolve_device

    if batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be >= 1, got {batch_size}")
    files = S.list_images(images, "image folder")
    if max_images is not None:
        files = files[:max_images]
    S.check_count(len(files), 2, f"image folder {images}", "rFID (a covariance)")
    dev = resolve_device(device)
    extractor = S.load_extractor(features, inception_weights, dev)
    tok_name = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__
    tok = load_tokenizer(tokenizer).to(dev)
    continuous = _continuous(tok)
    size = 0 if continuous else int(tok.codebook_size)
    counts = torch.zeros(size, dtype=torch.long)
    psnrs, ssims, f_orig, f_rec = [], [], [], []
    save_dir = Path(save_dir) if save_dir is not None else None
    t0 = time.perf_counter()
    index = 0
    with tqdm(total=len(files), desc="reconstructing", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in _batches(files, batch_size, resolution):
            x = batch.to(dev).float() / 127.5 - 1
            ids = tok.encode(x)
            rec = tok.decode(ids).float().clamp(-1, 1)
            if rec.shape != x.shape:
                raise DataError(f"the tokenizer turned {tuple(x.shape[1:])} images into {tuple(rec.shape[1:])}; "
                                "pass --resolution with the size it was trained on")
            for t in [] if continuous else _ids_list(ids):
                t = t.reshape(-1).long().cpu()
                if t.numel() and (t.min() < 0 or t.max() >= size):
                    raise DataError(f"token ids outside [0, {size}) from {type(tok).__name__}.encode")
                counts += torch.bincount(t, minlength=size)
            rec_u8 = torch.round((rec + 1) * 127.5).to(torch.uint8)
            orig01, rec01 = batch.to(dev).double() / 255, rec_u8.double() / 255
            psnrs.append(psnr(orig01, rec01).cpu())
            ssims.append(ssim(orig01, rec01).cpu())
            for store, imgs in ((f_orig, batch), (f_rec, rec_u8.cpu())):
                store.append(extractor.module.convert_features_tuple_to_dict(
                    extractor.module(imgs.to(dev)))[extractor.fid_layer].float().cpu())
            if save_dir is not None:
                for j, im in enumerate(rec_u8.cpu().permute(0, 2, 3, 1).numpy()):
                    save_image(Image.fromarray(im), save_dir / f"{index + j:06d}.png")
            index += batch.shape[0]
            bar.update(batch.shape[0])
    fo, fr = torch.cat(f_orig), torch.cat(f_rec)
    rfid = fid_statistics_to_metric(S.fid_statistics(fr), S.fid_statistics(fo), False)["frechet_inception_distance"]
    p, s = torch.cat(psnrs), torch.cat(ssims)
    from .fid import versions

    record = {
        "tokenizer": tok_name, "images": str(Path(images).resolve()), "num_images": len(files),
        "resolution": resolution, "features": extractor.info,
        "metrics": {"psnr": float(p.mean()), "ssim": float(s.mean()), "rfid": float(rfid),
                    "psnr_std": float(p.std()) if len(p) > 1 else 0.0,
                    **({} if continuous else codebook_usage(counts))},
        "seconds": round(time.perf_counter() - t0, 3), "versions": versions(),
    }
    if json_path is not None:
        write_json(json_path, record)
        record["json"] = str(json_path)
    if print_table:
        print(format_recon_table(record))
    return record


def format_recon_table(record: dict) -> str:
    m = record["metrics"]
    tag = " (digits features)" if record["features"].get("name") == "digits" else ""
    rows = [("PSNR (dB)", f"{m['psnr']:.3f}"), ("SSIM", f"{m['ssim']:.4f}"), ("rFID" + tag, f"{m['rfid']:.4f}")]
    if "codebook_size" in m:  # discrete tokenizers
        rows.append(("codebook usage", f"{m['used']}/{m['codebook_size']} ({100 * m['usage']:.1f}%), "
                                       f"perplexity {m['perplexity']:.1f}"))
    rows.append(("images", str(record["num_images"])))
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 16}"] + [f"{k:<{w}}  {v}" for k, v in rows])
