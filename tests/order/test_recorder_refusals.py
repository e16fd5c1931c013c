"""What TrainOrderRecorder refuses, or warns about, as soon as it can tell: lazy layers that no forward has built,
hyperparameters that cannot rebuild the recorded classes, a run that diverges, and gradients rewritten between
backward and Adam's update (which neither the probes nor retraining replay)."""

from __future__ import annotations

import math
import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lpl.order import Recording, TrainOrderRecorder, retrain
from lpl.utils.errors import LplError
from test_estimator_task import TinyClassifier, TinyDigits


# recordings compared bitwise across runs: one thread, one summation order
pytestmark = pytest.mark.usefixtures("one_thread")


def _record(path, model, datamodule=None, callbacks=(), before=(), probe_every=1, **overrides) -> Recording:
    """Record 4 steps of ``model`` (one epoch of TinyDigits(num_train=128)); ``before``: callbacks listed before the
    recorder, ``callbacks`` after it."""
    L.seed_everything(0, verbose=False)
    recorder = TrainOrderRecorder(path, proj_dim=16, probe_every_n_steps=probe_every, curvature_rank=0,
                                  store_dtype="float32")
    settings = {"max_steps": 4, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                "num_sanity_val_steps": 0, "use_distributed_sampler": False,
                "callbacks": [*before, recorder, *callbacks]}
    trainer = L.Trainer(**{**settings, **overrides})
    trainer.fit(model, datamodule=datamodule or TinyDigits(num_train=128))
    return Recording.open(path)


def _fp16_with_grad_scaler() -> dict:
    """Trainer arguments for fp16 autocast with the GradScaler on the CPU (precision="16-mixed" alone turns into
    bf16-mixed there)."""
    return {"plugins": [MixedPrecision("16-mixed", "cpu")]}


def _messages(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


# ---- lazy layers
class LazyClassifier(TinyClassifier):
    """Its first layer takes its input size at the first forward (nn.LazyLinear)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0] = nn.LazyLinear(self.hparams.hidden)


def test_a_lazy_layer_no_forward_has_built_is_refused_before_anything_is_written(tmp_path):
    # before: torch's "Can't access the shape of an uninitialized parameter" from the recorder's on_train_start
    with pytest.raises(LplError, match=r"LazyClassifier's 'net\.0\.weight', 'net\.0\.bias' are not initialised yet.*"
                                       r"num_sanity_val_steps > 0.*nn\.Linear\(in_features, out_features\)"):
        _record(tmp_path / "rec", LazyClassifier())
    assert not (tmp_path / "rec").exists()
    # Lightning's sanity check runs a forward first, which builds the layer
    recording = _record(tmp_path / "sane", LazyClassifier(), num_sanity_val_steps=1, limit_val_batches=1)
    assert recording.status == "complete"


# ---- hyperparameters that do not rebuild the classes
class ExtraArgs(TinyClassifier):
    """Its own arguments; TinyClassifier.__init__ saved the parent's too, and Lightning merges both."""

    def __init__(self, width: int = 16, lr: float = 0.01) -> None:
        super().__init__(hidden=width, lr=lr)
        self.save_hyperparameters()


class ResizedDigits(TinyDigits):
    """The same mistake in a DataModule: TinyDigits saved batch_size, seed, ... which this __init__ does not take."""

    def __init__(self, size: int = 32, batches=None, order=None) -> None:
        super().__init__(batch_size=size, batches=batches, order=order, num_train=128)
        self.save_hyperparameters()


@pytest.mark.parametrize("model, datamodule, cause, retraining", [
    (ExtraArgs(), TinyDigits(num_train=128), r"ExtraArgs cannot be rebuilt .*takes no 'dropout', 'hidden', 'norm'",
     "ExtraArgs cannot be built again from its recorded hyperparameters .*takes no 'dropout'"),
    (TinyClassifier(), ResizedDigits(), (r"ResizedDigits cannot be rebuilt .*takes no 'batch_size', 'eval_batch_size', "
                                         r"'num_train' and 1 more"),
     "ResizedDigits cannot be built again .*takes no 'batch_size'"),
], ids=["module", "datamodule"])
def test_hyperparameters_that_cannot_rebuild_a_class_are_warned_of_when_recording_starts(tmp_path, model, datamodule,
                                                                                       cause, retraining):
    # before: recorded without a word; retrain failed after the whole run
    with pytest.warns(UserWarning, match=cause + r".*retrain, record_sensitivities .* will fail.*save_hyperparameters"):
        recording = _record(tmp_path / "rec", model, datamodule, max_steps=1)
    with pytest.raises(LplError, match=retraining):  # what the warning foretold
        retrain(recording, recording.order, accelerator="cpu")


def test_hyperparameters_that_rebuild_the_classes_pass_silently(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _record(tmp_path / "rec", LazyClassifier(lr=0.01), num_sanity_val_steps=1, limit_val_batches=1, max_steps=1)
    assert not _messages(caught, "cannot be rebuilt")  # **kwargs takes the parent's arguments


# ---- a run that diverges
def test_a_diverged_run_is_warned_of_once_at_the_first_probe_that_sees_it(tmp_path):
    # float16 weights: Adam's eps=1e-8 rounds to 0, so the first update divides 0 by 0 where a pixel is always blank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recording = _record(tmp_path / "rec", TinyClassifier(lr=0.01), precision="16-true")
    diverged = _messages(caught, "diverged")
    assert len(diverged) == 1, diverged  # before: none
    assert re.search(r"diverged by step 1: the probe there found a validation loss of nan and non-finite gradients or "
                     r"losses for 4 of the 4 pool batches.*meaningless.*lower learning rate.*precision='16-true'",
                     diverged[0]), diverged[0]
    # the recording itself is whole: every step and probe, the NaNs as they were
    recording.verify()
    assert recording.status == "complete" and recording.probe_steps == [0, 1, 2, 3, 4]
    assert math.isfinite(recording.probe_scalars["val_loss"][0]) and math.isnan(recording.probe_scalars["val_loss"][1])


def test_a_run_that_stays_finite_is_not_called_diverged(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _record(tmp_path / "rec", TinyClassifier(lr=0.01), precision="bf16-true")
    assert not _messages(caught, "diverged")


# ---- gradients rewritten between backward and Adam's update
class ClipsGradients(L.Callback):
    """Clips the gradients in one hook, from a given step on (the way a user's callback clips them)."""

    def __init__(self, hook: str, from_step: int = 0) -> None:
        self.hook, self.from_step = hook, from_step

    def _clip(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str) -> None:
        if hook == self.hook and trainer.global_step >= self.from_step:
            nn.utils.clip_grad_norm_(pl_module.parameters(), 0.05)

    def on_after_backward(self, trainer, pl_module):
        self._clip(trainer, pl_module, "on_after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._clip(trainer, pl_module, "on_before_optimizer_step")


class ClipsInItsHook(TinyClassifier):
    def on_before_optimizer_step(self, optimizer):
        nn.utils.clip_grad_norm_(self.parameters(), 0.05)


class ClipsInBackward(TinyClassifier):
    def backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)
        nn.utils.clip_grad_norm_(self.parameters(), 0.05)


class ReadsGradients(L.Callback):
    """Only looks at the gradients (a gradient-norm logger): nothing to refuse."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norm = float(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).norm())


@pytest.mark.parametrize("model, before, after, precision", [
    (TinyClassifier, [], [ClipsGradients("on_before_optimizer_step")], {}),
    (TinyClassifier, [], [ClipsGradients("on_before_optimizer_step")], _fp16_with_grad_scaler()),
    (TinyClassifier, [ClipsGradients("on_after_backward")], [], {}),
    (ClipsInItsHook, [], [], {"precision": "bf16-mixed"}),
    (ClipsInBackward, [], [], {}),
], ids=["callback-after-the-recorder", "fp16-grad-scaler", "callback-before-the-recorder", "module-hook",
        "module-backward"])
def test_gradients_rewritten_between_backward_and_the_step_are_refused_at_that_step(tmp_path, model, before, after,
                                                                                   precision):
    # before: recorded without a word, and retraining (which runs no callbacks) trained another run
    with pytest.raises(LplError, match=r"at step 0 Adam stepped with other gradients than backward computed: they "
                                       r"differ by [0-9.]+, 0\.[0-9]+ of the gradients' norm .*clipping"):
        _record(tmp_path / "rec", model(lr=0.01), before=before, callbacks=after, **precision)
    assert not (tmp_path / "rec").exists()  # refused before its first recorded step: nothing left


def test_a_rewrite_that_starts_later_is_refused_at_the_first_probe_after_it_and_the_steps_before_kept(tmp_path):
    with pytest.raises(LplError, match="at step 2 Adam stepped with other gradients"):
        _record(tmp_path / "rec", TinyClassifier(lr=0.01), callbacks=[ClipsGradients("on_before_optimizer_step", 1)],
                probe_every=2)
    recording = Recording.open(tmp_path / "rec")
    recording.verify()
    assert recording.status != "complete" and len(recording.manifest["steps"]) == 2


@pytest.mark.parametrize("precision", [{}, {"precision": "bf16-mixed"}, _fp16_with_grad_scaler(),
                                       {"precision": "bf16-true"}],
                         ids=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_runs_that_rewrite_no_gradients_pass_the_check_in_every_precision(tmp_path, precision):
    """Dropout and BatchNorm (training modes and random masks), mixed precision and the fp16 GradScaler's unscaling,
    and a callback that only reads the gradients."""
    reader = ReadsGradients()
    recording = _record(tmp_path / "rec", TinyClassifier(lr=0.01, dropout=0.3, norm=True), callbacks=[reader],
                        **precision)
    assert recording.status == "complete" and reader.norm > 0
