"""Fit a ``HardwareProfile`` to timings of the real block-sparse kernel on this device, and check its predictions.

The cost model (lpl/prune/hardware.py) says

    latency = launch_s + token_tiles * (row_s * block rows launched + block_s[br x bc / dtype] * retained blocks)

``calibrate`` times ``lpl.kernels.block_sparse_linear`` over a few masks (densities, and masks with empty block rows
so that rows and blocks vary independently), token counts and block sizes, and fits the non-negative coefficients by
least squares on relative error. ``validate_profile`` compares predictions with fresh timings on DeiT layer shapes.

    python -m lpl.prune.calibrate --device cuda --out benchmarks/results   # profile JSON + predicted-vs-measured
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lpl.kernels.format import block_grid
from lpl.prune.hardware import HardwareProfile, block_key, default_profile, dtype_name
from lpl.utils.errors import LplError, run_script

DEIT_LAYERS = {  # name -> (out_features, in_features)
    "deit_b.qkv": (2304, 768), "deit_b.proj": (768, 768), "deit_b.fc1": (3072, 768), "deit_b.fc2": (768, 3072),
    "deit_s.qkv": (1152, 384), "deit_s.proj": (384, 384), "deit_s.fc1": (1536, 384), "deit_s.fc2": (384, 1536),
}


@dataclass(frozen=True)
class Timing:
    """One measured call: ``tokens`` rows of x, a mask with ``rows_launched`` non-empty block rows and
    ``retained_blocks`` blocks of ``block_size``, taking ``seconds`` (median)."""

    tokens: int
    rows_launched: int
    retained_blocks: int
    block_size: tuple[int, int]
    seconds: float


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn`` after a warm-up (CUDA events on GPU, wall clock on CPU)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def calibration_masks(grid: tuple[int, int], generator: torch.Generator) -> list[torch.Tensor]:
    """Random masks at several densities, plus masks whose blocks sit in few rows (rows and blocks decorrelated)."""
    masks = []
    for density in (0.1, 0.25, 0.5, 0.75, 1.0):
        masks.append(torch.rand(grid, generator=generator) < density)
    for row_share in (0.25, 0.5):
        mask = torch.zeros(grid, dtype=torch.bool)
        rows = torch.randperm(grid[0], generator=generator)[: max(1, round(row_share * grid[0]))]
        mask[rows] = True
        masks.append(mask)
    return masks


def fit_profile(
    timings: Sequence[Timing], dtype: torch.dtype, base: HardwareProfile, name: str
) -> HardwareProfile:
    """Non-negative least squares on relative error of ``launch_s``, ``row_s`` and one ``block_s`` per block size."""
    sizes = sorted({t.block_size for t in timings})
    rows = []
    for t in timings:
        tiles = math.ceil(t.tokens / base.tile_m)
        features = [1.0, tiles * t.rows_launched] + [tiles * t.retained_blocks * (t.block_size == s) for s in sizes]
        rows.append([f / t.seconds for f in features])  # divide by the target: relative error
    launch_s, row_s, *block_s = _nonnegative_least_squares(torch.tensor(rows, dtype=torch.float64),
                                                           torch.ones(len(rows), dtype=torch.float64))
    return HardwareProfile(
        name=name, device_type=base.device_type, tile_m=base.tile_m, launch_s=launch_s, row_s=row_s,
        block_s={**base.block_s, **{block_key(s, dtype): b for s, b in zip(sizes, block_s)}},
        dense_flops_per_s=base.dense_flops_per_s, dense_flops_by_dtype=dict(base.dense_flops_by_dtype),
        idle_power_w=base.idle_power_w, active_power_w=base.active_power_w,
    )


def _nonnegative_least_squares(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """argmin ||a x - b|| subject to x >= 0, exactly, by trying every support set (a has only a few columns)."""
    columns = a.shape[1]
    best, best_residual = [0.0] * columns, float(b.norm())
    for support_bits in range(1, 1 << columns):
        support = [j for j in range(columns) if support_bits >> j & 1]
        solution = torch.linalg.lstsq(a[:, support], b[:, None]).solution[:, 0]
        if bool((solution < 0).any()):
            continue
        residual = float((a[:, support] @ solution - b).norm())
        if residual < best_residual:
            best = [0.0] * columns
            for j, value in zip(support, solution.tolist()):
                best[j] = value
            best_residual = residual
    return best


def _measure_layer(kernels, shape, mask, block_size, tokens, dtype, device, generator, repeats) -> float:
    weight = torch.randn(shape, generator=generator).to(device, dtype)
    sparse = kernels.BlockSparseWeight.from_dense(weight, mask.to(device), block_size)
    x = torch.randn(tokens, shape[1], generator=generator).to(device, dtype)
    with torch.inference_mode():
        return time_call(lambda: kernels.block_sparse_linear(x, sparse), device, repeats)


def calibrate(
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    block_sizes: Sequence[tuple[int, int]] | None = None,
    shape: tuple[int, int] = (3072, 768),
    tokens: Sequence[int] | None = None,
    repeats: int = 10,
    measure_power: bool = True,
    seed: int = 0,
) -> HardwareProfile:
    """Time the real kernel on ``device`` and fit a :class:`HardwareProfile` (monotone: all costs >= 0).

    Defaults: CUDA bf16, blocks 32 and 64, 8x197 and 64x197 tokens; CPU fp32, blocks 32 and 64, 197 and 8x197 tokens.
    On CUDA with NVML, idle and active power are measured too (``lpl.telemetry.PowerMeter``).

    Example::

        >>> profile = calibrate("cuda")                      # about a minute on an H100
        >>> profile.save("h100_profile.json")
        >>> result = prune_model(model, loader, cost_model=profile, flops_keep=0.5)
    """
    import lpl.kernels as kernels

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise LplError(f"calibrate runs on 'cpu' or 'cuda', got {device}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LplError("calibrate('cuda') needs an NVIDIA GPU, and torch sees none here; calibrate 'cpu' instead.")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    block_sizes = [tuple(b) for b in (block_sizes or [(32, 32), (64, 64)])]
    tokens = list(tokens or ([8 * 197, 64 * 197] if device.type == "cuda" else [197, 8 * 197]))
    generator = torch.Generator().manual_seed(seed)
    base = default_profile(device.type)

    timings = []
    for block_size in block_sizes:
        grid = block_grid(shape, block_size)
        for mask in calibration_masks(grid, generator):
            for count in tokens:
                seconds = _measure_layer(kernels, shape, mask, block_size, count, dtype, device, generator, repeats)
                timings.append(Timing(count, int(mask.any(1).sum()), int(mask.sum()), block_size, seconds))

    x = torch.randn(max(tokens), shape[1], generator=generator).to(device, dtype)
    weight = torch.randn(shape, generator=generator).to(device, dtype)
    with torch.inference_mode():
        dense_s = time_call(lambda: torch.nn.functional.linear(x, weight), device, repeats)
    base.dense_flops_per_s = 2.0 * max(tokens) * shape[0] * shape[1] / dense_s
    base.dense_flops_by_dtype = {dtype_name(dtype): base.dense_flops_per_s}
    if device.type == "cuda" and measure_power:
        _measure_power(base, x, weight, device)
    return fit_profile(timings, dtype, base, f"calibrated-{_device_name(device)}")


def _device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model with the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {model} {torch.get_num_threads()}t"


def _measure_power(profile: HardwareProfile, x: torch.Tensor, weight: torch.Tensor, device: torch.device) -> None:
    from lpl.telemetry import PowerMeter, PowerMeterUnavailable

    try:
        meter = PowerMeter(device.index or 0)
    except PowerMeterUnavailable:
        return  # keep the default power figures; the energy model stays latency x power
    try:
        profile.idle_power_w = meter.measure_idle(2.0)
        with torch.inference_mode():
            reading = meter.measure(lambda: torch.nn.functional.linear(x, weight), items=1, min_seconds=3.0)
        profile.active_power_w = max(reading.mean_power_w, profile.idle_power_w)
    finally:
        meter.close()


def validate_profile(
    profile: HardwareProfile,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    block_size: tuple[int, int] = (64, 64),
    tokens: int | None = None,
    densities: Sequence[float] = (0.25, 0.5, 0.75),
    layers: dict[str, tuple[int, int]] | None = None,
    repeats: int = 10,
    seed: int = 1,
) -> list[dict]:
    """Predicted vs measured latency per layer on fresh random masks: rows of dicts with the relative error."""
    import lpl.kernels as kernels

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = tokens or (64 * 197 if device.type == "cuda" else 8 * 197)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, shape in (layers or DEIT_LAYERS).items():
        grid = block_grid(shape, block_size)
        for density in densities:
            mask = torch.rand(grid, generator=generator) < density
            measured = _measure_layer(kernels, shape, mask, block_size, tokens, dtype, device, generator, repeats)
            predicted, _ = profile.predict(mask, tokens, block_size, dtype)
            rows.append(dict(layer=name, density=float(mask.float().mean()), tokens=tokens, predicted_s=predicted,
                             measured_s=measured, error=(predicted - measured) / measured))
    return rows


def report_markdown(profile: HardwareProfile, rows: list[dict]) -> str:
    """A markdown table of predicted vs measured latency per layer (``validate_profile``'s rows)."""
    errors = [abs(r["error"]) for r in rows]
    lines = [f"# Cost model {profile.name}: predicted vs measured latency per layer", "",
             f"- launch_s {profile.launch_s:.3g}, row_s {profile.row_s:.3g}, tile_m {profile.tile_m}, block_s "
             f"{ {key: float(f'{value:.3g}') for key, value in profile.block_s.items()} }, "
             f"dense {profile.dense_flops_per_s / 1e9:.1f} GFLOP/s, power idle/active {profile.idle_power_w:.0f}/"
             f"{profile.active_power_w:.0f} W",
             f"- |error|: median {100 * statistics.median(errors):.1f}%, max {100 * max(errors):.1f}%; "
             f"within 15%: {sum(e <= 0.15 for e in errors)}/{len(errors)}", "",
             "| layer | density | tokens | predicted ms | measured ms | error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['density']:.2f} | {r['tokens']} | {1e3 * r['predicted_s']:.3f} | "
              f"{1e3 * r['measured_s']:.3f} | {100 * r['error']:+.1f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m lpl.prune.calibrate``: calibrate a profile, validate it on DeiT layers, write both."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    from lpl.utils.io import atomic_write_text

    profile = calibrate(args.device, repeats=args.repeats)
    rows = validate_profile(profile, args.device, repeats=args.repeats)
    slug = "-".join(part for part in "".join(c if c.isalnum() else "-" for c in profile.name.lower()).split("-")
                    if part)
    out = Path(args.out)
    profile.save(out / f"profile_{slug}.json")
    text = report_markdown(profile, rows)
    atomic_write_text(out / f"calibration_{slug}.md", text)
    print(text)


if __name__ == "__main__":
    run_script(main)
