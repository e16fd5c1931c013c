"""BlockPruneCallback: prune a (pretrained) LightningModule with calibration batches, then fine-tune with masks
fixed."""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lpl.utils.trainer import (check_replicated_strategy, fit_val_loaders, restore_loader_position,
                               weight_averaging_callbacks)
from lpl.prune.api import check_options, prune_model, pruned_block_shares, refuse_exported, selected_layers
from lpl.prune.hardware import HardwareProfile
from lpl.prune.blocks import parse_block_size
from lpl.prune.importance import model_inputs
from lpl.prune.masking import MaskHandle, apply_masks, has_masks
from lpl.prune.result import PruneResult
from lpl.utils.errors import LplError, checked_count
from lpl.utils.loggers import is_wandb
from lpl.utils.loss import check_module_loss, eval_mode, loss_weight, module_loss, to_module


class BlockPruneCallback(Callback):
    r"""Hardware-aware post-training block pruning inside ``Trainer.fit``.

    At fit start (or after ``prune_after_steps`` training steps, for "train then prune" in one run) it prunes the
    module with ``calib_batches`` batches from the training data (``lpl.prune.prune_model``; under DDP statistics
    are all-reduced and every rank gets the same masks); the rest of ``fit`` fine-tunes with the masks fixed
    (weights, gradients and optimizer state of pruned blocks stay zero), optionally distilling from the dense model
    (``distill=True`` needs a module with ``set_teacher(module)`` and its network in ``.model``, as
    ``lpl.models.ViTClassifier``). The PruneResult is stored in checkpoints and re-applied on resume. As soon as it
    applies, and again at fit end with the fine-tuned figures, it logs the result (scalars to every logger; W&B also
    gets per-layer density / latency / energy and distortion curves, once) and saves it as ``prune_result/`` beside
    the checkpoints (or at ``result_path``). One BlockPruneCallback per Trainer (include every layer group in it),
    and weight averaging (StochasticWeightAveraging, EMA) only with masks applied at fit start (prune_after_steps=0
    or ``result``): other combinations are refused (a second BlockPruneCallback by Lightning when the Trainer is
    built, the rest at fit start).
    ``prune_after_steps`` counts optimizer steps (a module stepping two optimizers per batch takes two per batch).

    Example::

        trainer = L.Trainer(max_epochs=2, callbacks=[BlockPruneCallback(flops_keep=0.5, distill=True)])
        trainer.fit(ViTClassifier(..., pretrained_path="dense.safetensors"), datamodule=MNIST5kDataModule())

    Args:
        block_size, flops_keep, importance, allocation, lambda_power, min_density, max_density, include, exclude:
            as in ``prune_model``.
        cost_model: a HardwareProfile, the path of a saved one (JSON), or None for the analytic default.
        calib_batches: number of training batches used for calibration (read without changing the batches
            training sees after it; an epoch with fewer gives what it has, with a warning).
        stages, first_order: as in ``prune_model`` (calibration rounds; taylor2's gradient term).
        distill: fine-tune against the dense model's logits (soft distillation).
        prune_after_steps: prune after this many optimizer steps (0: at fit start, on the loaded weights).
        evaluate: report validation loss/accuracy of the dense, pruned and fine-tuned model (on the fit's validation
            data, as many batches as ``limit_val_batches`` allows; nothing without validation data).
        result_path: where to save the PruneResult (default: ``<checkpoint dir>/prune_result``).
        result: a PruneResult (or the folder of a saved one) to apply instead of pruning: fine-tune given masks.
    """

    def __init__(
        self,
        block_size: int | tuple[int, int] = (16, 16),
        flops_keep: float = 0.5,
        importance: str = "taylor2",
        allocation: str = "hardware",
        lambda_power: float = 1.0,
        min_density: float = 0.05,
        max_density: float = 1.0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        cost_model: HardwareProfile | str | None = None,
        calib_batches: int = 32,
        stages: int = 2,
        first_order: bool = False,
        distill: bool = False,
        prune_after_steps: int = 0,
        evaluate: bool = True,
        result_path: str | None = None,
        result: PruneResult | str | None = None,
    ) -> None:
        super().__init__()
        flops_keep, lambda_power, min_density, max_density = check_options(
            flops_keep, importance, allocation, lambda_power, min_density, max_density, stages)
        self.options = dict(
            block_size=parse_block_size(block_size), flops_keep=flops_keep, importance=importance,
            allocation=allocation,
            lambda_power=lambda_power, min_density=min_density, max_density=max_density,
            include=list(include) if include is not None else None,
            exclude=list(exclude) if exclude is not None else None, stages=stages,
            first_order=first_order,
        )
        self.cost_model = HardwareProfile.load(cost_model) if isinstance(cost_model, (str, Path)) else cost_model
        self.calib_batches = checked_count("calib_batches", calib_batches, 1)
        self.distill = distill
        self.prune_after_steps = checked_count("prune_after_steps", prune_after_steps, 0)
        self.evaluate = evaluate
        self.result_path = result_path
        self.result = PruneResult.load(result) if isinstance(result, (str, Path)) else result
        self._given = self.result  # the user's masks (None: prune), whatever a checkpoint or an earlier fit left
        self.metrics: dict[str, float] = {}
        self._handle: MaskHandle | None = None

    # ---- hooks -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # What to do follows from the weights: a resumed run, or another fit of a model this callback pruned, has
        # its pruned blocks at zero already; a result restored by validate/test from some checkpoint, which the
        # (dense) model in hand does not carry, is dropped.
        _check_trainer(self, trainer)
        if self.result is None and self._given is None:  # under ddp_spawn an earlier fit's result is only on disk
            self.result = self._saved_result(trainer)
        if self.result is not None and self._pruned_already(pl_module):
            self._continue(trainer, pl_module)
        elif self._given is not None:  # the user's masks on a dense model: it can teach its pruned self
            self.result = self._given
            if self.distill:
                self._set_teacher(pl_module)
            self._apply(trainer, pl_module)
            self._publish(trainer)
        else:
            self.result, self.metrics = None, {}
            if has_masks(pl_module):  # pruning further to a smaller budget is allowed, but say what it means
                rank_zero_warn(
                    f"BlockPruneCallback: {type(pl_module).__name__} carries block masks already (apply_masks, or "
                    "another BlockPruneCallback's fit), so this prunes the pruned model again: its 'dense' figures are "
                    "the masked model's, and a layer given more blocks than before keeps some zeroed ones. To "
                    "fine-tune with the earlier masks, pass result=<that PruneResult> (or its saved folder).")
            self._warn_pruned_by_an_unseen_fit(trainer, *self._check_early(pl_module))
            if self.prune_after_steps == 0:
                self._prune(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_loader_position(trainer)
        # read here, not at fit start: reading it before a resumed checkpoint is restored loses the loader's position
        total = trainer.estimated_stepping_batches
        if self.result is None and total < self.prune_after_steps:  # say so now, not after the whole run
            rank_zero_warn(
                f"BlockPruneCallback: training ends after {total} steps, before prune_after_steps="
                f"{self.prune_after_steps}: nothing will be pruned. Lower prune_after_steps or train longer "
                "(max_steps / max_epochs)."
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.result is None and trainer.global_step >= self.prune_after_steps:
            self._prune(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.result is None:
            rank_zero_warn(f"BlockPruneCallback: training stopped at step {trainer.global_step}, before "
                           f"prune_after_steps={self.prune_after_steps}: the model was not pruned.")
            return
        if self.evaluate:
            self.metrics.update(self._evaluate(trainer, pl_module, "finetuned"))
        self._log(trainer)
        self._save(trainer)
        rank_zero_info(f"BlockPruneCallback: kept {self.result.flops_keep:.3f} of the prunable FLOPs, predicted "
                       f"speedup {self.result.predicted_speedup:.2f}x{self._format_metrics()}")

    def state_dict(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        tensors, meta = self.result.to_state()
        return {"tensors": tensors, "meta": meta, "metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.result = PruneResult.from_state(state_dict["tensors"], state_dict["meta"])
            self.metrics = dict(state_dict.get("metrics", {}))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_evaluated_weights(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_evaluated_weights(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_evaluated_weights(trainer, pl_module)

    # ---- steps -------------------------------------------------------------------------------------------------
    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate:
            self.metrics.update(self._evaluate(trainer, pl_module, "dense"))
        if self.distill:
            self._set_teacher(pl_module)
        self.result = prune_model(pl_module, self._calibration_batches(trainer, pl_module),
                                  cost_model=self.cost_model, **self.options)
        self._apply(trainer, pl_module)
        if self.evaluate:
            self.metrics.update(self._evaluate(trainer, pl_module, "pruned"))
        self._publish(trainer)  # prune_model warned if the cost model predicts the pruned layers slower than dense
        rank_zero_info(
            f"BlockPruneCallback: kept {self.result.flops_keep:.3f} of the prunable FLOPs, predicted speedup "
            f"{self.result.predicted_speedup:.2f}x, energy ratio {self.result.predicted_energy_ratio:.2f} "
            f"({self.result.prune_seconds:.1f} s){self._format_metrics()}"
        )

    @staticmethod
    def _set_teacher(pl_module: L.LightningModule) -> None:
        """The dense network, copied before pruning, as the distillation teacher."""
        _check_can_distill(pl_module)
        pl_module.set_teacher(copy.deepcopy(pl_module.model))

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle = apply_masks(pl_module, self.result, optimizers=trainer.optimizers)

    def _check_early(self, pl_module: L.LightningModule) -> tuple[dict[str, Any], tuple[int, int]]:
        """Refuse include/exclude patterns that match no layer, a block larger than a selected layer, a module whose
        loss calibration cannot probe (manual optimization without ``loss``), or distill=True on a module that cannot
        take a teacher, or an exported model, now rather than after the training before prune_after_steps; returns
        the selected layers and block size."""
        check_module_loss(pl_module)
        if self.distill:
            _check_can_distill(pl_module)
        refuse_exported(pl_module)
        options = self.options
        with warnings.catch_warnings():  # what the selection warns of is said when pruning
            warnings.simplefilter("ignore")
            return selected_layers(pl_module, options["include"], options["exclude"], options["block_size"])

    def _warn_pruned_by_an_unseen_fit(self, trainer: L.Trainer, layers: dict[str, Any],
                                      block_size: tuple[int, int]) -> None:
        """Under ddp_spawn / ddp_fork the processes of an earlier fit kept its result and masks: the model comes back
        with zero blocks and nothing else, and this fit prunes it again (saved beside another Trainer's checkpoints,
        the earlier result is not found). Say so where whole zero blocks suggest it."""
        if not _spawns_processes(trainer):
            return
        pruned, zero_blocks, _ = pruned_block_shares(layers, block_size)
        if pruned:
            rank_zero_warn(
                f"BlockPruneCallback: the model holds whole blocks of zeros ({zero_blocks:.0%} of its {block_size[0]}x"
                f"{block_size[1]} blocks, e.g. in {sorted(pruned)[:2]}), as a model pruned by an earlier fit does. "
                "With processes the Trainer starts itself (ddp_spawn, ddp_fork), that fit's result stayed in them and "
                f"in its own prune_result folder (none at {self._result_dir(trainer)}), so this fit prunes the pruned "
                "model again. To fine-tune under the earlier masks instead, pass result='<that run>/prune_result' (or "
                "give both fits one result_path).")

    def _pruned_already(self, pl_module: L.LightningModule) -> bool:
        try:
            return self.result.is_applied(pl_module)
        except LplError:
            if self.result is self._given:
                raise
            return False  # a result restored from another model's checkpoint: it does not describe this one

    def _saved_result(self, trainer: L.Trainer) -> PruneResult | None:
        """The result this callback saved in an earlier fit with these options, if any (under ddp_spawn the
        spawned processes kept it, not this one); on_fit_start takes it only where the model carries it."""
        folder = self._result_dir(trainer)
        if not (folder / "result.json").is_file():
            return None
        try:
            saved = PruneResult.load(folder)
        except LplError:
            return None
        same = (tuple(saved.block_size) == tuple(self.options["block_size"])
                and abs(saved.target_flops_keep - self.options["flops_keep"]) < 1e-9)
        return saved if same else None

    def _continue(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fine-tune a model that is pruned already (a resume, or another fit): masks again, no new teacher."""
        if self.distill and getattr(pl_module, "teacher", None) is None:
            rank_zero_warn(
                "BlockPruneCallback: the model is pruned already (its pruned blocks are zero: a resumed run, or "
                "weights loaded from a pruned checkpoint), so there is no dense model to distil from; fine-tuning "
                "without distillation. To distil, start from the dense weights with result=... .")
        self._apply(trainer, pl_module)

    def _publish(self, trainer: L.Trainer) -> None:
        """Save and log the result as soon as it applies (again at fit end, with the fine-tuned figures): a run
        that stops while fine-tuning keeps its masks and its figures."""
        self._save(trainer)
        self._log(trainer, charts=True)

    def _save(self, trainer: L.Trainer) -> None:
        # a fast_dev_run is a dry run (Lightning saves no checkpoint then): it must not replace the real run's result
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self.result.save(self._result_dir(trainer))

    def _check_evaluated_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Outside fit, say so when the weights evaluated are not the pruned ones (``ckpt_path="best"`` picking a
        checkpoint from before pruning, say). A new process (``lpl test``) knows the masks from the result the fit
        saved beside its checkpoints."""
        if trainer.state.fn == "fit":
            return
        # a new process knows the masks only from the saved result, which speaks of a checkpoint's weights only
        result = self.result or (self._saved_result(trainer) if trainer.ckpt_path else None)
        if result is None:
            return
        try:
            pruned = result.is_applied(pl_module)
        except LplError:
            if result is not self.result:
                return  # the saved result describes another model (other layers or shapes): nothing to compare
            pruned = False
        if not pruned:
            stage = getattr(trainer.state.stage, "value", trainer.state.stage)
            rank_zero_warn(
                f"BlockPruneCallback: the weights being run ({stage}) are not pruned by this callback's masks (the "
                "checkpoint evaluated was probably saved before pruning, e.g. ckpt_path='best' with a metric the "
                "dense model scored best on): these figures are the dense model's. Evaluate a checkpoint saved "
                "after pruning (ckpt_path='last').")

    def _calibration_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
        if trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        else:  # a loader passed to fit(): Lightning has not built it yet at fit start
            loader = trainer.fit_loop._data_source.dataloader()
        batches = []
        with _rng_kept(loader):
            for batch in loader:
                if len(batches) == self.calib_batches:
                    break
                batches.append(to_module(batch, pl_module, training=True))
        if not batches:
            raise LplError("the training loader yielded no batches, so there is nothing to calibrate pruning on.")
        if len(batches) < self.calib_batches:
            rank_zero_warn(f"BlockPruneCallback: calib_batches={self.calib_batches}, but the training loader yields "
                           f"{len(batches)} batches an epoch: calibrating on those {len(batches)}.")
        return batches

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Validation loss (and accuracy when batches carry labels) of the module as it is now, over what every
        rank's loader holds (each its share under a distributed sampler, or each the whole set)."""
        batches = _validation_batches(trainer)
        if batches is None:
            return {}
        total_loss = correct = count = labelled = 0.0
        outputs: list[Any] = []  # the module's own forward output inside its loss: logits without a second forward
        handle = pl_module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            with eval_mode(pl_module):  # eval also turns distillation off: plain task loss
                for batch in batches:
                    batch = to_module(batch, pl_module, training=False)
                    size = loss_weight(batch)
                    outputs.clear()
                    total_loss += float(module_loss(pl_module, batch)) * size
                    if isinstance(batch, dict) and "label" in batch:
                        logits = outputs[0] if len(outputs) == 1 and isinstance(outputs[0], torch.Tensor) else None
                        if logits is None or logits.shape[0] != batch["label"].shape[0]:
                            logits = pl_module(model_inputs(batch))
                        hits, labels = _class_hits(logits, batch["label"])
                        correct, labelled = correct + hits, labelled + labels
                    count += size
        finally:
            handle.remove()
        if trainer.world_size > 1:  # a distributed sampler gives each rank a share: the figures are the whole set's
            totals = torch.tensor([total_loss, correct, count, labelled], device=pl_module.device,
                                  dtype=torch.float32 if pl_module.device.type == "mps" else torch.float64)
            total_loss, correct, count, labelled = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        if not count:
            return {}
        metrics = {f"prune/{stage}_val_loss": total_loss / count}
        if labelled:
            metrics[f"prune/{stage}_val_acc"] = correct / labelled
        return metrics

    def _result_dir(self, trainer: L.Trainer) -> Path:
        if self.result_path:
            return Path(self.result_path)
        checkpoint = trainer.checkpoint_callback
        base = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
        return Path(base) / "prune_result"

    def _format_metrics(self) -> str:
        """'; name=value, ...' of the figures measured, or '' when none were (evaluate=False, no validation data)."""
        figures = ", ".join(f"{k.removeprefix('prune/')}={v:.4f}" for k, v in self.metrics.items())
        return f"; {figures}" if figures else ""

    def _log(self, trainer: L.Trainer, charts: bool = False) -> None:
        """The result's scalars (and, with ``charts``, W&B's per-layer tables and plots) to every logger."""
        result = self.result
        scalars = {"prune/flops_keep": result.flops_keep, "prune/predicted_speedup": result.predicted_speedup,
                   "prune/predicted_energy_ratio": result.predicted_energy_ratio,
                   "prune/seconds": result.prune_seconds, **self.metrics}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if charts and is_wandb(logger) and trainer.is_global_zero:
                log_result_to_wandb(logger, result)


@contextlib.contextmanager
def _rng_kept(loader: Any) -> Iterator[None]:
    """Undo what reading ``loader`` draws from random generators (its own, its sampler's, torch's global CPU and CUDA
    ones, numpy's and Python's global ones: shuffling, worker seeds, augmentations in the main process), so that
    calibrating does not change the batches training sees next."""
    owners = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
              getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    generators = {id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)}
    states = [(generator, generator.get_state()) for generator in generators.values()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            for generator, state in states:
                generator.set_state(state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _class_hits(logits: Any, label: Any) -> tuple[float, float]:
    """Correct argmax predictions and labels counted: one class label per sample or per token (negative labels, an
    ignore_index, not counted); (0, 0) for labels of another form (multi-label targets, soft labels)."""
    if (not isinstance(logits, torch.Tensor) or not isinstance(label, torch.Tensor) or label.is_floating_point()
            or logits.shape[:-1] != label.shape):
        return 0.0, 0.0
    valid = label >= 0
    return float(((logits.argmax(-1) == label) & valid).sum()), float(valid.sum())


def _spawns_processes(trainer: L.Trainer) -> bool:
    """Whether the fit runs in processes the Trainer starts itself (ddp_spawn, ddp_fork, ddp_notebook), which hand
    back only the weights."""
    try:  # Lightning's own (private) launcher class
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:
        return False
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _check_trainer(callback: BlockPruneCallback, trainer: L.Trainer) -> None:
    """Refuse Trainer callbacks that would undo the masks: weight averaging that starts before pruning (its averaged
    weights, which the fit ends with, keep the pruned blocks' values) and a second BlockPruneCallback (each applies
    its masks in place of the other's, and both save into one prune_result/); and strategies that shard the model,
    whose calibration and masks would see parameter shards."""
    check_replicated_strategy(trainer, "BlockPruneCallback")
    averaging = weight_averaging_callbacks()
    for other in trainer.callbacks:
        # masks applied at fit start are in every averaged snapshot; pruning later leaves dense ones in the average
        if isinstance(other, averaging) and callback.prune_after_steps > 0 and callback._given is None:
            raise LplError(
                f"BlockPruneCallback(prune_after_steps={callback.prune_after_steps}) cannot be combined with "
                f"{type(other).__name__}: weights averaged before pruning keep values in the pruned blocks of the "
                "averaged model the fit ends with (and of its checkpoints, for EMA), so the model measured and "
                "exported would not be the pruned one. Prune at fit start (prune_after_steps=0, or result=...) to "
                "average the pruned weights, or average in a fit of its own.")
        if isinstance(other, BlockPruneCallback) and other is not callback:
            raise LplError(ONE_PER_TRAINER)


# Lightning refuses a second instance of a stateful callback when the Trainer is built (the CLI prints this instead);
# the check at fit start catches subclasses with a state_key of their own
ONE_PER_TRAINER = ("a Trainer takes one BlockPruneCallback: a second one would apply its masks in place of the "
                   "first's. Prune every layer group with one callback (include=[... all patterns ...]).")


def _validation_batches(trainer: L.Trainer) -> Iterator[Any] | None:
    """The validation batches the fit validates on, as many as ``limit_val_batches`` allows (the datamodule's
    loader, or the one given to fit); None without validation data or with limit_val_batches=0."""
    limit = trainer.limit_val_batches
    if limit == 0:
        return None
    loader = fit_val_loaders(trainer)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None  # several: the first, as Lightning's val/ metrics name dataloader 0
    if loader is None:
        return None
    if isinstance(limit, float) and limit != 1.0:
        try:
            limit = max(1, int(limit * len(loader)))
        except TypeError:  # an iterable without a length: the whole of it
            limit = None
    elif isinstance(limit, float):
        limit = None
    return itertools.islice(loader, limit)


def _check_can_distill(pl_module: L.LightningModule) -> None:
    """Refuse distill=True on a module that cannot take the dense network as its teacher."""
    if not callable(getattr(pl_module, "set_teacher", None)) or not isinstance(
        getattr(pl_module, "model", None), torch.nn.Module
    ):
        raise LplError(f"distill=True needs {type(pl_module).__name__} to have set_teacher(module) and a "
                       "`.model` network (as lpl.models.ViTClassifier); or use distill=False.")


def log_result_to_wandb(logger: Any, result: PruneResult) -> None:
    """Per-layer density / predicted latency / energy bar charts and distortion curves in a W&B run."""
    import wandb

    density = result.density
    unknown = (float("nan"), float("nan"))  # a result built by hand may carry no cost predictions
    rows = [[name, density[name], *result.layer_latency.get(name, unknown), *result.layer_energy.get(name, unknown)]
            for name in density]
    table = wandb.Table(columns=["layer", "density", "dense_latency_s", "pruned_latency_s", "dense_energy_j",
                                 "pruned_energy_j"], data=rows)
    charts = {
        "prune/layers": table,
        "prune/density": wandb.plot.bar(table, "layer", "density", title="kept density per layer"),
        "prune/latency": wandb.plot.bar(table, "layer", "pruned_latency_s", title="predicted latency per layer"),
        "prune/energy": wandb.plot.bar(table, "layer", "pruned_energy_j", title="predicted energy per layer"),
    }
    if result.curves:
        names = list(result.curves)
        charts["prune/distortion_curves"] = wandb.plot.line_series(
            xs=[result.curves[n]["density"].tolist() for n in names],
            ys=[result.curves[n]["distortion"].tolist() for n in names],
            keys=names, title="predicted distortion vs density", xname="density",
        )
    logger.experiment.log(charts)
