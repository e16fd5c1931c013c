"""Device dispatch, autograd and torch.compile support for ``block_sparse_linear``.

Eager calls go through a plain ``torch.autograd.Function`` (under ``torch.func`` transforms and forward-mode AD, a
subclass with vmap and jvp rules); under ``torch.compile``/``torch.export`` the same computation is reached through
torch.library custom ops (``lpl::block_sparse_linear`` and its two backward pieces) with fake implementations and
``register_autograd``, so the graph holds one opaque node. Either way fine-tuning runs
on the sparse model: dX through the sparse weight, dW only at the retained blocks.
CUDA tensors run the Triton kernels of :mod:`lpl.kernels.triton_ops` (imported on first CUDA call, so CPU-only use
never imports Triton); CPU tensors run :mod:`lpl.kernels.cpu`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Optional

import torch
from torch.autograd import forward_ad

from lpl.utils.errors import LplError

from .format import FLOAT_DTYPES, BlockSparseWeight, block_grid, check_float_dtype

_triton_on_cpu = False


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Run CPU tensors through the Triton kernels too (only meaningful with ``TRITON_INTERPRET=1``; used by tests)."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


# The Triton kernels tile a block with tl.arange (power-of-two lengths) and feed it to tl.dot (16 or more per side).
TRITON_MIN_BLOCK = 16


def triton_supports(block_size: tuple[int, int]) -> bool:
    """Whether the Triton kernels take blocks of this size: both sides powers of two, at least ``TRITON_MIN_BLOCK``."""
    return all(side >= TRITON_MIN_BLOCK and side & (side - 1) == 0 for side in block_size)


def _use_triton(device: torch.device, block_size: tuple[int, int], dtype: torch.dtype) -> bool:
    if not (device.type == "cuda" or (device.type == "cpu" and _triton_on_cpu)) or dtype == torch.float64:
        return False
    if triton_supports(block_size):
        return True
    warnings.warn(f"block-sparse layers with {block_size[0]}x{block_size[1]} blocks run as dense matmuls on "
                  f"{device.type} (no speedup): the Triton kernels take power-of-two block sides of at least "
                  f"{TRITON_MIN_BLOCK}, e.g. 16x16, 32x32 or 64x64; prune with such a block_size.", stacklevel=2)
    return False


def _cpu_module():
    """The CPU fast path (kernels/cpu), or None when it is not available."""
    try:
        from . import cpu
    except ImportError:
        return None
    return cpu if hasattr(cpu, "block_sparse_linear_cpu") else None


# ---------------------------------------------------------------------------------------------------------------
# Plain torch reference, used only when the CPU path cannot be imported (and for devices other than CPU/CUDA).
def _reference_dense(values: torch.Tensor, block_row: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int]):
    _, br, bc = values.shape
    nr, nc = block_grid(shape, (br, bc))
    blocks = values.new_zeros(nr, nc, br, bc)
    blocks[block_row, col_idx] = values
    return blocks.permute(0, 2, 1, 3).reshape(nr * br, nc * bc)[: shape[0], : shape[1]]


def _reference_grad_values(dy2d, x2d, block_row, col_idx, block_size):
    (br, bc), m = block_size, dy2d.shape[0]
    nr, nc = block_grid((dy2d.shape[1], x2d.shape[1]), block_size)
    dy_blocks = torch.nn.functional.pad(dy2d, (0, nr * br - dy2d.shape[1])).view(m, nr, br)[:, block_row]
    x_blocks = torch.nn.functional.pad(x2d, (0, nc * bc - x2d.shape[1])).view(m, nc, bc)[:, col_idx]
    return torch.bmm(dy_blocks.permute(1, 2, 0), x_blocks.transpose(0, 1))  # bmm: the legacy vmap batches it


# ---------------------------------------------------------------------------------------------------------------
# The three computations, dispatched by device. Index tensors travel as plain tensors (see KernelIndex).
def _linear_impl(x2d, values, row_ptr, col_idx, row_order, block_row, bias, out_features):
    if _use_triton(x2d.device, (int(values.shape[1]), int(values.shape[2])), values.dtype):
        from . import triton_ops

        return triton_ops.bsr_linear(x2d, values, row_ptr, col_idx, row_order, out_features, bias)
    cpu = _cpu_module() if x2d.device.type == "cpu" else None
    if cpu is not None:
        block_size = (int(values.shape[1]), int(values.shape[2]))
        return cpu.block_sparse_linear_cpu(x2d, values, row_ptr, col_idx, out_features, block_size, bias)
    return _linear_differentiable(x2d, values, block_row, col_idx, bias, out_features)


# Plain torch ops: the fallback where no kernel runs, second derivatives (autograd differentiates them) and
# torch.func transforms (they batch and differentiate torch ops; the kernels take plain tensors only).
def _linear_differentiable(x2d, values, block_row, col_idx, bias, out_features):
    weight = _reference_dense(values, block_row, col_idx, (out_features, x2d.shape[1]))
    return torch.nn.functional.linear(x2d, weight, bias)


def _grad_input_differentiable(dy2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order,
                               in_features):
    return dy2d @ _reference_dense(values, block_row, col_idx, (dy2d.shape[1], in_features))


def _grad_values_differentiable(dy2d, x2d, row_ptr, col_idx, block_row, block_rows, block_cols):
    return _reference_grad_values(dy2d, x2d, block_row, col_idx, (block_rows, block_cols))


def _grad_input_impl(dy2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, in_features):
    if _use_triton(dy2d.device, (int(values.shape[1]), int(values.shape[2])), values.dtype):
        from . import triton_ops

        return triton_ops.bsr_grad_input(dy2d, values, col_ptr, t_row_idx, t_block, col_order, in_features)
    cpu = _cpu_module() if dy2d.device.type == "cpu" else None
    if cpu is not None:
        block_size = (int(values.shape[1]), int(values.shape[2]))
        return cpu.grad_input_cpu(dy2d, values, row_ptr, col_idx, in_features, block_size)
    return _grad_input_differentiable(dy2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block,
                                      col_order, in_features)


def _grad_values_impl(dy2d, x2d, row_ptr, col_idx, block_row, block_rows, block_cols):
    block_size = (block_rows, block_cols)
    if _use_triton(dy2d.device, block_size, dy2d.dtype):
        from . import triton_ops

        return triton_ops.bsr_grad_values(dy2d, x2d, block_row, col_idx, block_size)
    cpu = _cpu_module() if dy2d.device.type == "cpu" else None
    if cpu is not None:
        return cpu.grad_values_cpu(dy2d, x2d, row_ptr, col_idx, block_size)
    return _grad_values_differentiable(dy2d, x2d, row_ptr, col_idx, block_row, block_rows, block_cols)


def _backward(ctx, grad_out, grad_input_fn, grad_values_fn):
    """Gradients for (x2d, values, 8 index tensors, bias, out_features): dX through the sparse weight, dW only at
    the retained blocks, db = column sums."""
    x2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input_fn(
            grad_out, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, x2d.shape[1]
        )
    if ctx.needs_input_grad[1]:
        grad_values = grad_values_fn(grad_out, x2d, row_ptr, col_idx, block_row, int(values.shape[1]),
                                     int(values.shape[2]))
    if ctx.has_bias and ctx.needs_input_grad[10]:
        grad_bias = grad_out.sum(0)
    return grad_x, grad_values, None, None, None, None, None, None, None, None, grad_bias, None


def _save(ctx, x2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, bias):
    ctx.save_for_backward(x2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order)
    ctx.has_bias = bias is not None


# ---------------------------------------------------------------------------------------------------------------
# Eager path: a plain autograd.Function (a few microseconds of Python per call, no torch.compile machinery).
class _BlockSparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, values, row_ptr, col_idx, row_order, block_row, col_ptr, t_row_idx, t_block, col_order,
                bias, out_features):
        _save(ctx, x2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, bias)
        return _linear_impl(x2d, values, row_ptr, col_idx, row_order, block_row, bias, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph=True: differentiable torch ops, so second derivatives are exact; under torch.func transforms
        # and autograd.grad(is_grads_batched=True) too: grad_out may be batched there, and the kernels read storage
        if (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or torch._C._functorch.is_legacy_batchedtensor(grad_out)):
            return _backward(ctx, grad_out, _grad_input_differentiable, _grad_values_differentiable)
        return _backward(ctx, grad_out, _grad_input_impl, _grad_values_impl)


class _TransformableFunction(_BlockSparseLinearFunction):
    """The eager path under torch.func transforms (vmap, grad, jacrev, jvp, ...) and forward-mode AD, which need
    the setup_context style and vmap/jvp rules. Only there: that style binds each call's arguments through
    inspect.signature, about 70 us per call."""

    @staticmethod
    def forward(x2d, values, row_ptr, col_idx, row_order, block_row, col_ptr, t_row_idx, t_block, col_order, bias,
                out_features):
        return _linear_impl(x2d, values, row_ptr, col_idx, row_order, block_row, bias, out_features)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        x2d, values, _, col_idx, _, block_row, *_ = inputs
        ctx.save_for_forward(x2d, values, block_row, col_idx)
        ctx.out_features = inputs[-1]

    @staticmethod
    def jvp(ctx, x_tangent, values_tangent, *other_tangents):
        x2d, values, block_row, col_idx = ctx.saved_tensors
        bias_tangent, out_features = other_tangents[8], ctx.out_features
        terms = []
        if x_tangent is not None:
            terms.append(_linear_differentiable(x_tangent, values, block_row, col_idx, None, out_features))
        if values_tangent is not None:
            terms.append(_linear_differentiable(x2d, values_tangent, block_row, col_idx, None, out_features))
        if bias_tangent is not None:
            terms.append(bias_tangent.expand(x2d.shape[0], out_features))
        return sum(terms[1:], terms[0])

    @staticmethod
    def vmap(info, in_dims, x2d, values, row_ptr, col_idx, row_order, block_row, col_ptr, t_row_idx, t_block,
             col_order, bias, out_features):
        if all(dim is None for dim in in_dims[1:]):  # only x batched (per-sample gradients): one kernel call
            x = x2d.movedim(in_dims[0], 0)
            batch, rows, in_features = x.shape
            # explicit sizes, not -1: a batch of samples with zero rows has no elements to infer a size from
            y2d = _eager_function().apply(x.reshape(batch * rows, in_features).contiguous(), values, row_ptr,
                                          col_idx, row_order, block_row, col_ptr, t_row_idx, t_block, col_order,
                                          bias, out_features)
            return y2d.view(batch, rows, out_features), 0
        # batched weights, bias or structure (model ensembles, jacfwd in the weights): torch ops, batched by vmap
        dims = (in_dims[0], in_dims[1], in_dims[5], in_dims[3], in_dims[10], None)
        return torch.vmap(_linear_differentiable, in_dims=dims)(x2d, values, block_row, col_idx, bias, out_features), 0


def _eager_function() -> type[torch.autograd.Function]:
    # _current_level >= 0: a forward-mode AD dual level is open
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return _TransformableFunction
    return _BlockSparseLinearFunction


# ---------------------------------------------------------------------------------------------------------------
# Compiled path: torch.library custom ops with fake implementations, so torch.compile / export see one opaque node.
@torch.library.custom_op("lpl::block_sparse_linear", mutates_args=())
def _linear_op(
    x2d: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    row_order: torch.Tensor, block_row: torch.Tensor, col_ptr: torch.Tensor, t_row_idx: torch.Tensor,
    t_block: torch.Tensor, col_order: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
) -> torch.Tensor:
    return _linear_impl(x2d, values, row_ptr, col_idx, row_order, block_row, bias, out_features)


@_linear_op.register_fake
def _(x2d, values, row_ptr, col_idx, row_order, block_row, col_ptr, t_row_idx, t_block, col_order, bias, out_features):
    return x2d.new_empty(x2d.shape[0], out_features)


@torch.library.custom_op("lpl::block_sparse_grad_input", mutates_args=())
def _grad_input_op(
    dy2d: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    block_row: torch.Tensor, col_ptr: torch.Tensor, t_row_idx: torch.Tensor, t_block: torch.Tensor,
    col_order: torch.Tensor, in_features: int,
) -> torch.Tensor:
    return _grad_input_impl(dy2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order,
                            in_features)


@_grad_input_op.register_fake
def _(dy2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, in_features):
    return dy2d.new_empty(dy2d.shape[0], in_features)


@torch.library.custom_op("lpl::block_sparse_grad_values", mutates_args=())
def _grad_values_op(
    dy2d: torch.Tensor, x2d: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, block_row: torch.Tensor,
    block_rows: int, block_cols: int,
) -> torch.Tensor:
    return _grad_values_impl(dy2d, x2d, row_ptr, col_idx, block_row, block_rows, block_cols)


@_grad_values_op.register_fake
def _(dy2d, x2d, row_ptr, col_idx, block_row, block_rows, block_cols):
    return dy2d.new_empty(col_idx.shape[0], block_rows, block_cols)


def _setup_context(ctx, inputs, output):
    x2d, values, row_ptr, col_idx, _, block_row, col_ptr, t_row_idx, t_block, col_order, bias, _ = inputs
    _save(ctx, x2d, values, row_ptr, col_idx, block_row, col_ptr, t_row_idx, t_block, col_order, bias)


_linear_op.register_autograd(
    lambda ctx, grad_out: _backward(ctx, grad_out, _grad_input_op, _grad_values_op), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------------------------
def block_sparse_linear(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` with ``W`` block-sparse, for ``x`` of shape ``[..., in_features]``.

    CUDA tensors run the Triton kernel, CPU tensors the CPU path; differentiable in ``x``, ``w.values`` and ``bias``.

    Example::

        >>> w = BlockSparseWeight.from_dense(torch.randn(64, 64), torch.tensor([[True, False], [True, True]]), 32)
        >>> block_sparse_linear(torch.randn(2, 5, 64), w).shape
        torch.Size([2, 5, 64])
    """
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        x, w, bias = _autocast(x, w, bias)
    _check_inputs(x, w, bias)
    out_features, in_features = w.shape
    try:
        x2d = x.reshape(-1, in_features)
    except RuntimeError:  # under vmap over 0 samples -1 is ambiguous (no elements to infer it from): give the size
        x2d = x.reshape(math.prod(x.shape[:-1]), in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    # Under torch.compile/export and jit.trace the custom op (graphs see it: a Function calling the C kernel would be
    # traced as a constant); in eager mode the lighter autograd.Function, or under torch.func transforms its
    # transformable subclass. An ONNX export is always one of the traced cases: the eager path never asks (the
    # check costs microseconds, and its first call imports torch.onnx).
    graphed = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if graphed and torch.onnx.is_in_onnx_export():
        return _dense_linear(x2d, w, bias).reshape(*x.shape[:-1], out_features)
    index = w.kernel_index
    apply = _linear_op if graphed else _eager_function().apply
    y2d = apply(
        x2d, w.values, w.row_ptr, w.col_idx, index.row_order, index.block_row, index.col_ptr, index.t_row_idx,
        index.t_block, index.col_order, bias, out_features,
    )
    return y2d.reshape(*x.shape[:-1], out_features)


def _dense_linear(x2d: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ W^T + bias`` through the dense weight, rebuilt with ops ONNX has (it has no block-sparse operator):
    an exported graph then computes what the layer does, densely."""
    _warn_dense_onnx()
    # not _reference_dense: the legacy exporter traces its block-grid arithmetic on the values' sizes, and ONNX's
    # integer division truncates where Python's floors (a 70-wide layer came out 64 wide); the grid comes from
    # block_mask here, and the index write is out of place
    (out_features, in_features), (br, bc) = w.shape, w.block_size
    rows, cols = w.block_mask.shape
    grid = w.values.new_zeros(rows, cols, br, bc).index_put((w.kernel_index.block_row, w.col_idx), w.values)
    weight = grid.permute(0, 2, 1, 3).reshape(rows * br, cols * bc)[:out_features, :in_features]
    return torch.nn.functional.linear(x2d, weight, bias)


_dense_onnx_warned = False


def _warn_dense_onnx() -> None:
    global _dense_onnx_warned
    if not _dense_onnx_warned:
        _dense_onnx_warned = True
        warnings.warn("ONNX has no block-sparse operator: the exported graph rebuilds each BlockSparseLinear's dense "
                      "weight and multiplies densely (the same outputs, dense speed).", stacklevel=4)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _autocast(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None):
    """Cast as autocast casts ``F.linear``'s inputs: floating tensors other than float64 to the autocast dtype."""
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        eligible = tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float64
        return tensor.to(dtype) if eligible else tensor

    values = cast(w.values)
    if values is not w.values:
        w = BlockSparseWeight(w.row_ptr, w.col_idx, values, w.shape, w.block_size, w.block_mask, w._index)
    return cast(x), w, cast(bias)


def _check_inputs(x: torch.Tensor, w: BlockSparseWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise LplError(f"x must be a tensor [..., in_features], got a {type(x).__name__}.")
    check_float_dtype(x, "x")
    check_float_dtype(w.values, "the block-sparse weight")
    w.check_geometry()
    out_features, in_features = w.shape
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise LplError(
            f"x has shape {tuple(x.shape)} but the block-sparse weight expects in_features={in_features} in the last "
            f"dimension (weight shape {out_features}x{in_features}); reshape x or use the matching layer."
        )
    if x.device != w.values.device:
        raise LplError(
            f"x is on {x.device} but the block-sparse weight is on {w.values.device}; move both to one device "
            f"(module.to(device) or x.to(device))."
        )
    if x.dtype != w.values.dtype:
        raise LplError(
            f"x has dtype {x.dtype} but the block-sparse weight has {w.values.dtype}; cast one of them "
            f"(e.g. module.to({x.dtype}), or run under torch.autocast)."
        )
    if bias is not None:
        if tuple(bias.shape) != (out_features,) or bias.device != x.device or bias.dtype not in FLOAT_DTYPES:
            raise LplError(
                f"bias must be a float tensor of shape ({out_features},) on {x.device}, got shape {tuple(bias.shape)} "
                f"on {bias.device} with dtype {bias.dtype}."
            )
        if bias.dtype != x.dtype:
            raise LplError(f"bias has dtype {bias.dtype} but x has {x.dtype}; cast the bias.")
