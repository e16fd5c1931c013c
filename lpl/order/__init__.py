"""Training-order method: projection, recording store, TrainOrderRecorder, estimator.

Imports stay lazy (``import lpl.order`` pulls no Lightning): names resolve on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # recording (projection, store, recorder, samplers)
    "Projector": "lpl.order.projection",
    "Recording": "lpl.order.store",
    "RecordingError": "lpl.order.store",
    "RecordingWriter": "lpl.order.store",
    "TrainOrderRecorder": "lpl.order.recorder",
    "OrderedBatchSampler": "lpl.data.samplers",
    "SeededBatchSampler": "lpl.data.samplers",
    "AdamSnapshot": "lpl.order.quantities",
    "ProbeContext": "lpl.order.quantities",
    # estimation from a recording, and its ground truth
    "OrderEstimator": "lpl.order.estimator",
    "OrderEstimate": "lpl.order.estimator",
    "retrain": "lpl.order.retraining",
    "RetrainResult": "lpl.order.retraining",
    "position_map": "lpl.order.position",
    "record_sensitivities": "lpl.order.adjoint",
    "check_methods": "lpl.order.checking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lpl.order' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
