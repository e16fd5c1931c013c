"""`import lpl.kernels` stays light: no Triton on CPU-only paths, and the CPU path works where Triton is missing."""

import subprocess
import sys

SCRIPT = r"""
import sys

if "--no-triton" in sys.argv:
    sys.modules["triton"] = None  # what Python does for a missing package: `import triton` raises ImportError
import torch
import lpl.kernels as kernels
assert sys.modules.get("triton") is None, "import lpl.kernels imported triton"
w = kernels.BlockSparseWeight.from_dense(torch.randn(64, 64), torch.tensor([[True, False], [False, True]]), 32)
x = torch.randn(3, 64, requires_grad=True)
kernels.block_sparse_linear(x, w).sum().backward()
assert sys.modules.get("triton") is None, "the CPU path imported triton"
print("ok")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_import_and_cpu_path_do_not_import_triton():
    done = _run()
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_cpu_path_works_where_triton_is_missing():
    done = _run("--no-triton")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
