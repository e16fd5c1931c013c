"""CPU block-sparse linear vs dense F.linear vs torch BSR, measured side by side in one run.

Shape: DeiT-B fc1 (x [64*197, 768] @ W^T, W [3072, 768]) by default; ``--layer fc2`` for 3072 -> 768, ``--quick``
for 8*197 tokens and fewer repeats. Densities {1.0, 0.5, 0.25} x square blocks {16, 32, 64}, fp32, the thread count
of ``--threads`` (default 2). Every round runs, per case, dense and ours back to back in alternating order, so each
ratio compares medians of measurements taken under the same machine load. Torch BSR (``F.linear(x, W_bsr)`` and
``W_bsr @ x.T``) is 3x-40x slower than dense, so it gets fewer repeats (``--bsr-reps``).

Writes a markdown table to benchmarks/results/cpu_block_sparse_<host-kind>.md (``--quick``: ..._quick.md).

    PYTHONPATH=. python benchmarks/cpu_block_sparse.py            # full, ~10-20 min on 2 cores
    PYTHONPATH=. python benchmarks/cpu_block_sparse.py --quick    # ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

try:
    from lpl.kernels.cpu import block_sparse_linear_cpu, compiled_kernel_available, grad_input_cpu, grad_values_cpu
except ImportError:  # not installed: use the repo's kernels/ (benchmarks/kernels.py would shadow it on sys.path)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    from kernels.cpu import block_sparse_linear_cpu, compiled_kernel_available, grad_input_cpu, grad_values_cpu

from lpl.utils.cli_args import output_file, positive_int, unit_fraction
from lpl.utils.io import atomic_write_text
from lpl.utils.errors import run_script

LAYERS = {"fc1": (3072, 768), "fc2": (768, 3072)}  # (out_features, in_features) of DeiT-B's MLP


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_kind() -> str:
    """A file-name-safe label of the CPU and its core count, e.g. 'amd-epyc-2cpu'."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    slug = re.sub(r"-(processor|cpu)$", "", slug)
    return f"{slug}-{os.cpu_count()}cpu"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def random_block_weight(out_features: int, in_features: int, block: int, density: float, seed: int):
    """A weight whose retained blocks are a uniformly random set of round(density * blocks) blocks."""
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_cols = -(-out_features // block), -(-in_features // block)
    keep = round(density * n_rows * n_cols)
    mask = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    mask[torch.randperm(n_rows * n_cols, generator=gen)[:keep]] = True
    mask = mask.view(n_rows, n_cols)
    dense = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    full_mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_features, :in_features]
    dense = dense * full_mask
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    positions = mask.nonzero()
    padded = F.pad(dense, (0, n_cols * block - in_features, 0, n_rows * block - out_features))
    grid = padded.view(n_rows, block, n_cols, block).permute(0, 2, 1, 3)
    values = grid[positions[:, 0], positions[:, 1]].contiguous()
    return dense, values, row_ptr, positions[:, 1].contiguous()


def density_text(density: float) -> str:
    """A kept fraction for the table: two decimals, or two significant digits below 0.01 (not a misleading 0.00)."""
    return f"{density:.2f}" if density >= 0.01 else f"{density:.2g}"


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is less sensitive to other jobs taking our cores."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def median_wall(samples: list[tuple[float, float]]) -> float:
    return statistics.median(wall for wall, _ in samples)


def median_cpu(samples: list[tuple[float, float]]) -> float:
    return statistics.median(cpu for _, cpu in samples)


def measure_pairs(ours: Callable, dense: Callable, reps: int, warmup: bool = True) -> tuple[list, list]:
    """Alternate ours and dense (order flips every round), after one warm-up each unless ``warmup`` is False."""
    if warmup:
        ours(), dense()
    ours_t, dense_t = [], []
    for rep in range(reps):
        if rep % 2:
            ours_t.append(timed(ours))
            dense_t.append(timed(dense))
        else:
            dense_t.append(timed(dense))
            ours_t.append(timed(ours))
    return ours_t, dense_t


def write_report(args, forward_rows: list[dict], backward_rows: list[dict], meta: dict, final: bool) -> None:
    """Write (and rewrite after every case, so a cut-off run keeps its rows) the markdown table."""
    load_after = load_average() if final else "(run in progress)"
    if final:
        print(f"# load average after: {load_after}")
    tokens, reps, bsr_reps, flops = meta["tokens"], meta["reps"], meta["bsr_reps"], meta["flops"]
    out_features, in_features = meta["out_features"], meta["in_features"]
    lines = [
        f"# CPU block-sparse linear, DeiT-B {args.layer} ({'quick' if args.quick else 'full'})",
        "",
        f"- command: `PYTHONPATH=. {meta['command']}`",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- host: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}; {args.threads} threads; fp32",
        f"- x [{tokens}, {in_features}], W [{out_features}, {in_features}]; random block masks "
        f"(uniform over blocks, exact density)",
        f"- load average (1/5/15 min) before: {meta['load_before']}; after: {load_after} "
        "(the machine is shared; every ratio pairs measurements taken back to back, medians of "
        f"{reps} rounds, torch BSR {bsr_reps} rounds; 'CPU time' compares process CPU seconds, which other "
        "jobs on the machine disturb less than wall time; 'out=' times both products into buffers reused across "
        "calls, without the page faults of a fresh result)",
        f"- compiled kernel: {'yes' if compiled_kernel_available() else 'NO (torch fallback timed)'}",
        "",
        "## Forward y = x W^T",
        "",
        "| block | density | ours ms | dense F.linear ms | dense GFLOP/s | speedup vs dense | same, CPU time "
        "| ours, out= ms | dense matmul(out=) ms | speedup, preallocated out "
        "| vs BSR F.linear | vs BSR @ x.T | BSR F.linear / dense | BSR @ x.T / dense | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in forward_rows:
        bsr_cells = (
            [f"{r['bsr_linear'] / r['ours']:.1f}x", f"{r['bsr_matmul'] / r['ours']:.1f}x",
             f"{r['bsr_dense'] / r['bsr_linear']:.2f}x", f"{r['bsr_dense'] / r['bsr_matmul']:.2f}x"]
            if "bsr_linear" in r else ["-"] * 4
        )  # fmt: skip
        lines.append(
            f"| {r['block']} | {density_text(r['density'])} | {r['ours'] * 1e3:.1f} | {r['dense'] * 1e3:.1f} | "
            f"{flops / r['dense'] / 1e9:.1f} | **{r['dense'] / r['ours']:.2f}x** | {r['cpu_speedup']:.2f}x | "
            f"{r['pre_ours'] * 1e3:.1f} | {r['pre_dense'] * 1e3:.1f} | {r['pre_dense'] / r['pre_ours']:.2f}x | "
            + " | ".join(bsr_cells)
            + f" | {r['error']:.1e} |"
        )
    if backward_rows:
        lines += [
            "",
            "## Backward pieces",
            "",
            "| block | density | dX ours ms | dX dense (dY @ W) ms | dX speedup | dW ours ms | dW dense (dY^T @ X) ms "
            "| dW speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in backward_rows:
            lines.append(
                f"| {b['block']} | {density_text(b['density'])} | {b['gi'] * 1e3:.1f} | {b['gi_dense'] * 1e3:.1f} | "
                f"{b['gi_dense'] / b['gi']:.2f}x | {b['gv'] * 1e3:.1f} | {b['gv_dense'] * 1e3:.1f} | "
                f"{b['gv_dense'] / b['gv']:.2f}x |"
            )
    default_name = f"cpu_block_sparse_{host_kind()}{'_quick' if args.quick else ''}"
    if args.layer != "fc1":
        default_name += f"_{args.layer}"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{default_name}.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    if final:
        print(f"wrote {out}")


def comma_list(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse ``type`` for a comma-separated list whose items each pass ``item`` (an argparse type)."""
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {what}, e.g. "
                                             f"{'64,32,16' if item is positive_int else '0.5,0.25,1.0'}.")
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as error:
                raise argparse.ArgumentTypeError(str(error) if len(parts) == 1 else f"{part!r} in {text!r}: {error}")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, every value checked (before any work): counts at least 1, densities in (0, 1], and every
    (block, density) pair keeping at least one block of the layer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8*197 tokens, fewer repeats")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="fc1")
    parser.add_argument("--tokens", type=positive_int, default=None, help="rows of x (default 64*197, quick 8*197)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--reps", type=positive_int, default=None, help="rounds per case (default 9, quick 5)")
    parser.add_argument("--bsr-reps", type=positive_int, default=None,
                        help="rounds for torch BSR (default 2, quick 1)")
    parser.add_argument("--no-bsr", action="store_true", help="skip torch BSR")
    parser.add_argument("--no-backward", action="store_true", help="skip the backward pieces")
    parser.add_argument("--blocks", type=comma_list(positive_int, "block sides (whole numbers >= 1)"),
                        default=[64, 32, 16], help="square block sides, comma-separated (default 64,32,16)")
    parser.add_argument("--densities", type=comma_list(unit_fraction, "densities in (0, 1]"),
                        default=[0.5, 0.25, 1.0], help="kept fractions of the blocks, in (0, 1], comma-separated "
                                                       "(default 0.5,0.25,1.0)")
    parser.add_argument("--out", type=output_file, default=None,
                        help="output FILE (markdown; default: benchmarks/results/cpu_block_sparse_<host>[_quick]"
                             "[_<layer>].md)")
    args = parser.parse_args(argv)
    out_features, in_features = LAYERS[args.layer]
    for block in args.blocks:
        total = -(-out_features // block) * -(-in_features // block)
        for density in args.densities:
            if round(density * total) < 1:
                parser.error(f"--densities {density} keeps no block of the {args.layer} layer "
                             f"({out_features}x{in_features}) at --blocks {block} ({total} blocks): use a density "
                             f"of at least {1 / total:.2g} or smaller blocks.")
    # None means the default (explicitly: a 0 given on the command line is refused above, not taken as "default")
    if args.tokens is None:
        args.tokens = 8 * 197 if args.quick else 64 * 197
    if args.reps is None:
        args.reps = 5 if args.quick else 9
    if args.bsr_reps is None:
        args.bsr_reps = 1 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    tokens, reps, bsr_reps = args.tokens, args.reps, args.bsr_reps
    out_features, in_features = LAYERS[args.layer]
    blocks, densities = args.blocks, args.densities
    if not compiled_kernel_available():
        print("warning: compiled kernel unavailable, timing the torch fallback", file=sys.stderr)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen)
    dy = torch.randn(tokens, out_features, generator=gen)
    w_full = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    flops = 2.0 * tokens * out_features * in_features
    load_before = load_average()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    print(f"# {args.layer}: x [{tokens}, {in_features}] @ W^T [{in_features}, {out_features}], fp32, "
          f"{args.threads} threads, {cpu_model()}; load average before: {load_before}")  # fmt: skip

    meta = dict(tokens=tokens, reps=reps, bsr_reps=bsr_reps, load_before=load_before, command=command, flops=flops,
                out_features=out_features, in_features=in_features)  # fmt: skip
    forward_rows, backward_rows = [], []
    out_ours, out_dense = torch.empty(tokens, out_features), torch.empty(tokens, out_features)
    for block in blocks:
        for asked in densities:
            dense_w, values, row_ptr, col_idx = random_block_weight(out_features, in_features, block, asked, block)
            density = values.shape[0] / ((row_ptr.numel() - 1) * -(-in_features // block))  # the share kept
            size = (block, block)

            def ours():
                return block_sparse_linear_cpu(x, values, row_ptr, col_idx, out_features, size)

            def dense():
                return F.linear(x, w_full)

            error = (ours() - F.linear(x, dense_w)).abs().max().item()
            ours_t, dense_t = measure_pairs(ours, dense, reps)
            # Same products into reused buffers: a fresh [M, N] result costs page faults, which on a busy VM
            # take a large, equal share of both timings; this pair compares the matmuls themselves.
            pre_t, pre_dense_t = measure_pairs(
                lambda: block_sparse_linear_cpu(x, values, row_ptr, col_idx, out_features, size, out=out_ours),
                lambda: torch.matmul(x, w_full.T, out=out_dense),
                reps,
            )
            row = {
                "block": block, "density": density, "error": error,
                "ours": median_wall(ours_t), "dense": median_wall(dense_t),
                "cpu_speedup": median_cpu(dense_t) / median_cpu(ours_t),
                "pre_ours": median_wall(pre_t), "pre_dense": median_wall(pre_dense_t),
            }  # fmt: skip
            if not args.no_bsr:
                bsr = dense_w.to_sparse_bsr(size)
                # seconds per call: a warm-up would add little but doubles the run time
                bsr_linear, bsr_dense = measure_pairs(lambda: F.linear(x, bsr), dense, bsr_reps, warmup=False)
                bsr_matmul, bsr_dense2 = measure_pairs(lambda: bsr @ x.T, dense, bsr_reps, warmup=False)
                row["bsr_linear"] = median_wall(bsr_linear)
                row["bsr_matmul"] = median_wall(bsr_matmul)
                row["bsr_dense"] = median_wall(bsr_dense + bsr_dense2)
            forward_rows.append(row)
            line = (f"fwd  block {block:2d} density {density_text(density)}: ours {row['ours'] * 1e3:8.1f} ms, dense "
                    f"{row['dense'] * 1e3:8.1f} ms ({flops / row['dense'] / 1e9:5.1f} GFLOP/s), "
                    f"speedup {row['dense'] / row['ours']:5.2f}x (CPU time {row['cpu_speedup']:4.2f}x; "
                    f"preallocated out {row['pre_ours'] * 1e3:7.1f} vs {row['pre_dense'] * 1e3:7.1f} ms: "
                    f"{row['pre_dense'] / row['pre_ours']:4.2f}x)")  # fmt: skip
            if "bsr_linear" in row:
                line += (f"; vs BSR F.linear {row['bsr_linear'] / row['ours']:6.1f}x, "
                         f"vs bsr@x.T {row['bsr_matmul'] / row['ours']:5.1f}x "
                         f"(BSR/dense {row['bsr_dense'] / row['bsr_linear']:.2f}x, "
                         f"{row['bsr_dense'] / row['bsr_matmul']:.2f}x)")  # fmt: skip
            print(line, flush=True)

            if not args.no_backward:
                gi, gi_dense = measure_pairs(
                    lambda: grad_input_cpu(dy, values, row_ptr, col_idx, in_features, size), lambda: dy @ w_full, reps
                )
                gv, gv_dense = measure_pairs(
                    lambda: grad_values_cpu(dy, x, row_ptr, col_idx, size), lambda: dy.T @ x, reps
                )
                back = {
                    "block": block, "density": density,
                    "gi": median_wall(gi), "gi_dense": median_wall(gi_dense),
                    "gv": median_wall(gv), "gv_dense": median_wall(gv_dense),
                }  # fmt: skip
                backward_rows.append(back)
                print(f"bwd  block {block:2d} density {density_text(density)}: dX {back['gi'] * 1e3:8.1f} ms "
                      f"({back['gi_dense'] / back['gi']:5.2f}x dense dY@W), dW {back['gv'] * 1e3:8.1f} ms "
                      f"({back['gv_dense'] / back['gv']:5.2f}x dense dY^T@X)", flush=True)  # fmt: skip
            write_report(args, forward_rows, backward_rows, meta, final=False)

    write_report(args, forward_rows, backward_rows, meta, final=True)
    return 0


if __name__ == "__main__":
    run_script(main)
