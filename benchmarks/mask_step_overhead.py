"""What keeping block masks costs per optimizer step: ``optimizer.step()`` with ``apply_masks`` on and off.

A timm model (random init) gets random block masks at a given density on every Linear but the head; gradients are
set as the masks' gradient hooks leave them (zero in pruned blocks), and each optimizer steps the same model in
interleaved rounds with the masks applied (their pre-step state zeroing and post-step weight zeroing run) and
removed. Medians of the rounds, side by side in one run.

Usage::

    python benchmarks/mask_step_overhead.py --threads 1 --out benchmarks/results/mask_step_overhead_cpu-1t.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpl.prune import PruneResult, apply_masks  # noqa: E402
from lpl.prune.blocks import block_grid, expand_block_mask  # noqa: E402
from lpl.utils.cli_args import output_file, positive_int, unit_fraction  # noqa: E402
from lpl.utils.errors import run_script  # noqa: E402
from lpl.utils.io import atomic_write_text  # noqa: E402

OPTIMIZERS = {
    "AdamW (for-loop)": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=False),
    "AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
    "AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "SGD momentum": lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9),
}


def random_result(model: nn.Module, density: float, block: int, seed: int = 0) -> PruneResult:
    generator = torch.Generator().manual_seed(seed)
    masks, shapes = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "head" not in name:
            shapes[name] = tuple(module.weight.shape)
            masks[name] = torch.rand(block_grid(shapes[name], (block, block)), generator=generator) < density
    return PruneResult(block_masks=masks, block_size=(block, block), shapes=shapes, flops_keep=density,
                       target_flops_keep=density, predicted_speedup=1.0, predicted_energy_ratio=1.0)


def masked_gradients(model: nn.Module, result: PruneResult) -> dict[nn.Parameter, torch.Tensor]:
    """Random gradients, zero in pruned blocks as the masks' gradient hooks leave them."""
    grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}
    for name, mask in result.block_masks.items():
        weight = model.get_submodule(name).weight
        grads[weight].mul_(expand_block_mask(mask, tuple(weight.shape), result.block_size).to(weight.dtype))
    return grads


def step_seconds(optimizer: torch.optim.Optimizer, grads: dict, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        for param, grad in grads.items():
            param.grad = grad.clone()
        start = time.perf_counter()
        optimizer.step()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random init)")
    parser.add_argument("--density", type=unit_fraction, default=0.5, help="share of blocks kept")
    parser.add_argument("--block", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds, each on and off")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per round")
    parser.add_argument("--out", type=output_file, default=None, help="markdown FILE (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    result = random_result(model, args.density, args.block)
    masked = sum(model.get_submodule(n).weight.numel() for n in result.block_masks)
    grads = masked_gradients(model, result)
    lines = [f"# Optimizer step with and without block masks ({args.model}, random init)", "",
             f"`python benchmarks/mask_step_overhead.py {' '.join(sys.argv[1:])}`", "",
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {masked / 1e6:.1f}M of them in "
             f"{len(result.block_masks)} masked layers ({args.block}x{args.block} blocks, density {args.density}); "
             f"{args.threads} thread(s); medians of {args.rounds} x {args.steps} steps each way.", "",
             "| optimizer | with masks | without | overhead |", "|---|---|---|---|"]
    for label, make in OPTIMIZERS.items():
        optimizer = make(model.parameters())
        step_seconds(optimizer, grads, 2)  # state allocated
        on, off = [], []
        for _ in range(args.rounds):
            handle = apply_masks(model, result)
            on += step_seconds(optimizer, grads, args.steps)
            handle.remove()
            off += step_seconds(optimizer, grads, args.steps)
        with_masks, without = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        lines.append(f"| {label} | {with_masks:.1f} ms | {without:.1f} ms | {with_masks - without:+.1f} ms "
                     f"({with_masks / without:.2f}x) |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"written {args.out}")


if __name__ == "__main__":
    run_script(main)
