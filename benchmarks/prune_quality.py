"""Block-pruning quality on the demo ViT (timm ViT, embed 128, depth 4, patch 7) trained on MNIST-5k.

Rows: flops_keep in {0.7, 0.5, 0.35, 0.25} x {taylor2+hardware, taylor1+uniform, magnitude+uniform,
magnitude-global, OBD-global} with 16x16 blocks on qkv/proj/fc1/fc2, plus Lightning's ModelPruning (global
unstructured L1 at the same parameter count; accuracy only, no speedup). Columns: validation accuracy before and
after a short fine-tune (masks fixed, distillation from the dense model), predicted speedup of the pruned layers,
prune time. Also: Spearman correlation of the taylor2 predicted distortion with the real loss increase of each
pruned layer on calibration data.

    python benchmarks/prune_quality.py                       # full table -> benchmarks/results/prune_quality.md
    python benchmarks/prune_quality.py --keeps 0.5 --finetune-epochs 0   # quick look

The dense model is trained once with the configs/mnist_vit.yaml recipe (batch 32, 12 epochs, seed 0) and cached in
benchmarks/.cache/ (gitignored) under a name that hashes the recipe, so a cache from another recipe is never reused.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning

from lpl.data.mnist import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.prune import BlockPruneCallback, apply_masks, prune_model
from lpl.prune.curves import measure_layer_distortion
from lpl.utils.stats import rank_correlation
from lpl.utils.loss import module_loss
from lpl.utils.cli_args import non_negative_int, output_file, positive_int, unit_fraction
from lpl.utils.errors import run_script
from lpl.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parent
# The demo recipe of configs/mnist_vit.yaml (93.3% validation accuracy through `lpl fit`).
VIT = dict(model_name="vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
           embed_dim=128, depth=4, num_heads=4, model_kwargs={"global_pool": "avg", "class_token": False})
RECIPE = dict(lr=1e-3, weight_decay=0.05, warmup_steps=125, min_lr_ratio=0.01, schedule="cosine",
              label_smoothing=0.1)
TRAIN_BATCH = 32
CALIB_BATCH = 64


def cache_path(epochs: int) -> Path:
    # data_version: bumped whenever the training data a recipe sees changes, so older cached weights are not reused
    recipe = json.dumps(dict(VIT, **RECIPE, batch_size=TRAIN_BATCH, epochs=epochs, seed=0, data_version=2),
                        sort_keys=True)
    return ROOT / ".cache" / f"prune_demo_vit_{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.safetensors"
PATTERNS = ["*.qkv", "*.proj", "*.fc1", "*.fc2"]
METHODS = {
    "taylor2+hardware": dict(importance="taylor2", allocation="hardware", stages=2, first_order=False),
    "taylor2+hardware first-order": dict(importance="taylor2", allocation="hardware", stages=2, first_order=True),
    "taylor2+hardware 1 round first-order": dict(importance="taylor2", allocation="hardware", stages=1,
                                                 first_order=True),
    "taylor1+uniform": dict(importance="taylor1", allocation="uniform", stages=1),
    "magnitude+uniform": dict(importance="magnitude", allocation="uniform", stages=1),
    "magnitude-global": dict(importance="magnitude", allocation="global", stages=1),
    "OBD-global": dict(importance="obd", allocation="global", stages=1),
    "OBD-global 2 rounds": dict(importance="obd", allocation="global", stages=2),
}


def trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kwargs)


def dense_model(datamodule: MNIST5kDataModule, epochs: int) -> ViTClassifier:
    cache = cache_path(epochs)
    if cache.is_file():
        return ViTClassifier(**VIT, **RECIPE, pretrained_path=str(cache))
    L.seed_everything(0)
    model = ViTClassifier(**VIT, **RECIPE)
    started = time.perf_counter()
    trainer(epochs).fit(model, datamodule=datamodule)
    print(f"trained the dense ViT in {time.perf_counter() - started:.0f} s", flush=True)
    from lpl.utils.io import save_safetensors_atomic

    save_safetensors_atomic(model.model.state_dict(), cache)
    return model


@torch.no_grad()
def accuracy(model: ViTClassifier, datamodule: MNIST5kDataModule) -> float:
    model.eval()
    correct = total = 0
    for batch in datamodule.val_dataloader():
        correct += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
        total += len(batch["label"])
    return 100.0 * correct / total


def finetune(model: ViTClassifier, dense: ViTClassifier, datamodule, epochs: int, callbacks: list) -> None:
    model.hparams.lr, model.hparams.warmup_steps = 5e-4, 0
    model.set_teacher(copy.deepcopy(dense.model))
    L.seed_everything(1)
    trainer(epochs, callbacks=callbacks).fit(model, datamodule=datamodule)
    model.set_teacher(None)


def main() -> None:
    names = list(METHODS) + ["ModelPruning-L1"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=unit_fraction, nargs="+", default=[0.7, 0.5, 0.35, 0.25])
    parser.add_argument("--methods", nargs="+", default=names, choices=names, metavar="METHOD",
                        help=f"methods to compare (quote names with spaces), from: {', '.join(names)} "
                             "(default: all)")
    parser.add_argument("--train-epochs", type=positive_int, default=12)
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=2)
    parser.add_argument("--finetune-keeps", type=unit_fraction, nargs="*", default=None, help="default: all --keeps")
    parser.add_argument("--finetune-methods", nargs="*", default=None, choices=names, metavar="METHOD",
                        help="default: all --methods")
    parser.add_argument("--calib-batches", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=output_file, default=ROOT / "results" / "prune_quality.md",
                        help="output FILE (markdown, rewritten after every row; its folder is created if missing; "
                             "default: benchmarks/results/prune_quality.md)")
    args = parser.parse_args()
    try:  # the folder exists before the dense model trains, so the table cannot be lost at the end
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {str(args.out)!r}: cannot create its folder ({error.strerror or error})")
    torch.set_num_threads(args.threads)

    train_data = MNIST5kDataModule(batch_size=TRAIN_BATCH, seed=0)  # dense training and fine-tuning
    train_data.setup()
    datamodule = MNIST5kDataModule(batch_size=CALIB_BATCH, seed=0)  # calibration batches and validation
    datamodule.setup()
    dense = dense_model(train_data, args.train_epochs)
    dense_acc = accuracy(dense, datamodule)
    print(f"dense accuracy {dense_acc:.2f}%", flush=True)
    calib = []
    for batch in datamodule.train_dataloader():
        if len(calib) == args.calib_batches:
            break
        calib.append(batch)

    rows = []
    for keep in args.keeps:
        for method in args.methods:
            tune = args.finetune_epochs if ((args.finetune_keeps is None or keep in args.finetune_keeps) and
                                            (args.finetune_methods is None or method in args.finetune_methods)) else 0
            model = copy.deepcopy(dense)
            if method == "ModelPruning-L1":
                pruning = ModelPruning("l1_unstructured", amount=1.0 - keep, use_global_unstructured=True,
                                       parameters_to_prune=[(model.get_submodule(n), "weight")
                                                            for n, m in model.named_modules()
                                                            if n.endswith((".qkv", ".proj", ".fc1", ".fc2"))])
                started, cpu_started = time.perf_counter(), time.process_time()
                pruning.apply_pruning(1.0 - keep)
                seconds, speedup = time.perf_counter() - started, float("nan")
                cpu_seconds = time.process_time() - cpu_started
                before = accuracy(model, datamodule)
                if tune:
                    finetune(model, dense, train_data, tune, callbacks=[])
                after = accuracy(model, datamodule) if tune else float("nan")
                achieved = keep
            else:
                cpu_started = time.process_time()
                result = prune_model(model, calib, block_size=(16, 16), flops_keep=keep, include=PATTERNS,
                                     **METHODS[method])
                cpu_seconds = time.process_time() - cpu_started
                seconds, speedup, achieved = result.prune_seconds, result.predicted_speedup, result.flops_keep
                apply_masks(model, result)
                before = accuracy(model, datamodule)
                if tune:
                    finetune(model, dense, train_data, tune,
                             callbacks=[BlockPruneCallback(result=result, evaluate=False,
                                                           result_path=str(ROOT / ".cache" / "ft_result"))])
                after = accuracy(model, datamodule) if tune else float("nan")
            rows.append((keep, method, achieved, before, after, speedup, seconds, cpu_seconds))
            write_table(args, dense_acc, rows, None, partial=True)
            print(f"keep {keep:.2f} {method:18s} achieved {achieved:.4f} before {before:6.2f} after {after:6.2f} "
                  f"speedup {speedup:.2f} prune {seconds:.1f} s wall {cpu_seconds:.1f} s cpu", flush=True)

    correlation = None
    if "taylor2+hardware" in args.methods:
        result = prune_model(dense, calib, block_size=(16, 16), flops_keep=0.5, include=PATTERNS, stages=1,
                             first_order=True)
        correlation = curve_check(dense, calib[:8], result)
    print(write_table(args, dense_acc, rows, correlation, partial=False))


def write_table(args, dense_acc: float, rows: list, correlation, partial: bool) -> str:
    lines = [
        "# Block-pruning quality on the demo ViT (MNIST-5k)",
        "",
        f"Command: `python benchmarks/prune_quality.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, CPU. Model: timm ViT embed 128, depth 4, heads 4, patch 7, mean-pooled tokens (no "
        f"class token), trained with the configs/mnist_vit.yaml recipe ({args.train_epochs} epochs, batch "
        f"{TRAIN_BATCH}, AdamW lr 1e-3 wd 0.05, 125 warmup steps, cosine to 0.01, label smoothing 0.1, seed 0); "
        f"dense accuracy **{dense_acc:.2f}%** on the 1,000 validation images. 16x16 blocks on qkv/proj/fc1/fc2, "
        f"{args.calib_batches} calibration batches of {CALIB_BATCH} training images (task loss). Fine-tune: "
        f"{args.finetune_epochs} epochs (batch {TRAIN_BATCH}) AdamW lr 5e-4 cosine, soft distillation from the dense "
        f"model, masks fixed.",
        "",
        "| FLOPs kept (target) | method | achieved | acc before FT | acc after FT | predicted speedup | prune s (wall) "
        "| prune s (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for keep, method, achieved, before, after, speedup, seconds, cpu_seconds in sorted(rows, key=lambda r: -r[0]):
        after_text = "-" if after != after else f"{after:.2f}"  # NaN: not fine-tuned
        speed_text = "-" if speedup != speedup else f"{speedup:.2f}"
        lines.append(f"| {keep:.2f} | {method} | {achieved:.4f} | {before:.2f} | {after_text} | {speed_text} | "
                     f"{seconds:.1f} | {cpu_seconds:.1f} |")
    if correlation is not None:
        lines += ["", f"taylor2 predicted distortion vs real loss increase of the pruned layer (calibration data, "
                      f"6 points per layer, 16 layers): Spearman pooled {correlation[0]:.3f}, mean within-layer "
                      f"{correlation[1]:.3f}."]
    lines += ["", f"Load average while this ran: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine); "
                  "wall times are inflated by that, CPU times are the process's own.",
              "", "Predicted speedup: dense vs block-sparse latency of the pruned layers under the analytic CPU "
                  "cost model (lpl.prune.hardware.default_profile('cpu')), not a measurement. ModelPruning gives no "
                  "speedup (unstructured)."]
    if partial:
        lines.insert(1, "\n**Partial: the run was still going when this was written; "
                        "rows below are the finished ones.**")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    return "\n".join(lines)


def curve_check(model: ViTClassifier, calib: list, result) -> tuple[float, float]:
    """Spearman of predicted vs real loss increase: pooled over layers and points, and mean within layers."""
    predicted, real, within = [], [], []
    for name, curve in result.curves.items():
        layer = model.get_submodule(name)
        density = curve["density"]
        total = len(density) - 1
        points = sorted({max(1, round(total * f)) for f in (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)})
        order = curve["order"]
        grid = result.block_masks[name].shape
        masks = []
        for removed in points:
            keep = torch.ones(grid[0] * grid[1], dtype=torch.bool)
            keep[order[:removed]] = False
            masks.append(keep.reshape(grid))
        loss_up, _ = measure_layer_distortion(model, layer, masks, result.block_size, calib, module_loss)
        pred = curve["distortion"][points].float()
        predicted.append(pred)
        real.append(loss_up)
        within.append(rank_correlation(pred, loss_up))
    return rank_correlation(torch.cat(predicted), torch.cat(real)), sum(within) / len(within)


if __name__ == "__main__":
    run_script(main)
