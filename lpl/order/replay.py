"""Pure replay math: estimate what many sample orders would give from the recorded projected quantities.

The reference run took theta_{t+1} = theta_t - lr_t Gamma(theta_t, B_{r_t}). A new order l gives
gamma_{t+1} = gamma_t - lr_t Gamma(gamma_t, B_{l_t}). We track the projected displacement P Delta_t,
Delta_t = gamma_t - theta_t, for N orders at once, and read losses off linearisations around the reference:
L(gamma_t) ~ L(theta_t) + <P grad L(theta_t), P Delta_t>. Everything is linear in stored k-vectors, and curvature
enters only through inner products <P u_i, P Delta> with per-batch factors (see lpl.order.quantities).
When the recording holds the exact validation-dot scalars, a scalar shadow of the same linear recursion carries the
projection error of every injected term (exact dot minus projected dot at its own step) and is added to the
projected loss change: a control variate that removes most of the JL noise (see lpl.order.quantities).

Methods:
- ``zeroth_order``: the paper's update term with no correction (TracIn-like).
- ``first_order`` (FUT): plus Gamma's first-order change along Delta, from each batch's own low-rank curvature.
- ``second_order`` (FUT++): plus a second-order term from finite differences of the first-order factors between
  consecutive probes along the reference trajectory.
- ``adam``: each order's own first moment, rebuilt from the batches' gradients each divided by its own step's
  reference denominator sqrt(v_t) + eps (momentum is linear in these; Adam's m / sqrt(v) only when v changes little
  between steps), instead of the reference run's m_{t-1} that the paper's term reuses.
- ``adam_first_order``: ``adam`` plus the per-batch first-order curvature correction of the preconditioned gradients.
- ``linearized``: each order trained again by Adam in full space on gradients linearised about the reference run
  (``lpl.order.linearized``), no projection involved; loss curve, final and per-batch losses all from it.
- ``adjoint``: the final validation loss from exact adjoint sensitivity tables (``lpl.order.adjoint``), no
  projection involved; the loss curve before the last step and the per-batch end losses come from ``first_order``
  (``zeroth_order`` when the recording has no curvature factors).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lpl.order.linearized import LinearizedRun, replay_linearized
from lpl.utils.errors import LplError

PROJECTED_METHODS = ("zeroth_order", "first_order", "second_order", "adam", "adam_first_order")
METHODS = PROJECTED_METHODS + ("linearized", "adjoint")
CURVATURE_METHODS = ("first_order", "second_order", "adam_first_order")


@dataclass
class ReplayData:
    """The recording's quantities, stacked over probes (``probe_steps``, ascending, last one = T).

    Per-batch tensors are [P, num_batches, ...]; ``lr`` and ``reference_order`` are per step [T].
    Curvature tensors are ``None`` when the recording has none.
    """

    probe_steps: Tensor  # long [P]
    lr: Tensor  # [T]
    reference_order: Tensor  # long [T]: pool batch taken at each reference step
    betas: tuple[float, float]
    weight_decay: float
    decoupled: bool
    update: Tensor  # [P, nb, k]
    precond_grad: Tensor  # [P, nb, k]
    grad: Tensor  # [P, nb, k]
    loss: Tensor  # [P, nb]
    val_loss: Tensor  # [P]
    val_grad: Tensor  # [P, k]
    curv_basis: Tensor | None = None  # [P, nb, r, k]
    curv_update: Tensor | None = None
    curv_precond: Tensor | None = None
    val_dot_update: Tensor | None = None  # [P, nb] exact <grad L_val(theta_t), Gamma(theta_t, B)>
    val_dot_precond: Tensor | None = None  # [P, nb] exact <grad L_val(theta_t), precond_grad(theta_t, B)>
    # top validation curvature at theta_T: H_val ~ Q^T M Q, orthonormal rows q_i (stored projected), M = Q H_val Q^T
    val_curv_basis: Tensor | None = None  # [m, k] P q_i
    val_curv_matrix: Tensor | None = None  # [m, m] (diagonal: the Ritz values)
    # adjoint sensitivity tables (lpl.order.adjoint): [1 + m, T, nb], table 0 for the validation gradient
    swap_tables: Tensor | None = None
    swap_curvature: Tensor | None = None  # [m] Ritz values of the tables' curvature directions
    linearized: LinearizedRun | None = None  # the linearised Adam replay's data (lpl.order.linearized)
    # the run's param groups had weight decays of their own, which only the full-space methods apply
    weight_decay_per_group: bool = False

    @property
    def num_steps(self) -> int:
        return int(self.lr.numel())

    @property
    def num_batches(self) -> int:
        return int(self.update.shape[1])

    @property
    def proj_dim(self) -> int:
        return int(self.update.shape[-1])


@dataclass
class ReplayResult:
    """Estimates for N orders: ``final_loss`` [N], ``loss_curve`` [N, steps + 1] (validation loss before each step
    and after the last), ``batch_losses`` [N, num_batches] (each pool batch's loss at the end) and
    ``displacement`` [N, k]: the projected P (gamma_T - theta_T), where each order ends relative to the reference
    (None for the full-space methods); ``linear_loss`` [N]: ``final_loss`` without the validation curvature's
    quadratic term, when the replay added one (None otherwise), so one replay gives both readouts."""

    final_loss: Tensor
    loss_curve: Tensor
    batch_losses: Tensor
    displacement: Tensor | None = None
    linear_loss: Tensor | None = None


class _Interpolator:
    """Linear interpolation of probed quantities to any step t in [0, T]."""

    def __init__(self, probe_steps: Tensor) -> None:
        self.steps = probe_steps.tolist()

    def __call__(self, t: int) -> tuple[int, int, float]:
        steps = self.steps
        if t <= steps[0]:
            return 0, 0, 0.0
        for i in range(len(steps) - 1):
            if steps[i] <= t <= steps[i + 1]:
                span = steps[i + 1] - steps[i]
                return i, i + 1, (t - steps[i]) / span
        return len(steps) - 1, len(steps) - 1, 0.0


def _at(x: Tensor, where: tuple[int, int, float], index: Tensor | int | None = None) -> Tensor:
    i0, i1, a = where
    lo = x[i0] if index is None else x[i0][index]
    if a == 0.0 or i0 == i1:
        return lo.float()
    hi = x[i1] if index is None else x[i1][index]
    return (1.0 - a) * lo.float() + a * hi.float()


# True/False read as batch ids 1/0 is almost surely a mistake (a mask of batches, say)
_BOOL_ORDERS = "orders hold True/False, not pool batch ids; pass integer ids such as [0, 1, 2] (a mask is no order)."


def as_orders(orders: Any) -> Tensor:
    """Orders as given by a user (a tensor, a numpy array, a list of ids, or a list of such rows, e.g. 1-D tensors of
    one length) as one integer tensor; raises ``LplError`` for anything that is not integer pool batch ids."""
    if isinstance(orders, (str, bytes)):
        raise LplError(f"an order must be a list of integer pool batch ids, got the string {orders!r:.40}; pass e.g. "
                       "[0, 1, 2].")
    if isinstance(orders, (list, tuple)):
        if any(isinstance(o, bool) for o in orders):  # torch would read [0, True] as ids 0, 1
            raise LplError(_BOOL_ORDERS)
        if not all(isinstance(o, numbers.Number) for o in orders):
            # rows (lists, tensors, arrays) one by one: torch cannot build a tensor from a list of 1-D tensors
            rows = [as_orders(o) for o in orders]
            shapes = sorted({tuple(row.shape) for row in rows})
            if len(shapes) > 1:
                raise LplError(f"orders estimated together must all have one length, got rows of shapes {shapes}; "
                               "estimate orders of other lengths in separate calls.")
            return torch.stack(rows)
    try:
        tensor = torch.as_tensor(orders)
    except (TypeError, ValueError, RuntimeError) as error:
        raise LplError(f"orders must be integer pool batch ids (a list, tensor or numpy array), could not read "
                       f"{type(orders).__name__} ({error}).") from None
    if tensor.numel() and tensor.dtype == torch.bool:
        raise LplError(_BOOL_ORDERS)
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex()):
        raise LplError("orders must hold integer pool batch ids.")
    if tensor.is_meta:
        raise LplError("orders on the meta device hold no ids; pass them on the CPU (or the estimator's device).")
    return tensor


def check_orders(orders: Any, num_batches: int, num_steps: int) -> Tensor:
    """Validate [N, L] (or [L]) pool batch ids (anything ``as_orders`` reads); returns them as long [N, L]."""
    orders = as_orders(orders)
    given = tuple(orders.shape)
    if orders.ndim == 1:
        orders = orders[None]
    if orders.ndim != 2:
        raise LplError(f"orders must be one order (a list of pool batch ids) or a list of orders of one length (2-D), "
                       f"got {len(given)} dimensions (shape {given}).")
    if orders.shape[1] == 0:
        raise LplError(f"an order must be a non-empty list of pool batch ids, got an empty one (shape {given}).")
    orders = orders.long()
    if orders.shape[1] > num_steps:
        raise LplError(
            f"an order of {orders.shape[1]} steps is longer than the {num_steps} recorded steps: estimates and "
            f"retraining follow at most {num_steps} steps (record a longer reference run for longer orders)."
        )
    bad = orders[(orders < 0) | (orders >= num_batches)]
    if bad.numel():
        raise LplError(f"an order names batch id {int(bad[0])}, but the pool has batch ids 0..{num_batches - 1}.")
    return orders


def check_method(data: ReplayData, method: str) -> None:
    """Fail clearly on an unknown method or one the recording lacks data for (and say which option records it)."""
    if method not in METHODS:
        raise LplError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if data.weight_decay_per_group and method in PROJECTED_METHODS:
        raise LplError(
            f"method {method!r} applies one weight decay to every parameter, but this run's param groups had their own "
            "(say none for biases and norms); use method 'linearized' or 'adjoint' after "
            "lpl.order.adjoint.record_sensitivities(path) (CLI: `lpl sensitivity --recording DIR`), or record a run "
            "with one weight decay."
        )
    if method in CURVATURE_METHODS and data.curv_basis is None:
        raise LplError(
            f"method {method!r} needs per-batch curvature factors, which this recording lacks; record with "
            "TrainOrderRecorder(curvature_rank=2) (or more), or use method 'adam' or 'zeroth_order'."
        )
    if method == "adjoint" and data.swap_tables is None:
        raise LplError(
            "method 'adjoint' needs the recording's sensitivity tables, which it lacks; build them once with "
            "lpl.order.adjoint.record_sensitivities(path) (CLI: `lpl sensitivity --recording DIR`)."
        )
    if method == "linearized" and data.linearized is None:
        raise LplError(
            "method 'linearized' needs the recording's linearised replay data, which it lacks; build them once with "
            "lpl.order.adjoint.record_sensitivities(path, hessian_rank=16) (CLI: `lpl sensitivity --recording DIR`)."
        )


def replay(
    data: ReplayData, orders: Tensor, method: str = "first_order", control_variates: bool = True,
    quadratic: bool = True,
) -> ReplayResult:
    """Estimate final validation loss, loss curve and per-batch end losses for each row of ``orders`` [N, L].

    ``control_variates`` uses the exact validation-dot scalars when the recording has them. ``quadratic`` adds
    1/2 Delta_T^T H_val Delta_T to the final validation loss when the recording has the validation curvature (the
    loss curve before the last point stays linear).
    """
    check_method(data, method)
    orders = check_orders(orders, data.num_batches, data.num_steps)
    if method == "adjoint":
        return _replay_adjoint(data, orders, control_variates, quadratic)
    if method == "linearized":
        run = data.linearized
        result = replay_linearized(run, orders.to(run.pool_grads.device), quadratic)
        return ReplayResult(final_loss=result.final_loss, loss_curve=result.loss_curve,
                            batch_losses=result.batch_losses, linear_loss=result.linear_loss)
    return _replay_projected(data, orders, method, control_variates, quadratic)


def _replay_projected(data: ReplayData, orders: Tensor, method: str, control_variates: bool,
                      quadratic: bool) -> ReplayResult:
    """The projected methods: the displacement P Delta of every order, carried step by step in k dimensions."""
    n, length = orders.shape
    device = data.update.device
    orders = orders.to(device)
    interp = _Interpolator(data.probe_steps)
    beta1 = data.betas[0]
    k = data.proj_dim
    # float32 whatever the default dtype (a Trainer precision or set_default_dtype changes it), as the data are read
    f32 = dict(device=device, dtype=torch.float32)
    delta = torch.zeros(n, k, **f32)
    momentum = torch.zeros(n, k, **f32)
    momentum_ref = torch.zeros(k, **f32)
    curve = torch.empty(n, length + 1, **f32)
    decay = data.weight_decay if data.decoupled else 0.0
    use_curvature = method in CURVATURE_METHODS
    adam_like = method.startswith("adam")
    shadow = _DotErrorShadow.build(data, adam_like, n, f32) if control_variates else None

    for t in range(length):
        where = interp(t)
        curve[:, t] = _at(data.val_loss, where) + delta @ _at(data.val_grad, where) + _shadow_value(shadow)
        ids = orders[:, t]
        ref = int(data.reference_order[t])
        lr = float(data.lr[t])
        if shadow is not None:
            shadow.step(where, ids, ref, t, lr, decay, beta1)
        if adam_like:
            p_new = _at(data.precond_grad, where, ids)
            if use_curvature:
                p_new = p_new + _curvature_correction(data, where, ids, data.curv_precond, delta)
            momentum = beta1 * momentum + (1.0 - beta1) * p_new
            momentum_ref = beta1 * momentum_ref + (1.0 - beta1) * _at(data.precond_grad, where, ref)
            step_diff = (momentum - momentum_ref) / (1.0 - beta1 ** (t + 1))
        else:
            step_diff = _at(data.update, where, ids) - _at(data.update, where, ref)
            if use_curvature:
                step_diff = step_diff + _curvature_correction(data, where, ids, data.curv_update, delta)
            if method == "second_order":
                step_diff = step_diff + _second_order_term(data, interp, where, ids, delta)
        delta = delta - lr * (step_diff + decay * delta)
    end = interp(length)
    curve[:, length] = _at(data.val_loss, end) + delta @ _at(data.val_grad, end) + _shadow_value(shadow)
    linear_loss = None
    if quadratic and data.val_curv_basis is not None and length == data.num_steps:  # curvature measured at theta_T
        linear_loss = curve[:, length].clone()
        coords = delta @ data.val_curv_basis.float().T
        curve[:, length] += 0.5 * torch.einsum("nm,ml,nl->n", coords, data.val_curv_matrix.float(), coords)
    batch_losses = _at(data.loss, end)[None, :] + torch.einsum("nk,bk->nb", delta, _at(data.grad, end))
    return ReplayResult(final_loss=curve[:, length].clone(), loss_curve=curve, batch_losses=batch_losses,
                        displacement=delta, linear_loss=linear_loss)


def _curvature_correction(data: ReplayData, where: tuple[int, int, float], ids: Tensor, factors: Tensor,
                          delta: Tensor) -> Tensor:
    """First-order change of each order's batch term along its displacement, from the batch's low-rank curvature:
    sum_i <P u_i, P Delta> P w_i (basis u_i = ``curv_basis``, factors w_i = ``factors``)."""
    basis = _at(data.curv_basis, where, ids)  # [n, r, k]
    coeff = torch.einsum("nrk,nk->nr", basis, delta)
    return torch.einsum("nr,nrk->nk", coeff, _at(factors, where, ids))


def _second_order_term(data: ReplayData, interp: _Interpolator, where: tuple[int, int, float], ids: Tensor,
                       delta: Tensor) -> Tensor:
    """FUT++'s second-order term: the change of the first-order correction between the probes around step t, along
    the reference's travel between them, scaled by Delta's share of that direction (zero before two probes)."""
    steps = interp.steps
    i0, i1, _ = where
    j0, j1 = (i0, i1) if i1 > i0 else (max(i0 - 1, 0), i0)
    if j1 <= j0:
        return torch.zeros_like(delta)
    travel = sum(
        -float(data.lr[s]) * _at(data.update, interp(s), int(data.reference_order[s]))
        for s in range(steps[j0], min(steps[j1], data.num_steps))
    )
    share = delta @ travel / travel.dot(travel).clamp_min(1e-30)
    change = (_curvature_correction(data, (j1, j1, 0.0), ids, data.curv_update, delta)
              - _curvature_correction(data, (j0, j0, 0.0), ids, data.curv_update, delta))
    return 0.5 * share[:, None] * change


class _DotErrorShadow:
    """Control variate: the replay's linear recursion run on scalars, the projection error of each injected term
    against the validation gradient of its own step (exact dot minus projected dot). Its value is added to every
    projected loss change."""

    def __init__(self, dot_error: Tensor, adam_like: bool, n: int, f32: dict) -> None:
        self.dot_error = dot_error
        self.adam_like = adam_like
        self.value = torch.zeros(n, **f32)
        self.momentum = torch.zeros(n, **f32)
        self.momentum_ref = torch.zeros((), **f32)

    @classmethod
    def build(cls, data: ReplayData, adam_like: bool, n: int, f32: dict) -> "_DotErrorShadow | None":
        """None when the recording lacks the exact dots this method's terms need."""
        exact_dots = data.val_dot_precond if adam_like else data.val_dot_update
        if exact_dots is None:
            return None
        stored = data.precond_grad if adam_like else data.update
        dot_error = exact_dots.float() - torch.einsum("pbk,pk->pb", stored.float(), data.val_grad.float())
        return cls(dot_error, adam_like, n, f32)

    def step(self, where: tuple[int, int, float], ids: Tensor, ref: int, t: int, lr: float, decay: float,
             beta1: float) -> None:
        err_new, err_ref = _at(self.dot_error, where, ids), _at(self.dot_error, where, ref)
        if self.adam_like:
            self.momentum = beta1 * self.momentum + (1.0 - beta1) * err_new
            self.momentum_ref = beta1 * self.momentum_ref + (1.0 - beta1) * err_ref
            step = (self.momentum - self.momentum_ref) / (1.0 - beta1 ** (t + 1))
        else:
            step = err_new - err_ref
        self.value = self.value - lr * (step + decay * self.value)


def _shadow_value(shadow: _DotErrorShadow | None) -> Tensor | float:
    return 0.0 if shadow is None else shadow.value


def _replay_adjoint(data: ReplayData, orders: Tensor, control_variates: bool, quadratic: bool) -> ReplayResult:
    from lpl.order.adjoint import estimate_from_tables

    if orders.shape[1] != data.num_steps:
        raise LplError(
            f"method 'adjoint' scores complete orders of {data.num_steps} steps (its tables describe the final "
            f"weights); got {orders.shape[1]} steps: use another method for shorter orders."
        )
    projected = "first_order" if data.curv_basis is not None else "zeroth_order"
    # the curve and batch losses come from a projected replay (with the first param group's weight decay for all,
    # when the groups had their own); the final loss from the exact tables
    result = replay(dataclasses.replace(data, weight_decay_per_group=False), orders, projected, control_variates,
                    quadratic)
    def final_loss(tables: Tensor) -> Tensor:
        return estimate_from_tables(tables.float(), data.swap_curvature.float(), float(data.val_loss[-1]), orders,
                                    data.reference_order)

    result.final_loss = result.linear_loss = final_loss(data.swap_tables[:1])
    if quadratic and data.swap_tables.shape[0] > 1:  # tables 1.. are the validation curvature's directions
        result.final_loss = final_loss(data.swap_tables)
    else:
        result.linear_loss = None
    result.loss_curve[:, -1] = result.final_loss
    return result
