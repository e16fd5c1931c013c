"""Setups of users' own modules and trainers: retraining reproduces the recorded run, or the recorder refuses."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lpl.data.base import ResumableDataLoader
from lpl.order import OrderEstimator, Recording, TrainOrderRecorder, retrain
from lpl.utils.errors import LplError
from test_estimator_task import TinyClassifier, TinyDigits


def _record(path, model, datamodule, callbacks=(), **trainer_kwargs):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    settings = dict(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, use_distributed_sampler=False)
    settings.update(trainer_kwargs)
    recorder = TrainOrderRecorder(path, proj_dim=64, store_dtype="float32")
    trainer = L.Trainer(callbacks=[recorder, *callbacks], **settings)
    if datamodule is None:  # loaders handed to fit directly
        data = TinyDigits()
        data.setup("fit")
        trainer.fit(model, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    else:
        trainer.fit(model, datamodule=datamodule)
    return path


def _retrains_as_recorded(path):
    recording = Recording.open(path)
    retrained = retrain(path, recording.order, accelerator="cpu")
    assert retrained.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)
    return recording


def _warm_up(trainer):
    for group in trainer.optimizers[0].param_groups:
        group["lr"] = 0.01 * (trainer.global_step + 1) / 8


class WarmUpAtBatchStart(L.Callback):
    """Sets each step's lr in its own on_train_batch_start, after the recorder's (as warm-up callbacks do)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _warm_up(trainer)


class WarmUpBeforeTheStep(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        _warm_up(trainer)


class WarmsUpItself(TinyClassifier):
    def on_before_optimizer_step(self, optimizer):  # the module's hook runs after every callback's
        _warm_up(self.trainer)


@pytest.mark.parametrize("model, callbacks", [
    (TinyClassifier(lr=0.01), [WarmUpAtBatchStart()]),
    (TinyClassifier(lr=0.01), [WarmUpBeforeTheStep()]),
    (WarmsUpItself(lr=0.01), []),
], ids=["callback_batch_start", "callback_before_step", "module_before_step"])
def test_the_learning_rate_is_recorded_as_adam_used_it(tmp_path, model, callbacks):
    path = _record(tmp_path / "rec", model, TinyDigits(), callbacks=callbacks)
    recording = _retrains_as_recorded(path)
    assert recording.scalars["lr"] == pytest.approx([0.01 * (t + 1) / 8 for t in range(8)])


class WeightDecaySchedule(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        trainer.optimizers[0].param_groups[0]["weight_decay"] = 0.5 * (trainer.global_step + 1)


class CycledMomentum(TinyClassifier):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=8)  # cycles beta1
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_hyperparameters_changed_during_the_run_are_retrained_and_flagged_for_the_estimates(tmp_path):
    with pytest.warns(UserWarning, match="weight_decay changed at step 1"):
        path = _record(tmp_path / "wd", TinyClassifier(lr=0.01), TinyDigits(), callbacks=[WeightDecaySchedule()])
    _retrains_as_recorded(path)


    with pytest.warns(UserWarning, match="beta1 changed at step 1"):
        path = _record(tmp_path / "onecycle", CycledMomentum(), TinyDigits())
    _retrains_as_recorded(path)


class GroupsApart(TinyClassifier):
    def configure_optimizers(self):
        weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        optimizer = torch.optim.AdamW([{"params": weights}, {"params": biases}], lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda t: 1.0, lambda t: 0.5 ** t])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ClipsItself(TinyClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")


class AmsgradOnBiases(TinyClassifier):
    def configure_optimizers(self):
        weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights}, {"params": biases, "amsgrad": True}], lr=0.01)


class NoEps(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, eps=0.0)


class SkipsAStep(TinyClassifier):
    """As the fp16 GradScaler does when it finds inf/nan gradients: the closure runs, Adam does not step."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.trainer.global_step == 3:
            optimizer_closure()
            return
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("model, callbacks, match", [
    (SkipsAStep(), [], "the optimizer skipped step 3"),
    (GroupsApart(), [], "at step 1 the optimizer's param groups differ in lr"),
    (ClipsItself(), [], "overrides configure_gradient_clipping"),
    (AmsgradOnBiases(), [], "not amsgrad=True or maximize=True"),
    (NoEps(), [], r"needs Adam's eps > 0 \(got \[0.0\]\)"),
    (TinyClassifier(), [L.pytorch.callbacks.GradientAccumulationScheduler({0: 2})], "accumulate_grad_batches=1"),
])
def test_setups_retraining_cannot_follow_are_refused_when_they_appear(tmp_path, model, callbacks, match):
    with pytest.raises(LplError, match=match):
        _record(tmp_path / "rec", model, TinyDigits(), callbacks=callbacks)


class PlateauScheduled(TinyClassifier):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val/loss"}}


def test_a_schedule_on_a_logged_metric_is_retrained_from_the_recorded_rates(tmp_path):
    path = _record(tmp_path / "rec", PlateauScheduled(lr=0.01), TinyDigits(num_train=128), max_steps=-1,
                   max_epochs=2, limit_val_batches=None)
    _retrains_as_recorded(path)


def test_a_run_without_a_datamodule_is_told_up_front(tmp_path):
    with pytest.warns(UserWarning, match="has no LightningDataModule"):
        _record(tmp_path / "rec", TinyClassifier(), None, max_steps=2)


class FixedOrderDigits(TinyDigits):
    """A user's DataModule that always trains its own order (no `batches` / `order` to rebuild it with another)."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__(batch_size=batch_size)


def test_a_datamodule_retraining_cannot_rebuild_is_told_up_front(tmp_path):
    with pytest.warns(UserWarning, match="FixedOrderDigits.__init__ takes no `batches` and `order`"):
        path = _record(tmp_path / "rec", TinyClassifier(), FixedOrderDigits(), max_steps=2)
    with pytest.raises(LplError, match="does not take `batches` and `order`"):
        retrain(path, Recording.open(path).order)


class MergedHparamsDigits(TinyDigits):
    """Takes batches and order, but its parent's save_hyperparameters stored the parent's arguments, not its own."""

    def __init__(self, root: str = "/data", batches=None, order=None) -> None:
        super().__init__(batches=batches, order=order)
        self.root = root


class FailsWhenRebuilt(TinyClassifier):
    """An __init__ that raises a TypeError of its own when retraining rebuilds it (its data gone, say)."""

    built = 0

    def __init__(self, **kwargs) -> None:
        FailsWhenRebuilt.built += 1
        if FailsWhenRebuilt.built > 1:
            raise TypeError("the vocabulary file is gone")
        super().__init__(**kwargs)


def test_rebuild_failures_name_their_cause(tmp_path):
    with pytest.warns(UserWarning, match="MergedHparamsDigits cannot be rebuilt"):
        path = _record(tmp_path / "data", TinyClassifier(), MergedHparamsDigits(), max_steps=2)
    with pytest.raises(LplError, match=r"MergedHparamsDigits cannot be built again.*takes no 'batch_size'"):
        retrain(path, Recording.open(path).order)  # it blamed `batches` and `order`, which it takes
    path = _record(tmp_path / "model", FailsWhenRebuilt(), TinyDigits(), max_steps=2)
    with pytest.raises(TypeError, match="the vocabulary file is gone") as raised:
        retrain(path, Recording.open(path).order)  # it blamed the recorded hyperparameters
    if sys.version_info >= (3, 11):  # exception notes
        assert "while retraining rebuilt it" in raised.value.__notes__[0]


class EpochScheduled(TinyClassifier):
    """A step-decay learning rate that steps once an epoch, as most schedules in the wild do."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.3)}


def test_a_schedule_stepped_per_epoch_over_two_epochs_is_retrained_as_recorded(tmp_path):
    path = _record(tmp_path / "rec", EpochScheduled(lr=0.01), TinyDigits(num_train=128), max_steps=-1, max_epochs=2)
    recording = Recording.open(path)
    assert recording.scalars["lr"] == pytest.approx([0.01] * 4 + [0.003] * 4)
    final = recording.probe_scalars["val_loss"][-1]
    assert retrain(path, recording.order, accelerator="cpu").final_loss == pytest.approx(final, abs=1e-5)
    assert OrderEstimator.from_recording(path).estimate(recording.order).final_loss == pytest.approx(final, abs=1e-5)


class OwnLoaderDigits(TinyDigits):
    """A user's DataModule building lpl's loader and sampler itself, without attaching the Trainer to them."""

    def train_dataloader(self):
        return ResumableDataLoader(self.train_set, batch_sampler=self.train_batch_sampler())


class OneLoaderDigits(TinyDigits):
    """Builds its training loader once and hands the same one to every fit."""

    def train_dataloader(self):
        if not hasattr(self, "loader"):
            self.loader = ResumableDataLoader(self.train_set, batch_sampler=self.train_batch_sampler())
        return self.loader


def test_a_loader_reused_by_a_second_recorded_fit_follows_the_new_trainer(tmp_path):
    data = OneLoaderDigits()
    first = Recording.open(_record(tmp_path / "first", TinyClassifier(), data, max_steps=2))
    # it kept the first, finished Trainer and went on to epoch 1's shuffle: refused at step 0
    second = Recording.open(_record(tmp_path / "second", TinyClassifier(), data, max_steps=2))
    assert second.batches == first.batches and second.status == "complete"


class ArrayIds(torch.utils.data.Dataset):
    def __init__(self, data, as_numpy: bool) -> None:
        self.data, self.as_numpy = data, as_numpy

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "index": np.int64(i) if self.as_numpy else i}


class ArrayIdDigits(TinyDigits):
    def build_datasets(self):
        train, val = super().build_datasets()
        return ArrayIds(train, as_numpy=True), val

    def train_dataloader(self):  # a collate that keeps numpy ids as a numpy array
        def collate(samples):
            batch = torch.utils.data.default_collate([{k: v for k, v in s.items() if k != "index"} for s in samples])
            return {**batch, "index": np.array([s["index"] for s in samples])}

        return ResumableDataLoader(self.train_set, batch_sampler=self.train_batch_sampler(), collate_fn=collate)


def test_sample_ids_as_a_numpy_array_are_read(tmp_path):
    recording = Recording.open(_record(tmp_path / "rec", TinyClassifier(), ArrayIdDigits(), max_steps=2))
    assert recording.status == "complete"


def test_a_user_built_lpl_loader_follows_the_trainer_when_loaders_reload_every_epoch(tmp_path):
    # unattached, the rebuilt sampler of epoch 1 trained epoch 0's shuffle again: refused at step 4 as not reproducible
    path = _record(tmp_path / "rec", EpochScheduled(lr=0.01), OwnLoaderDigits(num_train=128), max_steps=-1,
                   max_epochs=2, reload_dataloaders_every_n_epochs=1)
    recording = _retrains_as_recorded(path)
    assert recording.order == list(range(8)) and recording.status == "complete"


class RelabelledIds(torch.utils.data.Dataset):
    """The digits with other sample ids: strings, or the positions in a larger dataset (as a Subset's items keep)."""

    def __init__(self, data, ids) -> None:
        self.data, self.ids = data, ids

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "index": self.ids(i)}


class RelabelledDigits(TinyDigits):
    def __init__(self, kind: str = "string") -> None:
        super().__init__()
        self.kind = kind

    def build_datasets(self):
        train, val = super().build_datasets()
        ids = (lambda i: f"img_{i:05d}") if self.kind == "string" else (lambda i: torch.tensor(i + 1000))
        return RelabelledIds(train, ids), val


@pytest.mark.parametrize("kind, match", [
    ("string", r"batch\['index'\] must be whole numbers from 0, got 'img_.*position in the train dataset"),
    ("offset", r"yielded samples \[10\d\d.*position i in the train dataset.*sample 10\d\d is in none"),
])
def test_sample_ids_that_are_not_train_set_positions_are_named(tmp_path, kind, match):
    with pytest.raises(LplError, match=match):
        _record(tmp_path / "rec", TinyClassifier(), RelabelledDigits(kind), max_steps=2)


class NoHparams(TinyClassifier):
    """Keeps its arguments itself, without save_hyperparameters: a rebuild cannot know them."""

    def __init__(self, weight_decay: float = 0.0, lr: float = 0.01) -> None:
        L.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
        self.decay, self.rate = weight_decay, torch.tensor(lr)  # a tensor lr: torch.optim takes it

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.rate, weight_decay=self.decay)


def test_a_module_without_saved_hyperparameters_warns_and_its_other_optimizer_is_refused(tmp_path):
    with pytest.warns(UserWarning, match=r"NoHparams stores no hyperparameters.*\['weight_decay', 'lr'\]"):
        path = _record(tmp_path / "rec", NoHparams(weight_decay=0.1), TinyDigits())
    assert Recording.open(path).manifest["optimizer"]["lr"] == pytest.approx(0.01)  # the tensor, stored as a number
    with pytest.warns(UserWarning, match="rebuilt with the defaults"), pytest.raises(
            LplError, match=r"another optimizer.*weight_decay 0.0 \(recorded 0.1"):
        retrain(path, Recording.open(path).order, accelerator="cpu")


class DigitsWithoutValidation(TinyDigits):
    val_dataloader = L.LightningDataModule.val_dataloader  # Lightning's default: not defined


class OwnNames(TinyDigits):
    """Keeps its datasets under its own names and builds the loaders itself."""

    def setup(self, stage=None):
        if getattr(self, "train_data", None) is None:
            self.train_data, self.val_data = self.build_datasets()
        self.train_set = None  # nothing under lpl's names

    def train_batches(self):
        from lpl.data.samplers import SeededBatchSampler

        return SeededBatchSampler(len(self.train_data), self.batch_size, self.seed).global_batches(0)

    def train_dataloader(self):
        from lpl.data.samplers import OrderedBatchSampler, SeededBatchSampler

        sampler = (SeededBatchSampler(len(self.train_data), self.batch_size, self.seed) if self.batches is None
                   else OrderedBatchSampler(self.batches, self.order))
        return ResumableDataLoader(self.train_data, batch_sampler=sampler)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=256)


def test_validation_data_is_required_and_datasets_are_read_through_the_loaders(tmp_path):
    with pytest.raises(LplError, match="needs validation data"):
        _record(tmp_path / "none", TinyClassifier(), DigitsWithoutValidation())
    path = _record(tmp_path / "own", TinyClassifier(), OwnNames())
    recording = Recording.open(path)
    result = retrain(path, recording.order, accelerator="cpu", batch_losses=True)
    assert result.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)
    assert result.batch_losses.shape == (len(recording.batches),) and torch.isfinite(result.batch_losses).all()


class PlainLoader(TinyDigits):
    """lpl's sampler inside a plain DataLoader: Lightning's checkpoints cannot hold its position."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_sampler=self.train_batch_sampler())


def test_resuming_with_a_loader_that_keeps_no_position_is_refused(tmp_path):
    path = tmp_path / "rec"
    trainer_kwargs = dict(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                          use_distributed_sampler=False, default_root_dir=tmp_path)
    first = L.Trainer(callbacks=[TrainOrderRecorder(path, proj_dim=32)], **{**trainer_kwargs, "max_steps": 2})
    first.fit(TinyClassifier(), datamodule=PlainLoader())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = L.Trainer(callbacks=[TrainOrderRecorder(path, proj_dim=32, resume=True)], **trainer_kwargs)
    with pytest.raises(LplError, match="resumes at step 2.*ResumableDataLoader"):
        resumed.fit(TinyClassifier(), datamodule=PlainLoader(), ckpt_path=tmp_path / "step2.ckpt")


def test_a_run_in_bf16_true_precision_records_and_retrains(tmp_path):
    """The module's weights are bfloat16: probes and retraining feed it bfloat16 inputs, as training does."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "other data for the same ids" from a float32 reload
        warnings.filterwarnings("ignore", message=".*(does not have many workers|isinstance.treespec|log_every_n)")
        path = _record(tmp_path / "rec", TinyClassifier(lr=0.01), TinyDigits(), precision="bf16-true")
    recording = Recording.open(path)
    final = recording.probe_scalars["val_loss"][-1]
    assert retrain(path, recording.order, accelerator="cpu").final_loss == pytest.approx(final, abs=1e-6)
    assert OrderEstimator.from_recording(path, method="zeroth_order").estimate(recording.order).final_loss == (
        pytest.approx(final, abs=1e-6))


def test_masked_fine_tuning_warns_that_retraining_does_not_hold_the_masks(tmp_path):
    from lpl.prune import apply_masks, prune_model

    model = TinyClassifier(lr=0.01)
    datamodule = TinyDigits()
    datamodule.setup("fit")
    result = prune_model(model, [next(iter(datamodule.train_dataloader()))], block_size=8, flops_keep=0.5,
                         exclude=[], stages=1)
    apply_masks(model, result)
    with pytest.warns(UserWarning, match="trains with block masks"):
        _record(tmp_path / "rec", model, TinyDigits())


def test_which_models_draw_randomness_per_sample():
    from lpl.order.recorder import _draws_per_sample_randomness

    assert not _draws_per_sample_randomness(TinyClassifier())
    assert _draws_per_sample_randomness(TinyClassifier(dropout=0.1))
    assert _draws_per_sample_randomness(TinyClassifier(norm=True))


class DiesAtTheEnd(L.Callback):
    """Stands for a kill after the last step's checkpoint, before the recorder's final probe."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("killed")


def test_resuming_from_the_last_steps_checkpoint_says_the_recording_cannot_be_finished(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(callbacks, resume=False, ckpt_path=None):
        recorder = TrainOrderRecorder(tmp_path / "rec", proj_dim=64, store_dtype="float32", resume=resume)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            use_distributed_sampler=False, callbacks=[*callbacks, recorder, checkpoint])
        trainer.fit(TinyClassifier(), datamodule=TinyDigits(), ckpt_path=ckpt_path)

    with pytest.raises(RuntimeError, match="killed"):
        fit([DiesAtTheEnd()])
    assert Recording.open(tmp_path / "rec").status == "recording"
    with pytest.raises(LplError, match="trained no step .*the run.s last"):
        fit([], resume=True, ckpt_path=tmp_path / "ck" / "last.ckpt")
