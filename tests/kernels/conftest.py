"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else through the Triton interpreter on CPU.

The interpreter is chosen when the kernels module is first imported, so the variable is set here, at collection.
The CPU dispatch path ignores it (only ``lpl.kernels.ops.triton_on_cpu()`` routes CPU tensors to Triton).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# fp32 through tensor cores uses TF32 on GPU when cuBLAS may (torch.backends.cuda.matmul.allow_tf32)
if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
    _TOLERANCE[torch.float32] = 2e-3


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernels run in this session: 'cuda', or 'cpu' under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tolerance() -> dict:
    """Relative-error bounds per dtype against a float64 reference."""
    return dict(_TOLERANCE)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``fresh_library(library, compiler=True)``: a ``kernels/cpu/_build.CompiledLibrary`` as if never loaded in this
    process, building into a temporary cache, and without a C compiler when ``compiler`` is False."""
    try:
        from lpl.kernels.cpu import _build
    except ImportError:  # package not installed: run from the repo root with PYTHONPATH
        from kernels.cpu import _build

    def reset(library, compiler: bool = True):
        monkeypatch.setattr(library, "library", None)
        monkeypatch.setattr(library, "load_error", None)
        monkeypatch.setattr(library, "warned", False)
        monkeypatch.setenv("LPL_CACHE_DIR", str(tmp_path))
        if not compiler:
            monkeypatch.setattr(_build, "_find_compiler", lambda: None)
        return tmp_path

    return reset
