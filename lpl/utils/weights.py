"""Loading pretrained weights from a local file: safetensors, or a state dict read with ``weights_only=True``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lpl.utils.errors import LplError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("model.", "module.", "_orig_mod.")


def _refused_global(message: str) -> str | None:
    """torch's words for a Python object (a class or function: a pickle "global") that ``weights_only`` refused,
    e.g. "Unsupported global: GLOBAL argparse.Namespace"; None when ``message`` is another failure (not a pickle)."""
    if "Weights only load failed" not in message:
        return None
    for line in message.splitlines():
        if "unsupported" in line.lower() and "global" in line.lower():
            reason = line.strip().removeprefix("WeightsUnpickler error: ")
            return reason.split(" was not an allowed global")[0].split(". Please use")[0].rstrip(".")
    return None


def read_state_dict(path: str | Path, strip_prefixes: bool = True,
                    what: str = "pretrained_path") -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects; unwrap Lightning / DeiT checkpoint layouts.

    With ``strip_prefixes``, prefixes shared by every key (``model.``, ``module.``, ``_orig_mod.``, also stacked) are
    removed so a LightningModule's checkpoint loads into the bare network it wraps. ``what`` names the path in errors
    (the option the user set). A ``.safetensors`` suffix, in any case, is read as safetensors; anything else with
    ``torch.load``.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a weights file" if path.is_dir() else "does not exist"
        raise LplError(f"{what} {str(path)!r} {problem}; give the path of a local .safetensors, .pth or .ckpt file.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any parse failure means "not a weights file"
        reason = _refused_global(str(error))
        if reason is not None:
            raise LplError(
                f"{what} {str(path)!r} holds Python objects besides tensors (torch: {reason}), and lpl does not "
                "unpickle those: that can run arbitrary code. Training checkpoints (timm's and DeiT's train.py save "
                "args=argparse.Namespace) keep the weights under 'model' or 'state_dict': if you trust the file, "
                "extract them once in a Python session, e.g. `ckpt = torch.load(path, weights_only=False); "
                "safetensors.torch.save_file({k: v.contiguous() for k, v in ckpt['model'].items()}, "
                "'weights.safetensors')`, and give that file."
            ) from None
        raise LplError(
            f"{what} {str(path)!r} is not a readable weights file ({type(error).__name__}); "
            "expected safetensors or a PyTorch state dict saved with torch.save."
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LplError(f"{what} {str(path)!r} holds no state dict of tensors.")
    stripped = True
    while strip_prefixes and stripped and state:  # nested wrappers stack them: "module.model." (DDP of a module)
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _names(entry: Any) -> tuple[str, ...]:
    """A timm ``pretrained_cfg`` entry naming modules ("head", or ("head", "head_dist")) as a tuple of names."""
    if isinstance(entry, str):
        return (entry,)
    return tuple(name for name in entry if isinstance(name, str)) if isinstance(entry, (tuple, list)) else ()


def _keep_new_heads(model: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Give every classifier head whose parameters the file lacks or holds in another shape (another num_classes)
    the model's own, newly initialised values, as timm does when fine-tuning to other classes; returns notes."""
    notes = []
    for head in _names((getattr(model, "pretrained_cfg", None) or {}).get("classifier")):
        under = [k for k in {*own, *state} if k.startswith(head + ".")]
        differ = sorted(k for k in under if k not in own or k not in state or own[k].shape != state[k].shape)
        if not differ:
            continue
        for key in under:
            if key in own:
                state[key] = own[key]
            else:  # the model has no such parameter (num_classes=0: an Identity head)
                del state[key]
        shapes = ", ".join(f"{k} {tuple(state[k].shape) if k in state else 'dropped'}" for k in differ)
        notes.append(f"kept the model's newly initialised classifier head '{head}' (the file's differs: {shapes}); "
                     "it trains from scratch")
    return notes


def _resample_positions(model: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Resample a square grid of absolute position embeddings to the model's patch grid (another img_size)."""
    from timm.layers import resample_abs_pos_embed

    key, grid = "pos_embed", getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if key not in own or key not in state or own[key].shape == state[key].shape or grid is None:
        return []
    mine, theirs = own[key], state[key]
    # prefix tokens (class, distillation) keep their embeddings; the model's own count tells how many there are
    prefix = mine.shape[1] - grid[0] * grid[1] if mine.ndim == 3 else -1
    old = theirs.shape[1] - prefix if theirs.ndim == 3 else 0
    side = math.isqrt(old) if old > 0 else 0
    if prefix < 0 or side * side != old or theirs.shape[0] != 1 or theirs.shape[2] != mine.shape[2]:
        return []  # not the layout timm resamples: reported as a shape mismatch
    state[key] = resample_abs_pos_embed(theirs, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return [f"resampled {key} from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid"]


def _adapt_input_convs(model: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Adapt an RGB first convolution to the model's input channels (another in_chans), as timm does."""
    from timm.models import adapt_input_conv

    notes = []
    for conv in _names((getattr(model, "pretrained_cfg", None) or {}).get("first_conv")):
        key = conv + ".weight"
        if key not in own or key not in state or own[key].ndim != 4 or state[key].ndim != 4:
            continue
        mine, theirs = own[key].shape, state[key].shape
        if mine != theirs and theirs[1] == 3 and (mine[0], *mine[2:]) == (theirs[0], *theirs[2:]):
            state[key] = adapt_input_conv(mine[1], state[key])
            notes.append(f"adapted {key} from 3 to {mine[1]} input channels")
    return notes


def state_dict_differences(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]
                           ) -> tuple[list[str], list[str], list[str]]:
    """How the state dict ``theirs`` differs from ``ours``: the keys of ``ours`` it lacks, the keys it adds, and the
    keys both hold in other shapes (in ``ours``'s order; a lazy parameter not built yet has no shape to differ)."""
    missing = [key for key in ours if key not in theirs]
    unexpected = [key for key in theirs if key not in ours]
    reshaped = [key for key in ours if key in theirs and not torch.nn.parameter.is_lazy(ours[key])
                and tuple(theirs[key].shape) != tuple(ours[key].shape)]
    return missing, unexpected, reshaped


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model``, fine-tuning it to the model's task as timm's pretrained loading does.

    Adapted, each with a rank-zero info line: a classifier head of another shape (another ``num_classes``) or
    missing in the file keeps the model's new head; absolute position embeddings on a square grid are resampled to
    the model's patch grid (another ``img_size``); a 3-channel first convolution is adapted to the model's input
    channels (another ``in_chans``). Heads and first convolutions are found by the timm model's ``pretrained_cfg``.
    Any other difference fails, naming the first mismatching names and shapes.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    notes = [*_keep_new_heads(model, own, state), *_resample_positions(model, own, state),
             *_adapt_input_convs(model, own, state)]
    missing, unexpected, reshaped = state_dict_differences(own, state)
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped]
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape))
            if items
        )
        raise LplError(
            f"pretrained weights in {str(path)!r} do not match the model: {details}. The file holds another "
            "architecture: build the one it was trained with (model_name, and embed_dim, depth, num_heads, mlp_ratio, "
            "patch_size or model_kwargs as the file's); another num_classes, img_size (absolute position embeddings) "
            "or in_chans (from RGB) is adapted on loading."
        )
    model.load_state_dict(state)
    for note in notes:
        rank_zero_info(f"pretrained weights {str(path)!r}: {note}.")
