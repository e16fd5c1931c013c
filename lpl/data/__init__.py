"""Example DataModules. Every batch is a dict carrying stable sample ids under ``index``."""

from lpl.data.base import IndexedDataModule, ResumableDataLoader
from lpl.data.imagefolder import ImageFolderDataModule
from lpl.data.mnist import MNIST5kDataModule
from lpl.data.samplers import OrderedBatchSampler, SeededBatchSampler
from lpl.data.text import TextCorpusDataModule

__all__ = [
    "ImageFolderDataModule",
    "IndexedDataModule",
    "MNIST5kDataModule",
    "OrderedBatchSampler",
    "ResumableDataLoader",
    "SeededBatchSampler",
    "TextCorpusDataModule",
]
