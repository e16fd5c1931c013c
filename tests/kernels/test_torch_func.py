"""torch.func transforms (vmap, grad, functional_call, jacrev, jvp, jacfwd, hessian) through BlockSparseLinear, against
the masked dense layer and ordinary backward passes, on every path: the CPU kernel, the torch fallback, Triton."""

import contextlib

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

from lpl.kernels import BlockSparseLinear, BlockSparseWeight
from lpl.kernels.ops import triton_on_cpu


@pytest.fixture(params=["kernels.cpu", "torch fallback", "triton"])
def forward_calls(request, triton_device, monkeypatch):
    """Forwards run on this path (Triton: on the GPU where there is one, else interpreted for CPU tensors, see
    conftest.py); the list records each call of the path's forward, so that a test can check the path really ran."""
    from lpl.kernels import ops

    calls = []

    def spy(module, name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: calls.append(name) or original(*args))

    if request.param == "kernels.cpu":
        from lpl.kernels import cpu

        spy(cpu, "block_sparse_linear_cpu")
    elif request.param == "torch fallback":  # what runs where kernels/cpu cannot be imported
        monkeypatch.setattr(ops, "_cpu_module", lambda: None)
        spy(ops, "_reference_dense")
    else:
        from lpl.kernels import triton_ops

        spy(triton_ops, "bsr_linear")
    triton = request.param == "triton"
    # Triton runs CUDA tensors where there is a GPU: the test's nets and inputs are made there (a default device)
    with (triton_on_cpu() if triton and triton_device == "cpu" else contextlib.nullcontext(),
          torch.device("cuda") if triton and triton_device == "cuda" else contextlib.nullcontext()):
        yield calls


def _pair(seed=0):
    """A BlockSparseLinear (16x16 blocks, a pruned block row) in a small net, and the same net with the masked
    nn.Linear instead."""
    torch.manual_seed(seed)
    mask = torch.rand(4, 3) < 0.5
    mask[0, 0], mask[1] = True, False
    sparse = BlockSparseLinear.from_linear(torch.nn.Linear(48, 64), mask, 16)
    dense = torch.nn.Linear(48, 64)
    with torch.no_grad():
        dense.weight.copy_(sparse.sparse_weight().to_dense())
        dense.bias.copy_(sparse.bias)
    head = torch.nn.Linear(64, 5)
    return torch.nn.Sequential(sparse, torch.nn.Tanh(), head), torch.nn.Sequential(dense, torch.nn.Tanh(), head)


def _params(net):
    return {name: p.detach() for name, p in net.named_parameters()}


def test_per_sample_gradients_by_vmap_of_grad_match_a_loop_of_backward_passes(forward_calls, rel_err):
    sparse_net, dense_net = _pair()
    x, y = torch.randn(6, 3, 48), torch.randint(0, 5, (6,))

    def per_sample_grads(net):
        def loss(params, xi, yi):
            return torch.nn.functional.cross_entropy(functional_call(net, params, (xi[None],)).mean(1), yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(_params(net), x, y)

    grads = per_sample_grads(sparse_net)
    assert forward_calls
    for i in range(len(x)):
        sparse_net.zero_grad()
        torch.nn.functional.cross_entropy(sparse_net(x[i:i + 1]).mean(1), y[i:i + 1]).backward()
        for name, param in sparse_net.named_parameters():
            assert rel_err(grads[name][i], param.grad) < 1e-5, name
    dense_grads = per_sample_grads(dense_net)
    mask = sparse_net[0].block_mask
    expected = torch.stack([BlockSparseWeight.from_dense(g, mask, 16).values for g in dense_grads["0.weight"]])
    assert rel_err(grads["0.values"], expected) < 1e-5
    assert rel_err(grads["0.bias"], dense_grads["0.bias"]) < 1e-5


# torch's forward-mode AD loads its decompositions through torch.jit.script at first use, which warns
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_grad_and_jacobians_match_the_masked_dense_layer(forward_calls, rel_err):
    sparse_net, dense_net = _pair(1)
    x = torch.randn(4, 48)
    params, dense_params = _params(sparse_net), _params(dense_net)
    mask = sparse_net[0].block_mask
    forward_calls.clear()

    def loss(net):
        return lambda params: functional_call(net, params, (x,)).square().sum()

    dense_grad = grad(loss(dense_net))(dense_params)["0.weight"]
    assert rel_err(grad(loss(sparse_net))(params)["0.values"],
                   BlockSparseWeight.from_dense(dense_grad, mask, 16).values) < 1e-5
    for jacobian in (jacrev, jacfwd):
        assert rel_err(jacobian(sparse_net)(x), jacobian(dense_net)(x)) < 1e-5
        bias_jacobians = [jacobian(lambda p: functional_call(net, p, (x,)))(p)["0.bias"]
                          for net, p in ((sparse_net, params), (dense_net, dense_params))]
        assert rel_err(*bias_jacobians) < 1e-5
    assert rel_err(hessian(lambda v: sparse_net(v).sum())(x[0]), hessian(lambda v: dense_net(v).sum())(x[0])) < 1e-5
    tangent = torch.randn_like(x)
    assert rel_err(jvp(sparse_net, (x,), (tangent,))[1], jvp(dense_net, (x,), (tangent,))[1]) < 1e-5
    assert forward_calls


def test_vmap_over_inputs_weights_and_a_layer_packed_for_inference(rel_err):
    sparse_net, dense_net = _pair(2)
    x = torch.randn(3, 5, 48)
    assert rel_err(vmap(sparse_net, in_dims=1)(x), vmap(dense_net, in_dims=1)(x)) < 1e-5
    assert rel_err(vmap(vmap(sparse_net))(x), dense_net(x)) < 1e-5
    outputs = []
    for net in (sparse_net, dense_net):  # an ensemble of two weight sets: batched values and bias
        stacked = {name: torch.stack([p, 0.5 * p]) for name, p in _params(net).items()}
        outputs.append(vmap(lambda params, net=net: functional_call(net, params, (x,)))(stacked))
    assert rel_err(*outputs) < 1e-5
    assert rel_err(grad(lambda v: vmap(sparse_net)(v).square().sum())(x),
                   grad(lambda v: vmap(dense_net)(v).square().sum())(x)) < 1e-5
    from lpl.kernels.cpu import compiled_kernel_available

    layer = sparse_net.eval()[0].pack_for_inference()
    assert (layer._inference_pack is not None) == compiled_kernel_available()
    with torch.no_grad():  # the packed forward reads plain tensors: under vmap the layer computes per call
        assert rel_err(vmap(sparse_net)(x), dense_net(x)) < 1e-5


def test_batched_gradients_of_autograd_grad_match_one_backward_per_row(rel_err):
    sparse_net, _ = _pair(3)
    x = torch.randn(4, 48, requires_grad=True)
    out = sparse_net(x)
    grad_outputs = torch.randn(3, *out.shape)
    batched = torch.autograd.grad(out, (x, sparse_net[0].values), grad_outputs, is_grads_batched=True,
                                  retain_graph=True)
    for i, grad_output in enumerate(grad_outputs):
        single = torch.autograd.grad(out, (x, sparse_net[0].values), grad_output, retain_graph=True)
        assert all(rel_err(b[i], s) < 1e-5 for b, s in zip(batched, single))


def test_plain_eager_calls_keep_the_lighter_autograd_function():
    """The setup_context-style Function binds every call's arguments through inspect.signature (~70 us): only
    transforms and forward-mode AD use it."""
    sparse_net, _ = _pair(4)
    out = sparse_net[0](torch.randn(2, 48))
    (node, _), = out.grad_fn.next_functions  # under the reshape back to x's leading dims
    assert type(node).__name__ == "_BlockSparseLinearFunctionBackward"
