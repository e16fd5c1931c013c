"""Per-layer distortion curves over nested block masks, their hardware costs, and a check against reality.

A curve removes the blocks of one layer in a fixed order (nested masks); ``distortion[j]`` is the predicted loss
increase after the first j removals, ``flops[j]``, ``latency[j]``, ``energy[j]`` what the layer then costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from lightning.fabric.utilities.apply_func import move_data_to_device
import torch
from torch import nn

from lpl.prune.blocks import block_elements, block_grid, expand_block_mask
from lpl.prune.hardware import HardwareProfile
from lpl.prune.importance import LossFn
from lpl.utils.loss import eval_mode


@dataclass
class LayerCurve:
    """Nested pruning order of one layer and what each point predicts (index j = blocks removed)."""

    order: torch.Tensor       # [K] flat block indices (row-major over [R, C]), first removed first
    distortion: torch.Tensor  # [K + 1] predicted loss increase
    flops: torch.Tensor       # [K + 1] kept FLOPs per sample
    latency: torch.Tensor     # [K + 1] predicted seconds per call
    energy: torch.Tensor      # [K + 1] predicted joules per call
    density: torch.Tensor     # [K + 1] retained share of the layer's elements

    def mask(self, removed: int, grid: tuple[int, int]) -> torch.Tensor:
        """Block mask [R, C] after removing the first ``removed`` blocks of the order."""
        keep = torch.ones(grid[0] * grid[1], dtype=torch.bool)
        keep[self.order[:removed]] = False
        return keep.reshape(grid)


def taylor2_curve(
    first: torch.Tensor, gram: torch.Tensor, forced: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy order and exact second-order distortion of removing blocks one at a time.

    With S the removed set, delta(S) = -sum_{k in S} first_k + 1/2 sum_{k, l in S} gram_kl. Adding block k raises
    it by -first_k + (gram 1_S)_k + 1/2 gram_kk: the incremental update keeps gram 1_S (O(K) per step), picks the
    block with the smallest increase, and accumulates the exact delta (cross terms included). Blocks in ``forced``
    (already pruned in an earlier round) are removed first. ``gram`` is symmetric (a sum of c c^T, as
    ``collect_statistics`` builds it): its rows are read as they are, without a symmetrised copy (half the time).
    """
    # numpy, not torch: the loop is K sequential steps over K-vectors, where per-op dispatch cost dominates.
    gram_np = gram.detach().double().cpu().numpy()  # a view of a float64 CPU gram, no copy
    own = 0.5 * np.diagonal(gram_np) - first.detach().double().cpu().numpy()
    size = own.size
    forced_np = forced.flatten().cpu().numpy() if forced is not None else np.zeros(size, dtype=bool)
    num_forced = int(forced_np.sum())
    cross = np.zeros(size)
    # +inf marks blocks that cannot be chosen: removed ones, and unforced ones while forced ones remain.
    penalty = np.where(forced_np, 0.0, np.inf) if num_forced else np.zeros(size)
    increase = np.empty(size)
    order = np.empty(size, dtype=np.int64)
    distortion = np.zeros(size + 1)
    for step in range(size):
        if step == num_forced and num_forced:
            penalty[~forced_np] = 0.0
        np.add(own, cross, out=increase)
        increase += penalty
        block = int(increase.argmin())
        order[step] = block
        distortion[step + 1] = distortion[step] + increase[block]
        penalty[block] = np.inf
        cross += gram_np[block]
    return torch.from_numpy(order), torch.from_numpy(distortion)


def additive_curve(scores: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Order by ascending score (``forced`` blocks first); the distortion of a set is the sum of its scores."""
    key = scores.double().clone()
    if forced is not None:
        key[forced.flatten()] = -float("inf")
    order = torch.argsort(key, stable=True)
    distortion = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(scores.double()[order], 0)])
    return order, distortion


def build_curve(
    order: torch.Tensor,
    distortion: torch.Tensor,
    shape: tuple[int, int],
    block_size: tuple[int, int],
    tokens_per_sample: float,
    profile: HardwareProfile,
    tokens_per_call: int,
    dtype: torch.dtype,
) -> LayerCurve:
    """Attach FLOPs, predicted latency/energy and density to every point of a removal order."""
    rows, cols = block_grid(shape, block_size)
    elements = block_elements(shape, block_size).flatten().double()
    removed_elements = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(elements[order], 0)])
    kept_elements = elements.sum() - removed_elements
    # Block rows still launched after j removals: a row stops once its last block is removed.
    position = np.empty(order.numel(), dtype=np.int64)
    position[order.numpy()] = np.arange(order.numel())
    last_removal = position.reshape(rows, cols).max(axis=1)
    rows_launched = rows - np.bincount(last_removal + 1, minlength=order.numel() + 1).cumsum()
    kept_blocks = np.arange(order.numel(), -1, -1)
    latency, energy = profile.predict_counts(kept_blocks, rows_launched, tokens_per_call, block_size, dtype)
    costs = np.stack([latency, energy], axis=1)
    costs[0] = profile.predict_dense(shape[0], shape[1], tokens_per_call, dtype)  # an unpruned layer stays dense
    return LayerCurve(
        order=order,
        distortion=distortion,
        flops=2.0 * tokens_per_sample * kept_elements,
        latency=torch.from_numpy(costs[:, 0]),
        energy=torch.from_numpy(costs[:, 1]),
        density=kept_elements / elements.sum(),
    )


@torch.no_grad()
def measure_layer_distortion(
    model: nn.Module,
    layer: nn.Linear,
    block_masks: list[torch.Tensor],
    block_size: tuple[int, int],
    batches: Iterable[Any],
    loss_fn: LossFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real effect of each block mask on one layer, everything else dense, over the calibration batches.

    Returns (loss increase [P], mean squared change of the layer's output [P]); the weight is restored after.
    """
    device = layer.weight.device
    batches = [move_data_to_device(batch, device) for batch in batches]
    original = layer.weight.detach().clone()
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    try:
        with eval_mode(model):  # every module's own mode comes back after
            dense_outputs, dense_loss = [], 0.0
            for batch in batches:
                outputs.clear()
                dense_loss += float(loss_fn(model, batch))
                dense_outputs.append(outputs[0])
            loss_increase, output_change = [], []
            for block_mask in block_masks:
                kept = expand_block_mask(block_mask.to(device), tuple(original.shape), block_size)
                layer.weight.copy_(original * kept)
                total_loss, total_change, count = 0.0, 0.0, 0
                for batch, dense in zip(batches, dense_outputs):
                    outputs.clear()
                    total_loss += float(loss_fn(model, batch))
                    total_change += float((outputs[0] - dense).float().square().sum())
                    count += dense.numel()
                loss_increase.append((total_loss - dense_loss) / len(batches))
                output_change.append(total_change / count)
    finally:
        layer.weight.copy_(original)
        handle.remove()
    return torch.tensor(loss_increase), torch.tensor(output_change)
