"""Linearised Adam replay: every order trained again by Adam itself, on gradients linearised about the reference run.

An order l feeds Adam, at step s, pool batch l_s's gradient at the weights gamma_s = theta_s + Delta_s it has
reached. Around the reference run's weights theta_s that gradient is, to first order,

    g_{l_s}(gamma_s) ~ g_{l_s}(theta_s) + H_s Delta_s,

with g_b(theta_s) stored exactly for every pool batch b and step s, and H_s the Hessian of the reference batch's
loss at theta_s kept as its top-k eigenpairs (one rank-k factor per step, order independent; the curvature of the
batch the order feeds would correct better, but only as exact products, which need the model at every step: its
low-rank factors do worse, benchmarks/results/batch_curvature_ablation.md). Adam then runs as
it is, in full space, with each order's own first and second moments, square roots included: the coordinate-wise
nonlinearity that projected replays cannot apply and that the adjoint tables (``lpl.order.adjoint``) linearise.
Delta_{s+1} = (1 - lr_s wd) Delta_s - lr_s (u_s(l) - u_s(ref)) with u = m_hat / (sqrt(v_hat) + eps).

Losses are read off at the reference weights: the validation loss after step s is L_val(theta_s) + <grad
L_val(theta_s), Delta_s>, plus 1/2 sum_i lambda_i <q_i, Delta_T>^2 on the top validation-curvature directions at
the end; each pool batch's loss after the order is L_b(theta_L) + <g_b(theta_L), Delta_L>. A model with BatchNorm
also carries the order's running statistics (``lpl.order.norm_statistics``): each step averages in the statistics
its batch has at the reference weights, and the losses read off their difference from the reference's through
their gradients (batch losses: for complete orders) and, for the final loss, the top curvature in them.

Cost per order: T x (d-sized Adam step + 2 k d for the curvature), batched over orders, in float32; on CPU a
compiled kernel (``lpl.kernels.cpu.adam_replay_cpu``) makes it one pass over each order's state per step.
Storage: (T + 1) x num_batches x d pool gradients (the bulk), T x k x d Hessian factors, (T + 1) x d validation
gradients (and T x d reference weights for Adam with coupled weight decay); the d-sized rows are bfloat16 on disk,
kept so in memory when the kernel reads them and widened to float32 on load otherwise. Build it with
``lpl.order.record_sensitivities(path, hessian_rank=k)``, which also checks it against retrained orders: the
linearisation holds only while orders stay near the reference trajectory (it does on the digits task at every
learning rate we measured, not on the demo LM or ViT at T = 64).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from lpl.kernels.cpu import adam_replay_available, adam_replay_cpu
from lpl.kernels.cpu.adam_replay import NARROW_INPUTS, reads_in_place
from lpl.utils.errors import LplError

# orders replayed together: [orders, d] state tensors of about this many elements (benchmarks/linearized_replay_speed.py
# at the demo LM's size). Torch path: small enough to stay in cache (2^20-2^22 fastest, 2^24 1.3x slower). Compiled
# kernel: it streams the state once a step whatever its size, and more orders share each load of the Hessian factors
# (2^22 about 1.2x faster than 2^20, no gain beyond). CUDA (torch ops): launch-bound, so the more orders per launch the
# better (H200: 2^20 1.7, 2^22 0.5, 2^24 0.2 ms/order); 2^24 keeps each [orders, d] tensor at 64 MiB of float32.
CHUNK_ELEMENTS = 1 << 20
KERNEL_CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LinearizedRun:
    """Everything the replay needs, independent of the order (T steps, nb pool batches, d parameters)."""

    pool_grads: Tensor  # [T + 1, nb, d] g_b(theta_t), each pool batch's loss gradient at the reference weights
    pool_losses: Tensor  # [T + 1, nb] L_b(theta_t)
    hessian_vectors: Tensor  # [T, k, d] top eigenvectors of the reference batch's Hessian at theta_t
    hessian_values: Tensor  # [T, k]
    reference_updates: Tensor  # [T, d] the reference run's Adam direction m_hat / (sqrt(v_hat) + eps)
    val_losses: Tensor  # [T + 1] L_val(theta_t)
    val_grads: Tensor  # [T + 1, d]
    val_directions: Tensor  # [m, d] top validation-curvature directions at theta_T (orthonormal)
    val_curvature: Tensor  # [m] their Ritz values
    lr: Tensor  # [T]
    betas: tuple[float, float]
    eps: float
    weight_decay: float | Tensor  # one value, or [d] per parameter coordinate (param groups with their own decay)
    decoupled: bool
    coupled_decay: Tensor | None = None  # [T, d] weight_decay * theta_t, what Adam without the W adds to gradients
    # BatchNorm running statistics (lpl.order.norm_statistics; C of them), for models that track them:
    norm_stats: Tensor | None = None  # [T, nb, C] x_t(b) - x_t(ref_t): batch statistics step t would average in
    norm_momenta: Tensor | None = None  # [T, C] the weight step t gives them
    val_norm_grads: Tensor | None = None  # [T + 1, C] gradient of L_val(theta_t) in the running statistics
    pool_norm_grads: Tensor | None = None  # [nb, C] each pool batch's loss gradient in them at theta_T
    norm_directions: Tensor | None = None  # [m, C] top curvature of L_val(theta_T) in them (orthonormal)
    norm_curvature: Tensor | None = None  # [m] its Ritz values

    @property
    def num_steps(self) -> int:
        return int(self.lr.numel())


@dataclass
class LinearizedEstimate:
    """``final_loss`` [N], ``loss_curve`` [N, L + 1] (validation loss before each step and after the last),
    ``batch_losses`` [N, nb] (each pool batch's loss after the order), ``displacement`` [N, d] (Delta_L, when
    asked for), ``linear_loss`` [N] (``final_loss`` without the quadratic terms, when they were added)."""

    final_loss: Tensor
    loss_curve: Tensor
    batch_losses: Tensor
    displacement: Tensor | None = None
    linear_loss: Tensor | None = None


def replay_linearized(run: LinearizedRun, orders: Tensor, quadratic: bool = True,
                      displacement: bool = False) -> LinearizedEstimate:
    """Replay each row of ``orders`` [N, L] (pool batch ids, L <= T) with Adam on linearised gradients.
    ``displacement`` also returns each order's Delta_L ([N, d]: large for many orders of a big model).

    float32 data on CPU (the d-sized rows float32 or bfloat16) run the compiled kernel
    ``lpl.kernels.cpu.adam_replay_cpu`` (same math, one pass over the state per step); other devices and dtypes, or
    ``LPL_CPU_KERNEL=torch``, run Adam steps of torch ops."""
    dtype = run.pool_grads.dtype if run.pool_grads.is_floating_point() else torch.float32
    dtype = torch.promote_types(dtype, torch.float32)
    compiled = _compiled_kernel_applies(run, dtype)
    elements = KERNEL_CHUNK_ELEMENTS if compiled else CUDA_CHUNK_ELEMENTS if orders.is_cuda else CHUNK_ELEMENTS
    chunk = max(1, elements // run.pool_grads.shape[-1])
    if orders.shape[0] == 0:  # no order: empty results of the right shapes (as the other methods give)
        def empty(*shape: int) -> Tensor:
            return run.val_losses.new_empty(0, *shape, dtype=dtype)

        return LinearizedEstimate(final_loss=empty(), loss_curve=empty(orders.shape[1] + 1),
                                  batch_losses=empty(run.pool_grads.shape[1]),
                                  displacement=empty(run.pool_grads.shape[-1]) if displacement else None)
    parts = [_replay_chunk(run, orders[i : i + chunk], quadratic, dtype, compiled)
             for i in range(0, orders.shape[0], chunk)]
    return LinearizedEstimate(
        final_loss=torch.cat([p.final_loss for p in parts]), loss_curve=torch.cat([p.loss_curve for p in parts]),
        batch_losses=torch.cat([p.batch_losses for p in parts]),
        displacement=torch.cat([p.displacement for p in parts]) if displacement else None,
        linear_loss=None if parts[0].linear_loss is None else torch.cat([p.linear_loss for p in parts]),
    )


def _replay_chunk(run: LinearizedRun, orders: Tensor, quadratic: bool, dtype: torch.dtype,
                  compiled: bool) -> LinearizedEstimate:
    n, length = orders.shape
    delta, val_dots = _displacements(run, orders, dtype, compiled)
    curve = run.val_losses[: length + 1].to(dtype) + val_dots.to(dtype)
    norm_shift = None
    if run.norm_stats is not None:  # each order's running statistics minus the reference's, r_s(l) - r_s(ref)
        norm_shift = delta.new_zeros(n, run.norm_stats.shape[-1])
        for s in range(length):
            curve[:, s] += norm_shift @ run.val_norm_grads[s].to(dtype)
            momenta = run.norm_momenta[s].to(dtype)
            norm_shift.mul_(1.0 - momenta).addcmul_(run.norm_stats[s].index_select(0, orders[:, s]).to(dtype), momenta)
        curve[:, length] += norm_shift @ run.val_norm_grads[length].to(dtype)
    final = linear_loss = curve[:, length].clone()
    if quadratic and length == run.num_steps:  # the curvatures were measured at theta_T
        final = final + _quadratic(delta, run.val_directions, run.val_curvature)
        if norm_shift is not None and run.norm_curvature is not None:
            final = final + _quadratic(norm_shift, run.norm_directions, run.norm_curvature)
    curve[:, length] = final
    batch_losses = run.pool_losses[length].to(dtype) + delta @ run.pool_grads[length].to(dtype).T
    if norm_shift is not None and length == run.num_steps:  # their sensitivity to the statistics: at theta_T only
        batch_losses += norm_shift @ run.pool_norm_grads.to(dtype).T
    return LinearizedEstimate(final_loss=final, loss_curve=curve, batch_losses=batch_losses, displacement=delta,
                              linear_loss=linear_loss if final is not linear_loss else None)


def _displacements(run: LinearizedRun, orders: Tensor, dtype: torch.dtype,
                   compiled: bool) -> tuple[Tensor, Tensor]:
    """Each order's Delta_L [N, d] and <Delta_s, val_grads[s]> [N, L + 1] for s = 0..L, by the compiled CPU kernel
    or by Adam steps of torch ops."""
    if compiled:
        decay = run.weight_decay
        return adam_replay_cpu(
            run.pool_grads, run.hessian_vectors, run.hessian_values.float().contiguous(), run.reference_updates,
            run.val_grads, run.lr.float().contiguous(), orders.cpu(), betas=run.betas, eps=run.eps,
            weight_decay=decay.float().contiguous() if isinstance(decay, Tensor) else float(decay),
            decoupled=run.decoupled, coupled_decay=run.coupled_decay)
    n, length = orders.shape
    delta = run.pool_grads.new_zeros(n, run.pool_grads.shape[-1], dtype=dtype)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    val_dots = delta.new_empty(n, length + 1)
    for s in range(length):
        val_dots[:, s] = delta @ run.val_grads[s].to(dtype)
        grads = run.pool_grads[s].index_select(0, orders[:, s]).to(dtype)
        vectors = run.hessian_vectors[s].to(dtype)
        grads.addmm_((delta @ vectors.T).mul_(run.hessian_values[s].to(dtype)), vectors)
        if run.coupled_decay is not None:  # Adam adds weight_decay * (theta_s + Delta_s): the step adds the second
            grads.add_(run.coupled_decay[s].to(dtype))
        lr = float(run.lr[s])
        _adam_step(delta, grads, exp_avg, exp_avg_sq, s, lr, run)
        delta.add_(run.reference_updates[s].to(dtype), alpha=lr)
    val_dots[:, length] = delta @ run.val_grads[length].to(dtype)
    return delta, val_dots


def _compiled_kernel_applies(run: LinearizedRun, dtype: torch.dtype) -> bool:
    """CPU data laid out as the kernel reads them (float32, the d-sized rows float32 or bfloat16; no copies of the
    large tensors), and the kernel built."""
    large = {name: getattr(run, name) for name in NARROW_INPUTS if getattr(run, name) is not None}
    if dtype != torch.float32 or not all(reads_in_place(name, tensor) for name, tensor in large.items()):
        return False
    return adam_replay_available()


def _quadratic(shift: Tensor, directions: Tensor, curvature: Tensor) -> Tensor:
    """1/2 sum_i lambda_i <q_i, shift>^2 per row of ``shift``, from orthonormal ``directions`` q and their Ritz
    values."""
    coords = shift @ directions.to(shift.dtype).T
    return 0.5 * (coords * coords * curvature.to(shift.dtype)).sum(-1)


def has_weight_decay(weight_decay: float | Tensor) -> bool:
    """Whether any parameter decays (``weight_decay`` one value, or one per coordinate)."""
    return bool(torch.as_tensor(weight_decay).ne(0).any())


# torch's fused Adam kernels (one pass over the state per step; what torch.optim.Adam(fused=True) calls), when present
_FUSED_ADAM = {True: getattr(torch, "_fused_adamw_", None), False: getattr(torch, "_fused_adam_", None)}


def _adam_step(delta: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: int, lr: float,
               run: LinearizedRun) -> None:
    """Adam's step s (0-based) on ``delta`` as the parameter, in place: moments from ``grads`` (overwritten), weight
    decay on ``delta`` (decoupled: shrink it; coupled: add weight_decay * delta to the gradient)."""
    beta1, beta2 = run.betas
    fused = _FUSED_ADAM[run.decoupled] if delta.device.type in ("cpu", "cuda") else None
    # the fused kernels apply one weight decay value themselves; anything else is decayed here, before the step
    # (AdamW shrinks the parameter before its update, Adam adds the decay to the gradient)
    per_coordinate = isinstance(run.weight_decay, Tensor)  # recorded only when some param groups decay
    in_kernel = fused is not None and not per_coordinate
    if not in_kernel and (per_coordinate or run.weight_decay):
        decay = torch.as_tensor(run.weight_decay, dtype=delta.dtype, device=delta.device)
        delta.mul_(1.0 - lr * decay) if run.decoupled else grads.addcmul_(delta, decay)
    if fused is not None:
        step = torch.tensor(float(s + 1), device=delta.device)
        fused([delta], [grads], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1, beta2=beta2,
              weight_decay=run.weight_decay if in_kernel else 0.0, eps=run.eps, amsgrad=False, maximize=False)
        return
    exp_avg.lerp_(grads, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1.0 - beta2)
    bc1, bc2 = 1.0 - beta1 ** (s + 1), 1.0 - beta2 ** (s + 1)
    denominator = torch.sqrt(exp_avg_sq, out=grads).div_(math.sqrt(bc2)).add_(run.eps)
    delta.addcdiv_(exp_avg, denominator, value=-lr / bc1)


# ---------------------------------------------------------------- storage (inside the recording's sensitivity file)
_PREFIX = "linearized/"


def linearized_tensors(run: LinearizedRun) -> dict[str, Tensor]:
    """The run's tensors under ``linearized/`` keys, for the sensitivity file."""
    return {_PREFIX + name: value for name, value in vars(run).items() if isinstance(value, Tensor)}


def linearized_scalars(run: LinearizedRun) -> dict[str, Any]:
    """The run's Adam hyperparameters, for the sensitivity file's manifest entry (a per-coordinate weight decay is
    one of ``linearized_tensors``)."""
    decay = None if isinstance(run.weight_decay, Tensor) else run.weight_decay
    return {"betas": list(run.betas), "eps": run.eps, "weight_decay": decay, "decoupled": run.decoupled}


def linearized_from_tensors(tensors: Mapping[str, Tensor], scalars: Mapping[str, Any]) -> LinearizedRun | None:
    """Rebuild a ``LinearizedRun`` from ``linearized_tensors`` and ``linearized_scalars``; None when absent."""
    fields = {key[len(_PREFIX):]: value for key, value in tensors.items() if key.startswith(_PREFIX)}
    if not fields:
        return None
    required = [f.name for f in dataclasses.fields(LinearizedRun) if f.type == "Tensor"]
    missing = [name for name in required if name not in fields]
    if missing or not scalars:
        raise LplError(f"the linearised replay data lack {', '.join(missing) or 'their Adam hyperparameters'}; "
                       "build them again with record_sensitivities.")
    # rows stored in a narrow dtype are widened once here, except the d-sized rows the compiled CPU kernel reads
    # narrow as they are (half the memory). Torch ops converting them at every replay step instead made one order at
    # the demo LM's size about 2x slower on CPU (a scratch check, not a repo benchmark).
    keep_narrow = NARROW_INPUTS if adam_replay_available() else ()
    fields = {name: value.float() if value.is_floating_point() and value.itemsize < 4
              and not (name in keep_narrow and value.dtype == torch.bfloat16) else value
              for name, value in fields.items()}
    decay = fields.pop("weight_decay", None)
    return LinearizedRun(**fields, betas=tuple(scalars["betas"]), eps=float(scalars["eps"]),
                         weight_decay=decay if decay is not None else float(scalars["weight_decay"]),
                         decoupled=bool(scalars["decoupled"]))
