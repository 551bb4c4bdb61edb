"""The near-tie rules of tests/numerics.py: a flip is forgiven only at a near-tie, and only the first."""
from types import SimpleNamespace

import pytest
import torch

from varkit.samplers import SamplingParams

from numerics import assert_greedy_tokens_match, assert_nearest_codes_match


class _FixedLogits:
    """A generator stand-in whose teacher-forced logits are given: one token per step."""

    def __init__(self, logits):
        self.logits = logits
        n = logits.shape[1]
        self.layout = SimpleNamespace(step_of=torch.arange(n), num_steps=n)

    def teacher_forcing_logits(self, cond, tokens):
        return self.logits


# position 0: token 0 clearly; position 1: tokens 1 and 2 tie to 1e-7 (of logits ~3); position 2: token 3
LOGITS = torch.tensor([[[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0 - 1e-7, 0.0], [0.0, 0.0, 0.0, 3.0]]])
GREEDY = SamplingParams(top_k=1)


def test_greedy_match_forgives_only_a_first_near_tie():
    gen, want = _FixedLogits(LOGITS), torch.tensor([[0, 1, 3]])
    assert_greedy_tokens_match(gen, None, GREEDY, want.clone(), want)
    assert_greedy_tokens_match(gen, None, GREEDY, torch.tensor([[0, 2, 0]]), want)  # tie flipped, then diverged
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_greedy_tokens_match(gen, None, GREEDY, torch.tensor([[1, 1, 3]]), want)
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_greedy_tokens_match(gen, None, GREEDY, torch.tensor([[0, 1, 0]]), want)
    with pytest.raises(AssertionError, match="disagree"):  # logits that are not the golden path's
        assert_greedy_tokens_match(gen, None, GREEDY, torch.tensor([[0, 2, 3]]), torch.tensor([[1, 1, 3]]))


def test_code_match_forgives_only_a_first_near_tie():
    # scale 0: one latent, codes 0 and 1 at distances 1 and 1 + 1e-7; scale 1: code 2 clearly nearest
    d = [torch.tensor([[[1.0, 1.0 + 1e-7, 4.0]]]), torch.tensor([[[4.0, 4.0, 0.5], [0.5, 4.0, 4.0]]])]
    dist = lambda si: (d[si].double(), 4.0)  # noqa: E731
    want = [torch.tensor([[0]]), torch.tensor([[2, 0]])]
    assert_nearest_codes_match([torch.tensor([[1]]), torch.tensor([[1, 1]])], want, dist)
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_nearest_codes_match([torch.tensor([[0]]), torch.tensor([[2, 1]])], want, dist)
