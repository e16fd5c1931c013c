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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from lightning.fabric.utilities.apply_func import move_data_to_device
import torch
import torch.distributed as dist
from torch import nn

from lpl.prune.blocks import block_elements, block_grid, block_sum
from lpl.utils.errors import LplError
from lpl.utils.loss import eval_mode, module_loss

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
    """The network input of a batch dict ("image" or "input_ids"), or the batch itself."""
    if isinstance(batch, dict):
        for key in ("image", "input_ids", "input"):
            if key in batch:
                return batch[key]
        raise LplError(f"the calibration batch has keys {sorted(batch)}; logit energy needs 'image' or 'input_ids'.")
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


def _per_sample_rows(x: torch.Tensor, samples: int) -> torch.Tensor | None:
    """``x`` [..., features] as [samples, rows, features]: each sample's rows (tokens, windows) together; None when
    its leading dim is not the batch's (a table every sample shares, say: no per-sample gradient exists there).

    Inputs are batch-major ([B, T, C], [B * T, C], Swin's [B * windows, N, C]); a sequence-first [T, B, C] input is
    recognised by its second dim when its first is not a multiple of the batch. A leading dim of 1 is a table
    (SwinV2's [1, H, W, 2] position table), not a sequence of one: read as one, a table whose size happened to equal
    the batch's passed as per-sample rows."""
    if x.ndim >= 3 and x.shape[0] > 1 and x.shape[0] % samples and x.shape[1] == samples:
        x = x.movedim(1, 0)
    if x.ndim == 1 or x.shape[0] % samples:
        return None
    return x.reshape(samples, -1, x.shape[-1])


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


def batch_samples(batch: Any) -> int:
    """How many samples a batch holds: the leading dim of its first tensor of one or more dims (dict values, list
    items), as Lightning counts them."""
    if isinstance(batch, torch.Tensor) and batch.ndim:
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:  # 0-d tensors (a step count, say) hold no samples
        try:
            return batch_samples(value)
        except LplError:
            continue
    raise LplError(f"cannot tell how many samples a calibration batch of type {type(batch).__name__} holds: give "
                   "batches as tensors, or dicts / tuples of tensors.")


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
    device = next(model.parameters()).device
    sums = {name: _LayerSums(layer.weight, block_size, with_gram, with_gradients, device)
            for name, layer in layers.items()}
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # samples, batches
    # calibration statistics of the deployed network: no dropout / drop-path; every module's mode restored after
    with eval_mode(model), _captured_calls(layers) as captured:
        for number, batch in enumerate(batches):
            if max_batches is not None and number >= max_batches:
                break
            samples = batch_samples(batch)
            if samples == 0:  # an empty batch carries no statistics (its mean loss is not even defined)
                continue
            _measure_batch(model, move_data_to_device(batch, device), loss_fn, sums, captured, samples,
                           strict=not skip_uncalled or number > 0)
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
    return {name: acc.statistics(samples, num_batches) for name, acc in sums.items()}


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

    def add(self, calls: list[_Call], grads: list[torch.Tensor | None], samples: int) -> None:
        """Add one batch: the layer's ``calls`` and the loss gradients ``grads`` in their outputs (None: unused)."""
        contributions, batch_grad = 0.0, 0.0
        for (x, output), dy in zip(calls, grads):  # a layer called more than once: its gradient sums the calls
            dy = torch.zeros_like(output) if dy is None else dy.detach()
            if self.grad is not None:
                batch_grad = batch_grad + dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            self.tokens += x.numel() / x.shape[-1]
            contributions = contributions + _per_sample_contributions(
                _per_sample_rows(x, samples), _per_sample_rows(dy, samples), self.weight, self.block_size)
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


@contextlib.contextmanager
def _captured_calls(layers: dict[str, nn.Linear]) -> Iterator[dict[str, list[_Call]]]:
    """While in the block, every call of ``layers`` is appended to the yielded dict under the layer's name."""
    captured: dict[str, list[_Call]] = {}

    def make_hook(name: str) -> Callable[[nn.Linear, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:  # a frozen layer on the input side: still differentiate the loss in it
                output = output.detach().requires_grad_()
            captured.setdefault(name, []).append((inputs[0].detach(), output))
            return output

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _measure_batch(model: nn.Module, batch: Any, loss_fn: LossFn, sums: dict[str, _LayerSums],
                   captured: dict[str, list[_Call]], samples: int, strict: bool) -> None:
    """One forward/backward of ``batch`` (of ``samples`` samples) added to ``sums``; the layers it gives no per-sample
    gradients are an error when ``strict``, else dropped from ``sums``."""
    captured.clear()
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        for name in _unmeasurable_layers(list(sums), captured, samples, strict):
            del sums[name]
        if not sums:
            return
        outputs = [output for name in sums for _, output in captured[name]]
        if not loss.requires_grad:
            raise LplError("the calibration loss does not depend on the prunable weights; check loss/model.")
        grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
    for name, acc in sums.items():
        acc.add(captured[name], [next(grads) for _ in captured[name]], samples)


def _unmeasurable_layers(names: list[str], captured: dict[str, list[_Call]], samples: int, strict: bool) -> list[str]:
    """The layers of ``names`` this batch's forward did not call, then those it fed an input without rows per sample
    (no per-sample gradient exists there): an error when ``strict``."""
    missing = [name for name in names if name not in captured]
    if missing and strict:
        raise LplError(f"layers {missing[:3]} were not called in the forward pass (the model uses their "
                       "weights without calling the module); exclude them.")
    shared = [name for name in names if name not in missing
              and any(_per_sample_rows(x, samples) is None for x, _ in captured[name])]
    if shared and strict:
        shape = tuple(captured[shared[0]][0][0].shape)
        raise LplError(f"the inputs of layers {shared[:3]} (e.g. of shape {shape}) have no rows per sample "
                       f"of the batch's {samples} (their leading dim is not the batch's): per-sample "
                       "gradients, which calibration needs, do not exist there; exclude them.")
    return missing + shared


def _all_reduce(counts: torch.Tensor, sums: dict[str, _LayerSums]) -> None:
    """Under torch.distributed, sum ``counts`` and every layer's sums over the ranks (all ranks end identical)."""
    if dist.is_available() and dist.is_initialized():
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
