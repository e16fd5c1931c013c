"""Wall time of ``lpl.prune.prune_model`` (taylor2 + hardware allocation, the BlockPruneCallback default).

Times the whole call: calibration forward/backward passes with per-sample block statistics, curves, allocation,
for ``--stages`` rounds. Timing does not depend on the pixel values, so calibration images are random (seeded) with
random labels and the weights are timm's random init; the task loss (cross-entropy) is used, as in the callback.
Each model is timed ``--repeats`` times after one untimed warm-up call on two batches (CUDA/cuBLAS start-up). Results
go to prune_time_<device>.md in the folder ``--out`` (default benchmarks/results/).

    python benchmarks/prune_time.py --models demo_vit --device cpu --threads 2      # the demo ViT, 2 CPU cores
    python benchmarks/prune_time.py --models deit_s deit_b --device cuda            # LPViT settings on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from lpl.models import ViTClassifier
from lpl.prune import prune_model
from lpl.utils.cli_args import device_argument, output_dir, positive_int, unit_fraction
from lpl.utils.io import atomic_write_text
from lpl.utils.errors import run_script

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lpl_kernel_benchmark", _HERE / "kernels.py")
bench = importlib.util.module_from_spec(_spec)  # for device_slug, shared by every benchmark's file names
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

RESULTS = _HERE / "results"
# name -> (ViTClassifier arguments, block size, image shape, calibration batch size)
MODELS = {
    "demo_vit": (dict(model_name="vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
                      embed_dim=128, depth=4, num_heads=4, model_kwargs=dict(global_pool="avg", class_token=False)),
                 16, (1, 28, 28), 32),
    "deit_s": (dict(model_name="deit_small_patch16_224", num_classes=1000), 16, (3, 224, 224), 64),
    "deit_b": (dict(model_name="deit_base_patch16_224", num_classes=1000), 32, (3, 224, 224), 64),
}


def calibration_batches(count: int, batch: int, shape: tuple[int, ...], classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(batch, *shape, generator=generator).to(device),
             "label": torch.randint(0, classes, (batch,), generator=generator).to(device),
             "index": torch.arange(i * batch, (i + 1) * batch, device=device)} for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, args, device: torch.device) -> dict:
    kwargs, block, shape, batch = MODELS[name]
    batch = args.batch_size or batch
    torch.manual_seed(0)
    model = ViTClassifier(**kwargs).to(device)
    batches = calibration_batches(args.calib_batches, batch, shape, kwargs["num_classes"], device)
    options = dict(block_size=(block, block), flops_keep=args.flops_keep, importance="taylor2",
                   allocation="hardware", include=["*.qkv", "*.proj", "*.fc1", "*.fc2"], stages=args.stages)
    prune_model(model, batches[:2], **options)  # warm-up: kernels, allocator, cuBLAS handles
    seconds = []
    for _ in range(args.repeats):
        sync(device)
        started = time.perf_counter()
        result = prune_model(model, batches, **options)
        sync(device)
        seconds.append(time.perf_counter() - started)
    return dict(model=name, block=block, images=len(batches) * batch, seconds=statistics.median(seconds),
                spread=max(seconds) - min(seconds), flops_keep=result.flops_keep,
                speedup=result.predicted_speedup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo_vit"], choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--calib-batches", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="calibration batch size (default per model)")
    parser.add_argument("--flops-keep", type=unit_fraction, default=0.5, help="fraction of the FLOPs kept, in (0, 1]")
    parser.add_argument("--stages", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", type=output_dir, default=RESULTS,
                        help="output FOLDER (created if missing); the table goes to prune_time_<device>.md in it "
                             "(default: benchmarks/results)")
    args = parser.parse_args()
    device = device_argument(parser, args.device)
    try:  # the folder exists before the timing, so the table cannot be lost at the end
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {str(args.out)!r}: cannot create the folder ({error.strerror or error})")
    if args.threads:
        torch.set_num_threads(args.threads)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    rows = []
    for name in args.models:
        row = time_model(name, args, device)
        rows.append(row)
        print(f"{name}: {row['seconds']:.1f} s (spread {row['spread']:.1f} s) for {row['images']} calibration images, "
              f"kept {row['flops_keep']:.3f} of FLOPs, predicted speedup {row['speedup']:.2f}x", flush=True)
    lines = [f"# prune_model wall time on {label}", "",
             f"taylor2 + hardware allocation, {args.stages} calibration rounds, flops_keep {args.flops_keep}, "
             f"{args.calib_batches} calibration batches, median of {args.repeats} after a warm-up; torch "
             f"{torch.__version__}.", "",
             "| model | block | calibration images | seconds (median) | spread | FLOPs kept | predicted speedup |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['block']}x{r['block']} | {r['images']} | {r['seconds']:.1f} | {r['spread']:.1f} | "
              f"{r['flops_keep']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    path = args.out / f"prune_time_{bench.device_slug(device)}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    run_script(main)
