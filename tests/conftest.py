"""Suite-wide settings: offline W&B, small thread pools, deterministic seeds."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run under the interpreter. Triton reads this when a kernel module is first
# imported, which may happen in any test directory, so it is set here, before anything is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (one summation order), the thread count put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    return err if err == err else float("inf")


@pytest.fixture
def rel_err():
    """``rel_err(out, reference)``: relative error in float64, inf for NaN."""
    return _relative_error
