"""GPU energy measurement from NVML's total-energy counter (pynvml), idle power subtracted.

On a machine without an NVIDIA GPU (or without an energy counter) ``PowerMeter`` raises ``PowerMeterUnavailable``
with a message saying so; benchmarks then report the energy predicted by the hardware cost model instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from lpl.utils.errors import LplError


class PowerMeterUnavailable(LplError):
    """No NVML energy counter here (no NVIDIA GPU, no driver, or a GPU older than Volta)."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy of a measured run. ``active_j`` = ``total_j`` minus idle power times the run's duration."""

    seconds: float
    items: int
    total_j: float
    idle_power_w: float

    @property
    def active_j(self) -> float:
        return max(self.total_j - self.idle_power_w * self.seconds, 0.0)

    @property
    def joules_per_item(self) -> float:
        """Idle-subtracted joules per item (per image for a vision model)."""
        return self.active_j / max(self.items, 1)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mean_power_w(self) -> float:
        return self.total_j / self.seconds if self.seconds > 0 else 0.0


class PowerMeter:
    """Joules per image of GPU work, from NVML's energy counter with the idle draw subtracted.

    Example::

        >>> meter = PowerMeter(device_index=0)           # PowerMeterUnavailable without an NVIDIA GPU
        >>> meter.measure_idle(seconds=2.0)               # watts drawn while nothing runs
        >>> reading = meter.measure(lambda: model(images), items=len(images), min_seconds=3.0)
        >>> reading.joules_per_item, reading.items_per_s
    """

    def __init__(
        self,
        device_index: int = 0,
        nvml: Any = None,
        synchronize: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._nvml = nvml if nvml is not None else _import_pynvml()
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception as error:  # pynvml raises NVMLError subclasses for no driver/no GPU/not supported
            raise PowerMeterUnavailable(
                f"NVML energy counter unavailable for GPU {device_index} ({error}): energy cannot be measured on "
                f"this machine; use the model-predicted energy (HardwareProfile.predict) instead."
            ) from error
        self._synchronize = synchronize if synchronize is not None else _cuda_synchronize
        self._clock, self._sleep = clock, sleep
        self.idle_power_w: float | None = None

    @staticmethod
    def available(device_index: int = 0) -> bool:
        """True when an NVIDIA GPU with an NVML energy counter is present."""
        try:
            PowerMeter(device_index).close()
        except PowerMeterUnavailable:
            return False
        return True

    def energy_j(self) -> float:
        """The GPU's energy counter (joules since the driver loaded)."""
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def measure_idle(self, seconds: float = 2.0) -> float:
        """Mean power (W) over ``seconds`` of no work; stored as ``idle_power_w`` and subtracted from readings."""
        if seconds <= 0:
            raise LplError(f"measure_idle needs seconds > 0, got {seconds}.")
        self._synchronize()
        start_j, start_s = self.energy_j(), self._clock()
        self._sleep(seconds)
        self.idle_power_w = (self.energy_j() - start_j) / max(self._clock() - start_s, 1e-9)
        return self.idle_power_w

    def measure(self, work: Callable[[], Any], items: int, min_seconds: float = 2.0, warmup: int = 2) -> EnergyReading:
        """Run ``work`` (which processes ``items`` items) repeatedly for at least ``min_seconds``; return the energy.

        NVML's counter advances in steps of tens of milliseconds, hence the minimum duration. Measures the idle
        power first if ``measure_idle`` was not called.
        """
        if self.idle_power_w is None:
            self.measure_idle()
        for _ in range(warmup):
            work()
        self._synchronize()
        start_j, start_s = self.energy_j(), self._clock()
        runs = 0
        while True:
            work()
            runs += 1
            self._synchronize()
            if self._clock() - start_s >= min_seconds:
                break
        seconds = self._clock() - start_s
        return EnergyReading(seconds, runs * items, self.energy_j() - start_j, float(self.idle_power_w))

    def close(self) -> None:
        """Shut NVML down (safe to call twice)."""
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down twice or after a driver reset is harmless
            pass


def _import_pynvml():
    try:
        import pynvml
    except ImportError as error:
        raise PowerMeterUnavailable(
            "pynvml is not installed (pip install nvidia-ml-py): energy cannot be measured; use the "
            "model-predicted energy (HardwareProfile.predict) instead."
        ) from error
    return pynvml


def _cuda_synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
