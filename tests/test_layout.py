import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.layout import neighbors, raster, scales


def test_raster_is_row_major_one_token_a_step():
    lay = raster(3, 4)
    assert lay.num_steps == 12 and lay.single_token_steps
    assert lay.coords[5].tolist() == [1, 1, 0]


def test_neighbors_fronts_take_2n_minus_1_steps():
    lay = neighbors(16)
    assert lay.num_steps == 31 and lay.num_tokens == 256
    assert lay.step_sizes[:3] == [1, 2, 3] and max(lay.step_sizes) == 16
    d = lay.coords[:, 0] + lay.coords[:, 1]
    assert torch.equal(d, lay.step_of)  # step = Manhattan distance from the top-left
    with pytest.raises(InvalidArgumentError, match="square"):
        neighbors(4, 5)


def test_scales_steps_are_whole_scales():
    lay = scales((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert lay.num_tokens == 680 and lay.num_steps == 10
    with pytest.raises(InvalidArgumentError):
        scales((1, 3, 2))


@pytest.mark.parametrize("lay", [raster(4), neighbors(4), scales((1, 2, 4))])
def test_grids_round_trip(lay):
    tokens = torch.randint(0, 100, (2, lay.num_tokens))
    assert torch.equal(lay.from_grids(lay.to_grids(tokens)), tokens)


def test_neighbors_grid_matches_raster_positions():
    lay = neighbors(3)
    tokens = torch.arange(9)[None]
    grid = lay.to_grids(tokens)[0][0]
    for i, (r, c, _) in enumerate(lay.coords.tolist()):
        assert grid[r, c] == i
