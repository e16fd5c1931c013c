"""The order tools on timm models no test names: record, add the sensitivity data, score every method.

For each ``--models`` name (any timm model that takes 28x28 one-channel images, e.g. the ``test_*`` models): train it
as ``lpl.models.ViTClassifier`` on MNIST-5k for ``--steps`` steps with ``TrainOrderRecorder``, add the full-space
data (``record_sensitivities``), retrain ``--orders`` random orders and score every method against them
(``check_methods``: Spearman, MAE as a multiple of "no change", each method also with the linear readout where it
has one). All on CPU; results go to benchmarks/results/order_heldout_models.md.

Usage::

    python benchmarks/order_heldout_models.py --models test_efficientnet_gn,test_resnet --steps 8 --lr 3e-4
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from lpl.data import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.order import Recording, TrainOrderRecorder, check_methods
from lpl.order.adjoint import record_sensitivities
from lpl.utils.cli_args import output_file
from lpl.utils.io import atomic_write_text
from lpl.utils.errors import run_script

RESULTS = Path(__file__).resolve().parent / "results"


def check_model(name: str, steps: int, lr: float, orders: int, workdir: Path) -> list[str]:
    path = workdir / name
    L.seed_everything(0, verbose=False)
    model = ViTClassifier(model_name=name, in_chans=1, num_classes=10, lr=lr, schedule="constant")
    start = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              callbacks=[TrainOrderRecorder(path, proj_dim=256)]).fit(model, datamodule=MNIST5kDataModule(batch_size=32,
                                                                                                         val_size=500))
    record_sensitivities(path, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    reference = torch.tensor(Recording.open(path).order)
    generator = torch.Generator().manual_seed(0)
    check = check_methods(path, torch.stack([reference[torch.randperm(len(reference), generator=generator)]
                                             for _ in range(orders)]))
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {time.perf_counter() - start:.0f} s, {params} parameters, no change MAE {check.no_change_mae:.4g}")
    return [f"| {name} | {params} | {check.no_change_mae:.4g} | {method} | {score.spearman:.2f} | "
            f"{check.mae_over_no_change(method):.2f}x |" for method, score in check.ranked()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="test_efficientnet_gn")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--orders", type=int, default=6)
    parser.add_argument("--out", type=output_file, default=str(RESULTS / "order_heldout_models.md"),
                        help="output FILE (markdown; its folder is created if missing; default: "
                             "benchmarks/results/order_heldout_models.md)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)  # before the work: the table cannot be lost at the end
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lines = [f"# Order tools on held-out timm models (MNIST-5k, T = {args.steps}, lr {args.lr}, "
             f"{args.orders} retrained orders, CPU)", "",
             f"Command: `python benchmarks/order_heldout_models.py --models {args.models} --steps "
             f"{args.steps} --lr {args.lr} --orders {args.orders}`", "",
             "| model | parameters | no change MAE | method | Spearman | MAE / no change |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            lines += check_model(name, args.steps, args.lr, args.orders, Path(workdir))
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"written {args.out}")


if __name__ == "__main__":
    run_script(main)
