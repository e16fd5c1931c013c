"""The random generators of a training step: capture and restore them, and run a forward exactly as a training step
did (its modules' modes and its RNG state), so probes and retraining draw the masks training drew."""

from __future__ import annotations

import contextlib
import random
import types
from typing import Any, Iterator, Mapping

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Every RNG a probe might draw from (dropout, augmentation), to put back exactly afterwards."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the generators to a ``capture_rng`` state (CUDA's only when it was captured with CUDA)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@contextlib.contextmanager
def as_in_training(model: torch.nn.Module, modes: list[bool], rng: Mapping[str, Any]) -> Iterator[None]:
    """Run the enclosed forward as a training step did: every module in its training mode (BatchNorm on batch
    statistics) and the step's RNG state (the same dropout masks); modes are put back afterwards, and buffers are
    never touched: the forward updates copies (swapped back, not copied back, so a graph kept for Hessian-vector
    products stays valid)."""
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    saved = [m.training for m in model.modules()]
    # a probe runs one whole global batch on one rank: its batch statistics are plain BatchNorm's, and SyncBatchNorm
    # must not all-reduce with ranks that probe other batches (or none)
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    for module, mode in zip(model.modules(), modes):
        module.training = mode
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.clone()
    for module in synced:
        module.forward = types.MethodType(torch.nn.modules.batchnorm._BatchNorm.forward, module)
    restore_rng(rng)
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), saved):
            module.training = mode
        for module, name, buffer in buffers:
            module._buffers[name] = buffer
        for module in synced:
            del module.forward


def step_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states a training step on ``device`` draws its dropout masks from."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def same_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two ``step_rng_state`` results are the same generator states."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def set_step_rng_state(states: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Put back ``step_rng_state``'s generators (the CUDA one only on a CUDA device, where it was recorded)."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
