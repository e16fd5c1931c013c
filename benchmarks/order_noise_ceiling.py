"""How reproducible is the ranking of orders itself? The ceiling on any order estimate's correlation.

Retrains the orders of ``benchmarks/order_estimation.py`` (random, reversed, easy-first; same seed) from the
recording's initial weights, then again from initial weights multiplied by (1 + scale * noise), noise standard
normal and the same for every order (a slightly different initialisation, as a reload in another precision or
another machine's rounding would give), and again on one CPU thread instead of two (another summation order: only
rounding differs). Each variant is compared with the unperturbed retraining like an estimate: Spearman, Pearson,
mean absolute error, beside the "no change" error (predict the reference run's loss).

If orders swap ranks when the initialisation moves by float32 rounding (scale ~1e-7), the ranking is not a
property of the data order alone and no estimator can reproduce it: its Spearman here bounds every method's.

Usage::

    python benchmarks/order_noise_ceiling.py --recording /tmp/lpl_order_bench/lm_lr0.003_T64_k1024_r2_v8
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch

from lpl.order import Recording
from lpl.order.retraining import fit_in_order, rebuild, validation_loss

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).parent))
from order_estimation import DigitsDataModule, DigitsMLP, make_orders, metrics  # noqa: E402, F401 - rebuild() finds them
from lpl.utils.errors import run_script


class _PrecisionContext(L.Callback):
    """Keeps the Trainer's forward context, so the validation loss is measured in the run's precision."""

    forward: Callable[[], Any] = contextlib.nullcontext

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.forward = trainer.precision_plugin.forward_context


def retrained_loss(recording: Recording, order: list[int], scale: float, threads: int, seed: int = 0) -> float:
    model, datamodule = rebuild(recording, order)
    if scale:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1 + scale * torch.randn(parameter.shape, generator=generator))
    context = _PrecisionContext()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fit_in_order(recording, model, datamodule, len(order), [context], "cpu")
        return validation_loss(model, datamodule.val_dataloader(), context.forward)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recording", required=True)
    parser.add_argument("--orders", type=int, default=16, help="random orders (plus reversed and easy-first)")
    parser.add_argument("--scales", default="1e-7,1e-5,1e-3", help="relative initialisation noise levels")
    parser.add_argument("--threads", type=int, default=2, help="threads of the unperturbed retraining")
    args = parser.parse_args()
    recording = Recording.open(args.recording)
    names, orders = make_orders(Path(args.recording), args.orders, seed=1234)  # the accuracy benchmark's orders
    reference = float(recording.probe_scalars["val_loss"][-1])
    variants = {"retrained again": (0.0, args.threads)}
    variants.update({f"init x (1 + {s} noise)": (float(s), args.threads) for s in args.scales.split(",")})
    variants[f"{1 if args.threads > 1 else 2} thread(s) instead of {args.threads}"] = (
        0.0, 1 if args.threads > 1 else 2)
    start = time.perf_counter()
    truth = np.array([retrained_loss(recording, o.tolist(), 0.0, args.threads) for o in orders])
    results = {}
    for name, (scale, threads) in variants.items():
        results[name] = np.array([retrained_loss(recording, o.tolist(), scale, threads) for o in orders])
        print(f"{name}: done after {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nrecording {args.recording}: T = {recording.num_steps}, {len(orders)} orders ({args.orders} random, "
          f"reversed, easy-first), reference loss {reference:.4f}, spread (std) of the true losses {truth.std():.4f}, "
          f"\"no change\" MAE {np.abs(truth - reference).mean():.4f}")
    print("| variant vs unperturbed retraining | Spearman | Pearson | MAE | max abs difference |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        if np.array_equal(values, truth):
            print(f"| {name} | identical | identical | 0 | 0 |")
            continue
        m = metrics(values, truth)
        print(f"| {name} | {m['spearman']:.2f} | {m['pearson']:.2f} | {m['mae']:.4f} | "
              f"{np.abs(values - truth).max():.4f} |")


if __name__ == "__main__":
    run_script(main)
