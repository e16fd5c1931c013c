"""Run by test_ddp.py: BlockPruneCallback under Trainer(devices=2, strategy="ddp") on CPU (gloo).

Each rank writes its masks and its reduced calibration statistics to OUT/rank{r}.safetensors; then rank 0 alone prunes
another model inside single_process() (OUT/alone). With a second argument "grouped" every layer is calibrated in a
pass of its own (GRAM_BYTES_PER_PASS = 0).
"""

import json
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import lpl.prune.api
from lpl.data.mnist import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.prune import BlockPruneCallback, prune_model
from lpl.prune.importance import collect_statistics
from lpl.utils.loss import module_loss
from lpl.utils.trainer import single_process


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    return [{"image": torch.randn(4, 1, 28, 28, generator=generator),
             "label": torch.randint(0, 10, (4,), generator=generator)} for _ in range(2)]


def tiny_classifier() -> ViTClassifier:
    return ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                         num_heads=2, schedule="constant")


class RecordStatistics(Callback):
    """Calibration statistics of each rank's own batches, reduced across ranks by collect_statistics."""

    def __init__(self, prune: BlockPruneCallback, out: str) -> None:
        self.prune, self.out = prune, out

    def on_fit_end(self, trainer, pl_module):
        rank = dist.get_rank()
        batches = rank_batches(rank)
        layer = pl_module.model.blocks[0].mlp.fc1
        stats = collect_statistics(pl_module, {"fc1": layer}, batches, (8, 8), module_loss)["fc1"]
        tensors = {f"mask/{n}": m.to(torch.uint8) for n, m in self.prune.result.block_masks.items()}
        tensors.update(first=stats.first, gram=stats.gram, grad_sq_mean=stats.grad_sq_mean)
        tensors.update({f"state/{k}": v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        save_file(tensors, f"{self.out}/rank{rank}.safetensors")


def evaluate_with_distributed_samplers(out: str) -> None:
    """Loaders passed to fit under Lightning's distributed samplers (each rank validates its half): every rank writes
    the figures BlockPruneCallback measured, and rank 0 the fine-tuned weights."""
    data = MNIST5kDataModule(batch_size=16, val_size=100)
    data.setup("fit")
    model = tiny_classifier()
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, result_path=f"{out}/result")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
                        num_sanity_val_steps=0, enable_checkpointing=False, callbacks=[prune], default_root_dir=out)
    trainer.fit(model, DataLoader(data.train_set, batch_size=16), DataLoader(data.val_set, batch_size=25))
    with open(f"{out}/metrics{trainer.global_rank}.json", "w") as handle:
        json.dump(prune.metrics, handle)
    if trainer.global_rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/final.safetensors")


if __name__ == "__main__":
    out = sys.argv[1]
    if sys.argv[2:] == ["evaluate"]:
        torch.set_num_threads(1)
        L.seed_everything(0)
        evaluate_with_distributed_samplers(out)
        sys.exit(0)
    if sys.argv[2:] == ["grouped"]:
        lpl.prune.api.GRAM_BYTES_PER_PASS = 0
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = tiny_classifier()
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False,
                               result_path=f"{out}/result")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[prune, RecordStatistics(prune, out)], default_root_dir=out)
    trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=16, val_size=100))
    if trainer.global_rank == 0:  # one process alone, with the process group still initialised: no collective
        torch.manual_seed(0)
        with single_process():
            alone = prune_model(tiny_classifier(), rank_batches(0), block_size=(8, 8), flops_keep=0.5)
        alone.save(f"{out}/alone")
