"""Curriculum search scored by the estimator, checked by brute-force retraining of the order it finds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpl.order.curriculum import mutate, order_crossover, search
from lpl.order.estimator import OrderEstimator
from lpl.utils.errors import LplError
from test_replay_task import NUM_BATCHES, make_task


@pytest.fixture(scope="module")
def task():
    return make_task(lr=0.003, curvature_rank=2)


def test_operators_keep_permutations():
    generator = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(9, generator=generator) for _ in range(20)])
    b = torch.stack([torch.randperm(9, generator=generator) for _ in range(20)])
    for rows in (order_crossover(a, b, generator), mutate(a, 1.0, generator)):
        assert (rows.sort(dim=1).values == torch.arange(9)).all()


@pytest.mark.parametrize("method", ["genetic", "local"])
def test_found_order_beats_the_median_random_order_when_retrained(task, method):
    estimator = OrderEstimator(task.data, method="adam_first_order")
    result = search(estimator, budget=640, method=method, population=32, seed=1)
    assert sorted(result.order) == list(range(NUM_BATCHES))
    assert result.evaluations <= 640
    assert result.history[-1] == pytest.approx(result.score) and result.history[-1] <= result.history[0]
    generator = torch.Generator().manual_seed(7)
    random_truth = [task.retrain(torch.randperm(NUM_BATCHES, generator=generator).tolist())[0] for _ in range(8)]
    assert task.retrain(result.order)[0] < np.median(random_truth)


def test_non_finite_estimates_rank_last_with_a_warning(task):
    class Diverging:
        """An estimator whose replay blows up for orders starting with batch 0."""

        num_batches = NUM_BATCHES

        def estimate_many(self, orders):
            inner = OrderEstimator(task.data, method="first_order").estimate_many(orders)
            inner.final_loss[orders[:, 0] == 0] = float("nan")
            return inner

    with pytest.warns(UserWarning, match="non-finite"):
        result = search(Diverging(), budget=256, method="local", population=32, seed=0)
    assert np.isfinite(result.score) and result.order[0] != 0

    class AllDiverge(Diverging):
        def estimate_many(self, orders):
            inner = super().estimate_many(orders)
            inner.final_loss[:] = float("nan")
            return inner

    for method in ("genetic", "local"):
        with pytest.warns(UserWarning, match="non-finite"), pytest.raises(LplError, match="no best order"):
            search(AllDiverge(), budget=64, method=method, population=32, seed=0)


def test_search_input_errors(task):
    estimator = OrderEstimator(task.data, method="adam")
    with pytest.raises(LplError, match="unknown search method"):
        search(estimator, budget=100, method="annealing")
    with pytest.raises(LplError, match="budget"):
        search(estimator, budget=10, population=32)
    with pytest.raises(LplError, match="population must be at least 4 for the genetic search"):
        search(estimator, budget=10, population=2)
    with pytest.raises(LplError, match="population must be at least 1"):
        search(estimator, budget=10, method="local", population=0)
    with pytest.raises(LplError, match="budget must be at least 1"):
        search(estimator, budget=0, method="local")
    for seed in (-1, 2**64):  # 2**64 overflowed inside torch
        with pytest.raises(LplError, match=r"seed must be between 0 and 2\*\*63 - 1"):
            search(estimator, budget=64, method="local", seed=seed)


def test_the_local_search_scores_as_many_orders_as_the_budget_allows(task):
    """Its population is only how many orders it scores at once: a budget below it is no error."""
    estimator = OrderEstimator(task.data, method="adam")
    for budget in (1, 3, 40):
        result = search(estimator, budget=budget, method="local", population=16, seed=0)
        assert sorted(result.order) == list(range(NUM_BATCHES)) and result.evaluations <= budget
    assert search(estimator, budget=1, method="local").evaluations == 1


def test_runs_over_one_pool_for_several_epochs_search_orders_of_the_whole_run():
    """A pool of 3 batches trained twice each: candidates keep every batch twice (crossover and mutation)."""

    class TwoEpochs:
        num_batches = 3
        reference_order = torch.tensor([0, 1, 2, 0, 1, 2])

        def estimate_many(self, orders):
            late = (orders[:, 3:] == 0).sum(1).double()  # batch 0 late in the run scores best
            return type("Result", (), {"final_loss": -late - 0.01 * orders[:, 0]})()

    generator = torch.Generator().manual_seed(0)
    parents = torch.stack([TwoEpochs.reference_order[torch.randperm(6, generator=generator)] for _ in range(32)])
    children = order_crossover(parents, parents.flip(0), generator)
    assert (children.sort(1).values == torch.tensor([0, 0, 1, 1, 2, 2])).all()
    result = search(TwoEpochs(), budget=256, population=16, seed=0)
    assert sorted(result.order) == [0, 0, 1, 1, 2, 2] and result.order[3:].count(0) == 2


def test_a_long_search_reports_its_progress(task, monkeypatch):
    """A large budget ran for minutes without a word."""
    import lpl.order.curriculum as curriculum

    lines: list[str] = []
    monkeypatch.setattr(curriculum, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(curriculum, "rank_zero_info", lines.append)
    result = search(OrderEstimator(task.data, method="zeroth_order"), budget=160, population=32, seed=0)
    assert lines and all("/160 orders scored, best estimate" in line for line in lines)
    assert lines[-1].startswith(f"curriculum: {result.evaluations}/160 ")
