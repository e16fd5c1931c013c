"""Does the gradient linearisation behind the full-space order estimates hold along truly retrained orders?

The `linearized` and `adjoint` methods predict the gradient an order feeds Adam at step s from the reference run:
g_b(theta_s + Delta_s) ~ g_b(theta_s) + H Delta_s. This script retrains a few random orders of a recording, keeps
their weights gamma_s = theta_s + Delta_s before every step, and measures at sampled steps, relative to the true
gradient ||g_b(gamma_s)||:

- zeroth order: || g_b(gamma_s) - g_b(theta_s) ||
- exact first order, the batch's own Hessian: || g_b(gamma_s) - g_b(theta_s) - H_b(theta_s) Delta_s ||
- first order with the reference batch's Hessian (what the methods store, before their rank truncation)

When the first-order errors are not well below the zeroth-order one, no Taylor expansion about the reference run
(any Hessian rank) can replay the orders: the displacement is outside the linear regime. Gradients are taken as the
step trains (training modes, the step's RNG state), like ``record_sensitivities``.

Usage::

    python benchmarks/linearization_validity.py --recording /tmp/lpl_order_bench/vit_lr0.001_T16_k256_r2_v8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from lpl.order import Recording
from lpl.order import quantities
from lpl.order.adjoint import _flat, _load, _StateCapture
from lpl.order.rng import as_in_training
from lpl.order.retraining import fit_in_order, rebuild
from lpl.utils.cli_args import positive_int
from lpl.utils.loss import module_loss

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
# recordings made by benchmarks/order_estimation.py name its digits task's classes under __main__
sys.path.insert(0, str(Path(__file__).parent))
from order_estimation import DigitsDataModule, DigitsMLP  # noqa: E402, F401 - found by rebuild() under __main__
from lpl.utils.errors import run_script


def retrained_states(recording: Recording, order: list[int]) -> tuple[_StateCapture, torch.nn.Module, object]:
    model, datamodule = rebuild(recording, order)
    capture = _StateCapture()
    fit_in_order(recording, model, datamodule, len(order), [capture], "cpu")
    return capture, model, datamodule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recording", required=True, help="a recording folder (made by order_estimation.py)")
    parser.add_argument("--orders", type=positive_int, default=3, help="random orders retrained")
    parser.add_argument("--points", type=positive_int, default=8, help="steps sampled per order")
    args = parser.parse_args()
    if not Path(args.recording).is_dir():
        parser.error(f"--recording {args.recording!r}: no such folder (a recording made by order_estimation.py)")
    torch.set_num_threads(2)
    recording = Recording.open(args.recording)
    reference = list(recording.order)
    steps, num_batches = len(reference), len(recording.batches)
    ref_states, model, datamodule = retrained_states(recording, reference)
    params = [p for p in model.parameters() if p.requires_grad]
    collate = datamodule.train_dataloader().collate_fn
    pool = [collate([datamodule.train_set[i] for i in batch]) for batch in recording.batches]
    model.eval()

    def gradient(theta: torch.Tensor, batch: int, step: int, graph: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        _load(theta, params)
        with as_in_training(model, ref_states.modes, ref_states.rng[step]), torch.enable_grad():
            _, grads = quantities.loss_and_gradients(lambda: module_loss(model, pool[batch]), params, graph)
        return _flat(grads), grads

    generator = torch.Generator().manual_seed(0)
    sampled = sorted(set(np.linspace(1, steps - 1, args.points).round().astype(int).tolist()))
    rows = []
    for _ in range(args.orders):
        order = torch.randperm(num_batches, generator=generator)[:steps].tolist()
        states, _, _ = retrained_states(recording, order)
        for s in sampled:
            theta, gamma = ref_states.theta[s], states.theta[s]
            displacement, batch = gamma - theta, order[s]
            true = gradient(gamma, batch, s, False)[0]
            at_reference, own = gradient(theta, batch, s, True)
            own_first = at_reference + quantities.hessian_vector_product(own, params)(displacement)
            _, reference_graph = gradient(theta, reference[s], s, True)
            ref_first = at_reference + quantities.hessian_vector_product(reference_graph, params)(displacement)
            norm = true.norm()
            rows.append((s, float(displacement.norm() / (ref_states.theta[-1] - ref_states.theta[0]).norm()),
                         float((true - at_reference).norm() / norm), float((true - own_first).norm() / norm),
                         float((true - ref_first).norm() / norm)))
    table = np.array(rows)
    print(f"recording {args.recording}: T = {steps}, {args.orders} random orders retrained, "
          f"{len(params)} parameter tensors")
    print("| step | |Delta_s| / |theta_T - theta_0| | zeroth order | first order, own Hessian | "
          "first order, reference batch's Hessian |")
    print("|---|---|---|---|---|")
    for s in sampled:
        mean = table[table[:, 0] == s].mean(0)
        print(f"| {s} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {mean[4]:.3f} |")
    mean = table.mean(0)
    print(f"| mean | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | {mean[4]:.3f} |")


if __name__ == "__main__":
    run_script(main)
