"""Winograd F(4x4, 3x3) convolutions (varkit/nn/winograd.py) and the LDM models' fast inference path.

Tolerance, machine-independent: first-order floating-point error analysis (Higham, ch. 3) of the three stages. Each
stage's outputs are sums of products whose rounding is bounded by n u times the sum of the absolute terms; through
the stages that gives |ŷ - y| <= (Cin + 16) u' Y_abs per output, where Y_abs is the same computation in float64 on
the absolute values of the inputs, filters and transform matrices, n = Cin for the GEMM's sum plus at most 16 for the
transforms (6 operations over two passes in, 5 out, the filter transform rounded once, the bias), and u' = eps (twice
the unit roundoff: room for any summation order or FMA use). A wrong coefficient in any transform moves outputs by
O(|y|), two orders of magnitude above the bound (asserted below: the bound is < 1e-2 of the outputs' scale).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from varkit.nn import ldm, winograd
from varkit.nn.cpu_kernels import cpu_kernels

EPS = torch.finfo(torch.float32).eps
needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ toolchain to build the kernels here")


def test_the_matrices_compute_four_outputs_of_a_3_tap_correlation():
    g = torch.Generator().manual_seed(0)
    bt, gm, at = (torch.tensor(m, dtype=torch.float64) for m in (winograd.BT, winograd.G, winograd.AT))
    for _ in range(5):
        d, f = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
        want = torch.stack([d[i:i + 3] @ f for i in range(4)])
        assert torch.allclose(at @ ((gm @ f) * (bt @ d)), want, rtol=0, atol=1e-12)


def reference(x: torch.Tensor, w: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """The F(4x4, 3x3) algorithm in float64 (on absolute values: the error bound's Y_abs), cut to x's size."""
    bt, gm, at = (torch.tensor(m, dtype=torch.float64) for m in (winograd.BT, winograd.G, winograd.AT))
    x, w = x.double(), w.double()
    if absolute:
        bt, gm, at, x, w = bt.abs(), gm.abs(), at.abs(), x.abs(), w.abs()
    b, c, h, wd = x.shape
    th, tw = (h + 3) // 4, (wd + 3) // 4
    tiles = F.pad(x, (1, 4 * tw - wd + 1, 1, 4 * th - h + 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # b c th tw 6 6
    v = torch.einsum("as,bcijst,dt->bcijad", bt, tiles, bt)
    u = torch.einsum("ar,ocrs,ds->ocad", gm, w, gm)
    m = torch.einsum("bcijad,ocad->boijad", v, u)
    y = torch.einsum("ya,boijad,xd->boijyx", at, m, at)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(b, -1, 4 * th, 4 * tw)[:, :, :h, :wd]


def check_winograd(kernels) -> None:
    """conv3x3 against float64 within the first-order bound, on shapes with channel tails, edges that cut tiles,
    several images and one tile row a chunk."""
    g = torch.Generator().manual_seed(1)
    cases = ((2, 7, 5, 13, 9), (1, 48, 40, 20, 20), (1, 33, 17, 8, 8), (3, 16, 32, 5, 6), (1, 64, 64, 1, 1))
    for b, cin, cout, h, wd in cases:
        x = torch.randn(b, cin, h, wd, generator=g)
        w = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
        bias = torch.randn(cout, generator=g)
        got = winograd.conv3x3(x, winograd.transform_weight(w, kernels), bias, kernels).double()
        want = F.conv2d(x.double(), w.double(), bias.double(), padding=1)
        assert torch.allclose(reference(x, w) + bias.double()[:, None, None], want, rtol=0, atol=1e-9)
        bound = (cin + 16) * EPS * (reference(x, w, absolute=True) + bias.double().abs()[:, None, None])
        assert float(bound.max()) < 1e-2 * float(want.abs().max())  # a wrong coefficient errs by O(|y|): it fails
        assert got.shape == want.shape and ((got - want).abs() <= bound).all(), (b, cin, cout, h, wd)


@needs_kernels
def test_winograd_conv_is_within_the_error_bound(monkeypatch):
    check_winograd(cpu_kernels())
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # one tile row a chunk: chunk edges inside an image
    check_winograd(cpu_kernels())


@needs_kernels
def test_the_filter_transform_is_float64_rounded_once(monkeypatch):
    """The extension's U = G g Gᵀ equals torch's float64 einsum rounded to fp32, to 1 ulp (the two float64 sums may
    round differently in their last bits, which can move a value across an fp32 rounding boundary); the einsum is
    also the fallback where the extension cannot be built."""
    g = torch.tensor(winograd.G, dtype=torch.float64)
    w = torch.randn(5, 7, 3, 3, generator=torch.Generator().manual_seed(2))
    want = torch.einsum("ar,oirs,bs->abio", g, w.double(), g).reshape(36, 7, 5)
    got = winograd.transform_weight(w)
    assert got.shape == (36, 7, 5) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= EPS * want.abs()).all()
    monkeypatch.setattr(winograd, "cpu_kernels", lambda: None)
    assert torch.equal(winograd.transform_weight(w), want.float())
    with pytest.raises(RuntimeError, match="3, 3"):
        cpu_kernels().winograd_filters(torch.randn(2, 2, 5, 5))


@needs_kernels
def test_transforms_refuse_what_they_cannot_read():
    k = cpu_kernels()
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        k.winograd_input(torch.randn(1, 4, 8, 8).double(), 0, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        k.winograd_input(torch.randn(1, 4, 8, 8), 0, 3)
    with pytest.raises(RuntimeError, match="do not match"):
        k.winograd_output(torch.randn(36, 3, 4), torch.zeros(4), torch.empty(1, 4, 8, 8), 0, 2)


def _decoder() -> ldm.Decoder:
    torch.manual_seed(0)
    return ldm.Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 2,
                       block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8).eval()


@needs_kernels
def test_fast_kernels_switch_on_and_off_and_leave_training_alone(monkeypatch):
    dec = _decoder()
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        exact = dec(z)
    calls = {"conv": 0, "norm": 0}
    real_conv, real_kernels = winograd.conv3x3, cpu_kernels()
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.__setitem__("conv", calls["conv"] + 1) or real_conv(*a))
    def counted_norm(*a):
        calls["norm"] += 1
        return real_kernels.group_norm_silu(*a)

    monkeypatch.setattr(ldm, "cpu_kernels", lambda: type("K", (), {"group_norm_silu": staticmethod(counted_norm)}))
    n = ldm.use_fast_kernels(dec)
    assert n == sum(isinstance(m, (ldm.Conv2d, ldm.ResnetBlock2D, ldm.Decoder)) for m in dec.modules())
    pixels = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: pixels.__setitem__(m, a[0].shape[-2] * a[0].shape[-1]))
             for m in dec.modules() if isinstance(m, ldm.Conv2d)]
    with torch.no_grad():
        fast = dec(z)
    for h in hooks:
        h.remove()
    # every 3x3 conv of at least MIN_CHANNELS (conv_in's 4 and conv_out's 3 channels stay on torch's) on a map of
    # at least MIN_PIXELS (the 16 px level stays too), every ResNet block's two norms and the output norm. The values:
    # the per-conv bound is test_winograd_conv_is_within_the_error_bound's; here the wiring, with 1e-4 of the scale
    # (3.5e-6 measured; fp32 rounding errors of a reordered sum are of that size on any x86-64 CPU, while a wrong
    # wiring moves outputs by O(1))
    wide = [m for m, p in pixels.items()
            if min(m.in_channels, m.out_channels) >= winograd.MIN_CHANNELS and p >= winograd.MIN_PIXELS]
    assert calls["conv"] == len(wide) > 0 and len(wide) < len(pixels)
    assert calls["norm"] == 2 * sum(isinstance(m, ldm.ResnetBlock2D) for m in dec.modules()) + 1
    assert 0 < float((fast - exact).abs().max()) < 1e-4 * float(exact.abs().max())
    with torch.enable_grad():  # autograd: torch's ops, bit for bit
        assert torch.equal(dec(z), exact) and calls["conv"] == len(wide)
    ldm.use_fast_kernels(dec, False)
    with torch.no_grad():
        assert torch.equal(dec(z), exact)
    assert all("_winograd" not in m.__dict__ for m in dec.modules())


@needs_kernels
def test_the_transformed_filters_follow_weight_edits():
    dec = _decoder()
    ldm.use_fast_kernels(dec)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        before = dec(z)
        for m in dec.modules():
            if isinstance(m, ldm.Conv2d):
                m.weight.mul_(0.5)
        after = dec(z)
        ldm.use_fast_kernels(dec, False)
        want = dec(z)
    assert not torch.allclose(before, after)
    assert float((after - want).abs().max()) < 1e-4 * float(want.abs().max())


@needs_kernels
def test_var_decoder_upsamples_through_winograd_when_fast(monkeypatch):
    """VAR's decoder swaps its upsampling convs for the stacked 2x2 form on grids of 32 px and more; with the fast
    kernels on they run as Winograd convs on the upsampled map instead (faster at every level of VAR-d16's)."""
    from varkit.tokenizers import msvq

    cfg = msvq.MSVQConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=32,
                          patch_nums=(1, 2, 4, 8), norm_num_groups=8, using_sa=False, using_mid_sa=False)
    torch.manual_seed(3)
    tok = msvq.MultiScaleVQTokenizer(cfg).eval()
    z = torch.randn(1, 8, 32, 32)
    stacked = []
    real = msvq.upsample2x_conv3x3
    monkeypatch.setattr(msvq, "upsample2x_conv3x3", lambda *a: stacked.append(1) or real(*a))
    with torch.no_grad():
        exact = tok.decoder(z)
        assert len(stacked) == 2  # the upsamplers of the 32 and 64 px levels
        ldm.use_fast_kernels(tok)
        fast = tok.decoder(z)
    assert len(stacked) == 2 and 0 < float((fast - exact).abs().max()) < 1e-4 * float(exact.abs().max())
