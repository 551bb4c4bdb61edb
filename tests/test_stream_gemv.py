"""The weight-streaming GEMV (varkit/nn/stream_gemv.py) that prepacked linears use at 1-2 rows on a CPU."""
import pytest
import torch
import torch.nn.functional as F

from varkit.nn import layers
from varkit.nn.layers import Linear, prepack_linears
from varkit.nn.stream_gemv import STREAM_MAX_ROWS, stream_kernel, stream_linear

needs_kernel = pytest.mark.skipif(stream_kernel() is None, reason="no C++ toolchain to build the kernel here")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [768, 45, 7])  # whole vectors, a vector tail and scalar tails
def test_stream_linear_matches_f_linear(dtype, rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    w = torch.randn(300, k, generator=g).to(dtype)
    x = torch.randn(1, rows, k, generator=g).to(dtype)
    b = torch.randn(300, generator=g).to(dtype)
    got = stream_linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())  # the exact products of the same (rounded) inputs
    assert got.dtype == dtype and got.shape == (1, rows, 300)
    # fp32 accumulation in another order: each sum is within k * 2^-24 * sum|x_i w_i| of the exact one (standard
    # bound, with room); bf16 output: plus its rounding to bf16 (unit roundoff 2^-8, relative)
    scale = x.double().abs() @ w.double().abs().t() + b.double().abs()
    tol = k * 2.0 ** -24 * scale + (2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - want).abs() <= tol + 1e-30).all()


@needs_kernel
def test_prepacked_linears_stream_one_or_two_rows_and_can_be_switched_off(monkeypatch):
    lin = Linear(512, 640).eval()
    prepack_linears(lin)
    calls = []
    real = layers.stream_linear
    monkeypatch.setattr(layers, "stream_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.inference_mode():
        for rows in (1, STREAM_MAX_ROWS, STREAM_MAX_ROWS + 1):
            x = torch.randn(rows, 512)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert [s[0] for s in calls] == [1, STREAM_MAX_ROWS]  # more rows: oneDNN's packed GEMM
        monkeypatch.setenv("VARKIT_STREAM_GEMV", "0")
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
    the same products as F.linear (fp32 accumulation in another order: the bound of the test above)."""
    from varkit.nn.stream_gemv import build_kernel

    kernel = build_kernel(march)
    assert kernel is not None, f"-march={march} did not build"
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, k in ((1, 768), (2, 45), (4, 7)):
            w = torch.randn(130, k, generator=g).to(dtype)
            x = torch.randn(rows, k, generator=g).to(dtype)
            got = kernel.gemv(x, w).double()  # fp32 output
            want = x.double() @ w.double().t()
            tol = k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())
            assert ((got - want).abs() <= tol + 1e-30).all(), (dtype, rows, k)
