"""Linearised Adam replay against brute-force Adam retraining: exact on a quadratic task, close on an MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_adjoint import NUM_BATCHES, Task

from lpl.order import linearized
from lpl.order.linearized import LinearizedRun, replay_linearized
from lpl.order.quantities import top_curvature

BETAS, EPS = (0.9, 0.999), 1e-8


class Regression:
    """Least squares where every batch shares one design matrix (so one Hessian): gradients are exactly linear in the
    weights and the linearised replay must equal retraining."""

    def __init__(self, weight_decay: float | tuple[float, float], decoupled: bool, lr: float = 0.05) -> None:
        """``weight_decay`` one value, or one for each of two param groups (weights 0-1 and 2-4)."""
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        self.targets = torch.randn(NUM_BATCHES, 16, generator=generator, dtype=torch.float64)
        self.val_x = torch.randn(20, 5, generator=generator, dtype=torch.float64)
        self.val_y = torch.randn(20, generator=generator, dtype=torch.float64)
        self.theta0 = torch.randn(5, generator=generator, dtype=torch.float64)
        self.hessian = self.x.T @ self.x / 16
        self.lr, self.decoupled = lr, decoupled
        self.group_decays = weight_decay if isinstance(weight_decay, tuple) else (weight_decay, weight_decay)
        self.weight_decay = (torch.tensor([weight_decay[0]] * 2 + [weight_decay[1]] * 3, dtype=torch.float64)
                             if isinstance(weight_decay, tuple) else weight_decay)

    def loss(self, theta: torch.Tensor, b: int) -> torch.Tensor:
        return 0.5 * ((self.x @ theta - self.targets[b]) ** 2).mean()

    def grad(self, theta: torch.Tensor, b: int) -> torch.Tensor:
        return self.x.T @ (self.x @ theta - self.targets[b]) / 16

    def val_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.val_x @ theta - self.val_y) ** 2).mean()

    def train(self, order: list[int]) -> list[torch.Tensor]:
        """Weights before each step and after the last, trained by torch's Adam(W) (two param groups)."""
        first, second = (self.theta0[:2].clone().requires_grad_(True), self.theta0[2:].clone().requires_grad_(True))
        kind = torch.optim.AdamW if self.decoupled else torch.optim.Adam
        optimizer = kind([{"params": [first], "weight_decay": self.group_decays[0]},
                          {"params": [second], "weight_decay": self.group_decays[1]}], lr=self.lr, betas=BETAS, eps=EPS)
        out = []
        for b in order:
            out.append(torch.cat([first, second]).detach())
            optimizer.zero_grad()
            self.loss(torch.cat([first, second]), b).backward()
            optimizer.step()
        return out + [torch.cat([first, second]).detach()]

    def run(self, reference: list[int]) -> LinearizedRun:
        weights = self.train(reference)
        steps = len(reference)
        values, vectors = torch.linalg.eigh(self.hessian)
        val_hessian = self.val_x.T @ self.val_x / 20
        val_values, val_vectors = torch.linalg.eigh(val_hessian)
        # the reference run's Adam directions, recomputed from its own gradients
        m, v, updates = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), []
        decay = [self.weight_decay * w for w in weights[:steps]] if not self.decoupled else None
        for s, b in enumerate(reference):
            g = self.grad(weights[s], b) + (decay[s] if decay else 0.0)
            m, v = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g
            bc1, bc2 = 1 - BETAS[0] ** (s + 1), 1 - BETAS[1] ** (s + 1)
            updates.append((m / bc1) / ((v / bc2).sqrt() + EPS))
        return LinearizedRun(
            pool_grads=torch.stack([torch.stack([self.grad(w, b) for b in range(NUM_BATCHES)]) for w in weights]),
            pool_losses=torch.stack([torch.stack([self.loss(w, b) for b in range(NUM_BATCHES)]) for w in weights]),
            hessian_vectors=vectors.T.expand(steps, 5, 5), hessian_values=values.expand(steps, 5),
            reference_updates=torch.stack(updates),
            val_losses=torch.stack([self.val_loss(w) for w in weights]),
            val_grads=torch.stack([self.val_x.T @ (self.val_x @ w - self.val_y) / 20 for w in weights]),
            val_directions=val_vectors.T, val_curvature=val_values,
            lr=torch.full((steps,), self.lr, dtype=torch.float64), betas=BETAS, eps=EPS,
            weight_decay=self.weight_decay, decoupled=self.decoupled,
            coupled_decay=torch.stack(decay) if decay else None,
        )


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adam", "eager_adam"])
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, True), (0.1, True), (0.1, False), ((0.3, 0.0), True),
                                                    ((0.3, 0.0), False)])
def test_exact_when_gradients_are_linear(weight_decay, decoupled, fused, monkeypatch):
    if fused:
        assert linearized._FUSED_ADAM[decoupled] is not None, "this torch has no fused Adam kernel"
    else:  # the fallback for devices or torch builds without torch's fused kernel
        monkeypatch.setitem(linearized._FUSED_ADAM, decoupled, None)
    task = Regression(weight_decay, decoupled)
    reference = list(range(NUM_BATCHES))
    run = task.run(reference)
    generator = torch.Generator().manual_seed(1)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(3)])
    orders = torch.cat([orders, torch.randint(0, NUM_BATCHES, (2, NUM_BATCHES), generator=generator)])  # repeats
    got = replay_linearized(run, orders, displacement=True)
    reference_weights = task.train(reference)
    for i, order in enumerate(orders.tolist()):
        weights = task.train(order)
        true_delta = weights[-1] - reference_weights[-1]
        torch.testing.assert_close(got.displacement[i], true_delta, rtol=1e-9, atol=1e-12)
        assert true_delta.abs().max() > 1e-3  # orders really differ
        # a quadratic validation loss with its full curvature: the final loss is exact
        assert got.final_loss[i].item() == pytest.approx(task.val_loss(weights[-1]).item(), rel=1e-9)
        # curve and batch losses: first order about the reference weights at each step
        for s in (0, NUM_BATCHES // 2):
            expected = run.val_losses[s] + run.val_grads[s] @ (weights[s] - reference_weights[s])
            assert got.loss_curve[i, s].item() == pytest.approx(expected.item(), rel=1e-9)
        expected = run.pool_losses[-1] + run.pool_grads[-1] @ true_delta
        torch.testing.assert_close(got.batch_losses[i], expected, rtol=1e-9, atol=1e-12)


def test_shorter_orders_replay_their_own_steps():
    task = Regression(0.0, True)
    reference = list(range(NUM_BATCHES))
    run = task.run(reference)
    order = [3, 3, 1, 0]
    got = replay_linearized(run, torch.tensor([order]), displacement=True)
    true_delta = task.train(order)[-1] - task.train(reference)[len(order)]
    torch.testing.assert_close(got.displacement[0], true_delta, rtol=1e-9, atol=1e-12)
    assert got.loss_curve.shape == (1, len(order) + 1)
    # no quadratic term before the end: the curvature belongs to theta_T
    expected = run.val_losses[len(order)] + run.val_grads[len(order)] @ true_delta
    assert got.final_loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_reference_order_is_exact_and_chunks_agree(monkeypatch):
    task = Regression(0.0, True)
    reference = list(range(NUM_BATCHES))
    run = task.run(reference)
    same = replay_linearized(run, torch.tensor([reference]), displacement=True)
    assert same.displacement.abs().max() < 1e-12
    assert same.final_loss.item() == pytest.approx(run.val_losses[-1].item(), rel=1e-12)
    orders = torch.stack([torch.randperm(NUM_BATCHES) for _ in range(5)])
    whole = replay_linearized(run, orders)
    monkeypatch.setattr("lpl.order.linearized.CHUNK_ELEMENTS", 2 * 5)  # two orders per chunk
    torch.testing.assert_close(replay_linearized(run, orders).final_loss, whole.final_loss)
    none = replay_linearized(run, orders[:0], displacement=True)  # no order: empty results (torch.cat failed)
    assert none.final_loss.shape == (0,) and none.loss_curve.shape == (0, NUM_BATCHES + 1)
    assert none.batch_losses.shape == (0, run.pool_grads.shape[1]) and none.displacement.shape[0] == 0


def test_mlp_estimates_track_retraining():
    """Nonlinear gradients, low-rank Hessians: ranks orders like retraining and beats "no change" by far."""
    task = Task(lr=0.003)
    reference = list(range(NUM_BATCHES))
    final, trajectory = task.train(reference)
    steps = trajectory.num_steps
    rank = 8
    factors = [top_curvature(lambda x, s=s: task.hvp(trajectory.theta[s], s, x), task.grad(trajectory.theta[s], s),
                             rank, 3 * rank) for s in range(steps)]
    weights = trajectory.theta
    run = LinearizedRun(
        pool_grads=torch.stack([torch.stack([task.grad(w, b) for b in range(NUM_BATCHES)]) for w in weights]),
        pool_losses=torch.zeros(steps + 1, NUM_BATCHES, dtype=torch.float64),
        hessian_vectors=torch.stack([f[0] for f in factors]), hessian_values=torch.stack([f[1] for f in factors]),
        reference_updates=torch.stack([trajectory.update(s, trajectory.exp_avg[s + 1], trajectory.exp_avg_sq[s + 1])
                                       for s in range(steps)]),
        val_losses=torch.full((steps + 1,), final, dtype=torch.float64),  # only the end point is read below
        val_grads=torch.stack([task.grad(w, None) for w in weights]),
        val_directions=torch.zeros(0, weights.shape[1], dtype=torch.float64),
        val_curvature=torch.zeros(0, dtype=torch.float64),
        lr=trajectory.lr, betas=trajectory.betas, eps=trajectory.eps, weight_decay=0.0, decoupled=True,
    )
    generator = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(10)])
    estimate = replay_linearized(run, orders).final_loss.numpy()
    truth = np.array([task.train(o.tolist())[0] for o in orders])
    no_change = np.abs(truth - final).mean()
    assert spearmanr(estimate, truth)[0] > 0.8
    assert np.abs(estimate - truth).mean() < 0.5 * no_change


def _float32(run: LinearizedRun) -> LinearizedRun:
    return LinearizedRun(**{name: value.float() if isinstance(value, torch.Tensor) else value
                            for name, value in vars(run).items()})


@pytest.mark.parametrize("weight_decay,decoupled", [(0.1, True), (0.1, False), ((0.3, 0.0), True), ((0.3, 0.0), False)])
def test_float32_on_cpu_runs_the_compiled_kernel_and_agrees(weight_decay, decoupled, monkeypatch):
    """float32 data on CPU take the compiled kernel (lpl.kernels.cpu.adam_replay_cpu): same estimates as the exact
    float64 replay to float32 rounding, in whole and in chunks."""
    if not linearized.adam_replay_available():
        pytest.skip("no C compiler: the kernel cannot be built")
    task = Regression(weight_decay, decoupled)
    run = task.run(list(range(NUM_BATCHES)))
    generator = torch.Generator().manual_seed(2)
    orders = torch.randint(0, NUM_BATCHES, (6, NUM_BATCHES), generator=generator)
    exact = replay_linearized(run, orders, displacement=True)
    calls = []
    kernel = linearized.adam_replay_cpu
    monkeypatch.setattr(linearized, "adam_replay_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = replay_linearized(_float32(run), orders, displacement=True)
    assert calls
    for name in ("final_loss", "loss_curve", "batch_losses", "displacement"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(exact, name), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(linearized, "KERNEL_CHUNK_ELEMENTS", 2 * 5)  # two orders per chunk
    torch.testing.assert_close(replay_linearized(_float32(run), orders).final_loss, got.final_loss)
    monkeypatch.setenv("LPL_CPU_KERNEL", "torch")  # the torch path on the same float32 data
    calls.clear()
    torch.testing.assert_close(replay_linearized(_float32(run), orders).final_loss, got.final_loss,
                               rtol=1e-5, atol=1e-6)
    assert not calls


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no_kernel"])
def test_stored_rows_stay_bfloat16_only_for_the_kernel(kernel, monkeypatch):
    """Loaded from the sensitivity file (d-sized rows in bfloat16): the kernel reads them narrow (half the memory),
    torch ops get them widened once; both give the same estimates."""
    if kernel and not linearized.adam_replay_available():
        pytest.skip("no C compiler: the kernel cannot be built")
    task = Regression((0.3, 0.0), False)
    run = _float32(task.run(list(range(NUM_BATCHES))))
    stored = {key: value.bfloat16() if key.split("/")[-1] in linearized.NARROW_INPUTS else value
              for key, value in linearized.linearized_tensors(run).items()}
    monkeypatch.setattr(linearized, "adam_replay_available", lambda: kernel)
    loaded = linearized.linearized_from_tensors(stored, linearized.linearized_scalars(run))
    narrow = {name: getattr(loaded, name).dtype for name in linearized.NARROW_INPUTS
              if getattr(loaded, name) is not None}
    assert set(narrow.values()) == {torch.bfloat16 if kernel else torch.float32}
    assert loaded.hessian_values.dtype == loaded.lr.dtype == torch.float32
    orders = torch.randint(0, NUM_BATCHES, (4, NUM_BATCHES), generator=torch.Generator().manual_seed(5))
    widened = LinearizedRun(**{name: value.float() if isinstance(value, torch.Tensor) else value
                               for name, value in vars(loaded).items()})
    monkeypatch.setenv("LPL_CPU_KERNEL", "torch")
    expected = replay_linearized(widened, orders).final_loss
    monkeypatch.delenv("LPL_CPU_KERNEL")
    torch.testing.assert_close(replay_linearized(loaded, orders).final_loss, expected, rtol=1e-5, atol=1e-6)
