"""Budget allocation across layers: how many blocks each layer keeps so total kept FLOPs meet the budget.

- ``allocate_dp``: knapsack over the curve points (dynamic programming on FLOPs quantised to 1/(1000 L) of the
  total, at most 256 evenly spread points a layer): minimises a separable objective with total FLOPs inside
  [budget - 0.5%, budget] of the total, never above the budget.
  The hardware allocation minimises distortion + weighted predicted latency/energy; the uniform allocation
  minimises the spread of densities (so it still meets the budget exactly).
- ``allocate_global``: one ranking of all blocks by score per FLOP (the magnitude-global / OBD-global baselines).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import numpy as np
import torch

from lpl.utils.errors import LplError

# Share of the total FLOPs an allocation may land below the budget (the DP's quantisation: at most another 0.1%).
_WINDOW = 0.005
_MAX_POINTS = 256


def allowed_points(density: torch.Tensor, min_density: float, max_density: float) -> torch.Tensor:
    """Curve points whose density lies in [min_density, max_density] (a small slack for float rounding)."""
    return (density >= min_density - 1e-9) & (density <= max_density + 1e-9)


def check_feasible(flops: list[torch.Tensor], allowed: list[torch.Tensor], budget: float) -> None:
    """Refuse a budget (FLOPs) no choice of allowed curve points can meet, naming the reachable range."""
    lowest = sum(float(f[a].min()) for f, a in zip(flops, allowed) if a.any())
    highest = sum(float(f[a].max()) for f, a in zip(flops, allowed) if a.any())
    if any(not a.any() for a in allowed):
        raise LplError("no block count fits between min_density and max_density for some layer; widen the range.")
    total = sum(float(f[0]) for f in flops)
    # above the highest share, the window below the budget may still hold it (allocations take it there)
    if budget < lowest - 1e-9 * total or highest < budget - (_WINDOW + 1e-9) * total:
        raise LplError(
            f"flops_keep={budget / total:.3f} cannot be met within the per-layer densities (reachable "
            f"{lowest / total:.3f}..{highest / total:.3f}); change flops_keep, min_density or max_density."
        )


def allocate_dp(
    objectives: list[torch.Tensor], flops: list[torch.Tensor], allowed: list[torch.Tensor], budget: float,
    strict: bool = True,
) -> list[int]:
    """Point index per layer minimising sum(objective) with total flops in [budget - 0.5% total, budget] (never above
    the budget; quantisation may land up to another 0.1% below it).

    When block granularity leaves that window empty (few, large blocks), ``strict`` raises an error naming the
    nearest reachable share below the budget; otherwise the allocation takes that nearest share (intermediate
    rounds of a multi-round prune only need to land near their budget).
    """
    check_feasible(flops, allowed, budget)
    total = sum(float(f[0]) for f in flops)
    most = [int(torch.nonzero(ok).flatten()[0]) for ok in allowed]  # the most each layer may keep
    if sum(float(f[p]) for f, p in zip(flops, most)) <= budget * (1 + 1e-12):
        return most  # the budget keeps everything allowed (flops_keep=1), or the most allowed is within the window
    unit = total / (1000.0 * len(flops))
    # FLOPs rounded to the nearest unit find the optimum, but an allocation's true sum may exceed the budget by up to
    # half a unit a layer: the best one in the window that does not; where none, FLOPs rounded up (never over)
    low = max(0, int(math.ceil((budget - _WINDOW * total) / unit)))
    for round_units in (np.rint, np.ceil):
        best, choices = _knapsack(objectives, flops, allowed, budget, unit, round_units)
        window = best[low:]
        for offset in np.argsort(window, kind="stable"):  # the best allocations in the window first
            if not np.isfinite(window[offset]):
                break
            picks = _backtrack(choices, low + int(offset))
            if sum(float(f[p]) for f, p in zip(flops, picks)) <= budget * (1 + 1e-12):
                return picks
    reachable = np.flatnonzero(np.isfinite(best))
    if strict or not len(reachable):
        nearest = (f"; the nearest reachable share below it is {reachable[-1] * unit / total:.3f}"
                   if len(reachable) else "")
        raise LplError(
            f"flops_keep={budget / total:.3f} cannot be met within 0.5% at this block granularity "
            f"(too few, too large blocks){nearest}: use smaller blocks or that flops_keep."
        )
    return _backtrack(choices, int(reachable[-1]))


def _knapsack(objectives: list[torch.Tensor], flops: list[torch.Tensor], allowed: list[torch.Tensor], budget: float,
              unit: float, round_units: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, list[tuple]]:
    """Least total objective for every used number of FLOP units up to the budget's (inf: unreachable), and each
    layer's choices to backtrack."""
    top = int(math.floor(budget / unit + 1e-9))
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    choices = []
    for objective, flop, ok in zip(objectives, flops, allowed):
        candidates = torch.nonzero(ok).flatten().numpy()
        if len(candidates) > _MAX_POINTS:
            candidates = np.unique(np.linspace(candidates[0], candidates[-1], _MAX_POINTS).round().astype(np.int64))
            candidates = candidates[ok.numpy()[candidates]]
        units = round_units(flop.numpy()[candidates] / unit).astype(np.int64)
        values = objective.double().numpy()[candidates]
        new_best = np.full(top + 1, np.inf)
        new_choice = np.full(top + 1, -1, dtype=np.int64)
        for point, used, value in zip(candidates, units, values):
            if used > top:
                continue
            shifted = best[: top + 1 - used] + value
            target = new_best[used:]
            better = shifted < target
            target[better] = shifted[better]
            new_choice[used:][better] = point
        choices.append((new_choice, units, candidates))
        best = new_best
    return best, choices


def _backtrack(choices: list[tuple], used: int) -> list[int]:
    """The point of every layer in the knapsack's best allocation using ``used`` units."""
    picks = []
    for new_choice, units, candidates in reversed(choices):
        point = int(new_choice[used])
        picks.append(point)
        used -= int(units[np.searchsorted(candidates, point)])
    return picks[::-1]


def allocate_uniform(density: list[torch.Tensor], flops: list[torch.Tensor], allowed: list[torch.Tensor],
                     budget: float, strict: bool = True) -> list[int]:
    """Every layer as close as possible to the same density, total FLOPs still on budget."""
    total = sum(float(f[0]) for f in flops)
    target = budget / total
    objectives = [(d.double() - target).square() * float(f[0]) / total for d, f in zip(density, flops)]
    return allocate_dp(objectives, flops, allowed, budget, strict=strict)


def allocate_global(
    scores: list[torch.Tensor], orders: list[torch.Tensor], block_flops: list[torch.Tensor],
    density: list[torch.Tensor], min_density: float, max_density: float, budget: float,
    allowed: list[torch.Tensor] | None = None, strict: bool = True,
) -> list[int]:
    """Remove blocks in one global ascending order of score per FLOP until kept FLOPs reach the budget.

    ``orders`` are the per-layer removal orders (ascending score), ``block_flops`` each block's FLOPs; the result
    is the number of blocks removed per layer (layers never go below ``min_density``, and start at most at
    ``max_density``; ``allowed`` narrows the points further, e.g. to keep earlier removals). Kept FLOPs land in
    [budget - 0.5% of the total, budget]: a block that would take them below stops its layer. When block granularity
    leaves that window empty, ``strict`` raises an error, otherwise the removals go on to just below the budget.
    """
    if allowed is None:
        allowed = [allowed_points(d, min_density, max_density) for d in density]
    flops = [torch.cat([f.sum().reshape(1), f.sum() - torch.cumsum(f[o], 0)]) for f, o in zip(block_flops, orders)]
    check_feasible(flops, allowed, budget)
    total = sum(float(f[0]) for f in flops)
    start = [int(torch.nonzero(a).flatten()[0]) for a in allowed]  # first point within max_density
    floor_point = [int(torch.nonzero(a).flatten()[-1]) for a in allowed]  # last point within min_density
    # each layer removes its blocks in its own order; across layers the next block with the least score per FLOP
    # goes first (a merge: blocks of unequal FLOPs, ragged edges, can rank differently by score and by score per FLOP)
    ratios = [(s[o] / f[o].clamp_min(1e-30)).tolist() for s, o, f in zip(scores, orders, block_flops)]

    def greedy(lowest: float) -> tuple[list[int], float]:
        removed = list(start)
        current = sum(float(f[r]) for f, r in zip(flops, removed))
        queue = [(ratios[layer][r], layer) for layer, r in enumerate(removed) if r < floor_point[layer]]
        heapq.heapify(queue)
        while current > budget and queue:
            _, layer = heapq.heappop(queue)
            position = removed[layer]
            step = float(flops[layer][position] - flops[layer][position + 1])
            if current - step < lowest:  # this block overshoots the window: the layer keeps the rest
                continue
            current -= step
            removed[layer] = position + 1
            if removed[layer] < floor_point[layer]:
                heapq.heappush(queue, (ratios[layer][removed[layer]], layer))
        return removed, current

    removed, current = greedy(budget - _WINDOW * total)
    if current > budget * (1 + 1e-12):
        below, kept = greedy(-math.inf)
        if strict:
            raise LplError(
                f"flops_keep={budget / total:.3f} cannot be met within 0.5% at this block granularity by the global "
                f"ranking (too few, too large blocks; it reaches {kept / total:.3f}): use smaller blocks, that "
                "flops_keep, or allocation 'hardware' / 'uniform' (they search every combination of layer densities).")
        removed = below
    return removed
