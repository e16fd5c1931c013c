"""Loading pretrained weights from a local file: safetensors, or a state dict read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lpl.utils.errors import LplError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("model.", "module.", "_orig_mod.")


def read_state_dict(path: str | Path, strip_prefixes: bool = True,
                    what: str = "pretrained_path") -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects; unwrap Lightning / DeiT checkpoint layouts.

    With ``strip_prefixes``, a prefix shared by every key (``model.``, ``module.``, ``_orig_mod.``) is removed so a
    LightningModule's checkpoint loads into the bare network it wraps. ``what`` names the path in errors (the option
    the user set).
    """
    path = Path(path)
    if not path.is_file():
        raise LplError(
            f"{what} {str(path)!r} does not exist; give the path of a local .safetensors, .pth or .ckpt file."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a weights file"
        raise LplError(
            f"{what} {str(path)!r} is not a readable weights file ({type(error).__name__}); "
            "expected safetensors or a PyTorch state dict saved with torch.save."
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LplError(f"{what} {str(path)!r} holds no state dict of tensors.")
    for prefix in _PREFIXES if strip_prefixes else ():
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model``, failing with the first mismatching names and shapes."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape))
            if items
        )
        raise LplError(
            f"pretrained weights in {str(path)!r} do not match the model: {details}. "
            "Check model_name and its size arguments (num_classes, img_size, embed_dim, depth)."
        )
    model.load_state_dict(state)
