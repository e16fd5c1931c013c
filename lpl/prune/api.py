"""prune_model: post-training, calibration-only block pruning of a model's Linear layers to a FLOPs budget."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lpl.prune.allocation import allocate_dp, allocate_global, allocate_uniform, allowed_points, check_feasible
from lpl.prune.blocks import block_elements, block_grid, block_sum, check_block_size, expand_block_mask
from lpl.prune.curves import LayerCurve, additive_curve, build_curve, taylor2_curve
from lpl.prune.hardware import HardwareProfile, default_profile
from lpl.prune.importance import IMPORTANCES, LossFn, block_scores, collect_statistics, resolve_loss
from lpl.prune.masking import COMPUTED_WEIGHT, other_holders, weight_holders, weight_is_computed
from lpl.prune.result import PruneResult
from lpl.utils.errors import LplError, finite_number
from lpl.utils.trainer import rank_and_world

ALLOCATIONS = ("hardware", "uniform", "global")
DEFAULT_EXCLUDE = ("*head*",)
# Weight of the normalised hardware cost against the distortion of the uniform allocation: at a fixed FLOPs
# budget the hardware term decides between allocations of (nearly) equal distortion.
HARDWARE_WEIGHT = 0.1
# taylor2 keeps a K x K float64 Gram matrix per layer of K blocks (DeiT-B's MLP layers at 16x16 blocks: 9,216 blocks,
# 0.68 GB each, 21 GB for the model). Layers are calibrated in groups whose Grams fit this budget, each group's curves
# built and its Grams freed before the next group's pass: peak memory stays bounded, at one calibration pass a group.
GRAM_BYTES_PER_PASS = 2 << 30


def select_layers(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> dict[str, nn.Linear]:
    """Linear layers whose names match ``include`` (default: all) and none of ``exclude`` (default: heads).

    Linears torch reads as weights instead of calling (``nn.MultiheadAttention``'s ``out_proj``,
    ``nn.TransformerEncoderLayer``'s feed-forward) are never candidates: they can neither be calibrated through their
    calls nor run block-sparse. Nor are Linears that compute more than ``x W^T + b`` (``linear_extras``: a subclass
    with its own forward or parameters, a weight computed by a parametrization)."""
    all_linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    include = _patterns("include", include, ["*"])
    exclude = _patterns("exclude", exclude, list(DEFAULT_EXCLUDE))
    matching = {
        name: layer for name, layer in all_linears.items()
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    chosen = {name: layer for name, layer in matching.items() if not read_as_weight(model, name)}
    if len(chosen) < len(matching):
        skipped = [name for name in matching if name not in chosen]
        warnings.warn(f"prune_model: {len(skipped)} Linear layers left dense (e.g. {skipped[:3]}): torch reads them as "
                      "weights inside nn.MultiheadAttention / nn.TransformerEncoderLayer instead of calling them, so "
                      "they can neither be calibrated nor run block-sparse (nor can MultiheadAttention's "
                      "in_proj_weight, no Linear); write the block with nn.Linear layers it calls (as timm's "
                      "Attention and Mlp) to prune them.", stacklevel=3)
    linears = {name: layer for name, layer in all_linears.items() if not read_as_weight(model, name)}
    if not chosen:
        examples = ", ".join(list(linears)[:4]) or "none"
        raise LplError(
            f"include={include} / exclude={exclude} match no Linear layer (the model's Linear layers: {examples}); "
            "use glob patterns on module names such as '*.qkv' or '*mlp.fc*'."
        )
    return _without_unprunable(model, chosen, explicit=include != ["*"])


def _patterns(option: str, value: str | Sequence[str] | None, default: list[str]) -> list[str]:
    """Glob patterns from one pattern or a sequence of them (a string is one pattern, not its characters)."""
    if value is None:
        return default
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise LplError(f"{option} must be a glob pattern or a list of them (such as '*.qkv'), got {value!r}.")
    return patterns


def selected_layers(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None,
                    block_size: int | tuple[int, int]) -> tuple[dict[str, nn.Linear], tuple[int, int]]:
    """``select_layers`` and the block size checked against the layers it selects: what pruning will calibrate."""
    layers = select_layers(model, include, exclude)
    shapes = {n: tuple(layer.weight.shape) for n, layer in layers.items()}
    return layers, check_block_size(block_size, shapes, _patterns("exclude", exclude, list(DEFAULT_EXCLUDE)))


def read_as_weight(model: nn.Module, name: str) -> bool:
    """Whether torch reads the Linear ``name``'s weight without calling the layer: ``nn.MultiheadAttention``'s
    ``out_proj``, and ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2`` (its inference fast path)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(parent, nn.MultiheadAttention) or (
        isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"))


def _plain_forwards() -> set[Callable]:
    """Linear forwards that compute exactly ``F.linear(x, self.weight, self.bias)``: torch's and timm's (which only
    casts under TorchScript)."""
    forwards = {nn.Linear.forward}
    try:
        from timm.layers import Linear as TimmLinear
    except ImportError:
        return forwards
    return forwards | {TimmLinear.forward}


def linear_extras(layer: nn.Linear) -> str | None:
    """What ``layer`` computes beyond ``x W^T + b`` from its own weight and bias parameters (a block mask or a
    ``BlockSparseLinear`` would drop or miss it), said as a clause; None for a plain Linear."""
    if weight_is_computed(layer):
        return COMPUTED_WEIGHT
    if type(layer).forward not in _plain_forwards() or "forward" in vars(layer):  # a class's or a wrapper's
        kind = type(layer)
        return f"it is a {kind.__module__}.{kind.__qualname__} with its own forward"
    extra = [name for name, _ in layer.named_parameters()] + [name for name, _ in layer.named_buffers()]
    extra = [name for name in extra if name not in ("weight", "bias")]
    if extra:
        return f"it holds {extra} besides its weight and bias"
    return None


def _without_unprunable(model: nn.Module, layers: dict[str, nn.Linear], explicit: bool) -> dict[str, nn.Linear]:
    """``layers`` without those that cannot be block-pruned (computing more than ``x W^T + b``: ``linear_extras``;
    sharing one weight with another module, selected or not, whose use of it a layer's mask would change unseen): an
    error when the user chose them, left dense with a warning in the default selection."""
    extras = {name: linear_extras(layer) for name, layer in layers.items()}
    holders = weight_holders(model)  # weight parameters only: a computed weight is a new tensor at every read
    problems: dict[str, tuple[str, list[str]]] = {}  # name -> (why, the exclude patterns that leave it dense)
    for name, layer in layers.items():
        if extras[name] is not None:
            problems[name] = (f"{extras[name]}, which a block-sparse layer would not keep", [name])
        elif tied := other_holders(model, holders, layer):
            others = ", ".join(repr(n) for n in tied)
            tied_layers = [n.rpartition(".")[0] for n in holders[id(layer.weight)] if n.rpartition(".")[0] in layers]
            problems[name] = (f"it shares one weight tensor with {others} (tied), and a block mask would prune it "
                              "there too", tied_layers)
    if not problems:
        return layers
    name, (why, exclude) = next(iter(problems.items()))
    if explicit:
        raise LplError(f"Linear layer {name!r} cannot be block-pruned: {why}; leave it dense with exclude={exclude!r}.")
    warnings.warn(f"prune_model: {len(problems)} Linear layers left dense, since they cannot be block-pruned (e.g. "
                  f"{name!r}: {why}).", stacklevel=5)  # prune_model's caller
    remaining = {n: layer for n, layer in layers.items() if n not in problems}
    if not remaining:
        raise LplError(f"no selected Linear layer can be block-pruned (e.g. {name!r}: {why}).")
    return remaining


def check_options(flops_keep: float, importance: str, allocation: str, lambda_power: float,
                  min_density: float, max_density: float, stages: int) -> tuple[float, float, float, float]:
    """Refuse pruning options out of range with an LplError naming the option (shared by prune_model and the
    callback); returns flops_keep, lambda_power, min_density and max_density as Python floats (numpy or tensor
    numbers would reach the saved result's JSON)."""
    for name, value in (("flops_keep", flops_keep), ("lambda_power", lambda_power), ("min_density", min_density),
                        ("max_density", max_density)):
        if finite_number(value) is None:
            raise LplError(f"{name} must be a finite number, got {value!r}.")
    if not 0.0 < float(flops_keep) <= 1.0:
        raise LplError(f"flops_keep must be a number in (0, 1], got {flops_keep!r}.")
    if importance not in IMPORTANCES:
        raise LplError(f"importance must be one of {IMPORTANCES}, got {importance!r}.")
    if allocation not in ALLOCATIONS:
        raise LplError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    if lambda_power < 0:
        raise LplError(f"lambda_power must be >= 0, got {lambda_power}.")
    if not 0.0 <= min_density <= 1.0 or not 0.0 < max_density <= 1.0:
        raise LplError(f"min_density must be in [0, 1] and max_density in (0, 1], got {min_density}, {max_density}.")
    if min_density > max_density:
        raise LplError(f"min_density {min_density} is larger than max_density {max_density}; swap or fix them.")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise LplError(f"stages must be an int >= 1, got {stages!r}.")
    return float(flops_keep), float(lambda_power), float(min_density), float(max_density)


def prune_model(
    model: nn.Module,
    calib_dataloader: Iterable[Any],
    *,
    block_size: tuple[int, int] = (16, 16),
    flops_keep: float = 0.5,
    importance: str = "taylor2",
    allocation: str = "hardware",
    lambda_power: float = 1.0,
    min_density: float = 0.05,
    max_density: float = 1.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    cost_model: HardwareProfile | str | Path | None = None,
    loss: str | LossFn = "auto",
    calib_batches: int | None = None,
    stages: int = 2,
    first_order: bool = False,
) -> PruneResult:
    """Choose block masks for the Linear layers of ``model`` keeping ``flops_keep`` of their FLOPs.

    Post-training: one calibration pass (``loss``: the task loss when the model defines one, else the label-free
    logit energy), then per-layer distortion curves (``importance``), then the allocation to the budget.
    ``stages`` > 1 repeats this on budgets flops_keep^(1/stages), flops_keep^(2/stages), ..., each round
    recalibrated with the blocks of the previous rounds zeroed (their removal is final). ``first_order=True``
    adds taylor2's gradient term -g.W; on the demo ViT it made the allocation much worse at 70-50% kept and was not
    better at 35-25% (benchmarks/results/prune_quality*.md), so the default drops it (OBD's assumption that the
    trained model sits at a minimum) and keeps the full per-sample Fisher with its cross terms. The model's weights are
    not changed; apply the result with ``apply_masks``. Layers: ``include`` / ``exclude`` glob patterns on module
    names; by default every Linear layer but heads, leaving dense (with a warning) those the forward never calls as
    modules. A layer smaller than one block is an error that names it (exclude it, or use a smaller block).
    Memory: taylor2 holds a K x K float64 Gram matrix per layer of K blocks; when a model's Grams exceed
    ``GRAM_BYTES_PER_PASS`` (2 GiB) the layers are calibrated in groups, one calibration pass per group (progress is
    logged). ``calib_batches``: how many batches of ``calib_dataloader`` calibrate (None: all of them); whenever more
    than one pass reads them (``stages`` > 1, grouped layers) they are kept in memory. Under torch.distributed every
    process must call it (statistics are summed over the processes, masks taken from rank 0); to prune in one
    process of a DDP script, call it inside ``lpl.utils.trainer.single_process()``.

    Example::

        result = prune_model(vit, calib_loader, block_size=(16, 16), flops_keep=0.5, calib_batches=32)
        print(result.flops_keep, result.predicted_speedup)
    """
    started = time.perf_counter()
    flops_keep, lambda_power, min_density, max_density = check_options(
        flops_keep, importance, allocation, lambda_power, min_density, max_density, stages)
    _check_trainable(model)
    refuse_exported(model)
    layers, block_size = selected_layers(model, include, exclude, block_size)
    _warn_if_pruned_already(layers, block_size, flops_keep)
    device_type = next(model.parameters()).device.type
    profile = _cost_model(cost_model) or default_profile("cuda" if device_type == "cuda" else "cpu")
    loss_fn = resolve_loss(model, loss)
    passes = stages * len(gram_groups(layers, block_size)) if importance == "taylor2" else stages
    batches = _calibration_batches(calib_dataloader, calib_batches, passes)
    masks: dict[str, torch.Tensor] = {}
    # Rounds on a geometric schedule of budgets, each recalibrated on the model pruned so far: the curvature is
    # measured where the model actually is, which the one-shot quadratic model cannot see at high sparsity.
    for round_number in range(1, stages + 1):
        stats, curves, scores = _calibrate(model, layers, batches, masks, block_size, loss_fn, importance,
                                           first_order, calib_batches, include is None, profile)
        if len(stats) < len(layers):  # default selection: layers the forward never calls stay dense
            layers = _calibrated_layers(layers, stats)
        masks = broadcast_masks(_round_masks(
            list(layers), stats, curves, scores, masks, round_keep=flops_keep ** (round_number / stages),
            final=round_number == stages, flops_keep=flops_keep, allocation=allocation,
            lambda_power=lambda_power, min_density=min_density, max_density=max_density, block_size=block_size))
    result = summarise(masks, curves, stats, block_size, profile, flops_keep, layers,
                       options=dict(importance=importance, allocation=allocation, lambda_power=lambda_power,
                                    min_density=min_density, max_density=max_density, profile=profile.name,
                                    stages=stages, first_order=first_order,
                                    loss=loss if isinstance(loss, str) else getattr(loss, "__name__", "callable")),
                       started=started)
    if result.predicted_speedup < 1.0:
        rank_zero_warn(
            f"prune_model: the cost model predicts the pruned layers {1 / result.predicted_speedup:.2f}x slower than "
            f"dense at {block_size[0]}x{block_size[1]} blocks (each block's overhead outweighs the FLOPs it skips at "
            "this size): use larger blocks, or a cost model calibrated on the target device (python -m "
            "lpl.prune.calibrate), for a model that runs faster.")
    return result


def pruned_block_shares(layers: dict[str, nn.Linear],
                        block_size: tuple[int, int]) -> tuple[dict[str, float], float, float]:
    """({layer: share of its blocks that are exact zeros}, for layers with more such blocks than chance gives; the
    share of all the layers' blocks that are zero; the share of their weights those blocks hold). At a share p of
    zero weights a block of n weights is zero by chance with probability p^n: never, in trained weights; many: a
    block-pruned model."""
    zero_blocks = blocks = 0
    zero_elements = total_elements = 0.0
    pruned: dict[str, float] = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        if weight.is_meta or weight.numel() == 0:  # no values to look at
            continue
        elements = block_elements(tuple(weight.shape), block_size).to(weight.device).double()
        zero = block_sum((weight != 0).float(), block_size) == 0
        share = float((weight == 0).float().mean())
        expected = float((share ** elements).sum())  # zero blocks where the zero weights fall at random
        if int(zero.sum()) > expected + 3.0 * math.sqrt(expected):
            pruned[name] = float(zero.double().mean())
        zero_blocks += int(zero.sum())
        blocks += zero.numel()
        zero_elements += float(elements[zero].sum())
        total_elements += float(elements.sum())
    return pruned, zero_blocks / max(blocks, 1), (zero_elements / total_elements if total_elements else 0.0)


def _warn_if_pruned_already(layers: dict[str, nn.Linear], block_size: tuple[int, int], flops_keep: float) -> None:
    """Warn when layers hold whole blocks of exact zeros beyond chance: the model was block-pruned before, and the
    FLOPs budget would count those blocks as kept."""
    pruned, zero_blocks, zero_weights = pruned_block_shares(layers, block_size)
    if not pruned:
        return
    alive = 1.0 - zero_weights
    name, share = max(pruned.items(), key=lambda item: item[1])
    warnings.warn(
        f"prune_model: the selected layers already hold whole blocks of exact zeros, as a pruned model does: "
        f"{zero_blocks:.1%} of their {block_size[0]}x{block_size[1]} blocks (in {len(pruned)} of {len(layers)} "
        f"layers; {name!r}: {share:.0%}). The FLOPs budget counts those blocks as kept, so "
        f"flops_keep={flops_keep:g} keeps less computation than the result reports (the nonzero blocks hold "
        f"{alive:.1%} of these layers' weights now). Prune the dense model instead, or give a budget relative to "
        f"what remains (flops_keep={flops_keep * alive:.3f} keeps {flops_keep:g} of it).", stacklevel=3)


def _cost_model(cost_model: HardwareProfile | str | Path | None) -> HardwareProfile | None:
    """A HardwareProfile, loaded when given as the path of a saved one."""
    if isinstance(cost_model, (str, Path)):
        return HardwareProfile.load(cost_model)
    if cost_model is not None and not isinstance(cost_model, HardwareProfile):
        raise LplError(f"cost_model must be a HardwareProfile, the path of a saved one, or None, got a "
                       f"{type(cost_model).__name__}.")
    return cost_model


def refuse_exported(model: nn.Module) -> None:
    """Refuse a model that ``to_block_sparse`` exported: its block-sparse layers are no Linears to prune, and a
    budget over the Linears left would not be the model's."""
    from lpl.kernels import BlockSparseLinear

    exported = [name for name, module in model.named_modules() if isinstance(module, BlockSparseLinear)]
    if exported:
        raise LplError(f"the model holds {len(exported)} block-sparse layers already (exported by to_block_sparse, "
                       f"e.g. {exported[0]!r}): prune_model prunes dense Linear layers, and a FLOPs budget over the "
                       "ones left would not be the model's. Prune the dense (or masked) model, before exporting it.")


def _check_trainable(model: nn.Module) -> None:
    """Calibration differentiates the loss: refuse a model without a trainable weight."""
    if not any(p.requires_grad for p in model.parameters()):
        raise LplError("the model has no trainable weights (requires_grad is False everywhere); calibration needs "
                       "gradients: call model.requires_grad_(True) first.")


def _calibration_batches(loader: Iterable[Any], limit: int | None, passes: int) -> Iterable[Any]:
    """What the calibration passes read: ``loader`` itself for one pass; its first ``limit`` batches (None: all),
    kept in a list, for more."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit <= 0):
        raise LplError(f"calib_batches must be a positive int (or None: every batch of the loader), got {limit!r}.")
    if passes > 1:  # every pass reads the same batches: keep them
        _warn_if_large(loader, limit)
        kept = list(_take(loader, limit))
        _warn_if_short(len(kept), limit)
        return kept
    return loader if limit is None else _short_warned(loader, limit)


def _short_warned(loader: Iterable[Any], limit: int) -> Iterator[Any]:
    """``loader``'s batches, with a warning if it ends before ``limit`` of them (the one pass stops at the limit)."""
    count = 0
    for count, batch in enumerate(loader, 1):
        yield batch
    _warn_if_short(count, limit)


def _warn_if_short(count: int, limit: int | None) -> None:
    if limit is not None and 0 < count < limit:
        warnings.warn(f"prune_model: calib_batches={limit}, but the calibration loader yields {count} batches: "
                      f"calibrating on those {count}.", stacklevel=4)


def _calibrated_layers(layers: dict[str, nn.Linear], stats: dict) -> dict[str, nn.Linear]:
    """The layers calibrated (in ``stats``); a warning names those left dense."""
    skipped = [n for n in layers if n not in stats]
    warnings.warn(f"prune_model: {len(skipped)} Linear layers are left dense (e.g. {skipped[:2]}): the forward "
                  "never calls them as modules, or feeds them a tensor without rows per sample (a table the "
                  "batch shares). Pass include=/exclude= to choose layers yourself.", stacklevel=3)
    return {n: layers[n] for n in stats}


def _round_masks(
    names: list[str], stats: dict, curves: dict[str, LayerCurve], scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor], *, round_keep: float, final: bool, flops_keep: float, allocation: str,
    lambda_power: float, min_density: float, max_density: float, block_size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Block masks of one round: ``allocation`` of ``round_keep`` of the layers' FLOPs, the blocks ``masks`` removed
    in earlier rounds staying removed. ``final``: the last round, which must meet its budget (``flops_keep``)."""
    flops = [curves[n].flops for n in names]
    density = [curves[n].density for n in names]
    allowed = [allowed_points(d, min_density, max_density) for d in density]
    for n, ok in zip(names, allowed):  # earlier rounds' removals are final
        ok[: _removed_blocks(masks, n)] = False
    total = sum(float(f[0]) for f in flops)
    check_feasible(flops, allowed, flops_keep * total)  # names the final budget, not this round's
    if not final:  # intermediate budgets stay inside what the density limits can reach
        reachable = sum(float(f[ok].max()) for f, ok in zip(flops, allowed) if ok.any()) / total
        round_keep = min(round_keep, reachable)
    budget = round_keep * total
    if allocation == "uniform":
        removed = allocate_uniform(density, flops, allowed, budget, strict=final)
    elif allocation == "global":
        block_flops = [2.0 * stats[n].tokens_per_sample
                       * block_elements(stats[n].shape, block_size).flatten().double() for n in names]
        removed = allocate_global([scores[n] for n in names], [curves[n].order for n in names], block_flops,
                                  density, min_density, max_density, budget, allowed=allowed, strict=final)
    else:
        removed = allocate_dp(hardware_objectives([curves[n] for n in names], round_keep, lambda_power),
                              flops, allowed, budget, strict=final)
    if not final and sum(float(f[r]) for f, r in zip(flops, removed)) < flops_keep * total * (1 - 1e-9):
        # block granularity put this round below the final budget, and its removals would be final: the last
        # round prunes from here instead (one-round pruning meets budgets this round cannot land above)
        removed = [_removed_blocks(masks, n) for n in names]
    return {n: curves[n].mask(r, block_grid(stats[n].shape, block_size)) for n, r in zip(names, removed)}


def _removed_blocks(masks: dict[str, torch.Tensor], name: str) -> int:
    """How many blocks of layer ``name`` earlier rounds removed."""
    return int((~masks[name]).sum()) if name in masks else 0


# More calibration batches than this, all kept in memory for the later passes, is most likely a whole training loader
# passed without calib_batches (LPViT calibrates on about 2,000 images; the callback's default is 32 batches).
LARGE_CALIBRATION_BATCHES = 256


def _warn_if_large(loader: Iterable[Any], limit: int | None) -> None:
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if limit is None and count > LARGE_CALIBRATION_BATCHES:
        warnings.warn(f"prune_model keeps its calibration batches in memory for its passes, and calib_batches=None "
                      f"takes all {count} of this loader's: pass calib_batches= (BlockPruneCallback uses 32).",
                      stacklevel=4)


def _take(batches: Iterable[Any], limit: int | None) -> Iterator[Any]:
    for number, batch in enumerate(batches):
        if limit is not None and number >= limit:
            return
        yield batch


@contextlib.contextmanager
def _pruned_weights(layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor], block_size: tuple[int, int]):
    """Zero the masked blocks for the duration of the block; the original weights come back after."""
    saved = {n: layers[n].weight.detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                weight = layers[name].weight
                weight.mul_(expand_block_mask(mask, tuple(weight.shape), block_size).to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)


def gram_groups(layers: Mapping[str, nn.Linear], block_size: tuple[int, int],
                budget: int | None = None) -> list[list[str]]:
    """Consecutive groups of layer names whose taylor2 Gram matrices take at most ``budget`` bytes together
    (default ``GRAM_BYTES_PER_PASS``; a layer larger than that alone)."""
    budget = GRAM_BYTES_PER_PASS if budget is None else budget
    groups: list[list[str]] = []
    used = 0
    for name, layer in layers.items():
        rows, cols = block_grid(tuple(layer.weight.shape), block_size)
        size = (rows * cols) ** 2 * 8
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _calibrate(
    model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[Any], masks: dict[str, torch.Tensor],
    block_size: tuple[int, int], loss_fn: LossFn, importance: str, first_order: bool, calib_batches: int | None,
    skip_uncalled: bool, profile: HardwareProfile,
) -> tuple[dict, dict[str, LayerCurve], dict[str, torch.Tensor]]:
    """Statistics, distortion curves and block scores of ``layers`` on the model pruned by ``masks``: one calibration
    pass per ``gram_groups`` group (taylor2), the group's Grams dropped once its curves are built."""
    groups = gram_groups(layers, block_size) if importance == "taylor2" else [list(layers)]
    stats, curves, scores = {}, {}, {}
    for number, group in enumerate(groups, 1):
        if len(groups) > 1:
            rank_zero_info(f"prune_model: calibration pass {number}/{len(groups)} ({len(group)} layers; the "
                           f"second-order statistics of all {len(layers)} do not fit one pass)")
        with _pruned_weights(layers, masks, block_size):
            group_stats = collect_statistics(model, {n: layers[n] for n in group}, batches, block_size, loss_fn,
                                             with_gram=importance == "taylor2", max_batches=calib_batches,
                                             skip_uncalled=skip_uncalled,
                                             with_gradients=importance in ("taylor1", "obd"))
        if not first_order:
            for stat in group_stats.values():
                stat.first = torch.zeros_like(stat.first)
        group_curves, group_scores = _curves({n: layers[n] for n in group_stats}, group_stats, masks, importance,
                                             block_size, profile)
        for stat in group_stats.values():
            stat.gram = None  # its curve is built: free the K x K matrix before the next pass
        stats.update(group_stats)
        curves.update(group_curves)
        scores.update(group_scores)
    if not stats:
        raise LplError(f"none of the selected Linear layers (e.g. {list(layers)[:3]}) was called in the forward pass "
                       "(the model uses their weights without calling the modules); select layers it calls.")
    emptied = [name for name, mask in masks.items() if not bool(mask.any())]
    if importance != "magnitude" and not any(bool(curve.distortion.any()) for curve in curves.values()):
        if emptied:  # a later round of stages > 1, on a model an earlier round cut in two
            raise LplError(f"the calibration loss has zero gradient in every selected layer after an earlier round "
                           f"(stages) pruned every block of {len(emptied)} layer(s) (e.g. {emptied[0]!r}), which cuts "
                           "the loss off from the layers before it: prune in one round (stages=1), or keep part of "
                           "every layer (min_density > 0).")
        raise LplError(f"the calibration loss has zero gradient in every selected layer (e.g. {list(stats)[:2]}), so "
                       f"nothing ranks their blocks for importance={importance!r}: an untrained model whose head is "
                       "initialised to zero, or a loss that does not depend on these layers; calibrate a trained "
                       "model with its task loss, or use importance='magnitude'.")
    unranked = [name for name, curve in curves.items() if importance != "magnitude"
                and not bool(curve.distortion.any()) and (name not in masks or bool(masks[name].any()))]
    if unranked:
        cause = (f"an earlier round (stages) pruned every block of {emptied[:2]}, which cuts them off (prune in one "
                 "round, stages=1, or keep part of every layer, min_density > 0)" if emptied else
                 "activation checkpointing with use_reentrant=True (no gradient reaches its region when its input "
                 "needs none; use use_reentrant=False or switch it off to calibrate), a detach, or a branch that does "
                 "not reach the loss; exclude them or fix the gradient path")
        rank_zero_warn(
            f"prune_model: the calibration loss has zero gradient in {len(unranked)} selected layer(s) (e.g. "
            f"{unranked[:3]}), so importance={importance!r} ranks all their blocks as free to prune: {cause}.")
    return stats, curves, scores


def _curves(
    layers: dict[str, nn.Linear], stats: dict, masks: dict[str, torch.Tensor], importance: str,
    block_size: tuple[int, int], profile: HardwareProfile,
) -> tuple[dict[str, LayerCurve], dict[str, torch.Tensor]]:
    """Distortion curve and block scores of every layer; blocks pruned in earlier rounds come first."""
    curves, scores = {}, {}
    for name, layer in layers.items():
        stat = stats[name]
        forced = ~masks[name].flatten() if name in masks else None
        if importance == "taylor2":
            order, distortion = taylor2_curve(stat.first, stat.gram, forced)
            scores[name] = 0.5 * stat.gram.diagonal() - stat.first
        else:
            scores[name] = block_scores(stat, layer.weight, importance)
            order, distortion = additive_curve(scores[name], forced)
        curves[name] = build_curve(order, distortion, stat.shape, block_size, stat.tokens_per_sample, profile,
                                   max(1, round(stat.tokens_per_batch)), layer.weight.dtype)
    return curves, scores


def hardware_objectives(curves: list[LayerCurve], flops_keep: float, lambda_power: float) -> list[torch.Tensor]:
    """distortion + beta * (latency / dense latency + lambda_power * energy / dense energy), per curve point.

    beta scales the normalised cost to HARDWARE_WEIGHT x the distortion of the uniform allocation, so the
    hardware term moves allocations between points of similar distortion, never dominates it.
    """
    dense_latency = sum(float(c.latency[0]) for c in curves)
    dense_energy = sum(float(c.energy[0]) for c in curves)
    reference = sum(abs(float(c.distortion[int(torch.argmin((c.density - flops_keep).abs()))])) for c in curves)
    beta = HARDWARE_WEIGHT * max(reference, 1e-12) / (1.0 + lambda_power)
    return [
        c.distortion + beta * (c.latency / dense_latency + lambda_power * c.energy / dense_energy) for c in curves
    ]


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under torch.distributed, every rank takes rank 0's masks (identical statistics already; this makes it exact)."""
    if rank_and_world()[1] == 1:
        return masks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    synced = {}
    for name, mask in masks.items():
        buffer = mask.to(device=device, dtype=torch.uint8)
        dist.broadcast(buffer, src=0)
        synced[name] = buffer.bool().cpu()
    return synced


def summarise(
    masks: dict[str, torch.Tensor], curves: dict[str, LayerCurve], stats: dict, block_size: tuple[int, int],
    profile: HardwareProfile, target: float, layers: dict[str, nn.Linear], options: dict, started: float,
) -> PruneResult:
    """Achieved FLOPs share and predicted latency/energy of the chosen masks."""
    kept_flops = dense_flops = 0.0
    layer_latency, layer_energy = {}, {}
    for name, mask in masks.items():
        stat, layer = stats[name], layers[name]
        elements = block_elements(stat.shape, block_size)
        dense_flops += 2.0 * stat.tokens_per_sample * float(elements.sum())
        kept_flops += 2.0 * stat.tokens_per_sample * float((elements * mask).sum())
        tokens = max(1, round(stat.tokens_per_batch))
        dense = profile.predict_dense(stat.shape[0], stat.shape[1], tokens, layer.weight.dtype)
        sparse = profile.predict(mask, tokens, block_size, layer.weight.dtype)
        if bool(mask.all()):  # a fully kept layer stays a dense matmul
            sparse = dense
        layer_latency[name] = (dense[0], sparse[0])
        layer_energy[name] = (dense[1], sparse[1])
    curve_tensors = {
        name: {"order": curve.order, **{key: getattr(curve, key).double()
                                        for key in ("distortion", "flops", "latency", "energy", "density")}}
        for name, curve in curves.items()
    }
    return PruneResult(
        block_masks=masks,
        block_size=block_size,
        shapes={name: stats[name].shape for name in masks},
        flops_keep=kept_flops / dense_flops,
        target_flops_keep=target,
        predicted_speedup=sum(v[0] for v in layer_latency.values()) / sum(v[1] for v in layer_latency.values()),
        predicted_energy_ratio=sum(v[1] for v in layer_energy.values()) / sum(v[0] for v in layer_energy.values()),
        layer_latency=layer_latency,
        layer_energy=layer_energy,
        curves=curve_tensors,
        options=options,
        prune_seconds=time.perf_counter() - started,
    )
