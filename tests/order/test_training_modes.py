"""Models whose training mode matters (dropout, BatchNorm) and mixed precision: retraining and the full-space
sensitivity data follow the reference run exactly, and a loss that differs from training's is reported."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from lpl.order import OrderEstimator, Recording, retrain
from lpl.order.adjoint import REPLAY_DRIFT_TOLERANCE, record_sensitivities
from lpl.order.store import RecordingWriter
from lpl.utils.errors import LplError
from test_estimator_task import BiasesWithoutDecay, PenalisedClassifier, TinyClassifier, TinyDigits, record


class LoggingClassifier(TinyClassifier):
    """No ``loss(batch)``: the training_step, which logs with ``self.log`` (the most common LightningModule)."""

    loss = None

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return {"loss": loss}


@pytest.fixture(scope="module")
def noisy_recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("order") / "noisy", proj_dim=64, curvature_rank=0, dropout=0.3, norm=True)


def test_retraining_draws_the_reference_runs_dropout_masks(noisy_recording):
    rec = Recording.open(noisy_recording)
    states = rec.rng_states()
    assert list(states) == [0] and set(states[0]) == {"torch"}  # nothing drew from the generators between steps
    truth = retrain(noisy_recording, rec.order)
    torch.testing.assert_close(truth.loss_curve.float(), torch.tensor(rec.probe_scalars["val_loss"]), atol=1e-5, rtol=0)
    del rec.manifest["rng_state"]  # a recording made before RNG states were stored still retrains
    assert rec.rng_states() == {}


def test_validation_and_epochs_between_steps_do_not_change_the_retrained_dropout_masks(tmp_path):
    """Lightning's validation and each new epoch's loader draw from the global generator between steps; retraining
    runs the steps back to back, so the recorder stores the states of the steps that follow such draws."""
    path = record(tmp_path / "rec", proj_dim=32, curvature_rank=0, dropout=0.3, datamodule=TinyDigits(num_train=160),
                  trainer_kwargs=dict(max_steps=-1, max_epochs=2, val_check_interval=2, limit_val_batches=1))
    rec = Recording.open(path)
    states = rec.rng_states()
    assert rec.num_steps == 10 and 0 in states and 5 in states  # the first step, and the second epoch's first
    recorded = rec.probe_scalars["val_loss"][-1]
    assert retrain(path, rec.order).final_loss == pytest.approx(recorded, abs=1e-6)
    # the states between steps matter: from step 0's alone, training draws other masks
    RecordingWriter(rec.root, rec.manifest)._write_rng_states({0: states[0]})
    assert abs(retrain(path, rec.order).final_loss - recorded) > 1e-4


def test_sensitivity_data_hold_the_gradients_training_computed(noisy_recording, tmp_path):
    path = shutil.copytree(noisy_recording, tmp_path / "rec")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reference order itself drifts")
        record_sensitivities(path, curvature_rank=2, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    rec = Recording.open(path)
    rec.verify()
    # pool gradients in training mode with each step's dropout masks: the reference order replays to itself
    # (probed in eval mode instead, BatchNorm on running statistics and no dropout, it drifted over half the distance
    # the run trained)
    assert rec.manifest["sensitivity"]["reference_replay_drift"] < REPLAY_DRIFT_TOLERANCE / 10
    estimator = OrderEstimator.from_recording(path, method="linearized")
    assert estimator.estimate(rec.order).final_loss == pytest.approx(rec.probe_scalars["val_loss"][-1], abs=1e-4)
    # the pool batches' losses after an order are eval-mode losses, as retrain(batch_losses=True) measures them
    truth = retrain(path, rec.order, batch_losses=True)
    torch.testing.assert_close(estimator.estimate(rec.order).batch_losses.double(), truth.batch_losses.double(),
                               atol=1e-4, rtol=0)


class CentringClassifier(TinyClassifier):
    """Centres its inputs with a running mean it keeps in a buffer (not a BatchNorm), updated in training mode."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("input_mean", torch.zeros(64))

    def loss(self, batch):
        images = batch["image"]
        if self.training:
            with torch.no_grad():
                self.input_mean.lerp_(images.mean(0), 0.5)
        return nn.functional.cross_entropy(self.net(images - self.input_mean), batch["label"])


def test_sensitivity_data_use_each_steps_value_of_a_buffer_training_changes(tmp_path):
    """Every step's gradients were taken with the buffer's final value: the reference order replayed 19% of the
    distance trained away from itself and linearized did worse than 'no change'."""
    path = record(tmp_path / "rec", proj_dim=32, curvature_rank=0, model=CentringClassifier())
    with pytest.warns(UserWarning, match=r"training changed the buffers \['input_mean'\]"):
        record_sensitivities(path, curvature_rank=0, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    rec = Recording.open(path)
    assert rec.manifest["sensitivity"]["reference_replay_drift"] < REPLAY_DRIFT_TOLERANCE / 10
    estimator = OrderEstimator.from_recording(path, method="linearized")
    assert estimator.estimate(rec.order).final_loss == pytest.approx(rec.probe_scalars["val_loss"][-1], abs=1e-4)


def test_a_loss_that_is_not_trainings_is_reported(tmp_path):
    path = record(tmp_path / "rec", proj_dim=64, curvature_rank=0, model=PenalisedClassifier())
    with pytest.warns(UserWarning, match="reference order itself drifts"):
        record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    assert Recording.open(path).manifest["sensitivity"]["reference_replay_drift"] > REPLAY_DRIFT_TOLERANCE
    with pytest.warns(UserWarning, match="replays .* away from itself"):  # and again whenever it is used
        OrderEstimator.from_recording(path, method="linearized")


def test_mixed_precision_runs_are_retrained_and_probed_in_their_precision(tmp_path):
    path = record(tmp_path / "rec", proj_dim=64, curvature_rank=0, precision="bf16-mixed")
    rec = Recording.open(path)
    assert rec.manifest["precision"] == "bf16-mixed"
    truth = retrain(path, rec.order)
    torch.testing.assert_close(truth.loss_curve.float(), torch.tensor(rec.probe_scalars["val_loss"]), atol=1e-5, rtol=0)
    record_sensitivities(path, curvature_rank=0, hessian_rank=2, accelerator="cpu", check_orders=0, verbose=False)
    # probed in float32 instead, the gradients were not bf16 training's: the drift was near the tolerance
    assert Recording.open(path).manifest["sensitivity"]["reference_replay_drift"] < REPLAY_DRIFT_TOLERANCE / 10


def _sync_batchnorm_probe(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        plain = torch.nn.BatchNorm1d(4)
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        synced.load_state_dict({"0." + k: v for k, v in plain.state_dict().items()})
        batch = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
        from lpl.order.rng import as_in_training, capture_rng

        with as_in_training(synced, [True, True], capture_rng()):  # on CPU, a sync would raise; it must not sync
            got = synced(batch)
        torch.save({"got": got, "plain": plain.train()(batch), "running": synced[0].running_mean.clone()},
                   f"{out}{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batchnorm_probes_do_not_all_reduce_across_ranks(tmp_path):
    """Under DDP each rank probes whole pool batches of its own: SyncBatchNorm must normalise with that batch's
    statistics alone, like BatchNorm (an all-reduce would mix two batches, or hang when ranks probe unequal counts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_sync_batchnorm_probe, args=(port, str(tmp_path / "rank")), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}", weights_only=True)
        torch.testing.assert_close(result["got"], result["plain"])
        assert torch.equal(result["running"], torch.zeros(4))  # buffers untouched by the probe


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_coupled"])
def test_param_groups_with_their_own_weight_decay(decoupled, tmp_path):
    """Biases without weight decay (two param groups): recorded per parameter, replayed exactly by the full-space
    methods, refused by the projected ones."""
    model = BiasesWithoutDecay(decoupled=decoupled, lr=0.01, weight_decay=0.5)
    path = record(tmp_path / "rec", proj_dim=64, curvature_rank=0, model=model)
    rec = Recording.open(path)
    decays = rec.manifest["optimizer"]["weight_decays"]
    assert decays == [0.5 if name.endswith("weight") else 0.0 for name, _ in model.named_parameters()]
    with pytest.raises(LplError, match="param groups had their own"):
        OrderEstimator.from_recording(path, method="first_order")
    record_sensitivities(path, curvature_rank=2, hessian_rank=4, accelerator="cpu", check_orders=0, verbose=False)
    # with the first group's decay for every parameter instead, the reference order did not replay to itself
    assert Recording.open(path).manifest["sensitivity"]["reference_replay_drift"] < REPLAY_DRIFT_TOLERANCE / 10
    for method in ("linearized", "adjoint"):
        estimator = OrderEstimator.from_recording(path, method=method)
        assert estimator.estimate(rec.order).final_loss == pytest.approx(rec.probe_scalars["val_loss"][-1], abs=1e-4)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rec.order), generator=generator).tolist()
    estimate = OrderEstimator.from_recording(path, method="linearized").estimate(order).final_loss
    truth = retrain(path, order).final_loss
    assert abs(estimate - truth) < abs(rec.probe_scalars["val_loss"][-1] - truth) + 1e-3
    # a module whose code now builds another number of groups (names and shapes unchanged) is another run: it
    # retrained silently with the recorded decays skipped
    for step in rec.manifest["steps"]:
        step["group_weight_decay"] = [*step["group_weight_decay"], 0.0]
    with pytest.raises(LplError, match=r"2 param group\(s\) \(recorded 3, with weight decays"):
        retrain(rec, order)


def test_a_module_that_logs_in_training_step_is_recorded_probed_and_retrained(tmp_path):
    # probes call training_step from hooks where Lightning refuses self.log (on_train_end, after fit): it is
    # silenced there, and only there
    path = record(tmp_path / "rec", proj_dim=64, curvature_rank=2, model=LoggingClassifier())
    record_sensitivities(path, curvature_rank=2, hessian_rank=2, accelerator="cpu", check_orders=1, verbose=False)
    rec = Recording.open(path)
    truth = retrain(path, rec.order)
    torch.testing.assert_close(truth.loss_curve.float(), torch.tensor(rec.probe_scalars["val_loss"]), atol=1e-5, rtol=0)


def test_a_model_class_that_cannot_be_imported_is_a_clear_error(noisy_recording):
    from lpl.order.retraining import rebuild

    rec = Recording.open(noisy_recording)
    rec.manifest["model"]["class_path"] = "__main__.ScriptModel"  # defined in the recording script itself
    with pytest.raises(LplError, match="made from a script that defined ScriptModel"):
        rebuild(rec, rec.order)
    rec.manifest["model"]["class_path"] = "not_installed_package.Model"
    with pytest.raises(LplError, match="install the package"):
        rebuild(rec, rec.order)
