"""OrderEstimator: estimate what training with another sample order would give, from a recording, without training.

The math lives in ``lpl.order.replay`` (pure functions); this module is the Lightning adapter and the loader that
turns a recording (``lpl.order.Recording``) into the replay's stacked tensors.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from lpl.order.linearized import LinearizedRun, linearized_from_tensors
from lpl.order.replay import ReplayData, ReplayResult, as_orders, check_method, replay
from lpl.utils.errors import LplError
from lpl.utils.loggers import is_wandb
from lpl.utils.stats import rank_correlation

_LINEARIZED = "linearized_"  # buffer-name prefix of the linearised replay's tensors

# per-batch names the replay reads from every probe
_REQUIRED_BATCH = ("update", "precond_grad", "grad", "loss")


@dataclass
class OrderEstimate:
    """What one order is estimated to give.

    ``final_loss``: validation loss after the last step; ``loss_curve`` [L + 1]: validation loss before each step and
    after the last; ``batch_losses`` [num_batches]: each pool batch's own loss at the end (memorisation).
    """

    final_loss: float
    loss_curve: Tensor
    batch_losses: Tensor


def _split(result: ReplayResult) -> list[OrderEstimate]:
    return [
        OrderEstimate(float(result.final_loss[i]), result.loss_curve[i].cpu(), result.batch_losses[i].cpu())
        for i in range(result.final_loss.shape[0])
    ]


def check_complete(recording: Any) -> None:
    """Refuse a recording whose run stopped before its final probe (every estimate reads it), or whose probes lack
    what every estimate reads."""
    probe_steps = list(recording.probe_steps)
    num_steps = int(recording.num_steps)
    if not probe_steps or probe_steps[-1] != num_steps:
        raise LplError(
            f"recording {getattr(recording, 'root', '')} has no final probe at step {num_steps} (its last probes: "
            f"{probe_steps[-3:]}); it is incomplete: finish the reference run (resume it from a checkpoint with "
            "TrainOrderRecorder(..., resume=True)) or record it again."
        )
    first = recording.step(probe_steps[0])
    missing = [name for name in _REQUIRED_BATCH + ("val_loss", "val_grad") if name not in first]
    if missing:
        raise LplError(
            f"recording lacks {', '.join(missing)}; it was made by an incompatible recorder version: record again."
        )


def replay_data_from_recording(recording: Any) -> ReplayData:
    """Stack a ``lpl.order.Recording``'s probes into ``ReplayData`` (tensors stay float16 as stored until used)."""
    check_complete(recording)
    probe_steps = list(recording.probe_steps)
    num_steps = int(recording.num_steps)
    steps = [recording.step(t) for t in probe_steps]

    def stack(name: str) -> Tensor | None:
        if name not in steps[0]:
            return None
        return torch.stack([torch.as_tensor(step[name]) for step in steps])

    manifest = recording.manifest
    adam = manifest.get("optimizer", {})
    swap_tables = swap_curvature = linearized = None
    sensitivity = recording.sensitivity() if callable(getattr(recording, "sensitivity", None)) else None
    if sensitivity is not None:
        tensors, info = sensitivity
        linearized = linearized_from_tensors(tensors, info.get("linearized", {}))
        if linearized is not None and (linearized.num_steps != num_steps
                                       or linearized.pool_grads.shape[1] != len(recording.batches)):
            raise LplError(f"the linearised replay data of {recording.root} do not match the recording; build them "
                           "again with record_sensitivities.")
        swap_tables, swap_curvature = tensors.get("tables"), tensors.get("curvature")
        expected = (num_steps, len(recording.batches))
        if swap_tables is None or swap_curvature is None or tuple(swap_tables.shape[1:]) != expected or (
            swap_curvature.numel() != swap_tables.shape[0] - 1
        ):
            raise LplError(
                f"the sensitivity tables of {recording.root} do not match the recording (expected [1 + m, "
                f"{expected[0]}, {expected[1]}]); build them again with record_sensitivities."
            )
    try:  # Recording.open checked these; other recording objects may hold anything
        lr = torch.as_tensor(recording.scalars["lr"], dtype=torch.float64)[:num_steps]
        betas = tuple(float(b) for b in adam.get("betas", (0.9, 0.999)))
        weight_decay = float(adam.get("weight_decay", 0.0))
    except (KeyError, TypeError, ValueError) as error:
        raise LplError(f"recording {getattr(recording, 'root', '')} holds unreadable learning rates or Adam settings "
                       f"({type(error).__name__}: {error}); its manifest was edited or damaged: record again."
                       ) from None
    if len(betas) != 2 or lr.numel() != num_steps:
        raise LplError(f"recording {getattr(recording, 'root', '')} holds {lr.numel()} learning rates for {num_steps} "
                       f"steps and betas {betas}; its manifest was edited or damaged: record again.")
    return ReplayData(
        probe_steps=torch.tensor(probe_steps),
        lr=lr,
        reference_order=torch.as_tensor(list(recording.order), dtype=torch.long)[:num_steps],
        betas=betas,
        weight_decay=weight_decay,
        decoupled=bool(adam.get("decoupled", True)),
        weight_decay_per_group=bool(adam.get("weight_decays")),
        update=stack("update"),
        precond_grad=stack("precond_grad"),
        grad=stack("grad"),
        loss=stack("loss"),
        val_loss=stack("val_loss").reshape(len(probe_steps)),
        val_grad=stack("val_grad").reshape(len(probe_steps), -1),
        curv_basis=stack("curv_basis"),
        curv_update=stack("curv_update"),
        curv_precond=stack("curv_precond"),
        val_dot_update=stack("val_dot_update"),
        val_dot_precond=stack("val_dot_precond"),
        val_curv_basis=steps[-1].get("val_curv_basis"),
        val_curv_matrix=steps[-1].get("val_curv_matrix"),
        swap_tables=swap_tables,
        swap_curvature=swap_curvature,
        linearized=linearized,
    )


def _steadier(method: str) -> str:
    """What to try when ``method``'s replay diverges."""
    smaller_lr = "a recording with smaller learning rates"
    if method == "zeroth_order":  # the steadiest: only the run itself can change
        return smaller_lr[0].upper() + smaller_lr[1:]
    others = " or ".join(repr(m) for m in ("first_order", "zeroth_order") if m != method)
    return f"A steadier method ({others}) or {smaller_lr}"


def _check_run_finite(recording: Any) -> None:
    """Refuse a recording of a run that diverged: every estimate linearises about its weights, NaN from there on."""
    losses = recording.probe_scalars["val_loss"]
    bad = [t for t, loss in zip(recording.probe_steps, losses) if not math.isfinite(float(loss))]
    if bad:
        raise LplError(f"the recorded run of {recording.root} diverged: its validation loss is not finite from step "
                       f"{bad[0]} on, so no order can be estimated from it. Record a run that trains stably (a lower "
                       "learning rate, or float32 / bf16-mixed instead of 16-true precision).")


def _warn_if_sensitivity_failed_its_check(recording: Any, method: str) -> None:
    """Repeat record_sensitivities' verdicts on ``method``: its estimates against the random orders it retrained,
    and (linearized) the reference order's own replay."""
    from lpl.order.adjoint import REPLAY_DRIFT_TOLERANCE, check_errors, misses_more_than_no_change

    info = recording.manifest.get("sensitivity") or {}
    drift = info.get("reference_replay_drift")
    if method == "linearized" and drift is not None and drift > REPLAY_DRIFT_TOLERANCE:
        warnings.warn(
            f"the reference order of {recording.root} replays {drift:.2%} of the distance trained away from itself: "
            "the stored gradients are not the ones training fed Adam, and every 'linearized' estimate carries that "
            "error (see the warning record_sensitivities gave).",
            stacklevel=3,
        )
    reference_loss = float(recording.probe_scalars["val_loss"][-1])
    verdict = check_errors(info.get("checks") or [], reference_loss, method)
    if verdict is not None and misses_more_than_no_change(*verdict, reference_loss):
        warnings.warn(
            f"method {method!r} missed the {len(info.get('checks') or [])} retrained check orders of "
            f"{recording.root} by {verdict[0]:.4g} on average, more than predicting the reference loss does "
            f"({verdict[1]:.4g}): it does not hold for this run, as far as so few orders tell (`lpl check-methods` "
            "scores it on more).",
            stacklevel=3,
        )


class OrderEstimator(L.LightningModule):
    """Estimates validation loss, loss curve and per-batch losses of any order of the recorded pool batches.

    Example::

        estimator = OrderEstimator.from_recording("runs/order_rec", method="adam_first_order")
        estimate = estimator.estimate(estimator.reference_order.flip(0).tolist())   # the recorded order, backwards
        print(estimate.final_loss, estimate.loss_curve[-5:])
        # many orders at once, batched on the trainer's device:
        loader = DataLoader(torch.stack([torch.randperm(estimator.num_batches) for _ in range(256)]), batch_size=64)
        estimates = [e for batch in Trainer(logger=False).predict(estimator, loader) for e in batch]
        # under DDP each rank predicts (and returns) its DistributedSampler share of the orders: rank r gets orders
        # r, r + W, r + 2W, ... of W processes, and every rank needs at least one (Lightning's sampler asserts it)

    ``method``: "zeroth_order" (the update term of the training-order paper, arXiv 2505.22042, with no correction),
    "first_order" (its FUT: per-batch first-order curvature correction), "second_order" (its FUT++), "adam" (each
    order's own Adam momentum, rebuilt exactly from
    projected preconditioned gradients), "adam_first_order" (adam plus the curvature correction), "linearized" (each
    order trained again by Adam in full space on gradients linearised about the reference run: the most accurate
    where the linearisation holds) or "adjoint" (the final loss from exact sensitivity tables; complete orders
    only). The last two need the full-space data that ``lpl.order.record_sensitivities`` adds to a recording (CLI
    `lpl sensitivity`); it checks them against two retrained orders, and loading warns when they failed that check.
    The adam variants read each batch's preconditioned gradient with the reference run's second moment and keep it in
    the rebuilt momentum: where a coordinate's second moment is near zero (embeddings of rare tokens, say) that term
    is up to sqrt(t) times what Adam really applies later, and on the demo LM their estimates diverge; the paper's
    update-term methods (``zeroth_order``, ``first_order``) stay finite there but can still land far off (estimates
    far outside the losses the reference run went through warn): check a method with ``check_methods`` first.
    ``quadratic`` adds 1/2 Delta^T H_val Delta to the linearised validation loss when the recording holds the
    validation curvature (``TrainOrderRecorder(val_curvature_rank=m)``).
    """

    def __init__(self, data: ReplayData, method: str = "first_order", control_variates: bool = True,
                 quadratic: bool = True) -> None:
        super().__init__()
        check_method(data, method)
        self.method = method
        self.control_variates = control_variates
        self.quadratic = quadratic
        self._scalars = {"betas": data.betas, "weight_decay": data.weight_decay, "decoupled": data.decoupled,
                         "weight_decay_per_group": data.weight_decay_per_group}
        self._tensor_names = self._register(data, "")
        self._linearized_scalars = None
        self._warned_far = False  # estimates far outside the run's losses: warned once per estimator
        if data.linearized is not None:  # its tensors become buffers too, so they follow the module's device
            self._linearized_scalars = {k: v for k, v in vars(data.linearized).items() if not isinstance(v, Tensor)}
            self._linearized_names = self._register(data.linearized, _LINEARIZED)

    def _register(self, fields: Any, prefix: str) -> list[str]:
        names = []
        for name, value in vars(fields).items():
            if isinstance(value, Tensor):
                self.register_buffer(prefix + name, value, persistent=False)
                names.append(name)
        return names

    @classmethod
    def from_recording(
        cls, path: str | Path, method: str = "first_order", control_variates: bool = True, model: Any = None,
        quadratic: bool = True,
    ) -> "OrderEstimator":
        """Open and verify the recording at ``path``; with ``model``, also check it was recorded for that model."""
        from lpl.order.store import Recording

        recording = Recording.open(path)
        recording.verify()
        _check_run_finite(recording)
        if model is not None:
            check_recording_matches_model(recording, model)
        if method in ("adjoint", "linearized"):
            _warn_if_sensitivity_failed_its_check(recording, method)
        return cls(replay_data_from_recording(recording), method=method, control_variates=control_variates,
                   quadratic=quadratic)

    @property
    def data(self) -> ReplayData:
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        for optional in ("curv_basis", "curv_update", "curv_precond", "val_dot_update", "val_dot_precond",
                         "val_curv_basis", "val_curv_matrix"):
            tensors.setdefault(optional, None)
        linearized = None
        if self._linearized_scalars is not None:
            linearized = LinearizedRun(**{name: getattr(self, _LINEARIZED + name) for name in self._linearized_names},
                                       **self._linearized_scalars)
        return ReplayData(**tensors, **self._scalars, linearized=linearized)

    @property
    def num_batches(self) -> int:
        return int(self.update.shape[1])

    @property
    def num_steps(self) -> int:
        return int(self.lr.numel())

    @property
    def reference_loss(self) -> float:
        """The reference run's final validation loss (the "no change" prediction)."""
        return float(self.val_loss[-1])

    def estimate_many(self, orders: Tensor | Sequence[Sequence[int]] | Sequence[Tensor]) -> ReplayResult:
        """Batched estimates for ``orders`` [N, L] (all of one length): a tensor, an array, or a list of orders."""
        device_type = self.data.update.device.type
        with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext():
            result = replay(self.data, as_orders(orders), self.method, self.control_variates, self.quadratic)
        diverged = ~torch.isfinite(result.final_loss)
        if diverged.any():
            warnings.warn(
                f"OrderEstimator: the {self.method!r} replay diverged (non-finite loss) for {int(diverged.sum())} of "
                f"{len(diverged)} orders: its corrections grow without bound along them. {_steadier(self.method)} fits "
                "better.", stacklevel=2)
        self._warn_if_far_outside_the_run(result.final_loss[~diverged])
        return result

    def _warn_if_far_outside_the_run(self, finals: Tensor) -> None:
        """Any reordering ends near where the reference run went: an estimate farther from the run's validation
        losses than the whole run moved is the method extrapolating past where it holds (a cross-entropy of -19)."""
        if self._warned_far:  # once per estimator: a search calls this thousands of times
            return
        outside = self.far_outside_the_run(finals)
        if outside.any():
            self._warned_far = True
            low, high = float(self.val_loss.min()), float(self.val_loss.max())
            warnings.warn(
                f"OrderEstimator: {int(outside.sum())} of {len(finals)} '{self.method}' estimates (e.g. "
                f"{float(finals[outside][0]):.4g}) lie far outside the validation losses the reference run went "
                f"through ({low:.4g} to {high:.4g}): the method extrapolates beyond where it holds for this run. "
                "Check the methods against retraining (`lpl check-methods`) before trusting these estimates.",
                stacklevel=3)

    def far_outside_the_run(self, finals: Tensor) -> Tensor:
        """Which of the estimated final losses ``finals`` lie farther from the run's validation losses than the
        whole run moved (bool, same shape)."""
        low, high = float(self.val_loss.min()), float(self.val_loss.max())
        margin = max(high - low, 0.05 * max(abs(low), abs(high)))  # a run that barely moved still has some room
        if margin == 0:
            return torch.zeros_like(finals, dtype=torch.bool)
        return (finals < low - margin) | (finals > high + margin)

    def estimate(self, order: Sequence[int] | Tensor) -> OrderEstimate:
        """Estimate for one order: a sequence of pool batch ids (a permutation, or repeats and omissions)."""
        orders = as_orders(order)
        if orders.ndim != 1:
            raise LplError(f"estimate() takes one order (a 1-D list of batch ids), got shape {tuple(orders.shape)}.")
        return _split(self.estimate_many(orders[None]))[0]

    def forward(self, orders: Tensor) -> ReplayResult:
        return self.estimate_many(orders)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[OrderEstimate]:
        orders = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 1 else batch
        if isinstance(orders, (list, tuple)) and orders and all(isinstance(o, Tensor) and o.ndim == 1 for o in orders):
            # whole orders (a collate_fn such as list; of several lengths they cannot be positions), or what torch's
            # default collation makes of Python lists of orders: L tensors of B ids, one per position
            if len({len(o) for o in orders}) > 1 or self._custom_predict_collation(dataloader_idx):
                return [estimate for order in orders for estimate in _split(self.estimate_many(order[None]))]
            raise LplError(
                "the predict loader yields a list of 1-D tensors of one length: what torch's default collation makes "
                "of Python lists of orders, one tensor per position, which would be read as other orders. Give the "
                "loader the orders as one tensor [N, L] (DataLoader(torch.tensor(orders), batch_size=...)), and "
                "orders of several lengths with batch_size=1 or collate_fn=list.")
        return _split(self.estimate_many(orders))

    def _custom_predict_collation(self, dataloader_idx: int) -> bool:
        """Whether the Trainer's predict loader collates with a collate_fn of its own (not torch's default_collate);
        False outside a Trainer's predict."""
        trainer = self._trainer
        loaders = getattr(trainer, "predict_dataloaders", None) if trainer is not None else None
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        collate = getattr(loader, "collate_fn", None)
        return collate is not None and collate is not torch.utils.data.default_collate

    def on_predict_start(self) -> None:
        precision = str(self.trainer.precision)
        if precision not in ("32-true", "32"):
            raise LplError(f"OrderEstimator computes in float32; predict with Trainer(precision='32-true') (got "
                           f"{precision!r}, which would cast or autocast the replay and change the estimates).")


def agreement(estimated: Tensor | Sequence[float], true: Tensor | Sequence[float]) -> dict[str, float]:
    """Spearman and Pearson correlation and mean absolute error of estimated vs true losses (NaN correlations
    when either side is constant)."""
    estimated = torch.as_tensor(estimated).detach().cpu().double().reshape(-1)
    true = torch.as_tensor(list(true) if not isinstance(true, Tensor) else true).detach().cpu().double().reshape(-1)
    if true.shape != estimated.shape:
        raise LplError(f"truth has {true.numel()} losses for {estimated.numel()} estimates; give one per order.")
    pearson = torch.corrcoef(torch.stack([estimated, true]))[0, 1]
    constant = bool(estimated.min() == estimated.max()) or bool(true.min() == true.max())
    spearman = float("nan") if constant else rank_correlation(estimated, true)
    return {"spearman": spearman, "pearson": float(pearson), "mae": float((estimated - true).abs().mean())}


def log_estimates(
    logger: Any, result: ReplayResult, truth: Sequence[float] | None = None, *, prefix: str = "order", step: int = 0
) -> dict[str, float]:
    """Log estimates through a Lightning logger (no-op without one): agreement metrics when ``truth`` (retrained
    final losses) is given, and with a W&B logger an estimated-vs-true scatter and the estimated loss curves."""
    estimated = result.final_loss.detach().cpu().double()
    summary = {f"{prefix}/estimated_final_loss_mean": float(estimated.mean())}
    if truth is not None:
        summary.update({f"{prefix}/{name}": value for name, value in agreement(estimated, truth).items()})
    if logger is None:
        return summary
    logger.log_metrics(summary, step=step)
    experiment = getattr(logger, "experiment", None)
    if is_wandb(logger) and experiment is not None:
        import wandb

        if truth is not None:
            table = wandb.Table(data=[[float(e), float(t)] for e, t in zip(estimated, truth)],
                                columns=["estimated", "true"])
            experiment.log({f"{prefix}/estimated_vs_true": wandb.plot.scatter(table, "true", "estimated")})
        curves = result.loss_curve.detach().cpu()[:20]
        experiment.log({f"{prefix}/loss_curves": wandb.plot.line_series(
            xs=list(range(curves.shape[1])), ys=curves.tolist(), keys=[f"order {i}" for i in range(len(curves))],
            title="estimated validation loss", xname="step")})
    return summary


def check_recording_matches_model(recording: Any, model: Any) -> None:
    """Raise LplError when ``recording`` was made for a model whose trainable parameter names or shapes differ."""
    from lpl.order.store import parameter_signature

    if not isinstance(model, torch.nn.Module):
        raise LplError(f"model must be the module the recording was made for (an nn.Module, e.g. a LightningModule "
                       f"instance), got {type(model).__name__} {model!r:.40}.")
    recorded = recording.manifest.get("model") or {}
    signature = parameter_signature((n, p.shape) for n, p in model.named_parameters() if p.requires_grad)
    if signature["param_hash"] != recorded.get("param_hash"):
        raise LplError(
            f"recording {recording.root} was made for another model ({recorded.get('class_path', '?')}, "
            f"{recorded.get('num_params', '?')} trainable parameters); this {type(model).__name__} has "
            f"{signature['num_params']} (or other names/shapes). Use this model's recording, or record it."
        )


__all__ = [
    "OrderEstimate", "OrderEstimator", "replay_data_from_recording", "check_recording_matches_model", "log_estimates",
    "agreement",
]
