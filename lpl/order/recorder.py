"""TrainOrderRecorder: a Lightning callback that records a reference run for training-order estimation."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.utils.prune
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lpl.data.base import attach_trainer
from lpl.data.samplers import whole_numbers
from lpl.order import quantities
from lpl.order.pool import collate_samples, plan_pool, single_val_loader, validation_loss_fn
from lpl.order.projection import PROJECTION_KINDS, Projector
from lpl.order.rng import as_in_training, capture_rng, restore_rng, same_states, set_step_rng_state, step_rng_state
from lpl.order.store import STORE_DTYPES, Recording, RecordingWriter, parameter_signature
from lpl.prune.masking import has_masks
from lpl.utils.errors import LplError, checked_count
from lpl.utils.loss import module_loss, to_module
from lpl.utils.trainer import (check_replicated_strategy, fit_val_loaders, metrics_unsynced, rank_and_world,
                               restore_loader_position, single_process, weight_averaging_callbacks)


def _check_accumulation(trainer: L.Trainer) -> None:
    if trainer.accumulate_grad_batches != 1:
        raise LplError(
            f"TrainOrderRecorder supports accumulate_grad_batches=1 (one batch per optimizer step), got "
            f"{trainer.accumulate_grad_batches} (set by the Trainer or a GradientAccumulationScheduler); use a larger "
            "batch_size instead."
        )


def trained_param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups holding a parameter that trains: a frozen backbone's group (often listed first, with its own
    weight decay or lr) steps nothing, so its hyperparameters are not the run's. All groups where none trains."""
    groups = optimizer.param_groups
    return [g for g in groups if any(p.requires_grad for p in g["params"])] or list(groups)


def _hyperparameter(group: Mapping[str, Any], key: str) -> Any:
    # betas compare by value: a config gives a list, torch's default is a tuple
    return tuple(float(b) for b in group[key]) if key == "betas" else float(group[key])


def _differing_hyperparameters(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which of lr, betas and eps the param groups do not share (retraining and every estimate take one of each)."""
    return [k for k in ("lr", "betas", "eps")
            if any(_hyperparameter(g, k) != _hyperparameter(groups[0], k) for g in groups)]


# The manifest is rewritten at every probe, checkpoint and the end of training, and otherwise at most this often:
# an fsynced rewrite per step would cost more than the step on small models. Steps not yet in the manifest at a
# crash are never behind the last checkpoint, and the resumed run records them again.
FLUSH_SECONDS = 30.0


# name -> (parameter, trains, version counter). torch bumps a tensor's version counter at every in-place write (except
# through ``.data``), so comparing counters finds weights changed outside the optimizer without copying them.
ParameterState = dict[str, tuple[torch.nn.Parameter, bool, int]]


def _parameter_state(named: Iterable[tuple[str, torch.nn.Parameter]]) -> ParameterState:
    return {name: (p, p.requires_grad, p._version) for name, p in named}


def _some(names: Sequence[str]) -> str:
    """The first few of ``names``, and how many more (a model may have hundreds)."""
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _parameter_change(
    before: ParameterState, now: ParameterState, module: torch.nn.Module, step: int, stepped: bool = False,
) -> str | None:
    """Why ``module``'s parameters ``now``, at ``step``, are no longer those the recording follows (``before``: as the
    last optimizer step, or the start of recording, left them), or None. ``stepped``: the optimizer wrote them since."""
    if [(n, id(p)) for n, (p, _, _) in now.items()] != [(n, id(p)) for n, (p, _, _) in before.items()]:
        gone, new = [n for n in before if n not in now], [n for n in now if n not in before]
        replaced = [n for n in now if n in before and now[n][0] is not before[n][0]]
        parts = [f"without {_some(gone)}" if gone else "", f"with {_some(new)}" if new else "",
                 f"{_some(replaced)} replaced" if replaced else ""]
        what = "; ".join(part for part in parts if part) or "the same parameters in another order"
        pruned = any(isinstance(hook, torch.nn.utils.prune.BasePruningMethod)
                     for layer in module.modules() for hook in layer._forward_pre_hooks.values())
        cause = ("torch.nn.utils.prune (Lightning's ModelPruning) reparametrised weights as weight_orig times a mask"
                 if pruned else "a layer or parameter was added, removed or replaced")
        return (f"the model's parameters changed before step {step} ({what}): {cause}. The recording, retraining "
                "and every estimate follow one fixed set of parameters, so this run cannot be recorded: prune or "
                "change the model before recording starts or after it ends (record the fine-tuning of the pruned "
                "model).")
    for name, (_, trains, _) in now.items():
        if trains != before[name][1]:
            return (f"parameter {name!r} {'became trainable' if trains else 'was frozen'} at step {step}; changing "
                    "which parameters train during a recorded run is not supported (the recorded vectors, retraining "
                    "and every estimate cover one fixed set of trainable parameters). Train the same parameters "
                    "throughout, or record the phase after the change as a run of its own (a new fit from those "
                    "weights with a fresh optimizer and another dirpath).")
    # trainable ones only: a frozen copy that the module updates itself (an average of the weights) does not train
    written = [] if stepped else [n for n, (_, trains, version) in now.items() if trains and version != before[n][2]]
    if written:
        return (f"parameters {_some(written)} were written in place before step {step}, outside the optimizer (a "
                "callback or hook changing the weights between steps: clamping, a max-norm constraint, pruning masks, "
                "weight averaging): retraining and every estimate apply the optimizer's updates only, so they would "
                "not reproduce this run. Record without that change, or build it into the model "
                "(torch.nn.utils.parametrize), which retraining rebuilds.")
    return None


def _sample_ids(index: Any) -> list[int]:
    """A batch's ``index`` entry (a tensor, numpy array or list of ints) as a list of ints; anything but
    non-negative integer sample ids is refused."""
    try:
        return whole_numbers(index.reshape(-1) if hasattr(index, "reshape") else index, "batch['index']")
    except LplError as error:
        raise LplError(f"{error} It must hold each sample's position in the train dataset: return "
                       "{'index': i, ...} from the dataset's __getitem__(i).") from None


def _check_fresh_start(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """A recording starts from a fresh Adam, and a resumed one continues the recorded order from the checkpoint."""
    if trainer.global_step == 0 and any(optimizer.state.values()):
        raise LplError(
            "the optimizer already holds Adam state (moments of an earlier run) before the first step: a recording "
            "starts from a fresh Adam, as retraining and every estimate assume; load the model's weights only and "
            "let the Trainer build a new optimizer (or continue an existing recording with resume=True)."
        )
    loader = trainer.train_dataloader
    if trainer.global_step > 0 and not callable(getattr(loader, "load_state_dict", None)):
        raise LplError(
            f"the run resumes at step {trainer.global_step}, but its train loader ({type(loader).__name__}) keeps "
            "no position in checkpoints, so training would not continue the recorded order there: build it as "
            "lpl.data.ResumableDataLoader(dataset, batch_sampler=...), as the lpl DataModules do.")


def _warn_unstored_hparams(info: Mapping[str, Any]) -> None:
    """Warn when the recording cannot rebuild a class (model or DataModule) with the arguments this run gave it."""
    if info.get("hparams_missing"):
        rank_zero_warn(
            f"TrainOrderRecorder: {info['class_path']} stores no hyperparameters (its __init__ never calls "
            "self.save_hyperparameters()), so retraining rebuilds it with the defaults of "
            f"{info['hparams_missing']}, whatever this run was given: call it there to retrain faithfully.")
    if info.get("hparams_not_stored"):
        rank_zero_warn(
            f"TrainOrderRecorder: {info['class_path']} hyperparameters {info['hparams_not_stored']} cannot be "
            "stored as JSON (a module or a tensor, say), so the recording cannot rebuild it: retrain, "
            "record_sensitivities and the checks built on them will refuse this recording. Pass them as "
            "plain numbers, strings or lists (and build the objects from them in __init__) to retrain it.")


def rebuild_failure(cls: type, arguments: Mapping[str, Any]) -> str | None:
    """Why ``cls(**arguments)`` cannot be called (arguments its ``__init__`` does not take, all of them named, or
    one it needs and ``arguments`` lack), or None."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read: retraining will find out
        return None
    try:
        signature.bind(**arguments)  # a **kwargs in __init__ takes anything, as the call would
    except TypeError as error:
        unexpected = sorted(set(arguments) - set(signature.parameters))
        if unexpected and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return f"its __init__ takes no {_some(unexpected)}"  # bind names only the first
        return str(error)
    return None


def _warn_unbound_hparams(cls: type, info: Mapping[str, Any], retraining_adds: Mapping[str, Any] | None = None) -> None:
    """Warn now, not when retraining fails after the run, when the stored hyperparameters do not build ``cls`` as
    retraining builds it: ``cls(**constructor_hparams(hparams), **retraining_adds)``."""
    problem = rebuild_failure(cls, {**constructor_hparams(info["hparams"]), **(retraining_adds or {})})
    if problem is not None:
        rank_zero_warn(
            f"TrainOrderRecorder: {info['class_path']} cannot be rebuilt from its hyperparameters "
            f"{sorted(info['hparams'])}: {cls.__name__}(**hparams) fails ({problem}), so retrain, "
            "record_sensitivities and the checks built on them will fail on this recording. self.hparams must be "
            "arguments of the class's own __init__: call self.save_hyperparameters() there, and only there (when a "
            "parent class's __init__ calls it too, Lightning merges the parent's arguments in), or take those "
            "arguments in its __init__.")


def _check_initialised(module: torch.nn.Module) -> None:
    """Refuse parameters or buffers that lazy modules (nn.LazyLinear, LazyConv2d, ...) have not built yet (they get
    their shapes at the module's first forward): the recording stores the initial weights and every parameter's shape
    before the first step, and a fit without Lightning's sanity check runs no forward before it."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    lazy = [name for name, tensor in tensors if torch.nn.parameter.is_lazy(tensor)]
    if lazy:
        raise LplError(
            f"{type(module).__name__}'s {_some(lazy)} are not initialised yet (a lazy module such as nn.LazyLinear "
            "gets its sizes at its first forward, and this fit runs none before training starts), but "
            "TrainOrderRecorder stores the initial weights and the parameters' shapes before the first step. Keep "
            "Lightning's sanity check (num_sanity_val_steps > 0 runs a forward first), run the model on one batch "
            "before trainer.fit, or build the layer with its sizes (nn.Linear(in_features, out_features)).")


def _non_finite(outputs: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the probe outputs that hold a NaN or an infinity."""
    return sorted(name for name, value in outputs.items() if not bool(torch.isfinite(value).all()))


# How far the gradients Adam steps with may be from those backward computed, relative to the gradients' norm, before
# they count as rewritten. In one process the two are the same tensors read before and after the hooks that run between
# backward and the step, so nothing but a rewrite changes them (the fp16 GradScaler's unscaling, by a power of two, is
# undone exactly, and bf16 autocast changes nothing after backward). Under DDP the reference is the recorder's own
# average of the ranks' gradients, which sums in another order than DDP's buckets: float32 rounding, about 1e-7 of the
# ranks' gradient norm per rank, far below this. A clip to 0.05 of a gradient of norm 1 differs by 0.95. Gradients
# held in a narrower dtype (bf16-true / 16-true weights) are summed over the ranks in that dtype by DDP's buckets:
# there the tolerance is `NARROW_GRADIENT_ROUNDINGS` of that dtype's rounding (bf16 under DDP measured 1.6e-3).
GRADIENT_REWRITE_TOLERANCE = 1e-4
NARROW_GRADIENT_ROUNDINGS = 8


def _rewrite_tolerance(params: Sequence[tuple[str, torch.nn.Parameter]]) -> float:
    """The relative gradient difference that counts as a rewrite (see GRADIENT_REWRITE_TOLERANCE)."""
    if rank_and_world()[1] == 1:
        return GRADIENT_REWRITE_TOLERANCE
    widest_rounding = max((torch.finfo(p.dtype).eps for _, p in params if p.is_floating_point()), default=0.0)
    return max(GRADIENT_REWRITE_TOLERANCE, NARROW_GRADIENT_ROUNDINGS * widest_rounding)


def _unscaling(trainer: L.Trainer) -> float:
    """The factor between the gradients backward computes and those Adam steps with, in a run that rewrites none:
    1 / scale under the fp16 GradScaler (Lightning unscales them before the step; a fused Adam unscales them in its
    step and writes them back), else 1. Read before the scaler updates its scale, after the step."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return 1.0 / scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0


def _gradient_difference(
    backward: Mapping[str, torch.Tensor], params: Sequence[tuple[str, torch.nn.Parameter]], unscaling: float,
) -> tuple[float, float]:
    """(|g_step - g_backward|, the gradients' norm) over ``params``: g_backward the gradients backward accumulated
    (``backward``, by name, times ``unscaling``), averaged over the processes under DDP as DDP averages them, and g_step
    the ``.grad`` Adam stepped with. Under DDP the norm is the ranks' own gradients' (root mean square), so
    that ranks cancelling each other do not shrink the tolerance below DDP's rounding."""
    computed = torch.cat([backward[name].reshape(-1).float() * unscaling if name in backward
                          else p.new_zeros(p.numel(), dtype=torch.float32) for name, p in params])
    stepped = torch.cat([p.grad.reshape(-1).float() if p.grad is not None
                         else p.new_zeros(p.numel(), dtype=torch.float32) for _, p in params])
    size = computed.norm()
    world = rank_and_world()[1]
    if world > 1:  # one collective: the gradients and their squared norm, summed over the ranks
        summed = torch.cat([computed, size.square().reshape(1)])
        dist.all_reduce(summed)
        computed, size = summed[:-1] / world, (summed[-1] / world).sqrt()
    return float((stepped - computed).norm()), float(size)


def _check_averaging_order(recorder: L.Callback, callbacks: Sequence[L.Callback]) -> None:
    """Refuse weight averaging listed before the recorder: it writes the average into the model at train end before
    the recorder's final probe (through ``.data``, which the parameter checks do not see), so that probe would measure
    the averaged model instead of the last iterate that retraining reproduces."""
    averaging = weight_averaging_callbacks()
    for callback in callbacks:
        if callback is recorder:
            return
        if isinstance(callback, averaging):
            raise LplError(
                f"{type(callback).__name__} is listed before TrainOrderRecorder: it writes the averaged weights into "
                "the model when training ends, before the recorder's final probe, which would then measure the "
                "averaged model, not the last iterate retraining reproduces. List TrainOrderRecorder first (the "
                "recording then describes the last iterate).")


def _early_stops(callbacks: Sequence[L.Callback]) -> list[str]:
    """The callbacks that may end training before its planned steps: EarlyStopping, and the Timer max_time adds."""
    return [f"EarlyStopping(monitor={cb.monitor!r})" if isinstance(cb, EarlyStopping) else "max_time"
            for cb in callbacks
            if isinstance(cb, EarlyStopping) or (isinstance(cb, Timer) and cb.time_remaining() is not None)]


def _entries(root: Path) -> set[Path]:
    """``root`` and everything under it (nothing when it does not exist)."""
    return {root, *root.rglob("*")} if root.exists() else set()


def _remove_created(root: Path, before: set[Path]) -> None:
    """Delete what appeared under ``root`` (``root`` included) since ``before`` listed it; what was there stays."""
    for path in sorted(_entries(root) - before, reverse=True):  # a folder's files before the folder
        with contextlib.suppress(OSError):  # best effort: the fit's own error is the one to report
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def takes_batches_and_order(cls: type) -> bool:
    """Whether ``cls(..., batches=..., order=...)`` can be called, as retraining rebuilds a DataModule."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):  # no signature to read: retraining will find out
        return True
    names = {p.name for p in parameters}
    return {"batches", "order"} <= names or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _json_safe(value: Any) -> Any:
    """Hyperparameters as JSON (tuples become lists); values JSON cannot hold become None and are listed."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return None


def _draws_per_sample_randomness(module: torch.nn.Module) -> bool:
    """Whether training draws masks or batch statistics per sample: dropout or drop-path with a rate, BatchNorm."""
    for layer in module.modules():
        rate = getattr(layer, "p", None) if "Dropout" in type(layer).__name__ else getattr(layer, "drop_prob", None)
        if (isinstance(rate, (int, float)) and rate > 0) or isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            return True
    return False


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (missing values in data)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# what LightningCLI adds to the hyperparameters of the classes it builds (how it built them), not constructor arguments
CLI_HPARAMS = ("_class_path", "_instantiator")


def constructor_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` without LightningCLI's own entries: the arguments that rebuild the object."""
    return {k: v for k, v in hparams.items() if k not in CLI_HPARAMS}


def _rebuild_info(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    hparams = constructor_hparams(getattr(obj, "hparams", {}) or {})
    safe = _json_safe(hparams)
    lost = sorted(k for k, v in hparams.items() if v is not None and safe[str(k)] is None)
    return {"class_path": _class_path(obj), "hparams": safe, "hparams_not_stored": lost,
            "hparams_missing": _unsaved_arguments(obj, hparams)}


def _unsaved_arguments(obj: Any, hparams: Mapping[str, Any]) -> list[str]:
    """With no ``hparams`` at all (the class never calls ``self.save_hyperparameters()``), the ``__init__`` arguments
    that have defaults: rebuilding takes the defaults, whatever the run was given. (Arguments left out on purpose,
    ``save_hyperparameters(ignore=[...])``, are the class's choice.)"""
    if hparams:
        return []
    try:
        parameters = inspect.signature(type(obj).__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.name != "self" and p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class TrainOrderRecorder(L.Callback):
    """Records a reference training run so that other batch orders can be estimated without retraining.

    The run's T training batches B_0..B_{T-1} (sample ids from the batches' ``index``) form the pool. Every
    ``probe_every_n_steps`` steps, at theta_t before the optimizer step, the validation set and then every pool batch
    (this rank's share under DDP: full global batches, interleaved over ranks) are probed through
    ``lpl.order.quantities`` and what they return is stored; once more after the last step (t = T). Every step also
    records its batch, learning rate and Adam hyperparameters; the
    initial weights and the classes and hyperparameters needed to rebuild the module and datamodule are stored once.
    Probes run on the unwrapped module and leave no trace: gradients, modes, buffers and RNG states are restored and
    the optimizer is only read. Pool batches are probed as the step would train them (training modes, the step's
    dropout masks, BatchNorm on batch statistics), except after the last step, and validation in eval mode.

    Example::

        recorder = TrainOrderRecorder("runs/ref/recording", proj_dim=4096, probe_every_n_steps=4)
        trainer = L.Trainer(max_steps=64, callbacks=[recorder], use_distributed_sampler=False)
        trainer.fit(model, datamodule=MNIST5kDataModule(batch_size=64))
        rec = lpl.order.Recording.open("runs/ref/recording")

    A kill at any instant leaves a readable recording (see ``lpl.order.store``) that is never behind the last
    checkpoint. Resuming ``trainer.fit(..., ckpt_path=...)`` with ``resume=True`` continues the same recording from
    the checkpoint's step, and the checkpoint stores the loader position of the batches actually trained and each
    rank's random generators as the last trained step left them, so that the resumed steps draw the dropout masks an
    uninterrupted run draws. A fit that fails keeps the steps it recorded; one refused before its first step removes
    the recording it created. Requirements: one Adam or AdamW optimizer (one set of hyperparameters, no amsgrad),
    ``accumulate_grad_batches=1``, automatic optimization, and a train loader whose batch sampler plans its batches
    reproducibly (``lpl`` Seeded/OrderedBatchSampler, or any batch sampler with ``global_batches(epoch)``), one
    validation loader; no gradient clipping, and gradients changed by nothing between backward and the step (a
    callback's clipping is refused at the first probed step it shows in); parameters changed only by the optimizer
    (in-place writes between steps, pruning, freezing or unfreezing are refused at the step they show in), and built
    before training starts (lazy modules need a forward first, such as Lightning's sanity check). EarlyStopping,
    ``max_time`` (a stop before the planned steps leaves the recording incomplete) and hyperparameters that cannot
    rebuild the module or datamodule are warned about when training starts, and a run that diverges at the first
    probe that finds NaN or infinite values.

    Args:
        dirpath: folder of the recording (see ``lpl.order.store``).
        proj_dim: k, the projected length of every recorded vector.
        seed: seed of the projection matrix.
        probe_every_n_steps: probe steps 0, n, 2n, ... (and T); the probe cost is O(T) gradients per probed step.
        store_dtype: "float16", "bfloat16" or "float32" for projected vectors (scalars stay float32, and so does a
            vector the store dtype's range would not hold: overflowing, or underflowing to zeros and subnormals).
        resume: continue an existing recording of the same run (checked: model, seed, proj_dim, pool).
        projection_kind: "rademacher" or "gaussian".
        curvature_rank: r > 0 also records per-batch rank-r curvature factors (r Hessian-vector products each),
            which the estimator's first/second-order methods need (default 2); 0 records only first-order terms.
        val_curvature_rank: m > 0 also records the validation loss's top-m curvature directions at the end of the
            run (4m Hessian-vector products on the validation set, once, with 4m full-size vectors in memory), for
            the quadratic term 1/2 Delta^T H_val Delta of the final estimate; default 0 (off).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        proj_dim: int = 4096,
        seed: int = 0,
        probe_every_n_steps: int = 1,
        store_dtype: str = "float16",
        resume: bool = False,
        projection_kind: str = "rademacher",
        curvature_rank: int = 2,
        val_curvature_rank: int = 0,
    ) -> None:
        proj_dim = checked_count("proj_dim", proj_dim, 1)
        probe_every_n_steps = checked_count("probe_every_n_steps", probe_every_n_steps, 1)
        curvature_rank = checked_count("curvature_rank", curvature_rank, 0)
        val_curvature_rank = checked_count("val_curvature_rank", val_curvature_rank, 0)
        seed = checked_count("seed", seed, 0)
        if store_dtype not in STORE_DTYPES:
            raise LplError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}.")
        if projection_kind not in PROJECTION_KINDS:
            raise LplError(f"projection_kind must be one of {PROJECTION_KINDS}, got {projection_kind!r}.")
        self.dirpath = Path(dirpath)
        self.proj_dim = proj_dim
        self.seed = seed
        self.probe_every_n_steps = probe_every_n_steps
        self.store_dtype = store_dtype
        self.resume = resume
        self.projection_kind = projection_kind
        self.curvature_rank = curvature_rank
        self.val_curvature_rank = val_curvature_rank
        self._writer: RecordingWriter | None = None
        self._step_hook: Any = None  # the optimizer post-step hook that records each step
        self._grad_hooks: list[Any] = []  # per trainable parameter, while a probed step's backward runs
        self._backward_grads: dict[str, torch.Tensor] | None = None  # the gradients that backward computed
        self._started = False
        self._stepped = -1  # the last step Adam took
        self._projector: Projector | None = None
        self._pool: list[list[int]] = []
        self._order: list[int] = []
        self._data_checked = False  # the dataset gives the same data for the same sample ids (checked once per fit)
        self._rng_after_step: dict[str, torch.Tensor] | None = None  # the generators as the last step left them
        self._rng_step = 0  # the step those states start (the global step after that last step)
        self._checkpoint_rng: dict[str, Any] | None = None  # what load_state_dict found (a resume's checkpoint)
        self._rng_to_restore: dict[str, torch.Tensor] | None = None  # where a resumed fit's first step starts from
        self._recorded_start_rng: dict[str, torch.Tensor] | None = None  # the recording's states of that step
        self._parameters: ParameterState = {}  # as the last optimizer step (or the start of recording) left them
        self._created_over: set[Path] | None = None  # the folder's entries before this fit created the recording
        self._masks_warned = False
        self._diverged_warned = False
        # whether eval-mode losses differ without autograd (then stored as measured so); None until the first probe
        self._losses_without_grad: bool | None = None
        self._changed_warned: set[str] = set()
        self._total_steps = 0
        self._one_process = contextlib.ExitStack()  # holds single_process() for a one-device fit in a DDP process
        self._alone = False  # that fit: one device in a process where a DDP fit left its process group

    # ---- validation of the run
    @staticmethod
    def _check_trainer(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.optim.Optimizer:
        if len(trainer.optimizers) != 1:
            raise LplError(
                "TrainOrderRecorder supports exactly one optimizer (Adam or AdamW), "
                f"the run has {len(trainer.optimizers)}."
            )
        check_replicated_strategy(trainer, "TrainOrderRecorder")
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW subclasses Adam from torch 2.7
            raise LplError(
                f"TrainOrderRecorder records Adam/AdamW runs, but the optimizer is {type(optimizer).__name__}; "
                "configure torch.optim.Adam or torch.optim.AdamW."
            )
        _check_accumulation(trainer)
        if trainer.gradient_clip_val:
            raise LplError(
                "TrainOrderRecorder does not support gradient clipping "
                f"(gradient_clip_val={trainer.gradient_clip_val}): "
                "the order estimates and retraining assume Adam sees each batch's own gradient; record the reference "
                "run with gradient_clip_val=None."
            )
        if not pl_module.automatic_optimization:
            raise LplError("TrainOrderRecorder supports automatic optimization only (one optimizer step per batch).")
        groups = trained_param_groups(optimizer)
        # weight decay may differ between groups (biases and norms often have none): the full-space methods take
        # it per parameter; lr, betas and eps are one set in every method
        differing = _differing_hyperparameters(groups)
        if differing:
            raise LplError(
                f"TrainOrderRecorder needs one lr, betas and eps for every trained parameter, but the optimizer's "
                f"param groups differ in {', '.join(differing)} ({[_hyperparameter(g, differing[0]) for g in groups]}"
                "); use one value for all."
            )
        if not all(float(g["eps"]) > 0 for g in groups):
            raise LplError(
                f"TrainOrderRecorder needs Adam's eps > 0 (got {[float(g['eps']) for g in groups]}): with eps=0 an "
                "update divides by a zero second moment (a weight no batch moves), and the estimates do the same; "
                "use Adam's default 1e-8 or another positive value.")
        if any(g.get("amsgrad") or g.get("maximize") for g in groups):
            raise LplError("TrainOrderRecorder supports plain Adam/AdamW, not amsgrad=True or maximize=True (in any "
                           "param group).")
        if is_overridden("configure_gradient_clipping", pl_module):
            raise LplError(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping: TrainOrderRecorder cannot tell "
                "whether it clips, and clipped gradients are not the ones the recording holds; remove the override "
                "to record (gradient clipping is not supported).")
        in_optimizer = {id(p) for g in groups for p in g["params"]}
        missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        if missing:
            raise LplError(f"trainable parameter {missing[0]!r} is not in the optimizer; freeze it or optimize it.")
        return optimizer

    @staticmethod
    def _batch_sampler(trainer: L.Trainer) -> Any:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not callable(getattr(sampler, "global_batches", None)):
            # `is None`: the truth of a sampler is its len(), which an IterableDataset's sampler does not have
            what = type(loader).__name__ if sampler is None else type(sampler).__name__
            if isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset):
                what = f"an IterableDataset, {type(loader.dataset).__name__}"
            raise LplError(
                f"the train loader's order is not reproducible ({what}); use lpl's SeededBatchSampler/"
                "OrderedBatchSampler (the lpl DataModules do) with use_distributed_sampler=False. Recording also needs "
                "dict batches whose 'index' holds each sample's position in the train dataset, and, to retrain, a "
                "DataModule whose __init__ takes `batches` and `order`: subclass lpl.data.base.IndexedDataModule "
                "for all three."
            )
        return sampler

    # ---- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A one-device Trainer in a process where an earlier DDP fit left its process group initialised (Lightning
        # does not destroy it): the lpl samplers would yield this rank's share of every batch and the probes would
        # wait on the other ranks (the module's torchmetrics too), so the whole fit runs as one process (until
        # teardown or on_exception).
        self._alone = trainer.world_size == 1 and rank_and_world()[1] > 1
        if self._alone:
            self._one_process.enter_context(single_process())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._one_process.close()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attach_trainer(trainer.train_dataloader, trainer)
        restore_loader_position(trainer)  # a resume continues the recorded order where the checkpoint left it
        optimizer = self._check_trainer(trainer, pl_module)
        _check_initialised(pl_module)
        self._started = True
        self._data_checked = False
        self._rng_after_step = None  # a new fit (or a resume) starts from generators no step of this run left
        saved_rng, self._checkpoint_rng = self._checkpoint_rng, None
        self._masks_warned = self._diverged_warned = False
        self._losses_without_grad = None
        _check_fresh_start(trainer, optimizer)
        sampler = self._batch_sampler(trainer)
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise LplError("TrainOrderRecorder needs a finite run: set max_steps or max_epochs.")
        self._total_steps = int(total)
        self._pool, self._order = plan_pool(sampler, int(trainer.num_training_batches), self._total_steps)
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        signature = parameter_signature((n, p.shape) for n, p in named)
        self._projector = Projector(signature["num_params"], self.proj_dim, self.seed, self.projection_kind)
        rank, world = rank_and_world()
        header = self._header(trainer, pl_module, optimizer, signature, world)
        self._check_setup(trainer, pl_module, header, world)
        self._open_store_on_every_rank(pl_module, header, trainer.global_step, rank, world)
        self._trainer, self._stepped = trainer, trainer.global_step - 1
        if trainer.global_step > 0:
            self._resume_rng(saved_rng, trainer.global_step)
        self._parameters = _parameter_state(pl_module.named_parameters())
        self._step_hook = optimizer.register_step_post_hook(self._after_adam_step)
        if rank != 0:
            self._writer = RecordingWriter.attach(self.dirpath)

    def _check_setup(self, trainer: L.Trainer, pl_module: L.LightningModule, header: dict, world: int) -> None:
        """Refuse a run without validation data or with weight averaging before the recorder; warn about what would
        keep the recording from being retrained or finished."""
        if trainer.datamodule is None:
            rank_zero_warn(
                "TrainOrderRecorder: the run has no LightningDataModule (loaders were passed to fit), so the recording "
                "cannot say how to rebuild its data: retrain, record_sensitivities and the checks built on them will "
                "refuse it; record with trainer.fit(model, datamodule=...).")
        elif not takes_batches_and_order(type(trainer.datamodule)):
            rank_zero_warn(
                f"TrainOrderRecorder: {type(trainer.datamodule).__name__}.__init__ takes no `batches` and `order`, "
                "so retraining cannot rebuild it to train other orders: retrain, record_sensitivities and the checks "
                "built on them will refuse this recording. Accept them as lpl.data.IndexedDataModule does (a "
                "batch_sampler=OrderedBatchSampler(batches, order) when they are given).")
        if self._val_loader(trainer) is None:
            raise LplError("TrainOrderRecorder needs validation data (the loss every estimate predicts): give the "
                           "DataModule a val_dataloader(), or pass val_dataloaders to trainer.fit.")
        if world > 1 and _draws_per_sample_randomness(pl_module):
            rank_zero_warn(
                "TrainOrderRecorder: under DDP each process draws its own dropout / drop-path masks (and BatchNorm "
                "statistics) for its share of a batch; retraining and the probes run a whole batch in one process, so "
                "they draw others: retraining will not reproduce this run exactly and the estimates carry that noise. "
                "Record on one device to reproduce it.")
        _check_averaging_order(self, trainer.callbacks)
        stops = _early_stops(trainer.callbacks)
        if stops:
            rank_zero_warn(
                f"TrainOrderRecorder: {' and '.join(stops)} may stop training before the T = {self._total_steps} "
                f"steps the recording plans; a run stopped early leaves {self.dirpath} incomplete (no final probe: "
                "estimates and retraining need the whole run). Set max_steps / max_epochs to the run you want recorded "
                "and record without them, or finish a stopped run by resuming its checkpoint without them "
                "(TrainOrderRecorder(..., resume=True)).")
        _warn_unstored_hparams(header["model"])
        _warn_unbound_hparams(type(pl_module), header["model"])
        if header["datamodule"] is not None:
            _warn_unstored_hparams(header["datamodule"])
            if takes_batches_and_order(type(trainer.datamodule)):  # else told above: retraining cannot rebuild it
                _warn_unbound_hparams(type(trainer.datamodule), header["datamodule"], {"batches": [], "order": []})

    def _open_store_on_every_rank(self, pl_module: L.LightningModule, header: dict, step: int, rank: int,
                                  world: int) -> None:
        """Rank 0 creates (or reopens) the store; its refusal stops every rank, not leaving the others waiting in a
        collective."""
        error = self._open_store(pl_module, header, step) if rank == 0 else None
        if world > 1:
            errors: list[str | None] = [None] * world
            dist.all_gather_object(errors, error)
            error = errors[0]
        if error is not None:
            raise LplError(error)

    def _resume_rng(self, saved: Mapping[str, Any] | None, step: int) -> None:
        """Where a resumed fit's first step starts its generators (a Lightning checkpoint restores none): on rank 0
        the states the recording holds for that step (the interrupted run got there, and something drew between the
        steps: a new epoch's loader, validation), else the states the last trained step left on this rank, which
        the checkpoint holds. The run then draws the dropout masks an uninterrupted run draws, except where the
        interrupted run stopped between its checkpoint and the next step after drawing there (a new epoch's loader,
        validation): those draws are not repeated. The recording holds the states the resumed step starts from, so
        retraining reproduces the resumed run either way."""
        rank, world = rank_and_world()
        states = saved.get("rng") if saved and saved.get("step") == step else None
        if states is not None and len(states) != world:
            rank_zero_warn(
                f"TrainOrderRecorder: the checkpoint holds the random generator states of {len(states)} processes but "
                f"this fit runs {world}, so the resumed steps draw other random numbers (dropout masks) than the "
                "interrupted run would have (retraining follows the recording); resume on as many devices to continue "
                "it exactly.")
            states = None
        self._rng_after_step, self._rng_step = (states[rank] if states is not None else None), step
        recorded = self._recorded_start_rng if rank == 0 else None
        self._rng_to_restore = recorded if recorded is not None else self._rng_after_step

    def _header(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer,
        signature: dict[str, Any], world: int,
    ) -> dict[str, Any]:
        """What identifies the run in the manifest: model, rebuild info, projection, optimizer, schedule of probes."""
        group = trained_param_groups(optimizer)[0]
        decay = {id(p): float(g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        decays = [decay[id(p)] for _, p in pl_module.named_parameters() if p.requires_grad]
        return {
            # retraining freezes what this run froze (a frozen backbone), whatever a fresh module would
            "model": {**signature, **(_rebuild_info(pl_module) or {}),
                      "frozen": [n for n, p in pl_module.named_parameters() if not p.requires_grad]},
            "datamodule": _rebuild_info(trainer.datamodule),
            "projection": {"seed": self.seed, "proj_dim": self.proj_dim, "kind": self.projection_kind},
            "store_dtype": self.store_dtype,
            "precision": str(trainer.precision),  # retraining and the sensitivity data compute as training did
            "num_steps": self._total_steps,
            "batches_per_epoch": int(trainer.num_training_batches),  # retraining keeps the run's epochs
            "probe_every_n_steps": self.probe_every_n_steps,
            "curvature_rank": self.curvature_rank,
            "world_size": world,
            "optimizer": {
                "name": type(optimizer).__name__,
                "lr": float(group["lr"]),  # a tensor lr (torch allows it) is stored as its value
                "betas": [float(b) for b in group["betas"]],
                "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]),
                # per trainable parameter (named_parameters order), only when the groups' weight decays differ
                **({"weight_decays": decays} if len(set(decays)) > 1 else {}),
                "decoupled": self._decoupled(optimizer),
            },
        }

    def _open_store(self, pl_module: L.LightningModule, header: dict[str, Any], start: int) -> str | None:
        """Create, or resume at step ``start``, the recording (rank 0); returns the refusal message, if any."""
        exists = (self.dirpath / "manifest.json").exists()
        self._created_over = self._recorded_start_rng = None
        try:
            if exists and not self.resume:
                raise LplError(
                    f"{self.dirpath} already holds a recording; pass resume=True to continue it "
                    "or choose a new dirpath."
                )
            initial = {name: t.detach().cpu() for name, t in pl_module.state_dict().items()} if start == 0 else None
            if exists:
                if start > 0:  # read before resume() drops the states of the steps it replaces
                    self._recorded_start_rng = Recording.open(self.dirpath).rng_states().get(start)
                self._writer = RecordingWriter.resume(self.dirpath, header, self._pool, self._order, start)
                if initial is not None:  # restarted from scratch: this run's own theta_0
                    self._writer.write_initial_state(initial)
            elif start > 0:
                raise LplError(
                    f"the run resumes at step {start} but {self.dirpath} holds no recording; "
                    "record from the start or point dirpath at the original recording."
                )
            else:
                self._created_over = _entries(self.dirpath)
                self._writer = RecordingWriter.create(self.dirpath, header, self._pool, self._order, initial)
        except LplError as refusal:
            return str(refusal)
        except OSError as error:  # a file in the way, no permission: refused on every rank, not a raw traceback
            return f"cannot write the recording at {self.dirpath}: {error}; choose a dirpath this run can write."
        return None

    @staticmethod
    def _decoupled(optimizer: torch.optim.Optimizer) -> bool:
        return bool(isinstance(optimizer, torch.optim.AdamW)
                    or trained_param_groups(optimizer)[0].get("decoupled_weight_decay"))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attach_trainer(trainer.train_dataloader, trainer)  # a loader rebuilt for the epoch (before its first batch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._check_parameters(pl_module, step)
        _check_accumulation(trainer)  # again: a GradientAccumulationScheduler sets it at each epoch's start
        self._check_batch(batch, step)
        if not self._masks_warned and has_masks(pl_module):
            self._masks_warned = True
            rank_zero_warn(
                "TrainOrderRecorder: the model trains with block masks (apply_masks / BlockPruneCallback), which the "
                "recording does not hold: retrain, record_sensitivities and the checks built on them train it unmasked "
                "and will not reproduce this run. Record the fine-tuning of the exported model (to_block_sparse).")
        if not self._data_checked:
            self._check_data_repeats(trainer, batch, step)
            self._data_checked = True
        if self._rng_to_restore is not None:  # a resumed fit's first step
            set_step_rng_state(self._rng_to_restore, pl_module.device)
            self._rng_to_restore = None
        if rank_and_world()[0] == 0:
            states = step_rng_state(pl_module.device)
            # every epoch's first step is stored, whether or not something drew before it: a resumed fit may start
            # it from the last step's states (its interrupted run stopped before storing the ones it drew there),
            # where retraining's loader for the new epoch would draw
            epoch_start = step % int(trainer.num_training_batches) == 0
            if epoch_start or self._rng_after_step is None or not same_states(states, self._rng_after_step):
                # validation, a new epoch's loader or a resume drew from the generators since the last step:
                # retraining, which runs the steps back to back, starts this step from these states
                self._writer.write_rng_state(states, step)
        if step % self.probe_every_n_steps == 0:
            self._probe(trainer, pl_module, step)
            self._watch_backward()
        elif rank_and_world()[0] == 0 and time.monotonic() - self._writer.last_flush > FLUSH_SECONDS:
            self._writer.flush()

    def _check_parameters(self, pl_module: L.LightningModule, step: int, stepped: bool = False) -> None:
        """Refuse parameters changed outside the optimizer, and take their state as the recording follows it. Between
        steps the module is walked (pruning renames parameters, a layer may be replaced); right after the optimizer
        stepped, the parameters of the last walk are looked at, so that a step costs one walk."""
        named = ((n, p) for n, (p, _, _) in self._parameters.items()) if stepped else pl_module.named_parameters()
        now = _parameter_state(named)
        problem = _parameter_change(self._parameters, now, pl_module, step, stepped)
        if problem is not None:
            raise LplError(problem)
        self._parameters = now

    def _watch_backward(self) -> None:
        """Keep, for this step, each trainable parameter's gradient as backward accumulates it: the hook runs inside
        backward, before any Lightning hook (a callback's or the module's) sees the gradients."""
        self._stop_watching()
        self._backward_grads = {}
        self._grad_hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._keep_gradient, name))
                            for name, (p, trains, _) in self._parameters.items() if trains]

    def _keep_gradient(self, name: str, param: torch.nn.Parameter) -> None:
        self._backward_grads[name] = param.grad.detach().clone()

    def _stop_watching(self) -> dict[str, torch.Tensor] | None:
        """Remove the gradient hooks; returns what they kept (None when this step was not watched)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        kept, self._backward_grads = self._backward_grads, None
        return kept

    def _check_gradients(self, step: int) -> None:
        """At a probed step, refuse gradients rewritten between backward and Adam's update (clipping or noise in a
        callback): the probes, and so every estimate, take the gradient backward computes, and retraining runs none of
        the run's callbacks. Runs in the post-step hook: Lightning may run the closure (training step, backward and
        every hook up to on_before_optimizer_step) inside optimizer.step, after its pre-step hooks, and Adam leaves
        .grad as it stepped with it. Checked where the recorder probes, at the cost of one copy of the gradients."""
        kept = self._stop_watching()
        if kept is None:
            return
        params = [(name, p) for name, (p, trains, _) in self._parameters.items() if trains]
        difference, size = _gradient_difference(kept, params, _unscaling(self._trainer))
        if difference > _rewrite_tolerance(params) * size:  # the same on every rank: no rank is left waiting
            raise LplError(
                f"at step {step} Adam stepped with other gradients than backward computed: they differ by "
                f"{difference:.3g}, {difference / size if size else math.inf:.2g} of the gradients' norm {size:.3g}. "
                "Something rewrote them between backward and the optimizer step (clipping, noise or masking in a "
                "callback's or the module's on_after_backward or on_before_optimizer_step, or an overridden "
                "backward); the recording holds the gradients backward computes and retraining runs none of the "
                "run's callbacks, so neither the estimates nor retraining would reproduce this run. Record without "
                "that change (gradient clipping is not supported).")

    def _after_adam_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Records the step's hyperparameters as Adam used them: an optimizer post-step hook runs after every
        Lightning hook that may set them (later callbacks', the module's own), and not for a step the fp16
        GradScaler skipped."""
        step, groups = self._trainer.global_step, trained_param_groups(optimizer)
        self._stepped = step
        # the module's own on_train_batch_start and training_step run after the recorder's batch check
        self._check_parameters(self._trainer.lightning_module, step, stepped=True)
        self._check_gradients(step)
        differing = _differing_hyperparameters(groups)
        if differing:
            raise LplError(
                f"at step {step} the optimizer's param groups differ in {', '.join(differing)} "
                f"({[_hyperparameter(g, differing[0]) for g in groups]}): a schedule moved them apart, but retraining "
                "and every estimate take one lr, betas and eps for all trained parameters; schedule every group alike.")
        if rank_and_world()[0] != 0:
            return
        group, betas = groups[0], groups[0]["betas"]
        hyper = {"lr": float(group["lr"]), "beta1": float(betas[0]), "beta2": float(betas[1]),
                 "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
        if len(optimizer.param_groups) > 1:  # every group, as retraining rebuilds them
            hyper["group_weight_decay"] = [float(g["weight_decay"]) for g in optimizer.param_groups]
        self._warn_if_changed(step, hyper)
        self._writer.add_step(step, {"batch": self._order[step], **hyper})

    def _warn_if_changed(self, step: int, hyper: dict[str, Any]) -> None:
        """Retraining follows per-step betas, eps and weight decay; the estimates take the first step's."""
        first = self._writer.manifest["steps"][0] if self._writer.manifest["steps"] else hyper
        changed = [k for k in ("beta1", "beta2", "eps", "weight_decay", "group_weight_decay")  # older steps: not all
                   if k in first and hyper.get(k) != first[k] and k not in self._changed_warned]
        if changed:
            self._changed_warned.update(changed)
            rank_zero_warn(
                f"TrainOrderRecorder: {', '.join(changed)} changed at step {step} (a scheduler such as OneCycleLR "
                "with cycle_momentum=True, or a weight-decay schedule): retraining follows them step by step, but the "
                "estimators take the first step's values, so their estimates will be off; keep them constant "
                "(OneCycleLR(cycle_momentum=False)) to estimate this run.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stepped != trainer.global_step - 1:
            raise LplError(
                f"the optimizer skipped step {trainer.global_step - 1} (the fp16 GradScaler found inf/nan gradients, "
                "or a hook skipped optimizer.step): a recording needs every step Adam takes, one per batch; record in "
                "bf16-mixed or 32-true precision, where no step is skipped.")
        # every rank's: the checkpoint holds them all, stamped with the step they start (set together, so that a
        # checkpoint saved between the optimizer step and here pairs the previous step with its own states)
        self._rng_after_step, self._rng_step = step_rng_state(pl_module.device), trainer.global_step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = False  # set once training starts: a fit that trains nothing is told apart at its end
        self._writer = None
        if self._alone:  # here, not in setup: configure_model (after setup) may create the module's metrics
            self._one_process.enter_context(metrics_unsynced(pl_module))

    def _stop_writing(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._stop_watching()
        if self._writer is not None and rank_and_world()[0] == 0:
            self._writer.release()  # a resume in this process may write again
        self._writer = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is None:
            return
        finished = trainer.global_step == self._total_steps
        if finished:
            self._check_parameters(pl_module, self._total_steps)
            self._probe(trainer, pl_module, self._total_steps)
        if rank_and_world()[0] == 0:
            if finished:
                self._writer.finish()
            else:
                self._writer.flush()
                rank_zero_warn(
                    f"TrainOrderRecorder: training stopped at step {trainer.global_step} of the {self._total_steps} "
                    f"the recording plans, so {self.dirpath} is incomplete (estimates and retraining need the whole "
                    "run): resume from a checkpoint with TrainOrderRecorder(..., resume=True), or record again."
                )
        self._stop_writing()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._writer is not None and rank_and_world()[0] == 0:
            self._end_failed_recording()
        self._stop_writing()
        self._one_process.close()  # Lightning calls no teardown hook after an exception

    def _end_failed_recording(self) -> None:
        """Keep what a failed fit recorded (the manifest flushed: a valid, incomplete recording), unless this fit
        created the recording and recorded no step: then remove what it created, so that a next fit can start there."""
        if self._created_over is not None and not self._writer.manifest["steps"]:
            _remove_created(self.dirpath, self._created_over)
            return
        with contextlib.suppress(OSError):  # the fit's own error is the one to report
            self._writer.flush()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume from a checkpoint of the run's last step trains nothing, so no hook above ran: the final probe
        # and the end of the recording, if the first run died before them, would stay missing without a word.
        if self._started:
            return
        rank, world = rank_and_world()
        error = self._unfinished_recording(trainer) if rank == 0 else None
        if world > 1:  # every rank stops, not rank 0 alone
            errors: list[str | None] = [None] * world
            dist.all_gather_object(errors, error)
            error = errors[0]
        if error is not None:
            raise LplError(error)

    def _unfinished_recording(self, trainer: L.Trainer) -> str | None:
        if not (self.dirpath / "manifest.json").exists():
            return None
        with contextlib.suppress(LplError):
            if Recording.open(self.dirpath).status == "complete":
                return None
        return (f"this fit trained no step (it resumed at step {trainer.global_step}, the run's last, or "
                f"limit_train_batches=0), so {self.dirpath} stays incomplete (its final probe was never taken): "
                "resume from an earlier checkpoint (ModelCheckpoint(save_top_k=-1) or every_n_train_steps keeps "
                "them), which trains the last steps again.")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the checkpoint must never be ahead of the recording, or a resume would leave a gap
        if self._writer is not None and rank_and_world()[0] == 0:
            self._writer.flush()

    def state_dict(self) -> dict[str, Any]:
        # Lightning checkpoints restore no random generators: a resumed fit puts back the states the last trained step
        # left (each rank its own), so that it draws the dropout masks an uninterrupted run draws
        if self._rng_after_step is None:
            return {}
        states = [self._rng_after_step]
        # the Trainer's processes, not the process group's: a one-device fit after a DDP fit saves alone
        world = self._trainer.world_size if self._trainer is not None else 1
        if world > 1:  # every rank saves a checkpoint's state (only rank 0's is written)
            states = [None] * world
            dist.all_gather_object(states, self._rng_after_step)
        return {"step": self._rng_step, "rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint_rng = dict(state_dict) or None

    # ---- probing
    def _check_batch(self, batch: Any, step: int) -> None:
        if not isinstance(batch, Mapping) or "index" not in batch:
            raise LplError(
                "TrainOrderRecorder needs dict batches with an 'index' entry (sample ids); "
                "return {'index': LongTensor[B], ...} from the dataset (every lpl DataModule does)."
            )
        if step >= len(self._order):
            raise LplError(
                f"step {step} is past the {len(self._order)} steps the run planned; do not change max_steps."
            )
        rank, world = rank_and_world()
        planned = self._pool[self._order[step]]
        share = len(planned) // world
        planned_slice = planned[rank * share : (rank + 1) * share]
        seen = _sample_ids(batch["index"])
        if seen != planned_slice:
            unplanned = set(seen) - {i for pool_batch in self._pool for i in pool_batch}
            cause = ("batch['index'] must be each sample's position i in the train dataset (dataset[i]), the ids the "
                     f"batch sampler draws, and sample {min(unplanned)} is in none of its batches; a Subset's items, "
                     "say, keep the ids of the dataset they come from" if unplanned else
                     "the loader's order is not reproducible (or it did not resume where it stopped)")
            raise LplError(
                f"at step {step} the train loader yielded samples {seen[:4]}... but its batch sampler planned "
                f"{planned_slice[:4]}...; {cause}."
            )

    def _check_data_repeats(self, trainer: L.Trainer, batch: Mapping[str, Any], step: int) -> None:
        """Warn when the dataset gives other data for the sample ids the loader just gave (random augmentation, say):
        probes, retraining and the sensitivity data load pool batches again by id and must see what training saw."""
        ids = _sample_ids(batch["index"])
        rng = capture_rng()  # loading must not move the RNG streams training draws from
        try:
            again = self._load_samples(trainer, ids, trainer.lightning_module)
        finally:
            restore_rng(rng)
        differing = sorted(
            str(key) for key, value in batch.items()
            if isinstance(value, torch.Tensor) and isinstance(again.get(key), torch.Tensor)
            and not _same_values(value, again[key])
        )
        if differing:
            rank_zero_warn(
                f"TrainOrderRecorder: loading the samples of step {step} again gave other {', '.join(differing)} than "
                "the train loader and the batch-transfer hooks did (random augmentation in the dataset or in "
                "on_after_batch_transfer?): the recorded quantities, retraining and the estimates will not match what "
                "training saw. Record with deterministic train transforms."
            )

    def _adam_snapshot(self, trainer: L.Trainer, params: list[torch.Tensor], step: int) -> quantities.AdamSnapshot:
        optimizer = trainer.optimizers[0]
        group = trained_param_groups(optimizer)[0]
        exp_avg, exp_avg_sq = [], []
        for p in params:
            state = optimizer.state.get(p, {})
            exp_avg.append(state["exp_avg"] if "exp_avg" in state else torch.zeros_like(p))
            exp_avg_sq.append(state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p))
        return quantities.AdamSnapshot(
            step=step, lr=float(group["lr"]), betas=tuple(float(b) for b in group["betas"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=self._decoupled(optimizer),
            exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
        )

    @staticmethod
    def _load_samples(trainer: L.Trainer, ids: list[int], module: L.LightningModule) -> Any:
        """The train dataset's samples ``ids``, collated as the train loader does, as ``module`` takes them."""
        return to_module(collate_samples(trainer.train_dataloader, ids), module, training=True)

    def _pool_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, position: int) -> Any:
        return self._load_samples(trainer, self._pool[position], pl_module)

    @staticmethod
    def _val_loader(trainer: L.Trainer) -> Any:
        """The run's validation loader (None without one); several are refused."""
        loaders = fit_val_loaders(trainer)
        return None if loaders is None else single_val_loader(loaders)

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        rank, world = rank_and_world()
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        modes = [m.training for m in pl_module.modules()]
        rng = capture_rng()
        context = quantities.ProbeContext(
            step=step, params=params, adam=self._adam_snapshot(trainer, params, step), projector=self._projector,
            curvature_rank=self.curvature_rank,
            # the quadratic term corrects the final estimate: its validation HVPs are spent once, at t = T
            val_curvature_rank=self.val_curvature_rank if step == self._total_steps else 0,
            losses_without_grad=self._losses_without_grad is not False,
        )
        forward = trainer.precision_plugin.forward_context
        positions = list(range(rank, len(self._pool), world))
        try:
            pl_module.eval()
            # validation first, on every rank: quantities then stores each pool batch's exact dot product with the
            # validation gradient (the estimator's control variates); only rank 0 keeps the validation outputs
            val_loader = self._val_loader(trainer)
            val_outputs = None
            if val_loader is not None:
                val_outputs = quantities.probe_validation(context, validation_loss_fn(val_loader, pl_module, forward))
                if self._losses_without_grad is None:  # the first probe measured both ways: keep what it found
                    self._losses_without_grad = context.without_grad_differed
            # before a step, the gradient that step would feed Adam (training modes, its dropout masks); after the
            # last one, the batch's loss in eval mode, as retraining measures it
            as_trained = step < self._total_steps
            context.losses_without_grad = not as_trained and self._losses_without_grad is not False

            def batch_losses() -> Iterator[Callable[[], torch.Tensor]]:
                for position in positions:
                    batch = self._pool_batch(trainer, pl_module, position)

                    def batch_loss(batch: Any = batch) -> torch.Tensor:
                        with as_in_training(pl_module, modes, rng) if as_trained else contextlib.nullcontext():
                            with forward():
                                return module_loss(pl_module, batch)

                    yield batch_loss

            outputs = quantities.probe_pool_batches(context, batch_losses())
        finally:
            for module, mode in zip(pl_module.modules(), modes):
                module.training = mode
            for p, g in zip(params, grads):
                p.grad = g
            restore_rng(rng)
        shard = self._writer.write_probe_shard(step, rank, outputs, positions, val_outputs if rank == 0 else None)
        # with the number of this rank's pool batches whose outputs are not finite: rank 0 warns of every rank's
        shards = [(shard, sum(1 for batch_outputs in outputs if _non_finite(batch_outputs)))]
        if world > 1:
            shards, mine = [None] * world, shards[0]
            dist.all_gather_object(shards, mine)
        if rank == 0:
            scalars = {name: float(v) for name, v in (val_outputs or {}).items() if v.numel() == 1}
            self._writer.add_probe(step, [written for written, _ in shards], scalars)
            self._writer.flush()
            self._warn_if_diverged(trainer, step, val_outputs or {}, sum(count for _, count in shards))

    def _warn_if_diverged(self, trainer: L.Trainer, step: int, val_outputs: Mapping[str, torch.Tensor],
                          non_finite_batches: int) -> None:
        """Warn, once a fit, at the first probe that finds NaN or infinite values (in ``val_outputs``, or in the
        outputs of ``non_finite_batches`` pool batches). A warning and not a refusal: the recording stays a faithful
        record of the run (retraining its order diverges the same way), the fit is the user's to stop (Lightning
        trains on through NaN unless told to stop, by EarlyStopping(check_finite=True) say), and a refusal would only
        leave the same recording incomplete."""
        validation = _non_finite(val_outputs)
        if self._diverged_warned or not (validation or non_finite_batches):
            return
        self._diverged_warned = True
        found = []
        if validation:
            found.append(f"a validation loss of {float(val_outputs['val_loss']):g}" if "val_loss" in validation
                         else f"non-finite validation {', '.join(validation)}")
        if non_finite_batches:
            found.append(f"non-finite gradients or losses for {non_finite_batches} of the {len(self._pool)} pool "
                         "batches")
        hint = (" (under precision='16-true' Adam's moments are float16 too, where eps=1e-8 rounds to 0: use "
                "'bf16-mixed', '16-mixed' or '32-true')" if str(trainer.precision) == "16-true" else "")
        rank_zero_warn(
            f"TrainOrderRecorder: the run diverged by step {step}: the probe there found {' and '.join(found)}. "
            "Estimates and retraining of this recording are meaningless (they predict a non-finite loss). Stop the "
            f"run and record it again with a lower learning rate or in another precision{hint}; if the data hold NaN "
            "or infinite values, clean them.")
