"""Distortion curves against brute force: zeroing blocks for real and measuring the loss."""


import pytest
import torch
from torch import nn

from lpl.prune.blocks import expand_block_mask
from lpl.prune.curves import measure_layer_distortion, taylor2_curve
from lpl.utils.stats import rank_correlation
from lpl.prune.importance import collect_statistics
from lpl.utils.loss import module_loss


class QuadraticProbe(nn.Module):
    """loss_i = 1/2 (u . W x_i - t_i)^2 with residuals of +-1 at the current W.

    The loss is quadratic in W and each sample's Hessian equals g_i g_i^T / r_i^2 = g_i g_i^T, so the empirical
    Fisher is the exact Hessian and the second-order distortion must equal the real loss change exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(10, 12, bias=False)
        self.register_buffer("u", torch.randn(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) @ self.u

    def loss(self, batch: dict) -> torch.Tensor:
        return 0.5 * (self(batch["x"]) - batch["t"]).square().mean()


def quadratic_batches(model: QuadraticProbe) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randn(5, 10, generator=generator)
        signs = torch.randint(0, 2, (5,), generator=generator) * 2.0 - 1.0
        with torch.no_grad():
            batches.append({"x": x, "t": model(x) - signs})
    return batches


@torch.no_grad()
def real_loss_change(model, batches, block_mask, block_size):
    original = model.layer.weight.detach().clone()
    dense = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.layer.weight.mul_(expand_block_mask(block_mask, tuple(original.shape), block_size))
    pruned = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.layer.weight.copy_(original)
    return pruned - dense


def test_taylor2_curve_equals_brute_force_on_an_exactly_quadratic_layer():
    model = QuadraticProbe()
    batches = quadratic_batches(model)
    block_size = (4, 4)  # 12 x 10 weight: 3 x 3 blocks, ragged last column
    stats = collect_statistics(model, {"layer": model.layer}, batches, block_size, module_loss)["layer"]
    order, distortion = taylor2_curve(stats.first, stats.gram)
    assert sorted(order.tolist()) == list(range(9))
    for removed in range(10):
        keep = torch.ones(9, dtype=torch.bool)
        keep[order[:removed]] = False
        real = real_loss_change(model, batches, keep.reshape(3, 3), block_size)
        assert float(distortion[removed]) == pytest.approx(real, rel=1e-4, abs=1e-7)


def test_greedy_step_is_the_cheapest_next_block_by_exhaustive_search():
    model = QuadraticProbe()
    batches = quadratic_batches(model)
    stats = collect_statistics(model, {"layer": model.layer}, batches, (4, 4), module_loss)["layer"]
    order, _ = taylor2_curve(stats.first, stats.gram)
    removed: list[int] = []
    for step in range(4):
        def cost(extra):
            keep = torch.ones(9, dtype=torch.bool)
            keep[removed + [extra]] = False
            return real_loss_change(model, batches, keep.reshape(3, 3), (4, 4))
        best = min((k for k in range(9) if k not in removed), key=cost)
        assert cost(int(order[step])) == pytest.approx(cost(best), rel=1e-4, abs=1e-7)
        removed.append(int(order[step]))


def test_per_sample_statistics_match_an_autograd_loop_on_a_vit(tiny_vit, batches):
    layers = {"model.blocks.0.mlp.fc1": tiny_vit.model.blocks[0].mlp.fc1,
              "model.blocks.0.attn.qkv": tiny_vit.model.blocks[0].attn.qkv}
    stats = collect_statistics(tiny_vit, layers, batches, (16, 16), module_loss)
    tiny_vit.eval()
    for name, layer in layers.items():
        weight = layer.weight
        contributions, batch_grads = [], []
        for batch in batches:
            batch_grads.append(torch.autograd.grad(tiny_vit.loss(batch), weight)[0])
            for i in range(len(batch["label"])):
                single = {k: v[i : i + 1] for k, v in batch.items()}
                grad = torch.autograd.grad(tiny_vit.loss(single), weight)[0]
                blocks = (grad * weight).detach().reshape(weight.shape[0] // 16, 16, 2, 16).sum(dim=(1, 3))
                contributions.append(blocks.flatten())
        c = torch.stack(contributions).double()
        torch.testing.assert_close(stats[name].first, c.mean(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[name].gram, c.T @ c / len(c), rtol=1e-4, atol=1e-8)
        g = torch.stack(batch_grads)
        torch.testing.assert_close(stats[name].grad_sq_mean, g.square().mean(0), rtol=1e-4, atol=1e-9)
        assert stats[name].tokens_per_sample == 17  # 16 patches + class token


def test_incremental_update_equals_direct_quadratic_form_for_every_prefix():
    generator = torch.Generator().manual_seed(3)
    c = torch.randn(40, 7, generator=generator, dtype=torch.float64)
    first, gram = c.mean(0), c.T @ c / 40
    order, distortion = taylor2_curve(first, gram)
    for removed in range(8):
        indicator = torch.zeros(7, dtype=torch.float64)
        indicator[order[:removed]] = 1.0
        direct = -(first * indicator).sum() + 0.5 * indicator @ gram @ indicator
        assert float(distortion[removed]) == pytest.approx(float(direct), abs=1e-12)
    # the greedy first choice is the block with the smallest own cost
    own = 0.5 * gram.diagonal() - first
    assert int(order[0]) == int(torch.argmin(own))


def test_measured_layer_distortion_agrees_with_prediction():
    model = QuadraticProbe()
    batches = quadratic_batches(model)
    stats = collect_statistics(model, {"layer": model.layer}, batches, (4, 4), module_loss)["layer"]
    order, distortion = taylor2_curve(stats.first, stats.gram)
    masks = []
    for removed in (1, 3, 5, 7):
        keep = torch.ones(9, dtype=torch.bool)
        keep[order[:removed]] = False
        masks.append(keep.reshape(3, 3))
    weight_before = model.layer.weight.detach().clone()
    loss_up, output_change = measure_layer_distortion(model, model.layer, masks, (4, 4), batches, module_loss)
    torch.testing.assert_close(loss_up.double(), distortion[[1, 3, 5, 7]], rtol=1e-5, atol=1e-7)
    assert (output_change > 0).all()
    assert torch.equal(model.layer.weight, weight_before)
    assert rank_correlation(distortion[[1, 3, 5, 7]].float(), loss_up) == pytest.approx(1.0)


def test_forced_blocks_come_first_and_cost_nothing_once_zero():
    generator = torch.Generator().manual_seed(5)
    c = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    c[:, [1, 4]] = 0.0  # blocks already zeroed contribute nothing
    forced = torch.zeros(6, dtype=torch.bool)
    forced[[1, 4]] = True
    order, distortion = taylor2_curve(c.mean(0), c.T @ c / 30, forced)
    assert set(order[:2].tolist()) == {1, 4}
    assert distortion[2] == 0.0
