"""PruneResult: block masks plus what the pruning predicted, saved as safetensors (tensors) + JSON (the rest)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lpl.prune.blocks import block_grid, expand_block_mask
from lpl.utils.errors import LplError
from lpl.utils.io import atomic_write_bytes, atomic_write_text, safetensors_bytes

_TENSORS = "masks.safetensors"
_META = "result.json"
_FORMAT = "lpl.PruneResult/1"


@dataclass
class PruneResult:
    """Outcome of ``prune_model``: which blocks each Linear keeps and what that is predicted to cost.

    ``block_masks[name]`` is a bool [ceil(out/br), ceil(in/bc)] mask (True = kept) of ``model.get_submodule(name)``;
    ``flops_keep`` is the achieved share of the prunable layers' FLOPs; ``predicted_speedup`` and
    ``predicted_energy_ratio`` compare dense and block-sparse latency/energy of those layers under the cost model;
    ``curves[name][field]`` holds each layer's distortion curve (fields: distortion, flops, latency, energy, density
    per number of removed blocks; order: flat block indices in removal order).

    Example::

        result = prune_model(model, calib_loader, flops_keep=0.5)
        result.save("runs/prune_result")           # folder with masks.safetensors + result.json
        again = PruneResult.load("runs/prune_result")
        again.check_model(model)                   # LplError when names or shapes differ
    """

    block_masks: dict[str, torch.Tensor]
    block_size: tuple[int, int]
    shapes: dict[str, tuple[int, int]]
    flops_keep: float
    target_flops_keep: float
    predicted_speedup: float
    predicted_energy_ratio: float
    layer_latency: dict[str, tuple[float, float]] = field(default_factory=dict)  # (dense, pruned) seconds
    layer_energy: dict[str, tuple[float, float]] = field(default_factory=dict)   # (dense, pruned) joules
    curves: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    prune_seconds: float = 0.0

    @property
    def density(self) -> dict[str, float]:
        """Retained share of each layer's elements (ragged blocks counted by their true size)."""
        from lpl.prune.blocks import mask_density

        return {name: mask_density(mask, self.shapes[name], self.block_size) for name, mask in self.block_masks.items()}

    def check_model(self, model: nn.Module) -> None:
        """Raise LplError unless ``model`` has every masked Linear with the recorded shape."""
        self.layers_in(model)

    def layers_in(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The masked Linear layers of ``model`` by this result's names: ``model`` is the pruned model, or a
        submodule of it (the network inside a LightningModule); LplError when names or shapes differ."""
        modules = dict(model.named_modules())
        in_model = module_names(list(self.shapes), modules, (nn.Linear,))
        layers = {}
        for name, shape in self.shapes.items():
            layer = modules.get(in_model(name))
            if not isinstance(layer, nn.Linear):
                from lpl.kernels import BlockSparseLinear

                if isinstance(layer, BlockSparseLinear):
                    raise LplError(f"layer {name!r} is block-sparse already (exported by to_block_sparse): masks "
                                   "apply to the dense model the result was computed for; an exported model keeps "
                                   "its blocks as they are.")
                close = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:3]
                raise LplError(
                    f"this PruneResult masks layer {name!r}, which the model does not have as a Linear "
                    f"(it has e.g. {close}); load it onto the model it was computed for."
                )
            if tuple(layer.weight.shape) != tuple(shape):
                raise LplError(
                    f"layer {name!r} has shape {tuple(layer.weight.shape)} but the PruneResult was computed for "
                    f"{tuple(shape)}; load it onto the model it was computed for."
                )
            layers[name] = layer
        return layers

    def is_applied(self, model: nn.Module) -> bool:
        """Whether every block this result prunes is exactly zero in ``model`` (or the network inside it): the model
        is pruned by it already (masked, or loaded from a pruned checkpoint); LplError when layers differ."""
        for name, layer in self.layers_in(model).items():
            if layer.weight.is_meta:  # no values to look at: not pruned as far as anyone can tell
                return False
            kept = expand_block_mask(self.block_masks[name], tuple(layer.weight.shape), self.block_size)
            if layer.weight.detach().masked_select(~kept.to(layer.weight.device)).any():
                return False
        return True

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): what ``save`` writes and a Lightning checkpoint stores."""
        tensors = {f"mask/{name}": mask.to(torch.uint8) for name, mask in self.block_masks.items()}
        for name, curve in self.curves.items():
            for key, values in curve.items():
                tensors[f"curve/{name}/{key}"] = values
        meta = {
            "format": _FORMAT,
            "layers": list(self.block_masks),
            "block_size": list(self.block_size),
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "flops_keep": self.flops_keep,
            "target_flops_keep": self.target_flops_keep,
            "predicted_speedup": self.predicted_speedup,
            "predicted_energy_ratio": self.predicted_energy_ratio,
            "layer_latency": {name: list(v) for name, v in self.layer_latency.items()},
            "layer_energy": {name: list(v) for name, v in self.layer_energy.items()},
            "options": self.options,
            "prune_seconds": self.prune_seconds,
        }
        return tensors, meta

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/masks.safetensors`` (masks, curves), then ``path/result.json`` (everything else, with the
        masks file's sha256 and its own): a save interrupted between the two, or either file damaged, is refused by
        ``load``."""
        tensors, meta = self.to_state()
        data = safetensors_bytes(tensors)
        try:  # serialised before anything is written, so a result JSON cannot hold leaves no half-written pair
            meta = {**meta, "masks_sha256": hashlib.sha256(data).hexdigest()}
            text = json.dumps({**meta, "result_sha256": _meta_digest(meta)}, indent=2, sort_keys=True)
        except TypeError as error:
            raise LplError(f"cannot save this PruneResult: {error} (its options must be plain numbers, strings or "
                           "lists); nothing was written.") from None
        atomic_write_bytes(Path(path) / _TENSORS, data)
        atomic_write_text(Path(path) / _META, text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruneResult":
        """Read a result :meth:`save` wrote, checking that its two files belong together and are intact."""
        from safetensors.torch import load

        path = Path(path)
        if not (path / _META).is_file() or not (path / _TENSORS).is_file():
            raise LplError(f"{path} is not a saved PruneResult (expected {_META} and {_TENSORS} inside).")
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
            data = (path / _TENSORS).read_bytes()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LplError(f"cannot read the PruneResult in {path}: {error}.") from None
        if isinstance(meta, dict) and "result_sha256" in meta:  # absent from results saved before lpl wrote it
            if meta.pop("result_sha256") != _meta_digest(meta):
                raise LplError(f"{path / _META} was changed or damaged since it was saved (its content does not match "
                               "its own sha256): save the result again.")
        expected = meta.get("masks_sha256") if isinstance(meta, dict) else None
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise LplError(f"{path / _TENSORS} does not match {path / _META} (a save was interrupted, or the file was "
                           "changed or truncated): save the result again.")
        try:
            tensors = load(data)
        except Exception as error:  # safetensors raises its own error types for a damaged header or body
            raise LplError(f"{path / _TENSORS} is not a readable safetensors file ({error}).") from None
        return cls.from_state(tensors, meta)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "PruneResult":
        """The PruneResult a ``BlockPruneCallback`` stored in a Lightning checkpoint (any taken after pruning)."""
        path = Path(path)
        if not path.is_file():
            raise LplError(f"checkpoint {path} not found.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated file, one that is not a checkpoint, or one holding objects
            raise LplError(
                f"{path} could not be read as a Lightning checkpoint of tensors and plain values ({error}). If it is "
                "a checkpoint you trust that holds other objects (hyperparameters such as paths), load it yourself "
                "with torch.load(path, weights_only=False) and call PruneResult.from_state(state['tensors'], "
                "state['meta']) on state = checkpoint['callbacks']['BlockPruneCallback'].") from None
        states = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
        found = {key: state for key, state in states.items() if str(key).startswith("BlockPruneCallback") and state}
        if not found:
            raise LplError(f"{path} holds no pruning result: it was saved by a run without BlockPruneCallback, "
                           "before it pruned, or with save_weights_only=True.")
        if len(found) > 1:
            raise LplError(f"{path} holds several pruning results ({sorted(found)}); read the one you want with "
                           "PruneResult.from_state(tensors=..., meta=...) from checkpoint['callbacks'].")
        state = next(iter(found.values()))
        return cls.from_state(state["tensors"], state["meta"])

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PruneResult":
        """The result :meth:`to_state` described (what ``save`` writes and a checkpoint stores)."""
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise LplError(f"not a saved PruneResult: format {meta.get('format') if isinstance(meta, dict) else None!r}"
                           f", expected {_FORMAT!r}.")
        try:
            return cls._from_valid_state(tensors, meta)
        except (KeyError, TypeError, ValueError) as error:
            raise LplError(f"a saved PruneResult lacks or mistypes {error} (format {_FORMAT}): was it edited by "
                           "hand? Save it again from the pruned model.") from None

    @classmethod
    def _from_valid_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PruneResult":
        block_size = tuple(meta["block_size"])
        shapes = {name: tuple(shape) for name, shape in meta["shapes"].items()}
        masks = {}
        for name in meta["layers"]:
            mask = tensors[f"mask/{name}"].bool()
            if tuple(mask.shape) != block_grid(shapes[name], block_size):
                raise LplError(
                    f"the saved mask of {name!r} has shape {tuple(mask.shape)}, inconsistent with its layer."
                )
            masks[name] = mask
        curves: dict[str, dict[str, torch.Tensor]] = {}
        for key, values in tensors.items():
            if key.startswith("curve/"):
                name, field_name = key[len("curve/") :].rsplit("/", 1)
                curves.setdefault(name, {})[field_name] = values
        return cls(
            block_masks=masks,
            block_size=block_size,
            shapes=shapes,
            flops_keep=meta["flops_keep"],
            target_flops_keep=meta["target_flops_keep"],
            predicted_speedup=meta["predicted_speedup"],
            predicted_energy_ratio=meta["predicted_energy_ratio"],
            layer_latency={name: tuple(v) for name, v in meta["layer_latency"].items()},
            layer_energy={name: tuple(v) for name, v in meta["layer_energy"].items()},
            curves=curves,
            options=meta["options"],
            prune_seconds=meta["prune_seconds"],
        )


# the attributes wrappers keep the wrapped model under: torch.compile, DDP / DataParallel, FSDP, checkpointing
_WRAPPER_ATTRIBUTES = {"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def module_names(names: list[str], modules: Mapping[str, nn.Module],
                 kinds: tuple[type, ...]) -> Callable[[str], str]:
    """How ``modules`` (a model's named modules) name the layers ``names`` of a prune result, all of one of
    ``kinds``: as they are; without a leading part (the result was computed on a LightningModule, the model is the
    network inside it); or with wrappers' attributes in them (``torch.compile``'s ``_orig_mod``, DDP's ``module``
    around the model, FSDP or activation-checkpointing wrappers around its blocks: ``_WRAPPER_ATTRIBUTES``) - or
    both. Unchanged names when no such mapping exists (the caller reports the missing layer)."""
    if not names:
        return lambda name: name
    unwrapped: dict[str, str | None] = {}  # a layer's name without wrapper attributes -> its name (None: ambiguous)
    for place, module in modules.items():
        if isinstance(module, kinds):
            key = _without_wrappers(place)
            unwrapped[key] = place if key not in unwrapped else None
    parts = names[0].split(".")
    for strip in [""] + [".".join(parts[:length]) + "." for length in range(1, len(parts))]:
        if not all(name.startswith(strip) for name in names):
            continue
        if all(isinstance(modules.get(name.removeprefix(strip)), kinds) for name in names):
            return lambda name, strip=strip: name.removeprefix(strip)
        if all(unwrapped.get(_without_wrappers(name.removeprefix(strip))) for name in names):
            return lambda name, strip=strip: unwrapped[_without_wrappers(name.removeprefix(strip))]
    return lambda name: name


def _without_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_ATTRIBUTES)


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a result's metadata in one canonical JSON form (what ``result.json`` holds, less this digest), taken
    as read back: JSON turns keys into strings, which sort otherwise (options={2: ..., 10: ...})."""
    as_read = json.loads(json.dumps(meta))
    return hashlib.sha256(json.dumps(as_read, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
