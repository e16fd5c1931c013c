"""Hardware cost model: predicted latency and energy of a block-sparse Linear from its block mask.

The model follows how the block-sparse kernel runs: one program per (token tile, block row) that loops over the
retained blocks of its row, so

    latency = launch_s + token_tiles * (row_s * block rows launched + block_s[size/dtype] * retained blocks)
    energy  = launch_s * idle_power_w + (latency - launch_s) * active_power_w

Both are monotone in the retained blocks (pruning more never predicts more time or energy). Block rows with no
retained block are not launched. An unpruned layer stays a dense Linear and is priced as the dense matmul
(``predict_dense``), which may cost less than the block-sparse kernel with nearly all blocks kept.
``default_profile`` is analytic; ``lpl.prune.calibrate.calibrate`` fits the fields from timings of the real kernel.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from lpl.utils.errors import LplError
from lpl.utils.io import atomic_write_json

# Share of dense matmul throughput the block-sparse kernel reaches on one retained block (analytic default only).
_DEFAULT_BLOCK_EFFICIENCY = 0.6
_CPU_STRIP = 16  # output rows per strip of the CPU kernel (kernels/cpu/csrc/block_sparse.c)


def block_key(block_size: tuple[int, int], dtype: torch.dtype | str) -> str:
    """Key of ``HardwareProfile.block_s``: ``"16x16/float32"``."""
    return f"{int(block_size[0])}x{int(block_size[1])}/{dtype_name(dtype)}"


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"float32"`` for ``torch.float32`` (names pass through): how profiles key their measurements."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


@dataclass
class HardwareProfile:
    """Per-device latency/energy model of block-sparse Linear layers (see the module docstring for the formula).

    Example::

        profile = default_profile("cpu")
        latency_s, energy_j = profile.predict(block_mask, tokens=3200, block_size=(16, 16), dtype=torch.float32)
        dense_s, dense_j = profile.predict_dense(512, 128, tokens=3200, dtype=torch.float32)
        profile.save("cpu_profile.json"); same = HardwareProfile.load("cpu_profile.json")
    """

    name: str
    device_type: str
    tile_m: int
    launch_s: float
    row_s: float
    block_s: dict[str, float] = field(default_factory=dict)
    dense_flops_per_s: float = 5e10  # dense matmul throughput of a dtype with no entry in dense_flops_by_dtype
    dense_flops_by_dtype: dict[str, float] = field(default_factory=dict)  # measured: {"float32": flop/s, ...}
    idle_power_w: float = 10.0
    active_power_w: float = 30.0

    def __post_init__(self) -> None:
        self._check_types()
        if self.device_type not in ("cpu", "cuda"):
            raise LplError(f"HardwareProfile.device_type must be 'cpu' or 'cuda', got {self.device_type!r}.")
        if self.tile_m <= 0 or min([self.dense_flops_per_s, *self.dense_flops_by_dtype.values()]) <= 0:
            raise LplError("HardwareProfile needs tile_m > 0 and dense throughputs > 0.")
        if min(self.launch_s, self.row_s, *self.block_s.values(), 0.0) < 0 or self.active_power_w < self.idle_power_w:
            raise LplError("HardwareProfile costs must be >= 0 and active_power_w >= idle_power_w (else pruning "
                           "could predict more time or energy).")

    def _check_types(self) -> None:
        """Every number a finite int / float and every table a {str: number} dict (a damaged or hand-edited file
        would otherwise fail deep inside the allocation, blaming the budget)."""
        def finite(value: Any) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if not isinstance(self.name, str):
            raise LplError(f"HardwareProfile.name must be a string, got {self.name!r}.")
        if isinstance(self.tile_m, float) and self.tile_m.is_integer():  # 64.0, as JSON written elsewhere may say
            self.tile_m = int(self.tile_m)
        if not isinstance(self.tile_m, numbers.Integral) or isinstance(self.tile_m, bool):
            raise LplError(f"HardwareProfile.tile_m must be a whole number, got {self.tile_m!r}.")
        for name in ("launch_s", "row_s", "dense_flops_per_s", "idle_power_w", "active_power_w"):
            if not finite(getattr(self, name)):
                raise LplError(f"HardwareProfile.{name} must be a finite number, got {getattr(self, name)!r}.")
        for name in ("block_s", "dense_flops_by_dtype"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(isinstance(k, str) and finite(v) for k, v in table.items()):
                raise LplError(f"HardwareProfile.{name} must map names to finite numbers, got {table!r:.120}.")

    def dense_throughput(self, dtype: torch.dtype | str) -> float:
        """Dense matmul flop/s at ``dtype``: measured when calibrated at it, else ``dense_flops_per_s``."""
        return self.dense_flops_by_dtype.get(dtype_name(dtype), self.dense_flops_per_s)

    def seconds_per_block(self, block_size: tuple[int, int], dtype: torch.dtype | str) -> float:
        """Cost of one retained block for one token tile; analytic from dense throughput when not calibrated (the
        CPU kernel computes output rows in strips of 16, so a block of fewer rows costs as much as 16)."""
        measured = self.block_s.get(block_key(block_size, dtype))
        if measured is not None:
            return measured
        rows = -(-block_size[0] // _CPU_STRIP) * _CPU_STRIP if self.device_type == "cpu" else block_size[0]
        flops = 2.0 * self.tile_m * rows * block_size[1]
        return flops / (self.dense_throughput(dtype) * _DEFAULT_BLOCK_EFFICIENCY)

    def _energy(self, latency_s: float | np.ndarray) -> float | np.ndarray:
        busy = np.maximum(latency_s - self.launch_s, 0.0)
        return np.minimum(latency_s, self.launch_s) * self.idle_power_w + busy * self.active_power_w

    def predict_counts(
        self, retained_blocks: int | np.ndarray, rows_launched: int | np.ndarray, tokens: int,
        block_size: tuple[int, int], dtype: torch.dtype | str,
    ) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(latency_s, energy_j) from block counts; element-wise over arrays of counts (a whole curve at once)."""
        token_tiles = math.ceil(tokens / self.tile_m)
        latency = self.launch_s + token_tiles * (
            self.row_s * rows_launched + self.seconds_per_block(block_size, dtype) * retained_blocks
        )
        return latency, self._energy(latency)

    def predict(
        self, block_mask: torch.Tensor, tokens: int, block_size: tuple[int, int], dtype: torch.dtype | str
    ) -> tuple[float, float]:
        """(latency_s, energy_j) of ``y = x W^T`` for ``tokens`` rows of x and W kept where ``block_mask`` [R, C]."""
        mask = block_mask.bool()
        rows_launched = int(mask.any(dim=1).sum())
        latency, energy = self.predict_counts(int(mask.sum()), rows_launched, tokens, block_size, dtype)
        return float(latency), float(energy)

    def predict_dense(
        self, out_features: int, in_features: int, tokens: int, dtype: torch.dtype | str
    ) -> tuple[float, float]:
        """(latency_s, energy_j) of the dense matmul: the baseline of predicted speedups."""
        latency = self.launch_s + 2.0 * tokens * out_features * in_features / self.dense_throughput(dtype)
        return latency, float(self._energy(latency))

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON (atomically); read it back with :meth:`load`."""
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HardwareProfile":
        """Read a profile :meth:`save` wrote; unknown fields or bad values are refused."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise LplError(f"cannot read a HardwareProfile from {path}: {error}.") from error
        if not isinstance(data, dict):
            raise LplError(f"{path} holds a JSON {type(data).__name__}, not a HardwareProfile's fields.")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LplError(f"{path} has unknown HardwareProfile fields {sorted(unknown)}; is it a profile file?")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in data]
        if missing:
            raise LplError(f"{path} lacks the HardwareProfile fields {missing}; save the profile again (python -m "
                           "lpl.prune.calibrate).")
        try:
            return cls(**data)
        except LplError as error:
            raise LplError(f"{path}: {error}") from None


def default_profile(device_type: str = "cpu") -> HardwareProfile:
    """Analytic profile (no measurement): typical launch/row overheads and dense throughput per device type."""
    if device_type == "cpu":
        return HardwareProfile(
            name="analytic-cpu", device_type="cpu", tile_m=64, launch_s=2e-5, row_s=2e-7,
            dense_flops_per_s=5e10, idle_power_w=10.0, active_power_w=35.0,
        )
    if device_type == "cuda":
        return HardwareProfile(
            name="analytic-cuda", device_type="cuda", tile_m=64, launch_s=5e-6, row_s=5e-9,
            dense_flops_per_s=2e14, idle_power_w=70.0, active_power_w=350.0,
        )
    raise LplError(f"default_profile knows 'cpu' and 'cuda', got {device_type!r}.")
