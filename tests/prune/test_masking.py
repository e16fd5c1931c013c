"""Masks stay fixed through optimizer steps, and through a checkpoint save + Trainer resume."""

import gc

import lightning as L
import pytest
import torch
import torch.optim.optimizer as optimizer_module
from lightning.pytorch.callbacks import ModelCheckpoint

from lpl.data.mnist import MNIST5kDataModule
from lpl.models import ViTClassifier
from lpl.prune import BlockPruneCallback, apply_masks, prune_model
from lpl.prune.masking import has_masks
from lpl.prune.blocks import expand_block_mask


def pruned_positions(model, result):
    return {name: ~expand_block_mask(mask, result.shapes[name], result.block_size)
            for name, mask in result.block_masks.items()}


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "rmsprop_momentum": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.9),
}


def train(model, optimizer, batches, pruned=None):
    for batch in batches:
        optimizer.zero_grad()
        model.loss(batch).backward()
        for name, where in (pruned or {}).items():
            assert (model.get_submodule(name).weight.grad[where] == 0).all()
        optimizer.step()


@pytest.mark.parametrize("passed", [True, False], ids=["optimizer_passed", "optimizer_not_passed"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_weights_grads_and_optimizer_state_stay_zero(tiny_vit, batches, kind, passed):
    """Dense steps first leave momentum on every entry; whether or not the optimizer is handed to apply_masks, its
    steps leave pruned weights and their state at zero (an unnamed one moved them before)."""
    optimizer = OPTIMIZERS[kind](tiny_vit.parameters())
    train(tiny_vit, optimizer, batches)
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.4)
    before = {n: tiny_vit.get_submodule(n).weight.detach().clone() for n in result.block_masks}
    apply_masks(tiny_vit, result, optimizers=[optimizer] if passed else [])
    pruned = pruned_positions(tiny_vit, result)
    train(tiny_vit, optimizer, batches[:3], pruned)
    for name, where in pruned.items():
        weight = tiny_vit.get_submodule(name).weight
        assert (weight[where] == 0).all()
        for value in optimizer.state[weight].values():
            if value.shape == weight.shape:
                assert (value[where] == 0).all()
        assert not torch.equal(weight[~where], before[name][~where])  # the kept blocks still train


def test_an_optimizer_made_after_the_masks_keeps_loaded_weights_masked(tiny_vit, batches):
    """Dense values loaded into a masked model stay as loaded until the first step of any optimizer on them."""
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.4)
    dense = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    apply_masks(tiny_vit, result)
    tiny_vit.load_state_dict(dense, assign=True)
    pruned = pruned_positions(tiny_vit, result)
    assert any((tiny_vit.get_submodule(n).weight[w] != 0).any() for n, w in pruned.items())  # as loaded
    train(tiny_vit, torch.optim.SGD(tiny_vit.parameters(), lr=1e-2, momentum=0.9), batches[:1])
    for name, where in pruned.items():
        assert (tiny_vit.get_submodule(name).weight[where] == 0).all()


class LayerNormalisedMomentum(torch.optim.Optimizer):
    """SGD on momentum / ||momentum|| per tensor (as LAMB's trust ratio mixes entries), keeping a [d, d] "precond"
    state for square weights that is not per entry (as Shampoo's preconditioners are)."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                momentum = state.setdefault("momentum_buffer", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                state["last_grad"] = p.grad.clone()  # per entry, under a name no list of optimizer states holds
                if p.dim() == 2 and p.shape[0] == p.shape[1]:
                    state.setdefault("precond", torch.ones_like(p)).add_(1.0)
                p.sub_(momentum, alpha=group["lr"] / (float(momentum.norm()) + 1e-12))


def test_an_optimizer_mixing_entries_reads_no_old_momentum_at_pruned_entries(tiny_vit, batches):
    """Momentum from before the masks is zeroed before the step, not after it: a per-tensor norm read it, and the
    optimizer's own step hooks saw pruned entries moved. A square state that is not per entry is left alone."""
    optimizer = LayerNormalisedMomentum(tiny_vit.parameters())
    train(tiny_vit, optimizer, batches[:2])
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.4)
    apply_masks(tiny_vit, result)  # the optimizer is not handed over
    pruned = {tiny_vit.get_submodule(n).weight: where for n, where in pruned_positions(tiny_vit, result).items()}

    def pruned_sum(values):
        return sum(float(values(weight)[where].abs().sum()) for weight, where in pruned.items())

    read, after = [], []
    state = lambda w: optimizer.state[w]["momentum_buffer"].abs() + optimizer.state[w]["last_grad"].abs()  # noqa: E731
    assert pruned_sum(state) > 0
    optimizer.register_step_pre_hook(lambda *_: read.append(pruned_sum(state)))
    optimizer.register_step_post_hook(lambda *_: after.append(pruned_sum(lambda w: w.detach())))
    train(tiny_vit, optimizer, batches[:2])
    assert read == [0.0, 0.0] and after == [0.0, 0.0]
    square = [w for w in pruned if w.shape[0] == w.shape[1]]
    assert square and all(bool((optimizer.state[w]["precond"] == 5.0).all()) for w in square)


def test_removed_or_dropped_handles_leave_no_step_hook(tiny_vit, batches):
    gc.collect()  # handles of earlier tests' models
    hooks, pre_hooks = optimizer_module._global_optimizer_post_hooks, optimizer_module._global_optimizer_pre_hooks
    count, pre_count = len(hooks), len(pre_hooks)
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.4)
    optimizer = OPTIMIZERS["sgd_momentum"](tiny_vit.parameters())
    train(tiny_vit, optimizer, batches[:2])
    handle = apply_masks(tiny_vit, result)
    assert len(hooks) == count + 1
    assert has_masks(tiny_vit)
    handle.remove()
    assert len(hooks) == count and len(pre_hooks) == pre_count
    assert not has_masks(tiny_vit)  # it was True still, so the recorder and the callback warned of masks
    train(tiny_vit, optimizer, batches[:1])  # momentum gathered before the masks moves pruned entries again
    assert any((tiny_vit.get_submodule(n).weight[w] != 0).any() for n, w in pruned_positions(tiny_vit, result).items())
    apply_masks(tiny_vit, result)
    del tiny_vit.__dict__["_lpl_block_masks"]  # the model owned its handle: dropping it drops the hook
    gc.collect()
    assert len(hooks) == count and len(pre_hooks) == pre_count


def test_applying_again_replaces_the_previous_masks(tiny_vit, batches):
    first = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.3)
    apply_masks(tiny_vit, first)
    second = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.3, importance="magnitude")
    handle = apply_masks(tiny_vit, second)
    tiny_vit.loss(batches[0]).backward()
    for name, where in pruned_positions(tiny_vit, second).items():
        grad = tiny_vit.get_submodule(name).weight.grad
        assert (grad[where] == 0).all()
    assert len(handle._layers) == len(second.block_masks)


def tiny_classifier():
    return ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                         num_heads=2, schedule="constant")


def fit(model, callbacks, max_steps, root, ckpt_path=None):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=root, callbacks=callbacks)
    trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=32, val_size=100), ckpt_path=ckpt_path)
    return trainer


def test_masks_survive_checkpoint_save_and_trainer_resume(tmp_path):
    torch.manual_seed(0)
    prune = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tiny_classifier(), [prune, checkpoint], 3, tmp_path)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert any("BlockPruneCallback" in key for key in saved["callbacks"])

    fresh = tiny_classifier()  # dense weights, no masks: everything must come from the checkpoint
    resumed = BlockPruneCallback(block_size=(8, 8), flops_keep=0.5, calib_batches=2, evaluate=False)
    trainer = fit(fresh, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], 6, tmp_path,
                  ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 6
    assert resumed.result.prune_seconds == prune.result.prune_seconds  # restored, not pruned again
    for name, mask in prune.result.block_masks.items():
        assert torch.equal(resumed.result.block_masks[name], mask)
    optimizer = trainer.optimizers[0]
    for name, where in pruned_positions(fresh, prune.result).items():
        weight = fresh.get_submodule(name).weight
        assert (weight[where] == 0).all() and (weight[~where] != 0).any()
        assert (optimizer.state[weight]["exp_avg"][where] == 0).all()
    assert (tmp_path / "ckpt2" / "prune_result" / "result.json").is_file()
