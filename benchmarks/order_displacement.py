"""Where the order estimate goes wrong: estimated vs true end displacement on the digits task, in full space.

Records the digits task of benchmarks/order_estimation.py with an identity projection (so the replay's displacement
is the full-space gamma_T - theta_T it models), retrains the reference and a few random orders to get their true
final weights, and reports per method: cosine and norm ratio of estimated vs true displacement, the mean of the
linear loss term g.Delta (estimated and true) and their correlation across orders.

    python benchmarks/order_displacement.py --lr 0.003 --curvature-rank 8
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lpl.order.estimator import replay_data_from_recording
from lpl.order.replay import replay
from lpl.order.retraining import rebuild
from lpl.order.store import Recording
from lpl.utils.loss import module_loss
from lpl.utils.errors import run_script

_spec = importlib.util.spec_from_file_location("lpl_order_benchmark", Path(__file__).with_name("order_estimation.py"))
bench = importlib.util.module_from_spec(_spec)  # the digits task, its recorder and its orders
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def final_weights(recording: Recording, order: list[int], steps: int) -> tuple[torch.Tensor, float]:
    """Train the recorded model in ``order``; its flat trainable weights and validation loss at the end."""
    model, datamodule = rebuild(recording, order)
    L.seed_everything(0, verbose=False)
    datamodule.setup("fit")
    L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              use_distributed_sampler=False).fit(model, datamodule=datamodule)
    model.eval()
    batches = list(datamodule.val_dataloader())
    with torch.no_grad():
        loss = (sum(float(module_loss(model, b)) * len(b["index"]) for b in batches)
                / sum(len(b["index"]) for b in batches))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--curvature-rank", type=int, default=2)
    parser.add_argument("--orders", type=int, default=6, help="random orders (plus reversed and easy-first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "rec"
        bench.record(path, "digits", args.lr, args.steps, None, args.curvature_rank, True, 0)
        recording = Recording.open(path)
        _, orders = bench.make_orders(path, args.orders, seed=1234)
        theta, reference_loss = final_weights(recording, recording.order, args.steps)
        truths = [final_weights(recording, order.tolist(), args.steps) for order in orders]
        data = replay_data_from_recording(recording)
    val_grad = data.val_grad[-1].float()
    true_delta = torch.stack([w - theta for w, _ in truths])
    true_linear = (true_delta @ val_grad).numpy()
    true_change = np.array([loss - reference_loss for _, loss in truths])
    print(f"digits lr {args.lr}, T {args.steps}, curvature rank {args.curvature_rank}, {len(orders)} orders: "
          f"true loss change mean {true_change.mean():+.4f}, true g.Delta mean {true_linear.mean():+.4f}, "
          f"corr(true g.Delta, true change) {np.corrcoef(true_linear, true_change)[0, 1]:.2f}")
    print("| method | cosine | norm ratio | estimated g.Delta mean | corr(estimated, true g.Delta) |")
    print("|---|---|---|---|---|")
    for method in ("zeroth_order", "first_order", "adam", "adam_first_order"):
        delta = replay(data, orders, method=method, quadratic=False).displacement
        cosine = torch.nn.functional.cosine_similarity(delta, true_delta, dim=1).mean()
        ratio = (delta.norm(dim=1) / true_delta.norm(dim=1)).mean()
        linear = (delta @ val_grad).numpy()
        print(f"| {method} | {cosine:.2f} | {ratio:.2f} | {linear.mean():+.4f} | "
              f"{np.corrcoef(linear, true_linear)[0, 1]:.2f} |")


if __name__ == "__main__":
    run_script(main)
