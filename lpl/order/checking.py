"""Which estimation method to trust on a run: every method's estimates scored against truly retrained orders.

How well a method ranks orders depends on the run (how far orders drift from the reference trajectory): on the
digits task ``linearized`` ranks random orders with Spearman 0.95, on the demo LM at T = 64 no method beats
predicting the reference loss. ``check_methods`` measures it on your own recording: it retrains a few orders (the
ground truth, ``lpl.order.retrain``), estimates them with every method the recording holds data for, and reports
each method's agreement next to the "no change" baseline.

Example::

    check = check_methods("runs/rec", orders=torch.stack([torch.randperm(64) for _ in range(8)]))
    print(check.best, check.scores["first_order"].spearman, check.no_change_mae)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lpl.order.estimator import (OrderEstimator, agreement, check_complete, log_estimates,
                                 replay_data_from_recording)
from lpl.order.replay import METHODS, ReplayResult, check_orders
from lpl.utils.errors import LplError
from lpl.utils.loggers import is_wandb
from lpl.utils.io import atomic_save_figure

MIN_ORDERS = 3  # fewer orders have no meaningful rank correlation
LINEAR_LOSS = " (linear loss)"  # suffix of a method scored without the validation curvature's quadratic term


@dataclass
class MethodScore:
    """One method's estimates of the checked orders and their agreement with the retrained losses."""

    estimates: list[float]
    spearman: float
    pearson: float
    mae: float  # mean absolute error of the final validation loss


@dataclass
class MethodCheck:
    """``check_methods``' result: the orders, their retrained final losses, and every scored method."""

    orders: Tensor  # [N, L]
    true_losses: list[float]
    reference_loss: float  # the reference run's validation loss after as many steps: the "no change" prediction
    scores: dict[str, MethodScore] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it could not run on this recording

    @property
    def no_change_mae(self) -> float:
        return sum(abs(t - self.reference_loss) for t in self.true_losses) / len(self.true_losses)

    def mae_over_no_change(self, method: str) -> float:
        """A scored method's error as a multiple of "no change"'s (NaN when "no change" is exact)."""
        return self.scores[method].mae / self.no_change_mae if self.no_change_mae else float("nan")

    def ranked(self) -> list[tuple[str, MethodScore]]:
        """The scored methods, smallest error first."""
        return sorted(self.scores.items(), key=lambda item: item[1].mae)

    @property
    def best(self) -> str | None:
        """The method with the smallest error among those that beat "no change"; None when none does."""
        better = {m: s.mae for m, s in self.scores.items() if s.mae < self.no_change_mae}
        return min(better, key=better.get) if better else None

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON-able values (what ``lpl check-methods`` writes)."""
        return {
            "orders": self.orders.tolist(), "true_losses": self.true_losses, "reference_loss": self.reference_loss,
            "no_change_mae": self.no_change_mae, "best": self.best, "skipped": self.skipped,
            "scores": {m: vars(s) for m, s in self.scores.items()},
        }


def check_methods(
    path: str | Path,
    orders: Tensor | Sequence[Sequence[int]],
    methods: Sequence[str] | None = None,
    *,
    true_losses: Sequence[float] | None = None,
    accelerator: str = "cpu",
    logger: Any = None,
) -> MethodCheck:
    """Score ``methods`` (default: every method) on ``orders`` [N, L] of the recording at ``path``.

    Each order is retrained once (``retrain``, on ``accelerator``; progress is logged), unless ``true_losses`` gives
    their retrained final losses already. A method that adds the validation curvature's quadratic term to the final
    loss is also scored without it, as "<method> (linear loss)" (``OrderEstimator(..., quadratic=False)``, ``lpl
    estimate --linear-loss``): far from the reference run the quadratic term can overshoot, near it it helps.
    Methods the recording lacks data for are listed in ``skipped`` with the reason (which recorder option or
    ``record_sensitivities`` call adds it). With a Lightning ``logger`` each method's agreement is logged under
    ``check/<method>`` (W&B: an estimated-vs-true scatter).
    """
    from lpl.order.retraining import retrain
    from lpl.order.store import Recording

    recording = Recording.open(path)
    recording.verify()
    order_tensor = check_orders(orders, len(recording.batches), recording.num_steps)
    if order_tensor.shape[0] < MIN_ORDERS:
        raise LplError(f"check_methods needs at least {MIN_ORDERS} orders to rank, got {order_tensor.shape[0]}.")
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LplError(f"unknown method(s) {unknown}; choose from {list(METHODS)}.")
    check_complete(recording)  # before any retraining
    if true_losses is None:
        true_losses = []
        for i, order in enumerate(order_tensor):
            start = time.perf_counter()
            # the opened, verified recording: its files are not hashed again for every order
            result = retrain(recording, order.tolist(), curve_every_n_steps=order_tensor.shape[1],
                             accelerator=accelerator)
            true_losses.append(result.final_loss)
            rank_zero_info(f"check_methods: retrained order {i + 1}/{len(order_tensor)} in "
                           f"{time.perf_counter() - start:.1f}s: final validation loss {result.final_loss:.4f}")
    true_losses = [float(t) for t in true_losses]
    if len(true_losses) != order_tensor.shape[0]:
        raise LplError(f"true_losses has {len(true_losses)} values for {order_tensor.shape[0]} orders; give one each.")
    if not all(math.isfinite(t) for t in true_losses):
        raise LplError("a retrained order ended with a non-finite loss; the run diverges along it, so no estimate "
                       "can be scored there: check with orders that train stably.")
    data = replay_data_from_recording(recording)  # after retraining: both at once would add their memory
    check = MethodCheck(order_tensor, true_losses, reference_loss_after(recording, order_tensor.shape[1]))
    for method in methods:
        try:
            results = {method: OrderEstimator(data, method=method).estimate_many(order_tensor)}
        except LplError as error:  # data the recording lacks (the error names the option that adds them), or orders
            check.skipped[method] = str(error)  # the method does not take (adjoint: complete orders only)
            continue
        linear = _linear_readout(results[method])
        if linear is not None:
            results[method + LINEAR_LOSS] = linear
        for name, result in results.items():
            metrics = agreement(result.final_loss, true_losses)
            check.scores[name] = MethodScore(result.final_loss.double().cpu().tolist(), **metrics)
            log_estimates(logger, result, true_losses, prefix=f"check/{name}")
    _log_summary(logger, check)
    return check


def _linear_readout(result: ReplayResult) -> ReplayResult | None:
    """The estimates read off without the validation curvature's quadratic term, when the replay added a nonzero one."""
    if result.linear_loss is None or torch.equal(result.linear_loss, result.final_loss):
        return None
    curve = result.loss_curve.clone()
    curve[:, -1] = result.linear_loss
    return dataclasses.replace(result, final_loss=result.linear_loss, loss_curve=curve, linear_loss=None)


def _log_summary(logger: Any, check: MethodCheck) -> None:
    """With a W&B logger, one table of every scored method next to "no change"."""
    experiment = getattr(logger, "experiment", None)
    if not is_wandb(logger) or experiment is None:
        return
    import wandb

    rows = [[m, s.spearman, s.pearson, s.mae, check.mae_over_no_change(m)] for m, s in check.ranked()]
    rows.append(["no change", float("nan"), float("nan"), check.no_change_mae, 1.0])
    experiment.log({"check/summary": wandb.Table(
        columns=["method", "spearman", "pearson", "mae", "mae_over_no_change"], data=rows)})


def reference_loss_after(recording: Any, steps: int) -> float:
    """The reference run's validation loss after ``steps`` steps: the "no change" prediction for orders that long
    (between probes, interpolated linearly as the estimators do)."""
    probe_steps = [float(t) for t in recording.probe_steps]
    losses = [float(v) for v in recording.probe_scalars["val_loss"]]
    return float(np.interp(float(steps), probe_steps, losses))


def plot_check(check: MethodCheck, path: Path) -> None:
    """Estimated vs retrained final loss, one panel per scored method, with the "no change" line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(check.scores)
    columns = min(4, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    true = check.true_losses
    low, high = min(true), max(true)
    for axis, method in zip(axes.flat, methods):
        score = check.scores[method]
        axis.scatter(true, score.estimates, s=12)
        axis.plot([low, high], [low, high], color="black", linewidth=0.8, label="estimate = truth")
        axis.axhline(check.reference_loss, color="tab:gray", linestyle="--", linewidth=0.8, label="no change")
        axis.set_title(f"{method}\nSpearman {score.spearman:.2f}, MAE {score.mae:.3g}", fontsize=9)
        axis.set_xlabel("retrained final loss", fontsize=8)
        axis.set_ylabel("estimated", fontsize=8)
    for axis in list(axes.flat)[len(methods):]:
        axis.axis("off")
    if methods:
        axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=110)
