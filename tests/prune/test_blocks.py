import pytest
import torch

from lpl.prune.blocks import block_elements, block_grid, block_sum, check_block_size, expand_block_mask, mask_density
from lpl.utils.errors import LplError


def test_ragged_grid_and_element_counts():
    assert block_grid((40, 20), (16, 16)) == (3, 2)
    elements = block_elements((40, 20), (16, 16))
    assert elements.tolist() == [[256, 64], [256, 64], [128, 32]]
    assert elements.sum() == 40 * 20


def test_block_sum_matches_loop():
    values = torch.randn(2, 40, 20)
    sums = block_sum(values, (16, 16))
    for r in range(3):
        for c in range(2):
            expected = values[:, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].sum(dim=(1, 2))
            torch.testing.assert_close(sums[:, r, c], expected)


def test_expand_mask_and_density_count_ragged_blocks_by_true_size():
    mask = torch.tensor([[True, False], [False, False], [False, True]])
    full = expand_block_mask(mask, (40, 20), (16, 16))
    assert full.shape == (40, 20)
    assert full[:16, :16].all() and full[32:, 16:].all() and full.sum() == 256 + 32
    assert mask_density(mask, (40, 20), (16, 16)) == pytest.approx((256 + 32) / 800)


@pytest.mark.parametrize("bad", [(0, 16), (16, -1), (17, 16), (16, 21)])
def test_bad_block_sizes(bad):
    with pytest.raises(LplError):
        check_block_size(bad, {"layer": (16, 20)})
