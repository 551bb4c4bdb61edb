"""`varkit eval recon`: PSNR, SSIM, rFID and codebook usage of encode → decode."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varkit.errors import DataError, ModelNotFoundError
from varkit.eval import recon as R
from varkit.eval.cli_commands import main as cli
from varkit.io import save_image
from varkit.pipeline import to_pil
from varkit.train.data import digits_images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine thrash
    yield
    torch.set_num_threads(threads)


class GreyTokenizer(nn.Module):
    """Grey level quantised to ``levels`` on an (H/f, W/f) grid; decode repeats it to RGB.

    ``levels=256, factor=1`` reconstructs grey 8-bit images exactly. ``multiscale`` returns
    two scales, as VAR's tokenizer does.
    """

    def __init__(self, levels: int = 256, factor: int = 1, multiscale: bool = False):
        super().__init__()
        self.levels, self.factor, self.multiscale = levels, factor, multiscale
        self.codebook_size = levels

    def encode(self, x):
        g = F.avg_pool2d(x.mean(1, keepdim=True), self.factor) if self.factor > 1 else x.mean(1, keepdim=True)
        ids = ((g + 1) / 2 * (self.levels - 1)).round().long()[:, 0]
        return [ids[:, ::2, ::2], ids] if self.multiscale else ids

    def decode(self, ids):
        ids = ids[-1] if isinstance(ids, list) else ids
        g = ids.float()[:, None] / (self.levels - 1) * 2 - 1
        return F.interpolate(g, scale_factor=self.factor, mode="nearest").repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    x, _ = digits_images(16)
    d = tmp_path_factory.mktemp("recon") / "imgs"
    d.mkdir()
    for i, im in enumerate(to_pil(x[:12])):
        save_image(im, d / f"{i:03d}.png")
    return d


def test_exact_tokenizer_is_perfect(folder):
    rec = R.eval_recon(GreyTokenizer(), folder, features="digits", device="cpu", batch_size=5, progress=False,
                       print_table=False)
    m = rec["metrics"]
    # a lossless tokenizer: psnr is capped at 100 exactly, SSIM of identical images is 1 up to float round-off
    assert m["psnr"] == 100.0 and m["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert abs(m["rfid"]) < 1e-3  # eigvals round-off on a rank-deficient covariance
    assert m["codebook_size"] == 256 and 2 < m["used"] <= 256 and m["usage"] == m["used"] / 256
    assert m["tokens"] == 12 * 16 * 16 and rec["num_images"] == 12


def test_coarse_multiscale_tokenizer(folder, tmp_path):
    tok = GreyTokenizer(levels=4, factor=2, multiscale=True)
    rec = R.eval_recon(tok, folder, features="digits", device="cpu", progress=False, print_table=False,
                       save_dir=tmp_path / "rec", json_path=tmp_path / "r.json")
    m = rec["metrics"]
    assert 5 < m["psnr"] < 40 and 0 < m["ssim"] < 0.99 and m["rfid"] > 1
    assert m["used"] <= 4 and m["tokens"] == 12 * (4 * 4 + 8 * 8)  # both scales counted
    assert 1 <= m["perplexity"] <= 4
    assert len(list((tmp_path / "rec").glob("*.png"))) == 12
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["psnr"] == pytest.approx(m["psnr"])  # JSON round trip


def test_psnr_and_ssim():
    x = torch.zeros(2, 3, 16, 16)
    assert R.psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0])  # 0.1 in fp32 (1.5e-9 off): rel 1e-6 default
    assert R.psnr(x, x).tolist() == [100.0, 100.0]
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 20, 20, generator=g)
    noisy = (img + 0.2 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert R.ssim(img, img).tolist() == pytest.approx([1.0] * 3)  # (2ab + c)/(a^2 + b^2 + c) at a = b: fp32 ulps
    s = R.ssim(img, noisy)
    assert torch.all(s < 0.9) and torch.allclose(s, R.ssim(noisy, img))  # symmetric formula: ulps; rtol 1e-5
    assert R.ssim(img[..., :8, :8], noisy[..., :8, :8]).shape == (3,)  # smaller than the 11x11 window
    u = R.codebook_usage(torch.tensor([5, 5, 0, 0]))  # perplexity exp(ln 2) in floats: ulps; approx's default rel 1e-6
    assert u == {"codebook_size": 4, "used": 2, "usage": 0.5, "perplexity": pytest.approx(2.0), "tokens": 10}


def test_cli_with_a_saved_tokenizer_folder(folder, tmp_path, capsys):
    from varkit.tokenizers import VQConfig, VQTokenizer

    tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                               codebook_dim=4, norm_groups=4)).eval()
    tok.save_pretrained(tmp_path / "pipe" / "tokenizer")  # a pipeline folder's tokenizer/ is found too
    assert cli(["eval", "recon", "--tokenizer", str(tmp_path / "pipe"), "--images", str(folder), "--features",
                "digits", "--device", "cpu", "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "PSNR" in capsys.readouterr().out
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["codebook_size"] == 16 and 1 <= m["used"] <= 16 and m["rfid"] >= 0


def test_bad_input(folder, tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown tokenizer"):
        R.load_tokenizer("no-such-tokenizer")
    with pytest.raises(ModelNotFoundError, match="not a discrete tokenizer"):
        R.load_tokenizer(nn.Linear(2, 2))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    x, _ = digits_images(16)
    save_image(to_pil(x[:1])[0], mixed / "a.png")
    save_image(to_pil(F.interpolate(x[1:2], size=24))[0], mixed / "b.png")
    with pytest.raises(DataError, match="mixed sizes"):
        R.eval_recon(GreyTokenizer(), mixed, features="digits", device="cpu", progress=False, print_table=False)
    # --resolution brings them to one size
    rec = R.eval_recon(GreyTokenizer(), mixed, features="digits", device="cpu", resolution=16, progress=False,
                       print_table=False)
    assert rec["num_images"] == 2 and rec["resolution"] == 16
    with pytest.raises(DataError, match="at least 2"):
        R.eval_recon(GreyTokenizer(), folder, features="digits", device="cpu", max_images=1, progress=False)

    class Shrinks(GreyTokenizer):
        def decode(self, ids):
            return super().decode(ids)[..., :8, :8]

    with pytest.raises(DataError, match="--resolution"):
        R.eval_recon(Shrinks(), folder, features="digits", device="cpu", progress=False, print_table=False)
