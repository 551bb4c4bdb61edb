import math

import torch

from varkit.nn import RMSNorm, block_causal_mask
from varkit.nn.layers import swiglu_hidden_dim
from varkit.nn.rope import apply_rope, rope_angles_2d


def test_rope_2d_rotates_first_half_by_row_second_by_col():
    head_dim = 8
    ang = rope_angles_2d(torch.tensor([2]), torch.tensor([3]), head_dim)
    # head_dim/4 = 2 frequencies per axis: 1 and 10000^(-2/4)
    f = [1.0, 10000 ** (-0.5)]
    assert torch.allclose(ang[0], torch.tensor([2 * f[0], 2 * f[1], 3 * f[0], 3 * f[1]]))


def test_apply_rope_rotates_interleaved_pairs():
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    cos = torch.tensor([[math.cos(0.5), math.cos(1.0)]])
    sin = torch.tensor([[math.sin(0.5), math.sin(1.0)]])
    y = apply_rope(x, cos, sin).flatten()
    assert torch.allclose(y, torch.tensor([math.cos(0.5), math.sin(0.5), -math.sin(1.0), math.cos(1.0)]))


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
        assert (a.float() - b.float()).abs().max() <= 0.05 * b.float().abs().max()
    x = torch.randn(3, 64)
    assert torch.equal(ours.float()(x), ref.float()(x))  # fp32 is exactly nn.Linear


def test_rotary_tables_stay_fp32_when_the_model_is_cast():
    from varkit.nn.rope import RotaryTable

    t = RotaryTable(torch.rand(5, 4)).to(torch.bfloat16)
    cos, sin = t(slice(0, 5))
    assert cos.dtype == sin.dtype == torch.float32
