"""BlockPruneCallback inside Trainer.fit: train-then-prune, distillation, logging, saving, bad options."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lpl.data.mnist import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.prune import BlockPruneCallback, PruneResult
from lpl.prune.blocks import expand_block_mask
from lpl.utils.errors import LplError


class TeacherSeen(L.Callback):
    def __init__(self) -> None:
        self.teacher_at_step: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher_at_step[trainer.global_step] = pl_module.teacher is not None


def test_train_then_prune_with_distillation_logs_and_saves(tmp_path):
    torch.manual_seed(0)
    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                          num_heads=2, schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, distill=True,
                               prune_after_steps=2)
    seen = TeacherSeen()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lpl-tests")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=[prune, seen])
    trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=32, val_size=100))
    assert seen.teacher_at_step == {0: False, 1: False, 2: True, 3: True}
    assert abs(prune.result.flops_keep - 0.5) <= 0.01
    for stage in ("dense", "pruned", "finetuned"):
        assert 0.0 <= prune.metrics[f"prune/{stage}_val_acc"] <= 1.0
    # the final numbers are the fine-tuned model's own: plain loss and accuracy over the whole validation set
    data = trainer.datamodule
    model.eval()
    with torch.no_grad():
        val = list(data.val_dataloader())
        logits = torch.cat([model(b["image"]) for b in val])
        labels = torch.cat([b["label"] for b in val])
    assert prune.metrics["prune/finetuned_val_acc"] == pytest.approx(
        float((logits.argmax(-1) == labels).float().mean()))
    assert prune.metrics["prune/finetuned_val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    for name, mask in prune.result.block_masks.items():
        weight = model.get_submodule(name).weight
        assert (weight[~expand_block_mask(mask, tuple(weight.shape), (8, 8))] == 0).all()
    saved = list(tmp_path.rglob("prune_result/result.json"))
    assert len(saved) == 1 and "checkpoints" in str(saved[0])
    assert PruneResult.load(saved[0].parent).block_masks.keys() == prune.result.block_masks.keys()


def test_given_result_is_applied_without_pruning(tmp_path, tiny_vit, batches):
    from lpl.prune import prune_model

    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                          num_heads=2, schedule="constant")
    result = prune_model(model, batches, block_size=(8, 8), flops_keep=0.3)
    result.save(tmp_path / "given")
    callback = BlockPruneCallback(result=str(tmp_path / "given"), evaluate=False, result_path=str(tmp_path / "out"),
                                  distill=True)
    seen = TeacherSeen()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not taken for a resume ("no dense teacher")
        warnings.filterwarnings("ignore",
                                message=".*(does not have many workers|isinstance.treespec|log_every_n_steps)")
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, limit_val_batches=0, callbacks=[callback, seen]).fit(
            model, datamodule=MNIST5kDataModule(batch_size=32, val_size=100))
    assert seen.teacher_at_step == {0: True, 1: True}  # the dense model, copied before the masks, teaches
    assert callback.result.prune_seconds == pytest.approx(result.prune_seconds)
    weight = model.model.blocks[0].mlp.fc1.weight
    mask = expand_block_mask(result.block_masks["model.blocks.0.mlp.fc1"], tuple(weight.shape), (8, 8))
    assert (weight[~mask] == 0).all()
    assert (tmp_path / "out" / "result.json").is_file()


def test_a_run_too_short_to_reach_prune_after_steps_says_so(tmp_path):
    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                          num_heads=2, schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), calib_batches=2, distill=False, prune_after_steps=50)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[prune])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=32, val_size=100))
    messages = [str(w.message) for w in warned]
    assert any("ends after 2 steps, before prune_after_steps=50" in m for m in messages)
    assert any("stopped at step 2" in m and "not pruned" in m for m in messages)
    assert prune.result is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(flops_keep=1.5), "flops_keep"),
    (dict(calib_batches=0), "calib_batches"),
    (dict(calib_batches=2.5), "calib_batches"),  # was taken, and calibrated on the whole training loader
    (dict(calib_batches=True), "calib_batches"),
    (dict(calib_batches="4"), "calib_batches"),
    (dict(prune_after_steps=-1), "prune_after_steps"),
    (dict(prune_after_steps=1.5), "prune_after_steps"),
    (dict(prune_after_steps=True), "prune_after_steps"),
    (dict(prune_after_steps="2"), "prune_after_steps"),
    (dict(min_density=0.5, max_density=0.2), "min_density"),
])
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(LplError, match=match):
        BlockPruneCallback(**kwargs)


def test_integer_options_take_numpy_ints():
    import numpy as np

    callback = BlockPruneCallback(calib_batches=np.int64(3), prune_after_steps=np.int32(2))
    assert (callback.calib_batches, callback.prune_after_steps) == (3, 2)


class LoggingViT(L.LightningModule):
    """The most common LightningModule: no ``loss(batch)``, a training_step that logs with ``self.log``."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                       embed_dim=32, depth=1, num_heads=2, pretrained=False)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.model(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_module_that_logs_in_training_step_is_pruned_at_fit_start(tmp_path):
    torch.manual_seed(0)
    model = LoggingViT()
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=200, evaluate=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[prune])
    # more calibration batches than an epoch has (4,900 images in batches of 32): calibrated on those, said so
    with pytest.warns(UserWarning, match="calib_batches=200, but the training loader yields 153 batches"):
        trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=32, val_size=100))
    assert abs(prune.result.flops_keep - 0.5) <= 0.01
    assert "log" not in vars(model)  # the probes' silencing is undone: training logged as usual
    assert "train_loss" in trainer.callback_metrics


def test_prunes_a_model_trained_in_bf16_true_precision(tmp_path):
    """The calibration and evaluation batches reach the module as training's do: converted to bfloat16."""
    torch.manual_seed(0)
    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                          schedule="constant")
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-true", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=2, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[prune])
    trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=32, val_size=64))
    assert abs(prune.result.flops_keep - 0.5) <= 0.01
    assert next(model.parameters()).dtype == torch.bfloat16
    assert {"prune/dense_val_acc", "prune/pruned_val_acc", "prune/finetuned_val_acc"} <= set(prune.metrics)


class StepCount(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def _fails_before_any_step(tmp_path, module: L.LightningModule, match: str, **options) -> None:
    """Fitting ``module`` with a BlockPruneCallback that prunes after 3 steps fails at fit start, with ``match``."""
    prune = BlockPruneCallback(block_size=(8, 8), calib_batches=2, prune_after_steps=3, evaluate=False, **options)
    count = StepCount()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[prune, count])
    with pytest.raises(LplError, match=match):
        trainer.fit(module, datamodule=MNIST5kDataModule(batch_size=32, val_size=100))
    assert count.steps == 0


def test_distill_on_a_module_without_set_teacher_fails_at_fit_start_not_after_prune_after_steps(tmp_path):
    _fails_before_any_step(tmp_path, LoggingViT(), "distill=True needs LoggingViT to have set_teacher", distill=True)


class ManualLoggingViT(LoggingViT):
    """Manual optimization: its training step steps the optimizer, which calibration must not run."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_without_a_loss_method_fails_at_fit_start(tmp_path):
    _fails_before_any_step(tmp_path, ManualLoggingViT(), "manual optimization")
