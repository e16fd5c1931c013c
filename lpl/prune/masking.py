"""apply_masks: zero pruned blocks and keep them zero through training (weights, gradients, optimizer state).

Each mask belongs to its layer and the layer's ``weight`` attribute, not to one Parameter object: whatever replaces
or swaps that Parameter (``load_state_dict(assign=True)``, ``.to()`` / ``.half()`` under torch's
``set_overwrite_module_params_on_conversion`` or ``set_swap_module_params_on_conversion``, tensor-subclass
parameters), the weight the layer holds now is masked. A forward pre-hook of the layer checks, by one identity test
per call, that its current weight is the one masked; a new one has its pruned values zeroed and its gradient hooked
there. A load-state-dict post-hook hooks a loaded weight at once and leaves its values as loaded, whether the load
copied, assigned or swapped them in. Nothing holds a weak reference to a parameter (torch cannot swap a tensor that
has one).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch import nn

from lpl.prune.blocks import expand_block_mask
from lpl.prune.result import PruneResult
from lpl.utils.errors import LplError

_HANDLE_ATTR = "_lpl_block_masks"
# on a masked weight Parameter: a token that only the _LayerMask which masked this very tensor holds. It lives in the
# parameter's __dict__, which torch.utils.swap_tensors moves along with the tensor's autograd hooks; copies of the
# parameter (pickle, torch.save) carry a new list, equal but not the same object, so they count as not masked yet.
_TOKEN_ATTR = "_lpl_block_mask_token"
COMPUTED_WEIGHT = ("its weight is computed at every call (a parametrization such as weight_norm or spectral_norm), "
                   "so zeroed blocks would not stay zero")


def weight_is_computed(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is recomputed at every call rather than a parameter of the layer (torch's
    parametrizations, the older weight_norm / spectral_norm hooks)."""
    return not isinstance(layer._parameters.get("weight"), nn.Parameter)


class _LayerMask:
    """The block mask of one layer's ``weight``, kept on whatever Parameter the layer holds there.

    Holds its layer weakly (a layer replaced by ``to_block_sparse`` is freed, and its mask goes with it, hooks
    included: the replacement shares the layer's call-hook table), and the weight not at all: the weight is read
    from the layer. The mask follows the module: it is converted to the weight's device and dtype when first used
    there, and it is copied and pickled with the layer (the layer's hooks hold it). Gradient hooks are not pickled or
    copied with parameters, so a copy hooks its weights at its first call.
    """

    def __init__(self, layer: nn.Module, name: str, mask: torch.Tensor) -> None:
        self.name, self.mask = name, mask
        self.active, self.warned = True, False
        self._layer: Callable[[], nn.Module | None] = weakref.ref(layer, self._layer_gone)
        self._token: list | None = None  # the token set on the weight masked now
        self._grad_hook: Any = None  # the RemovableHandle of that weight's gradient hook (None: not hooked)
        self._module_hooks = [
            layer.register_forward_pre_hook(_FollowWeight(self), prepend=True),
            layer.register_load_state_dict_post_hook(_AfterLoad(self)),
        ]

    # pickled and deep-copied with the layer (its hooks hold this object): the layer itself may not be rebuilt yet
    # when __setstate__ runs, so nothing here may touch it; the copy's weights are hooked at their first use
    def __getstate__(self) -> dict:
        return {"name": self.name, "mask": self.mask, "active": self.active, "layer": self._layer(),
                "module_hooks": self._module_hooks}

    def __setstate__(self, state: dict) -> None:
        self.name, self.mask, self.active = state["name"], state["mask"], state["active"]
        self.warned = False
        self._token, self._grad_hook = None, None
        self._module_hooks = state["module_hooks"]
        layer = state["layer"]
        if layer is None:  # freed before the copy: its hooks went with it
            self._layer, self._module_hooks, self.active = _no_layer, [], False
        else:
            self._layer = weakref.ref(layer, self._layer_gone)

    def _layer_gone(self, _: Any) -> None:
        """The layer was freed (``to_block_sparse`` replaced it): its replacement, which shares its call-hook
        table, must not pay for a hook that has nothing to mask."""
        self.remove()

    @property
    def layer(self) -> nn.Module | None:
        return self._layer() if self.active else None

    def weight(self) -> nn.Parameter | None:
        """The layer's weight Parameter now (None: the layer is gone, unmasked, or its weight is no Parameter)."""
        layer = self.layer
        return None if layer is None else _weight_parameter(layer)

    def is_current(self, weight: nn.Parameter) -> bool:
        """Whether ``weight`` is the tensor masked and hooked by this mask (the check of every call: cheap)."""
        return (weight.__dict__.get(_TOKEN_ATTR) is self._token and self._token is not None
                and (self._grad_hook is not None or not weight.requires_grad))

    def mask_for(self, tensor: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask.device != tensor.device or mask.dtype != tensor.dtype:  # the model moved or changed precision
            if tensor.is_meta:  # a model built on the meta device: the mask keeps its values for the real weights
                return mask.to(tensor.device, tensor.dtype)
            mask = self.mask = mask.to(tensor.device, tensor.dtype)  # 0 / 1: exact in every dtype
        return mask

    def check_shape(self, weight: nn.Parameter) -> None:
        if tuple(weight.shape) != tuple(self.mask.shape):
            raise LplError(
                f"layer {self.name!r} now holds a weight of shape {tuple(weight.shape)}, but its block mask "
                f"(apply_masks) is for {tuple(self.mask.shape)}: apply_masks again with a prune result computed for "
                "this weight, or remove the masks (MaskHandle.remove()) before changing the layer.")

    @torch.no_grad()
    def zero(self, weight: nn.Parameter) -> None:
        """Zero the pruned entries of ``weight`` and of its gradient."""
        self.check_shape(weight)
        weight.mul_(self.mask_for(weight))
        if weight.grad is not None:
            weight.grad.mul_(self.mask_for(weight.grad))

    def follow(self, weight: nn.Parameter, zero: bool = True) -> None:
        """Mask ``weight`` if it is not the tensor masked so far (a new or swapped Parameter, or one unfrozen since):
        zero its pruned values (unless ``zero`` is False: the caller does) and hook its gradient."""
        if self.is_current(weight):
            return
        seen = weight.__dict__.get(_TOKEN_ATTR) is self._token and self._token is not None
        if zero and not seen:  # values from elsewhere: zeroed once (a weight seen before changes only by training)
            self.zero(weight)
        if self._grad_hook is not None:  # the gradient hook of the weight this one replaced
            self._grad_hook.remove()
            self._grad_hook = None
        if weight.requires_grad:  # a frozen weight has no gradient to mask (torch refuses the hook)
            table = weight._backward_hooks
            self._grad_hook = weight.register_hook(_MaskGradient(self))
            if table is not None:
                # torch.utils.swap_tensors leaves the Python hook table on the object but not in autograd (its
                # hooks stop running): setting it again installs it on the tensor the object holds now
                weight._backward_hooks = table
        self._token = [self.name]  # a new list at each masking: a weight masked before and put back is not current
        weight.__dict__[_TOKEN_ATTR] = self._token

    def remove(self) -> None:
        for hook in self._module_hooks:
            hook.remove()
        self._module_hooks = []
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        self._token, self.active = None, False


def _no_layer() -> None:
    return None


def _weight_parameter(layer: nn.Module) -> nn.Parameter | None:
    """The Parameter holding ``layer``'s weight: ``weight``, or ``weight_orig`` where torch.nn.utils.prune computes
    the weight from it (``weight_orig * weight_mask``: zero where it is zero); None for any other computed weight."""
    params = layer._parameters
    weight = params.get("weight")
    if not isinstance(weight, nn.Parameter):
        weight = params.get("weight_orig")
    return weight if isinstance(weight, nn.Parameter) else None


class _FollowWeight:
    """Forward pre-hook of a masked layer: masks the weight it holds now when that is not the one masked so far.
    ``to_block_sparse`` shares the call hooks of a layer it replaces with the replacement: there it does nothing."""

    def __init__(self, layer_mask: _LayerMask) -> None:
        self.layer_mask = layer_mask

    def __call__(self, module: nn.Module, args: Any) -> None:
        # traced code cannot hook tensors, and a jit.trace would replay the masking's in-place writes at every call;
        # the post-step enforce still follows
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        layer_mask = self.layer_mask
        if module is not layer_mask._layer():  # a replacement sharing the hook table of a layer still alive
            return
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter):
            weight = _weight_parameter(module)
        if weight is not None:
            token = layer_mask._token  # the identity check of every call (is_current, inline)
            if (token is None or weight.__dict__.get(_TOKEN_ATTR) is not token
                    or (layer_mask._grad_hook is None and weight.requires_grad)):
                layer_mask.follow(weight)
        elif not layer_mask.warned and torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            layer_mask.warned = True  # a plain tensor (torch.func.functional_call) is the caller's own: left alone
            warnings.warn(f"layer {layer_mask.name!r} was masked by apply_masks, but {COMPUTED_WEIGHT}: its block "
                          "mask is no longer enforced. Remove the parametrization, or apply_masks to the model as it "
                          "is now.", UserWarning, stacklevel=2)


class _AfterLoad:
    """Load-state-dict post-hook of a masked layer: a weight assigned or swapped in by the load has its gradient
    hooked at once. Its values stay as loaded, as those copied into the same Parameter by a plain load do (a dense
    checkpoint tested on the masked model is the checkpoint's model); the next optimizer step on it zeroes them."""

    def __init__(self, layer_mask: _LayerMask) -> None:
        self.layer_mask = layer_mask

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        layer_mask = self.layer_mask
        weight = layer_mask.weight()
        if module is layer_mask.layer and weight is not None:
            layer_mask.follow(weight, zero=False)


class _MaskGradient:
    """The gradient hook of one masked weight (a class, not a closure, so that models pickle)."""

    def __init__(self, layer_mask: _LayerMask) -> None:
        self.layer_mask = layer_mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.layer_mask.mask_for(grad)


class _MaskView(Mapping):
    """The masked weights as they are now (each layer's current weight Parameter) -> their masks; read-only."""

    def __init__(self, handle: MaskHandle) -> None:
        self._handle = handle

    def _items(self) -> Iterator[tuple[nn.Parameter, _LayerMask]]:
        for layer_mask in self._handle._layers:
            weight = layer_mask.weight()
            if weight is not None:
                yield weight, layer_mask

    def __getitem__(self, param: nn.Parameter) -> torch.Tensor:
        return self._handle._layer_mask(param).mask

    def __contains__(self, param: object) -> bool:
        return any(weight is param for weight, _ in self._items())

    def __iter__(self) -> Iterator[nn.Parameter]:
        return iter([weight for weight, _ in self._items()])

    def __len__(self) -> int:
        return sum(1 for _ in self._items())


class MaskHandle:
    """Keeps the masks of one ``apply_masks`` call enforced; ``remove()`` stops it (weights stay as they are).

    Each mask belongs to a layer (held weakly: a layer replaced later by ``to_block_sparse`` is freed, its mask with
    it) and is enforced on whatever weight Parameter the layer holds: one replaced by ``load_state_dict(...,
    assign=True)`` or by a conversion that makes new parameters, or swapped by torch, is masked at the layer's next
    call (at once after a load). Around every step of any torch optimizer that holds a masked weight (global step
    pre- and post-hooks), that optimizer's per-entry state of pruned entries is zeroed before the step (an optimizer
    created before the masks keeps momentum there, which would move them) and pruned values the step moved are zeroed
    after it. ``masks`` maps each masked layer's current weight to its mask. The handle pickles and copies with the
    model (``ddp_spawn``, ``torch.save(model)``, ``copy.deepcopy``): the copy masks its own weights.
    """

    def __init__(self, layer_masks: Iterable[_LayerMask]) -> None:
        self._layers = list(layer_masks)
        handle = weakref.ref(self)
        steps = [register_optimizer_step_pre_hook(_StepHook(handle, before=True)),
                 register_optimizer_step_post_hook(_StepHook(handle, before=False))]
        for hook in steps:  # a handle dropped without remove() leaves no hook behind
            weakref.finalize(self, hook.remove)
        self._hooks: list = [*self._layers, *steps]

    def __getstate__(self) -> dict:
        return {"layers": self._layers}

    def __setstate__(self, state: dict) -> None:
        if "layers" not in state:  # pickled by an lpl before masks followed their layers: keyed by parameters
            warnings.warn("a model pickled with block masks by an older lpl: its masks are not restored; call "
                          "apply_masks on it again.", UserWarning, stacklevel=2)
        self.__init__(state.get("layers", ()))

    @property
    def active(self) -> bool:
        """Whether any of its masks is still enforced (False after ``remove()``)."""
        return any(layer_mask.active for layer_mask in self._layers)

    @property
    def masks(self) -> Mapping[nn.Parameter, torch.Tensor]:
        return _MaskView(self)

    def _current(self) -> dict[int, tuple[nn.Parameter, _LayerMask]]:
        return {id(weight): (weight, layer_mask) for weight, layer_mask in _MaskView(self)._items()}

    def _layer_mask(self, param: nn.Parameter) -> _LayerMask:
        for layer_mask in self._layers:
            if layer_mask.weight() is param:
                return layer_mask
        raise KeyError("parameter without a mask")

    def mask_for(self, tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """The mask of the masked weight ``param``, on ``tensor``'s device and dtype."""
        return self._layer_mask(param).mask_for(tensor)

    @torch.no_grad()
    def enforce(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero pruned weights and the optimizers' state of them (``zero_optimizer_state``)."""
        for layer_mask in self._layers:
            weight = layer_mask.weight()
            if weight is not None:
                layer_mask.follow(weight, zero=False)
                layer_mask.zero(weight)
        for optimizer in optimizers:
            zero_optimizer_state(optimizer, self)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero ``optimizer``'s state for pruned entries now (state loaded from a checkpoint, or gathered before the
        masks); every optimizer's steps are enforced anyway."""
        zero_optimizer_state(optimizer, self)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of the masked weights ``optimizer`` updates, where the step moved them (updates
        that mix entries, gradients written past the hooks). Through ``.data``: one pass, no host sync, and the
        weight's version counter, which observers such as TrainOrderRecorder read as writes outside the step, is
        left as the step left it (with masked gradients and zeroed state the write changes nothing)."""
        masked = self._current()
        for group in optimizer.param_groups:
            for param in group["params"]:
                weight, layer_mask = masked.get(id(param), (None, None))
                if weight is param:
                    layer_mask.check_shape(weight)
                    weight.data.mul_(layer_mask.mask_for(weight))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class _StepHook:
    """Global optimizer step pre- or post-hook of one MaskHandle (held weakly: the model owns its handle)."""

    def __init__(self, handle: Callable[[], MaskHandle | None], before: bool) -> None:
        self.handle, self.before = handle, before

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        handle = self.handle()
        if handle is None:
            return
        if self.before:  # momentum gathered before the masks would move pruned entries, and an optimizer mixing
            zero_optimizer_state(optimizer, handle)  # entries (a per-layer trust ratio) would read it
        else:
            handle.after_step(optimizer)


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, handle: MaskHandle) -> None:
    """Zero the pruned entries of every state tensor shaped like a masked weight (moments, momentum: per entry),
    except a square weight's preconditioner (Shampoo's [d, d] ``precond_*`` has its shape without being per entry)."""
    for weight, layer_mask in handle._current().values():
        square = weight.dim() == 2 and weight.shape[0] == weight.shape[1]
        for key, value in optimizer.state.get(weight, {}).items():
            if not isinstance(value, torch.Tensor) or value.shape != weight.shape:
                continue
            if not (square and "precond" in str(key)):
                value.mul_(layer_mask.mask_for(value))


def _layer_masks_on(layer: nn.Module) -> list[_LayerMask]:
    """The active masks of ``layer`` itself (not those of a layer it replaced, whose call hooks it shares)."""
    return [hook.layer_mask for hook in layer._forward_pre_hooks.values()
            if isinstance(hook, _FollowWeight) and hook.layer_mask.layer is layer]


def has_masks(model: nn.Module) -> bool:
    """Whether ``apply_masks`` keeps block masks on ``model`` (or on a module inside it, or a copy of one); not
    after ``MaskHandle.remove()``."""
    return any(_layer_masks_on(module) or (_HANDLE_ATTR in vars(module) and vars(module)[_HANDLE_ATTR].active)
               for module in model.modules())


def weight_holders(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter of ``model`` (by id) -> the names of the modules holding it as their own (a module registered
    under two names counts once): a parameter with two holders is tied (an LM head and its embedding table)."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    return holders


def other_holders(model: nn.Module, holders: Mapping[int, list[str]], layer: nn.Module) -> list[str]:
    """The names (``weight_holders``') under which modules other than ``layer`` hold its weight: tied to it."""
    return [name for name in holders.get(id(layer.weight), [])
            if model.get_submodule(name.rpartition(".")[0]) is not layer]


def apply_masks(
    model: nn.Module, result: PruneResult, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> MaskHandle:
    """Zero the pruned blocks of ``model`` and keep them zero.

    Gradients of masked weights are masked by a tensor hook; every step of any torch optimizer that holds them
    starts from its state of pruned entries zeroed and ends with their pruned values zeroed (``optimizers``: that
    state is zeroed at once). The masks follow their layers: a weight Parameter replaced or swapped later
    (``load_state_dict(..., assign=True)``, a dtype or device conversion that makes new parameters) is masked in its
    turn. Applying again replaces the previous masks. The masks live in the
    PruneResult, not the state dict, so checkpoints load into an unpruned model unchanged (BlockPruneCallback stores
    the result in the checkpoint and re-applies it on resume).

    Example::

        handle = apply_masks(model, result, optimizers=[optimizer])
        ...train...   # pruned blocks stay exactly zero
        handle.remove()
    """
    layers = result.layers_in(model)
    holders = weight_holders(model)
    for name, layer in layers.items():
        if weight_is_computed(layer):
            raise LplError(f"layer {name!r} cannot be masked: {COMPUTED_WEIGHT}; remove the parametrization "
                           "(torch.nn.utils.parametrize.remove_parametrizations) before pruning, or leave the layer "
                           "dense.")
        tied = other_holders(model, holders, layer)
        if tied:  # one weight, two modules (tied embeddings and heads): the mask would prune the other's use too
            raise LplError(f"layer {name!r} shares its weight with {tied[:2]}, so its mask would prune that too; "
                           "prune_model leaves tied weights dense: leave it out of the result.")
    previous = model.__dict__.get(_HANDLE_ATTR)
    if previous is not None:
        previous.remove()
    masks: dict[int, tuple[str, nn.Module, torch.Tensor]] = {}  # one mask per layer object (a shared one: the last)
    for name, block_mask in result.block_masks.items():
        layer = layers[name]
        weight = layer.weight
        device = "cpu" if weight.is_meta else weight.device  # a meta mask would have no values left to convert
        masks[id(layer)] = (name, layer, expand_block_mask(block_mask, tuple(weight.shape), result.block_size).to(
            device, weight.dtype))
    for _, layer, _ in masks.values():
        for earlier in _layer_masks_on(layer):  # masks applied to a part of the model, or carried by a copy
            earlier.remove()
    handle = MaskHandle([_LayerMask(layer, name, mask) for name, layer, mask in masks.values()])
    for optimizer in optimizers:
        handle.watch_optimizer(optimizer)
    handle.enforce()
    model.__dict__[_HANDLE_ATTR] = handle
    return handle
