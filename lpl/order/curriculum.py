"""Curriculum search: find a batch order with low estimated validation loss, scoring candidates with an estimator.

Every candidate is scored by ``OrderEstimator.estimate_many`` in batches, so thousands of orders cost seconds.
Two searches: ``genetic`` (the paper's: order crossover, swap/insertion mutation, tournament selection, elitism) and
``local`` (cheaper: hill climbing from the best random order by batched random swaps and moves).
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lpl.order.position import id_list
from lpl.utils.errors import LplError

if TYPE_CHECKING:
    from lpl.order.estimator import OrderEstimator

SEARCH_METHODS = ("genetic", "local")


@dataclass
class SearchResult:
    """``order``: the best order found; ``score``: its estimated final validation loss; ``history``: best score
    after each generation/round; ``evaluations``: orders scored."""

    order: list[int]
    score: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0


def _score(estimator: OrderEstimator, orders: Tensor, chunk: int = 512, stacklevel: int = 3) -> Tensor:
    """Estimated final losses; a non-finite estimate (a diverging replay) ranks last instead of poisoning the min.
    ``stacklevel`` points the warning at the caller of ``search``."""
    scores = torch.cat([estimator.estimate_many(orders[i : i + chunk]).final_loss.cpu()
                        for i in range(0, len(orders), chunk)])
    bad = ~torch.isfinite(scores)
    if bad.any():
        warnings.warn(f"curriculum: {int(bad.sum())} of {len(scores)} orders got a non-finite estimate (the replay "
                      f"of method {getattr(estimator, 'method', '?')!r} diverges for them); they rank last. Check the "
                      "methods against retraining (`lpl check-methods`) for one that holds on this run.",
                      stacklevel=stacklevel)
        scores = scores.masked_fill(bad, float("inf"))
    return scores


def order_crossover(a: Tensor, b: Tensor, generator: torch.Generator) -> Tensor:
    """OX1 on rows that order one multiset of batches (a batch may repeat, as in runs of several epochs over one
    pool): keep a random slice of each ``a`` row, fill the rest in ``b``'s order, each batch as often as it is
    missing. [N, L] each."""
    n, length = a.shape
    cuts = torch.sort(torch.randint(0, length + 1, (n, 2), generator=generator), dim=1).values
    children = torch.empty_like(a)
    for row in range(n):
        lo, hi = int(cuts[row, 0]), int(cuts[row, 1])
        kept = a[row, lo:hi]
        missing = Counter(kept.tolist())
        rest = []
        for item in b[row].tolist():
            if missing[item]:
                missing[item] -= 1
            else:
                rest.append(item)
        children[row] = torch.cat([kept.new_tensor(rest[:lo]), kept, kept.new_tensor(rest[lo:])])
    return children


def mutate(orders: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """With probability ``rate`` per row, swap two positions; with the same probability, move one batch elsewhere."""
    orders = orders.clone()
    n, length = orders.shape
    for row in range(n):
        if float(torch.rand((), generator=generator)) < rate:
            i, j = torch.randint(0, length, (2,), generator=generator).tolist()
            orders[row, [i, j]] = orders[row, [j, i]]
        if float(torch.rand((), generator=generator)) < rate:
            i, j = torch.randint(0, length, (2,), generator=generator).tolist()
            item = orders[row, i].clone()
            rest = torch.cat([orders[row, :i], orders[row, i + 1 :]])
            orders[row] = torch.cat([rest[:j], item[None], rest[j:]])
    return orders


PROGRESS_SECONDS = 5.0  # a long search says how far it is at most this often


class _SearchLog:
    """Each generation's best score to the logger, and a progress line every few seconds of a long search."""

    def __init__(self, logger: Any, budget: int) -> None:
        self.logger, self.budget = logger, budget
        self.started = self.reported = time.perf_counter()

    def __call__(self, step: int, best: float, evaluations: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics({"curriculum/best_estimated_loss": best, "curriculum/evaluations": evaluations},
                                    step=step)
        now = time.perf_counter()
        if now - self.reported >= PROGRESS_SECONDS:
            self.reported = now
            rank_zero_info(f"curriculum: {evaluations}/{self.budget} orders scored, best estimate {best:.6g} "
                           f"({now - self.started:.0f} s)")


def search(
    estimator: OrderEstimator,
    *,
    budget: int = 2000,
    method: str = "genetic",
    population: int = 64,
    mutation_rate: float = 0.3,
    seed: int = 0,
    batches: list[int] | None = None,
    logger: Any = None,
) -> SearchResult:
    """Search permutations of the reference order (every pool batch as often as the run trained it; or of
    ``batches``) for the lowest estimated final validation loss.

    ``budget``: number of orders scored (the initial random population included). ``population``: orders per
    generation of the genetic search; the local search scores up to that many random orders first and that many
    neighbours per round (fewer when the budget is smaller). ``logger``: a Lightning logger (e.g. WandbLogger) to log
    the best score per generation; optional.

    Example::

        best = search(OrderEstimator.from_recording(path, method="adam"), budget=4000)
        truth = retrain(path, best.order)
    """
    population = _check_search_arguments(method, budget, population, mutation_rate, seed)
    items = _items_to_order(estimator, batches)
    generator = torch.Generator().manual_seed(seed)
    pop = torch.stack([items[torch.randperm(items.numel(), generator=generator)] for _ in range(population)])
    scores = _score(estimator, pop)
    log = _SearchLog(logger, budget)
    log(0, float(scores.min()), population)
    if method == "genetic":
        pop, scores, history, evaluations = _genetic(estimator, pop, scores, budget, mutation_rate, generator, log)
    else:
        pop, scores, history, evaluations = _local(estimator, pop, scores, budget, generator, log)
    best = int(scores.argmin())
    _check_best(estimator, scores[best : best + 1])
    return SearchResult(order=pop[best].tolist(), score=float(scores[best]), history=history, evaluations=evaluations)


def _check_search_arguments(method: str, budget: int, population: int, mutation_rate: float, seed: int) -> int:
    """Refuse unusable arguments; returns the population (the local search scores at most ``budget`` at once)."""
    if method not in SEARCH_METHODS:
        raise LplError(f"unknown search method {method!r}; choose one of {', '.join(SEARCH_METHODS)}.")
    for name, value in (("budget", budget), ("population", population), ("seed", seed)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise LplError(f"{name} must be a whole number, got {value!r}.")
    if not 0 <= seed < 2**63:  # torch's generators take a signed 64-bit seed (a larger one overflowed inside torch)
        raise LplError(f"seed must be between 0 and 2**63 - 1, got {seed}.")
    if not (isinstance(mutation_rate, numbers.Real) and 0.0 <= mutation_rate <= 1.0):
        raise LplError(f"mutation_rate is a probability per child, between 0 and 1; got {mutation_rate!r}.")
    if method == "genetic":
        if population < 4:
            raise LplError(f"population must be at least 4 for the genetic search, got {population}.")
        if budget < population:
            raise LplError(f"budget ({budget}) must be at least the population ({population}): it counts scored "
                           "orders.")
        return population
    # the local search's "population" is only how many orders it scores at once
    if population < 1:
        raise LplError(f"population must be at least 1, got {population}.")
    if budget < 1:
        raise LplError(f"budget must be at least 1 (it counts scored orders), got {budget}.")
    return min(population, budget)


def _items_to_order(estimator: OrderEstimator, batches: list[int] | None) -> Tensor:
    """The batches every candidate orders: ``batches``, else the reference order's (an estimator that does not hold
    it orders each pool batch once)."""
    if batches is not None:
        items = torch.tensor(id_list(batches, "batches"), dtype=torch.long)
    else:
        reference = getattr(estimator, "reference_order", None)
        items = (torch.arange(estimator.num_batches) if reference is None
                 else torch.as_tensor(reference, dtype=torch.long).flatten().cpu())
    if items.numel() < 2:
        raise LplError("a curriculum search needs at least two batches to order.")
    return items


def _genetic(estimator: OrderEstimator, pop: Tensor, scores: Tensor, budget: int, mutation_rate: float,
             generator: torch.Generator, log: _SearchLog) -> tuple[Tensor, Tensor, list[float], int]:
    """Generations of order crossover and mutation of tournament winners, keeping the best eighth (elitism), while
    the budget lasts. Returns the last population, its scores, the best score per generation, orders scored."""
    population = pop.shape[0]
    evaluations, history = population, [float(scores.min())]
    elite = max(1, population // 8)
    count = population - elite
    while evaluations + count <= budget:
        ranked = scores.argsort()
        pop, scores = pop[ranked], scores[ranked]

        def tournament() -> Tensor:  # the better of two random members
            pairs = torch.randint(0, population, (count, 2), generator=generator)
            return pop[pairs.min(dim=1).values]  # pop is sorted: the lower index is the better

        children = mutate(order_crossover(tournament(), tournament(), generator), mutation_rate, generator)
        child_scores = _score(estimator, children, stacklevel=4)
        evaluations += count
        pop = torch.cat([pop[:elite], children])
        scores = torch.cat([scores[:elite], child_scores])
        history.append(float(scores.min()))
        log(len(history) - 1, history[-1], evaluations)
    return pop, scores, history, evaluations


def _local(estimator: OrderEstimator, pop: Tensor, scores: Tensor, budget: int, generator: torch.Generator,
           log: _SearchLog) -> tuple[Tensor, Tensor, list[float], int]:
    """Hill climbing from the best initial order: each round scores as many random swap/move neighbours as the
    initial population and moves to the best if it improves. Same returns as ``_genetic`` (a population of one)."""
    population, length = pop.shape
    evaluations, history = population, [float(scores.min())]
    best = int(scores.argmin())
    current, current_score = pop[best], float(scores[best])
    while evaluations + population <= budget:
        neighbours = mutate(current.expand(population, length), 1.0, generator)
        neighbour_scores = _score(estimator, neighbours, stacklevel=4)
        evaluations += population
        i = int(neighbour_scores.argmin())
        if float(neighbour_scores[i]) < current_score:
            current, current_score = neighbours[i], float(neighbour_scores[i])
        history.append(current_score)
        log(len(history) - 1, current_score, evaluations)
    return current[None], torch.tensor([current_score]), history, evaluations


def _check_best(estimator: OrderEstimator, best_score: Tensor) -> None:
    """Refuse a search where every estimate diverged; warn when the best lies far outside the reference run."""
    if not torch.isfinite(best_score).all():
        raise LplError(f"curriculum: every order searched got a non-finite estimate (method "
                       f"{getattr(estimator, 'method', '?')!r} diverges on this run), so there is no best order; "
                       "check the methods against retraining (`lpl check-methods`) and search with one that holds.")
    outside = getattr(estimator, "far_outside_the_run", None)
    if outside is not None and bool(outside(best_score).any()):
        warnings.warn(f"curriculum: the best order's estimate {float(best_score[0]):.4g} lies far outside the "
                      f"validation losses of the reference run: the search found where method "
                      f"{getattr(estimator, 'method', '?')!r} extrapolates worst, not a better order. Check the "
                      "methods against retraining (`lpl check-methods`) and search with one that holds.",
                      stacklevel=3)
