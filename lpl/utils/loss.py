"""The loss protocol: how method code asks any LightningModule for its loss on a batch."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lpl.utils.errors import LplError

_LOGGING_METHODS = ("log", "log_dict")


@contextlib.contextmanager
def _logging_silenced(module: nn.Module) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` as no-ops on ``module``: a probe's loss must not reach the run's metrics, and
    Lightning refuses logging from most hooks probes run in (``on_train_end``, say) or outside ``fit``."""
    saved = {name: vars(module)[name] for name in _LOGGING_METHODS if name in vars(module)}
    for name in _LOGGING_METHODS:
        object.__setattr__(module, name, _ignore)
    try:
        yield
    finally:
        for name in _LOGGING_METHODS:
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                object.__delattr__(module, name)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def module_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """Scalar training loss of ``module`` on ``batch``.

    Uses ``module.loss(batch)`` when the module defines it (every ``lpl`` example does), else
    ``module.training_step(batch, 0)``, which may return a tensor or a dict holding ``"loss"``. A ``loss`` that is a
    criterion module (``self.loss = nn.CrossEntropyLoss()``) or a method taking other arguments (``loss(logits,
    target)``) is not that protocol: the training step is used then. Whatever either logs with ``self.log`` is
    dropped: these are probes, not training steps. A module with manual optimization must define ``loss`` (its
    training step would step the optimizer). Other side effects of a training_step (a torchmetrics update, a
    counter) happen on probes too: a module with such a step should define ``loss``.
    """
    step, args = _probe_step(module, batch)
    with _logging_silenced(module):
        out = step(*args)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        raise LplError(
            f"{type(module).__name__}'s loss must be a scalar tensor (or a dict with a scalar 'loss'), "
            f"got {type(out).__name__}; return the mean loss of the batch."
        )
    return out


def check_module_loss(module: nn.Module) -> None:
    """Raise now the LplError ``module_loss`` would raise for ``module`` (no loss protocol, manual optimization),
    running nothing."""
    _probe_step(module, None)


def _probe_step(module: nn.Module, batch: Any) -> tuple[Any, tuple]:
    """The method giving ``module``'s loss on ``batch`` and its arguments (see ``module_loss``)."""
    batch_loss = _batch_loss_method(module)
    if batch_loss is not None:
        return batch_loss, (batch,)
    if not callable(getattr(module, "training_step", None)):
        raise LplError(
            f"{type(module).__name__} has neither a `loss(batch)` method nor a `training_step`; "
            "add `def loss(self, batch) -> Tensor` returning the scalar training loss."
        )
    if getattr(module, "automatic_optimization", True) is False:
        raise LplError(
            f"{type(module).__name__} uses manual optimization: its training_step steps the optimizer itself, "
            "which a probe must not do; add `def loss(self, batch) -> Tensor` returning the scalar training loss."
        )
    return module.training_step, (batch, 0)


def _batch_loss_method(module: nn.Module) -> Any:
    """``module.loss`` when it is a method callable with one batch, else None."""
    loss = getattr(module, "loss", None)
    if not callable(loss) or isinstance(loss, nn.Module):
        return None
    try:
        inspect.signature(loss).bind(None)
    except TypeError:  # needs other arguments: a helper such as loss(logits, target)
        return None
    except ValueError:  # no signature to read (a builtin): take it at its word
        return loss
    return loss


def batch_samples(batch: Any) -> int:
    """How many samples a batch holds: the leading dim of its first tensor of one or more dims (dict values, list
    items), as Lightning counts them."""
    if isinstance(batch, torch.Tensor) and batch.ndim:
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        values = batch.values()
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # Lightning moves these too
        values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    else:
        values = batch if isinstance(batch, (list, tuple)) else ()
    for value in values:  # 0-d tensors (a step count, say) hold no samples
        try:
            return batch_samples(value)
        except LplError:
            continue
    raise LplError(f"cannot tell how many samples a batch of type {type(batch).__name__} holds: give batches as "
                   "tensors, or dicts / tuples / dataclasses of tensors.")


def loss_weight(batch: Any) -> int:
    """The weight of a batch's mean loss in a mean over a loader: its samples (its ``index`` ids when it carries
    them, else ``batch_samples``), or 1 for a batch whose samples cannot be counted."""
    if isinstance(batch, Mapping) and "index" in batch:
        return len(batch["index"])
    try:
        return batch_samples(batch)
    except LplError:
        return 1


def to_module(batch: Any, module: nn.Module, *, training: bool) -> Any:
    """``batch`` as a loop hands it to ``module``: through a LightningModule's batch-transfer hooks
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``; a DataModule's where
    the Trainer would take its) run as in the training loop (``training``) or the validation loop (its Trainer's
    stage set so for the calls: a hook that transforms only while ``trainer.training`` sees which), on the module's
    device, its floating tensors in the module's dtype when that is not float32 (a ``precision="bf16-true"`` or
    ``"64-true"`` run feeds its module so; mixed precision keeps float32 inputs). Method code computes losses on
    batches it loads itself: they must be what training or validation computed them on."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if _is_lightning_module(module):
        hook = _batch_hook_owner(module)
        with _trainer_stage(module, training):
            batch = hook("on_before_batch_transfer")(batch, 0)
            batch = hook("transfer_batch_to_device")(batch, device, 0)
            batch = hook("on_after_batch_transfer")(batch, 0)
    else:
        batch = move_data_to_device(batch, device)
    if parameter is None or parameter.dtype == torch.float32 or not parameter.is_floating_point():
        return batch
    return _cast_floating(batch, parameter.dtype)


@contextlib.contextmanager
def _trainer_stage(module: nn.Module, training: bool) -> Iterator[None]:
    """The stage of ``module``'s Trainer (if any) set to training or validating for the block, then put back."""
    trainer = getattr(module, "_trainer", None)
    state = getattr(trainer, "state", None)
    if state is None:
        yield
        return
    from lightning.pytorch.trainer.states import RunningStage

    saved = state.stage
    state.stage = RunningStage.TRAINING if training else RunningStage.VALIDATING
    try:
        yield
    finally:
        state.stage = saved


def _is_lightning_module(module: nn.Module) -> bool:
    from lightning.pytorch import LightningModule

    return isinstance(module, LightningModule)


def _batch_hook_owner(module: nn.Module) -> Any:
    """name -> the batch hook the Trainer attached to ``module`` would call (the DataModule's when it overrides the
    hook and the module does not), or the module's own without a Trainer."""
    trainer = getattr(module, "_trainer", None)
    selector = getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)
    return lambda name: getattr(selector.get_instance(name) if selector is not None else module, name)


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(item, dtype) for item in value)
    return value


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then every submodule back in its own mode (``module.train(flag)``
    would set them all alike: a frozen BatchNorm kept in eval inside a training model, say)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
