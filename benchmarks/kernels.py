"""Block-sparse linear vs dense F.linear vs torch BSR (vs torchao where installed), side by side in one run.

Shapes are DeiT-S/B's Linear layers (qkv, proj, fc1, fc2) with tokens = batch x 197. Every row is measured in this
run on this machine; ratios > 1 mean faster than the peer. CUDA rows run the Triton kernel; CPU rows the CPU path
(kernels/cpu). The markdown table goes to benchmarks/results/kernels_<device>[_<preset>].md.

    python benchmarks/kernels.py --quick                 # CPU here: DeiT-B fc1/fc2 at 64x197 tokens, fp32
    python benchmarks/kernels.py --preset gpu-check      # the GPU subset run by benchmarks/gpu_check.sh
    python benchmarks/kernels.py                         # full sweep (GPU: hours of autotuning; CPU: very long)
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from lpl.utils import cli_args
from lpl.utils.errors import run_script

REPO = Path(__file__).resolve().parents[1]
LAYERS = {  # name -> (in_features, out_features)
    "deit_s": {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)},
    "deit_b": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
}
TOKENS_PER_IMAGE = 197
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Sweep:
    models: tuple[str, ...]
    layers: tuple[str, ...]
    batches: tuple[int, ...]
    densities: tuple[float, ...]
    block_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    bsr_densities: tuple[float, ...] | None = None  # torch BSR peer only at these densities (None: all)


FULL_GPU = Sweep(("deit_s", "deit_b"), ("qkv", "proj", "fc1", "fc2"), (1, 8, 64, 256), (1.0, 0.75, 0.5, 0.25, 0.1),
                 (16, 32, 64), ("bf16", "fp16", "fp32"))
FULL_CPU = Sweep(("deit_s", "deit_b"), ("qkv", "proj", "fc1", "fc2"), (1, 8, 64), (1.0, 0.75, 0.5, 0.25, 0.1),
                 (16, 32, 64), ("fp32",), (0.5,))
PRESETS = {
    # What gpu_check.sh runs (a few minutes on an H100 including autotuning): the goal shapes.
    "gpu-check": Sweep(("deit_b",), ("qkv", "proj", "fc1", "fc2"), (64,), (1.0, 0.75, 0.5, 0.25, 0.1), (32, 64),
                       ("bf16",)),
    # --quick on a GPU: goal shapes, fewer densities.
    "quick-gpu": Sweep(("deit_b",), ("fc1", "fc2"), (64,), (1.0, 0.5, 0.25), (32, 64), ("bf16",)),
    # --quick on CPU: the CPU goal shape (fc1 768->3072, 64x197 tokens, fp32) plus fc2.
    # torch BSR takes 1-2 minutes per call here, so it runs at 50% density only.
    "quick-cpu": Sweep(("deit_b",), ("fc1", "fc2"), (64,), (1.0, 0.5, 0.25), (32, 64), ("fp32",), (0.5,)),
}


def import_lpl_kernels():
    """``lpl.kernels``; from a plain checkout (package not installed) load the repo's kernels/ under that name."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import lpl.kernels as kernels
    except ModuleNotFoundError as error:
        if error.name != "lpl.kernels":
            raise
        import importlib.util

        import lpl

        spec = importlib.util.spec_from_file_location(
            "lpl.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["lpl.kernels"] = kernels
        spec.loader.exec_module(kernels)
        lpl.kernels = kernels
    return kernels


def device_slug(device: torch.device) -> str:
    """File-name-safe device name: 'nvidia-h100-80gb-hbm3', or 'cpu-<model>-<threads>t'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                name = next(line.split(":", 1)[1] for line in handle if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"cpu-{name}-{torch.get_num_threads()}t"
    keep = "".join(c if c.isalnum() else "-" for c in name.lower().replace("(r)", "").replace("(tm)", ""))
    return "-".join(part for part in keep.split("-") if part)


def cpu_path_name() -> str:
    """Which CPU implementation lpl.kernels dispatches to here."""
    import_lpl_kernels()
    from lpl.kernels.ops import _cpu_module

    return ("kernels/cpu (block_sparse_linear_cpu)" if _cpu_module() is not None
            else "plain-torch fallback in kernels/ops.py")


def environment_lines(device: torch.device, argv: list[str]) -> list[str]:
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `python {' '.join(argv)}`",
             f"- torch {torch.__version__}, python {platform.python_version()}"]
    if device.type == "cuda":
        import triton

        lines += [f"- device: {torch.cuda.get_device_name(device)}, triton {triton.__version__}, "
                  f"TF32 for fp32 matmul: {torch.backends.cuda.matmul.allow_tf32}"]
    else:
        lines += [f"- device: CPU ({device_slug(device)}), torch threads: {torch.get_num_threads()}, "
                  f"CPU path: {cpu_path_name()}"]
    return lines


def random_block_mask(grid: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly round(density x blocks) retained blocks, chosen uniformly at random."""
    total = grid[0] * grid[1]
    keep = min(total, max(1, round(density * total)))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:keep]] = True
    return mask.view(grid)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float) -> dict[str, float]:
    """Median milliseconds per call of each function, measured together.

    CUDA: CUDA-graph replays (see ``gpu_time_ms``). CPU: the functions run interleaved, round after round, so that
    load from other processes on the machine hits all of them alike; repeats adapt to ``budget_s``, and a function
    whose single call already exceeds ``budget_s`` (torch BSR on CPU) is timed once.
    """
    if device.type == "cuda":
        return {name: gpu_time_ms(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up (kept as the one sample of a call slower than the budget)
        start = time.perf_counter()
        fn()
        warmup_s = time.perf_counter() - start
        if warmup_s > budget_s:
            samples[name].append(warmup_s)
            continue
        start = time.perf_counter()
        fn()
        samples[name].append(time.perf_counter() - start)
    repeated = {name: fn for name, fn in fns.items() if samples[name][0] <= budget_s}
    round_s = sum(samples[name][0] for name in repeated)
    for _ in range(max(2, min(15, int(budget_s / max(round_s, 1e-6))))):
        for name, fn in repeated.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in samples.items()}


def gpu_time_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median GPU milliseconds per call. ``graph``: replay a captured CUDA graph (triton's do_bench_cudagraph), so
    that the time is the kernels' own and not Python launch overhead; falls back to eager events when the function
    cannot be captured. Eager: triton's do_bench (events around back-to-back calls)."""
    import triton.testing

    fn()  # autotuning and lazy initialisation happen before any capture
    torch.cuda.synchronize()
    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except (RuntimeError, TypeError) as error:  # an op that synchronises on the host; an older do_bench_cudagraph
            print(f"  CUDA graph capture failed ({str(error).splitlines()[0][:100]}): timing eagerly", flush=True)
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def torchao_linear(weight: torch.Tensor, block: int):
    """A torchao block-sparse Linear when torchao is installed and supports this case, else (None, reason)."""
    try:
        from torchao.sparsity import sparsify_
        from torchao.sparsity.sparse_api import BlockSparseWeightConfig
    except ImportError:
        return None, "not installed"
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    try:
        sparsify_(linear, BlockSparseWeightConfig(blocksize=block))
    except Exception as error:  # torchao supports only some dtypes/devices/blocks
        return None, f"unsupported ({type(error).__name__})"
    return linear, ""


def run(sweep: Sweep, device: torch.device, with_bsr: bool, budget_s: float, seed: int,
        on_row: Callable[[dict], None]) -> list[dict]:
    kernels = import_lpl_kernels()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for model in sweep.models:
        for layer in sweep.layers:
            in_f, out_f = LAYERS[model][layer]
            for batch in sweep.batches:
                tokens = batch * TOKENS_PER_IMAGE
                for dtype_name in sweep.dtypes:
                    dtype = DTYPES[dtype_name]
                    x = torch.randn(tokens, in_f, generator=generator).to(device, dtype)
                    weight = (torch.randn(out_f, in_f, generator=generator) / math.sqrt(in_f)).to(device, dtype)
                    for block in sweep.block_sizes:
                        grid = (-(-out_f // block), -(-in_f // block))
                        for density in sweep.densities:
                            mask = random_block_mask(grid, density, generator).to(device)
                            sparse = kernels.BlockSparseWeight.from_dense(weight, mask, block)
                            masked = sparse.to_dense()
                            ours = kernels.block_sparse_linear(x, sparse)
                            reference = F.linear(x.float(), masked.float())
                            rel_err = float((ours.float() - reference).norm() / reference.norm())
                            fns = {"dense": lambda: F.linear(x, weight),
                                   "ours": lambda: kernels.block_sparse_linear(x, sparse)}
                            if with_bsr and (sweep.bsr_densities is None or density in sweep.bsr_densities):
                                bsr = _bsr_weight(masked, block)
                                if bsr is not None:
                                    fns["bsr"] = lambda: F.linear(x, bsr)
                            ao, ao_note = torchao_linear(masked, block)
                            if ao is not None:
                                fns["ao"] = lambda: ao(x)
                            ms = time_side_by_side(fns, device, budget_s)
                            eager_ms = gpu_time_ms(fns["ours"], graph=False) if device.type == "cuda" else None
                            row = dict(model=model, layer=f"{layer} {in_f}->{out_f}", tokens=tokens, block=block,
                                       density=sparse.density, dtype=dtype_name, dense_ms=ms["dense"],
                                       ours_ms=ms["ours"], rel_err=rel_err, bsr_ms=ms.get("bsr"), ao_ms=ms.get("ao"),
                                       ao_note=ao_note, eager_ms=eager_ms)
                            rows.append(row)
                            on_row(row)
    return rows


def _bsr_weight(masked: torch.Tensor, block: int) -> torch.Tensor | None:
    """torch's BSR form of the masked weight, or None where this dtype/device has no BSR linear."""
    try:
        bsr = masked.to_sparse_bsr((block, block))
        F.linear(masked.new_zeros(1, masked.shape[1]), bsr)
    except (RuntimeError, NotImplementedError) as error:
        print(f"  torch BSR unavailable: {str(error).splitlines()[0][:120]}", flush=True)
        return None
    return bsr


HEADER = ("| model | layer | tokens | block | density | dtype | dense ms | ours ms | ours vs dense | "
          "BSR ms | ours vs BSR | BSR vs dense | torchao | ours eager ms | rel. err |")


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator is not None and denominator else "n/a"


def _format_row(row: dict) -> str:
    bsr = f"{row['bsr_ms']:.3f}" if row["bsr_ms"] is not None else "n/a"
    ao = f"{row['ao_ms']:.3f} ms" if row["ao_ms"] is not None else row["ao_note"]
    eager = f"{row['eager_ms']:.3f}" if row["eager_ms"] is not None else "n/a"
    return (f"| {row['model']} | {row['layer']} | {row['tokens']} | {row['block']} | {row['density']:.2f} | "
            f"{row['dtype']} | {row['dense_ms']:.3f} | {row['ours_ms']:.3f} | "
            f"{_ratio(row['dense_ms'], row['ours_ms'])} | "
            f"{bsr} | {_ratio(row['bsr_ms'], row['ours_ms'])} | {_ratio(row['dense_ms'], row['bsr_ms'])} | {ao} | "
            f"{eager} | {row['rel_err']:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is a GPU, else cpu)")
    parser.add_argument("--quick", action="store_true", help="a few minutes: the issue's goal shapes only")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named subset (overrides --quick)")
    parser.add_argument("--no-bsr", action="store_true", help="skip torch's BSR peer (very slow on CPU)")
    parser.add_argument("--budget-s", type=cli_args.positive_float, default=1.0,
                        help="CPU: seconds of repeats per measurement (above 0)")
    parser.add_argument("--seed", type=int, default=0)
    from lpl.utils.cli_args import output_dir

    parser.add_argument("--out", type=output_dir, default=str(Path(__file__).resolve().parent / "results"),
                        help="output FOLDER (created if missing); the table goes to "
                             "kernels_<device>[_<preset>].md in it (default: benchmarks/results)")
    args = parser.parse_args(argv)

    device = cli_args.device_argument(parser, args.device)
    preset = args.preset or (("quick-gpu" if device.type == "cuda" else "quick-cpu") if args.quick else None)
    sweep = PRESETS[preset] if preset else (FULL_GPU if device.type == "cuda" else FULL_CPU)
    lines = ["# Block-sparse linear kernels: ours vs dense vs torch BSR", ""]
    lines += environment_lines(device, sys.argv)
    lines += [
        "",
        "Ratios are measured side by side in this run (`x vs y` = time of y / time of x: above 1 means x is faster).",
        "CUDA: times are medians of CUDA-graph replays (kernel time without Python launch overhead) for every column; "
        "'ours eager' is the same call launched from Python. CPU: medians of interleaved rounds.",
        "Masks: random, exactly round(density x blocks) blocks kept; density counts true elements. fp32 on CUDA "
        "follows torch.backends.cuda.matmul.allow_tf32 on both sides.",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    print("\n".join(lines), flush=True)
    from lpl.utils.io import atomic_write_text

    path = Path(args.out) / (f"kernels_{device_slug(device)}" + (f"_{preset}" if preset else "") + ".md")

    def on_row(row: dict) -> None:  # the table is rewritten after every row: a cut-off run keeps what it measured
        lines.append(_format_row(row))
        print(lines[-1], flush=True)
        atomic_write_text(path, "\n".join(lines) + "\n")

    run(sweep, device, with_bsr=not args.no_bsr, budget_s=args.budget_s, seed=args.seed, on_row=on_row)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    run_script(main)
