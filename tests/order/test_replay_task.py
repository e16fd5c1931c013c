"""A tiny Adam task with brute-force retraining, shared by the replay, estimator, curriculum and position tests.

Quantities are recorded in full space (identity projection) or with a dense Gaussian stand-in for the Projector;
``retrain(order)`` is the obvious slow reference: train again from the same initial weights in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from sklearn.datasets import load_digits
from torch import nn

from lpl.order.projection import MatrixProjector
from lpl.order.quantities import AdamSnapshot, ProbeContext, probe_pool_batch, probe_validation
from lpl.order.replay import ReplayData

NUM_BATCHES, BATCH_SIZE = 12, 32


@dataclass
class TinyTask:
    data: ReplayData
    retrain: Callable[[list[int]], tuple[float, list[float], list[float]]]  # final, curve, batch losses
    num_params: int


def _digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train = perm[: NUM_BATCHES * BATCH_SIZE]
    val = perm[-300:]
    return x, torch.tensor(y), [train[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for i in range(NUM_BATCHES)], val


def _snapshot(optimizer, params, step):
    group = optimizer.param_groups[0]
    states = [optimizer.state.get(p, {}) for p in params]
    return AdamSnapshot(
        step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
        decoupled=isinstance(optimizer, torch.optim.AdamW),
        exp_avg=[s["exp_avg"].clone() if s else torch.zeros_like(p) for s, p in zip(states, params)],
        exp_avg_sq=[s["exp_avg_sq"].clone() if s else torch.zeros_like(p) for s, p in zip(states, params)],
    )


def make_task(
    lr: float = 0.003, curvature_rank: int = 2, probe_every: int = 1, proj_dim: int | None = None,
    weight_decay: float = 0.0, steps: int = NUM_BATCHES, val_curvature_rank: int = 0,
) -> TinyTask:
    torch.set_num_threads(1)
    x, y, batches, val = _digits()

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def batch_loss(model, b):
        return nn.functional.cross_entropy(model(x[batches[b]]), y[batches[b]])

    def val_loss(model):
        return nn.functional.cross_entropy(model(x[val]), y[val])

    num_params = sum(p.numel() for p in build().parameters())
    projector = MatrixProjector(None if proj_dim is None else torch.randn(
        proj_dim, num_params, generator=torch.Generator().manual_seed(0)) / proj_dim**0.5)

    def run(order, record=False):
        model = build()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        probes, curve = [], []
        for t in range(len(order) + 1):
            with torch.no_grad():
                curve.append(val_loss(model).item())
            if record and (t % probe_every == 0 or t == len(order)):
                ctx = ProbeContext(t, params, _snapshot(optimizer, params, t), projector, curvature_rank,
                                   val_curvature_rank=val_curvature_rank if t == len(order) else 0)
                val_probe = probe_validation(ctx, lambda: val_loss(model))
                pool = [probe_pool_batch(ctx, lambda b=b: batch_loss(model, b)) for b in range(NUM_BATCHES)]
                probes.append((t, pool, val_probe))
            if t == len(order):
                break
            optimizer.zero_grad()
            batch_loss(model, order[t]).backward()
            optimizer.step()
        with torch.no_grad():
            end_losses = [batch_loss(model, b).item() for b in range(NUM_BATCHES)]
        return curve, end_losses, probes

    reference = list(range(steps))
    _, _, probes = run(reference, record=True)

    def per_batch(name):
        if name not in probes[0][1][0]:
            return None
        return torch.stack([torch.stack([d[name] for d in pool]) for _, pool, _ in probes])

    data = ReplayData(
        probe_steps=torch.tensor([t for t, _, _ in probes]),
        lr=torch.full((steps,), lr, dtype=torch.float64),
        reference_order=torch.tensor(reference),
        betas=(0.9, 0.999), weight_decay=weight_decay, decoupled=True,
        update=per_batch("update"), precond_grad=per_batch("precond_grad"), grad=per_batch("grad"),
        loss=per_batch("loss"),
        val_loss=torch.stack([v["val_loss"] for _, _, v in probes]),
        val_grad=torch.stack([v["val_grad"] for _, _, v in probes]),
        curv_basis=per_batch("curv_basis"), curv_update=per_batch("curv_update"),
        curv_precond=per_batch("curv_precond"),
        val_dot_update=per_batch("val_dot_update"), val_dot_precond=per_batch("val_dot_precond"),
        val_curv_basis=probes[-1][2].get("val_curv_basis"), val_curv_matrix=probes[-1][2].get("val_curv_matrix"),
    )

    def retrain(order):
        curve, end_losses, _ = run(list(order))
        return curve[-1], curve, end_losses

    return TinyTask(data=data, retrain=retrain, num_params=num_params)


def test_tiny_task_retrains_deterministically():
    task = make_task(curvature_rank=0, steps=4)
    assert task.retrain([0, 1, 2, 3]) == task.retrain([0, 1, 2, 3])
    assert task.retrain([0, 1, 2, 3])[0] == float(task.data.val_loss[-1])
