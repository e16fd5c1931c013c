"""Calibration statistics of prunable Linear layers and block importance scores.

One pass over the calibration batches records, per layer, everything every importance needs:

- ``first`` [K]: mean over samples of c_i,k = sum over block k of (g_i * W), with g_i the gradient of sample i's
  loss. Zeroing block k changes the loss by -c_i,k to first order.
- ``gram`` [K, K]: mean over samples of c_i c_i^T: the empirical Fisher of the per-sample losses restricted to the
  block-removal directions. With it the second-order distortion of removing a set S is exact to evaluate:
  delta(S) = -sum_S first + 1/2 * 1_S^T gram_SS 1_S (see ``curves.taylor2_curve``).
- ``grad_mean`` / ``grad_sq_mean`` [out, in]: mean and mean square of the per-batch gradients (taylor1, and the
  diagonal-Fisher OBD baseline; one more matmul per layer and batch, so collected only when asked for).

Per-sample gradients come from the Linear's input x and output gradient dy captured by hooks (g_i = dy_i^T x_i),
so one backward per batch suffices. The loss must be a mean of independent per-sample losses (true for the
task losses of the example models and for the label-free logit energy). Under torch.distributed every statistic is
a sum, so one all_reduce makes all ranks identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lpl.prune.blocks import block_elements, block_grid, block_sum
from lpl.utils.autograd import eager
from lpl.utils.errors import LplError
from lpl.utils.loss import batch_samples, eval_mode, module_loss
from lpl.utils.trainer import rank_and_world

IMPORTANCES = ("taylor2", "taylor1", "magnitude", "obd")
LOSSES = ("auto", "task", "logit_energy")  # calibration losses by name (resolve_loss)
LossFn = Callable[[nn.Module, Any], torch.Tensor]
# Per-sample gradients are built in chunks of at most this many elements (memory bound).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerStatistics:
    """Calibration statistics of one Linear layer (see the module docstring)."""

    shape: tuple[int, int]
    block_size: tuple[int, int]
    tokens_per_sample: float
    tokens_per_batch: float
    first: torch.Tensor
    gram: torch.Tensor | None
    grad_mean: torch.Tensor | None
    grad_sq_mean: torch.Tensor | None


def model_inputs(batch: Any) -> Any:
    """The network input of a batch dict ("image", "input_ids" or "input"), or the batch itself."""
    if isinstance(batch, dict):
        for key in ("image", "input_ids", "input"):
            if key in batch:
                return batch[key]
        raise LplError(f"the calibration batch has keys {sorted(batch)}; logit energy needs 'image', 'input_ids' or "
                       "'input' (the network's input), or pass loss= a function of (model, batch).")
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def logit_energy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Label-free calibration loss of the LPViT paper: mean(f(x)^2) over the outputs."""
    outputs = model(model_inputs(batch))
    return outputs.float().pow(2).mean()


def resolve_loss(model: nn.Module, loss: str | LossFn) -> LossFn:
    """"task" (module_loss), "logit_energy", "auto" (task when the model defines a loss) or a callable."""
    if callable(loss):
        return loss
    has_task = callable(getattr(model, "loss", None)) or callable(getattr(model, "training_step", None))
    if loss == "auto":
        return module_loss if has_task else logit_energy_loss
    if loss == "task":
        return module_loss
    if loss == "logit_energy":
        return logit_energy_loss
    raise LplError(f"loss must be one of {LOSSES} or a callable(model, batch), got {loss!r}.")


def _per_sample_rows(x: torch.Tensor, samples: int, sample_dim: int | None | str = "guess") -> torch.Tensor | None:
    """``x`` [..., features] as [samples, rows, features]: each sample's rows (tokens, windows) together; None when
    it has no rows per sample (a table every sample shares: no per-sample gradient exists there).

    ``sample_dim``: the dim that grows with the batch (``_sample_dims`` measures it): 0 for batch-major inputs
    ([B, T, C], [B * T, C], Swin's [B * windows, N, C], each sample's rows consecutive), 1 for sequence-first
    [T, B, C], None for a shared table. "guess" reads it off the shape alone: batch-major when the leading dim is a
    multiple of the batch, sequence-first when only the second dim matches it, a leading dim of 1 a table (SwinV2's
    [1, H, W, 2] position table); a table as long as the batch passes for rows per sample there."""
    if sample_dim == "guess":
        sequence_first = x.ndim >= 3 and x.shape[0] > 1 and x.shape[0] % samples and x.shape[1] == samples
        sample_dim = None if x.ndim == 1 else 1 if sequence_first else 0
    if sample_dim is None:
        return None
    x = x.movedim(sample_dim, 0)
    if x.shape[0] % samples:
        return None
    return x.reshape(samples, -1, x.shape[-1])


def _doubled(batch: Any, samples: int) -> Any:
    """``batch`` with every per-sample field repeated twice: tensors and numpy arrays whose leading dim is the batch's,
    and lists of that length holding no tensors or containers (captions, file names); in dicts, lists, tuples and
    dataclasses."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch]) if batch.ndim and batch.shape[0] == samples else batch
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, batch]) if batch.ndim and batch.shape[0] == samples else batch
    if isinstance(batch, dict):
        return {key: _doubled(value, samples) for key, value in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _doubled(getattr(batch, f.name), samples)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (list, tuple)):
        if len(batch) == samples and not any(isinstance(v, (torch.Tensor, np.ndarray, dict, list, tuple))
                                             for v in batch):
            return batch + batch  # a per-sample field of plain values
        items = [_doubled(value, samples) for value in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _doubled_shapes(model: nn.Module, batch: Any, loss_fn: LossFn, capture: "_Capture",
                    samples: int) -> dict[str, list[torch.Size]] | None:
    """The input shapes of every call of the captured layers when the calibration loss runs (no gradient) on
    ``batch`` doubled; None, with a warning, when it cannot run."""
    capture.probing = {}
    try:
        with torch.no_grad():
            loss_fn(model, _doubled(batch, samples))
        return capture.probing
    except Exception as error:  # a model that cannot take another batch size: the shape rules decide
        warnings.warn(f"prune_model: the calibration loss failed on a batch twice as large ({type(error).__name__}: "
                      f"{error}); which dim of each layer's input holds the samples is read off its shape instead "
                      "(batch-major unless only its second dim matches the batch).", stacklevel=6)
        return None
    finally:
        capture.probing = None


def _sample_dims(captured: dict[str, list[_Call]], doubled: dict[str, list[torch.Size]] | None
                 ) -> dict[str, list[int | None | str]]:
    """For every captured layer call, the dim of its input that holds the batch's samples, from its input shape on
    this batch and on the batch doubled (``_doubled_shapes``): the dim that doubles (0 or 1), or None when none
    changes (a shared table). "guess" (shape rules) where the two cannot be compared (no doubled run, the calls
    differ, or another dim changes)."""
    dims: dict[str, list[int | None | str]] = {}
    for name, layer_calls in captured.items():
        shapes = [x.shape for x, _ in layer_calls]
        twice = (doubled or {}).get(name, [])
        dims[name] = ([_grown_dim(one, two) for one, two in zip(shapes, twice)] if len(twice) == len(shapes)
                      else ["guess"] * len(shapes))
    return dims


def _grown_dim(one: torch.Size, two: torch.Size) -> int | None | str:
    """0 or 1 when only that dim of ``two`` is twice ``one``'s, None when they are equal, else "guess"."""
    if one == two:
        return None
    for dim in (0, 1):
        if len(one) == len(two) > dim + 1 and two[dim] == 2 * one[dim] and all(
                a == b for d, (a, b) in enumerate(zip(one, two)) if d != dim):
            return dim
    return "guess"


def _per_sample_contributions(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, block_size: tuple[int, int]
) -> torch.Tensor:
    """c [n, R*C]: block sums of g_i * W with g_i = n * dy_i^T x_i, for x, dy [n, rows, features] (dy the gradient
    of the batch-mean loss)."""
    n = x.shape[0]
    x3, dy3 = x.float(), dy.float()
    chunk = max(1, _CHUNK_ELEMENTS // weight.numel())
    parts = []
    for start in range(0, n, chunk):
        grads = torch.bmm(dy3[start : start + chunk].transpose(1, 2), x3[start : start + chunk])
        parts.append(block_sum(grads.mul_(weight), block_size).flatten(1))  # in place: [chunk, out, in] is large
    return torch.cat(parts) * n


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable[Any],
    block_size: tuple[int, int],
    loss_fn: LossFn,
    with_gram: bool = True,
    max_batches: int | None = None,
    skip_uncalled: bool = False,
    with_gradients: bool = True,
) -> dict[str, LayerStatistics]:
    """One forward/backward per calibration batch; returns statistics reduced over batches (and ranks).

    A layer whose forward is never called (a model that reads ``layer.weight`` through ``F.linear`` itself) is an
    error, or with ``skip_uncalled`` left out of the result (the caller keeps it dense; none called: ``{}``).
    ``with_gram`` / ``with_gradients``: collect the Gram (taylor2) / the per-batch gradient statistics (taylor1, obd);
    left ``None`` otherwise.
    """
    if torch.is_inference_mode_enabled():
        raise LplError("calibration differentiates the loss, which torch.inference_mode() forbids: prune outside "
                       "the inference_mode block.")
    device = next(model.parameters()).device
    sums = {name: _LayerSums(layer.weight, block_size, with_gram, with_gradients, device)
            for name, layer in layers.items()}
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # samples, batches
    sample_dims: dict[str, list[int | None | str]] = {}  # measured on the first batch, structural after
    measured = False
    # calibration statistics of the deployed network: no dropout / drop-path; every module's mode restored after
    # a torch.compile'd model runs eagerly here: compiled graphs hide the layers' outputs from the hooks' gradients
    with eval_mode(model), _captured_calls(layers) as captured, eager():
        for number, batch in enumerate(batches):
            if max_batches is not None and number >= max_batches:
                break
            samples = batch_samples(batch)
            if samples == 0:  # an empty batch carries no statistics (its mean loss is not even defined)
                continue
            batch = apply_to_collection(move_data_to_device(batch, device), torch.Tensor, _usable_in_autograd)
            _measure_batch(model, batch, loss_fn, sums, captured, samples, sample_dims, first=not measured,
                           strict=not skip_uncalled or number > 0)
            measured = True
            if not sums:  # none called (skip_uncalled): nothing to measure
                break
            counts += torch.tensor([float(samples), 1.0], device=device, dtype=torch.float64)
    _all_reduce(counts, sums)
    if not sums:
        return {}
    samples, num_batches = float(counts[0]), float(counts[1])
    if num_batches == 0:
        raise LplError("the calibration loader yielded no batches (or only empty ones); pass a loader with at "
                       "least one non-empty batch.")
    _check_finite(sums)
    return {name: acc.statistics(samples, num_batches) for name, acc in sums.items()}


def _usable_in_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor created under torch.inference_mode (autograd refuses to save those), else the tensor."""
    return tensor.clone() if tensor.is_inference() else tensor


def _check_finite(sums: dict[str, "_LayerSums"]) -> None:
    if not all(bool(torch.isfinite(tensor).all()) for acc in sums.values() for tensor in acc.tensors()):
        raise LplError("the calibration statistics are not finite (NaN / inf): check the calibration data and the "
                       "model's weights for NaN / inf values.")


# A Linear call's (input, output); the output is what the loss is differentiated in.
_Call = tuple[torch.Tensor, torch.Tensor]


class _LayerSums:
    """One layer's statistics summed over the calibration batches (``collect_statistics`` divides them at the end)."""

    def __init__(self, weight: torch.Tensor, block_size: tuple[int, int], with_gram: bool, with_gradients: bool,
                 device: torch.device) -> None:
        self.shape = tuple(weight.shape)
        self.block_size = block_size
        self.weight = weight.detach().float()
        rows, cols = block_grid(self.shape, block_size)
        self.first = torch.zeros(rows * cols, device=device, dtype=torch.float64)
        self.gram = torch.zeros((rows * cols,) * 2, device=device, dtype=torch.float64) if with_gram else None
        self.grad = torch.zeros_like(self.weight) if with_gradients else None
        self.grad_sq = torch.zeros_like(self.weight) if with_gradients else None
        self.tokens = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, calls: list[_Call], grads: list[torch.Tensor | None], samples: int,
            sample_dims: list[int | None | str]) -> None:
        """Add one batch: the layer's ``calls``, the loss gradients ``grads`` in their outputs (None: unused) and the
        dim of each call's input that holds the samples (``_per_sample_rows``)."""
        contributions, batch_grad = 0.0, 0.0
        # a layer called more than once: its gradient sums the calls
        for (x, output), dy, dim in zip(calls, grads, sample_dims):
            dy = torch.zeros_like(output) if dy is None else dy.detach()
            if self.grad is not None:
                batch_grad = batch_grad + dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            self.tokens += x.numel() / x.shape[-1]
            contributions = contributions + _per_sample_contributions(
                _per_sample_rows(x, samples, dim), _per_sample_rows(dy, samples, dim), self.weight, self.block_size)
        if self.grad is not None:
            self.grad += batch_grad
            self.grad_sq += batch_grad.square()
        contributions = contributions.double()
        self.first += contributions.sum(0)
        if self.gram is not None:
            self.gram.addmm_(contributions.T, contributions)  # in place: K x K is the big one

    def tensors(self) -> list[torch.Tensor]:
        """Every sum collected (what torch.distributed reduces)."""
        sums = (self.first, self.gram, self.grad, self.grad_sq, self.tokens)
        return [tensor for tensor in sums if tensor is not None]

    def statistics(self, samples: float, num_batches: float) -> LayerStatistics:
        """The means: per sample for the block statistics, per batch for the gradients."""
        return LayerStatistics(
            shape=self.shape,
            block_size=self.block_size,
            tokens_per_sample=float(self.tokens) / samples,
            tokens_per_batch=float(self.tokens) / num_batches,
            first=(self.first / samples).cpu(),
            gram=self.gram.div_(samples).cpu() if self.gram is not None else None,
            grad_mean=self.grad.div_(num_batches).cpu() if self.grad is not None else None,
            grad_sq_mean=self.grad_sq.div_(num_batches).cpu() if self.grad_sq is not None else None,
        )


class _Capture(dict):
    """Layer name -> its calls (input, output) in the current batch; while ``probing`` is a dict, the calls' input
    shapes go there instead (nothing kept, outputs untouched); while not ``recording`` (the backward, where activation
    checkpointing runs the forward of its regions again) nothing is kept."""

    probing: dict[str, list[torch.Size]] | None = None
    recording: bool = True


@contextlib.contextmanager
def _captured_calls(layers: dict[str, nn.Linear]) -> Iterator[_Capture]:
    """While in the block, every call of ``layers`` is appended to the yielded dict under the layer's name."""
    captured = _Capture()

    def make_hook(name: str) -> Callable[[nn.Linear, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor | None]:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if captured.probing is not None:
                captured.probing.setdefault(name, []).append(inputs[0].shape)
                return None
            if not output.requires_grad:  # a frozen layer on the input side: still differentiate the loss in it
                output = output.detach().requires_grad_()
            if captured.recording:
                captured.setdefault(name, []).append((inputs[0].detach(), output))
            return output

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _measure_batch(model: nn.Module, batch: Any, loss_fn: LossFn, sums: dict[str, _LayerSums], captured: _Capture,
                   samples: int, sample_dims: dict[str, list[int | None | str]], first: bool, strict: bool) -> None:
    """One forward/backward of ``batch`` (of ``samples`` samples) added to ``sums``; the layers it gives no per-sample
    gradients are an error when ``strict``, else dropped from ``sums``. ``sample_dims`` says where each call's input
    holds the samples: measured on the ``first`` batch, before its forward (no gradient graph is alive then)."""
    doubled = _doubled_shapes(model, batch, loss_fn, captured, samples) if first else None
    captured.clear()
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        _check_loss(loss)
        if first:
            sample_dims.update(_sample_dims(captured, doubled))
        for name in _unmeasurable_layers(list(sums), captured, samples, sample_dims, strict):
            del sums[name]
        if not sums:
            return
        outputs = [output for name in sums for _, output in captured[name]]
        if not loss.requires_grad:
            raise LplError("the calibration loss does not depend on the prunable weights; check loss/model.")
        captured.recording = False
        try:
            grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
        finally:
            captured.recording = True
    for name, acc in sums.items():
        acc.add(captured[name], [next(grads) for _ in captured[name]], samples, _call_dims(sample_dims, name, captured))


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LplError(f"the calibration loss must be a scalar tensor (the batch's mean loss), got {got}: use a "
                       "loss with reduction='mean'.")
    if not bool(torch.isfinite(loss.detach())):
        raise LplError(f"the calibration loss is {float(loss.detach()):g} on a batch: check the calibration data "
                       "and the model's weights for NaN / inf values.")


def _call_dims(sample_dims: dict[str, list[int | None | str]], name: str,
               captured: dict[str, list[_Call]]) -> list[int | None | str]:
    """The sample dims of layer ``name``'s calls in this batch (shape rules for calls the first batch did not make)."""
    dims = sample_dims.get(name, [])
    calls = len(captured[name])
    return dims[:calls] + ["guess"] * (calls - len(dims))


def _unmeasurable_layers(names: list[str], captured: dict[str, list[_Call]], samples: int,
                         sample_dims: dict[str, list[int | None | str]], strict: bool) -> list[str]:
    """The layers of ``names`` this batch's forward did not call, then those it fed an input without rows per sample
    (no per-sample gradient exists there): an error when ``strict``."""
    missing = [name for name in names if name not in captured]
    if missing and strict:
        raise LplError(f"layers {missing[:3]} were not called in the forward pass (the model uses their "
                       "weights without calling the module); exclude them.")
    shared = [name for name in names if name not in missing
              and any(_per_sample_rows(x, samples, dim) is None
                      for (x, _), dim in zip(captured[name], _call_dims(sample_dims, name, captured)))]
    if shared and strict:
        shape = tuple(captured[shared[0]][0][0].shape)
        raise LplError(f"the inputs of layers {shared[:3]} (e.g. of shape {shape}) have no rows per sample "
                       f"of the batch's {samples} (no dim of theirs grows with the batch: a table the samples "
                       "share): per-sample gradients, which calibration needs, do not exist there; exclude them.")
    return missing + shared


def _all_reduce(counts: torch.Tensor, sums: dict[str, _LayerSums]) -> None:
    """Under torch.distributed, sum ``counts`` and every layer's sums over the ranks (all ranks end identical)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(counts)
        for acc in sums.values():
            for tensor in acc.tensors():
                dist.all_reduce(tensor)


def block_scores(stats: LayerStatistics, weight: torch.Tensor, importance: str) -> torch.Tensor:
    """Additive block scores [R*C] (higher = more important) for the first-order and diagonal baselines.

    magnitude: squared L2 norm of the block; taylor1: mean |W * g| over the block (the reference code's score);
    obd: 1/2 sum over the block of diag-Fisher * W^2 (Fisher from per-batch gradients, optimal brain damage).
    """
    weight = weight.detach().float().cpu()
    if importance == "magnitude":
        return block_sum(weight.square(), stats.block_size).flatten()
    if importance == "taylor1":
        elements = block_elements(stats.shape, stats.block_size)
        return (block_sum((weight * stats.grad_mean).abs(), stats.block_size) / elements.float()).flatten()
    if importance == "obd":
        return 0.5 * block_sum(stats.grad_sq_mean * weight.square(), stats.block_size).flatten()
    raise LplError(f"importance must be one of {IMPORTANCES}, got {importance!r}.")
