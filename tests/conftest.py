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
