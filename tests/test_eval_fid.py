"""`varkit eval fid` / `eval stats`: generation, references, torch-fidelity parity, bad input.

Inception runs with random weights saved in torch-fidelity's published format; its input size is
shrunk from 299 to 75 pixels (both for varkit and for torch-fidelity's own calculate_metrics) so
the tests run in seconds on a CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from varkit.errors import DataError, InvalidArgumentError, VarkitError
from varkit.eval import fid as FID
from varkit.eval import stats as S
from varkit.eval.cli_commands import main as cli
from varkit.io import save_image
from varkit.pipeline import to_pil
from varkit.train.data import digits_images

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def small_inception():
    import threadpoolctl
    import torch_fidelity.feature_extractor_inceptionv3 as m

    # one thread: on a shared 2-core machine two torch/BLAS threads thrash (10-50x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with mock.patch.object(m.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75), \
            threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random (variance-preserving) weights, saved as a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as m

    with mock.patch.object(m, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        fe = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for mod in fe.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    nn.init.normal_(fe.fc.weight, std=30.0)  # logits that vary, so IS is not trivially 1
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(fe.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def digits():
    return digits_images(32)


def _write_folder(folder: Path, images: torch.Tensor, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        save_image(im, folder / (names[i] if names else f"{i:06d}.png"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits):
    """Two 10-image folders: real digits (A) and the same digits with a little noise (B)."""
    x, _ = digits
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    a = _write_folder(root / "A", x[:10])
    b = _write_folder(root / "B", (x[:10] + 0.1 * torch.randn(10, 3, 32, 32, generator=g)).clamp(-1, 1))
    return a, b


def _run_cli(*argv) -> None:
    assert cli(["eval", *map(str, argv)]) == 0


class FakePipe:
    """Stands in for varkit.Pipeline: returns a real digit of the asked class, picked by the image seed."""

    num_classes = 10
    name = "fake-digits"

    def __init__(self, digits):
        x, y = digits
        self.by_class = {c: x[y == c] for c in range(10)}
        self.defaults = {"cfg": 1.5, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 900, "top_p": 0.96}
        self.calls = []

    def __call__(self, class_labels, *, image_seeds, sampler="ancestral", **kwargs):
        self.calls.append({"labels": list(class_labels), "seeds": list(image_seeds), "sampler": sampler, **kwargs})
        out = []
        for c, s in zip(class_labels, image_seeds):
            pool = self.by_class[c]
            j = int(torch.randint(len(pool), (1,), generator=torch.Generator().manual_seed(s)))
            out.append(pool[j:j + 1])
        return SimpleNamespace(images=to_pil(torch.cat(out)), stats=None)


# -- generation ------------------------------------------------------------------------------------
def test_generate_balanced_seeded_and_resumable(tmp_path, digits):
    pipe = FakePipe(digits)
    settings = FID.resolve_settings(pipe)
    assert settings == {"sampler": "ancestral", "cfg": 1.5, "cfg_schedule": "constant", "temperature": 1.0,
                        "top_k": 900, "top_p": 0.96}
    info = FID.generate_samples(pipe, tmp_path, 23, settings=settings, seed=3, batch_size=8, progress=False,
                                rank=0, world_size=1)
    assert info["generated"] == 23 and [len(c["labels"]) for c in pipe.calls] == [8, 8, 7]
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == [FID.sample_name(i, i % 10) for i in range(23)]
    assert [FID.sample_label(f) for f in files] == [i % 10 for i in range(23)]
    assert pipe.calls[0]["seeds"][:2] == [3 * 1_000_003, 3 * 1_000_003 + 1]
    assert pipe.calls[0]["cfg"] == 1.5 and pipe.calls[0]["top_k"] == 900  # the model's published defaults
    before = {f: (tmp_path / f).read_bytes() for f in files}
    for f in files[5:8]:
        (tmp_path / f).unlink()
    pipe.calls.clear()
    info = FID.generate_samples(pipe, tmp_path, 23, settings=settings, seed=3, batch_size=2, progress=False,
                                rank=0, world_size=1)
    assert info == {**info, "generated": 3, "skipped": 20}
    assert [i for c in pipe.calls for i in c["seeds"]] == [3 * 1_000_003 + i for i in (5, 6, 7)]
    assert {f: (tmp_path / f).read_bytes() for f in files} == before  # same images whatever the batching
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_generate_shards_over_ranks(tmp_path, digits):
    pipe = FakePipe(digits)
    settings = FID.resolve_settings(pipe)
    for r in range(3):
        FID.generate_samples(pipe, tmp_path / "sharded", 10, settings=settings, batch_size=4, progress=False,
                             rank=r, world_size=3)
    seeds = sorted(s for c in pipe.calls for s in c["seeds"])
    assert seeds == list(range(10))
    assert [c["seeds"] for c in pipe.calls[:1]] == [[0, 3, 6, 9]]  # rank 0: i ≡ 0 mod 3
    FID.generate_samples(pipe, tmp_path / "single", 10, settings=settings, batch_size=10, progress=False,
                         rank=0, world_size=1)
    for f in (tmp_path / "single").glob("*.png"):
        assert (tmp_path / "sharded" / f.name).read_bytes() == f.read_bytes()


def test_generate_refuses_a_folder_made_with_other_settings(tmp_path, digits):
    pipe = FakePipe(digits)
    FID.generate_samples(pipe, tmp_path, 4, settings=FID.resolve_settings(pipe), progress=False, rank=0, world_size=1)
    with pytest.raises(InvalidArgumentError, match="other settings.*cfg"):
        FID.generate_samples(pipe, tmp_path, 4, settings=FID.resolve_settings(pipe, cfg=4.0), progress=False,
                             rank=0, world_size=1)


def test_generate_with_the_real_pipeline(tmp_path, tiny_pipeline):
    """The real Pipeline accepts the call generate_samples makes (image_seeds, settings)."""
    settings = FID.resolve_settings(tiny_pipeline, top_k=5)
    FID.generate_samples(tiny_pipeline, tmp_path, 3, settings=settings, batch_size=2, progress=False,
                         rank=0, world_size=1)
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_eval_fid_digits_end_to_end(tmp_path, digits, capsys):
    pipe = FakePipe(digits)
    rec = FID.eval_fid(pipe, num_samples=60, features="digits", seed=1, batch_size=32, out_dir=tmp_path / "s",
                       progress=False, top_p=1.0)
    out = capsys.readouterr().out
    assert "FID (digits features)" in out and "precision" in out
    saved = json.loads(Path(rec["json"]).read_text())
    assert saved["metrics"]["fid"] == pytest.approx(rec["metrics"]["fid"])  # a JSON round trip of a float64
    for key, value in {"cfg": 1.5, "top_k": 900, "top_p": 1.0, "temperature": 1.0, "sampler": "ancestral",
                       "seed": 1, "num_samples": 60, "model": "fake-digits"}.items():
        assert saved[key] == value, key
    assert saved["ref"]["kind"] == "digits" and saved["features"]["name"] == "digits"
    assert set(saved["versions"]) >= {"varkit", "torch", "torch_fidelity"}
    m = saved["metrics"]
    assert m["accuracy"] > 0.95 and set(m["per_class_accuracy"]) == {str(c) for c in range(10)}
    assert m["fid"] < 100 and m["precision"] > 0.8
    assert saved["metric_settings"]["kid_subset_size"] == 60
    # default num_samples = 50 per class unless the model says otherwise
    assert FID.default_num_samples(pipe) == 500
    pipe.defaults["fid_num_samples"] = 70
    assert FID.default_num_samples(pipe) == 70


# -- Inception through torch-fidelity --------------------------------------------------------------
# FID on 2048-d features costs a 2048x2048 eigendecomposition (seconds); most tests use the 192-d
# Inception layer, the CLI parity test the default 2048.
@pytest.fixture(scope="module")
def inception(inception_weights):
    return S.load_extractor("inception", inception_weights, "cpu", fid_layer="192")


@pytest.fixture(scope="module")
def b_vs_a(folders, inception):
    a, b = folders
    return FID.compute_metrics(b, a, extractor=inception, progress=False)


def test_fid_same_zero_different_positive(folders, inception, b_vs_a):
    a, _ = folders
    aa = FID.compute_metrics(a, a, extractor=inception, metrics=("fid",), progress=False)
    assert b_vs_a["fid"] > 0
    # FID(a, a) is 0 up to float64 round-off of the matrix square root of a rank-deficient covariance
    # (10 samples, 192 dims): square roots of eigenvalues that are 0 up to round-off (-4.7e-7 measured,
    # 3e-6 of FID(b, a) = 0.15); 1e-4 of a real FID holds whatever the CPU's LAPACK
    assert abs(aa["fid"]) < 1e-4 * b_vs_a["fid"]
    assert aa["num_samples"] == aa["num_ref"] == 10
    assert aa["settings"]["features"]["fid_layer"] == "192"


def test_cli_numbers_equal_torch_fidelity(tmp_path, folders, inception_weights, capsys):
    import torch_fidelity

    a, b = folders
    _run_cli("fid", "--samples", b, "--ref", a, "--inception-weights", inception_weights, "--device", "cpu",
             "--json", tmp_path / "m.json", "--no-progress")
    assert "FID" in capsys.readouterr().out
    rec = json.loads((tmp_path / "m.json").read_text())
    ours = rec["metrics"]
    assert rec["features"]["name"] == "inception" and rec["features"]["fid_layer"] == "2048"
    assert rec["features"]["published_weights"] is False  # random weights: flagged in the record
    tf = torch_fidelity.calculate_metrics(
        input1=str(b), input2=str(a), cuda=False, isc=True, fid=True, kid=True, prc=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights),
        kid_subset_size=10, isc_splits=5, cache=False, save_cpu_ram=True)
    assert rec["metric_settings"]["isc_splits"] == 5 and rec["metric_settings"]["kid_subset_size"] == 10
    assert ours["fid"] > 0
    # the same extractor on the same files on this CPU (bit-identical features here, AMX and AVX2) reduced in
    # float64; 2048-d features of 10 images: rank-deficient covariances whose sqrtm round-off reaches ~1e-6
    # of FID, IS std and KID being small differences of larger numbers, hence their abs floors: the
    # tolerances leave 100x
    assert ours["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-4)
    assert ours["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-4)
    assert ours["isc_std"] == pytest.approx(tf["inception_score_std"], rel=1e-3, abs=1e-6)
    assert ours["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-3, abs=1e-7)
    # precision / recall: fractions of 10 samples within k-NN radii: exact unless a distance ties a radius
    assert ours["precision"] == pytest.approx(tf["precision"]) and ours["recall"] == pytest.approx(tf["recall"])
    assert ours["isc_mean"] > 1.01  # not degenerate


def _adm_arrays(folder, ext):
    from PIL import Image

    files = S.list_images(folder)
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    st = S.fid_statistics(S.extract_features(files, ext)[ext.fid_layer])
    return arr, st["mu"].astype(np.float64), st["sigma"]


def test_adm_reference_batch_gives_the_folder_numbers(tmp_path, folders, inception, b_vs_a):
    a, b = folders
    arr, mu, sigma = _adm_arrays(a, inception)
    np.savez(tmp_path / "VIRTUAL_small_labeled.npz", arr_0=arr, mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm_images_only.npz", arr_0=arr)
    got = FID.compute_metrics(b, tmp_path / "VIRTUAL_small_labeled.npz", extractor=inception, progress=False)
    assert got["settings"]["ref"]["kind"] == "adm-npz"
    assert got["settings"]["ref"]["fid_statistics_from"] == "mu/sigma stored in the file"
    # the same features; mu/sigma stored in float64 (the ADM batch) or recomputed from them: float64
    # round-off only (7e-9 relative measured): rel 1e-5 on any CPU
    for k in ("fid", "kid_mean", "precision", "recall", "isc_mean"):
        assert got[k] == pytest.approx(b_vs_a[k], rel=1e-5, abs=1e-9), k
    imgs = FID.compute_metrics(b, tmp_path / "adm_images_only.npz", extractor=inception, progress=False)
    assert imgs["settings"]["ref"]["fid_statistics_from"] == "features of the reference images"
    for k in ("fid", "kid_mean", "precision", "recall"):
        assert imgs[k] == pytest.approx(b_vs_a[k], rel=1e-5, abs=1e-9), k
    # mu/sigma alone: FID only, KID and precision/recall are skipped and say why
    np.savez(tmp_path / "adm_stats_only.npz", mu=mu, sigma=sigma)
    only = FID.compute_metrics(b, tmp_path / "adm_stats_only.npz", extractor=inception, progress=False)
    assert only["fid"] == pytest.approx(b_vs_a["fid"], rel=1e-5)
    assert "kid_mean" not in only and set(only["settings"]["skipped"]) == {"kid", "prc"}


def test_stats_npz_is_reusable_as_ref(tmp_path, folders, inception_weights, inception, b_vs_a):
    a, b = folders
    S.compute_stats(a, tmp_path / "ref.npz", inception_weights=inception_weights, device="cpu", fid_layer="192",
                    progress=False)
    got = FID.compute_metrics(b, tmp_path / "ref.npz", extractor=inception, progress=False)
    assert got["settings"]["ref"]["kind"] == "varkit-stats"
    for k in ("fid", "kid_mean", "precision", "recall"):  # as above: float64 round-off of the same features
        assert got[k] == pytest.approx(b_vs_a[k], rel=1e-5, abs=1e-9), k
    with np.load(tmp_path / "ref.npz") as z:
        assert str(z["varkit_features"]) == "inception" and int(z["num_images"]) == 10
        assert z["features"].shape == (10, 192)


def test_cli_stats_and_features_mismatch(tmp_path, folders, inception):
    a, b = folders
    _run_cli("stats", a, "--out", tmp_path / "digits.npz", "--features", "digits", "--no-progress")
    got = FID.compute_metrics(b, tmp_path / "digits.npz", features="digits", progress=False)
    assert got["fid"] > 0 and got["settings"]["ref"]["features"] == "digits"
    with pytest.raises(InvalidArgumentError, match="digits statistics"):
        FID.compute_metrics(b, tmp_path / "digits.npz", extractor=inception, progress=False)
    with pytest.raises(InvalidArgumentError, match="must end in .npz"):
        S.compute_stats(a, tmp_path / "x.txt", features="digits", progress=False)


# -- bad input -------------------------------------------------------------------------------------
def test_missing_inception_weights_says_what_and_where(tmp_path, monkeypatch, folders):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(S.InceptionWeightsError) as exc:
        S.find_inception_weights(None)
    msg = str(exc.value)
    assert WEIGHTS_NAME in msg and "--inception-weights" in msg
    assert S.torch_fidelity_inception_url() in msg and "https://" in msg
    assert str(tmp_path / "empty_torch_home") in msg
    # the CLI fails before generating anything
    with pytest.raises(S.InceptionWeightsError):
        cli(["eval", "fid", "--samples", str(folders[0]), "--ref", str(folders[1]), "--no-progress"])
    with pytest.raises(S.InceptionWeightsError, match="not found: .*nope.pth"):
        S.find_inception_weights(tmp_path / "nope.pth")
    # a file in torch-fidelity's cache folder is found without a path
    cache = S.inception_cache_dir()
    cache.mkdir(parents=True)
    (cache / WEIGHTS_NAME).write_bytes(b"x")
    assert S.find_inception_weights(None) == cache / WEIGHTS_NAME


def test_wrong_inception_file(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    for name, pattern in (("text.pth", "cannot read"), ("other.pth", "not torch-fidelity's InceptionV3"),
                          ("list.pth", "not an InceptionV3 state dict")):
        with pytest.raises(S.InceptionWeightsError, match=pattern) as exc:
            S.load_extractor("inception", tmp_path / name, "cpu")
        assert WEIGHTS_NAME in str(exc.value)


def test_reference_with_too_few_images(tmp_path, folders, digits):
    small = _write_folder(tmp_path / "small", digits[0][:3])
    with pytest.raises(DataError, match="has 3 images.*at least 4"):
        FID.compute_metrics(folders[0], small, features="digits", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has 0 images"):
        cli(["eval", "fid", "--samples", str(folders[0]), "--ref", str(empty), "--features", "digits"])
    with pytest.raises(DataError, match="not found"):
        cli(["eval", "fid", "--samples", str(folders[0]), "--ref", str(tmp_path / "missing"), "--features", "digits"])


def test_fewer_than_two_samples(tmp_path, digits):
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        FID.eval_fid(FakePipe(digits), num_samples=1, features="digits", out_dir=tmp_path, progress=False)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        cli(["eval", "fid", "--model", "whatever", "--num-samples", "1", "--features", "digits"])
    one = _write_folder(tmp_path / "one", digits[0][:1])
    with pytest.raises(DataError, match="has 1 image;"):
        FID.compute_metrics(one, "digits", features="digits", progress=False)


def test_images_of_mixed_sizes(tmp_path, digits):
    x = digits[0]
    mixed = _write_folder(tmp_path / "mixed", x[:4])
    to_pil(torch.nn.functional.interpolate(x[4:5], size=16))[0].save(mixed / "000009.png")
    with pytest.raises(DataError, match="mixed sizes.*32x32.*16x16"):
        FID.compute_metrics(mixed, "digits", features="digits", progress=False)
    with pytest.raises(DataError, match="mixed sizes"):
        cli(["eval", "stats", str(mixed), "--out", str(tmp_path / "s.npz"), "--features", "digits", "--no-progress"])
    assert not (tmp_path / "s.npz").exists()


def test_bad_arguments_are_varkit_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="--ref is required"):
        FID.eval_fid("digits", features="inception", inception_weights=tmp_path / "w.pth")
    with pytest.raises(InvalidArgumentError, match="KEY=VALUE"):
        cli(["eval", "fid", "--model", "m", "--features", "digits", "--sampler-arg", "oops"])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(VarkitError):
        S.open_reference(tmp_path / "junk.npz")
    np.savez(tmp_path / "keys.npz", foo=np.zeros(2))
    with pytest.raises(DataError, match="expected a varkit stats file"):
        S.open_reference(tmp_path / "keys.npz")


def test_sampler_args_parse():
    from varkit.eval.cli_commands import parse_sampler_args

    assert parse_sampler_args(["window=16", "init=spatial", "relax=0.5", "use-x=true"]) == {
        "window": 16, "init": "spatial", "relax": 0.5, "use_x": True}


def test_cli_fid_with_a_saved_pipeline_folder(tmp_path, tiny_pipeline):
    tiny_pipeline.defaults["top_k"] = 7  # a "published" default the run must pick up
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    _run_cli("fid", "--model", tmp_path / "pipe", "--features", "digits", "--num-samples", 4, "--batch-size", 3,
             "--out", tmp_path / "s", "--device", "cpu", "--no-progress", "--cfg", "1.0")
    rec = json.loads((tmp_path / "s" / "metrics_digits.json").read_text())
    assert rec["top_k"] == 7 and rec["cfg"] == 1.0 and rec["num_samples"] == 4
    assert rec["model_defaults"]["top_k"] == 7
    assert len(list((tmp_path / "s").glob("*.png"))) == 4


def test_torchrun_rank_generates_its_share_only(tmp_path, digits, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    pipe = FakePipe(digits)
    assert FID.eval_fid(pipe, num_samples=6, features="digits", out_dir=tmp_path, progress=False) is None
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [FID.sample_name(i, i) for i in (1, 3, 5)]
    monkeypatch.setenv("RANK", "0")
    rec = FID.eval_fid(pipe, num_samples=6, features="digits", out_dir=tmp_path, progress=False, print_table=False)
    assert rec["world_size"] == 2 and rec["metrics"]["num_samples"] == 6
    assert [s for c in pipe.calls for s in c["seeds"]] == [1, 3, 5, 0, 2, 4]


# -- the papers' protocol: presets, evaluation size, ADM export, cached references, torchrun ---------
def test_preset_and_image_size_reach_the_pipeline(tmp_path, digits):
    pipe = FakePipe(digits)
    pipe.defaults["fid_image_size"] = 256
    pipe.settings = lambda preset: {**pipe.defaults, **{"demo": {"cfg": 4.0, "top_k": 2000}}[preset]}
    s = FID.resolve_settings(pipe, preset="demo", cfg=None)
    assert (s["cfg"], s["top_k"], s["image_size"], s["preset"]) == (4.0, 2000, 256, "demo")
    assert FID.resolve_settings(pipe, image_size=64)["image_size"] == 64  # explicit size wins
    FID.generate_samples(pipe, tmp_path, 2, settings=s, progress=False)
    assert pipe.calls[0]["image_size"] == 256 and pipe.calls[0]["cfg"] == 4.0 and "preset" not in pipe.calls[0]
    with pytest.raises(InvalidArgumentError, match="image-size"):
        FID.resolve_settings(pipe, image_size=0)


def test_real_pipeline_resizes_bicubic_before_quantising(tiny_pipeline):
    small = tiny_pipeline([0], seed=3)
    big = tiny_pipeline([0], seed=3, image_size=48)
    assert big.images[0].size == (48, 48) and torch.equal(small.tokens, big.tokens)
    with pytest.raises(InvalidArgumentError, match="image_size"):
        tiny_pipeline([0], image_size=-1)


def test_export_npz_is_the_adm_sample_batch(tmp_path, digits):
    pipe = FakePipe(digits)
    rec = FID.eval_fid(pipe, num_samples=12, features="digits", out_dir=tmp_path / "s", progress=False,
                       print_table=False, export_npz_path=tmp_path / "samples.npz")
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 3)
    files = FID.sample_files(tmp_path / "s", 12, 10)
    from PIL import Image

    assert np.array_equal(arr[5], np.asarray(Image.open(files[5]).convert("RGB")))  # index order
    assert rec["export_npz"].endswith("samples.npz")
    assert not list(tmp_path.glob(".samples.npz*"))  # no temporary left
    # the ADM batch is a valid --ref holding the same uint8 images as the folder: the same features, so
    # exactly the folder's numbers (not ~0: sqrtm of a rank-deficient 12-sample covariance is ill-conditioned)
    via_npz = FID.compute_metrics(files, tmp_path / "samples.npz", features="digits", metrics=["fid"], progress=False)
    via_dir = FID.compute_metrics(files, tmp_path / "s", features="digits", metrics=["fid"], progress=False)
    assert via_npz["fid"] == via_dir["fid"]
    with pytest.raises(InvalidArgumentError, match=".npz"):
        FID.eval_fid(pipe, num_samples=4, features="digits", out_dir=tmp_path / "t", export_npz_path=tmp_path / "x.zip")


def test_reference_features_are_computed_once_and_cached(tmp_path, folders, monkeypatch):
    monkeypatch.setenv("VARKIT_CACHE", str(tmp_path / "cache"))
    a, b = folders
    calls = []
    real = S.extract_features

    def counting(images, *args, **kw):
        calls.append(len(images))
        return real(images, *args, **kw)

    monkeypatch.setattr(S, "extract_features", counting)
    first = FID.compute_metrics(b, a, features="digits", metrics=["fid"], progress=False)
    assert len(list((tmp_path / "cache" / "fid_refs").glob("*.npy"))) == 1
    n_first = len(calls)
    second = FID.compute_metrics(b, a, features="digits", metrics=["fid"], progress=False)
    assert n_first == 2 and len(calls) == 3  # the second run extracts the samples again, not the reference
    assert second["fid"] == first["fid"]
    # a changed reference file invalidates the entry
    import os

    f = sorted(a.glob("*.png"))[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    FID.compute_metrics(b, a, features="digits", metrics=["fid"], progress=False)
    assert len(calls) == 5  # samples and reference again


@pytest.mark.slow
def test_nproc_two_gloo_ranks_meet_at_a_barrier(tmp_path, tiny_pipeline):
    """`eval fid --nproc 2`: torchrun, two gloo ranks, each writes its share, rank 0 scores all (no polling)."""
    import subprocess
    import sys

    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    cmd = [sys.executable, "-m", "varkit.cli", "eval", "fid", "--model", str(tmp_path / "pipe"), "--features",
           "digits", "--num-samples", "6", "--batch-size", "2", "--out", str(tmp_path / "s"), "--device", "cpu",
           "--no-progress", "--nproc", "2", "--metrics", "fid"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "s" / "metrics_digits.json").read_text())
    assert rec["world_size"] == 2 and rec["metrics"]["num_samples"] == 6
    assert len(list((tmp_path / "s").glob("*.png"))) == 6
