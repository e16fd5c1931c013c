"""Inputs at the edges of what the data modules read: corpora too small for their split, float-valued image files."""

import numpy as np
import pytest
import torch
from PIL import Image

from lpl.data import ImageFolderDataModule, MNIST5kDataModule, TextCorpusDataModule
from lpl.data.imagefolder import load_rgb
from lpl.data.text import TokenChunks
from lpl.utils.errors import LplError


def test_a_split_left_without_tokens_is_an_error_naming_val_fraction_and_sizes(tmp_path) -> None:
    # the training split got 0 tokens: TokenChunks.__len__ returned -1 and len() raised "should return >= 0"
    corpus = tmp_path / "short.txt"
    corpus.write_text("the quick brown fox jumps.\n")  # 27 bytes
    for kwargs, message in (
        (dict(seq_len=4, val_fraction=0.97), r"\(27 bytes\) leaves 0 bytes to the training split with val_fraction "
                                             r"0.97.*seq_len 4 needs 5: use a lower val_fraction"),
        (dict(seq_len=4, val_fraction=0.1), r"leaves 3 bytes to the validation split.*use a shorter seq_len, a "
                                            r"higher val_fraction"),
    ):
        with pytest.raises(LplError, match=message):
            TextCorpusDataModule(corpus=str(corpus), batch_size=1, **kwargs).setup()
    with pytest.raises(LplError, match="0 bytes to the training split with val_fraction 0.9999999"):
        TextCorpusDataModule(corpus="lee", seq_len=8, batch_size=1, val_fraction=0.9999999).setup()
    assert len(TokenChunks(torch.zeros(0, dtype=torch.long), 4)) == 0


def test_float_images_in_unit_range_are_scaled_and_others_refused(tmp_path) -> None:
    # PIL's convert("RGB") truncated the [0, 1] floats of a mode "F" image to 0: black
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32)).save(tmp_path / "half.tif")
    Image.fromarray(np.linspace(0, 1, 36, dtype=np.float32).reshape(6, 6)).save(tmp_path / "ramp.tif")
    assert (np.asarray(load_rgb(str(tmp_path / "half.tif"))) == 128).all()
    ramp = np.asarray(load_rgb(str(tmp_path / "ramp.tif")))
    assert ramp.shape == (6, 6, 3) and ramp.min() == 0 and ramp.max() == 255
    Image.fromarray(np.full((6, 6), 200.0, dtype=np.float32)).save(tmp_path / "wide.tif")
    with pytest.raises(LplError, match=r"wide.tif holds 32-bit float values in \[200, 200\].*\[0, 1\]"):
        load_rgb(str(tmp_path / "wide.tif"))


def _folder(root, classes: dict[str, list[str]]) -> str:
    """train/ and val/ with the given class folders, each holding one tiny PNG."""
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    return str(root)


def test_a_folder_of_one_class_is_warned_of(tmp_path) -> None:
    """One more folder level (train/images/<class>/...) is one class: every label 0, trained without a word."""
    root = _folder(tmp_path, {"train": ["images"], "val": ["images"]})
    with pytest.warns(UserWarning, match="holds one class folder \\('images'\\): every image gets label 0"):
        ImageFolderDataModule(root=root, batch_size=1)


def test_class_names_that_differ_only_in_unicode_normalisation_are_said_so(tmp_path) -> None:
    root = _folder(tmp_path, {"train": ["caf\u00e9", "dog"], "val": ["cafe\u0301", "dog"]})  # NFC vs NFD
    with pytest.raises(LplError, match=r"'cafe\\u0301', 'caf\\xe9' in one only.*Unicode normalisation"):
        ImageFolderDataModule(root=root, batch_size=1)


def test_given_batches_are_not_refused_for_a_batch_size_they_do_not_use(tmp_path) -> None:
    root = _folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    data = ImageFolderDataModule(root=root, img_size=8, num_workers=0, batches=[[0], [1]], order=[1, 0])
    data.setup()  # batch_size 256 > 2 samples: refused before
    assert [batch["index"].tolist() for batch in data.train_dataloader()] == [[1], [0]]


@pytest.mark.parametrize("corpus, message", [
    (["a.txt", "b.txt"], "corpus must be one name or path .* got list"),
    (".", "is a folder; give one text file"),
])
def test_a_corpus_that_is_not_one_file_is_refused_plainly(corpus, message) -> None:
    with pytest.raises(LplError, match=message):
        TextCorpusDataModule(corpus=corpus)


def test_a_float_val_size_is_refused_plainly() -> None:
    with pytest.raises(LplError, match="val_size must be an int >= 1, got 100.0"):
        MNIST5kDataModule(val_size=100.0)


def test_a_corpus_given_as_any_path_like_is_read(tmp_path) -> None:
    class PathLike:  # as pytest's tmpdir (py.path.local) is
        def __init__(self, path) -> None:
            self.path = path

        def __fspath__(self) -> str:
            return str(self.path)

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    data = TextCorpusDataModule(corpus=PathLike(corpus), seq_len=8, batch_size=2)
    data.setup()
    assert len(data.train_set) > 0
