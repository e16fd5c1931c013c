"""taylor2 calibration in memory-bounded groups of layers prunes exactly as one pass over all layers does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lpl.prune.api as api
from lpl.prune import prune_model
from lpl.prune.api import gram_groups, select_layers
from lpl.prune.blocks import block_grid
from prune_helpers import make_batches
from test_errors import WeightReadDirectly


def gram_bytes(layer: nn.Linear, block_size: tuple[int, int]) -> int:
    rows, cols = block_grid(tuple(layer.weight.shape), block_size)
    return (rows * cols) ** 2 * 8


def test_groups_keep_the_layer_order_and_fit_the_budget(tiny_vit):
    layers = select_layers(tiny_vit, None, None)
    sizes = {name: gram_bytes(layer, (8, 8)) for name, layer in layers.items()}
    budget = max(sizes.values()) + min(sizes.values())
    groups = gram_groups(layers, (8, 8), budget)
    assert len(groups) > 1
    assert [name for group in groups for name in group] == list(layers)
    for group in groups:
        assert len(group) == 1 or sum(sizes[name] for name in group) <= budget
    for first, second in zip(groups, groups[1:]):  # a group closes only when the next layer would not fit
        assert sum(sizes[name] for name in first) + sizes[second[0]] > budget
    assert gram_groups(layers, (8, 8), 0) == [[name] for name in layers]
    assert gram_groups(layers, (8, 8), sum(sizes.values())) == [list(layers)]


@pytest.mark.parametrize("stages", [1, 2])
def test_one_pass_per_group_gives_the_masks_of_a_single_pass(tiny_vit, monkeypatch, stages):
    batches = make_batches(3)
    calls = []

    def loss(model, batch):
        calls.append(1)
        return model.loss(batch)

    whole = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, loss=loss, stages=stages)
    single_pass_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(api, "GRAM_BYTES_PER_PASS", 0)  # every layer in a pass of its own
    groups = len(select_layers(tiny_vit, None, None))
    grouped = prune_model(tiny_vit, iter(batches), block_size=(8, 8), flops_keep=0.5, loss=loss, stages=stages)
    assert len(calls) == single_pass_calls * groups  # a one-shot iterator is kept for the later passes
    assert whole.block_masks.keys() == grouped.block_masks.keys()
    for name, mask in whole.block_masks.items():
        assert torch.equal(mask, grouped.block_masks[name]), name
    assert grouped.flops_keep == pytest.approx(whole.flops_keep)


def test_a_group_of_layers_the_forward_never_calls_stays_dense(monkeypatch):
    monkeypatch.setattr(api, "GRAM_BYTES_PER_PASS", 0)  # "side" (read through F.linear) alone in its pass
    batches = [{"x": torch.randn(8, 16), "y": torch.randint(0, 8, (8,))} for _ in range(2)]
    with pytest.warns(UserWarning, match="never calls them as modules"):
        result = prune_model(WeightReadDirectly(), batches, block_size=(8, 8), flops_keep=0.5)
    assert set(result.block_masks) == {"fc1", "fc2"}
