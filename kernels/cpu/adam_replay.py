"""Linearised Adam replay on CPU: many orders at once, one pass over their state per step (compiled C kernel).

The math and the pure-torch path live in ``lpl.order.linearized``; this is its fast CPU path
(kernels/cpu/csrc/adam_replay.c), used there for CPU data (float32, the d-sized rows float32 or bfloat16) when a C
compiler is available.
``LPL_CPU_KERNEL=torch`` forces the torch path.

Example::

    >>> delta, val_dots = adam_replay_cpu(pool_grads, vectors, values, updates, val_grads, lr, orders,
    ...                                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decoupled=True)
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lpl.utils.errors import LplError

from ._build import ADAM_REPLAY, torch_path_forced


def adam_replay_available() -> bool:
    """Whether ``adam_replay_cpu`` can run: the kernel compiled and ``LPL_CPU_KERNEL`` does not ask for torch."""
    if torch_path_forced():
        return False
    return ADAM_REPLAY.load() is not None


# the d-sized rows may be bfloat16 (as the sensitivity file stores them: half the memory and the memory traffic);
# bit i of the kernel's bf16_mask flags the i-th of them
NARROW_INPUTS = ("pool_grads", "hessian_vectors", "reference_updates", "val_grads", "coupled_decay")


def _dtypes(name: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if name in NARROW_INPUTS else (torch.float32,)


def reads_in_place(name: str, tensor: Tensor) -> bool:
    """Whether the kernel takes ``tensor`` as its input ``name`` as it is: on the CPU, contiguous, a dtype it reads."""
    return tensor.device.type == "cpu" and tensor.dtype in _dtypes(name) and tensor.is_contiguous()


def _check(name: str, tensor: Tensor, shape: tuple[int | None, ...]) -> None:
    if not reads_in_place(name, tensor):
        kinds = " or ".join(str(d).removeprefix("torch.") for d in _dtypes(name))
        raise LplError(f"adam_replay_cpu: {name} must be a contiguous {kinds} CPU tensor, got {tensor.dtype} on "
                       f"{tensor.device}{'' if tensor.is_contiguous() else ' (not contiguous)'}.")
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        expected = ", ".join("*" if want is None else str(want) for want in shape)
        raise LplError(f"adam_replay_cpu: {name} must have shape [{expected}], got {list(tensor.shape)}.")


def adam_replay_cpu(pool_grads: Tensor, hessian_vectors: Tensor, hessian_values: Tensor, reference_updates: Tensor,
                    val_grads: Tensor, lr: Tensor, orders: Tensor, *, betas: tuple[float, float], eps: float,
                    weight_decay: float | Tensor, decoupled: bool,
                    coupled_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Replay each row of ``orders`` [n, L] (pool batch ids) with Adam on linearised gradients.

    Shapes (T steps, nb pool batches, d parameters, rank k): ``pool_grads`` [>= L, nb, d], ``hessian_vectors``
    [T, k, d], ``hessian_values`` [T, k], ``reference_updates`` [T, d], ``val_grads`` [>= L + 1, d], ``lr`` [T],
    ``weight_decay`` a number or [d], ``coupled_decay`` [T, d] (Adam's weight_decay * theta_s) or None. All
    float32; the d-sized rows (``NARROW_INPUTS``) may be bfloat16 instead, widened exactly as the kernel reads them.
    Returns (Delta_L [n, d], <Delta_s, val_grads[s]> for s = 0..L as float64 [n, L + 1]).
    """
    if ADAM_REPLAY.load() is None:
        raise LplError(f"the compiled Adam replay kernel is unavailable ({ADAM_REPLAY.load_error}); "
                       "use lpl.order.linearized's torch path.")
    steps, rank, dim = hessian_vectors.shape if hessian_vectors.dim() == 3 else (None, None, None)
    _check("hessian_vectors", hessian_vectors, (None, None, None))
    _check("pool_grads", pool_grads, (None, None, dim))
    _check("hessian_values", hessian_values, (steps, rank))
    _check("reference_updates", reference_updates, (steps, dim))
    _check("val_grads", val_grads, (None, dim))
    _check("lr", lr, (steps,))
    if coupled_decay is not None:
        _check("coupled_decay", coupled_decay, (steps, dim))
    per_coordinate = isinstance(weight_decay, Tensor)
    if per_coordinate:
        _check("weight_decay", weight_decay, (dim,))
    if orders.dtype != torch.int64 or orders.dim() != 2 or orders.device.type != "cpu":
        raise LplError(f"adam_replay_cpu: orders must be an int64 CPU tensor [n, L], got {orders.dtype} "
                       f"{list(orders.shape)} on {orders.device}.")
    orders = orders.contiguous()
    n, length = orders.shape
    batches = pool_grads.shape[1]
    if length > steps or pool_grads.shape[0] < length or val_grads.shape[0] < length + 1:
        raise LplError(f"adam_replay_cpu: orders of {length} steps need {length} pool-gradient rows and "
                       f"{length + 1} validation gradients of a run of at least {length} steps; got "
                       f"{pool_grads.shape[0]}, {val_grads.shape[0]} and {steps} steps.")
    if orders.numel() and (int(orders.min()) < 0 or int(orders.max()) >= batches):
        raise LplError(f"adam_replay_cpu: orders name batch ids outside 0..{batches - 1}.")
    delta = torch.zeros(n, dim, dtype=torch.float32)  # the C kernel writes float32, whatever the default dtype
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    val_dots = torch.zeros(n, length + 1, dtype=torch.float64)
    if n == 0:
        return delta, val_dots
    rows = dict(pool_grads=pool_grads, hessian_vectors=hessian_vectors, reference_updates=reference_updates,
                val_grads=val_grads, coupled_decay=coupled_decay)
    bf16_mask = sum(1 << bit for bit, name in enumerate(NARROW_INPUTS)
                    if rows[name] is not None and rows[name].dtype == torch.bfloat16)
    status = ADAM_REPLAY.library.lpl_adam_replay(
        pool_grads.data_ptr(), batches, dim, hessian_vectors.data_ptr(), hessian_values.data_ptr(), rank,
        reference_updates.data_ptr(), val_grads.data_ptr(),
        None if coupled_decay is None else coupled_decay.data_ptr(), bf16_mask,
        weight_decay.data_ptr() if per_coordinate else None, ctypes.c_float(0.0 if per_coordinate else weight_decay),
        int(decoupled), lr.data_ptr(), float(betas[0]), float(betas[1]), float(eps), orders.data_ptr(), n, length,
        delta.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), val_dots.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise LplError(f"the compiled Adam replay kernel failed (status {status}: out of memory or no threads).")
    return delta, val_dots
