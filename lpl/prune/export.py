"""Export a block-pruned model: replace each masked ``nn.Linear`` by ``lpl.kernels.BlockSparseLinear``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lpl.prune.api import linear_extras, read_as_weight
from lpl.prune.result import module_names
from lpl.utils.errors import LplError


def to_block_sparse(
    model: nn.Module, prune_result: Any, block_size: int | Sequence[int] | None = None
) -> nn.Module:
    """Replace every Linear named in the prune result by a ``BlockSparseLinear`` keeping only its retained blocks.

    ``prune_result`` is a ``PruneResult`` (or any object with ``.block_masks: dict[str, BoolTensor [R, C]]`` and
    ``.block_size: (br, bc)``), a dict ``{"block_masks": ..., "block_size": ...}``, or a plain dict of masks with
    ``block_size`` given here. Names are module names (``"blocks.0.mlp.fc1"``; a ``".weight"`` suffix is accepted);
    a submodule of the pruned model works too (``to_block_sparse(lightning_module.model, result)``).
    The model is changed in place and returned; weights, bias, dtype and device are kept, so outputs equal those of
    the masked dense model. A layer that keeps every block stays an ``nn.Linear``: with nothing to skip, the dense
    matmul is faster. A layer registered in several places (one module object shared) becomes one
    ``BlockSparseLinear`` shared the same way. When ``model`` is itself the masked Linear (named ``""``), it cannot
    be replaced in place: the new ``BlockSparseLinear`` is returned instead (the Linear itself if every block is kept).
    Forward and backward hooks registered on a replaced Linear run on its replacement (their handles still remove
    them). A Linear that computes more than ``x W^T + b`` (a subclass with its own forward or parameters, a weight
    computed by a parametrization: ``prune_model`` leaves such layers dense) is refused, as are masks computed for
    other shapes or another block size.

    Example::

        >>> result = prune_model(model, calib_loader, flops_keep=0.5)
        >>> sparse_model = to_block_sparse(model, result)      # runs through lpl.kernels, really faster
        >>> save_safetensors_atomic(sparse_model.state_dict(), "deit_s_pruned.safetensors")
    """
    from lpl.kernels import BlockSparseLinear
    from lpl.kernels.format import block_grid, normalize_block_size

    masks, size = _masks_and_block_size(prune_result, block_size)
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under each of its names
    names = {raw: raw[: -len(".weight")] if raw.endswith(".weight") else raw for raw in masks}
    # dense layers, or layers exported before
    in_model = module_names(list(names.values()), modules, (nn.Linear, BlockSparseLinear))
    for raw_name, mask in masks.items():
        name = in_model(names[raw_name])
        linear = modules.get(name)
        if isinstance(linear, BlockSparseLinear):  # exported before: fine when it is this result's export
            if linear.block_size != normalize_block_size(size) or not torch.equal(
                    linear.block_mask.cpu(), torch.as_tensor(mask).cpu().bool()):
                raise LplError(f"layer {name!r} is already block-sparse with another mask or block size than the "
                               "prune result's; export the dense model the result was computed for.")
            continue
        places = _places_of_exportable(model, modules, name, linear, getattr(prune_result, "shapes", {}).get(raw_name))
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) == block_grid(tuple(linear.weight.shape), normalize_block_size(size)) and bool(mask.all()):
            _keep_dense(linear)
            continue
        extras = linear_extras(linear)
        if extras is not None:
            raise LplError(f"layer {name!r} cannot run block-sparse: {extras}, which a BlockSparseLinear would not "
                           f"keep; prune it with exclude={[name]!r} so that it stays dense.")
        sparse = BlockSparseLinear.from_linear(linear, mask, size)
        sparse.train(linear.training)
        _share_call_hooks(linear, sparse)
        if linear is model:  # a bare Linear has no parent to hold its replacement
            return sparse
        # every place the layer is registered (one module shared by several parents) runs the one sparse layer:
        # one left dense there would run the unmasked weight
        for place in places:
            parent_name, _, child = place.rpartition(".")
            setattr(model.get_submodule(parent_name), child, sparse)
            modules[place] = sparse
    return model


def _places_of_exportable(model: nn.Module, modules: dict[str, nn.Module], name: str, linear: nn.Module | None,
                          shape: Sequence[int] | None) -> list[str]:
    """Refuse a masked layer that is no Linear of the masks' shape or whose weight its owner reads directly; returns
    every name the layer is registered under."""
    if not isinstance(linear, nn.Linear):
        found = "missing" if linear is None else f"a {type(linear).__name__}"
        raise LplError(
            f"the prune result masks layer {name!r}, but in this model it is {found}, not an nn.Linear; "
            f"export the model the masks were computed for."
        )
    if shape is not None and tuple(shape) != tuple(linear.weight.shape):
        raise LplError(f"layer {name!r} has shape {tuple(linear.weight.shape)} but the prune result was computed "
                       f"for {tuple(shape)}; export the model it was computed for.")
    places = [place for place, module in modules.items() if module is linear]
    read = next((place for place in places if read_as_weight(model, place)), None)
    if read is not None:
        owner = type(model.get_submodule(read.rpartition(".")[0])).__name__
        raise LplError(f"layer {read!r} belongs to a torch {owner}, which reads its weight directly instead of "
                       "calling it, so it cannot run block-sparse; leave it dense.")
    return places


def _keep_dense(linear: nn.Linear) -> None:
    """A layer keeping every block stays dense (nothing to skip: the dense matmul is faster, as the cost model
    predicts); exports saved when such layers were block-sparse still load into it."""
    hooks = linear._load_state_dict_pre_hooks.values()  # torch wraps each hook: compare the wrapped one
    if not any(isinstance(getattr(h, "hook", h), _DenseFromBlockSparseState) for h in hooks):
        linear._register_load_state_dict_pre_hook(_DenseFromBlockSparseState())


# the hook tables of a module call (forward, pre-forward, backward), which the replacement layer shares
_CALL_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _share_call_hooks(linear: nn.Linear, sparse: nn.Module) -> None:
    """``sparse`` runs the hooks registered on ``linear`` (the very tables: their handles still remove them)."""
    for table in _CALL_HOOKS:
        if hasattr(linear, table):
            setattr(sparse, table, getattr(linear, table))
    sparse._is_full_backward_hook = linear._is_full_backward_hook


def _masks_and_block_size(prune_result: Any, block_size: Any) -> tuple[Mapping[str, torch.Tensor], Any]:
    from lpl.kernels.format import normalize_block_size

    if hasattr(prune_result, "block_masks") and hasattr(prune_result, "block_size"):
        masks, size = prune_result.block_masks, prune_result.block_size
    elif isinstance(prune_result, Mapping) and "block_masks" in prune_result:
        masks, size = prune_result["block_masks"], prune_result.get("block_size", block_size)
        if size is None:
            raise LplError("the prune result dict has 'block_masks' but no 'block_size'; add it or pass block_size=.")
    else:
        masks, size = None, None
    if masks is not None:
        if block_size is not None and normalize_block_size(block_size) != normalize_block_size(size):
            raise LplError(f"block_size={block_size!r} contradicts the prune result's block size {size!r}; leave "
                           "block_size out (it is for a plain dict of masks).")
        return masks, size
    if isinstance(prune_result, Mapping) and all(isinstance(v, torch.Tensor) for v in prune_result.values()):
        if block_size is None:
            raise LplError(
                "a plain dict of block masks needs block_size=(br, bc): to_block_sparse(model, masks, (32, 32))."
            )
        return prune_result, block_size
    raise LplError(
        f"to_block_sparse takes a PruneResult (.block_masks, .block_size), a dict with 'block_masks' and "
        f"'block_size', or a dict of masks plus block_size=; got a {type(prune_result).__name__}."
    )


class _DenseFromBlockSparseState:
    """Load-state-dict pre-hook of a Linear left dense by ``to_block_sparse``: a state saved from a
    ``BlockSparseLinear`` of it (values, block structure, geometry) becomes its dense weight."""

    def __call__(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "values" not in state_dict or prefix + "weight" in state_dict:
            return
        from lpl.kernels.format import BlockSparseWeight

        try:
            out_features, in_features, *block_size = (int(v) for v in state_dict[prefix + "geometry"].tolist())
            sparse = BlockSparseWeight(state_dict[prefix + "row_ptr"], state_dict[prefix + "col_idx"],
                                       state_dict[prefix + "values"], (out_features, in_features), tuple(block_size),
                                       state_dict[prefix + "block_mask"].bool())
            weight = sparse.to_dense()
        except (KeyError, ValueError, RuntimeError, LplError):
            return  # not a block-sparse layer's state: load_state_dict reports the keys as they are
        for key in ("values", "row_ptr", "col_idx", "geometry", "block_mask"):
            del state_dict[prefix + key]
        state_dict[prefix + "weight"] = weight
