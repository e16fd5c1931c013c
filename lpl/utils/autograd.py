"""Autograd settings that method code needs around a user's model, whatever the model was built with."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def eager() -> contextlib.AbstractContextManager:
    """Run torch.compile'd code eagerly in the block (torch >= 2.6; a no-op before): method code calls models in
    ways their compiled graphs were not traced for (hooks on inner layers, double backward)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@contextlib.contextmanager
def double_backward_ready() -> Iterator[None]:
    """Forward passes whose graph allows a second backward (Hessian-vector products): torch.compile'd modules run
    eagerly (a compiled backward refuses create_graph=True) and attention uses the math kernel (the fused
    kernels have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with eager(), sdpa_kernel([SDPBackend.MATH]):
        yield
