import pytest
import torch

from lpl.kernels import BlockSparseWeight
from lpl.utils.errors import LplError


def _expand(mask: torch.Tensor, block_size, shape) -> torch.Tensor:
    br, bc = block_size
    return mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: shape[0], : shape[1]]


@pytest.mark.parametrize("shape,block_size", [((96, 64), (32, 32)), ((100, 70), (32, 16)), ((5, 3), (4, 4))])
def test_round_trip_keeps_retained_blocks_and_zeroes_the_rest(shape, block_size):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    grid = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    mask = torch.rand(grid) < 0.5
    sparse = BlockSparseWeight.from_dense(weight, mask, block_size)
    assert torch.equal(sparse.to_dense(), weight * _expand(mask, block_size, shape))
    assert sparse.values.shape == (int(mask.sum()), *block_size)
    assert sparse.row_ptr.dtype == torch.int64 and sparse.col_idx.dtype == torch.int64
    assert sparse.row_ptr.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    expected_cols = [c for r in range(grid[0]) for c in range(grid[1]) if mask[r, c]]
    assert sparse.col_idx.tolist() == expected_cols


def test_ragged_edge_blocks_are_zero_padded_and_counted_by_true_size():
    weight = torch.ones(40, 20)
    mask = torch.tensor([[False], [True]])  # second block row holds only 8 of its 32 rows
    sparse = BlockSparseWeight.from_dense(weight, mask, 32)
    assert sparse.values.shape == (1, 32, 32)
    assert sparse.values[0, :8, :20].eq(1).all() and sparse.values[0, 8:].eq(0).all()
    assert sparse.values[0, :, 20:].eq(0).all()
    assert sparse.density == pytest.approx(8 * 20 / (40 * 20))


def test_density_and_kernel_index():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    sparse = BlockSparseWeight.from_dense(torch.randn(48, 48), mask, 16)
    assert sparse.density == pytest.approx(5 / 9)
    index = sparse.kernel_index
    assert index.row_order.tolist() == [2, 0, 1]  # longest block row first, empty last
    assert index.block_row.tolist() == [0, 0, 2, 2, 2]
    assert index.col_ptr.tolist() == [0, 2, 3, 5]
    assert index.t_row_idx.tolist() == [0, 2, 2, 0, 2]
    assert sparse.col_idx[index.t_block].tolist() == [0, 0, 1, 2, 2]


def test_mask_of_wrong_shape_is_a_clear_error():
    with pytest.raises(LplError, match=r"block_mask must have shape \(3, 2\)"):
        BlockSparseWeight.from_dense(torch.randn(96, 64), torch.ones(2, 2, dtype=torch.bool), 32)


def test_block_size_not_positive_is_a_clear_error():
    with pytest.raises(LplError, match="positive"):
        BlockSparseWeight.from_dense(torch.randn(8, 8), torch.ones(1, 1, dtype=torch.bool), (0, 8))
    with pytest.raises(LplError, match="positive"):
        BlockSparseWeight.from_dense(torch.randn(8, 8), torch.ones(1, 1, dtype=torch.bool), -4)


def test_zero_in_features_is_a_clear_error():
    # accepted before, and the forward then failed inside torch.reshape
    with pytest.raises(LplError, match="in_features = 0"):
        BlockSparseWeight.from_dense(torch.randn(5, 0), torch.zeros(2, 0, dtype=torch.bool), 4)


def test_integer_weight_is_a_clear_error():
    with pytest.raises(LplError, match="floating-point"):
        BlockSparseWeight.from_dense(torch.ones(8, 8, dtype=torch.int64), torch.ones(1, 1, dtype=torch.bool), 8)
