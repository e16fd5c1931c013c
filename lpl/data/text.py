"""TextCorpusDataModule: byte-level language modelling on real English text shipped by a PyPI package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lpl.data.base import IndexedDataModule
from lpl.utils.errors import LplError

# Corpora read from installed packages (no download). "lee": the Lee et al. news corpus in gensim's test data.
PACKAGED_CORPORA = {"lee": ("gensim", "test/test_data/lee_background.cor")}


def corpus_path(corpus: str | os.PathLike) -> Path:
    """Resolve a packaged corpus name, or a path to a local UTF-8 text file."""
    if not isinstance(corpus, (str, os.PathLike)):
        raise LplError(f"corpus must be one name or path (one text file), got {type(corpus).__name__} {corpus!r:.80}; "
                       "join several files into one first.")
    if corpus in PACKAGED_CORPORA:
        package, relative = PACKAGED_CORPORA[corpus]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LplError(f"the {corpus!r} corpus is read from the {package} package: `pip install {package}`.")
        path = Path(spec.submodule_search_locations[0]) / relative
    else:
        path = Path(corpus)
    if path.is_dir():
        raise LplError(f"text corpus {str(corpus)!r} is a folder; give one text file (join the folder's files into "
                       "one first).")
    if not path.is_file():
        raise LplError(
            f"text corpus {str(corpus)!r} not found; use one of {sorted(PACKAGED_CORPORA)} or a path to a UTF-8 text "
            "file."
        )
    return path


class TokenChunks(Dataset):
    """Fixed-length windows of a token stream; sample i is tokens[i*L : i*L + L + 1] split into input and label."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, len(self.tokens) - 1) // self.seq_len  # no tokens: no window (not -1)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        window = self.tokens[position * self.seq_len : (position + 1) * self.seq_len + 1]
        return {"input_ids": window[:-1], "labels": window[1:], "index": torch.tensor(position)}


class TextCorpusDataModule(IndexedDataModule):
    """Byte-level tokens (vocabulary 256) of a real English corpus cut into ``seq_len`` windows.

    The last ``val_fraction`` of the text is the validation set (a contiguous split, so no window leaks).

    Example::

        dm = TextCorpusDataModule(corpus="lee", seq_len=64, batch_size=16)
        trainer.fit(CausalLM(vocab_size=256), datamodule=dm)
    """

    vocab_size = 256

    def __init__(
        self,
        corpus: str = "lee",
        seq_len: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        max_train_samples: int | None = None,
        seed: int = 0,
        batches: list[list[int]] | None = None,
        order: list[int] | list[list[int]] | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        if seq_len < 2:
            raise LplError(f"seq_len must be at least 2, got {seq_len}.")
        if not 0.0 < val_fraction < 1.0:
            raise LplError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
        if max_train_samples is not None and max_train_samples < 1:
            raise LplError(f"max_train_samples must be at least 1 (or None for all), got {max_train_samples}.")
        self.path = corpus_path(corpus)
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.max_train_samples = max_train_samples

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.path.read_bytes()
        if not data:
            raise LplError(f"corpus {self.path} is empty; give a text file with content.")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * (1.0 - self.val_fraction))
        train, val = TokenChunks(tokens[:split], self.seq_len), TokenChunks(tokens[split:], self.seq_len)
        for name, part, fraction in (("training", train, "lower"), ("validation", val, "higher")):
            if len(part) == 0:
                shorter = "a shorter seq_len, " if len(part.tokens) > 2 else ""  # seq_len 2 needs 3 bytes
                raise LplError(
                    f"corpus {self.path} ({len(tokens)} bytes) leaves {len(part.tokens)} bytes to the {name} split "
                    f"with val_fraction {self.val_fraction}, and one window of seq_len {self.seq_len} needs "
                    f"{self.seq_len + 1}: use {shorter}a {fraction} val_fraction, or a longer corpus."
                )
        if self.max_train_samples is not None:
            train.tokens = train.tokens[: self.max_train_samples * self.seq_len + 1]
        return train, val
