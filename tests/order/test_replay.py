"""Replay math against brute-force retraining on the tiny Adam task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lpl.order.replay import PROJECTED_METHODS, replay
from lpl.utils.errors import LplError
from test_replay_task import NUM_BATCHES, make_task


@pytest.fixture(scope="module")
def task():
    return make_task(lr=0.001, curvature_rank=2)


@pytest.fixture(scope="module")
def slow_task():
    return make_task(lr=1e-4, curvature_rank=2)


@pytest.mark.parametrize("method", PROJECTED_METHODS)
def test_reference_order_reproduces_the_recording(task, method):
    result = replay(task.data, torch.arange(NUM_BATCHES), method)
    torch.testing.assert_close(result.final_loss, task.data.val_loss[-1:].float())
    torch.testing.assert_close(result.loss_curve[0], task.data.val_loss.float())
    torch.testing.assert_close(result.batch_losses[0], task.data.loss[-1].float())


def test_zeroth_order_is_the_sum_of_update_differences(task):
    data = task.data
    order = torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(0))
    delta = sum(
        float(data.lr[t]) * (data.update[t, t] - data.update[t, int(order[t])]) for t in range(NUM_BATCHES)
    )
    expected = data.val_loss[-1] + data.val_grad[-1] @ delta
    got = replay(data, order, "zeroth_order", control_variates=False).final_loss
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_quadratic_term_adds_half_the_validation_curvature_along_the_displacement():
    task = make_task(lr=0.001, curvature_rank=0, val_curvature_rank=6)
    data = task.data
    order = torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(0))
    delta = sum(
        float(data.lr[t]) * (data.update[t, t] - data.update[t, int(order[t])]) for t in range(NUM_BATCHES)
    )
    coords = data.val_curv_basis @ delta
    linear = data.val_loss[-1] + data.val_grad[-1] @ delta
    expected = linear + 0.5 * coords @ data.val_curv_matrix @ coords
    got = replay(data, order, "zeroth_order", control_variates=False).final_loss
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert (expected - linear).item() > 0  # the validation loss is near a minimum: curvature raises it
    unchanged = replay(data, order, "zeroth_order", control_variates=False, quadratic=False).final_loss
    assert unchanged.item() == pytest.approx(linear.item(), abs=1e-6)
    # the reference order has no displacement, so the quadratic term leaves it exact
    torch.testing.assert_close(replay(data, torch.arange(NUM_BATCHES), "adam").final_loss, data.val_loss[-1:].float())


def test_adam_momentum_gets_a_swap_right_where_the_papers_term_does_not(slow_task):
    """At a tiny learning rate first-order replay is nearly exact: the only error left is the model.
    The paper's term gives each batch only (1 - beta1) of its weight; rebuilding the momentum gives all of it."""
    order = list(range(NUM_BATCHES))
    order[3], order[9] = order[9], order[3]
    reference = slow_task.data.val_loss[-1].item()
    true_change = slow_task.retrain(order)[0] - reference
    adam = replay(slow_task.data, torch.tensor(order), "adam_first_order").final_loss.item() - reference
    paper = replay(slow_task.data, torch.tensor(order), "first_order").final_loss.item() - reference
    assert abs(true_change) > 1e-5
    assert adam == pytest.approx(true_change, rel=0.15)
    assert abs(paper) < 0.5 * abs(true_change)


def test_estimates_track_retraining_better_than_no_change(task):
    generator = torch.Generator().manual_seed(5)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(8)])
    truth = np.array([task.retrain(o.tolist())[0] for o in orders])
    no_change = np.abs(truth - task.data.val_loss[-1].item()).mean()
    for method in ("adam", "adam_first_order"):
        estimate = replay(task.data, orders, method).final_loss.numpy()
        assert spearmanr(estimate, truth)[0] > 0.8
        assert np.abs(estimate - truth).mean() < 0.6 * no_change
    # the end losses of the pool batches follow too
    estimate = replay(task.data, orders[:1], "adam_first_order").batch_losses[0]
    true_end = torch.tensor(task.retrain(orders[0].tolist())[2])
    assert torch.corrcoef(torch.stack([estimate - task.data.loss[-1], true_end - task.data.loss[-1]]))[0, 1] > 0.8


def test_loss_curve_follows_retraining(task):
    order = list(reversed(range(NUM_BATCHES)))
    _, true_curve, _ = task.retrain(order)
    curve = replay(task.data, torch.tensor(order), "adam_first_order").loss_curve[0]
    reference_curve = task.data.val_loss
    assert ((curve - torch.tensor(true_curve)).abs().mean()
            < 0.5 * (reference_curve - torch.tensor(true_curve)).abs().mean())


def test_projected_replay_converges_to_full_space():
    exact = make_task(lr=0.001, curvature_rank=2)
    projected = make_task(lr=0.001, curvature_rank=2, proj_dim=4 * exact.num_params)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(s)) for s in range(6)])
    for method in ("zeroth_order", "adam_first_order"):
        a = replay(exact.data, orders, method).final_loss
        b = replay(projected.data, orders, method).final_loss
        change = (a - exact.data.val_loss[-1]).abs().mean()
        assert (a - b).abs().max() < 0.25 * change


def test_sparse_probes_interpolate_and_keep_the_reference_exact(task):
    sparse = make_task(lr=0.001, curvature_rank=2, probe_every=3)
    assert sparse.data.probe_steps.tolist() == [0, 3, 6, 9, 12]
    result = replay(sparse.data, torch.arange(NUM_BATCHES), "adam_first_order")
    assert result.final_loss.item() == pytest.approx(sparse.data.val_loss[-1].item(), abs=1e-6)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(s)) for s in range(8)])
    dense_estimate = replay(task.data, orders, "adam").final_loss
    sparse_estimate = replay(sparse.data, orders, "adam").final_loss
    assert torch.corrcoef(torch.stack([dense_estimate, sparse_estimate]))[0, 1] > 0.8


def test_shorter_orders_and_repeats(task):
    result = replay(task.data, torch.tensor([[0, 0, 1, 1, 2]]), "adam")
    assert result.loss_curve.shape == (1, 6)
    true_final = task.retrain([0, 0, 1, 1, 2])[0]
    reference = task.data.val_loss[5].item()
    assert abs(result.final_loss.item() - true_final) < abs(reference - true_final) + 1e-4


def test_bad_orders_and_methods_are_clear_errors(task):
    with pytest.raises(LplError, match="batch id 12"):
        replay(task.data, torch.tensor([0, 12]), "adam")
    with pytest.raises(LplError, match="longer than the 12 recorded steps"):
        replay(task.data, torch.zeros(13, dtype=torch.long), "adam")
    with pytest.raises(LplError, match="unknown method"):
        replay(task.data, torch.arange(3), "newton")
    no_curvature = make_task(lr=0.001, curvature_rank=0, steps=3)
    with pytest.raises(LplError, match="curvature_rank"):
        replay(no_curvature.data, torch.arange(3), "first_order")


def test_log_estimates_reports_agreement_and_is_optional(task):
    from lpl.order.estimator import log_estimates

    class Recorder:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((metrics, step))

    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    result = replay(task.data, orders, "adam")
    truth = result.final_loss.tolist()[::-1]
    logger = Recorder()
    summary = log_estimates(logger, result, truth)
    assert summary["order/spearman"] == pytest.approx(spearmanr(result.final_loss.numpy(), truth)[0])
    assert logger.logged[0][0] == summary
    assert "order/mae" not in log_estimates(None, result)


def test_a_diverging_replay_warns_instead_of_returning_silent_nans(task):
    import dataclasses

    from lpl.order.estimator import OrderEstimator

    runaway = dataclasses.replace(task.data, lr=task.data.lr * 1e7)  # corrections amplify at every step
    estimator = OrderEstimator(runaway, method="first_order")
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    with pytest.warns(UserWarning, match="diverged"):
        result = estimator.estimate_many(orders)
    assert not torch.isfinite(result.final_loss).all()
