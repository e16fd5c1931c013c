"""The recorded quantities against torch.optim and brute-force derivatives."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from lpl.order import quantities
from lpl.order.projection import MatrixProjector, Projector
from lpl.order.quantities import (
    AdamSnapshot, ProbeContext, adam_terms, probe_pool_batch, probe_pool_batches, probe_validation,
)


def DenseProjector(dim_in: int, proj_dim: int, seed: int = 0) -> MatrixProjector:
    """A materialised Gaussian projection: the reference the real Projector must agree with."""
    generator = torch.Generator().manual_seed(seed)
    return MatrixProjector(torch.randn(proj_dim, dim_in, generator=generator) / proj_dim**0.5)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(4)]
    return model, batches


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _hessian(params, batch):
    """The loss Hessian of the _problem network over its flat parameters, by brute-force autograd."""
    def loss_at(vector):
        chunks, offset = [], 0
        for p in params:
            chunks.append(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        x, y = batch
        return nn.functional.cross_entropy(torch.tanh(x @ chunks[0].T + chunks[1]) @ chunks[2].T + chunks[3], y)

    return torch.autograd.functional.hessian(loss_at, torch.cat([p.detach().reshape(-1) for p in params]))


def _fresh_adam(model):
    """The model's parameters and the Adam state before its first step (zero moments)."""
    params = list(model.parameters())
    zeros = [torch.zeros_like(p) for p in params]
    return params, AdamSnapshot(0, 0.01, (0.9, 0.999), 1e-8, 0.0, True, zeros, [z.clone() for z in zeros])


def _snapshot(optimizer, params, step, decoupled):
    group = optimizer.param_groups[0]
    states = [optimizer.state.get(p, {}) for p in params]
    return AdamSnapshot(
        step=step,
        lr=group["lr"],
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        decoupled=decoupled,
        exp_avg=[s["exp_avg"].clone() if "exp_avg" in s else torch.zeros_like(p) for s, p in zip(states, params)],
        exp_avg_sq=[s["exp_avg_sq"].clone() if "exp_avg_sq" in s else torch.zeros_like(p)
                    for s, p in zip(states, params)],
    )


@pytest.mark.parametrize("optimizer_cls, decoupled", [(torch.optim.Adam, False), (torch.optim.AdamW, True)])
def test_update_term_of_the_taken_batch_is_the_reference_step(optimizer_cls, decoupled):
    model, batches = _problem()
    params = list(model.parameters())
    optimizer = optimizer_cls(params, lr=0.05, weight_decay=0.1)
    for step, batch in enumerate(batches):
        ctx = ProbeContext(step, params, _snapshot(optimizer, params, step, decoupled), MatrixProjector())
        probed = probe_pool_batch(ctx, lambda: _loss(model, batch))
        before = torch.cat([p.detach().reshape(-1) for p in params])
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        torch.testing.assert_close(before - 0.05 * probed["update"], after, rtol=1e-5, atol=1e-6)
        assert probed["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_derivatives_match_autograd_and_projection_is_linear():
    torch.manual_seed(1)
    d = 30
    theta, m, v = torch.randn(d), torch.randn(d) * 0.1, torch.rand(d) * 0.01
    adam = AdamSnapshot(3, 0.01, (0.9, 0.999), 1e-8, 0.01, True, [m], [v])
    g = torch.randn(d, dtype=torch.float64)

    def update(grad):
        return adam_terms(grad, theta.double(), m.double(), v.double(), adam).update

    def precond(grad):
        return adam_terms(grad, theta.double(), m.double(), v.double(), adam).precond_grad

    terms = adam_terms(g, theta.double(), m.double(), v.double(), adam)
    torch.testing.assert_close(terms.d_update, torch.autograd.functional.jacobian(update, g).diagonal())
    torch.testing.assert_close(terms.d_precond, torch.autograd.functional.jacobian(precond, g).diagonal())


def test_curvature_factors_reproduce_the_hessian_on_their_span_and_are_projected():
    model, batches = _problem(2)
    params = list(model.parameters())
    zeros = [torch.zeros_like(p) for p in params]
    adam = AdamSnapshot(0, 0.01, (0.9, 0.999), 1e-8, 0.0, True, zeros, [z.clone() for z in zeros])
    dim = sum(p.numel() for p in params)
    exact = probe_pool_batch(ProbeContext(0, params, adam, MatrixProjector(), curvature_rank=3),
                             lambda: _loss(model, batches[0]))
    basis = exact["curv_basis"]
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = _hessian(params, batches[0])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model, batches[0]), params)])
    terms = adam_terms(grad.detach(), flat.detach(), torch.zeros(dim), torch.zeros(dim), adam)
    expected = terms.d_update * (hessian @ basis.T).T
    torch.testing.assert_close(exact["curv_update"], expected, rtol=1e-4, atol=1e-5)
    assert basis[0] @ terms.precond_grad / terms.precond_grad.norm() == pytest.approx(1.0, abs=1e-5)

    projector = DenseProjector(dim, 16)
    projected = probe_pool_batch(ProbeContext(0, params, adam, projector, curvature_rank=3),
                                 lambda: _loss(model, batches[0]))
    for name in ("grad", "update", "precond_grad", "curv_basis", "curv_update", "curv_precond"):
        expected_projection = (projector.matrix @ exact[name].reshape(-1, dim).T).T.reshape(projected[name].shape)
        torch.testing.assert_close(projected[name], expected_projection, rtol=1e-4, atol=1e-5)
    assert projected["curv_basis"].shape == (3, 16)


def test_validation_probe():
    model, batches = _problem(3)
    params, adam = _fresh_adam(model)
    out = probe_validation(ProbeContext(0, params, adam, MatrixProjector()), lambda: _loss(model, batches[1]))
    model.zero_grad()
    loss = _loss(model, batches[1])
    loss.backward()
    torch.testing.assert_close(out["val_grad"], torch.cat([p.grad.reshape(-1) for p in params]))
    assert out["val_loss"].item() == pytest.approx(loss.item())
    assert set(out) == {"val_loss", "val_grad"}


def test_validation_curvature_finds_the_top_hessian_eigenpairs_and_full_rank_gives_the_exact_quadratic():
    model, batches = _problem(6)
    params, adam = _fresh_adam(model)
    dim = sum(p.numel() for p in params)
    hessian = _hessian(params, batches[1])
    out = probe_validation(ProbeContext(0, params, adam, MatrixProjector(), val_curvature_rank=4),
                           lambda: _loss(model, batches[1]))
    basis, matrix = out["val_curv_basis"], out["val_curv_matrix"]
    assert basis.shape == (4, dim) and matrix.shape == (4, 4)
    torch.testing.assert_close(basis @ basis.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix, basis @ hessian @ basis.T, atol=1e-5, rtol=1e-4)  # Ritz pairs: diagonal
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argsort(descending=True)[:4]]
    torch.testing.assert_close(matrix.diagonal().sort().values, top.sort().values, rtol=0.05, atol=1e-4)

    # a Krylov space of full dimension holds the whole Hessian: the quadratic term is exact for any displacement
    full = probe_validation(ProbeContext(0, params, adam, MatrixProjector(), val_curvature_rank=dim),
                            lambda: _loss(model, batches[1]))
    rank = int((full["val_curv_basis"].norm(dim=1) > 0).sum())
    delta = torch.randn(dim) * 1e-2
    coords = full["val_curv_basis"] @ delta
    if rank == dim:
        assert (float(coords @ full["val_curv_matrix"] @ coords)
                == pytest.approx(float(delta @ hessian @ delta), rel=1e-3))
    else:  # the Krylov space closed early (an invariant subspace): exact on it
        span = full["val_curv_basis"][:rank]
        inside = span.T @ (span @ delta)
        assert (float(coords @ full["val_curv_matrix"] @ coords)
                == pytest.approx(float(inside @ hessian @ inside), rel=1e-3))

    projector = DenseProjector(dim, 16)
    projected = probe_validation(ProbeContext(0, params, adam, projector, val_curvature_rank=4),
                                 lambda: _loss(model, batches[1]))
    torch.testing.assert_close(projected["val_curv_basis"], basis @ projector.matrix.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projected["val_curv_matrix"], matrix, rtol=1e-4, atol=1e-6)


def test_validation_first_gives_exact_dot_scalars():
    model, batches = _problem(4)
    params, adam = _fresh_adam(model)
    dim = sum(p.numel() for p in params)
    ctx = ProbeContext(0, params, adam, DenseProjector(dim, 8))
    assert "val_dot_update" not in probe_pool_batch(ctx, lambda: _loss(model, batches[0]))
    probe_validation(ctx, lambda: _loss(model, batches[1]))
    probed = probe_pool_batch(ctx, lambda: _loss(model, batches[0]))
    exact = probe_pool_batch(ProbeContext(0, params, adam, MatrixProjector()), lambda: _loss(model, batches[0]))
    assert probed["val_dot_update"].item() == pytest.approx((ctx.val_grad @ exact["update"]).item(), rel=1e-5)
    assert probed["val_dot_precond"].item() == pytest.approx((ctx.val_grad @ exact["precond_grad"]).item(), rel=1e-5)


def test_pool_first_then_validation_gives_the_dot_scalars_per_batch():
    model, batches = _problem(5)
    params, adam = _fresh_adam(model)
    dim = sum(p.numel() for p in params)
    ctx = ProbeContext(0, params, adam, DenseProjector(dim, 8))
    pool = [probe_pool_batch(ctx, lambda b=b: _loss(model, b)) for b in batches]
    val = probe_validation(ctx, lambda: _loss(model, batches[0]))
    exact = [probe_pool_batch(ProbeContext(0, params, adam, MatrixProjector()), lambda b=b: _loss(model, b))
             for b in batches]
    assert "val_dot_update" not in pool[0] and val["val_dot_update"].shape == (len(batches),)
    torch.testing.assert_close(val["val_dot_update"], torch.stack([ctx.val_grad @ e["update"] for e in exact]))
    torch.testing.assert_close(val["val_dot_precond"], torch.stack([ctx.val_grad @ e["precond_grad"] for e in exact]))


@pytest.mark.parametrize("alone", [False, True])
def test_pool_first_dot_scalars_follow_the_process_count_single_process_sets(monkeypatch, alone):
    # a 2-rank process group a DDP fit left initialised (faked: one process cannot hold a real one of 2): each rank
    # probes a share of the pool and keeps no dot scalars; inside single_process() one process probes all of them
    import torch.distributed as dist

    from lpl.utils.trainer import single_process

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    model, batches = _problem(5)
    params, adam = _fresh_adam(model)
    ctx = ProbeContext(0, params, adam, DenseProjector(sum(p.numel() for p in params), 8))
    with single_process() if alone else contextlib.nullcontext():
        for b in batches:
            probe_pool_batch(ctx, lambda b=b: _loss(model, b))
        val = probe_validation(ctx, lambda: _loss(model, batches[0]))
    assert ("val_dot_update" in val) == alone


class CountingProjector(Projector):
    """The seeded projector, counting the passes over its generated matrix."""

    passes = 0

    def project_batch(self, rows):
        self.passes += 1
        return super().project_batch(rows)


@pytest.mark.parametrize("batches_per_pass, passes", [(None, 1), (1, 4), (2, 2)])
def test_pool_batches_projected_together_equal_one_at_a_time(monkeypatch, batches_per_pass, passes):
    model, batches = _problem(6)
    params, adam = _fresh_adam(model)
    dim = sum(p.numel() for p in params)
    single = [probe_pool_batch(ProbeContext(0, params, adam, Projector(dim, 16), curvature_rank=4),
                               lambda b=b: _loss(model, b)) for b in batches]
    ranks = {int(one["curv_basis"].abs().sum(1).gt(0).sum()) for one in single}
    assert len(ranks) == 1  # every batch has as many rows: 3 + 3 rank
    if batches_per_pass is not None:
        rows_bytes = (3 + 3 * ranks.pop()) * dim * 4
        monkeypatch.setattr(quantities, "PROJECTION_GROUP_BYTES", batches_per_pass * rows_bytes)
    projector = CountingProjector(dim, 16)
    grouped = probe_pool_batches(ProbeContext(0, params, adam, projector, curvature_rank=4),
                                 (lambda b=b: _loss(model, b) for b in batches))
    assert projector.passes == passes and len(grouped) == len(batches)
    for one, together in zip(single, grouped):
        assert one.keys() == together.keys()
        for name in one:
            torch.testing.assert_close(together[name], one[name], rtol=1e-5, atol=1e-6)
