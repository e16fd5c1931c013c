"""Triton kernels for block-sparse linear layers: forward y = x W^T (+b), and backward dX = dY W, dW at kept blocks.

Design (for Hopper-class GPUs; also runs under ``TRITON_INTERPRET=1`` on CPU tensors for correctness tests):

* One program computes output tiles ``[BLOCK_M tokens, br outputs]`` for ``SEGS`` block rows ("segments") and loops
  only over the retained K-blocks of each block row: ``acc += x[:, kblock] @ W_block^T`` on tensor cores
  (``tl.dot``, fp32 accumulation). Several block rows per program amortise launch/prologue cost for small blocks.
* Each stored block is one contiguous ``br x bc`` chunk, so a block load is a single coalesced read; the transposed
  operand is expressed by strides (no copy), which Hopper's shared-memory MMA path takes for 16-bit types.
* Load balance: block rows are visited longest first (``row_order`` sorts them by retained blocks), so ragged rows do
  not leave a long tail at the end of the grid. Launch order is grouped over ``GROUP_M`` token tiles: programs running
  at once share both the x tiles and the weight blocks in L2.
* ``num_stages`` software-pipelines the K loop (the index load, then the x tile and the weight block).
* fp32 inputs: ``input_precision`` is "tf32" only when ``torch.backends.cuda.matmul.allow_tf32`` is True, i.e. the
  same choice cuBLAS makes for the dense baseline; "ieee" otherwise (torch's default: cuBLAS does not use TF32).
* The same kernel serves dX = dY W by walking the blocks in block-column order (``t_block`` permutation) with the
  block read untransposed; dW is computed only at retained blocks (one program per block and split of the tokens).

Only plain pointer arithmetic is used (no block pointers: removed in Triton 3.9); APIs exist since Triton 3.0.

Offline sm_90 compiles (Triton 3.8, no GPU; tests/kernels/test_sm90_compile.py) show what the GPU will run: bf16
64x64 blocks give wgmma m64n64k16 in the plain orientation and m64n256k16 swapped with 256-token tiles (255
registers, no spills), cp.async multi-stage pipelining of the K loop; fp32 (TF32) swapped 256-token tiles on 4
warps spill (pruned from autotuning). Masked loads along K (in_features not a multiple of 16) lose the pipelining.
GPU speed is not measured yet: benchmarks/gpu_check.sh measures it when a GPU is lent.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit(do_not_specialize=["density_bucket"])
def _bsr_matmul_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr,
    seg_ptr, kblock_ptr, block_id_ptr, order_ptr,
    M, N, K, num_segments, density_bucket,
    stride_am, stride_ak, stride_om, stride_on, stride_wk, stride_wn,
    HAS_BIAS: tl.constexpr, HAS_BLOCK_ID: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, SEGS: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """out[m, s*BLOCK_N + n] = sum over stored blocks p of segment s: a[m, kblock[p]*BLOCK_K + k] * Wp[k, n].

    SWAP_AB computes the transposed tile out^T = Wp^T a^T instead: the weight block becomes the MMA's M side
    (64 rows fill one Hopper warpgroup MMA) and the token tile its N side (up to 256: the widest MMA shape); the
    plain orientation serves small blocks (M side = tokens).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_s = tl.cdiv(num_segments, SEGS)
    pids_in_group = GROUP_M * num_pid_s
    group = pid // pids_in_group
    first_m = group * GROUP_M
    group_size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_size_m
    pid_s = (pid % pids_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    a_rows = a_ptr + offs_m[:, None] * stride_am
    if SWAP_AB:
        w_tile = offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    else:
        w_tile = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]
    for i in tl.static_range(SEGS):
        slot = pid_s * SEGS + i
        if slot < num_segments:
            seg = tl.load(order_ptr + slot)
            start = tl.load(seg_ptr + seg)
            end = tl.load(seg_ptr + seg + 1)
            if SWAP_AB:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p in range(start, end):
                cols = tl.load(kblock_ptr + p) * BLOCK_K + offs_k
                if HAS_BLOCK_ID:
                    block = tl.load(block_id_ptr + p)
                else:
                    block = p
                if EVEN_K:
                    a = tl.load(a_rows + cols[None, :] * stride_ak, mask=mask_m[:, None], other=0.0)
                else:
                    a = tl.load(a_rows + cols[None, :] * stride_ak, mask=mask_m[:, None] & (cols[None, :] < K),
                                other=0.0)
                w = tl.load(w_ptr + block * (BLOCK_N * BLOCK_K) + w_tile)
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                if SWAP_AB:
                    acc = tl.dot(w, tl.trans(a), acc, input_precision=INPUT_PRECISION)
                else:
                    acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
            out_cols = seg * BLOCK_N + offs_n
            mask_n = out_cols < N
            if SWAP_AB:
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + out_cols, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                out_ptrs = out_ptr + offs_m[None, :] * stride_om + out_cols[:, None] * stride_on
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
            else:
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + out_cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                out_ptrs = out_ptr + offs_m[:, None] * stride_om + out_cols[None, :] * stride_on
                tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsr_grad_values_kernel(
    dy_ptr, x_ptr, out_ptr, block_row_ptr, col_idx_ptr,
    M, N, K, nnz, rows_per_split,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    BR: tl.constexpr, BC: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[split, b] = dY[m-range, rows of b]^T @ X[m-range, cols of b] for stored block b (fp32 partial sums)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    offs_r = tl.load(block_row_ptr + b) * BR + tl.arange(0, BR)
    offs_c = tl.load(col_idx_ptr + b) * BC + tl.arange(0, BC)
    mask_r = offs_r < N
    mask_c = offs_c < K
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < m_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_r[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    block_offs = tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :]
    tl.store(out_ptr + (split * nnz + b).to(tl.int64) * (BR * BC) + block_offs, acc)


def _matmul_configs() -> list[triton.Config]:
    """Plain orientation: token tiles of 64-256, 1-4 block rows per program. Swapped (SWAP_AB): blocks >= 64 rows."""
    configs = []
    for block_m, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4), (256, 8, 3)):
        for segs in (1, 2, 4):
            configs.append(triton.Config({"BLOCK_M": block_m, "SEGS": segs, "GROUP_M": 8, "SWAP_AB": False},
                                         num_warps=warps, num_stages=stages))
    for block_m, warps, stages in ((64, 4, 4), (128, 4, 3), (128, 4, 4), (256, 4, 3), (256, 8, 3)):
        configs.append(triton.Config({"BLOCK_M": block_m, "SEGS": 1, "GROUP_M": 8, "SWAP_AB": True},
                                     num_warps=warps, num_stages=stages))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Several block rows per program only for small blocks; swapped tiles only for blocks of >= 64 rows; big
    token tiles only for many tokens."""
    block_n, m = kwargs.get("BLOCK_N", named_args.get("BLOCK_N")), named_args["M"]
    wide_dtype = named_args["a_ptr"].element_size() > 2  # fp32: a 64x256 fp32 tile on 4 warps spills registers
    kept = [
        c for c in configs
        if (c.kwargs["SEGS"] == 1 or block_n * c.kwargs["SEGS"] <= 64)
        and (not c.kwargs["SWAP_AB"] or block_n % 64 == 0)
        and (c.kwargs["BLOCK_M"] <= 64 or m > 256)
        and (c.kwargs["BLOCK_M"] < 256 or c.kwargs["SWAP_AB"] or block_n <= 64)
        and not (wide_dtype and c.kwargs["BLOCK_M"] == 256 and c.num_warps == 4)
    ]
    return kept or configs[:1]


_bsr_matmul_tuned = triton.autotune(
    configs=_matmul_configs(),
    # density_bucket (retained share of blocks in eighths) is only a tuning key: loop lengths change the best tiles
    key=["M", "N", "K", "num_segments", "density_bucket", "BLOCK_N", "BLOCK_K", "EVEN_K", "HAS_BIAS", "HAS_BLOCK_ID",
         "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_bsr_matmul_kernel)

# The interpreter runs every program in Python: one fixed, small-grid configuration keeps tests fast.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "SEGS": 2, "GROUP_M": 2, "SWAP_AB": False}
# Tests pin a configuration here (either orientation, compiled or interpreted) instead of autotuning.
fixed_config: dict | None = None


def input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only when torch lets cuBLAS use it (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype == torch.float32 and (INTERPRETED or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot misreads bfloat16 operands (Triton 3.8): feed it float32 there."""
    return INTERPRETED and dtype == torch.bfloat16


def _launch_matmul(a, w_values, bias, out, seg_ptr, kblock, block_id, order, n_out, k_in, block_n, block_k, strides_w):
    m = a.shape[0]
    num_segments = seg_ptr.numel() - 1
    if m == 0 or num_segments == 0:
        return out
    if k_in == 0:  # an empty sum: dX of a layer without outputs
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    density_bucket = round(8 * kblock.numel() / (num_segments * triton.cdiv(k_in, block_k)))
    # the kernel indexes these as contiguous (block b at b * br * bc, entry i at ptr + i): copy the rare strided one
    # here (a no-op for the usual contiguous tensors) rather than carry strides through the hot loop
    w_values, seg_ptr, kblock, order = (t.contiguous() for t in (w_values, seg_ptr, kblock, order))
    bias = None if bias is None else bias.contiguous()
    block_id = None if block_id is None else block_id.contiguous()
    args = (
        a, w_values, bias if bias is not None else out, out,
        seg_ptr, kblock, block_id if block_id is not None else kblock, order,
        m, n_out, k_in, num_segments, density_bucket,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), strides_w[0], strides_w[1],
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_BLOCK_ID=block_id is not None, EVEN_K=k_in % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=input_precision(a.dtype), UPCAST=_upcast(a.dtype),
    )
    cfg = fixed_config or (_INTERPRETER_CONFIG if INTERPRETED else None)
    if cfg is not None:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(num_segments, cfg["SEGS"]),)
        _bsr_matmul_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(num_segments, meta["SEGS"]),)

        _bsr_matmul_tuned[grid](*args, **flags)
    return out


def bsr_linear(
    x2d: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, row_order: torch.Tensor,
    out_features: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, out_features] = x2d [M, K] @ W^T (+ bias), W in block-CSR (``values`` [nnz, br, bc]).

    ``row_order``: block rows in launch order (longest first, see :class:`lpl.kernels.format.KernelIndex`).
    """
    _, br, bc = values.shape
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    out = torch.empty(x2d.shape[0], out_features, device=x2d.device, dtype=x2d.dtype)
    # W^T block [bc, br]: element (k, n) of the dot operand sits at n * bc + k inside the stored block.
    return _launch_matmul(x2d, values, bias, out, row_ptr, col_idx, None, row_order,
                          out_features, x2d.shape[1], br, bc, (1, bc))


def bsr_grad_input(
    dy2d: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor, t_row_idx: torch.Tensor, t_block: torch.Tensor,
    col_order: torch.Tensor, in_features: int,
) -> torch.Tensor:
    """dX [M, in_features] = dY [M, N] @ W: each block column walks its retained blocks in CSC order."""
    _, br, bc = values.shape
    dy2d = dy2d if dy2d.stride(-1) == 1 else dy2d.contiguous()
    out = torch.empty(dy2d.shape[0], in_features, device=dy2d.device, dtype=dy2d.dtype)
    # W block [br, bc] read as stored: element (k, n) at k * bc + n.
    return _launch_matmul(dy2d, values, None, out, col_ptr, t_row_idx, t_block, col_order,
                          in_features, dy2d.shape[1], bc, br, (bc, 1))


def bsr_grad_values(
    dy2d: torch.Tensor, x2d: torch.Tensor, block_row: torch.Tensor, col_idx: torch.Tensor, block_size: tuple[int, int],
) -> torch.Tensor:
    """dValues [nnz, br, bc]: per retained block, dY[:, rows]^T @ X[:, cols] (zero at ragged padding)."""
    br, bc = block_size
    nnz = col_idx.numel()
    m, n = dy2d.shape
    k = x2d.shape[1]
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, br, bc, device=dy2d.device, dtype=dy2d.dtype)
    block_m = 32 if INTERPRETED else 64
    if INTERPRETED:
        splits = 1
    else:  # split the tokens so that few retained blocks still fill the GPU
        sms = torch.cuda.get_device_properties(dy2d.device).multi_processor_count
        splits = max(1, min(triton.cdiv(2 * sms, nnz), triton.cdiv(m, 4 * block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty(splits, nnz, br, bc, device=dy2d.device, dtype=torch.float32)
    block_row, col_idx = block_row.contiguous(), col_idx.contiguous()  # indexed as contiguous (see _launch_matmul)
    _bsr_grad_values_kernel[(nnz, splits)](
        dy2d, x2d, partial, block_row, col_idx,
        m, n, k, nnz, rows_per_split,
        dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1),
        BR=br, BC=bc, BLOCK_M=block_m, INPUT_PRECISION=input_precision(dy2d.dtype), UPCAST=_upcast(dy2d.dtype),
        **({} if INTERPRETED else {"num_warps": 4, "num_stages": 3}),
    )
    return (partial.sum(0) if splits > 1 else partial[0]).to(dy2d.dtype)
