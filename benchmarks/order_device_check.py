"""The order-science stack end to end on one accelerator: record, add sensitivities, estimate, retrain, compare.

On the digits task (``benchmarks/order_estimation.py``'s "digits": an Adam MLP, 24 pool batches), all on
``--accelerator``: records a reference run with ``TrainOrderRecorder``, checks that ``retrain`` of the reference
order reproduces it, adds the full-space data (``record_sensitivities``), scores every method on ``--orders`` random
orders against their true retraining (``check_methods``), and compares the estimator's replay on the accelerator
with the same replay on CPU. Every figure printed is measured in this run. Written for the GPU check
(``benchmarks/gpu_check.sh``); it runs on CPU too (``--accelerator cpu``), as the tests of its pieces do.

Usage::

    python benchmarks/order_device_check.py --accelerator gpu
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from order_estimation import build_task, quiet_trainer  # noqa: E402

from lpl.order import OrderEstimator, Recording, TrainOrderRecorder, check_methods, retrain  # noqa: E402
from lpl.order.adjoint import record_sensitivities  # noqa: E402
from lpl.order.checking import reference_loss_after  # noqa: E402
from lpl.utils.cli_args import positive_int  # noqa: E402
from lpl.utils.errors import run_script  # noqa: E402


def order_count(text: str) -> int:
    """An argparse ``type`` for --orders: check_methods scores rank correlations, which need at least 3 orders."""
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be at least 3 (check_methods ranks the orders), got {value}.")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"],
                        help="gpu (default; needs a CUDA GPU) or cpu")
    parser.add_argument("--steps", type=positive_int, default=24)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--orders", type=order_count, default=8, help="random orders retrained and scored (at least 3)")
    parser.add_argument("--proj-dim", type=positive_int, default=1024)
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu (the default) needs a CUDA GPU and none is visible to torch; "
                     "run on CPU with --accelerator cpu")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "rec"
        L.seed_everything(0, verbose=False)
        model, datamodule = build_task("digits", args.lr, args.steps)
        start = time.perf_counter()
        recorder = TrainOrderRecorder(path, proj_dim=args.proj_dim, val_curvature_rank=4)
        quiet_trainer(args.steps, callbacks=[recorder], accelerator=args.accelerator).fit(model, datamodule=datamodule)
        recording = Recording.open(path)
        recording.verify()
        print(f"recorded {args.steps} steps on {args.accelerator} (k = {args.proj_dim}) in "
              f"{time.perf_counter() - start:.1f} s")

        reference = recording.order
        again = retrain(path, reference, curve_every_n_steps=args.steps, accelerator=args.accelerator)
        print(f"retrained reference order on {args.accelerator}: final validation loss {again.final_loss:.6f} "
              f"(recorded {reference_loss_after(recording, args.steps):.6f})")

        start = time.perf_counter()
        record_sensitivities(path, hessian_rank=16, accelerator=args.accelerator, check_orders=0, verbose=False)
        print(f"record_sensitivities on {args.accelerator}: {time.perf_counter() - start:.1f} s")

        generator = torch.Generator().manual_seed(0)
        orders = torch.stack([torch.randperm(len(reference), generator=generator) for _ in range(args.orders)])
        orders = torch.as_tensor(reference)[orders]
        start = time.perf_counter()
        check = check_methods(path, orders, accelerator=args.accelerator)
        print(f"check_methods ({args.orders} orders retrained on {args.accelerator}): "
              f"{time.perf_counter() - start:.1f} s; no change MAE {check.no_change_mae:.5f}")
        print("| method | Spearman | Pearson | MAE | MAE / no change |\n|---|---|---|---|---|")
        for method, score in check.ranked():
            print(f"| {method} | {score.spearman:.3f} | {score.pearson:.3f} | {score.mae:.5f} | "
                  f"{check.mae_over_no_change(method):.2f}x |")
        for method, reason in check.skipped.items():
            print(f"skipped {method}: {reason.splitlines()[0]}")

        for method in ("first_order", "linearized"):
            on_cpu = OrderEstimator.from_recording(path, method=method).estimate_many(orders).final_loss
            estimator = OrderEstimator.from_recording(path, method=method).to(device)
            on_device = estimator.estimate_many(orders.to(device)).final_loss.cpu()
            difference = (on_device.double() - on_cpu.double()).abs().max().item()
            print(f"{method}: estimator on {device} vs CPU, max |difference| {difference:.2e}")


if __name__ == "__main__":
    run_script(main)
