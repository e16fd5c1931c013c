"""The first-order and diagonal baselines' statistics against autograd, and every importance end to end."""

from __future__ import annotations

import pytest
import torch

from lpl.prune import prune_model
from lpl.prune.api import select_layers
from lpl.prune.blocks import block_sum
from lpl.prune.importance import IMPORTANCES, block_scores, collect_statistics
from lpl.utils.loss import module_loss


def test_batch_gradient_statistics_match_autograd(tiny_vit, batches):
    layers = select_layers(tiny_vit, None, None)
    stats = collect_statistics(tiny_vit, layers, batches, (8, 8), module_loss, with_gram=False, with_gradients=True)
    grads = {name: [] for name in layers}
    tiny_vit.eval()
    for batch in batches:
        tiny_vit.zero_grad()
        module_loss(tiny_vit, batch).backward()
        for name, layer in layers.items():
            grads[name].append(layer.weight.grad.clone())
    for name, layer in layers.items():
        stacked = torch.stack(grads[name])
        torch.testing.assert_close(stats[name].grad_mean, stacked.mean(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[name].grad_sq_mean, stacked.square().mean(0), rtol=1e-4, atol=1e-10)
        weight = layer.weight.detach()
        obd = 0.5 * block_sum(stacked.square().mean(0) * weight.square(), (8, 8)).flatten()
        torch.testing.assert_close(block_scores(stats[name], weight, "obd"), obd, rtol=1e-4, atol=1e-10)


def test_gradient_statistics_are_skipped_unless_asked_for(tiny_vit, batches):
    layers = select_layers(tiny_vit, None, None)
    stats = collect_statistics(tiny_vit, layers, batches, (8, 8), module_loss, with_gradients=False)
    assert all(s.grad_mean is None and s.grad_sq_mean is None and s.gram is not None for s in stats.values())


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_importance_prunes_to_the_budget(tiny_vit, batches, importance):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, importance=importance)
    assert result.flops_keep == pytest.approx(0.5, abs=0.05)
    assert all(0 < int(mask.sum()) <= mask.numel() for mask in result.block_masks.values())
