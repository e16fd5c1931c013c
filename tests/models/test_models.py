import math

import pytest
import torch
import torchmetrics
from safetensors.torch import save_file

from lpl.models import CausalLM, ViTClassifier
from lpl.models.lm import apply_rotary, rotary_tables
from lpl.utils import module_loss
from lpl.utils.errors import LplError

TINY_VIT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)


def test_vit_forward_and_loss_protocol() -> None:
    model = ViTClassifier(**TINY_VIT)
    batch = {"image": torch.randn(4, 1, 28, 28), "label": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    assert model(batch["image"]).shape == (4, 10)
    loss = module_loss(model, batch)
    assert loss.ndim == 0 and loss.requires_grad


def test_vit_distillation_uses_teacher_only_in_training() -> None:
    student, teacher = ViTClassifier(**TINY_VIT), ViTClassifier(**TINY_VIT)
    batch = {"image": torch.randn(4, 1, 28, 28), "label": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    plain = student.loss(batch)
    student.set_teacher(teacher.model)
    assert "teacher" not in dict(student.named_modules()) and not any("teacher" in k for k in student.state_dict())
    assert not torch.allclose(student.loss(batch), plain)
    student.eval()
    assert torch.allclose(student.loss(batch), plain)


def test_vit_label_smoothing_only_in_training() -> None:
    model = ViTClassifier(label_smoothing=0.2, **TINY_VIT)
    batch = {"image": torch.randn(6, 1, 28, 28), "label": torch.randint(0, 10, (6,)), "index": torch.arange(6)}
    logits = model(batch["image"])
    plain = torch.nn.functional.cross_entropy(logits, batch["label"])
    smoothed = torch.nn.functional.cross_entropy(logits, batch["label"], label_smoothing=0.2)
    torch.testing.assert_close(model.eval().loss(batch), plain)  # the number validation logs
    torch.testing.assert_close(model.train().loss(batch), smoothed)


def test_pretrained_path_round_trip_and_errors(tmp_path) -> None:
    source = ViTClassifier(**TINY_VIT)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = ViTClassifier(**TINY_VIT, pretrained_path=str(path))
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    # Lightning checkpoints (state_dict with a "model." prefix) load too
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    ViTClassifier(**TINY_VIT, pretrained_path=str(ckpt))

    with pytest.raises(LplError, match="does not exist"):
        ViTClassifier(**TINY_VIT, pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(LplError, match="is a folder, not a weights file"):
        ViTClassifier(**TINY_VIT, pretrained_path=str(tmp_path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(LplError, match="not a readable weights file"):
        ViTClassifier(**TINY_VIT, pretrained_path=str(junk))
    with pytest.raises(LplError, match="shape mismatch"):  # another width: no fine-tuning adapts that
        ViTClassifier(**{**TINY_VIT, "embed_dim": 64}, pretrained_path=str(path))


def test_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(LplError, match="Did you mean.*deit_small_patch16_224"):
        ViTClassifier("deit_smal_patch16_224")


def test_causal_lm_is_causal_and_learns_loss_shape() -> None:
    lm = CausalLM(vocab_size=50, dim=32, depth=1, num_heads=2, max_seq_len=16)
    ids = torch.randint(0, 50, (2, 12))
    logits = lm(ids)
    assert logits.shape == (2, 12, 50)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    # positions before the change see identical prefixes: identical logits
    assert torch.allclose(lm(changed)[:, :8], logits[:, :8], atol=1e-5)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "index": torch.arange(2)}
    assert module_loss(lm, batch).ndim == 0
    with pytest.raises(LplError, match="max_seq_len"):
        lm(torch.randint(0, 50, (1, 17)))


def test_rotary_preserves_norms_and_relative_positions() -> None:
    cos, sin = rotary_tables(8, 4)
    q = torch.randn(1, 1, 8, 4)
    rotated = apply_rotary(q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # <R_i q, R_j k> depends only on i - j
    k = torch.randn(4)
    same_q = apply_rotary(q[..., :1, :].expand(1, 1, 8, 4), cos, sin)[0, 0]
    same_k = apply_rotary(k.expand(1, 1, 8, 4), cos, sin)[0, 0]
    assert torch.allclose(same_q[3] @ same_k[1], same_q[6] @ same_k[4], atol=1e-5)


def test_sizes_out_of_range_are_refused_and_uncovered_pixels_warn() -> None:
    from lpl.models import CausalLM

    with pytest.raises(LplError, match="num_heads must divide embed_dim"):
        ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=30, depth=1, num_heads=4)
    with pytest.warns(UserWarning, match="never sees the last 2 rows"):
        ViTClassifier(img_size=30, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    for kwargs in ({"vocab_size": 0}, {"num_heads": 0}, {"mlp_hidden": 0}):
        with pytest.raises(LplError, match="must be a whole number >= 1"):
            CausalLM(**kwargs)
    for classes in (0, 1):  # 0 is timm's headless feature extractor
        with pytest.raises(LplError, match=f"at least 2 classes.*num_classes={classes}"):
            ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=classes, embed_dim=32, depth=1,
                          num_heads=2)


def test_images_the_patches_do_not_tile_are_one_clear_error_with_a_dynamic_image_size():
    # timm's assertion ended the run with a traceback
    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                          model_kwargs={"dynamic_img_size": True})
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.tensor([0, 1])}
    with pytest.raises(LplError, match=r"\(32, 32\) images, which patches of \(7, 7\) do not tile"):
        model.loss(batch)
    padded = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                           model_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True})
    assert padded.loss(batch).ndim == 0
    assert model.loss({"image": torch.randn(2, 1, 35, 35), "label": torch.tensor([0, 1])}).ndim == 0
    # every batch is checked (sizes vary under dynamic_img_size), and predictions too
    with pytest.raises(LplError, match="do not tile"):
        model.predict_step({**batch, "index": torch.arange(2)}, 0)


def test_a_checkpoint_loads_without_the_pretrained_file_it_started_from(tmp_path) -> None:
    import lightning as L

    source = ViTClassifier(**TINY_VIT)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    model = ViTClassifier(**TINY_VIT, pretrained_path=str(path))
    with torch.no_grad():
        model.model.head.bias.add_(1.0)  # as if trained after loading: the checkpoint's weights must win
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    path.unlink()  # the pretrained file is gone (another machine, say): it failed with "does not exist"
    loaded = ViTClassifier.load_from_checkpoint(tmp_path / "run.ckpt")
    assert torch.equal(loaded.model.head.bias, model.model.head.bias)
    with pytest.raises(TypeError, match="instance"):  # as Lightning's own: not on an instance
        loaded.load_from_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(LplError, match="pretrained_path=None"):  # building it from the file still names the way out
        ViTClassifier(**TINY_VIT, pretrained_path=str(path))


def test_numbers_of_any_real_type_are_taken() -> None:
    import numpy as np

    CausalLM(dim=32, depth=1, num_heads=2, lr=np.float32(3e-4), weight_decay=np.float32(0.05), betas=[0.9, 0.95],
             min_lr_ratio=np.float64(0.1), warmup_steps=np.int64(3)).configure_optimizers()
    ViTClassifier(**TINY_VIT, lr=torch.tensor(1e-3), weight_decay=0).configure_optimizers()


@pytest.mark.parametrize("kwargs, message", [
    ({"min_lr_ratio": -1.0}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"warmup_steps": -5}, "warmup_steps must be an int >= 0"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
    ({"schedule": "linear"}, "schedule must be 'cosine' or 'constant'"),
])
def test_optimizer_options_that_would_train_wrongly_are_refused_by_both_models(kwargs, message) -> None:
    """A negative min_lr_ratio made the cosine's tail a negative learning rate (Adam climbed the loss)."""
    with pytest.raises(LplError, match=message):
        CausalLM(dim=32, depth=1, num_heads=2, **kwargs)
    with pytest.raises(LplError, match=message):
        ViTClassifier(**TINY_VIT, **kwargs)


def test_lm_perplexity_is_exp_of_the_mean_loss_whatever_the_batch_size(tmp_path) -> None:
    """It was the mean of the batches' exp(loss): 17.78 at eval batch 1 and 17.59 at 562 for one model."""
    import lightning as L

    from lpl.data import TextCorpusDataModule

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog; " * 40)
    torch.manual_seed(0)
    lm = CausalLM(dim=32, depth=1, num_heads=2, max_seq_len=16)
    figures = []
    for eval_batch_size in (1, 7):
        data = TextCorpusDataModule(corpus=str(corpus), seq_len=8, batch_size=4, eval_batch_size=eval_batch_size,
                                    val_fraction=0.3)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics,) = trainer.validate(lm, datamodule=data, verbose=False)
        figures.append(metrics)
        assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert figures[0]["val/ppl"] == pytest.approx(figures[1]["val/ppl"], rel=1e-5)
    with torch.no_grad():
        lm.model.embed.weight[ord("t")] = float("nan")  # every window holds a 't': every loss NaN
    (metrics,) = trainer.validate(lm, datamodule=data, verbose=False)
    assert math.isnan(metrics["val/loss"]) and math.isnan(metrics["val/ppl"])  # not NaN batches dropped


def test_setup_gives_each_process_metric_states_of_its_own() -> None:
    """Under ddp_spawn on CPU the module reaches the processes through shared memory, and Lightning unshares only
    parameters and buffers: the processes added into one metric state (val/ppl 237.3 for 254.2 once)."""
    for module in (CausalLM(dim=32, depth=1, num_heads=2), ViTClassifier(**TINY_VIT)):
        metrics = [m for m in module.modules() if isinstance(m, torchmetrics.Metric)]
        for metric in metrics:
            for name in metric._defaults:
                getattr(metric, name).share_memory_()
        module.setup("validate")
        assert metrics and not any(getattr(metric, name).is_shared() for metric in metrics for name in metric._defaults)
