"""Ground truth for order estimates: train again from the recording's initial weights with an explicit batch order."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lpl.order.pool import collate_samples, single_val_loader
from lpl.order.recorder import constructor_hparams, rebuild_failure, takes_batches_and_order, trained_param_groups
from lpl.order.rng import capture_rng, restore_rng, set_step_rng_state
from lpl.order.replay import check_orders
from lpl.order.store import Recording, parameter_signature
from lpl.utils.errors import LplError
from lpl.utils.loss import eval_mode, loss_weight, module_loss, to_module
from lpl.utils.trainer import metrics_unsynced, single_process
from lpl.utils.weights import state_dict_differences


@dataclass
class RetrainResult:
    """``final_loss``: validation loss after the last step; ``loss_curve`` [L + 1]: validation loss before each step
    and after the last (NaN between points when ``curve_every_n_steps`` > 1); ``seconds``: wall time of training;
    ``batch_losses`` [num_pool_batches]: each pool batch's loss at the end (with ``batch_losses=True``)."""

    final_loss: float
    loss_curve: torch.Tensor
    seconds: float
    batch_losses: torch.Tensor | None = None


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        if module_name == "__main__":
            raise LplError(
                f"cannot import {class_path!r}: the recording was made from a script that defined {name} itself; move "
                "it into an importable module (or run this from that script) to rebuild the run."
            ) from None
        raise LplError(
            f"cannot import {class_path!r}, which the recording names; install the package that defines it."
        ) from None


def rebuild(recording: Any, order: Sequence[int]) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The recording's module (with its initial weights, frozen where the recorded run froze it) and datamodule, set
    to train the pool in ``order``, cut into the recorded run's epochs (``_epochs_of``)."""
    manifest = recording.manifest
    model_info, data_info = manifest.get("model") or {}, manifest.get("datamodule")
    if not model_info.get("class_path") or not data_info:
        raise LplError(
            f"recording {recording.root} does not say how to rebuild its model and datamodule (it was recorded "
            "without a LightningDataModule); record the run with trainer.fit(model, datamodule=...)."
        )
    for info in (model_info, data_info):
        if info.get("hparams_missing"):
            warnings.warn(f"{info['class_path']} stores no hyperparameters, so it is rebuilt with the defaults of "
                          f"{info['hparams_missing']}, whatever the recorded run was given; if they differed, "
                          "retraining is not the recorded run (call self.save_hyperparameters() in its __init__).",
                          stacklevel=3)
        if info.get("hparams_not_stored"):
            raise LplError(
                f"{info['class_path']} hyperparameters {info['hparams_not_stored']} could not be stored as JSON, "
                "so the run cannot be rebuilt; pass them as plain numbers, strings or lists."
            )
    # constructor_hparams: recordings made before LightningCLI's entries were left out at record time still hold them
    model = _build(model_info["class_path"], constructor_hparams(model_info["hparams"]))
    _load_initial_state(model, recording, model_info)
    hparams = constructor_hparams(data_info["hparams"])
    hparams.update(batches=recording.batches, order=_epochs_of(recording, order))
    return model, _build(data_info["class_path"], hparams)


def _build(class_path: str, arguments: dict[str, Any]) -> Any:
    """``class_path(**arguments)``. Arguments its ``__init__`` cannot take are refused saying which; an error raised
    inside ``__init__`` is the class's own and propagates, noted as raised while retraining rebuilt it."""
    cls = _import(class_path)
    problem = rebuild_failure(cls, arguments)
    if problem is not None and {"batches", "order"} <= set(arguments) and not takes_batches_and_order(cls):
        raise LplError(
            f"{class_path} does not take `batches` and `order` ({problem}); retraining needs a DataModule that trains "
            "explicit batches in an explicit order (every lpl DataModule does)."
        )
    if problem is not None:
        raise LplError(
            f"{class_path} cannot be built again from its recorded hyperparameters ({problem}): its self.hparams must "
            "be the arguments of its __init__ (call self.save_hyperparameters() there, unchanged)."
        )
    try:
        return cls(**arguments)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(f"(raised by {class_path}.__init__ while retraining rebuilt it from the recording)")
        raise


def _epochs_of(recording: Any, order: Sequence[int]) -> list[int] | list[list[int]]:
    """``order`` cut where the recorded run's epochs began (steps k * E, E its ``batches_per_epoch``), as one list of
    pool batch ids per epoch, so that every step trains in the epoch it did (``current_epoch``, epoch hooks); the
    flat order when it fits in one epoch or the recording predates E (retrained as one epoch)."""
    steps = [int(i) for i in order]
    per_epoch = recording.manifest.get("batches_per_epoch")
    if not per_epoch or len(steps) <= per_epoch:
        return steps
    return [steps[start : start + per_epoch] for start in range(0, len(steps), per_epoch)]


def _load_initial_state(model: L.LightningModule, recording: Any, model_info: Mapping[str, Any]) -> None:
    """Give the rebuilt ``model`` the recorded run's parameters, initial weights and frozen set, refusing one that
    differs with what differs. Layers a module builds in ``configure_model`` are built first (as Lightning does
    before training), and lazy ones (``nn.LazyLinear``) take their shapes from the loaded weights."""
    if is_overridden("configure_model", model):
        model.configure_model()
    initial = recording.initial_state()
    _check_state_names_and_shapes(model, initial, model_info["class_path"])
    model.load_state_dict(initial)
    frozen = model_info.get("frozen")  # absent from recordings made before it was stored
    if frozen is not None:
        frozen_names = set(frozen)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen_names)
    trainable = [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]
    signature = parameter_signature(trainable)
    if signature["param_hash"] == model_info.get("param_hash"):
        return
    rebuilt = f"{model_info['class_path']} rebuilt from the recording trains {signature['num_params']} values"
    recorded = f"the recorded run trained {model_info.get('num_params')}"
    if frozen is None:
        raise LplError(
            f"{rebuilt}, {recorded}: the recorded run froze or unfroze parameters before training (a frozen backbone, "
            "BackboneFinetuning), and this recording was made before lpl stored which; record the run again with this "
            "version to retrain it.")
    raise LplError(
        f"{rebuilt} in {len(trainable)} tensors, {recorded}: its parameters have the recorded names, shapes and frozen "
        "set, but named_parameters() lists them in another order or shares other ones; the recording was made with "
        "another version of the model's code.")


def _check_state_names_and_shapes(model: torch.nn.Module, initial: Mapping[str, torch.Tensor], class_path: str) -> None:
    """Refuse a rebuilt module whose state_dict does not have the recorded one's names and shapes, naming them
    (a lazy parameter's shape is not checked: loading gives it the recorded one)."""
    state = model.state_dict()
    extra, missing, reshaped = state_dict_differences(state, initial)
    shapes = [f"{name} {list(state[name].shape)} (recorded {list(initial[name].shape)})" for name in reshaped]
    if not (missing or extra or shapes):
        return
    differences = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                   for what, names in (("recorded but not built", missing), ("built but not recorded", extra),
                                       ("other shapes", shapes)) if names]
    raise LplError(
        f"{class_path} built from the recording's hyperparameters does not have the recorded run's parameters and "
        f"buffers ({'; '.join(differences)}): the recording was made for another model or another code version, or "
        "the run changed the module between __init__ and fit (build such layers in __init__ or configure_model)."
    )


def pool_batches(recording: Any, datamodule: L.LightningDataModule) -> list[Any]:
    """Every pool batch of the recording, collated as the datamodule's train loader does (on the CPU)."""
    loader = datamodule.train_dataloader()
    return [collate_samples(loader, batch) for batch in recording.batches]


def validation_loss(
    module: L.LightningModule, loader: Any, forward: Callable[[], Any] = contextlib.nullcontext
) -> float:
    """Sample-weighted mean of ``module_loss`` over ``loader`` in eval mode, each batch in the precision context
    ``forward`` (as the recorder measures it). Leaves no trace: iterating a loader draws from the global RNG, which
    training's next dropout masks come from."""
    rng = capture_rng()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), eval_mode(module):
            for batch in loader:
                batch = to_module(batch, module, training=False)
                size = loss_weight(batch)
                with forward():
                    total += float(module_loss(module, batch)) * size
                count += size
    finally:
        restore_rng(rng)
    if count == 0:
        raise LplError("the validation loader is empty; retraining needs validation data to measure the loss.")
    return total / count


class _LossCurve(L.Callback):
    """Validation loss before every n-th step (the last point is filled in by ``retrain``)."""

    def __init__(self, every: int, steps: int) -> None:
        self.every = every
        self.curve = torch.full((steps + 1,), math.nan, dtype=torch.float64)
        self.loader: Any = None
        self.forward: Callable[[], Any] = contextlib.nullcontext  # the run's precision context

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loader = single_val_loader(trainer.datamodule.val_dataloader())
        self.forward = trainer.precision_plugin.forward_context

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.curve[step] = validation_loss(pl_module, self.loader, self.forward)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info messages off (warnings stay) while the block runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# Trainer settings retraining decides, with the reason: given in trainer_kwargs, they would retrain another run than
# the recorded one without a word (or train other steps than the order's)
_RETRAINING_SETTINGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("precision",), "retraining computes in the recorded run's precision, as its probes did"),
    (("max_steps", "max_epochs", "min_steps", "min_epochs", "max_time", "fast_dev_run"),
     ("the order decides the steps trained (retrain's max_steps stops early), and the module sees the recorded run's "
      "length (Trainer.max_steps, estimated_stepping_batches: the schedules it builds)")),
    (("limit_train_batches", "overfit_batches", "accumulate_grad_batches"),
     "every step trains the order's next batch, in the recorded run's epochs"),
    (("gradient_clip_val", "gradient_clip_algorithm"), "the recorded run did not clip gradients"),
    (("limit_val_batches",),
     ("Lightning's validation between steps draws from the random generators where the recorded run's may not "
      "have, so later dropout masks would differ (retrain measures the loss curve itself: curve_every_n_steps)")),
)


# values of those settings that change nothing (what retraining sets, or what does nothing): accepted
_NEUTRAL_SETTINGS: dict[str, tuple[Any, ...]] = {
    "min_steps": (None,), "min_epochs": (None,), "max_time": (None,), "fast_dev_run": (False, 0),
    "limit_train_batches": (None, 1.0), "overfit_batches": (0, 0.0), "accumulate_grad_batches": (1,),
    "gradient_clip_val": (None, 0, 0.0), "gradient_clip_algorithm": (None,), "limit_val_batches": (0, 0.0),
}


def _check_trainer_kwargs(trainer_kwargs: Mapping[str, Any], recording: Any) -> None:
    """Refuse a setting retraining decides, saying why, unless its value changes nothing."""
    neutral = {**_NEUTRAL_SETTINGS, "precision": (recording.manifest.get("precision", "32-true"),),
               "max_steps": (recording.num_steps,), "max_epochs": (-1,)}
    for keys, reason in _RETRAINING_SETTINGS:
        given = [key for key in keys if key in trainer_kwargs
                 and not any(_same_setting(trainer_kwargs[key], value) for value in neutral.get(key, ()))]
        if given:
            raise LplError(f"trainer_kwargs may not set {given[0]!r} to {trainer_kwargs[given[0]]!r}: {reason}. Leave "
                           "it out: retraining decides it.")


# the short precision names a Trainer accepts for the ones it reports (trainer.precision, as recorded)
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _same_setting(given: Any, neutral: Any) -> bool:
    """``given`` is ``neutral`` as a Trainer reads it (1.0 and 1 alike, precision 32 and "32-true"; None and bools
    only as themselves)."""
    if given is None or neutral is None or isinstance(given, bool) or isinstance(neutral, bool):
        return given is neutral
    if isinstance(neutral, str):
        return _PRECISION_ALIASES.get(str(given), str(given)) == neutral
    return given == neutral


def fit_in_order(
    recording: Any, model: L.LightningModule, datamodule: L.LightningDataModule, steps: int,
    callbacks: list[L.Callback], accelerator: str = "auto", trainer_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """Train ``model`` (from ``rebuild``) for ``steps`` steps under the recording's seed, RNG state, precision and
    schedule; returns the seconds spent. The schedule's length is the recorded number of steps, whatever ``steps``
    is. ``trainer_kwargs`` set the Trainer's other settings (see ``retrain``); their ``callbacks`` run after
    retraining's own and ``callbacks``. The model stays on the device it trained on (Lightning moves it to the CPU at
    the end of ``fit``), so that what is measured after training runs where training ran."""
    import time

    extra = dict(trainer_kwargs or {})
    _check_trainer_kwargs(extra, recording)
    user_callbacks = extra.pop("callbacks", None) or []
    if isinstance(user_callbacks, L.Callback):  # Lightning takes one callback as well as a list
        user_callbacks = [user_callbacks]
    seed = int((recording.manifest.get("datamodule") or {}).get("hparams", {}).get("seed", 0) or 0)
    L.seed_everything(seed, verbose=False)
    datamodule.setup("fit")
    first = [_StopAfter(steps), _RecordedOptimizer(recording), _RecordedRng(recording.rng_states())]
    settings = dict(
        accelerator=accelerator, devices=1, precision=recording.manifest.get("precision", "32-true"),
        max_epochs=-1, max_steps=recording.num_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[*first, *callbacks, *user_callbacks],
    )
    settings.update(extra)
    # an internal one-device Trainer: its banners ("GPU available", tips) would repeat for every order, and a process
    # group a DDP fit left in this process must not split its batches
    with _quiet_lightning(), single_process():
        try:
            trainer = L.Trainer(**settings)
        except (MisconfigurationException, ValueError, ImportError, RuntimeError) as error:  # an accelerator it lacks
            given = f" and trainer_kwargs {sorted(extra)}" if extra else ""
            raise LplError(f"cannot train the recorded model with accelerator={settings['accelerator']!r}{given} "
                           f"here: {error}") from None
        if trainer.num_devices * trainer.num_nodes != 1:
            raise LplError(
                f"retraining runs in one process, but trainer_kwargs ask for {trainer.num_devices * trainer.num_nodes} "
                "devices: each would train its share of every batch with its own dropout masks and BatchNorm "
                "statistics, not the recorded run's whole batches; choose one device (devices=[index] picks which).")
        start = time.perf_counter()
        with metrics_unsynced(model):  # one process: torchmetrics must not gather from a leftover process group
            trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
    model.to(trainer.strategy.root_device)
    if trainer.global_step != steps:
        raise LplError(
            f"retraining stopped after {trainer.global_step} of {steps} steps; check the datamodule's order."
        )
    return seconds


class _RecordedOptimizer(L.Callback):
    """Every step trains with the reference run's learning rate, betas, eps and weight decay at that step: the
    schedule belongs to the step, whatever the order (the module's schedulers, an epoch-stepped one or one on a
    metric retraining never logs, are dropped). The optimizer the module builds must otherwise be the recorded one
    (its eps, weight decay, kind)."""

    def __init__(self, recording: Any) -> None:
        self.steps = recording.manifest.get("steps", [])
        self.recorded = recording.manifest.get("optimizer") or {}
        self.class_path = (recording.manifest.get("model") or {}).get("class_path", "the module")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        group = trained_param_groups(optimizer)[0]  # what the recorder took as the run's
        built = {"name": type(optimizer).__name__, "eps": float(group["eps"]),
                 "weight_decay": float(group["weight_decay"])}
        differing = [f"{key} {built[key]} (recorded {self.recorded[key]})" for key in built
                     if key in self.recorded and not _same(built[key], self.recorded[key])]
        recorded_groups = (self.steps[0].get("group_weight_decay") if self.steps else None) or []
        if len(recorded_groups) > 1 and len(optimizer.param_groups) != len(recorded_groups):
            differing.append(f"{len(optimizer.param_groups)} param group(s) (recorded {len(recorded_groups)}, with "
                             f"weight decays {recorded_groups})")
        if differing:
            raise LplError(
                f"{self.class_path} rebuilt from the recording builds another optimizer than the recorded run's: "
                f"{', '.join(differing)}; its hyperparameters do not rebuild it (call self.save_hyperparameters() in "
                "its __init__ and record again).")
        # the recorded schedule replaces the module's schedulers (which may also need metrics retraining never logs)
        trainer.strategy.lr_scheduler_configs = []
        self._trainer = trainer
        self._hook = optimizer.register_step_pre_hook(self._before_adam_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hook.remove()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()

    def _before_adam_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> Any:
        """Set the recorded values last, as the recorder read them: after the training closure (forward, backward
        and every hook in it, the module's own included), just before Adam's update."""
        closure = kwargs.get("closure")
        if closure is None:  # the closure ran already (a precision plugin that unscales first)
            self._apply(optimizer)
            return None

        def closure_then_recorded_values() -> Any:
            loss = closure()
            self._apply(optimizer)
            return loss

        return args, {**kwargs, "closure": closure_then_recorded_values}

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        step = self._trainer.global_step
        if step >= len(self.steps):
            return
        recorded, groups = self.steps[step], optimizer.param_groups
        decays = recorded.get("group_weight_decay")
        if decays is None and len(groups) == 1 and "weight_decay" in recorded:
            decays = [recorded["weight_decay"]]
        for position, group in enumerate(groups):
            group["lr"] = float(recorded["lr"])
            if "beta1" in recorded:
                group["betas"] = (float(recorded["beta1"]), float(recorded["beta2"]))
            if "eps" in recorded:
                group["eps"] = float(recorded["eps"])
            if decays is not None and len(decays) == len(groups):
                group["weight_decay"] = float(decays[position])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


class _RecordedRng(L.Callback):
    """Steps start from the reference run's RNG states where it stored them (the first step, and steps before which
    its validation or a new epoch drew from the generators): every step then draws the reference's dropout masks."""

    def __init__(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        self.states = states

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        states = self.states.get(trainer.global_step)
        if states is not None:
            set_step_rng_state(states, pl_module.device)


def _check_recorded(recording: Recording, steps: int) -> None:
    """Refuse to retrain steps a stopped run never recorded: they have no recorded learning rate or RNG state, so the
    result would not be the recorded run's."""
    recorded = recording.recorded_steps
    if steps <= recorded:
        return
    shorter = (f", or retrain only the recorded steps (max_steps={recorded} or less, exact: every one of them has its "
               "recorded learning rate and RNG state)") if recorded else ""
    raise LplError(
        f"recording {recording.root} is incomplete (status {recording.status!r}): its run stopped after {recorded} of "
        f"{recording.num_steps} steps, so this order's steps {recorded}..{steps - 1} have no recorded learning rate or "
        f"RNG state; finish the reference run (resume it from a checkpoint with TrainOrderRecorder(..., resume=True))"
        f"{shorter}."
    )


class _StopAfter(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


# what retraining reads besides the manifest: the pool's sample ids, the initial weights, the steps' RNG states
RETRAIN_FILES = ("pool", "initial_state", "rng_state")


def retrain(
    path: str | Path | Recording,
    order: Sequence[int],
    *,
    max_steps: int | None = None,
    curve_every_n_steps: int = 1,
    accelerator: str = "auto",
    batch_losses: bool = False,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> RetrainResult:
    """Train the recorded model again from its initial weights, visiting the pool batches in ``order``.

    The learning-rate schedule is the reference run's (its length is the recorded number of steps, whatever the
    order's length); ``max_steps`` stops early. Step t trains in the epoch it did in the reference run (the order is
    cut at its epochs' boundaries), so epoch hooks and ``current_epoch`` see what they saw; parameters the reference
    run had frozen stay frozen. With the reference order this reproduces the reference run.
    The files retraining reads are checked against their sha256 first; pass an opened ``Recording`` instead of a path
    to retrain many orders with one check. A recording whose run stopped early retrains only orders within the steps
    it recorded (``max_steps`` cuts a longer one).

    ``trainer_kwargs`` set other Trainer arguments (a logger, ``deterministic``, ``devices=[index]``); their
    ``callbacks`` run after retraining's own (one that changes training makes the result another run). Settings that
    would change what is trained are refused unless given the value retraining uses: ``precision`` (the recorded
    one), the loop's length (``max_steps``, ``max_epochs``, ``min_steps``, ``min_epochs``, ``max_time``,
    ``fast_dev_run``: the order sets it, and the module sees the recorded run's), ``limit_train_batches``,
    ``overfit_batches``, ``accumulate_grad_batches`` (each step trains the order's next batch), gradient clipping (the
    recorded run had none), ``limit_val_batches`` (validation between steps draws from the random generators, moving
    later dropout masks) and more than one device (each would train a share of every batch with its own dropout
    masks).

    Example::

        order = Recording.open("runs/ref/recording").order[::-1]   # the recorded order, backwards
        truth = retrain("runs/ref/recording", order=order)
        print(truth.final_loss, truth.loss_curve[-1])
    """
    recording = path if isinstance(path, Recording) else Recording.open(path)
    orders = check_orders(order, len(recording.batches), recording.num_steps)
    if orders.shape[0] != 1:
        raise LplError(f"retrain takes one order (a list of pool batch ids), got {orders.shape[0]}; call it per order.")
    order_tensor = orders[0]
    if max_steps is not None:
        if not 0 < max_steps <= order_tensor.numel():
            raise LplError(f"max_steps must be between 1 and the order's {order_tensor.numel()} steps, got "
                           f"{max_steps}.")
        order_tensor = order_tensor[:max_steps]
    if curve_every_n_steps <= 0:
        raise LplError(f"curve_every_n_steps must be positive, got {curve_every_n_steps}.")
    steps = int(order_tensor.numel())
    _check_recorded(recording, steps)
    recording.verify(RETRAIN_FILES)  # after the cheap checks: a damaged file would give another "ground truth"
    model, datamodule = rebuild(recording, order_tensor.tolist())
    curve = _LossCurve(curve_every_n_steps, steps)
    seconds = fit_in_order(recording, model, datamodule, steps, [curve], accelerator, trainer_kwargs)
    curve.curve[steps] = validation_loss(model, single_val_loader(datamodule.val_dataloader()), curve.forward)
    ends = None
    if batch_losses:
        ends = torch.tensor([validation_loss(model, [batch], curve.forward)
                             for batch in pool_batches(recording, datamodule)])
    return RetrainResult(final_loss=float(curve.curve[steps]), loss_curve=curve.curve, seconds=seconds,
                         batch_losses=ends)
