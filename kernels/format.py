"""Block-CSR storage of a block-sparse weight matrix (the contract in docs/architecture.md, "Block-sparse weights")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from lpl.utils.errors import LplError

# float64 runs as plain torch ops everywhere (for gradient checks and references), the others on the kernels
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def normalize_block_size(block_size: int | Sequence[int]) -> tuple[int, int]:
    """``16`` -> ``(16, 16)``; ``(32, 16)`` stays; anything not two positive ints raises ``LplError`` (a float such as
    4.5 too: truncating it would prune other blocks than asked)."""
    pair = (block_size, block_size) if _is_int(block_size) else block_size
    try:
        pair = tuple(pair)  # type: ignore[arg-type]
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(_is_int(v) and int(v) > 0 for v in pair):
        raise LplError(f"block_size must be a positive int or two positive ints (rows, cols), got {block_size!r}; "
                       "e.g. 32 or (32, 32).")
    return int(pair[0]), int(pair[1])


def _is_int(value: object) -> bool:
    """An integral number (Python, numpy or 0-d torch int), not a bool or a float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return (value.ndim == 0 and not value.is_floating_point() and not value.is_complex()
                and value.dtype != torch.bool)
    return hasattr(value, "__index__")


def block_grid(shape: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    """Number of block rows and block columns: ``(ceil(out / br), ceil(in / bc))``."""
    return -(-shape[0] // block_size[0]), -(-shape[1] // block_size[1])


def block_elements(shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """True element count of every block, float64 [R, C] (smaller at ragged edges)."""
    (rows, cols), (br, bc) = block_grid(shape, block_size), block_size
    heights = torch.clamp(shape[0] - torch.arange(rows) * br, max=br).double()
    widths = torch.clamp(shape[1] - torch.arange(cols) * bc, max=bc).double()
    return torch.outer(heights, widths)


def block_density(block_mask: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> float:
    """Retained share of a ``shape`` weight's true elements under ``block_mask`` (ragged edge blocks counted by their
    true size). A weight without elements (out_features = 0, an empty mask) has density 1.0: no block is pruned,
    as for a layer that keeps every block, so cost x density and "keeps everything" checks hold."""
    if block_mask.is_meta:
        raise LplError("the block mask is on the meta device and holds no pattern, so the density is unknown; give "
                       "the mask on the CPU, or load the weights (a state dict with its block_mask) first.")
    with torch.device("cpu"):  # even under a device context (torch.device("meta") while building a model)
        elements = block_elements(shape, block_size)
    total = elements.sum()
    if total == 0:
        return 1.0
    return float((elements * block_mask.cpu().double()).sum() / total)


def check_float_dtype(tensor: torch.Tensor, what: str) -> None:
    """Refuse a dtype the block-sparse layers do not take, naming ``what`` held it."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise LplError(
            f"{what} has dtype {tensor.dtype}; block-sparse layers take float32, float16, bfloat16 "
            f"or float64: convert it with .float() / .half() / .bfloat16() / .double()."
        )


class KernelIndex(NamedTuple):
    """Index tensors derived from ``row_ptr``/``col_idx`` that the kernels need (all int64, same device).

    ``row_order``: block rows sorted by retained blocks, longest first (load balance: long rows start first).
    ``block_row``: the block row of each stored block. ``col_ptr``/``t_row_idx``/``t_block``: the same blocks in
    block-column order (CSC) for dX = dY W; ``col_order``: block columns sorted longest first.
    """

    row_order: torch.Tensor
    block_row: torch.Tensor
    col_ptr: torch.Tensor
    t_row_idx: torch.Tensor
    t_block: torch.Tensor
    col_order: torch.Tensor


def build_kernel_index(row_ptr: torch.Tensor, col_idx: torch.Tensor, num_block_cols: int) -> KernelIndex:
    """Derive the :class:`KernelIndex` of a block-CSR structure (pure torch, runs on the structure's device)."""
    num_block_rows = row_ptr.numel() - 1
    row_nnz = row_ptr[1:] - row_ptr[:-1]
    rows = torch.arange(num_block_rows, device=row_ptr.device, dtype=torch.int64)
    block_row = torch.repeat_interleave(rows, row_nnz)
    row_order = torch.sort(row_nnz, descending=True, stable=True).indices
    t_block = torch.sort(col_idx * max(num_block_rows, 1) + block_row, stable=True).indices
    col_nnz = torch.bincount(col_idx, minlength=num_block_cols)
    col_ptr = torch.cat([col_nnz.new_zeros(1), torch.cumsum(col_nnz, 0)])
    col_order = torch.sort(col_nnz, descending=True, stable=True).indices
    return KernelIndex(row_order, block_row, col_ptr, block_row[t_block], t_block, col_order)


@dataclass
class BlockSparseWeight:
    """A weight ``W [out_features, in_features]`` stored as block-CSR over blocks of ``block_size = (br, bc)``.

    Only retained blocks are stored (``values [nnz, br, bc]``, each block contiguous); blocks at ragged edges are
    zero-padded to full size. ``block_mask [R, C]`` (True = retained) is kept for export and inspection.

    Example::

        >>> w = torch.randn(96, 80)
        >>> mask = torch.rand(3, 3) < 0.5                    # R = ceil(96/32), C = ceil(80/32)
        >>> bsw = BlockSparseWeight.from_dense(w, mask, (32, 32))
        >>> y = lpl.kernels.block_sparse_linear(torch.randn(4, 80), bsw)   # == x @ (w * expanded mask).T
        >>> bsw.to_dense().shape, round(bsw.density, 2)
    """

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    block_size: tuple[int, int]
    block_mask: torch.Tensor
    _index: KernelIndex | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, block_mask: torch.Tensor, block_size: int | Sequence[int]
    ) -> "BlockSparseWeight":
        """Keep the blocks of ``weight`` where ``block_mask`` is True (mask shape ``[ceil(out/br), ceil(in/bc)]``)."""
        block_size = normalize_block_size(block_size)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise LplError(f"weight must be a 2-D tensor [out_features, in_features], got {_describe(weight)}.")
        if not weight.is_floating_point():
            raise LplError(
                f"weight must be a floating-point tensor, got dtype {weight.dtype}; convert it with .float()."
            )
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        if shape[1] == 0:  # x [..., 0] cannot be flattened to [-1, 0] in the forward (BlockSparseLinear refuses it too)
            raise LplError(f"weight has in_features = 0 (shape {shape}); a block-sparse weight needs at least one "
                           "input feature: drop the layer or give a weight of shape [out_features, in_features >= 1].")
        grid = block_grid(shape, block_size)
        mask = _check_mask(block_mask, grid, shape, block_size)
        (out_f, in_f), (br, bc), (nr, nc) = shape, block_size, grid
        if weight.is_meta:  # a layer built without memory (to load weights into later): the structure, no values
            if mask.is_meta:
                raise LplError("a block mask on the meta device holds no pattern; give it on the CPU.")
            values = weight.new_empty(int(mask.sum()), br, bc)  # the pattern stays on the CPU: it has data
            return cls(*csr_structure(mask.cpu()), values, shape, block_size, mask.cpu())
        mask = mask.to(weight.device)
        padded = weight.detach().new_zeros(nr * br, nc * bc)
        padded[:out_f, :in_f] = weight.detach()
        blocks = padded.reshape(nr, br, nc, bc).permute(0, 2, 1, 3)  # [R, C, br, bc]
        values = blocks[mask].contiguous()  # row-major over (R, C): CSR order, columns sorted within a row
        return cls(*csr_structure(mask), values, shape, block_size, mask)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` matrix (zeros at pruned blocks)."""
        (out_f, in_f), (br, bc) = self.shape, self.block_size
        nr, nc = self.block_mask.shape
        blocks = self.values.new_zeros(nr, nc, br, bc)
        blocks[self.block_mask] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(nr * br, nc * bc)[:out_f, :in_f].clone()

    @property
    def density(self) -> float:
        """Retained share of the weight's true elements (ragged edge blocks counted by their true size); 1.0 for a
        weight without elements (out_features = 0): nothing is pruned."""
        return block_density(self.block_mask, self.shape, self.block_size)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def kernel_index(self) -> KernelIndex:
        """Derived index tensors for the kernels (computed once, cached; the structure is checked then: a GPU kernel
        would read out of bounds where a hand-built one is inconsistent)."""
        if self._index is None or self._index.row_order.device != self.row_ptr.device:
            if not torch.compiler.is_compiling():  # data-dependent: once per weight, outside graphs
                check_csr(self.row_ptr, self.col_idx, block_grid(self.shape, self.block_size))
            self._index = build_kernel_index(self.row_ptr, self.col_idx, int(self.block_mask.shape[1]))
        return self._index

    def check_geometry(self) -> None:
        """Shape-only consistency of structure, values and ``shape`` (no device sync: every call checks it)."""
        (rows, cols), (br, bc) = block_grid(self.shape, self.block_size), self.block_size
        if tuple(self.block_mask.shape) != (rows, cols) or self.row_ptr.ndim != 1 or self.row_ptr.numel() != rows + 1:
            raise LplError(
                f"the block-sparse weight's structure does not fit its shape {tuple(self.shape)} with {br}x{bc} "
                f"blocks ({rows}x{cols} blocks): row_ptr has {self.row_ptr.numel()} entries (needs {rows + 1}), "
                f"block_mask shape {tuple(self.block_mask.shape)}; build it with BlockSparseWeight.from_dense.")
        nnz = self.col_idx.numel()
        if tuple(self.values.shape) != (nnz, br, bc):
            raise LplError(f"the block-sparse weight's values must have shape (nnz, br, bc) = {(nnz, br, bc)} (its "
                           f"col_idx holds {nnz} blocks), got {tuple(self.values.shape)}.")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BlockSparseWeight":
        """A copy on ``device`` and/or with values in ``dtype`` (the index stays int64)."""
        index = self._index
        moved = BlockSparseWeight(
            self.row_ptr.to(device),
            self.col_idx.to(device),
            self.values.to(device=device, dtype=dtype),
            self.shape,
            self.block_size,
            self.block_mask.to(device),
        )
        if index is not None:
            moved._index = KernelIndex(*(t.to(device) for t in index))
        return moved


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return f"a {type(obj).__name__}"


def check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, grid: tuple[int, int]) -> None:
    """Refuse a block-CSR structure that is not one of a ``grid = (R, C)`` of blocks (any device; a GPU one is
    synced once). The CPU kernel checks its index tensors at every call: on the CPU they are read through numpy
    views, as each torch op costs several microseconds."""
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.ndim != 1:
            raise LplError(f"{name} must be a 1-D int64 tensor, got {_describe(t)}.")
    if row_ptr.numel() != grid[0] + 1:
        raise LplError(f"row_ptr has {row_ptr.numel()} entries but the weight has {grid[0]} block rows (needs "
                       f"{grid[0] + 1}); check out_features/in_features and block_size.")
    nnz = col_idx.numel()
    on_cpu = row_ptr.device.type == col_idx.device.type == "cpu"
    rows, cols = (row_ptr.numpy(), col_idx.numpy()) if on_cpu else (row_ptr, col_idx)
    if int(rows[0]) != 0 or int(rows[-1]) != nnz or bool((rows[1:] < rows[:-1]).any()):
        raise LplError(f"row_ptr must start at 0, never decrease and end at nnz={nnz} (col_idx's length).")
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= grid[1]):
        raise LplError(f"col_idx must lie in [0, {grid[1]}) ({grid[1]} block columns), got range "
                       f"[{int(cols.min())}, {int(cols.max())}].")


def csr_structure(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-CSR ``row_ptr`` and ``col_idx`` (sorted within each block row) of a boolean block mask."""
    row_ptr = torch.cat([mask.new_zeros(1, dtype=torch.int64), torch.cumsum(mask.sum(1), 0)])
    return row_ptr, mask.nonzero()[:, 1].contiguous()


def _check_mask(
    block_mask: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int], block_size: tuple[int, int]
) -> torch.Tensor:
    if not isinstance(block_mask, torch.Tensor) or tuple(block_mask.shape) != grid:
        raise LplError(
            f"block_mask must have shape {grid} = (ceil({shape[0]}/{block_size[0]}), ceil({shape[1]}/{block_size[1]})) "
            f"for a {shape[0]}x{shape[1]} weight with {block_size[0]}x{block_size[1]} blocks, "
            f"got {_describe(block_mask)}."
        )
    if block_mask.dtype != torch.bool:
        if (block_mask.is_floating_point() or block_mask.is_complex()
                or not bool(((block_mask == 0) | (block_mask == 1)).all())):
            raise LplError(f"block_mask must be boolean (or 0/1 integers), got dtype {block_mask.dtype}.")
        block_mask = block_mask.bool()
    return block_mask
