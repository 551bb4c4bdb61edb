import math

import pytest
import torch
import torch.nn.functional as F

from varkit.nn import RMSNorm, block_causal_mask
from varkit.nn.layers import swiglu_hidden_dim
from varkit.nn.rope import apply_rope, rope_angles_2d


def test_rope_2d_rotates_first_half_by_row_second_by_col():
    head_dim = 8
    ang = rope_angles_2d(torch.tensor([2]), torch.tensor([3]), head_dim)
    # head_dim/4 = 2 frequencies per axis: 1 and 10000^(-2/4)
    f = [1.0, 10000 ** (-0.5)]
    # fp32 pow and products of small integers: within 2 ulp (2.4e-7 relative) on any CPU; allclose's
    # default rtol 1e-5 is 80x that
    assert torch.allclose(ang[0], torch.tensor([2 * f[0], 2 * f[1], 3 * f[0], 3 * f[1]]))


def test_apply_rope_rotates_interleaved_pairs():
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    cos = torch.tensor([[math.cos(0.5), math.cos(1.0)]])
    sin = torch.tensor([[math.sin(0.5), math.sin(1.0)]])
    y = apply_rope(x, cos, sin).flatten()
    # products with 0 and 1 of fp32 cos/sin: exact up to the fp32 rounding of the tables (6e-8); default rtol 1e-5
    assert torch.allclose(y, torch.tensor([math.cos(0.5), math.sin(0.5), -math.sin(1.0), math.cos(1.0)]))


def test_apply_rope_on_strided_views_is_the_real_form():
    """q and k come as strided views of the fused qkv (odd offsets too): same result as the real-form formula."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, 8)
    ang = torch.rand(5, 4) * 20
    cos, sin = ang.cos(), ang.sin()
    for x in (*qkv.unbind(2), torch.randn(2, 5, 4, 9)[..., 1:], qkv[:, :, 0].bfloat16()):
        xf = x.float()
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        c, s = cos[None, :, None], sin[None, :, None]
        ref = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2).type_as(x)
        out = apply_rope(x, cos, sin)
        assert out.dtype == x.dtype
        # fp32: a complex multiply (its own vectorised kernel, fused or not) vs two products and a sum:
        # <= 2 ulp of |x0·c| + |x1·s| <= 2|x| ~ 8, i.e. 4·eps·max|x|. bf16 input: the same fp32 values,
        # rounded to bf16 at the end, may round to neighbouring bf16 values: 1 ulp, <= 2^-7 of max|x|.
        scale = float(xf.abs().max())
        atol = 2**-7 * scale if x.dtype == torch.bfloat16 else 4 * torch.finfo(torch.float32).eps * scale
        torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_zero_rows_zero_the_prefix():
    from varkit.nn.rope import RotaryTable

    t = RotaryTable(torch.ones(3, 2), zero_rows=1)
    cos, sin = t(slice(0, 3))
    assert cos[0].abs().sum() == 0 and sin[0].abs().sum() == 0 and cos[1].abs().sum() > 0


def test_block_causal_mask():
    s = torch.tensor([0, 1, 1, 2])
    m = block_causal_mask(s, s)
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_rmsnorm_and_llama_hidden_sizes():
    x = torch.randn(2, 5, 8)
    y = RMSNorm(8)(x)
    # mean square of y is 1 up to eps = 1e-5 in the denominator (|x|^2 ~ 1: ~1e-5 relative) and fp32
    # rounding (~1e-7): 1e-3 tolerates either on any CPU
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-3)
    assert [swiglu_hidden_dim(d) for d in (768, 1024, 1280, 1536, 3200)] == [2048, 2816, 3584, 4096, 8704]


def test_bf16_small_row_linear_matches_nn_linear():
    """The weight-major bf16 decode path gives nn.Linear's result up to bf16 rounding, same state dict."""
    from varkit.nn.layers import Linear

    torch.manual_seed(0)
    ours, ref = Linear(64, 96, bias=True), torch.nn.Linear(64, 96, bias=True)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    ours, ref = ours.bfloat16(), ref.bfloat16()
    for rows in (1, 2, 16, 40):  # 40 rows take the ordinary path
        x = torch.randn(rows, 1, 64).bfloat16()
        a, b = ours(x), ref(x)
        assert a.shape == b.shape == (rows, 1, 96) and a.dtype == torch.bfloat16
        # bf16 outputs (ulp <= 2^-7 of the value) of other GEMMs / accumulation orders and one more rounding
        # for the bias: a couple of ulp of the largest output; 5% of it (~6 ulp) holds on any CPU
        assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max()
    x = torch.randn(3, 64)
    assert torch.equal(ours.float()(x), ref.float()(x))  # fp32 is exactly nn.Linear


def _assert_bf16_linear(got, want):
    """bf16 ``Linear`` against ``F.linear``. Where oneDNN has bf16 kernels (AVX-512 BW or AMX) both run
    the same oneDNN GEMM: bit-exact. On AVX2-only CPUs (no oneDNN bf16) the layer stays unpacked and
    takes the weight-major path for few rows: product and bias add rounded to bf16 separately, against
    F.linear's one rounding: <= 3 half-ulps apart, an ulp being <= 2^-7 of the value (8-bit mantissa),
    so <= 3·2^-8 of max|want| (1 ulp = 2^-7·max measured on AVX2); fp32 accumulation order over K <= 96
    adds ~1e-6 relative, negligible. 4·2^-8 of max|want| allowed. Where varkit's panel kernel serves bf16 (CPUs
    without bf16 arithmetic, and AVX-512-BF16 without AMX: 3-128 rows) its fp32 sums run in another order than
    oneDNN's before the one rounding to bf16: an output may round to the neighbouring bf16 value, 1 ulp, within the
    same allowance."""
    from varkit.nn.layers import packable_dtypes
    from varkit.nn.stream_gemv import panel_dtypes

    if torch.bfloat16 in packable_dtypes() and torch.bfloat16 not in panel_dtypes():
        assert torch.equal(got, want)
    else:
        tol = 4 * 2**-8 * float(want.float().abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_prepacked_linear_matches_nn_linear_and_follows_the_weight():
    """Prepacked (oneDNN; varkit's kernels at 1-128 rows) inference path: F.linear's result (bit-exact in bf16
    where oneDNN has bf16 kernels and serves the rows), repacked after any weight change."""
    import copy
    import io

    from varkit.nn.layers import Linear, prepack_linears
    from varkit.nn.stream_gemv import panel_max_rows

    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(64, 96, bias=True), torch.nn.GELU(), Linear(96, 32, bias=False))
    assert prepack_linears(model) == 2 and model[0].prepacked
    with torch.no_grad():
        # 2 rows stream, 10 to 200 take the panel kernel (200: AVX2 only), past panel_max_rows() oneDNN's packed GEMM
        for rows in (1, 5, 40, 100, panel_max_rows() // 2 + 1):
            x = torch.randn(2, rows, 128)[..., :64]  # a strided view, as the heads' inputs are
            ref = F.linear(x, model[0].weight, model[0].bias)
            # fp32, oneDNN's packed GEMM vs MKL's sgemm: K = 64 products (|w| <= 1/8, |x| ~ 1, outputs ~0.5)
            # in another order: a few ulp x sqrt(K) of the terms, ~5e-7 (3e-7 measured, AMX and AVX2);
            # 1e-5 holds on any x86-64 kernel
            torch.testing.assert_close(model[0](x), ref, rtol=1e-5, atol=1e-5)
            xb, mb = x.bfloat16(), copy.deepcopy(model[0]).bfloat16()
            _assert_bf16_linear(mb(xb), F.linear(xb, mb.weight, mb.bias))
        assert "_packed" in model[0].__dict__
        model[0].weight.mul_(2)  # an in-place edit is seen
        # fp32 as above (weights doubled: outputs ~1, still ~1e-6)
        torch.testing.assert_close(model[0](x), F.linear(x, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-5)
    half = model.bfloat16()  # .to() drops the packed copy, the next call packs the new weight
    assert "_packed" not in half[0].__dict__
    with torch.no_grad():
        xb = torch.randn(3, 64).bfloat16()
        _assert_bf16_linear(half[0](xb), F.linear(xb, half[0].weight, half[0].bias))
    torch.save(copy.deepcopy(half), io.BytesIO())  # the opaque packed tensor is neither copied nor pickled
    model = model.float()
    x = torch.randn(4, 64)
    y = model(x)  # grad enabled: the ordinary path, gradients flow
    y.sum().backward()
    assert model[0].weight.grad is not None
    prepack_linears(model, enabled=False)
    assert not model[0].prepacked and "_packed" not in model[0].__dict__


def test_rotary_tables_stay_fp32_when_the_model_is_cast():
    from varkit.nn.rope import RotaryTable

    t = RotaryTable(torch.rand(5, 4)).to(torch.bfloat16)
    cos, sin = t(slice(0, 5))
    assert cos.dtype == sin.dtype == torch.float32


def test_linear_activation_is_onednns_post_op_on_the_packed_path_and_torchs_elsewhere(monkeypatch):
    """``Linear.linear(x, b, "gelu_tanh")`` = GELU-tanh of the product: fused into oneDNN's packed GEMM beyond the C++
    kernels' rows (``panel_max_rows()``: 128, 1024 on AVX2), torch's GELU after the product at fewer rows or unpacked;
    an unknown name is a clear error."""
    import pytest

    from varkit.nn.layers import Linear, prepack_linears
    from varkit.nn.stream_gemv import panel_max_rows

    torch.manual_seed(0)
    lin = Linear(64, 96).eval()
    prepack_linears(lin)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[3]) or real(*a))
    with torch.no_grad():
        for rows, fused in ((panel_max_rows() + 72, True), (8, False), (1, False)):
            x = torch.randn(rows, 64)
            want = F.gelu(F.linear(x.double(), lin.weight.double(), lin.bias.double()), approximate="tanh")
            calls.clear()
            got = lin.linear(x, lin.bias, "gelu_tanh")
            assert ("gelu" in calls) == fused, (rows, calls)
            # fp32 products of 64 terms (64 u of sum|x w|, here < 64 u * 40) and the GELU's tanh (a few ulp in either
            # library): 2e-5 absolute on outputs of magnitude ~10
            assert (got.double() - want).abs().max() < 2e-5, rows
        with pytest.raises(ValueError, match="unknown activation 'relu6'"):
            lin.linear(torch.randn(2, 64), None, "relu6")


def test_norm_silu_takes_the_kernel_only_when_fast_for_fp32_cpu_maps_at_inference(monkeypatch):
    """ResNet blocks' GroupNorm + SiLU: the extension's one pass where fast kernels are on (equal to torch's within
    the kernel test's bound; a channels-last map is copied to NCHW first), torch's two ops otherwise and under
    autograd."""
    from varkit.nn import ldm
    from varkit.nn.cpu_kernels import cpu_kernels

    real = cpu_kernels()
    if real is None:
        pytest.skip("no C++ toolchain to build the kernels here")
    calls = []
    monkeypatch.setattr(ldm, "cpu_kernels", lambda: type("K", (), {
        "group_norm_silu": lambda *a: calls.append(a[0].is_contiguous()) or real.group_norm_silu(*a)}))
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x = torch.randn(2, 16, 9, 9)
    want = F.silu(norm(x))
    with torch.no_grad():
        assert torch.equal(ldm.norm_silu(norm, x), want) and calls == []  # not fast: torch's ops
        got = ldm.norm_silu(norm, x, fast=True)
        assert calls == [True] and (got - want).abs().max() < 1e-5  # |values| ~ 3: ~50 ulp, well above fp32 rounding
        got = ldm.norm_silu(norm, x.contiguous(memory_format=torch.channels_last), fast=True)
        assert calls == [True, True] and (got - want).abs().max() < 1e-5
    with torch.enable_grad():
        ldm.norm_silu(norm, x.requires_grad_(), fast=True)
    assert len(calls) == 2
