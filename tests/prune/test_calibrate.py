"""calibrate: the least-squares fit recovers a known cost model; a tiny real calibration on CPU runs end to end."""

import math

import pytest
import torch

from lpl.prune.calibrate import Timing, calibrate, fit_profile, report_markdown, validate_profile
from lpl.prune.hardware import HardwareProfile, block_key, default_profile


def test_fit_recovers_the_coefficients_of_exact_timings():
    truth = dict(launch_s=3e-5, row_s=2e-7, block=((32, 32), 4e-7), block64=((64, 64), 1.5e-6))
    base = default_profile("cpu")
    timings = []
    for tokens in (197, 1576):
        tiles = math.ceil(tokens / base.tile_m)
        for size, per_block in (truth["block"], truth["block64"]):
            for rows, blocks in ((10, 20), (10, 80), (40, 80), (40, 300), (5, 5)):
                seconds = truth["launch_s"] + tiles * (truth["row_s"] * rows + per_block * blocks)
                timings.append(Timing(tokens, rows, blocks, size, seconds))
    profile = fit_profile(timings, torch.float32, base, "synthetic")
    assert profile.launch_s == pytest.approx(truth["launch_s"], rel=1e-6)
    assert profile.row_s == pytest.approx(truth["row_s"], rel=1e-6)
    assert profile.block_s[block_key((32, 32), torch.float32)] == pytest.approx(4e-7, rel=1e-6)
    assert profile.block_s[block_key((64, 64), torch.float32)] == pytest.approx(1.5e-6, rel=1e-6)


def test_cpu_calibration_and_validation_run_on_the_real_kernel():
    profile = calibrate("cpu", block_sizes=[(32, 32)], shape=(128, 96), tokens=[64, 256], repeats=2)
    assert isinstance(profile, HardwareProfile) and profile.device_type == "cpu"
    assert min(profile.launch_s, profile.row_s, *profile.block_s.values()) >= 0
    assert block_key((32, 32), torch.float32) in profile.block_s
    # the dense throughput measured at the calibrated dtype is kept (the fit dropped it)
    assert profile.dense_flops_by_dtype == {"float32": profile.dense_flops_per_s}
    mask = torch.rand(4, 3) < 0.5
    fewer = mask.clone()
    fewer[mask.nonzero()[0].tolist()[0]] = False
    assert (profile.predict(fewer, 256, (32, 32), torch.float32)[0]
            <= profile.predict(mask, 256, (32, 32), torch.float32)[0])
    rows = validate_profile(profile, "cpu", block_size=(32, 32), tokens=64, densities=(0.5,),
                            layers={"tiny": (128, 96)}, repeats=2)
    assert len(rows) == 1 and rows[0]["measured_s"] > 0 and rows[0]["predicted_s"] > 0
    assert "| tiny |" in report_markdown(profile, rows)


def test_nonnegative_least_squares_matches_a_brute_force_check():
    from lpl.prune.calibrate import _nonnegative_least_squares

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(30, 3, generator=generator, dtype=torch.float64)
    b = a @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)  # the unconstrained optimum has a negative entry
    x = torch.tensor(_nonnegative_least_squares(a, b), dtype=torch.float64)
    assert bool((x >= 0).all())
    residual = float((a @ x - b).norm())
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 3, 31, dtype=torch.float64)] * 3, indexing="ij"), -1)
    assert residual <= float((grid.reshape(-1, 3) @ a.T - b).norm(dim=1).min()) + 1e-9
