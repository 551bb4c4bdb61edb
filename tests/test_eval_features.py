"""The shipped digits feature network: domain FID, accuracy, torch-fidelity registration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.eval import features as FE
from varkit.pipeline import to_pil
from varkit.train.data import digits_images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine thrash
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return digits_images(32)


def test_shipped_weights_are_small_and_documented():
    weights = FE.ASSET_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 400_000
    cfg = json.loads((FE.ASSET_DIR / "config.json").read_text())
    assert cfg["_training"]["command"] == FE.TRAIN_COMMAND
    assert cfg["_training"]["held_out_accuracy"] > 0.97
    assert FE.TRAIN_COMMAND in (FE.ASSET_DIR / "README.md").read_text()
    net = FE.load_digits_features()
    assert isinstance(net, FE.DigitsFeatureNet) and not net.training


def test_features_separate_real_digits_from_noise(digits):
    x, y = digits
    g = torch.Generator().manual_seed(0)
    real = FE.digits_fid(x[:300], y[:300].tolist())
    noise = FE.digits_fid(torch.rand(300, 3, 32, 32, generator=g) * 2 - 1)
    shifted = FE.digits_fid(torch.roll(x[300:600], 5, dims=-1))
    assert real["accuracy"] > 0.97 and set(real["per_class"]) == set(range(10))
    assert noise["accuracy"] is None and noise["n"] == 300
    assert real["fid"] < shifted["fid"] < noise["fid"]
    assert noise["fid"] > 20 * real["fid"]


def test_digits_fid_accepts_pil_tensor_and_uint8_alike(digits):
    x, y = digits
    pil = to_pil(x[:64])
    u8 = torch.round((x[:64] + 1) * 127.5).to(torch.uint8)
    a = FE.digits_fid(pil, y[:64].tolist())
    b = FE.digits_fid(u8, y[:64].tolist())
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-5)  # the same pixels, so the same fp32 features: ~exact
    assert a["accuracy"] == b["accuracy"]
    # other sizes are resized to 32x32
    big = FE.digits_fid(torch.nn.functional.interpolate(x[:64], size=64, mode="bilinear"), y[:64].tolist())
    assert big["accuracy"] > 0.9


def test_digits_fid_bad_input(digits):
    x, y = digits
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        FE.digits_fid(x[:1])
    with pytest.raises(InvalidArgumentError, match="labels"):
        FE.digits_fid(x[:4], [1, 2])


def test_digits_module_exposes_digits_fid(digits):
    from varkit.eval.digits import digits_fid

    x, y = digits
    out = digits_fid(x[:50], y[:50].tolist())
    assert set(out) == {"fid", "accuracy", "per_class", "n"}


def test_training_runs_and_reloads(tmp_path):
    net = FE.train(tmp_path / "f", epochs=1, val_size=1500, threads=1, verbose=False)
    assert torch.get_num_threads() == 1  # restored
    again = FE.load_digits_features(str(tmp_path / "f"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["_training"]["seed"] == 0 and cfg["_training"]["epochs"] == 1


def test_registered_with_torch_fidelity_matches_compute_metrics(tmp_path, digits):
    """calculate_metrics with the `varkit-digits` extractor equals varkit's own metric path."""
    import torch_fidelity

    from varkit.eval.fid import compute_metrics
    from varkit.io import save_image

    x, y = digits
    g = torch.Generator().manual_seed(1)
    for name, imgs in (("a", x[:40]), ("b", (x[40:80] + 0.3 * torch.randn(40, 3, 32, 32, generator=g)).clamp(-1, 1))):
        (tmp_path / name).mkdir()
        for i, im in enumerate(to_pil(imgs)):
            save_image(im, tmp_path / name / f"{i:06d}.png")
    FE.fidelity_extractor_class()
    tf = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "b"), input2=str(tmp_path / "a"), cuda=False, fid=True, isc=True, kid=True, prc=True,
        feature_extractor=FE.TORCH_FIDELITY_NAME, kid_subset_size=40, verbose=False, cache=False, save_cpu_ram=True)
    ours = compute_metrics(tmp_path / "b", tmp_path / "a", features="digits", device="cpu", progress=False)
    # both run the same extractor on the same files on this CPU (features bit-identical here, AMX and AVX2)
    # and reduce them in float64; should another CPU's conv kernels differ by batch size (features ~1e-6
    # relative), FID / IS move by about as much and KID (a mean of 3rd-power kernels) by ~3x: the rel
    # tolerances leave 10x more
    assert ours["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-5)
    assert ours["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["precision"] == pytest.approx(tf["precision"]) and ours["recall"] == pytest.approx(tf["recall"])
    assert np.isfinite(ours["fid"]) and ours["fid"] > 0
