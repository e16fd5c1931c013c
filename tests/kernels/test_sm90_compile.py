"""Compile the Triton kernels for an H100 (sm_90) without a GPU: the compiled path (not the interpreter) builds, uses
Hopper's warpgroup MMA (wgmma) of the intended shape, pipelines the K loop and does not spill registers.

The compile runs in a subprocess with TRITON_INTERPRET=0 (the kernel tests interpret Triton in this process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kernel tests compile for real")

TRITON_OPS = Path(__file__).resolve().parents[2] / "kernels" / "triton_ops.py"

COMPILE_SCRIPT = r"""
import importlib.util, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("triton_ops_sm90", sys.argv[1])
ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ops)
reports = {}
for name, request in json.loads(sys.argv[2]).items():
    kernel = getattr(ops, request["kernel"])
    names = kernel.arg_names
    signature = {n: request["types"].get(n, "constexpr") for n in names}
    constexprs = {(names.index(k),): v for k, v in request["constants"].items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in request["divisible"]}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=3))
    ptx = compiled.asm["ptx"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True).stdout
    reports[name] = {
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        "async_copies": ptx.count("cp.async"),
        "stack": [int(v) for v in re.findall(r"STACK:(\d+)", usage)],
    }
print(json.dumps(reports))
"""


MATMUL_TYPES = dict(a_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", seg_ptr="*i64",
                    kblock_ptr="*i64", block_id_ptr="*i64", order_ptr="*i64", M="i32", N="i32", K="i32",
                    num_segments="i32", density_bucket="i32", stride_am="i32", stride_om="i32", stride_wk="i32",
                    stride_wn="i32")
MATMUL_DIVISIBLE = ["a_ptr", "w_ptr", "bias_ptr", "out_ptr", "seg_ptr", "kblock_ptr", "block_id_ptr", "order_ptr",
                    "stride_am", "stride_om", "N", "K"]


def _matmul(swap: bool, block_m: int, has_block_id: bool) -> dict:
    constants = dict(HAS_BIAS=True, HAS_BLOCK_ID=has_block_id, EVEN_K=True, BLOCK_N=64, BLOCK_K=64,
                     INPUT_PRECISION="tf32", UPCAST=False, BLOCK_M=block_m, SEGS=1, GROUP_M=8, SWAP_AB=swap,
                     stride_ak=1, stride_on=1)
    return dict(kernel="_bsr_matmul_kernel", types=MATMUL_TYPES, constants=constants, divisible=MATMUL_DIVISIBLE)


REQUESTS = {
    # forward, swapped: the 64-row weight block is the MMA's M side, 256 tokens its N side
    "forward_swapped": _matmul(swap=True, block_m=256, has_block_id=False),
    # dX = dY W in block-column order, plain orientation
    "grad_input_plain": _matmul(swap=False, block_m=128, has_block_id=True),
    "grad_values": dict(
        kernel="_bsr_grad_values_kernel",
        types=dict(dy_ptr="*bf16", x_ptr="*bf16", out_ptr="*fp32", block_row_ptr="*i64", col_idx_ptr="*i64",
                   M="i32", N="i32", K="i32", nnz="i32", rows_per_split="i32", stride_dym="i32", stride_xm="i32"),
        constants=dict(BR=64, BC=64, BLOCK_M=64, INPUT_PRECISION="tf32", UPCAST=False, stride_dyn=1, stride_xk=1),
        divisible=["dy_ptr", "x_ptr", "out_ptr", "block_row_ptr", "col_idx_ptr", "stride_dym", "stride_xm",
                   "rows_per_split", "N", "K"],
    ),
}


@pytest.fixture(scope="module")
def reports() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(TRITON_OPS), json.dumps(REQUESTS)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,expected", [("forward_swapped", ["m64n256k16"]), ("grad_input_plain", ["m64n64k16"])])
def test_block_sparse_matmul_compiles_to_pipelined_wgmma_without_spills(reports, name, expected):
    assert reports[name]["wgmma"] == expected
    assert reports[name]["async_copies"] > 0
    assert reports[name]["stack"] and max(reports[name]["stack"]) == 0


def test_grad_values_kernel_compiles_to_pipelined_wgmma_without_spills(reports):
    assert reports["grad_values"]["wgmma"] and reports["grad_values"]["async_copies"] > 0
    assert reports["grad_values"]["stack"] and max(reports["grad_values"]["stack"]) == 0
