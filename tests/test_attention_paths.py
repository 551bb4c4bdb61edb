"""``varkit.nn.attention.attention``: SDPA, except one query a row on a CPU: unmasked the C++ kernel
(tests/test_cpu_kernels.py), masked bf16 without AMX the fp32 products."""
import pytest
import torch
import torch.nn.functional as F

from varkit.nn import attention as A


@pytest.mark.parametrize("slow", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_one_bf16_query_matches_sdpa(monkeypatch, slow, masked):
    monkeypatch.setattr(A, "_sdpa_slow_at_one_query", lambda: slow)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(torch.bfloat16) for n in (1, 40, 40))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3 if masked else None
    got = A.attention(q, k, v, mask, 0.0, 0.5)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.5)
    # the exact attention of the bf16 inputs, rounded to bf16 once (unit roundoff 2^-8 of |v| ~ 3) on the fp32
    # path; SDPA's own bf16 kernel rounds its intermediates too (a few more 2^-8): 4 ulps of the largest value
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * 2.0 ** -8 * float(v.double().abs().max()))
    if not slow and masked:  # AMX, masked: SDPA itself (unmasked: the kernel)
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5))


def test_other_cases_are_sdpa(monkeypatch):
    monkeypatch.setattr(A, "_sdpa_slow_at_one_query", lambda: True)
    g = torch.Generator().manual_seed(1)
    for dtype, n in ((torch.bfloat16, 2), (torch.float32, 2)):  # two queries: SDPA is as fast or faster
        q, k, v = (torch.randn(1, 2, m, 8, generator=g).to(dtype) for m in (n, 9, 9))
        assert torch.equal(A.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = (torch.randn(1, 2, m, 8, generator=g) for m in (1, 9, 9))
    mask = torch.rand(1, 1, 1, 9, generator=g) > 0.5
    assert torch.equal(A.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
