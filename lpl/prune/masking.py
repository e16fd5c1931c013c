"""apply_masks: zero pruned blocks and keep them zero through training (weights, gradients, optimizer state)."""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from lpl.prune.blocks import expand_block_mask
from lpl.prune.result import PruneResult
from lpl.utils.errors import LplError

_HANDLE_ATTR = "_lpl_block_masks"
COMPUTED_WEIGHT = ("its weight is computed at every call (a parametrization such as weight_norm or spectral_norm), "
                   "so zeroed blocks would not stay zero")


def weight_is_computed(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is recomputed at every call rather than a parameter of the layer (torch's
    parametrizations, the older weight_norm / spectral_norm hooks)."""
    return not isinstance(layer._parameters.get("weight"), nn.Parameter)


class MaskHandle:
    """Keeps the masks of one ``apply_masks`` call enforced; ``remove()`` stops it (weights stay as they are).

    Masks are held by weak reference to their weights: a layer replaced later (``to_block_sparse``) frees its dense
    weight. The handle pickles with the model (``ddp_spawn``, ``torch.save(model)``): an unpickled copy masks its
    weights' gradients again; optimizers are not pickled with it, so watch them again there.
    """

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.masks = _WeakParameterMap(masks.items())
        self._hooks: list = []
        self._watch_gradients()

    def _watch_gradients(self) -> None:
        # a frozen weight has no gradient to mask (torch refuses the hook); unfrozen later, the watched optimizers'
        # post-step enforce still keeps its pruned blocks zero
        for param in self.masks:
            if param.requires_grad:
                self._hooks.append(param.register_hook(_MaskGradient(self, param)))

    def __getstate__(self) -> dict:
        return {"masks": dict(self.masks)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["masks"])

    def mask_for(self, tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        mask = self.masks[param]
        if mask.device != tensor.device or mask.dtype != tensor.dtype:  # the model moved or changed precision
            mask = self.masks[param] = mask.to(tensor.device, tensor.dtype)  # 0 / 1: exact in every dtype
        return mask

    @torch.no_grad()
    def enforce(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero pruned weights and every optimizer state tensor shaped like them (Adam moments, momentum)."""
        for param in self.masks:
            param.mul_(self.mask_for(param, param))
            if param.grad is not None:
                param.grad.mul_(self.mask_for(param.grad, param))
        for optimizer in optimizers:
            zero_optimizer_state(optimizer, self)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-enforce after every step of ``optimizer`` (covers weight decay and state loaded from checkpoints)."""
        zero_optimizer_state(optimizer, self)
        self._hooks.append(optimizer.register_step_post_hook(_EnforceAfterStep(self)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class _WeakParameterMap(MutableMapping):
    """Parameter -> mask, by identity (tensors compare elementwise, so ``WeakKeyDictionary`` cannot key them),
    holding each parameter weakly: its entry goes when the parameter does."""

    def __init__(self, items: Iterable[tuple[nn.Parameter, torch.Tensor]] = ()) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        for param, mask in items:
            self[param] = mask

    def __setitem__(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        key, entries = id(param), self._entries
        entries[key] = (weakref.ref(param, lambda _, key=key: entries.pop(key, None)), mask)

    def __getitem__(self, param: nn.Parameter) -> torch.Tensor:
        ref, mask = self._entries.get(id(param), (None, None))
        if ref is None or ref() is not param:
            raise KeyError("parameter without a mask")
        return mask

    def __delitem__(self, param: nn.Parameter) -> None:
        self[param]  # noqa: B018 - the KeyError of a parameter without a mask
        del self._entries[id(param)]

    def __iter__(self) -> Iterator[nn.Parameter]:
        alive = (ref() for ref, _ in list(self._entries.values()))
        return iter([param for param in alive if param is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _MaskGradient:
    """The gradient hook of one masked weight (a class, not a closure, so that models pickle)."""

    def __init__(self, handle: MaskHandle, param: nn.Parameter) -> None:
        self.handle, self.param = handle, weakref.ref(param)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        param = self.param()
        return grad if param is None or param not in self.handle.masks else grad * self.handle.mask_for(grad, param)


class _EnforceAfterStep:
    def __init__(self, handle: MaskHandle) -> None:
        self.handle = handle

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.handle.enforce([optimizer])


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, handle: MaskHandle) -> None:
    """Zero the pruned entries of every state tensor shaped like a masked weight (Adam moments, momentum)."""
    for param, state in optimizer.state.items():
        if param not in handle.masks:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(handle.mask_for(value, param))


def has_masks(model: nn.Module) -> bool:
    """Whether ``apply_masks`` keeps block masks on ``model`` (or on a module inside it)."""
    return any(_HANDLE_ATTR in vars(module) for module in model.modules())


def apply_masks(
    model: nn.Module, result: PruneResult, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> MaskHandle:
    """Zero the pruned blocks of ``model`` and keep them zero.

    Gradients of masked weights are masked by a tensor hook; with ``optimizers`` their state for pruned entries is
    zeroed and re-zeroed (with the weights) after every step. Applying again replaces the previous masks. The
    masks live in the PruneResult, not the state dict, so checkpoints load into an unpruned model unchanged
    (BlockPruneCallback stores the result in the checkpoint and re-applies it on resume).

    Example::

        handle = apply_masks(model, result, optimizers=[optimizer])
        ...train...   # pruned blocks stay exactly zero
        handle.remove()
    """
    layers = result.layers_in(model)
    for name, layer in layers.items():
        if weight_is_computed(layer):
            raise LplError(f"layer {name!r} cannot be masked: {COMPUTED_WEIGHT}; remove the parametrization "
                           "(torch.nn.utils.parametrize.remove_parametrizations) before pruning, or leave the layer "
                           "dense.")
    previous = model.__dict__.get(_HANDLE_ATTR)
    if previous is not None:
        previous.remove()
    masks = {}
    for name, block_mask in result.block_masks.items():
        weight = layers[name].weight
        masks[weight] = expand_block_mask(block_mask, tuple(weight.shape), result.block_size).to(weight.device,
                                                                                                  weight.dtype)
    handle = MaskHandle(masks)
    for optimizer in optimizers:
        handle.watch_optimizer(optimizer)
    handle.enforce()
    model.__dict__[_HANDLE_ATTR] = handle
    return handle
