"""Speed of the linearised Adam replay (``lpl.order.linearized``) on synthetic data of a given size.

Times ``replay_linearized`` for one order and batched over many, for several chunk sizes, along each path side by
side in one run (``--paths``): ``compiled`` (the C kernel ``lpl.kernels.cpu.adam_replay_cpu``, CPU float32; chunk
sizes set ``KERNEL_CHUNK_ELEMENTS``), ``compiled-bf16`` (the same with the d-sized rows in bfloat16, as
``OrderEstimator`` holds a recording's data when the kernel runs), ``fused`` (torch ops with torch's fused Adam
kernel) and ``eager`` (torch ops only; chunk sizes set ``CHUNK_ELEMENTS``, on a GPU ``CUDA_CHUNK_ELEMENTS``). The
data are random (speed does not depend on the values); the default size is the demo LM's (123,200 parameters, T = 64
steps, 64 pool batches, Hessian rank 16).

With ``--retrain-demo-lm`` it also records the demo LM itself (T steps on the same device, a small projection: only
its retraining is timed) and retrains a few random orders of it, so the speed-up over retraining is measured side by
side in the same run (the issue's criterion: per order, estimate vs retrain).

Usage::

    python benchmarks/linearized_replay_speed.py
    python benchmarks/linearized_replay_speed.py --retrain-demo-lm --chunks 20,22 --paths compiled,fused
    python benchmarks/linearized_replay_speed.py --params 19658 --orders 256 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import lpl.order.linearized as linearized
from lpl.kernels.cpu.adam_replay import NARROW_INPUTS
from lpl.utils.cli_args import comma_separated, device_argument, non_negative_int, positive_int
from lpl.utils.errors import run_script

PATHS = ("compiled", "compiled-bf16", "fused", "eager")


def synthetic_run(steps: int, batches: int, params: int, rank: int, device: str) -> linearized.LinearizedRun:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    return linearized.LinearizedRun(
        pool_grads=randn(steps + 1, batches, params, scale=1e-3), pool_losses=randn(steps + 1, batches).abs(),
        hessian_vectors=randn(steps, rank, params, scale=params ** -0.5), hessian_values=randn(steps, rank).abs(),
        reference_updates=randn(steps, params, scale=0.1), val_losses=randn(steps + 1).abs(),
        val_grads=randn(steps + 1, params, scale=1e-3), val_directions=randn(8, params, scale=params ** -0.5),
        val_curvature=randn(8).abs(), lr=torch.full((steps,), 3e-3, device=device), betas=(0.9, 0.999), eps=1e-8,
        weight_decay=0.01, decoupled=True,
    )


def seconds(run: linearized.LinearizedRun, orders: torch.Tensor, repeats: int) -> float:
    linearized.replay_linearized(run, orders[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if orders.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        linearized.replay_linearized(run, orders)
        if orders.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def demo_lm_retrain_seconds(steps: int, device: str, orders: int = 3) -> tuple[float, int, int]:
    """Record the demo LM (benchmarks/order_estimation.py's task "lm") for ``steps`` steps on ``device`` and time
    ``retrain`` of ``orders`` random orders there; returns (mean seconds per retrain, parameters, pool batches)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from order_estimation import build_task, quiet_trainer

    from lpl.order import Recording, TrainOrderRecorder, retrain

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "rec"
        L.seed_everything(0, verbose=False)
        model, datamodule = build_task("lm", 0.003, steps)
        recorder = TrainOrderRecorder(path, proj_dim=16, curvature_rank=0)
        quiet_trainer(steps, callbacks=[recorder], accelerator=accelerator).fit(model, datamodule=datamodule)
        recording = Recording.open(path)
        reference = torch.tensor(recording.order)
        generator = torch.Generator().manual_seed(0)
        retrain(recording, reference.tolist(), curve_every_n_steps=steps, accelerator=accelerator)  # warm-up
        start = time.perf_counter()
        for _ in range(orders):
            order = reference[torch.randperm(len(reference), generator=generator)]
            retrain(recording, order.tolist(), curve_every_n_steps=steps, accelerator=accelerator)
        seconds = (time.perf_counter() - start) / orders
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return seconds, params, len(recording.batches)


def ratio(retrain_s: float | None, estimate_s: float) -> str:
    return "" if retrain_s is None else f" ({retrain_s / estimate_s:.0f}x faster than retraining)"


def chunk_list(text: str) -> list[int]:
    """An argparse ``type`` for --chunks: comma-separated log2 chunk sizes (whole numbers 0-40)."""
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers (log2 of chunk sizes).") from None
    if not all(0 <= v <= 40 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each log2 chunk size must be in 0..40.")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=positive_int, default=123_200)
    parser.add_argument("--steps", type=positive_int, default=64)
    parser.add_argument("--batches", type=positive_int, default=64)
    parser.add_argument("--rank", type=non_negative_int, default=16)
    parser.add_argument("--orders", type=positive_int, default=128, help="orders in the batched measurement")
    parser.add_argument("--chunks", type=chunk_list, default="18,20,22,24",
                        help="log2 of the chunk sizes to compare (comma-separated)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda needs a GPU)")
    parser.add_argument("--paths", type=comma_separated(PATHS, "path"), default="compiled,compiled-bf16,fused,eager",
                        help="replay paths to compare: compiled, compiled-bf16 (C kernel, CPU), fused, "
                             "eager (torch ops)")
    parser.add_argument("--retrain-demo-lm", action="store_true",
                        help="also record and retrain the demo LM at --steps on --device; sets --params/--batches")
    args = parser.parse_args()
    device_argument(parser, args.device)
    retrain_s = None
    if args.retrain_demo_lm:
        retrain_s, args.params, args.batches = demo_lm_retrain_seconds(args.steps, args.device)
        print(f"demo LM, T = {args.steps}, {args.device}: retrain {retrain_s:.2f} s/order (mean of 3 random orders)")
    run = synthetic_run(args.steps, args.batches, args.params, args.rank, args.device)
    generator = torch.Generator().manual_seed(1)
    orders = torch.stack([torch.randperm(args.batches, generator=generator) for _ in range(args.orders)])
    orders = orders.to(args.device)
    print(f"d = {args.params}, T = {args.steps}, {args.batches} batches, rank {args.rank}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    fused_adam = dict(linearized._FUSED_ADAM)
    paths = args.paths
    # the run each path replays: the bfloat16 rows are made only where the kernel could read them
    runs = dict.fromkeys(("compiled", "fused", "eager"), run)
    if "compiled-bf16" in paths and args.device == "cpu":
        narrow = {name: getattr(run, name).bfloat16() for name in NARROW_INPUTS if getattr(run, name) is not None}
        runs["compiled-bf16"] = dataclasses.replace(run, **narrow)
    for path in paths:
        if path.startswith("compiled"):
            os.environ.pop("LPL_CPU_KERNEL", None)
            if path not in runs or not linearized._compiled_kernel_applies(runs[path], torch.float32):
                print(f"{path}: not available here (CPU data and a C compiler needed)")
                continue
            chunk_name = "KERNEL_CHUNK_ELEMENTS"
        else:
            os.environ["LPL_CPU_KERNEL"] = "torch"
            if path == "fused" and fused_adam[run.decoupled] is None:
                print("fused: this torch has no fused Adam kernel")
                continue
            linearized._FUSED_ADAM.update(fused_adam if path == "fused" else {True: None, False: None})
            chunk_name = "CUDA_CHUNK_ELEMENTS" if orders.is_cuda else "CHUNK_ELEMENTS"
        path_run = runs[path]
        single = seconds(path_run, orders[:1], args.repeats)
        print(f"[{path}] one order: {single * 1e3:.1f} ms{ratio(retrain_s, single)}")
        for log2 in args.chunks:
            setattr(linearized, chunk_name, 1 << log2)
            per_order = seconds(path_run, orders, args.repeats) / len(orders)
            print(f"[{path}] batched over {len(orders)} orders, {chunk_name} = 2^{log2} "
                  f"({max(1, (1 << log2) // args.params)} orders per chunk): {per_order * 1e3:.1f} ms/order"
                  f"{ratio(retrain_s, per_order)}")


if __name__ == "__main__":
    run_script(main)
