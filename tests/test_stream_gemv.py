"""The weight-streaming GEMV (varkit/nn/stream_gemv.py) that prepacked linears use at 1-2 rows on a CPU, over the
plain weight and over its blocked copy, and the panel kernel they use at 3-128 rows (varkit/nn/cpu_kernels.py)."""
import pytest
import torch
import torch.nn.functional as F

from varkit.nn import layers
from varkit.nn.layers import Linear, prepack_linears
from varkit.nn.stream_gemv import (PANEL_MAX_ROWS, PANEL_MAX_ROWS_AVX2, STREAM_MAX_ROWS, block_weight, blockable, panel_dtypes,
                                   panel_linear, panel_max_rows, panel_rows, panel_weight, stream_kernel,
                                   stream_linear)

needs_kernel = pytest.mark.skipif(stream_kernel() is None, reason="no C++ toolchain to build the kernel here")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
# whole vectors, a vector tail, scalar tails, one bf16 chunk, a long K (x of 2 rows no longer fits L1 beside the stream)
@pytest.mark.parametrize("k", [768, 45, 7, 64, 2112])
@pytest.mark.parametrize("blocked", [False, True])
def test_stream_linear_matches_f_linear(dtype, rows, k, blocked):
    g = torch.Generator().manual_seed(rows * 100 + k)
    w = torch.randn(301, k, generator=g).to(dtype)  # 301: a last block of one row (zero-padded)
    x = torch.randn(1, rows, k, generator=g).to(dtype)
    b = torch.randn(301, generator=g).to(dtype)
    if blocked and not blockable(w):
        with pytest.raises(ValueError, match="no blocked layout"):
            block_weight(w)
        return
    got = stream_linear(x, w, b, block_weight(w) if blocked else None)
    want = F.linear(x.double(), w.double(), b.double())  # the exact products of the same (rounded) inputs
    assert got.dtype == dtype and got.shape == (1, rows, 301)
    # fp32 accumulation in another order: each sum is within k * 2^-24 * sum|x_i w_i| of the exact one (standard
    # bound, with room); bf16 output: plus its rounding to bf16 (unit roundoff 2^-8, relative)
    scale = x.double().abs() @ w.double().abs().t() + b.double().abs()
    tol = k * 2.0 ** -24 * scale + (2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - want).abs() <= tol + 1e-30).all()


def check_panels(kernel) -> None:
    """``kernel.gemm_panels`` against exact products: row counts that fill one group of rows, split into balanced
    groups, and reach PANEL_MAX_ROWS and PANEL_MAX_ROWS_AVX2; K with and without vector tails; N with a zero-padded
    last panel."""
    g = torch.Generator().manual_seed(5)
    width = kernel.panel_width()
    # bf16 weights also in the pair layout where this build has AVX-512-BF16's dot product (odd K: a zero pad column)
    layouts = [(torch.float32, False), (torch.bfloat16, False)] + [(torch.bfloat16, True)] * kernel.panel_pairs()
    for dtype, pairs in layouts:
        for rows, k, n in ((3, 768, 301), (12, 45, 37), (13, 7, 64), (25, 64, 301), (PANEL_MAX_ROWS, 96, 33),
                             (PANEL_MAX_ROWS_AVX2, 40, 17)):
            w = torch.randn(n, k, generator=g).to(dtype)
            x = torch.randn(rows, k, generator=g).to(dtype)
            want = x.double() @ w.double().t()
            # fp32 accumulation (products of bf16 inputs are exact in fp32) in another order than the exact sum:
            # within k * 2^-24 * sum|x_i w_i| (the standard bound, with room); the dot-product instruction adds
            # exact products with fp32 rounding too (at most one rounding per product), so the same bound holds
            tol = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
            got = kernel.gemm_panels(x, panel_weight(w, width, pairs), n)
            assert got.dtype == torch.float32 and got.shape == (rows, n)
            assert ((got.double() - want).abs() <= tol + 1e-30).all(), (dtype, pairs, rows, k, n)
    if not kernel.panel_pairs():
        with pytest.raises(RuntimeError, match="pair layout needs AVX-512-BF16"):
            w = torch.randn(40, 8).bfloat16()
            kernel.gemm_panels(torch.randn(3, 8).bfloat16(), panel_weight(w, width, True), 40)


@needs_kernel
def test_panel_kernel_matches_exact_products():
    check_panels(stream_kernel())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_linear_adds_the_bias_and_keeps_the_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(70, 48, generator=g).to(dtype), torch.randn(70, generator=g).to(dtype)
    x = torch.randn(2, 5, 48, generator=g).to(dtype)
    got = panel_linear(x, w, b, panel_weight(w, stream_kernel().panel_width()))
    want = F.linear(x.double(), w.double(), b.double())
    scale = x.double().abs() @ w.double().abs().t() + b.double().abs()
    tol = 48 * 2.0 ** -24 * scale + (2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0)  # + bf16 output rounding
    assert got.dtype == dtype and got.shape == (2, 5, 70)
    assert ((got.double() - want).abs() <= tol + 1e-30).all()


def test_panel_layout_is_column_panels_k_major():
    w = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # 5 rows: one panel of 4 and one of 1 + 3 zeros
    p = panel_weight(w, 4)
    assert p.shape == (2, 3, 4)  # (panels, K, rows of a panel)
    assert torch.equal(p[0, 2], w[:4, 2]) and torch.equal(p[1, :, 0], w[4]) and not p[1, :, 1:].any()
    with pytest.raises(ValueError, match="no panel layout"):
        panel_weight(torch.zeros(4, 4, dtype=torch.float16), 4)


def test_pair_layout_keeps_each_rows_k_pairs_side_by_side():
    w = torch.arange(5 * 3, dtype=torch.bfloat16).reshape(5, 3)  # K = 3: a zero column makes it 4 (two pairs)
    p = panel_weight(w, 4, pairs=True)
    assert p.shape == (2, 2, 4, 2)  # (panels, K pairs, rows of a panel, the pair)
    assert torch.equal(p[0, 0, 1], w[1, :2]) and torch.equal(p[0, 1, 3], torch.stack([w[3, 2], w.new_zeros(())]))
    assert torch.equal(p[1, :, 0].flatten()[:3], w[4]) and not p[1, :, 1:].any() and not p[:, 1, :, 1].any()
    with pytest.raises(ValueError, match="pair layout is for bf16"):
        panel_weight(torch.zeros(4, 4), 4, pairs=True)


@pytest.mark.parametrize("isa,pairs,want", [("amx", True, (torch.float32,)),
                                            ("avx512_bf16", True, (torch.float32, torch.bfloat16)),
                                            ("avx512_bf16", False, (torch.float32,)),
                                            (None, False, (torch.float32, torch.bfloat16))])
def test_panel_dtypes_follow_the_cpus_bf16_arithmetic(monkeypatch, isa, pairs, want):
    """AMX: oneDNN's bf16 tiles; AVX-512-BF16: the panel kernel's dot-product tile when built; no bf16 arithmetic:
    the panel kernel widens (so does oneDNN)."""
    import varkit.device
    from varkit.nn import stream_gemv

    monkeypatch.setattr(varkit.device, "cpu_info", lambda: {"bf16_isa": isa})
    monkeypatch.setattr(stream_gemv, "panel_pairs", lambda dtype: pairs and dtype == torch.bfloat16)
    assert stream_gemv._cpu_panel_dtypes.__wrapped__() == want


def _route(monkeypatch, path: str, lin: Linear, rows_list) -> list[int]:
    """Row counts of the calls that reach ``layers.<path>`` while ``lin`` runs ``rows_list`` rows (each result equal
    to F.linear's up to fp32 sum order); the list keeps growing with later calls."""
    calls = []
    real = getattr(layers, path)
    monkeypatch.setattr(layers, path, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        for rows in rows_list:
            x = torch.randn(rows, lin.in_features)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    return calls


@needs_kernel
def test_prepacked_linears_take_the_panel_kernel_for_3_to_128_rows_or_1024_on_avx2(monkeypatch):
    lin = Linear(96, 80).eval()
    prepack_linears(lin)
    most = panel_max_rows()
    assert most == (PANEL_MAX_ROWS_AVX2 if stream_kernel().panel_width() == 16 else PANEL_MAX_ROWS)
    calls = _route(monkeypatch, "panel_linear", lin, (STREAM_MAX_ROWS, STREAM_MAX_ROWS + 1, most, most + 1))
    assert calls == [STREAM_MAX_ROWS + 1, most]  # beyond: oneDNN's packed GEMM
    # the shared row-range rule (Linear.panels_for and the fused layers' plans) says the same
    assert [panel_rows(r) for r in (STREAM_MAX_ROWS, STREAM_MAX_ROWS + 1, most, most + 1)] == [False, True, True, False]
    with torch.inference_mode():
        assert [lin.panels_for(torch.randn(r, 96)) is not None for r in (STREAM_MAX_ROWS + 1, most + 1)] == [True, False]
    assert "_panels" not in lin.__getstate__()
    monkeypatch.setenv("VARKIT_PANEL_GEMM", "0")
    assert panel_dtypes() == ()
    with torch.inference_mode():
        lin(torch.randn(8, 96))
    assert len(calls) == 2


def test_blocked_layout_is_row_blocks_of_cache_line_chunks():
    w = torch.arange(6 * 32, dtype=torch.float32).reshape(6, 32)  # 6 rows: one full block of 4 and one of 2 + 2 zeros
    b = block_weight(w)
    assert b.shape == (2, 2, 4, 16)  # (row blocks, 64-byte chunks of K, rows of a block, fp32 elements of a chunk)
    assert torch.equal(b[0, 1, 2], w[2, 16:32]) and torch.equal(b[1, 0, 1], w[5, :16])
    assert not b[1, :, 2:].any()
    assert block_weight(w.bfloat16()).shape == (2, 1, 4, 32)  # bf16: 32 elements a chunk
    assert not blockable(torch.zeros(4, 40)) and not blockable(torch.zeros(4, 32, dtype=torch.float16))


@needs_kernel
def test_prepacked_linears_stream_a_blocked_copy_made_once_and_again_after_an_edit(monkeypatch):
    monkeypatch.setenv("VARKIT_WEIGHT_ARENA", "0")  # copies stay where they were made (test_weight_arena: moved)
    lin = Linear(64, 40).eval()
    prepack_linears(lin)
    with torch.no_grad():
        x = torch.randn(2, 64)
        lin(x)
        first = lin.__dict__["_blocked"][1]
        lin(x)
        assert lin.__dict__["_blocked"][1] is first
        lin.weight.mul_(2)  # an in-place edit: a new version, a new copy
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert lin.__dict__["_blocked"][1] is not first
    assert "_blocked" not in lin.__getstate__()


@needs_kernel
def test_prepacked_linears_stream_one_or_two_rows_and_can_be_switched_off(monkeypatch):
    lin = Linear(512, 640).eval()
    prepack_linears(lin)
    calls = _route(monkeypatch, "stream_linear", lin, (1, STREAM_MAX_ROWS, STREAM_MAX_ROWS + 1))
    assert calls == [1, STREAM_MAX_ROWS]  # more rows: the panel kernel
    monkeypatch.setenv("VARKIT_STREAM_GEMV", "0")
    with torch.inference_mode():
        lin(torch.randn(1, 512))
    assert len(calls) == 2


def test_unprepacked_linears_never_stream(monkeypatch):
    monkeypatch.setattr(layers, "stream_linear", lambda *a: pytest.fail("streamed an unprepacked linear"))
    with torch.inference_mode():
        Linear(64, 32)(torch.randn(1, 64))


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_the_code_paths_of_other_cpus_build_and_agree(march):
    """The AVX2 + FMA branch (AMD Zen 2/3, older Intel) and the plain-loop branch, built here with their -march:
    the same products as F.linear, GEMV and panels (fp32 accumulation in another order: the bound of the test above), and the same
    attention, norm, decode layer and top-k as the native build's checks (tests/test_cpu_kernels.py)."""
    from varkit.nn.cpu_kernels import build_kernels

    kernel = build_kernels(march)
    assert kernel is not None, f"-march={march} did not build"
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, k in ((1, 768), (2, 45), (4, 7), (3, 64), (2, 2112)):
            w = torch.randn(130, k, generator=g).to(dtype)
            x = torch.randn(rows, k, generator=g).to(dtype)
            want = x.double() @ w.double().t()
            tol = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
            got = kernel.gemv(x, w).double()  # fp32 output
            assert ((got - want).abs() <= tol + 1e-30).all(), (dtype, rows, k)
            if blockable(w):
                got = kernel.gemv_blocked(x, block_weight(w), 130).double()
                assert ((got - want).abs() <= tol + 1e-30).all(), (dtype, rows, k, "blocked")
    check_panels(kernel)
    from test_cpu_kernels import (check_attend, check_decode_layer, check_front_attention, check_front_layer,
                                  check_group_norm_silu, check_rms_norm, check_silu_mul, check_topk)

    check_attend(kernel.attend)
    check_front_attention(kernel.attend_front)
    check_silu_mul(kernel.silu_mul_)
    check_topk(kernel.topk)
    check_rms_norm(kernel.rms_norm_rows)
    check_group_norm_silu(kernel.group_norm_silu)
    from test_winograd import check_winograd

    check_winograd(kernel)
    check_decode_layer(kernel.decode_layers)
    check_front_layer(kernel)
