"""Hardware-aware post-training block pruning of ViT Linear layers (LPViT, improved).

Example::

    from lpl.prune import prune_model, apply_masks
    result = prune_model(model, calib_loader, block_size=(16, 16), flops_keep=0.5)
    apply_masks(model, result)          # pruned blocks stay zero through fine-tuning and checkpoints
    result.save("prune_result")         # safetensors + JSON

Attributes load lazily, so ``import lpl.prune.hardware`` stays light and the exporter (``to_block_sparse``, from
``lpl.prune.export``) is only needed when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prune_model": "lpl.prune.api",
    "PruneResult": "lpl.prune.result",
    "apply_masks": "lpl.prune.masking",
    "BlockPruneCallback": "lpl.prune.callback",
    "HardwareProfile": "lpl.prune.hardware",
    "default_profile": "lpl.prune.hardware",
    "to_block_sparse": "lpl.prune.export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lpl.prune' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
