"""ViTClassifier's options on timm models beyond the demo ViT: construction arguments, schedules without a length,
fine-tuning from pretrained weights of another task, distillation teachers, and the checks on the data's size."""

import argparse
import warnings

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lpl.models import ViTClassifier
from lpl.utils import weights
from lpl.utils.errors import LplError

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1, num_heads=2)


def _batch(channels: int = 3, size: int = 32, n: int = 3) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(n, channels, size, size), "label": torch.arange(n) % 10, "index": torch.arange(n)}


def _save(model: ViTClassifier, path) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    save_file(state, str(path))
    return state


# 1. drop_path_rate and model_kwargs


def test_models_without_drop_path_build_and_drop_path_is_passed_when_set() -> None:
    # drop_path_rate=0.0 was always passed: "unexpected keyword argument 'drop_path_rate'"
    assert ViTClassifier("ghostnet_100", num_classes=3).model.num_classes == 3
    two = {**SMALL, "depth": 2}  # timm raises the rate over depth: the last block drops at the full rate
    assert isinstance(ViTClassifier(**two, drop_path_rate=0.1).model.blocks[-1].drop_path1, timm.layers.DropPath)
    assert isinstance(ViTClassifier(**two).model.blocks[-1].drop_path1, nn.Identity)  # timm's default: none
    via_kwargs = ViTClassifier(**two, model_kwargs={"drop_path_rate": 0.1})  # given once: allowed
    assert isinstance(via_kwargs.model.blocks[-1].drop_path1, timm.layers.DropPath)


def test_model_kwargs_repeating_an_argument_is_an_error_naming_it() -> None:
    # was Python's TypeError "got multiple values for keyword argument"
    with pytest.raises(LplError, match="model_kwargs repeats num_classes=5.*num_classes=10"):
        ViTClassifier(**SMALL, model_kwargs={"num_classes": 5})
    with pytest.raises(LplError, match="model_kwargs repeats drop_path_rate"):
        ViTClassifier(**SMALL, drop_path_rate=0.1, model_kwargs={"drop_path_rate": 0.2})
    with pytest.raises(LplError, match="may not set 'pretrained'.*pretrained_path"):
        ViTClassifier(**SMALL, model_kwargs={"pretrained": True})


# 2. the cosine schedule needs the run's length


class _Batches(IterableDataset):
    """Batches without a length (a stream): Lightning cannot count the epoch's steps."""

    def __iter__(self):
        for _ in range(3):
            yield _batch(n=2)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **kwargs)


def test_cosine_schedule_without_a_step_or_epoch_limit_is_refused_at_configure_time() -> None:
    # was OverflowError: cannot convert float infinity to integer, at the second step
    loader = DataLoader([_batch(n=2) for _ in range(3)], batch_size=None)
    for limits in ({"max_epochs": -1}, {}):  # max_epochs -1 as given, None as Lightning leaves it under max_time
        with pytest.raises(LplError, match="no step or epoch limit.*set max_steps or max_epochs.*schedule='constant'"):
            _trainer(max_time={"seconds": 30}, **limits).fit(ViTClassifier(**SMALL), loader)
    constant = _trainer(max_epochs=-1, max_time={"seconds": 1})  # the way out the message names
    constant.fit(ViTClassifier(**SMALL, schedule="constant"), loader)
    assert constant.global_step > 0


def test_cosine_schedule_over_a_loader_without_length_is_refused() -> None:
    # estimated_stepping_batches is max_steps = -1 here: the schedule fell to its floor after one step, silently
    trainer = _trainer(max_epochs=1)
    with pytest.raises(LplError, match="cannot tell it.*set max_steps"):
        trainer.fit(ViTClassifier(**SMALL), DataLoader(_Batches(), batch_size=None))
    bounded = _trainer(max_steps=3)
    bounded.fit(ViTClassifier(**SMALL), DataLoader(_Batches(), batch_size=None))
    assert bounded.global_step == 3


# 3. pretrained weights fine-tuned to another task


def test_pretrained_weights_keep_a_new_head_for_other_classes(tmp_path, monkeypatch) -> None:
    source = ViTClassifier(**SMALL)
    state = _save(source, tmp_path / "w.safetensors")
    lines = []
    monkeypatch.setattr(weights, "rank_zero_info", lines.append)
    torch.manual_seed(1)
    fresh_head = ViTClassifier(**{**SMALL, "num_classes": 7}).model.head.weight.clone()
    torch.manual_seed(1)
    tuned = ViTClassifier(**{**SMALL, "num_classes": 7}, pretrained_path=str(tmp_path / "w.safetensors"))
    assert torch.equal(tuned.model.head.weight, fresh_head)  # the model's own initialisation, not the file's
    for key, value in tuned.model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, state[key]), key
    assert len(lines) == 1 and "'head'" in lines[0] and "head.weight (7, 32)" in lines[0]
    headless = timm.create_model("vit_tiny_patch16_224", **{**SMALL, "num_classes": 0})  # an Identity head
    weights.load_pretrained(headless, tmp_path / "w.safetensors")
    assert torch.equal(headless.pos_embed, state["pos_embed"]) and "head.weight dropped" in lines[-1]


def test_pretrained_position_embeddings_are_resampled_to_another_img_size(tmp_path) -> None:
    for name, prefix in (("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)):
        state = _save(ViTClassifier(name, **SMALL), tmp_path / "w.safetensors")
        tuned = ViTClassifier(name, **{**SMALL, "img_size": 48}, pretrained_path=str(tmp_path / "w.safetensors"))
        expected = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], old_size=[4, 4],
                                          num_prefix_tokens=prefix)
        assert torch.equal(tuned.model.pos_embed, expected)
        assert torch.equal(tuned.model.pos_embed[:, :prefix], state["pos_embed"][:, :prefix])  # class/dist tokens
        assert tuned.loss(_batch(size=48)).isfinite()


def test_pretrained_rgb_patch_embedding_is_adapted_to_other_channels(tmp_path) -> None:
    state = _save(ViTClassifier(**SMALL), tmp_path / "w.safetensors")
    gray = ViTClassifier(**{**SMALL, "in_chans": 1}, pretrained_path=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(gray.model.patch_embed.proj.weight,
                               state["patch_embed.proj.weight"].sum(1, keepdim=True))
    four = ViTClassifier(**{**SMALL, "in_chans": 4}, pretrained_path=str(tmp_path / "w.safetensors"))
    assert four.model.patch_embed.proj.weight.shape[1] == 4


def test_other_pretrained_mismatches_stay_errors_with_architecture_advice(tmp_path) -> None:
    _save(ViTClassifier(**SMALL), tmp_path / "w.safetensors")
    with pytest.raises(LplError, match="shape mismatch.*patch_embed.proj.weight.*build the one it was trained with"):
        ViTClassifier(**{**SMALL, "patch_size": 4}, pretrained_path=str(tmp_path / "w.safetensors"))
    with pytest.raises(LplError, match="shape mismatch.*embed_dim"):
        ViTClassifier(**{**SMALL, "embed_dim": 64}, pretrained_path=str(tmp_path / "w.safetensors"))


# 4. and 6. distillation teachers


def test_teachers_that_do_not_fit_the_student_are_refused_when_set() -> None:
    student = ViTClassifier(**SMALL)
    for change, message in (({"num_classes": 5}, "predicts 5 classes, the student 10"),
                            ({"in_chans": 1}, "takes 1-channel images, the student 3"),
                            ({"img_size": 64}, r"takes \(64, 64\) images only")):
        with pytest.raises(LplError, match=message):
            student.set_teacher(ViTClassifier(**{**SMALL, **change}).model)
        with pytest.raises(LplError, match=message):  # a LightningModule teacher is read through its network
            ViTClassifier(**SMALL, teacher=ViTClassifier(**{**SMALL, **change}))


class _TupleTeacher(nn.Module):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros(images.shape[0], 10), None


def test_teacher_outputs_that_are_not_the_students_logits_are_refused() -> None:
    student = ViTClassifier(**SMALL, teacher=_TupleTeacher())
    with pytest.raises(LplError, match="teacher returns a tuple of 2"):
        student.loss(_batch())
    student.set_teacher(nn.Identity())  # returns the images
    with pytest.raises(LplError, match=r"teacher returns \(3, 3, 32, 32\), the student's logits are \(3, 10\)"):
        student.loss(_batch())
    student.set_teacher(timm.create_model("test_coatnet", num_classes=10))  # built for 160x160 images only
    with pytest.raises(LplError, match=r"teacher fails on the student's batch of \(3, 32, 32\) images"):
        student.loss(_batch())


def test_a_distilled_student_in_distilled_training_learns_the_teacher_with_its_distillation_head() -> None:
    name = "deit_tiny_distilled_patch16_224"
    student = ViTClassifier(name, **SMALL, distill_alpha=0.25)
    student.model.set_distilled_training(True)
    batch = _batch()
    with pytest.raises(LplError, match="distilled training.*set a teacher"):
        student.loss(batch)
    teacher = ViTClassifier(**SMALL).model
    student.set_teacher(teacher)
    cls, dist = student.model(batch["image"])
    ce = nn.functional.cross_entropy(cls, batch["label"])
    kl = nn.functional.kl_div(dist.log_softmax(-1), teacher(batch["image"]).log_softmax(-1), reduction="batchmean",
                              log_target=True)
    torch.testing.assert_close(student.loss(batch), 0.75 * ce + 0.25 * kl)
    assert student.eval().loss(batch).ndim == 0  # eval: timm averages the heads, one tensor


def test_assigning_a_teacher_sets_it_without_making_it_a_trained_submodule() -> None:
    student, teacher = ViTClassifier(**SMALL), timm.create_model("test_resnet", num_classes=10)
    running_mean = teacher.bn1.running_mean.clone()
    student.teacher = teacher  # registered it as a submodule: trained, saved, put in train mode
    student.train()
    assert student.teacher is teacher and "teacher" not in dict(student.named_children())
    assert not any(k.startswith("teacher.") for k in student.state_dict())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student.loss(_batch())
    assert torch.equal(teacher.bn1.running_mean, running_mean)
    with pytest.raises(LplError, match="predicts 5 classes"):  # assignment runs set_teacher's checks too
        student.teacher = ViTClassifier(**{**SMALL, "num_classes": 5}).model
    student.teacher = None
    assert student.teacher is None


# 5. patches that do not tile the image


def test_untiled_images_warn_for_sizes_left_to_timm_defaults() -> None:
    for kwargs, lost in (({"img_size": 40}, "last 8 rows"), ({"patch_size": 15}, "last 14 rows")):
        with pytest.warns(UserWarning, match=f"not a multiple of patch_size.*{lost}"):
            ViTClassifier(depth=1, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViTClassifier(depth=1, img_size=40, model_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True})
        ViTClassifier(depth=1, img_size=48)


# 7. weights files


def test_training_checkpoints_with_python_objects_say_how_to_extract_the_weights(tmp_path) -> None:
    state = ViTClassifier(**SMALL).model.state_dict()
    torch.save({"epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "best.pth.tar")
    with pytest.raises(LplError, match=r"Unsupported global: GLOBAL argparse.Namespace.*weights_only=False.*"
                                       r"safetensors.torch.save_file"):
        ViTClassifier(**SMALL, pretrained_path=str(tmp_path / "best.pth.tar"))


def test_safetensors_suffix_is_matched_in_any_case_and_stacked_prefixes_are_stripped(tmp_path) -> None:
    source = ViTClassifier(**SMALL)
    state = _save(source, tmp_path / "w.SAFETENSORS")  # was sent to torch.load: "not a readable weights file"
    loaded = ViTClassifier(**SMALL, pretrained_path=str(tmp_path / "w.SAFETENSORS"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")  # DDP of the module
    assert torch.equal(ViTClassifier(**SMALL, pretrained_path=str(tmp_path / "ddp.pth")).model.pos_embed,
                       state["pos_embed"])


# 10. image sizes of models without a readable patch embedding


def test_models_with_a_fixed_size_and_no_patch_embedding_name_img_size_on_other_data() -> None:
    model = ViTClassifier("test_coatnet", num_classes=3).eval()  # built for 160x160
    with pytest.raises(LplError, match=r"fails on the data's 84x84 images; it is built for 160x160.*img_size=84"):
        with torch.no_grad():
            model.loss({"image": torch.randn(2, 3, 84, 84), "label": torch.tensor([0, 1])})
    with torch.no_grad():
        assert model.loss({"image": torch.randn(2, 3, 160, 160), "label": torch.tensor([0, 1])}).isfinite()


def test_a_model_built_for_the_datas_size_that_cannot_run_there_is_one_clear_error() -> None:
    """LeViT built for 28x28 (its stride-16 stem leaves too little): a shape error from deep inside timm before."""
    model = ViTClassifier("levit_128s", img_size=28, in_chans=1, num_classes=10).eval()
    with pytest.raises(LplError, match=r"'levit_128s' fails on its first forward with the data's 28x28 images.*"
                                       r"data.init_args.img_size=224"):
        with torch.no_grad():
            model.loss({"image": torch.randn(2, 1, 28, 28), "label": torch.tensor([0, 1])})


def test_an_argument_a_named_variant_fixes_itself_is_named_so() -> None:
    """mixer_s16_224 sets patch_size itself: "does not accept these arguments" read as if Mixers take no patch size."""
    from lpl.models.vit import create_timm_model

    with pytest.raises(LplError, match="'mixer_s16_224' sets patch_size itself and takes no other value"):
        create_timm_model("mixer_s16_224", patch_size=7)
    with pytest.raises(LplError, match="does not accept these arguments"):
        create_timm_model("mixer_s16_224", no_such_option=1)
