"""The bad-input catalogue (issue 20, item 6): one table of wrong inputs to the CLI and to the API.

Every case must be stopped at the door:

- CLI (``varkit.cli.main([...])``): exit status 2, exactly one ``error:`` line on stderr and it is the
  last line (argparse's own errors are preceded by its usage lines), no traceback;
- API: a ``varkit.errors`` exception whose message is one line;
- both: the message matches what was wrong (the case's ``match``), and nothing was written: the case's
  folder (where its output paths point) is byte-for-byte what the case's setup left.

A new command or option joins the table with its bad inputs (one row each).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import randomize

import varkit
from varkit.cli import main
from varkit.errors import VarkitError

# -- shared, read-only material (built once) -----------------------------------------------------------


def _tiny_pipeline():
    from varkit.models import create_model
    from varkit.pipeline import Pipeline
    from varkit.tokenizers import VQConfig, VQTokenizer

    tok = VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                               codebook_dim=4, norm_groups=4)).eval()
    return Pipeline(tok, randomize(create_model("raster-tiny")), {"cfg": 1.0}, name="tiny")


class _Evil:
    """Unpickling this would create a file; a weights-only load must refuse it without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """Model folders and files the cases read (never written by a case)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("assets")
    pipe = _tiny_pipeline()
    pipe.save_pretrained(root / "pipe")

    def variant(name: str, change: Callable[[Path], None]) -> None:
        shutil.copytree(root / "pipe", root / name)
        change(root / name)

    variant("list_config", lambda d: (d / "config.json").write_text("[1, 2]"))
    variant("gen_list_config", lambda d: (d / "generator" / "config.json").write_text('["RasterGenerator"]'))
    variant("bad_type", lambda d: _edit_json(d / "generator" / "config.json", lambda c: {**c, "n_layer": "two"}))
    variant("bad_tuple", lambda d: _edit_json(d / "tokenizer" / "config.json", lambda c: {**c, "ch_mult": 3}))
    variant("missing_field", lambda d: _edit_json(d / "generator" / "config.json",
                                                  lambda c: {k: v for k, v in c.items() if k != "n_head"}))
    variant("defaults_list", lambda d: _edit_json(d / "config.json", lambda c: {**c, "defaults": [1]}))
    variant("bad_default", lambda d: _edit_json(d / "config.json", lambda c: {**c, "defaults": {"cfg": "high"}}))

    from safetensors.torch import load_file, save_file

    def nan_weights(d: Path) -> None:
        sd = load_file(str(d / "generator" / "model.safetensors"))
        sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(d / "generator" / "model.safetensors"))

    variant("nan_weights", nan_weights)

    def nan_tokenizer(d: Path) -> None:
        sd = load_file(str(d / "tokenizer" / "model.safetensors"))
        sd = {k: v.fill_(float("nan")) if ".decoder." in k and v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(d / "tokenizer" / "model.safetensors"))

    variant("nan_tokenizer", nan_tokenizer)

    from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

    msvq = MultiScaleVQTokenizer(MSVQConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, codebook_size=16,
                                            patch_nums=(1, 2), norm_num_groups=4, using_sa=False,
                                            using_mid_sa=False))
    msvq.save_pretrained(root / "msvq_tok")

    def other_family(d: Path) -> None:
        shutil.rmtree(d / "tokenizer")
        shutil.copytree(root / "msvq_tok", d / "tokenizer")

    variant("mixed_family", other_family)

    (root / "garbage.pt").write_bytes(b"GARBAGE" + os.urandom(4096))
    (root / "empty.pt").write_bytes(b"")
    with open(root / "evil.pt", "wb") as f:
        pickle.dump(_Evil(str(root / "PWNED")), f)
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 4),
                          "layers.0.attention.wqkv.weight": torch.zeros(12, 4)}}, root / "llamagen.pt")
    torch.save({"kind": "tokenizer:digits-vq", "step": 3}, root / "tok_ckpt.pt")
    (root / "a_file").write_text("not a folder\n")
    (root / "images").mkdir()
    return {"pipe": str(root / "pipe"), "root": str(root), "tok": str(root / "pipe" / "tokenizer"),
            "gen": str(root / "pipe" / "generator"), **{p.name: str(p) for p in root.iterdir()}}


@pytest.fixture(scope="module")
def api_pipe(assets):
    return varkit.load_pipeline(assets["pipe"])


# -- the table -----------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    match: str                                # regex the one-line message must match (case-insensitive)
    argv: list[str] | None = None             # CLI case: "{name}" fields are filled from assets and "tmp"/"out"
    api: Callable[..., Any] | None = None     # API case: called as api(assets, tmp, pipe)
    setup: Callable[[Path], None] | None = None  # prepares the case's folder (an existing output, ...)
    error: type[VarkitError] = VarkitError


def _file(name: str, text: str = "keep me\n") -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def _dir(name: str, *files: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).mkdir()
        for f in files:
            (tmp / name / f).write_text("keep me\n")
    return make


def _unwritable(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).mkdir()
        os.chmod(tmp / name, 0o500)
    return make


GEN = ["generate", "--model", "{pipe}"]
TRAIN_T = ["train", "tokenizer", "--data", "digits", "--config", "digits-vq", "--resolution", "16", "--steps", "1",
           "--batch-size", "2"]
TRAIN_G = ["train", "generator", "--data", "digits", "--tokenizer", "{tok}", "--config", "raster-tiny",
           "--resolution", "16", "--steps", "1", "--batch-size", "2"]


def _train_g(*extra: str, out: str = "{tmp}/run") -> list[str]:
    return [*TRAIN_G, "--out", out, *extra]


def _train_t(*extra: str, out: str = "{tmp}/run") -> list[str]:
    return [*TRAIN_T, "--out", out, *extra]


CLI_CASES = [
    # -- generate: model folders ------------------------------------------------------------------
    Case("generate-unknown-model", "unknown model", ["generate", "--model", "no-such-model", "--out", "{out}"]),
    Case("generate-model-is-a-file", "not a.*folder|not a varkit", ["generate", "--model", "{a_file}", "--out", "{out}"]),
    Case("generate-config-is-a-list", r"config\.json.*(object|list)", [*GEN[:2], "{list_config}", "--out", "{out}"]),
    Case("generate-generator-config-is-a-list", r"config\.json.*(object|list)",
         [*GEN[:2], "{gen_list_config}", "--out", "{out}"]),
    Case("generate-config-field-wrong-type", r"n_layer", [*GEN[:2], "{bad_type}", "--out", "{out}"]),
    Case("generate-config-tuple-field-wrong-type", r"ch_mult", [*GEN[:2], "{bad_tuple}", "--out", "{out}"]),
    Case("generate-config-missing-field", r"n_head", [*GEN[:2], "{missing_field}", "--out", "{out}"]),
    Case("generate-defaults-not-an-object", r"defaults", [*GEN[:2], "{defaults_list}", "--out", "{out}"]),
    Case("generate-stored-default-wrong-type", r"cfg", [*GEN[:2], "{bad_default}", "--out", "{out}"]),
    Case("generate-tokenizer-folder-as-model", "tokenizer|not a varkit pipeline", [*GEN[:2], "{tok}", "--out", "{out}"]),
    Case("generate-tokenizer-of-another-family", "multi-scale|tokenizer", [*GEN[:2], "{mixed_family}", "--out", "{out}"]),
    Case("generate-nan-weights", "non-finite", [*GEN[:2], "{nan_weights}", "--out", "{out}"]),
    # -- generate: classes, seeds, counts ---------------------------------------------------------
    Case("generate-class-negative", "out of range", [*GEN, "--classes", "-1", "--out", "{out}"]),
    Case("generate-class-too-large", "out of range", [*GEN, "--classes", "4", "--out", "{out}"]),
    Case("generate-class-2**63", "out of range", [*GEN, "--classes", str(2**63), "--out", "{out}"]),
    Case("generate-class-float", "invalid int", [*GEN, "--classes", "1.7", "--out", "{out}"]),
    Case("generate-seed-negative", "seed", [*GEN, "--seed", "-1", "--out", "{out}"]),
    Case("generate-seed-2**64", "seed", [*GEN, "--seed", str(2**64), "--out", "{out}"]),
    Case("generate-seed-float", "--seed", [*GEN, "--seed", "0.5", "--out", "{out}"]),
    Case("generate-per-class-0", "per-class", [*GEN, "--per-class", "0", "--out", "{out}"]),
    Case("generate-batch-size-0", "batch.size", [*GEN, "--batch-size", "0", "--out", "{out}"]),
    Case("generate-batch-size-negative", "batch.size", [*GEN, "--batch-size", "-3", "--out", "{out}"]),
    # -- generate: sampling settings --------------------------------------------------------------
    Case("generate-cfg-nan", "cfg", [*GEN, "--cfg", "nan", "--out", "{out}"]),
    Case("generate-cfg-inf", "cfg", [*GEN, "--cfg", "inf", "--out", "{out}"]),
    Case("generate-cfg-negative", "cfg", [*GEN, "--cfg", "-2", "--out", "{out}"]),
    Case("generate-cfg-string", "invalid float", [*GEN, "--cfg", "high", "--out", "{out}"]),
    Case("generate-temperature-inf", "temperature", [*GEN, "--temperature", "inf", "--out", "{out}"]),
    Case("generate-temperature-nan", "temperature", [*GEN, "--temperature", "nan", "--out", "{out}"]),
    Case("generate-temperature-0", "temperature", [*GEN, "--temperature", "0", "--out", "{out}"]),
    Case("generate-top-k-negative", "top_k", [*GEN, "--top-k", "-1", "--out", "{out}"]),
    Case("generate-top-k-float", "invalid int", [*GEN, "--top-k", "2.5", "--out", "{out}"]),
    Case("generate-top-p-0", "top_p", [*GEN, "--top-p", "0", "--out", "{out}"]),
    Case("generate-top-p-nan", "top_p", [*GEN, "--top-p", "nan", "--out", "{out}"]),
    Case("generate-unknown-sampler", "unknown sampler", [*GEN, "--sampler", "beam", "--out", "{out}"]),
    Case("generate-unknown-sampler-option", r"option\(s\) \['bogus'\];", [*GEN, "--sampler", "sjd", "--window", "4",
                                                                      "--option", "bogus=1", "--out", "{out}"]),
    Case("generate-option-without-equals", "KEY=VALUE", [*GEN, "--option", "window", "--out", "{out}"]),
    Case("generate-unknown-dtype", "dtype", [*GEN, "--dtype", "float8", "--out", "{out}"]),
    Case("generate-unknown-device", "device", [*GEN, "--device", "tpu", "--out", "{out}"]),
    Case("generate-cfg-schedule", "invalid choice", [*GEN, "--cfg-schedule", "cosine", "--out", "{out}"]),
    Case("generate-classes-empty", "expected at least one", [*GEN, "--classes", "--out", "{out}"]),
    Case("generate-empty-model-name", "bundled model name", ["generate", "--model", "", "--out", "{out}"]),
    Case("generate-unknown-preset", "preset", [*GEN, "--preset", "nope", "--out", "{out}"]),
    # -- generate: output paths (checked before any sampling) -------------------------------------
    Case("generate-out-gif", r"\.gif", [*GEN, "--out", "{tmp}/x.gif"]),
    Case("generate-out-txt", r"\.txt", [*GEN, "--out", "{tmp}/x.txt"]),
    Case("generate-out-under-a-file", "not a folder|is a file", [*GEN, "--out", "{tmp}/f/x.png"], setup=_file("f")),
    Case("generate-folder-under-a-file", "not a folder|is a file", [*GEN, "--out", "{tmp}/f/sub"], setup=_file("f")),
    Case("generate-out-png-is-a-folder", "folder", [*GEN, "--out", "{tmp}/x.png"], setup=_dir("x.png")),
    Case("generate-out-folder-is-a-file", "file", [*GEN, "--out", "{tmp}/samples"], setup=_file("samples")),
    Case("generate-out-folder-not-empty", "not empty.*--(overwrite|add)", [*GEN, "--out", "{tmp}/samples"],
         setup=_dir("samples", "00000_class0.png")),
    Case("generate-out-unwritable", "cannot write|permission|not writable",
         [*GEN, "--out", "{unwritable}/x.png"], setup=_unwritable("ro")),
    Case("train-out-unwritable", "cannot write|permission|not writable", [*TRAIN_T, "--out", "{unwritable}/run"],
         setup=_unwritable("ro")),
    Case("generate-labels-needs-grid", "--labels", [*GEN, "--labels", "--out", "{tmp}/samples"]),
    # -- train (both kinds): argument ranges ------------------------------------------------------
    Case("train-steps-0", "--steps", _train_t("--steps", "0")),
    Case("train-steps-negative", "--steps", _train_g("--steps", "-5")),
    Case("train-batch-size-0", "--batch-size", _train_g("--batch-size", "0")),
    Case("train-ckpt-every-0", "--ckpt-every", _train_t("--ckpt-every", "0")),
    Case("train-log-every-0", "--log-every", _train_g("--log-every", "0")),
    Case("train-lr-negative", "--lr", _train_g("--lr", "-1e-3")),
    Case("train-lr-nan", "--lr", _train_t("--lr", "nan")),
    Case("train-warmup-negative", "--warmup", _train_g("--warmup", "-1")),
    Case("train-ema-above-1", "--ema", _train_g("--ema", "1.5")),
    Case("train-resolution-0", "--resolution", _train_t("--resolution", "0")),
    Case("train-nproc-0", "--nproc", _train_g("--nproc", "0")),
    Case("train-class-dropout-2", "--class-dropout", _train_g("--class-dropout", "2")),
    Case("train-seed-negative", "seed", _train_g("--seed", "-1")),
    Case("train-resolution-not-a-multiple", "downsampl", _train_t("--resolution", "18")),
    Case("train-grad-accum-0", "--grad-accum", _train_g("--grad-accum", "0")),
    # -- train: inputs and outputs ----------------------------------------------------------------
    Case("train-unknown-tokenizer-config", "unknown tokenizer config",
         ["train", "tokenizer", "--data", "digits", "--config", "nope", "--out", "{tmp}/run", "--steps", "1"]),
    Case("train-unknown-generator-config", "unknown model config",
         [*TRAIN_G[:7], "nope", "--out", "{tmp}/run", "--steps", "1"]),
    Case("train-data-missing", "not found", ["train", "tokenizer", "--data", "{tmp}/nothing", "--config", "digits-vq",
                                             "--out", "{tmp}/run", "--steps", "1"]),
    Case("train-data-empty-folder", "no class subfolders|no images",
         ["train", "tokenizer", "--data", "{images}", "--config", "digits-vq", "--out", "{tmp}/run", "--steps", "1"]),
    Case("train-config-of-another-family", "multi-scale",
         [*TRAIN_G[:7], "var-tiny", "--out", "{tmp}/run", "--steps", "1", "--resolution", "16"]),
    Case("train-tokenizer-is-a-generator", "generator.*tokenizer|not a tokenizer",
         [*TRAIN_G[:5], "{gen}", *TRAIN_G[6:], "--out", "{tmp}/run"]),
    Case("train-tokenizer-is-a-pipeline", "pipeline folder.*tokenizer subfolder",
         [*TRAIN_G[:5], "{pipe}", *TRAIN_G[6:], "--out", "{tmp}/run"]),
    Case("train-tokenizer-missing", "not found|no such|unknown", [*TRAIN_G[:5], "{tmp}/none", *TRAIN_G[6:], "--out", "{tmp}/run"]),
    Case("train-out-existing-file", "exists.*not a folder|is a file|not a folder", _train_g(out="{tmp}/f"), setup=_file("f")),
    Case("train-out-under-a-file", "not a folder|is a file", _train_t(out="{tmp}/f/run"), setup=_file("f")),
    Case("train-resume-missing", "not found", _train_g("--resume", "{tmp}/none.pt")),
    Case("train-resume-garbage", "not a (PyTorch|varkit).*checkpoint", _train_g("--resume", "{garbage.pt}")),
    Case("train-resume-empty-file", "empty|not a (PyTorch|varkit).*checkpoint", _train_t("--resume", "{empty.pt}")),
    Case("train-resume-malicious", "not a weights-only|nothing in it was run", _train_g("--resume", "{evil.pt}")),
    Case("train-resume-llamagen-file", "LlamaGen", _train_g("--resume", "{llamagen.pt}")),
    Case("train-resume-other-kind", "tokenizer", _train_g("--resume", "{tok_ckpt.pt}")),
    Case("train-default-unknown-key", "--default", _train_g("--default", "beam=2")),
    Case("train-model-option-unknown", "no field", _train_g("--model-option", "depth=3")),
    Case("train-ce-weight-without-teacher", "--teacher", _train_g("--ce-weight", "0.5")),
    # -- convert ----------------------------------------------------------------------------------
    Case("convert-var-garbage", "not a (PyTorch|varkit).*checkpoint|cannot read",
         ["convert", "var", "--vae", "{garbage.pt}", "--var", "{garbage.pt}", "--out", "{tmp}/conv"]),
    Case("convert-var-malicious", "not a weights-only",
         ["convert", "var", "--vae", "{evil.pt}", "--var", "{evil.pt}", "--out", "{tmp}/conv"]),
    Case("convert-var-llamagen-file", "LlamaGen",
         ["convert", "var", "--vae", "{llamagen.pt}", "--var", "{llamagen.pt}", "--out", "{tmp}/conv"]),
    Case("convert-llamagen-missing-file", "not found",
         ["convert", "llamagen", "--vq", "{tmp}/none.pt", "--gpt", "{tmp}/none.pt", "--out", "{tmp}/conv"]),
    Case("convert-var-bad-patch-nums", "--patch-nums", ["convert", "var", "--vae", "{garbage.pt}", "--var",
                                                       "{garbage.pt}", "--patch-nums", "1,a", "--out", "{tmp}/conv"]),
    Case("convert-unknown-family", "invalid choice", ["convert", "dalle", "--out", "{tmp}/conv"]),
    Case("convert-dd-garbage", "not a (PyTorch|varkit).*checkpoint|cannot read",
         ["convert", "dd", "--tokenizer", "{garbage.pt}", "--dd", "{garbage.pt}", "--out", "{tmp}/conv"]),
    Case("convert-dd-malicious", "not a weights-only",
         ["convert", "dd", "--tokenizer", "{garbage.pt}", "--dd", "{evil.pt}", "--out", "{tmp}/conv"]),
    Case("convert-dd-teacher-file", "LlamaGen GPT.*convert llamagen",
         ["convert", "dd", "--tokenizer", "{garbage.pt}", "--dd", "{llamagen.pt}", "--out", "{tmp}/conv"]),
    Case("convert-dd-missing-file", "not found",
         ["convert", "dd", "--tokenizer", "{tmp}/none.pt", "--dd", "{tmp}/none.pt", "--out", "{tmp}/conv"]),
    Case("bench-quality-unknown-device", "device", ["bench", "quality", "--models", "digits", "--device", "tpu",
                                                    "--out-dir", "{tmp}/b"]),
    Case("convert-out-exists", "already exists", ["convert", "var", "--vae", "{garbage.pt}", "--var", "{garbage.pt}",
                                                 "--out", "{tmp}/conv"], setup=_dir("conv", "keep")),
    # -- eval -------------------------------------------------------------------------------------
    Case("eval-fid-samples-missing", "not found", ["eval", "fid", "--samples", "{tmp}/none", "--features", "digits",
                                                   "--json", "{tmp}/m.json"]),
    Case("eval-fid-num-samples-0", "num.samples", ["eval", "fid", "--model", "{pipe}", "--num-samples", "0",
                                                   "--features", "digits", "--out", "{tmp}/ev"]),
    Case("eval-fid-batch-size-0", "batch.size", ["eval", "fid", "--model", "{pipe}", "--num-samples", "4",
                                                 "--batch-size", "0", "--features", "digits", "--out", "{tmp}/ev"]),
    Case("eval-fid-metrics", "--metrics", ["eval", "fid", "--model", "{pipe}", "--metrics", "fid,lpips",
                                           "--features", "digits", "--out", "{tmp}/ev"]),
    Case("eval-fid-kid-subset-size-0", "--kid-subset-size", ["eval", "fid", "--samples", "{images}", "--features", "digits",
                                                            "--kid-subset-size", "0", "--json", "{tmp}/m.json"]),
    Case("eval-fid-seed-negative", "--seed", ["eval", "fid", "--model", "{pipe}", "--seed", "-1", "--features", "digits",
                                              "--out", "{tmp}/ev"]),
    Case("eval-fid-unknown-device", "device", ["eval", "fid", "--model", "{pipe}", "--num-samples", "4", "--device",
                                               "tpu", "--features", "digits", "--out", "{tmp}/ev"]),
    Case("eval-recon-max-images-0", "--max-images", ["eval", "recon", "--tokenizer", "{pipe}", "--images", "{images}",
                                                     "--max-images", "0", "--features", "digits"]),
    Case("eval-stats-out-under-a-file", "not a folder|is a file", ["eval", "stats", "digits", "--features", "digits",
                                                                   "--out", "{tmp}/f/s.npz"], setup=_file("f")),
    Case("eval-recon-batch-size-0", "batch.size", ["eval", "recon", "--tokenizer", "{pipe}", "--images", "{images}",
                                                   "--batch-size", "0", "--features", "digits"]),
    Case("eval-recon-no-images", "has 0 images|no images", ["eval", "recon", "--tokenizer", "{pipe}", "--images",
                                                        "{images}", "--features", "digits"]),
    # collaborative decoding and KV budgets (issue 19)
    Case("generate-collaborative-k-0", r"k \(scales the drafter makes\) must be in 1\.\.5",
         ["generate", "--model", "digits-var", "--sampler", "collaborative", "--option", "refiner=digits-var-refiner",
          "--option", "k=0", "--out", "{out}"]),
    Case("generate-cache-policy-budget-2", r"in \(0, 1\]",
         ["generate", "--model", "digits-var", "--option", "cache_policy=scalekv:2", "--out", "{out}"]),
]


def _nan(a, t, p):
    return p([0], cfg=float("nan"))


API_CASES = [
    # -- load_pipeline / create_model / list_models -----------------------------------------------
    Case("load-none", "bundled model name|got None", api=lambda a, t, p: varkit.load_pipeline(None)),
    Case("load-int", "bundled model name|got 3", api=lambda a, t, p: varkit.load_pipeline(3)),
    Case("load-empty-string", "bundled model name", api=lambda a, t, p: varkit.load_pipeline("")),
    Case("load-config-list", r"config\.json.*(object|list)", api=lambda a, t, p: varkit.load_pipeline(a["list_config"])),
    Case("load-mixed-family", "multi-scale", api=lambda a, t, p: varkit.load_pipeline(a["mixed_family"])),
    Case("load-bad-device", "device", api=lambda a, t, p: varkit.load_pipeline(a["pipe"], device="tpu")),
    Case("create-unknown", "unknown model config", api=lambda a, t, p: varkit.create_model("nope")),
    Case("create-unknown-field", "no field.*depth", api=lambda a, t, p: varkit.create_model("raster-tiny", depth=3)),
    Case("create-pretrained-unbundled", "no bundled.*convert", api=lambda a, t, p: varkit.create_model("llamagen-b", pretrained=True)),
    Case("create-pretrained-not-bool", "pretrained", api=lambda a, t, p: varkit.create_model("raster-tiny", pretrained="yes")),
    Case("list-models-pattern-not-str", "pattern", api=lambda a, t, p: varkit.list_models(3)),
    Case("to-bad-device", "device", api=lambda a, t, p: p.to("tpu")),
    Case("to-bad-dtype", "dtype", api=lambda a, t, p: p.to(dtype="float8")),
    Case("to-bad-type", "device|dtype", api=lambda a, t, p: p.to(3.5)),
    # -- the pipeline call ------------------------------------------------------------------------
    Case("call-no-labels", "class_labels", api=lambda a, t, p: p()),
    Case("call-empty-labels", "empty", api=lambda a, t, p: p([])),
    Case("call-label-none", "class id", api=lambda a, t, p: p([None])),
    Case("call-label-float", "integer|1.7", api=lambda a, t, p: p([1.7])),
    Case("call-label-float-tensor", "integer", api=lambda a, t, p: p(torch.tensor([1.0]))),
    Case("call-label-string", "class id|integer", api=lambda a, t, p: p(["1"])),
    Case("call-label-2**63", "out of range", api=lambda a, t, p: p([2**63])),
    Case("call-label-negative", "out of range", api=lambda a, t, p: p([-1])),
    Case("call-label-bool", "integer|class id", api=lambda a, t, p: p([True])),
    Case("call-captions-to-class-model", "class-conditional|caption", api=lambda a, t, p: p(captions=torch.zeros(1, 4, 8))),
    Case("call-seed-none", "seed", api=lambda a, t, p: p([0], seed=None)),
    Case("call-seed-negative", "seed", api=lambda a, t, p: p([0], seed=-1)),
    Case("call-seed-2**64", "seed", api=lambda a, t, p: p([0], seed=2**64)),
    Case("call-seed-float", "seed", api=lambda a, t, p: p([0], seed=1.5)),
    Case("call-image-seeds-length", "image_seeds", api=lambda a, t, p: p([0, 1], image_seeds=[1])),
    Case("call-image-seed-negative", "seed", api=lambda a, t, p: p([0], image_seeds=[-5])),
    Case("call-batch-size-0", "batch_size", api=lambda a, t, p: p([0], batch_size=0)),
    Case("call-batch-size-float", "batch_size", api=lambda a, t, p: p([0], batch_size=1.5)),
    Case("call-cfg-nan", "cfg", api=_nan),
    Case("call-cfg-inf", "cfg", api=lambda a, t, p: p([0], cfg=float("inf"))),
    Case("call-cfg-string", "cfg", api=lambda a, t, p: p([0], cfg="2")),
    Case("call-temperature-inf", "temperature", api=lambda a, t, p: p([0], temperature=float("inf"))),
    Case("call-temperature-string", "temperature", api=lambda a, t, p: p([0], temperature="hot")),
    Case("call-top-k-string", "top_k", api=lambda a, t, p: p([0], top_k="5")),
    Case("call-top-k-float", "top_k", api=lambda a, t, p: p([0], top_k=2.5)),
    Case("call-top-p-string", "top_p", api=lambda a, t, p: p([0], top_p="0.9")),
    Case("call-cfg-schedule", "cfg schedule", api=lambda a, t, p: p([0], cfg_schedule="cosine")),
    Case("call-unknown-option-named-alone", r"option\(s\) \['bogus'\];", api=lambda a, t, p: p([0], sampler="sjd", window=4, bogus=1)),
    Case("call-output-type", "output_type", api=lambda a, t, p: p([0], output_type="jpeg")),
    Case("call-nan-weights", "non-finite", api=lambda a, t, p: varkit.load_pipeline(a["nan_weights"])([0])),
    Case("call-nan-tokenizer", "non-finite images", api=lambda a, t, p: varkit.load_pipeline(a["nan_tokenizer"])([0])),
    Case("call-unknown-preset", "preset", api=lambda a, t, p: p([0], preset="nope")),
    Case("call-image-size-0", "image_size", api=lambda a, t, p: p([0], image_size=0)),
    Case("load-bad-dtype", "dtype", api=lambda a, t, p: varkit.load_pipeline(a["pipe"], dtype="float8")),
    Case("create-field-wrong-type", "dim='wide'", api=lambda a, t, p: varkit.create_model("raster-tiny", dim="wide")),
    Case("image-grid-cols-0", "cols", api=lambda a, t, p: varkit.pipeline.image_grid(p([0]).images, cols=0)),
    Case("image-grid-empty", "no images", api=lambda a, t, p: varkit.pipeline.image_grid([], cols=2)),
    Case("image-grid-labels-length", "labels", api=lambda a, t, p: varkit.pipeline.image_grid(p([0, 1]).images, cols=2,
                                                                                             labels=["0"])),
    Case("get-sampler-unknown-options", r"\['bogus'\]", api=lambda a, t, p: __import__("varkit.samplers", fromlist=["x"])
         .get_sampler("sjd", None, window=4, bogus=1)),
    Case("call-cspd-gamma-0", "gamma", api=lambda a, t, p: p([0], sampler="cspd", draft=varkit.create_model("mar-tiny"), gamma=0)),
    Case("call-cspd-prefill-1", r"prefill .*\[0, 1\)", api=lambda a, t, p: p([0], sampler="cspd",
                                                                           draft=varkit.create_model("mar-tiny"), prefill=1.0)),
    Case("call-cspd-discrete-target", "categorical head", api=lambda a, t, p: p([0], sampler="cspd",
                                                                               draft=varkit.create_model("mar-tiny"))),
    # collaborative decoding (CoDe) and KV budgets (issue 19)
    Case("call-collaborative-no-refiner", "needs a refiner", api=lambda a, t, p: p([0], sampler="collaborative")),
    Case("call-collaborative-k-all-scales", r"k \(scales the drafter makes\) must be in 1\.\.5",
         api=lambda a, t, p: varkit.load_pipeline("digits-var")([0], sampler="collaborative",
                                                                refiner="digits-var-refiner", k=6)),
    Case("call-collaborative-raster-drafter", "drafter RasterGenerator decodes a raster layout",
         api=lambda a, t, p: p([0], sampler="collaborative", refiner="digits-var-refiner")),
    Case("call-cache-policy-budget-0", r"in \(0, 1\]", api=lambda a, t, p: p([0], cache_policy="scalekv:0")),
    Case("call-cache-policy-unknown", "unknown cache policy 'lru'", api=lambda a, t, p: p([0], cache_policy="lru:0.5")),
    Case("call-cache-policy-raster", "needs a next-scale generator", api=lambda a, t, p: p([0], cache_policy="hack:0.5")),
    Case("call-cache-policy-sjd", r"does not take option\(s\) \['cache_policy'\]",
         api=lambda a, t, p: p([0], sampler="sjd", cache_policy="hack:0.5")),
]


def _fill(argv: list[str], assets: dict[str, str], tmp: Path) -> list[str]:
    # root writes through file modes: there, a folder of /sys (which refuses new files) stands in
    unwritable = "/sys/varkit-bad-input" if os.geteuid() == 0 else str(tmp / "ro")
    names = {**assets, "tmp": str(tmp), "out": str(tmp / "out.png"), "unwritable": unwritable}
    return [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in argv]


def _snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root`` with its mode and content (files) or None (folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, p.read_bytes() if p.is_file() and os.access(p, os.R_OK) else None)
    return out


def _error_line(err: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if re.match(r"^varkit[\w -]*: error: ", ln)]
    assert len(errors) == 1 and errors[0] == lines[-1], f"not one error line at the end:\n{err}"
    return errors[0]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: Case, assets, tmp_path, capsys):
    tmp = tmp_path / "case"
    tmp.mkdir()
    if case.setup:
        case.setup(tmp)
    before = _snapshot(tmp)
    try:
        try:
            code = main(_fill(case.argv, assets, tmp))
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, f"exit status {code}, stderr:\n{err}"
        line = _error_line(err)
        assert re.search(case.match, line, re.IGNORECASE), line
        assert _snapshot(tmp) == before, "something was written"
        assert not Path(assets["root"], "PWNED").exists()
    finally:
        for p in [tmp, *tmp.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o700)


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(case: Case, assets, api_pipe, tmp_path):
    tmp = tmp_path / "case"
    tmp.mkdir()
    before = _snapshot(tmp)
    with pytest.raises(case.error) as info:
        case.api(assets, tmp, api_pipe)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), repr(msg)
    assert re.search(case.match, msg, re.IGNORECASE), msg
    assert _snapshot(tmp) == before


def test_the_table_is_the_catalogue():
    """At least 60 cases, CLI and API both, no two with one id."""
    ids = [c.id for c in CLI_CASES + API_CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert len(CLI_CASES) >= 30 and len(API_CASES) >= 30
