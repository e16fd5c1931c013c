"""Block-sparse linear on CPU: forward y = x W^T + b and the two backward pieces.

W [out_features, in_features] is block-CSR over block rows (see docs/architecture.md, "Block-sparse weights"):
``values`` [nnz, br, bc], ``row_ptr`` int64 [R + 1], ``col_idx`` int64 [nnz]. fp32 runs the compiled kernel
(kernels/cpu/csrc/block_sparse.c); fp16/bf16 are computed in fp32 and cast back; fp64 and machines without a
C compiler use the pure-torch path, which builds the dense weight and calls BLAS.

``backend`` picks the path: "auto" (compiled when available), "compiled" (error when unavailable) or "torch".
The environment variable ``LPL_CPU_KERNEL=torch`` forces the torch path for "auto".
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lpl.utils.errors import LplError

from ..format import check_csr
from ._build import load_error, load_library, torch_path_forced

Backend = Literal["auto", "compiled", "torch"]

# Retained input width per pass over a token tile: 256 k-steps x 16 floats = 16 KiB of B stay in L1 meanwhile.
_L1_K_CHUNK = 256


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_block_size(block_size: tuple[int, int]) -> tuple[int, int]:
    try:
        br, bc = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise LplError(f"block_size must be a pair of positive ints (rows, cols), got {block_size!r}.") from None
    if br <= 0 or bc <= 0:
        raise LplError(f"block_size must be a pair of positive ints (rows, cols), got {block_size!r}.")
    return br, bc


def _check_dense(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise LplError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.device.type != "cpu":
        raise LplError(f"{name} is on {t.device}; the CPU block-sparse path needs CPU tensors (move it with .cpu()).")
    if t.layout != torch.strided:
        raise LplError(f"{name} must be a dense (strided) tensor, got layout {t.layout}.")
    if t.dim() != ndim:
        raise LplError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise LplError(f"{name} must be a floating-point tensor, got {t.dtype}.")


def _check_structure(
    values: torch.Tensor | None,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    n_block_rows: int,
    n_block_cols: int,
    block_size: tuple[int, int],
) -> int:
    """Check the block-CSR index tensors (and values when given); return nnz."""
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise LplError(f"{name} is on {t.device}; the CPU block-sparse path needs CPU tensors (move it with "
                           ".cpu()).")
    check_csr(row_ptr, col_idx, (n_block_rows, n_block_cols))
    nnz = col_idx.numel()
    if values is not None:
        _check_dense("values", values, 3)
        if tuple(values.shape) != (nnz, *block_size):
            raise LplError(
                f"values must have shape (nnz, br, bc) = {(nnz, *block_size)}, got {tuple(values.shape)}."
            )
    return nnz


def _check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None:
        _check_dense("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise LplError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}.")


def _check_same_dtype(**tensors: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The one dtype of the given tensors (or dtypes), else an LplError listing them."""
    dtypes = {name: t if isinstance(t, torch.dtype) else t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise LplError(f"dtypes differ ({listing}); cast them to one floating-point dtype.")
    return next(iter(dtypes.values()))


def _resolve_backend(backend: Backend, dtype: torch.dtype) -> bool:
    """True when the compiled kernel runs this call."""
    if backend not in ("auto", "compiled", "torch"):
        raise LplError(f"backend must be 'auto', 'compiled' or 'torch', got {backend!r}.")
    if backend == "torch" or dtype == torch.float64:
        return False
    if backend == "auto" and torch_path_forced():
        return False
    available = load_library() is not None
    if backend == "compiled" and not available:
        raise LplError(f"the compiled CPU kernel is unavailable ({load_error()}); use backend='auto' or 'torch'.")
    return available


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch path (reference-grade, dense BLAS speed)


def _block_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """Block-row index of every retained block."""
    counts = row_ptr[1:] - row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int64), counts)


def _dense_weight(
    values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    out_features, in_features = shape
    nnz, br, bc = values.shape
    n_rows, n_cols = row_ptr.numel() - 1, _ceil_div(in_features, bc)
    grid = values.new_zeros(n_rows, n_cols, br, bc)
    grid[_block_rows(row_ptr), col_idx] = values
    return grid.permute(0, 2, 1, 3).reshape(n_rows * br, n_cols * bc)[:out_features, :in_features]


def _gather_blocks(dense: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    n_rows, n_cols = row_ptr.numel() - 1, _ceil_div(dense.shape[1], bc)
    padded = F.pad(dense, (0, n_cols * bc - dense.shape[1], 0, n_rows * br - dense.shape[0]))
    grid = padded.reshape(n_rows, br, n_cols, bc).permute(0, 2, 1, 3)
    return grid[_block_rows(row_ptr), col_idx].contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Compiled path helpers


def _pack_strips(values: torch.Tensor, transpose: bool, order: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks as the microkernel's B operand: [nnz, S, kb, 16] fp32, output width nb zero-padded to S*16.

    ``transpose=True`` (forward): kb = bc, nb = br, B[e][k][n] = values[e][n][k].
    ``transpose=False`` (dX = dY W): kb = br, nb = bc, B[e][k][n] = values[order[e]][k][n].
    """
    values = values.float().contiguous()
    nnz, br, bc = values.shape
    kb, nb, sk, sn = (bc, br, 1, bc) if transpose else (br, bc, bc, 1)
    packed = torch.empty(nnz, _ceil_div(nb, 16), kb, 16, dtype=torch.float32)
    order = None if order is None else order.contiguous()
    load_library().lpl_pack_b(
        values.data_ptr(), _addr(order), nnz, br * bc, kb, nb, sk, sn, packed.data_ptr(),
        ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    return packed


def _run_matmul(
    a: torch.Tensor,
    bpack: torch.Tensor,
    ptr: torch.Tensor,
    in_blk: torch.Tensor,
    kb: int,
    nb: int,
    out_features: int,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, out_features] = a @ B^T (+ bias) with B given as packed 16-wide strips over output block rows."""
    lib = load_library()
    m, k = a.shape
    if out is None:
        out = torch.empty(m, out_features, dtype=torch.float32)
    # contiguous copies bound to names: a temporary's memory would be freed before the C call reads it
    ptr, in_blk = ptr.contiguous(), in_blk.contiguous()
    status = lib.lpl_bs_matmul(
        a.data_ptr(), m, k, a.stride(0), a.stride(1),
        bpack.data_ptr(), ptr.data_ptr(), in_blk.data_ptr(), ptr.numel() - 1,
        kb, nb,
        out.data_ptr(), out_features, out.stride(0), _addr(bias),
        _L1_K_CHUNK, 0, ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("lpl.kernels.cpu: the block-sparse kernel could not allocate its packing buffers.")
    return out


def _as_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _transposed_structure(
    row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR over block columns: (col_ptr [C + 1], block row of each entry, entry order into values)."""
    block_rows = _block_rows(row_ptr)
    order = torch.argsort(col_idx * max(row_ptr.numel() - 1, 1) + block_rows)
    col_ptr = torch.zeros(n_cols + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(torch.bincount(col_idx, minlength=n_cols), 0)
    return col_ptr, block_rows[order].contiguous(), order


@dataclass(frozen=True)
class PackedWeightCPU:
    """A block-sparse weight laid out once for the compiled kernel, so repeated calls skip the per-call packing.

    Build with ``pack_weight_cpu`` and pass as ``packed=``; it is a copy: pack again after the values change.
    """

    out_features: int
    in_features: int
    block_size: tuple[int, int]
    nnz: int
    forward_b: torch.Tensor  # [nnz, ceil(br/16), bc, 16]
    col_ptr: torch.Tensor | None = None  # the rest serves grad_input_cpu (built with backward=True)
    col_rows: torch.Tensor | None = None
    backward_b: torch.Tensor | None = None  # [nnz, ceil(bc/16), br, 16] in block-column order
    row_ptr: torch.Tensor | None = None  # the structure it was packed for (checked then): packed_linear_cpu reads it
    col_idx: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # of the values it was packed from: what packed_linear_cpu takes
    # set by pack_weight_cpu only (not by a constructor call or dataclasses.replace): the tensors' version counters
    # when packed, so a pack built or edited by hand is refused before the C kernel reads it
    _stamp: tuple | None = field(default=None, init=False, repr=False, compare=False)


def pack_weight_cpu(
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: tuple[int, int],
    backward: bool = False,
) -> PackedWeightCPU:
    """Pack a block-CSR weight for ``block_sparse_linear_cpu`` (and ``grad_input_cpu`` when ``backward``).

    Needs the compiled kernel (``compiled_kernel_available()``); the packed copy is fp32 whatever values' dtype.
    """
    br, bc = _check_block_size(block_size)
    out_features, in_features = int(out_features), int(in_features)
    n_rows, n_cols = _ceil_div(out_features, br), _ceil_div(in_features, bc)
    nnz = _check_structure(values, row_ptr, col_idx, n_rows, n_cols, (br, bc))
    if load_library() is None:
        raise LplError(f"the compiled CPU kernel is unavailable ({load_error()}); call the functions without packed=.")
    # the pack's tensors are made as normal tensors even under inference_mode: the stamp needs their version
    # counters (inference tensors keep none), so an edit made later is still seen
    with torch.inference_mode(False):
        extra = {}
        if backward:
            col_ptr, col_rows, order = _transposed_structure(row_ptr, col_idx, n_cols)
            extra = dict(col_ptr=col_ptr, col_rows=col_rows, backward_b=_pack_strips(values, False, order))
        packed = PackedWeightCPU(
            out_features, in_features, (br, bc), nnz, _pack_strips(values, transpose=True), **extra,
            row_ptr=row_ptr.contiguous().clone(), col_idx=col_idx.contiguous().clone(), dtype=values.dtype,
        )
    object.__setattr__(packed, "_stamp", _stamp_of(packed))
    return packed


def _check_stamp(packed: Any) -> None:
    """Refuse what ``pack_weight_cpu`` did not make, or a pack changed since: the kernel reads it unchecked."""
    if not isinstance(packed, PackedWeightCPU):
        raise LplError(f"packed must come from pack_weight_cpu, got {type(packed).__name__}.")
    if packed._stamp is None or packed._stamp != _stamp_of(packed):
        raise LplError("packed must come from pack_weight_cpu, unchanged since (the kernel reads its structure "
                       "unchecked): pack the weight again.")


def _stamp_of(packed: PackedWeightCPU) -> tuple:
    tensors = (packed.forward_b, packed.backward_b, packed.col_ptr, packed.col_rows, packed.row_ptr, packed.col_idx)
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


def packed_linear_cpu(x2d: torch.Tensor, packed: PackedWeightCPU, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a weight ``pack_weight_cpu`` laid out (and checked) once: the lean call for repeated
    inference on an unchanged weight (only ``x2d`` and ``bias`` are checked here). [M, in] -> [M, out] in x2d's
    dtype (computed in float32)."""
    _check_stamp(packed)
    _check_dense("x2d", x2d, 2)
    if x2d.shape[1] != packed.in_features:
        raise LplError(f"x2d has {x2d.shape[1]} features, the packed weight takes {packed.in_features}.")
    _check_bias(bias, packed.out_features)
    dtype = _check_same_dtype(x2d=x2d, packed_weight=packed.dtype, bias=bias)
    br, bc = packed.block_size
    bias32 = None if bias is None else bias.float().contiguous()
    out = _run_matmul(x2d.float(), packed.forward_b, packed.row_ptr, packed.col_idx, bc, br, packed.out_features,
                      bias32)  # .float() of a float32 tensor is the tensor itself
    return out if dtype == torch.float32 else out.to(dtype)


def _check_packed(packed: PackedWeightCPU, out_features: int, in_features: int, block_size, nnz: int) -> None:
    _check_stamp(packed)
    expected = (out_features, in_features, tuple(block_size), nnz)
    found = (packed.out_features, packed.in_features, packed.block_size, packed.nnz)
    if found != expected:
        raise LplError(
            f"packed weight (out, in, block, nnz) = {found} does not match this call's {expected}; pack this weight."
        )


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def block_sparse_linear_cpu(
    x2d: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    out_features: int,
    block_size: tuple[int, int],
    bias: torch.Tensor | None = None,
    backend: Backend = "auto",
    packed: PackedWeightCPU | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + b for a block-CSR weight W [out_features, x2d.shape[1]].

    Args:
        x2d: [M, K] input (any strides).
        values: [nnz, br, bc] retained blocks (ragged edge blocks zero-padded to full size).
        row_ptr: int64 [R + 1] with R = ceil(out_features / br).
        col_idx: int64 [nnz] block columns, each in [0, ceil(K / bc)).
        out_features: N, the weight's true number of rows.
        block_size: (br, bc).
        bias: optional [N].
        backend: "auto", "compiled" or "torch" (see the module docstring).
        packed: optional ``pack_weight_cpu`` result for these values (skips packing; ignored by the torch path).
        out: optional result buffer [M, N] with x2d's dtype, unit stride along N and rows that do not overlap
            (not an expanded tensor), written and returned (reusing a buffer skips the page faults of a fresh
            allocation, which cost a lot on some VMs).

    Returns:
        [M, N] in x2d's dtype (``out`` when given).
    """
    br, bc = _check_block_size(block_size)
    _check_dense("x2d", x2d, 2)
    out_features = int(out_features)
    if out_features < 0:
        raise LplError(f"out_features must be >= 0, got {out_features}.")
    in_features = x2d.shape[1]
    n_rows, n_cols = _ceil_div(out_features, br), _ceil_div(in_features, bc)
    nnz = _check_structure(values, row_ptr, col_idx, n_rows, n_cols, (br, bc))
    if packed is not None:
        _check_packed(packed, out_features, in_features, (br, bc), nnz)
    _check_bias(bias, out_features)
    dtype = _check_same_dtype(x2d=x2d, values=values, bias=bias)
    if out is not None:
        _check_dense("out", out, 2)
        if tuple(out.shape) != (x2d.shape[0], out_features) or out.dtype != dtype or out.stride(1) != 1:
            raise LplError(
                f"out must be a [{x2d.shape[0]}, {out_features}] {dtype} tensor with unit stride along dim 1, "
                f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}."
            )
        # rows closer than a row's width share elements: the row written last would be returned for all of them
        if out.shape[0] > 1 and out.shape[1] > 0 and out.stride(0) < out.shape[1]:
            raise LplError(
                f"out has rows that overlap in memory (strides {out.stride()} for shape {tuple(out.shape)}, e.g. an "
                f"expanded tensor); pass a buffer with distinct elements, such as torch.empty{tuple(out.shape)}."
            )

    if not _resolve_backend(backend, dtype):
        weight = _dense_weight(values, row_ptr, col_idx, (out_features, in_features))
        result = F.linear(x2d, weight, bias)
        return result if out is None else out.copy_(result)

    bpack = packed.forward_b if packed is not None else _pack_strips(values, transpose=True)
    bias32 = _as_fp32(bias)
    bias32 = None if bias32 is None else bias32.contiguous()
    if dtype == torch.float32:
        return _run_matmul(x2d, bpack, row_ptr, col_idx, bc, br, out_features, bias32, out)
    result = _run_matmul(x2d.float(), bpack, row_ptr, col_idx, bc, br, out_features, bias32).to(dtype)
    return result if out is None else out.copy_(result)


def grad_input_cpu(
    dy2d: torch.Tensor,
    values: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    in_features: int,
    block_size: tuple[int, int],
    backend: Backend = "auto",
    packed: PackedWeightCPU | None = None,
) -> torch.Tensor:
    """dX = dY W for a block-CSR weight W [dy2d.shape[1], in_features]; returns [M, in_features] in dy2d's dtype.

    ``packed`` (from ``pack_weight_cpu(..., backward=True)``) skips the per-call transposition and packing.
    """
    br, bc = _check_block_size(block_size)
    _check_dense("dy2d", dy2d, 2)
    in_features = int(in_features)
    if in_features < 0:
        raise LplError(f"in_features must be >= 0, got {in_features}.")
    out_features = dy2d.shape[1]
    n_rows, n_cols = _ceil_div(out_features, br), _ceil_div(in_features, bc)
    nnz = _check_structure(values, row_ptr, col_idx, n_rows, n_cols, (br, bc))
    if packed is not None:
        _check_packed(packed, out_features, in_features, (br, bc), nnz)
        if packed.backward_b is None:
            raise LplError("packed was built without backward=True; pack_weight_cpu(..., backward=True) serves dX.")
    dtype = _check_same_dtype(dy2d=dy2d, values=values)

    if not _resolve_backend(backend, dtype):
        weight = _dense_weight(values, row_ptr, col_idx, (out_features, in_features))
        return dy2d @ weight

    # dX's output block columns own their blocks: run the same kernel over the transposed block structure.
    if packed is not None:
        col_ptr, col_rows, bpack = packed.col_ptr, packed.col_rows, packed.backward_b
    else:
        col_ptr, col_rows, order = _transposed_structure(row_ptr, col_idx, n_cols)
        bpack = _pack_strips(values, transpose=False, order=order)
    out = _run_matmul(_as_fp32(dy2d), bpack, col_ptr, col_rows, br, bc, in_features, None)
    return out if dtype == torch.float32 else out.to(dtype)


def grad_values_cpu(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    block_size: tuple[int, int],
    backend: Backend = "auto",
) -> torch.Tensor:
    """dW at the retained blocks: [nnz, br, bc] with dW[j] = dY[:, block row]^T X[:, block col]; padding is zero."""
    br, bc = _check_block_size(block_size)
    _check_dense("dy2d", dy2d, 2)
    _check_dense("x2d", x2d, 2)
    if dy2d.shape[0] != x2d.shape[0]:
        raise LplError(f"dy2d and x2d must have the same number of rows, got {dy2d.shape[0]} and {x2d.shape[0]}.")
    out_features, in_features = dy2d.shape[1], x2d.shape[1]
    n_rows, n_cols = _ceil_div(out_features, br), _ceil_div(in_features, bc)
    nnz = _check_structure(None, row_ptr, col_idx, n_rows, n_cols, (br, bc))
    dtype = _check_same_dtype(dy2d=dy2d, x2d=x2d)

    if not _resolve_backend(backend, dtype):
        return _gather_blocks(dy2d.transpose(0, 1) @ x2d, row_ptr, col_idx, br, bc)

    dy32, x32 = _as_fp32(dy2d), _as_fp32(x2d)
    out = torch.zeros(nnz, br, bc, dtype=torch.float32)
    row_ptr, col_idx = row_ptr.contiguous(), col_idx.contiguous()  # bound: see _run_matmul
    status = load_library().lpl_bs_grad_values(
        dy32.data_ptr(), dy32.shape[0], out_features, dy32.stride(0), dy32.stride(1),
        x32.data_ptr(), in_features, x32.stride(0), x32.stride(1),
        row_ptr.data_ptr(), col_idx.data_ptr(), n_rows, nnz,
        br, bc, out.data_ptr(), 0, ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("lpl.kernels.cpu: the block-sparse kernel could not allocate its packing buffers.")
    return out if dtype == torch.float32 else out.to(dtype)


def compiled_kernel_available() -> bool:
    """Whether the compiled kernel loads on this machine (builds it on first call)."""
    return load_library() is not None
