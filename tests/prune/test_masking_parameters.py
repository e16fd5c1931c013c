"""apply_masks keeps pruned blocks zero whatever replaces or swaps a masked layer's weight Parameter: an assign-load,
a conversion that makes new parameters (torch.__future__ overwrite flag) or swaps them (swap flag), a copy."""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpl.prune import PruneResult, apply_masks, prune_model
from lpl.prune.blocks import expand_block_mask
from lpl.prune.masking import has_masks


@pytest.fixture(autouse=True)
def restore_future_flags():
    """Every test here may set torch's global conversion flags: they are put back whatever happens."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.__future__.set_swap_module_params_on_conversion(swap)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))


def mlp_and_result(seed: int = 0) -> tuple[nn.Sequential, PruneResult]:
    torch.manual_seed(seed)
    model = mlp()
    generator = torch.Generator().manual_seed(seed)
    masks = {"0": torch.rand(6, 4, generator=generator) < 0.5, "2": torch.rand(4, 6, generator=generator) < 0.5}
    for mask in masks.values():
        mask[0, 0], mask[-1, -1] = True, False  # some blocks kept, some pruned
    return model, PruneResult(masks, (8, 8), {"0": (48, 32), "2": (32, 48)}, 0.5, 0.5, 1.0, 1.0)


def pruned_positions(result: PruneResult) -> dict[str, torch.Tensor]:
    return {name: ~expand_block_mask(mask, result.shapes[name], result.block_size)
            for name, mask in result.block_masks.items()}


def weight_parameter(layer: nn.Module) -> nn.Parameter:
    return layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight  # where torch.nn.utils.prune puts it


def largest_pruned(model: nn.Module, result: PruneResult, attr: str = "weight") -> float:
    worst = 0.0
    for name, where in pruned_positions(result).items():
        tensor = getattr(weight_parameter(model.get_submodule(name)), "grad" if attr == "grad" else "data")
        worst = max(worst, float(tensor[where].abs().max()))
    return worst


def train(model: nn.Module, result: PruneResult, steps: int = 3, dtype: torch.dtype = torch.float32,
          optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """AdamW steps of a fresh optimizer (not watched by the masks: only their gradient hooks keep the blocks at zero);
    the pruned gradients are checked at every step."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    kept_before = {name: weight_parameter(model.get_submodule(name)).detach().clone() for name in result.block_masks}
    for _ in range(steps):
        x = torch.randn(16, 32, generator=generator).to(dtype)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        assert largest_pruned(model, result, "grad") == 0.0
        optimizer.step()
    assert largest_pruned(model, result) == 0.0
    for name, where in pruned_positions(result).items():  # the kept blocks still train
        weight = weight_parameter(model.get_submodule(name)).detach()
        assert not torch.equal(weight[~where], kept_before[name][~where].to(weight.dtype))
    return optimizer


def test_an_assign_load_then_training_keeps_the_pruned_blocks_zero(tiny_vit, batches):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    handle = apply_masks(tiny_vit, result)
    old = {name: tiny_vit.get_submodule(name).weight for name in result.block_masks}
    tiny_vit.load_state_dict(copy.deepcopy(tiny_vit.state_dict()), assign=True)
    assert all(tiny_vit.get_submodule(name).weight is not weight for name, weight in old.items())
    assert len(handle.masks) == len(result.block_masks)
    assert all(tiny_vit.get_submodule(name).weight in handle.masks for name in result.block_masks)
    optimizer = torch.optim.AdamW(tiny_vit.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        optimizer.zero_grad()
        tiny_vit.loss(batches[step % len(batches)]).backward()
        assert largest_pruned(tiny_vit, result, "grad") == 0.0
        optimizer.step()
    assert largest_pruned(tiny_vit, result) == 0.0


def test_weights_replaced_twice_before_a_call_are_masked():
    model, result = mlp_and_result()
    apply_masks(model, result)
    for _ in range(3):  # no call between: the layer sees only the last weight
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    train(model, result)


def test_a_resumed_optimizer_over_assigned_weights_has_its_pruned_state_zeroed():
    model, result = mlp_and_result()
    dense = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_dense = torch.randn(16, 32), torch.randint(0, 10, (16,))
    for _ in range(2):  # dense steps: Adam moments non-zero everywhere
        dense.zero_grad()
        F.cross_entropy(model(train_dense[0]), train_dense[1]).backward()
        dense.step()
    handle = apply_masks(model, result, optimizers=[dense])
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)  # resuming: new weights, new optimizer
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(dense.state_dict())
    handle.watch_optimizer(resumed)
    for name, where in pruned_positions(result).items():
        state = resumed.state[model.get_submodule(name).weight]
        assert (state["exp_avg"][where] == 0).all() and (state["exp_avg_sq"][where] == 0).all()
        assert (state["exp_avg"][~where] != 0).any()
    train(model, result, optimizer=resumed)


def test_conversions_that_make_new_parameters_keep_the_masks():
    model, result = mlp_and_result()
    apply_masks(model, result)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    before = model[0].weight
    model.double()
    assert model[0].weight is not before and model[0].weight.dtype == torch.float64
    train(model, result, dtype=torch.float64)
    model.to(torch.float32)
    train(model, result)


@pytest.mark.parametrize("training_dtype", [torch.float64, torch.float32])
def test_conversions_and_loads_that_swap_parameters_work_and_keep_the_masks(training_dtype):
    model, result = mlp_and_result()
    torch.__future__.set_swap_module_params_on_conversion(True)
    handle = apply_masks(model, result)
    weight = model[0].weight
    model.half()
    model.double()
    assert model[0].weight is weight and weight.dtype == torch.float64  # swapped: the same Parameter object
    model.to(training_dtype)
    model.load_state_dict(model.state_dict())
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    assert len(handle.masks) == 2
    assert weakref.getweakrefs(model[0].weight) == [] and weakref.getweakrefs(model[2].weight) == []
    train(model, result, dtype=training_dtype)
    model.float()
    train(model, result)  # again after a swap of trained weights (with gradients)


def test_a_weight_unfrozen_after_masking_has_its_gradient_masked():
    model, result = mlp_and_result()
    model[0].weight.requires_grad_(False)
    apply_masks(model, result)
    model[0].weight.requires_grad_(True)
    train(model, result)


def test_an_unchanged_weight_is_not_written_by_the_calls():
    """The per-call check is an identity test: no tensor work while the weight stays the one masked."""
    model, result = mlp_and_result()
    apply_masks(model, result)
    versions = [model[i].weight._version for i in (0, 2)]
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 32))
    assert [model[i].weight._version for i in (0, 2)] == versions


def test_deep_copies_and_pickled_copies_mask_their_own_weights():
    model, result = mlp_and_result()
    apply_masks(model, result)
    original = {name: model.get_submodule(name).weight.detach().clone() for name in result.block_masks}
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert has_masks(clone)
        handle = clone.__dict__["_lpl_block_masks"]
        assert len(handle.masks) == 2 and all(any(w is p for p in clone.parameters()) for w in handle.masks)
        train(clone, result)
    for name, weight in original.items():  # the copies' training left the original alone
        assert torch.equal(model.get_submodule(name).weight.detach(), weight)
    train(model, result)


def test_a_masked_layer_copied_alone_keeps_its_mask():
    model, result = mlp_and_result()
    apply_masks(model, result)
    layer = copy.deepcopy(model[0])
    assert has_masks(layer) and not has_masks(model[4])
    layer.load_state_dict(copy.deepcopy(layer.state_dict()), assign=True)
    layer(torch.randn(4, 32)).square().sum().backward()
    assert (layer.weight.grad[pruned_positions(result)["0"]] == 0).all()


def test_removed_masks_follow_no_weight_any_more():
    model, result = mlp_and_result()
    handle = apply_masks(model, result)
    handle.remove()
    assert not model[0]._forward_pre_hooks and not model[0]._load_state_dict_post_hooks
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    F.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 10, (16,))).backward()
    assert largest_pruned(model, result, "grad") > 0


def test_an_exported_layer_keeps_no_mask_hook_of_the_dense_layer_it_replaced():
    """to_block_sparse shares a replaced layer's call hooks with its replacement: the dense layer's mask, freed
    with it, takes its hook out of that table, so the exported model runs no masking code."""
    import gc

    from lpl.prune import to_block_sparse

    model, result = mlp_and_result()
    handle = apply_masks(model, result)
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    to_block_sparse(model, result)
    gc.collect()
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    assert len(handle.masks) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_a_layer_pruned_by_torch_after_masking_keeps_its_block_mask():
    """torch.nn.utils.prune moves the weight Parameter to weight_orig (weight = weight_orig * weight_mask)."""
    model, result = mlp_and_result()
    apply_masks(model, result)
    torch.nn.utils.prune.random_unstructured(model[0], "weight", amount=0.1)
    train(model, result)  # weight_orig's pruned gradients and values stay zero
    assert (model[0].weight.detach()[pruned_positions(result)["0"]] == 0).all()


def test_masks_applied_on_the_meta_device_hold_for_the_weights_assigned_later():
    real, result = mlp_and_result()
    with torch.device("meta"):
        model = mlp()
    apply_masks(model, result)
    model.load_state_dict(real.state_dict(), assign=True)  # dense values: kept as loaded, gradients masked
    model(torch.randn(4, 32)).square().sum().backward()
    assert largest_pruned(model, result, "grad") == 0.0
    handle = model.__dict__["_lpl_block_masks"]
    handle.enforce()
    assert largest_pruned(model, result) == 0.0
    train(model, result)


def test_two_layers_sharing_one_weight_are_refused_with_their_names():
    from lpl.utils.errors import LplError

    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    model[2].weight = model[0].weight  # tied
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[-1, -1] = False
    result = PruneResult({"0": mask, "2": mask.clone()}, (8, 8), {"0": (32, 32), "2": (32, 32)}, 0.5, 0.5, 1.0, 1.0)
    with pytest.raises(LplError, match=r"layer '0' shares its weight with \['2.weight'\]"):
        apply_masks(model, result)
