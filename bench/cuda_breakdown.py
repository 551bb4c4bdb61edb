"""Where a GPU decode's time goes (random weights of the published sizes; needs a CUDA GPU):

- GPT-B (LlamaGen-B, bf16, CFG batch 2): the GPU time of one captured decode step (CUDA events around replays,
  eager kernels and inductor's), against the whole ancestral step (graph + sampling, from the sampler's wall time)
  and the HBM floor (its weight bytes over the measured read bandwidth);
- VAR-d16 (bf16 generator): the sampler's tokens apart from the tokenizer's decode (fp32 and under bf16 autocast).

    python bench/cuda_breakdown.py [--out bench/results/cuda_breakdown.json] [--skip-inductor]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from varkit.models import create_model
from varkit.samplers import SamplingParams, get_sampler
from varkit.samplers.logits import image_generators


def wall(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def replay_seconds(step, n: int = 100) -> float:
    """GPU seconds of one replay of ``step``'s only graph (events around n back-to-back replays)."""
    (entry,) = step.graphs.values()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    entry.graph.replay()
    start.record()
    for _ in range(n):
        entry.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / n


@torch.inference_mode()
def gpt_b(inductor: bool, bandwidth: float) -> list[dict]:
    base = create_model("llamagen-b").to("cuda", torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "tok_embeddings" not in n
                       and "cls_embedding" not in n)
    rows = []
    for mode in ["graphs"] + (["inductor+graphs"] if inductor else []):
        gen = copy.deepcopy(base).compile_decoding(inductor=mode != "graphs")
        labels = torch.tensor([207], device="cuda")
        sampler = get_sampler("ancestral", SamplingParams(cfg=4.0, top_k=2000))
        t0 = time.perf_counter()
        sampler.sample(gen, labels, image_generators(0, 1))  # captures (and compiles)
        first = time.perf_counter() - t0
        per_image = wall(lambda: sampler.sample(gen, labels, image_generators(0, 1)))
        gpu = replay_seconds(gen._compiled_step)
        rows.append({"model": "GPT-B bf16 b1 cfg", "mode": mode, "first_image_s": first,
                     "ms_per_step_sampler": 1000 * per_image / 256, "ms_per_step_graph_gpu": 1000 * gpu,
                     "weight_MB": weight_bytes / 1e6, "floor_ms_per_step": 1000 * weight_bytes / bandwidth,
                     "graph_fraction_of_hbm": weight_bytes / bandwidth / gpu,
                     "sampler_fraction_of_hbm": weight_bytes / bandwidth / (per_image / 256)})
        print(rows[-1], flush=True)
        del gen
    return rows


@torch.inference_mode()
def var_d16(batch: int) -> list[dict]:
    from varkit.tokenizers import MSVQConfig, MultiScaleVQTokenizer

    tok = MultiScaleVQTokenizer(MSVQConfig()).to("cuda").eval()
    gen = create_model("var-d16").to("cuda", torch.bfloat16).eval()
    gen.bind_tokenizer(tok)
    gen.compile_decoding()
    labels = torch.arange(batch, device="cuda")
    sampler = get_sampler("ancestral", SamplingParams(cfg=1.5, cfg_schedule="var", top_k=900, top_p=0.96))
    run = lambda: sampler.sample(gen, labels, image_generators(0, batch)).tokens  # noqa: E731
    run()
    tokens = run()
    ids = gen.layout.to_tokenizer_ids(tokens)
    t_tokens = wall(run)
    t_fp32 = wall(lambda: tok.decode(ids))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tok.decode(ids)
        t_bf16 = wall(lambda: tok.decode(ids))
    row = {"model": f"VAR-d16 bf16 graphs b{batch}", "tokens_s": t_tokens, "decode_fp32_s": t_fp32,
           "decode_bf16_autocast_s": t_bf16}
    print(row, flush=True)
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/cuda_breakdown.json")
    p.add_argument("--skip-inductor", action="store_true")
    args = p.parse_args()
    from varkit.bench.floor import get_floor

    floor = get_floor("cuda")
    bandwidth = max(r["read_Bps"] for r in floor["bandwidth"])
    rows = gpt_b(not args.skip_inductor, bandwidth)
    for b in (1, 8):
        rows += var_d16(b)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "read_Bps": bandwidth, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
