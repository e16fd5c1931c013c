"""Dispatch (CPU tensors -> CPU path), autograd, torch.compile and input checks of block_sparse_linear."""

import pytest
import torch

from lpl.kernels import BlockSparseLinear, BlockSparseWeight, block_sparse_linear
from lpl.utils.errors import LplError


def _weight(shape=(100, 70), block_size=(32, 16), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    grid = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    mask = torch.rand(grid, generator=generator) < 0.5
    mask[1] = False
    return BlockSparseWeight.from_dense(torch.randn(shape, generator=generator), mask, block_size).to(dtype=dtype)


@pytest.mark.parametrize("cpu_path", ["kernels.cpu", "torch fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_and_backward_match_dense_masked_matmul(dtype, cpu_path, rel_err, tolerance, monkeypatch):
    from lpl.kernels import ops

    if cpu_path == "torch fallback":  # what runs where kernels/cpu cannot be imported
        monkeypatch.setattr(ops, "_cpu_module", lambda: None)
    sparse = _weight(dtype=dtype)
    values = sparse.values.clone().requires_grad_(True)
    sparse.values = values
    x = torch.randn(2, 9, 70).to(dtype).requires_grad_(True)
    bias = torch.randn(100).to(dtype).requires_grad_(True)
    out = block_sparse_linear(x, sparse, bias)
    dense = sparse.to_dense().detach().double()
    assert rel_err(out, x.double() @ dense.T + bias.double()) < tolerance[dtype]
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    dy, xd = grad_out.double().reshape(-1, 100), x.detach().double().reshape(-1, 70)
    assert rel_err(x.grad, (dy @ dense).reshape(x.shape)) < tolerance[dtype]
    ref_dvalues = BlockSparseWeight.from_dense(dy.T @ xd, sparse.block_mask, sparse.block_size).values
    assert rel_err(values.grad, ref_dvalues) < tolerance[dtype]
    assert rel_err(bias.grad, dy.sum(0)) < tolerance[dtype]


def test_custom_op_passes_torch_library_opcheck():
    sparse = _weight()
    index = sparse.kernel_index
    args = (torch.randn(5, 70, requires_grad=True), sparse.values.clone().requires_grad_(True), sparse.row_ptr,
            sparse.col_idx, index.row_order, index.block_row, index.col_ptr, index.t_row_idx, index.t_block,
            index.col_order, torch.randn(100, requires_grad=True), 100)
    torch.library.opcheck(torch.ops.lpl.block_sparse_linear.default, args)


def test_torch_compile_fullgraph_matches_eager(rel_err):
    torch.manual_seed(0)
    layer = BlockSparseLinear.from_linear(torch.nn.Linear(64, 96), torch.rand(3, 2) < 0.6, 32)
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(4, 7, 64, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    eager_dx, eager_dv = x.grad.clone(), layer.values.grad.clone()
    x.grad = None
    layer.values.grad = None
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(str(graph_module.code))
        return graph_module.forward

    torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert any("torch.ops.lpl.block_sparse_linear" in code for code in graphs)  # one opaque custom-op node
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert rel_err(out, eager) < 1e-6
    assert rel_err(x.grad, eager_dx) < 1e-6 and rel_err(layer.values.grad, eager_dv) < 1e-6


def test_non_float_input_is_a_clear_error():
    with pytest.raises(LplError, match="dtype torch.int64"):
        block_sparse_linear(torch.ones(3, 70, dtype=torch.int64), _weight())


def test_last_dim_not_matching_in_features_is_a_clear_error():
    with pytest.raises(LplError, match="in_features=70"):
        block_sparse_linear(torch.randn(3, 71), _weight())


def test_device_mismatch_is_a_clear_error():
    with pytest.raises(LplError, match="move both to one device"):
        block_sparse_linear(torch.randn(3, 70, device="meta"), _weight())


def test_dtype_mismatch_is_a_clear_error():
    with pytest.raises(LplError, match="cast one of them"):
        block_sparse_linear(torch.randn(3, 70, dtype=torch.float16), _weight())


def test_bias_of_wrong_shape_is_a_clear_error():
    with pytest.raises(LplError, match=r"bias must be a float tensor of shape \(100,\)"):
        block_sparse_linear(torch.randn(3, 70), _weight(), torch.randn(99))


def test_second_derivatives_match_the_dense_masked_layer(rel_err):
    """create_graph=True backward is differentiable: a gradient penalty and a Hessian-vector product through the
    block-sparse layer equal those of nn.Linear holding the same (masked) weight."""
    sparse = _weight()
    values = sparse.values.clone().requires_grad_(True)
    sparse.values = values
    dense = sparse.to_dense().detach().clone().requires_grad_(True)
    x = torch.randn(6, 70, requires_grad=True)

    def penalised(out):
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return out.sum() + grad_x.square().sum()

    penalised(block_sparse_linear(x, sparse)).backward()
    sparse_grads = values.grad.clone(), x.grad.clone()
    x.grad = None
    penalised(torch.nn.functional.linear(x, dense)).backward()
    expected_values = BlockSparseWeight.from_dense(dense.grad, sparse.block_mask, sparse.block_size).values
    assert rel_err(sparse_grads[0], expected_values) < 1e-5
    assert rel_err(sparse_grads[1], x.grad) < 1e-5


def test_float64_runs_and_passes_gradcheck():
    sparse = _weight(shape=(20, 12), block_size=(8, 8), dtype=torch.float64)
    sparse.values.requires_grad_(True)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    out = block_sparse_linear(x, sparse, bias)
    assert out.dtype == torch.float64
    assert torch.allclose(out, x @ sparse.to_dense().T + bias, atol=1e-12)

    def apply(x, values, bias):
        return block_sparse_linear(x, BlockSparseWeight(sparse.row_ptr, sparse.col_idx, values, sparse.shape,
                                                        sparse.block_size, sparse.block_mask), bias)

    assert torch.autograd.gradcheck(apply, (x, sparse.values, bias))


def test_autocast_casts_inputs_as_it_casts_f_linear():
    sparse, x = _weight(), torch.randn(4, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_sparse_linear(x, sparse)
        reference = torch.nn.functional.linear(x, sparse.to_dense())
    assert out.dtype == reference.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference.float(), rtol=2e-2, atol=5e-2)


def test_weight_gradient_is_bitwise_reproducible_with_two_threads():
    """dW's token tiles are dealt to threads statically: repeated calls sum in the same order (as dense matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sparse = _weight(shape=(192, 192), block_size=(16, 16))
        sparse.values.requires_grad_(True)
        x = torch.randn(4096, 192)
        grads = set()
        for _ in range(20):
            sparse.values.grad = None
            block_sparse_linear(x, sparse).square().sum().backward()
            grads.add(sparse.values.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
