"""ViTClassifier: any timm Vision Transformer as a LightningModule, with optional knowledge distillation."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
import timm
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lpl.models.optim import configure_adam
from lpl.utils.weights import load_pretrained
from lpl.utils.errors import LplError


def create_timm_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without downloads, with a suggestion when the name is unknown."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models('*vit*')."
        raise LplError(f"unknown timm model {model_name!r}.{hint}")
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as error:
        raise LplError(f"timm model {model_name!r} does not accept these arguments: {error}") from None
    except (AssertionError, ValueError, ZeroDivisionError) as error:  # timm's own checks of sizes
        shown = {k: v for k, v in kwargs.items() if k in ("img_size", "patch_size", "embed_dim", "num_heads", "depth")}
        raise LplError(f"timm model {model_name!r} cannot be built with {shown or kwargs}: "
                       f"{error or type(error).__name__} (e.g. num_heads must divide embed_dim, sizes >= 1).") from None


class ViTClassifier(L.LightningModule):
    """Image classification with a timm ViT (or any timm model), AdamW and a warm-up/cosine schedule.

    Size arguments left as ``None`` keep the timm defaults of ``model_name``; ``model_kwargs`` passes any other
    timm argument (e.g. ``{"global_pool": "avg"}``). ``pretrained_path`` loads local
    weights (safetensors, or a state dict read with ``weights_only=True``). With a ``teacher`` (a frozen module,
    e.g. the dense model during pruned fine-tuning), the loss mixes in soft distillation:
    ``(1 - alpha) * CE + alpha * T^2 * KL(student/T || teacher/T)``.

    Example::

        model = ViTClassifier("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
                              embed_dim=128, depth=4, num_heads=4)
        trainer.fit(model, datamodule=MNIST5kDataModule())
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int | None = None,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
        schedule: str = "cosine",
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        if lr <= 0:
            raise LplError(f"lr must be positive, got {lr}.")
        if not 0.0 <= distill_alpha <= 1.0 or distill_temperature <= 0:
            raise LplError("distill_alpha must be in [0, 1] and distill_temperature positive.")
        sizes = dict(
            num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.model = create_timm_model(
            model_name,
            drop_path_rate=drop_path_rate,
            **{k: v for k, v in sizes.items() if v is not None},
            **(model_kwargs or {}),
        )
        if isinstance(img_size, int) and isinstance(patch_size, int) and img_size % patch_size:
            warnings.warn(f"img_size {img_size} is not a multiple of patch_size {patch_size}: the patch embedding "
                          f"never sees the last {img_size % patch_size} rows and columns of each image; choose sizes "
                          "that divide.", stacklevel=2)
        if pretrained_path:
            if not Path(pretrained_path).exists():
                raise LplError(f"pretrained_path {str(pretrained_path)!r} does not exist: give the local weights file "
                               "(.safetensors / .pth), or to evaluate a checkpoint, which holds the weights, pass "
                               "pretrained_path=None (--model.init_args.pretrained_path=null).")
            load_pretrained(self.model, pretrained_path)
        self.teacher: nn.Module | None = None
        if teacher is not None:
            self.set_teacher(teacher)
        classes = self.model.num_classes
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)

    def set_teacher(self, teacher: nn.Module | None) -> None:
        """Distil from ``teacher`` (frozen, kept in eval mode, excluded from the state dict) or stop with None."""
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # Stored outside the module tree so it never enters checkpoints or the optimizer.
        self.__dict__["teacher"] = teacher

    @_restricted_classmethod  # as Lightning's: refused on an instance, where it would leave the instance unchanged
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "ViTClassifier":
        """Lightning's, except that the checkpoint's weights are not first loaded from ``pretrained_path``: a
        checkpoint loads on its own when the pretrained file is gone."""
        kwargs.setdefault("pretrained_path", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch (the loss protocol the plug-ins call; distillation included when set)."""
        self._check_data(batch)
        logits = self(batch["image"])
        return self._loss(logits, batch)

    def _check_data(self, batch: dict[str, torch.Tensor]) -> None:
        """The images fit the network (channels and size once; under dynamic_img_size, that patches tile every
        batch), or say which setting to change (instead of a shape error deep inside timm)."""
        images = batch["image"]
        embed = getattr(self.model, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        dynamic = getattr(self.model, "dynamic_img_size", False) and not getattr(embed, "dynamic_img_pad", False)
        if patch is not None and dynamic and any(side % step for side, step in zip(images.shape[-2:], patch)):
            raise LplError(f"the data give {tuple(images.shape[-2:])} images, which patches of {tuple(patch)} do not "
                           f"tile: use an image size that is a multiple of the patch size, or set dynamic_img_pad: "
                           "true in model.init_args.model_kwargs.")
        if self.__dict__.get("_data_checked"):
            return
        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        if convs and images.ndim == 4 and images.shape[1] != convs[0].in_channels:
            raise LplError(f"the data give {images.shape[1]}-channel images, the model takes "
                           f"{convs[0].in_channels}: set model.init_args.in_chans={images.shape[1]}.")
        size = getattr(embed, "img_size", None)
        if size is not None and getattr(embed, "strict_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
            raise LplError(f"the data give {tuple(images.shape[-2:])} images, the model takes {tuple(size)}: set "
                           f"model.init_args.img_size={images.shape[-1]} (or the data's image size).")
        self.__dict__["_data_checked"] = True

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # every batch's labels, while they are still on the host (no device sync): one past num_classes is an
        # index error deep in the loss, and batches may come sorted by class
        labels = batch.get("label") if isinstance(batch, dict) else None
        if (labels is not None and labels.numel()
                and not 0 <= int(labels.min()) <= int(labels.max()) < self.model.num_classes):
            raise LplError(f"the data hold labels {int(labels.min())}..{int(labels.max())}, the model has "
                           f"{self.model.num_classes} classes: set model.init_args.num_classes.")
        return batch

    def _loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Label smoothing and distillation are training regularisers: in eval mode this is the plain task loss,
        # the same number validation logs (pruning calibration and evaluation run in eval mode).
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=smoothing)
        if self.teacher is None or not self.training:
            return loss
        with torch.no_grad():
            self.teacher.to(logits.device)
            teacher_logits = self.teacher(batch["image"])
        temp, alpha = self.hparams.distill_temperature, self.hparams.distill_alpha
        soft = F.kl_div(
            F.log_softmax(logits / temp, dim=-1), F.log_softmax(teacher_logits / temp, dim=-1),
            reduction="batchmean", log_target=True,
        )
        return (1.0 - alpha) * loss + alpha * temp * temp * soft

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_data(batch)
        logits = self(batch["image"])
        loss = self._loss(logits, batch)
        self.train_acc(logits.detach(), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: torchmetrics.Metric) -> None:
        self._check_data(batch)
        logits = self(batch["image"])
        metric(logits, batch["label"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        self._check_data(batch)
        logits = self(batch["image"])
        return {"index": batch["index"], "prediction": logits.argmax(-1), "probability": logits.softmax(-1)}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adam(
            self, optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
            warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio, schedule=hp.schedule,
        )
