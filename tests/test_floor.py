"""varkit bench floor: the measurement, its per-machine cache, the work counted per pass, the floors benches attach."""
from __future__ import annotations

import json
import re

import pytest
import torch

from varkit.bench import floor as FL

# a made-up machine: 10 GB/s from 1 MiB up, 100 GB/s below; fp32 peaks at 100 GFLOP/s, bf16 at 400
FAKE = {"key": "cpu-fake-amx-t1", "threads": 1, "cpu": {"model": "fake", "flags": [], "bf16_isa": "amx"},
        "bandwidth": [{"bytes": 1 << 16, "read_Bps": 100e9, "copy_Bps": 50e9},
                      {"bytes": 1 << 20, "read_Bps": 8e9, "copy_Bps": 10e9}],
        "gemm": {"float32": {"m1": {"flops_per_s": 10e9}, "m8": {"flops_per_s": 50e9},
                             "square": {"flops_per_s": 100e9}},
                 "bfloat16": {"m1": {"flops_per_s": 20e9}, "m8": {"flops_per_s": 200e9},
                              "square": {"flops_per_s": 400e9}}},
        "peak_gemm_flops": {"float32": 100e9, "bfloat16": 400e9}, "device": "cpu", "bandwidth_pages": "huge"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "floor"


def test_quick_measurement_is_sane_and_cached(cache):
    got = FL.get_floor(quick=True)
    assert got["quick"] and got["threads"] == torch.get_num_threads() and got["device"] == "cpu"
    assert [r["bytes"] >> 20 for r in got["bandwidth"]] == [4, 64]
    # any machine moves more than 0.1 GB/s and multiplies faster than 0.1 GFLOP/s (lower bounds only: the
    # machine may be shared and slow, never faster than physics; no upper bound is asserted)
    assert all(r["read_Bps"] > 1e8 and r["copy_Bps"] > 1e8 for r in got["bandwidth"])
    for dt in ("float32", "bfloat16"):
        assert set(got["gemm"][dt]) == {"m1", "m8", "m64", "square", "square_quarter"}
        assert got["peak_gemm_flops"][dt] == max(s["flops_per_s"] for s in got["gemm"][dt].values()) > 1e8
    assert got["auto_dtype"] in ("float32", "bfloat16")
    path = cache / f"{FL.machine_key()}.json"
    assert json.loads(path.read_text())["key"] == got["key"] == FL.machine_key()
    assert FL.cached_floor() == got and FL.get_floor(quick=True) == got  # reused, not measured again


def test_cache_key_has_model_isa_threads_and_ignores_a_corrupt_file(cache):
    from varkit.device import cpu_info

    key = FL.machine_key(threads=3)
    assert key.endswith(f"-{cpu_info()['bf16_isa']}-t3") and key.startswith("cpu-")
    cache.mkdir(parents=True)
    (cache / f"{key}.json").write_text("{not json")
    assert FL.cached_floor(threads=3) is None


def test_a_quick_cache_serves_quick_requests_only(cache, monkeypatch):
    FL.save_floor({**FAKE, "key": FL.machine_key(), "quick": True})
    assert FL.get_floor(quick=True)["quick"]
    calls = []
    monkeypatch.setattr(FL, "measure_floor", lambda *a, **k: calls.append(k) or {**FAKE, "key": FL.machine_key()})
    assert FL.get_floor() is not None and calls and not calls[0]["quick"]


def test_a_cpu_floor_measured_in_small_pages_is_measured_again(cache, monkeypatch):
    """Bandwidth buffers are in huge pages (as varkit's weight copies): a cached CPU floor from before, read in 4 KiB
    pages (slower: a lower floor), no longer serves."""
    old = {k: v for k, v in FAKE.items() if k != "bandwidth_pages"}
    FL.save_floor({**old, "key": FL.machine_key()})
    calls = []
    monkeypatch.setattr(FL, "measure_floor", lambda *a, **k: calls.append(k) or {**FAKE, "key": FL.machine_key()})
    assert FL.get_floor(measure=False)["bandwidth"] == FAKE["bandwidth"] and not calls  # kept where not measuring
    assert FL.get_floor()["bandwidth_pages"] == "huge" and len(calls) == 1
    assert FL.get_floor()["bandwidth_pages"] == "huge" and len(calls) == 1  # the new one is cached


def test_cpu_bandwidth_buffers_start_on_a_huge_page():
    from varkit.nn.weight_arena import HUGE_PAGE_BYTES

    buf = FL.bandwidth_buffer(1 << 20, torch.device("cpu"))
    assert buf.dtype == torch.float32 and buf.numel() == 1 << 20
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        assert buf.data_ptr() % HUGE_PAGE_BYTES == 0


def test_bandwidth_for_interpolates_a_passs_time_between_measured_sizes():
    """A set up to the smallest size: its rate. Larger: the time through the measured times linearly (so a measured
    size gets its measured rate), past the largest at the last segment's cost per byte; best of read and copy at
    each size; continuous and non-increasing."""
    assert FL.bandwidth_for(FAKE, 1000) == 100e9  # below every size: the smallest
    assert FL.bandwidth_for(FAKE, 1 << 16) == 100e9
    assert FL.bandwidth_for(FAKE, 1 << 20) == pytest.approx(10e9, rel=1e-12)  # measured: copy's 10e9 beats read's 8e9
    t0, t1 = (1 << 16) / 100e9, (1 << 20) / 10e9
    per_byte = (t1 - t0) / ((1 << 20) - (1 << 16))
    n = 1 << 19
    assert FL.bandwidth_for(FAKE, n) == pytest.approx(n / (t0 + (n - (1 << 16)) * per_byte), rel=1e-12)
    n = 1 << 30  # beyond the largest: the last segment's cost a byte (just under 10e9 a second here)
    assert FL.bandwidth_for(FAKE, n) == pytest.approx(n / (t0 + (n - (1 << 16)) * per_byte), rel=1e-12)
    three = {"bandwidth": FAKE["bandwidth"] + [{"bytes": 1 << 28, "read_Bps": 5e9, "copy_Bps": 1e9}]}
    sizes = [1 << 15, 1 << 16, 1 << 18, 1 << 20, 1 << 24, 1 << 28, 1 << 32]
    rates = [FL.bandwidth_for(three, s) for s in sizes]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert FL.bandwidth_for(three, 1 << 28) == pytest.approx(5e9, rel=1e-12)
    for s in (1 << 16, 1 << 20, 1 << 28):  # continuous at the measured sizes
        assert FL.bandwidth_for(three, s * (1 + 1e-9)) == pytest.approx(FL.bandwidth_for(three, s), rel=1e-6)


def test_floor_seconds_is_the_larger_bound():
    # 1 GB at bandwidth_for's rate (~9.4 GB/s: past 1 MiB at the last segment's cost) ~ 0.106 s against 1 GFLOP at
    # 100 GFLOP/s = 0.01 s: bandwidth-bound
    assert FL.floor_seconds(0.9e9, 0.1e9, 1e9, "float32", FAKE) == pytest.approx(1e9 / FL.bandwidth_for(FAKE, 1e9), rel=1e-12)
    assert 0.1 < FL.floor_seconds(0.9e9, 0.1e9, 1e9, "float32", FAKE) < 0.11
    # compute-bound: 100 GFLOP fp32 = 1 s; in bf16 0.25 s; per-dtype FLOPs add up
    assert FL.floor_seconds(1e6, 0, 100e9, torch.float32, FAKE) == pytest.approx(1.0, rel=1e-12)
    assert FL.floor_seconds(1e6, 0, 100e9, torch.bfloat16, FAKE) == pytest.approx(0.25, rel=1e-12)
    assert FL.floor_seconds(1e6, 0, {"float32": 100e9, "bfloat16": 100e9}, floor=FAKE) == pytest.approx(1.25, rel=1e-12)


def test_decode_score_is_the_geometric_mean_of_decode_shapes():
    assert FL.decode_gemm_score(FAKE, "float32") == pytest.approx((10e9 * 50e9) ** 0.5, rel=1e-12)
    assert FL.decode_gemm_score(FAKE, "float16") is None


def _linear_numel(gen):
    return sum(m.weight.numel() for m in gen.modules() if isinstance(m, torch.nn.Linear))


def test_trace_counts_a_raster_decode_exactly(tiny_gen):
    """raster-tiny, batch 1, no CFG: every pass runs every linear on one row, attention over the filled cache."""
    from varkit.samplers import SamplingParams

    gen = tiny_gen
    tr = FL.trace_sampling(gen, SamplingParams(cfg=1.0))
    N = gen.layout.num_tokens
    layers, heads, hd = gen.cache_dims()
    dim = heads * hd
    assert len(tr.passes) == N and tr.other.flops == {}
    wbytes = 4 * sum(p.numel() for m in gen.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))
    assert all(p.weight_bytes == wbytes for p in tr.passes)  # every linear once per pass, fp32
    for i, p in enumerate(tr.passes):  # pass 0: the condition; pass i: token i-1, attending to everything before
        keys = gen.cond_len + i
        assert p.kv_bytes == layers * 2 * keys * dim * 4
        want = 2 * _linear_numel(gen) + layers * 4 * keys * dim
        assert p.flops == {"float32": want}  # integers far below 2^53: exact in float
    # batch scaling: weights once per pass, KV and FLOPs per image
    t1, t8 = tr.totals(1), tr.totals(8)
    assert t8["weight_bytes"] == t1["weight_bytes"] and t8["kv_bytes"] == 8 * t1["kv_bytes"]
    assert t8["flops"] == 8 * t1["flops"]


def test_trace_of_cfg_and_bf16(tiny_gen):
    from varkit.samplers import SamplingParams

    base = FL.trace_sampling(tiny_gen, SamplingParams(cfg=1.0)).totals(1)
    cfg = FL.trace_sampling(tiny_gen, SamplingParams(cfg=3.0)).totals(1)
    assert cfg["flops"] == 2 * base["flops"] and cfg["kv_bytes"] == 2 * base["kv_bytes"]
    bf = FL.trace_sampling(tiny_gen.to(torch.bfloat16), SamplingParams(cfg=1.0))
    assert set(bf.passes[1].flops) == {"bfloat16"}
    assert bf.totals(1)["weight_bytes"] * 2 == base["weight_bytes"]


def test_trace_restores_the_model(tiny_gen):
    from varkit.nn.layers import Linear
    from varkit.samplers import SamplingParams

    plain = Linear.linear
    FL.trace_sampling(tiny_gen, SamplingParams(cfg=1.0))
    assert Linear.linear is plain and "forward" not in vars(tiny_gen) and "prefill" not in vars(tiny_gen)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_gen.modules())


def test_trace_counts_var_passes_and_the_tokenizer_decode(tmp_path):
    """VAR: one pass per scale (the qv-biased qkv GEMM goes through Linear.linear, counted too); the VQVAE
    decode's convolutions land in ``other``."""
    from varkit.pipeline import load_pipeline

    pipe = load_pipeline("digits-var")
    with torch.inference_mode(), FL.trace_work(pipe.generator, pipe.tokenizer) as tr:
        pipe(class_labels=[3], seed=0)
    gen = pipe.generator
    assert len(tr.passes) == gen.layout.num_steps
    qkv = [b.attn.wqkv for b in gen.blocks]
    assert all(id(m) in p.seen for p in tr.passes for m in qkv)
    assert tr.other.flops.get("float32", 0) > 0 and tr.other.weight_bytes > 0  # the decoder's convolutions
    js = FL.WorkTrace.from_json(json.loads(json.dumps(tr.to_json())))
    assert js.totals(4) == tr.totals(4) and js.floor(4, FAKE) == tr.floor(4, FAKE)


def test_trace_counts_winograd_products_for_the_3x3_convolutions_it_takes():
    """A 3x3 convolution Winograd F(4x4, 3x3) takes on a CPU counts its 36 products a 4x4 tile and channel pair
    (a quarter of the direct product's 144, tiles rounded up at the edges); narrow ones count the direct product."""
    from varkit.nn.cpu_kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("no C++ toolchain to build the kernels here: no Winograd path to count")
    wide, narrow = torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.Conv2d(8, 48, 3, padding=1)
    with torch.inference_mode(), FL.trace_work(torch.nn.Module(), wide, narrow) as tr:
        wide(torch.randn(2, 32, 34, 32))
        narrow(torch.randn(2, 8, 34, 32))
    direct_narrow = 2.0 * 2 * 48 * 34 * 32 * 8 * 9
    winograd_wide = 2.0 * 2 * 9 * 8 * 36 * 32 * 48  # ceil(34/4) x 32/4 tiles
    assert tr.other.flops["float32"] == winograd_wide + direct_narrow


def test_attach_floor_adds_the_columns(tiny_gen):
    from varkit.samplers import SamplingParams

    tr = FL.trace_sampling(tiny_gen, SamplingParams(cfg=1.0))
    rows = [{"model": "a", "batch": 1, "wall_s": 1.0}, {"model": "a", "batch": 8, "wall_s": 2.0},
            {"model": "b", "batch": 1, "wall_s": 1.0}]
    FL.attach_floor(rows, {"a": tr}, FAKE)
    assert rows[0]["floor_s"] == tr.floor(1, FAKE)["floor_s"] > 0
    assert rows[1]["fraction_of_floor"] == rows[1]["floor_s"] / 2.0
    assert "floor_s" not in rows[2]  # no trace for b
    assert rows[0]["floor_bound"] in ("bandwidth", "compute") and rows[0]["floor_passes"] == len(tr.passes)


def test_live_floor_scales_the_dram_rate_only():
    """The live floor: the largest measured size's read and copy rates times the probed rate over the floor's read
    rate there; the cache-sized rates and the floor itself untouched."""
    live = FL.live_floor(FAKE, 4e9)  # the host reads half as fast as when the floor was measured (8e9)
    assert live["bandwidth"][0] == FAKE["bandwidth"][0]
    assert live["bandwidth"][1]["read_Bps"] == pytest.approx(4e9, rel=1e-12)
    assert live["bandwidth"][1]["copy_Bps"] == pytest.approx(5e9, rel=1e-12)
    assert FAKE["bandwidth"][1]["read_Bps"] == 8e9
    assert FL.bandwidth_for(live, 1 << 20) == pytest.approx(FL.bandwidth_for(FAKE, 1 << 20) / 2, rel=1e-12)


def test_attach_floor_adds_the_live_floor_of_a_probed_row(tiny_gen):
    """A row with the host's read rate while it ran gets its floor at that rate as well: a bandwidth-bound run
    whose host read half as fast as at the floor's measurement has twice the live floor."""
    from varkit.samplers import SamplingParams

    tr = FL.trace_sampling(tiny_gen, SamplingParams(cfg=1.0))
    slow = {"bandwidth": [{"bytes": 1 << 16, "read_Bps": 8e9, "copy_Bps": 8e9}],
            "peak_gemm_flops": {"float32": 1e18}}  # one DRAM size, compute free: every pass bandwidth-bound
    rows = [{"batch": 1, "wall_s": 1.0, "host_read_GBps": 4.0}, {"batch": 1, "wall_s": 1.0}]
    FL.attach_floor(rows, tr, slow)
    assert rows[0]["floor_s"] == rows[1]["floor_s"] > 0
    assert rows[0]["host_vs_floor_read"] == pytest.approx(0.5, rel=1e-12)
    assert rows[0]["floor_live_s"] == pytest.approx(2 * rows[0]["floor_s"], rel=1e-9)
    assert rows[0]["fraction_of_live_floor"] == pytest.approx(2 * rows[0]["fraction_of_floor"], rel=1e-9)
    assert "fraction_of_live_floor" not in rows[1]


def test_host_read_probe_measures_the_floors_largest_size_at_its_thread_count(monkeypatch):
    """The probe reads a buffer of the floor's largest size, at the floor's thread count (restored after), keeps
    each rate under its key and gives the best; on a GPU floor it measures nothing."""
    floor = {**FAKE, "threads": 1, "clock": "perf_counter"}
    sizes, threads = [], []
    real_sum = torch.Tensor.sum

    def spy(self, *a, **k):
        sizes.append(self.numel() * self.element_size())
        threads.append(torch.get_num_threads())
        return real_sum(self, *a, **k)

    before = torch.get_num_threads()
    monkeypatch.setattr(torch.Tensor, "sum", spy)
    probe = FL.HostReadProbe(floor, budget_s=0.01)
    a, b = probe("x"), probe("x")
    monkeypatch.setattr(torch.Tensor, "sum", real_sum)
    assert a > 0 and b > 0 and probe.best("x") == max(a, b) and probe.best("y") is None
    assert probe.row_fields("x") == {"host_read_GBps": max(a, b) / 1e9} and probe.row_fields("y") == {}
    assert set(sizes) == {1 << 20} and set(threads) == {1} and torch.get_num_threads() == before
    probe.close()
    gpu = FL.HostReadProbe({**FAKE, "device": "cuda"})
    assert gpu("x") is None and gpu.best("x") is None


def test_save_results_stores_the_floor(cache, tmp_path):
    from varkit.bench.report import save_results

    FL.save_floor({**FAKE, "key": FL.machine_key()})
    path = save_results("x", [{"a": 1}], {"device": "cpu"}, tmp_path / "out")
    assert json.loads(path.read_text())["floor"]["peak_gemm_flops"] == FAKE["peak_gemm_flops"]


def _run_cli(argv, capsys):
    from varkit.cli import main

    code = main(argv)
    return code, capsys.readouterr()


def test_bench_floor_command(cache, tmp_path, capsys):
    # --device cpu: the default is the GPU where there is one (another cache key)
    code, out = _run_cli(["bench", "floor", "--device", "cpu", "--sizes-mib", "1", "2", "--dim", "128", "--budget", "0.01",
                          "--out-dir", str(tmp_path)], capsys)
    assert code == 0, out.err
    data = json.loads((tmp_path / "floor.json").read_text())
    assert data["floor"]["gemm_dim"] == 128 and [r["bytes"] for r in data["floor"]["bandwidth"]] == [1 << 20, 2 << 20]
    assert any(r["what"] == "GEMM" for r in data["rows"]) and "dtype='auto' picks" in out.out
    assert (cache / f"{FL.machine_key()}.json").is_file()
    # a second run reuses the cached measurement
    code, out = _run_cli(["bench", "floor", "--device", "cpu", "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and "cached measurement" in out.out
    assert re.search(r"the host reads 2 MiB at [0-9.]+ GB/s now, [0-9.]+ of the cached", out.out)  # its drift since


@pytest.mark.parametrize("argv, pattern", [
    (["--device", "cuda"], "no usable CUDA GPU"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--dtype", "auto"], "not auto"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--sizes-mib", "0"], "--sizes-mib must be positive"),
    (["--dim", "8"], "--dim must be >= 64"),
])
def test_bench_floor_bad_input_is_one_line(cache, tmp_path, capsys, argv, pattern):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, out = _run_cli(["bench", "floor", *argv, "--force", "--out-dir", str(tmp_path)], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), out.err


def test_bench_decode_rows_have_floor_columns(cache, tmp_path, capsys):
    FL.save_floor({**FAKE, "key": FL.machine_key()})
    code, out = _run_cli(["bench", "decode", "--skip-large", "--batch", "1", "--nocache-steps", "2",
                          "--out-dir", str(tmp_path)], capsys)
    assert code == 0, out.err
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["kv-cache", "no-cache"]
    for r in rows:
        basis = r["cpu_s"] if torch.get_num_threads() == 1 else r["wall_s"]
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / basis, rel=1e-12)
        # the host's read rate probed before the run (the fake floor's largest size, 1 MiB), the floor at that rate
        assert r["host_read_GBps"] > 0 and r["fraction_of_live_floor"] == pytest.approx(r["floor_live_s"] / basis,
                                                                                       rel=1e-12)
    assert rows[0]["floor_passes"] == 64 and rows[1]["floor_passes"] == 2


def test_var_bench_work_of_one_call():
    """``varkit bench var``'s varkit worker answers ``work=True`` with the work of a batch-1 call."""
    from varkit.bench.var import work_of_one_call
    from varkit.pipeline import load_pipeline

    pipe = load_pipeline("digits-var")
    tr = FL.WorkTrace.from_json(json.loads(json.dumps(work_of_one_call(pipe, {"cfg": 1.5, "top_k": 10, "top_p": 0.9,
                                                                               "seed": 0}))))
    assert len(tr.passes) == pipe.generator.layout.num_steps and tr.other.flops  # one pass a scale, then the decode
    assert tr.floor(2, FAKE)["floor_s"] > tr.floor(1, FAKE)["floor_s"] > 0


def test_measuring_again_keeps_the_best_of_each_rate():
    slow = json.loads(json.dumps(FAKE))
    slow["bandwidth"][1]["read_Bps"] = 1e9
    slow["gemm"]["float32"]["square"]["flops_per_s"] = 200e9
    got = FL.merge_floors(FAKE, slow)
    assert got["bandwidth"][1]["read_Bps"] == 8e9 and got["gemm"]["float32"]["square"]["flops_per_s"] == 200e9
    assert got["peak_gemm_flops"]["float32"] == 200e9 and got["measurements"] == 2
    assert FL.merge_floors(None, slow) is slow and FL.merge_floors({**FAKE, "key": "other"}, slow) is slow


def test_run_floor_counts_drafter_and_head_network_passes_and_picks_its_basis(monkeypatch):
    """``run_floor`` replays a run under ``trace_work``: a speculative run's passes are the target's and the
    drafter's (each reading its own weights), a MAR run's every diffusion-network call is a pass too; the fraction
    divides by CPU seconds at one CPU thread when the bench measured them, else by wall seconds."""
    import varkit
    from varkit.samplers import SamplingParams, get_sampler
    from varkit.samplers.random import image_generators
    from varkit.samplers.speculative import SpeculativeSampler

    target, draft = varkit.load_pipeline("digits").generator, varkit.load_pipeline("digits-draft").generator
    smp = SpeculativeSampler(SamplingParams(cfg=2.0), draft=draft, gamma=3)
    assert FL.sampler_models(target, smp) == [target, draft]
    labels = torch.tensor([1, 7])
    res = smp.sample(target, labels, image_generators(0, 2))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    out = FL.run_floor(lambda: smp.sample(target, labels, image_generators(0, 2)), [target, draft], 2, 4.0, FAKE,
                       cpu_s=2.0)
    assert out["floor_passes"] == res.stats.forward_passes + res.stats.draft_passes
    nbytes = {id(m): sum(p.numel() * p.element_size() for p in m.parameters()) for m in (target, draft)}
    assert out["floor_weight_bytes"] <= (res.stats.forward_passes * nbytes[id(target)]
                                         + res.stats.draft_passes * nbytes[id(draft)])
    assert out["floor_weight_bytes"] > res.stats.forward_passes * nbytes[id(target)] / 2
    assert out["fraction_of_floor_basis"] == "cpu_s" and out["fraction_of_floor"] == out["floor_s"] / 2.0
    wall = FL.run_floor(lambda: smp.sample(target, labels, image_generators(0, 2)), [target, draft], 2, 4.0, FAKE)
    assert wall["fraction_of_floor_basis"] == "wall_s" and wall["fraction_of_floor"] == wall["floor_s"] / 4.0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert FL.floor_basis("cpu") == "wall_s"

    mar = varkit.load_pipeline("digits-mar").generator
    net, calls = mar.head.net, []
    sampler = get_sampler("ancestral", SamplingParams(cfg=1.0, num_iter=4, head_steps=5))
    for name in ("forward", "step"):  # count the network's calls the sampler makes (instance attributes)
        setattr(net, name, (lambda fn: lambda *a, **kw: calls.append(1) or fn(*a, **kw))(getattr(net, name)))
    res = sampler.sample(mar, torch.tensor([3]), image_generators(0, 1))
    n_calls = len(calls)
    del net.forward, net.step
    out = FL.run_floor(lambda: sampler.sample(mar, torch.tensor([3]), image_generators(0, 1)), [mar], 1, 1.0, FAKE)
    assert n_calls > 0 and out["floor_passes"] == res.stats.forward_passes + n_calls
    assert "forward" not in vars(net) and "step" not in vars(net)  # trace_work restored the network


def test_trace_counts_a_prepacked_model_on_the_fused_path_the_same(monkeypatch):
    """A prepacked raster model decodes its blocks in one C++ call (``decode_layers``), out of the hooks' sight: the
    trace runs it on the module path, so its work is the unpacked model's, and the switch is restored after."""
    import copy

    from varkit.models import create_model
    from varkit.nn.cpu_kernels import cpu_kernels
    from varkit.nn.layers import prepack_linears
    from varkit.samplers import SamplingParams, get_sampler
    from varkit.samplers.random import image_generators

    if cpu_kernels() is None:
        pytest.skip("no C++ toolchain to build the kernels here: no fused path to set aside")
    monkeypatch.delenv("VARKIT_FUSED_DECODE", raising=False)
    torch.manual_seed(0)
    plain = create_model("raster-tiny").eval()
    packed = copy.deepcopy(plain)
    prepack_linears(packed)
    with torch.inference_mode():
        get_sampler("ancestral", SamplingParams(cfg=1.0)).sample(packed, torch.tensor([0]), image_generators(0, 1))
    assert any(w is not None for _, w in packed.__dict__["_block_plans"].values())  # it does run fused
    want = FL.trace_sampling(plain, SamplingParams(cfg=1.0)).totals(1)
    got = FL.trace_sampling(packed, SamplingParams(cfg=1.0)).totals(1)
    assert got == want and got["kv_bytes"] > 0
    assert "VARKIT_FUSED_DECODE" not in __import__("os").environ
