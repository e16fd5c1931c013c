"""W&B detection and the order commands' W&B runs (their settings, and a failed command as a failed run)."""

import argparse

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lpl.order.commands import _wandb_logger
from lpl.utils.loggers import is_wandb


def test_subclasses_of_wandb_logger_get_the_wandb_output(tmp_path):
    class TeamLogger(WandbLogger):
        pass

    assert is_wandb(TeamLogger(offline=True, save_dir=str(tmp_path)))
    assert not is_wandb(CSVLogger(str(tmp_path))) and not is_wandb(None)


def test_order_command_runs_hold_their_settings_and_a_failed_command_fails_its_run(monkeypatch, tmp_path):
    finished, settings = [], []

    class Run:
        def finish(self, exit_code=None):
            finished.append(exit_code)

    class FakeWandbLogger:
        def __init__(self, **kwargs):
            self.experiment = Run()

        def log_hyperparams(self, params):
            settings.append(params)

    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", FakeWandbLogger)
    args = argparse.Namespace(wandb="project", out=tmp_path / "out", orders="random:4", method="first_order")
    with pytest.raises(RuntimeError, match="boom"):
        with _wandb_logger(args, "estimate"):
            raise RuntimeError("boom")
    with _wandb_logger(args, "estimate"):
        pass
    assert finished == [1, None]
    assert settings[0] == {"wandb": "project", "out": str(tmp_path / "out"), "orders": "random:4",
                           "method": "first_order"}
