"""Every user mistake gets a clear LplError."""

import pytest
import torch
from torch import nn

from lpl.prune import PruneResult, apply_masks, prune_model
from lpl.utils.errors import LplError

from prune_helpers import TinyViT


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.2])
def test_flops_keep_outside_unit_interval(tiny_vit, batches, keep):
    with pytest.raises(LplError, match="flops_keep"):
        prune_model(tiny_vit, batches, flops_keep=keep)


@pytest.mark.parametrize("block", [(0, 8), (8, -2), (64, 8), (8, 200)])
def test_block_size_not_positive_or_larger_than_a_layer(tiny_vit, batches, block):
    with pytest.raises(LplError, match="block_size"):
        prune_model(tiny_vit, batches, block_size=block)


def test_include_exclude_matching_no_linear(tiny_vit, batches):
    with pytest.raises(LplError, match="match no Linear"):
        prune_model(tiny_vit, batches, include=["*.nothing"])
    with pytest.raises(LplError, match="match no Linear"):
        prune_model(tiny_vit, batches, exclude=["*"])


def test_empty_calibration_loader(tiny_vit):
    with pytest.raises(LplError, match="no batches"):
        prune_model(tiny_vit, [])


def test_model_without_trainable_weights(tiny_vit, batches):
    tiny_vit.requires_grad_(False)
    with pytest.raises(LplError, match="no trainable weights"):
        prune_model(tiny_vit, batches)


def test_densities_inverted_or_budget_unreachable(tiny_vit, batches):
    with pytest.raises(LplError, match="min_density"):
        prune_model(tiny_vit, batches, min_density=0.6, max_density=0.4)
    with pytest.raises(LplError, match="cannot be met"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.2, min_density=0.5)
    with pytest.raises(LplError, match="cannot be met"):
        prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.95, max_density=0.6)


def test_bad_importance_allocation_and_loss(tiny_vit, batches):
    with pytest.raises(LplError, match="importance"):
        prune_model(tiny_vit, batches, importance="random")
    with pytest.raises(LplError, match="allocation"):
        prune_model(tiny_vit, batches, allocation="greedy")
    with pytest.raises(LplError, match="loss"):
        prune_model(tiny_vit, batches, loss="hinge")


def test_saved_result_on_a_model_with_other_layers_or_shapes(tiny_vit, batches, tmp_path):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result.save(tmp_path / "r")
    loaded = PruneResult.load(tmp_path / "r")
    with pytest.raises(LplError, match="shape"):
        apply_masks(TinyViT(embed_dim=48), loaded)
    other_names = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(LplError, match="does not have"):
        apply_masks(other_names, loaded)
    with pytest.raises(LplError, match="not a saved PruneResult"):
        PruneResult.load(tmp_path / "missing")
