"""Order tools on a module whose network is torch.compile'd: probes and sensitivity data take second derivatives,
which a compiled backward refuses; they run the network eagerly instead."""

from __future__ import annotations

import sys

import pytest
import torch

from lpl.order import OrderEstimator, Recording, record_sensitivities, retrain
from test_estimator_task import TinyClassifier, record

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(torch.compiler, "set_stance"),
                                reason="torch.compile on CPU needs a C compiler and torch >= 2.6")


class CompiledClassifier(TinyClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net)


def test_compiled_network_records_with_curvature_and_retrains(tmp_path):
    path = record(tmp_path / "rec", curvature_rank=2, model=CompiledClassifier())
    recording = Recording.open(path)
    truth = retrain(recording, recording.order, accelerator="cpu")
    assert truth.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)
    record_sensitivities(path, curvature_rank=1, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    estimate = OrderEstimator.from_recording(path, method="linearized").estimate(recording.order)
    assert estimate.final_loss == pytest.approx(truth.final_loss, abs=1e-3)
