"""The one speculative acceptance routine: exact invariants and a statistical check."""
import pytest
import torch
from scipy.stats import chi2

from varkit.samplers.accept import acceptance_prob, residual, verify
from varkit.samplers.logits import sample_probs


def _dists(shape, V, seed, sparse=False):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(*shape, V, generator=g) * 2).softmax(-1)
    if sparse:  # zeros, as top-k / top-p leave them
        p = p * (torch.rand(*shape, V, generator=g) > 0.4)
        p[..., 0] += 1e-3
        p = p / p.sum(-1, keepdim=True)
    return p


def test_q_equal_p_accepts_everything():
    p = _dists((64, 8), 10, 0, sparse=True)
    draft = sample_probs(p, torch.rand(64, 8, dtype=torch.float64))
    u = torch.rand(64, 8, dtype=torch.float64) * (1 - 1e-12)
    v = verify(p, draft, u, torch.rand(64, 8, dtype=torch.float64), q=p)
    assert v.accepted.all() and torch.equal(v.tokens, draft)
    assert (acceptance_prob(p.gather(-1, draft[..., None]), p.gather(-1, draft[..., None])) == 1).all()


def test_residual_is_normalised_positive_part():
    p, q = _dists((5, 3), 7, 1), _dists((5, 3), 7, 2)
    want = (p - q).clamp(min=0)
    want = want / want.sum(-1, keepdim=True)
    # fp32 probabilities <= 1 renormalised by a sum over V = 7 (which a CPU may add in another order):
    # a few ulp of 1 (eps = 1.2e-7); 5e-7 covers 4 ulp
    tol = dict(rtol=0, atol=5e-7)
    torch.testing.assert_close(residual(p, q), want, **tol)
    # one-hot q (as token ids, or None = on the draft): p without that token, renormalised
    x = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(x, 7).float()
    want1 = (p - onehot).clamp(min=0)
    want1 = want1 / want1.sum(-1, keepdim=True)
    torch.testing.assert_close(residual(p, x), want1, **tol)
    torch.testing.assert_close(residual(p, None, x), want1, **tol)
    torch.testing.assert_close(residual(p, onehot), want1, **tol)
    # no residual mass (p <= q everywhere): falls back to p (default fp32 tolerances: 1.3e-6 relative,
    # 1e-5 absolute, far above the few ulp a renormalisation can add)
    torch.testing.assert_close(residual(p, p), p)
    assert residual(p, q)[(p - q) <= 0].eq(0).all()


def test_one_hot_q_acceptance_is_p_of_the_draft():
    p = _dists((4,), 6, 4)
    x = torch.tensor([0, 1, 2, 5])
    px = p.gather(-1, x[:, None]).squeeze(-1)
    torch.testing.assert_close(acceptance_prob(px, torch.ones(4)), px)  # min(1, px / 1): exact; default tolerances
    onehot = torch.nn.functional.one_hot(x, 6).float()
    u = torch.full((4,), 0.5, dtype=torch.float64)
    a, b = verify(p, x, u, u, q=None), verify(p, x, u, u, q=onehot)
    c = verify(p, x, u, u, q=x)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert torch.equal(a.accepted, (px > 0.5))


def test_degenerate_p_accepts_its_argmax_draft():
    p = torch.nn.functional.one_hot(torch.tensor([3, 1]), 5).float()
    x = torch.tensor([3, 1])
    v = verify(p, x, torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64), q=None)
    assert v.accepted.all()
    v = verify(p, torch.tensor([0, 0]), torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64))
    assert not v.accepted.any() and torch.equal(v.tokens, x)


@pytest.mark.parametrize("kind", ["dense", "onehot"])
def test_output_follows_p_whatever_q(kind):
    """χ² per position: x ~ q, then accept/resample, must be distributed as p."""
    V, P, N = 6, 3, 60000
    p = _dists((P,), V, 5, sparse=True)
    g = torch.Generator().manual_seed(6)
    if kind == "dense":
        q = _dists((P,), V, 7)  # covers tokens p lacks and misses mass p has
        qq = q[:, None].expand(P, N, V)
        draft = sample_probs(qq, torch.rand(P, N, generator=g, dtype=torch.float64))
    else:  # a fixed bad guess per position
        draft = torch.tensor([1, 4, 0])[:, None].expand(P, N)
        qq = None
    pp = p[:, None].expand(P, N, V)
    u1, u2 = (torch.rand(P, N, generator=g, dtype=torch.float64) for _ in range(2))
    out = verify(pp, draft, u1, u2, q=qq).tokens
    for i in range(P):
        counts = torch.bincount(out[i], minlength=V).double()
        keep = p[i] > 0
        assert counts[~keep].sum() == 0
        expected = p[i][keep].double() * N
        stat = float(((counts[keep] - expected) ** 2 / expected).sum())
        assert chi2.sf(stat, int(keep.sum()) - 1) > 0.01


def test_zero_q_draft_semantics():
    """A draft q could not produce: accepted iff p(x) > 0 (never when both are 0)."""
    r = acceptance_prob(torch.tensor([0.3, 0.0]), torch.tensor([0.0, 0.0]))
    assert r[0] == 1 and torch.isnan(r[1])
    p = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    v = verify(p, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64),
               q=torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert v.accepted.tolist() == [False, True] and v.tokens.tolist() == [1, 1]
