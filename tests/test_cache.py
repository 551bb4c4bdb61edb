import pytest
import torch

from varkit.cache import KVCache
from varkit.errors import InvalidArgumentError


def test_update_returns_filled_prefix_and_advance():
    c = KVCache(2, 3, 4, 10, 8)
    k = torch.randn(3, 4, 2, 8)
    kk, vv = c.update(0, k, k + 1)
    assert kk.shape == (3, 4, 2, 8) and torch.equal(kk, k) and torch.equal(vv, k + 1)
    c.advance(2)
    kk, _ = c.update(0, torch.zeros(3, 4, 1, 8), torch.zeros(3, 4, 1, 8))
    assert kk.shape[2] == 3 and torch.equal(kk[:, :, :2], k)


def test_nbytes_counts_all_layers():
    c = KVCache(3, 2, 4, 16, 8, dtype=torch.float32)
    assert c.nbytes == 3 * 2 * 2 * 4 * 16 * 8 * 4


def test_truncate_and_overflow_errors():
    c = KVCache(1, 1, 1, 4, 2)
    c.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    c.advance(3)
    with pytest.raises(InvalidArgumentError):
        c.truncate(5)
    c.truncate(1)
    assert c.length == 1
    with pytest.raises(InvalidArgumentError, match="overflow"):
        c.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))


def test_truncate_then_reappend_gives_same_logits(tiny_gen):
    cond = torch.tensor([0, 3])
    tokens = torch.randint(0, 16, (2, 15), generator=torch.Generator().manual_seed(1))
    ref = tiny_gen.new_cache(2)
    tiny_gen.prefill(cond, ref)
    want = tiny_gen(tokens[:, :6], 1, ref)

    c = tiny_gen.new_cache(2)
    tiny_gen.prefill(cond, c)
    tiny_gen(tokens[:, :3], 1, c)
    junk = torch.randint(0, 16, (2, 5))
    tiny_gen(junk, 4, c)  # drafts that get rejected
    tiny_gen.rollback(c, None, 4)
    assert c.length == 1 + 3
    got = tiny_gen(tokens[:, 3:6], 4, c)
    # fp32 logits (|logit| <= 1.4, within 7e-7 of fp64) of the same positions through other GEMM shapes:
    # a CPU's kernels move them by ~1e-6 at most; 1e-5 holds on any x86-64 CPU
    torch.testing.assert_close(got, want[:, 3:6], rtol=0, atol=1e-5)


def test_forward_refuses_a_cache_at_the_wrong_length(tiny_gen):
    c = tiny_gen.new_cache(1)
    tiny_gen.prefill(torch.tensor([0]), c)
    with pytest.raises(InvalidArgumentError, match="roll back"):
        tiny_gen(torch.zeros(1, 1, dtype=torch.long), 3, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_on_cuda_matches_cpu(tiny_gen):
    cond = torch.tensor([1, 2])
    tokens = torch.randint(0, 16, (2, 15))
    cpu = tiny_gen.teacher_forcing_logits(cond, torch.cat([tokens, tokens[:, :1]], 1))
    g = tiny_gen.cuda()
    c = g.new_cache(2)
    assert c.device.type == "cuda"
    l0, _ = g.prefill(cond.cuda(), c)
    l = g(tokens.cuda(), 1, c)
    # CUDA's fp32 GEMMs may use TF32 (10-bit mantissa, ~1e-3 relative per product) unless disabled; the
    # default (no TF32 for matmul) keeps it to fp32 noise, ~1e-6: 1e-4 holds for either CPU reference
    torch.testing.assert_close(torch.cat([l0, l], 1).cpu(), cpu, rtol=1e-4, atol=1e-4)
