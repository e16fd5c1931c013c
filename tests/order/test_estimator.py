"""OrderEstimator on real recordings (TrainOrderRecorder) against retrain(), and its errors."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from lpl.order import OrderEstimate, OrderEstimator, Recording, retrain
from lpl.order.store import _write_manifest
from lpl.utils.errors import LplError
from test_estimator_task import NUM_BATCHES, TinyClassifier, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("order") / "rec", lr=0.003, proj_dim=2048, curvature_rank=2)


@pytest.fixture(scope="module")
def plain_recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("order") / "plain", lr=0.01, proj_dim=256, curvature_rank=0, probe_every=3)


def test_reference_order_and_retraining_agree_with_the_recording(recording):
    rec = Recording.open(recording)
    estimator = OrderEstimator.from_recording(recording, method="adam_first_order")
    estimate = estimator.estimate(rec.order)
    assert estimate.final_loss == pytest.approx(rec.probe_scalars["val_loss"][-1], abs=1e-6)
    truth = retrain(recording, rec.order)
    torch.testing.assert_close(truth.loss_curve.float(), torch.tensor(rec.probe_scalars["val_loss"]), atol=1e-5, rtol=0)
    with pytest.raises(LplError, match="max_steps must be between 1 and the order's"):
        retrain(recording, rec.order, max_steps=len(rec.order) + 1)
    short = retrain(recording, rec.order, max_steps=4)
    assert short.loss_curve.shape == (5,)
    assert short.final_loss == pytest.approx(rec.probe_scalars["val_loss"][4], abs=1e-5)


def test_estimates_beat_no_change_against_retraining(recording):
    generator = torch.Generator().manual_seed(3)
    orders = [torch.randperm(NUM_BATCHES, generator=generator).tolist() for _ in range(8)]
    truth = np.array([retrain(recording, o).final_loss for o in orders])
    no_change = np.abs(truth - OrderEstimator.from_recording(recording, method="adam").reference_loss).mean()
    estimates = {
        method: np.array([OrderEstimator.from_recording(recording, method=method).estimate(o).final_loss
                          for o in orders])
        for method in ("first_order", "adam_first_order")
    }
    # the paper's term with the per-batch curvature correction: right ranking and better than "no change"
    assert spearmanr(estimates["first_order"], truth)[0] > 0.8
    assert np.abs(estimates["first_order"] - truth).mean() < 0.8 * no_change
    # rebuilt momentum ranks orders too, but its larger displacement misses the loss's quadratic term (a known,
    # measured bias towards lower losses; see benchmarks/results/order_estimation.md)
    assert spearmanr(estimates["adam_first_order"], truth)[0] > 0.6


def test_estimates_far_outside_the_runs_losses_warn(recording, monkeypatch):
    import dataclasses
    import warnings

    import lpl.order.estimator as estimator_module

    rec = Recording.open(recording)
    estimator = OrderEstimator.from_recording(recording, method="first_order")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # estimates near the run's own losses: no warning
        estimator.estimate(list(reversed(rec.order)))
    real_replay = estimator_module.replay

    def far_off(*args, **kwargs):  # a replay whose correction ran away (as first_order's did on a 1-core LM run)
        result = real_replay(*args, **kwargs)
        return dataclasses.replace(result, final_loss=result.final_loss - 20.0)

    monkeypatch.setattr(estimator_module, "replay", far_off)
    with pytest.warns(UserWarning, match="1 of 1 'first_order' estimates .* lie far outside the validation losses"):
        estimator.estimate(list(reversed(rec.order)))
    # the estimator warns once; a search's best order far outside is said again (a search seeks out the worst error)
    from lpl.order.curriculum import search

    with pytest.warns(UserWarning, match="the best order's estimate .* lies far outside"):
        search(estimator, budget=8, method="local", population=4)


def test_estimates_do_not_depend_on_the_default_dtype_and_predict_refuses_other_precisions(recording):
    rec = Recording.open(recording)
    estimator = OrderEstimator.from_recording(recording, method="first_order")
    orders = [list(reversed(rec.order)), rec.order]
    expected = estimator.estimate_many(orders).final_loss
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as Trainer(precision="64-true") sets it
    try:
        assert torch.equal(estimator.estimate_many(orders).final_loss, expected)
    finally:
        torch.set_default_dtype(previous)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as precision="bf16-mixed" runs predict_step
        assert torch.equal(estimator.estimate_many(orders).final_loss, expected)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with pytest.raises(LplError, match="precision='32-true'"):
        trainer.predict(estimator, dataloaders=DataLoader(torch.tensor(orders), batch_size=2))


def test_predict_refuses_a_loader_that_collates_orders_by_position(recording):
    rec = Recording.open(recording)
    estimator = OrderEstimator.from_recording(recording, method="first_order")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(LplError, match="one tensor per position"):  # default_collate of lists: columns
        trainer.predict(estimator, dataloaders=DataLoader([list(rec.order), list(reversed(rec.order))], batch_size=2))


def test_predict_over_a_loader_of_orders_matches_estimate(recording):
    estimator = OrderEstimator.from_recording(recording, method="adam")
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = trainer.predict(estimator, dataloaders=DataLoader(orders, batch_size=2))
    estimates = [e for batch in batches for e in batch]
    assert len(estimates) == 5 and isinstance(estimates[0], OrderEstimate)
    for order, got in zip(orders, estimates):
        single = estimator.estimate(order.tolist())
        assert got.final_loss == pytest.approx(single.final_loss, abs=1e-6)
        torch.testing.assert_close(got.batch_losses, single.batch_losses)
        assert got.loss_curve.shape == (NUM_BATCHES + 1,)


def test_sparse_probes_without_curvature(plain_recording):
    rec = Recording.open(plain_recording)
    assert rec.probe_steps == [0, 3, 6, 9, 10]
    estimator = OrderEstimator.from_recording(plain_recording, method="adam")
    assert estimator.estimate(rec.order).final_loss == pytest.approx(estimator.reference_loss, abs=1e-6)
    with pytest.raises(LplError, match="curvature_rank"):
        OrderEstimator.from_recording(plain_recording, method="first_order")


def test_bad_input(recording, tmp_path):
    estimator = OrderEstimator.from_recording(recording, method="adam")
    with pytest.raises(LplError, match=f"batch id {NUM_BATCHES}"):
        estimator.estimate([0, NUM_BATCHES])
    with pytest.raises(LplError, match="longer than"):
        estimator.estimate([0] * (NUM_BATCHES + 1))
    with pytest.raises(LplError, match=f"batch id {NUM_BATCHES}"):
        retrain(recording, [NUM_BATCHES])
    with pytest.raises(LplError, match="another model"):
        OrderEstimator.from_recording(recording, model=TinyClassifier(hidden=17))
    OrderEstimator.from_recording(recording, model=TinyClassifier(hidden=16))
    broken = tmp_path / "broken"
    shutil.copytree(recording, broken)
    shard = sorted((broken / "probes").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LplError, match=shard.name):
        OrderEstimator.from_recording(broken)


def test_sensitivity_data_from_a_recording(recording, tmp_path):
    from lpl.order.adjoint import _check_against_retraining, check_errors, record_sensitivities
    from lpl.order.store import RecordingError

    for method in ("adjoint", "linearized"):
        with pytest.raises(LplError, match="record_sensitivities"):
            OrderEstimator.from_recording(recording, method=method)
    path = shutil.copytree(recording, tmp_path / "rec")
    written = record_sensitivities(path, curvature_rank=4, hessian_rank=6, accelerator="cpu", verbose=False)
    rec = Recording.open(path)
    rec.verify()
    tensors, info = rec.sensitivity()
    assert tensors["tables"].shape == (5, NUM_BATCHES, NUM_BATCHES) and info["curvature_rank"] == 4
    assert tensors["linearized/hessian_vectors"].shape[:2] == (NUM_BATCHES, 6)
    assert tensors["linearized/pool_grads"].dtype == torch.bfloat16  # the bulk, stored at half the bytes
    for check in info["checks"]:  # the built-in ground-truth check, of both methods
        assert check["retrained"] == pytest.approx(retrain(recording, check["order"]).final_loss, abs=1e-6)
        assert set(check["estimates"]) == {"adjoint", "linearized"}
    assert len(info["checks"]) == 2
    error, no_change = check_errors(info["checks"], rec.probe_scalars["val_loss"][-1], "linearized")
    assert error < 0.5 * no_change
    assert info["rerun_val_loss"] == pytest.approx(rec.probe_scalars["val_loss"][-1], abs=1e-5)

    with pytest.warns(UserWarning, match="do not trust method 'adjoint'"):  # estimates 50x off fail the check
        failed = _check_against_retraining(path, {"adjoint": lambda orders: torch.full((len(orders),), 50.0)},
                                           rec.probe_scalars["val_loss"][-1], rec.order, 1, "cpu")
    rec.manifest["sensitivity"]["checks"] = failed  # as if the recorded check had failed: loading warns again
    _write_manifest(path, rec.manifest)
    with pytest.warns(UserWarning, match="does not hold for this run"):
        OrderEstimator.from_recording(path, method="adjoint")

    generator = torch.Generator().manual_seed(3)
    orders = [torch.randperm(NUM_BATCHES, generator=generator).tolist() for _ in range(8)]
    truth = np.array([retrain(recording, o).final_loss for o in orders])
    for method, tolerance in (("adjoint", 0.7), ("linearized", 0.5)):  # adjoint measured 0.54x: it under-predicts
        estimator = OrderEstimator.from_recording(path, method=method)
        assert estimator.estimate(rec.order).final_loss == pytest.approx(estimator.reference_loss, abs=1e-5)
        estimate = estimator.estimate_many(orders).final_loss.numpy()
        no_change = np.abs(truth - estimator.reference_loss).mean()
        assert spearmanr(estimate, truth)[0] > 0.8, method
        assert np.abs(estimate - truth).mean() < tolerance * no_change, method

    with pytest.raises(LplError, match="complete orders"):
        OrderEstimator.from_recording(path, method="adjoint").estimate(rec.order[:4])
    # the linearised replay also gives the curve and per-batch losses, for shorter orders too, and predicts
    # through a Trainer like any method (its data are buffers of the module)
    linearized = OrderEstimator.from_recording(path, method="linearized")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predicted = [e for batch in trainer.predict(linearized, dataloaders=DataLoader(torch.tensor(orders), batch_size=3))
                 for e in batch]
    torch.testing.assert_close(torch.tensor([e.final_loss for e in predicted], dtype=torch.float64),
                               linearized.estimate_many(orders).final_loss.double(), atol=1e-5, rtol=0)
    short = linearized.estimate(orders[0][:4])
    assert short.loss_curve.shape == (5,) and short.batch_losses.shape == (NUM_BATCHES,)
    result = retrain(recording, orders[0], curve_every_n_steps=1)
    estimated_curve = linearized.estimate(orders[0]).loss_curve.numpy()
    assert np.abs(estimated_curve - np.array(result.loss_curve)).max() < 0.5 * np.abs(
        np.array(result.loss_curve) - np.array(retrain(recording, rec.order, curve_every_n_steps=1).loss_curve)).max()
    # built again: the new file goes under a new name, never over the one the manifest names, and the old one goes
    again = record_sensitivities(path, curvature_rank=4, hessian_rank=6, accelerator="cpu", check_orders=0,
                                 verbose=False)
    assert again.is_file() and not written.exists()
    Recording.open(path).verify()
    again.write_bytes(again.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RecordingError, match="sensitivity"):
        Recording.open(path).verify()


def test_one_replay_gives_the_final_loss_with_and_without_the_quadratic_term(tmp_path):
    from lpl.order.adjoint import record_sensitivities

    path = record(tmp_path / "rec", proj_dim=128, curvature_rank=2, val_curvature_rank=3)
    record_sensitivities(path, curvature_rank=3, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(NUM_BATCHES, generator=generator) for _ in range(5)])
    for method in ("first_order", "zeroth_order", "adjoint", "linearized"):
        both = OrderEstimator.from_recording(path, method=method).estimate_many(orders)
        linear = OrderEstimator.from_recording(path, method=method, quadratic=False).estimate_many(orders)
        assert torch.equal(both.linear_loss, linear.final_loss), method
        assert not torch.equal(both.final_loss, both.linear_loss), method
        assert linear.linear_loss is None, method
    # shorter orders end before theta_T, where the curvature was measured: no quadratic term, no second readout
    short = OrderEstimator.from_recording(path, method="linearized").estimate_many(orders[:, :4])
    assert short.linear_loss is None


def test_a_check_within_float_noise_does_not_condemn_a_method():
    from lpl.order.adjoint import misses_more_than_no_change

    # an order that cannot matter (one batch per epoch): both errors are rounding
    assert not misses_more_than_no_change(1.456e-6, 2.5e-8, reference_loss=2.0)
    assert misses_more_than_no_change(0.01, 0.005, reference_loss=2.0)
    assert not misses_more_than_no_change(0.004, 0.005, reference_loss=2.0)


def test_a_recording_of_a_diverged_run_is_refused_naming_the_step():
    from types import SimpleNamespace

    from lpl.order.estimator import _check_run_finite

    losses = [2.3, 2.2, float("nan"), float("nan")]
    diverged = SimpleNamespace(root="runs/r", probe_steps=[0, 1, 2, 3], probe_scalars={"val_loss": losses})
    with pytest.raises(LplError, match="diverged: its validation loss is not finite from step 2"):
        _check_run_finite(diverged)
    _check_run_finite(SimpleNamespace(root="runs/r", probe_steps=[0, 1], probe_scalars={"val_loss": [2.3, 2.2]}))


def test_the_divergence_advice_names_another_method_than_the_one_running():
    from lpl.order.estimator import _steadier

    assert _steadier("first_order") == "A steadier method ('zeroth_order') or a recording with smaller learning rates"
    assert "('first_order' or 'zeroth_order')" in _steadier("adam")
    assert _steadier("zeroth_order") == "A recording with smaller learning rates"
