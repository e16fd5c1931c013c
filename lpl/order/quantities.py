"""What a training-order recording stores: the estimator's side of the recorder contract.

At a probed step t the recorder holds the reference run at theta_t with Adam state (m_{t-1}, v_{t-1}) and calls
``probe_pool_batches`` with every pool batch B and ``probe_validation`` once for the validation set. Everything returned
is a scalar or a projected k-vector (``[r, k]`` for the optional curvature factors): never a full-dimensional tensor.

Per pool batch (g = the batch's gradient at theta_t, plus ``weight_decay * theta_t`` for coupled Adam):
- ``loss``: the batch's loss at theta_t.
- ``grad``: P g, for linearising the batch's own loss around theta_t.
- ``update``: P Gamma(theta_t, B), the paper's update term: Adam's step direction with the reference m_{t-1},
  v_{t-1} and g entering both moments, bias-corrected, plus ``weight_decay * theta_t`` for AdamW. For B = B_t it
  is exactly the reference step: theta_{t+1} = theta_t - lr_t * Gamma(theta_t, B_t).
- ``precond_grad``: P (g / (sqrt(v_hat_B) + eps)) with v_hat_B = (beta2 v_{t-1} + (1 - beta2) g^2) / (1 - beta2^{t+1}):
  the batch's gradient preconditioned by the second moment it would see. Momentum is linear in these, so the
  estimator can rebuild each order's own first moment from them (the "adam" method) instead of reusing the
  reference run's m_{t-1}.
- with ``curvature_rank = r > 0``, per-batch low-rank curvature factors: an orthonormal basis u_1..u_r of the Krylov
  space of A = diag(dp/dg) H_B started at the batch's own preconditioned gradient (H_B: this batch's Hessian, from
  r Hessian-vector products), stored as ``curv_basis`` = [P u_i], ``curv_precond`` = [P (dp/dg * H_B u_i)] and
  ``curv_update`` = [P (dGamma/dg * H_B u_i)]. The estimator applies the first-order correction
  Gamma(theta_t + Delta, B) ~ Gamma(theta_t, B) + sum_i <P u_i, P Delta> P(dGamma/dg * H_B u_i): only inner
  products of projections, so it is exact up to the JL error and the rank-r truncation.

Validation: ``val_loss`` and ``val_grad`` = P grad L_val(theta_t). ``probe_validation`` also keeps the full
validation gradient on the context (``ctx.val_grad``, never stored); when the recorder calls it BEFORE the pool
probes of the same step with the same context, each pool batch also stores the exact scalars
``val_dot_update`` = <grad L_val(theta_t), Gamma(theta_t, B)> and ``val_dot_precond`` (same for ``precond_grad``).
When the recorder probes the pool first (single process), the full update vectors are kept on the context (up to
``DOT_CACHE_BYTES``) and ``probe_validation`` returns the same scalars as ``val_dot_update`` / ``val_dot_precond``
of shape [num_pool_batches] instead. The estimator uses them as control variates: a projected inner product
<P a, P b> has an error of order
|a| |b| / sqrt(k), which swamps the small inner products that decide a loss change; replacing
<P v_T, P x_{t,B}> by the exact <v_t, x_{t,B}> plus the projected <P (v_T - v_t), P x_{t,B}> shrinks that error to
the part of v_T that is new since step t.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import Tensor

from lpl.utils.autograd import double_backward_ready
from lpl.utils.trainer import rank_and_world

if TYPE_CHECKING:  # the recorder passes a Projector; MatrixProjector (identity or dense) serves references
    from lpl.order.projection import MatrixProjector, Projector


@dataclass
class AdamSnapshot:
    """Reference optimizer state just before the step taken at theta_t."""

    step: int  # optimizer steps already taken (t); this step's bias correction uses t + 1
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW: True; Adam with weight decay adds it to the gradient
    exp_avg: list[Tensor]  # aligned with params (zeros before the first step)
    exp_avg_sq: list[Tensor]


@dataclass
class ProbeContext:
    """Everything a probe needs about the reference run at theta_t."""

    step: int  # t (T for the final probe after training)
    params: list[Tensor]  # trainable parameters at theta_t, in named_parameters() order
    adam: AdamSnapshot
    projector: "Projector | MatrixProjector"  # anything with project(flat) and project_batch(rows)
    curvature_rank: int = 0  # r > 0 also records the per-batch curvature factors (r Hessian-vector products)
    val_curvature_rank: int = 0  # m > 0 also records the validation loss's top-m curvature (4m HVPs)
    val_grad: Tensor | None = None  # full validation gradient, set by probe_validation (kept in memory only)
    # full (update, precond_grad) of pool batches probed before the validation probe, for the exact dot scalars
    # (None once over DOT_CACHE_BYTES: then no scalars for this step rather than a partial set)
    pending_dots: list[tuple[Tensor, Tensor]] | None = field(default_factory=list)
    # store eval-mode losses as a forward without autograd measures them (Lightning's validation, retraining): some
    # layers take another path then (nn.MultiheadAttention's fast path rounds differently in bfloat16)
    losses_without_grad: bool = False
    without_grad_differed: bool | None = None  # set by the validation probe when it measured both ways


DOT_CACHE_BYTES = 1 << 30  # keep at most this much of full vectors for the validation-dot scalars


def _may_cache(ctx: ProbeContext, numel: int) -> bool:
    if rank_and_world()[1] > 1:
        return False  # each rank probes a share of the pool; only rank 0 sees the validation set
    if ctx.pending_dots is None:
        return False
    if (len(ctx.pending_dots) + 1) * numel * 8 > DOT_CACHE_BYTES:
        ctx.pending_dots = None
        return False
    return True


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).float()


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    return out


def _gradients(loss: Tensor, params: list[Tensor], create_graph: bool) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@dataclass
class AdamTerms:
    """Full-space Adam quantities of one batch at theta_t (flat fp32); ``probe_pool_batches`` projects them."""

    update: Tensor  # Gamma(theta_t, B)
    precond_grad: Tensor  # g / (sqrt(v_hat_B) + eps)
    d_update: Tensor  # elementwise dGamma/dg
    d_precond: Tensor  # elementwise d precond_grad / dg


def adam_terms(grad: Tensor, theta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, adam: AdamSnapshot) -> AdamTerms:
    """The paper's update term and its relatives for a flat gradient ``grad`` (before coupled weight decay).

    Pure function of flat tensors: ``theta_{t+1} = theta_t - lr * update`` reproduces ``torch.optim.Adam``/``AdamW``
    when ``grad`` is the batch the reference run took at step t.
    """
    beta1, beta2 = adam.betas
    t = adam.step + 1
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    g = grad + adam.weight_decay * theta if (adam.weight_decay and not adam.decoupled) else grad
    m_hat = (beta1 * exp_avg + (1.0 - beta1) * g) / bc1
    v = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    s = (v / bc2).sqrt()
    denom = s + adam.eps
    update = m_hat / denom
    if adam.weight_decay and adam.decoupled:
        update = update + adam.weight_decay * theta
    # d s / d g = (1 - beta2) g / (bc2 s); where s = 0 the gradient and the derivative's second term vanish
    ds_dg = torch.where(s > 0, (1.0 - beta2) * g / (bc2 * s.clamp_min(1e-30)), torch.zeros_like(s))
    d_update = (1.0 - beta1) / (bc1 * denom) - m_hat * ds_dg / denom**2
    precond = g / denom
    d_precond = 1.0 / denom - g * ds_dg / denom**2
    return AdamTerms(update=update, precond_grad=precond, d_update=d_update, d_precond=d_precond)


def _krylov_steps(
    hvp: Callable[[Tensor], Tensor], start: Tensor, scale: Tensor | None, steps: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (q_i, H q_i) for an orthonormal basis q_1.. of the Krylov space of ``diag(scale) @ H`` (H alone when
    ``scale`` is None) from ``start``; stops early when the space is exhausted."""
    basis: list[Tensor] = []
    v = start
    for _ in range(steps):
        for _ in range(2):  # Gram-Schmidt twice keeps the basis orthonormal in fp32
            for u in basis:
                v = v - (u @ v) * u
        norm = v.norm()
        if not torch.isfinite(norm) or norm <= 1e-12 * max(1.0, float(start.norm())):
            return
        u = v / norm
        hu = hvp(u)
        basis.append(u)
        yield u, hu
        v = hu if scale is None else scale * hu


def krylov_factors(
    hvp: Callable[[Tensor], Tensor], start: Tensor, scale: Tensor, rank: int
) -> tuple[Tensor, Tensor]:
    """Orthonormal basis U [r, d] of the Krylov space of ``diag(scale) @ H`` from ``start``, and H U [r, d].

    ``hvp(v)`` returns H v. Stops early (fewer rows) when the space is exhausted.
    """
    pairs = list(_krylov_steps(hvp, start, scale, rank))
    if not pairs:
        empty = start.new_zeros(0, start.numel())
        return empty, empty
    return torch.stack([u for u, _ in pairs]), torch.stack([hu for _, hu in pairs])


def top_curvature(hvp: Callable[[Tensor], Tensor], start: Tensor, keep: int, steps: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` Ritz pairs of largest |eigenvalue| from ``steps`` Lanczos steps of H started at ``start``.

    Returns (vectors [keep', d] orthonormal, eigenvalues [keep']) with keep' <= keep when the Krylov space closes
    early. Only the basis is held (``steps`` x d), not the Hessian images.
    """
    basis: list[Tensor] = []
    restricted = start.new_zeros(steps, steps)
    for i, (u, hu) in enumerate(_krylov_steps(hvp, start, None, steps)):
        basis.append(u)
        restricted[: i + 1, i] = torch.stack([b @ hu for b in basis])
    size = len(basis)
    if not size:
        return start.new_zeros(0, start.numel()), start.new_zeros(0)
    upper = restricted[:size, :size].double()  # column i holds q_j . H q_i for j <= i
    values, vectors = torch.linalg.eigh(upper + upper.T - torch.diag(upper.diagonal()))
    top = values.abs().argsort(descending=True)[:keep]
    ritz = vectors[:, top].T.to(start.dtype) @ torch.stack(basis)
    return ritz, values[top].to(start.dtype)


def _state(ctx: ProbeContext) -> tuple[Tensor, Tensor, Tensor]:
    theta = _flat([p.detach() for p in ctx.params])
    exp_avg = _flat(ctx.adam.exp_avg).to(theta.device)
    exp_avg_sq = _flat(ctx.adam.exp_avg_sq).to(theta.device)
    return theta, exp_avg, exp_avg_sq


def loss_and_gradients(
    loss_fn: Callable[[], Tensor], params: list[Tensor], curvature: bool
) -> tuple[Tensor, list[Tensor]]:
    """The loss and its gradients; with ``curvature`` the gradients keep their graph for Hessian-vector products."""
    if not curvature:
        loss = loss_fn()
        return loss, _gradients(loss, params, create_graph=False)
    with double_backward_ready():
        loss = loss_fn()
    return loss, _gradients(loss, params, create_graph=True)


def hessian_vector_product(grads: list[Tensor], params: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """v -> H v (flat) through the graph of ``grads`` (computed with create_graph=True)."""
    # a gradient without a graph (a parameter the loss does not use, or enters only linearly) has no curvature
    curved = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(vector: Tensor) -> Tensor:
        if not curved:
            return torch.zeros_like(vector)
        pieces = _unflat(vector, params)
        parts = torch.autograd.grad([grads[i] for i in curved], params, grad_outputs=[pieces[i] for i in curved],
                                    retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, parts)])

    return hvp


def _project(ctx: ProbeContext, flat: Tensor) -> Tensor:
    return ctx.projector.project(flat).float()


def _project_rows(ctx: ProbeContext, rows: Tensor) -> Tensor:
    """Project [n, d] rows at once (one pass over the generated matrix)."""
    return ctx.projector.project_batch(rows).float()


# full-space rows of consecutive pool batches projected in one pass, up to this many bytes: on CPU, generating the
# seeded matrix costs about as much as projecting a hundred rows with it, so one pass for many batches instead of
# one per batch makes probe steps faster (benchmarks/recorder_overhead.py: 1.6-1.7x on the demo LM and ViT)
PROJECTION_GROUP_BYTES = 256 << 20


@dataclass
class _PoolRows:
    """One pool batch's outputs before projection: its scalars and its full-space rows (see ``probe_pool_batches``)."""

    scalars: dict[str, Tensor]
    rows: Tensor  # [3 + 3 rank, d]: grad, update, precond_grad, then the curvature factors
    rank: int  # curvature rows actually found (a Krylov space can end early)


def _pool_rows(ctx: ProbeContext, batch_loss: Callable[[], Tensor]) -> _PoolRows:
    curvature = ctx.curvature_rank > 0
    with torch.enable_grad():
        loss, grads = loss_and_gradients(batch_loss, ctx.params, curvature)
        grad = _flat([g.detach() for g in grads])
        theta, exp_avg, exp_avg_sq = _state(ctx)
        terms = adam_terms(grad, theta, exp_avg, exp_avg_sq, ctx.adam)
        rows = [grad, terms.update, terms.precond_grad]
        scalars = {"loss": _loss_without_grad(batch_loss) if ctx.losses_without_grad
                   else loss.detach().float().reshape(())}
        if ctx.val_grad is not None:
            val_grad = ctx.val_grad.to(grad.device)
            scalars["val_dot_update"] = (val_grad @ terms.update).reshape(())
            scalars["val_dot_precond"] = (val_grad @ terms.precond_grad).reshape(())
        elif _may_cache(ctx, grad.numel()):
            ctx.pending_dots.append((terms.update, terms.precond_grad))
        rank = 0
        if curvature:
            hvp = hessian_vector_product(grads, ctx.params)
            basis, images = krylov_factors(hvp, terms.precond_grad, terms.d_precond, ctx.curvature_rank)
            rank = basis.shape[0]
            rows += [*basis, *(terms.d_precond * images), *(terms.d_update * images)]
    return _PoolRows(scalars, torch.stack(rows).detach(), rank)


def _loss_without_grad(loss_fn: Callable[[], Tensor]) -> Tensor:
    with torch.no_grad():
        return loss_fn().detach().float().reshape(())


def _pool_outputs(ctx: ProbeContext, pending: _PoolRows, projected: Tensor) -> dict[str, Tensor]:
    out = {**pending.scalars, "grad": projected[0], "update": projected[1], "precond_grad": projected[2]}
    if ctx.curvature_rank > 0:
        # missing rows (Krylov space exhausted) stay zero: they contribute nothing to the correction
        rank = pending.rank
        for i, name in enumerate(("curv_basis", "curv_precond", "curv_update")):
            padded = torch.zeros(ctx.curvature_rank, projected.shape[1])
            padded[:rank] = projected[3 + i * rank : 3 + (i + 1) * rank]
            out[name] = padded
    return {name: value.detach().cpu() for name, value in out.items()}


def probe_pool_batches(ctx: ProbeContext, batch_losses: Iterable[Callable[[], Tensor]]) -> list[dict[str, Tensor]]:
    """Projected quantities of each pool batch at theta_t (see the module docstring for each name), in order.

    Each batch's loss is computed and differentiated in turn; the full-space rows of consecutive batches are then
    projected together, up to ``PROJECTION_GROUP_BYTES`` (at least one batch at a time)."""
    outputs: list[dict[str, Tensor]] = []
    group: list[_PoolRows] = []

    def project_group() -> None:
        projected = _project_rows(ctx, torch.cat([pending.rows for pending in group])).cpu()
        for pending, rows in zip(group, projected.split([pending.rows.shape[0] for pending in group])):
            outputs.append(_pool_outputs(ctx, pending, rows))
        group.clear()

    for batch_loss in batch_losses:
        group.append(_pool_rows(ctx, batch_loss))
        if sum(pending.rows.numel() * pending.rows.element_size() for pending in group) >= PROJECTION_GROUP_BYTES:
            project_group()
    if group:
        project_group()
    return outputs


def probe_pool_batch(ctx: ProbeContext, batch_loss: Callable[[], Tensor]) -> dict[str, Tensor]:
    """``probe_pool_batches`` for one batch."""
    return probe_pool_batches(ctx, [batch_loss])[0]


def probe_validation(ctx: ProbeContext, val_loss: Callable[[], Tensor]) -> dict[str, Tensor]:
    """``val_loss`` and ``val_grad`` (projected gradient of the validation loss) at theta_t.

    Also sets ``ctx.val_grad`` (full, in memory) so that later ``probe_pool_batches`` calls on ``ctx`` add the exact
    ``val_dot_*`` scalars. With ``ctx.val_curvature_rank = m > 0`` it also records the top-m curvature of the
    validation loss: Ritz pairs (q_i, lambda_i) of largest |lambda| from 4m Lanczos steps of H_val started at the
    validation gradient, stored as ``val_curv_basis`` = [P q_i] and ``val_curv_matrix`` = diag(lambda), so the
    estimator can add 1/2 <Delta, H_val Delta> ~ 1/2 sum_i lambda_i <P q_i, P Delta>^2 to its linearised loss.
    (A Krylov space of only m steps missed most of the top curvature on the digits task and made estimates worse;
    extra Lanczos steps let the kept Ritz pairs converge to the top eigenpairs.)
    """
    curvature = ctx.val_curvature_rank > 0
    with torch.enable_grad():
        loss, grads = loss_and_gradients(val_loss, ctx.params, curvature)
        grad = _flat([g.detach() for g in grads])
        if curvature:
            hvp = hessian_vector_product(grads, ctx.params)
            vectors, values = top_curvature(hvp, grad, ctx.val_curvature_rank, 4 * ctx.val_curvature_rank)
    ctx.val_grad = grad
    loss = loss.detach().float().reshape(())
    if ctx.losses_without_grad:
        measured = _loss_without_grad(val_loss)
        ctx.without_grad_differed = bool(measured != loss)
        loss = measured
    out = {"val_loss": loss.cpu(), "val_grad": _project(ctx, grad).cpu()}
    if curvature:
        rank, m = vectors.shape[0], ctx.val_curvature_rank
        # rows beyond an exhausted Krylov space stay zero: they add nothing to the quadratic term
        out["val_curv_basis"] = torch.zeros(m, out["val_grad"].numel())
        out["val_curv_matrix"] = torch.zeros(m, m)
        if rank:
            out["val_curv_basis"][:rank] = _project_rows(ctx, vectors).cpu()
            out["val_curv_matrix"][:rank, :rank] = torch.diag(values).cpu()
    if ctx.pending_dots:
        out["val_dot_update"] = torch.stack([grad @ update for update, _ in ctx.pending_dots]).cpu()
        out["val_dot_precond"] = torch.stack([grad @ precond for _, precond in ctx.pending_dots]).cpu()
        ctx.pending_dots.clear()
    return out
