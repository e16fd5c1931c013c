"""BlockSparseLinear: equivalence with the masked nn.Linear, safetensors state dicts, clear errors."""

import pytest
import torch
from safetensors.torch import load_file

from lpl.kernels import BlockSparseLinear
from lpl.utils.errors import LplError
from lpl.utils.io import save_safetensors_atomic


def _masked_linear(seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(70, 100)
    mask = torch.rand(4, 3) < 0.5
    mask[0, 0] = True
    return linear, mask


def test_from_linear_computes_the_block_masked_linear(rel_err):
    linear, mask = _masked_linear()
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :70]
    x = torch.randn(3, 5, 70)
    ref = torch.nn.functional.linear(x.double(), linear.weight.double() * expanded, linear.bias.double())
    assert rel_err(layer(x), ref) < 1e-5
    assert layer.density == pytest.approx(float((expanded.sum() / expanded.numel())))


def test_weight_reads_as_the_masked_dense_weight_and_carries_gradients_to_the_blocks():
    """Model code reads a Linear's ``weight`` (timm's ConViT asks its device): the layer answers with the masked
    dense matrix, built from the blocks it holds now."""
    linear, mask = _masked_linear(3)
    layer = BlockSparseLinear.from_linear(linear, mask, 32).double()
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :70]
    weight = layer.weight
    assert weight.shape == (100, 70) and weight.dtype == torch.float64 and weight.device == layer.values.device
    assert torch.equal(weight, linear.weight.double().detach() * expanded)
    probe = torch.randn(100, 70, dtype=torch.float64)
    (weight * probe).sum().backward()
    assert torch.equal(layer.values.grad, _blocks_of(probe, mask))  # the retained blocks' share of it
    with torch.no_grad():
        layer.values.add_(1.0)
    assert torch.equal(layer.weight, (linear.weight.double().detach() + 1.0) * expanded)  # follows the values
    with pytest.raises(LplError, match="weight is the dense view of its blocks and cannot be set"):
        layer.weight = torch.nn.Parameter(torch.zeros(100, 70))


def _blocks_of(dense, mask, size=32):
    """The [nnz, size, size] blocks of ``dense`` where ``mask`` is True (zero-padded at ragged edges), row-major."""
    rows, cols = mask.shape
    padded = dense.new_zeros(rows * size, cols * size)
    padded[: dense.shape[0], : dense.shape[1]] = dense
    return padded.reshape(rows, size, cols, size).permute(0, 2, 1, 3)[mask]


def test_gradients_reach_only_retained_blocks_and_training_step_works():
    linear, mask = _masked_linear(1)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.sparse_weight().to_dense().detach().clone()
    layer(torch.randn(8, 70)).pow(2).mean().backward()
    optimizer.step()
    after = layer.sparse_weight().to_dense().detach()
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :70]
    assert torch.equal(after[~expanded], before[~expanded])  # pruned blocks stay exactly zero
    assert (after[expanded] != before[expanded]).any()


def test_state_dict_is_plain_tensors_and_round_trips_through_safetensors(tmp_path):
    linear, mask = _masked_linear(2)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    state = layer.state_dict()
    assert set(state) == {"values", "bias", "geometry", "block_mask", "row_ptr", "col_idx"}
    assert all(type(t) is torch.Tensor for t in state.values())
    save_safetensors_atomic(state, tmp_path / "layer.safetensors")
    fresh = BlockSparseLinear(70, 100, 32)  # dense mask: the checkpoint's pattern is adopted on load
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh.block_mask, mask)
    x = torch.randn(4, 70)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_of_another_shape_is_a_clear_error():
    linear, mask = _masked_linear(3)
    state = BlockSparseLinear.from_linear(linear, mask, 32).state_dict()
    with pytest.raises(LplError, match=r"100x70 \(blocks 32x32\) block-sparse layer, but this layer is 100x64"):
        BlockSparseLinear(64, 100, 32).load_state_dict(state)
    with pytest.raises(LplError, match="another layer shape or block size"):
        BlockSparseLinear(70, 100, 16).load_state_dict({k: v for k, v in state.items() if k != "geometry"})


def test_block_size_not_positive_is_a_clear_error():
    with pytest.raises(LplError, match="positive"):
        BlockSparseLinear(70, 100, (32, 0))


def test_autocast_runs_in_the_autocast_dtype():
    linear, mask = _masked_linear(4)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 70))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_layer_built_on_the_meta_device_takes_its_weights_from_a_state_dict(with_mask):
    """Build without memory, then load (assign=True, or to_empty + load): the checkpoint's pattern and values."""
    linear, mask = _masked_linear(4)
    source = BlockSparseLinear.from_linear(linear, mask, 32)
    x = torch.randn(3, 70)
    for assign in (True, False):
        with torch.device("meta"):
            layer = BlockSparseLinear(70, 100, 32, block_mask=mask if with_mask else None)
        assert layer.values.is_meta
        if not assign:
            layer = layer.to_empty(device="cpu")
        layer.load_state_dict(source.state_dict(), assign=assign)
        assert torch.equal(layer.block_mask.cpu(), mask) and torch.equal(layer(x), source(x))


def test_a_state_dict_whose_index_contradicts_its_mask_is_refused():
    linear, mask = _masked_linear(5)
    state = BlockSparseLinear.from_linear(linear, mask, 32).state_dict()
    state["col_idx"] = state["col_idx"].flip(0)
    for target in (BlockSparseLinear(70, 100, 32, block_mask=mask), BlockSparseLinear(70, 100, 32)):
        with pytest.raises(LplError, match="col_idx does not match its block_mask"):
            target.load_state_dict(state)


@pytest.mark.parametrize("damage", ["col_idx", "values"])
def test_a_refused_state_dict_leaves_the_layer_unchanged(damage, rel_err):
    linear, mask = _masked_linear(5)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = BlockSparseLinear.from_linear(linear, ~mask, 32).state_dict()  # another pattern: adopted on load
    if damage == "col_idx":
        state["col_idx"] = state["col_idx"].flip(0)
    else:
        state["values"] = state["values"][1:]
    with pytest.raises(LplError, match="col_idx does not match" if damage == "col_idx" else "values of shape"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    x = torch.randn(3, 70)
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :70]
    ref = torch.nn.functional.linear(x.double(), linear.weight.double() * expanded, linear.bias.double())
    assert rel_err(layer(x), ref) < 1e-5


def test_a_frozen_linear_stays_frozen():
    linear, mask = _masked_linear(6)
    linear.requires_grad_(False)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    assert not layer.values.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("update", ["fused_adam", "data"])
def test_every_forward_sees_the_current_weights(rel_err, update):
    """Weights can change without a version-counter bump (torch's fused Adam, writes through .data): every forward
    (training, no_grad evaluation, inference_mode) must compute with the values as they are now."""
    linear, mask = _masked_linear(2)
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05, fused=True) if update == "fused_adam" else None
    x = torch.randn(6, 70)

    def reference():
        return torch.nn.functional.linear(x.double(), layer.sparse_weight().to_dense().detach().double(),
                                          layer.bias.detach().double())

    for _ in range(3):
        with torch.no_grad():
            assert rel_err(layer(x), reference()) < 1e-5
        with torch.inference_mode():
            assert rel_err(layer(x), reference()) < 1e-5
        out = layer(x)
        assert rel_err(out, reference()) < 1e-5
        if optimizer is not None:
            optimizer.zero_grad()
            out.pow(2).mean().backward()
            optimizer.step()
        else:
            layer.values.data.mul_(1.5)


def test_a_weight_packed_for_inference_gives_the_same_outputs_until_it_changes(rel_err, tmp_path):
    from lpl.kernels import pack_for_inference
    from lpl.kernels.cpu import compiled_kernel_available

    linear, mask = _masked_linear(3)
    layer = BlockSparseLinear.from_linear(linear, mask, 32).eval()
    x = torch.randn(2, 3, 70)
    with torch.no_grad():
        expected = layer(x)
    pack_for_inference(torch.nn.Sequential(layer))
    if not compiled_kernel_available():
        assert layer._inference_pack is None
        return
    assert layer._inference_pack is not None
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    assert layer._inference_pack is not None
    out = layer(x)  # gradients recorded: the per-call path, differentiable
    assert out.requires_grad and torch.equal(out.detach(), expected)
    with torch.no_grad():
        layer.values.mul_(2.0)  # bumps the version counter: the packed copy is dropped
        doubled = layer(x)
    assert layer._inference_pack is None
    assert rel_err(doubled - layer.bias, 2.0 * (expected - layer.bias)) < 1e-5
    for drop in (lambda: layer.train(), lambda: layer.to(torch.float64).to(torch.float32),
                 lambda: layer.load_state_dict(layer.state_dict())):
        layer.eval().pack_for_inference()
        drop()
        assert layer._inference_pack is None
    import copy
    import pickle

    layer.eval().pack_for_inference()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):  # stamped with this layer's tensors
        assert clone._inference_pack is None and layer._inference_pack is not None
    import os

    layer.pack_for_inference()
    os.environ["LPL_CPU_KERNEL"] = "torch"  # the escape hatch works after packing too
    try:
        with torch.no_grad():
            assert layer._inference_pack_for(x) is None and rel_err(layer(x), doubled) < 1e-5  # torch path
    finally:
        del os.environ["LPL_CPU_KERNEL"]
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated (users still call it) and warns of its limits
        traced = torch.jit.trace(layer, (x,))  # a trace would not see the kernel call: it runs the op path
    assert rel_err(traced(2.0 * x) - layer.bias, 2.0 * (doubled - layer.bias)) < 1e-5
    with torch.inference_mode():  # built there, its tensors keep no version counter to watch: not packed
        built = BlockSparseLinear.from_linear(linear, mask, 32).eval().pack_for_inference()
    assert built._inference_pack is None


def test_packing_inside_inference_mode_serves_and_still_drops_a_stale_pack(rel_err):
    """The serving pattern: pack_for_inference(model) inside torch.inference_mode(), on a layer built outside it."""
    from lpl.kernels import pack_for_inference
    from lpl.kernels.cpu import compiled_kernel_available

    linear, mask = _masked_linear(7)
    layer = BlockSparseLinear.from_linear(linear, mask, 32).eval()
    x = torch.randn(4, 70)

    def reference():
        return torch.nn.functional.linear(x.double(), layer.sparse_weight().to_dense().detach().double(),
                                          layer.bias.detach().double())

    with torch.inference_mode():
        pack_for_inference(torch.nn.Sequential(layer))
        assert (layer._inference_pack is not None) == compiled_kernel_available()
        assert rel_err(layer(x), reference()) < 1e-5
        layer.values.mul_(2.0)  # bumps the version counter there too: the pack is dropped
        assert rel_err(layer(x), reference()) < 1e-5
        assert layer._inference_pack is None


def _masked_dense(linear, mask):
    """The masked dense layer (what pruning fine-tunes): ``linear`` with its pruned 32x32 blocks zeroed."""
    expanded = mask.repeat_interleave(32, 0).repeat_interleave(32, 1)[:100, :70]
    masked = torch.nn.Linear(70, 100)
    with torch.no_grad():
        masked.weight.copy_(linear.weight * expanded)
        masked.bias.copy_(linear.bias)
    return masked


@pytest.mark.parametrize("assign", [False, True])
def test_a_masked_dense_layers_state_loads_into_the_layers_own_structure(assign, rel_err):
    linear, mask = _masked_linear(8)
    masked = _masked_dense(linear, mask)
    state = masked.state_dict()
    layer = BlockSparseLinear.from_linear(torch.nn.Linear(70, 100), mask, 32)  # other weights, the same mask
    assert str(layer.load_state_dict(state, assign=assign)) == "<All keys matched successfully>"
    assert set(state) == {"weight", "bias"}  # the caller's dict is left as it was
    assert torch.equal(layer.block_mask, mask) and layer.values.requires_grad
    x = torch.randn(3, 70)
    assert rel_err(layer(x), masked(x).double()) < 1e-5
    fresh = BlockSparseLinear.from_linear(torch.nn.Linear(70, 100), mask, 32)
    result = fresh.load_state_dict({"weight": state["weight"]}, strict=False, assign=assign)
    assert result.missing_keys == ["bias"] and not result.unexpected_keys
    assert torch.equal(fresh.values, layer.values)


def test_a_dense_state_with_weight_in_pruned_blocks_is_refused_and_leaves_the_layer_unchanged():
    linear, mask = _masked_linear(9)
    mask[3, 2] = mask[0, 2] = False
    layer = BlockSparseLinear.from_linear(linear, mask, 32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = _masked_dense(linear, mask).state_dict()
    state["weight"][99, 69] = 0.5  # in a pruned (ragged corner) block
    state["weight"][0, 69] = float("nan")  # in another
    with pytest.raises(LplError, match=rf"state dict at '' holds a dense weight with nonzero entries in 2 of the "
                                       rf"{int((~mask).sum())} blocks this 100x70 \(blocks 32x32\) layer prunes"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    with pytest.raises(LplError, match=r"dense weight of shape \(100, 64\), but this layer is 100x70"):
        layer.load_state_dict({"weight": torch.zeros(100, 64), "bias": torch.zeros(100)})
    with torch.device("meta"):
        unbuilt = BlockSparseLinear(70, 100, 32)
    with pytest.raises(LplError, match="built on the meta device without a block_mask"):
        unbuilt.load_state_dict(_masked_dense(linear, mask).state_dict(), assign=True)
    with torch.device("meta"):  # built with its mask: the masked dense state is cut by it
        masked = BlockSparseLinear(70, 100, 32, block_mask=mask)
    masked.load_state_dict(_masked_dense(linear, mask).state_dict(), assign=True)
    x = torch.randn(3, 70)
    torch.testing.assert_close(masked(x), _masked_dense(linear, mask)(x))


def test_a_fine_tune_checkpoint_and_an_export_with_a_layer_kept_dense_load_into_the_exported_model(rel_err):
    """The two dense states a pruned model meets: the masked dense model (BlockPruneCallback's fine-tuning
    checkpoints), and an export whose prune result kept a layer whole (``to_block_sparse`` leaves it nn.Linear)."""
    import copy

    from lpl.kernels import BlockSparseWeight
    from lpl.prune import to_block_sparse

    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))

    masks = {"0": torch.rand(8, 4) < 0.5, "2": torch.rand(4, 8) < 0.5}
    masks["0"][0, 0] = masks["2"][0, 0] = True
    model = make()
    with torch.no_grad():  # what apply_masks does
        for name, mask in masks.items():
            model[int(name)].weight.copy_(BlockSparseWeight.from_dense(model[int(name)].weight, mask, 16).to_dense())
    x = torch.randn(5, 64)
    exported = to_block_sparse(make(), masks, block_size=16)
    exported.load_state_dict(model.state_dict())
    assert rel_err(exported(x), model(x).double()) < 1e-5
    kept_whole = to_block_sparse(copy.deepcopy(model), {"0": torch.ones(8, 4, dtype=torch.bool), "2": masks["2"]},
                                 block_size=16)
    assert type(kept_whole[0]) is torch.nn.Linear
    exported = to_block_sparse(make(), masks, block_size=16)
    exported.load_state_dict(kept_whole.state_dict())
    assert rel_err(exported(x), model(x).double()) < 1e-5
