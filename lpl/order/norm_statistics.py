"""BatchNorm running statistics as order-dependent state of a training run.

In eval mode a BatchNorm layer normalises with running averages of the batch statistics training fed it, most
recent batches weighted most (momentum 0.1: the last ~20 steps carry 90% of the weight). Which batches came last
is the order, so the validation loss of a model with BatchNorm depends on the order through these statistics as
well as through its weights. This module treats them as one flat vector per model: for every tracked BatchNorm
layer (in ``model.modules()`` order) its running mean, then its running variance.

An order l that reaches step s has running statistics r_s(l) = (1 - mu_s) r_{s-1}(l) + mu_s x_s(l_s), x_s(b) the
statistics batch b yields in training mode at step s. With x_s(b) taken at the reference weights theta_s (zeroth
order in the displacement), r_L(l) - r_L(ref) is a sum over steps of recorded C-sized vectors, and the loss reads
it off through its gradient and top curvature with respect to the running statistics
(``differentiable_running_statistics``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


def _tracked_layers(model: torch.nn.Module) -> list[tuple[str, _BatchNorm, slice]]:
    """(name, layer, its columns in the flat vector) of every BatchNorm layer (any dimension, SyncBatchNorm
    included) that keeps running statistics."""
    layers, offset = [], 0
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            layers.append((name, module, slice(offset, offset + 2 * module.num_features)))
            offset += 2 * module.num_features
    return layers


def tracked_norms(model: torch.nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (any dimension, SyncBatchNorm included) that keep running statistics."""
    return [module for _, module, _ in _tracked_layers(model)]


def running_statistics(model: torch.nn.Module) -> Tensor:
    """The flat running statistics [C] (float32), empty for a model without tracked BatchNorm."""
    parts = [t.detach().float().reshape(-1) for m in tracked_norms(model) for t in (m.running_mean, m.running_var)]
    return torch.cat(parts) if parts else torch.zeros(0)


def load_running_statistics(model: torch.nn.Module, flat: Tensor) -> None:
    """Copy ``running_statistics``-shaped ``flat`` into the model's buffers."""
    offset = 0
    with torch.no_grad():
        for module in tracked_norms(model):
            for buffer in (module.running_mean, module.running_var):
                buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()


def step_momenta(model: torch.nn.Module) -> Tensor:
    """[C]: the weight the coming training step gives its batch statistics in each running statistic (a layer's
    ``momentum``, 1 / (batches tracked + 1) for a cumulative average, 0 for a layer frozen in eval mode)."""
    parts = []
    for module in tracked_norms(model):
        if not module.training:
            weight = 0.0
        elif module.momentum is None:
            weight = 1.0 / (float(module.num_batches_tracked) + 1.0)
        else:
            weight = float(module.momentum)
        parts.append(torch.full((2 * module.num_features,), weight))
    return torch.cat(parts) if parts else torch.zeros(0)


def layer_columns(model: torch.nn.Module) -> dict[str, slice]:
    """Each tracked layer's columns (running mean and variance) in the flat ``running_statistics`` vector."""
    return {name: columns for name, _, columns in _tracked_layers(model)}


def final_weights(momenta: Tensor) -> Tensor:
    """[T, C]: the weight of step t's batch statistics in the running statistics after the last step,
    mu_t prod_{r > t} (1 - mu_r), from ``momenta`` [T, C] (each step's ``step_momenta``)."""
    weights, kept = torch.empty_like(momenta), torch.ones_like(momenta[0])
    for t in reversed(range(momenta.shape[0])):
        weights[t] = momenta[t] * kept
        kept = kept * (1.0 - momenta[t])
    return weights


class BatchStatistics:
    """Hooks that keep, per tracked BatchNorm layer, the statistics the last training-mode forward fed its running
    averages (batch mean, unbiased batch variance, as BatchNorm's update uses them). Use as a context manager and
    call ``take()`` after each forward: the flat [C] vector (zeros for layers in eval mode or not called).
    ``irregular()`` names the layers that did not run in training mode once in every forward (several updates in a
    step, or updates in some steps only: not modelled); ``never_called()`` those no forward ran in training mode
    (their statistics never change)."""

    def __init__(self, model: torch.nn.Module) -> None:
        layers = _tracked_layers(model)
        self.norms = [module for _, module, _ in layers]
        self._names = {id(module): name for name, module, _ in layers}
        self._repeated: set[str] = set()
        self._forwards = 0
        self._calls = {name: 0 for name, _, _ in layers}  # forwards that ran each layer in training mode
        self._latest: dict[int, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: _BatchNorm, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        if module.training:
            if id(module) in self._latest:
                self._repeated.add(self._names[id(module)])
            x = inputs[0].detach().float()
            dims = [0, *range(2, x.dim())]  # every dimension but the channels (dim 1)
            self._latest[id(module)] = torch.cat([x.mean(dims), x.var(dims, correction=1)])

    def take(self) -> Tensor:
        parts = [self._latest.pop(id(m), None) for m in self.norms]
        self._forwards += 1
        for module, part in zip(self.norms, parts):
            self._calls[self._names[id(module)]] += part is not None
        return torch.cat([torch.zeros(2 * m.num_features) if p is None else p.cpu()
                          for m, p in zip(self.norms, parts)]) if parts else torch.zeros(0)

    def irregular(self) -> set[str]:
        return self._repeated | {name for name, calls in self._calls.items() if 0 < calls < self._forwards}

    def never_called(self) -> set[str]:
        return {name for name, calls in self._calls.items() if calls == 0}

    def __enter__(self) -> "BatchStatistics":
        self._handles = [m.register_forward_hook(self._hook) for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._latest.clear()


@contextlib.contextmanager
def differentiable_running_statistics(model: torch.nn.Module, flat: Tensor) -> Iterator[None]:
    """Eval-mode BatchNorm layers normalise with ``flat`` (a ``running_statistics`` vector that may require grad),
    so a loss is differentiable in the running statistics (torch's kernel is not). Training-mode layers are left
    alone (they normalise with batch statistics).

    Each layer's own forward still runs (subclasses that add an activation, as timm's ``BatchNormAct2d`` does, keep
    it): its buffers hold ``flat``'s values, and its input x is replaced by
    (x - mean) * sqrt(running_var + eps) / sqrt(var + eps) + running_mean with (mean, var) from ``flat``, equal to x
    in value, so the layer computes what it would, with gradients to ``flat`` through that input. The buffers keep
    ``flat``'s values afterwards (the graph's backward reads them: restoring them in place would break it)."""
    layers = _tracked_layers(model)
    starts = {id(module): columns.start for _, module, columns in layers}

    def hook(module: _BatchNorm, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if module.training:
            return None
        x, start, channels = inputs[0], starts[id(module)], module.num_features
        shape = [1, channels] + [1] * (x.dim() - 2)
        mean = flat[start : start + channels].to(x.dtype).view(shape)
        var = flat[start + channels : start + 2 * channels].to(x.dtype).view(shape)
        buffer_mean = module.running_mean.to(x.dtype).view(shape)
        buffer_scale = (module.running_var.to(x.dtype).view(shape) + module.eps).sqrt()
        return ((x - mean) * torch.rsqrt(var + module.eps) * buffer_scale + buffer_mean, *inputs[1:])

    load_running_statistics(model, flat.detach())
    handles = [module.register_forward_pre_hook(hook) for _, module, _ in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
