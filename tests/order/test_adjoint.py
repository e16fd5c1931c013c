"""Adjoint sensitivity tables against a slow forward reference and against brute-force retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn

from lpl.order.adjoint import Trajectory, adjoint_vectors, estimate_from_tables, pool_second_moment, swap_tables

NUM_BATCHES, BATCH_SIZE = 10, 32


class Task:
    """A float64 tanh MLP on 8x8 digits trained with Adam(W) in any order; the slow obvious reference."""

    def __init__(self, lr: float, weight_decay: float = 0.0, decoupled: bool = True) -> None:
        x, y = load_digits(return_X_y=True)
        self.x, self.y = torch.tensor(x / 16.0), torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        self.batches = [perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(NUM_BATCHES)]
        self.val = perm[-300:]
        self.lr, self.weight_decay, self.decoupled = lr, weight_decay, decoupled
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
        self.params = list(self.model.parameters())
        self.theta0 = self.flat()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def load(self, theta: torch.Tensor) -> None:
        torch.nn.utils.vector_to_parameters(theta.clone(), self.params)

    def loss(self, b: int) -> torch.Tensor:
        idx = self.batches[b]
        return nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])

    def val_loss(self) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.x[self.val]), self.y[self.val])

    def grad(self, theta: torch.Tensor, b: int | None) -> torch.Tensor:
        self.load(theta)
        loss = self.val_loss() if b is None else self.loss(b)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, self.params)])

    def hvp(self, theta: torch.Tensor, b: int, vector: torch.Tensor) -> torch.Tensor:
        self.load(theta)
        grads = torch.autograd.grad(self.loss(b), self.params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ vector, self.params)])

    def train(self, order: list[int]) -> tuple[float, Trajectory]:
        self.load(self.theta0)
        kind = torch.optim.AdamW if self.decoupled else torch.optim.Adam
        optimizer = kind(self.params, lr=self.lr, weight_decay=self.weight_decay)
        theta, m, v = [], [], []

        def capture():
            theta.append(self.flat())
            states = [optimizer.state.get(p, {}) for p in self.params]
            m.append(torch.cat([s.get("exp_avg", torch.zeros_like(p)).reshape(-1)
                                for s, p in zip(states, self.params)]))
            v.append(torch.cat([s.get("exp_avg_sq", torch.zeros_like(p)).reshape(-1)
                                for s, p in zip(states, self.params)]))

        for b in order:
            capture()
            optimizer.zero_grad()
            self.loss(b).backward()
            optimizer.step()
        capture()
        with torch.no_grad():
            final = float(self.val_loss())
        trajectory = Trajectory(torch.stack(theta), torch.stack(m), torch.stack(v),
                                torch.full((len(order),), self.lr, dtype=torch.float64), (0.9, 0.999), 1e-8,
                                self.weight_decay, self.decoupled)
        return final, trajectory


def _tables(task: Task, trajectory: Trajectory, targets: torch.Tensor) -> torch.Tensor:
    reference = list(range(trajectory.num_steps))
    hvp = lambda s, x: torch.stack([task.hvp(trajectory.theta[s], reference[s], row) for row in x])  # noqa: E731
    adjoints = adjoint_vectors(trajectory, hvp, targets)
    grads = lambda t: torch.stack([task.grad(trajectory.theta[t], b) for b in range(NUM_BATCHES)])  # noqa: E731
    return swap_tables(trajectory, grads, adjoints)


def _forward_reference(task: Task, trajectory: Trajectory, order: list[int], target: torch.Tensor) -> float:
    """<target, delta theta_T> of the linear model, run forwards step by step with explicit moment recursions."""
    beta1, beta2 = trajectory.betas
    eps, steps = trajectory.eps, trajectory.num_steps
    reference = list(range(steps))
    m, v = trajectory.exp_avg, trajectory.exp_avg_sq

    def updates_after_swap(t: int, b: int) -> list[torch.Tensor]:
        """Adam's updates at steps t.. when batch b's gradient is fed at step t and the reference's afterwards."""
        moment, second, out = m[t].clone(), v[t].clone(), []
        for s in range(t, steps):
            g = task.grad(trajectory.theta[s], b if s == t else reference[s])
            if not trajectory.decoupled:
                g = g + trajectory.weight_decay * trajectory.theta[s]
            moment = beta1 * moment + (1 - beta1) * g
            second = beta2 * second + (1 - beta2) * g * g
            bc1, bc2 = 1 - beta1 ** (s + 1), 1 - beta2 ** (s + 1)
            out.append(-trajectory.lr[s] * (moment / bc1) / ((second / bc2).sqrt() + eps))
        return out

    injected = [torch.zeros_like(target) for _ in range(steps)]
    for t in range(steps):
        for s, (new, old) in enumerate(zip(updates_after_swap(t, order[t]), updates_after_swap(t, reference[t])), t):
            injected[s] += new - old
    delta, dm = torch.zeros_like(target), torch.zeros_like(target)
    for s in range(steps):
        curvature = task.hvp(trajectory.theta[s], reference[s], delta)
        if not trajectory.decoupled:
            curvature = curvature + trajectory.weight_decay * delta
        dm = beta1 * dm + (1 - beta1) * curvature
        bc1, bc2 = 1 - beta1 ** (s + 1), 1 - beta2 ** (s + 1)
        keep = 1 - trajectory.lr[s] * trajectory.weight_decay if trajectory.decoupled else 1.0
        second = v[s + 1] if trajectory.pool_sq is None else torch.maximum(v[s + 1], trajectory.pool_sq[s])
        delta = keep * delta - trajectory.lr[s] * (dm / bc1) / ((second / bc2).sqrt() + eps) + injected[s]
    return float(target @ delta)


def _pool_second_moment(task: Task, trajectory: Trajectory) -> torch.Tensor:
    """The slow obvious version: Adam's second-moment recursion fed the pool-mean squared gradient at every step."""
    second, rows = torch.zeros(trajectory.theta.shape[1], dtype=torch.float64), []
    for t in range(trajectory.num_steps):
        mean_sq = sum(task.grad(trajectory.theta[t], b) ** 2 for b in range(NUM_BATCHES)) / NUM_BATCHES
        second = 0.999 * second + 0.001 * mean_sq
        rows.append(second)
    return torch.stack(rows)


@pytest.mark.parametrize("weight_decay,decoupled,pool", [(0.0, True, True), (0.0, True, False), (0.05, True, True),
                                                         (0.05, False, False)])
def test_tables_equal_the_forward_linear_model(weight_decay, decoupled, pool):
    task = Task(lr=0.003, weight_decay=weight_decay, decoupled=decoupled)
    steps = 6
    _, trajectory = task.train(list(range(steps)))
    if pool:
        trajectory.pool_sq = _pool_second_moment(task, trajectory)
        grads = lambda t: torch.stack([task.grad(trajectory.theta[t], b) for b in range(NUM_BATCHES)])  # noqa: E731
        torch.testing.assert_close(pool_second_moment(trajectory, grads), trajectory.pool_sq)
    targets = torch.randn(2, trajectory.theta.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tables = _tables(task, trajectory, targets)
    assert tables.shape == (2, steps, NUM_BATCHES)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        order = torch.randint(0, NUM_BATCHES, (steps,), generator=generator).tolist()
        got = (tables[:, torch.arange(steps), order] - tables[:, torch.arange(steps), torch.arange(steps)]).sum(1)
        for i in range(2):
            expected = _forward_reference(task, trajectory, order, targets[i])
            assert got[i].item() == pytest.approx(expected, rel=1e-8, abs=1e-12)
            assert abs(expected) > 1e-6  # the check is not vacuous


def test_estimates_track_retraining_and_keep_the_reference_exact():
    task = Task(lr=0.001)
    reference = list(range(NUM_BATCHES))
    final, trajectory = task.train(reference)
    trajectory.pool_sq = _pool_second_moment(task, trajectory)
    val_grad = task.grad(trajectory.theta[-1], None)
    tables = _tables(task, trajectory, val_grad[None])
    curvature = torch.zeros(0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(10)])
    estimate = estimate_from_tables(tables, curvature, final, orders, torch.tensor(reference)).numpy()
    truth = np.array([task.train(o.tolist())[0] for o in orders])
    assert estimate_from_tables(tables, curvature, final, torch.tensor([reference]),
                                torch.tensor(reference)).item() == final
    no_change = np.abs(truth - final).mean()
    assert spearmanr(estimate, truth)[0] > 0.8
    assert np.abs(estimate - truth).mean() < 0.5 * no_change


def test_curvature_tables_add_the_quadratic_term():
    tables = torch.tensor([[[0.0, 1.0], [0.0, 2.0]], [[0.0, 3.0], [0.0, -1.0]]])  # [1 + 1, T = 2, nb = 2]
    reference = torch.tensor([0, 0])
    got = estimate_from_tables(tables, torch.tensor([4.0]), 1.5, torch.tensor([[1, 0], [1, 1]]), reference)
    # order [1, 0]: linear 1, coordinate 3; order [1, 1]: linear 3, coordinate 2
    torch.testing.assert_close(got, torch.tensor([1.5 + 1 + 0.5 * 4 * 9, 1.5 + 3 + 0.5 * 4 * 4]))
