"""``BlockSparseLinear``: an ``nn.Linear`` replacement whose weight is stored and computed block-sparse."""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from lpl.utils.errors import LplError

from .format import (BlockSparseWeight, KernelIndex, block_density, block_grid, build_kernel_index, csr_structure,
                     normalize_block_size)
from .ops import block_sparse_linear

_INDEX_BUFFERS = KernelIndex._fields


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W [out_features, in_features]`` keeping only the blocks where ``block_mask`` is True.

    The state dict holds plain tensors only (safetensors-friendly): ``values [nnz, br, bc]``, ``bias``,
    ``row_ptr``, ``col_idx``, ``block_mask`` and ``geometry = [out_features, in_features, br, bc]``. Loading a state
    dict with another mask of the same geometry rebuilds the sparsity structure; another geometry is an ``LplError``.
    A dense layer's state (``weight`` [out_features, in_features], ``bias``: the masked dense model a pruning
    fine-tune checkpoints, or a layer ``to_block_sparse`` left dense) loads into this layer's own block structure. Its
    entries in the blocks this layer prunes must be zero: otherwise the state is refused (an ``LplError`` counting
    those blocks), since dropping them would silently change the outputs: it is not the masked model of this mask.
    Adopting another mask changes the shape of ``values``: an optimizer that already stepped the layer holds state of
    the old shape, and its next step is refused (an ``LplError``): build it again after loading, or load its state.

    Built on the meta device with a ``block_mask``, the layer keeps that pattern on the CPU: ``to_empty()`` puts it
    back in place and a dense state is cut by it. Built there without one, its pattern comes from the block-sparse
    state loaded into it (a dense state is refused, before and after ``to_empty()``).

    Example::

        >>> layer = BlockSparseLinear.from_linear(nn.Linear(768, 3072), mask, block_size=(64, 64))  # mask [48, 12]
        >>> y = layer(torch.randn(8, 197, 768))                  # [8, 197, 3072]
        >>> save_safetensors_atomic(layer.state_dict(), "fc1.safetensors")
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int | Sequence[int],
        block_mask: torch.Tensor | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if self.in_features <= 0 or self.out_features <= 0:
            raise LplError(f"in_features and out_features must be positive, got {in_features} and {out_features}.")
        self.block_size = normalize_block_size(block_size)
        grid = block_grid((self.out_features, self.in_features), self.block_size)
        pattern_given = block_mask is not None  # on the meta device only a given mask is a pattern to keep
        if block_mask is None:  # on the CPU even under a device context: the pattern must hold data
            block_mask = torch.ones(grid, dtype=torch.bool, device="cpu")
        bound = 1.0 / math.sqrt(self.in_features)
        weight = torch.empty(self.out_features, self.in_features, device=device, dtype=dtype).uniform_(-bound, bound)
        sparse = BlockSparseWeight.from_dense(weight, block_mask, self.block_size)
        self.values = nn.Parameter(sparse.values)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype).uniform_(-bound, bound))
            if bias else None
        )
        self.register_buffer(
            "geometry",
            torch.tensor([self.out_features, self.in_features, *self.block_size], dtype=torch.int64, device=device),
        )
        self._set_structure(sparse.block_mask, sparse.row_ptr, sparse.col_idx, known=pattern_given)
        # (PackedWeightCPU, version, data_ptr, the values tensor packed from) after pack_for_inference()
        self._inference_pack = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_mask: torch.Tensor, block_size: int | Sequence[int]
    ) -> "BlockSparseLinear":
        """The block-sparse copy of ``linear`` keeping the blocks where ``block_mask`` ([R, C]) is True."""
        if not isinstance(linear, nn.Linear):
            raise LplError(f"from_linear takes an nn.Linear, got a {type(linear).__name__}.")
        weight = linear.weight.detach()
        sparse = BlockSparseWeight.from_dense(weight, block_mask, block_size)
        layer = cls(linear.in_features, linear.out_features, sparse.block_size, sparse.block_mask,
                    bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(sparse.values)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.values.requires_grad_(linear.weight.requires_grad)  # a frozen layer stays frozen
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def _set_structure(self, block_mask: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                       known: bool = True) -> None:
        """Install a structure (``known``: False for the all-blocks placeholder of a meta layer built without a
        mask, whose pattern is to come from the state dict loaded into it)."""
        device = self.geometry.device
        # On the meta device the buffers hold no data: the pattern stays on the CPU here, so that to_empty() can put
        # it back and a dense (masked fine-tuning) state can be cut by it. None where there is no pattern to keep.
        self._meta_pattern = block_mask.cpu() if device.type == "meta" and known else None
        self._pattern_unknown = device.type == "meta" and not known
        self.register_buffer("block_mask", block_mask.to(device))
        self.register_buffer("row_ptr", row_ptr.to(device))
        self.register_buffer("col_idx", col_idx.to(device))
        self._index_from(row_ptr, col_idx)

    def _index_from(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        """The kernels' derived index (not saved), computed where the structure has data (a layer on the meta
        device keeps its pattern's index as meta tensors until weights are loaded)."""
        index = build_kernel_index(row_ptr, col_idx, int(self.block_mask.shape[1]))
        for name, tensor in zip(_INDEX_BUFFERS, index):
            self.register_buffer(name, tensor.to(self.geometry.device), persistent=False)

    @property
    def density(self) -> float:
        """Retained share of the weight's true elements (see :attr:`BlockSparseWeight.density`)."""
        pattern = self._known_pattern()
        if pattern is None:
            raise LplError("this block-sparse layer was built on the meta device without a block_mask: its pattern, "
                           "and so its density, comes from the block-sparse state dict loaded into it; load one "
                           "first (or build the layer with its block_mask).")
        return block_density(pattern, (self.out_features, self.in_features), self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (zeros in pruned blocks), rebuilt from the blocks at each
        read and differentiable in ``values``: for model code that reads a Linear's weight (its device, dtype, shape,
        as timm's ConViT does, or its values). The forward never builds it. Writing into it changes nothing: the
        layer's parameters are ``values`` and ``bias``."""
        return self.sparse_weight().to_dense()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # a read-only view of the blocks (nn.Module's own error: "attribute already exists")
            raise LplError("BlockSparseLinear.weight is the dense view of its blocks and cannot be set: write the "
                           "blocks (values, [nnz, br, bc]) or load a state dict (a dense weight loads into the blocks "
                           "its mask keeps).")
        super().__setattr__(name, value)

    def _known_pattern(self) -> torch.Tensor | None:
        """The block mask on the CPU, or None where the layer has none yet (built on the meta device without a
        mask, and maybe materialised by to_empty() since, which leaves a placeholder structure)."""
        if getattr(self, "_pattern_unknown", False):
            return None
        if self.block_mask.is_meta:
            return getattr(self, "_meta_pattern", None)
        return self.block_mask.cpu()

    def sparse_weight(self) -> BlockSparseWeight:
        """The weight as a :class:`BlockSparseWeight` sharing this module's tensors (values stay a Parameter)."""
        index = KernelIndex(*(getattr(self, name) for name in _INDEX_BUFFERS))
        return BlockSparseWeight(self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features),
                                 self.block_size, self.block_mask, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._inference_pack_for(x)
        if packed is not None:
            return self._packed_forward(x, packed)
        return block_sparse_linear(x, self.sparse_weight(), self.bias)

    # ---- packed CPU inference ------------------------------------------------------------------------------------
    def pack_for_inference(self) -> "BlockSparseLinear":
        """Lay the weight out once for repeated CPU inference; returns the layer.

        The CPU kernel reads the weight as packed strips and packs it at every call, which for short inputs costs
        more than the matmul (one token through a 4096x1024 layer at density 0.5 ran 2.0-2.4x slower than dense,
        about 0.5x packed once). The packed copy serves forwards in eval mode that record no gradient (``no_grad``,
        ``inference_mode``) on float32/bfloat16/float16 CPU inputs, outside ``torch.compile``; ``train()``,
        ``load_state_dict`` and moving the layer to another device or dtype drop it (a move that moves nothing, such
        as the ``model.to(device)`` Lightning makes before predict/validate/test, keeps it), and so does any change
        to ``values`` that bumps its version counter (``copy_``, most optimizer steps). It is a snapshot: a change
        that does not (a fused optimizer step, a write through ``.data``) is not seen until you pack again. Copies
        (pickle, deepcopy) do not carry it. Without a C compiler, with ``LPL_CPU_KERNEL=torch``, or for a layer built
        under ``torch.inference_mode`` (its tensors keep no version counter to watch) this does nothing.
        """
        from .cpu import compiled_kernel_available, pack_weight_cpu
        from .cpu._build import torch_path_forced

        self._inference_pack = None
        values = self.values
        if values.device.type != "cpu" or values.dtype == torch.float64 or values.is_inference() or (
                torch_path_forced() or not compiled_kernel_available()):
            return self  # no packed path there, or no way to see a change: forwards run as before
        packed = pack_weight_cpu(values.detach(), self.row_ptr, self.col_idx, self.out_features, self.in_features,
                                 self.block_size)
        # the reference to the tensor packed from keeps its memory allocated: no other tensor can get its address
        self._inference_pack = (packed, values._version, values.data_ptr(), values.detach())
        return self

    def _inference_pack_for(self, x: torch.Tensor):
        pack = getattr(self, "_inference_pack", None)
        if pack is None or self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
            return None  # graphs would not see the kernel call; autocast casts in block_sparse_linear
        if torch._C._are_functorch_transforms_active():
            return None  # x may be batched (torch.func.vmap): the kernel reads plain tensors only
        from .cpu._build import torch_path_forced

        if torch_path_forced():
            return None
        packed, version, pointer, _ = pack
        if self.values._version != version or self.values.data_ptr() != pointer:
            self._inference_pack = None  # the weights changed since they were packed
            return None
        return packed

    def _packed_forward(self, x: torch.Tensor, packed) -> torch.Tensor:
        from .cpu import packed_linear_cpu

        values = self.values
        if x.dtype != values.dtype or x.ndim == 0 or x.shape[-1] != self.in_features:  # the full checks and errors
            from .ops import _check_inputs

            _check_inputs(x, self.sparse_weight(), self.bias)
        y2d = packed_linear_cpu(x.reshape(-1, self.in_features), packed,
                                None if self.bias is None else self.bias.detach())
        return y2d.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:
        # the packed copy is stamped with this process's address and version counter of values: a copy's values
        # could match both by chance (a freed address reused) and read a stale weight
        return {**super().__getstate__(), "_inference_pack": None}

    def train(self, mode: bool = True) -> "BlockSparseLinear":
        if mode:
            self._inference_pack = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), .cuda(): the packed copy is of the old tensor, unless nothing moved (Lightning calls
        # model.to(device) before predict/validate/test; .to() of a tensor already there returns the tensor itself)
        pack, self._inference_pack = getattr(self, "_inference_pack", None), None  # dropped if fn raises
        structure = (self.row_ptr, self.col_idx)
        mask, was_meta = self.block_mask, self.values.is_meta
        result = super()._apply(fn, recurse)
        if was_meta and not self.values.is_meta:  # to_empty(): the structure buffers now hold uninitialised memory
            self._materialise_structure()
        elif self.block_mask.is_meta and not mask.is_meta and not getattr(self, "_pattern_unknown", False):
            self._meta_pattern = mask.cpu()  # .to("meta"): the pattern stays on the CPU, as when built there
        elif (pack is not None and self._pack_matches(pack) and self.row_ptr is structure[0]
                and self.col_idx is structure[1]):
            self._inference_pack = pack
        return result

    def _pack_matches(self, pack) -> bool:
        """Whether ``values`` is still the tensor ``pack`` was made from, unchanged: the same memory (the pack holds
        the packed-from tensor, so its address cannot have been freed and reused), layout, dtype and version."""
        _, version, pointer, source = pack
        values = self.values
        return (values.device == source.device and values.dtype == source.dtype and values.data_ptr() == pointer
                and values.shape == source.shape and values.stride() == source.stride()
                and values._version == version)

    def _materialise_structure(self) -> None:
        """After to_empty() from the meta device: the geometry, and the pattern kept on the CPU (a placeholder with
        every block, for a layer built without a mask: the state dict loaded next brings its pattern)."""
        device = self.values.device
        self.register_buffer("geometry", torch.tensor([self.out_features, self.in_features, *self.block_size],
                                                      dtype=torch.int64, device=device))
        pattern = getattr(self, "_meta_pattern", None)
        known = pattern is not None
        if not known:
            pattern = torch.ones(tuple(self.block_mask.shape), dtype=torch.bool, device="cpu")
        self._set_structure(pattern, *csr_structure(pattern))
        self._pattern_unknown = not known

    def extra_repr(self) -> str:
        br, bc = self.block_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size=({br}, {bc}), "
                f"blocks={self.col_idx.numel()}/{self.block_mask.numel()}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = [self.out_features, self.in_features, *self.block_size]
        geometry = state_dict.get(prefix + "geometry")
        mask = state_dict.get(prefix + "block_mask")
        if geometry is not None and [int(v) for v in geometry.tolist()] != expected:
            raise LplError(
                f"state dict at '{prefix}' is for a {_geometry_text(geometry.tolist())} block-sparse layer, but this "
                f"layer is {_geometry_text(expected)}; build the layer with the checkpoint's shape and block size."
            )
        if mask is not None:
            if tuple(mask.shape) != tuple(self.block_mask.shape):
                raise LplError(
                    f"state dict at '{prefix}' has a block_mask of shape {tuple(mask.shape)}, but this layer "
                    f"({_geometry_text(expected)}) needs {tuple(self.block_mask.shape)}; the checkpoint is from "
                    f"another layer shape or block size."
                )
            mask = mask.to("cpu", torch.bool)
        # every check before anything changes: a refused state dict leaves the layer as it was
        pattern = mask if mask is not None else self._known_pattern()
        if pattern is not None:  # row_ptr and col_idx follow from the mask: anything else is damage
            for key, ours in zip(("row_ptr", "col_idx"), csr_structure(pattern)):
                theirs = state_dict.get(prefix + key)
                if theirs is not None and not torch.equal(theirs.cpu(), ours):
                    raise LplError(f"state dict at '{prefix}': {key} does not match its block_mask; the file is "
                                   "corrupt.")
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and prefix + "values" not in state_dict:  # a dense layer's state
            state_dict[prefix + "values"] = self._values_from_dense(weight, pattern, prefix)
            del state_dict[prefix + "weight"]
            if mask is None:  # it takes this layer's structure, which stands in for the keys a dense state lacks
                ours = {key: getattr(self, key) for key in ("geometry", "block_mask", "row_ptr", "col_idx")}
                if self.block_mask.is_meta:  # the pattern kept on the CPU, where the weight is (assign=True)
                    ours = dict(zip(("block_mask", "row_ptr", "col_idx"), (pattern, *csr_structure(pattern))),
                                geometry=torch.tensor(expected, dtype=torch.int64))
                    ours = {key: tensor.to(weight.device) for key, tensor in ours.items()}
                for key, tensor in ours.items():
                    state_dict.setdefault(prefix + key, tensor)
        expected_values = (self.values.shape[0] if mask is None else int(mask.sum()), *self.block_size)
        values = state_dict.get(prefix + "values")
        if values is not None and tuple(values.shape) != expected_values:
            raise LplError(
                f"state dict at '{prefix}' has values of shape {tuple(values.shape)}, but its block_mask keeps "
                f"{expected_values[0]} blocks of {self.block_size}: expected {expected_values}."
            )
        if mask is not None and (self.block_mask.is_meta or getattr(self, "_pattern_unknown", False)
                                 or not torch.equal(mask, self.block_mask.cpu())):
            self._adopt_mask(mask)
        self._inference_pack = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.row_ptr.is_meta:  # load_state_dict(assign=True) may have put new structure tensors in place
            self._index_from(self.row_ptr, self.col_idx)

    def _values_from_dense(self, weight: torch.Tensor, pattern: torch.Tensor | None, prefix: str) -> torch.Tensor:
        """The retained blocks of a dense state's ``weight`` under ``pattern``; refused if a pruned one is not zero."""
        geometry = _geometry_text([self.out_features, self.in_features, *self.block_size])
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise LplError(f"state dict at '{prefix}' has a dense weight of shape {tuple(weight.shape)}, but this "
                           f"layer is {geometry}; the checkpoint is from another layer.")
        if pattern is None:
            raise LplError(f"state dict at '{prefix}' holds a dense weight, but this layer was built on the meta "
                           "device without a block_mask, so it has no block mask to cut it by (to_empty() leaves "
                           "it a placeholder); build the layer with its block_mask (on the meta device too), or "
                           "load the block-sparse state exported from it.")
        pruned = BlockSparseWeight.from_dense(weight, ~pattern, self.block_size).values
        carrying = int(pruned.flatten(1).ne(0).any(1).sum())  # NaN counts as nonzero
        if carrying:
            raise LplError(
                f"state dict at '{prefix}' holds a dense weight with nonzero entries in {carrying} of the "
                f"{pruned.shape[0]} blocks this {geometry} layer prunes; loading would drop them and change its "
                "outputs. Load the masked model's weights (lpl.prune.apply_masks zeroes the pruned blocks), or "
                "export the model with the prune result that checkpoint was made with."
            )
        return BlockSparseWeight.from_dense(weight, pattern, self.block_size).values

    def _adopt_mask(self, mask: torch.Tensor) -> None:
        """Take the checkpoint's sparsity pattern: rebuild the structure and resize ``values`` (same geometry)."""
        mask = mask.cpu()
        row_ptr, col_idx = csr_structure(mask)
        old_shape = tuple(self.values.shape)
        self.values.data = self.values.new_zeros(col_idx.numel(), *self.block_size)  # the checkpoint's come next
        if tuple(self.values.shape) != old_shape and not self.values.is_meta:
            self.values.grad = None  # a gradient of the old pattern: another shape, and other blocks
            _watch_optimizers(self, old_shape)
        self._set_structure(mask, row_ptr, col_idx)


# Layers whose ``values`` load_state_dict reshaped (another block mask adopted) -> the shape before. An optimizer that
# stepped them earlier keeps state of that shape (Adam's moments) and would fail deep in its update; a step pre-hook
# common to all optimizers, registered at the first such load, refuses that step with the cause. Keyed weakly by the
# layer, never by the tensor: torch cannot swap a tensor that has a weak reference (swap-mode conversions).
_RESHAPED_LAYERS: "weakref.WeakKeyDictionary[BlockSparseLinear, tuple[int, ...]] | None" = None


def _watch_optimizers(layer: "BlockSparseLinear", old_shape: tuple[int, ...]) -> None:
    global _RESHAPED_LAYERS
    if _RESHAPED_LAYERS is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _RESHAPED_LAYERS = weakref.WeakKeyDictionary()
        register_optimizer_step_pre_hook(_refuse_state_of_an_old_pattern)
    _RESHAPED_LAYERS[layer] = old_shape


def _refuse_state_of_an_old_pattern(optimizer, args, kwargs) -> None:
    """Optimizer step pre-hook: costs a lookup per reshaped layer (none before a mask was adopted)."""
    for layer, old_shape in list(_RESHAPED_LAYERS.items()):
        values = layer.values
        state = optimizer.state.get(values)  # state is a defaultdict: get() adds no entry
        if not state or tuple(values.shape) == old_shape:
            continue
        if any(isinstance(v, torch.Tensor) and tuple(v.shape) == old_shape for v in state.values()):
            raise LplError(
                f"{type(optimizer).__name__} holds state for a BlockSparseLinear's values of shape {old_shape}, but "
                f"load_state_dict adopted another block mask since and the values are now {tuple(values.shape)}: "
                "build the optimizer again after loading the layer's state (or load the optimizer state saved "
                "with that checkpoint)."
            )


def pack_for_inference(model: nn.Module) -> nn.Module:
    """:meth:`BlockSparseLinear.pack_for_inference` on every block-sparse layer of ``model``; returns ``model``.

    Example::

        >>> sparse = to_block_sparse(model, result).eval()
        >>> pack_for_inference(sparse)
        >>> with torch.inference_mode():
        ...     logits = sparse(images)
    """
    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            module.pack_for_inference()
    return model


def _geometry_text(geometry: Sequence[int]) -> str:
    out_f, in_f, br, bc = (int(v) for v in geometry)
    return f"{out_f}x{in_f} (blocks {br}x{bc})"
