"""apply_masks: zero pruned blocks and keep them zero through training (weights, gradients, optimizer state)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lpl.prune.blocks import expand_block_mask
from lpl.prune.result import PruneResult

_HANDLE_ATTR = "_lpl_block_masks"


class MaskHandle:
    """Keeps the masks of one ``apply_masks`` call enforced; ``remove()`` stops it (weights stay as they are)."""

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]) -> None:
        self.masks = masks
        self._hooks: list = []

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
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.enforce([opt])))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, handle: MaskHandle) -> None:
    for param, state in optimizer.state.items():
        if param not in handle.masks:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(handle.mask_for(value, param))


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
    result.check_model(model)
    previous = model.__dict__.get(_HANDLE_ATTR)
    if previous is not None:
        previous.remove()
    masks = {}
    for name, block_mask in result.block_masks.items():
        weight = model.get_submodule(name).weight
        masks[weight] = expand_block_mask(block_mask, tuple(weight.shape), result.block_size).to(weight.device,
                                                                                                  weight.dtype)
    handle = MaskHandle(masks)
    for param in masks:
        handle._hooks.append(param.register_hook(lambda grad, param=param: grad * handle.mask_for(grad, param)))
    for optimizer in optimizers:
        handle.watch_optimizer(optimizer)
    handle.enforce()
    model.__dict__[_HANDLE_ATTR] = handle
    return handle
