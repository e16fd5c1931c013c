"""Fixtures of the pruning tests."""

from __future__ import annotations

import pytest
import torch

from prune_helpers import TinyViT, make_batches

torch.set_num_threads(1)


@pytest.fixture
def tiny_vit() -> TinyViT:
    return TinyViT()


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    return make_batches()
