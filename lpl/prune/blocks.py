"""Block partition of a Linear weight [out, in] into (br, bc) blocks; blocks at ragged edges are partial.

The layout itself (``block_grid``, ``block_elements``) is the kernels' (``lpl.kernels.format``), re-exported here."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lpl.kernels.format import block_elements, block_grid, normalize_block_size
from lpl.utils.errors import LplError


def parse_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``block_size`` as a tuple of two positive ints (rows, cols; an int means square blocks), or a clear error."""
    return normalize_block_size(block_size)  # the kernels' rule, so every entry point agrees


def check_block_size(block_size: tuple[int, int], shapes: Mapping[str, tuple[int, int]],
                     excluded: Sequence[str] = ()) -> tuple[int, int]:
    """Validate ``block_size`` against the weight ``shapes`` of the layers to prune (by name); returns it as a tuple
    of two ints. The error names the layers one block does not fit and the exclude patterns (``excluded``, the ones
    in effect, plus those layers) that leave them dense."""
    br, bc = parse_block_size(block_size)
    small = [name for name, (rows, cols) in shapes.items() if br > rows or bc > cols]
    if small:
        raise LplError(
            f"block_size {(br, bc)} is larger than {len(small)} of the selected Linear layers (e.g. {small[0]!r} of "
            f"shape {tuple(shapes[small[0]])}); use a smaller block, or leave them dense with "
            f"exclude={list(excluded) + small[:4]}{' (and the rest)' if len(small) > 4 else ''}."
        )
    return br, bc


def block_sum(values: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Sum of ``values`` [..., out, in] over each block: [..., R, C] (zero-padded at ragged edges)."""
    out_f, in_f = values.shape[-2:]
    rows, cols = block_grid((out_f, in_f), block_size)
    pad_rows, pad_cols = rows * block_size[0] - out_f, cols * block_size[1] - in_f
    if pad_rows or pad_cols:
        values = F.pad(values, (0, pad_cols, 0, pad_rows))
    lead = values.shape[:-2]
    # two reductions, the contiguous one first: about 8x faster than one sum over the strided dims (-3, -1)
    within_rows = values.reshape(*lead, rows * block_size[0], cols, block_size[1]).sum(-1)
    return within_rows.reshape(*lead, rows, block_size[0], cols).sum(-2)


def expand_block_mask(block_mask: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Element mask [out, in] from a block mask [R, C]."""
    full = block_mask.repeat_interleave(block_size[0], dim=0).repeat_interleave(block_size[1], dim=1)
    return full[: shape[0], : shape[1]]


def mask_density(block_mask: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> float:
    """Retained share of the weight's true elements (1.0 for a weight without elements: nothing is pruned)."""
    elements = block_elements(shape, block_size)
    total = elements.sum()
    return float((elements * block_mask.to(elements.dtype)).sum() / total) if total else 1.0
