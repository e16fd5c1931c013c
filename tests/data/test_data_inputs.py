"""Inputs at the edges of what the data modules read: corpora too small for their split, float-valued image files."""

import numpy as np
import pytest
import torch
from PIL import Image

from lpl.data import TextCorpusDataModule
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
