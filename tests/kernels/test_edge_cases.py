"""Edge cases of BlockSparseLinear: samples with zero rows under torch.func transforms, packed CPU inference kept
through moves that move nothing (Lightning's model.to(device)), layers built on the meta device, densities without
elements, and optimizers holding state of a block pattern that load_state_dict replaced."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, vmap

from lpl.kernels import BlockSparseLinear, BlockSparseWeight, pack_for_inference
from lpl.utils.errors import LplError


def _sparse_and_dense(seed=0, dtype=torch.float32):
    """A BlockSparseLinear 64 -> 32 with 16x16 blocks (one pruned), and the nn.Linear holding its masked weight."""
    torch.manual_seed(seed)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    sparse = BlockSparseLinear.from_linear(nn.Linear(64, 32), mask, 16).to(dtype)
    dense = nn.Linear(64, 32).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(sparse.sparse_weight().to_dense())
        dense.bias.copy_(sparse.bias)
    return sparse, dense


# ---- 1. torch.func transforms on samples without rows ---------------------------------------------------------------
@pytest.mark.parametrize("cpu_path", [True, False], ids=["kernels.cpu", "torch fallback"])
def test_transforms_over_samples_without_rows_give_what_nn_linear_gives(cpu_path, monkeypatch):
    from lpl.kernels import ops

    if not cpu_path:
        monkeypatch.setattr(ops, "_cpu_module", lambda: None)
    sparse, dense = _sparse_and_dense()
    for x in (torch.randn(4, 0, 64), torch.randn(0, 5, 64), torch.randn(0, 64)):  # rows 0, samples 0
        expected = vmap(dense)(x)
        out = vmap(sparse)(x)
        assert out.shape == expected.shape and torch.equal(out, expected)
    x = torch.randn(0, 64)
    assert jacfwd(sparse)(x).shape == jacfwd(dense)(x).shape == (0, 32, 0, 64)

    def loss(module):
        return lambda params, sample: functional_call(module, params, (sample,)).pow(2).sum()

    # per-sample gradients of samples with zero rows: zero, of the parameters' shapes
    params = {name: p.detach() for name, p in sparse.named_parameters()}
    grads = vmap(grad(loss(sparse)), in_dims=(None, 0))(params, torch.randn(3, 0, 64))
    assert grads["values"].shape == (3, *sparse.values.shape) and not grads["values"].any()
    assert grads["bias"].shape == (3, 32) and not grads["bias"].any()


# ---- 2. the inference pack through moves ---------------------------------------------------------------------------
@pytest.fixture
def packed_calls(monkeypatch):
    """Counts forwards served by the packed weight (skips where there is no compiled kernel, hence no packing)."""
    from lpl.kernels import module
    from lpl.kernels.cpu import compiled_kernel_available

    if not compiled_kernel_available():
        pytest.skip("no compiled CPU kernel: pack_for_inference does nothing here")
    calls = []
    original = module.BlockSparseLinear._packed_forward

    def counting(self, x, packed):
        calls.append(self)
        return original(self, x, packed)

    monkeypatch.setattr(module.BlockSparseLinear, "_packed_forward", counting)
    return calls


def test_a_move_that_moves_nothing_keeps_the_pack(packed_calls):
    sparse, _ = _sparse_and_dense()
    sparse.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = sparse(x)
    model = nn.Sequential(sparse)
    moves = [lambda: sparse.to("cpu"), lambda: sparse.float(), lambda: sparse.cpu(), lambda: sparse.to(torch.float32),
             lambda: model.to(torch.device("cpu")), lambda: model.to("cpu", torch.float32), lambda: model.eval()]
    for move in moves:
        pack_for_inference(model)
        packed_calls.clear()
        move()
        assert sparse._inference_pack is not None
        with torch.inference_mode():
            assert torch.equal(sparse(x), expected)
        assert packed_calls == [sparse]
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # new Parameter objects, the same tensors
    try:
        pack_for_inference(model).to("cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert sparse._inference_pack is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_real_dtype_change_drops_the_pack_and_packing_again_serves_the_new_weights(dtype, packed_calls, rel_err):
    import copy

    sparse, _ = _sparse_and_dense(1)
    sparse.eval()
    reference = copy.deepcopy(sparse)  # never packed: the per-call path
    x = torch.randn(5, 64)
    pack_for_inference(sparse).to(dtype)
    reference.to(dtype)
    assert sparse._inference_pack is None
    with torch.inference_mode():
        expected = reference(x.to(dtype))
        assert torch.equal(sparse(x.to(dtype)), expected) and not packed_calls
        pack_for_inference(sparse)  # float64 has no packed path: nothing is packed
        out = sparse(x.to(dtype))
    assert out.dtype == dtype and rel_err(out, expected) < 1e-2
    assert len(packed_calls) == (dtype != torch.float64)
    # there and back: float32 again, but the values are another tensor (rounded): not the one packed
    packed_calls.clear()
    sparse.float().pack_for_inference()
    reference.float()
    sparse.to(dtype).float()
    reference.to(dtype).float()
    assert sparse._inference_pack is None
    with torch.inference_mode():
        assert torch.equal(sparse(x), reference(x)) and not packed_calls


def test_an_in_place_change_made_by_a_move_drops_the_pack(packed_calls):
    sparse, _ = _sparse_and_dense(2)
    pack_for_inference(sparse.eval())
    sparse._apply(lambda t: t.mul_(2.0) if t.is_floating_point() else t)  # same tensors, new contents
    assert sparse._inference_pack is None
    with torch.inference_mode():
        sparse(torch.randn(2, 64))
    assert not packed_calls


def test_lightning_predict_runs_the_packed_layer(packed_calls, tmp_path):
    """Lightning moves the model to its device before predict/validate/test (a move that moves nothing on CPU)."""
    import warnings

    import lightning as L

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = _sparse_and_dense(3)[0]

        def forward(self, x):
            return self.fc(x)

        def predict_step(self, batch, batch_idx):
            return self(batch)

    net = pack_for_inference(Net().eval())
    data = torch.randn(8, 64)
    with torch.inference_mode():
        expected = net.fc.sparse_weight().to_dense() @ data.T
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (workers, litlogger)
        outputs = trainer.predict(net, torch.utils.data.DataLoader(data, batch_size=4))
    assert packed_calls == [net.fc, net.fc]  # both batches ran the packed weight
    out = torch.cat(outputs)
    assert torch.allclose(out, expected.T + net.fc.bias.detach(), atol=1e-5)


# ---- 5. meta device, densities, optimizers ------------------------------------------------------------------------
def _masked_pair():
    torch.manual_seed(4)
    mask = torch.rand(8, 8) < 0.5
    mask[0, 0] = True
    linear = nn.Linear(128, 128)
    with torch.no_grad():  # the masked dense (fine-tuned) model
        linear.weight.mul_(mask.repeat_interleave(16, 0).repeat_interleave(16, 1))
    return mask, linear


def test_a_meta_layer_keeps_its_given_mask_through_to_empty_and_takes_the_masked_dense_checkpoint():
    mask, linear = _masked_pair()
    reference = BlockSparseLinear.from_linear(linear, mask, 16)
    x = torch.randn(4, 128)
    with torch.device("meta"):
        layer = BlockSparseLinear(128, 128, 16, block_mask=mask)
    layer.to_empty(device="cpu")
    assert torch.equal(layer.block_mask, mask) and layer.geometry.tolist() == [128, 128, 16, 16]
    assert torch.equal(layer.row_ptr, reference.row_ptr) and torch.equal(layer.col_idx, reference.col_idx)
    layer.load_state_dict(linear.state_dict())
    assert torch.allclose(layer(x), linear(x), atol=1e-5)
    with torch.device("meta"):  # or straight from the meta device
        unbuilt = BlockSparseLinear(128, 128, 16, block_mask=mask)
    unbuilt.load_state_dict(linear.state_dict(), assign=True)
    assert all(not t.is_meta for t in unbuilt.state_dict().values())
    assert torch.allclose(unbuilt(x), linear(x), atol=1e-5) and torch.equal(unbuilt.block_mask, mask)
    with torch.device("meta"):  # its density too (not torch's NotImplementedError)
        assert BlockSparseLinear(128, 128, 16, block_mask=mask).density == pytest.approx(reference.density)


def test_a_meta_layer_without_a_mask_says_so_and_takes_its_pattern_from_the_checkpoint():
    mask, linear = _masked_pair()
    source = BlockSparseLinear.from_linear(linear, mask, 16)
    with torch.device("meta"):
        layer = BlockSparseLinear(128, 128, 16)
    with pytest.raises(LplError, match="built on the meta device without a block_mask"):
        _ = layer.density
    layer.to_empty(device="cpu")
    with pytest.raises(LplError, match="built on the meta device without a block_mask"):
        _ = layer.density
    with pytest.raises(LplError, match="built on the meta device without a block_mask"):
        layer.load_state_dict(linear.state_dict())
    layer.load_state_dict(source.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), source(x)) and layer.density == source.density
    assert layer.geometry.tolist() == [128, 128, 16, 16]


def test_density_is_defined_without_elements_and_for_a_mask_on_the_meta_device():
    empty = BlockSparseWeight.from_dense(torch.zeros(0, 40), torch.zeros(0, 3, dtype=torch.bool), 16)
    assert empty.density == 1.0  # nothing is pruned (as for a layer keeping every block), not NaN
    weight = BlockSparseWeight.from_dense(torch.randn(32, 32), torch.ones(2, 2, dtype=torch.bool), 16)
    weight.block_mask = weight.block_mask.to("meta")
    with pytest.raises(LplError, match="meta device"):
        _ = weight.density


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_an_optimizer_holding_state_of_the_replaced_pattern_is_refused_at_its_next_step(optimizer):
    torch.manual_seed(5)
    layer = BlockSparseLinear(50, 70, 16)

    def make():
        if optimizer == "adam":
            return torch.optim.Adam(layer.parameters())
        return torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)

    def step(opt):
        opt.zero_grad()
        layer(torch.randn(2, 50)).sum().backward()
        opt.step()

    old = make()
    step(old)
    saved_optimizer = old.state_dict()
    other = BlockSparseLinear.from_linear(nn.Linear(50, 70), torch.rand(5, 4) < 0.5, 16)
    layer.load_state_dict(other.state_dict())  # adopts the other mask: values change shape
    stale_grad = layer.values.grad
    x = torch.randn(3, 50)
    assert torch.equal(layer(x), other(x))
    with pytest.raises(LplError, match="build the optimizer again"):
        step(old)
    assert stale_grad is None  # a gradient of the old pattern (another shape) is not kept
    step(make())  # a new optimizer: fine
    layer.load_state_dict(BlockSparseLinear(50, 70, 16).state_dict())  # back to the first pattern (and shape)
    reloaded = make()
    reloaded.load_state_dict(saved_optimizer)
    step(reloaded)  # state of the current shape: fine


def test_a_layer_that_adopted_another_mask_still_converts_in_swap_mode():
    """The watch on reshaped layers holds no weak reference to ``values``: torch refuses to swap such a tensor."""
    layer = BlockSparseLinear(50, 70, 16)
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    other = BlockSparseLinear.from_linear(nn.Linear(50, 70), mask, 16)
    layer.load_state_dict(other.state_dict())  # values change shape: the layer is watched
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    x = torch.randn(3, 50, dtype=torch.float64)
    torch.testing.assert_close(layer(x), other.double()(x))
