"""Block-sparse linear layers: block-CSR weights, Triton kernels on CUDA, a CPU path, autograd and torch.compile.

``import lpl.kernels`` needs only torch; Triton is imported on the first CUDA call.

Example::

    >>> from lpl.kernels import BlockSparseWeight, block_sparse_linear
    >>> w = BlockSparseWeight.from_dense(weight, block_mask, (64, 64))
    >>> y = block_sparse_linear(x, w, bias)
"""

from .format import BlockSparseWeight
from .module import BlockSparseLinear, pack_for_inference
from .ops import block_sparse_linear

__all__ = ["BlockSparseLinear", "BlockSparseWeight", "block_sparse_linear", "pack_for_inference"]
