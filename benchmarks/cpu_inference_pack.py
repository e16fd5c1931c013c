"""Exported block-sparse layers at CPU inference: dense nn.Linear vs BlockSparseLinear vs the same layer after
``pack_for_inference()`` (the weight laid out once instead of at every call), one token and 197 tokens.

Ratios are measured side by side in one run (interleaved rounds, medians of per-round timings): below 1 is faster
than dense.

Usage::

    python benchmarks/cpu_inference_pack.py [--threads 1] [--density 0.5] [--block 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpl.kernels import BlockSparseLinear  # noqa: E402
from lpl.utils.cli_args import output_file, positive_int, unit_fraction  # noqa: E402
from lpl.utils.errors import run_script  # noqa: E402
from lpl.utils.io import atomic_write_text  # noqa: E402

SHAPES = [(768, 192), (3072, 768), (4096, 1024)]  # ViT-Tiny fc1, DeiT-B fc1, ViT-L fc1 (out, in)


def layers(out_features: int, in_features: int, block: int, density: float) -> tuple[nn.Linear, BlockSparseLinear]:
    """A dense Linear holding the block-masked weight, and the block-sparse layer exported from it."""
    generator = torch.Generator().manual_seed(0)
    grid = (-(-out_features // block), -(-in_features // block))
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=generator)[: round(density * mask.numel())]] = True
    mask = mask.view(grid)
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.mul_(mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_features, :in_features])
    return dense.eval(), BlockSparseLinear.from_linear(dense, mask, block).eval()


def seconds_per_call(fn, min_seconds: float = 0.03) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--density", type=unit_fraction, default=0.5, help="fraction of blocks kept, in (0, 1]")
    parser.add_argument("--block", type=positive_int, default=16, help="block size (square blocks)")
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--out", type=output_file, default=None,
                        help="also write the table to this FILE (markdown; its folder is created if missing); "
                             "default: print only")
    args = parser.parse_args()
    if args.out is not None:
        try:  # the folder exists before the timing, so the table cannot be lost at the end
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--out {str(args.out)!r}: cannot create its folder ({error.strerror or error})")
    torch.set_num_threads(args.threads)
    lines = [f"# CPU inference, {args.threads} thread(s), density {args.density}, {args.block}x{args.block} blocks",
             "", "| layer (out x in) | tokens | dense us | block-sparse / dense | packed / dense |",
             "|---|---|---|---|---|"]
    for out_features, in_features in SHAPES:
        dense, sparse = layers(out_features, in_features, args.block, args.density)
        packed = copy.deepcopy(sparse).pack_for_inference()
        for tokens in (1, 197):
            x = torch.randn(tokens, in_features)
            calls = {"dense": lambda: dense(x), "sparse": lambda: sparse(x), "packed": lambda: packed(x)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            with torch.inference_mode():
                for number in range(args.rounds):
                    for name in list(calls) if number % 2 else list(calls)[::-1]:
                        times[name].append(seconds_per_call(calls[name]))
            median = {name: statistics.median(values) for name, values in times.items()}
            lines.append(f"| {out_features} x {in_features} | {tokens} | {median['dense'] * 1e6:.0f} | "
                         f"{median['sparse'] / median['dense']:.2f}x | {median['packed'] / median['dense']:.2f}x |")
            print(lines[-1], flush=True)
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_script(main)
