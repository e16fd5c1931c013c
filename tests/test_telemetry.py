import pytest
import torch

from lpl.telemetry import PowerMeter, PowerMeterUnavailable
from lpl.utils.errors import LplError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class FakeNvml:
    """An energy counter (millijoules) driven by a fake clock: idle watts, plus extra watts while work runs."""

    def __init__(self, clock, idle_w):
        self.clock, self.idle_w, self.extra_mj = clock, idle_w, 0.0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return 1000.0 * self.idle_w * self.clock() + self.extra_mj


def test_idle_power_is_subtracted_and_joules_per_item_follow():
    clock = FakeClock()
    nvml = FakeNvml(clock, idle_w=60.0)

    def work():  # 0.5 s at 200 W above idle, 32 images
        clock.sleep(0.5)
        nvml.extra_mj += 1000.0 * 200.0 * 0.5

    meter = PowerMeter(nvml=nvml, synchronize=lambda: None, clock=clock, sleep=clock.sleep)
    assert meter.measure_idle(2.0) == pytest.approx(60.0)
    reading = meter.measure(work, items=32, min_seconds=2.0, warmup=1)
    assert reading.items == 4 * 32 and reading.seconds == pytest.approx(2.0)
    assert reading.active_j == pytest.approx(200.0 * 2.0)
    assert reading.joules_per_item == pytest.approx(400.0 / 128)
    assert reading.mean_power_w == pytest.approx(260.0)


def test_no_nvidia_gpu_is_said_clearly():
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    with pytest.raises(PowerMeterUnavailable, match="model-predicted energy"):
        PowerMeter(nvml=NoDriver(FakeClock(), 0.0))
    assert issubclass(PowerMeterUnavailable, LplError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_real_pynvml_on_a_machine_without_gpu_is_unavailable():
    assert PowerMeter.available() is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_real_energy_counter_on_a_gpu():
    meter = PowerMeter()
    try:
        assert 0 < meter.measure_idle(1.0) < 2000
        x = torch.randn(4096, 4096, device="cuda")
        reading = meter.measure(lambda: x @ x, items=1, min_seconds=1.0, warmup=1)
        assert reading.mean_power_w >= 0.5 * meter.idle_power_w and reading.items >= 1
    finally:
        meter.close()
