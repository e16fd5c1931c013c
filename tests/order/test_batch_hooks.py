"""Batches the order tools load themselves pass through the module's batch-transfer hooks, as training's do: an
on-device transform in on_after_batch_transfer is part of what the model trains and is validated on."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lpl.order import Recording, retrain
from lpl.order.estimator import replay_data_from_recording
from test_estimator_task import TinyClassifier, TinyDigits, record


class StandardisesOnDevice(TinyClassifier):
    """Standardises images in on_after_batch_transfer (Lightning's place for on-device transforms)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {**batch, "image": (batch["image"] - 0.3) / 0.2}


def test_recorded_losses_and_gradients_see_the_transformed_batches(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = record(tmp_path / "rec", model=StandardisesOnDevice(lr=0.01))
    assert not [w for w in caught if "loading the samples" in str(w.message)]
    recording = Recording.open(path)
    model = StandardisesOnDevice(lr=0.01)
    model.load_state_dict(retrain_final_state(recording))
    validated = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False).validate(model, datamodule=TinyDigits(), verbose=False)
    assert recording.probe_scalars["val_loss"][-1] == pytest.approx(validated[0]["val/loss"], abs=1e-5)
    # the probes' pool-batch losses are those of the batches training saw: at step 0, from the initial weights
    initial = StandardisesOnDevice(lr=0.01)
    initial.load_state_dict(recording.initial_state())
    datamodule = TinyDigits()
    datamodule.setup("fit")
    samples = [datamodule.train_dataloader().dataset[i] for i in recording.batches[0]]
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
    with torch.no_grad():
        expected = float(initial.loss(initial.on_after_batch_transfer(batch, 0)))
    stored = replay_data_from_recording(recording).loss[0, 0]
    assert float(stored) == pytest.approx(expected, abs=1e-5)


def retrain_final_state(recording: Recording) -> dict[str, torch.Tensor]:
    states = {}

    class Grab(L.Callback):
        def on_train_end(self, trainer, pl_module):
            states.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    truth = retrain(recording, recording.order, accelerator="cpu", trainer_kwargs={"callbacks": [Grab()]})
    assert truth.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)
    return states


class TransformsTrainingBatches(TinyClassifier):
    """A transform for training batches only (Lightning's ``if self.trainer.training`` pattern)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {**batch, "image": batch["image"].flip(-1) * 3.0} if self.trainer.training else batch


def test_validation_batches_loaded_during_training_skip_a_training_only_transform(tmp_path):
    model = TransformsTrainingBatches(lr=0.01)
    datamodule = TinyDigits()
    datamodule.setup("fit")
    with torch.no_grad():
        batches = list(datamodule.val_dataloader())
        clean = sum(float(model.loss(b)) * len(b["index"]) for b in batches) / sum(len(b["index"]) for b in batches)
    path = record(tmp_path / "rec", model=model)
    recording = Recording.open(path)
    assert recording.probe_scalars["val_loss"][0] == pytest.approx(clean, abs=1e-6)
    truth = retrain(recording, recording.order, accelerator="cpu")
    assert truth.loss_curve.tolist() == pytest.approx(recording.probe_scalars["val_loss"], abs=1e-5)
