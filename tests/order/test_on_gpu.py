"""The order tools on a CUDA GPU give what they give on the CPU (skipped without a GPU; run by the GPU check)."""

from __future__ import annotations

import shutil

import pytest
import torch

from test_estimator_task import NUM_BATCHES, record

from lpl.order import OrderEstimator, Recording, retrain
from lpl.order.adjoint import record_sensitivities
from lpl.order.checking import reference_loss_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("norm", [False, True], ids=["mlp", "batchnorm"])
def test_sensitivities_and_retraining_on_gpu_match_cpu(tmp_path, norm):
    on_cpu = record(tmp_path / "cpu", norm=norm)
    on_gpu = tmp_path / "gpu"
    shutil.copytree(on_cpu, on_gpu)
    record_sensitivities(on_cpu, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    record_sensitivities(on_gpu, hessian_rank=4, accelerator="gpu", check_orders=0, verbose=False)

    recording = Recording.open(on_gpu)
    again = retrain(on_gpu, recording.order, curve_every_n_steps=NUM_BATCHES, accelerator="gpu")
    assert again.final_loss == pytest.approx(reference_loss_after(recording, NUM_BATCHES), rel=1e-4)

    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    reference = reference_loss_after(recording, NUM_BATCHES)
    for method in ("adjoint", "linearized"):
        expected = OrderEstimator.from_recording(on_cpu, method=method).estimate_many(orders).final_loss
        estimator = OrderEstimator.from_recording(on_gpu, method=method).to("cuda")
        got = estimator.estimate_many(orders.cuda()).final_loss.cpu()
        # the GPU re-run rounds differently, and the curvature terms scale that with the estimated change (measured
        # on an H200: the batchnorm model's adjoint estimate +0.130 for one order moved by 0.0026, 2% of it)
        effect = (expected - reference).abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 + 0.05 * effect)
