"""BlockPruneCallback across a run's life: resume before pruning, fitting again, evaluating checkpoints, a crash
while fine-tuning. What it does follows from the weights in hand, never from state an earlier stage left."""

import random
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lpl.data.mnist import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.prune import BlockPruneCallback, PruneResult
from lpl.utils.errors import LplError


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _model(**kwargs):
    torch.manual_seed(0)
    return ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                         **kwargs)


def _data():
    return MNIST5kDataModule(batch_size=32, val_size=100)


def _trainer(root, callbacks, **kwargs):
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=root)
    return L.Trainer(**{**options, **kwargs}, callbacks=callbacks)


class FirstSampleOfStep(L.Callback):
    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[trainer.global_step] = int(batch["index"][0])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_mid_epoch_resume_before_pruning_trains_the_batches_of_the_uninterrupted_run(tmp_path, schedule):
    """The cosine schedule reads the run's length and the callback checks it against prune_after_steps: done before
    the checkpoint is restored, either made Lightning drop the loader's saved position (steps 6..9 trained other
    samples, and pruning chose other masks)."""
    def run(root, ckpt_path=None):
        order = FirstSampleOfStep()
        prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, prune_after_steps=7,
                                   evaluate=False)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
        trainer = _trainer(root, [order, prune, checkpoints], max_epochs=2, limit_train_batches=5)
        trainer.fit(_model(schedule=schedule), datamodule=_data(), ckpt_path=ckpt_path)
        return order.ids, prune.result

    full, full_result = run(tmp_path / "full")
    resumed, resumed_result = run(tmp_path / "resumed", ckpt_path=tmp_path / "ck" / "epoch=1-step=6.ckpt")
    assert [resumed[s] for s in range(6, 10)] == [full[s] for s in range(6, 10)]
    for name, mask in full_result.block_masks.items():
        assert torch.equal(resumed_result.block_masks[name], mask)


class IndexedMLP(L.LightningModule):
    """A small classifier on (features, label, sample index) batches from a plain DataLoader."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SamplesOfStep(L.Callback):
    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[trainer.global_step] = batch[2].tolist()


class NoisyFeatures(torch.utils.data.Dataset):
    """(features + noise drawn from numpy's and Python's global generators, label, index): augmentation as many
    datasets do it in the main process."""

    def __init__(self) -> None:
        self.data = torch.utils.data.TensorDataset(torch.randn(64, 32), torch.randint(0, 10, (64,)), torch.arange(64))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        x, y, i = self.data[index]
        noise = float(np.random.normal()) + random.random()
        return x + noise, y, i * 1000 + int(1000 * abs(noise)) % 1000  # the id records the noise drawn


@pytest.mark.parametrize("generator, augment", [(True, False), (False, False), (True, True)],
                         ids=["loader generator", "global rng", "numpy and python augmentation"])
def test_calibrating_on_the_train_loader_does_not_change_the_batches_trained_after_it(tmp_path, generator, augment):
    """Calibration iterates the user's shuffled loader: it drew from the loader's generator (or torch's, numpy's or
    Python's global RNG), and the next epoch trained other batches than the same run without the callback."""
    def run(callbacks):
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
        data = (NoisyFeatures() if augment else
                torch.utils.data.TensorDataset(torch.randn(64, 32), torch.randint(0, 10, (64,)), torch.arange(64)))
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                             generator=torch.Generator().manual_seed(1) if generator else None)
        order = SamplesOfStep()
        _trainer(tmp_path, [order, *callbacks], max_epochs=2, limit_val_batches=0,
                 enable_checkpointing=False).fit(IndexedMLP(), train_dataloaders=loader)
        return order.ids

    alone = run([])
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, prune_after_steps=2,
                               evaluate=False)
    pruned = run([prune])
    assert prune.result is not None and len(alone) == 8
    assert pruned == alone


class ReadsRunLengthEarly(ViTClassifier):
    """As Lightning's docs suggest for schedulers: the run's length read while optimizers are configured."""

    def configure_optimizers(self):
        self.planned_steps = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()


def test_mid_epoch_resume_of_a_module_that_reads_the_run_length_early_keeps_the_loader_position(tmp_path):
    """Lightning then builds the train loader before restoring the checkpoint and drops its position
    (https://github.com/Lightning-AI/pytorch-lightning/issues/20550): the callback hands it back at train start."""
    def run(root, ckpt_path=None):
        order = FirstSampleOfStep()
        prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, prune_after_steps=7,
                                   evaluate=False)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
        torch.manual_seed(0)
        model = ReadsRunLengthEarly(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                                    num_heads=2, schedule="constant")
        _trainer(root, [order, prune, checkpoints], max_epochs=2, limit_train_batches=5).fit(
            model, datamodule=_data(), ckpt_path=ckpt_path)
        return order.ids

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "ck" / "epoch=1-step=6.ckpt")
    assert [resumed[s] for s in range(6, 10)] == [full[s] for s in range(6, 10)]


def test_fitting_again_keeps_masks_and_the_dense_teacher(tmp_path):
    model = _model(schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, distill=True, evaluate=False)
    _trainer(tmp_path, [prune], max_steps=2, enable_checkpointing=False).fit(model, datamodule=_data())
    teacher, first = model.teacher, prune.result
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _trainer(tmp_path, [prune], max_steps=4, enable_checkpointing=False).fit(model, datamodule=_data())
    assert not any("no dense model to distil from" in str(w.message) for w in warned)
    assert prune.result is first and model.teacher is teacher  # not re-pruned; not taught by its pruned self
    assert first.is_applied(model)


def test_a_given_result_on_weights_pruned_already_does_not_teach_with_them(tmp_path):
    model = _model(schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    _trainer(tmp_path, [prune], max_steps=1, enable_checkpointing=False).fit(model, datamodule=_data())
    pruned = _model(schedule="constant")
    pruned.load_state_dict(model.state_dict())  # a fresh module loaded from the pruned checkpoint
    again = BlockPruneCallback(result=prune.result, distill=True, evaluate=False)
    with pytest.warns(UserWarning, match="no dense model to distil from"):
        _trainer(tmp_path, [again], max_steps=1, enable_checkpointing=False).fit(pruned, datamodule=_data())
    assert pruned.teacher is None


def test_a_result_restored_by_validate_does_not_replace_the_callbacks_own_pruning(tmp_path):
    """validate(ckpt_path=...) restores callback state too: a later fit of a dense model must prune as configured."""
    trained = _model(schedule="constant")
    first = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, [first, checkpoint], max_steps=2).fit(trained, datamodule=_data())
    callback = BlockPruneCallback(block_size=(8, 8), flops_keep=0.3, calib_batches=2, distill=True, evaluate=False)
    trainer = _trainer(tmp_path, [callback], max_steps=1, enable_checkpointing=False)
    trainer.validate(_model(schedule="constant"), datamodule=_data(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    dense = _model(schedule="constant")
    _trainer(tmp_path, [callback], max_steps=1, enable_checkpointing=False).fit(dense, datamodule=_data())
    assert abs(callback.result.flops_keep - 0.3) <= 0.01
    assert dense.teacher is not None


def test_testing_a_checkpoint_from_before_pruning_warns(tmp_path):
    model = _model(schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, prune_after_steps=3,
                               evaluate=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(tmp_path, [prune, checkpoint], max_steps=4)
    trainer.fit(model, datamodule=_data())
    with pytest.warns(UserWarning, match="not pruned by this callback's masks"):
        trainer.test(model, datamodule=_data(), ckpt_path=tmp_path / "ck" / "epoch=0-step=2.ckpt")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer.test(model, datamodule=_data(), ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert not any("not pruned by this callback" in str(w.message) for w in warned)
    # a new process (`lpl test`): a fresh callback knows the masks from the result saved beside the checkpoints
    fresh = _trainer(tmp_path, [BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False),
                                ModelCheckpoint(dirpath=tmp_path / "ck")])
    with pytest.warns(UserWarning, match="not pruned by this callback's masks"):
        fresh.test(_model(schedule="constant"), datamodule=_data(), ckpt_path=tmp_path / "ck" / "epoch=0-step=2.ckpt")
    # no checkpoint, or a model the saved result does not describe: nothing to say
    other = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fresh.test(_model(schedule="constant"), datamodule=_data())
        fresh.test(other, datamodule=_data())
    assert not any("not pruned by this callback" in str(w.message) for w in warned)


def test_a_fast_dev_run_leaves_the_real_runs_result_alone(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    _trainer(tmp_path, [prune, checkpoint], max_steps=2).fit(_model(schedule="constant"), datamodule=_data())
    saved = (tmp_path / "ck" / "prune_result" / "masks.safetensors").read_bytes()
    other = _model(schedule="constant")
    torch.manual_seed(1)
    other.apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)  # other masks
    again = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    _trainer(tmp_path, [again, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)], fast_dev_run=True).fit(
        other, datamodule=_data())
    assert any(not torch.equal(mask, prune.result.block_masks[name]) for name, mask in again.result.block_masks.items())
    assert (tmp_path / "ck" / "prune_result" / "masks.safetensors").read_bytes() == saved


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("simulated failure while fine-tuning")


def test_a_run_that_fails_while_fine_tuning_keeps_its_result_and_figures(tmp_path):
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(tmp_path, [prune, checkpoint, Crash()], max_steps=4,
                       logger=CSVLogger(tmp_path / "logs", name="run"))
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.fit(_model(schedule="constant"), datamodule=_data())
    saved = PruneResult.load(tmp_path / "ck" / "prune_result")
    from_checkpoint = PruneResult.from_checkpoint(tmp_path / "ck" / "epoch=0-step=1.ckpt")
    for name, mask in prune.result.block_masks.items():
        assert torch.equal(saved.block_masks[name], mask) and torch.equal(from_checkpoint.block_masks[name], mask)
    trainer.logger.save()
    logged = (tmp_path / "logs" / "run" / "version_0" / "metrics.csv").read_text()
    assert "prune/flops_keep" in logged and "prune/pruned_val_acc" in logged


def test_from_checkpoint_without_a_result_is_a_clear_error(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, [checkpoint], max_steps=1).fit(_model(schedule="constant"), datamodule=_data())
    with pytest.raises(Exception, match="holds no pruning result"):
        PruneResult.from_checkpoint(tmp_path / "ck" / "last.ckpt")
    with pytest.raises(Exception, match="not found"):
        PruneResult.from_checkpoint(tmp_path / "missing.ckpt")


def test_a_fresh_callback_instance_continues_the_masks_it_saved_as_ddp_spawn_workers_do(tmp_path):
    """Under ddp_spawn each fit's workers start from the launcher's callback, whose result stays None: the saved
    result, when the model carries it and the options agree, is continued rather than pruned again."""
    model = _model(schedule="constant")
    options = dict(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False, result_path=tmp_path / "r")
    first = BlockPruneCallback(**options)
    _trainer(tmp_path, [first], max_steps=2, enable_checkpointing=False).fit(model, datamodule=_data())
    again = BlockPruneCallback(**options)
    _trainer(tmp_path, [again], max_steps=3, enable_checkpointing=False).fit(model, datamodule=_data())
    for name, mask in first.result.block_masks.items():
        assert torch.equal(again.result.block_masks[name], mask)
    other = BlockPruneCallback(**{**options, "flops_keep": 0.3})  # other options: prune as asked, with a word
    with pytest.warns(UserWarning, match="carries block masks already"):
        _trainer(tmp_path, [other], max_steps=4, enable_checkpointing=False).fit(model, datamodule=_data())
    assert abs(other.result.flops_keep - 0.3) <= 0.01


def test_a_model_pruned_by_an_unseen_spawned_fit_is_pruned_again_with_a_word(tmp_path, monkeypatch):
    """Under ddp_spawn the model comes back from a fit with zero blocks and nothing else; a later fit whose saved
    result is elsewhere (another Trainer folder) prunes it a second time (pruning further is allowed): it says so, and
    how to continue the earlier masks instead. Simulated in one process: the workers' view is a callback with no
    result; the strategy check is what ddp_spawn answers."""
    from lpl.prune import callback as callback_module

    model = _model(schedule="constant")
    options = dict(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    first = BlockPruneCallback(**options, result_path=tmp_path / "first")
    _trainer(tmp_path, [first], max_steps=2, enable_checkpointing=False).fit(model, datamodule=_data())
    returned = _model(schedule="constant")  # what the main process holds after a spawned fit: the weights only
    returned.load_state_dict(model.state_dict())
    model = returned
    monkeypatch.setattr(callback_module, "_spawns_processes", lambda trainer: True)
    with pytest.warns(UserWarning, match="holds whole blocks of zeros.*prunes the pruned model again.*"
                                         "result='<that run>/prune_result'"):
        _trainer(tmp_path, [BlockPruneCallback(**options, result_path=tmp_path / "second")], max_steps=3,
                 enable_checkpointing=False).fit(_copy(model), datamodule=_data())
    again = BlockPruneCallback(**options, result_path=tmp_path / "first")  # its folder found: continued
    _trainer(tmp_path, [again], max_steps=3, enable_checkpointing=False).fit(model, datamodule=_data())
    for name, mask in first.result.block_masks.items():
        assert torch.equal(again.result.block_masks[name], mask)


@pytest.mark.parametrize("averaging", ["StochasticWeightAveraging", "EMAWeightAveraging", "second BlockPruneCallback"])
def test_callbacks_that_would_undo_the_masks_are_refused_at_fit_start(tmp_path, averaging):
    """Averaged weights (the fit's end model, EMA's checkpoints) kept values in pruned blocks; a second pruning
    callback (given its own state_key, as Lightning's error about two suggests) replaced the first's masks."""
    from lightning.pytorch import callbacks

    class Second(BlockPruneCallback):
        @property
        def state_key(self) -> str:
            return "SecondBlockPruneCallback"

    other = {"StochasticWeightAveraging": lambda: callbacks.StochasticWeightAveraging(swa_lrs=1e-3),
             "EMAWeightAveraging": lambda: callbacks.EMAWeightAveraging(),
             "second BlockPruneCallback": lambda: Second(block_size=8, calib_batches=1, include=["*fc*"])}[averaging]()
    prune = BlockPruneCallback(block_size=8, calib_batches=1, include=["*qkv"], evaluate=False, prune_after_steps=1)
    with pytest.raises(LplError, match="cannot be combined with|takes one BlockPruneCallback"):
        _trainer(tmp_path, [prune, other], max_steps=2).fit(_model(), datamodule=_data())


@pytest.mark.parametrize("averaging", ["StochasticWeightAveraging", "EMAWeightAveraging"])
def test_weight_averaging_of_weights_masked_from_fit_start_keeps_the_pruned_blocks_zero(tmp_path, averaging):
    from lightning.pytorch import callbacks

    other = {"StochasticWeightAveraging": lambda: callbacks.StochasticWeightAveraging(swa_lrs=1e-3,
                                                                                       swa_epoch_start=1),
             "EMAWeightAveraging": lambda: callbacks.EMAWeightAveraging(decay=0.5)}[averaging]()
    prune = BlockPruneCallback(block_size=8, calib_batches=1, evaluate=False)
    model = _model()
    _trainer(tmp_path, [prune, other], max_epochs=3, limit_train_batches=2).fit(model, datamodule=_data())
    assert prune.result.is_applied(model)  # the averaged weights the fit ends with are pruned too


def test_evaluation_follows_limit_val_batches_and_a_validation_loader_given_to_fit(tmp_path):
    """It read the datamodule's whole validation set whatever limit_val_batches said, and nothing without a
    datamodule."""
    data = _data()
    data.setup("fit")
    seen = []

    class Counting(torch.utils.data.DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(len(batch["index"]))
                yield batch

    val = Counting(data.val_set, batch_size=10)
    prune = BlockPruneCallback(block_size=8, calib_batches=1)
    _trainer(tmp_path, [prune], max_steps=1, limit_val_batches=2).fit(_model(), data.train_dataloader(), val)
    assert "prune/dense_val_acc" in prune.metrics and "prune/finetuned_val_loss" in prune.metrics
    assert seen == [10, 10] * 3  # dense, pruned, fine-tuned: 2 batches each (one step: Lightning validates none)
    prune = BlockPruneCallback(block_size=8, calib_batches=1)
    _trainer(tmp_path, [prune], max_steps=1, limit_val_batches=0).fit(_model(), datamodule=_data())
    assert prune.metrics == {}


def test_a_pruned_model_predicted_slower_than_dense_is_said_to_be(tmp_path):
    slow = BlockPruneCallback(block_size=8, calib_batches=1, evaluate=False)  # tiny blocks: overhead dominates
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [slow], max_steps=1).fit(_model(), datamodule=_data())
    slower = [w for w in caught if re.search(r"predicts the pruned layers [\d.]+x slower than dense at 8x8 blocks",
                                             str(w.message))]
    assert slow.result.predicted_speedup < 1 and len(slower) == 1  # said by prune_model, which users call too


def test_a_datamodule_without_validation_data_is_pruned_without_figures(tmp_path):
    class TrainOnly(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.data = _data()

        def setup(self, stage):
            self.data.setup(stage)

        def train_dataloader(self):
            return self.data.train_dataloader()

    prune = BlockPruneCallback(block_size=8, calib_batches=1)
    _trainer(tmp_path, [prune], max_steps=1, limit_val_batches=0).fit(_model(), datamodule=TrainOnly())
    assert prune.result is not None and prune.metrics == {}


def test_an_exported_model_is_refused_at_fit_start_not_after_the_steps_before_pruning(tmp_path):
    """prune_model refuses it; the callback said so only after prune_after_steps of training."""
    from lpl.prune import prune_model, to_block_sparse

    model = _model(schedule="constant")
    data = _data()
    data.setup("fit")
    batches = [next(iter(data.train_dataloader()))]
    to_block_sparse(model, prune_model(model, batches, block_size=(8, 8), flops_keep=0.5, include=["*fc1"]))
    trainer = _trainer(tmp_path, [BlockPruneCallback(block_size=(8, 8), prune_after_steps=5, evaluate=False)],
                       max_steps=8, enable_checkpointing=False)
    with pytest.raises(LplError, match="block-sparse layers already"):
        trainer.fit(model, datamodule=_data())
    assert trainer.global_step == 0
