"""Triton kernels against dense masked matmul (float64 reference).

Without a GPU they run under TRITON_INTERPRET=1 (set in conftest.py); shapes stay tiny since the interpreter runs
every program in Python. On a GPU the same tests run compiled (benchmarks/gpu_check.sh).
"""

import pytest
import torch

from lpl.kernels import BlockSparseWeight, block_sparse_linear
from lpl.kernels.ops import triton_on_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_mask(shape, block_size, density, generator):
    """A random block mask for a weight of ``shape`` (ragged edge blocks included)."""
    grid = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    return torch.rand(grid, generator=generator) < density


def _case(shape, block_size, mask, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    sparse = BlockSparseWeight.from_dense(weight, mask, block_size).to(device=device, dtype=dtype)
    return sparse, generator


ORIENTATIONS = {
    "plain": {"BLOCK_M": 32, "SEGS": 2, "GROUP_M": 2, "SWAP_AB": False},
    "swapped": {"BLOCK_M": 32, "SEGS": 1, "GROUP_M": 2, "SWAP_AB": True},
}
if torch.cuda.is_available():
    ORIENTATIONS["autotuned"] = None


@pytest.fixture(autouse=True, params=list(ORIENTATIONS))
def _triton_kernel_config(request, triton_device, monkeypatch):
    """Every test runs forward and backward through the Triton kernels (interpreted for CPU tensors), once per
    tile orientation (and, on a GPU, once autotuned)."""
    from lpl.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "fixed_config", ORIENTATIONS[request.param])
    if triton_device == "cpu":
        with triton_on_cpu():
            yield
    else:
        yield


def _masks(grid, generator):
    rows, cols = grid
    random = torch.rand(grid, generator=generator) < 0.5
    random[0] = False  # an empty block row
    ragged_rows = torch.zeros(grid, dtype=torch.bool)
    for r in range(rows):
        ragged_rows[r, : (r * 2) % (cols + 1)] = True  # rows of very different lengths
    return {
        "random_with_empty_row": random,
        "all_zero": torch.zeros(grid, dtype=torch.bool),
        "dense": torch.ones(grid, dtype=torch.bool),
        "ragged_rows": ragged_rows,
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_dense_masked_matmul(dtype, triton_device, rel_err, tolerance):
    shape, block_size = (100, 70), (32, 32)  # ragged: neither dimension is a multiple of the block
    generator = torch.Generator().manual_seed(1)
    for name, mask in _masks((4, 3), generator).items():
        sparse, _ = _case(shape, block_size, mask, dtype, triton_device, seed=2)
        x = torch.randn(3, 13, shape[1], generator=generator).to(triton_device, dtype)  # leading batch dims
        bias = torch.randn(shape[0], generator=generator).to(triton_device, dtype)
        out = block_sparse_linear(x, sparse, bias)
        ref = x.double() @ sparse.to_dense().double().T + bias.double()
        assert out.shape == (3, 13, shape[0]) and out.dtype == dtype
        assert torch.isfinite(out).all(), name
        assert rel_err(out, ref) < tolerance[dtype], name


@pytest.mark.parametrize("block_size", [(32, 64), (64, 32), (16, 16)])
def test_forward_rectangular_and_small_blocks(block_size, triton_device, rel_err, tolerance):
    shape = (96, 80)
    generator = torch.Generator().manual_seed(3)
    mask = _random_mask(shape, block_size, 0.6, generator)
    sparse, _ = _case(shape, block_size, mask, torch.float32, triton_device, seed=4)
    x = torch.randn(40, shape[1], generator=generator).to(triton_device)
    out = block_sparse_linear(x, sparse, None)
    ref = x.double() @ sparse.to_dense().double().T
    assert rel_err(out, ref) < tolerance[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dx_through_sparse_weight_and_dw_only_at_retained_blocks(dtype, triton_device, rel_err, tolerance):
    shape, block_size = (70, 100), (32, 32)
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 4, generator=generator) < 0.5
    mask[1] = False
    mask[:, 2] = False  # an empty block column too
    mask[0, 0] = True
    sparse, _ = _case(shape, block_size, mask, dtype, triton_device, seed=6)
    values = sparse.values.clone().requires_grad_(True)
    sparse.values = values
    x = torch.randn(2, 19, shape[1], generator=generator).to(triton_device, dtype).requires_grad_(True)
    bias = torch.randn(shape[0], generator=generator).to(triton_device, dtype).requires_grad_(True)
    grad_out = torch.randn(2, 19, shape[0], generator=generator).to(triton_device, dtype)
    block_sparse_linear(x, sparse, bias).backward(grad_out)

    dense = sparse.to_dense().double().detach()
    dy, xd = grad_out.double().reshape(-1, shape[0]), x.detach().double().reshape(-1, shape[1])
    ref_dx = (dy @ dense).reshape(x.shape)
    full_dw = dy.T @ xd
    ref_dvalues = BlockSparseWeight.from_dense(full_dw, mask, block_size).values
    assert rel_err(x.grad, ref_dx) < tolerance[dtype]
    assert rel_err(values.grad, ref_dvalues) < tolerance[dtype]
    assert rel_err(bias.grad, dy.sum(0)) < tolerance[dtype]
    # ragged padding of the last block column (100 = 3*32 + 4) never receives gradient
    last_col = sparse.col_idx.cpu() == 3
    assert values.grad[last_col][:, :, 4:].eq(0).all()
    last_row = sparse.kernel_index.block_row.cpu() == 2
    assert values.grad[last_row][:, 6:, :].eq(0).all()


def test_the_triton_kernels_are_the_ones_running(triton_device, monkeypatch):
    from lpl.kernels import triton_ops

    calls = []
    for name in ("bsr_linear", "bsr_grad_input", "bsr_grad_values"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    sparse, _ = _case((64, 64), (32, 32), torch.tensor([[True, False], [True, True]]), torch.float32, triton_device, 9)
    sparse.values.requires_grad_(True)
    x = torch.randn(8, 64, device=triton_device, requires_grad=True)
    block_sparse_linear(x, sparse, None).sum().backward()
    assert sorted(calls) == ["bsr_grad_input", "bsr_grad_values", "bsr_linear"]


def test_many_tokens_and_grouped_launch_order(triton_device, rel_err, tolerance):
    """More token tiles than one launch group, several block rows per program: every output element written."""
    shape, block_size = (160, 64), (32, 32)
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(5, 2, generator=generator) < 0.7
    sparse, _ = _case(shape, block_size, mask, torch.float32, triton_device, seed=8)
    x = torch.randn(161, shape[1], generator=generator).to(triton_device)
    out = block_sparse_linear(x, sparse, None)
    ref = x.double() @ sparse.to_dense().double().T
    assert rel_err(out, ref) < tolerance[torch.float32]


@pytest.mark.parametrize("block_size", [(12, 12), (8, 24), (8, 8), (1, 16)])
def test_block_sizes_the_kernels_do_not_take_run_dense_with_a_warning(block_size, triton_device, rel_err, tolerance):
    """Triton tiles need power-of-two sides of 16 or more: other sizes give right results (dense), and say so."""
    shape = (40, 50)
    mask = _random_mask(shape, block_size, 0.5, torch.Generator().manual_seed(11))
    sparse, generator = _case(shape, block_size, mask, torch.float32, triton_device, seed=11)
    x = torch.randn(5, shape[1], generator=generator).to(triton_device).requires_grad_()
    with pytest.warns(UserWarning, match="power-of-two block sides"):
        out = block_sparse_linear(x, sparse, None)
        out.sum().backward()
    dense = sparse.to_dense().double()
    assert rel_err(out, x.double() @ dense.T) < tolerance[torch.float32]
    assert rel_err(x.grad, torch.ones(5, shape[0], dtype=torch.float64, device=dense.device) @ dense) < tolerance[
        torch.float32]


def test_strided_bias_values_and_index_tensors(triton_device, rel_err, tolerance):
    """The kernels index bias, values and the index tensors as contiguous: views with other strides (a bias column
    of a bigger tensor, an expanded bias, transposed-stored blocks, strided index views) are copied before launch."""
    shape, block_size = (32, 32), (16, 16)
    generator = torch.Generator().manual_seed(13)
    mask = torch.tensor([[True, False], [True, True]])
    sparse, _ = _case(shape, block_size, mask, torch.float32, triton_device, seed=13)
    values = sparse.values.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_(True)
    row_ptr = torch.stack([sparse.row_ptr, torch.full_like(sparse.row_ptr, 5)], 1)[:, 0]
    col_idx = torch.stack([sparse.col_idx, torch.full_like(sparse.col_idx, 7)], 1)[:, 0]
    strided = BlockSparseWeight(row_ptr, col_idx, values, sparse.shape, block_size, sparse.block_mask)
    assert not (values.is_contiguous() or row_ptr.is_contiguous() or col_idx.is_contiguous())
    x = torch.randn(5, shape[1], generator=generator).to(triton_device).requires_grad_(True)
    grad_out = torch.randn(5, shape[0], generator=generator).to(triton_device)
    dense = sparse.to_dense().double()
    for bias in (torch.randn(2 * shape[0], generator=generator).to(triton_device)[::2],
                 torch.tensor([0.5], device=triton_device).expand(shape[0])):
        x.grad = values.grad = None
        out = block_sparse_linear(x, strided, bias)
        out.backward(grad_out)
        assert rel_err(out, x.double() @ dense.T + bias.double()) < tolerance[torch.float32]
        dy = grad_out.double()
        assert rel_err(x.grad, dy @ dense) < tolerance[torch.float32]
        ref_dvalues = BlockSparseWeight.from_dense(dy.T @ x.detach().double(), mask, block_size).values
        assert rel_err(values.grad, ref_dvalues) < tolerance[torch.float32]


def test_a_layer_without_outputs_gives_zero_input_gradients(triton_device):
    sparse = BlockSparseWeight.from_dense(torch.randn(0, 40), torch.zeros(0, 3, dtype=torch.bool), 16).to(triton_device)
    x = torch.randn(5, 40, device=triton_device, requires_grad=True)
    out = block_sparse_linear(x, sparse)
    out.sum().backward()  # the backward's launch divided by its zero-length sum
    assert out.shape == (5, 0) and torch.equal(x.grad, torch.zeros_like(x))


def _inconsistent(sparse):
    wrong_col = sparse.col_idx.clone()
    wrong_col[1] = 1000
    structure = dict(row_ptr=sparse.row_ptr, col_idx=sparse.col_idx, values=sparse.values, shape=sparse.shape,
                     block_size=sparse.block_size, block_mask=sparse.block_mask)
    return {
        "values of too few blocks": ({**structure, "values": sparse.values[:2]}, r"values must have shape"),
        "col_idx past the last block column": ({**structure, "col_idx": wrong_col}, r"col_idx must lie in \[0, 4\)"),
        "shape with more rows than the structure": ({**structure, "shape": (96, 64)},
                                                    r"does not fit its shape \(96, 64\)"),
    }


@pytest.mark.parametrize("case", ["values of too few blocks", "col_idx past the last block column",
                                  "shape with more rows than the structure"])
def test_a_weight_whose_structure_is_inconsistent_is_refused_before_any_launch(case, triton_device):
    """A GPU kernel launched on it would read out of bounds or return unwritten outputs (hand-built weights,
    torch.func.functional_call with other values)."""
    from lpl.utils.errors import LplError

    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.7
    sparse, _ = _case((64, 64), (16, 16), mask, torch.float32, triton_device, seed=0)
    fields, message = _inconsistent(sparse)[case]
    with pytest.raises(LplError, match=message):
        block_sparse_linear(torch.randn(4, 64, device=triton_device), BlockSparseWeight(**fields))
