"""Adjoint sensitivity tables: the final validation loss of any order as a sum of T exact scalars.

The projected replay methods (``lpl.order.replay``) carry each order's displacement Delta_t = gamma_t - theta_t
through k-dimensional projections, where Adam's coordinate-wise nonlinearity cannot be applied. This module keeps
the nonlinearity where it matters and makes everything else linear, so that the loss of an order decomposes:

1. **Swap effects, exact** (nonlinear). Feeding pool batch b's gradient at step t instead of the reference run's
   changes Adam's moments at every later step s >= t by beta1^(s-t) (1 - beta1) (g_b - g_t) and
   beta2^(s-t) (1 - beta2) (g_b^2 - g_t^2). Its effect on every later update, u_s(t, b) - u_s, is computed exactly,
   square roots included; it stays bounded where a coordinate's second moment is ~0 (a linearisation of Adam there
   is off by orders of magnitude).
2. **Propagation, linear**. A displacement delta theta_s changes later gradients through the reference batch's own
   Hessian H_s; that change enters the momentum and the update divided by a fixed denominator (the second moment's
   response to it is dropped): the larger of the reference run's second moment and the one an average order sees
   (every step feeding the pool-mean squared gradient). With the reference run's alone, coordinates that its
   batches left at v ~ 0 (rare tokens, say) amplified the propagated change without bound on the demo LM and ViT.
   The map is linear, so its adjoint runs backwards once:
   a_T = w (the validation gradient, or a curvature direction), and for s = T-1 .. 0 with
   c_s = lr_s / ((1 - beta1^(s+1)) (sqrt(v_hat_{s+1}) + eps)),
   b~ = b_{s+1} - c_s a_{s+1};  a_s = (1 - lr_s wd) a_{s+1} + (1 - beta1) H_s b~;  b_s = beta1 b~.
3. **Tables**. ``table[t, b] = sum_{s >= t} a_{s+1} . (-lr_s) (u_s(t, b) - u_s)``: the first-order change of
   <w, theta_T> when batch b replaces step t's batch. An order l then ends at
   <w, Delta_T> ~ sum_t (table[t, l_t] - table[t, r_t]), and the final loss estimate is
   L(theta_T) + sum_t (table_0[t, l_t] - table_0[t, r_t]) + 1/2 sum_i lambda_i coord_i^2 with coord_i from the
   table of the i-th top validation-curvature direction q_i (Ritz value lambda_i).

Orders are scored by T gathers per table, with no projection noise. Building the
tables costs one re-run of the reference training, T x (1 + m) Hessian-vector products, T x num_batches gradients
(twice when they do not fit in ``GRADIENT_CACHE_BYTES``) and O(T^2 num_batches d) elementwise work; memory as
``record_sensitivities`` says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lpl.order import norm_statistics, quantities
from lpl.order.linearized import (
    LinearizedRun, has_weight_decay, linearized_scalars, linearized_tensors, replay_linearized,
)
from lpl.order.rng import as_in_training, capture_rng
from lpl.utils.autograd import double_backward_ready
from lpl.utils.errors import LplError
from lpl.utils.loss import module_loss, to_module

if TYPE_CHECKING:
    from lpl.order.store import Recording

# pool gradients at every step are kept in memory below this size (else computed twice)
GRADIENT_CACHE_BYTES = 2 << 30
# the linearised replay's pool gradients ((T + 1) x num_batches x d, float32 in memory) are refused above this size
LINEARIZED_MAX_BYTES = 8 << 30
# its d-sized rows (gradients, Hessian factors) are stored in bfloat16: float32's range at half the file size (they
# are widened to float32 on load; rounding them left the digits task's estimates unchanged at 4 significant digits)
STORED_DTYPE = torch.bfloat16
# the reference order's own linearised replay may drift this fraction of |theta_T - theta_0| (bfloat16 rounding of
# the stored rows) before a warning says the stored gradients are not training's
REPLAY_DRIFT_TOLERANCE = 0.01
# top curvature directions of the final validation loss in the BatchNorm running statistics (second-order readout)
NORM_CURVATURE_RANK = 32


@dataclass
class Trajectory:
    """The reference run's flat parameters and Adam moments before each step t = 0..T (index T: after the last).

    ``theta``, ``exp_avg``, ``exp_avg_sq``: [T + 1, d]; ``lr``: [T]; the rest are Adam's hyperparameters.
    ``pool_sq`` [T, d], optional: Adam's second moment after each step had every step fed the pool-mean squared
    gradient (the second moment an average order sees); the propagation divides by the larger of the two.
    """

    theta: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    lr: Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float | Tensor  # one value, or [d] per coordinate
    decoupled: bool
    pool_sq: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.lr.numel())

    def bias_corrections(self, s: int) -> tuple[float, float]:
        """Adam's (1 - beta1^(s+1), 1 - beta2^(s+1)) at step s (torch counts steps from 1)."""
        beta1, beta2 = self.betas
        return 1.0 - beta1 ** (s + 1), 1.0 - beta2 ** (s + 1)

    def propagation_second_moment(self, s: int) -> Tensor:
        """The second moment after step s that divides the propagated momentum (see ``pool_sq``)."""
        own = self.exp_avg_sq[s + 1].clamp_min(0.0)
        return own if self.pool_sq is None else torch.maximum(own, self.pool_sq[s])

    def fed_gradients(self, t: int, grads: Tensor) -> Tensor:
        """Loss gradients at theta_t as Adam receives them (plus coupled weight decay, for Adam without the W)."""
        if has_weight_decay(self.weight_decay) and not self.decoupled:
            return grads + self.weight_decay * self.theta[t]
        return grads

    def update(self, s: int, exp_avg: Tensor, exp_avg_sq: Tensor) -> Tensor:
        """Adam's direction m_hat / (sqrt(v_hat) + eps) at step s from moments after the step (any leading dims)."""
        bc1, bc2 = self.bias_corrections(s)
        return (exp_avg / bc1) / ((exp_avg_sq.clamp_min(0.0) / bc2).sqrt() + self.eps)


def adjoint_vectors(trajectory: Trajectory, hvp: Callable[[int, Tensor], Tensor], targets: Tensor) -> Tensor:
    """a_{s+1} for s = 0..T-1 ([T, n, d]): the sensitivity of <targets_i, theta_T> to a displacement added to
    theta_{s+1}, through the linearised Adam map of the module docstring.

    ``hvp(s, x)`` returns H_s x for x [n, d], H_s the Hessian of the reference batch's loss at theta_s (without
    weight decay: coupled weight decay is added here).
    """
    beta1 = trajectory.betas[0]
    a = targets.clone()
    b = torch.zeros_like(a)
    out = a.new_empty((trajectory.num_steps, *a.shape))
    for s in reversed(range(trajectory.num_steps)):
        out[s] = a
        lr = float(trajectory.lr[s])
        bc1, bc2 = trajectory.bias_corrections(s)
        scale = lr / (bc1 * ((trajectory.propagation_second_moment(s) / bc2).sqrt() + trajectory.eps))
        b_tilde = b - scale * a
        curvature = hvp(s, b_tilde)
        if has_weight_decay(trajectory.weight_decay) and not trajectory.decoupled:
            curvature = curvature + trajectory.weight_decay * b_tilde
        keep = 1.0 - lr * trajectory.weight_decay if trajectory.decoupled else 1.0
        a = keep * a + (1.0 - beta1) * curvature
        b = beta1 * b_tilde
    return out


def pool_second_moment(trajectory: Trajectory, batch_grads: Callable[[int], Tensor]) -> Tensor:
    """``Trajectory.pool_sq`` [T, d]: Adam's second-moment recursion fed, at each step t, the mean over pool batches
    of the squared gradient at theta_t (coupled weight decay included), i.e. what an average order sees."""
    beta2 = trajectory.betas[1]
    second, rows = torch.zeros_like(trajectory.theta[0]), []
    for t in range(trajectory.num_steps):
        grads = trajectory.fed_gradients(t, batch_grads(t))
        second = beta2 * second + (1.0 - beta2) * (grads * grads).mean(0)
        rows.append(second)
    return torch.stack(rows)


def swap_tables(trajectory: Trajectory, batch_grads: Callable[[int], Tensor], adjoints: Tensor,
                progress: Callable[[int], None] | None = None) -> Tensor:
    """``table[i, t, b]`` = sum_{s >= t} a_{s+1,i} . (-lr_s) (u_s(t, b) - u_s) ([n, T, num_batches]).

    ``batch_grads(t)`` returns every pool batch's loss gradient at theta_t ([num_batches, d], without weight decay);
    ``adjoints`` is ``adjoint_vectors``' output. u_s(t, b) is Adam's update at step s when batch b's gradient
    replaced the reference one at step t, all else as in the reference run (exact, square roots included).
    """
    beta1, beta2 = trajectory.betas
    steps = trajectory.num_steps
    m, v = trajectory.exp_avg, trajectory.exp_avg_sq
    base = torch.stack([trajectory.update(s, m[s + 1], v[s + 1]) for s in range(steps)])
    tables = None
    for t in range(steps):
        grads = trajectory.fed_gradients(t, batch_grads(t))
        # the gradient the reference run fed Adam at step t, read back from its moments (exact up to rounding)
        trained = (m[t + 1] - beta1 * m[t]) / (1.0 - beta1)
        trained_sq = ((v[t + 1] - beta2 * v[t]) / (1.0 - beta2)).clamp_min(0.0)
        dm = (1.0 - beta1) * (grads - trained)
        dv = (1.0 - beta2) * (grads * grads - trained_sq)
        if tables is None:
            tables = grads.new_zeros(adjoints.shape[1], steps, grads.shape[0])
        for s in range(t, steps):
            swapped = trajectory.update(s, m[s + 1] + beta1 ** (s - t) * dm, v[s + 1] + beta2 ** (s - t) * dv)
            change = swapped - base[s]
            tables[:, t] -= float(trajectory.lr[s]) * (adjoints[s] @ change.T)
        if progress is not None:
            progress(t)
    return tables


def estimate_from_tables(tables: Tensor, curvature: Tensor, reference_loss: float, orders: Tensor,
                         reference_order: Tensor) -> Tensor:
    """Final validation loss of each order [N, T]: table 0 is the validation gradient's, tables 1..m the curvature
    directions' with Ritz values ``curvature`` [m]."""
    steps = torch.arange(orders.shape[1], device=orders.device)
    moved = tables[:, steps, orders] - tables[:, steps, reference_order.to(orders.device)][:, None]  # [n, N, T]
    change = moved.sum(-1)
    loss = reference_loss + change[0]
    if tables.shape[0] > 1:
        loss = loss + 0.5 * (curvature.to(change)[:, None] * change[1:] ** 2).sum(0)
    return loss


# ---------------------------------------------------------------- building the tables for a recording
class _StateCapture(L.Callback):
    """Flat parameters and Adam moments before every training step and after the last one; the RNG states every step
    started from and the modules' training modes, to compute gradients exactly as training did."""

    def __init__(self) -> None:
        self.theta: list[Tensor] = []
        self.exp_avg: list[Tensor] = []
        self.exp_avg_sq: list[Tensor] = []
        self.rng: list[dict[str, Any]] = []
        self.modes: list[bool] = []
        self.running: list[Tensor] = []  # BatchNorm running statistics, as theta
        self.momenta: list[Tensor] = []  # the weight each step gives its batch statistics in them
        # every other buffer, as theta (a buffer unchanged since the last step is the same tensor: no copy)
        self.buffers: list[dict[str, Tensor]] = []
        self.step_counters: set[str] = set()  # BatchNorm's num_batches_tracked: one per step in every order
        self.forward: Callable[[], Any] = contextlib.nullcontext  # the precision context training ran in

    def _capture(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        state = trainer.optimizers[0].state
        self.theta.append(_flat([p.detach() for p in params]))
        self.exp_avg.append(_flat([state.get(p, {}).get("exp_avg", torch.zeros_like(p)) for p in params]))
        self.exp_avg_sq.append(_flat([state.get(p, {}).get("exp_avg_sq", torch.zeros_like(p)) for p in params]))
        self.running.append(norm_statistics.running_statistics(pl_module))
        previous = self.buffers[-1] if self.buffers else {}
        buffers = {}
        for name, buffer in _other_buffers(pl_module):
            kept = previous.get(name)
            buffers[name] = kept if kept is not None and torch.equal(kept, buffer) else buffer.detach().clone()
        self.buffers.append(buffers)
        counters = {id(m.num_batches_tracked) for m in norm_statistics.tracked_norms(pl_module)}
        self.step_counters = {name for name, buffer in pl_module.named_buffers() if id(buffer) in counters}

    def changed_buffers(self) -> list[str]:
        """Buffers whose value training changed in a way the order could affect: not BatchNorm statistics (modelled)
        nor BatchNorm step counters (the same in every order)."""
        return [name for name in self.buffers[0] if name not in self.step_counters
                and any(step[name] is not self.buffers[0][name] for step in self.buffers[1:])]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._capture(trainer, pl_module)
        self.momenta.append(norm_statistics.step_momenta(pl_module))
        self.rng.append(capture_rng())
        self.modes = self.modes or [m.training for m in pl_module.modules()]
        self.forward = trainer.precision_plugin.forward_context

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._capture(trainer, pl_module)


def _other_buffers(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """Named buffers except BatchNorm running statistics (``norm_statistics`` models those)."""
    statistics = {id(t) for m in norm_statistics.tracked_norms(model) for t in (m.running_mean, m.running_var)}
    return [(name, buffer) for name, buffer in model.named_buffers() if id(buffer) not in statistics]


def _load_buffers(model: torch.nn.Module, values: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in _other_buffers(model):
            if name in values:
                buffer.copy_(values[name])


def _weight_decay(optimizer: dict[str, Any], params: list[Tensor]) -> float | Tensor:
    """The recorded weight decay: one value, or per coordinate [d] when the param groups had their own."""
    decays = optimizer.get("weight_decays")
    if not decays:
        return float(optimizer.get("weight_decay", 0.0))
    return torch.cat([torch.full((p.numel(),), float(wd), dtype=p.dtype, device=p.device)
                      for p, wd in zip(params, decays)])


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _load(theta: Tensor, params: list[Tensor]) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def record_sensitivities(
    path: str | Path, *, curvature_rank: int = 8, hessian_rank: int = 16, accelerator: str = "auto",
    check_orders: int = 2, verbose: bool = True,
) -> Path:
    """Build the full-space sensitivity data of a complete recording and add them to it (methods "adjoint" and
    "linearized").

    Re-runs the reference training from the recording (checked against its final validation loss), then computes
    the adjoint tables described in the module docstring: the validation gradient's and those of the top
    ``curvature_rank`` validation-curvature directions at theta_T (4 m Lanczos steps). With ``hessian_rank`` k > 0
    it also stores what the linearised Adam replay (``lpl.order.linearized``) needs: every pool batch's loss and
    gradient at every reference step, the validation loss and gradient there, and the top-k eigenpairs of each
    reference batch's Hessian (3 k Lanczos steps per step); that is (T + 1) x num_batches x d values (bfloat16 on
    disk, float32 in memory), refused above ``LINEARIZED_MAX_BYTES`` in memory. A model with BatchNorm also gets its
    running statistics modelled (``lpl.order.norm_statistics``: every pool batch's batch statistics at each step, the
    validation loss's gradient in them at each step and its top ``NORM_CURVATURE_RANK`` curvature at the end; T + 1
    validation backward passes and up to 3 x that rank Hessian-vector products more). Then retrains ``check_orders``
    random orders as a ground-truth check of both methods, kept in the manifest (a warning when one does worse than
    "no change"). Runs in one process on one device, whatever the recording run used. Returns the sensitivity file's
    path.

    Example::

        record_sensitivities("runs/ref/recording")
        estimator = OrderEstimator.from_recording("runs/ref/recording", method="linearized")
    """
    from lpl.order.store import Recording

    _check_arguments(curvature_rank, hessian_rank, check_orders)
    recording = Recording.open(path)
    if recording.status != "complete":
        raise LplError(f"{recording.root} is not a complete recording (status {recording.status!r}); finish the run.")
    recording.verify()
    log = _Progress(rank_zero_info if verbose else (lambda *_: None), recording.num_steps)

    run, rerun_loss, recorded = _rerun_reference(recording, hessian_rank, accelerator, log)
    pool = _PoolGradients(run, hessian_rank > 0, log)
    targets, curvature = _adjoint_targets(run, curvature_rank, log)
    tables = _adjoint_tables(run, pool, targets, log)
    num_tables = tables.shape[0]
    norm_data = _norm_statistics_data(run, pool, hessian_rank)
    table_curvature = curvature
    if norm_data:
        tables, table_curvature = _with_norm_tables(tables, curvature, norm_data)

    tensors = {"tables": tables.float().cpu(), "curvature": table_curvature.float().cpu()}
    info: dict[str, Any] = {"curvature_rank": num_tables - 1, "hessian_rank": hessian_rank,
                            "norm_curvature_rank": tables.shape[0] - num_tables, "rerun_val_loss": rerun_loss}
    reference_loss = recorded if recorded is not None else rerun_loss
    estimators = {"adjoint": lambda orders: estimate_from_tables(tables.cpu(), table_curvature.cpu(), reference_loss,
                                                                 orders, torch.tensor(run.reference))}
    if hessian_rank:
        linearized = _linearized_data(run, pool, hessian_rank, targets[1:], curvature, norm_data, log)
        tensors.update(linearized_tensors(linearized))
        info["linearized"] = linearized_scalars(linearized)
        info["reference_replay_drift"] = _warn_on_replay_drift(linearized, run.reference, run.trajectory)
        estimators["linearized"] = lambda orders: replay_linearized(linearized, orders).final_loss
    run.load_step(run.steps)
    seconds = log.elapsed()
    checks = _check_against_retraining(recording.root, estimators, reference_loss, run.reference, check_orders,
                                       accelerator)
    recording.write_sensitivity(tensors, {**info, "seconds": seconds, "checks": checks})
    written = recording.root / recording.manifest["sensitivity"]["file"]  # a rebuild goes under a new name
    log(f"wrote {written}", seconds)
    return written


def _check_arguments(curvature_rank: int, hessian_rank: int, check_orders: int) -> None:
    """Refuse ``record_sensitivities``' arguments out of range, and a call on any process but global rank 0."""
    if curvature_rank < 0:
        raise LplError(f"curvature_rank must be >= 0, got {curvature_rank}.")
    if hessian_rank < 0:
        raise LplError(f"hessian_rank must be >= 0 (0: adjoint tables only), got {hessian_rank}.")
    if check_orders < 0:
        raise LplError(f"check_orders must be >= 0, got {check_orders}.")
    # the real rank, not rank_and_world(): single_process() makes each process of a DDP script look like rank 0 but
    # still leaves every rank calling this, and nothing else stops them writing the same recording at once
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        raise LplError(
            "record_sensitivities runs in one process and writes into the recording: call it on global rank 0 only "
            "(or afterwards with `lpl sensitivity --recording DIR`)."
        )


@dataclass
class _Progress:
    """``record_sensitivities``' progress messages, with the seconds since it started."""

    say: Callable[[str], Any]
    steps: int
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str, seconds: float | None = None) -> None:
        self.say(f"record_sensitivities: {message} ({self.elapsed() if seconds is None else seconds:.1f} s)")

    def step(self, t: int, what: str) -> None:
        """Step t of a pass over the T steps done: a message every tenth of them."""
        if (t + 1) % max(1, self.steps // 10) == 0 or t + 1 == self.steps:
            self(f"{what} {t + 1}/{self.steps} steps")


@dataclass(eq=False)
class _ReferenceRun:
    """The re-run reference training, to probe at its steps t = 0..T: the model (in eval mode between probes), its
    trainable parameters, the states captured before every step, the pool batches (moved to the model) and the
    reference order."""

    model: L.LightningModule
    params: list[Tensor]
    device: torch.device
    capture: _StateCapture
    trajectory: Trajectory
    pool: list[Any]
    reference: list[int]
    validation_fn: Callable[[], Tensor]  # the validation loss, differentiable (eval mode: as validation)
    steps: int

    def load_step(self, t: int) -> None:
        """The reference run's weights, buffers and BatchNorm running statistics before step t (after the last at
        T)."""
        _load(self.trajectory.theta[t], self.params)
        _load_buffers(self.model, self.capture.buffers[t])
        norm_statistics.load_running_statistics(self.model, self.capture.running[t].to(self.device))

    def gradients_at(
        self, t: int, loss_fn: Callable[[], Tensor], curvature: bool, training: bool = False
    ) -> tuple[float, Tensor, list[Tensor]]:
        """The loss at the reference step t, its flat gradient and the per-parameter gradients (with their graph
        when ``curvature``): as training step t < T computed them (``training``: its modes and RNG state), else in
        eval mode with step t's running statistics, as validation."""
        self.load_step(t)
        as_trained = as_in_training(self.model, self.capture.modes, self.capture.rng[t]) if training else None
        with as_trained or contextlib.nullcontext(), torch.enable_grad():
            loss, grads = quantities.loss_and_gradients(loss_fn, self.params, curvature)
        return float(loss.detach()), _flat(grads), grads

    def batch_loss(self, b: int) -> Callable[[], Tensor]:
        """Pool batch b's loss, in the precision context training ran in."""
        def loss() -> Tensor:
            with self.capture.forward():
                return module_loss(self.model, self.pool[b])

        return loss

    def eval_losses(self, t: int) -> Tensor:
        """Every pool batch's loss at step t in eval mode ([num_batches], float64)."""
        self.load_step(t)
        with torch.no_grad(), self.capture.forward():
            return torch.tensor([float(module_loss(self.model, batch)) for batch in self.pool], dtype=torch.float64)

    def modes_differ(self) -> bool:
        """Whether the model's training and eval modes give different losses.

        Training steps see the model in its training modes (dropout, BatchNorm on batch statistics), validation and
        the pool batches' losses after an order (what `retrain` measures) in eval mode: both kinds of probe are
        needed only when the two differ, which a model with neither layer never does.
        """
        train_loss = self.gradients_at(0, self.batch_loss(0), False, training=True)[0]
        return train_loss != self.eval_losses(0)[0].item()

    def reference_hessian(self, s: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The reference batch's gradient at theta_s and v -> H_s v."""
        _, grad, grads = self.gradients_at(s, self.batch_loss(self.reference[s]), True, training=True)
        product = quantities.hessian_vector_product(grads, self.params)
        return grad, product

    def hvp(self, s: int, vectors: Tensor) -> Tensor:
        """H_s x for each row x of ``vectors`` [n, d] (``adjoint_vectors``' ``hvp``)."""
        with torch.enable_grad():
            product = self.reference_hessian(s)[1]
            return torch.stack([product(row) for row in vectors])

    @contextlib.contextmanager
    def differentiable_statistics_at(self, t: int) -> Iterator[Tensor]:
        """Step t's weights, and its BatchNorm running statistics as a leaf tensor eval-mode losses differentiate."""
        self.load_step(t)
        running = self.capture.running[t].to(self.device).requires_grad_()
        with norm_statistics.differentiable_running_statistics(self.model, running), torch.enable_grad():
            yield running

    def norm_gradient(self, t: int, loss_fn: Callable[[], Tensor]) -> Tensor:
        """The eval-mode loss's gradient in the BatchNorm running statistics at step t ([C], on the CPU)."""
        with self.differentiable_statistics_at(t) as running:
            return torch.autograd.grad(loss_fn(), running)[0].float().cpu()

    def norm_curvature(self) -> tuple[Tensor, Tensor]:
        """The top curvature of the final validation loss in the running statistics: ([m, C] orthonormal directions,
        [m] Ritz values), m <= ``NORM_CURVATURE_RANK``, on the CPU."""
        with self.differentiable_statistics_at(self.steps) as running:
            with double_backward_ready():
                loss = self.validation_fn()
            (grad,) = torch.autograd.grad(loss, running, create_graph=True)

            def hvp(vector: Tensor) -> Tensor:
                return torch.autograd.grad(grad, running, vector, retain_graph=True)[0].detach()

            rank = min(NORM_CURVATURE_RANK, running.numel())
            vectors, values = quantities.top_curvature(hvp, grad.detach(), rank, min(running.numel(), 3 * rank))
        return vectors.float().cpu(), values.float().cpu()


class _PoolGradients:
    """Every pool batch's loss gradient at the reference steps, keeping on the way what the linearised replay and
    the BatchNorm model need: each batch's loss at each step, and its batch statistics at each training step."""

    def __init__(self, run: _ReferenceRun, linearized: bool, log: _Progress) -> None:
        self.run, self.log = run, log
        # pool gradients at every step: the second moment an average order sees, the tables' inputs when they fit,
        # and the linearised replay's (always kept then)
        size = run.steps * len(run.pool) * run.trajectory.theta.shape[1] * run.trajectory.theta.element_size()
        self.keep = linearized or size <= GRADIENT_CACHE_BYTES
        self.kept: list[Tensor] = []  # with ``keep``, [num_batches, d] at steps 0, 1, ... as ``remembered`` met them
        self.losses: dict[int, Tensor] = {}  # [num_batches] float64 at step t, as ``retrain`` measures them
        self.batch_stats: dict[int, Tensor] = {}  # [num_batches, C] BatchNorm statistics each batch yields at t < T
        self.statistics = norm_statistics.BatchStatistics(run.model)  # over every training-mode pool forward
        self.modes_differ = run.modes_differ()

    def __call__(self, t: int) -> Tensor:
        """Every pool batch's gradient at theta_t: as training step t would compute it (t < T), in eval mode at T."""
        run, training = self.run, t < self.run.steps
        results, stats = [], []
        with self.statistics if training else contextlib.nullcontext():
            for b in range(len(run.pool)):
                results.append(run.gradients_at(t, run.batch_loss(b), False, training))
                if training:
                    stats.append(self.statistics.take())
        if training:
            self.batch_stats[t] = torch.stack(stats)
        losses = torch.tensor([loss for loss, _, _ in results], dtype=torch.float64)
        self.losses[t] = run.eval_losses(t) if self.modes_differ and training else losses
        return torch.stack([grad for _, grad, _ in results])

    def remembered(self, t: int) -> Tensor:
        """``self(t)``, kept in ``kept`` when ``keep``."""
        grads = self(t)
        if self.keep:
            self.kept.append(grads)
        self.log.step(t, f"pool gradients ({len(self.run.pool)} batches)")
        return grads


def _rerun_reference(
    recording: Recording, hessian_rank: int, accelerator: str, log: _Progress
) -> tuple[_ReferenceRun, float, float | None]:
    """Re-run the reference training, capturing its states, with a warning where it does not end at the recorded
    validation loss or changed buffers. Returns the run, its final validation loss and the recorded one (if any)."""
    from lpl.order.pool import single_val_loader, validation_loss_fn
    from lpl.order.retraining import fit_in_order, pool_batches, rebuild, validation_loss

    steps = recording.num_steps
    model, datamodule = rebuild(recording, recording.order)
    if hessian_rank:
        _check_linearized_size(sum(p.numel() for p in model.parameters() if p.requires_grad), recording, steps)
    capture = _StateCapture()
    fit_in_order(recording, model, datamodule, steps, [capture], accelerator)
    device = model.device
    params = [p for p in model.parameters() if p.requires_grad]
    val_loader = single_val_loader(datamodule.val_dataloader())
    rerun_loss = validation_loss(model, val_loader, capture.forward)
    recorded = recording.probe_scalars.get("val_loss", [None])[-1]
    # stacklevel 3: the warnings name record_sensitivities' caller
    changed = capture.changed_buffers()
    if recorded is not None and abs(rerun_loss - recorded) > 1e-3 * max(1.0, abs(recorded)):
        per_process = ""
        if int(recording.manifest.get("world_size", 1)) > 1:  # each DDP process updates them from its share
            per_process = (" or, recorded by several processes, state each process updated from its own share of the "
                           f"batch (BatchNorm statistics{', buffers ' + str(changed[:3]) if changed else ''})")
        warnings.warn(
            f"re-running the reference training ended at validation loss {rerun_loss:.6f}, the recording says "
            f"{recorded:.6f}: training is not reproducible here (nondeterministic kernels, another device or "
            f"library version{per_process}); the tables describe the re-run.",
            stacklevel=3,
        )
    if changed:
        warnings.warn(
            f"training changed the buffers {changed[:3]}{' and more' if len(changed) > 3 else ''}: every reference "
            "step's gradients use their values at that step, and every order is estimated with them (how the order "
            "would change them is not modelled, as it is for BatchNorm statistics); check the estimates against "
            "retrained orders (`lpl check-methods`).", stacklevel=3)
    optimizer = recording.manifest.get("optimizer", {})
    trajectory = Trajectory(
        theta=torch.stack(capture.theta), exp_avg=torch.stack(capture.exp_avg),
        exp_avg_sq=torch.stack(capture.exp_avg_sq),
        lr=torch.as_tensor(recording.scalars["lr"][:steps], dtype=torch.float64),
        betas=tuple(float(b) for b in optimizer.get("betas", (0.9, 0.999))), eps=float(optimizer.get("eps", 1e-8)),
        weight_decay=_weight_decay(optimizer, params), decoupled=bool(optimizer.get("decoupled", True)),
    )
    log(f"re-ran {steps} steps")

    pool = [to_module(batch, model, training=True) for batch in pool_batches(recording, datamodule)]
    model.eval()
    run = _ReferenceRun(model, params, device, capture, trajectory, pool, recording.order,
                        validation_loss_fn(val_loader, model, capture.forward), steps)
    return run, rerun_loss, recorded


def _adjoint_targets(run: _ReferenceRun, curvature_rank: int, log: _Progress) -> tuple[Tensor, Tensor]:
    """The tables' targets at theta_T ([1 + m, d]: the validation gradient and the top ``curvature_rank`` curvature
    directions of the validation loss) and those directions' Ritz values [m]."""
    _, val_grad, val_grads = run.gradients_at(run.steps, run.validation_fn, curvature_rank > 0)
    targets, curvature = val_grad[None], val_grad.new_zeros(0)
    if curvature_rank:
        with torch.enable_grad():
            hvp_val = quantities.hessian_vector_product(val_grads, run.params)
            directions, curvature = quantities.top_curvature(hvp_val, val_grad, curvature_rank, 4 * curvature_rank)
        targets = torch.cat([targets, directions])
    log(f"validation gradient and {curvature.numel()} curvature directions at the end")
    return targets, curvature


def _adjoint_tables(run: _ReferenceRun, pool: _PoolGradients, targets: Tensor, log: _Progress) -> Tensor:
    """``swap_tables`` of ``targets`` [n, T, num_batches], after the pool's second moment (``Trajectory.pool_sq``,
    set on the run's trajectory) and the adjoint pass."""
    run.trajectory.pool_sq = pool_second_moment(run.trajectory, pool.remembered)
    log(f"pool gradients at {run.steps} steps")
    adjoints = adjoint_vectors(run.trajectory, run.hvp, targets)
    log(f"adjoint pass, {targets.shape[0]} vectors")
    with torch.no_grad():
        tables = swap_tables(run.trajectory, pool.kept.__getitem__ if pool.keep else pool, adjoints,
                             lambda t: log.step(t, "swap tables"))
    if not torch.isfinite(tables).all():
        raise LplError("the sensitivity tables hold non-finite values (the re-run diverged?); check the recording.")
    return tables


def _norm_statistics_data(run: _ReferenceRun, pool: _PoolGradients, hessian_rank: int) -> dict[str, Tensor]:
    """What modelling the order's BatchNorm running statistics needs (``lpl.order.norm_statistics``; the validation
    gradient in them at every step with ``hessian_rank``), or nothing: no BatchNorm, or a warning that it is not
    modelled (call after the pool gradients at every training step)."""
    if pool.statistics.irregular():
        warnings.warn(
            f"BatchNorm layer(s) {sorted(pool.statistics.irregular())} do not run exactly once per training forward "
            "pass, so a step does not update their running statistics once: the estimates keep the reference run's "
            "statistics instead of modelling each order's.",
            stacklevel=3,
        )
        return {}
    if not norm_statistics.tracked_norms(run.model):
        return {}
    momenta = torch.stack(run.capture.momenta)
    columns = norm_statistics.layer_columns(run.model)
    for name in pool.statistics.never_called():  # defined, never run: never updated
        momenta[:, columns[name]] = 0.0
    steps, stats = run.steps, pool.batch_stats
    norm_data = {
        "norm_stats": torch.stack([stats[t] - stats[t][run.reference[t]] for t in range(steps)]),
        "norm_momenta": momenta,
        # at every step for the linearised replay's curve, else the tables need the last only
        "val_norm_grads": torch.stack([run.norm_gradient(t, run.validation_fn)
                                       for t in (range(steps + 1) if hessian_rank else [steps])]),
    }
    norm_data["norm_directions"], norm_data["norm_curvature"] = run.norm_curvature()
    return norm_data


def _with_norm_tables(tables: Tensor, curvature: Tensor, norm_data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The tables (the validation gradient's updated in place) and Ritz values with the BatchNorm statistics'
    effects added."""
    # as tables: batch b at step t moves the final statistics by its weight there times its statistics; the
    # validation gradient's table gains its first-order effect, and the curvature directions get tables of
    # their own (the final loss adds 1/2 lambda coord^2 for each, as for the weights' directions)
    weights = norm_statistics.final_weights(norm_data["norm_momenta"])
    moved = norm_data["norm_stats"] * weights[:, None]  # [T, nb, C]
    tables[0] += (moved @ norm_data["val_norm_grads"][-1]).to(tables)
    tables = torch.cat([tables, (moved @ norm_data["norm_directions"].T).permute(2, 0, 1).to(tables)])
    return tables, torch.cat([curvature, norm_data["norm_curvature"].to(curvature)])


def _linearized_data(
    run: _ReferenceRun, pool: _PoolGradients, hessian_rank: int, val_directions: Tensor, val_curvature: Tensor,
    norm_data: dict[str, Tensor], log: _Progress,
) -> LinearizedRun:
    """The linearised replay's data (``_linearized_run``), with the BatchNorm model's ``norm_data`` and each pool
    batch's gradient in the final statistics when there are any; empties the pool's kept gradients."""
    steps = run.steps
    pool.kept.append(pool(steps))  # at theta_T too: each batch's loss after a complete order
    linearized = _linearized_run(
        run.trajectory, pool.kept, torch.stack([pool.losses[t] for t in range(steps + 1)]),
        [run.gradients_at(t, run.validation_fn, False)[:2] for t in range(steps + 1)],
        run.reference_hessian, hessian_rank, val_directions, val_curvature,
        lambda s: log.step(s, f"reference Hessians (rank {hessian_rank})"),
    )
    if norm_data:
        pool_norm_grads = torch.stack([run.norm_gradient(steps, run.batch_loss(b)) for b in range(len(run.pool))])
        linearized = dataclasses.replace(linearized, **norm_data, pool_norm_grads=pool_norm_grads)
    del pool.kept[:]
    return linearized


def _linearized_run(
    trajectory: Trajectory, pool_grads: list[Tensor], pool_losses: Tensor, validation: list[tuple[float, Tensor]],
    reference_hessian: Callable[[int], tuple[Tensor, Callable[[Tensor], Tensor]]], rank: int, val_directions: Tensor,
    val_curvature: Tensor, progress: Callable[[int], None],
) -> LinearizedRun:
    """Assemble the linearised replay's data (on the CPU; the d-sized rows as ``STORED_DTYPE``) from the re-run:
    pool gradients and losses at theta_0..T, validation (loss, gradient) there, and the top-``rank`` eigenpairs of
    each reference batch's Hessian (``reference_hessian(s)`` gives the batch gradient, the Lanczos start, and
    v -> H_s v)."""
    factors = []
    for s in range(trajectory.num_steps):
        with torch.enable_grad():
            grad, product = reference_hessian(s)
            factors.append(_padded(quantities.top_curvature(product, grad, rank, 3 * rank), rank))
        progress(s)
    m, v = trajectory.exp_avg, trajectory.exp_avg_sq
    coupled = not trajectory.decoupled and has_weight_decay(trajectory.weight_decay)
    decay = trajectory.weight_decay
    decay = decay.float().cpu() if isinstance(decay, Tensor) else decay
    return LinearizedRun(
        pool_grads=torch.stack(pool_grads).to("cpu", STORED_DTYPE), pool_losses=pool_losses.float(),
        hessian_vectors=torch.stack([vectors for vectors, _ in factors]).to("cpu", STORED_DTYPE),
        hessian_values=torch.stack([values for _, values in factors]).float().cpu(),
        reference_updates=torch.stack([trajectory.update(s, m[s + 1], v[s + 1])
                                       for s in range(trajectory.num_steps)]).float().cpu(),
        val_losses=torch.tensor([loss for loss, _ in validation], dtype=torch.float32),
        val_grads=torch.stack([grad for _, grad in validation]).to("cpu", STORED_DTYPE),
        val_directions=val_directions.float().cpu(), val_curvature=val_curvature.float().cpu(),
        lr=trajectory.lr, betas=trajectory.betas, eps=trajectory.eps, weight_decay=decay,
        decoupled=trajectory.decoupled,
        coupled_decay=(trajectory.weight_decay * trajectory.theta[:-1]).float().cpu() if coupled else None,
    )


def _warn_on_replay_drift(run: LinearizedRun, reference: list[int], trajectory: Trajectory) -> float:
    """|Delta_T| of the reference order's own linearised replay over |theta_T - theta_0|: zero up to the stored
    rows' rounding when the stored gradients are those training fed Adam; a warning above ``REPLAY_DRIFT_TOLERANCE``."""
    delta = replay_linearized(run, torch.tensor([reference]), quadratic=False, displacement=True).displacement[0]
    trained = (trajectory.theta[-1] - trajectory.theta[0]).float().norm().cpu()
    drift = float(delta.norm() / trained.clamp_min(torch.finfo(torch.float32).tiny))
    if drift > REPLAY_DRIFT_TOLERANCE:
        warnings.warn(
            f"the linearised replay of the reference order itself drifts {drift:.2%} of the distance the run "
            "trained: the stored pool gradients are not the ones training fed Adam (the module's `loss(batch)` "
            "differs from its training_step, or training clips or accumulates gradients, or draws random numbers "
            "outside the RNG states captured at each step), or the run changed its betas, eps or weight decay during "
            "training (the replay takes them constant); the 'linearized' estimates carry that error.",
            stacklevel=3,
        )
    return drift


def check_errors(checks: list[dict[str, Any]], reference_loss: float, method: str) -> tuple[float, float] | None:
    """Mean |estimate - truth| of ``method`` on the retrained check orders, and that of "no change" (predicting
    ``reference_loss``): the method holds for a run only where the first is the smaller. None when not checked."""
    checked = [c for c in checks if method in c.get("estimates", {})]
    if not checked:
        return None
    error = sum(abs(c["estimates"][method] - c["retrained"]) for c in checked) / len(checked)
    no_change = sum(abs(reference_loss - c["retrained"]) for c in checked) / len(checked)
    return error, no_change


# below this share of the loss, a method's error and that of "no change" are float noise (an order that cannot
# matter, say one batch per epoch): comparing them would condemn a method on rounding
CHECK_NOISE_FLOOR = 1e-5


def misses_more_than_no_change(error: float, no_change: float, reference_loss: float) -> bool:
    """Whether a method's mean error on retrained orders (``check_errors``) condemns it: larger than predicting the
    reference loss does, and above float noise."""
    return error > no_change and error > CHECK_NOISE_FLOOR * max(abs(reference_loss), 1.0)


def _check_against_retraining(
    path: Path, estimators: dict[str, Callable[[Tensor], Tensor]], reference_loss: float, reference: list[int],
    count: int, accelerator: str,
) -> list[dict[str, Any]]:
    """Retrain ``count`` seeded reorderings of the reference run and compare them with each method's estimates."""
    from lpl.order.retraining import retrain
    from lpl.order.store import Recording

    recording = Recording.open(path)  # its files are verified once for every retrained order
    generator = torch.Generator().manual_seed(0)
    order = torch.tensor(reference)
    checks = []
    for _ in range(count):
        shuffled = order[torch.randperm(len(order), generator=generator)]
        estimates = {method: float(estimate(shuffled[None])[0]) for method, estimate in estimators.items()}
        retrained = retrain(recording, shuffled.tolist(), curve_every_n_steps=len(order),
                            accelerator=accelerator).final_loss
        checks.append({"order": shuffled.tolist(), "estimates": estimates, "retrained": retrained})
    for method in estimators if checks else ():
        error, no_change = check_errors(checks, reference_loss, method)
        if misses_more_than_no_change(error, no_change, reference_loss):
            warnings.warn(
                f"on {len(checks)} retrained random orders the {method!r} estimates miss the true final loss by "
                f"{error:.4g} on average, more than predicting the reference loss does ({no_change:.4g}): its "
                f"linearisation does not hold for this run; do not trust method {method!r} here.",
                stacklevel=3,
            )
    return checks


def _check_linearized_size(num_params: int, recording: Any, steps: int) -> None:
    """Refuse, before any work, linearised replay data larger than ``LINEARIZED_MAX_BYTES`` in memory (float32,
    both while built and once loaded; half that on disk)."""
    size = (steps + 1) * len(recording.batches) * num_params * 4
    if size > LINEARIZED_MAX_BYTES:
        raise LplError(
            f"the linearised replay would hold {size / 2**30:.1f} GiB of pool gradients ({steps + 1} steps x "
            f"{len(recording.batches)} batches x {num_params} parameters), above LINEARIZED_MAX_BYTES "
            f"({LINEARIZED_MAX_BYTES / 2**30:.0f} GiB): pass hessian_rank=0 (CLI: --hessian-rank 0) for the adjoint "
            "tables only, or record a shorter reference run."
        )


def _padded(pairs: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Ritz pairs padded with zero pairs to ``rank`` (the Krylov space can close early)."""
    vectors, values = pairs
    missing = rank - values.numel()
    if missing <= 0:
        return vectors, values
    return (torch.cat([vectors, vectors.new_zeros(missing, vectors.shape[1])]),
            torch.cat([values, values.new_zeros(missing)]))
