"""CPU block-sparse linear (kernels/cpu) against a dense masked matmul in float64, compiled and torch paths."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

try:
    import lpl.kernels.cpu as cpu
    from lpl.kernels.cpu import _build
except ImportError:  # package not installed: run from the repo root with PYTHONPATH
    import kernels.cpu as cpu
    from kernels.cpu import _build

from lpl.utils.errors import LplError

# without a C compiler the compiled path cannot be built (lpl falls back to torch with a warning; tested below)
needs_compiler = pytest.mark.skipif(_build._find_compiler() is None, reason="no C compiler: the kernel cannot be built")
BACKENDS = [pytest.param("compiled", marks=needs_compiler), "torch"]
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_weight(out_features, in_features, block_size, mask_kind="random", density=0.5, seed=0, pad_garbage=False):
    """A block-sparse weight as (dense masked W [N, K] in float64, values, row_ptr, col_idx, block mask)."""
    br, bc = block_size
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_cols = math.ceil(out_features / br), math.ceil(in_features / bc)
    if mask_kind == "random":
        mask = torch.rand(n_rows, n_cols, generator=gen) < density
    elif mask_kind == "empty_rows":
        mask = torch.rand(n_rows, n_cols, generator=gen) < 0.7
        mask[::2] = False
    elif mask_kind == "zero":
        mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    elif mask_kind == "dense":
        mask = torch.ones(n_rows, n_cols, dtype=torch.bool)
    else:
        raise AssertionError(mask_kind)
    full = torch.randn(n_rows * br, n_cols * bc, generator=gen, dtype=torch.float64)
    full = full * mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    full[out_features:, :] = 0.0
    full[:, in_features:] = 0.0
    positions = mask.nonzero().tolist()
    blocks = [full[r * br : (r + 1) * br, c * bc : (c + 1) * bc] for r, c in positions]
    values = torch.stack(blocks) if blocks else torch.zeros(0, br, bc, dtype=torch.float64)
    if pad_garbage:  # the contract says padding is zero; finite junk there must still never reach an output
        junk = torch.randn(n_rows * br, n_cols * bc, generator=gen, dtype=torch.float64)
        junk[:out_features, :in_features] = 0.0
        values = values + torch.stack([junk[r * br : (r + 1) * br, c * bc : (c + 1) * bc] for r, c in positions])
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    col_idx = torch.tensor([c for _, c in positions], dtype=torch.int64)
    return full[:out_features, :in_features], values, row_ptr, col_idx, mask


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item() + 1.0
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err} vs scale {scale}"


# (out_features, in_features, block_size): square, non-square, ragged edges on both sides, blocks wider than 16
SHAPES = [
    (64, 48, (16, 16)),
    (96, 64, (32, 32)),
    (128, 128, (64, 64)),
    (70, 90, (32, 64)),
    (100, 75, (16, 16)),
    (33, 47, (8, 24)),
    (130, 70, (64, 32)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}b{s[2][0]}x{s[2][1]}")
@pytest.mark.parametrize("mask_kind", ["random", "empty_rows", "zero", "dense"])
def test_forward_and_backward_fp32(backend, shape, mask_kind):
    out_features, in_features, block_size = shape
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, mask_kind)
    gen = torch.Generator().manual_seed(1)
    m = 37  # not a multiple of the 6-row microkernel tile
    x = torch.randn(m, in_features, generator=gen, dtype=torch.float64)
    dy = torch.randn(m, out_features, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64)
    v32 = values.float()

    y = cpu.block_sparse_linear_cpu(x.float(), v32, row_ptr, col_idx, out_features, block_size, bias.float(),
                                    backend=backend)  # fmt: skip
    assert_close(y, x @ w.T + bias, torch.float32)
    y_nobias = cpu.block_sparse_linear_cpu(x.float(), v32, row_ptr, col_idx, out_features, block_size, backend=backend)
    assert_close(y_nobias, x @ w.T, torch.float32)

    dx = cpu.grad_input_cpu(dy.float(), v32, row_ptr, col_idx, in_features, block_size, backend=backend)
    assert_close(dx, dy @ w, torch.float32)

    dv = cpu.grad_values_cpu(dy.float(), x.float(), row_ptr, col_idx, block_size, backend=backend)
    expected_dv = _blocks_of(dy.T @ x, row_ptr, col_idx, block_size)
    assert dv.shape == values.shape
    assert_close(dv, expected_dv, torch.float32)


def _blocks_of(dense, row_ptr, col_idx, block_size):
    """Cut a dense [N, K] gradient into the retained blocks (zero padding), as make_weight lays them out."""
    br, bc = block_size
    n, k = dense.shape
    n_rows, n_cols = row_ptr.numel() - 1, math.ceil(k / bc)
    full = torch.zeros(n_rows * br, n_cols * bc, dtype=dense.dtype)
    full[:n, :k] = dense
    rows = torch.repeat_interleave(torch.arange(n_rows), row_ptr[1:] - row_ptr[:-1]).tolist()
    blocks = [full[r * br : (r + 1) * br, c * bc : (c + 1) * bc] for r, c in zip(rows, col_idx.tolist())]
    values = torch.stack(blocks) if blocks else torch.zeros(0, br, bc, dtype=dense.dtype)
    return values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(backend, dtype):
    out_features, in_features, block_size = 80, 72, (16, 24)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(23, in_features, generator=gen).to(dtype)
    dy = torch.randn(23, out_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    vals = values.to(dtype)
    w_q = _dense_from(vals.double(), row_ptr, col_idx, out_features, in_features, block_size)

    y = cpu.block_sparse_linear_cpu(x, vals, row_ptr, col_idx, out_features, block_size, bias, backend=backend)
    assert_close(y, x.double() @ w_q.T + bias.double(), dtype)
    dx = cpu.grad_input_cpu(dy, vals, row_ptr, col_idx, in_features, block_size, backend=backend)
    assert_close(dx, dy.double() @ w_q, dtype)
    dv = cpu.grad_values_cpu(dy, x, row_ptr, col_idx, block_size, backend=backend)
    assert_close(dv, _blocks_of(dy.double().T @ x.double(), row_ptr, col_idx, block_size), dtype)


def _dense_from(values, row_ptr, col_idx, out_features, in_features, block_size):
    br, bc = block_size
    n_rows, n_cols = row_ptr.numel() - 1, math.ceil(in_features / bc)
    full = torch.zeros(n_rows * br, n_cols * bc, dtype=values.dtype)
    rows = torch.repeat_interleave(torch.arange(n_rows), row_ptr[1:] - row_ptr[:-1]).tolist()
    for j, (r, c) in enumerate(zip(rows, col_idx.tolist())):
        full[r * br : (r + 1) * br, c * bc : (c + 1) * bc] = values[j]
    return full[:out_features, :in_features]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_padding_never_read(backend):
    out_features, in_features, block_size = 90, 70, (32, 32)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, pad_garbage=True)
    gen = torch.Generator().manual_seed(3)
    x_big = torch.randn(in_features, 2 * 41, generator=gen)
    x = x_big.T[::2]  # [41, K], neither dimension unit-stride
    dy = torch.randn(out_features, 41, generator=gen).T  # column-major [41, N]
    assert not x.is_contiguous() and not dy.is_contiguous()
    v32 = values.float()

    y = cpu.block_sparse_linear_cpu(x, v32, row_ptr, col_idx, out_features, block_size, backend=backend)
    assert_close(y, x.double() @ w.T, torch.float32)
    dx = cpu.grad_input_cpu(dy, v32, row_ptr, col_idx, in_features, block_size, backend=backend)
    assert_close(dx, dy.double() @ w, torch.float32)
    dv = cpu.grad_values_cpu(dy, x, row_ptr, col_idx, block_size, backend=backend)
    assert_close(dv, _blocks_of(dy.double().T @ x.double(), row_ptr, col_idx, block_size), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_tensors(backend):
    """row_ptr / col_idx as strided views (their contiguous copies must outlive the C call that reads them)."""
    out_features, in_features, block_size = 64, 64, (4, 4)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, density=0.1, seed=5)
    gen = torch.Generator().manual_seed(5)
    x, dy = torch.randn(5, in_features, generator=gen), torch.randn(5, out_features, generator=gen)
    for _ in range(20):  # a freed copy is overwritten by later allocations: one call may pass by luck
        strided_ptr = torch.stack([row_ptr, torch.full_like(row_ptr, -7)], 1)[:, 0]
        strided_idx = torch.stack([col_idx, torch.full_like(col_idx, 99)], 1)[:, 0]
        assert not strided_ptr.is_contiguous() and not strided_idx.is_contiguous()
        y = cpu.block_sparse_linear_cpu(x, values.float(), strided_ptr, strided_idx, out_features, block_size,
                                        backend=backend)
        assert_close(y, x.double() @ w.T, torch.float32)
        dv = cpu.grad_values_cpu(dy, x, strided_ptr, strided_idx, block_size, backend=backend)
        assert_close(dv, _blocks_of(dy.double().T @ x.double(), row_ptr, col_idx, block_size), torch.float32)


@pytest.mark.parametrize("m", [0, 1, 5, 6, 7, 200])
def test_token_counts_and_thread_counts_agree(m):
    out_features, in_features, block_size = 128, 96, (32, 32)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, density=0.6)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(m, in_features, generator=gen)
    dy = torch.randn(m, out_features, generator=gen)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append((
                cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, out_features, block_size),
                cpu.grad_input_cpu(dy, values.float(), row_ptr, col_idx, in_features, block_size),
                cpu.grad_values_cpu(dy, x, row_ptr, col_idx, block_size),
            ))  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    for (y, dx, dv) in results:
        assert y.shape == (m, out_features) and dx.shape == (m, in_features)
        assert_close(y, x.double() @ w.T, torch.float32)
        assert_close(dx, dy.double() @ w, torch.float32)
        assert_close(dv, _blocks_of(dy.double().T @ x.double(), row_ptr, col_idx, block_size), torch.float32)
    assert torch.equal(results[0][0], results[1][0])  # forward: each output element is summed by one thread


def test_matches_dense_linear_on_a_vit_sized_layer():
    out_features, in_features, block_size = 768, 384, (64, 64)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, density=0.5)
    x = torch.randn(197, in_features)
    y = cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, out_features, block_size)
    torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-4, atol=1e-4)


@needs_compiler
@pytest.mark.skipif(not _build.torch_openmp_is_gnu(), reason="torch runs no GNU OpenMP runtime here to share")
def test_the_kernel_runs_on_torchs_openmp_runtime_and_from_several_threads_at_once():
    # new threads per call contended with torch's spinning OpenMP workers: 2-4x slower calls after a torch op
    assert cpu.compiled_kernel_available() and _build.BLOCK_SPARSE.openmp
    maps = open("/proc/self/maps").read().splitlines()
    assert len({line.split()[-1] for line in maps if line.endswith("/libgomp.so.1")}) == 1  # torch's, not a second
    import concurrent.futures

    w, values, row_ptr, col_idx, _ = make_weight(96, 64, (16, 16))
    inputs = [torch.randn(50 + i, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each calling thread gets its own OpenMP team
        outputs = list(pool.map(lambda x: cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 96,
                                                                      (16, 16), backend="compiled"), inputs))
    for x, y in zip(inputs, outputs):
        assert_close(y, x.double() @ w.T, torch.float32)


def test_env_var_forces_the_torch_path(monkeypatch):
    calls = []
    monkeypatch.setenv("LPL_CPU_KERNEL", "torch")
    monkeypatch.setattr(cpu.ops, "_run_matmul", lambda *a, **k: calls.append(1))
    w, values, row_ptr, col_idx, _ = make_weight(32, 32, (16, 16))
    x = torch.randn(4, 32)
    y = cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 32, (16, 16))
    assert not calls
    assert_close(y, x.double() @ w.T, torch.float32)


def test_no_compiler_falls_back_with_one_warning(fresh_library):
    fresh_library(_build.BLOCK_SPARSE, compiler=False)
    w, values, row_ptr, col_idx, _ = make_weight(48, 40, (16, 16))
    x = torch.randn(9, 40)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback"):
        y = cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 48, (16, 16))
    assert_close(y, x.double() @ w.T, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 48, (16, 16))
    with pytest.raises(LplError, match="unavailable"):
        cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 48, (16, 16), backend="compiled")


@needs_compiler
def test_library_is_built_into_the_cache_atomically(fresh_library):
    tmp_path = fresh_library(_build.BLOCK_SPARSE)
    assert cpu.compiled_kernel_available()
    files = sorted(p.name for p in (tmp_path / "cpu_kernels").iterdir())
    assert len(files) == 2 and files[0].startswith("block_sparse_") and files[0].endswith(".so")
    assert files[1] == files[0] + ".sha256"


@needs_compiler
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_or_foreign_cached_library_is_built_again(fresh_library, damage):
    """A cached file that does not load (truncated) or lacks the kernel's functions (another library under its
    name) was kept: the portable build was used from then on, or the process crashed on the missing symbol."""
    tmp_path = fresh_library(_build.BLOCK_SPARSE)
    compiler = _build._find_compiler()
    flags = _build.BLOCK_SPARSE.flag_variants()[0]
    cached = _build.BLOCK_SPARSE.cached_path(compiler, flags)
    if damage == "truncated":  # after its digest was recorded (loading it would kill the process with SIGBUS)
        _build._compile(compiler, flags, _build._SOURCES / "block_sparse.c", cached)
        cached.write_bytes(cached.read_bytes()[: len(cached.read_bytes()) // 3])
    else:
        source = tmp_path / "other.c"
        source.write_text("int lpl_unrelated(void) { return 1; }\n")
        _build._compile(compiler, ["-shared", "-fPIC"], source, cached)  # its digest is recorded: it loads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the library was built again
        assert cpu.compiled_kernel_available()
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name, cached.name + ".sha256"]
    w, values, row_ptr, col_idx, _ = make_weight(48, 40, (16, 16))
    x = torch.randn(9, 40)
    y = cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, 48, (16, 16), backend="compiled")
    assert_close(y, x.double() @ w.T, torch.float32)


# --------------------------------------------------------------------------------------------- bad input


def _good():
    _, values, row_ptr, col_idx, _ = make_weight(64, 48, (16, 16))
    return torch.randn(5, 48), values.float(), row_ptr, col_idx


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "x2d": a["x2d"].long()}, "floating-point"),
        (lambda a: {**a, "x2d": a["x2d"][None]}, "2 dims"),
        (lambda a: {**a, "x2d": torch.randn(5, 48, device="meta")}, "CPU"),
        (lambda a: {**a, "x2d": a["x2d"].double()}, "dtypes differ"),
        (lambda a: {**a, "x2d": torch.randn(5, 20)}, "col_idx must lie"),
        (lambda a: {**a, "values": a["values"][:, :8]}, "values must have shape"),
        (lambda a: {**a, "row_ptr": a["row_ptr"][:-1]}, "row_ptr has"),
        (lambda a: {**a, "row_ptr": a["row_ptr"].int()}, "int64"),
        (lambda a: {**a, "col_idx": a["col_idx"][:-1]}, "end at nnz"),
        (lambda a: {**a, "out_features": 100}, "row_ptr has"),
        (lambda a: {**a, "block_size": (16, 0)}, "block_size"),
        (lambda a: {**a, "bias": torch.randn(63)}, "bias must have shape"),
        (lambda a: {**a, "backend": "fast"}, "backend must be"),
    ],
)
def test_forward_rejects_bad_input(mutate, message):
    x, values, row_ptr, col_idx = _good()
    args = dict(x2d=x, values=values, row_ptr=row_ptr, col_idx=col_idx, out_features=64, block_size=(16, 16))
    with pytest.raises(LplError, match=message):
        cpu.block_sparse_linear_cpu(**mutate(args))


def test_backward_pieces_reject_bad_input():
    x, values, row_ptr, col_idx = _good()
    with pytest.raises(LplError, match="row_ptr has"):
        cpu.grad_input_cpu(torch.randn(5, 65), values, row_ptr, col_idx, 48, (16, 16))
    with pytest.raises(LplError, match="col_idx must lie"):
        cpu.grad_input_cpu(torch.randn(5, 64), values, row_ptr, col_idx, 30, (16, 16))
    with pytest.raises(LplError, match="same number of rows"):
        cpu.grad_values_cpu(torch.randn(4, 64), x, row_ptr, col_idx, (16, 16))
    with pytest.raises(LplError, match="dtypes differ"):
        cpu.grad_values_cpu(torch.randn(5, 64).half(), x, row_ptr, col_idx, (16, 16))


@needs_compiler
def test_packed_weight_gives_the_same_results():
    out_features, in_features, block_size = 100, 72, (32, 24)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size)
    v32 = values.float()
    packed = cpu.pack_weight_cpu(v32, row_ptr, col_idx, out_features, in_features, block_size, backward=True)
    x, dy = torch.randn(19, in_features), torch.randn(19, out_features)
    bias = torch.randn(out_features)
    y = cpu.block_sparse_linear_cpu(x, v32, row_ptr, col_idx, out_features, block_size, bias, packed=packed)
    assert torch.equal(y, cpu.block_sparse_linear_cpu(x, v32, row_ptr, col_idx, out_features, block_size, bias))
    assert torch.equal(cpu.packed_linear_cpu(x, packed, bias), y)  # the lean call on the checked structure
    with pytest.raises(LplError, match="72"):
        cpu.packed_linear_cpu(x[:, :48], packed)
    with pytest.raises(LplError, match="dtypes differ"):  # it was packed from float32 values
        cpu.packed_linear_cpu(x.bfloat16(), packed)
    v16 = values.bfloat16()
    packed16 = cpu.pack_weight_cpu(v16, row_ptr, col_idx, out_features, in_features, block_size)
    w16 = _dense_from(v16.double(), row_ptr, col_idx, out_features, in_features, block_size)
    assert_close(cpu.packed_linear_cpu(x.bfloat16(), packed16), x.bfloat16().double() @ w16.T, torch.bfloat16)
    # the kernel reads the packed structure unchecked: one changed or built by hand is refused, never read
    import dataclasses

    for bad in (dataclasses.replace(packed, in_features=8), cpu.PackedWeightCPU(*dataclasses.astuple(packed)[:5])):
        with pytest.raises(LplError, match="must come from pack_weight_cpu"):
            cpu.packed_linear_cpu(x, bad)
    edited = cpu.pack_weight_cpu(v32, row_ptr, col_idx, out_features, in_features, block_size)
    edited.col_idx[0] = 10**9
    with pytest.raises(LplError, match="unchanged since"):
        cpu.packed_linear_cpu(x, edited)
    dx = cpu.grad_input_cpu(dy, v32, row_ptr, col_idx, in_features, block_size, packed=packed)
    assert_close(dx, dy.double() @ w, torch.float32)

    forward_only = cpu.pack_weight_cpu(v32, row_ptr, col_idx, out_features, in_features, block_size)
    with pytest.raises(LplError, match="backward=True"):
        cpu.grad_input_cpu(dy, v32, row_ptr, col_idx, in_features, block_size, packed=forward_only)
    with pytest.raises(LplError, match="does not match"):
        cpu.block_sparse_linear_cpu(x[:, :48], v32[:0], torch.zeros(5, dtype=torch.int64),
                                    torch.zeros(0, dtype=torch.int64), out_features, block_size,
                                    packed=packed)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_buffer_is_filled_and_returned(backend, dtype):
    out_features, in_features, block_size = 64, 48, (16, 16)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size)
    x, bias = torch.randn(11, in_features).to(dtype), torch.randn(out_features).to(dtype)
    storage = torch.full((11, out_features + 5), float("nan"), dtype=dtype)
    out = storage[:, :out_features]  # rows padded: stride(0) != out_features
    y = cpu.block_sparse_linear_cpu(x, values.to(dtype), row_ptr, col_idx, out_features, block_size, bias,
                                    backend=backend, out=out)  # fmt: skip
    assert y.data_ptr() == out.data_ptr()
    w_q = _dense_from(values.to(dtype).double(), row_ptr, col_idx, out_features, in_features, block_size)
    assert_close(out, x.double() @ w_q.T + bias.double(), dtype)
    assert storage[:, out_features:].isnan().all()
    with pytest.raises(LplError, match="out must be"):
        cpu.block_sparse_linear_cpu(x, values.to(dtype), row_ptr, col_idx, out_features, block_size, out=out.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_with_overlapping_rows_is_refused(backend):
    out_features, in_features, block_size = 32, 32, (16, 16)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size, mask_kind="dense")
    x = torch.randn(4, in_features)
    for out in (torch.empty(1, out_features).expand(4, out_features),  # every row is the same memory
                torch.empty(4 * 16 + 16).as_strided((4, out_features), (16, 1))):  # each row half over the next
        with pytest.raises(LplError, match="overlap"):
            cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, out_features, block_size,
                                        backend=backend, out=out)
    out = torch.empty(4, out_features)  # a plain buffer is still taken
    y = cpu.block_sparse_linear_cpu(x, values.float(), row_ptr, col_idx, out_features, block_size, backend=backend,
                                    out=out)
    assert_close(y, x.double() @ w.T, torch.float32)


@needs_compiler
def test_packing_under_inference_mode_keeps_the_staleness_check():
    """Packed there, from inference tensors too: the pack's own tensors still carry version counters."""
    out_features, in_features, block_size = 64, 48, (16, 16)
    w, values, row_ptr, col_idx, _ = make_weight(out_features, in_features, block_size)
    x, bias = torch.randn(7, in_features), torch.randn(out_features)
    with torch.inference_mode():
        v32, ptr, idx = values.float(), row_ptr.clone(), col_idx.clone()  # inference tensors
        packed = cpu.pack_weight_cpu(v32, ptr, idx, out_features, in_features, block_size, backward=True)
        assert_close(cpu.packed_linear_cpu(x, packed, bias), x.double() @ w.T + bias.double(), torch.float32)
        packed.col_idx[0] = 10**9  # an edit made under inference_mode too
        with pytest.raises(LplError, match="unchanged since"):
            cpu.packed_linear_cpu(x, packed)
    packed = cpu.pack_weight_cpu(v32, ptr, idx, out_features, in_features, block_size)  # their tensors, outside it
    assert_close(cpu.packed_linear_cpu(x, packed), x.double() @ w.T, torch.float32)


def test_unwritable_cache_dir_falls_back_to_a_temp_dir_only_this_user_can_write(monkeypatch, tmp_path):
    blocked = tmp_path / "file_not_dir"
    blocked.write_text("")
    monkeypatch.setenv("LPL_CACHE_DIR", str(blocked))
    monkeypatch.setattr(_build.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(_build, "_process_temp_dir", None)
    folder = _build.cache_dir()
    assert folder == tmp_path / f"lpl-{os.getuid()}" / "cpu_kernels"
    assert not folder.stat().st_mode & 0o077 and not folder.parent.stat().st_mode & 0o077
    # libraries in it get loaded: a folder others may write to (another user made it first, say) is not used
    folder.parent.chmod(0o777)
    private = _build.cache_dir()
    assert private != folder and private.parent == tmp_path and not private.stat().st_mode & 0o077
    assert _build.cache_dir() == private  # one per process
