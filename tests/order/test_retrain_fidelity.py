"""retrain() reproduces what the recorded run did beyond its batches: its epochs (current_epoch, epoch hooks), its
frozen and deferred (configure_model, lazy) parameters, with the user's own Trainer callbacks added."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn

from lpl.order import Recording, TrainOrderRecorder, retrain
from lpl.utils.errors import LplError
from test_estimator_task import TinyClassifier, TinyDigits

TWO_EPOCHS = dict(max_steps=-1, max_epochs=2)


class EpochDependent(TinyClassifier):
    """No dropout and no label smoothing in the first epoch, both from the second (set per epoch, as schedules in
    on_train_epoch_start and losses reading current_epoch do)."""

    def on_train_epoch_start(self):
        self.net[3].p = 0.0 if self.current_epoch == 0 else 0.5

    def loss(self, batch):
        smoothing = 0.0 if self.current_epoch == 0 else 0.3
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"], label_smoothing=smoothing)


class EpochsSeen(L.Callback):
    """(step, epoch) of every training step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, trainer.current_epoch))


class WithBackbone(TinyClassifier):
    """Exposes ``backbone`` for Lightning's BackboneFinetuning."""

    @property
    def backbone(self):
        return self.net[0]


class _BuildsItsOwnLayers(L.LightningModule):
    """TinyClassifier's training with layers its subclasses build later than ``__init__``."""

    def loss(self, batch):
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class BuiltInConfigureModel(_BuildsItsOwnLayers):
    """Builds its layers in configure_model (Lightning's hook for large models, FSDP, meta-device init)."""

    def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(64, self.hparams.hidden), nn.Tanh(), nn.Linear(self.hparams.hidden, 10))


class LazyClassifier(_BuildsItsOwnLayers):
    """Infers its input size at its first forward (nn.LazyLinear), which Lightning's sanity check runs."""

    def __init__(self, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.Linear(hidden, 10))


def _record(path, model, datamodule=None, callbacks=(), **settings):
    """Record 4 steps of ``model`` (Trainer ``settings`` override), with ``callbacks`` next to the recorder."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    defaults = dict(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                    use_distributed_sampler=False)
    recorder = TrainOrderRecorder(path, proj_dim=32, store_dtype="float32")
    trainer = L.Trainer(**{**defaults, **settings}, callbacks=[recorder, *callbacks])
    trainer.fit(model, datamodule=datamodule or TinyDigits())
    return path


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """6 steps in 2 epochs of 3 batches."""
    return _record(tmp_path_factory.mktemp("epochs") / "rec", EpochDependent(lr=0.01), TinyDigits(num_train=96),
                   **TWO_EPOCHS)


def test_epoch_dependent_training_is_retrained_in_the_recorded_epochs(two_epochs):
    rec = Recording.open(two_epochs)
    assert rec.num_steps == 6 and rec.manifest["batches_per_epoch"] == 3
    truth = retrain(rec, rec.order, accelerator="cpu")
    torch.testing.assert_close(truth.loss_curve, torch.tensor(rec.probe_scalars["val_loss"], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # any order keeps the epochs, a shorter last one included
    epochs = EpochsSeen()
    retrain(rec, rec.order[::-1], max_steps=5, accelerator="cpu", trainer_kwargs={"callbacks": [epochs]})
    assert epochs.seen == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]


def test_a_recording_without_its_epoch_length_is_retrained_as_one_epoch(two_epochs):
    rec = Recording.open(two_epochs)
    del rec.manifest["batches_per_epoch"]  # recorded before it was stored
    epochs = EpochsSeen()
    retrain(rec, rec.order, accelerator="cpu", trainer_kwargs={"callbacks": epochs})
    assert epochs.seen == [(step, 0) for step in range(6)]


class EpochStepped(TinyClassifier):
    """A learning rate stepped once an epoch by the module's scheduler, which retraining replaces."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.3)}


def test_callbacks_in_trainer_kwargs_run_besides_retrainings_own(tmp_path):
    path = _record(tmp_path / "rec", EpochStepped(lr=0.01, dropout=0.3), TinyDigits(num_train=128), **TWO_EPOCHS)
    rec = Recording.open(path)
    epochs = EpochsSeen()
    retrained = retrain(rec, rec.order, accelerator="cpu", trainer_kwargs={"callbacks": [epochs]})
    torch.testing.assert_close(retrained.loss_curve,
                               torch.tensor(rec.probe_scalars["val_loss"], dtype=torch.float64), atol=1e-6, rtol=0)
    assert epochs.seen == [(step, step // 4) for step in range(8)]


@pytest.mark.parametrize("settings, match", [
    ({"max_steps": 3}, "may not set 'max_steps'.*retrain's max_steps stops early"),
    ({"max_epochs": 1}, "may not set 'max_epochs'"),
    ({"precision": "bf16-mixed"}, "may not set 'precision'.*recorded run's precision"),
    ({"accumulate_grad_batches": 2}, "may not set 'accumulate_grad_batches'"),
    ({"gradient_clip_val": 1.0}, "may not set 'gradient_clip_val'.*did not clip"),
    ({"limit_val_batches": 1}, "may not set 'limit_val_batches'.*dropout masks"),
    ({"devices": 2}, r"one process.*2 devices.*devices=\[index\]"),
])
def test_trainer_kwargs_that_would_retrain_another_run_are_refused(two_epochs, settings, match):
    with pytest.raises(LplError, match=match):
        retrain(two_epochs, Recording.open(two_epochs).order, accelerator="cpu", trainer_kwargs=settings)


def test_trainer_kwargs_with_the_values_retraining_uses_are_accepted(two_epochs):
    recording = Recording.open(two_epochs)
    neutral = {"precision": recording.manifest["precision"], "limit_val_batches": 0, "accumulate_grad_batches": 1,
               "gradient_clip_val": None, "max_steps": recording.num_steps, "fast_dev_run": False}
    truth = retrain(recording, recording.order, accelerator="cpu", trainer_kwargs=neutral)
    assert truth.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)
    assert recording.manifest["precision"] == "32-true"
    for short_name in ("32", 32):  # what the Trainer reads as "32-true"
        same = retrain(recording, recording.order, accelerator="cpu", trainer_kwargs={"precision": short_name})
        assert same.final_loss == truth.final_loss


def _frozen_in_script():
    model = TinyClassifier(lr=0.01)
    model.net[0].requires_grad_(False)
    return model


@pytest.mark.parametrize("make_model, callbacks, settings", [
    (_frozen_in_script, [], {}),
    (lambda: WithBackbone(lr=0.01), [BackboneFinetuning(unfreeze_backbone_at_epoch=100)], {}),
    (BuiltInConfigureModel, [], {}),
    (LazyClassifier, [], {"num_sanity_val_steps": 1, "limit_val_batches": 1}),
], ids=["frozen_in_script", "backbone_finetuning", "configure_model", "lazy"])
def test_modules_whose_parameters_a_fresh_build_lacks_are_retrained_exactly(tmp_path, make_model, callbacks, settings):
    path = _record(tmp_path / "rec", make_model(), callbacks=callbacks, **settings)
    rec = Recording.open(path)
    final = rec.probe_scalars["val_loss"][-1]
    assert retrain(rec, rec.order, accelerator="cpu").final_loss == pytest.approx(final, abs=1e-6)


def test_a_rebuilt_model_that_differs_is_refused_saying_what_differs(tmp_path):
    path = _record(tmp_path / "rec", _frozen_in_script(), max_steps=2)
    rec = Recording.open(path)
    rec.manifest["model"]["hparams"]["hidden"] = 8
    with pytest.raises(LplError, match=r"other shapes: net\.0\.weight \[8, 64\] \(recorded \[16, 64\]\)"):
        retrain(rec, rec.order, accelerator="cpu")
    rec = Recording.open(path)
    del rec.manifest["model"]["frozen"]  # recorded before the frozen parameters were stored
    with pytest.raises(LplError, match="trains 1210 values, the recorded run trained 170: .*froze or unfroze"):
        retrain(rec, rec.order, accelerator="cpu")


class AttentionClassifier(_BuildsItsOwnLayers):
    """The digits as 8 tokens of 8 pixels through nn.TransformerEncoderLayer, whose eval-mode forward without
    autograd takes PyTorch's fused fast path (other rounding in bfloat16 than the autograd path)."""

    def __init__(self, lr: float = 0.003) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Unflatten(1, (8, 8)), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                                                   batch_first=True),
                                 nn.Flatten(), nn.Linear(64, 10))


def test_losses_are_recorded_as_validation_measures_them_when_autograd_changes_the_path(tmp_path):
    path = _record(tmp_path / "rec", AttentionClassifier(), precision="bf16-mixed")
    rec = Recording.open(path)
    retrained = retrain(rec, rec.order, accelerator="cpu", batch_losses=True)
    recorded = torch.tensor(rec.probe_scalars["val_loss"], dtype=torch.float64)
    # the autograd path's loss was 1e-4 off at every step, from the first (same weights)
    torch.testing.assert_close(retrained.loss_curve, recorded, atol=1e-6, rtol=0)
    torch.testing.assert_close(retrained.batch_losses.double(), rec.step(rec.num_steps, ["loss"])["loss"].double(),
                               atol=1e-6, rtol=0)


class CountsLossesWithoutGrad(TinyClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.without_grad = 0

    def loss(self, batch):
        self.without_grad += not torch.is_grad_enabled()
        return super().loss(batch)


def test_losses_the_autograd_path_measures_alike_are_measured_once(tmp_path):
    model = CountsLossesWithoutGrad()
    path = _record(tmp_path / "rec", model)
    # the first probe compares the two ways on the validation set (300 samples, batches of 256); equal, nothing is
    # measured twice again
    assert model.without_grad == 2
    rec = Recording.open(path)
    torch.testing.assert_close(retrain(rec, rec.order, accelerator="cpu").loss_curve,
                               torch.tensor(rec.probe_scalars["val_loss"], dtype=torch.float64), atol=1e-6, rtol=0)
