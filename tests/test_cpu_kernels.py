"""varkit/nn/cpu_kernels.py: one-query attention, a front's attention, SwiGLU's gate, the RMS norm, the fused LLaMA decode layer and top-k, against the module
path in float64 (fp32) or in the same dtype (bf16); the ``check_*`` helpers also run on the AVX2 and plain builds
(tests/test_stream_gemv.py)."""
import copy
import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from varkit.cache import KVCache
from varkit.models.raster import RasterConfig, TransformerBlock
from varkit.nn import attention as A
from varkit.nn.cpu_kernels import cpu_kernels
from varkit.nn.layers import Linear, RMSNorm, prepack_linears
from varkit.nn.rope import RotaryTable, rope_angles_1d

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ toolchain to build the kernels here")
U = 2.0 ** -24  # fp32 unit roundoff
U_BF16 = 2.0 ** -8


def check_attend(attend) -> None:
    """One query a row over strided (static-cache) keys: SDPA's result in float64, within fp32's error bound."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for L, D in ((1, 64), (5, 64), (100, 64), (257, 64), (9, 40), (17, 8)):
            kc, vc = (torch.randn(2, 3, 300, D, generator=g).to(dtype) for _ in range(2))
            q = torch.randn(2, 3, 1, D, generator=g).to(dtype)
            k, v = kc[:, :, :L], vc[:, :, :L]  # views with the cache's strides
            got = attend(q, k, v, 0.3)
            want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
            assert got.dtype == dtype and got.shape == (2, 3, 1, D)
            # each score is off by at most D u sum|q k| (fp32 dot products); a softmax weight by twice the largest such
            # error (relative), plus the exp's and the sums' few-ulp errors over L terms; the weighted sum of values
            # by L u of max|v|; bf16 output: plus its rounding (2^-8 of |want|)
            ds = D * U * 0.3 * (q.double().abs() @ k.double().abs().transpose(-1, -2)).amax()
            vmax = v.double().abs().amax()
            tol = vmax * (2 * ds + (L + 16) * U) + (U_BF16 * want.abs() if dtype == torch.bfloat16 else 0)
            assert ((got.double() - want).abs() <= tol).all(), (dtype, L, D)


def _front_reference(qkv, cos, sin, kc, vc, pos, scale):
    """attend_front in float64: q and k rotated (interleaved pairs) and rounded to the dtype, k and v written to
    copies of the caches, SDPA over [0, pos + n)."""
    B, n, three_d = qkv.shape
    H, hd = kc.shape[1], kc.shape[3]
    q, k, v = qkv.double().view(B, n, 3, H, hd).unbind(2)

    def rot(x):
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos.double()[None, :, None], sin.double()[None, :, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(qkv.dtype)

    q, k = rot(q), rot(k)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, pos:pos + n] = k.transpose(1, 2)
    vc2[:, :, pos:pos + n] = v.transpose(1, 2).to(qkv.dtype)
    kk, vv = kc2[:, :, :pos + n].double(), vc2[:, :, :pos + n].double()
    qd = q.double().transpose(1, 2)
    want = F.scaled_dot_product_attention(qd, kk, vv, scale=scale).transpose(1, 2).reshape(B, n, H * hd)
    ds = (hd + 2) * U * scale * (qd.abs() @ kk.abs().transpose(-1, -2)).amax()
    return want, kc2, vc2, ds, vv.abs().amax()


def check_front_attention(attend_front) -> None:
    """A front of n new tokens a row (rotary, cache write, attention over everything before and the front itself)
    against float64. Angles at multiples of pi/2 and values on a 1/8 grid make every rotation exact, so the rotated
    q and k are the reference's; then each score is off by at most (hd + 2) u scale sum|q k| (fp32 sums of exact
    products, then the scale), a weight by twice that (relative), the weighted sum of values by (L + 16) u of max|v|
    (exp's and the sums' few-ulp errors over L terms); bf16 output: plus its rounding. With generic angles the written
    keys are within fp32's rounding of the rotation (bf16: within one ulp, 2^-8 relative, after rounding twice).
    Fronts of 2-19 tokens (query groups of 16 and a remainder), 5-257 keys (whole and partial 16-key blocks, odd
    counts for the key pairs), heads of 8-144 dimensions (value rows of 1-4 vectors, partial ones, 8 padded, more)."""
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, hd, n, pos in ((2, 3, 64, 16, 241), (1, 2, 64, 5, 0), (2, 2, 40, 19, 30), (1, 1, 8, 2, 3),
                                 (1, 2, 80, 3, 20), (1, 1, 144, 2, 33)):
            grid = lambda *shape: (torch.randint(-16, 17, shape, generator=g) / 8).to(dtype)
            qkv = grid(B, n, 3 * H * hd)
            kc, vc = grid(B, H, pos + n + 4, hd), grid(B, H, pos + n + 4, hd)
            quarter = torch.randint(0, 4, (n, hd // 2), generator=g) * (torch.pi / 2)
            cos, sin = quarter.cos().round(), quarter.sin().round()
            want, kc2, vc2, ds, vmax = _front_reference(qkv, cos, sin, kc, vc, pos, 0.125)
            got = attend_front(qkv, cos, sin, kc, vc, pos, 0.125)
            assert got.dtype == dtype and got.shape == (B, n, H * hd)
            assert torch.equal(kc, kc2) and torch.equal(vc, vc2), (dtype, n, pos)  # rows past pos + n untouched too
            # bf16: the weights may be rounded to bf16 before the values' products (AVX-512-BF16 builds, as SDPA's bf16
            # CPU kernel does), 2^-8 of each weight, so of max|v| in the weighted mean; then the output's rounding
            bf16_err = U_BF16 * (vmax + want.abs()) if dtype == torch.bfloat16 else 0
            tol = vmax * (2 * ds + (pos + n + 16) * U) + bf16_err
            assert ((got.double() - want).abs() <= tol).all(), (dtype, B, H, hd, n, pos)
            # generic angles: the rotated keys as written
            ang = torch.rand(n, hd // 2, generator=g) * 6.3
            cos, sin = ang.cos(), ang.sin()
            qkv = torch.randn(B, n, 3 * H * hd, generator=g).to(dtype)
            kc3 = kc.clone()
            attend_front(qkv, cos, sin, kc3, vc.clone(), pos, 0.125)
            k = qkv.double().view(B, n, 3, H, hd)[:, :, 1]
            a, b = k[..., 0::2], k[..., 1::2]
            c, s = cos.double()[None, :, None], sin.double()[None, :, None]
            exact = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).transpose(1, 2)
            bound = torch.stack([(a * c).abs() + (b * s).abs(), (a * s).abs() + (b * c).abs()], -1).flatten(-2).transpose(1, 2)
            tol = 4 * U * bound + (U_BF16 * exact.abs() if dtype == torch.bfloat16 else 0)
            assert ((kc3[:, :, pos:pos + n].double() - exact).abs() <= tol + 1e-30).all(), (dtype, "rotation")


def check_silu_mul(silu_mul_) -> None:
    """SwiGLU's gate in place, a = round(round(silu(a)) * b), against float64: fp32 within 16 u of the exact value
    (the exp's few-ulp polynomial, a division, a product); bf16 within its two roundings (2^-8 relative each) and
    the same fp32 error underneath. Absolute slack: below -87 the exp's input is clamped, so silu(x) comes out as
    about x e^-88 instead of ~0 (|x| e^-87 |b| allowed; torch's own gives -0 there), and 1e-38 for subnormals."""
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 15, 16, 37, 40000):  # scalar tails, whole vectors, more than one thread's chunk
            a = (6 * torch.randn(n, generator=g)).to(dtype)
            a[: min(n, 3)] = torch.tensor([-100.0, 0.0, 90.0])[: min(n, 3)].to(dtype)  # exp's clamps, zero
            b = torch.randn(n, generator=g).to(dtype)
            exact = F.silu(a.double()) * b.double()
            got = a.clone()
            silu_mul_(got, b)
            rel = 16 * U + (2 * U_BF16 if dtype == torch.bfloat16 else 0)
            slack = a.double().abs() * math.exp(-87) * b.double().abs() + 1e-38
            assert ((got.double() - exact).abs() <= rel * exact.abs() + slack).all(), (dtype, n)


def check_rms_norm(rms_norm_rows) -> None:
    """The norm of RMSNorm's module path, rounded where it rounds."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((2, 1, 768), (3, 40), (1, 7)):
            x = (3 * torch.randn(shape, generator=g)).to(dtype)
            w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
            got = rms_norm_rows(x, w, 1e-5)
            xd = x.double()
            exact = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
            assert got.dtype == dtype and got.shape == x.shape
            # fp32: the mean of D squares (D u relative), the root and two products (a few u); bf16: the normalised
            # value and the product are each rounded to bf16 (2^-8 relative, twice)
            rel = (shape[-1] + 8) * U if dtype == torch.float32 else 2.5 * U_BF16
            assert ((got.double() - exact).abs() <= rel * exact.abs() + 1e-30).all(), (dtype, shape)


def check_group_norm_silu(group_norm_silu) -> None:
    """GroupNorm (+ SiLU) of contiguous fp32 maps against float64, within the bound of the kernel's sums."""
    g = torch.Generator().manual_seed(4)
    cases = (((2, 8, 5, 7), 4, 0.0, 1.0), ((1, 160, 32, 32), 32, 0.5, 2.0), ((3, 6, 1, 1), 3, 0.0, 1.0),
             ((2, 4, 40), 2, 100.0, 1.0), ((1, 32, 3, 3, 3), 8, -3.0, 0.1))  # offsets test the two-pass variance
    for shape, groups, offset, spread in cases:
        x = offset + spread * torch.randn(shape, generator=g)
        w, b = 1 + 0.5 * torch.randn(shape[1], generator=g), 0.3 * torch.randn(shape[1], generator=g)
        xd = x.double().reshape(shape[0], groups, -1)
        mean, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
        z = ((xd - mean) / (var + 1e-6).sqrt()).reshape(shape)
        bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
        norm = z * w.double().reshape(bshape) + b.double().reshape(bshape)
        # fp32 sums of at most 1024 values a lane (the plain build; AVX2/AVX-512 lanes hold 64/32 of them): the mean
        # and the variance within ~1024 u of mean|x| and of the variance, i.e. of (mean|x| / std + 1) in z units;
        # then a product, a sum, exp (a few u) and a division
        scale = (xd.abs().mean(-1) / xd.std(-1, unbiased=False)).max().item() + 1
        tol = (1024 + 16) * U * ((z.abs() + scale) * w.double().abs().reshape(bshape) + b.double().abs().reshape(bshape))
        for silu in (False, True):
            got = group_norm_silu(x, w, b, groups, 1e-6, silu)
            want = norm * torch.sigmoid(norm) if silu else norm
            assert got.dtype == torch.float32 and got.shape == x.shape
            assert ((got.double() - want).abs() <= tol).all(), (shape, groups, silu)
    with pytest.raises(RuntimeError, match="C divisible by the groups"):
        group_norm_silu(torch.randn(1, 6, 4), torch.ones(6), torch.zeros(6), 4, 1e-6, True)


def _block(dtype: torch.dtype, seed: int = 2):
    """A small LLaMA block (dim 64, 4 heads of 16, SwiGLU 256) with non-trivial norm gains, prepacked, and its rotary
    table."""
    torch.manual_seed(seed)
    cfg = RasterConfig(dim=64, n_head=4, n_layer=1, vocab_size=32, grid=4, num_classes=2, resid_dropout=0, ffn_dropout=0)
    block = TransformerBlock(cfg).eval()
    with torch.no_grad():
        for n in (block.attention_norm, block.ffn_norm):
            n.weight.copy_(1 + 0.3 * torch.randn(64))
    rope = RotaryTable(rope_angles_1d(40, 16))
    return block.to(dtype), rope


def _filled_cache(dtype: torch.dtype, rows: int, length: int) -> KVCache:
    cache = KVCache(1, rows, 4, 40, 16, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    cache.length = length
    return cache


def check_decode_layer(decode_layers) -> None:
    """The fused layer (``decode_layers`` over one layer) against the block's module path: float64 for fp32 (the
    kernel's error bound), the module path in bf16 for bf16 (the same rounding points), and the cache written at the
    filled length in both."""
    for dtype in (torch.float32, torch.bfloat16):
        for rows, length in ((1, 0), (2, 13), (4, 39)):
            block, rope = _block(dtype)
            prepack_linears(block)
            ref_block = copy.deepcopy(block).double() if dtype == torch.float32 else block
            x = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
            cos, sin = rope(slice(length, length + 1))
            ref_cache = _filled_cache(torch.float64 if dtype == torch.float32 else dtype, rows, length)
            with torch.no_grad(), mock.patch.dict(os.environ, {"VARKIT_FUSED_DECODE": "0"}):  # the module path
                ref = ref_block(x.to(ref_cache.dtype), (cos, sin), None, ref_cache, 0)
            with torch.no_grad():
                cache = _filled_cache(dtype, rows, length)
                att, ffn = block.attention, block.feed_forward
                lins = (att.wqkv, att.wo, ffn.w1, ffn.w3, ffn.w2)
                weights = [block.attention_norm.weight, block.ffn_norm.weight, *[lin._blocked_weight() for lin in lins]]
                got = decode_layers(x.reshape(rows, 64), weights, 1e-5, 256, [cache.k[0]], [cache.v[0]], length,
                                    cos[0].contiguous(), sin[0].contiguous(), False).view(rows, 1, 64)
            scale = float(ref.abs().max())
            # fp32: five chained products of at most 256 terms, attention and two norms, each within a few hundred u
            # of the largest value (relative); bf16: sum order may flip one rounding of the module path by an ulp,
            # and an ulp in q/k/v or the gate moves the output by about an ulp of the largest value (8: room for 4)
            tol = 1024 * 256 * U * scale if dtype == torch.float32 else 8 * U_BF16 * scale
            assert (got.double() - ref.double()).abs().max() <= tol, (dtype, rows, length)
            for mine, theirs in ((cache.k[0], ref_cache.k[0]), (cache.v[0], ref_cache.v[0])):
                assert (mine[:, :, length].double() - theirs[:, :, length].double()).abs().max() <= tol
                assert torch.equal(mine[:, :, :length].double(), theirs[:, :, :length].double())  # untouched


def check_front_layer(kernel) -> None:
    """``front_layers`` over one block (a LLaMA block for a front of n >= 2 tokens a row) against the same build's
    parts composed as the module path composes them (rms_norm_rows, linear_panels, attend_front, silu_mul_ where
    SwiGLU uses it, torch's residual adds): the same roundings in the same places, so bit for bit, output and cache
    writes; x untouched."""
    from varkit.nn.stream_gemv import panel_weight

    width, pairs = kernel.panel_width(), kernel.panel_pairs()
    for dtype in (torch.float32, torch.bfloat16):
        block, rope = _block(dtype)
        att, ffn = block.attention, block.feed_forward
        lins = (att.wqkv, att.wo, ffn.w1, ffn.w3, ffn.w2)
        panels = [panel_weight(lin.weight, width, pairs and dtype == torch.bfloat16) for lin in lins]
        for B, n, length in ((1, 3, 0), (2, 2, 13), (2, 7, 20), (3, 5, 35)):  # 3-21 rows: one to two row groups
            x = torch.randn(B, n, 64, generator=torch.Generator().manual_seed(n)).to(dtype)
            x0 = x.clone()
            cos, sin = rope(slice(length, length + n))
            ref_cache, cache = _filled_cache(dtype, B, length), _filled_cache(dtype, B, length)
            g_att, g_ffn = block.attention_norm.weight.detach(), block.ffn_norm.weight.detach()
            with torch.no_grad():
                r = x.reshape(B * n, 64)
                qkv = kernel.linear_panels(kernel.rms_norm_rows(r, g_att, 1e-5), panels[0], 192, None)
                y = kernel.attend_front(qkv.view(B, n, 192), cos, sin, ref_cache.k[0], ref_cache.v[0], length, 0.25)
                h = r + kernel.linear_panels(y.reshape(B * n, 64), panels[1], 64, None)
                b = kernel.rms_norm_rows(h, g_ffn, 1e-5)
                a, u = kernel.linear_panels(b, panels[2], 256, None), kernel.linear_panels(b, panels[3], 256, None)
                if dtype == torch.float32 or pairs:
                    kernel.silu_mul_(a, u)
                else:  # where SwiGLU keeps torch's ops (bf16 without AVX-512-BF16), the kernel still gates in one pass
                    a = (a.float() * torch.sigmoid(a.float())).to(dtype).float().mul(u.float()).to(dtype)
                want = (h + kernel.linear_panels(a, panels[4], 64, None)).view(B, n, 64)
                got = kernel.front_layers(x, [g_att, g_ffn, *panels], 1e-5, 256, cos, sin, [cache.k[0]],
                                          [cache.v[0]], length, 0.25)
            assert got.dtype == dtype and got.shape == (B, n, 64) and torch.equal(x, x0)
            if dtype == torch.float32 or pairs:
                assert torch.equal(got, want), (dtype, B, n, length)
            else:  # the gate's exp may round the other way than torch's sigmoid: an ulp of a gate moves the output
                tol = 8 * U_BF16 * float(want.float().abs().max())  # by about an ulp of the largest value
                assert (got.float() - want.float()).abs().max() <= tol, (dtype, B, n, length)
            for mine, theirs in ((cache.k[0], ref_cache.k[0]), (cache.v[0], ref_cache.v[0])):
                assert torch.equal(mine, theirs), (dtype, B, n, length)
    with pytest.raises(RuntimeError, match="front_layer: x"):
        kernel.front_layers(torch.randn(4, 64), [g_att, g_ffn, *panels], 1e-5, 256, cos, sin, [cache.k[0]],
                            [cache.v[0]], 0, 0.25)


def check_topk(topk) -> None:
    """The k largest of each row, largest first: torch.topk's values and the same words (where values tie, the lower
    index first); the strided sample's threshold too high for a row (the fallback); ties, infinities, NaN; short rows."""
    g = torch.Generator().manual_seed(5)
    for V, k, rows in ((16384, 2000, 5), (4096, 900, 3), (1000, 1, 2), (16384, 16384, 1), (300, 256, 4), (37, 5, 3),
                       (10, 10, 2)):
        x = 3 * torch.randn(rows, V, generator=g)
        x[:, 1] = x[:, V - 2]  # a tie (inside the top k or not)
        vals, ids = topk(x, k)
        want = x.topk(k, dim=-1).values
        assert vals.shape == ids.shape == (rows, k) and ids.dtype == torch.int64
        assert torch.equal(vals, want) and torch.equal(x.gather(-1, ids), vals), (V, k)
        same = vals[:, 1:] == vals[:, :-1]
        assert (ids[:, 1:][same] > ids[:, :-1][same]).all(), (V, k)  # ties: lower index first
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # no word twice
    # the evenly strided sample holds the row's largest words: its threshold leaves fewer than k, every word is a
    # candidate then
    x = -torch.rand(1, 16384, generator=g)
    x[0, ::16] = 100 + torch.rand(1024, generator=g)
    vals, ids = topk(x, 2000)
    assert torch.equal(vals, x.topk(2000).values) and torch.equal(x.gather(-1, ids), vals)
    # all equal: index order; infinities and NaN (largest, as torch.topk); -0 below +0
    vals, ids = topk(torch.zeros(2, 500), 40)
    assert torch.equal(ids, torch.arange(40).expand(2, 40)) and (vals == 0).all()
    x = torch.tensor([[1.0, float("nan"), -float("inf"), float("inf"), -0.0, 0.0, -2.0]])
    vals, ids = topk(x, 7)
    assert ids.tolist() == [[1, 3, 0, 5, 4, 6, 2]] and torch.isnan(vals[0, 0]) and vals[0, 1:].tolist() == [
        float("inf"), 1.0, 0.0, -0.0, -2.0, -float("inf")]


@needs_kernels
@pytest.mark.parametrize("check, name", [(check_attend, "attend"), (check_topk, "topk"),
                                         (check_front_attention, "attend_front"), (check_silu_mul, "silu_mul_"),
                                         (check_rms_norm, "rms_norm_rows"), (check_decode_layer, "decode_layers"),
                                         (check_group_norm_silu, "group_norm_silu")])
def test_native_kernel(check, name):
    check(getattr(cpu_kernels(), name))


@needs_kernels
def test_native_front_layer():
    check_front_layer(cpu_kernels())


@needs_kernels
def test_attention_takes_the_kernel_for_one_unmasked_query_and_sdpa_otherwise(monkeypatch):
    calls = []
    real = cpu_kernels()
    monkeypatch.setattr(A, "cpu_kernels", lambda: type("K", (), {"attend": lambda *a: calls.append(1) or real.attend(*a)}))
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with torch.no_grad():
        A.attention(q, k, v)
        assert len(calls) == 1
        A.attention(q, k, v, torch.ones(1, 5, dtype=torch.bool))  # masked
        A.attention(torch.randn(1, 2, 2, 8), k, v)  # two queries
        monkeypatch.setenv("VARKIT_ATTEND_KERNEL", "0")
        A.attention(q, k, v)
    assert len(calls) == 1
    q.requires_grad_(True)
    A.attention(q, k, v).sum().backward()  # autograd: SDPA
    assert len(calls) == 1 and q.grad is not None


def _every_front(gen, tokens: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """A NAR generator's logits of every front for classes 1 and 4, teacher-forced on ``tokens`` (2, grid²), and its
    cache."""
    with torch.inference_mode():
        cache = gen.new_cache(2)
        first, state = gen.prefill(torch.tensor([1, 4]), cache)
        out = [first]
        starts = gen.layout.step_starts
        for step in range(1, gen.layout.num_steps):
            out.append(gen(tokens[:, starts[step - 1]:starts[step]], step, cache, state))
        return torch.cat(out, 1), cache


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nar_fronts_take_the_front_kernel_and_equal_the_module_path(monkeypatch, dtype):
    """NAR's one-front steps (several tokens a row, no mask) run rotary, cache writes and attention in one
    attend_front call per layer; logits agree with the module path (SDPA) to fp32 sum order (bf16: a few ulp of the
    logits through 2 layers). Masked calls, autograd and VARKIT_ATTEND_KERNEL=0 keep the module path."""
    from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator

    torch.manual_seed(0)
    gen = NeighborsGenerator(NeighborsConfig(vocab_size=64, num_classes=4, dim=64, n_layer=2, n_head=4, grid=6)).eval()
    gen = gen.to(dtype)
    calls = []
    real = cpu_kernels()
    monkeypatch.setattr(A, "cpu_kernels", lambda: type("K", (), {
        "attend": real.attend, "attend_front": lambda *a: calls.append(a[0].shape[1]) or real.attend_front(*a)}))
    tokens = torch.randint(0, 64, (2, 36), generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        return _every_front(gen, tokens)[0].double()

    fused = run()
    fronts = [gen.layout.step_starts[s] - gen.layout.step_starts[s - 1] for s in range(1, gen.layout.num_steps)]
    layers = len(gen.layers)  # NAR's own layers and its vertical head's
    assert calls == [n for n in fronts for _ in range(layers) if n >= 2]  # each layer of each front of 2+ tokens
    monkeypatch.setenv("VARKIT_ATTEND_KERNEL", "0")
    plain = run()
    assert len(calls) == sum(n >= 2 for n in fronts) * layers
    tol = 1e-5 if dtype == torch.float32 else 4 * U_BF16
    torch.testing.assert_close(fused, plain, rtol=0, atol=tol * float(plain.abs().max()))
    monkeypatch.delenv("VARKIT_ATTEND_KERNEL")
    att, x = gen.layers[0].attention, torch.randn(2, 3, 64).to(dtype)
    rope = gen.rope(slice(0, 3))
    with torch.no_grad():
        att(x, rope, torch.ones(3, 3, dtype=torch.bool), gen.new_cache(2), 0)  # masked: SDPA
    att(x, rope, None, gen.new_cache(2), 0)  # autograd: the module path
    assert len(calls) == sum(n >= 2 for n in fronts) * layers


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gates_in_the_kernel_at_inference_as_torchs_ops_do(monkeypatch, dtype):
    """Inference gates through silu_mul_ where it applies (fp32; bf16 on builds with AVX-512-BF16), with torch's
    result up to the exp's few ulp (bf16: one ulp of a rounding that may fall the other way); autograd keeps
    torch's ops."""
    from varkit.nn import layers
    from varkit.nn.layers import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(32, 96).to(dtype).eval()
    prepack_linears(ffn)  # as load_pipeline does (contiguous outputs at any row count)
    x = torch.randn(2, 5, 32).to(dtype)
    calls = []
    real = cpu_kernels()

    class Counting:  # the real kernels, silu_mul_ counted
        def __getattr__(self, name):
            return getattr(real, name)

        def silu_mul_(self, *a):
            calls.append(1)
            real.silu_mul_(*a)

    monkeypatch.setattr(layers, "cpu_kernels", lambda: Counting())
    with torch.no_grad():
        got = ffn(x)
        want = ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))
    assert len(calls) == (1 if dtype == torch.float32 or real.panel_pairs() else 0)
    tol = (1e-5 if dtype == torch.float32 else 4 * U_BF16) * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
    ffn(x).sum()  # grad enabled: torch's ops
    assert len(calls) <= 1


@needs_kernels
def test_rmsnorm_module_takes_the_kernel_only_without_grad():
    norm = RMSNorm(16)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()  # the torch path under autograd
    assert norm.weight.grad is not None
    with torch.no_grad():
        xd = x.detach()
        torch.testing.assert_close(norm(xd), xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_fuse_one_token_steps_and_equal_the_module_path(monkeypatch, dtype):
    """TransformerBlock.forward takes the fused layer for a one-token decode step of 1-4 rows, prepacked, on a plain
    cache, and its output and cache writes equal the module path's (bf16: bit for bit here, the same kernels and
    rounding points; fp32: to sum order)."""
    import varkit.models.raster as R

    block, rope = _block(dtype)
    prepack_linears(block)
    calls = []
    real = R.cpu_kernels()
    monkeypatch.setattr(R, "cpu_kernels", lambda: type("K", (), {
        "decode_layers": lambda *a: calls.append(1) or real.decode_layers(*a), "panel_pairs": real.panel_pairs,
        "front_layers": real.front_layers}))
    x = torch.randn(2, 1, 64).to(dtype)
    cos, sin = rope(slice(7, 8))
    outs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("VARKIT_FUSED_DECODE", fused)
        cache = _filled_cache(dtype, 2, 7)
        with torch.no_grad():
            outs[fused] = (block(x, (cos, sin), None, cache, 0), cache.k[0].clone(), cache.v[0].clone())
    assert len(calls) == 1
    for a, b in zip(outs["1"], outs["0"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
    # not fused: two tokens a row, a mask, grad enabled, not prepacked
    monkeypatch.setenv("VARKIT_FUSED_DECODE", "1")
    with torch.no_grad():
        cos2, sin2 = rope(slice(7, 9))
        block(torch.randn(2, 2, 64).to(dtype), (cos2, sin2), None, _filled_cache(dtype, 2, 7), 0)
        block(x, (cos, sin), torch.ones(1, 8, dtype=torch.bool), _filled_cache(dtype, 2, 7), 0)
    block(x, (cos, sin), None, _filled_cache(dtype, 2, 7), 0)
    prepack_linears(block, enabled=False)
    with torch.no_grad():
        block(x, (cos, sin), None, _filled_cache(dtype, 2, 7), 0)
    assert len(calls) == 1


def _module_path_tol(dtype: torch.dtype, kernel) -> float:
    """Relative bound (times a tensor's largest value) between a fused decode step and the module path. fp32: sum
    order (the suite's 1e-5). bf16: bit for bit where SwiGLU's gate runs in the kernel on the module path too
    (AVX-512-BF16); elsewhere the module path gates with torch's silu, whose exp may round a gate the other way, and an
    ulp of a gate moves the outputs by about an ulp of the largest value (8: room, as in check_front_layer)."""
    from varkit.nn.layers import gate_kernel_serves

    if dtype == torch.float32:
        return 1e-5
    return 0.0 if gate_kernel_serves(dtype, kernel) else 8 * U_BF16


def _small_generator(dtype: torch.dtype):
    """A prepacked 3-block raster generator (dim 64, 4 heads) with a non-zero output head."""
    from varkit.models.raster import RasterGenerator

    torch.manual_seed(0)
    cfg = RasterConfig(dim=64, n_head=4, n_layer=3, vocab_size=32, grid=4, num_classes=2, resid_dropout=0,
                       ffn_dropout=0, token_dropout=0)
    gen = RasterGenerator(cfg).eval()
    with torch.no_grad():
        gen.output.weight.normal_(0, 0.1)
    gen = gen.to(dtype)
    prepack_linears(gen)
    return gen


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generator_decode_steps_run_every_block_in_one_call(monkeypatch, dtype):
    """A raster generator's one-token steps (prefill of a class token, then decode steps) run all its blocks in one
    decode_layers call, with a call a block's logits and cache bit for bit (the same kernel code a layer, the same
    inputs); the kept plan follows an in-place weight edit; a block that cannot fuse sends the step back to the
    blocks one by one."""
    import varkit.models.raster as R

    gen = _small_generator(dtype)
    real = cpu_kernels()
    calls = []

    class Counting:  # the real kernels, decode_layers counted by layers a call
        def __getattr__(self, name):
            return getattr(real, name)

        def decode_layers(self, *a):
            calls.append(len(a[4]))
            return real.decode_layers(*a)

    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    tokens = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(1))

    def run(edit: bool = False) -> tuple[list[torch.Tensor], KVCache]:
        cache = gen.new_cache(2)
        with torch.no_grad():
            logits, state = gen.prefill(torch.tensor([0, 1]), cache)
            out = [logits]
            for step in range(1, 5):
                if edit and step == 3:  # an in-place edit between steps: the plan's copy is stale
                    gen.layers[1].feed_forward.w2.weight.mul_(1.5)
                out.append(gen(tokens[:, step - 1:step], step, cache, state))
        return out, cache

    stacked, cache = run()
    assert calls == [3] * 5
    monkeypatch.setattr(R.RasterGenerator, "_fused_blocks", lambda self, *a: None)
    calls.clear()
    blocks, block_cache = run()
    assert calls == [1] * 15
    assert all(torch.equal(a, b) for a, b in zip(stacked, blocks))
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, block_cache.k + block_cache.v))
    monkeypatch.undo()
    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    weight = gen.layers[1].feed_forward.w2.weight.detach().clone()
    edited, _ = run(edit=True)
    with torch.no_grad():
        gen.layers[1].feed_forward.w2.weight.copy_(weight)
    monkeypatch.setattr(R.RasterGenerator, "_fused_blocks", lambda self, *a: None)
    edited_blocks, _ = run(edit=True)
    assert all(torch.equal(a, b) for a, b in zip(edited, edited_blocks))
    assert not torch.equal(edited[-1], stacked[-1])
    monkeypatch.undo()
    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    with torch.no_grad():
        gen.layers[1].feed_forward.w2.weight.copy_(weight)
    prepack_linears(gen.layers[2], enabled=False)  # the last block keeps the module path
    calls.clear()
    mixed, _ = run()
    assert calls == [1, 1] * 5
    tol = _module_path_tol(dtype, real)  # the module path's last block
    for a, b in zip(mixed, stacked):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))
    # a linear swapped in after a plan was kept: the next step's plan holds the new one's copy
    prepack_linears(gen)
    assert all(torch.equal(a, b) for a, b in zip(run()[0], stacked))
    swapped = Linear(256, 64, bias=False).to(dtype)
    prepack_linears(swapped)
    gen.layers[0].feed_forward.w2 = swapped
    calls.clear()
    with_swap, _ = run()
    assert calls == [3] * 5 and not torch.equal(with_swap[-1], stacked[-1])
    monkeypatch.setattr(R.RasterGenerator, "_fused_blocks", lambda self, *a: None)
    assert all(torch.equal(a, b) for a, b in zip(with_swap, run()[0]))
    # a forward hook on a block (or a global one) sees every call of it: the blocks one by one while it is there
    monkeypatch.undo()
    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    seen = []
    for register in (gen.layers[1].register_forward_hook, torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda m, i, o: seen.append(1))
        calls.clear()
        assert all(torch.equal(a, b) for a, b in zip(run()[0], with_swap)) and calls == [1] * 15 and seen
        handle.remove()
        seen.clear()
    calls.clear()
    run()
    assert calls == [3] * 5 and not seen
    # a cache with more layers than the generator (one made for a deeper model): the blocks one by one, as before
    cache = KVCache(4, 2, 4, gen.max_cache_len(), 16, dtype=dtype)
    calls.clear()
    with torch.no_grad():
        gen.prefill(torch.tensor([0, 1]), cache)
    assert calls == [1] * 3


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 6])
def test_decode_steps_of_more_rows_run_every_block_in_one_call_on_the_panels(monkeypatch, dtype, rows):
    """Past 2 rows (batch 2+ with CFG) a decode step runs all blocks in one decode_layers call with its linears on the
    panel kernel, as prepacked linears run them at those rows: the module path's logits and cache, bit for bit in
    bf16 (the same kernels and rounding points), to sum order in fp32."""
    import varkit.models.raster as R
    from varkit.nn.stream_gemv import panel_dtypes

    if dtype not in panel_dtypes():
        pytest.skip("bf16 linears take oneDNN's GEMM here (AMX), not the panel kernel")
    gen = _small_generator(dtype)
    real = cpu_kernels()
    calls = []

    class Counting:  # the real kernels, decode_layers counted: (rows, layers, panels)
        def __getattr__(self, name):
            return getattr(real, name)

        def decode_layers(self, *a):
            calls.append((a[0].shape[0], len(a[4]), a[9]))
            return real.decode_layers(*a)

    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    tokens = torch.randint(0, 32, (rows, 4), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[list[torch.Tensor], KVCache]:
        cache = gen.new_cache(rows)
        with torch.no_grad():
            logits, state = gen.prefill(torch.tensor([0, 1, 1, 0, 1, 0][:rows]), cache)
            out = [logits] + [gen(tokens[:, step - 1:step], step, cache, state) for step in range(1, 5)]
        return out, cache

    fused, cache = run()
    assert calls == [(rows, 3, True)] * 5
    monkeypatch.setenv("VARKIT_FUSED_DECODE", "0")
    plain, plain_cache = run()
    assert len(calls) == 5
    tol = _module_path_tol(dtype, real)
    for a, b in zip(fused + cache.k + cache.v, plain + plain_cache.k + plain_cache.v):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nar_fronts_run_each_block_in_one_call_with_the_module_paths_numbers(monkeypatch, dtype):
    """Prepacked, NAR's one-front steps of 2+ tokens a row (3-128 rows) run NAR's own blocks in one front_layers call
    and its vertical head's in another, with a call a block's logits and cache and with the module
    path's, bit for bit (the same kernels and roundings; bf16 where SwiGLU gates in the kernel too). Not prepacked,
    VARKIT_FUSED_DECODE=0, masked calls and autograd keep the module path."""
    import varkit.models.raster as R
    from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator
    from varkit.nn.layers import gate_kernel_serves

    real = cpu_kernels()
    if not gate_kernel_serves(dtype, real):
        pytest.skip("bf16 blocks keep the module path on builds without AVX-512-BF16 (SwiGLU gates in torch there)")
    torch.manual_seed(0)
    gen = NeighborsGenerator(NeighborsConfig(vocab_size=64, num_classes=4, dim=64, n_layer=2, n_head=4, grid=6)).eval()
    gen = gen.to(dtype)
    prepack_linears(gen)
    calls = []

    class Counting:  # the real kernels; front_layers counted: (tokens a row, blocks a call)
        def __getattr__(self, name):
            return getattr(real, name)

        def front_layers(self, *a):
            calls.append((a[0].shape[1], len(a[6])))
            return real.front_layers(*a)

    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    tokens = torch.randint(0, 64, (2, 36), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, KVCache]:
        return _every_front(gen, tokens)

    fused, cache = run()
    fronts = [gen.layout.step_starts[s] - gen.layout.step_starts[s - 1] for s in range(1, gen.layout.num_steps)]
    own, head = gen.config.n_layer, len(gen.layers) - gen.config.n_layer  # NAR's own blocks, its vertical head's
    # CFG-less batch 2: 4-12 rows a call
    assert calls == [c for n in fronts if n >= 2 for c in ((n, own), (n, head))]
    monkeypatch.setattr(R.RasterGenerator, "_fused_blocks", lambda self, *a: None)
    calls.clear()
    per_block, per_block_cache = run()
    assert calls == [(n, 1) for n in fronts if n >= 2 for _ in range(own + head)]
    monkeypatch.setattr(R.TransformerBlock, "_fused_front", lambda self, *a: None)
    plain, plain_cache = run()
    for out, kv in ((fused, cache), (per_block, per_block_cache)):
        assert torch.equal(out, plain)
        assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, plain_cache.k + plain_cache.v))
    monkeypatch.undo()
    monkeypatch.setattr(R, "cpu_kernels", lambda: Counting())
    count = len(calls)
    monkeypatch.setenv("VARKIT_FUSED_DECODE", "0")
    run()
    monkeypatch.delenv("VARKIT_FUSED_DECODE")
    block, x = gen.layers[0], torch.randn(2, 3, 64).to(dtype)
    rope = gen.rope(slice(0, 3))
    with torch.no_grad():
        block(x, rope, torch.ones(3, 3, dtype=torch.bool), gen.new_cache(2), 0)  # masked
    block(x, rope, None, gen.new_cache(2), 0)  # autograd
    prepack_linears(gen, enabled=False)
    run()
    assert len(calls) == count
    prepack_linears(gen)
    run()
    assert len(calls) > count


def test_the_build_falls_back_to_one_thread_without_openmp_and_warns_when_nothing_builds(monkeypatch):
    """A compiler without OpenMP still gets the kernels (the one-thread build); no compiler at all: a warning and
    None (torch's paths then), never an exception."""
    from torch.utils import cpp_extension

    from varkit.nn import cpu_kernels as ck

    calls = []

    def fake_load(name, cpp_sources, functions, extra_cflags, extra_ldflags, verbose):
        calls.append(extra_cflags)
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("cc1plus: error: unrecognized command-line option '-fopenmp'")
        return "one-thread build"

    monkeypatch.setattr(cpp_extension, "load_inline", fake_load)
    monkeypatch.setattr(ck, "_built", lambda *a: True)
    assert ck.build_kernels.__wrapped__("x86-64") == "one-thread build"
    assert ["-fopenmp" in c for c in calls] == [True, False]

    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        assert ck.build_kernels.__wrapped__("x86-64") is None


@needs_kernels
def test_top_k_sampling_takes_the_kernel_and_draws_what_torch_topk_draws(monkeypatch):
    """Logits without ties: the kernel's sorted candidates are torch.topk's, so the same uniforms draw the same tokens
    (and processed_probs is the same distribution); VARKIT_TOPK_KERNEL=0 is torch.topk."""
    from varkit.samplers import topk as T
    from varkit.samplers.logits import SamplingParams, processed_probs, sample_logits

    calls = []
    real = cpu_kernels().topk
    monkeypatch.setattr(T, "cpu_kernels", lambda: mock.Mock(topk=lambda x, k: calls.append(k) or real(x, k)))
    g = torch.Generator().manual_seed(6)
    logits = 4 * torch.randn(3, 5, 16384, generator=g)
    u = torch.rand(3, 5, generator=g)
    p = SamplingParams(temperature=0.9, top_k=2000, top_p=0.95)
    got, got_probs = sample_logits(logits, p, u), processed_probs(logits, p)
    assert calls == [2000, 2000]
    monkeypatch.setenv("VARKIT_TOPK_KERNEL", "0")
    assert torch.equal(sample_logits(logits, p, u), got) and torch.equal(processed_probs(logits, p), got_probs)
    assert calls == [2000, 2000]
