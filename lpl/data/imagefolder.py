"""ImageFolderDataModule: an ImageNet-layout folder (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG)."""

from __future__ import annotations

import os
import unicodedata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from lpl.data.base import IndexedDataModule
from lpl.utils.errors import LplError

if TYPE_CHECKING:
    from PIL import Image

# what torchvision's ImageFolder reads (its IMG_EXTENSIONS), so the layout check counts the same files
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file anywhere below it, symlinked folders followed (as torchvision does)."""
    for directory, _, files in os.walk(folder, followlinks=True):
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(directory, name))
               for name in files):
            return True
    return False


def load_rgb(path: str) -> "Image.Image":
    """An image file as 8-bit RGB; 16-bit grayscale scaled to 8 bits (PIL's convert would clip it to white), and
    a file that does not read as an image is an LplError naming it (not a PIL error deep in a worker).

    32-bit float grayscale (PIL mode "F", e.g. float TIFF) is taken as intensities in [0, 1], the float convention
    of torchvision and timm, and scaled to 0..255 (PIL's convert would truncate it to 0, black); a float image with
    values outside [0, 1] (or NaN) is refused, since its range cannot be guessed."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise LplError(f"cannot read image {path}: {error}; remove or replace the file.") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit samples (PIL may hold them as 32-bit "I")
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0):
            raise LplError(f"image {path} holds 32-bit float values in [{np.nanmin(values):.4g}, "
                           f"{np.nanmax(values):.4g}]{' and NaN/inf' if not np.isfinite(values).all() else ''}; "
                           "float images are read as intensities in [0, 1]: rescale it to [0, 1], or save it as an "
                           "8- or 16-bit image.")
        image = Image.fromarray(np.rint(values * 255.0).astype(np.uint8))
    return image.convert("RGB")


def check_imagenet_layout(root: Path) -> None:
    """Fail early, with what to fix, when ``root`` is not an ImageNet-style folder."""
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise LplError(f"dataset root {str(root)!r} {state}; set data.init_args.root to your ImageNet folder.")
    names = {}
    for split in ("train", "val"):
        split_dir = root / split
        classes = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
        if not classes:
            raise LplError(
                f"{str(root)!r} is not an ImageNet-style folder: expected {split}/<class>/<image> under it "
                f"(found no class folders in {str(split_dir)!r})."
            )
        empty = [d.name for d in classes if not _holds_images(d)]
        if empty:
            raise LplError(f"class folder(s) {empty[:3]} in {str(split_dir)!r} hold no images "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove them or add images.")
        names[split] = [d.name for d in classes]
    if names["train"] != names["val"]:  # labels are class indices in sorted order: the splits must agree
        only = sorted(set(names["train"]) ^ set(names["val"]))
        same_looking = len({unicodedata.normalize("NFC", name) for name in only}) < len(only)
        shown = ", ".join((ascii if same_looking else repr)(name) for name in only[:3])
        raise LplError(f"train/ and val/ of {str(root)!r} hold different classes (e.g. {shown} in one only), so one "
                       "label would name two classes; give both splits the same class folders"
                       + (" (names that look alike differ in their Unicode normalisation, as a copy from macOS makes "
                          "them: rename one)" if same_looking else "") + ".")
    if len(names["train"]) == 1:
        warnings.warn(f"{str(root)!r} holds one class folder ({names['train'][0]!r}): every image gets label 0. "
                      "Images in folders below a class folder belong to that class, so a layout with one more level "
                      "(train/images/<class>/...) is one class; point root one level lower.", stacklevel=3)


class IndexedImageFolder(Dataset):
    """torchvision ImageFolder that returns lpl's batch dicts."""

    def __init__(self, root: Path, transform) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root), transform=transform, loader=load_rgb)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        image, label = self.folder[position]
        return {"image": image, "label": torch.tensor(label), "index": torch.tensor(position)}


class ImageFolderDataModule(IndexedDataModule):
    """ImageNet-style folders with timm's train (RandAugment, random erasing) and eval transforms.

    Example::

        dm = ImageFolderDataModule(root="/data/imagenet", img_size=224, batch_size=256, num_workers=8)
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        crop_pct: float = 0.875,
        seed: int = 0,
        batches: list[list[int]] | None = None,
        order: list[int] | list[list[int]] | None = None,
        eval_batch_size: int = 256,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        self.root = Path(root)
        check_imagenet_layout(self.root)
        self.img_size = img_size
        self.num_workers = num_workers
        self.auto_augment = auto_augment
        self.re_prob = re_prob
        self.crop_pct = crop_pct

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        from timm.data import create_transform

        train_tf = create_transform(
            self.img_size, is_training=True, auto_augment=self.auto_augment, re_prob=self.re_prob
        )
        eval_tf = create_transform(self.img_size, is_training=False, crop_pct=self.crop_pct)
        return IndexedImageFolder(self.root / "train", train_tf), IndexedImageFolder(self.root / "val", eval_tf)

    def loader_kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0}
