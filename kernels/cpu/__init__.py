"""CPU block-sparse linear for lpl.kernels: a compiled AVX2/FMA kernel built at first use, with a torch fallback.

Public functions (contract in docs/architecture.md, "Block-sparse weights"):
``block_sparse_linear_cpu`` (y = x W^T + b), ``grad_input_cpu`` (dX = dY W), ``grad_values_cpu`` (dW at the
retained blocks), ``compiled_kernel_available``, and ``pack_weight_cpu`` -> ``PackedWeightCPU`` (lay a weight out
once; pass it as ``packed=`` to skip the per-call packing, or call ``packed_linear_cpu`` with it, e.g. in inference).

Also ``adam_replay_cpu`` / ``adam_replay_available``: the fast CPU path of ``lpl.order.linearized`` (a compiled
kernel that replays many training orders with Adam at once).
"""

from .adam_replay import adam_replay_available, adam_replay_cpu
from .ops import (
    PackedWeightCPU,
    block_sparse_linear_cpu,
    compiled_kernel_available,
    grad_input_cpu,
    grad_values_cpu,
    pack_weight_cpu,
    packed_linear_cpu,
)

__all__ = [
    "PackedWeightCPU",
    "adam_replay_available",
    "adam_replay_cpu",
    "block_sparse_linear_cpu",
    "compiled_kernel_available",
    "grad_input_cpu",
    "grad_values_cpu",
    "pack_weight_cpu",
    "packed_linear_cpu",
]
