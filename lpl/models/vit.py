"""ViTClassifier: any timm Vision Transformer as a LightningModule, with optional knowledge distillation."""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
import timm
from timm.layers import PatchEmbed
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lpl.models.optim import check_adam_options, configure_adam
from lpl.utils.weights import load_pretrained
from lpl.utils.errors import LplError
from lpl.utils.trainer import own_metric_states

# create_timm_model's own argument: set in model_kwargs it would turn downloads on, or clash with the name given
_RESERVED_MODEL_KWARGS = {
    "pretrained": "lpl builds timm models without downloads; load local weights with pretrained_path",
    "model_name": "give the model's name as model_name",
}


def create_timm_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without downloads, with a suggestion when the name is unknown."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models('*vit*')."
        raise LplError(f"unknown timm model {model_name!r}.{hint}")
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as error:
        fixed = re.search(r"multiple values for keyword argument '(\w+)'", str(error))
        if fixed:  # a named variant (mixer_s16_224) sets it itself; its family's class takes it
            raise LplError(f"timm model {model_name!r} sets {fixed.group(1)} itself and takes no other value: leave "
                           f"{fixed.group(1)} out (null in the config), or choose a variant of that size.") from None
        raise LplError(f"timm model {model_name!r} does not accept these arguments: {error}") from None
    except (AssertionError, ValueError, ZeroDivisionError) as error:  # timm's own checks of sizes
        shown = {k: v for k, v in kwargs.items() if k in ("img_size", "patch_size", "embed_dim", "num_heads", "depth")}
        raise LplError(f"timm model {model_name!r} cannot be built with {shown or kwargs}: "
                       f"{error or type(error).__name__} (e.g. num_heads must divide embed_dim, sizes >= 1).") from None


def _check_model_kwargs(named: dict[str, Any], model_kwargs: dict[str, Any]) -> None:
    """Refuse a model_kwargs key that ViTClassifier sets itself (Python's "got multiple values" otherwise)."""
    for key in model_kwargs:
        if key in _RESERVED_MODEL_KWARGS:
            raise LplError(f"model_kwargs may not set {key!r}: {_RESERVED_MODEL_KWARGS[key]}.")
        if key in named:
            raise LplError(f"model_kwargs repeats {key}={model_kwargs[key]!r}, which ViTClassifier's own argument "
                           f"{key}={named[key]!r} sets: give it once (as {key}, or in model_kwargs with {key} left "
                           "unset).")


def _warn_untiled(model: nn.Module) -> None:
    """Warn when the built model's patch embedding leaves the images' last rows / columns out.

    Read off the model, not the arguments: the sizes a user leaves to timm's defaults (img_size 224, patch 16) tile
    the image or not just the same. Only timm's ``PatchEmbed`` (kernel = stride = patch) is judged, and not when it
    pads (``dynamic_img_pad``) or takes any size (``dynamic_img_size``: every batch is checked instead).
    """
    embed = getattr(model, "patch_embed", None)
    if (not isinstance(embed, PatchEmbed) or embed.img_size is None or getattr(embed, "dynamic_img_pad", False)
            or getattr(model, "dynamic_img_size", False)):
        return
    rest = [side % patch for side, patch in zip(embed.img_size, embed.patch_size)]
    if not any(rest):
        return
    img, patch = (_size_text(size) for size in (embed.img_size, embed.patch_size))
    lost = f"{rest[0]} rows and columns" if rest[0] == rest[1] else f"{rest[0]} rows and {rest[1]} columns"
    warnings.warn(f"img_size {img} is not a multiple of patch_size {patch}: the patch embedding never sees the last "
                  f"{lost} of each image; choose sizes that divide (img_size / patch_size, or the data's size).",
                  stacklevel=3)


def _size_text(size: tuple[int, ...]) -> str:
    """``224`` for a square size, ``(224, 192)`` otherwise."""
    return str(size[0]) if len(set(size)) == 1 else str(tuple(size))


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (shortened), to quote torch's or timm's words inside an LplError."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:150]}" if lines else type(error).__name__


def _network(module: nn.Module) -> nn.Module:
    """The network itself: a ViTClassifier (a LightningModule given as teacher, say) holds it in ``.model``."""
    return module.model if isinstance(module, ViTClassifier) else module


def _input_channels(network: nn.Module) -> int | None:
    """Input channels of a timm model's first convolution (named by its ``pretrained_cfg``), None if not known."""
    name = (getattr(network, "pretrained_cfg", None) or {}).get("first_conv")
    if not isinstance(name, str):
        return None
    try:
        return int(network.get_submodule(name).in_channels)
    except AttributeError:  # no such submodule, or not a convolution
        return None


def _fixed_img_size(network: nn.Module) -> tuple[int, ...] | None:
    """The one image size a timm patch embedding accepts (it asserts it at every call), None if it takes others."""
    embed = getattr(network, "patch_embed", None)
    if isinstance(embed, PatchEmbed) and embed.img_size is not None and embed.strict_img_size:
        return tuple(embed.img_size)
    return None


class ViTClassifier(L.LightningModule):
    """Image classification with a timm ViT (or any timm model), AdamW and a warm-up/cosine schedule.

    Size arguments and ``drop_path_rate`` left as ``None`` keep the timm defaults of ``model_name`` and are not
    passed (many CNNs take no ``drop_path_rate``); ``model_kwargs`` passes any other timm argument (e.g.
    ``{"global_pool": "avg"}``). ``pretrained_path`` loads local weights (safetensors, or a state dict read with
    ``weights_only=True``) and fine-tunes them to this model as timm's pretrained loading does: another
    ``num_classes`` keeps the model's new classifier head, another ``img_size`` resamples absolute position
    embeddings, another ``in_chans`` adapts a 3-channel first convolution (see ``lpl.utils.weights.load_pretrained``).
    With a ``teacher`` (a frozen module returning logits of the same classes from the same images, e.g. the dense
    model during pruned fine-tuning), the loss mixes in soft distillation:
    ``(1 - alpha) * CE + alpha * T^2 * KL(student/T || teacher/T)``. A timm distilled model (DeiT) put in
    ``set_distilled_training(True)`` distils as DeiT does: CE on its class head, the KL term on its distillation
    head. Assigning ``model.teacher = net`` is ``set_teacher(net)``: the teacher is never a trained submodule.

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
        drop_path_rate: float | None = None,
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
        check_adam_options(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas,
                           warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, schedule=schedule)
        if not 0.0 <= distill_alpha <= 1.0 or distill_temperature <= 0:
            raise LplError("distill_alpha must be in [0, 1] and distill_temperature positive.")
        named = dict(
            num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
        )
        named = {k: v for k, v in named.items() if v is not None}
        _check_model_kwargs(named, model_kwargs or {})
        self.model = create_timm_model(model_name, **named, **(model_kwargs or {}))
        if not isinstance(self.model.num_classes, int) or self.model.num_classes < 2:
            raise LplError(f"ViTClassifier classifies into at least 2 classes (cross-entropy, accuracy), but "
                           f"{model_name!r} was built with num_classes={self.model.num_classes!r}: set num_classes "
                           "to the number of classes in the data.")
        _warn_untiled(self.model)
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
        """Distil from ``teacher`` (frozen, kept in eval mode, excluded from the state dict) or stop with None.

        What can be read off the two networks is checked here (classes, input channels, a fixed image size); the
        teacher's output is checked at each distillation step."""
        if teacher is not None:
            if not isinstance(teacher, nn.Module):
                raise LplError(f"the teacher must be a torch.nn.Module returning logits, got {type(teacher).__name__}.")
            self._check_teacher(_network(teacher))
            teacher.eval().requires_grad_(False)
        # Stored outside the module tree so it never enters checkpoints, the optimizer or train().
        self.__dict__["teacher"] = teacher
        self.__dict__.pop("_teacher_ran", None)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module would register an assigned module as a submodule: trained, saved, put in train mode
        if name == "teacher":
            self.set_teacher(value)
        else:
            super().__setattr__(name, value)

    def _check_teacher(self, teacher: nn.Module) -> None:
        """Refuse a teacher whose classes, input channels or fixed image size differ from the student's."""
        pairs = (  # (what differs, the teacher's, the student's, the option that sets it); None: not known
            ("predicts {} classes", getattr(teacher, "num_classes", None), self.model.num_classes, "num_classes"),
            ("takes {}-channel images", _input_channels(teacher), _input_channels(self.model), "in_chans"),
            ("takes {} images only", _fixed_img_size(teacher), _fixed_img_size(self.model), "img_size"),
        )
        for what, theirs, ours, option in pairs:
            if isinstance(theirs, (int, tuple)) and isinstance(ours, (int, tuple)) and theirs != ours:
                raise LplError(f"the teacher {what.format(theirs)}, the student {ours}: distillation feeds the "
                               "teacher the student's images and compares their class probabilities; give a teacher "
                               f"built with the student's {option}, or build the student like the teacher.")

    @_restricted_classmethod  # as Lightning's: refused on an instance, where it would leave the instance unchanged
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "ViTClassifier":
        """Lightning's, except that the checkpoint's weights are not first loaded from ``pretrained_path``: a
        checkpoint loads on its own when the pretrained file is gone."""
        kwargs.setdefault("pretrained_path", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        own_metric_states(self)  # in every process (ddp_spawn shares the module's metric states otherwise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch (the loss protocol the plug-ins call; distillation included when set)."""
        return self._loss(*self._outputs(batch), batch)

    def _outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits and, from a timm distilled model in distilled training, its distillation-head logits.

        The first forward's errors on images of another size than the model was built for become an LplError naming
        img_size: many timm models (CoAtNet, LeViT, PiT, EfficientFormer, MaxViT) fix their size without a patch
        embedding to read it from, and fail deep inside."""
        self._check_data(batch)
        images = batch["image"]
        if self.__dict__.get("_data_checked"):
            output = self(images)
        else:
            output = self._first_forward(images)
            self.__dict__["_data_checked"] = True
        if isinstance(output, torch.Tensor):
            return output, None
        if (isinstance(output, tuple) and len(output) == 2 and getattr(self.model, "distilled_training", False)
                and all(isinstance(part, torch.Tensor) for part in output)):
            if self.teacher is None:
                raise LplError("the model is in timm's distilled training (set_distilled_training(True)): it returns "
                               "its class and distillation heads apart, and the distillation head learns from a "
                               "teacher; set a teacher (teacher=... / set_teacher), or call "
                               "model.model.set_distilled_training(False).")
            return output
        raise LplError(f"the timm model {self.hparams.model_name!r} returns a {type(output).__name__}, not one logits "
                       "tensor [batch, classes]: use a model (or model_kwargs) whose forward returns the logits.")

    def _first_forward(self, images: torch.Tensor) -> Any:
        """The model's output, or an LplError when it fails on images of another size than it was built for."""
        try:
            return self(images)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, AssertionError) as error:
            built = self._built_img_size()
            given = tuple(images.shape[-2:])
            if built is None or given == built:  # built for this size, yet it cannot run there (LeViT at 28x28)
                default = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size")
                hint = (f"give it the size timm builds it for (data.init_args.img_size={default[-1]}, "
                        f"model.init_args.img_size={default[-1]})" if default and tuple(default[1:]) != given
                        else "use a larger image size")
                raise LplError(f"the timm model {self.hparams.model_name!r} fails on its first forward with the data's "
                               f"{given[0]}x{given[1]} images ({_first_line(error)}); a model that downsamples in "
                               f"stages may not run at that size: {hint}, or choose another model.") from error
            raise LplError(f"the timm model {self.hparams.model_name!r} fails on the data's {given[0]}x{given[1]} "
                           f"images; it is built for {built[0]}x{built[1]} ({_first_line(error)}): set "
                           f"model.init_args.img_size={images.shape[-1]} if the model takes img_size, or give the "
                           f"data the model's size (data.init_args.img_size={built[-1]}).") from error

    def _built_img_size(self) -> tuple[int, int] | None:
        """The image size the model was built for: img_size as given, else timm's default (pretrained_cfg)."""
        size = self.hparams.img_size or (self.hparams.model_kwargs or {}).get("img_size")
        if size is None:
            input_size = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size")
            size = input_size[1:] if input_size else None
        if isinstance(size, int):
            return (size, size)
        return tuple(size) if size is not None and len(size) == 2 else None

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
        if self.__dict__.get("_data_checked"):  # set after the first forward ran
            return
        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        if convs and images.ndim == 4 and images.shape[1] != convs[0].in_channels:
            raise LplError(f"the data give {images.shape[1]}-channel images, the model takes "
                           f"{convs[0].in_channels}: set model.init_args.in_chans={images.shape[1]}.")
        size = getattr(embed, "img_size", None)
        if size is not None and getattr(embed, "strict_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
            raise LplError(f"the data give {tuple(images.shape[-2:])} images, the model takes {tuple(size)}: set "
                           f"model.init_args.img_size={images.shape[-1]} (or the data's image size).")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # every batch's labels, while they are still on the host (no device sync): one past num_classes is an
        # index error deep in the loss, and batches may come sorted by class
        labels = batch.get("label") if isinstance(batch, dict) else None
        if (labels is not None and labels.numel()
                and not 0 <= int(labels.min()) <= int(labels.max()) < self.model.num_classes):
            raise LplError(f"the data hold labels {int(labels.min())}..{int(labels.max())}, the model has "
                           f"{self.model.num_classes} classes: set model.init_args.num_classes.")
        return batch

    def _loss(self, logits: torch.Tensor, distill_logits: torch.Tensor | None,
              batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Label smoothing and distillation are training regularisers: in eval mode this is the plain task loss,
        # the same number validation logs (pruning calibration and evaluation run in eval mode).
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=smoothing)
        if self.teacher is None or not self.training:
            return loss
        teacher_logits = self._teacher_logits(batch["image"], logits)
        # a DeiT-style distilled model learns the teacher with its own head; any other with its class logits
        student = logits if distill_logits is None else distill_logits
        temp, alpha = self.hparams.distill_temperature, self.hparams.distill_alpha
        soft = F.kl_div(
            F.log_softmax(student / temp, dim=-1), F.log_softmax(teacher_logits / temp, dim=-1),
            reduction="batchmean", log_target=True,
        )
        return (1.0 - alpha) * loss + alpha * temp * temp * soft

    def _teacher_logits(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``images``, or an LplError saying how the teacher does not fit the student."""
        with torch.no_grad():
            self.teacher.to(logits.device)
            try:
                output = self.teacher(images)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, AssertionError) as error:
                if self.__dict__.get("_teacher_ran"):
                    raise
                raise LplError(f"the teacher fails on the student's batch of {tuple(images.shape[1:])} images "
                               f"({_first_line(error)}): give a teacher that takes the student's input (in_chans, "
                               "img_size).") from error
        self.__dict__["_teacher_ran"] = True
        if isinstance(output, (tuple, list)):
            raise LplError(f"the teacher returns a {type(output).__name__} of {len(output)}, distillation needs one "
                           f"logits tensor {tuple(logits.shape)}: wrap the teacher in a module that returns its "
                           "logits (a timm distilled teacher in eval mode returns one tensor already).")
        if not isinstance(output, torch.Tensor) or output.shape != logits.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise LplError(f"the teacher returns {shape}, the student's logits are {tuple(logits.shape)}: give a "
                           "teacher that returns logits over the student's classes.")
        return output

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, distill_logits = self._outputs(batch)
        loss = self._loss(logits, distill_logits, batch)
        self.train_acc(logits.detach(), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: torchmetrics.Metric) -> None:
        logits, _ = self._outputs(batch)
        metric(logits, batch["label"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits, _ = self._outputs(batch)
        return {"index": batch["index"], "prediction": logits.argmax(-1), "probability": logits.softmax(-1)}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adam(
            self, optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
            warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio, schedule=hp.schedule,
        )
