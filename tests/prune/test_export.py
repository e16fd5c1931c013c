"""to_block_sparse: a masked ViT-like model exported to BlockSparseLinear gives the masked model's outputs."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lpl.kernels import BlockSparseLinear
from lpl.prune.export import to_block_sparse
from lpl.utils.errors import LplError


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 96)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(96, 40)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _model_and_masks(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(TinyBlock(), TinyBlock(), nn.Linear(40, 10))
    masks = {"0.fc1": torch.rand(3, 2) < 0.6, "1.fc2.weight": torch.rand(2, 3) < 0.6}
    return model, masks


def _apply_masks_densely(model, masks, block_size):
    for name, mask in masks.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        expanded = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
        layer.weight.data *= expanded[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("form", ["object", "dict", "plain"])
def test_export_replaces_masked_linears_and_keeps_outputs(form, rel_err):
    model, masks = _model_and_masks()
    reference = _model_and_masks()[0]
    _apply_masks_densely(reference, masks, 32)
    prune_result = {
        "object": SimpleNamespace(block_masks=masks, block_size=(32, 32)),
        "dict": {"block_masks": masks, "block_size": (32, 32)},
        "plain": masks,
    }[form]
    exported = to_block_sparse(model, prune_result, block_size=32 if form == "plain" else None)
    assert exported is model
    assert isinstance(model[0].fc1, BlockSparseLinear) and isinstance(model[1].fc2, BlockSparseLinear)
    assert type(model[0].fc2) is nn.Linear and type(model[2]) is nn.Linear
    x = torch.randn(2, 5, 40)
    assert rel_err(model(x), reference(x)) < 1e-5


def test_a_layer_that_keeps_every_block_stays_a_dense_linear(rel_err):
    """With nothing to skip the block-sparse kernel is only slower (1.2-1.5x at 197 tokens, several times at one
    token on CPU), and the cost model already counts such a layer as a dense matmul."""
    model, masks = _model_and_masks()
    masks["0.fc1"] = torch.ones(3, 2, dtype=torch.bool)
    reference = _model_and_masks()[0]
    _apply_masks_densely(reference, masks, 32)
    to_block_sparse(model, masks, block_size=32)
    to_block_sparse(model, masks, block_size=32)  # again: nothing changes
    assert type(model[0].fc1) is nn.Linear and isinstance(model[1].fc2, BlockSparseLinear)
    x = torch.randn(2, 5, 40)
    assert rel_err(model(x), reference(x)) < 1e-5


def test_export_of_an_unknown_layer_is_a_clear_error():
    model, masks = _model_and_masks()
    with pytest.raises(LplError, match="'0.act'.*not an nn.Linear"):
        to_block_sparse(model, {"0.act": masks["0.fc1"]}, block_size=32)


def test_export_with_a_mask_of_the_wrong_shape_is_a_clear_error():
    model, _ = _model_and_masks()
    with pytest.raises(LplError, match="block_mask must have shape"):
        to_block_sparse(model, {"0.fc1": torch.ones(2, 2, dtype=torch.bool)}, block_size=32)


def test_plain_masks_without_block_size_is_a_clear_error():
    model, masks = _model_and_masks()
    with pytest.raises(LplError, match="needs block_size"):
        to_block_sparse(model, masks)


def test_multihead_attention_out_proj_is_not_pruned_nor_exported():
    """nn.MultiheadAttention reads out_proj's weight without calling it: never selected, and export refuses it."""
    from lpl.prune.api import select_layers

    class AttentionBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    model = AttentionBlock()
    assert list(select_layers(model, None, None)) == ["fc"]
    with pytest.raises(LplError, match="MultiheadAttention"):
        to_block_sparse(model, {"attn.out_proj": torch.tensor([[True, False], [True, True]])}, block_size=16)
    assert isinstance(model.attn.out_proj, nn.Linear) and model(torch.randn(2, 5, 32)).shape == (2, 5, 32)

    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)  # its eval fast path reads linear1/2 weights
    with pytest.raises(LplError, match="match no Linear"):
        select_layers(layer, None, None)
    with pytest.raises(LplError, match="TransformerEncoderLayer"):
        to_block_sparse(layer, {"linear1": torch.ones(4, 2, dtype=torch.bool)}, block_size=16)


def test_an_export_saved_when_fully_kept_layers_were_block_sparse_still_loads(tmp_path):
    """Exports used to turn a fully kept layer into a BlockSparseLinear too: their state dicts load into today's
    export, which keeps that layer an nn.Linear."""
    from lpl.utils.io import save_safetensors_atomic
    from safetensors.torch import load_file

    model, masks = _model_and_masks()
    masks["0.fc1"] = torch.ones(3, 2, dtype=torch.bool)
    old = to_block_sparse(_model_and_masks()[0], {"block_masks": {}, "block_size": 32})
    old[0].fc1 = BlockSparseLinear.from_linear(old[0].fc1, masks["0.fc1"], 32)  # what the export made of it
    old[1].fc2 = BlockSparseLinear.from_linear(old[1].fc2, masks["1.fc2.weight"], 32)
    save_safetensors_atomic(old.state_dict(), tmp_path / "old.safetensors")
    new = to_block_sparse(model, masks, block_size=32)
    to_block_sparse(model, masks, block_size=32)  # again: still one hook
    assert type(new[0].fc1) is nn.Linear and len(new[0].fc1._load_state_dict_pre_hooks) == 1
    new.load_state_dict(load_file(str(tmp_path / "old.safetensors")))
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(new(x), old(x))


def test_a_bare_linear_is_replaced_by_the_returned_block_sparse_layer(rel_err):
    """prune_model names the root Linear ''; it has no parent to hold a replacement, so the export returns it (it used
    to register a child named '' inside the dense Linear and return that)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    mask = torch.rand(3, 4) < 0.5
    reference = nn.Linear(64, 48)
    reference.load_state_dict(layer.state_dict())
    _apply_masks_densely(reference, {"": mask}, 16)
    exported = to_block_sparse(layer, {"": mask}, block_size=16)
    assert isinstance(exported, BlockSparseLinear) and not list(layer.children())
    assert not any(key.startswith(".") for key in exported.state_dict())
    x = torch.randn(5, 64)
    assert rel_err(exported(x), reference(x)) < 1e-5
    assert to_block_sparse(layer, {"": torch.ones(3, 4, dtype=torch.bool)}, block_size=16) is layer  # nothing to skip


class SharedProjection(nn.Module):
    """One Linear object registered under two names (block1.0 and block2.0), run twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(64, 64)
        self.block1 = nn.Sequential(shared, nn.GELU())
        self.block2 = nn.Sequential(shared, nn.GELU())

    def forward(self, x):
        return self.block2(self.block1(x))


@pytest.mark.parametrize("name", ["block1.0", "block2.0"])
def test_a_layer_registered_in_two_places_becomes_one_shared_block_sparse_layer(name, rel_err):
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    reference = SharedProjection()
    _apply_masks_densely(reference, {name: mask}, 16)
    model = to_block_sparse(SharedProjection(), {name: mask}, block_size=16)
    assert isinstance(model.block1[0], BlockSparseLinear) and model.block2[0] is model.block1[0]
    x = torch.randn(3, 64)
    assert rel_err(model(x), reference(x)) < 1e-5


def test_a_shared_layer_that_a_multihead_attention_reads_as_weight_is_refused_under_any_name():
    """Replacing it everywhere would hand nn.MultiheadAttention a layer without the weight it reads."""
    model = nn.Module()
    model.attn = nn.MultiheadAttention(32, 4, batch_first=True)
    model.proj = model.attn.out_proj
    with pytest.raises(LplError, match="'attn.out_proj'.*MultiheadAttention"):
        to_block_sparse(model, {"proj": torch.tensor([[True, False], [True, True]])}, block_size=16)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


class _ScaledLinear(nn.Linear):
    """A Linear subclass that does more than x W^T + b (a learned output gain)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return super().forward(x) * self.gain


def _weight_normed(layer: nn.Linear) -> nn.Linear:
    return nn.utils.parametrizations.weight_norm(layer)


def _wrapped_forward(layer: nn.Linear) -> nn.Linear:
    """A forward replaced on the instance (as offloading hooks and monkeypatches do)."""
    original = layer.forward
    layer.forward = lambda x: original(x) * 2.0
    return layer


@pytest.mark.parametrize("make", [lambda: _ScaledLinear(32, 64), lambda: _weight_normed(nn.Linear(32, 64)),
                                  lambda: _wrapped_forward(nn.Linear(32, 64))],
                         ids=["own_forward", "weight_norm", "instance_forward"])
def test_linears_computing_more_than_x_wt_plus_b_are_left_dense_or_refused(make) -> None:
    from lpl.prune import prune_model

    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    calib = [torch.randn(4, 32) for _ in range(2)]
    with pytest.warns(UserWarning, match="left dense, since they cannot be block-pruned"):
        result = prune_model(model, calib, block_size=(16, 16), flops_keep=0.75, stages=1, loss="logit_energy",
                             exclude=["4"])
    assert "0" not in result.block_masks and "2" in result.block_masks
    with pytest.raises(LplError, match="'0' cannot be block-pruned"):
        prune_model(model, calib, block_size=(16, 16), flops_keep=0.7, include=["0", "2"], loss="logit_energy")
    # a result made elsewhere (by hand, or before this check) is refused at export instead of dropping the extra
    with pytest.raises(LplError, match="'0' cannot run block-sparse"):
        to_block_sparse(model, {"0": torch.tensor([[True, False], [False, True], [True, True], [True, False]])},
                        block_size=16)
    kept = type(model[0])  # a result keeping every block of it leaves it as it is
    assert type(to_block_sparse(model, {"0": torch.ones(4, 2, dtype=torch.bool)}, block_size=16)[0]) is kept


def test_apply_masks_refuses_a_weight_computed_by_a_parametrization() -> None:
    from lpl.prune import PruneResult, apply_masks

    model = nn.Sequential(_weight_normed(nn.Linear(32, 32)))
    mask = torch.tensor([[True, False], [False, True]])
    result = PruneResult({"0": mask}, (16, 16), {"0": (32, 32)}, 0.5, 0.5, 1.0, 1.0)
    with pytest.raises(LplError, match="weight is computed at every call"):
        apply_masks(model, result)


def test_the_exported_layer_runs_the_dense_layers_hooks_and_their_handles_still_remove_them(rel_err) -> None:
    model, masks = _model_and_masks()
    seen = []
    handle = model[0].fc1.register_forward_hook(lambda module, args, out: out * 2)
    pre = model[0].fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    _apply_masks_densely(model, masks, 32)
    x = torch.randn(5, 40)
    expected = model(x)
    to_block_sparse(model, masks, block_size=32)
    assert isinstance(model[0].fc1, BlockSparseLinear)
    assert rel_err(model(x), expected) < 1e-5 and len(seen) == 2
    handle.remove()
    pre.remove()
    assert not model[0].fc1._forward_hooks and not model[0].fc1._forward_pre_hooks


def test_export_refuses_a_result_of_other_shapes_or_block_size_and_masking_an_exported_model_says_so() -> None:
    from lpl.prune import PruneResult, apply_masks

    model, _ = _model_and_masks()
    mask = torch.tensor([[True, False, True]])
    wide = PruneResult({"0.fc1": torch.ones(6, 3, dtype=torch.bool) & mask}, (16, 16), {"0.fc1": (96, 41)},
                       0.5, 0.5, 1.0, 1.0)
    with pytest.raises(LplError, match=r"has shape \(96, 40\) but the prune result was computed for \(96, 41\)"):
        to_block_sparse(model, wide)
    result = PruneResult({"0.fc1": torch.ones(6, 3, dtype=torch.bool) & mask}, (16, 16), {"0.fc1": (96, 40)},
                         0.5, 0.5, 1.0, 1.0)
    with pytest.raises(LplError, match="contradicts the prune result's block size"):
        to_block_sparse(model, result, block_size=32)
    to_block_sparse(model, result)
    with pytest.raises(LplError, match="is block-sparse already"):
        apply_masks(model, result)


def test_several_parametrized_layers_are_all_left_dense() -> None:
    """A computed weight is a new tensor at every read: its id must not key the tied-weight check."""
    from lpl.prune.api import select_layers

    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])
    for i in range(3):
        _weight_normed(model[i])
    with pytest.warns(UserWarning, match="3 Linear layers left dense"):
        assert set(select_layers(model, None, None)) == {"3", "4"}


class _Wrapper(nn.Module):
    """Holds a model under ``module`` as DDP does (torch.compile's wrapper names it ``_orig_mod``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("wrap", ["compile", "ddp-like", "ddp-like inner"])
def test_a_result_applies_and_exports_through_a_wrapper_around_its_model(wrap, rel_err) -> None:
    from lpl.prune import apply_masks
    from lpl.prune.result import module_names

    model, masks = _model_and_masks()
    reference = _model_and_masks()[0]
    _apply_masks_densely(reference, masks, 32)
    result = {"block_masks": masks, "block_size": (32, 32)}
    if wrap == "ddp-like inner":  # a result computed on the outer module, given the network wrapped
        result = {"block_masks": {f"net.{name}": mask for name, mask in masks.items()}, "block_size": (32, 32)}
    wrapped = torch.compile(model) if wrap == "compile" else _Wrapper(model)
    modules = dict(wrapped.named_modules())
    prefix = "_orig_mod." if wrap == "compile" else "module."
    layer_names = [name.removesuffix(".weight") for name in result["block_masks"]]
    assert module_names(layer_names, modules, (nn.Linear,))(layer_names[0]) == prefix + "0.fc1"
    exported = to_block_sparse(wrapped, result)
    assert isinstance(model[0].fc1, BlockSparseLinear) and isinstance(model[1].fc2, BlockSparseLinear)
    x = torch.randn(2, 5, 40)
    assert rel_err(exported(x), reference(x)) < 1e-5
    if wrap != "compile":  # apply_masks takes PruneResults: their names map the same way
        from lpl.prune.result import PruneResult

        fresh = _Wrapper(_model_and_masks()[0])
        names = {n.removesuffix(".weight"): m for n, m in result["block_masks"].items()}
        shapes = {n: tuple(fresh.module.get_submodule(n.removeprefix("net.")).weight.shape) for n in names}
        apply_masks(fresh, PruneResult(block_masks=names, block_size=(32, 32), shapes=shapes, flops_keep=0.5,
                                       target_flops_keep=0.5, predicted_speedup=1.0, predicted_energy_ratio=1.0))
        assert rel_err(fresh(x), reference(x)) < 1e-5


def test_a_result_applies_and_exports_through_wrappers_around_the_models_blocks(rel_err) -> None:
    """Activation checkpointing (or FSDP auto-wrapping) puts a wrapper attribute inside every block's name."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from lpl.prune import apply_masks

    model, masks = _model_and_masks()
    reference = _model_and_masks()[0]
    _apply_masks_densely(reference, masks, 32)
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, TinyBlock))
    assert "0._checkpoint_wrapped_module.fc1" in dict(model.named_modules())
    x = torch.randn(2, 5, 40)
    from lpl.prune.result import PruneResult

    names = {n.removesuffix(".weight"): m for n, m in masks.items()}
    shapes = {n: tuple(reference.get_submodule(n).weight.shape) for n in names}
    apply_masks(model, PruneResult(block_masks=names, block_size=(32, 32), shapes=shapes, flops_keep=0.5,
                                   target_flops_keep=0.5, predicted_speedup=1.0, predicted_energy_ratio=1.0))
    assert rel_err(model(x), reference(x)) < 1e-5
    to_block_sparse(model, {"block_masks": masks, "block_size": (32, 32)})
    assert isinstance(model[0]._checkpoint_wrapped_module.fc1, BlockSparseLinear)
    assert rel_err(model(x), reference(x)) < 1e-5
