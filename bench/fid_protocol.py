"""How long each step of the papers' FID protocol takes on this machine, for LlamaGen-B (c2i, 256 px).

The steps are the README's: convert the published files, compute the reference statistics once (ADM's
VIRTUAL_imagenet256_labeled.npz: 10 000 images), generate 50 000 samples at the paper's settings (CFG 2.0, no
top-k), extract their Inception features, compute FID/IS/precision/recall, export the ADM sample batch. Nothing
is downloaded: the LlamaGen files are random weights in the published format (varkit.checkpoints.synthetic), and
Inception is torch-fidelity's architecture with random weights (its cost does not depend on the weights). Each
step runs on a small count and is extrapolated linearly to the protocol's count; the JSON records both.

    python bench/fid_protocol.py --out bench/results/fid_protocol.json [--device cpu] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REF_IMAGES, NUM_SAMPLES = 10_000, 50_000
KEYS = Path("/work/shared/reference/checkpoint_keys")


def _read_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    items = []
    for line in (KEYS / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        items.append((key, tuple(ast.literal_eval(shape))))
    return items


def _random_inception(device: str):
    import torch_fidelity.feature_extractor_inceptionv3 as m

    with mock.patch.object(m, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        fe = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    return fe.to(device).eval()


def _timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8, help="generation batch (the protocol's per-process batch)")
    ap.add_argument("--gen-images", type=int, default=8, help="images generated to time a batch")
    ap.add_argument("--feat-images", type=int, default=64, help="images pushed through Inception to time it")
    ap.add_argument("--out", default="bench/results/fid_protocol.json")
    args = ap.parse_args()

    from varkit.checkpoints.llamagen import convert_llamagen
    from varkit.checkpoints.synthetic import llamagen_gpt_state_dict, llamagen_vq_state_dict
    from varkit.pipeline import load_pipeline

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"model": llamagen_vq_state_dict(_read_keys("keys_llamagen_vq_ds16.txt"), 0)}, tmp / "vq.pt")
        torch.save({"model": llamagen_gpt_state_dict(_read_keys("keys_llamagen_GPT-B_c2i_256.txt"), 1)}, tmp / "c2i_B_256.pt")
        t, out = _timed(convert_llamagen, tmp / "vq.pt", tmp / "c2i_B_256.pt", tmp / "llamagen-b")
        rows["convert"] = {"seconds": t, "count": 1, "protocol_count": 1}

        pipe = load_pipeline(out, device=args.device, dtype=args.dtype)
        settings = pipe.settings()
        labels = list(range(args.gen_images))
        pipe(labels[: min(2, len(labels))], batch_size=args.batch)  # warm-up (allocator, first-call costs)
        t, res = _timed(pipe, labels, batch_size=args.batch, seed=1)
        per = t / len(labels)
        rows["generate"] = {"seconds": t, "count": len(labels), "per_image_s": per, "protocol_count": NUM_SAMPLES,
                            "protocol_seconds": per * NUM_SAMPLES, "settings": {k: settings[k] for k in ("cfg", "top_k", "top_p", "temperature")},
                            "forward_passes_per_batch": res.stats.forward_passes}

        fe = _random_inception(args.device)
        imgs = torch.randint(0, 256, (args.feat_images, 3, 256, 256), dtype=torch.uint8, device=args.device)
        with torch.inference_mode():
            fe(imgs[:8])
            t, _ = _timed(lambda: [fe(imgs[i:i + 64]) for i in range(0, len(imgs), 64)])
        per = t / len(imgs)
        rows["reference_features"] = {"seconds": t, "count": len(imgs), "per_image_s": per, "protocol_count": REF_IMAGES,
                                      "protocol_seconds": per * REF_IMAGES, "note": "once: cached afterwards"}
        rows["sample_features"] = {"seconds": t, "count": len(imgs), "per_image_s": per, "protocol_count": NUM_SAMPLES,
                                   "protocol_seconds": per * NUM_SAMPLES}

        from torch_fidelity.metric_fid import fid_statistics_to_metric

        g = np.random.default_rng(0)
        a = g.standard_normal((4096, 2048)).astype(np.float32)
        st = {"mu": a.mean(0).astype(np.float64), "sigma": np.cov(a, rowvar=False)}
        st2 = {"mu": st["mu"] + 0.1, "sigma": st["sigma"] * 1.1}
        t, _ = _timed(fid_statistics_to_metric, st, st2, False)
        rows["fid_math"] = {"seconds": t, "count": 1, "protocol_count": 1, "protocol_seconds": t}

        from varkit.eval.fid import export_npz
        from varkit.io import save_image
        from varkit.pipeline import to_pil

        files = []
        for i, im in enumerate(to_pil(torch.rand(32, 3, 256, 256) * 2 - 1)):
            save_image(im, tmp / f"s{i:03d}.png")
            files.append(str(tmp / f"s{i:03d}.png"))
        t, _ = _timed(export_npz, files, tmp / "x.npz", False)
        rows["export_npz"] = {"seconds": t, "count": len(files), "per_image_s": t / len(files),
                              "protocol_count": NUM_SAMPLES, "protocol_seconds": t / len(files) * NUM_SAMPLES}

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    record = {"model": "LlamaGen-B c2i 256 (random weights, published format)", "device": args.device, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "cpu": cpu,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "steps": rows}
    print(f"{'step':<20} {'measured':>14} {'protocol count':>15} {'protocol time':>14}")
    for k, r in rows.items():
        ps = r.get("protocol_seconds", r["seconds"])
        print(f"{k:<20} {r['seconds']:>10.2f} s/{r['count']:<3} {r['protocol_count']:>15} {ps / 3600:>12.2f} h")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(record, indent=2))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
